"""The gateway to Redis: ``CreditStore``, creditgate's only writer of credit state.

The decision itself lives in ``lua/charge.lua`` and ``lua/command.lua``. The store
layer around it, one job a module:

- ``keys``: every key and hash field the store reads or writes;
- ``calls``: requests and commands mapped onto the scripts' KEYS and ARGV, packed as
  Redis protocol (``ChargeCall``, ``PreparedCall``);
- ``batches``: packed calls sent over the batch connection, scripts reloaded when lost;
- ``wire``: a batch over one connection, the only use of redis-py's private parts;
- ``reads``: what the HTTP API and the CLI read, as plain data;
- ``restore`` and ``writeback``: state folded from the ledger and written back
  (healing, ``creditgate rebuild``);
- ``outages``: Redis failures as ``StoreUnavailable``;
- here: ``CreditStore``, whose methods are all the rest of creditgate uses. Every one
  raises ``StoreUnavailable`` when Redis cannot be reached, never a redis-py error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import orjson
from redis.asyncio.cluster import RedisCluster

from creditgate.domain.commands import LicenseCommand
from creditgate.domain.decisions import ChargeRecord
from creditgate.domain.license_events import CommandRecord
from creditgate.errors import RedisMayHaveForgotten
from creditgate.settings import Settings
from creditgate.store import reads
from creditgate.store.batches import Batches, Script
from creditgate.store.calls import (
    ChargeAnswer,
    ChargeCall,
    ChargePacker,
    CommandAnswer,
    InvalidCommand,
    KnownSequences,
    PreparedCall,
    _resp,
    command_calls,
)
from creditgate.store.client import RedisClient, redis_client
from creditgate.store.cluster import ClusterBatches
from creditgate.store.keys import USAGE_METRICS, Keys
from creditgate.store.outages import unavailable_as
from creditgate.store.reads import PeriodUsage, StoredDecision
from creditgate.store.restore import OrgState
from creditgate.store.wire import Reply
from creditgate.store.writeback import (
    HealedOrg,
    delete_matching,
    heal_org,
    org_has_keys,
    redis_skew_ms,
    write_org,
)

__all__ = [
    "USAGE_METRICS",
    "ChargeAnswer",
    "ChargeCall",
    "CommandAnswer",
    "CreditStore",
    "HealedOrg",
    "InvalidCommand",
    "KnownSequences",
    "PeriodUsage",
    "PreparedCall",
    "StoredDecision",
]

# the scripts' answers that decide nothing: Redis is behind what the ledger published
_STALE = ("behind", "unknown")


class CreditStore:
    """creditgate's only writer of credit state."""

    def __init__(self, client: RedisClient, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self.keys = Keys(settings.key_prefix)
        self._charge, self._command = Script("charge.lua"), Script("command.lua")
        self._packer = ChargePacker(self.keys, settings, self._charge.sha)
        scripts = (self._charge, self._command)
        self._batches = (
            ClusterBatches(client, scripts)
            if isinstance(client, RedisCluster)
            else Batches(client, scripts)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> CreditStore:
        return cls(redis_client(settings), settings)

    @property
    def is_cluster(self) -> bool:
        return isinstance(self._redis, RedisCluster)

    @property
    def client_for_tests(self) -> RedisClient:
        """The Redis client, for tests and benchmarks that look at or clear keys
        directly. creditgate itself goes through the methods below."""
        return self._redis

    async def close(self) -> None:
        await self._batches.close()  # after the batch in hand, if any
        await self._redis.aclose()

    async def load_scripts(self) -> None:
        """Register the scripts once; a restarted Redis gets them again on NOSCRIPT."""
        await self._batches.load_scripts()

    def watch_reconnections(self) -> None:
        """From now on, a batch whose connection had to be (re)made is not sent: it raises
        ``RedisMayHaveForgotten`` for every organisation, once per connection made, so the
        worker checks Redis against the ledger first (the first connection included)."""
        self._batches.watch_reconnections()

    async def ping(self) -> None:
        """Whether Redis answers (readiness)."""
        async with unavailable_as("pinging"):
            await self._redis.ping()

    async def config_value(self, name: str) -> str | None:
        """One of Redis's settings (``CONFIG GET``), None when it has none by that name.
        An ACL may forbid CONFIG: that ``ResponseError`` is raised as it is."""
        async with unavailable_as(f"reading {name}"):
            found = await self._redis.config_get(name)
        value = found.get(name)
        return None if value is None else str(value)

    # ---- charges ---------------------------------------------------------------

    def pack_charges(
        self, calls: Sequence[ChargeCall], mode: Literal["charge", "quote"] = "charge"
    ) -> list[PreparedCall]:
        """The script calls as Redis protocol, all but the decision clock, to decide
        later with ``charge_packed`` (``calls.ChargePacker.pack``)."""
        return self._packer.pack(calls, mode)

    async def charge_many(
        self, calls: Sequence[ChargeCall], now_ms: int, known: KnownSequences = None
    ) -> list[ChargeAnswer]:
        """Decide a batch of requests: one script call each, one round trip in all."""
        return await self.charge_packed(self.pack_charges(calls), now_ms, known=known)

    async def charge_packed(
        self,
        packed: Sequence[PreparedCall],
        now_ms: int,
        each: Callable[[int, ChargeAnswer], None] | None = None,
        known: KnownSequences = None,
    ) -> list[ChargeAnswer]:
        """``charge_many`` of calls packed ahead, decided at ``now_ms``.

        ``each(i, answer)`` sees every answer as soon as its reply is read, while Redis
        still runs the calls after it: the worker renders a decision's messages in that
        time instead of waiting for the whole batch. If the batch fails after some
        answers were seen, it raises; the caller starts the batch again.

        With ``known``, a call whose organisation Redis has forgotten decides nothing, and
        once the batch's replies are read it raises ``RedisMayHaveForgotten`` naming those
        organisations (the others were decided: sent again, they are replays).
        """
        # by position: a cluster's nodes answer in their own order
        answers: list[ChargeAnswer | None] = [None] * len(packed)
        stale: set[str] = set()

        def answer(i: int, reply: Reply) -> None:
            status, raw = reply
            if status in _STALE:
                stale.add(packed[i].call.org_id)
                return
            found = ChargeAnswer(status, ChargeRecord.from_script(orjson.loads(raw)))
            answers[i] = found
            if each is not None and not stale:
                each(i, found)

        if packed:
            commands = [(self.keys.route(p.call.org_id), p.command(now_ms, known)) for p in packed]
            await self._batches.run(commands, "deciding charge requests", answer)
        if stale:
            raise RedisMayHaveForgotten("its sequence is behind the ledger", frozenset(stale))
        return cast(list[ChargeAnswer], answers)

    async def quote(self, call: ChargeCall, now_ms: int) -> ChargeRecord:
        """The decision the charge script would take now, computed without writing."""
        (packed,) = self.pack_charges([call], "quote")  # no sequence check: writes nothing
        command = (self.keys.route(call.org_id), packed.command(now_ms))
        ((_, raw),) = await self._batches.run([command], "quoting", pooled=True)
        return ChargeRecord.from_script(orjson.loads(raw))

    # ---- license commands ------------------------------------------------------

    async def apply_commands(
        self,
        commands: Sequence[LicenseCommand | InvalidCommand],
        now_ms: int,
        known: KnownSequences = None,
    ) -> list[CommandAnswer]:
        """Apply a batch of license commands, one round trip; ``known`` as in
        ``charge_packed``."""
        if not commands:
            return []
        calls = command_calls(
            commands,
            now_ms,
            known,
            self.keys,
            self._settings.idempotency_ttl_ms,
            self._command.sha,
        )
        routed = [
            (self.keys.route(c.org_id), call) for c, call in zip(commands, calls, strict=True)
        ]
        replies = await self._batches.run(routed, "applying license commands")
        stale = {
            c.org_id for c, (status, _) in zip(commands, replies, strict=True) if status in _STALE
        }
        if stale:
            raise RedisMayHaveForgotten("its sequence is behind the ledger", frozenset(stale))
        return [
            CommandAnswer(status, CommandRecord.from_script(orjson.loads(raw)))
            for status, raw in replies
        ]

    # ---- reads ---------------------------------------------------------------

    async def credits(self, org_id: str, now_ms: int) -> dict[str, Any] | None:
        """The organisation's current period: amount, grants, used and remaining."""
        async with unavailable_as("reading credits"):
            return await reads.credits(self._redis, self.keys.org(org_id), org_id, now_ms)

    async def org_exists(self, org_id: str) -> bool:
        """An organisation is known once a command gave it a license or a member."""
        async with unavailable_as("reading the organisation"):
            return await reads.org_exists(self._redis, self.keys.org(org_id))

    async def members(self, org_id: str) -> reads.Members:
        """The members (user id -> role), the users disallowed credits use and the
        members' credit limits."""
        async with unavailable_as("reading the members"):
            return await reads.members(self._redis, self.keys.org(org_id))

    async def current_period(self, org_id: str) -> str | None:
        """The id of the license's current period (None: no license)."""
        async with unavailable_as("reading the license"):
            return await reads.current_period(self._redis, self.keys.org(org_id))

    async def period_usage(
        self, org_id: str, period_id: str, actions: Sequence[str]
    ) -> PeriodUsage:
        """Per user of the period: per action of ``actions``, its usage counts."""
        async with unavailable_as("reading usage"):
            return await reads.period_usage(self._redis, self.keys.org(org_id), period_id, actions)

    async def history_page(
        self,
        org_id: str,
        user_id: str,
        action: str,
        limit: int,
        before_ms: int | None = None,
        after_request_id: str | None = None,
    ) -> list[tuple[str, int]]:
        """Up to ``limit + 1`` (request id, decision time) of the user's decisions of
        ``action``, newest first, after a cursor (``reads.history_page``)."""
        key = self.keys.org(org_id).history(user_id, action)
        async with unavailable_as("reading a charge history"):
            return await reads.history_page(self._redis, key, limit, before_ms, after_request_id)

    async def stored_decisions(
        self, org_id: str, request_ids: Sequence[str]
    ) -> list[StoredDecision | None]:
        """Per request id, its stored decision (None: expired or never decided)."""
        async with unavailable_as("reading decisions"):
            return await reads.stored_decisions(self._redis, self.keys.org(org_id), request_ids)

    async def stored_decision(self, org_id: str, request_id: str) -> StoredDecision | None:
        async with unavailable_as("reading a decision"):
            return await reads.stored_decision(self._redis, self.keys.org(org_id), request_id)

    # ---- healing from the ledger (stream/healing.py) ----------------------------

    async def ledger_checkpoint(self, topic: str) -> dict[int, int]:
        """Per partition of the ledger ``topic``: the offset below which every entry is
        known to be in Redis (none for a partition never checkpointed, or forgotten).

        A cluster has a copy per node, each vouching for that node's data only: a
        partition's checkpoint is the lowest of them, and none when a node lacks it."""
        prefix = f"{topic}:"
        found: dict[int, int] | None = None
        for key in await self._batches.routes_to_every_node(self.keys.ledger_checkpoint):
            async with unavailable_as("reading the ledger checkpoint"):
                members = cast(
                    list[tuple[str, float]], await self._redis.zrange(key, 0, -1, withscores=True)
                )
            here = {
                int(member[len(prefix) :]): int(score)
                for member, score in members
                if member.startswith(prefix)
            }
            found = (
                here
                if found is None
                else {p: min(o, here[p]) for p, o in found.items() if p in here}
            )
        return found or {}

    async def raise_ledger_checkpoint(self, topic: str, offsets: dict[int, int]) -> None:
        """Raise the checkpoint of each partition to its offset, never lower it (another
        worker may have raised it further). Over the batch connection, on every node: if
        that connection had to be made anew, Redis may have forgotten what the offsets
        vouch for, and this raises ``RedisMayHaveForgotten`` instead of writing."""
        if not offsets:
            return
        scores = [part for p, o in sorted(offsets.items()) for part in (o, f"{topic}:{p}")]
        commands = [
            (key, _resp(("ZADD", key, "GT", *scores)))
            for key in await self._batches.routes_to_every_node(self.keys.ledger_checkpoint)
        ]
        await self._batches.run(commands, "raising the ledger checkpoint")

    async def check_batch_connection(self) -> None:
        """A PING over the batch connection (to every node), while the worker is idle: a
        Redis restarted meanwhile (from an older AOF, empty) is noticed now, as
        ``RedisMayHaveForgotten``, not only when the next batch comes, so healing never
        waits for traffic."""
        commands = [
            (key, _resp(("PING",)))
            for key in await self._batches.routes_to_every_node(self.keys.ledger_checkpoint)
        ]
        await self._batches.run(commands, "checking the batch connection")

    async def sequences(self, org_ids: Sequence[str]) -> dict[str, int]:
        """Each organisation's ledger sequence in Redis (0: none)."""
        async with unavailable_as("reading sequences"):
            pipe = self._redis.pipeline(transaction=False)
            for org_id in org_ids:
                pipe.get(self.keys.org(org_id).sequence)
            found = await pipe.execute()
        return {org: int(value or 0) for org, value in zip(org_ids, found, strict=True)}

    async def heal_org(
        self, org_id: str, entries: Sequence[Mapping[str, Any]], now_ms: int
    ) -> HealedOrg:
        """Fold the ledger ``entries`` (whole, in sequence order, one copy each) that Redis
        lacks onto the organisation's state, in one transaction (writeback.heal_org)."""
        async with unavailable_as(f"healing organisation {org_id}"):
            skew = await redis_skew_ms(self._redis, now_ms)
            return await heal_org(
                self._redis,
                self.keys.org(org_id),
                entries,
                self._settings.idempotency_ttl_ms,
                now_ms,
                skew,
            )

    # ---- rebuilding from the ledger (creditgate rebuild) ------------------------

    async def org_keys_exist(self, org_id: str | None = None) -> bool:
        """Whether Redis has any key of the organisation (of any, when None)."""
        async with unavailable_as("looking for keys"):
            return await org_has_keys(self._redis, self.keys.org_pattern(org_id or "*"))

    async def delete_org_keys(self, org_id: str) -> int:
        """Delete every key of the organisation; how many there were."""
        async with unavailable_as(f"deleting the keys of {org_id}"):
            return await delete_matching(self._redis, self.keys.org_pattern(org_id))

    async def clock_skew_ms(self, now_ms: int) -> int:
        """How far Redis's clock runs ahead of the decision clock ``now_ms`` (0: behind)."""
        async with unavailable_as("reading Redis's clock"):
            return await redis_skew_ms(self._redis, now_ms)

    async def write_org(self, org_id: str, state: OrgState, skew_ms: int) -> int:
        """Write an organisation's folded state (writeback.write_org); keys written."""
        async with unavailable_as(f"writing organisation {org_id}"):
            return await write_org(self._redis, self.keys.org(org_id), state, skew_ms)

"""The gateway to Redis: ``CreditStore``, creditgate's only writer of credit state.

The decision itself lives in ``lua/charge.lua`` and ``lua/command.lua``. The store
layer around it, one job a module:

- ``keys``: every key and hash field the store reads or writes;
- ``calls``: requests and commands mapped onto the scripts' KEYS and ARGV, packed as
  Redis protocol (``ChargeCall``, ``PreparedCall``);
- ``wire``: a batch over one connection, the only use of redis-py's private parts;
- ``restore``: state folded back from the ledger (healing, ``creditgate rebuild``);
- here: the store's methods, which send the batches and read state, with every Redis
  failure turned into ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib import resources
from typing import Any, Literal, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from creditgate.connections import redis_options
from creditgate.domain.commands import LicenseCommand
from creditgate.domain.decisions import ChargeRecord
from creditgate.domain.license_events import CommandRecord
from creditgate.errors import CreditgateError, RedisMayHaveForgotten, StoreUnavailable
from creditgate.settings import Settings
from creditgate.store import reads
from creditgate.store.calls import (
    ChargeAnswer,
    ChargeCall,
    ChargePacker,
    CommandAnswer,
    InvalidCommand,
    KnownSequences,
    PackedCharge,
    PreparedCall,
    _resp,
    command_payload,
)
from creditgate.store.keys import USAGE_METRICS, Keys
from creditgate.store.reads import PeriodUsage, StoredDecision
from creditgate.store.restore import HealedOrg, heal_org, redis_skew_ms
from creditgate.store.wire import BatchConnection, OnReply, Reply

__all__ = [
    "USAGE_METRICS",
    "ChargeAnswer",
    "ChargeCall",
    "CommandAnswer",
    "CreditStore",
    "InvalidCommand",
    "KnownSequences",
    "PeriodUsage",
    "PreparedCall",
    "StoredDecision",
]

# the scripts' answers that decide nothing: Redis is behind what the ledger published
_STALE = ("behind", "unknown")


def _script(name: str) -> str:
    return resources.files("creditgate.store").joinpath("lua", name).read_text("utf-8")


class CreditStore:
    """creditgate's only writer of credit state."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self.keys = Keys(settings.key_prefix)
        self._charge_lua = _script("charge.lua")
        self._command_lua = _script("command.lua")
        # Redis names a script by the SHA1 of its text: known before it is loaded, so
        # calls can be packed ahead (``pack_charges``)
        self._charge_sha = hashlib.sha1(self._charge_lua.encode()).hexdigest()
        self._command_sha = hashlib.sha1(self._command_lua.encode()).hexdigest()
        self._scripts_loaded = False
        self._packer = ChargePacker(self.keys, settings, self._charge_sha)
        # The decision loop's batches go over a connection of their own, one batch at a
        # time: taking a pooled connection checks it with a socket read, and while that
        # read waits the worker's other stages run (preparing, publishing) with the
        # batch not yet sent and Redis idle. About 4 % more decisions/s in alternating
        # ``python -m bench.run`` runs on one stack. Quotes from the HTTP API use the pool.
        self._batch_connection: BatchConnection | None = None
        self._batch_turn = asyncio.Lock()
        # Set by ``watch_reconnections``: a (re)connection of the batch connection may
        # reach a Redis that forgot (a restart from an older AOF, a promoted replica), so
        # the batch is not sent until the worker has checked Redis against the ledger.
        self._watching_reconnections = False
        self._connections_made = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> CreditStore:
        client = aioredis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=15,
            **redis_options(settings),
        )
        return cls(client, settings)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def close(self) -> None:
        async with self._batch_turn:  # after the batch in hand, if any
            if self._batch_connection is not None:
                await self._batch_connection.disconnect()
                self._batch_connection = None
        await self._redis.aclose()

    async def load_scripts(self) -> None:
        """Register the scripts once; a restarted Redis gets them again on NOSCRIPT."""
        async with _infrastructure("loading the Lua scripts"):
            loaded = (
                await self._redis.script_load(self._charge_lua),
                await self._redis.script_load(self._command_lua),
            )
        if loaded != (self._charge_sha, self._command_sha):
            raise CreditgateError(f"Redis named the scripts {loaded}, not by their SHA1")
        self._scripts_loaded = True

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
        packed: Sequence[PackedCharge],
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
        answers: list[ChargeAnswer] = []
        stale: set[str] = set()

        def answer(i: int, reply: Reply) -> None:
            status, raw = reply
            if status in _STALE:
                stale.add(packed[i].call.org_id)
                return
            found = ChargeAnswer(status, ChargeRecord.from_script(orjson.loads(raw)))
            answers.append(found)
            if each is not None and not stale:
                each(i, found)

        if packed:
            payload = b"".join(p.command(now_ms, known) for p in packed)
            await self._run_batch(payload, len(packed), "deciding charge requests", answer)
        if stale:
            raise RedisMayHaveForgotten("its sequence is behind the ledger", frozenset(stale))
        return answers

    async def quote(self, call: ChargeCall, now_ms: int) -> ChargeRecord:
        """The decision the charge script would take now, computed without writing."""
        (packed,) = self.pack_charges([call], "quote")  # no sequence check: writes nothing
        ((_, raw),) = await self._run_batch(packed.command(now_ms), 1, "quoting", pooled=True)
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
        payload = command_payload(
            commands,
            now_ms,
            known,
            self.keys,
            self._settings.idempotency_ttl_ms,
            self._command_sha,
        )
        replies = await self._run_batch(payload, len(commands), "applying license commands")
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
        async with _infrastructure("reading credits"):
            return await reads.credits(self._redis, self.keys.org(org_id), org_id, now_ms)

    async def org_exists(self, org_id: str) -> bool:
        """An organisation is known once a command gave it a license or a member."""
        async with _infrastructure("reading the organisation"):
            return await reads.org_exists(self._redis, self.keys.org(org_id))

    async def current_period(self, org_id: str) -> str | None:
        """The id of the license's current period (None: no license)."""
        async with _infrastructure("reading the license"):
            return await reads.current_period(self._redis, self.keys.org(org_id))

    async def period_usage(
        self, org_id: str, period_id: str, actions: Sequence[str]
    ) -> PeriodUsage:
        """Per user of the period: per action of ``actions``, its usage counts."""
        async with _infrastructure("reading usage"):
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
        async with _infrastructure("reading a charge history"):
            return await reads.history_page(self._redis, key, limit, before_ms, after_request_id)

    async def stored_decisions(
        self, org_id: str, request_ids: Sequence[str]
    ) -> list[StoredDecision | None]:
        """Per request id, its stored decision (None: expired or never decided)."""
        async with _infrastructure("reading decisions"):
            return await reads.stored_decisions(self._redis, self.keys.org(org_id), request_ids)

    async def stored_decision(self, org_id: str, request_id: str) -> StoredDecision | None:
        async with _infrastructure("reading a decision"):
            return await reads.stored_decision(self._redis, self.keys.org(org_id), request_id)

    # ---- healing from the ledger (stream/healing.py) ----------------------------

    async def ledger_checkpoint(self, topic: str) -> dict[int, int]:
        """Per partition of the ledger ``topic``: the offset below which every entry is
        known to be in Redis (none for a partition never checkpointed, or forgotten)."""
        async with _infrastructure("reading the ledger checkpoint"):
            found = cast(
                list[tuple[str, float]],
                await self._redis.zrange(self.keys.ledger_checkpoint, 0, -1, withscores=True),
            )
        prefix = f"{topic}:"
        return {
            int(member[len(prefix) :]): int(score)
            for member, score in found
            if member.startswith(prefix)
        }

    async def raise_ledger_checkpoint(self, topic: str, offsets: dict[int, int]) -> None:
        """Raise the checkpoint of each partition to its offset, never lower it (another
        worker may have raised it further). Over the batch connection: if that connection
        had to be made anew, Redis may have forgotten what the offsets vouch for, and this
        raises ``RedisMayHaveForgotten`` instead of writing."""
        if not offsets:
            return
        scores = [part for p, o in sorted(offsets.items()) for part in (o, f"{topic}:{p}")]
        payload = _resp(("ZADD", self.keys.ledger_checkpoint, "GT", *scores))
        await self._run_batch(payload, 1, "raising the ledger checkpoint")

    async def sequences(self, org_ids: Sequence[str]) -> dict[str, int]:
        """Each organisation's ledger sequence in Redis (0: none)."""
        async with _infrastructure("reading sequences"):
            pipe = self._redis.pipeline(transaction=False)
            for org_id in org_ids:
                pipe.get(self.keys.org(org_id).sequence)
            found = await pipe.execute()
        return {org: int(value or 0) for org, value in zip(org_ids, found, strict=True)}

    async def heal_org(
        self, org_id: str, entries: Sequence[Mapping[str, Any]], now_ms: int
    ) -> HealedOrg:
        """Fold the ledger ``entries`` (whole, in sequence order, one copy each) that Redis
        lacks onto the organisation's state, in one transaction (restore.heal_org)."""
        async with _infrastructure(f"healing organisation {org_id}"):
            skew = await redis_skew_ms(self._redis, now_ms)
            return await heal_org(
                self._redis,
                self.keys.org(org_id),
                entries,
                self._settings.idempotency_ttl_ms,
                now_ms,
                skew,
            )

    # ---- plumbing --------------------------------------------------------------

    async def _run_batch(
        self,
        payload: bytes,
        count: int,
        doing: str,
        on_reply: OnReply | None = None,
        *,
        pooled: bool = False,
    ) -> list[Reply]:
        async with _infrastructure(doing):
            for attempt in range(2):
                if not self._scripts_loaded:
                    await self.load_scripts()
                async with self._connection(pooled) as connection:
                    replies, seen = await self._pipeline(
                        connection, payload, count, on_reply, pooled=pooled
                    )
                failed = next((r for r in replies if isinstance(r, ResponseError)), None)
                if isinstance(failed, NoScriptError) and not attempt and not seen:
                    # Redis restarted and lost its script cache (so no call ran). Load the
                    # scripts and send the batch again.
                    self._scripts_loaded = False
                    continue
                if failed is not None:
                    raise failed
                return replies
        raise CreditgateError(f"{doing}: the scripts could not be loaded")

    @contextlib.asynccontextmanager
    async def _connection(self, pooled: bool) -> AsyncIterator[BatchConnection]:
        """The batch connection (waiting for the batch before, if any), or a pooled one."""
        if pooled:
            pool = self._redis.connection_pool
            # redis-py leaves get_connection unannotated
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                yield BatchConnection(connection)
            finally:
                await pool.release(connection)
            return
        async with self._batch_turn:  # no wait when free, so no other task runs first
            if self._batch_connection is None:
                self._batch_connection = BatchConnection.dedicated(
                    self._redis.connection_pool, self._connected
                )
            yield self._batch_connection

    def watch_reconnections(self) -> None:
        """From now on, a batch whose connection had to be (re)made is not sent: it raises
        ``RedisMayHaveForgotten`` for every organisation, once per connection made, so the
        worker checks Redis against the ledger first (the first connection included)."""
        self._watching_reconnections = True
        self._connections_made = 1  # whatever connection there is was not checked yet

    def _connected(self) -> None:
        """After every connect of the batch connection, the health check's silent
        reconnect included."""
        self._connections_made += 1

    async def _pipeline(
        self,
        connection: BatchConnection,
        payload: bytes,
        count: int,
        on_reply: OnReply | None = None,
        *,
        pooled: bool = False,
    ) -> tuple[list[Reply], int]:
        """Send ``count`` packed commands in one write and read their ``count`` replies;
        also how many replies ``on_reply`` saw (``wire.BatchConnection.exchange``).

        This is redis-py's non-transactional pipeline without its per-command work (see
        ``wire``). A connection failure propagates: the batch is retried, never
        acknowledged.
        """
        await connection.open()
        if self._watching_reconnections and self._connections_made and not pooled:
            # counted by _connected: a Redis reached anew may have forgotten writes.
            # Nothing was sent: the connection stays, checked.
            self._connections_made = 0
            raise RedisMayHaveForgotten("the connection to Redis was made anew", None)
        return await connection.exchange(payload, count, on_reply)


class _infrastructure:
    """Turns Redis connection failures into ``StoreUnavailable`` (to retry, never to ack)."""

    def __init__(self, doing: str) -> None:
        self._doing = doing

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            raise StoreUnavailable(f"Redis unavailable while {self._doing}: {exc}") from exc
        if isinstance(exc, ResponseError) and "LOADING" in str(exc):
            raise StoreUnavailable(f"Redis is loading its data while {self._doing}") from exc

"""The gateway to Redis: prepares script arguments, calls the scripts, reads state.

The decision itself lives in ``lua/charge.lua`` and ``lua/command.lua``; the Python
here only maps a request onto the script's KEYS and ARGV, and reads its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, cast

import hiredis
import orjson
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from creditgate.connections import redis_options
from creditgate.domain.charges import MAX_CREDITS, Action, ChargeRequest
from creditgate.domain.commands import (
    Grant,
    LicenseCommand,
    MemberRemove,
    MemberUpsert,
    SetCreditsAllowed,
    StartPeriod,
)
from creditgate.domain.decisions import ChargeRecord, RequestView, request_summary
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.domain.license_events import CommandRecord
from creditgate.errors import CreditgateError, RedisMayHaveForgotten, StoreUnavailable
from creditgate.settings import Settings
from creditgate.store.keys import (
    SHARED_COMPANY,
    SHARED_CONTACT,
    VERIFIED_CONTACT,
    Keys,
    OrgKeys,
    window_name,
)
from creditgate.store.restore import HealedOrg, heal_org, redis_skew_ms

AnswerStatus = Literal["decided", "replay", "conflict"]
# the scripts' answers that decide nothing: Redis is behind what the ledger published
_STALE = ("behind", "unknown")

# The organisation's last published ledger sequence, as the worker knows it (-1: none),
# for the scripts' check that Redis has not forgotten it. None: no check (tools, tests).
KnownSequences = Callable[[str], int] | None

# A batch's replies are read under one timer rather than redis-py's timer per read (arming
# and cancelling one per reply was 5-7 % of the worker's CPU, py-spy): the timer is
# pushed back while replies keep coming, so a Redis silent this long fails the batch.
_SILENCE_SECONDS = 10.0
_PUSH_BACK_EVERY_SECONDS = 1.0
_READ_BYTES = 65536  # at most, per socket read while a batch's replies come
_MORE = object()  # the reply parser's "not a whole reply yet"


def _script(name: str) -> str:
    return resources.files("creditgate.store").joinpath("lua", name).read_text("utf-8")


@dataclass(slots=True)  # not frozen: one or more per decision (see ChargeRecord)
class ChargeCall:
    """One charge request mapped onto the charge script's arguments."""

    org_id: str
    request_id: str
    user_id: str
    action: Action
    fingerprint: str
    partial: bool = False
    max_credits: int | None = None
    verified_email_found: bool | None = None
    preset_reason: str = ""
    preset_detail: str = ""
    # distinct window names of the request, and per item (its window, its company's
    # window or None) as indexes into that list
    windows: tuple[str, ...] = ()
    items: tuple[tuple[int, int | None], ...] = ()
    # the request as reports show it, stored beside its decision
    summary: str = "{}"

    @classmethod
    def of(cls, request: ChargeRequest, view: RequestView | None = None) -> ChargeCall:
        """``view``: the request's ``RequestView.of`` when the caller has already built it
        (the worker renders from it too; building it costs a dump per item)."""
        index: dict[str, int] = {}

        def slot(name: str) -> int:
            return index.setdefault(name, len(index))

        items: list[tuple[int, int | None]] = []
        for item in request.items:
            if request.action is Action.EMAIL_VERIFICATION:
                items.append((slot(window_name(VERIFIED_CONTACT, item.id)), None))
            elif item.type == "contact":
                company = item.company_id
                items.append(
                    (
                        slot(window_name(SHARED_CONTACT, item.id)),
                        slot(window_name(SHARED_COMPANY, company)) if company else None,
                    )
                )
            else:
                items.append((slot(window_name(SHARED_COMPANY, item.id)), None))
        return cls(
            org_id=request.org_id,
            request_id=request.request_id,
            user_id=request.user_id,
            action=request.action,
            fingerprint=request.fingerprint(),
            partial=request.partial,
            max_credits=request.max_credits,
            verified_email_found=request.verified_email_found,
            windows=tuple(index),
            items=tuple(items),
            summary=request_summary(view or RequestView.of(request)),
        )

    @classmethod
    def invalid(
        cls,
        *,
        org_id: str,
        request_id: str,
        user_id: str | None,
        action: Action,
        fingerprint: str,
        detail: str,
    ) -> ChargeCall:
        """A readable request that failed validation: recorded as rejected, once."""
        return cls(
            org_id=org_id,
            request_id=request_id,
            user_id=user_id or "",
            action=action,
            fingerprint=fingerprint,
            preset_reason="invalid_request",
            preset_detail=detail,
            summary=request_summary(RequestView(org_id, request_id, user_id, action, [])),
        )


@dataclass(slots=True)  # not frozen: one or more per decision (see ChargeRecord)
class ChargeAnswer:
    status: AnswerStatus
    record: ChargeRecord


@dataclass(frozen=True)
class CommandAnswer:
    status: AnswerStatus
    record: CommandRecord


@dataclass(frozen=True)
class InvalidCommand:
    org_id: str
    command_id: str
    fingerprint: str
    detail: str


_FIXED_CHARGE_KEYS = 7  # KEYS before the windows in charge.lua
_CHARGE_ARGS = 8  # its ARGV
# organisations whose keys CreditStore keeps for packing: building an organisation's keys
# and encoding its fixed ones anew for every call cost a fifth of packing the call
_PACKED_ORGS = 100_000


@dataclass(slots=True)  # not frozen: one or more per decision (see ChargeRecord)
class PackedCharge:
    """A charge call in the Redis protocol, but for the decision clock and the known
    sequence (ARGV[1] and [2]): the worker packs a batch while the previous one is in
    Redis, and completes it with both when it sends it."""

    call: ChargeCall
    head: bytes  # the array header, EVALSHA, the script, the number of keys, the keys
    tail: bytes  # every argument after the known sequence

    def command(self, now_ms: int, known: KnownSequences = None) -> bytes:
        now = b"%d" % now_ms
        sequence = b"" if known is None else b"%d" % known(self.call.org_id)
        return b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
            self.head,
            len(now),
            now,
            len(sequence),
            sequence,
            self.tail,
        )


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
        self._thresholds = ",".join(str(p) for p in settings.threshold_percents)
        self._packing_orgs: dict[str, tuple[OrgKeys, bytes]] = {}  # see _packing_org
        # The decision loop's batches go over a connection of their own, one batch at a
        # time: taking a pooled connection checks it with a socket read, and while that
        # read waits the worker's other stages run (preparing, publishing) with the
        # batch not yet sent and Redis idle. About 4 % more decisions/s in alternating
        # ``python -m bench.run`` runs on one stack. Quotes from the HTTP API use the pool.
        self._batch_connection: Any = None
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
    ) -> list[PackedCharge]:
        """The script calls as Redis protocol, all but the decision clock.

        charge.lua's KEYS and ARGV, in the order its header lists them. What is the same
        for every call (EVALSHA and the script, the settings, an organisation's fixed
        keys) is encoded once, not per call. What is the request's own goes in one JSON
        argument rather than a dozen bulk strings: packing 20,000 calls of the benchmark's
        workload took 4.9 µs a call against 8.0 (medians of seven), and ``cjson.decode``
        costs Redis about 1.5 µs of its ~65 per call (``bench.micro``).
        """
        evalsha = _bulks(("EVALSHA", self._charge_sha))
        settings = self._settings
        shared = _bulks(
            (settings.repeat_window_ms, settings.idempotency_ttl_ms, self._thresholds, mode)
        )
        packed = []
        for call in calls:
            org, fixed = self._packing_org(call.org_id)
            keys = _bulks(
                (
                    org.request(call.request_id),
                    org.usage,
                    org.history(call.user_id, call.action),
                    *(org.window(name) for name in call.windows),
                )
            )
            item_keys: list[int] = []
            for window, company in call.items:
                # KEYS indexes of the item's window and its company's (0: none); Lua
                # counts from 1
                item_keys.append(window + _FIXED_CHARGE_KEYS + 1)
                item_keys.append(0 if company is None else company + _FIXED_CHARGE_KEYS + 1)
            request = orjson.dumps(
                [
                    call.request_id,
                    call.user_id,
                    call.action,
                    call.fingerprint,
                    call.partial,
                    call.max_credits,
                    call.verified_email_found,
                    call.preset_reason,
                    call.preset_detail,
                    item_keys,
                ]
            )
            summary = call.summary.encode()
            n_keys = _FIXED_CHARGE_KEYS + len(call.windows)
            head = b"*%d\r\n%s%s%s%s" % (
                # EVALSHA, the script, the key count, the keys, the 7 arguments
                3 + n_keys + _CHARGE_ARGS,
                evalsha,
                _bulks((n_keys,)),
                fixed,
                keys,
            )
            tail = b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                shared,
                len(request),
                request,
                len(summary),
                summary,
            )
            packed.append(PackedCharge(call, head, tail))
        return packed

    def _packing_org(self, org_id: str) -> tuple[OrgKeys, bytes]:
        """An organisation's keys, and KEYS 1-4 of charge.lua (license, members,
        disallowed, sequence) encoded."""
        found = self._packing_orgs.get(org_id)
        if found is None:
            if len(self._packing_orgs) >= _PACKED_ORGS:
                self._packing_orgs.clear()
            org = self.keys.org(org_id)
            fixed = _bulks((org.license, org.members, org.disallowed, org.sequence))
            found = self._packing_orgs[org_id] = (org, fixed)
        return found

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

        def answer(i: int, reply: Any) -> None:
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

    def _command_keys_args(
        self, command: LicenseCommand | InvalidCommand, now_ms: int, known: KnownSequences
    ) -> tuple[list[str], list[str | int]]:
        org = self.keys.org(command.org_id)
        keys = [
            org.license,
            org.members,
            org.disallowed,
            org.sequence,
            org.command(command.command_id),
            org.grants,
        ]
        ttl = self._settings.idempotency_ttl_ms
        sequence = "" if known is None else known(command.org_id)
        if isinstance(command, InvalidCommand):
            return keys, [
                now_ms,
                sequence,
                command.command_id,
                command.fingerprint,
                "invalid",
                ttl,
                command.detail,
            ]
        head: list[str | int] = [
            now_ms,
            sequence,
            command.command_id,
            command.fingerprint(),
            command.type,
            ttl,
        ]
        match command:
            case StartPeriod():
                tail: list[str | int] = [
                    command.period_id,
                    to_ms(command.starts_at),
                    to_ms(command.ends_at),
                    command.credits,
                ]
            case Grant():
                tail = [command.grant_id, command.credits, MAX_CREDITS]
            case MemberUpsert():
                tail = [command.user_id, command.role]
            case MemberRemove():
                tail = [command.user_id]
            case SetCreditsAllowed():
                tail = [command.user_id, "1" if command.allowed else "0", command.set_by]
        return keys, head + tail

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
        head = ("EVALSHA", self._command_sha)
        payload = b"".join(
            _resp((*head, len(keys), *keys, *args))
            for keys, args in (self._command_keys_args(c, now_ms, known) for c in commands)
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
            raw = await self._redis.hgetall(self.keys.org(org_id).license)
        if not raw:
            return None
        credits, granted, balance = int(raw["credits"]), int(raw["granted"]), int(raw["balance"])
        starts, ends = int(raw["starts_ms"]), int(raw["ends_ms"])
        return {
            "org_id": org_id,
            "period_id": raw["period_id"],
            "starts_at": rfc3339(starts),
            "ends_at": rfc3339(ends),
            "active": starts <= now_ms < ends,
            "period_credits": credits,
            "granted": granted,
            "used": credits + granted - balance,
            "remaining": balance,
        }

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
        on_reply: Callable[[int, Any], None] | None = None,
        *,
        pooled: bool = False,
    ) -> list[Any]:
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
    async def _connection(self, pooled: bool) -> AsyncIterator[Any]:
        """The batch connection (waiting for the batch before, if any), or a pooled one."""
        if pooled:
            pool = self._redis.connection_pool
            # redis-py leaves get_connection unannotated
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                yield connection
            finally:
                await pool.release(connection)
            return
        async with self._batch_turn:  # no wait when free, so no other task runs first
            if self._batch_connection is None:
                # redis-py leaves make_connection unannotated
                pool = self._redis.connection_pool
                self._batch_connection = pool.make_connection()  # type: ignore[no-untyped-call]
                self._batch_connection.register_connect_callback(self._connected)
            yield self._batch_connection

    def watch_reconnections(self) -> None:
        """From now on, a batch whose connection had to be (re)made is not sent: it raises
        ``RedisMayHaveForgotten`` for every organisation, once per connection made, so the
        worker checks Redis against the ledger first (the first connection included)."""
        self._watching_reconnections = True
        self._connections_made = 1  # whatever connection there is was not checked yet

    def _connected(self, connection: Any) -> None:
        """redis-py's connect callback: after every connect of the batch connection, the
        health check's silent reconnect included."""
        self._connections_made += 1

    async def _pipeline(
        self,
        connection: Any,
        payload: bytes,
        count: int,
        on_reply: Callable[[int, Any], None] | None = None,
        *,
        pooled: bool = False,
    ) -> tuple[list[Any], int]:
        """Send ``count`` packed commands in one write and read their ``count`` replies;
        also how many replies ``on_reply`` saw (each one read before the first error).

        This is redis-py's non-transactional pipeline without its per-command work: it
        encoded each of a charge call's 25+ arguments through generic checks and cost
        the worker about as much CPU as Redis spends running the script (``bench.micro``).
        An error reply is returned in its place, like ``execute(raise_on_error=False)``;
        a connection failure propagates (the batch is retried, never acknowledged).
        Replies come back while Redis still runs the commands after them, so whatever
        ``on_reply`` does overlaps with Redis's work.
        """
        loop = asyncio.get_running_loop()
        try:
            await connection.connect()  # a no-op when connected
            await connection.check_health()  # its PING, if due, goes before the batch
            if self._watching_reconnections and self._connections_made and not pooled:
                # counted by _connected: a Redis reached anew may have forgotten writes
                self._connections_made = 0
                raise RedisMayHaveForgotten("the connection to Redis was made anew", None)
            # The batch goes to the socket at once, without awaiting the write's drain as
            # redis-py's send does: with a large batch, the drain returns only once Redis
            # has read (and so run) most of it, and then the tasks that became ready
            # meanwhile (preparing the next batch, publishing the last) run before a reply
            # is read. Now the replies are read while Redis runs the batch, and the event
            # loop writes whatever the socket did not take at once (short ``python -m
            # bench.run`` runs: 7,200 → 11,000 decisions/s). A write to a broken
            # connection fails here or in the reads; either way the batch is retried.
            connection._writer.write(payload)
            # The replies are parsed here, a socket read at a time, rather than through
            # redis-py's read_response: its coroutine and checks per reply cost 1.5 µs
            # of the worker's CPU per decision. Nothing else reads this connection
            # meanwhile (one batch at a time), so the two parsers never share bytes.
            parser = _reply_parser(connection)
            stream = connection._reader
            replies: list[Any] = []
            seen = 0
            try:
                async with asyncio.timeout_at(loop.time() + _SILENCE_SECONDS) as silence:
                    pushed_back = loop.time()
                    while len(replies) < count:
                        reply = parser.gets()
                        if reply is _MORE:
                            data = await stream.read(_READ_BYTES)
                            if not data:
                                raise RedisConnectionError("Redis closed the connection")
                            parser.feed(data)
                            now = loop.time()
                            if now - pushed_back > _PUSH_BACK_EVERY_SECONDS:
                                silence.reschedule(now + _SILENCE_SECONDS)
                                pushed_back = now
                            continue
                        if isinstance(reply, hiredis.PushNotification):
                            # RESP3: a server notice (a maintenance event), not a reply
                            continue
                        if isinstance(reply, RedisConnectionError):
                            raise reply  # BusyLoadingError (LOADING) is one
                        i = len(replies)
                        replies.append(reply)  # an error reply in its place, read whole
                        if (
                            on_reply is not None
                            and seen == i
                            and not isinstance(reply, ResponseError)
                        ):
                            on_reply(i, reply)
                            seen += 1
            except TimeoutError:
                raise RedisTimeoutError(
                    f"no reply from Redis for about {_SILENCE_SECONDS:.0f}s"
                ) from None
            if connection.health_check_interval:
                # the connection just answered: as redis-py's own reads do, put its next
                # health-check PING off, so a busy batch connection never waits for one
                connection.next_health_check = loop.time() + connection.health_check_interval
            return replies, seen
        except RedisMayHaveForgotten:
            raise  # nothing was sent: the connection stays, checked
        except BaseException:
            # Replies may be left unread, and the rest of the batch may still wait in the
            # transport's buffer: a plain close would send it anyway, for Redis to run
            # beside the batch's retry, and wait until it is sent (an error of ours then
            # surfaced as a Redis timeout). So the socket is dropped at once; what Redis
            # has already received it still runs. The connection reconnects on next use.
            _drop(connection)
            await connection.disconnect(nowait=True)
            raise


def _reply_parser(connection: Any) -> hiredis.Reader:
    """A parser of a redis-py connection's replies: errors and text as redis-py's own
    hiredis parser gives them, and ``_MORE`` until a whole reply is in."""
    encoder = connection.encoder
    text = (
        {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
        if encoder.decode_responses
        else {}
    )
    return hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=BaseParser.parse_error,
        notEnoughData=_MORE,
        **text,
    )


def _drop(connection: Any) -> None:
    """Close a redis-py connection's socket now, unsent bytes and all."""
    writer = connection._writer
    if writer is not None:
        writer.transport.abort()


def _resp(command: Sequence[str | int]) -> bytes:
    """One command in the Redis protocol, as redis-py's ``pack_command`` writes it for
    str and int arguments: an array of bulk strings, ints in decimal."""
    return b"*%d\r\n%s" % (len(command), _bulks(command))


def _bulks(args: Sequence[str | int]) -> bytes:
    """Bulk strings of the Redis protocol. Built as text and encoded once (formatting
    bytes is slower than formatting str); a length counts bytes, not characters."""
    parts = []
    for arg in args:
        text = arg if isinstance(arg, str) else str(arg)
        size = len(text) if text.isascii() else len(text.encode())
        parts.append(f"${size}\r\n{text}\r\n")
    return "".join(parts).encode()


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

"""The gateway to Redis: prepares script arguments, calls the scripts, reads state.

The decision itself lives in ``lua/charge.lua`` and ``lua/command.lua``; the Python
here only maps a request onto the script's KEYS and ARGV, and reads its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from creditgate.connections import redis_options
from creditgate.domain.charges import Action, ChargeRequest
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
from creditgate.errors import CreditgateError, StoreUnavailable
from creditgate.settings import Settings
from creditgate.store.keys import (
    SHARED_COMPANY,
    SHARED_CONTACT,
    VERIFIED_CONTACT,
    Keys,
    window_name,
)

AnswerStatus = Literal["decided", "replay", "conflict"]


def _script(name: str) -> str:
    return resources.files("creditgate.store").joinpath("lua", name).read_text("utf-8")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


class CreditStore:
    """creditgate's only writer of credit state."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self.keys = Keys(settings.key_prefix)
        self._charge_sha = ""
        self._command_sha = ""
        self._charge_lua = _script("charge.lua")
        self._command_lua = _script("command.lua")
        self._thresholds = ",".join(str(p) for p in settings.threshold_percents)

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
        await self._redis.aclose()

    async def load_scripts(self) -> None:
        """Register the scripts once; a restarted Redis gets them again on NOSCRIPT."""
        async with _infrastructure("loading the Lua scripts"):
            self._charge_sha = await self._redis.script_load(self._charge_lua)
            self._command_sha = await self._redis.script_load(self._command_lua)

    # ---- charges ---------------------------------------------------------------

    def _charge_keys_args(
        self, call: ChargeCall, now_ms: int, mode: str
    ) -> tuple[list[str], list[str | int]]:
        org = self.keys.org(call.org_id)
        keys = [
            org.license,
            org.members,
            org.disallowed,
            org.sequence,
            org.request(call.request_id),
            org.usage,
            org.history(call.user_id, call.action),
        ]
        keys.extend(org.window(name) for name in call.windows)
        verified = {None: "", True: "1", False: "0"}[call.verified_email_found]
        args: list[str | int] = [
            now_ms,
            call.request_id,
            call.user_id,
            call.action.value,
            call.fingerprint,
            "1" if call.partial else "0",
            "" if call.max_credits is None else call.max_credits,
            verified,
            self._settings.repeat_window_ms,
            self._settings.idempotency_ttl_ms,
            call.preset_reason,
            call.preset_detail,
            self._thresholds,
            mode,
            call.summary,
            len(call.items),
        ]
        for window, company in call.items:
            # Lua indexes KEYS from 1
            args.append(window + _FIXED_CHARGE_KEYS + 1)
            args.append(0 if company is None else company + _FIXED_CHARGE_KEYS + 1)
        return keys, args

    async def charge_many(self, calls: Sequence[ChargeCall], now_ms: int) -> list[ChargeAnswer]:
        """Decide a batch of requests: one script call each, one round trip in all."""
        if not calls:
            return []
        prepared = [self._charge_keys_args(call, now_ms, "charge") for call in calls]
        replies = await self._run_batch(
            lambda: self._charge_sha, prepared, "deciding charge requests"
        )
        return [
            ChargeAnswer(status, ChargeRecord.from_script(orjson.loads(raw)))
            for status, raw in replies
        ]

    async def quote(self, call: ChargeCall, now_ms: int) -> ChargeRecord:
        """The decision the charge script would take now, computed without writing."""
        prepared = [self._charge_keys_args(call, now_ms, "quote")]
        ((_, raw),) = await self._run_batch(lambda: self._charge_sha, prepared, "quoting")
        return ChargeRecord.from_script(orjson.loads(raw))

    # ---- license commands ------------------------------------------------------

    def _command_keys_args(
        self, command: LicenseCommand | InvalidCommand, now_ms: int
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
        if isinstance(command, InvalidCommand):
            return keys, [
                now_ms,
                command.command_id,
                command.fingerprint,
                "invalid",
                ttl,
                command.detail,
            ]
        head: list[str | int] = [
            now_ms,
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
                tail = [command.grant_id, command.credits]
            case MemberUpsert():
                tail = [command.user_id, command.role]
            case MemberRemove():
                tail = [command.user_id]
            case SetCreditsAllowed():
                tail = [command.user_id, "1" if command.allowed else "0", command.set_by]
        return keys, head + tail

    async def apply_commands(
        self, commands: Sequence[LicenseCommand | InvalidCommand], now_ms: int
    ) -> list[CommandAnswer]:
        if not commands:
            return []
        prepared = [self._command_keys_args(command, now_ms) for command in commands]
        replies = await self._run_batch(
            lambda: self._command_sha, prepared, "applying license commands"
        )
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

    # ---- plumbing --------------------------------------------------------------

    async def _run_batch(
        self, sha: Any, prepared: list[tuple[list[str], list[str | int]]], doing: str
    ) -> list[tuple[AnswerStatus, str]]:
        async with _infrastructure(doing):
            for attempt in range(2):
                if not sha():
                    await self.load_scripts()
                head = ("EVALSHA", sha())
                payload = b"".join(
                    _resp((*head, len(keys), *keys, *args)) for keys, args in prepared
                )
                replies = await self._pipeline(payload, len(prepared))
                failed = next((r for r in replies if isinstance(r, ResponseError)), None)
                if isinstance(failed, NoScriptError) and not attempt:
                    # Redis restarted and lost its script cache. Calls that did run are
                    # idempotent, so running the whole batch again is safe.
                    await self.load_scripts()
                    continue
                if failed is not None:
                    raise failed
                return [(status, raw) for status, raw in replies]
        raise CreditgateError(f"{doing}: the scripts could not be loaded")

    async def _pipeline(self, payload: bytes, count: int) -> list[Any]:
        """Send ``count`` packed commands in one write and read their ``count`` replies.

        This is redis-py's non-transactional pipeline without its per-command work: it
        encoded each of a charge call's 25+ arguments through generic checks and cost
        the worker about as much CPU as Redis spends running the script (``bench.micro``).
        An error reply is returned in its place, like ``execute(raise_on_error=False)``;
        a connection failure propagates (the batch is retried, never acknowledged).
        """
        pool = self._redis.connection_pool
        # redis-py leaves get_connection unannotated
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(payload)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # the reply was read whole: still in step
                    replies.append(exc)
            return replies
        except BaseException:
            # replies may be left unread: the connection must not be reused as it is
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)


def _resp(command: tuple[str | int, ...]) -> bytes:
    """One command in the Redis protocol, as redis-py's ``pack_command`` writes it for
    str and int arguments: an array of bulk strings, ints in decimal."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg.encode() if isinstance(arg, str) else b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _infrastructure:
    """Turns Redis connection failures into ``StoreUnavailable`` (to retry, never to ack)."""

    def __init__(self, doing: str) -> None:
        self._doing = doing

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            raise StoreUnavailable(f"Redis unavailable while {self._doing}: {exc}") from exc
        if isinstance(exc, ResponseError) and "LOADING" in str(exc):
            raise StoreUnavailable(f"Redis is loading its data while {self._doing}") from exc
        return False

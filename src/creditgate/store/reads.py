"""The store's reads for the HTTP API and the CLI, by key, never by scanning.

Each takes the Redis client and an organisation's keys and returns plain data: the
layout (keys and fields: ``store.keys``) stays in the store. ``CreditStore`` calls them,
turning Redis failures into ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from creditgate.domain.decisions import ChargeRecord
from creditgate.domain.ids import rfc3339
from creditgate.store.client import RedisClient
from creditgate.store.keys import (
    RECORD,
    RECORD_REFUNDED,
    RECORD_REQUEST,
    RECORD_RESOLUTION,
    USAGE_METRICS,
    OrgKeys,
    UsageFields,
)

# per user of a period, in order of first use: per action, its metrics' counts (a user
# listed without counts has no actions)
PeriodUsage = dict[str, dict[str, dict[str, int]]]


@dataclass(frozen=True)
class StoredDecision:
    """A decision as stored beside its request: the record, and the request's summary
    (None for a decision stored before summaries were kept)."""

    record: ChargeRecord
    summary: str | None
    # the 0-based indexes of its items refunded since (``charge.refund``)
    refunded: tuple[int, ...] = ()
    # a hold's resolution once settled, released or expired (None: none, or still open)
    resolution: ChargeRecord | None = None


_FIELDS = (RECORD, RECORD_REQUEST, RECORD_REFUNDED, RECORD_RESOLUTION)


def _stored(found: Sequence[Any]) -> StoredDecision | None:
    raw, summary, refunded, resolution = found
    if not isinstance(raw, str):
        return None
    return StoredDecision(
        _record(raw),
        summary if isinstance(summary, str) else None,
        _refunded(refunded),
        _record(resolution) if isinstance(resolution, str) else None,
    )


async def org_exists(client: RedisClient, keys: OrgKeys) -> bool:
    """An organisation is known once a command gave it a license or a member."""
    return bool(await client.exists(keys.license, keys.members))


@dataclass(frozen=True)
class Members:
    """An organisation's members (user id -> role), those disallowed credits use, and
    the members' credit limits per period (user id -> credits; none: no limit)."""

    roles: dict[str, str]
    disallowed: set[str]
    limits: dict[str, int]


async def members(client: RedisClient, keys: OrgKeys) -> Members:
    """The organisation's members, read in one round trip (``Members``)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.members)
    pipe.smembers(keys.disallowed)
    pipe.hgetall(keys.limits)
    roles, disallowed, limits = await pipe.execute()
    return Members(
        {str(u): str(r) for u, r in roles.items()},
        {str(u) for u in disallowed},
        {str(u): int(c) for u, c in limits.items()},
    )


async def current_period(client: RedisClient, keys: OrgKeys) -> str | None:
    found = await client.hget(keys.license, "period_id")
    return None if found is None else str(found)


async def period_usage(
    client: RedisClient, keys: OrgKeys, period_id: str, actions: Sequence[str]
) -> PeriodUsage:
    """The usage counters of ``period_id``: O(users x actions) fields, whatever the
    number of past periods, since the charge script lists the period's users in one
    field."""
    listed = await client.hget(keys.usage, UsageFields.users(period_id))
    period_users = [] if listed is None else str(listed).split(",")
    fields = [
        (user, action, metric)
        for user in period_users
        for action in actions
        for metric in USAGE_METRICS
    ]
    names = [UsageFields.counter(period_id, u, a, m) for u, a, m in fields]
    values = await client.hmget(keys.usage, names) if names else []
    users: PeriodUsage = {}
    for (user, action, metric), value in zip(fields, values, strict=True):
        by_action = users.setdefault(user, {})
        if value is not None:
            by_action.setdefault(action, dict.fromkeys(USAGE_METRICS, 0))[metric] += int(value)
    return users


async def history_page(
    client: RedisClient,
    key: str,
    limit: int,
    before_ms: int | None,
    after_request_id: str | None,
) -> list[tuple[str, int]]:
    """Up to ``limit + 1`` (request id, decision time) of a history set, newest first:
    all of them when ``before_ms`` is None; else right after ``after_request_id`` when
    given and still there, else those decided strictly before ``before_ms``."""
    if before_ms is None:
        found: Any = await client.zrevrange(key, 0, limit, withscores=True)
        return [(str(member), int(score)) for member, score in found]
    found = None
    if after_request_id is not None:
        rank = await client.zrevrank(key, after_request_id)
        if isinstance(rank, int):
            found = await client.zrevrange(key, rank + 1, rank + limit + 1, withscores=True)
    if found is None:
        # only a time was given, or the cursor's entry has expired: go by time
        found = await client.zrevrangebyscore(
            key, f"({before_ms}", "-inf", start=0, num=limit + 1, withscores=True
        )
    return [(str(member), int(score)) for member, score in found]


async def stored_decisions(
    client: RedisClient, keys: OrgKeys, request_ids: Sequence[str]
) -> list[StoredDecision | None]:
    """Per request id, its stored decision (None: expired, or never decided); one
    pipeline."""
    if not request_ids:
        return []
    pipe = client.pipeline(transaction=False)
    for request_id in request_ids:
        pipe.hmget(keys.request(request_id), _FIELDS)
    return [_stored(found) for found in await pipe.execute()]


async def stored_decision(
    client: RedisClient, keys: OrgKeys, request_id: str
) -> StoredDecision | None:
    """One request's stored decision (None: none)."""
    return _stored(await client.hmget(keys.request(request_id), _FIELDS))


async def credits(
    client: RedisClient, keys: OrgKeys, org_id: str, now_ms: int
) -> dict[str, Any] | None:
    """The organisation's current period: amount, grants, used and remaining."""
    raw = await client.hgetall(keys.license)
    if not raw:
        return None
    credits, granted, balance = int(raw["credits"]), int(raw["granted"]), int(raw["balance"])
    held = int(raw.get("held", 0))  # by open holds: taken from the balance, not charged
    starts, ends = int(raw["starts_ms"]), int(raw["ends_ms"])
    return {
        "org_id": org_id,
        "period_id": raw["period_id"],
        "starts_at": rfc3339(starts),
        "ends_at": rfc3339(ends),
        "active": starts <= now_ms < ends,
        "period_credits": credits,
        "granted": granted,
        "used": credits + granted - balance - held,
        "held": held,
        "remaining": balance,
    }


def _refunded(raw: str | bytes | None) -> tuple[int, ...]:
    found = orjson.loads(raw) if isinstance(raw, str | bytes) else []
    return tuple(int(i) - 1 for i in found) if isinstance(found, list) else ()


def _record(raw: str) -> ChargeRecord:
    return ChargeRecord.from_script(orjson.loads(raw))

"""Folded organisation state (``store.restore.OrgState``) written to Redis: whole, by
``creditgate rebuild`` on an idle Redis (``write_org``), or onto what Redis kept, in
one transaction, by the worker's healing (``heal_org``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import WatchError

from creditgate.store.client import RedisClient
from creditgate.store.keys import (
    RECORD,
    RECORD_FINGERPRINT,
    RECORD_REFUNDED,
    RECORD_REQUEST,
    RECORD_RESOLUTION,
    Keys,
    OrgKeys,
    UsageFields,
)
from creditgate.store.restore import OrgState


def _commands(keys: OrgKeys, state: OrgState, skew_ms: int) -> Iterator[tuple[Any, ...]]:
    """The Redis commands that write ``state``, one tuple each (name first)."""
    if state.license:
        yield ("HSET", keys.license, *_flat(state.license))
    if state.members:
        yield ("HSET", keys.members, *_flat(state.members))
    if state.disallowed:
        yield ("SADD", keys.disallowed, *sorted(state.disallowed))
    if state.grants:
        yield ("HSET", keys.grants, *_flat(state.grants))
    if state.limits:
        yield ("HSET", keys.limits, *_flat(state.limits))
    if state.holds:
        yield ("HSET", keys.holds, *_flat(state.holds))
    if state.hold_expiries:
        scores = [part for rid, exp in state.hold_expiries.items() for part in (exp, rid)]
        yield ("ZADD", keys.hold_expiries, *scores)
    if state.sequence:
        yield ("SET", keys.sequence, str(state.sequence))
    if state.usage:
        yield ("HSET", keys.usage, *_flat({k: str(v) for k, v in state.usage.items()}))
    now, ttl = state.now_ms, state.ttl_ms
    for request_id, stored in state.requests.items():
        fields = {RECORD_FINGERPRINT: stored.fingerprint, RECORD: stored.record}
        if stored.summary is not None:
            fields[RECORD_REQUEST] = stored.summary
        if request_id in state.refunds:
            fields[RECORD_REFUNDED] = state.refunds[request_id]
        if request_id in state.resolutions:
            fields[RECORD_RESOLUTION] = state.resolutions[request_id]
        yield ("HSET", keys.request(request_id), *_flat(fields))
        yield ("PEXPIRE", keys.request(request_id), state.expiry(stored) - now)
    # healing: fields added to records Redis kept (heal_org checks they are there)
    for request_id, refunded in state.refunds.items():
        if request_id not in state.requests:
            yield ("HSET", keys.request(request_id), RECORD_REFUNDED, refunded)
    for request_id, resolution in state.resolutions.items():
        if request_id not in state.requests:
            yield ("HSET", keys.request(request_id), RECORD_RESOLUTION, resolution)
    for settlement_id, stored in state.settlements.items():
        fields = {RECORD_FINGERPRINT: stored.fingerprint, RECORD: stored.record}
        yield ("HSET", keys.settlement(settlement_id), *_flat(fields))
        yield ("PEXPIRE", keys.settlement(settlement_id), stored.decided_ms + ttl - now)
    for command_id, stored in state.commands.items():
        fields = {RECORD_FINGERPRINT: stored.fingerprint, RECORD: stored.record}
        yield ("HSET", keys.command(command_id), *_flat(fields))
        yield ("PEXPIRE", keys.command(command_id), stored.decided_ms + ttl - now)
    for (user, action), history in state.history.items():
        left = state.history_ttl(history)
        if left <= 0:
            continue
        members = [part for rid, at in history.scores.items() for part in (at, rid)]
        yield ("ZADD", keys.history(user, action), *members)
        yield ("PEXPIRE", keys.history(user, action), left)
    for name, ends in state.windows.items():
        yield ("SET", keys.window(name), str(ends), "PXAT", ends + skew_ms)
    if state.closed_windows:
        yield ("DEL", *(keys.window(name) for name in sorted(state.closed_windows)))


def _flat(mapping: Mapping[str, str]) -> list[str]:
    return [part for pair in mapping.items() for part in pair]


async def org_has_keys(client: RedisClient, pattern: str) -> bool:
    async for _ in client.scan_iter(match=pattern, count=1000):
        return True
    return False


async def delete_matching(client: RedisClient, pattern: str) -> int:
    """Delete every key matching ``pattern`` (an organisation's keys before a replace)."""
    deleted = 0
    batch: list[str] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await client.delete(*batch)
            batch = []
    if batch:
        deleted += await client.delete(*batch)
    return deleted


async def redis_skew_ms(client: RedisClient, now_ms: int) -> int:
    """How far Redis's clock runs ahead of the decision clock (0 when behind), as in
    charge.lua: window expiries are pushed out by it so no window ends early."""
    seconds, micros = await client.time()
    return max(0, int(seconds) * 1000 + int(micros) // 1000 - now_ms)


async def write_org(
    client: RedisClient, keys: OrgKeys, state: OrgState, skew_ms: int, chunk: int = 1000
) -> int:
    """Write one organisation's folded state; returns the number of keys written.

    Non-transactional pipelines of ``chunk`` commands: the rebuild runs with the
    workers stopped, so nobody reads a half-written organisation, and a huge
    organisation never becomes one huge MULTI.
    """
    # a refunded or resolved request whose record has expired by now: nothing to mark
    for marks in (state.refunds, state.resolutions):
        for request_id in [r for r in marks if r not in state.requests]:
            del marks[request_id]
    pipe = client.pipeline(transaction=False)
    queued = 0
    for command in _commands(keys, state, skew_ms):
        pipe.execute_command(*command)
        queued += 1
        if queued >= chunk:
            await pipe.execute()
            queued = 0
    if queued:
        await pipe.execute()
    return state.key_count()


# ---- healing: the entries Redis forgot, folded onto what it kept ---------------------


@dataclass(frozen=True)
class HealedOrg:
    """What healing one organisation did."""

    org_id: str
    sequence_before: int  # the organisation's sequence in Redis when it was healed
    applied: int  # ledger entries folded onto it
    # the first sequence Redis lacks, when the entries given do not start there: the
    # caller reads the ledger further back (nothing was written)
    missing_from: int | None = None
    inconsistencies: tuple[str, ...] = ()


# The keys an organisation's later decisions change as a whole. Healing reads them, folds
# the missing entries onto them and writes them back whole; records, histories and
# windows are only ever added by an entry, so the missing entries' own are written.
async def _read_aggregates(client: Any, keys: OrgKeys, state: OrgState) -> None:
    license_ = await client.hgetall(keys.license)
    state.license = dict(license_) if license_ else None
    state.members = dict(await client.hgetall(keys.members))
    state.disallowed = set(await client.smembers(keys.disallowed))
    state.grants = dict(await client.hgetall(keys.grants))
    state.limits = dict(await client.hgetall(keys.limits))
    state.holds = dict(await client.hgetall(keys.holds))
    found = await client.zrange(keys.hold_expiries, 0, -1, withscores=True)
    state.hold_expiries = {str(member): int(score) for member, score in found}
    state.usage = {
        # "<period>|*users" lists users; every other field is a count (or a marker, 1)
        name: value if UsageFields.is_users(name) else int(value)
        for name, value in (await client.hgetall(keys.usage)).items()
    }


def _heal_commands(keys: OrgKeys, state: OrgState, skew_ms: int) -> Iterator[tuple[Any, ...]]:
    # a member removed or a flag cleared by a missing entry must go: the whole keys anew
    yield (
        "DEL",
        keys.license,
        keys.members,
        keys.disallowed,
        keys.grants,
        keys.limits,
        keys.usage,
        keys.holds,
        keys.hold_expiries,
    )
    yield from _commands(keys, state, skew_ms)


async def heal_org(
    client: RedisClient,
    keys: OrgKeys,
    entries: Sequence[Mapping[str, Any]],
    ttl_ms: int,
    now_ms: int,
    skew_ms: int,
) -> HealedOrg:
    """Fold the entries of ``entries`` that Redis lacks (sequence above Redis's) onto the
    organisation's state and write it, in one transaction.

    ``entries``: whole ledger entries of one organisation, one copy each, in sequence
    order. WATCH on its sequence key: a decision (or another worker healing the same
    organisation) between the read and the write makes the transaction fail, and the
    organisation is read again, so a newer decision is never overwritten.
    """
    while True:
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(keys.sequence)
                before = int(await pipe.get(keys.sequence) or 0)
                missing = [e for e in entries if int(e["sequence"]) > before]
                if not missing:
                    return HealedOrg(keys.org_id, before, 0)
                if int(missing[0]["sequence"]) != before + 1:
                    return HealedOrg(keys.org_id, before, 0, missing_from=before + 1)
                state = OrgState(keys.org_id, ttl_ms, now_ms, sequence=before)
                await _read_aggregates(pipe, keys, state)
                for entry in missing:
                    state.apply(entry)
                # a refund or resolution of a request decided before the missing
                # entries: its record is marked only if Redis still has it (never a
                # record of one field)
                for marks in (state.refunds, state.resolutions):
                    for request_id in [r for r in marks if r not in state.requests]:
                        if not await pipe.exists(keys.request(request_id)):
                            del marks[request_id]
                pipe.multi()  # type: ignore[no-untyped-call]
                for command in _heal_commands(keys, state, skew_ms):
                    pipe.execute_command(*command)
                await pipe.execute()
            except WatchError:
                continue  # decided or healed meanwhile: read it again
            if state.hold_expiries:
                # the sweep's index may have been forgotten with the rest
                await client.zadd(
                    Keys(keys.prefix).hold_sweep,
                    {keys.org_id: min(state.hold_expiries.values())},
                    lt=True,
                )
            return HealedOrg(
                keys.org_id, before, len(missing), inconsistencies=tuple(state.inconsistencies)
            )

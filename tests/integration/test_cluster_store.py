"""The store on a Redis Cluster: batches follow a slot that moves under them.

Run on the cluster stack only (skipped on the single one). Each test moves the slot of
an organisation from its primary to another by hand, as ``redis-cli --cluster reshard``
does (CLUSTER SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE), while the store
holds the old slot map, and checks that every call was decided exactly once: a MOVED,
ASK or TRYAGAIN reply ran nothing, and the store sent the call again where it belongs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from creditgate.domain.charges import ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.ids import rfc3339
from creditgate.settings import Settings
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore

DAY_MS = 86_400_000


@pytest.fixture
async def cluster_store(store: CreditStore) -> CreditStore:
    if not store.is_cluster:
        pytest.skip("a Redis Cluster test: runs on the cluster stack")
    return store


def primaries(settings: Settings) -> dict[int, str]:
    """Port -> node id of every primary, from the node the settings name."""
    url = settings.redis_url.get_secret_value()
    with redis.Redis.from_url(url, decode_responses=True) as node:
        ranges = node.execute_command("CLUSTER SLOTS")
    return {int(r[2][1]): str(r[2][2]) for r in ranges}


def owner(settings: Settings, slot: int) -> int:
    url = settings.redis_url.get_secret_value()
    with redis.Redis.from_url(url, decode_responses=True) as node:
        ranges = node.execute_command("CLUSTER SLOTS")
    return next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))


def node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)


def begin_migration(slot: int, source: int, target: int, ids: dict[int, str]) -> None:
    with node(target) as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    with node(source) as src:
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])


def finish_migration(slot: int, source: int, target: int, ids: dict[int, str]) -> None:
    with node(source) as src:
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    for port in ids:
        with node(port) as each:
            each.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])


async def licensed(store: CreditStore, org: str, credits: int, now: int) -> None:
    bodies: list[dict[str, Any]] = [
        {
            "command_id": "start",
            "type": "license.start_period",
            "period_id": "p1",
            "starts_at": rfc3339(now - DAY_MS),
            "ends_at": rfc3339(now + 30 * DAY_MS),
            "credits": credits,
        },
        {"command_id": "member", "type": "member.upsert", "user_id": "u1", "role": "member"},
    ]
    commands = [license_command_adapter.validate_python({**b, "org_id": org}) for b in bodies]
    answers = await store.apply_commands(commands, now)
    assert all(a.record.applied for a in answers), answers


def exports(org: str, request_ids: Sequence[str], now: int) -> list[ChargeCall]:
    return [
        ChargeCall.of(
            ChargeRequest.model_validate(
                {
                    "request_id": rid,
                    "org_id": org,
                    "user_id": "u1",
                    "action": "export",
                    "items": [{"type": "contact", "id": f"{rid}-c"}],
                    "requested_at": rfc3339(now),
                }
            )
        )
        for rid in request_ids
    ]


async def test_a_batch_follows_a_slot_moved_since_the_store_learnt_the_map(
    cluster_store: CreditStore, settings: Settings, unique: str
) -> None:
    store, now = cluster_store, int(time.time() * 1000)
    org = f"moved-{unique}"
    await licensed(store, org, 100, now)
    first = await store.charge_many(exports(org, ["r-1", "r-2"], now), now)
    slot = key_slot(org.encode())
    ids = primaries(settings)
    source = owner(settings, slot)
    target = next(port for port in ids if port != source)
    begin_migration(slot, source, target, ids)
    finish_migration(slot, source, target, ids)
    assert owner(settings, slot) == target
    # the store still sends the organisation to its old primary: MOVED, then followed
    again = await store.charge_many(exports(org, ["r-1", "r-3", "r-2", "r-4"], now), now)
    assert [a.status for a in first] == ["decided", "decided"]
    assert [a.status for a in again] == ["replay", "decided", "replay", "decided"]
    one, two = (a.record.sequence or 0 for a in first)
    assert [a.record.sequence for a in again] == [one, two + 1, two, two + 2]
    credits = await store.credits(org, now)
    assert credits is not None
    assert credits["remaining"] == 100 - 4


async def test_a_batch_sent_while_its_slot_migrates_is_decided_once_on_the_new_owner(
    cluster_store: CreditStore, settings: Settings, unique: str
) -> None:
    store, now = cluster_store, int(time.time() * 1000)
    org = f"asked-{unique}"
    await licensed(store, org, 100, now)
    await store.charge_many(exports(org, ["r-0"], now), now)
    slot = key_slot(org.encode())
    ids = primaries(settings)
    source = owner(settings, slot)
    target = next(port for port in ids if port != source)
    begin_migration(slot, source, target, ids)

    # Half-way: the organisation's keys are on the source, the new contacts' window keys
    # on neither, so the source answers TRYAGAIN (or ASK) until the migration ends.
    def finish_soon() -> None:
        time.sleep(0.5)
        finish_migration(slot, source, target, ids)

    finishing = asyncio.create_task(asyncio.to_thread(finish_soon))
    answers = await store.charge_many(exports(org, [f"r-{n}" for n in range(1, 6)], now), now)
    await finishing
    assert [a.status for a in answers] == ["decided"] * 5
    assert sorted(a.record.sequence or 0 for a in answers) == list(
        range(answers[0].record.sequence or 0, (answers[0].record.sequence or 0) + 5)
    )
    credits = await store.credits(org, now)
    assert credits is not None
    assert credits["remaining"] == 100 - 6
    assert owner(settings, slot) == target

"""Holds when things break (DESIGN §1 "Holds", §4, §6): a worker killed with -9 between
holds and their settlements, and while it expires holds; Redis started again from an
older copy of its AOF after a settlement.

Each test runs ``creditgate worker`` processes on a real broker and Redis (topics, keys
and consumer group of its own), sends holds and settlements from the outside and checks
what a consumer of the topics and a reader of Redis would: every hold resolved exactly
once (its outcome published once, re-emitted copies identical), every credit accounted
for (credits + grants - balance = charged - refunded + held, by the ledger and by the
credits view), and a resolved hold never coming back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from creditgate.devstack import DevStack
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient
from creditgate_harness.rig import Rig

pytestmark = pytest.mark.faults

ORGS = 10
CREDITS = 50


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
async def rig(tmp_path: Path, worker_fault_stack: DevStack) -> AsyncIterator[Rig]:
    found = Rig(tmp_path, f"h{uuid.uuid4().hex[:8]}", shared_stack=worker_fault_stack)
    await found.up()
    try:
        yield found
    finally:
        await found.down()


async def client_of(rig: Rig) -> CreditgateClient:
    client = CreditgateClient(
        rig.bootstrap, rig.registry, (t.CHARGE_RESULTS, t.LICENSE_EVENTS, t.LEDGER)
    )
    await client.start()
    return client


async def open_orgs(client: CreditgateClient, run: str) -> list[str]:
    orgs = [f"{run}-o{i}" for i in range(ORGS)]
    now = datetime.now(UTC)
    for org in orgs:
        for body in (
            {"type": "member.upsert", "user_id": "u", "role": "member"},
            {
                "type": "license.start_period",
                "period_id": "p1",
                "starts_at": iso(now - timedelta(days=1)),
                "ends_at": iso(now + timedelta(days=30)),
                "credits": CREDITS,
            },
        ):
            command = {"command_id": f"c-{uuid.uuid4().hex[:10]}", "org_id": org, **body}
            event = await client.command(command, timeout=120)
            assert event["type"] == "command.applied", event
    return orgs


def hold(org: str, n: int, expires: int | None = None) -> dict[str, Any]:
    return {
        "request_id": f"{org}-h{n}",
        "org_id": org,
        "user_id": "u",
        "action": "export",
        "items": [{"type": "contact", "id": f"{org}-c{n}-{k}"} for k in range(3)],
        "requested_at": iso(datetime.now(UTC)),
        "hold": {} if expires is None else {"expires_in_seconds": expires},
    }


def settlement(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "settlement_id": f"s-{body['request_id']}",
        "org_id": body["org_id"],
        "request_id": body["request_id"],
        "type": "hold.settle",
        "items": [{"type": i["type"], "id": i["id"]} for i in body["items"][:2]],
    }


async def until(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not ready():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not {what} within {timeout:.0f}s")
        await asyncio.sleep(0.1)


def outcomes(client: CreditgateClient) -> dict[str, set[bytes]]:
    """Per hold, its distinct outcomes (a re-emitted copy is the same bytes)."""
    found: dict[str, set[bytes]] = defaultdict(set)
    for result in client.seen[t.CHARGE_RESULTS]:
        if result["type"].startswith("hold."):
            found[result["request_id"]].add(orjson.dumps(result, option=orjson.OPT_SORT_KEYS))
    return found


async def assert_every_credit_accounted(
    rig: Rig, client: CreditgateClient, orgs: list[str]
) -> None:
    """The accounting identity, by the ledger (each sequence once) and by Redis."""
    store = CreditStore.from_settings(rig.settings())
    try:
        for org in orgs:
            entries = {e["sequence"]: e for e in client.seen[t.LEDGER] if e["org_id"] == org}
            charged = held = 0
            for entry in entries.values():
                if entry["kind"] == "charged":
                    charged -= entry["credits_delta"]
                elif entry["kind"] == "held":
                    held -= entry["credits_delta"]
                elif entry["kind"] in ("hold_settled", "hold_released", "hold_expired"):
                    decision = entry["decision"]
                    charged += decision["credits"]
                    held -= decision["credits"] + decision["released"]
            view = await store.credits(org, 0)
            assert view is not None
            spent = view["period_credits"] + view["granted"] - view["remaining"]
            assert spent == charged + held, f"{org}: {view}, ledger {charged} + {held}"
            assert (view["used"], view["held"]) == (charged, held), view
            assert sorted(entries) == list(range(1, len(entries) + 1)), f"{org}: a ledger gap"
    finally:
        await store.close()


@pytest.mark.timeout(300)
async def test_worker_killed_between_holds_and_their_settlements(rig: Rig) -> None:
    client = await client_of(rig)
    try:
        rig.start_worker("w")
        orgs = await open_orgs(client, rig.run)
        holds = [hold(org, n) for org in orgs for n in range(5)]
        for body in holds:
            await client.send(t.EXPORT_REQUESTS, body)
        await until(
            lambda: (
                sum(r["type"] == "charge.held" for r in client.seen[t.CHARGE_RESULTS]) >= len(holds)
            ),
            120,
            "every hold placed",
        )
        # settlements sent while the worker is dead, and a second kill half-way through
        rig.kill_worker("w")
        for body in holds:
            await client.send(t.HOLD_SETTLEMENTS, settlement(body))
        rig.start_worker("w")
        await until(lambda: len(outcomes(client)) >= len(holds) // 2, 120, "half settled")
        rig.kill_worker("w")
        rig.start_worker("w")
        await until(lambda: len(outcomes(client)) >= len(holds), 120, "every hold settled")
        # and the producer, unsure after the outage, sends every settlement once more
        copies = len(client.seen[t.CHARGE_RESULTS])
        for body in holds:
            await client.send(t.HOLD_SETTLEMENTS, settlement(body))
        await until(
            lambda: len(client.seen[t.CHARGE_RESULTS]) >= copies + len(holds),
            120,
            "every settlement answered again",
        )
        await asyncio.sleep(2)  # copies re-emitted after the restart arrive too

        found = outcomes(client)
        assert all(len(found[b["request_id"]]) == 1 for b in holds), "a hold resolved twice"
        settled = [orjson.loads(next(iter(found[b["request_id"]]))) for b in holds]
        assert {s["type"] for s in settled} == {"hold.settled"}
        assert {(s["credits_charged"], s["credits_released"]) for s in settled} == {(2, 1)}
        await assert_every_credit_accounted(rig, client, orgs)
        assert rig.crashed() == []
    finally:
        await client.stop()


@pytest.mark.timeout(300)
async def test_worker_killed_while_it_expires_holds(rig: Rig) -> None:
    client = await client_of(rig)
    try:
        rig.start_worker("w")
        orgs = await open_orgs(client, rig.run)
        holds = [hold(org, n, expires=3) for org in orgs for n in range(10)]
        for body in holds:
            await client.send(t.EXPORT_REQUESTS, body)
        # killed as soon as the sweep has published its first expiries
        await until(lambda: len(outcomes(client)) > 0, 120, "an expiry published")
        rig.kill_worker("w")
        rig.start_worker("w")
        await until(lambda: len(outcomes(client)) >= len(holds), 120, "every hold expired")
        await asyncio.sleep(2)

        found = outcomes(client)
        assert all(len(found[b["request_id"]]) == 1 for b in holds), "a hold resolved twice"
        expired = [orjson.loads(next(iter(found[b["request_id"]]))) for b in holds]
        assert {e["type"] for e in expired} == {"hold.expired"}
        assert {e["credits_released"] for e in expired} == {3}
        ledger = [e for e in client.seen[t.LEDGER] if e["kind"] == "hold_expired"]
        assert len({(e["org_id"], e["sequence"]) for e in ledger}) == len(holds)
        await assert_every_credit_accounted(rig, client, orgs)
        store = CreditStore.from_settings(rig.settings())
        try:
            for org in orgs:
                view = await store.credits(org, 0)
                assert view is not None
                assert view["remaining"] == CREDITS
        finally:
            await store.close()
    finally:
        await client.stop()


@pytest.mark.timeout(300)
async def test_redis_from_an_older_aof_keeps_the_settled_hold_settled(tmp_path: Path) -> None:
    rig = Rig(tmp_path, f"h{uuid.uuid4().hex[:8]}")
    await rig.up()
    client = await client_of(rig)
    try:
        rig.start_worker("w")
        (org,) = (await open_orgs(client, rig.run))[:1]
        body = hold(org, 0, expires=8)
        held = await client.request(body, timeout=60)
        assert held["type"] == "charge.held"
        await asyncio.sleep(1.5)  # on disk (appendfsync everysec) before the copy
        copy = await rig.copy_redis()  # the hold open, the settlement not yet made
        first = await client.settlement(settlement(body), timeout=60)
        assert first["type"] == "hold.settled"
        await asyncio.sleep(1.5)
        await rig.redis_forgets(copy)  # Redis comes back with the hold still open

        # the worker heals from the ledger by itself: the hold stays settled
        again = await client.settlement({**settlement(body), "settlement_id": "s-again"}, 90)
        replay = await client.settlement(settlement(body), timeout=60)
        await asyncio.sleep(10)  # past the hold's expiry: nothing may expire it

        assert again["type"] == "hold.rejected"
        assert again["reason"] == "hold_already_resolved"
        assert orjson.dumps(replay, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            first, option=orjson.OPT_SORT_KEYS
        )
        types = {
            r["type"]
            for r in client.seen[t.CHARGE_RESULTS]
            if r["request_id"] == body["request_id"]
        }
        assert "hold.expired" not in types
        # the settlement's windows are back: its delivered items are free now
        repeat = {**body, "request_id": f"{org}-again", "items": body["items"][:1]}
        del repeat["hold"]
        charged = await client.request(repeat, timeout=60)
        assert [i["outcome"] for i in charged["items"]] == ["free_repeat"]
        await assert_every_credit_accounted(rig, client, [org])
        assert rig.faults["redis_forgets"] == 1
    finally:
        await client.stop()
        await rig.down()

"""Redis comes back without writes the ledger has already published, and heals itself.

A host crash with ``appendfsync everysec`` loses about a second of writes, ``appendfsync
no`` or no persistence more, a failover to a lagging replica what replication had not
carried yet. Each test gives its worker a Redis that forgets (started again from an older
copy of its AOF, or empty) and checks from the outside that nothing published is
contradicted: no window paid twice, no sequence number reused, replays answered with
their published decision, every invariant of ``invariants.py``. No operator step: the
same worker runs on, never restarted.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from creditgate.stream import topics as t
from creditgate_harness.faultrun import FaultRun, assert_holds
from creditgate_harness.workload import Send, WorkloadSpec, items_signature
from tests.metrics import sample

pytestmark = pytest.mark.faults

CONTACTS = [{"type": "contact", "id": f"c-{n}", "company_id": f"co-{n}"} for n in range(5)]


async def healed_entries(http_port: int) -> float:
    return await metric(http_port, "creditgate_healed_entries_total")


async def metric(http_port: int, name: str) -> float:
    url = f"http://127.0.0.1:{http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return sample(await response.text(), name)


async def forgets_and_heals(run: FaultRun, since: Path | None, timeout: float = 120.0) -> None:
    """Redis forgets what came after ``since``; then, traffic or not, the worker checks
    Redis against the ledger by itself (its check count goes up) within ``timeout``."""
    port = run.rig.workers["w"].http_port
    checks = await metric(port, "creditgate_heal_checks_total")
    await run.rig.redis_forgets(since)
    deadline = asyncio.get_running_loop().time() + timeout
    while await metric(port, "creditgate_heal_checks_total") <= checks:
        assert asyncio.get_running_loop().time() < deadline, "Redis forgot; nothing healed it"
        await asyncio.sleep(0.2)


def command(org: str, ident: str, **body: Any) -> Send:
    value = orjson.dumps({"command_id": ident, "org_id": org, **body})
    return Send("command", t.LICENSE_COMMANDS, org, ident, value)


def export(org: str, request_id: str, items: list[dict[str, str]]) -> Send:
    body = {"request_id": request_id, "org_id": org, "user_id": "u-1", "action": "export"}
    value = orjson.dumps({**body, "items": items, "requested_at": "2026-12-02T08:00:00Z"})
    return Send("request", t.EXPORT_REQUESTS, org, request_id, value, items_signature(items))


async def licensed(run: FaultRun, org: str) -> None:
    now = datetime.now(UTC)
    sends = [
        command(
            org,
            f"{org}-period",
            type="license.start_period",
            period_id="2026",
            starts_at=(now - timedelta(days=1)).isoformat(),
            ends_at=(now + timedelta(days=300)).isoformat(),
            credits=100,
        ),
        command(org, f"{org}-u-1", type="member.upsert", user_id="u-1", role="member"),
    ]
    await run.feeder.send_all(sends)
    await run.observer.wait_events([s.ident for s in sends], 180)


async def decided(run: FaultRun, send: Send) -> Any:
    await run.feeder.send_all([send])
    await run.observer.wait_decided([send.ident], 180)
    return run.observer.seen.decisions[send.ident][0]


async def test_contacts_exported_again_after_redis_forgot_them_are_free(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    """The reproduction: five contacts charged, Redis restarted from a copy of its AOF
    taken just before, the same five exported again under a new request id."""
    spec = workload_spec(2000, seed=31)
    org = f"{spec.run}-acme"
    async with FaultRun(tmp_path, spec) as run:
        await run.setup(["w"])
        await licensed(run, org)
        before = await run.rig.copy_redis()  # a second before the export: it will be lost
        forgotten = export(org, f"{org}-r1", CONTACTS)
        first = await decided(run, forgotten)
        assert (first.credits, first.balance_after) == (5, 95), first
        await asyncio.sleep(1.0)
        await forgets_and_heals(run, before)

        again = await decided(run, export(org, f"{org}-r2", CONTACTS))
        # the windows the first export paid for are still open: nothing charged
        assert (again.credits, again.balance_after) == (0, 95), again
        # the sequence continues from the ledger instead of reusing the first one's
        assert again.sequence == first.sequence + 1
        # the forgotten request, sent again, gets its published decision byte for byte
        copies = run.observer.seen.result_copies
        await run.feeder.send_all([forgotten])
        await run.observer.wait(
            lambda: run.observer.seen.result_copies > copies, 180, "the replay's answer"
        )
        assert len(run.observer.seen.decisions[f"{org}-r1"]) == 1, "a second decision for r1"
        assert await healed_entries(run.rig.workers["w"].http_port) >= 1
        verdict = await run.finish()  # normal traffic after it is decided too
    assert run.rig.faults["redis_forgets"] == 1
    assert_holds(run, verdict)


async def test_redis_restored_from_older_aof_copies_under_load(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    """Several times, at random moments under load, Redis goes back to a copy of its AOF
    taken up to 1.5 s earlier."""
    rng = random.Random(37)
    spec = workload_spec(15_000, seed=37)
    async with FaultRun(tmp_path, spec) as run:
        await run.setup(["w"])
        run.start_stream()
        for _ in range(3):
            await run.reach_more(rng.randint(1500, 3000))
            copy = await run.rig.copy_redis()
            await asyncio.sleep(rng.uniform(0.3, 1.5))  # decisions that will be forgotten
            await forgets_and_heals(run, copy)
        healed = await healed_entries(run.rig.workers["w"].http_port)
        verdict = await run.finish()
    print(f"ledger entries restored by healing: {healed:.0f}")
    assert healed > 0, "Redis forgot decisions, yet nothing was restored from the ledger"
    assert run.rig.faults["redis_forgets"] == 3
    assert "worker_kill" not in run.rig.faults
    assert_holds(run, verdict)


async def test_redis_without_persistence_or_unsynced_heals_from_further_back(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    """``appendfsync no`` and kill -9, then a Redis that comes back empty (no persistence
    at all): healed from the start of the ledger."""
    spec = workload_spec(12_000, seed=41)
    async with FaultRun(tmp_path, spec, redis_appendfsync="no") as run:
        await run.setup(["w"])
        run.start_stream()
        await run.reach(0.25)
        await run.rig.kill_redis()
        await asyncio.sleep(1.0)
        await run.rig.start_redis()
        await run.reach_more(3000)
        await forgets_and_heals(run, None)  # everything: the licenses and members too
        await run.reach_more(2000)
        healed = await healed_entries(run.rig.workers["w"].http_port)
        verdict = await run.finish()
    print(f"ledger entries restored by healing: {healed:.0f}")
    # the empty Redis had forgotten every entry: at least the set-up's commands came back
    assert healed >= len(run.workload.setup())
    assert_holds(run, verdict)

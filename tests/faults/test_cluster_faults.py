"""DESIGN §4 and §6 on the cluster stack: three brokers and a Redis Cluster break under
a running worker.

Each test has a ``ClusterStack`` of its own (three Kafka nodes, three Redis primaries
with a replica each), streams thousands of requests through ``creditgate worker``,
breaks a node mid-stream and checks every invariant of ``invariants.py``. Where a
failover may lose writes (Redis replicates asynchronously), the worker notices the new
primary by itself and heals it from the ledger before it decides more.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from redis.crc import key_slot

from creditgate.stream import topics as t
from creditgate_harness.faultrun import FaultRun, assert_holds
from creditgate_harness.workload import WorkloadSpec
from tests.metrics import sample

pytestmark = pytest.mark.faults

REQUESTS = 8_000  # per test: four cluster stacks share two cores


def busiest_primary(run: FaultRun) -> tuple[int, list[int]]:
    """The primary that owns the slots of most of the run's organisations, and the
    slots of those organisations on it."""
    owners = run.rig.cluster_stack.slot_owners()
    slots = [key_slot(org.encode()) for org in run.workload.org_ids]
    port, _ = Counter(owners[slot] for slot in slots).most_common(1)[0]
    return port, sorted({slot for slot in slots if owners[slot] == port})


async def heal_checks(http_port: int) -> float:
    url = f"http://127.0.0.1:{http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return sample(await response.text(), "creditgate_heal_checks_total")


async def busiest_broker(run: FaultRun) -> int:
    """The Kafka node (0-based) that leads the most partitions of the request topics."""
    admin = AIOKafkaAdminClient(bootstrap_servers=run.rig.bootstrap)
    await admin.start()
    try:
        names = [run.rig.registry.name(n) for n in t.REQUEST_ACTIONS]
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    leaders = Counter(p["leader"] for d in described for p in d["partitions"])
    node_id, _ = leaders.most_common(1)[0]
    return int(node_id) - 1


async def test_a_redis_primary_killed_under_load_is_failed_over_and_healed(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    spec = workload_spec(REQUESTS, seed=31)
    async with FaultRun(tmp_path, spec, cluster=True) as run:
        await run.setup(["w"])
        worker = run.rig.workers["w"]
        run.start_stream()
        await run.reach(0.3)
        checks_before = await heal_checks(worker.http_port)
        primary, _ = busiest_primary(run)
        await run.rig.kill_redis_primary(primary)
        await run.rig.failed_over(primary)  # its replica is promoted
        await run.reach_more(1000)
        await run.rig.start_redis_node(primary)  # back, as a replica of its successor
        checks_after = await heal_checks(worker.http_port)
        assert worker.process.poll() is None, "the worker died with the primary"
        verdict = await run.finish()  # the same worker, never restarted
    # the promoted replica was reached over a new connection: checked against the ledger
    assert checks_after > checks_before
    assert run.rig.faults == {"redis_primary_kill": 1}
    assert_holds(run, verdict)


async def test_the_broker_leading_the_busiest_partitions_killed_under_load(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    spec = workload_spec(REQUESTS, seed=32)
    # paced, so that requests are still being produced while the broker is down
    async with FaultRun(tmp_path, spec, cluster=True, rate=800) as run:
        await run.setup(["w"])
        run.start_stream()
        await run.reach(0.25)
        broker = await busiest_broker(run)
        await run.rig.kill_broker(broker)
        # three replicas, two in sync: the other two brokers take over its partitions
        await run.reach_more(1500, timeout=180.0)
        await run.rig.start_broker(broker)
        verdict = await run.finish()
    assert run.rig.faults == {"broker_crash": 1}
    assert_holds(run, verdict)


async def test_busy_organisations_migrated_to_another_primary_during_traffic(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    spec = workload_spec(REQUESTS, seed=33)
    async with FaultRun(tmp_path, spec, cluster=True, rate=1500) as run:
        await run.setup(["w"])
        run.start_stream()
        await run.reach(0.2)
        source, busy = busiest_primary(run)
        target = next(p for p in run.rig.cluster_stack.redis_primaries() if p != source)
        owned = sorted(
            s for s, port in run.rig.cluster_stack.slot_owners().items() if port == source
        )
        # redis-cli moves the source's lowest slots first: enough of them to take every
        # busy organisation there along
        slots = owned.index(busy[-1]) + 1
        await run.rig.reshard(source, target, slots)
        moved = run.rig.cluster_stack.slot_owners()
        verdict = await run.finish()
    assert all(moved[slot] == target for slot in busy), "the busy slots did not move"
    print(f"{len(busy)} busy organisations' slots among {slots} moved during traffic")
    assert run.rig.faults == {"slot_migration": 1}
    assert_holds(run, verdict)


async def test_a_worker_killed_during_a_redis_failover(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    spec = workload_spec(REQUESTS, seed=34)
    async with FaultRun(tmp_path, spec, cluster=True) as run:
        await run.setup(["a", "b"])
        run.start_stream()
        await run.reach(0.3)
        primary, _ = busiest_primary(run)
        await run.rig.kill_redis_primary(primary)
        await asyncio.sleep(0.5)  # both workers hold batches the dead primary cannot take
        run.rig.kill_worker("a")
        await run.rig.failed_over(primary)
        run.rig.start_worker("a")  # a new worker takes a's place
        await run.rig.start_redis_node(primary)
        verdict = await run.finish()
    assert run.rig.faults == {"redis_primary_kill": 1, "worker_kill": 1}
    assert_holds(run, verdict)

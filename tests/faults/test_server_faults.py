"""DESIGN §6 when Redis or the broker goes away under a running worker.

Each test has a DevStack of its own (killing its servers touches no other test),
streams thousands of requests through one ``creditgate worker``, breaks a server
mid-stream and checks every invariant of ``invariants.py``; the worker is never
restarted: it has to pause and resume by itself.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from creditgate.connections import stop_consumer
from creditgate.devstack import DevStack
from creditgate_harness.faultrun import FaultRun, assert_holds
from creditgate_harness.workload import WorkloadSpec
from tests.metrics import sample

pytestmark = pytest.mark.faults


async def retries_of(http_port: int, stage: str) -> float:
    """creditgate_batch_retries_total{stage} as the worker's /metrics shows it."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    return sample(text, "creditgate_batch_retries_total", stage=stage)


async def test_redis_killed_and_restarted(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    rng = random.Random(13)
    spec = workload_spec(15_000, seed=13)
    outages: list[tuple[int, int]] = []
    async with FaultRun(tmp_path, spec, redis_appendfsync="always") as run:
        await run.setup(["w"])
        worker = run.rig.workers["w"]
        run.start_stream()
        for _ in range(2):
            await run.reach_more(rng.randint(2000, 4000))
            await asyncio.sleep(rng.uniform(0, 0.3))
            dead_at = await run.rig.kill_redis()
            await asyncio.sleep(3.0)  # the outage; the worker retries meanwhile
            assert worker.process.poll() is None, "the worker died with Redis"
            back_at = await run.rig.start_redis()
            outages.append((int(dead_at * 1000), int(back_at * 1000)))
        retries = await retries_of(worker.http_port, "decide")
        verdict = await run.finish()  # the same worker, never restarted, decides the rest
    assert retries > 0, "the outage did not show in creditgate_batch_retries_total"
    decided_in_outage = [
        rid
        for rid, found in run.observer.seen.decisions.items()
        if any(dead <= found[0].decided_ms < back for dead, back in outages)
    ]
    assert decided_in_outage == [], "decisions taken while Redis was down"
    assert run.rig.faults["redis_kill"] == 2
    assert "worker_kill" not in run.rig.faults
    # forgotten_by_redis (a published decision Redis does not hold) is part of the verdict
    assert_holds(run, verdict)


async def test_broker_stopped_and_restarted(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    spec = workload_spec(12_000, seed=14)
    # paced, so that requests are still being produced across the outage
    async with FaultRun(tmp_path, spec, rate=1000) as run:
        await run.setup(["w"])
        run.start_stream()
        await run.reach(0.25)
        await run.rig.restart_broker(down_for=2.0)
        await run.reach_more(1000)
        await run.rig.restart_broker(down_for=2.0, crash=True)
        verdict = await run.finish()  # the same worker resumes by itself
    assert "worker_kill" not in run.rig.faults
    assert_holds(run, verdict)


async def test_worker_stopped_during_a_redis_outage_leaves_its_batch_to_the_next(
    tmp_path: Path, workload_spec: Callable[..., WorkloadSpec]
) -> None:
    spec = workload_spec(10_000, seed=17)
    async with FaultRun(tmp_path, spec, redis_appendfsync="always") as run:
        await run.setup(["a", "b"])
        run.start_stream()
        await run.reach(0.3)
        await run.rig.kill_redis()
        await asyncio.sleep(1.0)  # both workers hold a batch they cannot decide
        stopping = time.monotonic()
        await run.rig.stop_worker("a", timeout=40.0)  # SIGTERM
        stopped_after = time.monotonic() - stopping
        await run.rig.start_redis()
        verdict = await run.finish()  # b decides a's batch, and everything after it
    # the stop gave up on the batch after its grace period instead of waiting for Redis
    assert run.rig.hung_on_stop == []
    print(f"'a' stopped {stopped_after:.1f}s after SIGTERM, with Redis down")
    assert run.rig.faults == {"redis_kill": 1, "worker_leave": 1}
    assert_holds(run, verdict)


async def test_a_consumer_stops_while_its_broker_is_gone(tmp_path: Path) -> None:
    """aiokafka's stop() raised CancelledError when a fetch to a dead broker was backing
    off; every creditgate consumer closes through ``stop_consumer``, which must return."""
    stack = DevStack(tmp_path / "stack")
    bootstrap = stack.up().kafka_bootstrap
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic("followed", 1, 1)])
        await admin.close()
        # a long backoff keeps the failed fetch asleep when stop() comes
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, retry_backoff_ms=20_000)
        await consumer.start()
        consumer.assign([TopicPartition("followed", 0)])
        await consumer.seek_to_end()
        await consumer.getmany(timeout_ms=500)
        stack.kill_kafka()
        await asyncio.sleep(3.0)  # the next fetch fails and sleeps out its backoff
        await asyncio.wait_for(stop_consumer(consumer), 30)
        assert consumer._client._conns == {}, "stop_consumer left connections open"
    finally:
        stack.down()

"""Where a decision's CPU goes, stage by stage, without Kafka: ``python -m bench.micro``.

Feeds batches of the benchmark's workload through the processor's stages on a real
Redis and prints this process's CPU microseconds per request for each stage and for
``Decider.decide`` as a whole (CPU time, so a busy machine or Redis's own work do not
count), then Redis's own microseconds per ``charge.lua`` call (``INFO commandstats``).
Complements the py-spy profile of the worker (``python -m bench.run --profile``), which
also shows faust's and aiokafka's share.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from bench.run import license_commands_for
from creditgate.domain.charges import ChargeRequest
from creditgate.domain.decisions import RequestView
from creditgate.domain.intake import read_charge_request
from creditgate.domain.outgoing import charge_messages
from creditgate.settings import Settings
from creditgate.store.gateway import ChargeCall, CreditStore
from creditgate.stream.decider import Decider, Incoming
from creditgate.stream.topics import TopicRegistry
from creditgate_harness.workload import Workload, WorkloadSpec


async def measure(batches: int, size: int) -> dict[str, float]:
    settings = Settings(key_prefix=f"micro{uuid.uuid4().hex[:8]}")
    registry = TopicRegistry.load()
    store = CreditStore.from_settings(settings)
    processor = Decider(store, registry, settings)
    workload = Workload(WorkloadSpec.bench("micro", seed=3))
    await license_commands_for(store, workload, int(time.time() * 1000))
    totals: dict[str, float] = {}
    scripts_before = await _script_stats(store)

    def add(stage: str, seconds: float) -> None:
        totals[stage] = totals.get(stage, 0.0) + seconds

    try:
        for _ in range(batches):
            requests = list(workload.requests(size))
            actions = processor._actions  # the mapping decide() uses
            topics = processor._topics
            messages = [Incoming(registry.name(r.topic), 0, 0, r.key, r.value) for r in requests]
            # stage by stage (the second half of each batch, so Redis sees new ids)
            half = messages[: size // 2]
            t0 = time.process_time()
            reads = [
                read_charge_request(m.value, actions[m.topic], settings.max_items) for m in half
            ]
            t1 = time.process_time()
            valid = [r for r in reads if isinstance(r, ChargeRequest)]
            calls = [ChargeCall.of(r) for r in valid]
            t2 = time.process_time()
            views = [RequestView.of(r) for r in valid]
            t3 = time.process_time()
            now = processor.clock.now_ms()
            answers = await store.charge_many(calls, now)
            t4 = time.process_time()
            for view, call, answer in zip(views, calls, answers, strict=True):
                charge_messages(  # the renderer alone
                    topics,
                    view,
                    call.windows,
                    answer.status,
                    answer.record,
                    now,
                    settings.repeat_window_days,
                    settings.result_items_max,
                )
            t5 = time.process_time()
            n = len(half)
            add("intake (read_charge_request)", (t1 - t0) / n)
            add("ChargeCall.of", (t2 - t1) / n)
            add("RequestView.of", (t3 - t2) / n)
            add("store.charge_many (Redis pipeline)", (t4 - t3) / n)
            add("render (charge_messages)", (t5 - t4) / n)
            rest = messages[size // 2 :]
            t6 = time.process_time()
            await processor.decide(rest)
            add("Decider.decide, whole", (time.process_time() - t6) / len(rest))
        script_calls, usec = await _script_stats(store)
        script_calls, usec = script_calls - scripts_before[0], usec - scripts_before[1]
    finally:
        async for key in store.client_for_tests.scan_iter(
            match=f"{settings.key_prefix}:*", count=5000
        ):
            await store.client_for_tests.delete(key)
        await store.close()
    found = {stage: 1e6 * s / batches for stage, s in totals.items()}
    found["Redis, per charge.lua call (server time)"] = usec / max(1, script_calls)
    return found


async def _script_stats(store: CreditStore) -> tuple[int, int]:
    """(calls, microseconds) Redis has spent in EVALSHA since its start."""
    stats = await store.client_for_tests.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    return int(evalsha.get("calls", 0)), int(evalsha.get("usec", 0))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--size", type=int, default=2000)
    args = parser.parse_args()
    for stage, micros in asyncio.run(measure(args.batches, args.size)).items():
        print(f"  {micros:8.1f} µs/request  {stage}")


if __name__ == "__main__":
    main()

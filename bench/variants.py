"""The baselines, each run as its own process like the worker: ``python -m bench.variants``.

- ``passthrough``: raw aiokafka. Consumes the request topics in batches of the worker's
  size and wait, produces one result per request, awaits delivery, commits. No decision:
  the most a Python consumer-producer can do here.
- ``faust``: the same passthrough inside faust, set up like the worker (its batching,
  its ``BatchRunner.publish``, uvloop, the frozen start-up heap), to show what faust
  itself costs before any decision.
- ``naive``: creditgate's decision code without batching: per request one script call
  and one awaited send per produced message.

The harness starts a variant, watches its output topic and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.events import Outgoing
from creditgate.stream.processor import Incoming
from creditgate.stream.topics import TopicRegistry, TopicSpec


def output_registry(prefix: str, outputs_prefix: str) -> TopicRegistry:
    """Request topics under ``prefix``, every output topic under ``outputs_prefix``."""
    base = TopicRegistry.load()
    specs = {
        logical: TopicSpec(
            (prefix if logical in t.REQUEST_ACTIONS else outputs_prefix) + logical,
            spec.partitions,
            spec.replication_factor,
            spec.configs,
        )
        for logical, spec in base.specs.items()
    }
    return TopicRegistry(specs, prefix)


def _result_of(value: bytes | None) -> bytes:
    # the passthrough's "result": the request bytes, so the broker moves as much data
    return value or b""


async def passthrough(conf: dict[str, Any]) -> None:
    settings = Settings()
    consumer = AIOKafkaConsumer(
        *conf["inputs"],
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=conf["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, **conf["producer"])
    await consumer.start()
    await producer.start()
    output = conf["output"]
    within_ms = int(settings.batch_within_seconds * 1000)
    headers = [("ce_specversion", b"1.0"), ("ce_type", b"passthrough")]
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=within_ms, max_records=settings.batch_size)
            pending = [
                await producer.send(output, _result_of(r.value), key=r.key, headers=headers)
                for records in batches.values()
                for r in records
            ]
            if pending:
                await asyncio.gather(*pending)
                await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()


async def naive(conf: dict[str, Any]) -> None:
    from creditgate.store.gateway import CreditStore  # noqa: PLC0415
    from creditgate.stream.processor import Processor  # noqa: PLC0415

    settings = Settings()
    registry = output_registry(settings.topic_prefix, conf["outputs_prefix"])
    store = CreditStore.from_settings(settings)
    processor = Processor(store, registry, settings)
    consumer = AIOKafkaConsumer(
        *conf["inputs"],
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=conf["group"],
        enable_auto_commit=True,
        auto_commit_interval_ms=1000,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, **conf["producer"])
    await consumer.start()
    await producer.start()
    try:
        async for r in consumer:
            message = Incoming(r.topic, r.partition, r.offset, r.key, r.value)
            for out in await processor.decide([message]):
                await producer.send_and_wait(out.topic, out.value, key=out.key, headers=out.headers)
    finally:
        await producer.stop()
        await consumer.stop()
        await store.close()


def faust_passthrough(conf: dict[str, Any]) -> None:
    import faust  # noqa: PLC0415

    from creditgate.stream.app import (  # noqa: PLC0415
        BatchRunner,
        freeze_start_up_heap,
        ready_batches,
        stream_options,
        use_fast_event_loop,
    )

    # the same process set-up as ``creditgate worker``, so the difference is the decision
    use_fast_event_loop()

    settings = Settings()
    app = faust.App(
        conf["group"],
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        **stream_options(settings),
    )
    runner = BatchRunner(app, settings)
    output = conf["output"]
    headers = [("ce_specversion", b"1.0"), ("ce_type", b"passthrough")]

    async def work(batch: Sequence[Incoming]) -> list[Outgoing]:
        return [Outgoing(output, m.key or b"", _result_of(m.value), headers) for m in batch]

    @app.agent(app.topic(*conf["inputs"]), concurrency=1)
    async def relay(stream: Any) -> None:
        freeze_start_up_heap()
        async for events in ready_batches(stream, settings.batch_size):
            await runner.run(work, [_incoming(e) for e in events])

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


def _incoming(event: Any) -> Incoming:
    m = event.message
    return Incoming(m.topic, m.partition, m.offset, m.key, m.value)


def main(argv: list[str]) -> None:
    variant, conf = argv[0], json.loads(argv[1])
    if variant == "faust":
        sys.argv = sys.argv[:1]  # faust's Worker reads the command line
        faust_passthrough(conf)
        return
    run = {"passthrough": passthrough, "naive": naive}[variant]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(conf))


if __name__ == "__main__":
    main(sys.argv[1:])

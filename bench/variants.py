"""The baselines, each run as its own process like the worker: ``python -m bench.variants``.

- ``passthrough``: raw aiokafka. Consumes the request topics in batches of the worker's
  size and wait, produces one result per request, awaits delivery, commits. No decision:
  the most a Python consumer-producer can do here.
- ``faust``: the same passthrough as a faust agent, the way the worker ran until its
  decision loop moved onto aiokafka (faust's per-event stream, the worker's
  ``Publisher``, uvloop, the frozen start-up heap): what faust's stream costs.
- ``naive``: creditgate's decision code without batching: per request one script call
  and one awaited send per produced message.

The harness starts a variant, watches its output topic and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from creditgate.domain.outgoing import Outgoing
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.decider import Incoming
from creditgate.stream.topics import TopicRegistry, TopicSpec

# how long a baseline waits for more input while it holds a partial batch
_WITHIN_SECONDS = 0.05


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
        # the latency baseline starts at the inputs' end: it times new requests only
        auto_offset_reset="latest" if conf.get("from_end") else "earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, **conf["producer"])
    await consumer.start()
    await producer.start()
    output = conf["output"]
    within_ms = int(_WITHIN_SECONDS * 1000)
    headers = [("ce_specversion", b"1.0"), ("ce_type", b"passthrough")]
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=within_ms, max_records=settings.batch_size)
            # a request's own headers go along (the latency run's ce_id names the request,
            # as a decision's does), else the passthrough's: no value is parsed either way
            pending = [
                await producer.send(
                    output, _result_of(r.value), key=r.key, headers=list(r.headers) or headers
                )
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
    from creditgate.stream.decider import Decider  # noqa: PLC0415

    settings = Settings()
    registry = output_registry(settings.topic_prefix, conf["outputs_prefix"])
    store = CreditStore.from_settings(settings)
    processor = Decider(store, registry, settings)
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
        decided = 0
        async for r in consumer:
            message = Incoming(r.topic, r.partition, r.offset, r.key, r.value)
            for out in await processor.decide([message]):
                await producer.send_and_wait(out.topic, out.value, key=out.key, headers=out.headers)
            decided += 1
            if decided == conf["limit"]:
                # the harness counts results until it sees the limit: deciding more would
                # only add records past it. Idle until it stops this process.
                await asyncio.Event().wait()
    finally:
        await producer.stop()
        await consumer.stop()
        await store.close()


def faust_passthrough(conf: dict[str, Any]) -> None:
    """The passthrough as a faust agent, the way the worker ran before issue 5's rework:
    batches of what has arrived (``ready_batches``), acknowledged only after the batch's
    outputs are delivered, published with the worker's ``Publisher`` on faust's own
    aiokafka producer, uvloop and the frozen start-up heap."""
    import faust  # noqa: PLC0415

    from creditgate.stream.publish import Publisher  # noqa: PLC0415
    from creditgate.worker import (  # noqa: PLC0415
        Worker,
        freeze_start_up_heap,
        use_fast_event_loop,
    )

    use_fast_event_loop()

    settings = Settings()
    app = faust.App(
        conf["group"],
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        autodiscover=False,
        datadir=conf["datadir"],
        key_serializer="raw",
        value_serializer="raw",
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_acks=-1,
        producer_max_batch_size=conf["producer"]["max_batch_size"],
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, settings.batch_size * 2),
    )
    output = conf["output"]
    headers = [("ce_specversion", b"1.0"), ("ce_type", b"passthrough")]

    @app.agent(app.topic(*conf["inputs"]), concurrency=1)
    async def relay(stream: Any) -> None:
        freeze_start_up_heap()
        # faust keeps its aiokafka producer private; it is started before the agents
        publisher = Publisher(app.producer._ensure_producer(), settings)  # type: ignore[attr-defined]
        async for events in ready_batches(stream, settings.batch_size, _WITHIN_SECONDS):
            batch = [_incoming(e) for e in events]
            results = [Outgoing(output, m.key or b"", _result_of(m.value), headers) for m in batch]
            await publisher.until_published(results, len(batch))

    # creditgate's Worker: faust's without the spinner's cost (creditgate/worker.py)
    Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


async def ready_batches(stream: Any, max_size: int, idle: float) -> AsyncIterator[list[Any]]:
    """The stream's events in batches of what has already arrived, at most ``max_size``.

    A batch ends when the stream's queue has nothing more or the batch is full, so under
    light load a request is decided as soon as it arrives, and under load the batches
    grow by themselves (requests queue up while the previous batch is decided).

    While it holds a partial batch it never waits on the stream longer than ``idle``:
    during a rebalance faust suspends the stream and waits until every event it handed
    out is acknowledged, so a read that blocks then would hang the worker for good.

    Each event is acknowledged when the agent asks for the next batch, so only after the
    agent has published and awaited the batch's decisions; never when the agent stops
    half-way (the generator is closed at ``yield``): those events are read again.
    """
    stream.enable_acks = False  # we acknowledge, and only after the work is done
    queue = stream.channel.queue
    events = stream.events().__aiter__()
    batch: list[Any] = []
    upcoming: asyncio.Future[Any] | None = None
    try:
        while True:
            if upcoming is None:
                upcoming = asyncio.ensure_future(events.__anext__())
            if batch:
                done, _ = await asyncio.wait({upcoming}, timeout=idle)
                if not done:  # nothing more for now, or faust is rebalancing
                    yield batch
                    for event in batch:
                        await stream.ack(event)
                    batch = []
                    continue
            try:
                event = await upcoming
            except StopAsyncIteration:
                return  # the worker stops: the batch in hand stays unacknowledged
            upcoming = None
            batch.append(event)
            if len(batch) < max_size and not queue.empty():
                continue
            yield batch
            for event in batch:
                await stream.ack(event)
            batch = []
    finally:
        if upcoming is not None:
            upcoming.cancel()


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

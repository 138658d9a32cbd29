"""The faust app: two thin agents around the processor, and the HTTP views.

Why the agents look the way they do (faust-streaming 0.15):
- ``ready_batches`` acknowledges a batch only when the agent asks for the next one. So
  the agent never raises: it decides in Redis, publishes and awaits delivery, and
  retries the whole batch on any failure. Retrying is safe because decisions are
  idempotent: a batch decided before a failure is re-published from the stored
  decisions, identically.
- A batch is whatever has arrived, up to ``batch_size``: no timer. faust's
  ``take_events`` waits ``within`` for each batch to fill, which either adds that wait
  to every decision (latency) or, with a short wait, keeps batches small under load,
  where each batch's round trips then dominate (throughput).
- ``concurrency=1``: more would reorder an organisation's messages, and faust's
  commit logic would skip past an offset still being decided.
- Values are raw bytes, read with pydantic, not faust models.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.types import StreamT

from creditgate.api.operations import readiness, register_operations
from creditgate.api.views import register_views
from creditgate.connections import faust_options
from creditgate.errors import InfrastructureError
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.events import Outgoing
from creditgate.stream.processor import Clock, Incoming, Processor
from creditgate.stream.topics import TopicRegistry

log = logging.getLogger("creditgate.worker")

Work = Callable[[Sequence[Incoming]], Awaitable[list[Outgoing]]]

# (topic, key) → partition, remembered for this many keys (organisations times topics)
_PARTITION_CACHE_SIZE = 100_000


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


class BatchRunner:
    """Decide → publish → await delivery, retried until it succeeds; only then may the
    batch be acknowledged (by asking ``ready_batches`` for the next one)."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._partitions: dict[tuple[str, bytes], int] = {}

    async def run(self, work: Work, batch: Sequence[Incoming]) -> None:
        delay = self._settings.retry_backoff_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.publish(await work(batch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: the batch stays unacknowledged
                log.warning(
                    "batch of %d not done (attempt %d), retrying in %.1fs: %s",
                    len(batch),
                    attempt,
                    delay,
                    exc,
                    exc_info=not _is_infrastructure(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_backoff_max_seconds)
            else:
                if attempt > 1:
                    log.info("batch of %d done after %d attempts", len(batch), attempt)
                return

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish the batch's messages and wait until the broker has every one of them.

        They go out as one record batch per topic partition through aiokafka's
        ``send_batch``: faust's ``send`` costs a coroutine, a signal and a delivery
        future per message, about twice what filling a batch costs. The partition is the
        one faust's own producer would pick (its partitioner over the key, ``org_id``),
        and a partition's messages keep their order within its batches.
        """
        if not messages:
            return
        faust_producer = self._app.producer
        # faust keeps its aiokafka producer private (not on ProducerT); send_batch is
        # only on aiokafka's. It raises NotReady while faust's producer is not started.
        kafka: Any = faust_producer._ensure_producer()  # type: ignore[attr-defined]
        open_batches: dict[tuple[str, int], Any] = {}
        pending = []
        for m in messages:
            partition = await self._partition(kafka, faust_producer.partitioner, m.topic, m.key)
            where = (m.topic, partition)
            batch = open_batches.get(where)
            if batch is None:
                batch = open_batches[where] = kafka.create_batch()
            if batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                # full: send it and start the next one (a first record always fits)
                pending.append(await kafka.send_batch(batch, m.topic, partition=partition))
                batch = open_batches[where] = kafka.create_batch()
                batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
        for (topic, partition), batch in open_batches.items():
            pending.append(await kafka.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)

    async def _partition(self, kafka: Any, partitioner: Any, topic: str, key: bytes) -> int:
        found = self._partitions.get((topic, key))
        if found is None:
            # partition counts never change under a running worker (it checks them at
            # start-up, and keys only keep an organisation in order while they stay put)
            ids = sorted(await kafka.partitions_for(topic))
            found = int(partitioner(key, ids, ids))
            if len(self._partitions) >= _PARTITION_CACHE_SIZE:
                self._partitions.clear()
            self._partitions[(topic, key)] = found
        return found


def _is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, InfrastructureError | KafkaError | ProducerSendError | OSError)


def _incoming(events: Sequence[Any]) -> list[Incoming]:
    return [
        Incoming(
            e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value
        )
        for e in events
    ]


def use_fast_event_loop() -> None:
    """Run the worker's event loops on uvloop (what faust's ``-L uvloop`` does).

    faust's per-event path is mostly event-loop work (futures, callbacks, queue hand-offs
    between its consumer thread and the agents): uvloop cut faust's own CPU per message
    by about a fifth in ``python -m bench.run``. Call it before the app's loop exists.
    """
    import uvloop  # noqa: PLC0415 - only the worker process wants it

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def freeze_start_up_heap() -> None:
    """Take what exists once the worker has started out of the garbage collector's scans.

    Modules, the app, pydantic's validators: some 170,000 objects that live as long as
    the process, and that every full collection would walk again. A batch of decisions
    allocates enough to trigger collections often; frozen, ``Processor.decide`` used
    about a quarter less CPU per request (``bench.micro``-style runs, worker heap).
    Garbage is collected first, so nothing collectable is frozen.
    """
    gc.collect()
    gc.freeze()


def stream_options(settings: Settings) -> dict[str, Any]:
    """The faust settings that decide throughput (the benchmark's faust baseline uses them)."""
    options: dict[str, Any] = {
        "producer_acks": -1,
        "broker_commit_interval": 1.0,
        "stream_buffer_maxsize": max(4096, settings.batch_size * 2),
    }
    if settings.session_timeout_seconds is not None:
        options["broker_session_timeout"] = settings.session_timeout_seconds
        options["broker_heartbeat_interval"] = max(0.5, settings.session_timeout_seconds / 6)
    return options


def observe_batch(metrics: Metrics, agent: str, events: Sequence[Any]) -> None:
    """Batch size, and per message the time from its Kafka timestamp to its delivered
    decision (the batch's outputs were awaited before this runs)."""
    metrics.batch_size.labels(agent).observe(len(events))
    if agent == "charges":
        now = time.time()
        for event in events:
            metrics.decision_seconds.observe(max(0.0, now - event.message.timestamp))


def consumer_lag(app: faust.App) -> dict[tuple[str, int], int]:
    """Per assigned partition: the high-water mark minus the committed offset."""
    try:
        consumer = app.consumer
        assigned = consumer.assignment()
    except Exception:  # not started yet, or between assignments: nothing to report
        return {}
    lag = {}
    for tp in assigned:
        # faust keeps no public accessor for the committed offsets
        committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]
        highwater = consumer.highwater(tp)
        if highwater is not None:
            lag[(tp.topic, tp.partition)] = max(0, highwater - (committed or 0))
    return lag


def create_app(
    settings: Settings, registry: TopicRegistry | None = None, clock: Clock | None = None
) -> faust.App:
    """Build the worker's faust app; nothing connects until the app starts."""
    registry = registry or TopicRegistry.load(prefix=settings.topic_prefix)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        **faust_options(settings),
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        # topics/ is the source of truth: faust must neither create topics nor the
        # assignor's leader topic (brokers run with automatic creation off)
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        **stream_options(settings),
        web_port=settings.http_port,
        web_bind=settings.http_host,
        web_router_enabled=False,
        web_tables_enabled=False,
    )
    store = CreditStore.from_settings(settings)
    metrics = Metrics()
    processor = Processor(store, registry, settings, clock, metrics)
    runner = BatchRunner(app, settings)
    app.creditgate_store = store  # type: ignore[attr-defined]
    app.creditgate_processor = processor  # type: ignore[attr-defined]

    requests = app.topic(*(registry.name(name) for name in t.REQUEST_ACTIONS))
    commands = app.topic(registry.name(t.LICENSE_COMMANDS))
    size, idle = settings.batch_size, settings.batch_within_seconds

    @app.agent(requests, concurrency=1)
    async def decide_charges(stream: StreamT[bytes]) -> None:
        freeze_start_up_heap()  # the app has started: what exists now stays
        async for events in ready_batches(stream, size, idle):
            await runner.run(processor.decide, _incoming(events))
            observe_batch(metrics, "charges", events)

    @app.agent(commands, concurrency=1)
    async def apply_license_commands(stream: StreamT[bytes]) -> None:
        async for events in ready_batches(stream, size, idle):
            await runner.run(processor.apply, _incoming(events))
            observe_batch(metrics, "commands", events)

    metrics.watch_lag(lambda: consumer_lag(app))
    register_operations(app, metrics, readiness(store, registry, settings))
    register_views(app, store, processor.clock, settings)

    return app

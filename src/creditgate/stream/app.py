"""The faust app: two thin agents around the processor, and the HTTP views.

Why the agents look the way they do (faust-streaming 0.15):
- ``take_events`` acknowledges a batch only when the agent asks for the next one, and
  it acknowledges it even when the agent raised. So the agent never raises: it
  decides in Redis, publishes and awaits delivery, and retries the whole batch on any
  failure. Retrying is safe because decisions are idempotent: a batch decided before
  a failure is re-published from the stored decisions, identically.
- ``concurrency=1``: more would reorder an organisation's messages, and faust's
  commit logic would skip past an offset still being decided.
- Values are raw bytes, read with pydantic, not faust models.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.types import StreamT

from creditgate.api.views import register_views
from creditgate.errors import InfrastructureError
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.events import Outgoing
from creditgate.stream.processor import Clock, Incoming, Processor
from creditgate.stream.topics import TopicRegistry

log = logging.getLogger("creditgate.worker")

Work = Callable[[Sequence[Incoming]], Awaitable[list[Outgoing]]]


class BatchRunner:
    """Decide → publish → await delivery, retried until it succeeds; only then may the
    batch be acknowledged (by returning to ``take_events``)."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self._app = app
        self._settings = settings

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
        producer = self._app.producer
        pending = [
            await producer.send(m.topic, m.key, m.value, None, None, m.headers) for m in messages
        ]
        await asyncio.gather(*pending)


def _is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, InfrastructureError | KafkaError | ProducerSendError | OSError)


def _incoming(events: Sequence[Any]) -> list[Incoming]:
    return [
        Incoming(
            e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value
        )
        for e in events
    ]


def create_app(
    settings: Settings, registry: TopicRegistry | None = None, clock: Clock | None = None
) -> faust.App:
    """Build the worker's faust app; nothing connects until the app starts."""
    registry = registry or TopicRegistry.load(prefix=settings.topic_prefix)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        # topics/ is the source of truth: faust must neither create topics nor the
        # assignor's leader topic (brokers run with automatic creation off)
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, settings.batch_size * 2),
        web_port=settings.http_port,
        web_bind=settings.http_host,
        web_router_enabled=False,
        web_tables_enabled=False,
    )
    store = CreditStore.from_settings(settings)
    processor = Processor(store, registry, settings, clock)
    runner = BatchRunner(app, settings)
    app.creditgate_store = store  # type: ignore[attr-defined]
    app.creditgate_processor = processor  # type: ignore[attr-defined]

    requests = app.topic(*(registry.name(name) for name in t.REQUEST_ACTIONS))
    commands = app.topic(registry.name(t.LICENSE_COMMANDS))
    size, within = settings.batch_size, settings.batch_within_seconds

    @app.agent(requests, concurrency=1)
    async def decide_charges(stream: StreamT[bytes]) -> None:
        # take_events is on faust.Stream, not on the StreamT protocol
        async for events in stream.take_events(size, within=within):  # type: ignore[attr-defined]
            await runner.run(processor.decide, _incoming(events))

    @app.agent(commands, concurrency=1)
    async def apply_license_commands(stream: StreamT[bytes]) -> None:
        # take_events is on faust.Stream, not on the StreamT protocol
        async for events in stream.take_events(size, within=within):  # type: ignore[attr-defined]
            await runner.run(processor.apply, _incoming(events))

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    register_views(app, store, processor.clock, max_items=settings.max_items)

    return app

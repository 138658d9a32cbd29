"""The worker, wired: where the store, the decision loop, healing and the HTTP API meet.

``create_app`` is the one place that builds and connects the parts (nothing connects
at import time); the layers below it never import each other upwards: ``domain`` imports
nothing of creditgate's, ``store`` only the domain, ``stream`` the store and the domain,
``api`` the store and the domain. The faust app here is the worker's lifecycle, its HTTP
views and the decision loop.

faust runs the worker process (signals, start and stop, the web server); consuming,
deciding and publishing are ``DecisionLoop``'s, a plain aiokafka consumer and producer
that faust starts and stops with the app (``stream/consumer.py`` says why not an agent).
So faust itself opens no Kafka connection: its consumer, producer and topic conductor
are switched off.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterable

import faust
from faust.app.base import BootStrategy
from mode import ServiceT

from creditgate.api.operations import Readiness, register_operations
from creditgate.api.views import MAX_BODY_BYTES, register_views
from creditgate.domain.clock import Clock
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.store.holds import HoldSweepIndex
from creditgate.stream import topics as t
from creditgate.stream.consumer import DecisionLoop
from creditgate.stream.decider import Decider
from creditgate.stream.healing import Healer, LedgerGuard, PublishedSequences
from creditgate.stream.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES
from creditgate.stream.topics import TopicRegistry, check_topics


class _WebAndLifecycle(BootStrategy):
    enable_kafka = False  # no faust consumer, producer, conductor or tables


class WorkerApp(faust.App):
    """A faust app that starts ``decision_loop`` after its own services (and stops it
    before them, so the web server answers until the last batch is committed)."""

    BootStrategy = _WebAndLifecycle
    decision_loop: DecisionLoop | None = None

    def on_init_dependencies(self) -> Iterable[ServiceT]:
        services = list(super().on_init_dependencies())
        if self.decision_loop is not None:
            services.append(self.decision_loop)
        return services

    async def on_started(self) -> None:
        await super().on_started()
        freeze_start_up_heap()  # the app has started: what exists now stays

    def _create_directories(self) -> None:
        # faust's data directory holds its tables' local stores: there are none, and
        # creating it left an empty ``<app_id>-data`` folder in the working directory
        pass


class Worker(faust.Worker):
    """faust's worker without its terminal spinner.

    To spin once per log record, the spinner sets the root logger to DEBUG whatever the
    chosen level (only its handler keeps the level): every ``debug`` and ``info`` call of
    every library then builds a record that is thrown away. That was about 5 % of the
    worker's CPU at ``--loglevel warning`` (py-spy, ``python -m bench.run --profile``),
    and the spinner's escape codes landed in the JSON log.
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None


def use_fast_event_loop() -> None:
    """Run the worker's event loops on uvloop (what faust's ``-L uvloop`` does).

    Much of the worker's time outside the decision is event-loop work (futures,
    callbacks, socket reads): uvloop cut the CPU per message of the faust-based worker
    by about a fifth in ``python -m bench.run``. Call it before the app's loop exists.
    """
    import uvloop  # noqa: PLC0415 - only the worker process wants it

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def freeze_start_up_heap() -> None:
    """Take what exists once the worker has started out of the garbage collector's scans,
    and collect far less often.

    Modules, the app, pydantic's validators: some 170,000 objects that live as long as
    the process, and that every full collection would walk again. Frozen,
    ``Decider.decide`` used about a quarter less CPU per request (``bench.micro``-style
    runs, worker heap). Garbage is collected first, so nothing collectable is frozen.

    A batch keeps tens of thousands of objects alive from its fetch to its publish, so
    at Python's default thresholds (700, 10, 10) collections ran some 250 times a second
    in a bench run, found nothing to free (the batch's objects go by reference counting)
    and took 2.6 s of a 24 s run of 150,000 requests, in pauses of up to 60 ms that
    requests waited out. A collection now starts after 50,000 more live objects, so cyclic
    garbage (rare here) still cannot pile up without bound.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def readiness(store: CreditStore, registry: TopicRegistry, settings: Settings) -> Readiness:
    """``/ready``: Redis answers, Kafka answers and the topics match their definitions."""

    async def redis() -> str | None:
        await store.ping()
        return None

    async def kafka_and_topics() -> str | None:
        problems = await check_topics(settings.kafka_bootstrap, registry, settings=settings)
        return "; ".join(problems) or None

    return Readiness({"redis": redis, "kafka_topics": kafka_and_topics})


def create_app(
    settings: Settings, registry: TopicRegistry | None = None, clock: Clock | None = None
) -> WorkerApp:
    """Build the worker's app; nothing connects until the app starts."""
    registry = registry or TopicRegistry.load(prefix=settings.topic_prefix)
    app = WorkerApp(
        settings.app_id,
        autodiscover=False,
        web_port=settings.http_port,
        web_bind=settings.http_host,
        web_router_enabled=False,
        web_tables_enabled=False,
        web_application_options={"client_max_size": MAX_BODY_BYTES},
    )
    store = CreditStore.from_settings(settings)
    metrics = Metrics()
    # Redis is checked against the ledger, and healed from it, whenever it may have
    # forgotten decisions already published (stream/healing.py)
    published = PublishedSequences()
    # the organisations with holds to expire, for the decision loop's sweep
    sweep = HoldSweepIndex.from_settings(settings)
    processor = Decider(store, registry, settings, clock, metrics, known=published, sweep=sweep)
    ledger = registry.specs[t.LEDGER].max_message_bytes or BROKER_DEFAULT_MAX_MESSAGE_BYTES
    healer = Healer(
        store,
        settings,
        registry.name(t.LEDGER),
        published,
        processor.clock,
        metrics,
        ledger,
        sweep=sweep,
    )
    guard = LedgerGuard(healer, store, registry.name(t.LEDGER))
    app.decision_loop = DecisionLoop(processor, registry, settings, metrics, guard)

    metrics.watch_lag(app.decision_loop.lag)
    register_operations(app, metrics, readiness(store, registry, settings))
    register_views(app, store, processor.clock, settings, registry)

    return app

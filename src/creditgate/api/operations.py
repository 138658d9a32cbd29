"""Operators' endpoints: ``/health`` (alive), ``/ready`` (can decide), ``/metrics``.

They stay open (no token): load balancers and Prometheus scrape them. ``/ready`` is
what a deployment waits for: Redis answers, Kafka answers, and the topics match their
definitions. Its checks are cached for a few seconds so a busy scraper cannot turn
them into load on Kafka.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.web import Request, Response, View

from creditgate.observability import CONTENT_TYPE, Metrics
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream.topics import TopicRegistry, check_topics

CHECK_TIMEOUT_SECONDS = 3.0
CACHE_SECONDS = 5.0

Check = Callable[[], Awaitable[str | None]]  # None when fine, else what is wrong


@dataclass
class Readiness:
    """Named checks, each answered from a short cache."""

    checks: dict[str, Check]
    _cached: tuple[float, dict[str, str | None]] | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def report(self) -> dict[str, str | None]:
        async with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
            results = await asyncio.gather(*(_run(check) for check in self.checks.values()))
            report = dict(zip(self.checks, results, strict=True))
            self._cached = (time.monotonic(), report)
            return report


async def _run(check: Check) -> str | None:
    try:
        return await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"
    except Exception as exc:  # a readiness probe reports failures, it does not raise
        return f"{type(exc).__name__}: {exc}"


def readiness(store: CreditStore, registry: TopicRegistry, settings: Settings) -> Readiness:
    async def redis() -> str | None:
        await store.ping()
        return None

    async def kafka_and_topics() -> str | None:
        problems = await check_topics(settings.kafka_bootstrap, registry, settings=settings)
        return "; ".join(problems) or None

    return Readiness({"redis": redis, "kafka_topics": kafka_and_topics})


def register_operations(app: faust.App, metrics: Metrics, ready: Readiness) -> None:
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    class Ready(View):
        async def get(self, request: Request) -> Response:
            report = await ready.report()
            body: dict[str, Any] = {
                "status": "ready" if not any(report.values()) else "not_ready",
                "checks": {name: problem or "ok" for name, problem in report.items()},
            }
            return self.json(body, status=200 if body["status"] == "ready" else 503)

    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(metrics.render(), content_type=CONTENT_TYPE)

    app.page("/health")(Health)
    app.page("/ready")(Ready)
    app.page("/metrics")(MetricsView)

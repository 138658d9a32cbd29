"""Metrics and structured logs.

Metrics live in a registry of their own (one per app) so several apps in one process
(tests) never share counters. Each registry also carries the process (CPU, memory, open
files), garbage-collector and platform collectors and ``creditgate_build_info``.

Logs are one JSON object per line; decision lines carry ``request_id`` and ``org_id``
so an operator can follow one request through them.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# aiohttp adds the charset itself and refuses one inside content_type
CONTENT_TYPE = "text/plain; version=0.0.4"

_BATCH_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

LagSource = Callable[[], Mapping[tuple[str, int], int]]


class _LagCollector(Collector):
    """Consumer lag per partition, read from the consumer at scrape time."""

    def __init__(self, source: LagSource) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "creditgate_consumer_lag",
            "Messages not yet consumed, per partition",
            labels=["topic", "partition"],
        )
        for (topic, partition), lag in sorted(self._source().items()):
            family.add_metric([topic, str(partition)], lag)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # the standard process_*, python_gc_* and python_info metrics, on this registry
        # (prometheus_client registers them on its global one, which no app serves)
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "creditgate_build_info",
            "Always 1; the labels name the running creditgate and Python",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version("creditgate"), platform.python_version()).set(1)
        self.decisions = Counter(
            "creditgate_decisions",
            "Charge decisions by action and outcome",
            ["action", "outcome", "reason"],
            registry=r,
        )
        self.credits = Counter(
            "creditgate_credits_charged", "Credits charged, by action", ["action"], registry=r
        )
        self.commands = Counter(
            "creditgate_license_commands",
            "License commands by outcome",
            ["type", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "creditgate_dead_letters", "Unreadable messages", ["topic"], registry=r
        )
        self.oversized = Counter(
            "creditgate_oversized_messages",
            "Outputs larger than their topic's max.message.bytes, by topic and what was "
            "sent instead (a truncated result, a dead letter, or nothing)",
            ["topic", "sent"],
            registry=r,
        )
        self.batch_size = Histogram(
            "creditgate_batch_size",
            "Messages per processed batch",
            ["agent"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.script_seconds = Histogram(
            "creditgate_script_seconds",
            "Redis round trip of one batch of script calls",
            ["script"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "creditgate_decision_latency_seconds",
            "From a request's Kafka timestamp to its decision being delivered",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # stage "decide" (Redis, or a bug in a batch) or "publish" (Kafka): which one is away
        self.batch_retries = Counter(
            "creditgate_batch_retries", "Batch steps retried after a failure", ["stage"], registry=r
        )
        # healing a Redis that forgot from the ledger (stream/healing.py)
        self.heal_checks = Counter(
            "creditgate_heal_checks", "Checks of Redis against the ledger", registry=r
        )
        self.healed_entries = Counter(
            "creditgate_healed_entries",
            "Ledger entries Redis had forgotten, restored from the ledger",
            registry=r,
        )
        self.healed_organisations = Counter(
            "creditgate_healed_organisations",
            "Organisations restored from the ledger (once per check that found them behind)",
            registry=r,
        )

    def watch_lag(self, source: LagSource) -> None:
        self.registry.register(_LagCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed with ``extra=`` come along."""

    _RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` that writes JSON lines to stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }

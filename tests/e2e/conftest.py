"""``creditgate worker`` as separate processes, fed through real topics.

Three workers share one Redis key prefix (one organisation state) but read topics
of their own, each with its decision clock at another day: publishing to the
``day31`` worker is "31 days later" for the same organisation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from creditgate.devstack import find_free_port
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient
from creditgate.stream.topics import TopicRegistry, apply_topics

DAYS = {"day0": 0, "day29": 29, "day31": 31}


@dataclass
class Pipeline:
    bootstrap: str
    redis_url: str
    key_prefix: str
    registries: dict[str, TopicRegistry]
    clients: dict[str, CreditgateClient] = field(default_factory=dict)
    worker_envs: dict[str, dict[str, str]] = field(default_factory=dict)

    def http(self, day: str = "day0") -> str:
        return f"http://127.0.0.1:{self.worker_envs[day]['CREDITGATE_HTTP_PORT']}"

    def env(self, day: str) -> dict[str, str]:
        return {
            **os.environ,
            "CREDITGATE_KAFKA_BOOTSTRAP": self.bootstrap,
            "CREDITGATE_REDIS_URL": self.redis_url,
            "CREDITGATE_TOPIC_PREFIX": self.registries[day].prefix,
            "CREDITGATE_KEY_PREFIX": self.key_prefix,
            "CREDITGATE_APP_ID": f"{self.key_prefix}-{day}",
            "CREDITGATE_HTTP_PORT": str(find_free_port()),
            "CREDITGATE_CLOCK_OFFSET_SECONDS": str(DAYS[day] * 86400),
        }

    def settings(self) -> Settings:
        return Settings(
            kafka_bootstrap=self.bootstrap, redis_url=self.redis_url, key_prefix=self.key_prefix
        )


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "creditgate", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
async def pipeline(
    endpoints: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    bootstrap, redis_url = endpoints
    run = f"e2e{int(time.time() * 1000) % 10**9}"
    registries = {day: TopicRegistry.load(prefix=f"{run}.{day}.") for day in DAYS}
    for registry in registries.values():
        await apply_topics(bootstrap, registry)
    found = Pipeline(bootstrap, redis_url, run, registries)
    logs = tmp_path_factory.mktemp("workers")
    found.worker_envs = {day: found.env(day) for day in DAYS}
    workers = [start_worker(found.worker_envs[day], logs / f"{day}.log") for day in DAYS]
    for day, registry in registries.items():
        client = CreditgateClient(
            bootstrap,
            registry,
            (t.CHARGE_RESULTS, t.LICENSE_EVENTS, t.NOTIFICATIONS, t.LEDGER, t.DEADLETTER),
        )
        await client.start()
        found.clients[day] = client
    try:
        yield found
    finally:
        for client in found.clients.values():
            await client.stop()
        for worker in workers:
            stop_worker(worker)
        for log in sorted(logs.iterdir()):
            tail = log.read_text(errors="replace")[-1500:]
            if "Traceback" in tail:
                print(f"--- {log.name} ---\n{tail}")


@pytest.fixture
async def pipeline_store(pipeline: Pipeline) -> AsyncIterator[CreditStore]:
    store = CreditStore.from_settings(pipeline.settings())
    try:
        yield store
    finally:
        await store.close()


def results_of(pipeline: Pipeline, org: str) -> list[dict[str, Any]]:
    """Every decision seen for ``org`` across the workers, one per request_id."""
    first: dict[str, dict[str, Any]] = {}
    for client in pipeline.clients.values():
        for result in client.seen[t.CHARGE_RESULTS]:
            if result["org_id"] == org and result["reason"] != "request_id_conflict":
                first.setdefault(result["request_id"], result)
    return list(first.values())

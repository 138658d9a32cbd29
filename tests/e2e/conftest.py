"""``creditgate worker`` as separate processes, fed through real topics.

Three workers share one Redis key prefix (one organisation state) but read topics
of their own, each with its decision clock at another day: publishing to the
``day31`` worker is "31 days later" for the same organisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from creditgate.devstack import find_free_port
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient
from creditgate.stream.topics import TopicRegistry, apply_topics

DAYS = {"day0": 0, "day29": 29, "day31": 31}
# a worker starts (imports, start-up checks, group join) in 2-5 s; a loaded CI machine
# may take several times that
READY_TIMEOUT_SECONDS = 90.0
# find_free_port's port was free a moment ago; an outgoing connection can take it before
# the worker listens on it, and the worker then exits. Such a start is retried.
START_ATTEMPTS = 3


@dataclass
class Pipeline:
    bootstrap: str
    redis_url: str
    key_prefix: str
    registries: dict[str, TopicRegistry]
    clients: dict[str, CreditgateClient] = field(default_factory=dict)
    worker_envs: dict[str, dict[str, str]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

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


async def start_ready_worker(pipeline: Pipeline, day: str, log: Path) -> subprocess.Popen[bytes]:
    """A worker for ``day`` whose API answers ``/ready``, so it has joined its group."""
    for attempt in range(1, START_ATTEMPTS + 1):
        pipeline.worker_envs[day] = pipeline.env(day)  # a fresh HTTP port each time
        process = start_worker(pipeline.worker_envs[day], log)
        if await answers(f"{pipeline.http(day)}/ready", process):
            return process
        if process.poll() is None:
            stop_worker(process)
            raise RuntimeError(
                f"the {day} worker was not ready after {READY_TIMEOUT_SECONDS:.0f}s:\n" + tail(log)
            )
        print(f"the {day} worker exited on start (attempt {attempt}):\n{tail(log)}")
    raise RuntimeError(f"the {day} worker exited on each of {START_ATTEMPTS} starts")


async def answers(url: str, process: subprocess.Popen[bytes]) -> bool:
    """True once ``url`` answers 200; False if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as http:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return True
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.2)
    return False


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(log: Path, size: int = 4000) -> str:
    return log.read_text(errors="replace")[-size:] if log.exists() else "(no log)"


@contextlib.asynccontextmanager
async def running_pipeline(
    endpoints: tuple[str, str], tmp_path_factory: pytest.TempPathFactory, days: Sequence[str]
) -> AsyncIterator[Pipeline]:
    """Workers for ``days`` (each with its topics and clock), their clients, one state."""
    bootstrap, redis_url = endpoints
    run = f"e2e{int(time.time() * 1000) % 10**9}"
    registries = {day: TopicRegistry.load(prefix=f"{run}.{day}.") for day in days}
    for registry in registries.values():
        await apply_topics(bootstrap, registry)
    found = Pipeline(bootstrap, redis_url, run, registries)
    logs = tmp_path_factory.mktemp("workers")
    found.logs = {day: logs / f"{day}.log" for day in days}
    workers = list(
        await asyncio.gather(*(start_ready_worker(found, day, found.logs[day]) for day in days))
    )
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
        try:
            await asyncio.gather(*(client.stop() for client in found.clients.values()))
        finally:
            for worker in workers:
                stop_worker(worker)


@pytest.fixture(scope="session")
async def pipeline(
    endpoints: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    async with running_pipeline(endpoints, tmp_path_factory, tuple(DAYS)) as found:
        yield found


@pytest.fixture(scope="session")
async def day0_pipeline(
    endpoints: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    """The day-0 worker alone: holds expire by the worker's own clock, so workers whose
    clocks run 29 and 31 days ahead on the same state would expire every hold at once."""
    async with running_pipeline(endpoints, tmp_path_factory, ("day0",)) as found:
        yield found


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test on the pipeline shows what its workers logged last."""
    outcome = yield
    report = outcome.get_result()
    found = getattr(item, "funcargs", {}).get("pipeline")
    if report.when == "call" and report.failed and isinstance(found, Pipeline):
        for day, log in found.logs.items():
            report.sections.append((f"{day} worker's log (end)", tail(log)))


# ---- a worker with scoped tokens, its state made through Kafka (the console's tests) ----


@dataclass
class ScopedApi:
    """One worker of its own (topics, key prefix, group) with ``CREDITGATE_API_TOKENS``
    of every kind, and a client on its topics. Its organisations are ``acme`` and
    ``beta`` (names are safe: the key prefix and topics are this run's)."""

    base: str
    tokens: dict[str, str]  # token kind -> token
    client: CreditgateClient
    log: Path

    def auth(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[kind]}"}


# kind -> scope; "member" is u-17 of acme, "member_other" u-18 of acme
SCOPES: dict[str, Any] = {
    "member": {"org": "acme", "role": "member", "user": "u-17"},
    "member_other": {"org": "acme", "role": "member", "user": "u-18"},
    "member_21": {"org": "acme", "role": "member", "user": "u-21"},
    "admin": {"org": "acme", "role": "admin", "user": "ana"},
    "admin_other_org": {"org": "beta", "role": "admin", "user": "bo"},
    "support": {"org": "acme", "role": "support"},
    "reader": ["acme"],
    "operator": "*",
}
DAY = 86_400


def iso(seconds: float) -> str:
    from creditgate.domain.ids import rfc3339

    return rfc3339(int(seconds * 1000))


async def seed_through_kafka(client: CreditgateClient, now: float) -> None:
    """acme and beta, each with a year's license, admins and members; u-17 of acme has
    exports (one with a free repeat) and a CRM push, all decided by the worker."""
    for org, admin in (("acme", "ana"), ("beta", "bo")):
        commands: list[dict[str, Any]] = [
            {
                "type": "license.start_period",
                "period_id": "2026",
                "starts_at": iso(now - DAY),
                "ends_at": iso(now + 300 * DAY),
                "credits": 100,
            },
            {"type": "member.upsert", "user_id": admin, "role": "admin"},
            *(
                {"type": "member.upsert", "user_id": user, "role": "member"}
                for user in ("u-17", "u-18", "u-21")
            ),
        ]
        for n, fields in enumerate(commands):
            # generous: the worker's first batch waits for its heal check, and a loaded CI
            # machine has taken over 30 s for that
            event = await client.command(
                {"command_id": f"seed-{org}-{n}", "org_id": org, **fields}, timeout=120
            )
            assert event["type"] == "command.applied", event
    requests = [
        ("exp-0001", "export", [("contact", "c-1"), ("contact", "c-2")], {"export_id": "e-1"}),
        ("exp-0002", "export", [("contact", "c-2"), ("company", "co-9")], {"export_id": "e-2"}),
        ("push-0001", "crm_push", [("contact", "c-3")], {"crm": "hubspot", "push_id": "p-1"}),
    ]
    for request_id, action, items, reference in requests:
        result = await client.request(
            {
                "request_id": request_id,
                "org_id": "acme",
                "user_id": "u-17",
                "action": action,
                "items": [{"type": kind, "id": item} for kind, item in items],
                "requested_at": iso(now),
                "reference": reference,
            },
            timeout=120,
        )
        assert result["type"] == "charge.approved", result


@pytest.fixture(scope="session")
async def scoped_api(
    endpoints: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ScopedApi]:
    import orjson

    bootstrap, redis_url = endpoints
    run = f"con{int(time.time() * 1000) % 10**9}"
    registry = TopicRegistry.load(prefix=f"{run}.")
    await apply_topics(bootstrap, registry)
    tokens = {kind: f"tok-{kind}-{os.urandom(12).hex()}" for kind in SCOPES}
    env = {
        **os.environ,
        "CREDITGATE_KAFKA_BOOTSTRAP": bootstrap,
        "CREDITGATE_REDIS_URL": redis_url,
        "CREDITGATE_TOPIC_PREFIX": registry.prefix,
        "CREDITGATE_KEY_PREFIX": run,
        "CREDITGATE_APP_ID": run,
        "CREDITGATE_HTTP_PORT": str(find_free_port()),
        "CREDITGATE_API_TOKENS": orjson.dumps(
            {tokens[kind]: scope for kind, scope in SCOPES.items()}
        ).decode(),
    }
    log = tmp_path_factory.mktemp("scoped") / "worker.log"
    worker = start_worker(env, log)
    base = f"http://127.0.0.1:{env['CREDITGATE_HTTP_PORT']}"
    client = CreditgateClient(bootstrap, registry, (t.CHARGE_RESULTS, t.LICENSE_EVENTS))
    try:
        if not await answers(f"{base}/ready", worker):
            pytest.fail(f"the worker did not start: {tail(log)}")
        await client.start()
        await seed_through_kafka(client, time.time())
        yield ScopedApi(base, tokens, client, log)
    finally:
        try:
            await client.stop()
        finally:
            stop_worker(worker)

"""Latency of ``POST /v1/quote`` under a simple closed-loop load: ``python -m bench.quote_load``.

Not a test. It reuses the stack of CREDITGATE_KAFKA_BOOTSTRAP / CREDITGATE_REDIS_URL,
or the local one in ``.devstack`` (started if needed, and stopped again if it started
it), runs ``creditgate worker`` as a subprocess with a bearer token configured, seeds
an organisation whose users already exported part of the contacts (so quotes have
free repeats to find), then sends ``--requests`` quotes of 1 item and of 100 items
from ``--clients`` concurrent aiohttp clients, and prints p50/p99 per size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from creditgate.devstack import DevStack, find_free_port
from creditgate.domain.charges import ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.ids import rfc3339
from creditgate.settings import Settings
from creditgate.store.gateway import ChargeCall, CreditStore
from creditgate.stream.topics import TopicRegistry, apply_topics, check_topics

ORG = "acme"
CONTACTS = 20_000
PRECHARGED = 5_000  # contacts exported before the run: about a quarter of items are free
DAY_MS = 86_400_000


@contextmanager
def stack() -> Iterator[tuple[str, str]]:
    bootstrap = os.environ.get("CREDITGATE_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("CREDITGATE_REDIS_URL")
    if bootstrap and redis_url:
        yield bootstrap, redis_url
        return
    devstack = DevStack(Path(".devstack"))
    started = not devstack.status().running
    endpoints = devstack.up()
    try:
        yield endpoints.kafka_bootstrap, endpoints.redis_url
    finally:
        if started:
            devstack.down()


async def seed(settings: Settings, now: int) -> None:
    store = CreditStore.from_settings(settings)
    try:
        setup: list[dict[str, Any]] = [
            {
                "type": "license.start_period",
                "period_id": "bench",
                "starts_at": rfc3339(now - DAY_MS),
                "ends_at": rfc3339(now + 30 * DAY_MS),
                "credits": 10_000_000,
            },
            {"type": "member.upsert", "user_id": "u-1", "role": "member"},
        ]
        for n, fields in enumerate(setup):
            command = license_command_adapter.validate_python(
                {"command_id": f"seed-{n}", "org_id": ORG, **fields}
            )
            await store.apply_commands([command], now)
        calls = [
            ChargeCall.of(
                ChargeRequest.model_validate(
                    {
                        "request_id": f"seed-{start}",
                        "org_id": ORG,
                        "user_id": "u-1",
                        "action": "export",
                        "items": [
                            {"type": "contact", "id": f"c-{i}", "company_id": f"co-{i % 500}"}
                            for i in range(start, start + 500)
                        ],
                        "requested_at": rfc3339(now),
                    }
                )
            )
            for start in range(0, PRECHARGED, 500)
        ]
        await store.charge_many(calls, now)
    finally:
        await store.close()


def quote_body(rng: random.Random, size: int) -> bytes:
    items = []
    for _ in range(size):
        i = rng.randrange(CONTACTS)
        items.append({"type": "contact", "id": f"c-{i}", "company_id": f"co-{i % 500}"})
    return orjson.dumps({"org_id": ORG, "user_id": "u-1", "action": "export", "items": items})


async def load(
    url: str, token: str, bodies: list[bytes], clients: int
) -> tuple[list[float], float]:
    """Each client sends its next body when the previous answer arrived (closed loop)."""
    latencies: list[float] = []
    queue = iter(bodies)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def client(http: aiohttp.ClientSession) -> None:
        for body in queue:
            started = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {await response.text()}")
            latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return latencies, elapsed


async def wait_ready(base: str, worker: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError("the worker exited; see its log")
            try:
                async with http.get(f"{base}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the worker did not answer in time")


async def wait_topics(bootstrap: str, registry: TopicRegistry, seconds: float = 30) -> None:
    """Topics just created take a moment to show in the broker's metadata."""
    deadline = time.monotonic() + seconds
    while True:
        problems = await check_topics(bootstrap, registry)
        if not problems:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics not ready: {problems}")
        await asyncio.sleep(0.2)


def spawn_worker(env: dict[str, str], folder: Path) -> subprocess.Popen[bytes]:
    """``creditgate worker``, logging to ``folder/worker.log`` (faust's data lands there too)."""
    with (folder / "worker.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "creditgate", "worker", "--loglevel", "warning"],
            env=env,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, bootstrap: str, redis_url: str, folder: Path) -> None:
    prefix = f"qload{uuid.uuid4().hex[:8]}"
    registry = TopicRegistry.load(prefix=f"{prefix}.")
    await apply_topics(bootstrap, registry)
    await wait_topics(bootstrap, registry)
    settings = Settings(kafka_bootstrap=bootstrap, redis_url=redis_url, key_prefix=prefix)
    await seed(settings, int(time.time() * 1000))

    token = uuid.uuid4().hex
    port = find_free_port()
    env = {
        **os.environ,
        "CREDITGATE_KAFKA_BOOTSTRAP": bootstrap,
        "CREDITGATE_REDIS_URL": redis_url,
        "CREDITGATE_TOPIC_PREFIX": registry.prefix,
        "CREDITGATE_KEY_PREFIX": prefix,
        "CREDITGATE_APP_ID": prefix,
        "CREDITGATE_HTTP_PORT": str(port),
        "CREDITGATE_API_TOKENS": orjson.dumps({token: "*"}).decode(),
    }
    worker = spawn_worker(env, folder)
    base = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        await wait_ready(base, worker)
        rng = random.Random(7)
        for size in args.sizes:
            bodies = [quote_body(rng, size) for _ in range(args.warmup + args.requests)]
            await load(f"{base}/v1/quote", token, bodies[: args.warmup], args.clients)
            latencies, elapsed = await load(
                f"{base}/v1/quote", token, bodies[args.warmup :], args.clients
            )
            rows.append(
                {
                    "items": size,
                    "requests": len(latencies),
                    "clients": args.clients,
                    "p50 ms": percentile(latencies, 0.50),
                    "p99 ms": percentile(latencies, 0.99),
                    "mean ms": statistics.fmean(latencies),
                    "max ms": max(latencies),
                    "quotes/s": len(latencies) / elapsed,
                }
            )
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = list(rows[0])
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quote_load", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="measured quotes per size")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured quotes per size")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100], help="items per quote")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quote-load-") as folder, stack() as (bootstrap, url):
        asyncio.run(run(args, bootstrap, url, Path(folder)))


if __name__ == "__main__":
    main()

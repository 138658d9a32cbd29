"""What an operator scrapes from a running worker: readiness and the metrics that
traffic should move."""

from __future__ import annotations

from importlib.metadata import version

import aiohttp
import pytest

from creditgate.stream import topics as t
from tests.metrics import sample

from .conftest import Pipeline
from .test_pipeline import contact, request, setup_org

pytestmark = pytest.mark.e2e


async def scrape(pipeline: Pipeline) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{pipeline.http()}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_worker_is_ready_when_redis_kafka_and_topics_are(pipeline: Pipeline) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{pipeline.http()}/ready") as response:
        body = await response.json()
    assert response.status == 200, body
    assert body == {"status": "ready", "checks": {"redis": "ok", "kafka_topics": "ok"}}


async def test_metrics_name_the_build_and_the_process(pipeline: Pipeline) -> None:
    text = await scrape(pipeline)

    assert sample(text, "creditgate_build_info", version=version("creditgate")) == 1
    assert sample(text, "process_resident_memory_bytes") > 0
    assert sample(text, "process_cpu_seconds_total") > 0
    assert "python_gc_collections_total{" in text
    assert "python_info{" in text


async def test_metrics_count_the_traffic_of_a_test(pipeline: Pipeline) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=2)
    before = await scrape(pipeline)

    await client.request(request(org, "bob", "export", [contact("c-1"), contact("c-2")]))
    await client.request(request(org, "bob", "crm_push", [contact("c-1")]))
    await client.request(request(org, "bob", "export", [contact("c-3")]))
    await client.send(t.EXPORT_REQUESTS, b"{oops", key=org)
    await client.wait_many(t.DEADLETTER, lambda m: m["key"] == org, 1)
    after = await scrape(pipeline)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("creditgate_decisions_total", action="export", outcome="approved") == 1
    assert moved("creditgate_decisions_total", action="crm_push", outcome="approved") == 1
    assert (
        moved(
            "creditgate_decisions_total",
            action="export",
            outcome="rejected",
            reason="insufficient_credits",
        )
        == 1
    )
    assert moved("creditgate_credits_charged_total", action="export") == 2
    assert moved("creditgate_dead_letters_total") == 1
    assert moved("creditgate_batch_size_count", agent="charges") >= 1
    assert moved("creditgate_script_seconds_count", script="charge") >= 1
    assert moved("creditgate_decision_latency_seconds_count") >= 3
    assert "creditgate_consumer_lag{" in after

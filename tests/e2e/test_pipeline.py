"""The whole write path: a plain Kafka producer → ``creditgate worker`` → result topics."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient

from .conftest import Pipeline, results_of

pytestmark = pytest.mark.e2e

NOW = datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def request(
    org: str, user: str, action: str, items: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "request_id": new_id("r"),
        "org_id": org,
        "user_id": user,
        "action": action,
        "items": items,
        "requested_at": iso(datetime.now(UTC)),
        **extra,
    }


def contact(cid: str, company: str | None = None) -> dict[str, Any]:
    return {"type": "contact", "id": cid, **({"company_id": company} if company else {})}


async def setup_org(
    client: CreditgateClient, credits: int = 10, members: dict[str, str] | None = None
) -> str:
    org = new_id("org")
    commands = [
        {
            "command_id": new_id("c"),
            "org_id": org,
            "type": "license.start_period",
            "period_id": "p1",
            "starts_at": iso(NOW - timedelta(days=1)),
            "ends_at": iso(NOW + timedelta(days=90)),
            "credits": credits,
        }
    ]
    for user, role in (members or {"ana": "admin", "bob": "member"}).items():
        commands.append(
            {
                "command_id": new_id("c"),
                "org_id": org,
                "type": "member.upsert",
                "user_id": user,
                "role": role,
            }
        )
    for command in commands:
        event = await client.command(command)
        assert event["type"] == "command.applied", event
    return org


async def assert_ledger_invariant(pipeline: Pipeline, store: CreditStore, org: str) -> None:
    """Period credits + grants - balance = the credits charged in the period's decisions."""
    view = await store.credits(org, 0)
    assert view is not None
    charged = sum(
        r["credits_charged"]
        for r in results_of(pipeline, org)
        if r["period_id"] == view["period_id"]
    )
    assert view["period_credits"] + view["granted"] - view["remaining"] == charged
    assert view["remaining"] >= 0


async def test_plain_producer_request_is_decided_on_the_results_topic(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=5)
    body = request(
        org,
        "bob",
        "export",
        [contact("c-1", "co-9"), {"type": "company", "id": "co-3"}],
        max_credits=2,
        reference={"export_id": "e-55"},
    )
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            pipeline.registries["day0"].name(t.EXPORT_REQUESTS),
            orjson.dumps(body),
            key=org.encode(),
        )
    finally:
        await producer.stop()
    result = await client.wait_for(t.CHARGE_RESULTS, "request_id", body["request_id"])
    assert result["type"] == "charge.approved"
    assert result["credits_charged"] == 2
    assert result["balance_after"] == 3
    assert [i["outcome"] for i in result["items"]] == ["charged", "charged"]
    assert result["reference"] == {"export_id": "e-55"}
    ledger = await client.wait_for(t.LEDGER, "request_id", body["request_id"])
    assert ledger["credits_delta"] == -2
    assert ledger["balance_after"] == 3
    await assert_ledger_invariant(pipeline, pipeline_store, org)


async def test_window_is_anchored_at_the_first_charge_across_clock_days(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    day0, day29, day31 = (pipeline.clients[d] for d in ("day0", "day29", "day31"))
    org = await setup_org(day0, credits=10)
    first = await day0.request(request(org, "bob", "export", [contact("c-7")]))
    assert first["credits_charged"] == 1
    push = await day29.request(request(org, "bob", "crm_push", [contact("c-7")]))
    assert push["credits_charged"] == 0
    assert push["items"][0]["outcome"] == "free_repeat"
    opened = datetime.fromisoformat(first["decided_at"])
    assert datetime.fromisoformat(push["items"][0]["free_until"]) == opened + timedelta(days=30)
    again = await day31.request(request(org, "bob", "export", [contact("c-7")]))
    assert again["credits_charged"] == 1
    assert again["items"][0]["outcome"] == "charged"
    assert again["balance_after"] == 8
    await assert_ledger_invariant(pipeline, pipeline_store, org)


async def test_replayed_request_gets_the_identical_decision_and_no_second_charge(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=3)
    body = request(org, "bob", "export", [contact("c-1")])
    await client.send(t.EXPORT_REQUESTS, body)
    await client.send(t.EXPORT_REQUESTS, body)
    first, second = await client.wait_many(
        t.CHARGE_RESULTS, lambda m: m["request_id"] == body["request_id"], 2
    )
    assert first == second
    assert first["credits_charged"] == 1
    view = await pipeline_store.credits(org, 0)
    assert view is not None
    assert view["remaining"] == 2
    changed = dict(body, items=[contact("c-2")])
    await client.send(t.EXPORT_REQUESTS, changed)
    answers = await client.wait_many(
        t.CHARGE_RESULTS, lambda m: m["request_id"] == body["request_id"], 3
    )
    assert answers[2]["reason"] == "request_id_conflict"
    assert answers[2]["credits_charged"] == 0
    view = await pipeline_store.credits(org, 0)
    assert view is not None
    assert view["remaining"] == 2
    await assert_ledger_invariant(pipeline, pipeline_store, org)


async def test_disallowed_user_is_refused_and_notified_and_non_admin_cannot_disallow(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, members={"ana": "admin", "bob": "member", "cid": "member"})
    refused = await client.command(
        {
            "command_id": new_id("c"),
            "org_id": org,
            "type": "member.set_credits_allowed",
            "user_id": "cid",
            "allowed": False,
            "set_by": "bob",
        }
    )
    assert refused["type"] == "command.rejected"
    assert refused["reason"] == "not_an_admin"
    applied = await client.command(
        {
            "command_id": new_id("c"),
            "org_id": org,
            "type": "member.set_credits_allowed",
            "user_id": "cid",
            "allowed": False,
            "set_by": "ana",
        }
    )
    assert applied["type"] == "command.applied"
    assert applied["state"]["credits_allowed"] is False
    body = request(org, "cid", "export", [contact("c-1")])
    result = await client.request(body)
    assert result["type"] == "charge.rejected"
    assert result["reason"] == "credits_disallowed"
    note = await client.wait_for(t.NOTIFICATIONS, "request_id", body["request_id"])
    assert note["type"] == "credits.disallowed"
    assert note["recipient"] == {"user_id": "cid"}
    stranger = await client.request(request(org, "zed", "export", [contact("c-1")]))
    assert stranger["reason"] == "not_a_member"
    await assert_ledger_invariant(pipeline, pipeline_store, org)


async def test_bad_input_is_dead_lettered_or_rejected_and_the_stream_goes_on(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=5)
    await client.send(t.EXPORT_REQUESTS, b"\x00\xffnot json", key=org)
    wrong_action = request(org, "bob", "crm_push", [contact("c-1")])
    await client.send(t.EXPORT_REQUESTS, wrong_action)
    unknown_field = request(org, "bob", "export", [contact("c-1")], colour="red")
    await client.send(t.EXPORT_REQUESTS, unknown_field)
    valid = request(org, "bob", "export", [contact("c-1")])
    result = await client.request(valid)
    assert result["type"] == "charge.approved"
    assert result["credits_charged"] == 1

    dead = await client.wait_many(t.DEADLETTER, lambda m: m["key"] == org, 1)
    assert dead[0]["source"]["topic"] == pipeline.registries["day0"].name(t.EXPORT_REQUESTS)
    assert isinstance(dead[0]["source"]["offset"], int)
    assert "not UTF-8 JSON" in dead[0]["error"]
    for body, words in ((wrong_action, "does not belong on this topic"), (unknown_field, "colour")):
        rejected = await client.wait_for(t.CHARGE_RESULTS, "request_id", body["request_id"])
        assert rejected["reason"] == "invalid_request"
        assert words in rejected["message"]
    await assert_ledger_invariant(pipeline, pipeline_store, org)


async def test_ledger_sequence_is_gap_free_per_org(pipeline: Pipeline) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=2)
    bodies = [request(org, "bob", "export", [contact(f"c-{n}")]) for n in range(4)]
    for body in bodies:
        await client.send(t.EXPORT_REQUESTS, body)
    # 3 commands + 4 decisions (2 approved, 2 rejected for want of credits)
    entries = await client.wait_many(t.LEDGER, lambda m: m["org_id"] == org, 7)
    sequences = sorted({e["sequence"] for e in entries})
    assert sequences == list(range(1, 8))
    kinds = [e["kind"] for e in sorted(entries, key=lambda e: e["sequence"])]
    assert kinds[:3] == ["period_started", "member_changed", "member_changed"]
    assert sorted(kinds[3:]) == ["charged", "charged", "rejected", "rejected"]


def test_worker_refuses_to_start_without_its_topics(pipeline: Pipeline) -> None:
    env = pipeline.env("day0") | {"CREDITGATE_TOPIC_PREFIX": f"missing{uuid.uuid4().hex[:6]}."}
    done = subprocess.run(
        [sys.executable, "-m", "creditgate", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "credits.export.requests is missing" in done.stderr

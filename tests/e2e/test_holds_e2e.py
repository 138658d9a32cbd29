"""Holds, refunds and limits through ``creditgate worker`` itself: a hold placed on a
request topic and settled on ``credits.hold.settlements``, a hold that runs out while
nothing else reaches its organisation (the worker's own sweep publishes hold.expired),
and a refund asked for over HTTP, answered with the worker's license event."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t

from .conftest import Pipeline
from .test_pipeline import contact, request, setup_org

pytestmark = pytest.mark.e2e


def settlement(org: str, hold_id: str, items: list[dict[str, Any]] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "settlement_id": f"s-{uuid.uuid4().hex[:10]}",
        "org_id": org,
        "request_id": hold_id,
        "type": "hold.release" if items is None else "hold.settle",
    }
    if items is not None:
        body["items"] = [{"type": i["type"], "id": i["id"]} for i in items]
    return body


@pytest.fixture(scope="session")
async def pipeline(day0_pipeline: Pipeline) -> Pipeline:
    """The holds' tests run on the day-0 worker alone (``day0_pipeline`` says why)."""
    return day0_pipeline


async def any_of(pipeline: Pipeline, match: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for client in pipeline.clients.values():
            found = [m for m in client.seen[t.CHARGE_RESULTS] if match(m)]
            if found:
                return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"no worker published it within {timeout:.0f}s")


async def assert_accounting_identity(store: CreditStore, org: str) -> None:
    """credits + grants - balance = charged - refunded + held, as the credits view shows
    it (``used`` is charged less refunded)."""
    view = await store.credits(org, 0)
    assert view is not None
    spent = view["period_credits"] + view["granted"] - view["remaining"]
    assert spent == view["used"] + view["held"], view


async def test_a_hold_is_settled_through_the_worker(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=10)
    items = [contact("c-1"), contact("c-2"), contact("c-3")]

    held = await client.request(request(org, "bob", "export", items, hold={}))
    view = await pipeline_store.credits(org, 0)
    settled = await client.settlement(settlement(org, held["request_id"], items[:2]))

    assert held["type"] == "charge.held"
    assert held["credits_held"] == 3
    assert view is not None
    assert (view["held"], view["remaining"]) == (3, 7)
    assert settled["type"] == "hold.settled"
    assert settled["credits_charged"] == 2
    assert settled["credits_released"] == 1
    await assert_accounting_identity(pipeline_store, org)


async def test_a_hold_expires_with_no_traffic_at_all(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=10)

    held = await client.request(
        request(org, "bob", "export", [contact("c-1")], hold={"expires_in_seconds": 2})
    )
    # nothing more is sent to this organisation: the worker's sweep decides the expiry
    expired = await any_of(
        pipeline,
        lambda m: m["request_id"] == held["request_id"] and m["type"] == "hold.expired",
    )

    assert expired[0]["credits_released"] == 1
    assert expired[0]["balance_after"] == 10
    await assert_accounting_identity(pipeline_store, org)


async def test_a_refund_over_http_is_the_workers_license_event(
    pipeline: Pipeline, pipeline_store: CreditStore
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=10)
    pushed = await client.request(request(org, "bob", "crm_push", [contact("c-1"), contact("c-2")]))
    url = f"{pipeline.http('day0')}/v1/orgs/{org}/refunds"
    body = {
        "request_id": pushed["request_id"],
        "items": [{"type": "contact", "id": "c-2"}],
        "reason": "the CRM refused c-2",
        "refunded_by": "cs-mia",
    }

    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as response:
            applied = (response.status, await response.json())
        async with http.post(url, json=body) as response:
            again = (response.status, await response.json())
        async with http.post(url, json={**body, "request_id": "never-sent"}) as response:
            unknown = (response.status, await response.json())
        async with http.post(url, json={**body, "colour": "red"}) as response:
            invalid = response.status

    assert applied[0] == 200
    assert applied[1]["type"] == "command.applied"
    assert applied[1]["command_type"] == "charge.refund"
    # refused: the console's problem of a refused command, its event included
    assert again[0] == 409
    assert (again[1]["code"], again[1]["reason"]) == ("command_rejected", "nothing_to_refund")
    assert again[1]["event"]["type"] == "command.rejected"
    assert again[1]["command_id"] == again[1]["event"]["command_id"]
    assert unknown[0] == 404
    assert (unknown[1]["code"], unknown[1]["reason"]) == ("command_rejected", "request_not_found")
    assert unknown[1]["event"]["command_type"] == "charge.refund"
    assert invalid == 400
    view = await pipeline_store.credits(org, 0)
    assert view is not None
    assert view["remaining"] == 9
    await assert_accounting_identity(pipeline_store, org)

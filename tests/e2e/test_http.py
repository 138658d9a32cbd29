"""The worker's HTTP views, read while the worker runs."""

from __future__ import annotations

import aiohttp
import pytest

from .conftest import Pipeline
from .test_pipeline import contact, new_id, request, setup_org

pytestmark = pytest.mark.e2e


async def test_credits_quote_and_decision_are_served_by_the_worker(pipeline: Pipeline) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=4)
    decided = await client.request(request(org, "bob", "export", [contact("c-1", "co-1")]))
    base = pipeline.http()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as response:
            assert response.status == 200
        async with http.get(f"{base}/v1/orgs/{org}/credits") as response:
            assert response.status == 200
            credits = await response.json()
        assert credits["remaining"] == 3
        assert credits["used"] == 1
        async with http.get(f"{base}/v1/orgs/{new_id('nobody')}/credits") as response:
            assert response.status == 404
            assert (await response.json())["code"] == "not_found"
        quote_body = {
            "org_id": org,
            "user_id": "bob",
            "action": "crm_push",
            "items": [contact("c-1"), {"type": "company", "id": "co-1"}, contact("c-2")],
        }
        async with http.post(f"{base}/v1/quote", json=quote_body) as response:
            assert response.status == 200
            quote = await response.json()
        assert quote["max_credits"] == 1
        assert quote["would_be_approved"] is True
        assert [i["outcome"] for i in quote["items"]] == [
            "free_repeat",
            "free_repeat",
            "would_charge",
        ]
        async with http.post(f"{base}/v1/quote", json={"org_id": org}) as response:
            assert response.status == 400
        path = f"{base}/v1/orgs/{org}/requests/{decided['request_id']}"
        async with http.get(path) as response:
            assert response.status == 200
            assert (await response.json())["credits_charged"] == 1

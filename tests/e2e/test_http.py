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
            # exactly the message the worker published on credits.charge.results,
            # with where its page of items is
            assert await response.json() == {
                **decided,
                "items_total": 1,
                "offset": 0,
                "limit": 1000,
                "next_offset": None,
                "credits_refunded": 0,
            }


async def test_reports_over_http_are_the_sums_of_the_published_results(
    pipeline: Pipeline,
) -> None:
    client = pipeline.clients["day0"]
    org = await setup_org(client, credits=5, members={"ana": "admin", "bob": "member"})
    bodies = [
        request(org, "bob", "export", [contact("c-1", "co-1"), contact("c-2")], reference={"n": 1}),
        request(org, "bob", "export", [contact("c-1"), {"type": "company", "id": "co-1"}]),
        request(org, "ana", "crm_push", [contact("c-2"), contact("c-3"), contact("c-3")]),
        request(org, "bob", "export", [contact(f"c-{n}") for n in range(4, 9)]),  # too many
        request(org, "eve", "export", [contact("c-9")]),  # not a member
    ]
    results = [await client.request(body) for body in bodies]
    assert [r["type"] for r in results] == ["charge.approved"] * 3 + ["charge.rejected"] * 2

    async with aiohttp.ClientSession(base_url=pipeline.http()) as http:
        async with http.get(f"/v1/orgs/{org}/usage") as response:
            assert response.status == 200
            usage = await response.json()
        async with http.get(
            f"/v1/orgs/{org}/users/bob/charges", params={"action": "export", "limit": "2"}
        ) as response:
            page1 = await response.json()
        async with http.get(
            f"/v1/orgs/{org}/users/bob/charges",
            params={"action": "export", "before": page1["next_before"]},
        ) as response:
            page2 = await response.json()

    def charged(user: str | None = None) -> int:
        return sum(r["credits_charged"] for r in results if user in (None, r["user_id"]))

    assert usage["totals"]["credits_used"] == charged() == 3
    assert usage["totals"]["requests"] == 3
    assert usage["totals"]["rejected"] == 2
    assert usage["totals"]["credits_saved"] == sum(
        1 for r in results for i in r["items"] if i["outcome"] == "free_repeat"
    )
    rows = {row["user_id"]: row for row in usage["users"]}
    assert rows["bob"]["credits_used"] == charged("bob")
    assert rows["ana"]["by_action"]["crm_push"]["credits_used"] == charged("ana")
    assert rows["eve"]["rejected"] == 1

    bob_exports = [r for r in reversed(results) if r["user_id"] == "bob"]
    history = page1["charges"] + page2["charges"]
    assert page2["next_before"] is None
    assert [h["request_id"] for h in history] == [r["request_id"] for r in bob_exports]
    for entry, result in zip(history, bob_exports, strict=True):
        # a history entry has items_by_outcome instead of the result's items and counts
        assert {k: v for k, v in entry.items() if k in result} == {
            k: v for k, v in result.items() if k not in ("items", "counts", "items_truncated")
        }
        assert entry["item_count"] == len(result["items"])
        assert {o: n for o, n in entry["items_by_outcome"].items() if n} == result["counts"]

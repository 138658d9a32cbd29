"""The read side of the API (reports, history, one decision, the quote) on a real Redis.

The report functions are called directly, not over HTTP. The decision clock starts in
the future on purpose: repeat windows are stored with ``PXAT``, so a clock behind
Redis's own would never keep a window open.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from creditgate.api import quotes, reports
from creditgate.api.errors import InvalidInput
from creditgate.api.reports import Cursor, HistoryQuery
from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.decisions import ChargeRecord, RequestView, charge_message, charge_result
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore

DAY_MS = 86_400_000
DAY0 = to_ms(datetime(2100, 3, 1, 9, 0, tzinfo=UTC))
_ids = itertools.count()


def day(n: float) -> int:
    return DAY0 + int(n * DAY_MS)


def contact(contact_id: str, company_id: str | None = None, **hints: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "contact", "id": contact_id, **hints}
    if company_id is not None:
        item["company_id"] = company_id
    return item


def company(company_id: str) -> dict[str, Any]:
    return {"type": "company", "id": company_id}


async def command(store: CreditStore, org: str, type_: str, **fields: Any) -> None:
    body = {"command_id": f"cmd-{next(_ids)}", "org_id": org, "type": type_, **fields}
    (answer,) = await store.apply_commands([license_command_adapter.validate_python(body)], DAY0)
    assert answer.record.applied, answer.record


async def make_org(store: CreditStore, credits: int, *, period_id: str = "p1") -> str:
    org = f"org-{next(_ids)}"
    await command(
        store,
        org,
        "license.start_period",
        period_id=period_id,
        starts_at=rfc3339(DAY0),
        ends_at=rfc3339(day(365)),
        credits=credits,
    )
    for user, role in (("admin", "admin"), ("u1", "member"), ("u2", "member")):
        await command(store, org, "member.upsert", user_id=user, role=role)
    return org


def body(org: str, items: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"org_id": org, "user_id": "u1", "action": "export", "items": items, **fields}


def strip_hints(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in i.items() if k != quotes.VERIFIED_HINT} for i in items]


def charge_request(org: str, items: list[dict[str, Any]], now: int, **fields: Any) -> ChargeRequest:
    return ChargeRequest.model_validate(
        {
            "request_id": fields.pop("request_id", f"req-{next(_ids)}"),
            "requested_at": rfc3339(now),
            **body(org, strip_hints(items), **fields),
        }
    )


async def charge(
    store: CreditStore, org: str, items: list[dict[str, Any]], now: int, **fields: Any
) -> ChargeRecord:
    request = charge_request(org, items, now, **fields)
    (answer,) = await store.charge_many([ChargeCall.of(request)], now)
    assert answer.status == "decided"
    return answer.record


async def remaining(store: CreditStore, org: str) -> int:
    credits = await store.credits(org, DAY0)
    assert credits is not None
    return int(credits["remaining"])


async def quote_then_charge(
    store: CreditStore, org: str, items: list[dict[str, Any]], now: int, **fields: Any
) -> tuple[dict[str, Any], ChargeRecord]:
    """Quote twice (identical, nothing changes), then charge the same request."""
    before = await remaining(store, org)
    first = await quotes.quote(store, body(org, items, **fields), now)
    second = await quotes.quote(store, body(org, items, **fields), now)
    assert first == second
    assert await remaining(store, org) == before
    assert first["remaining"] == before
    request = charge_request(org, items, now, **fields)
    (answer,) = await store.charge_many([ChargeCall.of(request)], now)
    record = answer.record
    assert first["would_be_approved"] == record.approved
    assert first["reason"] == (record.reason.value if record.reason else None)
    assert first["max_credits"] == record.needed
    assert first["credits_if_submitted_now"] == record.credits
    assert [i["if_submitted_now"] for i in first["items"]] == [o.value for o in record.outcomes]
    assert first["message"] == charge_message(RequestView.of(request), record, 30)
    if record.approved:
        expected = [quotes.QUOTE_OUTCOMES[o] for o in record.outcomes]
        assert [i["outcome"] for i in first["items"]] == expected
    return first, record


# ---- quote ---------------------------------------------------------------------------


async def test_quote_matches_charge_with_free_repeats_and_duplicates(store: CreditStore) -> None:
    org = await make_org(store, 10)
    await charge(store, org, [contact("c1", "co1")], DAY0)

    items = [contact("c1"), company("co1"), contact("c2"), contact("c2"), company("co2")]
    quoted, record = await quote_then_charge(store, org, items, day(1))

    assert [i["outcome"] for i in quoted["items"]] == [
        "free_repeat",
        "free_repeat",
        "would_charge",
        "duplicate_in_request",
        "would_charge",
    ]
    assert quoted["items"][0]["free_until"] == rfc3339(day(30))
    assert quoted["items"][1]["free_until"] == rfc3339(day(30))
    assert quoted["max_credits"] == 2 == record.credits
    assert quoted["would_be_approved"] is True
    assert quoted["remaining"] == 9
    assert await remaining(store, org) == 7


async def test_quote_matches_insufficient_and_itemises(store: CreditStore) -> None:
    org = await make_org(store, 2)
    await charge(store, org, [contact("c1")], DAY0)

    items = [contact("c1"), contact("c2"), contact("c3")]
    quoted, record = await quote_then_charge(store, org, items, day(1))

    assert record.approved is False
    assert quoted["reason"] == "insufficient_credits"
    assert quoted["max_credits"] == 2 == record.needed
    assert quoted["remaining"] == 1
    # the rejection still shows which items are free and which would be charged
    assert [i["outcome"] for i in quoted["items"]] == [
        "free_repeat",
        "would_charge",
        "would_charge",
    ]


async def test_quote_matches_partial(store: CreditStore) -> None:
    org = await make_org(store, 2)
    items = [contact("c1"), contact("c2"), contact("c3")]
    quoted, record = await quote_then_charge(store, org, items, day(1), on_insufficient="partial")
    assert record.approved is True
    assert record.credits == 2
    assert quoted["max_credits"] == 3
    assert [i["outcome"] for i in quoted["items"]] == ["would_charge"] * 3
    assert await remaining(store, org) == 0


async def test_quote_matches_exceeds_max_credits(store: CreditStore) -> None:
    org = await make_org(store, 10)
    items = [contact("c1"), contact("c2"), company("co3")]
    quoted, record = await quote_then_charge(store, org, items, day(1), max_credits=2)
    assert record.approved is False
    assert quoted["reason"] == "exceeds_max_credits"
    assert quoted["max_credits"] == 3
    assert await remaining(store, org) == 10
    # and under a ceiling it respects, the quote and the charge agree too
    quoted, record = await quote_then_charge(store, org, items, day(1), max_credits=3)
    assert record.approved
    assert record.credits == 3


async def test_quote_matches_disallowed(store: CreditStore) -> None:
    org = await make_org(store, 10)
    await command(
        store, org, "member.set_credits_allowed", user_id="u1", allowed=False, set_by="admin"
    )
    quoted, record = await quote_then_charge(store, org, [contact("c1")], day(1))
    assert record.approved is False
    assert quoted["reason"] == "credits_disallowed"
    assert [i["outcome"] for i in quoted["items"]] == ["no_charge"]
    assert quoted["max_credits"] == 0


async def test_quote_email_verification_and_verified_hints(store: CreditStore) -> None:
    org = await make_org(store, 10)
    quoted, _ = await quote_then_charge(
        store,
        org,
        [contact("c1")],
        day(1),
        action="email_verification",
        verified_email_found=False,
    )
    assert [i["outcome"] for i in quoted["items"]] == ["no_charge"]
    assert quoted["max_credits"] == 0

    items = [
        contact("c1", has_verified_email=True),
        contact("c2", has_verified_email=False),
        contact("c3"),
        contact("c4", has_verified_email=True),
    ]
    await charge(store, org, [contact("c4")], day(2))
    quoted, _ = await quote_then_charge(store, org, items, day(3))
    assert quoted["max_credits"] == 3
    # c4 is free within its window, so only c1 counts
    assert quoted["max_credits_verified_only"] == 1
    assert quoted["items"][0][quotes.VERIFIED_HINT] is True
    assert quoted["items"][1][quotes.VERIFIED_HINT] is False
    assert quotes.VERIFIED_HINT not in quoted["items"][2]


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"request_id": "r-1"}, "request_id"),
        ({"items": []}, "items"),
        ({"items": [{"type": "contact", "id": "c 1"}]}, "items.0.contact.id"),
        ({"items": [contact("c1", has_verified_email="yes")]}, "items.0.has_verified_email"),
        ({"action": "print"}, "action"),
        ({"surprise": 1}, "surprise"),
    ],
)
async def test_quote_rejects_invalid_bodies(
    store: CreditStore, given: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        await quotes.quote(store, {**body("org-x", [contact("c1")]), **given}, DAY0)
    assert field in [e["field"] for e in raised.value.errors]


async def test_quote_rejects_too_many_items(store: CreditStore) -> None:
    with pytest.raises(InvalidInput):
        await quotes.quote(store, body("org-x", [contact("c1")] * 3), DAY0, max_items=2)


async def test_quote_itemises_duplicates_when_nothing_is_left(store: CreditStore) -> None:
    org = await make_org(store, 1)
    await charge(store, org, [contact("c0")], day(1))
    items = [contact("c1"), contact("c1", "co1"), company("co2"), company("co2")]
    quoted, record = await quote_then_charge(store, org, items, day(2))
    assert record.reason is not None
    assert record.reason.value == "insufficient_credits"
    assert [i["outcome"] for i in quoted["items"]] == [
        "would_charge",
        "duplicate_in_request",
        "would_charge",
        "duplicate_in_request",
    ]
    assert quoted["max_credits"] == 2
    assert quoted["remaining"] == 0


# ---- usage ---------------------------------------------------------------------------


async def test_usage_report_sums_the_charges_of_the_period(store: CreditStore) -> None:
    org = await make_org(store, 20)
    charged = 0
    charged += (await charge(store, org, [contact("c1"), contact("c2")], day(1))).credits
    charged += (await charge(store, org, [contact("c1"), contact("c3")], day(2))).credits
    charged += (
        await charge(store, org, [contact("c9")], day(2), user_id="u2", action="crm_push")
    ).credits
    charged += (await charge(store, org, [contact("c3")], day(3), action="crm_push")).credits
    rejected = await charge(store, org, [contact("c4")] * 1, day(3), max_credits=0)
    assert not rejected.approved

    report = await reports.usage_report(store, org, None, day(3))
    assert report is not None
    assert report["period_id"] == "p1"
    totals = report["totals"]
    assert totals["credits_used"] == charged == 4
    assert {a: c["credits_used"] for a, c in totals["by_action"].items()} == {
        "crm_push": 1,
        "email_verification": 0,
        "export": 3,
    }
    assert totals["credits_saved"] == 2
    assert totals["rejected"] == 1
    assert totals["requests"] == 4
    by_user = {row["user_id"]: row for row in report["users"]}
    assert [row["user_id"] for row in report["users"]] == ["u1", "u2"]  # most credits first
    assert by_user["u1"]["credits_used"] == 3
    assert by_user["u1"]["by_action"]["export"] == {
        "credits_used": 3,
        "requests": 2,
        "credits_saved": 1,
        "rejected": 1,
        "credits_refunded": 0,
        "credits_held": 0,
    }
    assert by_user["u1"]["by_action"]["crm_push"]["credits_used"] == 0
    assert by_user["u1"]["credits_saved"] == 2
    assert by_user["u1"]["requests"] == 3
    assert by_user["u1"]["rejected"] == 1
    assert by_user["u2"]["credits_used"] == 1
    credits = await store.credits(org, day(3))
    assert credits is not None
    assert credits["used"] == charged

    # a new period restarts the report; the old one stays readable by its id
    await command(
        store,
        org,
        "license.start_period",
        period_id="p2",
        starts_at=rfc3339(day(4)),
        ends_at=rfc3339(day(400)),
        credits=5,
    )
    fresh = await reports.usage_report(store, org, None, day(5))
    assert fresh is not None
    assert fresh["period_id"] == "p2"
    assert fresh["users"] == []
    assert fresh["totals"]["credits_used"] == 0
    old = await reports.usage_report(store, org, "p1", day(5))
    assert old is not None
    assert old["totals"]["credits_used"] == charged
    assert old["current_period"] is False


async def test_usage_report_of_an_org_without_license(store: CreditStore) -> None:
    assert await reports.usage_report(store, "no-such-org", None, DAY0) is None
    assert await reports.usage_report(store, "no-such-org", "p1", DAY0) is None


# ---- history and single decisions ------------------------------------------------------


def history(action: str = "export", limit: int = 50, before: str | None = None) -> HistoryQuery:
    return HistoryQuery(Action(action), limit, Cursor.parse(before) if before else None)


async def test_charge_history_newest_first_with_paging(store: CreditStore) -> None:
    org = await make_org(store, 1)
    for n in range(5):
        await charge(
            store,
            org,
            [contact(f"c{n}")],
            day(1) + n * 1000,
            request_id=f"h-{n}",
            reference={"export_id": f"e-{n}"},
        )
    await charge(store, org, [contact("x")], day(1), action="crm_push", request_id="other")

    page = await reports.charge_history(store, org, "u1", history(limit=2), 30)
    assert page is not None
    assert [c["request_id"] for c in page["charges"]] == ["h-4", "h-3"]
    assert page["next_before"] == f"{day(1) + 3000}:h-3"
    page2 = await reports.charge_history(
        store, org, "u1", history(limit=2, before=page["next_before"]), 30
    )
    assert page2 is not None
    assert [c["request_id"] for c in page2["charges"]] == ["h-2", "h-1"]
    page3 = await reports.charge_history(
        store, org, "u1", history(limit=2, before=page2["next_before"]), 30
    )
    assert page3 is not None
    assert [c["request_id"] for c in page3["charges"]] == ["h-0"]
    assert page3["next_before"] is None
    by_time = await reports.charge_history(store, org, "u1", history(before=str(day(1) + 2000)), 30)
    assert by_time is not None
    assert [c["request_id"] for c in by_time["charges"]] == ["h-1", "h-0"]

    first = page3["charges"][0]
    assert first["type"] == "charge.approved"
    assert first["credits_charged"] == 1
    assert first["item_count"] == 1
    assert first["items_by_outcome"]["charged"] == 1
    assert first["decided_at"] == rfc3339(day(1))
    assert first["reference"] == {"export_id": "e-0"}
    assert first["user_id"] == "u1"
    assert first["action"] == "export"
    later = page["charges"][0]
    assert later["type"] == "charge.rejected"
    assert later["reason"] == "insufficient_credits"
    assert later["items_by_outcome"]["not_charged"] == 1
    assert later["message"] == "the request needs 1 credit, 0 left"

    pushes = await reports.charge_history(store, org, "u1", history("crm_push", 10), 30)
    assert pushes is not None
    assert [c["request_id"] for c in pushes["charges"]] == ["other"]
    nobody = await reports.charge_history(store, org, "u2", history(limit=10), 30)
    assert nobody is not None
    assert nobody["charges"] == []
    assert await reports.charge_history(store, "no-such-org", "u1", history(), 30) is None


async def test_charge_history_pages_through_decisions_of_one_instant(store: CreditStore) -> None:
    """A batch decides many requests at one instant: no page boundary may lose one."""
    org = await make_org(store, 100)
    requests = [
        charge_request(org, [contact(f"c{n}")], day(1), request_id=f"same-{n:02d}")
        for n in range(7)
    ]
    await store.charge_many([ChargeCall.of(r) for r in requests], day(1))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await reports.charge_history(store, org, "u1", history(limit=3, before=cursor), 30)
        assert page is not None
        seen.extend(c["request_id"] for c in page["charges"])
        cursor = page["next_before"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(r.request_id for r in requests)
    assert len(seen) == len(set(seen))


def test_history_query_parsing() -> None:
    assert reports.parse_history_query({"action": "export"}) == history()
    assert reports.parse_history_query(
        {"action": "crm_push", "limit": "5", "before": "9:r-1"}
    ) == HistoryQuery(Action.CRM_PUSH, 5, Cursor(9, "r-1"))
    with pytest.raises(InvalidInput) as raised:
        reports.parse_history_query({"limit": "0", "before": "x"})
    assert {e["field"] for e in raised.value.errors} == {"action", "limit", "before"}
    for bad in ({"limit": "501"}, {"limit": "-1"}, {"before": "1:not an id"}, {"action": "x"}):
        with pytest.raises(InvalidInput):
            reports.parse_history_query({"action": "export", **bad})


async def test_one_decision_is_the_published_result(store: CreditStore) -> None:
    org = await make_org(store, 10)
    await charge(store, org, [contact("c1")], day(1))
    request = charge_request(
        org,
        [contact("c1"), contact("c2", "co2")],
        day(2),
        request_id="r-42",
        reference={"export_id": "e-55"},
    )
    (answer,) = await store.charge_many([ChargeCall.of(request)], day(2))
    expected = charge_result(RequestView.of(request), answer.record, 30)

    found = await reports.one_decision(store, org, "r-42", 30)
    # the published result, and where its items' page is
    assert found == {
        **expected,
        "items_total": 2,
        "offset": 0,
        "limit": 1000,
        "next_offset": None,
        "credits_refunded": 0,
    }
    assert found["counts"] == {"charged": 1, "free_repeat": 1}
    assert found["items_truncated"] is False
    assert found["credits_charged"] == 1
    assert found["reference"] == {"export_id": "e-55"}
    assert found["items"] == [
        {"type": "contact", "id": "c1", "outcome": "free_repeat", "free_until": rfc3339(day(31))},
        {"type": "contact", "id": "c2", "company_id": "co2", "outcome": "charged"},
    ]
    assert await reports.one_decision(store, org, "r-unknown", 30) is None
    assert await reports.one_decision(store, "other-org", "r-42", 30) is None
    assert await reports.one_decision(store, org, "not an id", 30) is None


def long_id(tag: str, n: int) -> str:
    head = f"{tag}{n}:"
    return head + "x" * (128 - len(head))


async def test_one_decision_pages_every_item_of_a_10000_item_decision(store: CreditStore) -> None:
    org = await make_org(store, 20_000)
    # 1,000 contacts exported before come back free: the other 9,000 are charged
    before = [contact(long_id("c", i), long_id("co", i)) for i in range(1000)]
    await charge(store, org, before, day(1))
    items = [contact(long_id("c", i), long_id("co", i)) for i in range(10_000)]
    request = charge_request(org, items, day(2), request_id="r-big")
    (answer,) = await store.charge_many([ChargeCall.of(request)], day(2))
    published = charge_result(RequestView.of(request), answer.record, 30)
    # the published result lists the 1,000 free items only
    assert published["counts"] == {"charged": 9000, "free_repeat": 1000}
    assert published["items_truncated"] is True
    assert [i["id"] for i in published["items"]] == [i["id"] for i in before]

    pages, offset = [], 0
    while offset is not None:
        page = await reports.one_decision(store, org, "r-big", 30, reports.ItemsPage(offset, 1000))
        assert page is not None
        assert page["counts"] == {"charged": 9000, "free_repeat": 1000}
        assert page["items_total"] == 10_000
        assert len(page["items"]) == 1000
        assert page["items_truncated"] is True
        pages.append(page)
        offset = page["next_offset"]
    assert len(pages) == 10
    listed = [i for page in pages for i in page["items"]]
    assert [i["id"] for i in listed] == [i["id"] for i in items]
    assert [i["outcome"] for i in listed] == ["free_repeat"] * 1000 + ["charged"] * 9000
    assert all(i["company_id"] == long_id("co", n) for n, i in enumerate(listed))
    last = await reports.one_decision(store, org, "r-big", 30, reports.ItemsPage(9990, 1000))
    assert last is not None
    assert len(last["items"]) == 10
    assert last["next_offset"] is None


def test_an_items_page_is_bounded() -> None:
    assert reports.parse_items_page({}) == reports.ItemsPage(0, 1000)
    assert reports.parse_items_page({"offset": "5", "limit": "7"}) == reports.ItemsPage(5, 7)
    for bad in ({"limit": "1001"}, {"limit": "0"}, {"offset": "-1"}, {"offset": "x"}):
        with pytest.raises(InvalidInput):
            reports.parse_items_page(bad)

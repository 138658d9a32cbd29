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

from creditgate.api import reports
from creditgate.domain.charges import ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.decisions import ChargeRecord
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.store.gateway import ChargeCall, CreditStore

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
    return [{k: v for k, v in i.items() if k != reports.VERIFIED_HINT} for i in items]


async def charge(
    store: CreditStore, org: str, items: list[dict[str, Any]], now: int, **fields: Any
) -> ChargeRecord:
    request = ChargeRequest.model_validate(
        {
            "request_id": fields.pop("request_id", f"req-{next(_ids)}"),
            "requested_at": rfc3339(now),
            **body(org, strip_hints(items), **fields),
        }
    )
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
    first = await reports.quote(store, body(org, items, **fields), now)
    second = await reports.quote(store, body(org, items, **fields), now)
    assert first == second
    assert await remaining(store, org) == before
    assert first["remaining"] == before
    record = await charge(store, org, items, now, **fields)
    assert first["would_be_approved"] == record.approved
    assert first["reason"] == (record.reason.value if record.reason else None)
    if record.approved:
        assert first["max_credits"] == record.needed
        assert first["credits_if_submitted_now"] == record.credits
        expected = [reports.QUOTE_OUTCOMES[o] for o in record.outcomes]
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
    assert quoted["items"][0][reports.VERIFIED_HINT] is True


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
    with pytest.raises(reports.InvalidInput) as raised:
        await reports.quote(store, {**body("org-x", [contact("c1")]), **given}, DAY0)
    assert field in [e["field"] for e in raised.value.errors]


async def test_quote_rejects_too_many_items(store: CreditStore) -> None:
    with pytest.raises(reports.InvalidInput):
        await reports.quote(store, body("org-x", [contact("c1")] * 3), DAY0, max_items=2)


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
    assert totals["credits_by_action"] == {"crm_push": 1, "export": 3}
    assert totals["credits_saved"] == 2
    assert totals["rejected"] == 1
    assert totals["requests"] == 4
    by_user = {row["user_id"]: row for row in report["users"]}
    assert by_user["u1"]["credits_used"] == 3
    assert by_user["u1"]["credits_by_action"] == {"crm_push": 0, "export": 3}
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


# ---- history and single decisions ------------------------------------------------------


async def test_charge_history_newest_first_with_paging(store: CreditStore) -> None:
    org = await make_org(store, 1)
    ids = []
    for n in range(5):
        ids.append(f"h-{n}")
        await charge(store, org, [contact(f"c{n}")], day(1) + n * 1000, request_id=f"h-{n}")
    await charge(store, org, [contact("x")], day(1), action="crm_push", request_id="other")

    page = await reports.charge_history(store, org, "u1", "export", 2, None)
    assert [c["request_id"] for c in page["charges"]] == ["h-4", "h-3"]
    assert page["next_before"] == day(1) + 3000
    page2 = await reports.charge_history(store, org, "u1", "export", 2, page["next_before"])
    assert [c["request_id"] for c in page2["charges"]] == ["h-2", "h-1"]
    page3 = await reports.charge_history(store, org, "u1", "export", 2, page2["next_before"])
    assert [c["request_id"] for c in page3["charges"]] == ["h-0"]
    assert page3["next_before"] is None

    first = page3["charges"][0]
    assert first["status"] == "approved"
    assert first["credits_charged"] == 1
    assert first["items_by_outcome"]["charged"] == 1
    assert first["decided_at"] == rfc3339(day(1))
    assert first["reference"] is None
    later = page["charges"][0]
    assert later["status"] == "rejected"
    assert later["reason"] == "insufficient_credits"
    assert later["items_by_outcome"]["not_charged"] == 1

    pushes = await reports.charge_history(store, org, "u1", "crm_push", 10, None)
    assert [c["request_id"] for c in pushes["charges"]] == ["other"]
    nobody = await reports.charge_history(store, org, "u2", "export", 10, None)
    assert nobody["charges"] == []


def test_history_query_parsing() -> None:
    assert reports.parse_history_query({"action": "export"}) == ("export", 50, None)
    assert reports.parse_history_query({"action": "crm_push", "limit": "5", "before": "9"}) == (
        "crm_push",
        5,
        9,
    )
    with pytest.raises(reports.InvalidInput) as raised:
        reports.parse_history_query({"limit": "0", "before": "x"})
    assert {e["field"] for e in raised.value.errors} == {"action", "limit", "before"}


async def test_one_decision(store: CreditStore) -> None:
    org = await make_org(store, 10)
    await charge(store, org, [contact("c1")], day(1))
    record = await charge(store, org, [contact("c1"), contact("c2")], day(2), request_id="r-42")

    found = await reports.one_decision(store, org, "r-42")
    assert found is not None
    assert found["request_id"] == "r-42"
    assert found["status"] == "approved"
    assert found["credits_charged"] == 1
    assert found["sequence"] == record.sequence
    assert found["items"] == [
        {"index": 0, "outcome": "free_repeat", "free_until": rfc3339(day(31))},
        {"index": 1, "outcome": "charged"},
    ]
    assert await reports.one_decision(store, org, "r-unknown") is None
    assert await reports.one_decision(store, "other-org", "r-42") is None
    assert await reports.one_decision(store, org, "not an id") is None

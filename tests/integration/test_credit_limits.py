"""Per-user credit limits (DESIGN §1 "Per-user limits"), decided by the real scripts on a
real Redis: ``member.set_credit_limit`` by admins only, ``user_limit_reached`` on
charges (partial honoured), a notification once per period, the quote, and the limit
carried over to a new period; the team report showing each member's limit.

The organisations, the decision clock and the end-of-test invariant are
``test_charge_rules``'s.
"""

# the fixtures are test_charge_rules's, imported, and named again as test parameters
# ruff: noqa: F811
from __future__ import annotations

import csv
import io

from creditgate.api.csv_rows import team_csv
from creditgate.api.quotes import quote
from creditgate.api.reports import team_report
from creditgate.store.gateway import CreditStore
from tests.integration.test_charge_rules import (  # noqa: F401 - fixtures used by name
    Org,
    OrgFactory,
    contact,
    day,
    orgs,
    store,
)


async def set_limit(org: Org, user_id: str, limit: int | None, set_by: str = "admin") -> str:
    """The command's outcome: "applied" or its reason."""
    answer = await org.command(
        "member.set_credit_limit", user_id=user_id, limit=limit, set_by=set_by
    )
    assert answer.status == "decided"
    return "applied" if answer.record.applied else str(answer.record.reason)


def items(*ids: str) -> list[dict[str, str]]:
    return [contact(i) for i in ids]


async def test_a_member_is_refused_past_their_limit_and_others_are_not(orgs: OrgFactory) -> None:
    org = await orgs(credits=100, members={"u1": "member", "u2": "member", "admin": "admin"})
    assert await set_limit(org, "u1", 3) == "applied"

    first = await org.charge(items("c1", "c2"), now=day(1))
    over = await org.charge(items("c3", "c4"), now=day(1))
    other = await org.charge(items("c5", "c6", "c7", "c8"), now=day(1), user="u2")
    last = await org.charge(items("c9"), now=day(1))

    assert first.result["type"] == "charge.approved"
    assert first.record.limit_left == 1
    assert over.result["type"] == "charge.rejected"
    assert over.result["reason"] == "user_limit_reached"
    assert over.result["credits_charged"] == 0
    assert (
        over.result["message"]
        == "the request needs 2 credits, u1 has 1 left of a limit of 3 this period"
    )
    assert other.result["type"] == "charge.approved"  # u2 has no limit
    assert last.result["type"] == "charge.approved"  # exactly up to the limit
    assert last.record.limit_left == 0
    assert await org.balance() == 100 - 2 - 4 - 1


async def test_partial_charges_what_the_limit_and_the_balance_both_cover(
    orgs: OrgFactory,
) -> None:
    org = await orgs(credits=10)
    assert await set_limit(org, "u1", 3) == "applied"

    cut = await org.charge(
        items("c1", "c2", "c3", "c4", "c5"), now=day(1), on_insufficient="partial"
    )
    nothing = await org.charge(items("c6"), now=day(1), on_insufficient="partial")
    free = await org.charge(items("c1", "c7"), now=day(1), on_insufficient="partial")

    assert cut.outcomes == ["charged"] * 3 + ["not_charged"] * 2
    assert cut.result["credits_charged"] == 3
    assert "not charged: the credit limit ran out" in cut.result["message"]
    assert nothing.result["reason"] == "user_limit_reached"
    # a free repeat costs nothing of the limit either
    assert free.outcomes == ["free_repeat", "not_charged"]
    assert await org.balance() == 7


async def test_the_member_and_the_admins_are_told_once_per_period(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    assert await set_limit(org, "u1", 1) == "applied"
    await org.charge(items("c1"), now=day(1))

    first = await org.charge(items("c2"), now=day(1))
    again = await org.charge(items("c3"), now=day(1))
    await org.start_period(10, period_id="p2", starts=day(2), now=day(2))
    next_period = await org.charge(items("c4", "c5"), now=day(3))

    reached = ("credits.user_limit_reached", "u1", None)
    to_admins = ("credits.user_limit_reached", "admin", None)
    assert first.notes == [reached, to_admins]
    assert again.notes == []
    # the limit carried over to p2, and the notification comes again there
    assert next_period.result["reason"] == "user_limit_reached"
    assert next_period.notes == [reached, to_admins]


async def test_only_an_admin_sets_a_limit_of_a_member_and_null_lifts_it(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    assert await set_limit(org, "u1", 0, set_by="u1") == "not_an_admin"
    assert await set_limit(org, "stranger", 0) == "not_a_member"
    assert (await org.charge(items("c1"), now=day(1))).result["type"] == "charge.approved"
    assert await set_limit(org, "u1", 0) == "applied"
    assert (await org.charge(items("c2"), now=day(1))).result["reason"] == "user_limit_reached"
    assert await set_limit(org, "u1", None) == "applied"
    assert (await org.charge(items("c2"), now=day(1))).result["type"] == "charge.approved"


async def test_the_quote_says_the_limit_would_refuse_and_what_is_left(
    orgs: OrgFactory, store: CreditStore
) -> None:
    org = await orgs(credits=10)
    assert await set_limit(org, "u1", 2) == "applied"
    await org.charge(items("c1"), now=day(1))
    body = {
        "org_id": org.org_id,
        "user_id": "u1",
        "action": "export",
        "items": items("c1", "c2", "c3"),
    }

    quoted = await quote(store, body, day(1))

    assert quoted["would_be_approved"] is False
    assert quoted["reason"] == "user_limit_reached"
    assert quoted["credit_limit"] == 2
    assert quoted["limit_left"] == 1
    assert [i["outcome"] for i in quoted["items"]] == [
        "free_repeat",
        "would_charge",
        "would_charge",
    ]
    assert quoted["max_credits"] == 2


async def test_the_team_shows_each_members_limit(orgs: OrgFactory, store: CreditStore) -> None:
    org = await orgs(credits=100, members={"u1": "member", "u2": "member", "admin": "admin"})
    assert await set_limit(org, "u1", 3) == "applied"
    assert await set_limit(org, "u2", 0) == "applied"

    team = await team_report(store, org.org_id, day(1))
    assert team is not None
    assert {m["user_id"]: m["credit_limit"] for m in team["members"]} == {
        "admin": None,
        "u1": 3,
        "u2": 0,
    }
    rows = list(csv.DictReader(io.StringIO(team_csv(team), newline="")))
    assert {r["user_id"]: r["credit_limit"] for r in rows} == {"admin": "", "u1": "3", "u2": "0"}
    # lifted: no limit again
    assert await set_limit(org, "u1", None) == "applied"
    after = await team_report(store, org.org_id, day(1))
    assert after is not None
    assert {m["user_id"]: m["credit_limit"] for m in after["members"]}["u1"] is None

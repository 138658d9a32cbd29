"""Refunds (DESIGN §1 "Refunds"), by the real command script on a real Redis: credits of
charged items back to the balance, each item at most once, the repeat window closed
when the refunded request opened it, only in the current period; in the ledger entry,
the notification and the reports.

The organisations, the decision clock and the end-of-test invariant are
``test_charge_rules``'s; a refund takes its credits off the organisation's running
total, so the invariant checked is credits + grants - balance = charged - refunded.
"""

# the fixtures are test_charge_rules's, imported, and named again as test parameters
# ruff: noqa: F811
from __future__ import annotations

from typing import Any

from creditgate.api.reports import one_decision, usage_report
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.license_events import (
    CommandView,
    command_ledger_entry,
    command_notifications,
    license_event,
)
from creditgate.store.calls import CommandAnswer
from creditgate.store.gateway import CreditStore
from creditgate.stream.decider import aim_refunds
from tests.integration.test_charge_rules import (  # noqa: F401 - fixtures used by name
    Org,
    OrgFactory,
    company,
    contact,
    day,
    orgs,
    store,
)


async def refund(
    org: Org, request_id: str, items: list[dict[str, Any]] | None = None, *, now: int | None = None
) -> tuple[CommandAnswer, dict[str, Any]]:
    """A ``charge.refund`` as the worker applies it (the stored request read first); the
    answer and the command's body."""
    body: dict[str, Any] = {
        "command_id": org.next_id("refund"),
        "org_id": org.org_id,
        "type": "charge.refund",
        "request_id": request_id,
        "reason": "the CRM refused the push",
        "refunded_by": "cs-1",
    }
    if items is not None:
        body["items"] = [{"type": i["type"], "id": i["id"]} for i in items]
    command = license_command_adapter.validate_python(body)
    (aimed,) = await aim_refunds(org.store, [command])
    (answer,) = await org.store.apply_commands([aimed], now or org.last_now)
    if answer.record.applied:
        org.charged -= answer.record.delta
    return answer, command.model_dump(mode="json")


def view_of(org: Org, body: dict[str, Any], windows: tuple[str, ...] = ()) -> CommandView:
    return CommandView(org.org_id, body["command_id"], "charge.refund", body, windows=windows)


async def test_a_refund_gives_each_charged_item_back_once(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    pushed = await org.charge(
        [contact("c1"), contact("c2"), contact("c3"), contact("c1")], now=day(1), action="crm_push"
    )
    assert pushed.record.credits == 3

    first, body = await refund(org, pushed.request.request_id, [contact("c1"), contact("c9")])
    again, _ = await refund(org, pushed.request.request_id, [contact("c1")])
    rest, _ = await refund(org, pushed.request.request_id)
    none_left, _ = await refund(org, pushed.request.request_id)

    assert first.record.applied
    assert first.record.delta == 1  # c1 once (its duplicate was never charged), c9 unknown
    assert first.record.balance == 8
    assert license_event(view_of(org, body), first.record)["message"].startswith(
        "1 credit of request"
    )
    assert not again.record.applied
    assert again.record.reason == "nothing_to_refund"
    assert again.record.raw["already"] == [1]
    assert rest.record.applied
    assert rest.record.delta == 2
    assert none_left.record.reason == "nothing_to_refund"
    assert await org.balance() == 10


async def test_the_window_closes_when_the_refunded_request_opened_it(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    opened = await org.charge([contact("c1", "co1"), contact("c2")], now=day(1))
    reused = await org.charge([contact("c2")], now=day(2))
    assert reused.outcomes == ["free_repeat"]

    # a free repeat charged nothing: nothing to refund, and c2's window stays
    free, _ = await refund(org, reused.request.request_id)
    done, body = await refund(org, opened.request.request_id, [contact("c1")])
    after = await org.charge([contact("c1"), company("co1"), contact("c2")], now=day(3))

    assert free.record.reason == "nothing_to_refund"
    assert done.record.applied
    entry = command_ledger_entry(
        view_of(org, body, ("contact:c1", "company:co1", "contact:c2")), done.record
    )
    assert entry["kind"] == "refunded"
    assert entry["windows_closed"] == ["contact:c1", "company:co1"]
    # the data of c1 (and its company) never went out: charged again; c2 still free
    assert after.outcomes == ["charged", "charged", "free_repeat"]


async def test_a_window_another_item_still_uses_stays_open(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    both = await org.charge([contact("c1", "co1"), contact("c2", "co1")], now=day(1))

    await refund(org, both.request.request_id, [contact("c1")])
    after = await org.charge([contact("c1"), company("co1")], now=day(2))

    # co1's data went out with c2, which is not refunded
    assert after.outcomes == ["charged", "free_repeat"]


async def test_only_requests_of_the_current_period_are_refunded(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    old = await org.charge([contact("c1")], now=day(1))
    rejected = await org.charge([contact(f"x{i}") for i in range(20)], now=day(1))
    await org.start_period(10, period_id="p2", starts=day(2), now=day(2))

    ended, _ = await refund(org, old.request.request_id, now=day(3))
    unknown, _ = await refund(org, "never-sent", now=day(3))
    nothing, _ = await refund(org, rejected.request.request_id, now=day(3))

    assert ended.record.reason == "license_period_ended"
    assert unknown.record.reason == "request_not_found"
    assert nothing.record.reason == "nothing_to_refund"
    assert await org.balance() == 10


async def test_the_refund_is_told_and_reported(orgs: OrgFactory, store: CreditStore) -> None:
    org = await orgs(credits=10)
    pushed = await org.charge(
        [contact("c1"), contact("c2")], now=day(1), action="crm_push", user="u1"
    )
    done, body = await refund(org, pushed.request.request_id, [contact("c2")])

    (note,) = command_notifications(view_of(org, body), done.record)
    decision = await one_decision(store, org.org_id, pushed.request.request_id, 30)
    usage = await usage_report(store, org.org_id, None, day(1))

    assert note["type"] == "credits.refunded"
    assert note["recipient"] == {"user_id": "u1"}
    assert note["credits_refunded"] == 1
    assert note["reason"] == "the CRM refused the push"
    assert decision is not None
    assert [i["outcome"] for i in decision["items"]] == ["charged", "refunded"]
    assert decision["credits_refunded"] == 1
    assert decision["counts"] == {"charged": 1, "refunded": 1}
    assert usage is not None
    (row,) = usage["users"]
    assert (row["credits_used"], row["credits_refunded"]) == (2, 1)


async def test_a_refund_gives_the_member_their_limit_back(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    limit = await org.command("member.set_credit_limit", user_id="u1", limit=1, set_by="admin")
    assert limit.record.applied
    first = await org.charge([contact("c1")], now=day(1))
    refused = await org.charge([contact("c2")], now=day(1))
    await refund(org, first.request.request_id)
    allowed = await org.charge([contact("c2")], now=day(1))

    assert refused.result["reason"] == "user_limit_reached"
    assert allowed.result["type"] == "charge.approved"

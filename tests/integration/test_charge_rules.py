"""The charge rules of DESIGN §1, decided by the real charge script on a real Redis.

Every test works on its own key prefix and its own organisations, and moves the
decision clock explicitly (``now_ms``). Each organisation made through the ``orgs``
fixture keeps a running total of the credits its decisions reported as charged in
the current period; at the end of the test the fixture checks the invariant of
DESIGN §6 for it: period credits + grants - balance == credits charged this period.

The decision clock starts at a fixed day in the future on purpose: repeat windows are
stored with ``PXAT <window end>`` and Redis drops a key whose expiry time is already
behind *its own* clock, so a clock in the past would never keep a window open.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import orjson
import pytest

from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    charge_notifications,
    charge_result,
    conflict_result,
)
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.domain.intake import InvalidRequest, read_charge_request
from creditgate.settings import Settings
from creditgate.store.calls import ChargeAnswer, ChargeCall, CommandAnswer
from creditgate.store.gateway import CreditStore

WINDOW_DAYS = 30
DAY_MS = 86_400_000
DAY0 = to_ms(datetime(2100, 1, 4, 9, 0, tzinfo=UTC))
DEFAULT_MEMBERS = {"u1": "member", "admin": "admin"}


def day(n: float) -> int:
    """The decision clock ``n`` days after day 0."""
    return DAY0 + int(n * DAY_MS)


def contact(contact_id: str, company_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "contact", "id": contact_id}
    if company_id is not None:
        item["company_id"] = company_id
    return item


def company(company_id: str) -> dict[str, Any]:
    return {"type": "company", "id": company_id}


@dataclass(frozen=True)
class Charged:
    """One answer of the charge script, with the request it answered."""

    request: ChargeRequest
    answer: ChargeAnswer

    @property
    def status(self) -> str:
        return self.answer.status

    @property
    def record(self) -> ChargeRecord:
        return self.answer.record

    @property
    def result(self) -> dict[str, Any]:
        return charge_result(RequestView.of(self.request), self.record, WINDOW_DAYS)

    @property
    def outcomes(self) -> list[str]:
        return [item["outcome"] for item in self.result["items"]]

    @property
    def notes(self) -> list[tuple[str, str, int | None]]:
        """(type, recipient, threshold) of each notification the decision asks for."""
        return [
            (
                note["type"],
                note["recipient"].get("user_id") or note["recipient"]["role"],
                note.get("threshold_percent"),
            )
            for note in charge_notifications(RequestView.of(self.request), self.record)
        ]


@dataclass
class Org:
    """One organisation under test, and the credits charged in its current period."""

    store: CreditStore
    org_id: str
    charged: int = 0
    last_now: int = DAY0
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def next_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    # ---- license commands ----------------------------------------------------

    async def command(
        self, type_: str, *, now: int = DAY0, command_id: str | None = None, **fields: Any
    ) -> CommandAnswer:
        body = {
            "command_id": command_id or self.next_id("cmd"),
            "org_id": self.org_id,
            "type": type_,
            **fields,
        }
        command = license_command_adapter.validate_python(body)
        (answer,) = await self.store.apply_commands([command], now)
        if type_ == "license.start_period" and answer.status == "decided":
            self.charged = 0
        return answer

    async def start_period(
        self,
        credits: int,
        *,
        period_id: str = "p1",
        starts: int = DAY0,
        ends: int | None = None,
        now: int = DAY0,
    ) -> CommandAnswer:
        answer = await self.command(
            "license.start_period",
            now=now,
            period_id=period_id,
            starts_at=rfc3339(starts),
            ends_at=rfc3339(day(365) if ends is None else ends),
            credits=credits,
        )
        assert answer.record.applied, answer.record
        return answer

    async def upsert(self, user_id: str, role: str = "member", *, now: int = DAY0) -> None:
        answer = await self.command("member.upsert", now=now, user_id=user_id, role=role)
        assert answer.record.applied, answer.record

    async def grant(self, credits: int, *, grant_id: str = "g-1", now: int = DAY0) -> CommandAnswer:
        return await self.command(
            "credits.grant",
            now=now,
            grant_id=grant_id,
            credits=credits,
            reason="top-up",
            granted_by="cs-1",
        )

    async def set_allowed(
        self, user_id: str, allowed: bool, *, set_by: str = "admin", now: int = DAY0
    ) -> CommandAnswer:
        return await self.command(
            "member.set_credits_allowed", now=now, user_id=user_id, allowed=allowed, set_by=set_by
        )

    # ---- charges -------------------------------------------------------------

    def request(
        self,
        items: list[dict[str, Any]],
        *,
        now: int,
        user: str = "u1",
        action: str = "export",
        request_id: str | None = None,
        **fields: Any,
    ) -> ChargeRequest:
        return ChargeRequest.model_validate(
            {
                "request_id": request_id or self.next_id("req"),
                "org_id": self.org_id,
                "user_id": user,
                "action": action,
                "items": items,
                "requested_at": rfc3339(now),
                **fields,
            }
        )

    async def submit(self, request: ChargeRequest, now: int) -> Charged:
        (answer,) = await self.store.charge_many([ChargeCall.of(request)], now)
        if answer.status == "decided":
            self.charged += answer.record.credits
        self.last_now = max(self.last_now, now)
        return Charged(request, answer)

    async def charge(self, items: list[dict[str, Any]], *, now: int, **fields: Any) -> Charged:
        return await self.submit(self.request(items, now=now, **fields), now)

    async def verify(self, contact_id: str, found: bool, *, now: int, **fields: Any) -> Charged:
        return await self.charge(
            [contact(contact_id)],
            now=now,
            action="email_verification",
            verified_email_found=found,
            **fields,
        )

    # ---- reads ---------------------------------------------------------------

    async def balance(self) -> int:
        credits = await self.store.credits(self.org_id, self.last_now)
        assert credits is not None
        return int(credits["remaining"])

    async def check_invariant(self) -> None:
        credits = await self.store.credits(self.org_id, self.last_now)
        if credits is None:
            assert self.charged == 0
            return
        assert credits["remaining"] >= 0
        assert (
            credits["period_credits"] + credits["granted"] - credits["remaining"] == self.charged
        ), f"{self.org_id}: {credits} but {self.charged} credits charged this period"


@pytest.fixture
async def store(endpoints: tuple[str, str]) -> AsyncIterator[CreditStore]:
    settings = Settings(
        redis_url=endpoints[1],
        key_prefix=f"t-{uuid4().hex[:12]}",
        repeat_window_days=WINDOW_DAYS,
        threshold_percents=(80, 90, 100),
    )
    store = CreditStore.from_settings(settings)
    yield store
    keys = [
        key
        async for key in store.client_for_tests.scan_iter(
            match=f"{settings.key_prefix}:*", count=10_000
        )
    ]
    if keys:
        await store.client_for_tests.delete(*keys)
    await store.close()


OrgFactory = Callable[..., Any]


@pytest.fixture
async def orgs(store: CreditStore) -> AsyncIterator[OrgFactory]:
    """``await orgs(credits=10)``: a new organisation with members and, optionally, a period."""
    made: list[Org] = []

    async def make(
        credits: int | None = 10, members: dict[str, str] | None = None, now: int = DAY0
    ) -> Org:
        org = Org(store, f"org-{uuid4().hex[:10]}")
        made.append(org)
        for user_id, role in (DEFAULT_MEMBERS if members is None else members).items():
            await org.upsert(user_id, role, now=now)
        if credits is not None:
            await org.start_period(credits, now=now)
        return org

    yield make
    for org in made:
        await org.check_invariant()


# ---- costs ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["export", "crm_push"])
@pytest.mark.parametrize(
    "item",
    [contact("c-1"), contact("c-1", "co-9"), company("co-9")],
    ids=["contact", "contact-with-company", "company-alone"],
)
async def test_one_item_costs_one_credit(
    orgs: OrgFactory, action: str, item: dict[str, Any]
) -> None:
    org = await orgs(credits=10)

    charged = await org.charge([item], now=day(0), action=action)

    assert charged.status == "decided"
    assert charged.result["type"] == "charge.approved"
    assert charged.outcomes == ["charged"]
    assert charged.result["credits_charged"] == 1
    assert charged.result["balance_after"] == 9
    assert charged.result["reason"] is None
    assert charged.result["message"] == "1 credit charged"
    assert await org.balance() == 9


# ---- the 30-day repeat window -----------------------------------------------------------


async def test_window_is_anchored_at_the_first_charge(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    first = await org.charge([contact("c-1")], now=day(0))
    repeat = await org.charge([contact("c-1")], now=day(29), action="crm_push")
    after = await org.charge([contact("c-1")], now=day(31))

    assert first.outcomes == ["charged"]
    assert repeat.outcomes == ["free_repeat"]
    assert repeat.result["credits_charged"] == 0
    assert repeat.result["items"][0]["free_until"] == rfc3339(day(30))
    assert repeat.result["message"] == "0 credits charged, 1 item free within its 30-day window"
    assert after.outcomes == ["charged"]
    assert after.result["balance_after"] == 8


async def test_window_ends_exactly_thirty_days_after_the_charge(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    await org.charge([company("co-1")], now=day(0))
    last_free_moment = await org.charge([company("co-1")], now=day(30) - 1)
    at_the_end = await org.charge([company("co-1")], now=day(30))

    assert last_free_moment.outcomes == ["free_repeat"]
    assert at_the_end.outcomes == ["charged"]


async def test_a_free_repeat_does_not_extend_the_window(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    await org.charge([contact("c-1")], now=day(0))
    repeat = await org.charge([contact("c-1")], now=day(20))
    after = await org.charge([contact("c-1")], now=day(31))
    in_new_window = await org.charge([contact("c-1")], now=day(45))

    assert repeat.outcomes == ["free_repeat"]
    assert repeat.result["items"][0]["free_until"] == rfc3339(day(30))
    assert after.outcomes == ["charged"]
    # the charge at day 31 opened a new window, anchored at day 31
    assert in_new_window.outcomes == ["free_repeat"]
    assert in_new_window.result["items"][0]["free_until"] == rfc3339(day(61))
    assert await org.balance() == 8


@pytest.mark.parametrize(("first", "second"), [("export", "crm_push"), ("crm_push", "export")])
async def test_export_and_push_share_one_window(orgs: OrgFactory, first: str, second: str) -> None:
    org = await orgs(credits=10)

    one = await org.charge([contact("c-1", "co-1"), company("co-2")], now=day(0), action=first)
    two = await org.charge([contact("c-1", "co-1"), company("co-2")], now=day(1), action=second)

    assert one.result["credits_charged"] == 2
    assert two.outcomes == ["free_repeat", "free_repeat"]
    assert two.result["credits_charged"] == 0
    assert await org.balance() == 8


async def test_windows_are_per_organisation(orgs: OrgFactory) -> None:
    acme, globex = await orgs(credits=10), await orgs(credits=10)

    await acme.charge([contact("c-1")], now=day(0))
    other = await globex.charge([contact("c-1")], now=day(1))

    assert other.outcomes == ["charged"]


async def test_a_contact_exported_with_its_company_opens_the_company_window(
    orgs: OrgFactory,
) -> None:
    org = await orgs(credits=10)

    with_company = await org.charge([contact("c-1", "co-9")], now=day(0))
    company_only = await org.charge([company("co-9")], now=day(5), action="crm_push")
    other_contact = await org.charge([contact("c-2", "co-9")], now=day(6))

    assert with_company.result["credits_charged"] == 1
    assert company_only.outcomes == ["free_repeat"]
    assert company_only.result["items"][0]["free_until"] == rfc3339(day(30))
    # the company window does not make another contact of that company free
    assert other_contact.outcomes == ["charged"]
    assert await org.balance() == 8


async def test_a_company_export_opens_no_contact_window(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    await org.charge([company("co-9")], now=day(0))
    contact_of_it = await org.charge([contact("c-1", "co-9")], now=day(1))

    assert contact_of_it.outcomes == ["charged"]
    assert contact_of_it.result["credits_charged"] == 1
    assert await org.balance() == 8


# ---- email verification --------------------------------------------------------------


async def test_verification_without_a_verified_email_costs_nothing(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    not_found = await org.verify("c-1", found=False, now=day(0))
    found = await org.verify("c-1", found=True, now=day(1))

    assert not_found.result["type"] == "charge.approved"
    assert not_found.outcomes == ["no_verified_email"]
    assert not_found.result["credits_charged"] == 0
    assert not_found.result["balance_after"] == 10
    assert not_found.result["message"] == "0 credits charged, no verified email found"
    # a verification that found nothing opens no window
    assert found.outcomes == ["charged"]
    assert found.result["balance_after"] == 9


async def test_a_second_verification_within_the_window_is_free(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    first = await org.verify("c-1", found=True, now=day(0))
    second = await org.verify("c-1", found=True, now=day(29))
    after = await org.verify("c-1", found=True, now=day(31))

    assert first.outcomes == ["charged"]
    assert first.result["credits_charged"] == 1
    assert second.outcomes == ["free_repeat"]
    assert second.result["items"][0]["free_until"] == rfc3339(day(30))
    assert after.outcomes == ["charged"]
    assert await org.balance() == 8


async def test_verification_has_its_own_window(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    await org.charge([contact("c-1")], now=day(0))
    verify_after_export = await org.verify("c-1", found=True, now=day(1))
    await org.verify("c-2", found=True, now=day(2))
    export_after_verify = await org.charge([contact("c-2")], now=day(3), action="crm_push")

    assert verify_after_export.outcomes == ["charged"]
    assert export_after_verify.outcomes == ["charged"]
    assert await org.balance() == 6


# ---- one request ------------------------------------------------------------------------


async def test_duplicates_inside_one_request_are_charged_once(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    charged = await org.charge(
        [contact("c-1"), contact("c-1"), company("co-3"), company("co-3")], now=day(0)
    )

    assert charged.outcomes == [
        "charged",
        "duplicate_in_request",
        "charged",
        "duplicate_in_request",
    ]
    assert charged.result["credits_charged"] == 2
    assert charged.result["balance_after"] == 8
    assert charged.result["message"] == "2 credits charged, 2 duplicates in the request"


async def test_max_credits_is_a_ceiling(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    over = await org.charge([contact("c-1"), contact("c-2")], now=day(0), max_credits=1)

    assert over.result["type"] == "charge.rejected"
    assert over.result["reason"] == "exceeds_max_credits"
    assert over.outcomes == ["not_charged", "not_charged"]
    assert over.result["credits_charged"] == 0
    assert over.result["balance_after"] == 10
    assert over.result["message"] == "the request needs 2 credits, more than its max_credits of 1"
    assert await org.balance() == 10
    # the rejection opened no window: c-1 is charged next time
    again = await org.charge([contact("c-1")], now=day(1), max_credits=1)
    assert again.outcomes == ["charged"]


async def test_max_credits_counts_only_chargeable_items(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    await org.charge([contact("c-1")], now=day(0))
    within = await org.charge(
        [contact("c-1"), contact("c-2"), contact("c-2")], now=day(1), max_credits=1
    )

    assert within.result["type"] == "charge.approved"
    assert within.outcomes == ["free_repeat", "charged", "duplicate_in_request"]
    assert within.result["credits_charged"] == 1


# ---- balance: all or nothing, or partial ---------------------------------------------


async def test_insufficient_balance_rejects_the_whole_request(orgs: OrgFactory) -> None:
    org = await orgs(credits=2)
    items = [contact("c-1"), contact("c-2"), company("co-3")]

    rejected = await org.charge(items, now=day(0))

    assert rejected.result["type"] == "charge.rejected"
    assert rejected.result["reason"] == "insufficient_credits"
    assert rejected.outcomes == ["not_charged"] * 3
    assert rejected.result["credits_charged"] == 0
    assert rejected.result["balance_after"] == 2
    assert rejected.result["message"] == "the request needs 3 credits, 2 left"
    assert await org.balance() == 2

    # nothing opened a window: after a top-up the same items are charged again
    assert (await org.grant(5, now=day(1))).record.applied
    retried = await org.charge(items, now=day(1))
    assert retried.outcomes == ["charged"] * 3
    assert retried.result["balance_after"] == 4


async def test_partial_charges_what_the_balance_covers_in_request_order(
    orgs: OrgFactory,
) -> None:
    org = await orgs(credits=2)

    partial = await org.charge(
        [contact("c-1"), contact("c-2"), company("co-3")],
        now=day(0),
        on_insufficient="partial",
    )

    assert partial.result["type"] == "charge.approved"
    assert partial.outcomes == ["charged", "charged", "not_charged"]
    assert partial.result["credits_charged"] == 2
    assert partial.result["balance_after"] == 0
    assert partial.result["message"] == (
        "2 credits charged, 1 item not charged: the balance ran out"
    )
    # the item that was not charged opened no window
    assert (await org.grant(1, now=day(1))).record.applied
    later = await org.charge([company("co-3")], now=day(1))
    assert later.outcomes == ["charged"]


async def test_partial_with_free_items_and_an_empty_balance(orgs: OrgFactory) -> None:
    org = await orgs(credits=1)
    await org.charge([contact("c-1")], now=day(0))

    partial = await org.charge(
        [contact("c-2"), contact("c-1")], now=day(1), on_insufficient="partial"
    )
    nothing_to_give = await org.charge([contact("c-3")], now=day(1), on_insufficient="partial")

    assert partial.result["type"] == "charge.approved"
    assert partial.outcomes == ["not_charged", "free_repeat"]
    assert partial.result["credits_charged"] == 0
    assert nothing_to_give.result["reason"] == "insufficient_credits"


async def test_insufficient_credits_notifies_the_user_each_time_and_admins_once_a_period(
    orgs: OrgFactory,
) -> None:
    org = await orgs(credits=1, members={"u1": "member", "u2": "member", "admin": "admin"})

    first = await org.charge([contact("c-1"), contact("c-2")], now=day(0))
    second = await org.charge([contact("c-3"), contact("c-4")], now=day(1), user="u2")
    partial = await org.charge(
        [contact("c-5"), contact("c-6")], now=day(2), on_insufficient="partial"
    )

    assert first.notes == [
        ("credits.insufficient", "u1", None),
        ("credits.insufficient", "admin", None),
    ]
    assert second.notes == [("credits.insufficient", "u2", None)]
    assert partial.result["credits_charged"] == 1
    assert ("credits.insufficient", "u1", None) in partial.notes
    assert ("credits.insufficient", "admin", None) not in partial.notes

    # a new period: admins hear about it again, once
    await org.start_period(1, period_id="p2", starts=day(3), now=day(3))
    new_period = await org.charge([contact("c-7"), contact("c-8")], now=day(3))
    again = await org.charge([contact("c-7"), contact("c-8")], now=day(4))
    assert new_period.notes == [
        ("credits.insufficient", "u1", None),
        ("credits.insufficient", "admin", None),
    ]
    assert again.notes == [("credits.insufficient", "u1", None)]


# ---- idempotency ------------------------------------------------------------------------


async def test_the_same_request_twice_is_a_replay_charged_once(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    request = org.request([contact("c-1"), company("co-2")], now=day(0))

    first = await org.submit(request, day(0))
    replay = await org.submit(request, day(0) + 5_000)
    # a producer's retry carries an equal body, not the same object
    retry = await org.submit(ChargeRequest.model_validate_json(request.model_dump_json()), day(1))

    assert first.status == "decided"
    assert replay.status == "replay"
    assert retry.status == "replay"
    assert replay.result == first.result
    assert retry.result == first.result
    assert first.result["credits_charged"] == 2
    assert await org.balance() == 8


async def test_the_same_request_id_with_another_body_is_a_conflict(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    original = org.request([contact("c-1")], now=day(0), request_id="exp-1")
    other_body = org.request([contact("c-2"), contact("c-3")], now=day(0), request_id="exp-1")

    first = await org.submit(original, day(0))
    conflict = await org.submit(other_body, day(0) + 1_000)

    assert conflict.status == "conflict"
    assert conflict.record == first.record  # the stored decision stands
    rendered = conflict_result(RequestView.of(other_body), conflict.record, day(0) + 1_000)
    assert rendered["type"] == "charge.rejected"
    assert rendered["reason"] == "request_id_conflict"
    assert rendered["credits_charged"] == 0
    assert [item["outcome"] for item in rendered["items"]] == ["not_charged", "not_charged"]
    assert await org.balance() == 9
    # nothing of the other body was charged: c-2 is not in a window
    probe = await org.charge([contact("c-2")], now=day(1))
    assert probe.outcomes == ["charged"]

    again = await org.submit(original, day(2))
    assert again.status == "replay"
    assert again.result == first.result


# ---- permissions ------------------------------------------------------------------------


async def test_a_non_member_cannot_use_the_credits(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)

    stranger = await org.charge([contact("c-1")], now=day(0), user="stranger")

    assert stranger.result["type"] == "charge.rejected"
    assert stranger.result["reason"] == "not_a_member"
    assert stranger.outcomes == ["not_charged"]
    assert stranger.result["message"] == f"stranger is not a member of {org.org_id}"
    assert stranger.notes == []
    assert await org.balance() == 10


async def test_a_disallowed_user_is_rejected_and_told_until_allowed_again(
    orgs: OrgFactory,
) -> None:
    org = await orgs(credits=10)

    assert (await org.set_allowed("u1", False, now=day(0))).record.applied
    refused = await org.charge([contact("c-1")], now=day(0))
    admin_still_can = await org.charge([contact("c-2")], now=day(0), user="admin")
    assert (await org.set_allowed("u1", True, now=day(1))).record.applied
    allowed_again = await org.charge([contact("c-1")], now=day(1))

    assert refused.result["type"] == "charge.rejected"
    assert refused.result["reason"] == "credits_disallowed"
    assert refused.result["credits_charged"] == 0
    assert refused.notes == [("credits.disallowed", "u1", None)]
    assert admin_still_can.outcomes == ["charged"]
    assert allowed_again.outcomes == ["charged"]
    assert await org.balance() == 8


# ---- license periods --------------------------------------------------------------------


async def test_no_license_at_all(orgs: OrgFactory) -> None:
    org = await orgs(credits=None)

    charged = await org.charge([contact("c-1")], now=day(0))

    assert charged.result["type"] == "charge.rejected"
    assert charged.result["reason"] == "no_active_license"
    assert charged.result["credits_charged"] == 0
    assert charged.result["message"] == f"{org.org_id} has no active license period"


async def test_a_period_that_has_not_started(orgs: OrgFactory) -> None:
    org = await orgs(credits=None)
    await org.start_period(10, period_id="p1", starts=day(10), ends=day(40))

    early = await org.charge([contact("c-1")], now=day(10) - 1)
    on_time = await org.charge([contact("c-1")], now=day(10))

    assert early.result["reason"] == "no_active_license"
    assert "has not started" in early.result["message"]
    assert on_time.outcomes == ["charged"]
    assert await org.balance() == 9


async def test_a_period_that_has_ended(orgs: OrgFactory) -> None:
    org = await orgs(credits=None)
    await org.start_period(10, period_id="p1", starts=day(0), ends=day(30))

    last_moment = await org.charge([contact("c-1")], now=day(30) - 1)
    ended = await org.charge([contact("c-2")], now=day(30))

    assert last_moment.outcomes == ["charged"]
    assert ended.result["type"] == "charge.rejected"
    assert ended.result["reason"] == "license_period_ended"
    assert ended.result["period_id"] == "p1"
    assert ended.result["balance_after"] == 9


async def test_no_rollover_and_windows_survive_the_period_change(orgs: OrgFactory) -> None:
    org = await orgs(credits=None)
    await org.start_period(10, period_id="p1", starts=day(0), ends=day(20))
    for n in range(3):
        await org.charge([contact(f"c-{n}")], now=day(n))
    assert await org.balance() == 7
    await org.check_invariant()

    started = await org.start_period(5, period_id="p2", starts=day(20), ends=day(50), now=day(20))

    assert started.record.expired == 7
    assert await org.balance() == 5  # not 12
    usage_key = org.store.keys.org(org.org_id).usage
    usage = await org.store.client_for_tests.hgetall(usage_key)
    assert not [name for name in usage if name.startswith("p2|")]
    assert usage["p1|u1|export|credits"] == "3"

    # c-2 was charged on day 2 (period p1): its window still runs in period p2
    repeat = await org.charge([contact("c-2")], now=day(25))
    fresh = await org.charge([contact("c-9")], now=day(25))
    assert repeat.outcomes == ["free_repeat"]
    assert repeat.result["items"][0]["free_until"] == rfc3339(day(32))
    assert repeat.result["period_id"] == "p2"
    assert fresh.outcomes == ["charged"]
    assert await org.balance() == 4
    usage = await org.store.client_for_tests.hgetall(usage_key)
    assert {k: v for k, v in usage.items() if k.startswith("p2|")} == {
        "p2|u1|export|credits": "1",
        "p2|u1|export|requests": "2",
        "p2|u1|export|saved": "1",
        # the period's users, listed for the team report
        "p2|*users": "u1",
        "p2|u1|*": "1",
    }


# ---- grants -------------------------------------------------------------------------


async def test_a_grant_adds_to_the_balance_once(orgs: OrgFactory) -> None:
    org = await orgs(credits=2)

    granted = await org.grant(3, grant_id="g-1", now=day(0))
    duplicate = await org.grant(3, grant_id="g-1", now=day(1))

    assert granted.record.applied
    assert granted.record.balance == 5
    assert duplicate.status == "decided"
    assert not duplicate.record.applied
    assert duplicate.record.reason == "duplicate_grant"
    assert await org.balance() == 5
    charged = await org.charge([contact(f"c-{n}") for n in range(5)], now=day(2))
    assert charged.result["credits_charged"] == 5
    assert charged.result["balance_after"] == 0


async def test_a_grant_without_a_license_is_rejected(orgs: OrgFactory) -> None:
    org = await orgs(credits=None)

    granted = await org.grant(3, now=day(0))

    assert not granted.record.applied
    assert granted.record.reason == "no_active_license"
    assert await org.store.credits(org.org_id, day(0)) is None


# ---- thresholds ---------------------------------------------------------------------


def thresholds(charged: Charged) -> list[int | None]:
    return [t for kind, to, t in charged.notes if kind == "credits.threshold_reached"]


async def test_thresholds_are_notified_once_each_per_period(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    batch = itertools.count()

    def items(n: int) -> list[dict[str, Any]]:
        return [contact(f"c-{next(batch)}") for _ in range(n)]

    seven = await org.charge(items(7), now=day(0))
    eighty = await org.charge(items(1), now=day(1))
    free = await org.charge([contact("c-0")], now=day(1))
    ninety = await org.charge(items(1), now=day(2))
    hundred = await org.charge(items(1), now=day(3))

    assert thresholds(seven) == []
    assert thresholds(eighty) == [80]
    assert ("credits.threshold_reached", "admin", 80) in eighty.notes
    assert thresholds(free) == []
    assert thresholds(ninety) == [90]
    assert thresholds(hundred) == [100]

    # a grant lowers the share used (10 of 20); passing 80 % again notifies nobody
    assert (await org.grant(10, now=day(4))).record.applied
    again = await org.charge(items(8), now=day(4))
    assert again.result["balance_after"] == 2
    assert thresholds(again) == []

    # a new period starts over
    await org.start_period(10, period_id="p2", starts=day(5), now=day(5))
    new_period = await org.charge(items(9), now=day(5))
    assert thresholds(new_period) == [80, 90]


async def test_thresholds_are_shares_of_the_amount_plus_grants(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    assert (await org.grant(10, now=day(0))).record.applied

    fifteen = await org.charge([contact(f"c-{n}") for n in range(15)], now=day(0))
    sixteen = await org.charge([contact("c-15")], now=day(1))

    assert thresholds(fifteen) == []  # 75 % of 20
    assert thresholds(sixteen) == [80]
    assert sixteen.result["balance_after"] == 4


# ---- the ledger sequence and invalid requests ------------------------------------


async def test_the_ledger_sequence_is_gap_free_across_commands_and_decisions(
    orgs: OrgFactory,
) -> None:
    org = await orgs(credits=None, members={})
    sequences: list[int | None] = []

    async def cmd(type_: str, **fields: Any) -> CommandAnswer:
        answer: CommandAnswer = await org.command(type_, now=day(0), **fields)
        sequences.append(answer.record.sequence)  # a refused command's entry takes one too
        return answer

    async def decide(request: ChargeRequest) -> Charged:
        charged: Charged = await org.submit(request, day(0))
        if charged.status == "decided":
            sequences.append(charged.record.sequence)
        return charged

    await cmd("member.upsert", user_id="u1", role="member")
    no_license = await decide(org.request([contact("c-1")], now=day(0)))
    await cmd(
        "license.start_period",
        period_id="p1",
        starts_at=rfc3339(day(0)),
        ends_at=rfc3339(day(30)),
        credits=5,
    )
    approved = await decide(org.request([contact("c-1")], now=day(0), request_id="r-1"))
    refused = await cmd("member.set_credits_allowed", user_id="u1", allowed=False, set_by="u1")
    await decide(org.request([contact("c-2")], now=day(0), user="stranger"))
    await cmd("credits.grant", grant_id="g-1", credits=1, reason="r", granted_by="cs")
    replay = await decide(org.request([contact("c-1")], now=day(0), request_id="r-1"))
    conflict = await decide(org.request([contact("c-3")], now=day(0), request_id="r-1"))
    await decide(org.request([contact("c-3")], now=day(0)))

    assert no_license.result["reason"] == "no_active_license"
    assert approved.result["credits_charged"] == 1
    assert refused.record.reason == "not_an_admin"
    assert replay.record.sequence == approved.record.sequence
    assert conflict.status == "conflict"
    assert sequences == list(range(1, len(sequences) + 1))
    assert len(sequences) == 8
    assert await org.store.client_for_tests.get(org.store.keys.org(org.org_id).sequence) == "8"


async def test_an_invalid_request_is_rejected_once_with_its_detail(orgs: OrgFactory) -> None:
    org = await orgs(credits=10)
    body = {
        "request_id": "bad-1",
        "org_id": org.org_id,
        "user_id": "u1",
        "action": "export",
        "items": [{"type": "contact", "id": "c-1", "colour": "red"}],
        "requested_at": rfc3339(day(0)),
    }
    read = read_charge_request(orjson.dumps(body), Action.EXPORT, max_items=100)
    assert isinstance(read, InvalidRequest)
    call = ChargeCall.invalid(
        org_id=read.org_id,
        request_id=read.request_id,
        user_id=read.user_id,
        action=Action.EXPORT,
        fingerprint=read.fingerprint,
        detail=read.detail,
    )
    view = RequestView(read.org_id, read.request_id, read.user_id, Action.EXPORT, [])

    (first,) = await org.store.charge_many([call], day(0))
    (replay,) = await org.store.charge_many([call], day(1))

    result = charge_result(view, first.record, WINDOW_DAYS)
    assert first.status == "decided"
    assert result["type"] == "charge.rejected"
    assert result["reason"] == "invalid_request"
    assert result["message"] == read.detail
    assert "items.0.contact.colour" in result["message"]
    assert result["credits_charged"] == 0
    assert result["balance_after"] == 10
    assert result["sequence"] == 4  # two members and the period came first
    assert replay.status == "replay"
    assert charge_result(view, replay.record, WINDOW_DAYS) == result
    assert await org.balance() == 10


async def test_a_detail_reaches_the_decision_as_it_was_written(orgs: OrgFactory) -> None:
    """The request's own arguments travel to the script as JSON: quotes, backslashes,
    slashes, control characters and non-ASCII text come back unchanged."""
    org = await orgs(credits=10)
    detail = 'invalid request: "a\\b" / Zoë\u0001\n{"not": [json]}'
    call = ChargeCall.invalid(
        org_id=org.org_id,
        request_id="bad-2",
        user_id=None,
        action=Action.CRM_PUSH,
        fingerprint="0" * 32,
        detail=detail,
    )

    (answer,) = await org.store.charge_many([call], day(0))

    assert answer.record.detail == detail
    assert answer.record.reason == "invalid_request"


# ---- the quote ----------------------------------------------------------------------


async def test_a_quote_decides_like_a_charge_and_changes_nothing(orgs: OrgFactory) -> None:
    org = await orgs(credits=2)
    await org.charge([contact("c-1")], now=day(0))
    request = org.request([contact("c-1"), contact("c-2"), contact("c-3")], now=day(1))

    quote = await org.store.quote(ChargeCall.of(request), day(1))

    assert not quote.approved
    assert quote.needed == 2
    assert quote.reason is not None
    assert quote.reason.value == "insufficient_credits"
    assert quote.sequence is None
    assert await org.balance() == 1
    # nothing was stored: not the decision, not the admins' insufficient-credits flag
    charged = await org.submit(request, day(1))
    assert charged.status == "decided"
    assert ("credits.insufficient", "admin", None) in charged.notes

"""Holds (DESIGN §1 "Holds"): a request with ``hold`` reserves its credits, and the hold
is resolved once — settled with the items delivered (charged as decided then), released,
or expired by creditgate's own sweep — all by the real charge script on a real Redis,
through the worker's decider (read, decide, render), its messages parsed as published.

After each test the accounting identity of DESIGN §1 is checked for every organisation
from what Redis holds: credits + grants - balance = charged - refunded + held (open
holds only), the usage counters of the current period summed over users and actions.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import orjson
import pytest

from creditgate.api.csv_rows import history_csv
from creditgate.api.reports import HistoryQuery, charge_history, one_decision, usage_report
from creditgate.domain.charges import Action
from creditgate.domain.clock import Clock
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.domain.outgoing import Outgoing
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.store.holds import HoldSweepIndex
from creditgate.stream import topics as t
from creditgate.stream.decider import Decider, Incoming
from creditgate.stream.topics import TopicRegistry
from tests.unit.test_contracts import REAL_REDIS_KINDS, contract_of

DAY0 = to_ms(datetime(2100, 1, 4, 9, 0, tzinfo=UTC))
MINUTE = 60_000
DAY = 86_400_000


class SetClock(Clock):
    def __init__(self, now_ms: int) -> None:
        super().__init__()
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


def contact(contact_id: str, company_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "contact", "id": contact_id}
    if company_id is not None:
        item["company_id"] = company_id
    return item


@dataclass
class Worker:
    """The decider of one key prefix, fed message by message; messages come back parsed."""

    store: CreditStore
    decider: Decider
    registry: TopicRegistry
    clock: SetClock
    _offsets: itertools.count[int] = field(default_factory=itertools.count)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    # everything the decider rendered, as it would be published
    published: list[Outgoing] = field(default_factory=list)

    def _in(self, logical: str, body: dict[str, Any]) -> Incoming:
        return Incoming(
            self.registry.name(logical),
            0,
            next(self._offsets),
            body["org_id"].encode(),
            orjson.dumps(body),
        )

    def _results(self, out: list[Any]) -> list[dict[str, Any]]:
        topic = self.registry.name(t.CHARGE_RESULTS)
        return [orjson.loads(m.value) for m in out if m.topic == topic]

    async def command(self, org: str, type_: str, **fields: Any) -> dict[str, Any]:
        body = {"command_id": f"cmd-{next(self._ids)}", "org_id": org, "type": type_, **fields}
        out = await self.decider.apply([self._in(t.LICENSE_COMMANDS, body)])
        self.published += out
        events = self.registry.name(t.LICENSE_EVENTS)
        (event,) = [orjson.loads(m.value) for m in out if m.topic == events]
        assert isinstance(event, dict)
        return event

    async def request(
        self,
        org: str,
        items: list[dict[str, Any]],
        *,
        hold: dict[str, Any] | None = None,
        user: str = "u1",
        request_id: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        body = {
            "request_id": request_id or f"req-{next(self._ids)}",
            "org_id": org,
            "user_id": user,
            "action": "export",
            "items": items,
            "requested_at": rfc3339(self.clock.now),
            **fields,
        }
        if hold is not None:
            body["hold"] = hold
        out = await self.decider.decide([self._in(t.EXPORT_REQUESTS, body)])
        self.published += out
        await self.decider.note_holds()
        (result,) = self._results(out)
        return result

    async def settle(
        self,
        org: str,
        hold_id: str,
        items: list[dict[str, Any]] | None = None,
        *,
        release: bool = False,
        settlement_id: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "settlement_id": settlement_id or f"stl-{next(self._ids)}",
            "org_id": org,
            "request_id": hold_id,
            "type": "hold.release" if release else "hold.settle",
        }
        if not release:
            body["items"] = [{"type": i["type"], "id": i["id"]} for i in items or []]
        out = await self.decider.settle([self._in(t.HOLD_SETTLEMENTS, body)])
        self.published += out
        (result,) = self._results(out)
        return result

    async def sweep(self) -> list[dict[str, Any]]:
        """The worker's expiry sweep: expire what is due, "publish" it, then note it."""
        out, done = await self.decider.expire_due()
        self.published += out
        await self.decider.expired_published(done)
        return self._results(out)

    async def balance(self, org: str) -> int:
        credits = await self.store.credits(org, self.clock.now)
        assert credits is not None
        return int(credits["remaining"])


@pytest.fixture
async def worker(endpoints: tuple[str, str]) -> AsyncIterator[Worker]:
    settings = Settings(redis_url=endpoints[1], key_prefix=f"t-{uuid4().hex[:12]}")
    store = CreditStore.from_settings(settings)
    sweep = HoldSweepIndex.from_settings(settings)
    clock = SetClock(DAY0)
    registry = TopicRegistry.load()
    w = Worker(store, Decider(store, registry, settings, clock, sweep=sweep), registry, clock)
    orgs: list[str] = []
    try:
        yield w
        # what was rendered is what its contract says (as tests/unit/test_contracts.py
        # checks the scripted scenario's)
        for message in w.published:
            contract_of(message)
    finally:
        client = store.client_for_tests
        for key in [
            k async for k in client.scan_iter(match=f"{settings.key_prefix}:{{*", count=10_000)
        ]:
            org = key.split("{", 1)[1].split("}", 1)[0]
            if org not in orgs:
                orgs.append(org)
        for org in orgs:
            await assert_accounting_identity(store, org, clock.now)
        keys = [k async for k in client.scan_iter(match=f"{settings.key_prefix}:*", count=10_000)]
        if keys:
            await client.delete(*keys)
        await sweep.close()
        await store.close()


async def assert_accounting_identity(store: CreditStore, org: str, now: int) -> None:
    credits = await store.credits(org, now)
    if credits is None:
        return
    usage = await usage_report(store, org, None, now)
    assert usage is not None
    totals = usage["totals"]
    held_charged = totals["credits_used"] - totals["credits_refunded"] + totals["credits_held"]
    spent = credits["period_credits"] + credits["granted"] - credits["remaining"]
    assert spent == held_charged, f"{org}: {credits} but usage {totals}"


async def org_with(worker: Worker, credits: int = 10) -> str:
    org = f"org-{uuid4().hex[:8]}"
    await worker.command(org, "member.upsert", user_id="u1", role="member")
    await worker.command(org, "member.upsert", user_id="ana", role="admin")
    await worker.command(
        org,
        "license.start_period",
        period_id="p1",
        starts_at=rfc3339(DAY0),
        ends_at=rfc3339(DAY0 + 365 * DAY),
        credits=credits,
    )
    return org


# ---- holding ---------------------------------------------------------------------------


async def test_a_hold_takes_its_credits_from_the_balance_without_charging(
    worker: Worker,
) -> None:
    org = await org_with(worker)
    await worker.request(org, [contact("c9")])

    held = await worker.request(
        org, [contact("c1"), contact("c2"), contact("c9"), contact("c1")], hold={}
    )

    assert held["type"] == "charge.held"
    assert held["credits_held"] == 2
    assert held["credits_charged"] == 0
    assert [i["outcome"] for i in held["items"]] == [
        "held",
        "held",
        "free_repeat",
        "duplicate_in_request",
    ]
    assert held["hold_expires_at"] == rfc3339(DAY0 + 15 * MINUTE)  # the default
    assert held["balance_after"] == 7
    assert await worker.balance(org) == 7
    # no window opened: another request still pays for c1
    other = await worker.request(org, [contact("c1")])
    assert [i["outcome"] for i in other["items"]] == ["charged"]


async def test_a_hold_is_refused_like_a_charge(worker: Worker) -> None:
    org = await org_with(worker, credits=2)
    await worker.command(org, "member.set_credit_limit", user_id="u1", limit=1, set_by="ana")

    over_limit = await worker.request(org, [contact("c1"), contact("c2")], hold={})
    too_much = await worker.request(org, [contact(f"x{i}") for i in range(3)], hold={}, user="ana")
    ceiling = await worker.request(
        org, [contact("c1"), contact("c2")], hold={}, user="ana", max_credits=1
    )

    assert over_limit["reason"] == "user_limit_reached"
    assert too_much["reason"] == "insufficient_credits"
    assert ceiling["reason"] == "exceeds_max_credits"
    assert await worker.balance(org) == 2


def notifications(worker: Worker, kind: str) -> list[dict[str, Any]]:
    topic = worker.registry.name(t.NOTIFICATIONS)
    found = [orjson.loads(m.value) for m in worker.published if m.topic == topic]
    return [n for n in found if n["type"] == kind]


async def test_held_credits_count_towards_the_usage_thresholds_once(worker: Worker) -> None:
    org = await org_with(worker)  # 10 credits, thresholds 80, 90, 100 %
    held = await worker.request(org, [contact(f"c{i}") for i in range(8)], hold={})
    assert held["type"] == "charge.held"
    assert [n["threshold_percent"] for n in notifications(worker, "credits.threshold_reached")] == [
        80
    ]
    await worker.settle(org, held["request_id"], release=True)
    again = await worker.request(org, [contact(f"c{i}") for i in range(8)], hold={})
    assert again["type"] == "charge.held"
    # once a period: the hold released and another one taking use there again is not told
    assert len(notifications(worker, "credits.threshold_reached")) == 1


# ---- settling ----------------------------------------------------------------------------


async def test_settling_charges_the_delivered_items_and_releases_the_rest(
    worker: Worker,
) -> None:
    org = await org_with(worker)
    held = await worker.request(
        org, [contact("c1", "co1"), contact("c2"), contact("c3")], hold={"expires_in_seconds": 600}
    )

    settled = await worker.settle(org, held["request_id"], [contact("c1"), contact("c3")])

    assert settled["type"] == "hold.settled", (settled["reason"], settled["message"])
    assert settled["request_id"] == held["request_id"]
    assert settled["credits_charged"] == 2
    assert settled["credits_released"] == 1
    assert [i["outcome"] for i in settled["items"]] == ["charged", "released", "charged"]
    assert settled["balance_after"] == 8
    assert await worker.balance(org) == 8
    # the windows opened at settle time: of the delivered items (and c1's company) only
    after = await worker.request(
        org, [contact("c1"), {"type": "company", "id": "co1"}, contact("c2")]
    )
    assert [i["outcome"] for i in after["items"]] == ["free_repeat", "free_repeat", "charged"]


async def test_an_item_charged_by_another_request_meanwhile_is_free_at_settle(
    worker: Worker,
) -> None:
    org = await org_with(worker)
    held = await worker.request(org, [contact("c1"), contact("c2")], hold={})
    await worker.request(org, [contact("c1")])  # c1's window opens now

    settled = await worker.settle(org, held["request_id"], [contact("c1"), contact("c2")])

    assert [i["outcome"] for i in settled["items"]] == ["free_repeat", "charged"]
    assert settled["credits_charged"] == 1
    assert settled["credits_released"] == 1
    # 10 - c1 (the other request) - c2 (the settlement): c1 is never paid twice
    assert await worker.balance(org) == 8


async def test_a_hold_resolves_exactly_once_and_settlements_are_idempotent(
    worker: Worker,
) -> None:
    org = await org_with(worker)
    held = await worker.request(org, [contact("c1"), contact("c2")], hold={})
    hold_id = held["request_id"]

    first = await worker.settle(org, hold_id, [contact("c1")], settlement_id="s-1")
    again = await worker.settle(org, hold_id, [contact("c1")], settlement_id="s-1")
    other_body = await worker.settle(org, hold_id, [contact("c2")], settlement_id="s-1")
    released = await worker.settle(org, hold_id, release=True)
    expiry = await worker.sweep()

    assert first["type"] == "hold.settled"
    assert again == first  # a replay re-emits the first answer
    assert other_body["type"] == "hold.rejected"
    assert other_body["reason"] == "request_id_conflict"
    assert released["type"] == "hold.rejected"
    assert released["reason"] == "hold_already_resolved"
    assert "by settlement s-1" in released["message"]
    assert expiry == []  # nothing left to expire
    assert await worker.balance(org) == 9


async def test_a_release_gives_every_held_credit_back(worker: Worker) -> None:
    org = await org_with(worker)
    held = await worker.request(org, [contact("c1"), contact("c2")], hold={})

    released = await worker.settle(org, held["request_id"], release=True)

    assert released["type"] == "hold.released"
    assert released["credits_released"] == 2
    assert released["credits_charged"] == 0
    assert [i["outcome"] for i in released["items"]] == ["released", "released"]
    assert await worker.balance(org) == 10


async def test_a_refused_settlement_changes_nothing(worker: Worker) -> None:
    org = await org_with(worker)
    held = await worker.request(org, [contact("c1"), contact("c2")], hold={})

    not_held = await worker.settle(org, held["request_id"], [contact("c1"), contact("c7")])
    unknown = await worker.settle(org, "no-such-hold", [contact("c1")])
    not_a_hold = await worker.settle(
        org, (await worker.request(org, [contact("c5")]))["request_id"], [contact("c5")]
    )
    settled = await worker.settle(org, held["request_id"], [contact("c1")])

    assert not_held["reason"] == "item_not_held"
    assert unknown["reason"] == "hold_not_found"
    assert not_a_hold["reason"] == "hold_not_found"
    # the refusals took nothing: c1 is charged now, c2 released, c5 charged before
    assert settled["type"] == "hold.settled"
    assert await worker.balance(org) == 8


# ---- expiring ------------------------------------------------------------------------------


async def test_creditgate_expires_a_hold_by_itself_once(worker: Worker) -> None:
    org = await org_with(worker)
    held = await worker.request(
        org, [contact("c1"), contact("c2")], hold={"expires_in_seconds": 60}
    )

    worker.clock.now = DAY0 + 59_999
    early = await worker.sweep()
    worker.clock.now = DAY0 + 60_000
    expired = await worker.sweep()
    again = await worker.sweep()
    late = await worker.settle(org, held["request_id"], [contact("c1")])

    assert early == []
    (result,) = expired
    assert result["type"] == "hold.expired"
    assert result["request_id"] == held["request_id"]
    assert result["settlement_id"] is None
    assert result["credits_released"] == 2
    assert result["balance_after"] == 10
    assert again == []
    assert late["reason"] == "hold_already_resolved"
    assert await worker.balance(org) == 10


async def test_an_expiry_decided_but_not_published_is_published_as_decided(
    worker: Worker,
) -> None:
    org = await org_with(worker)
    await worker.request(org, [contact("c1")], hold={"expires_in_seconds": 60})
    worker.clock.now = DAY0 + 2 * MINUTE

    lost, _ = await worker.decider.expire_due()  # decided, then the worker dies
    worker.clock.now = DAY0 + 3 * MINUTE
    found = await worker.sweep()

    assert [r["type"] for r in found] == ["hold.expired"]
    assert found[0] == orjson.loads(
        next(m.value for m in lost if m.topic == worker.registry.name(t.CHARGE_RESULTS))
    )
    assert await worker.sweep() == []


async def test_a_new_period_ends_the_open_holds(worker: Worker) -> None:
    org = await org_with(worker)
    held = await worker.request(
        org, [contact("c1"), contact("c2")], hold={"expires_in_seconds": 3600}
    )
    worker.clock.now = DAY0 + MINUTE
    await worker.command(
        org,
        "license.start_period",
        period_id="p2",
        starts_at=rfc3339(DAY0 + MINUTE),
        ends_at=rfc3339(DAY0 + 365 * DAY),
        credits=5,
    )
    await worker.decider.note_holds()

    ended = await worker.sweep()
    late = await worker.settle(org, held["request_id"], [contact("c1")])

    (result,) = ended
    assert result["type"] == "hold.expired"
    assert "ended with its license period" in result["message"]
    assert result["period_id"] == "p1"
    assert late["reason"] == "hold_already_resolved"
    assert await worker.balance(org) == 5  # no rollover: the held credits went with p1


async def test_a_hold_never_outlives_its_period(worker: Worker) -> None:
    org = f"org-{uuid4().hex[:8]}"
    await worker.command(org, "member.upsert", user_id="u1", role="member")
    await worker.command(
        org,
        "license.start_period",
        period_id="p1",
        starts_at=rfc3339(DAY0),
        ends_at=rfc3339(DAY0 + 10 * MINUTE),
        credits=5,
    )

    held = await worker.request(org, [contact("c1")], hold={"expires_in_seconds": 3600})

    assert held["hold_expires_at"] == rfc3339(DAY0 + 10 * MINUTE)


# ---- refunding -----------------------------------------------------------------------------


async def refund(worker: Worker, org: str, request_id: str, *items: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"request_id": request_id, "reason": "the CRM refused it"}
    if items:
        fields["items"] = [{"type": "contact", "id": i} for i in items]
    return await worker.command(org, "charge.refund", refunded_by="cs-1", **fields)


async def test_a_settled_hold_is_refunded_as_its_settlement_charged_it(worker: Worker) -> None:
    org = await org_with(worker)
    held = await worker.request(org, [contact("c1", "co1"), contact("c2"), contact("c3")], hold={})
    released = await worker.request(org, [contact("c4")], hold={})
    await worker.settle(org, released["request_id"], release=True)

    early = await refund(worker, org, held["request_id"])
    await worker.settle(org, held["request_id"], [contact("c1"), contact("c2")])
    assert await worker.balance(org) == 8
    refunded = await refund(worker, org, held["request_id"], "c1")
    again = await refund(worker, org, held["request_id"], "c1", "c3")
    nothing = await refund(worker, org, released["request_id"])

    assert (early["type"], early["reason"]) == ("command.rejected", "nothing_to_refund")
    assert early["message"] == "the hold is not settled yet: it charged nothing"
    assert refunded["type"] == "command.applied", refunded["message"]
    assert refunded["message"] == (
        f"1 credit of request {held['request_id']} refunded, balance 9; 2 repeat windows closed"
    )
    assert await worker.balance(org) == 9
    # c1 again: refunded before; c3: released, never charged
    assert (again["reason"], again["message"]) == (
        "nothing_to_refund",
        "every item named was refunded before",
    )
    assert nothing["message"] == "the hold was released: it charged nothing"
    # the windows the settlement opened for c1 (and its company) are closed, c2's is not
    after = await worker.request(
        org, [contact("c1"), {"type": "company", "id": "co1"}, contact("c2")]
    )
    assert [i["outcome"] for i in after["items"]] == ["charged", "charged", "free_repeat"]
    decision = await one_decision(worker.store, org, held["request_id"], 30)
    assert decision is not None
    assert [i["outcome"] for i in decision["items"]] == ["refunded", "charged", "released"]
    assert decision["credits_refunded"] == 1


# ---- the read side -------------------------------------------------------------------------


async def history_of(worker: Worker, org: str) -> dict[str, dict[str, Any]]:
    page = await charge_history(worker.store, org, "u1", HistoryQuery(Action.EXPORT), 30)
    assert page is not None
    return {entry["request_id"]: entry for entry in page["charges"]}


async def test_history_and_the_decision_show_what_became_of_each_hold(worker: Worker) -> None:
    org = await org_with(worker)
    settle = await worker.request(
        org, [contact("c1", "co1"), contact("c2"), contact("c3")], hold={}
    )
    release = await worker.request(org, [contact("c4")], hold={})
    expire = await worker.request(org, [contact("c5")], hold={"expires_in_seconds": 60})
    still_open = await worker.request(org, [contact("c6")], hold={})
    plain = await worker.request(org, [contact("c3")])  # c3 free by the time its hold settles

    settled = await worker.settle(org, settle["request_id"], [contact("c1"), contact("c3")])
    released = await worker.settle(org, release["request_id"], release=True)
    worker.clock.now = DAY0 + 60_000
    (expired,) = await worker.sweep()

    history = await history_of(worker, org)
    entry = history[settle["request_id"]]
    assert entry["type"] == "charge.held"  # the decision as published, and then:
    assert entry["hold"] == {
        "status": "settled",
        "settlement_id": settled["settlement_id"],
        "resolved_at": settled["decided_at"],
        "credits_released": 2,
        "message": settled["message"],
    }
    assert settled["message"] == "1 credit charged, 1 free within its 30-day window, 2 released"
    assert entry["credits_charged"] == 1  # what the export cost
    assert entry["credits_held"] == 3
    assert entry["credits_saved"] == 1
    assert {k: v for k, v in entry["items_by_outcome"].items() if v} == {
        "charged": 1,
        "free_repeat": 1,
        "released": 1,
    }
    assert entry["free_repeats_until"] is not None
    assert history[release["request_id"]]["hold"]["status"] == "released"
    assert history[release["request_id"]]["hold"]["settlement_id"] == released["settlement_id"]
    assert history[release["request_id"]]["credits_charged"] == 0
    assert history[expire["request_id"]]["hold"] | {"message": ""} == {
        "status": "expired",
        "settlement_id": None,
        "resolved_at": expired["decided_at"],
        "credits_released": 1,
        "message": "",
    }
    assert history[still_open["request_id"]]["hold"]["status"] == "open"
    assert history[still_open["request_id"]]["items_by_outcome"]["held"] == 1
    assert "hold" not in history[plain["request_id"]]

    decision = await one_decision(worker.store, org, settle["request_id"], 30)
    assert decision is not None
    assert [i["outcome"] for i in decision["items"]] == ["charged", "released", "free_repeat"]
    assert decision["items"][2]["free_until"] is not None
    assert decision["counts"] == {"charged": 1, "free_repeat": 1, "released": 1}
    assert decision["credits_charged"] == 1
    assert decision["hold"]["status"] == "settled"
    shown = await one_decision(worker.store, org, still_open["request_id"], 30)
    assert shown is not None
    assert [i["outcome"] for i in shown["items"]] == ["held"]
    assert shown["hold"]["status"] == "open"

    # the CSV has the same: each hold's status, the credits it held, what it cost
    page = await charge_history(worker.store, org, "u1", HistoryQuery(Action.EXPORT), 30)
    assert page is not None
    rows = {r["request_id"]: r for r in csv.DictReader(io.StringIO(history_csv(page)))}
    assert {k: rows[k]["hold_status"] for k in rows} == {
        settle["request_id"]: "settled",
        release["request_id"]: "released",
        expire["request_id"]: "expired",
        still_open["request_id"]: "open",
        plain["request_id"]: "",
    }
    assert (
        rows[settle["request_id"]]["credits_charged"],
        rows[settle["request_id"]]["credits_held"],
    ) == ("1", "3")


# ---- the contracts ----------------------------------------------------------------------


async def test_holds_limits_and_refunds_publish_every_kind_of_their_outputs(
    worker: Worker,
) -> None:
    """Each kind of message the unit scenario leaves to real Redis is published here, and
    (in the fixture) checked against its contract."""
    org = await org_with(worker)
    await worker.command(org, "member.set_credit_limit", user_id="u1", limit=6, set_by="ana")
    settle = await worker.request(org, [contact("c1"), contact("c2")], hold={})
    release = await worker.request(org, [contact("c3")], hold={})
    expire = await worker.request(org, [contact("c4")], hold={"expires_in_seconds": 1})
    await worker.settle(org, settle["request_id"], [contact("c1")])
    await worker.settle(org, release["request_id"], release=True)
    await worker.settle(org, release["request_id"], release=True)  # already resolved
    worker.clock.now += 2_000
    await worker.sweep()
    pushed = await worker.request(org, [contact("c5"), contact("c6")])
    await worker.request(org, [contact(f"x{i}") for i in range(9)])  # past u1's limit
    refund = {"request_id": pushed["request_id"], "reason": "CRM said no"}
    await worker.command(org, "charge.refund", refunded_by="cs-1", **refund)

    kinds = {contract_of(message) for message in worker.published}

    assert expire["type"] == "charge.held"
    assert kinds >= REAL_REDIS_KINDS


async def test_a_hold_of_nothing_but_free_repeats_resolves(worker: Worker) -> None:
    """Found by the model: a hold holding 0 credits must settle and expire too (an
    increment of -0 is one Redis refuses, after the script's first writes)."""
    org = await org_with(worker)
    await worker.request(org, [contact("c1"), contact("c2")])
    free = await worker.request(org, [contact("c1")], hold={})
    expiring = await worker.request(org, [contact("c2")], hold={"expires_in_seconds": 1})

    settled = await worker.settle(org, free["request_id"], [])
    worker.clock.now += 1_000
    (expired,) = await worker.sweep()

    assert free["credits_held"] == 0
    assert (settled["type"], settled["credits_charged"]) == ("hold.settled", 0)
    assert (expired["type"], expired["credits_released"]) == ("hold.expired", 0)
    assert expired["request_id"] == expiring["request_id"]
    assert await worker.balance(org) == 8

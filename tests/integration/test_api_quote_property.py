"""Property: the quote taken just before a charge is the decision that follows; the
reports are the sums of the published results.

A seeded random walk over a few organisations on a real Redis: several hundred
requests mixing every rule (free repeats, duplicates in a request, company windows,
email verification found or not, ``max_credits``, partial and reject, disallowed
users, non-members, an organisation without license, one whose period ends, small
balances topped up by grants, a new period, and a clock that jumps across the 30-day
window). Each request is quoted, then decided by the worker's ``Decider`` at the
same instant, and the result it would publish on ``credits.charge.results`` is
compared with the quote. At the end the usage reports, the credits and every history
page are compared with the sums of those results.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from creditgate.api import quotes, reports
from creditgate.domain.charges import Action
from creditgate.domain.clock import Clock
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.decider import Decider, Incoming
from creditgate.stream.topics import TopicRegistry

pytestmark = pytest.mark.integration

SEED = 20_260_601
STEPS = 320
DAY_MS = 86_400_000
# in the future on purpose: windows expire by Redis's clock too (PXAT)
DAY0 = to_ms(datetime(2100, 3, 1, 9, 0, tzinfo=UTC))
WINDOW_DAYS = 30.0

CONTACTS = [f"c{n}" for n in range(12)]
COMPANIES = [f"co{n}" for n in range(5)]
USERS = {"ana": 6, "bob": 6, "cy": 4, "dee": 2, "zed": 1}  # name -> weight
TOPICS = {action: logical for logical, action in t.REQUEST_ACTIONS.items()}


class ManualClock(Clock):
    def __init__(self, now_ms: int) -> None:
        super().__init__()
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


@dataclass
class Walk:
    store: CreditStore
    processor: Decider
    registry: TopicRegistry
    clock: ManualClock
    rng: random.Random
    orgs: dict[str, int] = field(default_factory=dict)  # org -> starting credits
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # request_id -> result
    bodies: list[dict[str, Any]] = field(default_factory=list)
    offsets: itertools.count[int] = field(default_factory=itertools.count)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    async def command(self, org: str, type_: str, **fields: Any) -> None:
        body = {"command_id": f"cmd-{next(self.ids)}", "org_id": org, "type": type_, **fields}
        command = license_command_adapter.validate_python(body)
        (answer,) = await self.store.apply_commands([command], self.clock.now)
        assert answer.record.applied, answer.record

    async def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        """Decide one request as the worker does; the result it would publish."""
        topic = self.registry.name(TOPICS[Action(body["action"])])
        message = Incoming(
            topic, 0, next(self.offsets), body["org_id"].encode(), orjson.dumps(body)
        )
        out = await self.processor.decide([message])
        results_topic = self.registry.name(t.CHARGE_RESULTS)
        (result,) = [orjson.loads(m.value) for m in out if m.topic == results_topic]
        return result  # type: ignore[no-any-return]


@pytest.fixture
async def walk(settings: Settings) -> AsyncIterator[Walk]:
    # keep every decision for the whole walk (it spans about a year of decision time),
    # so that history pages can be compared with every result
    settings = settings.model_copy(update={"idempotency_ttl_days": 10_000.0})
    store = CreditStore.from_settings(settings)
    registry = TopicRegistry.load()
    clock = ManualClock(DAY0)
    try:
        yield Walk(
            store, Decider(store, registry, settings, clock), registry, clock, random.Random(SEED)
        )
    finally:
        await store.close()


async def setup_orgs(walk: Walk) -> None:
    """big: plenty; small: a few credits and grants; ending: its period ends on day 45;
    nolicense: members but no license."""
    for org, credits, ends_day in (("big", 60, 5000), ("small", 4, 5000), ("ending", 30, 45)):
        walk.orgs[org] = credits
        await walk.command(
            org,
            "license.start_period",
            period_id="p1",
            starts_at=rfc3339(DAY0 - DAY_MS),
            ends_at=rfc3339(DAY0 + ends_day * DAY_MS),
            credits=credits,
        )
    for org in (*walk.orgs, "nolicense"):
        for user in ("ana", "bob", "cy", "dee"):
            await walk.command(
                org, "member.upsert", user_id=user, role="admin" if user == "ana" else "member"
            )
        await walk.command(
            org, "member.set_credits_allowed", user_id="dee", allowed=False, set_by="ana"
        )


def random_body(walk: Walk, request_id: str) -> dict[str, Any]:
    rng = walk.rng
    org = rng.choice(["big", "big", "small", "small", "ending", "nolicense"])
    user = rng.choices(list(USERS), weights=list(USERS.values()))[0]
    action = rng.choices(list(Action), weights=[45, 35, 20])[0]
    body: dict[str, Any] = {
        "request_id": request_id,
        "org_id": org,
        "user_id": user,
        "action": action.value,
        "requested_at": rfc3339(walk.clock.now),
    }
    if action is Action.EMAIL_VERIFICATION:
        body["items"] = [{"type": "contact", "id": rng.choice(CONTACTS[:6])}]
        body["verified_email_found"] = rng.random() < 0.6
    else:
        items: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.7:
                index = rng.randrange(len(CONTACTS))
                item = {"type": "contact", "id": CONTACTS[index]}
                if rng.random() < 0.5:  # a contact always belongs to the same company
                    item["company_id"] = COMPANIES[index % len(COMPANIES)]
            else:
                item = {"type": "company", "id": rng.choice(COMPANIES)}
            items.append(item)
        if rng.random() < 0.15:
            items.append(dict(rng.choice(items)))  # a duplicate on purpose
        body["items"] = items
    if rng.random() < 0.25:
        body["max_credits"] = rng.randint(0, 5)
    if rng.random() < 0.3:
        body["on_insufficient"] = "partial"
    if rng.random() < 0.5:
        body["reference"] = {"export_id": f"e-{request_id}", "crm": rng.choice(["hubspot", "sf"])}
    return body


def quote_body(walk: Walk, body: dict[str, Any]) -> dict[str, Any]:
    """The request as the platform quotes it: no request_id, some verified-email hints."""
    quoted = {k: v for k, v in body.items() if k != "request_id"}
    quoted["items"] = [
        {**item, quotes.VERIFIED_HINT: walk.rng.random() < 0.5}
        if item["type"] == "contact" and walk.rng.random() < 0.5
        else item
        for item in body["items"]
    ]
    return quoted


def assert_quote_is_the_decision(quote: dict[str, Any], result: dict[str, Any]) -> None:
    approved = result["type"] == "charge.approved"
    assert quote["would_be_approved"] == approved
    assert quote["reason"] == result["reason"]
    assert quote["message"] == result["message"]
    assert quote["credits_if_submitted_now"] == result["credits_charged"]
    assert quote["period_id"] == result["period_id"]
    assert quote["remaining"] - result["credits_charged"] == result["balance_after"]
    assert [i["if_submitted_now"] for i in quote["items"]] == [
        i["outcome"] for i in result["items"]
    ]
    for quoted, decided in zip(quote["items"], result["items"], strict=True):
        assert {k: quoted[k] for k in ("type", "id")} == {k: decided[k] for k in ("type", "id")}
        if decided["outcome"] == "free_repeat":
            assert quoted["outcome"] == "free_repeat"
            assert quoted["free_until"] == decided["free_until"]
        if approved:
            assert quoted["outcome"] == quotes.QUOTE_OUTCOMES[decided["outcome"]]
    # the itemisation adds up, approved or not
    outcomes = Counter(i["outcome"] for i in quote["items"])
    assert quote["max_credits"] == outcomes["would_charge"]
    assert quote["credits_saved"] == outcomes["free_repeat"]
    assert quote["max_credits_verified_only"] == sum(
        1
        for i in quote["items"]
        if i["outcome"] == "would_charge" and i.get(quotes.VERIFIED_HINT) is True
    )


async def random_event(walk: Walk, step: int) -> None:
    """Move the clock, and now and then change a license."""
    rng = walk.rng
    roll = rng.random()
    if roll < 0.6:
        walk.clock.now += rng.randint(1, 600) * 1000
    elif roll < 0.95:
        walk.clock.now += rng.randint(1, 72) * 3_600_000
    else:  # across a whole repeat window
        walk.clock.now += rng.randint(25, 35) * DAY_MS
    if rng.random() < 0.05:
        await walk.command(
            "small",
            "credits.grant",
            grant_id=f"g-{step}",
            credits=rng.randint(1, 3),
            reason="top-up",
            granted_by="cs",
        )
    if rng.random() < 0.04:
        org = rng.choice(["big", "small"])
        allowed = rng.random() < 0.5
        await walk.command(
            org, "member.set_credits_allowed", user_id="dee", allowed=allowed, set_by="ana"
        )
    if step == STEPS // 2:  # a new period: no rollover, usage restarts
        walk.orgs["big"] = 40
        await walk.command(
            "big",
            "license.start_period",
            period_id="p2",
            starts_at=rfc3339(walk.clock.now),
            ends_at=rfc3339(walk.clock.now + 5000 * DAY_MS),
            credits=40,
        )


async def test_quote_equals_decision_and_reports_equal_results(walk: Walk) -> None:
    await setup_orgs(walk)
    for step in range(STEPS):
        await random_event(walk, step)
        if walk.bodies and walk.rng.random() < 0.05:
            # a redelivery: the stored decision again, identical, never charged twice
            body = walk.rng.choice(walk.bodies)
            assert await walk.decide(body) == walk.results[body["request_id"]]
            continue
        body = random_body(walk, f"r-{step}")
        quote = await quotes.quote(
            walk.store, quote_body(walk, body), walk.clock.now, window_days=WINDOW_DAYS
        )
        result = await walk.decide(body)
        try:
            assert_quote_is_the_decision(quote, result)
        except AssertionError:
            print(orjson.dumps({"body": body, "quote": quote, "result": result}).decode())
            raise
        walk.bodies.append(body)
        walk.results[body["request_id"]] = result

    assert_every_rule_was_exercised(list(walk.results.values()))
    await assert_usage_is_the_sum_of_results(walk)
    await assert_history_pages_are_the_results(walk)


def assert_every_rule_was_exercised(results: list[dict[str, Any]]) -> None:
    reasons = Counter(r["reason"] for r in results)
    outcomes = Counter(i["outcome"] for r in results for i in r["items"])
    partial = [
        r
        for r in results
        if r["type"] == "charge.approved" and any(i["outcome"] == "not_charged" for i in r["items"])
    ]
    assert len(results) >= 200
    for reason in (
        None,
        "credits_disallowed",
        "insufficient_credits",
        "exceeds_max_credits",
        "not_a_member",
        "no_active_license",
        "license_period_ended",
    ):
        assert reasons[reason] > 0, (reason, reasons)
    for outcome in ("charged", "free_repeat", "duplicate_in_request", "no_verified_email"):
        assert outcomes[outcome] > 0, (outcome, outcomes)
    assert partial, "no partial approval happened"


def expected_usage(results: list[dict[str, Any]], org: str, period: str) -> dict[str, Any]:
    counts: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for r in results:
        if r["org_id"] != org or r["period_id"] != period:
            continue
        row = counts[r["user_id"]][r["action"]]
        if r["type"] == "charge.approved":
            row["credits_used"] += r["credits_charged"]
            row["requests"] += 1
            row["credits_saved"] += sum(1 for i in r["items"] if i["outcome"] == "free_repeat")
        else:
            row["rejected"] += 1
    metrics = (
        "credits_used",
        "requests",
        "credits_saved",
        "rejected",
        "credits_refunded",
        "credits_held",
    )
    return {
        user: {action: {m: row[m] for m in metrics} for action, row in by_action.items()}
        for user, by_action in counts.items()
    }


async def assert_usage_is_the_sum_of_results(walk: Walk) -> None:
    results = list(walk.results.values())
    now = walk.clock.now
    for org, period in (("big", "p1"), ("big", "p2"), ("small", "p1"), ("ending", "p1")):
        report = await reports.usage_report(walk.store, org, period, now)
        assert report is not None
        expected = expected_usage(results, org, period)
        assert {u["user_id"]: u["by_action"] for u in report["users"]} == expected
        charged = sum(
            r["credits_charged"] for r in results if r["org_id"] == org and r["period_id"] == period
        )
        assert report["totals"]["credits_used"] == charged
        for row in report["users"]:
            assert row["credits_used"] == sum(c["credits_used"] for c in row["by_action"].values())
        if report["current_period"]:
            credits = await walk.store.credits(org, now)
            assert credits is not None
            assert credits["used"] == charged
            assert credits["period_credits"] + credits["granted"] - charged == credits["remaining"]
    assert await reports.usage_report(walk.store, "nolicense", None, now) is None


async def assert_history_pages_are_the_results(walk: Walk) -> None:
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in walk.results.values():
        by_key[(result["org_id"], result["user_id"], result["action"])].append(result)
    for (org, user, action), results in by_key.items():
        results.sort(key=lambda r: (r["decided_at"], r["request_id"]), reverse=True)
        pages, entries, cursor = 0, [], None
        while True:
            query = reports.HistoryQuery(
                Action(action),
                walk.rng.randint(1, 7),
                reports.Cursor.parse(cursor) if cursor else None,
            )
            page = await reports.charge_history(walk.store, org, user, query, WINDOW_DAYS)
            assert page is not None
            assert len(page["charges"]) <= query.limit
            entries.extend(page["charges"])
            pages += 1
            cursor = page["next_before"]
            if cursor is None:
                break
        assert [e["request_id"] for e in entries] == [r["request_id"] for r in results]
        for entry, result in zip(entries, results, strict=True):
            counts = Counter(i["outcome"] for i in result["items"])
            # a history entry has items_by_outcome instead of items, counts, items_truncated
            assert entry == {
                **{
                    k: v
                    for k, v in result.items()
                    if k not in ("items", "counts", "items_truncated")
                },
                "item_count": len(result["items"]),
                "items_by_outcome": {o: counts[o] for o in entry["items_by_outcome"]},
                "credits_saved": counts["free_repeat"],
                "credits_refunded": 0,  # the walk refunds nothing
                # the latest end among the items it got free (same-format times sort)
                "free_repeats_until": max(
                    (i["free_until"] for i in result["items"] if i["outcome"] == "free_repeat"),
                    default=None,
                ),
            }
            assert sum(entry["items_by_outcome"].values()) == len(result["items"])
            assert {o: n for o, n in entry["items_by_outcome"].items() if n} == result["counts"]

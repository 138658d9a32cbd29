"""The charge and command scripts on a real Redis, driven side by side with the model.

hypothesis plays random sequences of charges (export, push, verification; contacts
with and without their company, companies, duplicates, partial and all-or-nothing,
``max_credits``, quotes, invalid requests, replays and conflicting replays), license
commands (periods, grants, members, allow/disallow by admins and by others, replays,
conflicts, invalid ones) and clock moves (across windows, to their exact ends, across
period starts and ends), holds (placed, settled with some of their items, released,
replayed, expired by the sweep or by a new period), members' credit limits and refunds.
Every answer of the scripts must equal the model's, and after every step the
organisations' Redis state must equal the model's state, and the accounting identity of
DESIGN §1 must hold: credits + grants - balance = charged - refunded + held.

CI runs at least 2,000 steps; run more by hand with, e.g.,
``CREDITGATE_MODEL_EXAMPLES=1000 pytest tests/model``
(``CREDITGATE_MODEL_STEPS`` sets the steps per example).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.decisions import RequestView
from creditgate.domain.holds import HoldSettlement, HoldTarget, delivered_indexes
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.settings import Settings
from creditgate.store.calls import ChargeAnswer, ChargeCall, CommandAnswer, InvalidCommand
from creditgate.store.gateway import CreditStore
from creditgate.store.holds import HoldSweepIndex
from creditgate.stream.decider import aim_refunds
from tests.model.reference import CommandOutcome, Decision, Model, Resolution

pytestmark = pytest.mark.integration

# CI plays the same examples every run (derandomized), so it is never flaky and its
# coverage is known; a run by hand with CREDITGATE_MODEL_EXAMPLES explores new ones.
BY_HAND = "CREDITGATE_MODEL_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("CREDITGATE_MODEL_EXAMPLES", "60"))
STEPS_PER_EXAMPLE = int(os.environ.get("CREDITGATE_MODEL_STEPS", "50"))
MIN_STEPS_IN_CI = 2_000

SECOND_MS, DAY_MS = 1_000, 86_400_000
WINDOW = 30 * DAY_MS
# Far ahead of Redis's clock, so the PXAT of a window never passes during a run: a
# window ends when the decision clock says so, as in test_charge_rules
DAY0 = to_ms(datetime(2100, 1, 4, 9, 0, tzinfo=UTC))

ORGS = ("acme", "globex")
USERS = ("admin", "u1", "u2", "u3")
CONTACTS = ("c0", "c1", "c2", "c3", "c4")
COMPANIES = ("co0", "co1", "co2")
GRANTS = ("g0", "g1", "g2", "g3")
# window keys the scripts may write, by the names store.keys gives them
WINDOW_NAMES = (
    [f"contact:{c}" for c in CONTACTS]
    + [f"company:{c}" for c in COMPANIES]
    + [f"verify:{c}" for c in CONTACTS]
)


# how often each kind of answer came up over the whole run; a CI-sized run must have
# seen each of MUST_COVER at least once, or it did not test what it claims to
COVERAGE: Counter[str] = Counter()
MUST_COVER = (
    *(f"charge decided: {r}" for r in ("approved", "not_a_member", "credits_disallowed")),
    *(f"charge decided: {r}" for r in ("no_active_license", "license_period_ended")),
    *(f"charge decided: {r}" for r in ("exceeds_max_credits", "insufficient_credits")),
    "charge decided: invalid_request",
    "charge replay: approved",
    "charge conflict: approved",
    "charge partially approved",
    *(f"item outcome: {o}" for o in ("charged", "free_repeat", "duplicate_in_request")),
    *(f"item outcome: {o}" for o in ("no_verified_email", "not_charged")),
    "company window opened by a contact",
    "company free after its contact in the same request",
    "note: credits.threshold_reached",
    "note: credits.insufficient",
    "note: credits.disallowed",
    "quote",
    "credits.grant decided: applied",
    "credits.grant decided: duplicate_grant",
    "credits.grant decided: no_active_license",
    "member.set_credits_allowed decided: applied",
    "member.set_credits_allowed decided: not_an_admin",
    "member.remove decided: applied",
    "license.start_period replay: applied",
    "member.upsert conflict: applied",
    "invalid command",
    "charge decided: user_limit_reached",
    "note: credits.user_limit_reached",
    "item outcome: held",
    "member.set_credit_limit decided: applied",
    "charge.refund decided: applied",
    "charge.refund decided: nothing_to_refund",
    "charge.refund decided: license_period_ended",
    "window closed by a refund",
    "a settled hold refunded",
    *(f"hold decided: {s}" for s in ("settled", "released", "expired")),
    *(f"hold decided: {r}" for r in ("hold_already_resolved", "item_not_held")),
    "hold decided: hold_not_found",
    "hold replay: settled",
    "hold notdue",
    "hold item outcome: free_repeat",
    "hold item outcome: released",
    "hold ended with its period",
)


def covered(what: str) -> None:
    COVERAGE[what] += 1


def contact(contact_id: str, company_id: str | None) -> dict[str, Any]:
    item = {"type": "contact", "id": contact_id}
    return item if company_id is None else {**item, "company_id": company_id}


items_strategy = st.lists(
    st.one_of(
        st.builds(contact, st.sampled_from(CONTACTS), st.none() | st.sampled_from(COMPANIES)),
        st.builds(lambda c: {"type": "company", "id": c}, st.sampled_from(COMPANIES)),
    ),
    min_size=1,
    max_size=6,
)
max_credits_strategy = st.none() | st.integers(0, 6)
credits_strategy = st.integers(0, 20)
# mostly users who are members, so that most charges get past the permission checks
users_strategy = st.sampled_from(["u1", "u1", "u2", "admin", "u3"])


def decision_of(answer: ChargeAnswer) -> Decision:
    """The script's answer in the model's terms."""
    record = answer.record
    return Decision(
        answer.status,
        record.approved,
        record.reason.value if record.reason else None,
        tuple(outcome.value for outcome in record.outcomes),
        tuple(record.free_until_ms),
        record.credits,
        record.needed,
        record.balance,
        record.period_id,
        tuple((n["type"], n["to"], n.get("threshold")) for n in record.notes),
        record.saved,
        record.sequence,
        record.held,
        record.hold_expires_ms,
        record.limit_left,
    )


def resolution_of(answer: ChargeAnswer) -> Resolution:
    record, raw = answer.record, answer.record.raw
    return Resolution(
        answer.status,
        record.status,
        record.reason.value if record.reason else None,
        tuple(outcome.value for outcome in record.outcomes),
        tuple(record.free_until_ms),
        record.credits,
        int(raw.get("released", 0)),
        int(raw.get("delta", 0)),
        record.balance,
        record.sequence,
    )


def command_outcome_of(answer: CommandAnswer) -> CommandOutcome:
    record = answer.record
    state = record.state
    if state is not None and "period_id" in state:
        keep = ("period_id", "credits", "granted", "balance")
        state = {k: state[k] for k in keep if k in state}
    return CommandOutcome(
        answer.status,
        record.applied,
        record.reason,
        record.sequence,
        state,
        record.balance,
        record.delta,
        record.expired,
    )


class ScriptsAgainstModel(RuleBasedStateMachine):
    redis_url: ClassVar[str] = ""
    steps_run: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(
            redis_url=self.redis_url,
            key_prefix=f"m{uuid.uuid4().hex[:12]}",
            repeat_window_days=WINDOW / DAY_MS,
            threshold_percents=(80, 90, 100),
        )
        self.store = CreditStore.from_settings(self.settings)
        self.sweep = HoldSweepIndex.from_settings(self.settings)
        self.model = Model()
        # holds sent (org, request_id, items), and settlements sent, to replay them
        self.holds: list[tuple[str, str, list[dict[str, Any]]]] = []
        self.settlements: list[dict[str, Any]] = []
        self.now = DAY0
        self.ids = itertools.count()
        # what was sent, to replay it: (the body the model reads, the script's call)
        self.requests: list[tuple[dict[str, Any], ChargeCall]] = []
        self.commands: list[dict[str, Any]] = []

    def teardown(self) -> None:
        async def clean() -> None:
            pattern = f"{self.settings.key_prefix}:*"
            # once per example, over the session Redis's keys (700,000 by the time the
            # model runs in CI): COUNT 1000 made it 700 round trips each, past the timeout
            client = self.store.client_for_tests
            keys = [key async for key in client.scan_iter(match=pattern, count=200_000)]
            if keys:
                await self.store.client_for_tests.delete(*keys)
            await self.store.close()
            await self.sweep.close()

        self.loop.run_until_complete(clean())
        self.loop.close()

    def _step(self) -> None:
        ScriptsAgainstModel.steps_run += 1

    # ---- charges -------------------------------------------------------------------

    def _send(self, body: dict[str, Any], call: ChargeCall) -> None:
        (answer,) = self.loop.run_until_complete(self.store.charge_many([call], self.now))
        record = answer.record
        if answer.status != "conflict" and record.is_hold and record.hold_expires_ms is not None:
            # as the worker notes each hold it publishes, replays too
            due = {call.org_id: record.hold_expires_ms}
            self.loop.run_until_complete(self.sweep.note(due))
        expected = self.model.charge(body, self.now)
        actual = decision_of(answer)
        assert actual == expected, (
            f"at {rfc3339(self.now)}: {body}\nLua   {actual}\nmodel {expected}"
        )
        self.requests.append((body, call))
        self._cover(body, actual, answer.record.opened, call, self.now)

    @staticmethod
    def _cover(
        body: dict[str, Any], decision: Decision, opened: Any, call: ChargeCall, now: int
    ) -> None:
        covered(f"charge {decision.answer}: {decision.reason or 'approved'}")
        if decision.answer != "decided":
            return
        for outcome in set(decision.outcomes):
            covered(f"item outcome: {outcome}")
        for note, _, _ in decision.notes:
            covered(f"note: {note}")
        if decision.approved and "not_charged" in decision.outcomes:
            covered("charge partially approved")
        if any(call.windows[slot].startswith("company:") for slot, _ in opened) and any(
            item.get("company_id") for item in body.get("items", [])
        ):
            covered("company window opened by a contact")
        # the open question of DESIGN: a company after its contact in one request is free
        for item, outcome, until in zip(
            body.get("items", []), decision.outcomes, decision.free_until, strict=False
        ):
            if item["type"] == "company" and outcome == "free_repeat" and until == now + WINDOW:
                covered("company free after its contact in the same request")

    def _request(self, org: str, user: str, action: str, items: list[Any], **fields: Any) -> Any:
        return ChargeRequest.model_validate(
            {
                "request_id": f"r{next(self.ids)}",
                "org_id": org,
                "user_id": user,
                "action": action,
                "items": items,
                "requested_at": rfc3339(self.now),
                **fields,
            }
        )

    def _charge(self, request: ChargeRequest) -> None:
        # the model reads the canonical body: equal bodies are equal fingerprints
        body = request.model_dump(mode="json")
        if body["hold"] is None:
            del body["hold"]
        self._send(body, ChargeCall.of(request))
        if request.hold is not None:
            items = [item.model_dump(exclude_none=True) for item in request.items]
            self.holds.append((request.org_id, request.request_id, items))

    @rule(
        data=st.data(),
        org=st.sampled_from(ORGS),
        action=st.sampled_from(["export", "crm_push"]),
        items=items_strategy,
        partial=st.booleans(),
        expires=st.sampled_from([None, None, 60, 3600, 86_400]),
    )
    def a_member_holds(
        self,
        data: st.DataObject,
        org: str,
        action: str,
        items: list[Any],
        partial: bool,
        expires: int | None,
    ) -> None:
        """A request with hold: its credits reserved until it is settled."""
        self._step()
        members = sorted(self.model.org(org).members) or ["u1"]
        user = data.draw(st.sampled_from(members))
        hold = {} if expires is None else {"expires_in_seconds": expires}
        on_insufficient = "partial" if partial else "reject"
        request = self._request(
            org, user, action, items, on_insufficient=on_insufficient, hold=hold
        )
        self._charge(request)

    # ---- holds resolved -------------------------------------------------------------

    def _resolve(self, org: str, hold_id: str, kind: str, body: dict[str, Any] | None) -> None:
        stored = self.loop.run_until_complete(self.store.stored_decision(org, hold_id))
        view = None
        fingerprint = ""
        if stored is not None and stored.summary is not None:
            view = RequestView.from_summary(org, hold_id, stored.summary)
            fingerprint = stored.record.fingerprint
        delivered: tuple[int, ...] = ()
        if body is not None and view is not None and kind == "settle":
            delivered = delivered_indexes(HoldSettlement.model_validate(body), view)
        settlement = None if body is None else HoldSettlement.model_validate(body)
        call = ChargeCall.resolving(
            org_id=org,
            settlement_id=hold_id if body is None else body["settlement_id"],
            hold_request_id=hold_id,
            mode=kind,  # type: ignore[arg-type]
            fingerprint="" if settlement is None else settlement.fingerprint(),
            target=HoldTarget(fingerprint, view, delivered),
        )
        (answer,) = self.loop.run_until_complete(self.store.charge_many([call], self.now))
        canonical = None if settlement is None else settlement.model_dump(mode="json")
        expected = self.model.resolve(org, kind, hold_id, self.now, canonical)
        actual = resolution_of(answer)
        if expected.answer in ("gone", "notdue"):
            assert actual.answer == expected.answer, f"{hold_id}\nLua   {actual}\nmodel {expected}"
        else:
            assert actual == expected, (
                f"{kind} {hold_id} at {rfc3339(self.now)}: {body}\nLua   {actual}\nmodel {expected}"
            )
        label = expected.reason or expected.status
        covered(
            f"hold {expected.answer}: {label}" if expected.answer != "notdue" else "hold notdue"
        )
        for outcome in set(expected.outcomes):
            covered(f"hold item outcome: {outcome}")
        if expected.status == "expired" and expected.delta < expected.released:
            covered("hold ended with its period")

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), release=st.booleans(), stranger=st.booleans())
    def a_hold_is_settled_or_released(
        self, data: st.DataObject, release: bool, stranger: bool
    ) -> None:
        self._step()
        org, hold_id, items = data.draw(st.sampled_from(self.holds))
        body: dict[str, Any] = {
            "settlement_id": f"s{next(self.ids)}",
            "org_id": org,
            "request_id": hold_id if not stranger or release else f"r{next(self.ids)}",
            "type": "hold.release" if release else "hold.settle",
        }
        if not release:
            delivered = data.draw(st.lists(st.sampled_from(items), max_size=len(items)))
            if stranger and data.draw(st.booleans()):
                delivered.append({"type": "contact", "id": "never-held"})
                body["request_id"] = hold_id
            body["items"] = [{"type": i["type"], "id": i["id"]} for i in delivered]
        self.settlements.append(body)
        self._resolve(org, body["request_id"], "release" if release else "settle", body)

    @rule(
        data=st.data(),
        org=st.sampled_from(ORGS),
        items=items_strategy,
        limit=st.none() | st.integers(0, 4),
        release=st.booleans(),
    )
    def a_member_holds_then_settles(
        self, data: st.DataObject, org: str, items: list[Any], limit: int | None, release: bool
    ) -> None:
        """The common case of a hold: held, then settled with what was delivered (under
        a credit limit the admin may have just set), or released (the work failed). The
        release is drawn here too: released at random, a hold is mostly resolved or
        unknown by then, and a release of a live hold came up once in 8,500 steps."""
        self._step()
        members = sorted(self.model.org(org).members) or ["u1"]
        user = data.draw(st.sampled_from(members))
        if limit is not None:
            self._command(
                self._new(org, "member.set_credit_limit", user_id=user, limit=limit, set_by="admin")
            )
        request = self._request(org, user, "export", items, hold={})
        self._charge(request)
        body: dict[str, Any] = {
            "settlement_id": f"s{next(self.ids)}",
            "org_id": org,
            "request_id": request.request_id,
            "type": "hold.release" if release else "hold.settle",
        }
        if not release:
            held = [item.model_dump(exclude_none=True) for item in request.items]
            delivered = data.draw(st.lists(st.sampled_from(held), max_size=len(held)))
            body["items"] = [{"type": i["type"], "id": i["id"]} for i in delivered]
        self.settlements.append(body)
        self._resolve(org, request.request_id, "release" if release else "settle", body)

    @precondition(lambda self: self.settlements)
    @rule(data=st.data(), other=st.booleans())
    def a_settlement_again(self, data: st.DataObject, other: bool) -> None:
        """A settlement redelivered, or its id used for another body."""
        self._step()
        body = dict(data.draw(st.sampled_from(self.settlements)))
        if other:
            body["reason"] = "another body"
        kind = "release" if body["type"] == "hold.release" else "settle"
        self._resolve(body["org_id"], body["request_id"], kind, body)

    @rule()
    def the_sweep_expires_what_is_due(self) -> None:
        """The worker's sweep: its index names what the model says is due."""
        self._step()
        due = self.loop.run_until_complete(self.sweep.due(self.now, orgs=10, holds=1000))
        for org_id in ORGS:
            org = self.model.org(org_id)
            expected = sorted(h for h, at in org.hold_expiries.items() if at <= self.now)
            assert sorted(due.get(org_id, [])) == expected, f"{org_id} at {rfc3339(self.now)}"
        done: dict[str, list[str]] = {}
        for org_id, hold_ids in due.items():
            for hold_id in hold_ids:
                self._resolve(org_id, hold_id, "expire", None)
                self.model.org(org_id).hold_expiries.pop(hold_id, None)
            done[org_id] = hold_ids
        self.loop.run_until_complete(self.sweep.expired(done))

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def an_expiry_too_early_or_again(self, data: st.DataObject) -> None:
        """The expire call for any hold: not due yet, resolved already, or due."""
        self._step()
        org, hold_id, _ = data.draw(st.sampled_from(self.holds))
        model_org = self.model.org(org)
        hold = model_org.holds.get(hold_id)
        license_ = model_org.license
        due = hold is not None and (
            license_ is None
            or license_.period_id != hold.period
            or self.now >= min(hold.expires, license_.ends)
        )
        if due:
            return  # left for the sweep, which also takes it out of the index
        self._resolve(org, hold_id, "expire", None)

    # ---- limits and refunds -----------------------------------------------------------

    @rule(
        org=st.sampled_from(ORGS),
        user=st.sampled_from(USERS),
        limit=st.integers(0, 6) | st.none(),
        by=st.sampled_from(["admin", "admin", "u1"]),
    )
    def an_admin_sets_a_credit_limit(self, org: str, user: str, limit: int | None, by: str) -> None:
        self._step()
        self._command(
            self._new(org, "member.set_credit_limit", user_id=user, limit=limit, set_by=by)
        )

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), every=st.booleans())
    def a_request_is_refunded(self, data: st.DataObject, every: bool) -> None:
        self._step()
        # holds half the time when there are some: few are settled, and a settled one is
        # refunded as its settlement charged it
        holds = [r for r in self.requests if "hold" in r[0]]
        pool = data.draw(st.sampled_from([self.requests, holds] if holds else [self.requests]))
        body, _ = data.draw(st.sampled_from(pool))
        fields: dict[str, Any] = {
            "request_id": body["request_id"],
            "reason": "the CRM refused it",
            "refunded_by": "cs-1",
        }
        items = body.get("items") or []
        if not every and items:
            named = data.draw(st.lists(st.sampled_from(items), min_size=1, max_size=3))
            fields["items"] = [{"type": i["type"], "id": i["id"]} for i in named]
        windows_before = dict(self.model.org(body["org_id"]).windows)
        outcome = self._command(self._new(body["org_id"], "charge.refund", **fields))
        if len(self.model.org(body["org_id"]).windows) < len(windows_before):
            covered("window closed by a refund")
        if outcome.applied and "hold" in body:
            covered("a settled hold refunded")

    @rule(
        org=st.sampled_from(ORGS),
        user=users_strategy,
        action=st.sampled_from(["export", "crm_push"]),
        items=items_strategy,
        partial=st.booleans(),
        max_credits=max_credits_strategy,
    )
    def export_or_push(
        self,
        org: str,
        user: str,
        action: str,
        items: list[Any],
        partial: bool,
        max_credits: int | None,
    ) -> None:
        self._step()
        on_insufficient = "partial" if partial else "reject"
        request = self._request(
            org, user, action, items, on_insufficient=on_insufficient, max_credits=max_credits
        )
        self._charge(request)

    @rule(
        data=st.data(),
        org=st.sampled_from(ORGS),
        action=st.sampled_from(["export", "crm_push"]),
        items=items_strategy,
        partial=st.booleans(),
    )
    def a_member_exports_or_pushes(
        self, data: st.DataObject, org: str, action: str, items: list[Any], partial: bool
    ) -> None:
        """The common case: a member, no max_credits."""
        self._step()
        members = sorted(self.model.org(org).members) or ["u1"]
        user = data.draw(st.sampled_from(members))
        on_insufficient = "partial" if partial else "reject"
        self._charge(self._request(org, user, action, items, on_insufficient=on_insufficient))

    @rule(
        org=st.sampled_from(ORGS),
        user=users_strategy,
        contact_id=st.sampled_from(CONTACTS),
        company_id=st.none() | st.sampled_from(COMPANIES),
        found=st.booleans(),
        max_credits=max_credits_strategy,
    )
    def verify(
        self,
        org: str,
        user: str,
        contact_id: str,
        company_id: str | None,
        found: bool,
        max_credits: int | None,
    ) -> None:
        self._step()
        items = [contact(contact_id, company_id)]
        request = self._request(
            org,
            user,
            "email_verification",
            items,
            verified_email_found=found,
            max_credits=max_credits,
        )
        self._charge(request)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """The same request again (a redelivery, a replay, a producer's retry)."""
        self._step()
        body, call = data.draw(st.sampled_from(self.requests))
        self._send(body, call)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), items=items_strategy, max_credits=max_credits_strategy)
    def request_id_with_another_body(
        self, data: st.DataObject, items: list[Any], max_credits: int | None
    ) -> None:
        """A used request_id with another body (or, by chance, the same one)."""
        self._step()
        valid = [body for body, _ in self.requests if "invalid" not in body]
        if not valid:
            return
        body = data.draw(st.sampled_from(valid))
        changed = {**body, "max_credits": max_credits}
        if body["action"] == "email_verification":
            changed["verified_email_found"] = not body["verified_email_found"]
        else:
            changed["items"] = items
        self._charge(ChargeRequest.model_validate(changed))

    @rule(
        org=st.sampled_from(ORGS),
        user=st.none() | users_strategy,
        action=st.sampled_from(list(Action)),
    )
    def invalid_request(self, org: str, user: str | None, action: Action) -> None:
        self._step()
        self._invalid_request(org, user, action)

    def _invalid_request(self, org: str, user: str | None, action: Action) -> None:
        """Readable ids, an invalid body: rejected once, like any decision."""
        request_id = f"r{next(self.ids)}"
        fingerprint = uuid.uuid4().hex
        call = ChargeCall.invalid(
            org_id=org,
            request_id=request_id,
            user_id=user,
            action=action,
            fingerprint=fingerprint,
            detail="invalid request: items: Field required",
        )
        body = {
            "org_id": org,
            "request_id": request_id,
            "user_id": user,
            "action": action.value,
            "invalid": fingerprint,
        }
        self._send(body, call)

    @rule(
        org=st.sampled_from(ORGS),
        user=users_strategy,
        action=st.sampled_from(["export", "crm_push"]),
        items=items_strategy,
        partial=st.booleans(),
        max_credits=max_credits_strategy,
    )
    def quote(
        self,
        org: str,
        user: str,
        action: str,
        items: list[Any],
        partial: bool,
        max_credits: int | None,
    ) -> None:
        """A quote decides like a charge and changes nothing."""
        self._step()
        on_insufficient = "partial" if partial else "reject"
        request = self._request(
            org, user, action, items, on_insufficient=on_insufficient, max_credits=max_credits
        )
        record = self.loop.run_until_complete(self.store.quote(ChargeCall.of(request), self.now))
        expected = self.model.charge(request.model_dump(mode="json"), self.now, quote=True)
        actual = decision_of(ChargeAnswer("decided", record))
        assert actual == expected, f"quote at {rfc3339(self.now)}\nLua   {actual}\nmodel {expected}"
        covered("quote")

    # ---- license commands ----------------------------------------------------------

    def _command(self, body: dict[str, Any]) -> CommandOutcome:
        command = license_command_adapter.validate_python(body)
        # a refund is applied as the worker applies it: the stored request read first
        (aimed,) = self.loop.run_until_complete(aim_refunds(self.store, [command]))
        (answer,) = self.loop.run_until_complete(self.store.apply_commands([aimed], self.now))
        if int(answer.record.raw.get("holds_ended", 0)):
            # as the worker does: a new period's holds are due now
            self.loop.run_until_complete(self.sweep.note({command.org_id: self.now}))
        expected = self.model.command(command.model_dump(mode="json"), self.now)
        actual = command_outcome_of(answer)
        assert actual == expected, (
            f"at {rfc3339(self.now)}: {body}\nLua   {actual}\nmodel {expected}"
        )
        self.commands.append(body)
        covered(f"{body['type']} {actual.answer}: {actual.reason or 'applied'}")
        return actual

    def _new(self, org: str, type_: str, **fields: Any) -> dict[str, Any]:
        return {"command_id": f"k{next(self.ids)}", "org_id": org, "type": type_, **fields}

    def _start_period(self, org: str, credits: int, starts_in_days: int, days: int) -> None:
        starts = self.now + starts_in_days * DAY_MS
        self._command(
            self._new(
                org,
                "license.start_period",
                period_id=f"p{next(self.ids)}",
                starts_at=rfc3339(starts),
                ends_at=rfc3339(starts + days * DAY_MS),
                credits=credits,
            )
        )

    @initialize(
        credits=st.tuples(credits_strategy, st.none() | credits_strategy),
        lengths=st.tuples(st.sampled_from([40, 400]), st.sampled_from([40, 400])),
    )
    def open_the_organisations(
        self, credits: tuple[int, int | None], lengths: tuple[int, int]
    ) -> None:
        """An admin and two members in each organisation, and a period (mostly)."""
        self._step()
        for org, amount, days in zip(ORGS, credits, lengths, strict=True):
            self._command(self._new(org, "member.upsert", user_id="admin", role="admin"))
            self._command(self._new(org, "member.upsert", user_id="u1", role="member"))
            self._command(self._new(org, "member.upsert", user_id="u2", role="member"))
            if amount is not None:
                self._start_period(org, amount, 0, days)

    @rule(
        org=st.sampled_from(ORGS),
        credits=credits_strategy,
        starts_in_days=st.sampled_from([-1, 0, 0, 2]),
        days=st.sampled_from([1, 10, 30, 400, 400]),
    )
    def start_period(self, org: str, credits: int, starts_in_days: int, days: int) -> None:
        self._step()
        self._start_period(org, credits, starts_in_days, days)

    @rule(org=st.sampled_from(ORGS), grant_id=st.sampled_from(GRANTS), credits=st.integers(1, 6))
    def grant(self, org: str, grant_id: str, credits: int) -> None:
        self._step()
        self._command(
            self._new(
                org,
                "credits.grant",
                grant_id=grant_id,
                credits=credits,
                reason="top-up",
                granted_by="cs-1",
            )
        )

    @rule(
        org=st.sampled_from(ORGS),
        change=st.sampled_from(["upsert", "upsert", "remove", "allow", "allow"]),
        user=st.sampled_from(USERS),
        role=st.sampled_from(["admin", "member", "member"]),
        allowed=st.booleans(),
        by=st.sampled_from(["admin", "admin", "u1", "u3"]),
    )
    def member_changes(
        self, org: str, change: str, user: str, role: str, allowed: bool, by: str
    ) -> None:
        """A member added or changed, removed, or allowed/disallowed by someone."""
        self._step()
        if change == "upsert":
            self._command(self._new(org, "member.upsert", user_id=user, role=role))
        elif change == "remove":
            self._command(self._new(org, "member.remove", user_id=user))
        else:
            self._command(
                self._new(
                    org, "member.set_credits_allowed", user_id=user, allowed=allowed, set_by=by
                )
            )

    @rule(data=st.data(), org=st.sampled_from(ORGS))
    def an_admin_disallows_a_member(self, data: st.DataObject, org: str) -> None:
        self._step()
        members = sorted(self.model.org(org).members) or ["u1"]
        user = data.draw(st.sampled_from(members))
        self._command(
            self._new(
                org, "member.set_credits_allowed", user_id=user, allowed=False, set_by="admin"
            )
        )

    @precondition(lambda self: self.commands)
    @rule(data=st.data())
    def replay_command(self, data: st.DataObject) -> None:
        self._step()
        self._command(data.draw(st.sampled_from(self.commands)))

    @precondition(lambda self: self.commands)
    @rule(data=st.data())
    def command_id_with_another_body(self, data: st.DataObject) -> None:
        self._step()
        body = data.draw(st.sampled_from(self.commands))
        self._command({**body, **self._other_body(body)})

    @rule(org=st.sampled_from(ORGS))
    def invalid_command(self, org: str) -> None:
        """Readable ids, an invalid body: refused, with a sequence like any decision."""
        self._step()
        command = InvalidCommand(org, f"k{next(self.ids)}", uuid.uuid4().hex, "invalid command")
        (answer,) = self.loop.run_until_complete(self.store.apply_commands([command], self.now))
        expected = self.model.invalid_command(org, command.command_id, command.fingerprint)
        actual = command_outcome_of(answer)
        assert actual == expected, f"{command}\nLua   {actual}\nmodel {expected}"
        assert (actual.applied, actual.reason, actual.state) == (False, "invalid_command", None)
        covered("invalid command")

    @staticmethod
    def _other_body(body: dict[str, Any]) -> dict[str, Any]:
        match body["type"]:
            case "license.start_period" | "credits.grant":
                return {"credits": body["credits"] + 1}
            case "member.upsert":
                return {"role": "member" if body["role"] == "admin" else "admin"}
            case "member.set_credits_allowed":
                return {"allowed": not body["allowed"]}
            case "member.set_credit_limit":
                return {"limit": (body["limit"] or 0) + 1}
            case "charge.refund":
                return {"reason": body["reason"] + " again"}
            case _:
                return {"user_id": body["user_id"] + "x"}

    # ---- the clock -----------------------------------------------------------------

    @rule(
        step=st.sampled_from(
            [SECOND_MS, 3600 * SECOND_MS, DAY_MS, DAY_MS, 10 * DAY_MS, 29 * DAY_MS, 31 * DAY_MS]
        ),
        jitter=st.integers(0, 1000),
    )
    def clock_moves_on(self, step: int, jitter: int) -> None:
        self._step()
        self.now += step + jitter

    @rule(data=st.data(), offset=st.sampled_from([-1, 0]))
    def clock_reaches_an_edge(self, data: st.DataObject, offset: int) -> None:
        """To the last moment before, or the very moment of, a window's or period's end."""
        self._step()
        edges: set[int] = set()
        for org in self.model.orgs.values():
            edges.update(org.windows.values())
            if org.license is not None:
                edges.update((org.license.starts, org.license.ends))
        ahead = sorted(edge + offset for edge in edges if edge + offset > self.now)
        if ahead:
            self.now = data.draw(st.sampled_from(ahead[:6]))

    # ---- the state after every step -------------------------------------------------

    @invariant()
    def redis_holds_the_model_state(self) -> None:
        for org_id in ORGS:
            org = self.model.org(org_id)
            stored = self.loop.run_until_complete(self._stored(org_id))
            license_ = org.license
            expected_license: dict[str, str] = {}
            if license_ is not None:
                expected_license = {
                    "period_id": license_.period_id,
                    "starts_ms": str(license_.starts),
                    "ends_ms": str(license_.ends),
                    "credits": str(license_.credits),
                    "granted": str(license_.granted),
                    "balance": str(license_.balance),
                    **{f"thr:{p}": "1" for p in license_.thresholds_notified},
                }
                if license_.insufficient_notified:
                    expected_license["insufficient_notified"] = "1"
                expected_license.update({f"uln:{u}": "1" for u in license_.limit_notified})
                if license_.held is not None:
                    expected_license["held"] = str(license_.held)
                # DESIGN §1: never below zero; credits + grants - balance = charged -
                # refunded + held, held counting the open holds of the period
                assert license_.balance >= 0
                used = license_.credits + license_.granted - license_.balance
                held = sum(h.credits for h in org.holds.values() if h.period == license_.period_id)
                assert used == org.charged_this_period + held
            windows = {
                f"{kind}:{entity}": str(ends) for (kind, entity), ends in org.windows.items()
            }
            expected = {
                "license": expected_license,
                "members": org.members,
                "disallowed": org.disallowed,
                "sequence": str(org.sequence) if org.sequence else None,
                "usage": {k: str(v) for k, v in org.usage.items()},
                "windows": windows,
                "limits": {u: str(limit) for u, limit in org.limits.items()},
                "holds": sorted(org.holds),
                "hold_expiries": sorted((h, float(at)) for h, at in org.hold_expiries.items()),
            }
            assert stored == expected, f"{org_id} at {rfc3339(self.now)}"

    async def _stored(self, org_id: str) -> dict[str, Any]:
        keys = self.store.keys.org(org_id)
        redis = self.store.client_for_tests
        pipe = redis.pipeline(transaction=False)
        pipe.hgetall(keys.license)
        pipe.hgetall(keys.members)
        pipe.smembers(keys.disallowed)
        pipe.get(keys.sequence)
        pipe.hgetall(keys.usage)
        pipe.mget([keys.window(name) for name in WINDOW_NAMES])
        pipe.hgetall(keys.limits)
        pipe.hkeys(keys.holds)
        pipe.zrange(keys.hold_expiries, 0, -1, withscores=True)
        found = await pipe.execute()
        license_, members, disallowed, sequence, usage, ends, limits, holds, expiries = found
        return {
            "license": license_,
            "members": members,
            "disallowed": disallowed,
            "sequence": sequence,
            "usage": usage,
            "windows": {n: e for n, e in zip(WINDOW_NAMES, ends, strict=True) if e is not None},
            "limits": limits,
            "holds": sorted(holds),
            "hold_expiries": sorted((h, float(at)) for h, at in expiries),
        }


@pytest.mark.timeout(0 if BY_HAND else 300)  # a long run by hand has no time limit
# The scripts decide the same on a cluster node (every call touches one slot); the
# cluster's own part, routing the calls, is checked by the rule suite on the cluster.
@pytest.mark.single_redis
def test_the_scripts_decide_like_the_model(endpoints: tuple[str, str]) -> None:
    # a database of its own: each example clears its keys with a SCAN, which would
    # otherwise walk every key the session's other tests left (700,000 in CI)
    own_database = urlsplit(endpoints[1])._replace(path="/1").geturl()
    machine = type("Machine", (ScriptsAgainstModel,), {"redis_url": own_database})
    ScriptsAgainstModel.steps_run = 0
    COVERAGE.clear()
    # The derandomized examples differ with the process's state (other tests run first
    # change what hypothesis draws), so a CI run explores further, with more examples,
    # until every situation of MUST_COVER was reached: never fewer, never flaky.
    examples = EXAMPLES
    for _ in range(1 if BY_HAND else 3):
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=STEPS_PER_EXAMPLE,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=True,
                derandomize=not BY_HAND,
            ),
        )
        if all(COVERAGE[what] for what in MUST_COVER):
            break
        examples *= 2
    print(f"{ScriptsAgainstModel.steps_run} steps in {EXAMPLES} examples")
    for what, count in sorted(COVERAGE.items()):
        print(f"{count:6}  {what}")
    if not BY_HAND:
        assert ScriptsAgainstModel.steps_run >= MIN_STEPS_IN_CI
    if ScriptsAgainstModel.steps_run >= MIN_STEPS_IN_CI:
        assert not [what for what in MUST_COVER if not COVERAGE[what]], "not covered"

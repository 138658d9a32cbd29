"""A reference model of DESIGN §1 in plain Python, for the model-based test.

Written from DESIGN.md, not from the Lua, and importing nothing of creditgate: it
works on the JSON bodies of requests and commands. Where DESIGN leaves a choice open,
the model takes the reading named in a comment, so a disagreement with the scripts
is a finding rather than noise:

- Items are decided in request order; a contact *charged* with its company opens that
  company's window, so a company item after such a contact in the same request is a
  free repeat, while one before it is charged (DESIGN leaves this order open).
- ``max_credits`` is compared with what the whole request needs, before partial
  approval is considered: a quote that turned out too low is refused, never cut down.
- With ``partial``, a request that can neither charge nor reuse anything is rejected
  (``insufficient_credits``) rather than approved for nothing.
- Idempotency records never expire here: DESIGN asks that they live *at least* as
  long as a replay allows, and the test's decision clock runs far ahead of Redis's.
- A member's credit limit is checked after ``max_credits`` and before the balance; when
  both are short with ``partial``, the request is cut to what both cover and, if that is
  nothing, refused for the tighter of the two (``user_limit_reached`` when the limit is).
- A hold's expiry is capped at its period's end; a new period makes every open hold due
  at once and its credits go with the old period (the expiry gives none back). Thresholds
  count held credits as used (they left the balance).
- A refund closes a window this request opened once no charged, unrefunded item of the
  request still uses it (its own window or its company's).
- A hold is refunded as its settlement charged it (its outcomes, the windows it opened);
  an open, released or expired hold has nothing to refund.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

WINDOW_MS = 30 * 86_400_000
THRESHOLDS = (80, 90, 100)


@dataclass(frozen=True)
class Decision:
    """What a charge decision says; ``answer`` is decided, replay or conflict."""

    answer: str
    approved: bool
    reason: str | None
    outcomes: tuple[str, ...]
    free_until: tuple[int, ...]
    credits: int
    needed: int
    balance: int
    period_id: str | None
    notes: tuple[tuple[str, str, int | None], ...]
    saved: int
    sequence: int | None
    held: int = 0
    hold_expires: int | None = None
    limit_left: int | None = None


@dataclass(frozen=True)
class Resolution:
    """What a hold's settlement, release or expiry says; ``answer`` is decided, replay,
    conflict, or for an expiry gone (nothing open) or notdue."""

    answer: str
    status: str  # settled | released | expired | rejected
    reason: str | None
    outcomes: tuple[str, ...]
    free_until: tuple[int, ...]
    credits: int
    released: int
    delta: int
    balance: int
    sequence: int | None


@dataclass
class Hold:
    expires: int
    credits: int
    user: str
    action: str
    period: str
    body: dict[str, Any]
    outcomes: tuple[str, ...]
    free_until: tuple[int, ...]


@dataclass(frozen=True)
class CommandOutcome:
    answer: str
    applied: bool
    reason: str | None
    sequence: int | None
    state: dict[str, Any] | None
    balance: int | None = None
    delta: int = 0
    expired: int = 0


@dataclass
class License:
    period_id: str
    starts: int
    ends: int
    credits: int
    granted: int = 0
    balance: int = 0
    thresholds_notified: set[int] = field(default_factory=set)
    insufficient_notified: bool = False
    limit_notified: set[str] = field(default_factory=set)
    # the license's "held" field (open holds of the period), once a hold wrote it
    held: int | None = None

    @property
    def total(self) -> int:
        return self.credits + self.granted


@dataclass
class Org:
    license: License | None = None
    members: dict[str, str] = field(default_factory=dict)
    disallowed: set[str] = field(default_factory=set)
    # window name -> the moment it ends; a window is open while its end is ahead
    windows: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: dict[str, tuple[dict[str, Any], Decision]] = field(default_factory=dict)
    commands: dict[str, tuple[dict[str, Any], CommandOutcome]] = field(default_factory=dict)
    grant_ids: set[str] = field(default_factory=set)
    sequence: int = 0
    # "<period>|<user>|<action>|<metric>" -> count, the usage report's figures
    usage: dict[str, int | str] = field(default_factory=dict)
    charged_this_period: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    # holds: the open ones, those the sweep has not taken out yet (by expiry), how each
    # ended, and settlements by id
    holds: dict[str, Hold] = field(default_factory=dict)
    hold_expiries: dict[str, int] = field(default_factory=dict)
    resolutions: dict[str, Resolution] = field(default_factory=dict)
    settlements: dict[str, tuple[dict[str, Any], Resolution]] = field(default_factory=dict)
    # per request: the windows its decision opened, and its items refunded (0-based)
    opened: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)
    refunded: dict[str, set[int]] = field(default_factory=dict)

    def window_open_until(self, window: tuple[str, str], now: int) -> int | None:
        ends = self.windows.get(window)
        return ends if ends is not None and ends > now else None

    def license_state(self) -> dict[str, Any]:
        if self.license is None:
            return {"period_id": None}
        return {
            "period_id": self.license.period_id,
            "credits": self.license.credits,
            "granted": self.license.granted,
            "balance": self.license.balance,
        }

    def member_state(self, user: str) -> dict[str, Any]:
        role = self.members.get(user)
        return {
            "user_id": user,
            "role": role,
            "credits_allowed": role is not None and user not in self.disallowed,
            "credit_limit": self.limits.get(user),
        }

    def used_by(self, period: str, user: str) -> int:
        """What a member's credit limit counts: charged + held - refunded, every action."""
        total = 0
        for action in ("export", "crm_push", "email_verification"):
            for metric, sign in (("credits", 1), ("held", 1), ("refunded", -1)):
                found = self.usage.get(f"{period}|{user}|{action}|{metric}", 0)
                assert isinstance(found, int)
                total += sign * found
        return total


@dataclass
class _Plan:
    """How a request's items would be decided with ``budget`` credits to spend."""

    outcomes: list[str]
    free_until: list[int]
    opens: dict[tuple[str, str], int]
    needed: int = 0
    charged: int = 0
    free: int = 0


class Model:
    """Every organisation's state, and the rules that change it."""

    def __init__(
        self,
        window_ms: int = WINDOW_MS,
        thresholds: tuple[int, ...] = THRESHOLDS,
        hold_seconds: int = 900,
    ) -> None:
        self.window_ms = window_ms
        self.thresholds = thresholds
        self.hold_seconds = hold_seconds
        self.orgs: dict[str, Org] = {}

    def org(self, org_id: str) -> Org:
        return self.orgs.setdefault(org_id, Org())

    # ---- charges -------------------------------------------------------------------

    def charge(self, body: dict[str, Any], now: int, *, quote: bool = False) -> Decision:
        """Decide a request body (``invalid`` in it: readable ids, an invalid body)."""
        org = self.org(body["org_id"])
        stored = None if quote else org.requests.get(body["request_id"])
        if stored is not None:
            stored_body, decision = stored
            # the stored decision stands, for the same body and for another one
            return replace(decision, answer="replay" if stored_body == body else "conflict")
        if quote:
            # a quote decides the same way and changes nothing
            return self._decide(copy.deepcopy(org), body, now, quote=True)
        decision = self._decide(org, body, now, quote=False)
        org.sequence += 1
        decision = replace(decision, sequence=org.sequence)
        org.requests[body["request_id"]] = (copy.deepcopy(body), decision)
        return decision

    def _decide(  # noqa: PLR0915 - every rule of a decision, in DESIGN's order, in one place
        self, org: Org, body: dict[str, Any], now: int, *, quote: bool
    ) -> Decision:
        license_ = org.license
        items: list[dict[str, Any]] = [] if "invalid" in body else body["items"]
        user, action = body.get("user_id") or "", body["action"]
        usage = f"{license_.period_id}|{user}|{action}|" if license_ else None
        notes: list[tuple[str, str, int | None]] = []

        def count(metric: str, amount: int) -> None:
            assert license_ is not None
            count_usage(org.usage, license_.period_id, user, action, metric, amount)

        limit_left: int | None = None

        def reject(reason: str, needed: int = 0) -> Decision:
            if usage is not None and not quote:
                count("rejected", 1)
            return replace(
                _rejected(reason, needed),
                limit_left=limit_left,
            )

        def _rejected(reason: str, needed: int) -> Decision:
            return Decision(
                "decided",
                False,
                reason,
                ("not_charged",) * len(items),
                (0,) * len(items),
                0,
                needed,
                license_.balance if license_ else 0,
                license_.period_id if license_ else None,
                tuple(notes),
                0,
                None,
            )

        if "invalid" in body:
            return reject("invalid_request")
        # Permissions: only members use the credits, and not when an admin disallowed it
        if user not in org.members:
            return reject("not_a_member")
        if user in org.disallowed:
            notes.append(("credits.disallowed", "user", None))
            return reject("credits_disallowed")
        # License: a period must have started and not ended
        if license_ is None or now < license_.starts:
            return reject("no_active_license")
        if now >= license_.ends:
            return reject("license_period_ended")
        plan = self._plan(org, body, now, budget=None)
        # The quote is a ceiling
        if body.get("max_credits") is not None and plan.needed > body["max_credits"]:
            return reject("exceeds_max_credits", plan.needed)
        partial = body.get("on_insufficient", "reject") == "partial"
        # The member's credit limit of the period, before the balance
        room = license_.balance
        limited = False
        if user in org.limits:
            limit_left = max(0, org.limits[user] - org.used_by(license_.period_id, user))
            room = min(room, limit_left)
            limited = plan.needed > limit_left
        if limited:
            if user not in license_.limit_notified:
                notes.append(("credits.user_limit_reached", "user", None))
                notes.append(("credits.user_limit_reached", "admin", None))
                if not quote:
                    license_.limit_notified.add(user)
            if not partial:
                return reject("user_limit_reached", plan.needed)
        # All or nothing by default; partial: as many items as the balance covers
        short = plan.needed > license_.balance
        if short:
            notes.append(("credits.insufficient", "user", None))
            if not license_.insufficient_notified:
                notes.append(("credits.insufficient", "admin", None))
                if not quote:
                    license_.insufficient_notified = True
            if not partial:
                return reject("insufficient_credits", plan.needed)
        if short or limited:
            needed = plan.needed
            plan = self._plan(org, body, now, budget=room)
            plan.needed = needed
            if plan.charged + plan.free == 0:
                tighter = limit_left is not None and limit_left < license_.balance
                return reject("user_limit_reached" if tighter else "insufficient_credits", needed)
        balance = license_.balance - plan.charged
        if limit_left is not None:
            limit_left -= plan.charged
        hold = body.get("hold")
        hold_expires = None if hold is None else self._held(plan, hold, now, license_.ends)
        # thresholds of the period's credits (amount plus grants) used, once each
        if plan.charged > 0 and license_.total > 0:
            used = license_.total - balance
            for percent in self.thresholds:
                reached = used * 100 >= percent * license_.total
                if reached and percent not in license_.thresholds_notified:
                    notes.append(("credits.threshold_reached", "admin", percent))
                    if not quote:
                        license_.thresholds_notified.add(percent)
        if not quote:
            license_.balance = balance
            org.windows.update(plan.opens)
            count("held" if hold_expires is not None else "credits", plan.charged)
            if hold_expires is not None and plan.charged > 0:
                license_.held = (license_.held or 0) + plan.charged
            count("requests", 1)
            if plan.free:
                count("saved", plan.free)
            self._write(org, body, plan, hold_expires)
        return Decision(
            "decided",
            hold is None,
            None,
            tuple(plan.outcomes),
            tuple(plan.free_until),
            0 if hold is not None else plan.charged,
            plan.needed,
            balance,
            license_.period_id,
            tuple(notes),
            plan.free,
            None,
            plan.charged if hold is not None else 0,
            hold_expires,
            limit_left,
        )

    @staticmethod
    def _write(org: Org, body: dict[str, Any], plan: _Plan, hold_expires: int | None) -> None:
        """A decision's hold, or its charge's credits and windows, remembered."""
        assert org.license is not None
        if hold_expires is None:
            org.charged_this_period += plan.charged
            org.opened[body["request_id"]] = dict(plan.opens)
            return
        org.holds[body["request_id"]] = Hold(
            hold_expires,
            plan.charged,
            body["user_id"],
            body["action"],
            org.license.period_id,
            copy.deepcopy(body),
            tuple(plan.outcomes),
            tuple(plan.free_until),
        )
        org.hold_expiries[body["request_id"]] = hold_expires

    def _held(self, plan: _Plan, hold: dict[str, Any], now: int, period_ends: int) -> int:
        """A plan held rather than charged: no window opens until the hold is settled.
        Returns when the hold expires (at its period's end at the latest)."""
        plan.outcomes = ["held" if o == "charged" else o for o in plan.outcomes]
        plan.free_until = [
            0 if o == "held" else u for o, u in zip(plan.outcomes, plan.free_until, strict=True)
        ]
        plan.opens = {}
        seconds = min(hold.get("expires_in_seconds") or self.hold_seconds, 86_400)
        return min(now + seconds * 1000, period_ends)

    def _plan(
        self,
        org: Org,
        body: dict[str, Any],
        now: int,
        budget: int | None,
        only: set[int] | None = None,
    ) -> _Plan:
        """``only``: the items assessed (a settlement's delivered ones); others "skip"."""
        verification = body["action"] == "email_verification"
        plan = _Plan([], [], {})
        seen: set[tuple[str, str]] = set()
        new_end = now + self.window_ms

        def open_until(window: tuple[str, str]) -> int | None:
            # a window opened earlier in this request counts as much as a stored one
            if window in plan.opens:
                return plan.opens[window]
            return org.window_open_until(window, now)

        for index, item in enumerate(body["items"]):
            outcome, until = "not_charged", 0
            # Verification has its own window per contact; export and push share one
            # per contact and one per company
            window = ("verify" if verification else item["type"], item["id"])
            if only is not None and index not in only:
                outcome = "skip"
            elif verification and not body["verified_email_found"]:
                outcome = "no_verified_email"
            elif window in seen:
                outcome = "duplicate_in_request"
            else:
                seen.add(window)
                ends = open_until(window)
                if ends is not None:
                    outcome, until = "free_repeat", ends
                    plan.free += 1
                else:
                    plan.needed += 1
                    if budget is None or plan.charged < budget:
                        outcome, until = "charged", new_end
                        plan.charged += 1
                        plan.opens[window] = new_end
                        company = item.get("company_id")
                        # the company's data went out with the contact: its window opens
                        if not verification and company is not None:
                            company_window = ("company", company)
                            if open_until(company_window) is None:
                                plan.opens[company_window] = new_end
            plan.outcomes.append(outcome)
            plan.free_until.append(until)
        return plan

    # ---- license commands ----------------------------------------------------------

    def command(self, body: dict[str, Any], now: int) -> CommandOutcome:
        org = self.org(body["org_id"])
        stored = org.commands.get(body["command_id"])
        if stored is not None:
            stored_body, outcome = stored
            return replace(outcome, answer="replay" if stored_body == body else "conflict")
        outcome = self._apply(org, body, now)
        return self._decided(org, body, outcome)

    def invalid_command(self, org_id: str, command_id: str, fingerprint: str) -> CommandOutcome:
        """A command with readable ids and an invalid body: refused, once."""
        org = self.org(org_id)
        body = {"command_id": command_id, "invalid": fingerprint}
        stored = org.commands.get(command_id)
        if stored is not None:
            stored_body, outcome = stored
            return replace(outcome, answer="replay" if stored_body == body else "conflict")
        return self._decided(org, body, self._rejected("invalid_command", None))

    @staticmethod
    def _decided(org: Org, body: dict[str, Any], outcome: CommandOutcome) -> CommandOutcome:
        # every decided command, rejected ones too, has a ledger entry of its own (DESIGN
        # §3: a replay after a rebuild gets the same answer), so each takes a sequence
        org.sequence += 1
        outcome = replace(outcome, sequence=org.sequence)
        org.commands[body["command_id"]] = (copy.deepcopy(body), outcome)
        return outcome

    def _apply(self, org: Org, body: dict[str, Any], now: int) -> CommandOutcome:
        kind = body["type"]
        if kind == "license.start_period":
            # no rollover: what was left of the old period is gone
            expired = org.license.balance if org.license else 0
            org.license = License(
                body["period_id"],
                _ms(body["starts_at"]),
                _ms(body["ends_at"]),
                body["credits"],
                balance=body["credits"],
            )
            org.charged_this_period = 0
            # a hold does not survive its period: every one not yet expired is due now
            for hold_id in org.hold_expiries:
                org.hold_expiries[hold_id] = now
            return self._applied(
                org.license_state(),
                balance=body["credits"],
                delta=body["credits"] - expired,
                expired=expired,
            )
        if kind == "credits.grant":
            license_ = org.license
            # a top-up expires with its period: none without one, none after its end
            if license_ is None or now >= license_.ends:
                return self._rejected("no_active_license", org.license_state())
            if body["grant_id"] in org.grant_ids:
                return self._rejected("duplicate_grant", org.license_state())
            org.grant_ids.add(body["grant_id"])
            license_.granted += body["credits"]
            license_.balance += body["credits"]
            return self._applied(
                org.license_state(), balance=license_.balance, delta=body["credits"]
            )
        if kind == "charge.refund":
            return self._refund(org, body, now)
        user = body["user_id"]
        if kind == "member.upsert":
            org.members[user] = body["role"]
            return self._applied(org.member_state(user))
        if kind == "member.remove":
            if user not in org.members:
                return self._rejected("not_a_member", org.member_state(user))
            del org.members[user]
            org.disallowed.discard(user)
            org.limits.pop(user, None)
            return self._applied(org.member_state(user))
        # member.set_credits_allowed / set_credit_limit: only an admin, only for a member
        if org.members.get(body["set_by"]) != "admin":
            return self._rejected("not_an_admin", org.member_state(user))
        if user not in org.members:
            return self._rejected("not_a_member", org.member_state(user))
        if kind == "member.set_credit_limit":
            if body["limit"] is None:
                org.limits.pop(user, None)
            else:
                org.limits[user] = body["limit"]
            return self._applied(org.member_state(user))
        if body["allowed"]:
            org.disallowed.discard(user)
        else:
            org.disallowed.add(user)
        return self._applied(org.member_state(user))

    def _refund(self, org: Org, body: dict[str, Any], now: int) -> CommandOutcome:
        """Credits of charged items back, each once; windows this request opened close
        once no charged item of it that is not refunded uses them."""
        stored = org.requests.get(body["request_id"])
        if stored is None:
            return self._rejected("request_not_found", org.license_state())
        request, decision = stored
        outcomes = decision.outcomes
        if decision.held or decision.hold_expires is not None:
            # a hold charged what its settlement charged: that is what is refunded
            done = org.resolutions.get(body["request_id"])
            if done is None or done.status != "settled":
                return self._rejected("nothing_to_refund", org.license_state())
            outcomes = done.outcomes
        elif not decision.approved:
            return self._rejected("nothing_to_refund", org.license_state())
        license_ = org.license
        if license_ is None or decision.period_id != license_.period_id or now >= license_.ends:
            return self._rejected("license_period_ended", org.license_state())
        items = request["items"]
        named = [
            i
            for i, item in enumerate(items)
            if body.get("items") is None
            or any((n["type"], n["id"]) == (item["type"], item["id"]) for n in body["items"])
        ]
        refunded = org.refunded.setdefault(body["request_id"], set())
        now_refunded = [i for i in named if outcomes[i] == "charged" and i not in refunded]
        if not now_refunded:
            return self._rejected("nothing_to_refund", org.license_state())
        refunded.update(now_refunded)
        verification = request["action"] == "email_verification"
        used: set[tuple[str, str]] = set()
        for i, item in enumerate(items):
            if outcomes[i] == "charged" and i not in refunded:
                used.add(("verify" if verification else item["type"], item["id"]))
                if not verification and item.get("company_id"):
                    used.add(("company", item["company_id"]))
        for window, ends in org.opened.get(body["request_id"], {}).items():
            if window not in used and org.windows.get(window) == ends:
                del org.windows[window]
        credits = len(now_refunded)
        license_.balance += credits
        org.charged_this_period -= credits
        count_usage(
            org.usage,
            license_.period_id,
            request.get("user_id") or "",
            request["action"],
            "refunded",
            credits,
        )
        return self._applied(org.license_state(), balance=license_.balance, delta=credits)

    # ---- holds resolved ------------------------------------------------------------

    def resolve(
        self,
        org_id: str,
        kind: str,
        hold_id: str,
        now: int,
        settlement: dict[str, Any] | None = None,
    ) -> Resolution:
        """A hold settled (``kind`` settle, with the settlement's body), released or
        expired (no settlement: creditgate's own decision)."""
        org = self.org(org_id)
        if settlement is not None:
            stored = org.settlements.get(settlement["settlement_id"])
            if stored is not None:
                body, outcome = stored
                return replace(outcome, answer="replay" if body == settlement else "conflict")
        outcome = self._resolve(org, kind, hold_id, now, settlement)
        if outcome.answer != "decided":
            return outcome
        org.sequence += 1
        outcome = replace(outcome, sequence=org.sequence)
        if settlement is not None:
            org.settlements[settlement["settlement_id"]] = (copy.deepcopy(settlement), outcome)
        if outcome.status != "rejected":
            org.resolutions[hold_id] = outcome
        return outcome

    @staticmethod
    def _delivered(hold: Hold, settlement: dict[str, Any] | None) -> set[int] | None:
        """The hold's items a settlement delivers, by the first of its items each names;
        None when one names no item the hold held."""
        assert settlement is not None
        first: dict[tuple[str, str], int] = {}
        for i, item in enumerate(hold.body["items"]):
            first.setdefault((item["type"], item["id"]), i)
        only: set[int] = set()
        for item in settlement["items"]:
            index = first.get((item["type"], item["id"]))
            if index is None or hold.outcomes[index] != "held":
                return None
            only.add(index)
        return only

    def _resolve(
        self, org: Org, kind: str, hold_id: str, now: int, settlement: dict[str, Any] | None
    ) -> Resolution:
        license_ = org.license
        balance = license_.balance if license_ else 0

        def refuse(reason: str) -> Resolution:
            if kind == "expire":
                return Resolution("gone", "rejected", None, (), (), 0, 0, 0, balance, None)
            return Resolution("decided", "rejected", reason, (), (), 0, 0, 0, balance, None)

        placed = org.requests.get(hold_id)
        if placed is None or (placed[1].held == 0 and placed[1].hold_expires is None):
            return refuse("hold_not_found")
        hold = org.holds.get(hold_id)
        if hold is None:
            if kind == "expire":
                done = org.resolutions.get(hold_id)
                return refuse("") if done is None else replace(done, answer="replay")
            return refuse("hold_already_resolved")
        current = license_ is not None and license_.period_id == hold.period and now < license_.ends
        if current and now < hold.expires:
            if kind == "expire":
                return Resolution("notdue", "rejected", None, (), (), 0, 0, 0, balance, None)
        elif kind != "expire":
            return refuse("hold_already_resolved")
        only = self._delivered(hold, settlement) if kind == "settle" else set()
        if only is None:
            return refuse("item_not_held")
        plan = self._plan(org, hold.body, now, budget=None, only=only)
        outcomes, until = [], []
        for i, outcome in enumerate(plan.outcomes):
            if outcome == "skip":
                was_held = hold.outcomes[i] == "held"
                outcomes.append("released" if was_held else hold.outcomes[i])
                until.append(0 if was_held else hold.free_until[i])
            else:
                outcomes.append(outcome)
                until.append(plan.free_until[i])
        released = hold.credits - plan.charged
        # back to the hold's period, ended or not; none to a period that replaced it
        same_period = license_ is not None and license_.period_id == hold.period
        delta = released if same_period else 0
        org.windows.update(plan.opens)
        org.opened[hold_id] = dict(plan.opens)  # a refund of the settlement closes them
        if license_ is not None:
            license_.balance += delta
            balance = license_.balance
        if same_period:
            org.charged_this_period += plan.charged
            if hold.credits > 0 and license_ is not None:
                license_.held = (license_.held or 0) - hold.credits
        if hold.credits:
            count_usage(org.usage, hold.period, hold.user, hold.action, "held", -hold.credits)
        if plan.charged:
            count_usage(org.usage, hold.period, hold.user, hold.action, "credits", plan.charged)
        if plan.free:
            count_usage(org.usage, hold.period, hold.user, hold.action, "saved", plan.free)
        del org.holds[hold_id]
        if kind != "expire":
            org.hold_expiries.pop(hold_id, None)
        status = {"settle": "settled", "release": "released", "expire": "expired"}[kind]
        return Resolution(
            "decided",
            status,
            None,
            tuple(outcomes),
            tuple(until),
            plan.charged,
            released,
            delta,
            balance,
            None,
        )

    @staticmethod
    def _applied(state: dict[str, Any], **figures: Any) -> CommandOutcome:
        return CommandOutcome("decided", True, None, None, state, **figures)

    @staticmethod
    def _rejected(reason: str, state: dict[str, Any] | None) -> CommandOutcome:
        return CommandOutcome("decided", False, reason, None, state)


def _ms(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp).timestamp() * 1000)


def count_usage(
    usage: dict[str, int | str], period: str, user: str, action: str, metric: str, amount: int
) -> None:
    """A usage counter; a period's users are also listed once each, in order of first use."""
    if f"{period}|{user}|*" not in usage:
        usage[f"{period}|{user}|*"] = 1
        users = usage.get(f"{period}|*users")
        usage[f"{period}|*users"] = f"{users},{user}" if users is not None else user
    field = f"{period}|{user}|{action}|{metric}"
    current = usage.get(field, 0)
    assert isinstance(current, int)
    usage[field] = current + amount

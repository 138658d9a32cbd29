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
        }


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
        self, window_ms: int = WINDOW_MS, thresholds: tuple[int, ...] = THRESHOLDS
    ) -> None:
        self.window_ms = window_ms
        self.thresholds = thresholds
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

    def _decide(self, org: Org, body: dict[str, Any], now: int, *, quote: bool) -> Decision:
        license_ = org.license
        items: list[dict[str, Any]] = [] if "invalid" in body else body["items"]
        user, action = body.get("user_id") or "", body["action"]
        usage = f"{license_.period_id}|{user}|{action}|" if license_ else None
        notes: list[tuple[str, str, int | None]] = []

        def count(metric: str, amount: int) -> None:
            assert license_ is not None
            count_usage(org.usage, license_.period_id, user, action, metric, amount)

        def reject(reason: str, needed: int = 0) -> Decision:
            if usage is not None and not quote:
                count("rejected", 1)
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
        # All or nothing by default; partial: as many items as the balance covers
        if plan.needed > license_.balance:
            notes.append(("credits.insufficient", "user", None))
            if not license_.insufficient_notified:
                notes.append(("credits.insufficient", "admin", None))
                if not quote:
                    license_.insufficient_notified = True
            if body.get("on_insufficient", "reject") != "partial":
                return reject("insufficient_credits", plan.needed)
            needed = plan.needed
            plan = self._plan(org, body, now, budget=license_.balance)
            plan.needed = needed
            if plan.charged + plan.free == 0:
                return reject("insufficient_credits", needed)
        balance = license_.balance - plan.charged
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
            org.charged_this_period += plan.charged
            org.windows.update(plan.opens)
            assert usage is not None
            count("credits", plan.charged)
            count("requests", 1)
            if plan.free:
                count("saved", plan.free)
        return Decision(
            "decided",
            True,
            None,
            tuple(plan.outcomes),
            tuple(plan.free_until),
            plan.charged,
            plan.needed,
            balance,
            license_.period_id,
            tuple(notes),
            plan.free,
            None,
        )

    def _plan(self, org: Org, body: dict[str, Any], now: int, budget: int | None) -> _Plan:
        verification = body["action"] == "email_verification"
        plan = _Plan([], [], {})
        seen: set[tuple[str, str]] = set()
        new_end = now + self.window_ms

        def open_until(window: tuple[str, str]) -> int | None:
            # a window opened earlier in this request counts as much as a stored one
            if window in plan.opens:
                return plan.opens[window]
            return org.window_open_until(window, now)

        for item in body["items"]:
            outcome, until = "not_charged", 0
            # Verification has its own window per contact; export and push share one
            # per contact and one per company
            window = ("verify" if verification else item["type"], item["id"])
            if verification and not body["verified_email_found"]:
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
        user = body["user_id"]
        if kind == "member.upsert":
            org.members[user] = body["role"]
            return self._applied(org.member_state(user))
        if kind == "member.remove":
            if user not in org.members:
                return self._rejected("not_a_member", org.member_state(user))
            del org.members[user]
            org.disallowed.discard(user)
            return self._applied(org.member_state(user))
        # member.set_credits_allowed: only an admin may, and only for a member
        if org.members.get(body["set_by"]) != "admin":
            return self._rejected("not_an_admin", org.member_state(user))
        if user not in org.members:
            return self._rejected("not_a_member", org.member_state(user))
        if body["allowed"]:
            org.disallowed.discard(user)
        else:
            org.disallowed.add(user)
        return self._applied(org.member_state(user))

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

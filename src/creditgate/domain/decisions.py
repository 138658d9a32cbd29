"""Decision records and the messages rendered from them.

The charge script returns a compact *record* of its decision; everything published
(the result, the ledger entry, the notifications) is rendered from the record and the
request alone. Rendering is pure, so a replayed request re-emits identical messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from creditgate.domain.charges import Action, ChargeRequest, Outcome, Reason
from creditgate.domain.ids import rfc3339

# iterating an Enum class is slow (a generator over its members): once, here. Looking a
# member up by value through the class costs 0.7 µs, in a dict a twentieth of that.
_OUTCOMES = tuple(Outcome)
_OUTCOME_OF = {o.value: o for o in Outcome}
_REASON_OF = {r.value: r for r in Reason}

RESULT_APPROVED = "charge.approved"
RESULT_REJECTED = "charge.rejected"
RESULT_HELD = "charge.held"

# How many items a result lists at most, unless a caller says otherwise (the worker
# passes ``Settings.result_items_max``; see ``bounded_items``).
RESULT_ITEMS_MAX = 1000


def _as_list(value: Any) -> list[Any]:
    # Redis's cjson encodes an empty Lua table as {}: read that back as an empty list.
    return list(value) if isinstance(value, list) else []


# Records built for each decision (this one, the request's view and call, the answer,
# each message) are plain slotted dataclasses, not frozen ones: a frozen dataclass sets
# every field through object.__setattr__, and this 17-field record cost 4 µs more per
# decision that way. Nothing mutates them after construction.
@dataclass(slots=True)
class ChargeRecord:
    """The stored decision of one request, as the charge script wrote it."""

    request_id: str
    fingerprint: str
    decided_ms: int
    approved: bool
    reason: Reason | None
    detail: str | None
    credits: int
    needed: int
    balance: int
    period_id: str | None
    outcomes: list[Outcome]
    free_until_ms: list[int]
    opened: list[tuple[int, int]]
    notes: list[dict[str, Any]]
    saved: int
    sequence: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    # the member's credit limit of the period and what is left of it after the
    # decision (None: the member has no limit)
    limit: int | None = None
    limit_left: int | None = None
    # a hold: the credits it holds and when it expires (held is also a resolution's
    # status: "settled", "released" or "expired", see domain/holds.py)
    held: int = 0
    hold_expires_ms: int | None = None
    status: str = ""

    @classmethod
    def from_script(cls, data: dict[str, Any]) -> ChargeRecord:
        return cls(
            request_id=data["request_id"],
            fingerprint=data["fp"],
            decided_ms=int(data["at"]),
            approved=data["status"] == "approved",
            reason=_REASON_OF[data["reason"]] if data.get("reason") else None,
            detail=data.get("detail"),
            credits=int(data["credits"]),
            needed=int(data["needed"]),
            balance=int(data["balance"]),
            period_id=data.get("period") or None,
            outcomes=[_OUTCOME_OF[o] for o in _as_list(data.get("outcomes"))],
            free_until_ms=[int(u) for u in _as_list(data.get("until"))],
            opened=[(int(i), int(e)) for i, e in _as_list(data.get("opened"))],
            notes=_as_list(data.get("notes")),
            saved=int(data.get("saved", 0)),
            sequence=int(data["seq"]) if data.get("seq") is not None else None,
            raw=data,
            limit=int(data["limit"]) if data.get("limit") is not None else None,
            limit_left=int(data["limit_left"]) if data.get("limit_left") is not None else None,
            held=int(data.get("held", 0)),
            hold_expires_ms=int(data["hold_exp"]) if data.get("hold_exp") is not None else None,
            status=data["status"],
        )

    @property
    def is_hold(self) -> bool:
        """The decision held credits (``charge.held``)."""
        return self.status == "held"


@dataclass(slots=True)  # not frozen: one or more per decision (see ChargeRecord)
class RequestView:
    """What rendering needs of a request; an invalid request has no items or user."""

    org_id: str
    request_id: str
    user_id: str | None
    action: Action
    items: list[dict[str, Any]]
    reference: dict[str, Any] | None = None
    max_credits: int | None = None

    @classmethod
    def from_summary(cls, org_id: str, request_id: str, summary: str) -> RequestView:
        data = orjson.loads(summary)
        return cls(
            org_id=org_id,
            request_id=request_id,
            user_id=data.get("user_id"),
            action=Action(data["action"]),
            items=_as_list(data.get("items")),
            reference=data.get("reference") or None,
            max_credits=data.get("max_credits"),
        )

    @classmethod
    def of(cls, request: ChargeRequest) -> RequestView:
        return cls(
            org_id=request.org_id,
            request_id=request.request_id,
            user_id=request.user_id,
            action=request.action,
            items=[item.model_dump(exclude_none=True) for item in request.items],
            reference=request.reference,
            max_credits=request.max_credits,
        )


def _summary(view: RequestView) -> dict[str, Any]:
    return {
        "user_id": view.user_id,
        "action": view.action.value,
        "items": view.items,
        "reference": view.reference,
        "max_credits": view.max_credits,
    }


def request_summary(view: RequestView) -> str:
    """The request as stored beside its decision, for reports (``RequestView.from_summary``)."""
    return orjson.dumps(_summary(view)).decode()


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def charge_message(view: RequestView, record: ChargeRecord, window_days: float) -> str:
    """One sentence a person can read: what was charged, or why nothing was."""
    if record.is_hold:
        counts = {o: record.outcomes.count(o) for o in _OUTCOMES}
        parts = [
            f"{_plural(record.held, 'credit')} held until {rfc3339(record.hold_expires_ms or 0)}"
        ]
        if counts[Outcome.FREE_REPEAT]:
            parts.append(
                f"{_plural(counts[Outcome.FREE_REPEAT], 'item')} free within "
                f"its {window_days:g}-day window"
            )
        if counts[Outcome.NOT_CHARGED]:
            parts.append(f"{_plural(counts[Outcome.NOT_CHARGED], 'item')} not held")
        return ", ".join(parts)
    if record.approved:
        counts = {o: record.outcomes.count(o) for o in _OUTCOMES}
        parts = [f"{_plural(record.credits, 'credit')} charged"]
        if counts[Outcome.FREE_REPEAT]:
            parts.append(
                f"{_plural(counts[Outcome.FREE_REPEAT], 'item')} free within "
                f"its {window_days:g}-day window"
            )
        if counts[Outcome.DUPLICATE_IN_REQUEST]:
            parts.append(
                f"{_plural(counts[Outcome.DUPLICATE_IN_REQUEST], 'duplicate')} in the request"
            )
        if counts[Outcome.NO_VERIFIED_EMAIL]:
            parts.append("no verified email found")
        if counts[Outcome.NOT_CHARGED]:
            ran_out = (
                "the credit limit ran out"
                if record.limit_left is not None and record.limit_left < record.balance
                else "the balance ran out"
            )
            parts.append(f"{_plural(counts[Outcome.NOT_CHARGED], 'item')} not charged: {ran_out}")
        return ", ".join(parts)
    if record.detail:
        return record.detail
    user, org = view.user_id, view.org_id
    match record.reason:
        case Reason.CREDITS_DISALLOWED:
            return f"{user} is not allowed to use the credits of {org}; an admin can allow it"
        case Reason.INSUFFICIENT_CREDITS:
            return f"the request needs {_plural(record.needed, 'credit')}, {record.balance} left"
        case Reason.EXCEEDS_MAX_CREDITS:
            return (
                f"the request needs {_plural(record.needed, 'credit')}, more than its "
                f"max_credits of {view.max_credits}"
            )
        case Reason.USER_LIMIT_REACHED:
            return (
                f"the request needs {_plural(record.needed, 'credit')}, {user} has "
                f"{record.limit_left} left of a limit of {record.limit} this period"
            )
        case Reason.NOT_A_MEMBER:
            return f"{user} is not a member of {org}"
        case Reason.NO_ACTIVE_LICENSE:
            return f"{org} has no active license period"
        case Reason.LICENSE_PERIOD_ENDED:
            return f"the license period {record.period_id} of {org} has ended"
        case _:
            return str(record.reason)


def itemised(items: list[dict[str, Any]], record: ChargeRecord) -> list[dict[str, Any]]:
    """``items`` with the outcome ``record`` gave each (a free repeat with its
    free_until): a decision's, or a hold's resolution's."""
    out = []
    for item, outcome, until in zip(items, record.outcomes, record.free_until_ms, strict=False):
        entry = {**item, "outcome": outcome.value}
        if outcome is Outcome.FREE_REPEAT:
            entry["free_until"] = rfc3339(until)
        out.append(entry)
    return out


def item_counts(outcomes: list[str]) -> dict[str, int]:
    """Items per outcome, in the order ``Outcome`` lists them; outcomes with no item are
    left out: ``{"charged": 9000, "free_repeat": 1000}``."""
    found = dict.fromkeys(outcomes, 0)
    for outcome in outcomes:
        found[outcome] += 1
    return {o.value: found[o.value] for o in _OUTCOMES if o.value in found}


def bounded_items(items: list[dict[str, Any]], items_max: int) -> tuple[list[dict[str, Any]], bool]:
    """The items a result lists, and whether it left any out (``items_truncated``).

    Every item while there are at most ``items_max``; beyond that only the items whose
    outcome is not ``charged`` (what a caller must look at) when those are at most
    ``items_max``, otherwise none. The full list is paged by
    ``GET /v1/orgs/{org}/requests/{id}``.
    """
    if len(items) <= items_max:
        return items, False
    uncharged = [i for i in items if i["outcome"] != Outcome.CHARGED.value]
    return (uncharged if len(uncharged) <= items_max else []), True


def charge_result(
    view: RequestView,
    record: ChargeRecord,
    window_days: float,
    items_max: int | None = RESULT_ITEMS_MAX,
) -> dict[str, Any]:
    """The ``charge.approved`` / ``charge.rejected`` message of a decision.

    ``counts`` has the items per outcome; ``items`` lists them up to ``items_max``
    (``bounded_items``; None: all of them) and ``items_truncated`` says whether some
    were left out. It is always there: false for a result that lists every item.
    """
    items = itemised(view.items, record)
    listed, truncated = (items, False) if items_max is None else bounded_items(items, items_max)
    held = (
        {"credits_held": record.held, "hold_expires_at": rfc3339(record.hold_expires_ms or 0)}
        if record.is_hold
        else {}
    )
    return {
        "type": RESULT_HELD
        if record.is_hold
        else (RESULT_APPROVED if record.approved else RESULT_REJECTED),
        "request_id": view.request_id,
        "org_id": view.org_id,
        "user_id": view.user_id,
        "action": view.action.value,
        "credits_charged": record.credits,
        "counts": item_counts([i["outcome"] for i in items]),
        "items": listed,
        "items_truncated": truncated,
        "balance_after": record.balance,
        "period_id": record.period_id,
        "reason": record.reason.value if record.reason else None,
        "message": charge_message(view, record, window_days),
        "decided_at": rfc3339(record.decided_ms),
        "sequence": record.sequence,
        "reference": view.reference,
    } | held


def conflict_result(
    view: RequestView,
    stored: ChargeRecord,
    now_ms: int,
    items_max: int | None = RESULT_ITEMS_MAX,
) -> dict[str, Any]:
    """The answer to a second, different body under a used ``request_id``.

    It charges nothing and is not the request's decision: the stored one stands, so
    this answer carries no ledger sequence. Its items are bounded like a result's.
    """
    items = [{**item, "outcome": Outcome.NOT_CHARGED.value} for item in view.items]
    listed, truncated = (items, False) if items_max is None else bounded_items(items, items_max)
    return {
        "type": RESULT_REJECTED,
        "request_id": view.request_id,
        "org_id": view.org_id,
        "user_id": view.user_id,
        "action": view.action.value,
        "credits_charged": 0,
        "counts": {Outcome.NOT_CHARGED.value: len(items)} if items else {},
        "items": listed,
        "items_truncated": truncated,
        "balance_after": None,
        "period_id": stored.period_id,
        "reason": Reason.REQUEST_ID_CONFLICT.value,
        "message": (
            f"request_id {view.request_id} was already decided for another body "
            f"at {rfc3339(stored.decided_ms)}; that decision stands"
        ),
        "decided_at": rfc3339(now_ms),
        "sequence": None,
        "reference": view.reference,
    }


def charge_ledger_entry(
    view: RequestView, record: ChargeRecord, window_names: list[str]
) -> dict[str, Any]:
    """The ledger entry of a decision: enough to rebuild every key it wrote."""
    return {
        "org_id": view.org_id,
        "sequence": record.sequence,
        "kind": "held" if record.is_hold else ("charged" if record.approved else "rejected"),
        "request_id": view.request_id,
        "user_id": view.user_id,
        "action": view.action.value,
        "credits_delta": -(record.held if record.is_hold else record.credits),
        "balance_after": record.balance,
        "period_id": record.period_id,
        "recorded_at": rfc3339(record.decided_ms),
        "windows": [
            {"window": window_names[index], "ends_at_ms": ends} for index, ends in record.opened
        ],
        "decision": record.raw,
        # the request as stored beside the decision (user, action, items, reference)
        "request": _summary(view),
    }


def charge_notifications(view: RequestView, record: ChargeRecord) -> list[dict[str, Any]]:
    """Notifications the decision asked for, each with a deterministic id."""
    out = []
    for note in record.notes:
        kind = note["type"]
        recipient: dict[str, str]
        if note["to"] == "user" and view.user_id:
            recipient = {"user_id": view.user_id}
        else:
            recipient = {"role": "admin"}
        tag = recipient.get("user_id") or "admins"
        figures: dict[str, Any] = {"request_id": view.request_id, "action": view.action.value}
        if kind == "credits.insufficient":
            figures |= {"credits_needed": record.needed, "credits_left": record.balance}
        elif kind == "credits.threshold_reached":
            figures |= {
                "threshold_percent": note["threshold"],
                "credits_left": record.balance,
                "period_id": record.period_id,
            }
        elif kind == "credits.user_limit_reached":
            figures |= {
                "user_id": view.user_id,
                "credit_limit": record.limit,
                "credits_needed": record.needed,
                "limit_left": record.limit_left,
                "period_id": record.period_id,
            }
        elif kind == "credits.disallowed":
            figures |= {
                "message": "you do not have access to credits; ask an admin of your organisation"
            }
        suffix = f":{note['threshold']}" if "threshold" in note else ""
        out.append(
            {
                "notification_id": f"{view.org_id}:{view.request_id}:{kind}:{tag}{suffix}",
                "type": kind,
                "org_id": view.org_id,
                "recipient": recipient,
                "created_at": rfc3339(record.decided_ms),
                **figures,
            }
        )
    return out

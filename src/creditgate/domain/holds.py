"""Holds resolved: the contract of ``credits.hold.settlements`` and the messages a hold's
settlement, release or expiry publishes.

A charge request with ``hold`` is decided like a charge, but its chargeable credits are
held (``charge.held``, ``domain/decisions.py``). The hold is then resolved once: settled
with the items delivered (charged as decided at settle time), released, or expired by
creditgate itself. The charge script resolves it; its record (a ``ChargeRecord`` whose
status is ``settled``, ``released``, ``expired`` or ``rejected``) and the hold's request
are all a resolution's messages are rendered from, so a replay re-emits them identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from creditgate.domain.charges import Reason, body_fingerprint
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    bounded_items,
    item_counts,
    itemised,
)
from creditgate.domain.ids import Identifier, rfc3339

HOLD_SETTLE = "hold.settle"
HOLD_RELEASE = "hold.release"

RESULT_TYPES = {
    "settled": "hold.settled",
    "released": "hold.released",
    "expired": "hold.expired",
    "rejected": "hold.rejected",
}
LEDGER_KINDS = {
    "settled": "hold_settled",
    "released": "hold_released",
    "expired": "hold_expired",
    "rejected": "hold_rejected",
}


class DeliveredItem(BaseModel):
    """One of the hold's items, by type and id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["contact", "company"]
    id: Identifier


class HoldSettlement(BaseModel):
    """Settle a hold with the items delivered, or release it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settlement_id: Identifier
    org_id: Identifier
    request_id: Identifier = Field(description="the hold's request_id")
    type: Literal["hold.settle", "hold.release"]
    items: list[DeliveredItem] | None = Field(default=None, max_length=10_000)
    reason: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _items_of_a_settlement(self) -> HoldSettlement:
        if self.type == HOLD_SETTLE and self.items is None:
            raise ValueError("hold.settle takes the delivered items")
        if self.type == HOLD_RELEASE and self.items is not None:
            raise ValueError("hold.release takes no items")
        return self

    def fingerprint(self) -> str:
        return body_fingerprint(self.model_dump(mode="json"))


@dataclass(frozen=True)
class HoldTarget:
    """The hold as the worker read it before resolving it: the script's KEYS name the
    hold's windows, which only its stored items tell (as for a refund).

    ``fingerprint``: its stored decision's ("": none found); ``view``: its request;
    ``delivered``: per delivered item, the 0-based index of the hold's item it is (-1:
    none of them)."""

    fingerprint: str = ""
    view: RequestView | None = None
    delivered: tuple[int, ...] = ()


def delivered_indexes(settlement: HoldSettlement, view: RequestView) -> tuple[int, ...]:
    """Each delivered item as the index of the first of the hold's items it names (-1: it
    names none; the script then refuses with ``item_not_held``)."""
    first: dict[tuple[str, str], int] = {}
    for index, item in enumerate(view.items):
        first.setdefault((item["type"], item["id"]), index)
    return tuple(first.get((i.type, i.id), -1) for i in settlement.items or ())


@dataclass(frozen=True)
class SettlementView:
    """What rendering needs of a resolution: the settlement (None: an expiry) and the
    hold's request (None: not found)."""

    org_id: str
    request_id: str
    settlement_id: str | None
    hold: RequestView | None
    body: dict[str, Any] | None = None  # the settlement as sent (None: an expiry)


def resolution_message(record: ChargeRecord, window_days: float) -> str:
    """One sentence a person can read: what a hold's resolution charged and released."""
    raw = record.raw
    released = int(raw.get("released", 0))
    match record.status:
        case "settled":
            parts = [f"{record.credits} credit{'' if record.credits == 1 else 's'} charged"]
            if record.saved:
                parts.append(f"{record.saved} free within its {window_days:g}-day window")
            parts.append(f"{released} released")
            return ", ".join(parts)
        case "released":
            return f"{released} held credit{'' if released == 1 else 's'} released"
        case "expired":
            if int(raw.get("delta", 0)) < released:
                return f"the hold ended with its license period ({released} held)"
            return (
                f"the hold expired; {released} held credit{'' if released == 1 else 's'} released"
            )
    if record.detail:
        return record.detail
    match record.reason:
        case Reason.HOLD_NOT_FOUND:
            return f"no hold {record.request_id} is known"
        case Reason.HOLD_ALREADY_RESOLVED:
            return "the hold was resolved before"
        case Reason.ITEM_NOT_HELD:
            return "a delivered item is not one the hold held"
        case _:
            return str(record.reason)


def _items(view: SettlementView, record: ChargeRecord) -> list[dict[str, Any]]:
    if view.hold is None or record.status == "rejected":
        return []
    return itemised(view.hold.items, record)


def hold_result(
    view: SettlementView, record: ChargeRecord, window_days: float, items_max: int | None
) -> dict[str, Any]:
    """The ``hold.settled`` / ``hold.released`` / ``hold.expired`` / ``hold.rejected``
    message, keyed and identified by the hold's request_id."""
    items = _items(view, record)
    listed, truncated = (items, False) if items_max is None else bounded_items(items, items_max)
    raw, hold = record.raw, view.hold
    return {
        "type": RESULT_TYPES[record.status],
        "request_id": view.request_id,
        "settlement_id": view.settlement_id,
        "org_id": view.org_id,
        "user_id": raw.get("user") or (hold.user_id if hold else None),
        "action": raw.get("action") or (hold.action.value if hold else None),
        "credits_charged": record.credits,
        "credits_released": int(raw.get("released", 0)),
        "counts": item_counts([i["outcome"] for i in items]),
        "items": listed,
        "items_truncated": truncated,
        "balance_after": record.balance,
        "period_id": raw.get("hold_period") or record.period_id,
        "reason": record.reason.value if record.reason else None,
        "message": resolution_message(record, window_days),
        "decided_at": rfc3339(record.decided_ms),
        "sequence": record.sequence,
        "reference": hold.reference if hold else None,
    }


def settlement_conflict(view: SettlementView, now_ms: int) -> dict[str, Any]:
    """The answer to a second, different body under a used ``settlement_id``: it changes
    nothing and is no decision (no sequence)."""
    return {
        "type": RESULT_TYPES["rejected"],
        "request_id": view.request_id,
        "settlement_id": view.settlement_id,
        "org_id": view.org_id,
        "user_id": None,
        "action": None,
        "credits_charged": 0,
        "credits_released": 0,
        "counts": {},
        "items": [],
        "items_truncated": False,
        "balance_after": None,
        "period_id": None,
        "reason": Reason.REQUEST_ID_CONFLICT.value,
        "message": f"settlement_id {view.settlement_id} was already used for another "
        "settlement; its outcome stands",
        "decided_at": rfc3339(now_ms),
        "sequence": None,
        "reference": None,
    }


def hold_ledger_entry(
    view: SettlementView, record: ChargeRecord, window_names: tuple[str, ...]
) -> dict[str, Any]:
    """The ledger entry of a resolution: enough to restore what the script wrote (the
    hold closed, the windows opened, the balance and usage, the settlement's record)."""
    return {
        "org_id": view.org_id,
        "sequence": record.sequence,
        "kind": LEDGER_KINDS[record.status],
        "request_id": view.request_id,
        "settlement_id": view.settlement_id,
        "user_id": record.raw.get("user"),
        "action": record.raw.get("action"),
        "credits_delta": int(record.raw.get("delta", 0)),
        "balance_after": record.balance,
        "period_id": record.raw.get("hold_period") or record.period_id,
        "recorded_at": rfc3339(record.decided_ms),
        "windows": [
            {"window": window_names[index], "ends_at_ms": ends} for index, ends in record.opened
        ],
        "decision": record.raw,
        # who resolved it and why; the delivered items are the decision's outcomes (a
        # settlement of 10,000 items is not copied whole into one ledger message)
        "settlement": None
        if view.body is None
        else {k: v for k, v in view.body.items() if k != "items"},
    }

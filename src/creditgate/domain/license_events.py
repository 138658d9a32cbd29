"""Outcomes of license commands and the messages rendered from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from creditgate.domain.ids import rfc3339

COMMAND_APPLIED = "command.applied"
COMMAND_REJECTED = "command.rejected"

LEDGER_KINDS = {
    "license.start_period": "period_started",
    "credits.grant": "granted",
    "member.upsert": "member_changed",
    "member.remove": "member_changed",
    "member.set_credits_allowed": "member_changed",
    "member.set_credit_limit": "member_changed",
    "charge.refund": "refunded",
}
# every rejected command, whatever its type (an invalid one may have none)
REJECTED_KIND = "command_rejected"


def _state(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or not raw:
        return None
    state = {k: (None if v is False and k != "credits_allowed" else v) for k, v in raw.items()}
    for name in ("starts_ms", "ends_ms"):
        value = state.pop(name, None)
        if isinstance(value, int | float):
            state[name.replace("_ms", "_at")] = rfc3339(int(value))
    return state


@dataclass(frozen=True)
class CommandRecord:
    command_id: str
    fingerprint: str
    decided_ms: int
    applied: bool
    reason: str | None
    detail: str | None
    sequence: int | None
    state: dict[str, Any] | None
    delta: int
    balance: int | None
    expired: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_script(cls, data: dict[str, Any]) -> CommandRecord:
        return cls(
            command_id=data["command_id"],
            fingerprint=data["fp"],
            decided_ms=int(data["at"]),
            applied=data["status"] == "applied",
            reason=data.get("reason") or None,
            detail=data.get("detail") or None,
            sequence=int(data["seq"]) if data.get("seq") is not None else None,
            state=_state(data.get("state")),
            delta=int(data.get("delta", 0)),
            balance=int(data["balance"]) if data.get("balance") is not None else None,
            expired=int(data.get("expired", 0)),
            raw=data,
        )


@dataclass(frozen=True)
class CommandView:
    """What rendering needs of a command (an invalid one has only its ids)."""

    org_id: str
    command_id: str
    command_type: str
    body: dict[str, Any]
    valid: bool = True  # False: ``body`` is what an invalid command's producer sent
    # a refund's: the refunded request's window names, in its call's slots
    windows: tuple[str, ...] = ()


_MESSAGES = {
    "not_an_admin": "only an admin of the organisation can allow or disallow credit use "
    "or set a member's credit limit",
    "not_a_member": "the user is not a member of the organisation",
    "no_active_license": "the organisation has no license period to add credits to",
    "command_id_conflict": "this command_id was already used for another command; "
    "its outcome stands",
    "request_not_found": "no decided request with this request_id is known",
}


def command_message(view: CommandView, record: CommandRecord) -> str:
    if not record.applied:
        return record.detail or _MESSAGES.get(record.reason or "", record.reason or "")
    body = view.body
    match view.command_type:
        case "license.start_period":
            return (
                f"period {body['period_id']} started with {body['credits']} credits; "
                f"{record.expired} left from the previous period expired"
            )
        case "credits.grant":
            return f"{body['credits']} credits granted, balance {record.balance}"
        case "member.upsert":
            return f"{body['user_id']} is now {body['role']}"
        case "member.remove":
            return f"{body['user_id']} is no longer a member"
        case "charge.refund":
            closed = len(_as_list(record.raw.get("closed")))
            return (
                f"{record.delta} credit{'' if record.delta == 1 else 's'} of request "
                f"{body['request_id']} refunded, balance {record.balance}"
                + (f"; {closed} repeat window{'' if closed == 1 else 's'} closed" if closed else "")
            )
        case "member.set_credit_limit":
            if body["limit"] is None:
                return f"{body['user_id']} has no credit limit"
            plural = "" if body["limit"] == 1 else "s"
            return f"{body['user_id']} may use {body['limit']} credit{plural} per period"
        case _:
            if body.get("allowed"):
                return f"{body['user_id']} may use credits again"
            return f"{body['user_id']} may no longer use credits"


def license_event(view: CommandView, record: CommandRecord) -> dict[str, Any]:
    return {
        "type": COMMAND_APPLIED if record.applied else COMMAND_REJECTED,
        "command_id": view.command_id,
        "command_type": view.command_type,
        "org_id": view.org_id,
        "reason": record.reason,
        "message": command_message(view, record),
        "state": record.state,
        "sequence": record.sequence,
        "decided_at": rfc3339(record.decided_ms),
    }


def conflict_event(view: CommandView, now_ms: int) -> dict[str, Any]:
    return {
        "type": COMMAND_REJECTED,
        "command_id": view.command_id,
        "command_type": view.command_type,
        "org_id": view.org_id,
        "reason": "command_id_conflict",
        "message": _MESSAGES["command_id_conflict"],
        "state": None,
        "sequence": None,
        "decided_at": rfc3339(now_ms),
    }


def _as_list(value: Any) -> list[Any]:
    # the script's cjson encodes an empty Lua table as {}
    return list(value) if isinstance(value, list) else []


def refunded_windows(view: CommandView, record: CommandRecord) -> list[str]:
    """The names of the repeat windows a refund closed (the script gives their slots)."""
    return [view.windows[slot] for slot in _as_list(record.raw.get("closed"))]


def command_ledger_entry(view: CommandView, record: CommandRecord) -> dict[str, Any]:
    """The ledger entry of a decided command, applied or rejected.

    A rejected one changes nothing; its entry carries the stored decision so that a
    rebuild restores it, and a replay after the rebuild gets the same answer. An
    invalid command's body is left out (``command: null``): it is whatever the
    producer sent, its fingerprint is in the decision and its fault in ``detail``.
    """
    return {
        "org_id": view.org_id,
        "sequence": record.sequence,
        "kind": LEDGER_KINDS[view.command_type] if record.applied else REJECTED_KIND,
        "command_id": view.command_id,
        "command_type": view.command_type,
        "credits_delta": record.delta,
        "balance_after": record.balance,
        "expired_credits": record.expired,
        "recorded_at": rfc3339(record.decided_ms),
        "command": view.body if view.valid else None,
        "state": record.state,
        "decision": record.raw,
    } | (
        {"windows_closed": refunded_windows(view, record)}
        if record.applied and view.command_type == "charge.refund"
        else {}
    )


def command_notifications(view: CommandView, record: CommandRecord) -> list[dict[str, Any]]:
    if record.applied and view.command_type == "charge.refund":
        return [_refund_notification(view, record)]
    if not record.applied or view.command_type not in ("license.start_period", "credits.grant"):
        return []
    kind = (
        "license.period_started"
        if view.command_type == "license.start_period"
        else "credits.granted"
    )
    body = view.body
    figures: dict[str, Any]
    if kind == "license.period_started":
        figures = {
            "period_id": body["period_id"],
            "credits": body["credits"],
            "starts_at": body["starts_at"],
            "ends_at": body["ends_at"],
            "expired_credits": record.expired,
        }
    else:
        figures = {
            "grant_id": body["grant_id"],
            "credits": body["credits"],
            "reason": body["reason"],
            "granted_by": body["granted_by"],
            "balance_after": record.balance,
        }
    return [
        {
            "notification_id": f"{view.org_id}:{view.command_id}:{kind}:admins",
            "type": kind,
            "org_id": view.org_id,
            "recipient": {"role": "admin"},
            "created_at": rfc3339(record.decided_ms),
            **figures,
        }
    ]


def _refund_notification(view: CommandView, record: CommandRecord) -> dict[str, Any]:
    """``credits.refunded``, to the user whose request was refunded."""
    request = record.raw.get("request") or {}
    user = request.get("user_id")
    body = view.body
    return {
        "notification_id": f"{view.org_id}:{view.command_id}:credits.refunded:{user or 'admins'}",
        "type": "credits.refunded",
        "org_id": view.org_id,
        "recipient": {"user_id": user} if user else {"role": "admin"},
        "created_at": rfc3339(record.decided_ms),
        "request_id": body["request_id"],
        "action": request.get("action"),
        "credits_refunded": record.delta,
        "items_refunded": len(_as_list(record.raw.get("refunded"))),
        "reason": body["reason"],
        "refunded_by": body["refunded_by"],
        "balance_after": record.balance,
    }

"""Rendering a decision record into the published messages (pure, no Redis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from creditgate.domain.charges import Action, ChargeRequest, Outcome, Reason
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    charge_ledger_entry,
    charge_message,
    charge_notifications,
    charge_result,
    conflict_result,
)
from creditgate.domain.ids import rfc3339, to_ms

DECIDED_AT = "2026-11-26T10:00:00.120Z"
DECIDED_MS = to_ms(datetime(2026, 11, 26, 10, 0, 0, 120_000, tzinfo=UTC))
FREE_UNTIL_MS = to_ms(datetime(2026, 12, 20, 8, 0, tzinfo=UTC))


def script_record(**changes: Any) -> dict[str, Any]:
    """A record as charge.lua encodes it (cjson: an empty table is ``{}``)."""
    record: dict[str, Any] = {
        "request_id": "exp-1",
        "fp": "f" * 32,
        "at": DECIDED_MS,
        "status": "approved",
        "credits": 1,
        "needed": 1,
        "balance": 4999,
        "period": "2026",
        "outcomes": ["charged", "free_repeat"],
        "until": [DECIDED_MS + 30 * 86_400_000, FREE_UNTIL_MS],
        "opened": [[0, DECIDED_MS + 30 * 86_400_000], [1, DECIDED_MS + 30 * 86_400_000]],
        "notes": {},
        "saved": 1,
        "seq": 812,
    }
    record.update(changes)
    return record


def rejected(reason: str, **changes: Any) -> ChargeRecord:
    return ChargeRecord.from_script(
        script_record(
            status="rejected",
            reason=reason,
            credits=0,
            outcomes=["not_charged", "not_charged"],
            until=[0, 0],
            opened={},
            saved=0,
            **changes,
        )
    )


VIEW = RequestView(
    org_id="acme",
    request_id="exp-1",
    user_id="u-17",
    action=Action.EXPORT,
    items=[
        {"type": "contact", "id": "c-1", "company_id": "co-9"},
        {"type": "company", "id": "co-3"},
    ],
    reference={"export_id": "e-55", "crm": "hubspot"},
    max_credits=2,
)


def test_times_render_as_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339(DECIDED_MS) == DECIDED_AT
    assert rfc3339(FREE_UNTIL_MS) == "2026-12-20T08:00:00.000Z"


# ---- the record -----------------------------------------------------------------------


def test_a_record_reads_the_script_answer() -> None:
    record = ChargeRecord.from_script(script_record())

    assert record.approved
    assert record.outcomes == [Outcome.CHARGED, Outcome.FREE_REPEAT]
    assert record.sequence == 812
    assert record.period_id == "2026"
    assert record.reason is None


def test_empty_lua_tables_read_as_empty_lists() -> None:
    record = ChargeRecord.from_script(
        script_record(
            status="rejected",
            reason="invalid_request",
            outcomes={},
            until={},
            opened={},
            notes={},
            period="",
        )
    )

    assert (record.outcomes, record.free_until_ms, record.opened, record.notes) == ([], [], [], [])
    assert record.period_id is None
    assert record.reason is Reason.INVALID_REQUEST


# ---- charge_message ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credits", "outcomes", "message"),
    [
        (1, ["charged"], "1 credit charged"),
        (2, ["charged", "charged"], "2 credits charged"),
        (
            1,
            ["charged", "free_repeat"],
            "1 credit charged, 1 item free within its 30-day window",
        ),
        (
            0,
            ["free_repeat", "free_repeat", "duplicate_in_request"],
            "0 credits charged, 2 items free within its 30-day window, 1 duplicate in the request",
        ),
        (0, ["no_verified_email"], "0 credits charged, no verified email found"),
        (
            2,
            ["charged", "charged", "not_charged", "not_charged"],
            "2 credits charged, 2 items not charged: the balance ran out",
        ),
    ],
    ids=["one", "two", "free", "free-and-duplicate", "no-email", "partial"],
)
def test_an_approval_message_counts_what_happened(
    credits: int, outcomes: list[str], message: str
) -> None:
    record = ChargeRecord.from_script(
        script_record(credits=credits, outcomes=outcomes, until=[0] * len(outcomes))
    )

    assert charge_message(VIEW, record, 30) == message


def test_the_window_length_is_the_setting() -> None:
    record = ChargeRecord.from_script(script_record())

    assert "within its 7.5-day window" in charge_message(VIEW, record, 7.5)
    assert "within its 30-day window" in charge_message(VIEW, record, 30.0)


@pytest.mark.parametrize(
    ("reason", "changes", "message"),
    [
        (
            "credits_disallowed",
            {},
            "u-17 is not allowed to use the credits of acme; an admin can allow it",
        ),
        (
            "insufficient_credits",
            {"needed": 3, "balance": 2},
            "the request needs 3 credits, 2 left",
        ),
        (
            "exceeds_max_credits",
            {"needed": 3},
            "the request needs 3 credits, more than its max_credits of 2",
        ),
        ("not_a_member", {}, "u-17 is not a member of acme"),
        ("no_active_license", {"period": ""}, "acme has no active license period"),
        ("license_period_ended", {}, "the license period 2026 of acme has ended"),
    ],
)
def test_a_rejection_message_says_why(reason: str, changes: dict[str, Any], message: str) -> None:
    assert charge_message(VIEW, rejected(reason, **changes), 30) == message


def test_a_rejection_detail_is_the_message() -> None:
    record = rejected("invalid_request", detail="invalid request: items: Field required")

    assert charge_message(VIEW, record, 30) == "invalid request: items: Field required"


# ---- charge_result ------------------------------------------------------------------


def test_an_approved_result_has_the_design_shape() -> None:
    result = charge_result(VIEW, ChargeRecord.from_script(script_record()), 30)

    assert result == {
        "type": "charge.approved",
        "request_id": "exp-1",
        "org_id": "acme",
        "user_id": "u-17",
        "action": "export",
        "credits_charged": 1,
        "counts": {"charged": 1, "free_repeat": 1},
        "items": [
            {"type": "contact", "id": "c-1", "company_id": "co-9", "outcome": "charged"},
            {
                "type": "company",
                "id": "co-3",
                "outcome": "free_repeat",
                "free_until": "2026-12-20T08:00:00.000Z",
            },
        ],
        "items_truncated": False,
        "balance_after": 4999,
        "period_id": "2026",
        "reason": None,
        "message": "1 credit charged, 1 item free within its 30-day window",
        "decided_at": DECIDED_AT,
        "sequence": 812,
        "reference": {"export_id": "e-55", "crm": "hubspot"},
    }


def test_a_rejected_result_charges_nothing() -> None:
    result = charge_result(VIEW, rejected("insufficient_credits", needed=2, balance=1), 30)

    assert result["type"] == "charge.rejected"
    assert result["credits_charged"] == 0
    assert result["reason"] == "insufficient_credits"
    assert [item["outcome"] for item in result["items"]] == ["not_charged", "not_charged"]
    assert all("free_until" not in item for item in result["items"])


def test_an_invalid_request_renders_without_items_or_user() -> None:
    view = RequestView("acme", "bad-1", None, Action.CRM_PUSH, [])
    record = ChargeRecord.from_script(
        script_record(
            request_id="bad-1",
            status="rejected",
            reason="invalid_request",
            detail="invalid request: colour: Extra inputs are not permitted",
            credits=0,
            outcomes={},
            until={},
            opened={},
        )
    )

    result = charge_result(view, record, 30)

    assert result["items"] == []
    assert result["counts"] == {}
    assert result["items_truncated"] is False
    assert result["user_id"] is None
    assert result["action"] == "crm_push"
    assert result["message"] == "invalid request: colour: Extra inputs are not permitted"


def test_rendering_is_pure() -> None:
    data = script_record(
        notes=[{"type": "credits.threshold_reached", "to": "admin", "threshold": 80}]
    )

    first, second = ChargeRecord.from_script(data), ChargeRecord.from_script(dict(data))

    assert charge_result(VIEW, first, 30) == charge_result(VIEW, second, 30)
    assert charge_notifications(VIEW, first) == charge_notifications(VIEW, second)


def test_a_request_view_leaves_out_absent_company_ids() -> None:
    request = ChargeRequest.model_validate(
        {
            "request_id": "r-1",
            "org_id": "acme",
            "user_id": "u-1",
            "action": "export",
            "items": [{"type": "contact", "id": "c-1"}],
            "requested_at": "2026-11-26T10:00:00Z",
        }
    )

    assert RequestView.of(request).items == [{"type": "contact", "id": "c-1"}]


# ---- conflicts, notifications, the ledger ---------------------------------------------


def test_a_conflict_is_not_a_decision() -> None:
    stored = ChargeRecord.from_script(script_record())
    now = DECIDED_MS + 60_000

    result = conflict_result(VIEW, stored, now)

    assert result["type"] == "charge.rejected"
    assert result["reason"] == "request_id_conflict"
    assert result["credits_charged"] == 0
    assert result["balance_after"] is None
    assert result["sequence"] is None
    assert result["decided_at"] == rfc3339(now)
    assert DECIDED_AT in result["message"]
    assert [item["outcome"] for item in result["items"]] == ["not_charged", "not_charged"]


def test_notifications_have_deterministic_ids_and_recipients() -> None:
    record = rejected(
        "insufficient_credits",
        needed=2,
        balance=1,
        notes=[
            {"type": "credits.insufficient", "to": "user"},
            {"type": "credits.insufficient", "to": "admin"},
        ],
    )

    to_user, to_admins = charge_notifications(VIEW, record)

    assert to_user["notification_id"] == "acme:exp-1:credits.insufficient:u-17"
    assert to_user["recipient"] == {"user_id": "u-17"}
    assert to_admins["notification_id"] == "acme:exp-1:credits.insufficient:admins"
    assert to_admins["recipient"] == {"role": "admin"}
    assert (to_user["credits_needed"], to_user["credits_left"]) == (2, 1)
    assert to_user["created_at"] == DECIDED_AT


def test_threshold_and_disallowed_notifications_carry_their_figures() -> None:
    thresholds = ChargeRecord.from_script(
        script_record(
            notes=[
                {"type": "credits.threshold_reached", "to": "admin", "threshold": 80},
                {"type": "credits.threshold_reached", "to": "admin", "threshold": 90},
            ]
        )
    )
    disallowed = rejected(
        "credits_disallowed", notes=[{"type": "credits.disallowed", "to": "user"}]
    )

    eighty, ninety = charge_notifications(VIEW, thresholds)
    (told,) = charge_notifications(VIEW, disallowed)

    assert eighty["notification_id"] == "acme:exp-1:credits.threshold_reached:admins:80"
    assert (eighty["threshold_percent"], ninety["threshold_percent"]) == (80, 90)
    assert eighty["period_id"] == "2026"
    assert told["recipient"] == {"user_id": "u-17"}
    assert "do not have access to credits" in told["message"]


def test_a_ledger_entry_names_the_windows_it_opened() -> None:
    record = ChargeRecord.from_script(script_record(opened=[[1, FREE_UNTIL_MS]]))

    entry = charge_ledger_entry(VIEW, record, ["contact:c-1", "company:co-9", "company:co-3"])

    assert entry["kind"] == "charged"
    assert entry["sequence"] == 812
    assert entry["credits_delta"] == -1
    assert entry["balance_after"] == 4999
    assert entry["windows"] == [{"window": "company:co-9", "ends_at_ms": FREE_UNTIL_MS}]
    assert entry["decision"] == record.raw


def test_a_rejection_has_a_ledger_entry_too() -> None:
    entry = charge_ledger_entry(VIEW, rejected("not_a_member"), ["contact:c-1", "company:co-3"])

    assert entry["kind"] == "rejected"
    assert entry["credits_delta"] == 0
    assert entry["windows"] == []

"""The largest message creditgate can write to each output topic, built, not estimated.

``worst_case_output_bytes`` computes, for every output topic, the largest record batch
of one message creditgate can write from valid input under the current settings. It
does not add up field sizes by hand: it *builds* the worst case (``max_items`` contacts
with companies, every id 128 characters, a reference of ``MAX_REFERENCE_BYTES``, the
longest rejection detail, the largest hold and its settlement, a refund of
``max_items`` items, the largest dead letter) and renders it through the very
functions the worker publishes with (``charge_result``, ``ledger_messages``,
``dead_letter``, ...), so it cannot drift from the code. ``stream.limits`` compares it
with what the broker takes.
"""

from __future__ import annotations

from typing import Any

import orjson

from creditgate.domain.charges import (
    MAX_CREDITS,
    MAX_REFERENCE_BYTES,
    Action,
    Outcome,
    Reason,
)
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    charge_ledger_entry,
    charge_notifications,
    charge_result,
    conflict_result,
)
from creditgate.domain.holds import SettlementView
from creditgate.domain.ids import rfc3339
from creditgate.domain.intake import MAX_DETAIL_CHARS, MAX_ECHOED_TYPE_CHARS, MAX_MESSAGE_BYTES
from creditgate.domain.license_events import (
    CommandRecord,
    CommandView,
    command_ledger_entry,
    command_notifications,
    license_event,
)
from creditgate.domain.outgoing import (
    Outgoing,
    OutputTopics,
    dead_letter,
    hold_messages,
    ledger_messages,
    outgoing,
)
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.decider import Incoming
from creditgate.stream.publish import record_bytes
from creditgate.stream.topics import TopicRegistry, output_topics

MAX_ID = 128  # Identifier: 1-128 characters
_Commands = list[tuple[CommandView, CommandRecord]]
# the latest time an RFC 3339 rendering of ms since the epoch spends the most bytes on
LATEST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
# the most credits validation lets through (domain/charges.py): balances, credits and
# sequences are written with as many digits at most
_BIG = MAX_CREDITS


def _id(tag: str, n: int = 0) -> str:
    """A 128-character identifier, distinct per ``(tag, n)``."""
    head = f"{tag}{n}:"
    return head + "x" * (MAX_ID - len(head))


def _reference() -> dict[str, Any]:
    """The largest reference a request may carry (its JSON is MAX_REFERENCE_BYTES)."""
    empty = len(orjson.dumps({"r": ""}))
    return {"r": "x" * (MAX_REFERENCE_BYTES - empty)}


def worst_case_request(settings: Settings) -> dict[str, Any]:
    """The largest valid request: ``max_items`` contacts with companies, 128-char ids."""
    return {
        "request_id": _id("request"),
        "org_id": _id("org"),
        "user_id": _id("user"),
        "action": Action.EXPORT.value,
        "items": [
            {"type": "contact", "id": _id("contact", i), "company_id": _id("company", i)}
            for i in range(settings.max_items)
        ],
        "max_credits": _BIG,
        "on_insufficient": "partial",
        "requested_at": "2026-01-01T00:00:00.000000+00:00",
        "reference": _reference(),
    }


def worst_case_request_bytes(settings: Settings) -> int:
    return len(orjson.dumps(worst_case_request(settings)))


def _view(settings: Settings) -> RequestView:
    body = worst_case_request(settings)
    return RequestView(
        body["org_id"],
        body["request_id"],
        body["user_id"],
        Action.EXPORT,
        body["items"],
        reference=body["reference"],
        max_credits=_BIG,
    )


def _record(
    view: RequestView, settings: Settings, outcomes: list[Outcome], **raw: Any
) -> ChargeRecord:
    """A stored decision as large as the script can write for ``outcomes``: every item
    with a time, two windows opened per item (contact and company)."""
    n = len(view.items)
    data: dict[str, Any] = {
        "request_id": view.request_id,
        "fp": "f" * 32,
        "at": LATEST_MS,
        "status": "approved",
        "credits": _BIG,
        "needed": _BIG,
        "balance": _BIG,
        "period": _id("period"),
        "outcomes": [o.value for o in outcomes],
        "until": [LATEST_MS] * n,
        "opened": [[2 * n + 3, LATEST_MS]] * (2 * n),
        "notes": [
            {"type": "credits.threshold_reached", "to": "admin", "threshold": 100}
            for _ in settings.threshold_percents
        ]
        + [{"type": "credits.insufficient", "to": "user"}],
        "saved": _BIG,
        "seq": _BIG,
        **raw,
    }
    return ChargeRecord.from_script(data)


def _rejected(
    view: RequestView, settings: Settings, outcomes: list[Outcome], reason: Reason, **raw: Any
) -> ChargeRecord:
    """A rejection as large as ``_record``'s, with the longest detail."""
    return _record(
        view,
        settings,
        outcomes,
        status="rejected",
        reason=reason.value,
        detail="\x00" * MAX_DETAIL_CHARS,  # escaped as \u0000: six bytes a character
        **raw,
    )


def _window_names(n: int) -> list[str]:
    # window names are "<kind>:<entity id>"; "company:" and "contact:" are the longest
    return [f"company:{_id('company', i)}" for i in range(2 * n + 4)]


def _most_listed(n: int, bound: int) -> list[Outcome]:
    """Outcomes of ``n`` items that render the largest result: free repeats render the
    most per item (an outcome and a free_until), as many as a result lists, the rest
    charged (so exactly those are listed when truncated)."""
    listed = min(n, bound)
    return [Outcome.FREE_REPEAT] * listed + [Outcome.CHARGED] * (n - listed)


def _results(settings: Settings, names: dict[str, str]) -> list[Outgoing]:
    view = _view(settings)
    n, bound = len(view.items), settings.result_items_max
    outcomes = _most_listed(n, bound)
    approved = _record(view, settings, outcomes)
    rejected = _rejected(view, settings, [Outcome.NOT_CHARGED] * n, Reason.INVALID_REQUEST)
    held = _record(view, settings, outcomes, status="held", held=_BIG, hold_exp=LATEST_MS)
    bodies = [
        charge_result(view, approved, settings.repeat_window_days, bound),
        charge_result(view, held, settings.repeat_window_days, bound),
        charge_result(view, rejected, settings.repeat_window_days, bound),
        conflict_result(view, approved, LATEST_MS, bound),
    ]
    return [
        outgoing(
            names[t.CHARGE_RESULTS],
            view.org_id,
            body,
            ce_type=body["type"],
            ce_id=f"{view.org_id}/{view.request_id}/conflict/{LATEST_MS}",
            ce_time=body["decided_at"],
        )
        for body in bodies
    ]


def _holds(settings: Settings, topics: OutputTopics) -> list[Outgoing]:
    """What resolving the largest hold publishes: settled on every item (as many free
    repeats as a result lists), and a settlement refused with the longest detail."""
    view = _view(settings)
    n, bound = len(view.items), settings.result_items_max
    outcomes = _most_listed(n, bound)
    resolution = {"user": view.user_id, "action": view.action.value, "hold_period": _id("period")}
    settled = _record(
        view, settings, outcomes, status="settled", released=_BIG, delta=_BIG, **resolution
    )
    refused = _rejected(
        view, settings, [Outcome.NOT_CHARGED] * n, Reason.ITEM_NOT_HELD, **resolution
    )
    body = {
        "settlement_id": _id("settlement"),
        "org_id": view.org_id,
        "request_id": view.request_id,
        "type": "hold.settle",
        "reason": "\x00" * 500,
    }
    settlement = SettlementView(view.org_id, view.request_id, _id("settlement"), view, body)
    out: list[Outgoing] = []
    for status, record in (("settled", settled), ("rejected", refused)):
        out += hold_messages(
            topics,
            settlement,
            tuple(_window_names(n)),
            status,
            record,
            LATEST_MS,
            settings.repeat_window_days,
            bound,
        )
    return out


def _ledger(settings: Settings, names: dict[str, str], commands: _Commands) -> list[Outgoing]:
    view = _view(settings)
    n = len(view.items)
    longest = max(Outcome, key=lambda o: len(o.value))
    record = _record(view, settings, [longest] * n)
    entry = charge_ledger_entry(view, record, _window_names(n))
    rejected = _rejected(view, settings, [longest] * n, Reason.INSUFFICIENT_CREDITS)
    rejected_entry = charge_ledger_entry(view, rejected, _window_names(n))
    out = ledger_messages(names[t.LEDGER], entry) + ledger_messages(names[t.LEDGER], rejected_entry)
    for view_, command in commands:
        if command.applied:  # only applied commands have entries
            out += ledger_messages(names[t.LEDGER], command_ledger_entry(view_, command))
    return out


def worst_case_refund(settings: Settings) -> dict[str, Any]:
    """The largest valid command: a refund naming ``max_items`` companies (the longer
    item type), every id 128 characters, with the longest reason."""
    return {
        "command_id": _id("command"),
        "org_id": _id("org"),
        "type": "charge.refund",
        "request_id": _id("request"),
        "items": [{"type": "company", "id": _id("company", i)} for i in range(settings.max_items)],
        "reason": "\x00" * 500,  # escaped as \u0000: six bytes a character
        "refunded_by": _id("user"),
    }


def _commands(settings: Settings) -> _Commands:
    """The largest command outcomes: a grant with the longest reason, a period start,
    a refund of every item of the largest request, closing two windows an item, and a
    rejection with the longest detail and echoed type."""
    org, state = (
        _id("org"),
        {
            "period_id": _id("period"),
            "starts_ms": LATEST_MS,
            "ends_ms": LATEST_MS,
            "credits": _BIG,
            "granted": _BIG,
            "balance": _BIG,
        },
    )
    grant: dict[str, Any] = {
        "command_id": _id("command"),
        "org_id": org,
        "type": "credits.grant",
        "grant_id": _id("grant"),
        "credits": _BIG,
        "reason": "\x00" * 500,
        "granted_by": _id("user"),
    }
    start: dict[str, Any] = {
        "command_id": _id("command"),
        "org_id": org,
        "type": "license.start_period",
        "period_id": _id("period"),
        "starts_at": rfc3339(LATEST_MS),
        "ends_at": rfc3339(LATEST_MS),
        "credits": _BIG,
    }

    def record(**changes: Any) -> CommandRecord:
        data = {
            "command_id": _id("command"),
            "fp": "f" * 32,
            "at": LATEST_MS,
            "status": "applied",
            "seq": _BIG,
            "state": state,
            "delta": _BIG,
            "balance": _BIG,
            "expired": _BIG,
            **changes,
        }
        return CommandRecord.from_script(data)

    refund = worst_case_refund(settings)
    n = len(refund["items"])
    refunded = record(
        refunded=list(range(1, n + 1)),
        refunded_all=list(range(1, n + 1)),
        closed=list(range(2 * n)),
        request={"user_id": _id("user"), "action": Action.EXPORT.value, "period": _id("period")},
    )
    windows = tuple(_window_names(n))
    rejected = record(
        status="rejected", reason="invalid_command", detail="\x00" * MAX_DETAIL_CHARS, seq=None
    )
    return [
        (CommandView(org, grant["command_id"], "credits.grant", grant), record()),
        (CommandView(org, start["command_id"], "license.start_period", start), record()),
        (CommandView(org, refund["command_id"], refund["type"], refund, windows=windows), refunded),
        (CommandView(org, _id("command"), "\x00" * MAX_ECHOED_TYPE_CHARS, {}), rejected),
    ]


def _events(names: dict[str, str], commands: _Commands) -> list[Outgoing]:
    out = []
    for view, record in commands:
        event = license_event(view, record)
        out.append(
            outgoing(
                names[t.LICENSE_EVENTS],
                view.org_id,
                event,
                ce_type=event["type"],
                ce_id=f"{view.org_id}/{view.command_id}/conflict/{LATEST_MS}",
                ce_time=event["decided_at"],
            )
        )
    return out


def _notifications(
    settings: Settings, names: dict[str, str], commands: _Commands
) -> list[Outgoing]:
    view = _view(settings)
    record = _record(view, settings, [Outcome.CHARGED])
    notes = charge_notifications(view, record)
    for view_, command in commands:
        notes += command_notifications(view_, command)
    return [
        outgoing(
            names[t.NOTIFICATIONS],
            note["org_id"],
            note,
            ce_type=note["type"],
            ce_id=note["notification_id"],
            ce_time=note["created_at"],
        )
        for note in notes
    ]


def _dead_letters(registry: TopicRegistry, names: dict[str, str]) -> list[Outgoing]:
    # the largest input a request topic takes, every byte escaped six-fold as text
    size = max(
        [MAX_MESSAGE_BYTES]
        + [registry.specs[n].max_message_bytes or 0 for n in t.REQUEST_ACTIONS]
        + [registry.specs[t.LICENSE_COMMANDS].max_message_bytes or 0]
    )
    topic = max((registry.name(n) for n in t.REQUEST_ACTIONS), key=len)
    text = Incoming(topic, 2**31 - 1, 2**63 - 1, b"\x00" * size, b"\x00" * size)
    binary = Incoming(topic, 2**31 - 1, 2**63 - 1, b"\xff" * size, b"\xff" * size)
    error = "x" * (MAX_DETAIL_CHARS + 1)
    return [
        dead_letter(names[t.DEADLETTER], message, error, rfc3339(LATEST_MS))
        for message in (text, binary)
    ]


def worst_case_output_bytes(settings: Settings, registry: TopicRegistry) -> dict[str, int]:
    """Per output topic (by its logical name): the largest message, as a record batch of
    its own, that creditgate can write there from valid input under ``settings``."""
    names = {logical: registry.name(logical) for logical in registry.specs}
    holds = _holds(settings, output_topics(registry))
    commands = _commands(settings)  # a refund of max_items among them: built once
    built = {
        t.CHARGE_RESULTS: _results(settings, names)
        + [m for m in holds if m.topic == names[t.CHARGE_RESULTS]],
        t.LEDGER: _ledger(settings, names, commands)
        + [m for m in holds if m.topic == names[t.LEDGER]],
        t.LICENSE_EVENTS: _events(names, commands),
        t.NOTIFICATIONS: _notifications(settings, names, commands),
        t.DEADLETTER: _dead_letters(registry, names),
    }
    return {logical: max(record_bytes(m) for m in found) for logical, found in built.items()}


# ---- the broker's limits -------------------------------------------------------------

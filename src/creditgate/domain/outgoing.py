"""Every message a decision publishes, in one place: which messages each outcome produces,
their keys, CloudEvents ids and topics.

A charge decided (or replayed) publishes its result, its ledger entry (in parts when it
is large) and the notifications it asked for; a ``request_id`` conflict only its answer.
A license command publishes its event, its ledger entry (rejected ones too) and its
notifications; a ``command_id`` conflict only its event. Unreadable input becomes a dead
letter. Rendering is pure: a replay re-emits identical bytes, and ``ce_id`` is
deterministic so that consumers recognise a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from creditgate.domain.dead_letters import dead_letter_body, dead_letter_key
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    charge_ledger_entry,
    charge_notifications,
    charge_result,
    conflict_result,
)
from creditgate.domain.holds import (
    SettlementView,
    hold_ledger_entry,
    hold_result,
    settlement_conflict,
)
from creditgate.domain.ledger import ITEMS_PER_PART, split_entry
from creditgate.domain.license_events import (
    CommandRecord,
    CommandView,
    command_ledger_entry,
    command_notifications,
    conflict_event,
    license_event,
)

SOURCE = "creditgate"


@dataclass(slots=True)  # not frozen: one or more per decision (see ChargeRecord)
class Outgoing:
    """One message to publish: a JSON value keyed by ``org_id``, CloudEvents headers."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class OutputTopics:
    """The names of the topics decisions are published on (the deployment's prefix
    applied)."""

    results: str
    events: str
    notifications: str
    ledger: str
    deadletter: str


class Consumed(Protocol):
    """Where an input message came from, for its dead letter."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def outgoing(
    topic: str, org_id: str, body: dict[str, Any], *, ce_id: str, ce_type: str, ce_time: str
) -> Outgoing:
    """One message; ``ce_id`` is deterministic so a re-emitted copy is recognisably the same."""
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", ce_id.encode()),
        ("ce_type", ce_type.encode()),
        ("ce_source", SOURCE.encode()),
        ("ce_time", ce_time.encode()),
        ("content-type", b"application/json"),
    ]
    return Outgoing(topic, org_id.encode(), orjson.dumps(body), headers)


def charge_messages(
    topics: OutputTopics,
    view: RequestView,
    window_names: tuple[str, ...],
    status: str,
    record: ChargeRecord,
    now_ms: int,
    window_days: float,
    result_items_max: int,
) -> list[Outgoing]:
    """What a charge request's answer publishes (``status``: the script's, see the store)."""
    org = view.org_id
    if status == "conflict":
        body = conflict_result(view, record, now_ms, result_items_max)
        return [
            outgoing(
                topics.results,
                org,
                body,
                ce_type=body["type"],
                ce_id=f"{org}/{view.request_id}/conflict/{now_ms}",
                ce_time=body["decided_at"],
            )
        ]
    # a replay re-emits exactly what the first decision published
    result = charge_result(view, record, window_days, result_items_max)
    messages = [
        outgoing(
            topics.results,
            org,
            result,
            ce_type=result["type"],
            ce_id=f"{org}/{view.request_id}/result",
            ce_time=result["decided_at"],
        )
    ]
    entry = charge_ledger_entry(view, record, list(window_names))
    messages.extend(ledger_messages(topics.ledger, entry))
    messages.extend(notification_messages(topics.notifications, charge_notifications(view, record)))
    return messages


def hold_messages(
    topics: OutputTopics,
    view: SettlementView,
    window_names: tuple[str, ...],
    status: str,
    record: ChargeRecord,
    now_ms: int,
    window_days: float,
    result_items_max: int,
) -> list[Outgoing]:
    """What a hold's resolution publishes (a settlement's, or an expiry's): its result,
    keyed and identified by the hold's request_id, and its ledger entry."""
    org, tag = view.org_id, view.settlement_id or "expiry"
    if status == "conflict":
        body = settlement_conflict(view, now_ms)
        return [
            outgoing(
                topics.results,
                org,
                body,
                ce_type=body["type"],
                ce_id=f"{org}/{view.request_id}/{tag}/conflict/{now_ms}",
                ce_time=body["decided_at"],
            )
        ]
    result = hold_result(view, record, window_days, result_items_max)
    messages = [
        outgoing(
            topics.results,
            org,
            result,
            ce_type=result["type"],
            ce_id=f"{org}/{view.request_id}/{tag}",
            ce_time=result["decided_at"],
        )
    ]
    entry = hold_ledger_entry(view, record, window_names)
    messages.extend(ledger_messages(topics.ledger, entry))
    return messages


def command_messages(
    topics: OutputTopics, view: CommandView, status: str, record: CommandRecord, now_ms: int
) -> list[Outgoing]:
    """What a license command's answer publishes."""
    org = view.org_id
    if status == "conflict":
        event = conflict_event(view, now_ms)
        return [
            outgoing(
                topics.events,
                org,
                event,
                ce_type=event["type"],
                ce_id=f"{org}/{view.command_id}/conflict/{now_ms}",
                ce_time=event["decided_at"],
            )
        ]
    event = license_event(view, record)
    messages = [
        outgoing(
            topics.events,
            org,
            event,
            ce_type=event["type"],
            ce_id=f"{org}/{view.command_id}/event",
            ce_time=event["decided_at"],
        )
    ]
    # every decided command has an entry, rejected ones too (a record stored before
    # rejected commands took a sequence has none, and gets none)
    if record.sequence is not None:
        messages.extend(ledger_messages(topics.ledger, command_ledger_entry(view, record)))
    messages.extend(
        notification_messages(topics.notifications, command_notifications(view, record))
    )
    return messages


def ledger_messages(
    topic: str, entry: dict[str, Any], items_per_part: int = ITEMS_PER_PART
) -> list[Outgoing]:
    """A ledger entry as its messages: itself, or its parts, each with its own ``ce_id``
    (``{org}/ledger/{sequence}`` for a whole entry, ``…/{sequence}/{part}`` for a part)."""
    org = entry["org_id"]
    found = split_entry(entry, items_per_part)
    return [
        outgoing(
            topic,
            org,
            part,
            ce_type=f"ledger.{part['kind']}",
            ce_id=f"{org}/ledger/{entry['sequence']}"
            + (f"/{part['part']}" if len(found) > 1 else ""),
            ce_time=entry["recorded_at"],
        )
        for part in found
    ]


def notification_messages(topic: str, notes: list[dict[str, Any]]) -> list[Outgoing]:
    return [
        outgoing(
            topic,
            note["org_id"],
            note,
            ce_type=note["type"],
            ce_id=note["notification_id"],
            ce_time=note["created_at"],
        )
        for note in notes
    ]


def dead_letter(topic: str, message: Consumed, error: str, received_at: str) -> Outgoing:
    """The dead letter of an unreadable message, bounded (``domain/dead_letters.py``)."""
    source = {"topic": message.topic, "partition": message.partition, "offset": message.offset}
    body = dead_letter_body(source, error, message.key, message.value, received_at)
    return Outgoing(
        topic,
        dead_letter_key(message.key),
        orjson.dumps(body),
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", f"{message.topic}/{message.partition}/{message.offset}".encode()),
            ("ce_type", b"deadletter"),
            ("ce_source", SOURCE.encode()),
            ("ce_time", received_at.encode()),
        ],
    )

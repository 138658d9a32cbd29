"""Turns a batch of input messages into decisions and the messages that publish them.

Kafka-free and faust-free on purpose: the agents feed it batches and publish what it
returns, so the same code serves the worker, the tests and the benchmark.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.clock import Clock
from creditgate.domain.commands import LicenseCommand
from creditgate.domain.dead_letters import dead_letter_body, dead_letter_key
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    charge_ledger_entry,
    charge_notifications,
    charge_result,
    conflict_result,
)
from creditgate.domain.ids import rfc3339
from creditgate.domain.intake import (
    InvalidLicenseCommand,
    InvalidRequest,
    Unreadable,
    read_charge_request,
    read_license_command,
)
from creditgate.domain.ledger import ITEMS_PER_PART, split_entry
from creditgate.domain.license_events import (
    CommandView,
    command_ledger_entry,
    command_notifications,
    conflict_event,
    license_event,
)
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.store.calls import (
    ChargeAnswer,
    ChargeCall,
    InvalidCommand,
    KnownSequences,
    PreparedCall,
)
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.events import Outgoing, outgoing
from creditgate.stream.topics import TopicRegistry

# one line per decision, with its ids as fields (JSON logs)
decision_log = logging.getLogger("creditgate.decisions")


@dataclass(slots=True)  # not frozen: one or more per decision (see ChargeRecord)
class Incoming:
    """One consumed message, with where it came from (for the dead-letter topic)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class PreparedCharges:
    """A batch of charge requests read, validated and packed, not yet decided."""

    dead_letters: list[Outgoing]  # the unreadable ones, already rendered
    views: list[RequestView]
    calls: list[PreparedCall]

    def __len__(self) -> int:
        return len(self.dead_letters) + len(self.calls)


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


class Processor:
    def __init__(
        self,
        store: CreditStore,
        registry: TopicRegistry,
        settings: Settings,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        known: KnownSequences = None,
    ) -> None:
        """``known``: each organisation's last published ledger sequence, for the scripts'
        check that Redis has not forgotten it (the worker's; None: no check)."""
        self.store = store
        self._known = known
        # per organisation, the highest ledger sequence rendered since the last take
        self._rendered: dict[str, int] = {}
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.clock = clock or Clock(settings.clock_offset_seconds)
        self._window_days = settings.repeat_window_days
        self._actions = {
            registry.name(logical): action for logical, action in t.REQUEST_ACTIONS.items()
        }
        self._results = registry.name(t.CHARGE_RESULTS)
        self._events = registry.name(t.LICENSE_EVENTS)
        self._notifications = registry.name(t.NOTIFICATIONS)
        self._ledger = registry.name(t.LEDGER)
        self._deadletter = registry.name(t.DEADLETTER)

    # ---- charge requests -------------------------------------------------------

    async def decide(self, batch: Sequence[Incoming]) -> list[Outgoing]:
        """Decide every readable request of the batch in one Redis round trip."""
        return await self.decide_prepared(self.prepare(batch))

    def prepare(self, batch: Sequence[Incoming]) -> PreparedCharges:
        """Everything before Redis: read and validate each request, pack its script
        call. CPU only, so the worker prepares a batch while the previous one is out."""
        dead_letters: list[Outgoing] = []
        views: list[RequestView] = []
        calls: list[ChargeCall] = []
        for message in batch:
            action = self._actions[message.topic]
            read = read_charge_request(message.value, action, self.settings.max_items)
            if isinstance(read, Unreadable):
                dead_letters.append(self._dead_letter(message, read.error))
                continue
            if isinstance(read, ChargeRequest):
                view = RequestView.of(read)
                call = ChargeCall.of(read, view)
                views.append(view)
            else:
                call = self._invalid_call(read, action)
                views.append(RequestView(read.org_id, read.request_id, read.user_id, action, []))
            calls.append(call)
        return PreparedCharges(dead_letters, views, self.store.pack_charges(calls))

    async def decide_prepared(self, prepared: PreparedCharges) -> list[Outgoing]:
        """Decide a prepared batch at the decision clock's now; render what to publish."""
        out = list(prepared.dead_letters)
        now = self.clock.now_ms()
        views, calls = prepared.views, prepared.calls

        def render(i: int, answer: ChargeAnswer) -> None:  # while Redis runs the next ones
            windows = calls[i].windows
            out.extend(self._publish_charge(views[i], windows, answer.status, answer.record, now))

        started = time.perf_counter()
        answers = await self.store.charge_packed(calls, now, render, self._known)
        self.metrics.script_seconds.labels("charge").observe(time.perf_counter() - started)
        self._count_decisions(views, answers, len(prepared.dead_letters))
        return out

    def _count_decisions(
        self, views: Sequence[RequestView], answers: Sequence[ChargeAnswer], unreadable: int
    ) -> None:
        """Metrics per batch (one increment per label set) and one log line per decision."""
        outcomes: Counter[tuple[str, str, str]] = Counter()
        credits: Counter[str] = Counter()
        logging_decisions = decision_log.isEnabledFor(logging.INFO)
        for view, answer in zip(views, answers, strict=True):
            record, action = answer.record, view.action.value
            if answer.status == "decided":
                outcome = "approved" if record.approved else "rejected"
                reason = record.reason.value if record.reason else ""
                credits[action] += record.credits
            else:  # a replay re-emits a decision; a conflict answers another body
                outcome, reason = answer.status, ""
            outcomes[(action, outcome, reason)] += 1
            if logging_decisions:
                decision_log.info(
                    "%s %s: %s, %d credits",
                    action,
                    view.request_id,
                    reason or outcome,
                    record.credits if answer.status == "decided" else 0,
                    extra={
                        "request_id": view.request_id,
                        "org_id": view.org_id,
                        "user_id": view.user_id,
                        "action": action,
                        "outcome": outcome,
                        "reason": reason or None,
                        "credits_charged": record.credits if outcome == "approved" else 0,
                        "sequence": record.sequence,
                    },
                )
        for labels, count in outcomes.items():
            self.metrics.decisions.labels(*labels).inc(count)
        for action, amount in credits.items():
            self.metrics.credits.labels(action).inc(amount)
        if unreadable:
            self.metrics.dead_letters.labels("requests").inc(unreadable)

    @staticmethod
    def _invalid_call(read: InvalidRequest, action: Action) -> ChargeCall:
        return ChargeCall.invalid(
            org_id=read.org_id,
            request_id=read.request_id,
            user_id=read.user_id,
            action=action,
            fingerprint=read.fingerprint,
            detail=read.detail,
        )

    def _publish_charge(
        self,
        view: RequestView,
        window_names: tuple[str, ...],
        status: str,
        record: ChargeRecord,
        now: int,
    ) -> list[Outgoing]:
        org = view.org_id
        if status == "conflict":
            body = conflict_result(view, record, now, self.settings.result_items_max)
            return [
                outgoing(
                    self._results,
                    org,
                    body,
                    ce_type=body["type"],
                    ce_id=f"{org}/{view.request_id}/conflict/{now}",
                    ce_time=body["decided_at"],
                )
            ]
        # a replay re-emits exactly what the first decision published
        result = charge_result(view, record, self._window_days, self.settings.result_items_max)
        at = result["decided_at"]
        msgs = [
            outgoing(
                self._results,
                org,
                result,
                ce_type=result["type"],
                ce_id=f"{org}/{view.request_id}/result",
                ce_time=at,
            )
        ]
        msgs.extend(self._ledger_messages(charge_ledger_entry(view, record, list(window_names))))
        msgs.extend(self._notification_messages(charge_notifications(view, record)))
        return msgs

    # ---- license commands ------------------------------------------------------

    async def apply(self, batch: Sequence[Incoming]) -> list[Outgoing]:
        out: list[Outgoing] = []
        views: list[CommandView] = []
        commands: list[LicenseCommand | InvalidCommand] = []
        for message in batch:
            read = read_license_command(message.value)
            if isinstance(read, Unreadable):
                out.append(self._dead_letter(message, read.error))
                continue
            if isinstance(read, InvalidLicenseCommand):
                views.append(
                    CommandView(
                        read.org_id, read.command_id, read.command_type, read.body, valid=False
                    )
                )
                commands.append(
                    InvalidCommand(read.org_id, read.command_id, read.fingerprint, read.detail)
                )
            else:
                views.append(
                    CommandView(
                        read.org_id, read.command_id, read.type, read.model_dump(mode="json")
                    )
                )
                commands.append(read)
        now = self.clock.now_ms()
        started = time.perf_counter()
        answers = await self.store.apply_commands(commands, now, self._known)
        self.metrics.script_seconds.labels("command").observe(time.perf_counter() - started)
        if len(batch) > len(commands):
            self.metrics.dead_letters.labels("commands").inc(len(batch) - len(commands))
        for view, answer in zip(views, answers, strict=True):
            org, record = view.org_id, answer.record
            status = (
                answer.status
                if answer.status != "decided"
                else ("applied" if record.applied else "rejected")
            )
            self.metrics.commands.labels(view.command_type or "unknown", status).inc()
            if answer.status == "conflict":
                event = conflict_event(view, now)
                out.append(
                    outgoing(
                        self._events,
                        org,
                        event,
                        ce_type=event["type"],
                        ce_id=f"{org}/{view.command_id}/conflict/{now}",
                        ce_time=event["decided_at"],
                    )
                )
                continue
            event = license_event(view, record)
            at = event["decided_at"]
            out.append(
                outgoing(
                    self._events,
                    org,
                    event,
                    ce_type=event["type"],
                    ce_id=f"{org}/{view.command_id}/event",
                    ce_time=at,
                )
            )
            # every decided command has an entry, rejected ones too (a record stored
            # before rejected commands took a sequence has none, and gets none)
            if record.sequence is not None:
                out.extend(self._ledger_messages(command_ledger_entry(view, record)))
            out.extend(self._notification_messages(command_notifications(view, record)))
        return out

    # ---- the ledger and notifications, shared by charges and commands ------------

    def take_rendered_sequences(self) -> dict[str, int]:
        """Per organisation, the highest ledger sequence rendered since the last call:
        once its batch is on the broker, Redis must never be found behind it."""
        rendered, self._rendered = self._rendered, {}
        return rendered

    def _ledger_messages(self, entry: dict[str, Any]) -> list[Outgoing]:
        """One message, or the entry's parts when it is large (``domain/ledger.py``)."""
        org, sequence = entry["org_id"], entry["sequence"]
        if sequence > self._rendered.get(org, 0):
            self._rendered[org] = sequence
        return ledger_messages(self._ledger, entry)

    def _notification_messages(self, notes: list[dict[str, Any]]) -> list[Outgoing]:
        return [
            outgoing(
                self._notifications,
                note["org_id"],
                note,
                ce_type=note["type"],
                ce_id=note["notification_id"],
                ce_time=note["created_at"],
            )
            for note in notes
        ]

    # ---- unreadable input ------------------------------------------------------

    def _dead_letter(self, message: Incoming, error: str) -> Outgoing:
        return dead_letter(self._deadletter, message, error, rfc3339(self.clock.now_ms()))


def dead_letter(topic: str, message: Incoming, error: str, received_at: str) -> Outgoing:
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
            ("ce_source", b"creditgate"),
            ("ce_time", received_at.encode()),
        ],
    )

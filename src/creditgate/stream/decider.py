"""The decider: a batch of input messages read, decided through the store, and rendered
as the messages that publish the decisions (``domain/outgoing.py``).

Kafka-free and faust-free on purpose: the decision loop (``stream/consumer.py``) feeds it
batches and publishes what it returns, so the same code serves the worker, the tests and
the benchmark.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.clock import Clock
from creditgate.domain.commands import LicenseCommand, Refund
from creditgate.domain.decisions import (
    RequestView,
)
from creditgate.domain.ids import rfc3339
from creditgate.domain.intake import (
    InvalidLicenseCommand,
    InvalidRequest,
    Unreadable,
    read_charge_request,
    read_license_command,
)
from creditgate.domain.license_events import (
    CommandView,
)
from creditgate.domain.outgoing import (
    Outgoing,
    OutputTopics,
    charge_messages,
    command_messages,
    dead_letter,
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


class Decider:
    """Reads, decides and renders batches of charge requests and license commands."""

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
        self._topics = OutputTopics(
            results=registry.name(t.CHARGE_RESULTS),
            events=registry.name(t.LICENSE_EVENTS),
            notifications=registry.name(t.NOTIFICATIONS),
            ledger=registry.name(t.LEDGER),
            deadletter=registry.name(t.DEADLETTER),
        )

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
        items_max = self.settings.result_items_max

        def render(i: int, answer: ChargeAnswer) -> None:  # while Redis runs the next ones
            windows = calls[i].windows
            record = answer.record
            out.extend(
                charge_messages(
                    self._topics,
                    views[i],
                    windows,
                    answer.status,
                    record,
                    now,
                    self._window_days,
                    items_max,
                )
            )
            if answer.status != "conflict":
                self._rendered_sequence(views[i].org_id, record.sequence)

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
        commands = await aim_refunds(self.store, commands)
        views = [
            dataclasses.replace(view, windows=command.target.windows)
            if isinstance(command, Refund)
            else view
            for view, command in zip(views, commands, strict=True)
        ]
        now = self.clock.now_ms()
        started = time.perf_counter()
        answers = await self.store.apply_commands(commands, now, self._known)
        self.metrics.script_seconds.labels("command").observe(time.perf_counter() - started)
        if len(batch) > len(commands):
            self.metrics.dead_letters.labels("commands").inc(len(batch) - len(commands))
        for view, answer in zip(views, answers, strict=True):
            record = answer.record
            status = (
                answer.status
                if answer.status != "decided"
                else ("applied" if record.applied else "rejected")
            )
            self.metrics.commands.labels(view.command_type or "unknown", status).inc()
            out.extend(command_messages(self._topics, view, answer.status, record, now))
            if answer.status != "conflict":
                self._rendered_sequence(view.org_id, record.sequence)
        return out

    # ---- the ledger and notifications, shared by charges and commands ------------

    def take_rendered_sequences(self) -> dict[str, int]:
        """Per organisation, the highest ledger sequence rendered since the last call:
        once its batch is on the broker, Redis must never be found behind it."""
        rendered, self._rendered = self._rendered, {}
        return rendered

    def _rendered_sequence(self, org_id: str, sequence: int | None) -> None:
        if sequence is not None and sequence > self._rendered.get(org_id, 0):
            self._rendered[org_id] = sequence

    # ---- unreadable input ------------------------------------------------------

    def _dead_letter(self, message: Incoming, error: str) -> Outgoing:
        return dead_letter(self._topics.deadletter, message, error, rfc3339(self.clock.now_ms()))


async def aim_refunds(
    store: CreditStore, commands: list[LicenseCommand | InvalidCommand]
) -> list[LicenseCommand | InvalidCommand]:
    """Each refund with the stored request it refunds, read first (one read per
    organisation): the script's KEYS must name the request's windows, which only its
    stored items tell. The script checks the stored decision is still the one read;
    a Redis that forgot is caught by its sequence check, and the batch read again."""
    wanted: dict[str, list[str]] = {}
    for command in commands:
        if isinstance(command, Refund):
            wanted.setdefault(command.org_id, []).append(command.request_id)
    if not wanted:
        return commands
    found: dict[tuple[str, str], tuple[str, RequestView]] = {}
    for org_id, request_ids in wanted.items():
        stored = await store.stored_decisions(org_id, request_ids)
        for request_id, decision in zip(request_ids, stored, strict=True):
            if decision is not None and decision.summary is not None:
                view = RequestView.from_summary(org_id, request_id, decision.summary)
                found[(org_id, request_id)] = (decision.record.fingerprint, view)
    aimed: list[LicenseCommand | InvalidCommand] = []
    for command in commands:
        target = (
            found.get((command.org_id, command.request_id)) if isinstance(command, Refund) else None
        )
        if isinstance(command, Refund) and target is not None:
            fingerprint, view = target
            aimed.append(command.aimed(view.items, view.action.value, fingerprint))
        else:
            aimed.append(command)
    return aimed

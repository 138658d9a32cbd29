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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.clock import Clock
from creditgate.domain.commands import LicenseCommand, Refund
from creditgate.domain.decisions import (
    RequestView,
)
from creditgate.domain.holds import (
    HOLD_SETTLE,
    HoldSettlement,
    HoldTarget,
    SettlementView,
    delivered_indexes,
)
from creditgate.domain.ids import rfc3339
from creditgate.domain.intake import (
    InvalidLicenseCommand,
    InvalidRequest,
    InvalidSettlement,
    Unreadable,
    read_charge_request,
    read_hold_settlement,
    read_license_command,
)
from creditgate.domain.license_events import (
    CommandView,
)
from creditgate.domain.outgoing import (
    Outgoing,
    charge_messages,
    command_messages,
    dead_letter,
    hold_messages,
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
from creditgate.store.holds import HoldSweepIndex
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
        sweep: HoldSweepIndex | None = None,
    ) -> None:
        """``known``: each organisation's last published ledger sequence, for the scripts'
        check that Redis has not forgotten it (the worker's; None: no check).
        ``sweep``: the index of organisations with holds to expire (None: holds are
        neither noted nor expired, for tools and tests that do not need it)."""
        self.store = store
        self.sweep = sweep
        # per organisation, the earliest expiry of the holds rendered since the last take
        self._holds_due: dict[str, int] = {}
        self._known = known
        # per organisation, the highest ledger sequence rendered since the last take
        self._rendered: dict[str, int] = {}
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.clock = clock or Clock(settings.clock_offset_seconds)
        self._window_days = settings.repeat_window_days
        self._hold_seconds = (settings.hold_default_seconds, settings.hold_max_seconds)
        self._actions = {
            registry.name(logical): action for logical, action in t.REQUEST_ACTIONS.items()
        }
        self._topics = t.output_topics(registry)

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
                call = ChargeCall.of(read, view, self._hold_seconds)
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
                if record.is_hold and record.hold_expires_ms is not None:
                    self._hold_due(views[i].org_id, record.hold_expires_ms)

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
                if int(record.raw.get("holds_ended", 0)):
                    self._hold_due(view.org_id, now)  # a new period ends its holds now
        return out

    # ---- holds: settled, released, expired ----------------------------------------

    async def settle(self, batch: Sequence[Incoming]) -> list[Outgoing]:
        """Decide a batch of settlements and releases of holds, one Redis round trip (and
        one read of the holds they name before it)."""
        out: list[Outgoing] = []
        reads: list[HoldSettlement | InvalidSettlement] = []
        for message in batch:
            read = read_hold_settlement(message.value)
            if isinstance(read, Unreadable):
                out.append(self._dead_letter(message, read.error))
            else:
                reads.append(read)
        if len(batch) > len(reads):
            self.metrics.dead_letters.labels("settlements").inc(len(batch) - len(reads))
        holds = await self._read_holds([(r.org_id, r.request_id) for r in reads])
        views: list[SettlementView] = []
        calls: list[ChargeCall] = []
        for read in reads:
            fingerprint, hold = holds.get((read.org_id, read.request_id), ("", None))
            if isinstance(read, InvalidSettlement):
                target = HoldTarget(fingerprint, hold)
                calls.append(
                    ChargeCall.resolving(
                        org_id=read.org_id,
                        settlement_id=read.settlement_id,
                        hold_request_id=read.request_id,
                        mode="release",
                        fingerprint=read.fingerprint,
                        target=target,
                        preset_detail=read.detail,
                    )
                )
                views.append(SettlementView(read.org_id, read.request_id, read.settlement_id, hold))
                continue
            delivered = () if hold is None else delivered_indexes(read, hold)
            calls.append(
                ChargeCall.resolving(
                    org_id=read.org_id,
                    settlement_id=read.settlement_id,
                    hold_request_id=read.request_id,
                    mode="settle" if read.type == HOLD_SETTLE else "release",
                    fingerprint=read.fingerprint(),
                    target=HoldTarget(fingerprint, hold, delivered),
                )
            )
            body = read.model_dump(mode="json", exclude_none=True)
            views.append(
                SettlementView(read.org_id, read.request_id, read.settlement_id, hold, body)
            )
        out += await self._resolve(views, calls)
        return out

    async def expire_due(
        self, owned: Callable[[str], bool] | None = None
    ) -> tuple[list[Outgoing], dict[str, list[str]]]:
        """The holds whose expiry has come, expired (or their stored expiry, when it was
        decided before but maybe not published): what to publish, and per organisation
        the holds to take out of the sweep's index once it is published.

        ``owned``: whether this worker decides an organisation (its partition is
        assigned here), so that an organisation's expiries come from the worker that
        decides its requests, in order with them; None: every organisation."""
        if self.sweep is None:
            return [], {}
        now = self.clock.now_ms()
        due = await self.sweep.due(now, orgs=1000, holds=1000)
        if owned is not None:
            due = {org_id: ids for org_id, ids in due.items() if owned(org_id)}
        pairs = [(org_id, hold_id) for org_id, ids in due.items() for hold_id in ids]
        holds = await self._read_holds(pairs)
        views: list[SettlementView] = []
        calls: list[ChargeCall] = []
        for org_id, hold_id in pairs:
            fingerprint, hold = holds.get((org_id, hold_id), ("", None))
            calls.append(
                ChargeCall.resolving(
                    org_id=org_id,
                    settlement_id=hold_id,
                    hold_request_id=hold_id,
                    mode="expire",
                    fingerprint="",
                    target=HoldTarget(fingerprint, hold),
                )
            )
            views.append(SettlementView(org_id, hold_id, None, hold))
        statuses: list[str] = []
        out = await self._resolve(views, calls, statuses)
        done: dict[str, list[str]] = {org_id: [] for org_id in due}
        for (org_id, hold_id), status in zip(pairs, statuses, strict=True):
            if status != "notdue":
                done[org_id].append(hold_id)
        return out, done

    async def expired_published(self, done: dict[str, list[str]]) -> None:
        """The expiries of ``expire_due`` are on the broker: out of the sweep's index."""
        if self.sweep is not None:
            await self.sweep.expired(done)

    async def note_holds(self) -> None:
        """Note the holds rendered since the last call in the sweep's index (before their
        batch is acknowledged: a crash before this replays the batch, which notes them)."""
        due, self._holds_due = self._holds_due, {}
        if self.sweep is not None and due:
            await self.sweep.note(due)

    def _hold_due(self, org_id: str, expires_ms: int) -> None:
        if expires_ms < self._holds_due.get(org_id, expires_ms + 1):
            self._holds_due[org_id] = expires_ms

    async def _read_holds(
        self, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[str, RequestView]]:
        """The stored decisions of the holds named (org, request_id): its fingerprint and
        its request, per hold found. The scripts' KEYS name the hold's windows, which
        only its stored items tell; the script checks it is still the decision read."""
        wanted: dict[str, list[str]] = {}
        for org_id, request_id in pairs:
            if request_id:
                wanted.setdefault(org_id, []).append(request_id)
        found: dict[tuple[str, str], tuple[str, RequestView]] = {}
        for org_id, request_ids in wanted.items():
            stored = await self.store.stored_decisions(org_id, request_ids)
            for request_id, decision in zip(request_ids, stored, strict=True):
                if decision is not None and decision.summary is not None:
                    view = RequestView.from_summary(org_id, request_id, decision.summary)
                    found[(org_id, request_id)] = (decision.record.fingerprint, view)
        return found

    async def _resolve(
        self,
        views: Sequence[SettlementView],
        calls: Sequence[ChargeCall],
        statuses: list[str] | None = None,
    ) -> list[Outgoing]:
        if not calls:
            return []
        out: list[Outgoing] = []
        now = self.clock.now_ms()
        packed = self.store.pack_charges(calls)

        def render(i: int, answer: ChargeAnswer) -> None:
            status: str = answer.status
            if statuses is not None:
                statuses.append(status)
            if status in ("gone", "notdue"):  # an expiry with nothing to publish
                return
            out.extend(
                hold_messages(
                    self._topics,
                    views[i],
                    calls[i].windows,
                    status,
                    answer.record,
                    now,
                    self._window_days,
                    self.settings.result_items_max,
                )
            )
            if status != "conflict":
                self._rendered_sequence(views[i].org_id, answer.record.sequence)

        started = time.perf_counter()
        await self.store.charge_packed(packed, now, render, self._known)
        self.metrics.script_seconds.labels("hold").observe(time.perf_counter() - started)
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

"""Healing a Redis that forgot, from ``credits.ledger``, before anything more is decided.

Redis is a cache of the ledger, and it may forget: restarted after a host crash with
``appendfsync everysec`` it lacks about its last second, with ``appendfsync no`` or no
persistence more, and a promoted replica lacks what replication had not yet carried. A
worker that went on deciding would charge paid windows again and reuse sequence numbers
the ledger has already published.

Why the ledger can vouch for Redis: a decision is written in Redis, then its ledger entry
is published, then its input offset is committed; and Redis's persistence and
replication lose a *suffix* of its writes, never a middle. So:

- **The ledger checkpoint** (``Keys.ledger_checkpoint``, a sorted set: one member per
  ledger partition, scored by an offset) says which ledger entries Redis has: every entry
  below a partition's offset was written to Redis before the entry at that offset was
  published. The worker raises it (``ZADD GT``: never lowers it) after the broker has
  acknowledged a batch's ledger entries, at most once a second, over its batch
  connection, so a raise never reaches a Redis that was restarted unnoticed. A checkpoint
  that survived vouches for everything below it; one that is gone (a flush, no
  persistence) vouches for nothing, and healing reads the partition from its start.
- **The heal check** (``Healer.heal``) runs before the worker decides anything after its
  start, a partition assignment, a (re)connection of its batch connection to Redis, or a
  script's answer that an organisation is stale: it reads the ledger from the checkpoint
  (or from the first offset this worker published since its last heal, if lower: its own
  decisions may have been published late, after another worker raised the checkpoint)
  to the end offsets, and for every organisation whose sequence in Redis is below the
  last one read, folds the missing entries onto its state (``CreditStore.heal_org``, the
  fold of ``creditgate rebuild`` applied incrementally, in one WATCHed transaction). It
  notes the holds it read in the hold sweep's index again (which may have forgotten a
  note while the hold stayed: ``store.holds``). Then it raises the checkpoint to the end
  offsets read.
- **The scripts' sequence check** catches a Redis that forgot without dropping the
  connection (a FLUSHALL): every call carries the organisation's last sequence this worker
  saw published (``PublishedSequences``), and the script decides nothing when Redis's is
  lower, or when the worker knows none and Redis has none either (the organisation is new,
  or Redis lost all of it: a heal check tells which).

Afterwards windows paid stay free, a replayed request gets its published decision byte for
byte, and the balance and the sequence continue from the ledger. No operator step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from creditgate.domain.clock import Clock
from creditgate.domain.ledger import LedgerParts
from creditgate.errors import RedisMayHaveForgotten
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.store.holds import HoldSweepIndex
from creditgate.stream.ledger_reader import LedgerReader, ledger_entry
from creditgate.stream.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger("creditgate.healing")

# the ledger checkpoint is raised at most this often (a lower one only means a longer read
# of the ledger when Redis is checked against it)
_CHECKPOINT_INTERVAL_SECONDS = 1.0
# organisations whose last published sequence a worker remembers; past it, the memory
# starts again (an organisation forgotten there is checked against the ledger again)
_REMEMBERED_ORGS = 1_000_000


class PublishedSequences:
    """Per organisation, the last ledger sequence this worker saw on the broker (its own
    decisions' entries once acknowledged, and what a heal check read): Redis must never
    be behind it. Called with an organisation, the number the scripts check (-1: none)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def __call__(self, org_id: str) -> int:
        return self._last.get(org_id, -1)

    def update(self, sequences: Mapping[str, int]) -> None:
        """Raise each organisation's sequence to the one given (never lower it)."""
        last = self._last
        if len(last) + len(sequences) > _REMEMBERED_ORGS:
            last.clear()
        for org_id, sequence in sequences.items():
            if sequence > last.get(org_id, -1):
                last[org_id] = sequence


@dataclass
class HealReport:
    entries_read: int = 0
    organisations_checked: int = 0
    organisations_healed: int = 0
    entries_applied: int = 0
    read_from: dict[int, int] = field(default_factory=dict)  # partition -> first offset
    inconsistencies: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class _Found:
    """Ledger entries read, per organisation: one copy of each sequence."""

    entries: dict[str, dict[int, Mapping[str, Any]]] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)
    read: int = 0

    def add(self, entry: Mapping[str, Any], partition: int) -> None:
        org_id = entry["org_id"]
        self.entries.setdefault(org_id, {}).setdefault(int(entry["sequence"]), entry)
        self.partition_of[org_id] = partition

    def last_sequences(self) -> dict[str, int]:
        return {org_id: max(by_sequence) for org_id, by_sequence in self.entries.items()}


# the ledger kinds that put holds in an organisation's expiries: a hold, and a new period
# (its open holds are due at once)
_EXPIRY_KINDS = frozenset({"held", "period_started"})


def _sets_expiries(entries: Mapping[int, Mapping[str, Any]]) -> bool:
    return any(entry.get("kind") in _EXPIRY_KINDS for entry in entries.values())


class Healer:
    """Checks Redis against the ledger and restores what it forgot (see the module)."""

    def __init__(
        self,
        store: CreditStore,
        settings: Settings,
        ledger_topic: str,
        sequences: PublishedSequences,
        clock: Clock,
        metrics: Metrics,
        max_message_bytes: int = BROKER_DEFAULT_MAX_MESSAGE_BYTES,
        sweep: HoldSweepIndex | None = None,
    ) -> None:
        self._store = store
        self._sweep = sweep
        self._topic = ledger_topic
        self.sequences = sequences
        self._clock = clock
        self._metrics = metrics
        self._reader = LedgerReader(settings, ledger_topic, max_message_bytes)

    async def start(self) -> None:
        await self._reader.start()

    async def stop(self) -> None:
        await self._reader.stop()

    async def heal(
        self, published_since: Mapping[int, int], stale: frozenset[str] | None = None
    ) -> HealReport:
        """Restore whatever Redis lacks of the ledger up to its end offsets now.

        ``published_since``: per ledger partition, the first offset this worker
        published since its last heal. ``stale``: organisations a script found stale;
        afterwards the worker knows their sequence (0 for a new organisation).
        Raises ``RedisMayHaveForgotten`` if Redis was reached anew meanwhile (heal again).
        """
        checkpoint = await self._store.ledger_checkpoint(self._topic)
        begin, end = await self._reader.bounds()
        ranges = {}
        for partition, last in end.items():
            start = min(checkpoint.get(partition, begin[partition]), last)
            start = min(start, published_since.get(partition, start))
            ranges[partition] = (max(begin[partition], start), last)
        found = await self._read(ranges)
        report = HealReport(entries_read=found.read, read_from={p: r[0] for p, r in ranges.items()})
        further_back = await self._restore(found, report)
        if further_back:
            # Redis lacks entries from before the checkpoint (it should not: the
            # checkpoint itself would be gone). Those organisations, from the start.
            log.warning(
                "Redis lacks ledger entries of %d organisation(s) from before the "
                "checkpoint: reading their partitions from the start",
                len(further_back),
            )
            partitions = {found.partition_of[org_id] for org_id in further_back}
            older = await self._read({p: (begin[p], end[p]) for p in partitions}, only=further_back)
            report.entries_read += older.read
            await self._restore(older, report)
            found.entries.update(older.entries)
        if self._sweep is not None:
            # a hold whose note the sweep's index forgot is among those read (store/holds.py)
            await self._sweep.note_from_expiries(
                sorted(org for org, entries in found.entries.items() if _sets_expiries(entries))
            )
        # every entry below the end offsets read is in Redis now
        await self._store.raise_ledger_checkpoint(self._topic, end)
        self.sequences.update(found.last_sequences())
        if stale:
            self.sequences.update(await self._store.sequences(sorted(stale)))
        self._metrics.heal_checks.inc()
        return report

    async def _read(
        self, ranges: Mapping[int, tuple[int, int]], only: set[str] | None = None
    ) -> _Found:
        found = _Found()
        # an entry in parts whose first parts lie before the range stays incomplete: its
        # organisation's missing entries then start before what was read, and its
        # partition is read again from the start (see heal)
        parts = LedgerParts()

        def handle(key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
            message = ledger_entry(value)
            if message is None:
                log.warning("ledger %s/%d@%d is not a ledger entry", self._topic, partition, offset)
                return
            if only is None or message["org_id"] in only:
                entry = parts.add(message)
                if entry is not None:
                    found.add(entry, partition)

        found.read = await self._reader.read(ranges, handle)
        return found

    async def _restore(self, found: _Found, report: HealReport) -> set[str]:
        """Heal every organisation of ``found`` that Redis is behind; the organisations
        whose missing entries start before what was read."""
        orgs = sorted(found.entries)
        in_redis = await self._store.sequences(orgs)
        report.organisations_checked += len(orgs)
        further_back: set[str] = set()
        now = self._clock.now_ms()
        for org_id in orgs:
            by_sequence = found.entries[org_id]
            if max(by_sequence) <= in_redis[org_id]:
                continue
            entries = [by_sequence[s] for s in sorted(by_sequence)]
            healed = await self._store.heal_org(org_id, entries, now)
            if healed.missing_from is not None:
                further_back.add(org_id)
                continue
            if healed.applied:
                report.organisations_healed += 1
                report.entries_applied += healed.applied
                # counted as restored, not when the check ends: a check that fails later
                # (Redis away again) is repeated, and finds these already in Redis
                self._metrics.healed_entries.inc(healed.applied)
                self._metrics.healed_organisations.inc()
                log.warning(
                    "healed %s from the ledger: Redis had sequence %d, %d entries restored",
                    org_id,
                    healed.sequence_before,
                    healed.applied,
                )
            if healed.inconsistencies:
                report.inconsistencies[org_id] = healed.inconsistencies
        return further_back


class LedgerGuard:
    """What the decision loop does about a Redis that may forget, in one place: when a
    heal check is due, what this worker published since the last one, and when the
    checkpoint may be raised (see the module)."""

    def __init__(self, healer: Healer, store: CreditStore, ledger_topic: str) -> None:
        self._healer = healer
        self._store = store
        self._topic = ledger_topic
        self.sequences = healer.sequences
        # due at the start, after an assignment and after a reconnection, or when a
        # script found organisations stale (afterwards their sequences are learnt: 0
        # for a new one)
        self._due = True
        self._stale: set[str] = set()
        # per ledger partition: the next offset after this worker's entries on the broker
        # (the checkpoint to raise), and the first one since the last heal check
        self._checkpoint_due: dict[int, int] = {}
        self._checkpoint_raised_at = 0.0
        self._published_since_heal: dict[int, int] = {}

    async def start(self) -> None:
        await self._healer.start()
        self._store.watch_reconnections()

    async def stop(self) -> None:
        await self._healer.stop()

    async def while_idle(self, published: Callable[[], Awaitable[None]]) -> None:
        """With no batch to decide: notice a Redis reached anew (restarted, failed over)
        and heal it now, rather than when the next request comes (the API reads Redis
        meanwhile). Raises what the store raises when Redis is away."""
        try:
            await self._store.check_batch_connection()
        except RedisMayHaveForgotten as exc:
            log.warning("%s: checking Redis against the ledger while idle", exc)
            self.heal_due(exc.orgs)
        if self._due or self._checkpoint_due:
            await self.before_batch(published)

    def heal_due(self, stale: frozenset[str] | None = None) -> None:
        """Check Redis against the ledger before the next batch (``stale``: the
        organisations a script found behind, or None)."""
        self._due = True
        self._stale |= stale or set()

    async def before_batch(self, published: Callable[[], Awaitable[None]]) -> None:
        """Heal if due, else raise the checkpoint if due. ``published``: until the batch
        being published is on the broker (its ledger entries must be read too). Raises
        ``RedisMayHaveForgotten`` when Redis was reached anew meanwhile."""
        if self._due:
            await published()
            report = await self._healer.heal(self._published_since_heal, frozenset(self._stale))
            if report.entries_applied:
                log.warning(
                    "Redis had forgotten %d ledger entries of %d organisation(s): restored",
                    report.entries_applied,
                    report.organisations_healed,
                )
            # the heal raised the checkpoint past everything published before it
            self._checkpoint_due.clear()
            self._published_since_heal.clear()
            self._due = False
            self._stale.clear()
        elif self._checkpoint_due:
            now = time.monotonic()
            if now - self._checkpoint_raised_at >= _CHECKPOINT_INTERVAL_SECONDS:
                await self._store.raise_ledger_checkpoint(self._topic, self._checkpoint_due)
                self._checkpoint_due.clear()
                self._checkpoint_raised_at = now

    def published(
        self, sequences: Mapping[str, int], ledger_written: Mapping[int, tuple[int, int]]
    ) -> None:
        """A batch is on the broker: its organisations' last sequences, and per ledger
        partition (first offset, next offset) of its entries."""
        self.sequences.update(sequences)
        due, since = self._checkpoint_due, self._published_since_heal
        for partition, (first, after) in ledger_written.items():
            due[partition] = max(due.get(partition, 0), after)
            since[partition] = min(since.get(partition, first), first)

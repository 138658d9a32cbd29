"""``creditgate rebuild``: every Redis key of creditgate, restored from ``credits.ledger``.

DESIGN §6 promises that Redis state can be rebuilt from the ledger alone. The steps:

1. Refuse when the target already has keys, unless ``--replace``: the rebuild is for
   an empty Redis (a lost one), or for a Redis that came back without its last
   writes (AOF ``everysec`` after a host crash), where each organisation's stale keys
   are deleted before its state is written.
2. Read ``credits.ledger`` from the beginning of every partition up to the end
   offsets taken when the rebuild starts, keyed by ``org_id``.
3. Join the parts of entries too large for one message (``domain/ledger.py``), then
   put each organisation's entries back in sequence order. Entries are at least once
   (a replayed decision re-emits its entry with the same sequence), so
   ``(org_id, sequence)`` identifies an entry and a second copy is dropped.
4. Fold each organisation's entries into its state (``store.restore``) and write it.

The workers must be stopped while it runs: a worker deciding meanwhile would see a
half-restored organisation, and its ledger entries would land past the end offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import click
from aiokafka.errors import KafkaError

from creditgate.domain.clock import Clock
from creditgate.domain.ledger import LedgerParts
from creditgate.errors import CreditgateError, InfrastructureError, StoreUnavailable
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.store.restore import OrgState
from creditgate.stream import topics as t
from creditgate.stream.ledger_reader import LedgerReader, ledger_entry
from creditgate.stream.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES
from creditgate.stream.topics import TopicRegistry


class RebuildRefused(CreditgateError):
    """The target already has keys and ``--replace`` was not given."""


class Progress(Protocol):
    """Where the rebuild reports how far it is (a progress bar, or nothing)."""

    def start(self, label: str, total: int) -> None: ...

    def advance(self, count: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class RebuildReport:
    entries_read: int = 0  # ledger messages of the organisations rebuilt, copies included
    duplicates: int = 0  # re-emitted copies dropped by (org_id, sequence)
    unreadable: int = 0  # messages that are not ledger entries (reported, skipped)
    # entries split into parts of which some never came: org → sequences (not restored)
    incomplete: dict[str, list[int]] = field(default_factory=dict)
    organisations: int = 0
    keys_written: int = 0
    # sequences missing from an organisation's ledger, and balances that disagree
    gaps: dict[str, list[int]] = field(default_factory=dict)
    # sequences that came with two different entries (see LedgerSequencer)
    conflicts: dict[str, list[int]] = field(default_factory=dict)
    inconsistencies: dict[str, list[str]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not (
            self.gaps
            or self.conflicts
            or self.inconsistencies
            or self.unreadable
            or self.incomplete
        )


class LedgerSequencer:
    """One organisation's entries, folded in sequence order whatever order they came in.

    An organisation's entries share one partition, but two agents (requests and
    commands) publish them, and a worker that paused and resumed may publish an old
    batch late: a later sequence can arrive first. It waits in ``pending`` until the
    sequences before it have been folded.

    A copy is dropped, but first compared with the entry it copies (by a digest of
    its identity, 8 bytes per sequence): two *different* entries under one sequence
    mean Redis lost writes and a worker went on deciding on the stale state, reusing
    sequence numbers. The first entry is kept and the sequence is reported.
    """

    def __init__(self, state: OrgState) -> None:
        self.state = state
        self._next = 1
        self._pending: dict[int, Mapping[str, Any]] = {}
        self._digests = array("Q")  # of the folded entries, by sequence - 1
        self.gaps: list[int] = []
        self.conflicts: list[int] = []

    def add(self, entry: Mapping[str, Any]) -> bool:
        """Fold ``entry`` when its turn has come; False when it is a copy."""
        sequence = int(entry["sequence"])
        if sequence < self._next or sequence in self._pending:
            first = (
                _digest(self._pending[sequence])
                if sequence in self._pending
                else self._digests[sequence - 1]
            )
            if first != _digest(entry):
                self.conflicts.append(sequence)
            return False
        self._pending[sequence] = entry
        while self._next in self._pending:
            self._fold(self._pending.pop(self._next))
        return True

    def finish(self) -> OrgState:
        """Fold what is still waiting; a sequence that never came is a gap."""
        for sequence in sorted(self._pending):
            self.gaps.extend(range(self._next, sequence))
            self._digests.extend([0] * (sequence - self._next))
            self._next = sequence
            self._fold(self._pending[sequence])
        self._pending.clear()
        return self.state

    def _fold(self, entry: Mapping[str, Any]) -> None:
        self.state.apply(entry)
        self._digests.append(_digest(entry))
        self._next += 1


def _digest(entry: Mapping[str, Any]) -> int:
    """What makes an entry the one it is: its cause, its time and its body's print."""
    decision = entry.get("decision") or {}
    identity = (
        entry.get("request_id") or entry.get("command_id"),
        decision.get("at"),
        decision.get("fp"),
    )
    return hash(repr(identity)) & 0xFFFF_FFFF_FFFF_FFFF


async def read_ledger(
    settings: Settings,
    topic: str,
    handle: Callable[[bytes | None, bytes | None], None],
    progress: Progress,
    max_message_bytes: int = BROKER_DEFAULT_MAX_MESSAGE_BYTES,
) -> int:
    """Hand every message of ``topic`` below the end offsets taken now to ``handle``.

    Returns the number of messages read. No consumer group: nothing is committed, and
    the rebuild never disturbs the workers' groups.
    """
    reader = LedgerReader(settings, topic, max_message_bytes)
    await reader.start()
    try:
        begin, end = await reader.bounds()
        progress.start(f"reading {topic}", sum(end[p] - begin[p] for p in end))

        def each(key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
            handle(key, value)
            progress.advance(1)

        read = await reader.read({p: (begin[p], end[p]) for p in end}, each)
        progress.finish()
        return read
    finally:
        await reader.stop()


async def rebuild(
    settings: Settings,
    registry: TopicRegistry | None = None,
    *,
    org: str | None = None,
    replace: bool = False,
    now_ms: int | None = None,
    progress: Progress | None = None,
) -> RebuildReport:
    """Restore the keys of every organisation in the ledger (or of ``org`` only).

    ``now_ms`` is the decision clock that expiries are measured against; by default
    the workers' clock (``CREDITGATE_CLOCK_OFFSET_SECONDS`` applied).
    """
    registry = registry or TopicRegistry.load(prefix=settings.topic_prefix)
    now = Clock(settings.clock_offset_seconds).now_ms() if now_ms is None else now_ms
    progress = progress or NoProgress()
    store = CreditStore.from_settings(settings)
    report = RebuildReport()
    try:
        if not replace and await store.org_keys_exist(org):
            scope = f"organisation {org}" if org else f"key prefix {settings.key_prefix!r}"
            raise RebuildRefused(
                f"Redis already has keys of {scope}: the rebuild is for an empty Redis; "
                "use --replace to delete each rebuilt organisation's keys first"
            )
        sequencers: dict[str, LedgerSequencer] = {}
        parts = LedgerParts()
        handle = _handler(report, sequencers, parts, org, settings, now)
        limit = registry.specs[t.LEDGER].max_message_bytes or BROKER_DEFAULT_MAX_MESSAGE_BYTES
        await read_ledger(settings, registry.name(t.LEDGER), handle, progress, limit)
        for (org_id, sequence), _ in sorted(parts.incomplete.items()):
            report.incomplete.setdefault(org_id, []).append(sequence)

        skew = await store.clock_skew_ms(now)
        progress.start("restoring organisations", len(sequencers))
        for org_id in sorted(sequencers):
            sequencer = sequencers[org_id]
            state = sequencer.finish()
            if sequencer.gaps:
                report.gaps[org_id] = sequencer.gaps
            if sequencer.conflicts:
                report.conflicts[org_id] = sequencer.conflicts
            if state.inconsistencies:
                report.inconsistencies[org_id] = state.inconsistencies
            if replace:
                await store.delete_org_keys(org_id)
            report.keys_written += await store.write_org(org_id, state, skew)
            report.organisations += 1
            progress.advance(1)
        progress.finish()
        return report
    except (StoreUnavailable, KafkaError, OSError) as exc:
        raise InfrastructureError(f"the rebuild stopped: {exc}") from exc
    finally:
        await store.close()


def _handler(
    report: RebuildReport,
    sequencers: dict[str, LedgerSequencer],
    parts: LedgerParts,
    org: str | None,
    settings: Settings,
    now: int,
) -> Callable[[bytes | None, bytes | None], None]:
    """What ``read_ledger`` hands each message to: parts joined, entries sequenced."""
    wanted = org.encode() if org else None

    def handle(key: bytes | None, value: bytes | None) -> None:
        if wanted is not None and key != wanted:
            return
        report.entries_read += 1
        read = ledger_entry(value)
        if read is None:
            report.unreadable += 1
            return
        entry = parts.add(read)  # a whole entry, or None while parts are missing
        if entry is None:
            return
        org_id = entry["org_id"]
        sequencer = sequencers.get(org_id)
        if sequencer is None:
            state = OrgState(org_id, settings.idempotency_ttl_ms, now)
            sequencer = sequencers[org_id] = LedgerSequencer(state)
        if not sequencer.add(entry):
            report.duplicates += 1

    return handle


# ---- the command line ----------------------------------------------------------------


class _ClickProgress:
    """One click progress bar per phase, on stderr so stdout keeps the summary."""

    def __init__(self) -> None:
        self._bars = contextlib.ExitStack()
        self._bar: Any = None

    def start(self, label: str, total: int) -> None:
        self.finish()
        self._bar = self._bars.enter_context(
            click.progressbar(length=max(total, 0), label=label, file=sys.stderr)
        )

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def finish(self) -> None:
        self._bars.close()
        self._bar = None


def _summary(report: RebuildReport) -> list[str]:
    lines = [
        f"organisations restored: {report.organisations}",
        f"keys written:           {report.keys_written}",
        f"ledger entries read:    {report.entries_read} "
        f"({report.duplicates} re-emitted copies skipped)",
    ]
    if report.unreadable:
        lines.append(f"warning: {report.unreadable} ledger messages could not be read")
    for org_id, gaps in report.gaps.items():
        shown = ", ".join(str(s) for s in gaps[:10]) + (" …" if len(gaps) > 10 else "")
        lines.append(f"warning: {org_id}: {len(gaps)} sequences missing from the ledger: {shown}")
    for org_id, incomplete in report.incomplete.items():
        shown = ", ".join(str(s) for s in incomplete[:10]) + (" …" if len(incomplete) > 10 else "")
        lines.append(
            f"warning: {org_id}: sequences {shown} were split into parts of which some "
            "are missing: not restored"
        )
    for org_id, conflicts in report.conflicts.items():
        shown = ", ".join(str(s) for s in conflicts[:10]) + (" …" if len(conflicts) > 10 else "")
        lines.append(
            f"warning: {org_id}: sequences {shown} each came with two different entries "
            "(Redis lost writes and a worker decided on): the first ones were restored"
        )
    for org_id, problems in report.inconsistencies.items():
        for problem in problems[:10]:
            lines.append(f"warning: {org_id}: {problem}")
    return lines


@click.command("rebuild")
@click.option("--org", default=None, help="rebuild only this organisation")
@click.option(
    "--replace",
    is_flag=True,
    help="delete each rebuilt organisation's existing keys first "
    "(a Redis that came back without its last writes)",
)
def rebuild_command(org: str | None, replace: bool) -> None:
    """Restore creditgate's Redis keys from credits.ledger alone.

    Stop the workers first. Meant for an empty Redis; with --replace, for one that
    lost its last writes. Exits 1 when the ledger has gaps, unreadable entries,
    sequences with two different entries or balances that disagree with it (the keys
    are written all the same).
    """
    settings = Settings()
    progress = _ClickProgress()
    try:
        report = asyncio.run(rebuild(settings, org=org, replace=replace, progress=progress))
    except CreditgateError:
        progress.finish()
        raise  # one line, with what to do, from the CLI's root group (cli.CliGroup)
    for line in _summary(report):
        click.echo(line, err=line.startswith("warning"))
    if not report.complete:
        sys.exit(1)


if __name__ == "__main__":  # through the CLI's root group, which renders its failures
    from creditgate.cli import main

    main(["rebuild", *sys.argv[1:]])

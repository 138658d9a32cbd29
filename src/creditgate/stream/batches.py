"""What the decision loop's stages hand each other: batches of fetched records.

A batch is bounded by a count (``CREDITGATE_BATCH_SIZE``) and by the bytes of its input
values (``CREDITGATE_BATCH_MAX_BYTES``), so that the batches in flight (one prepared, one
decided, one published) and one Redis round trip stay bounded whatever arrives; a single
record larger than the bound is a batch of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from creditgate.domain.outgoing import Outgoing
from creditgate.stream.decider import Incoming, PreparedCharges

Fetched = Mapping[TopicPartition, Sequence[Any]]  # aiokafka ConsumerRecords


@dataclass(frozen=True)
class Decided:
    """A batch's outgoing messages, and per organisation the last ledger sequence in them."""

    outgoing: list[Outgoing]
    sequences: dict[str, int]
    # per organisation, holds expired in the batch: out of the sweep's index once it is
    # published (``Decider.expired_published``)
    expired: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """Records fetched and prepared, waiting for the second stage."""

    generation: int  # the rebalance it was in hand in
    next_offsets: dict[TopicPartition, int]  # done once the batch is published
    charges: PreparedCharges
    commands: list[Incoming]
    sent_at: list[int]  # the charge requests' Kafka timestamps (ms), for the metrics
    size: int = 0  # bytes of the input values
    settlements: list[Incoming] = field(default_factory=list)  # of holds

    def __len__(self) -> int:
        return len(self.charges) + len(self.commands) + len(self.settlements)

    @classmethod
    def joined(cls, parts: Sequence[Batch]) -> Batch:
        """Parts fetched one after the other, as one batch (in the order fetched)."""
        if len(parts) == 1:
            return parts[0]
        next_offsets: dict[TopicPartition, int] = {}
        for part in parts:
            next_offsets.update(part.next_offsets)  # a later part reads further
        return cls(
            parts[-1].generation,
            next_offsets,
            PreparedCharges(
                [m for p in parts for m in p.charges.dead_letters],
                [v for p in parts for v in p.charges.views],
                [c for p in parts for c in p.charges.calls],
            ),
            [c for p in parts for c in p.commands],
            [t for p in parts for t in p.sent_at],
            sum(p.size for p in parts),
            [s for p in parts for s in p.settlements],
        )


def value_bytes(record: Any) -> int:
    return len(record.value) if record.value is not None else 0


def within_bytes(fetched: Fetched, room: int, first: bool = True) -> tuple[Fetched, Fetched]:
    """What fits ``room`` bytes of values, and the rest: records are taken partition by
    partition, in order. With ``first`` (nothing else waits) the first record always
    fits: a larger one is a batch of its own. The rest keeps each partition's order, to
    be prepared first next time."""
    taken: dict[TopicPartition, Sequence[Any]] = {}
    rest: dict[TopicPartition, Sequence[Any]] = {}
    used, full = 0, False
    for tp, records in fetched.items():
        if full:
            rest[tp] = records
            continue
        cut = 0
        while cut < len(records):
            size = value_bytes(records[cut])
            if used + size > room and not (first and used == 0 and not taken and cut == 0):
                full = True
                break
            used += size
            cut += 1
        if cut:
            taken[tp] = records[:cut]
        if cut < len(records):
            rest[tp] = records[cut:]
    return taken, rest


def incoming(records: Sequence[Any]) -> Iterator[Incoming]:
    return (Incoming(r.topic, r.partition, r.offset, r.key, r.value) for r in records)

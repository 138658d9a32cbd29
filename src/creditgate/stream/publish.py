"""Publishing a batch's outcomes: all of them on the broker, or the batch is retried.

``until_published`` publishes every message of a batch and awaits the broker's
acknowledgement of each; any failure publishes the whole batch again, with backoff, for
as long as it takes (``retry.until_done``). Re-publishing is safe because decisions are
idempotent: a message the broker already had is a copy of the same decision. Only when
it returns may the batch's offsets be committed.

A message the broker can never take must not hold the stream up that way. Each message
is checked against its topic's ``max.message.bytes`` (read from the broker at start-up)
before it is sent; one larger is replaced by a bounded substitute: a charge result by
the same result without its items (``items_truncated``), anything else by a dead
letter naming the topic, the size and the digest. Should the broker still refuse one
as too large (a limit lowered since), the limits are read again and the batch is sent
message by message, each refused one replaced the same way. Every substitute is logged
as an error and counted in ``creditgate_oversized_messages_total``; the rest of the
batch is published and the batch is committed.

The ledger's entries go first, and the rest only once the broker has them: a decision
is never out (a result, a notification) without its ledger entry, from which a Redis
that forgot it is healed (``stream.healing``). Were a worker and its Redis lost together
between the two, the request is decided again, and nobody has seen the first decision.
Where the ledger's entries landed is noted for the ledger checkpoint.

The worker's producer is idempotent, and aiokafka's idempotent producer does not get
over a refused batch: the partition's sequence number has moved on without the broker,
which then answers every later batch there with OutOfOrderSequenceNumber. So after a
refusal (and on that error) the producer is replaced by a new one (``renew``), which
the broker knows by a new producer id whose sequences start again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, OutOfOrderSequenceNumber
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from creditgate.domain.dead_letters import dead_letter_body, dead_letter_key
from creditgate.domain.ids import rfc3339
from creditgate.domain.outgoing import Outgoing
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.stream.retry import until_done

log = logging.getLogger("creditgate.worker")

# the limits of the topics, by name on the broker; read again when the broker refuses
Limits = Mapping[str, int]
ReadLimits = Callable[[], Awaitable[dict[str, int]]]

# The producer's record batch size (aiokafka's ``max_batch_size``): a batch's messages
# for one partition fit in one record batch. At aiokafka's default of 16 KiB a batch of
# decisions (results and ledger entries of ~1 KB) filled about a hundred record batches,
# each closed and sent on its own: publishing cost 9 µs of CPU per message against 5.5
# at this size. Below the broker's default message.max.bytes (1 MiB).
RECORD_BATCH_BYTES = 512 * 1024

# (topic, key) → partition, remembered for this many keys (organisations times topics)
_PARTITION_CACHE_SIZE = 100_000


def record_bytes(message: Outgoing) -> int:
    """An upper bound of the message as a record batch of its own: what the broker
    compares with the topic's ``max.message.bytes``."""
    return int(
        DefaultRecordBatchBuilder.estimate_size_in_bytes(
            message.key, message.value, message.headers
        )
    )


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        limits: Limits | None = None,
        read_limits: ReadLimits | None = None,
        results_topic: str | None = None,
        deadletter_topic: str | None = None,
        ledger_topic: str | None = None,
        renew: Callable[[], Awaitable[AIOKafkaProducer]] | None = None,
    ) -> None:
        self._producer = producer
        self._renew = renew
        # where the ledger's entries landed, per partition: (first offset, next offset),
        # since the last take_ledger_written (for the ledger checkpoint, stream/healing.py)
        self._ledger = ledger_topic
        self._ledger_written: dict[int, tuple[int, int]] = {}
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[tuple[str, bytes], int] = {}
        self._limits: dict[str, int] = dict(limits or {})
        self._read_limits = read_limits
        self._results = results_topic
        self._deadletter = deadletter_topic

    async def until_published(self, messages: Sequence[Outgoing], size: int) -> None:
        """Publish a batch's messages (the outcomes of ``size`` records), retried until
        the broker has every one."""
        await until_done(
            lambda: self.publish(messages),
            "publish",
            f"publishing the outcomes of a batch of {size}",
            self._settings,
            self._metrics,
        )

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish the messages and wait until the broker has every one of them.

        They go out as one record batch per topic partition through aiokafka's
        ``send_batch``: ``send`` costs a coroutine and a delivery future per message,
        about twice what filling a batch costs. The partition is the one aiokafka's
        ``send`` would pick for the key (``org_id``), and a partition's messages keep
        their order within and across its batches. A record batch stays within its
        topic's limit; a message larger than it is replaced first (the module says how).
        """
        if not messages:
            return
        within = await self._within_limits(messages)
        try:
            for part in self._ledger_first(within):
                await self._send(part)
        except MessageSizeTooLargeError as exc:
            log.error(
                "the broker refused a message as too large (%s): reading the limits again", exc
            )
            await self._refresh_limits()
            await self._fresh_producer()
            for part in self._ledger_first(await self._within_limits(messages)):
                await self._send_one_by_one(part)
        except OutOfOrderSequenceNumber:
            await self._fresh_producer()
            raise  # the batch is published again, by the new producer

    async def _fresh_producer(self) -> None:
        """A new producer in place of one whose sequence numbers a refusal put out of
        step (see the module); nothing to do for a producer that is not idempotent."""
        if self._renew is not None:
            self._producer = await self._renew()

    def _ledger_first(self, messages: Sequence[Outgoing]) -> list[Sequence[Outgoing]]:
        """The ledger's entries, then the rest (both in their order)."""
        if self._ledger is None:
            return [messages]
        ledger = self._ledger
        return [
            [m for m in messages if m.topic == ledger],
            [m for m in messages if m.topic != ledger],
        ]

    def take_ledger_written(self) -> dict[int, tuple[int, int]]:
        """Per ledger partition, (first offset, next offset) of the entries published
        since the last call."""
        written, self._ledger_written = self._ledger_written, {}
        return written

    def _note_delivered(self, topic: str, partition: int, base_offset: int, records: int) -> None:
        if topic != self._ledger:
            return
        first, after = self._ledger_written.get(partition, (base_offset, base_offset + records))
        self._ledger_written[partition] = (
            min(first, base_offset),
            max(after, base_offset + records),
        )

    async def _send(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        kafka = self._producer
        open_batches: dict[tuple[str, int], tuple[Any, int]] = {}
        counts: dict[tuple[str, int], int] = {}
        sent: list[tuple[str, int, int]] = []  # (topic, partition, records) of each batch
        pending = []
        known = self._partitions
        for m in messages:
            partition = known.get((m.topic, m.key))  # no coroutine for a known key
            if partition is None:
                partition = await self._learn_partition(m.topic, m.key)
            where = (m.topic, partition)
            size = len(m.value) + len(m.key) + 64  # about what the record adds
            batch, filled = open_batches.get(where) or (None, 0)
            room = self._limits.get(m.topic)
            if batch is not None and room is not None and filled + size > room - 1024:
                # a record batch stays within its topic's limit (the first always fits)
                pending.append(await kafka.send_batch(batch, m.topic, partition=partition))
                sent.append((m.topic, partition, counts.pop(where)))
                batch = None
            if batch is None:
                batch, filled = kafka.create_batch(), 0
            if batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                # full: send it and start the next one (a first record always fits)
                pending.append(await kafka.send_batch(batch, m.topic, partition=partition))
                sent.append((m.topic, partition, counts.pop(where)))
                batch, filled = kafka.create_batch(), 0
                batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
            open_batches[where] = (batch, filled + size)
            counts[where] = counts.get(where, 0) + 1
        for (topic, partition), (batch, _) in open_batches.items():
            pending.append(await kafka.send_batch(batch, topic, partition=partition))
            sent.append((topic, partition, counts[(topic, partition)]))
        delivered = await asyncio.gather(*pending)
        for (topic, partition, records), metadata in zip(sent, delivered, strict=True):
            self._note_delivered(topic, partition, metadata.offset, records)

    async def _send_one_by_one(self, messages: Sequence[Outgoing]) -> None:
        """Each message in a record batch of its own; one refused as too large is
        replaced by its substitute (and, refused again, given up)."""
        refused = await self._refused(messages)
        if not refused:
            return
        substitutes = [await self._substitute(m, self._limits.get(m.topic)) for m in refused]
        for gone in await self._refused(substitutes):
            log.error("dropped an output for %s: even its substitute was too large", gone.topic)
            self._metrics.oversized.labels(gone.topic, "nothing").inc()

    async def _refused(self, messages: Sequence[Outgoing]) -> list[Outgoing]:
        """Send each message on its own, one after the other (a refusal renews the
        producer before the next); those the broker refused as too large. Anything else
        that fails raises: the batch is retried as a whole. A rare path: after a refusal.
        """
        refused = []
        for m in messages:
            batch = self._producer.create_batch()
            batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
            partition = await self._partition(m.topic, m.key)
            try:
                outcome = await (
                    await self._producer.send_batch(batch, m.topic, partition=partition)
                )
            except MessageSizeTooLargeError:
                refused.append(m)
                await self._fresh_producer()
                continue
            self._note_delivered(m.topic, outcome.partition, outcome.offset, 1)
        return refused

    async def _within_limits(self, messages: Sequence[Outgoing]) -> Sequence[Outgoing]:
        if not self._limits:
            return messages
        out: list[Outgoing] | None = None
        for i, m in enumerate(messages):
            limit = self._limits.get(m.topic)
            if limit is not None and record_bytes(m) > limit:
                if out is None:
                    out = list(messages[:i])
                out.append(await self._substitute(m, limit))
            elif out is not None:
                out.append(m)
        return messages if out is None else out

    async def _refresh_limits(self) -> None:
        if self._read_limits is None:
            return
        try:
            self._limits.update(await self._read_limits())
        except Exception as exc:
            log.warning("could not read the topics' limits again: %r", exc)

    async def _substitute(self, message: Outgoing, limit: int | None) -> Outgoing:
        """A bounded stand-in for a message too large for its topic: a result without
        its items, else a dead letter naming the topic, the size and the digest."""
        size = record_bytes(message)
        if message.topic == self._results:
            body = orjson.loads(message.value)
            body["items"], body["items_truncated"] = [], True
            found = Outgoing(message.topic, message.key, orjson.dumps(body), message.headers)
            if limit is None or record_bytes(found) <= limit:
                log.error(
                    "a result of %d bytes is larger than the limit of %s (%s bytes): "
                    "published without its items",
                    size,
                    message.topic,
                    limit,
                )
                self._metrics.oversized.labels(message.topic, "truncated_result").inc()
                return found
        digest = hashlib.sha256(message.value).hexdigest()
        log.error(
            "a message of %d bytes (sha256 %s) is larger than the limit of %s (%s bytes): "
            "dead-lettered instead",
            size,
            digest,
            message.topic,
            limit,
        )
        self._metrics.oversized.labels(message.topic, "dead_letter").inc()
        partition = await self._partition(message.topic, message.key)
        now = rfc3339(int(time.time() * 1000))
        body = dead_letter_body(
            {"topic": message.topic, "partition": partition, "offset": None},
            f"a message of {size} bytes is larger than the limit of {message.topic} "
            f"({limit} bytes max.message.bytes); sha256 {digest}",
            message.key,
            message.value,
            now,
        )
        ce_id = dict(message.headers).get("ce_id", b"")
        return Outgoing(
            self._deadletter or message.topic,
            dead_letter_key(message.key),
            orjson.dumps(body),
            [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"oversized/" + ce_id),
                ("ce_type", b"deadletter"),
                ("ce_source", b"creditgate"),
                ("ce_time", now.encode()),
            ],
        )

    async def _partition(self, topic: str, key: bytes) -> int:
        found = self._partitions.get((topic, key))
        return found if found is not None else await self._learn_partition(topic, key)

    async def _learn_partition(self, topic: str, key: bytes) -> int:
        """The partition of a key not yet in ``_partitions``, remembered there."""
        # partition counts never change under a running worker (it checks them at
        # start-up, and keys only keep an organisation in order while they stay put)
        ids = sorted(await self._producer.partitions_for(topic))
        found = int(self._partitioner(key, ids, ids))
        if len(self._partitions) >= _PARTITION_CACHE_SIZE:
            self._partitions.clear()
        self._partitions[(topic, key)] = found
        return found

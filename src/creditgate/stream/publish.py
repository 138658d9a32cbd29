"""Publishing a batch's outcomes: all of them on the broker, or the batch is retried.

``until_published`` publishes every message of a batch and awaits the broker's
acknowledgement of each; any failure publishes the whole batch again, with backoff, for
as long as it takes (``retry.until_done``). Re-publishing is safe because decisions are
idempotent: a message the broker already had is a copy of the same decision. Only when
it returns may the batch's offsets be committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.stream.events import Outgoing
from creditgate.stream.retry import until_done

# The producer's record batch size (aiokafka's ``max_batch_size``): a batch's messages
# for one partition fit in one record batch. At aiokafka's default of 16 KiB a batch of
# decisions (results and ledger entries of ~1 KB) filled about a hundred record batches,
# each closed and sent on its own: publishing cost 9 µs of CPU per message against 5.5
# at this size. Below the broker's default message.max.bytes (1 MiB).
RECORD_BATCH_BYTES = 512 * 1024

# (topic, key) → partition, remembered for this many keys (organisations times topics)
_PARTITION_CACHE_SIZE = 100_000


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        settings: Settings,
        metrics: Metrics | None = None,
        ledger_topic: str | None = None,
    ) -> None:
        self._producer = producer
        # where the ledger's entries landed, per partition: (first offset, next offset),
        # since the last take_ledger_written (for the ledger checkpoint, stream/healing.py)
        self._ledger_topic = ledger_topic
        self._ledger_written: dict[int, tuple[int, int]] = {}
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[tuple[str, bytes], int] = {}

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
        their order within and across its batches.

        The ledger's entries go first, and the rest only once the broker has them: a
        decision is never out (a result, a notification) without its ledger entry, from
        which a Redis that forgot it is healed (stream/healing.py). Were a worker and its
        Redis lost together between the two, the request is decided again, and nobody
        has seen the first decision.
        """
        if not messages:
            return
        if self._ledger_topic is None:
            await self._send(messages)
            return
        ledger = self._ledger_topic
        await self._send([m for m in messages if m.topic == ledger])
        await self._send([m for m in messages if m.topic != ledger])

    async def _send(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        kafka = self._producer
        open_batches: dict[tuple[str, int], Any] = {}
        counts: dict[tuple[str, int], int] = {}
        pending = []
        sent: list[tuple[str, int, int]] = []  # (topic, partition, records) of each batch
        known = self._partitions
        for m in messages:
            partition = known.get((m.topic, m.key))  # no coroutine for a known key
            if partition is None:
                partition = await self._learn_partition(m.topic, m.key)
            where = (m.topic, partition)
            batch = open_batches.get(where)
            if batch is None:
                batch = open_batches[where] = kafka.create_batch()
            if batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                # full: send it and start the next one (a first record always fits)
                pending.append(await kafka.send_batch(batch, m.topic, partition=partition))
                sent.append((m.topic, partition, counts.pop(where)))
                batch = open_batches[where] = kafka.create_batch()
                batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
            counts[where] = counts.get(where, 0) + 1
        for (topic, partition), batch in open_batches.items():
            pending.append(await kafka.send_batch(batch, topic, partition=partition))
            sent.append((topic, partition, counts[(topic, partition)]))
        delivered = await asyncio.gather(*pending)
        self._note_ledger_offsets(sent, [d.offset for d in delivered])

    def _note_ledger_offsets(self, sent: list[tuple[str, int, int]], offsets: list[int]) -> None:
        written = self._ledger_written
        for (topic, partition, records), base in zip(sent, offsets, strict=True):
            if topic != self._ledger_topic:
                continue
            first, after = written.get(partition, (base, base + records))
            written[partition] = (min(first, base), max(after, base + records))

    def take_ledger_written(self) -> dict[int, tuple[int, int]]:
        """Per ledger partition, (first offset, next offset) of the entries published
        since the last call."""
        written, self._ledger_written = self._ledger_written, {}
        return written

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

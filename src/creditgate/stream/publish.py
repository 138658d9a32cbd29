"""Publishing a batch's outcomes: all of them on the broker, or the batch is retried.

``until_published`` decides a batch (through the callable it is given), publishes every
message and awaits the broker's acknowledgement of each; any failure retries the whole
batch with backoff, for as long as it takes. Retrying is safe because decisions are
idempotent: a batch decided before the failure is re-published from the stored
decisions, identically. Only when it returns may the batch's offsets be committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from creditgate.errors import InfrastructureError
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.stream.events import Outgoing

log = logging.getLogger("creditgate.worker")

Decide = Callable[[], Awaitable[list[Outgoing]]]

# (topic, key) → partition, remembered for this many keys (organisations times topics)
_PARTITION_CACHE_SIZE = 100_000


class Publisher:
    def __init__(
        self, producer: AIOKafkaProducer, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        self._producer = producer
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[tuple[str, bytes], int] = {}

    async def until_published(self, decide: Decide, size: int) -> None:
        delay = self._settings.retry_backoff_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.publish(await decide())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: the batch stays uncommitted
                self._metrics.batch_retries.labels("batch").inc()
                log.warning(
                    "batch of %d not done (attempt %d), retrying in %.1fs: %s",
                    size,
                    attempt,
                    delay,
                    exc,
                    exc_info=not _is_infrastructure(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_backoff_max_seconds)
            else:
                if attempt > 1:
                    log.info("batch of %d done after %d attempts", size, attempt)
                return

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish the messages and wait until the broker has every one of them.

        They go out as one record batch per topic partition through aiokafka's
        ``send_batch``: ``send`` costs a coroutine and a delivery future per message,
        about twice what filling a batch costs. The partition is the one aiokafka's
        ``send`` would pick for the key (``org_id``), and a partition's messages keep
        their order within and across its batches.
        """
        if not messages:
            return
        kafka = self._producer
        open_batches: dict[tuple[str, int], Any] = {}
        pending = []
        for m in messages:
            partition = await self._partition(m.topic, m.key)
            where = (m.topic, partition)
            batch = open_batches.get(where)
            if batch is None:
                batch = open_batches[where] = kafka.create_batch()
            if batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                # full: send it and start the next one (a first record always fits)
                pending.append(await kafka.send_batch(batch, m.topic, partition=partition))
                batch = open_batches[where] = kafka.create_batch()
                batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
        for (topic, partition), batch in open_batches.items():
            pending.append(await kafka.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)

    async def _partition(self, topic: str, key: bytes) -> int:
        found = self._partitions.get((topic, key))
        if found is None:
            # partition counts never change under a running worker (it checks them at
            # start-up, and keys only keep an organisation in order while they stay put)
            ids = sorted(await self._producer.partitions_for(topic))
            found = int(self._partitioner(key, ids, ids))
            if len(self._partitions) >= _PARTITION_CACHE_SIZE:
                self._partitions.clear()
            self._partitions[(topic, key)] = found
        return found


def _is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, InfrastructureError | KafkaError | OSError)

"""Publishing a batch's outcomes: all of them on the broker, or the batch is retried.

``until_published`` publishes every message of a batch and awaits the broker's
acknowledgement of each; any failure publishes the whole batch again, with backoff, for
as long as it takes. Re-publishing is safe because decisions are idempotent: a message
the broker already had is a copy of the same decision. Only when it returns may the
batch's offsets be committed. ``until_done`` is that retry loop, for any step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from creditgate.errors import InfrastructureError
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.stream.events import Outgoing

log = logging.getLogger("creditgate.worker")

T = TypeVar("T")

# The producer's record batch size (aiokafka's ``max_batch_size``): a batch's messages
# for one partition fit in one record batch. At aiokafka's default of 16 KiB a batch of
# decisions (results and ledger entries of ~1 KB) filled about a hundred record batches,
# each closed and sent on its own: publishing cost 9 µs of CPU per message against 5.5
# at this size. Below the broker's default message.max.bytes (1 MiB).
RECORD_BATCH_BYTES = 512 * 1024

# (topic, key) → partition, remembered for this many keys (organisations times topics)
_PARTITION_CACHE_SIZE = 100_000


async def until_done(
    step: Callable[[], Awaitable[T]], stage: str, doing: str, settings: Settings, metrics: Metrics
) -> T:
    """``step()``'s result, calling it again after each failure, with backoff, for as
    long as it takes: a batch's records are never acknowledged half done. Each retry
    counts in ``creditgate_batch_retries_total{stage}``."""
    delay = settings.retry_backoff_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            done = await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: the batch stays uncommitted
            metrics.batch_retries.labels(stage).inc()
            log.warning(
                "%s failed (attempt %d), retrying in %.1fs: %s",
                doing,
                attempt,
                delay,
                exc,
                exc_info=not _is_infrastructure(exc),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.retry_backoff_max_seconds)
        else:
            if attempt > 1:
                log.info("%s done after %d attempts", doing, attempt)
            return done


class Publisher:
    def __init__(
        self, producer: AIOKafkaProducer, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        self._producer = producer
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
        """
        if not messages:
            return
        kafka = self._producer
        open_batches: dict[tuple[str, int], Any] = {}
        pending = []
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
                batch = open_batches[where] = kafka.create_batch()
                batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
        for (topic, partition), batch in open_batches.items():
            pending.append(await kafka.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)

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


def _is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, InfrastructureError | KafkaError | OSError)

"""The decision loop's offsets: which are published (done), which are committed.

An offset is *done* once every decision of the records before it is on the broker; only
done offsets are committed, so a crash re-decides (identically) at most what was done
since the last commit, never skips what was not. Commits go through ``commit``, at most
one at a time; a rebalance ``forget``s the partitions it takes away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger("creditgate.worker")

_COMMIT_TIMEOUT_SECONDS = 10.0


class Offsets:
    def __init__(self) -> None:
        self._done: dict[TopicPartition, int] = {}  # next offset to read, published
        self._committed: dict[TopicPartition, int] = {}
        self._committing = asyncio.Lock()

    def done(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """Every record before these offsets has its decisions on the broker."""
        self._done.update(next_offsets)

    async def commit(self, consumer: AIOKafkaConsumer) -> bool:
        """Commit what is done and not yet committed; False if the broker refused."""
        async with self._committing:
            owned = consumer.assignment()
            for tp in [tp for tp in self._done if tp not in owned]:
                # decided just as a rebalance moved it away: its new owner commits it
                del self._done[tp]
                self._committed.pop(tp, None)
            due = {tp: o for tp, o in self._done.items() if self._committed.get(tp) != o}
            if not due:
                return True
            try:
                # bounded: aiokafka retries a commit for as long as the coordinator is
                # unknown, and a stop or a rebalance waits for this one
                await asyncio.wait_for(consumer.commit(due), _COMMIT_TIMEOUT_SECONDS)
            except (KafkaError, TimeoutError) as exc:
                # not lost: retried with the next commit, or, if the partitions moved in
                # a rebalance, read again and re-published identically by their owner
                log.warning("offsets not committed yet: %r", exc)
                return False
            self._committed.update(due)
            return True

    def forget(self, revoked: Iterable[TopicPartition]) -> None:
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    async def learn_committed(
        self, consumer: AIOKafkaConsumer, assigned: Iterable[TopicPartition]
    ) -> None:
        """Where each newly assigned partition was committed (for the lag), in one round
        of requests rather than one after the other."""
        partitions = list(assigned)
        found = await asyncio.gather(
            *(consumer.committed(tp) for tp in partitions), return_exceptions=True
        )
        for tp, committed in zip(partitions, found, strict=True):
            if isinstance(committed, int):  # None: never committed; an error: unknown
                self._committed[tp] = committed

    def lag(self, consumer: AIOKafkaConsumer) -> dict[tuple[str, int], int]:
        """Per assigned partition: the high-water mark minus the committed offset."""
        lag = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag[(tp.topic, tp.partition)] = max(0, highwater - self._committed.get(tp, 0))
        return lag

"""Kafka plumbing of the harness: produce the workload, watch offsets, read timestamps.

The harness measures without reading every result: end offsets count what a variant
produced, the first and last record of each partition give the first and last decision
times (record timestamps are set by the producer when it sends), and the consumer
group's committed offsets show the inputs were acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from creditgate.stream.limits import REQUEST_PRODUCER_MAX_BYTES
from creditgate_harness.workload import Send


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    names: dict[str, str],
    requests: Iterable[Send],
    total: int,
    label: str,
) -> float:
    """Produce as fast as the broker takes them; returns the messages per second."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=REQUEST_PRODUCER_MAX_BYTES,  # a request may be ~3 MB
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending: list[asyncio.Future[object]] = []
        for done, request in enumerate(requests, 1):
            pending.append(
                await producer.send(names[request.topic], request.value, key=request.key)
            )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
                progress(label, done, total, started)
        await asyncio.gather(*pending)
        progress(label, total, total, started, end=True)
    finally:
        await producer.stop()
    return total / (time.perf_counter() - started)


_last_print: dict[str, float] = {}


def progress(label: str, done: int, total: int, started: float, *, end: bool = False) -> None:
    """A progress line: redrawn in place on a terminal, every few seconds in a log."""
    now = time.perf_counter()
    tty = sys.stdout.isatty()
    if not end and now - _last_print.get(label, 0.0) < (0.5 if tty else 5.0):
        return
    _last_print[label] = now
    elapsed = now - started
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"  {label}: {done:>9,}/{total:,}  {rate:>8,.0f}/s  {elapsed:6.1f}s"
    if tty:
        print(f"\r{line}", end="\n" if end else "", flush=True)
    else:
        print(line, flush=True)


@dataclass(frozen=True)
class Span:
    count: int
    first_ms: int | None
    last_ms: int | None

    @property
    def seconds(self) -> float:
        if self.first_ms is None or self.last_ms is None:
            return 0.0
        return max(self.last_ms - self.first_ms, 1) / 1000


class Watcher:
    """One group-less consumer for offsets and spot reads, plus an admin client."""

    def __init__(self, bootstrap: str, partitions: int) -> None:
        self._partitions = partitions
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)

    async def start(self) -> None:
        await self._consumer.start()
        await self._admin.start()

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        # Every topic of a run has the same partition count (topics/ says 6); asking the
        # broker would need a metadata refresh per topic.
        return [TopicPartition(topic, p) for topic in topics for p in range(self._partitions)]

    async def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        parts = await self.partitions(topics)
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(parts)
        return ends

    async def total(self, topics: Iterable[str]) -> int:
        return sum((await self.end_offsets(topics)).values())

    async def committed(self, group: str, topics: Iterable[str]) -> dict[TopicPartition, int]:
        wanted = set(await self.partitions(topics))
        offsets = await self._admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offsets.items() if tp in wanted}

    async def committed_to_end(
        self, group: str, topics: list[str], marks: dict[TopicPartition, int]
    ) -> bool:
        """True once the group committed every partition up to ``marks``."""
        committed = await self.committed(group, topics)
        return all(committed.get(tp, -1) >= end for tp, end in marks.items() if end > 0)

    async def span(self, topics: Iterable[str], since: dict[TopicPartition, int]) -> Span:
        """Records produced after ``since``: how many, first and last timestamps."""
        ends = await self.end_offsets(topics)
        first: list[int] = []
        last: list[int] = []
        count = 0
        for tp, end in ends.items():
            start = since.get(tp, 0)
            if end <= start:
                continue
            count += end - start
            first.append(await self._timestamp_at(tp, start))
            last.append(await self._timestamp_at(tp, end - 1))
        return Span(count, min(first, default=None), max(last, default=None))

    async def _timestamp_at(self, tp: TopicPartition, offset: int) -> int:
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        while True:
            batch = await self._consumer.getmany(tp, timeout_ms=2_000, max_records=1)
            for record in batch.get(tp, []):
                stamp: int = record.timestamp
                return stamp

    async def read(
        self, topics: Iterable[str], since: dict[TopicPartition, int]
    ) -> AsyncIterator[bytes | None]:
        """The value of every record after ``since``, up to the current end."""
        ends = await self.end_offsets(topics)
        todo = {tp: end for tp, end in ends.items() if end > since.get(tp, 0)}
        self._consumer.assign(list(todo))
        for tp in todo:
            self._consumer.seek(tp, since.get(tp, 0))
        while todo:
            batches = await self._consumer.getmany(*todo, timeout_ms=2_000, max_records=5_000)
            for tp, records in batches.items():
                for record in records:
                    if tp in todo and record.offset < todo[tp]:
                        yield record.value
                if records and records[-1].offset >= todo.get(tp, 0) - 1:
                    todo.pop(tp, None)
                    with contextlib.suppress(Exception):
                        self._consumer.pause(tp)


class DecisionObserver:
    """Follows a results topic from its current end; notes when each request's decision
    arrives (here, ``perf_counter``) and its producer timestamp (ms since the epoch).

    The request id comes from the ``ce_id`` header (``org/request_id/result``), so the
    values are never parsed: the observer must cost as little as it can.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
        )
        self._parts = [TopicPartition(topic, p) for p in range(partitions)]
        self.seen: dict[str, tuple[float, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._parts)
        for tp, end in (await self._consumer.end_offsets(self._parts)).items():
            self._consumer.seek(tp, end)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    ce_id = dict(record.headers).get("ce_id", b"").decode()
                    parts = ce_id.split("/")
                    if len(parts) == 3 and parts[1] not in self.seen:
                        self.seen[parts[1]] = (now, record.timestamp)
            if batches:
                self._arrived.set()

    async def wait_for(self, ids: set[str], timeout: float) -> dict[str, tuple[float, int]]:
        """The decisions of ``ids`` seen within ``timeout`` seconds (all, normally)."""
        deadline = time.perf_counter() + timeout
        while not ids <= self.seen.keys() and time.perf_counter() < deadline:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), 1.0)
        return {r: self.seen[r] for r in ids if r in self.seen}

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

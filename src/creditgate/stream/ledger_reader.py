"""Reading ranges of ``credits.ledger``, for healing a Redis that forgot and for rebuilds.

No consumer group: nothing is committed, and reading never disturbs the workers' groups.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from creditgate.connections import aiokafka_options, stop_consumer
from creditgate.errors import ConfigurationError, InfrastructureError
from creditgate.settings import Settings
from creditgate.stream.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES, fetch_sizes

# No new ledger message for this long while reading below the end offsets: the
# broker is gone, and waiting longer would only hide it.
READ_IDLE_TIMEOUT_SECONDS = 60.0

# (key, value, partition, offset) of one ledger message
Handle = Callable[[bytes | None, bytes | None, int, int], None]


async def ledger_partitions(settings: Settings, topic: str) -> list[int]:
    """The partitions the broker has for ``topic`` (not the count its definition says)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=15000,
        **aiokafka_options(settings),
    )
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for found in described:
        if found["topic"] == topic and found["error_code"] == 0 and found["partitions"]:
            return sorted(p["partition"] for p in found["partitions"])
    raise ConfigurationError(f"topic {topic} does not exist (run `creditgate topics apply`)")


class LedgerReader:
    """A consumer of one ledger topic that reads offset ranges on demand."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        max_message_bytes: int = BROKER_DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """``max_message_bytes``: the topic's limit, so that a fetch takes any message
        (an entry too large for one is split into parts well under it)."""
        self._settings = settings
        self.topic = topic
        self._fetch_sizes = fetch_sizes(max_message_bytes)
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        self._partitions = [
            TopicPartition(self.topic, n)
            for n in await ledger_partitions(self._settings, self.topic)
        ]
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self._fetch_sizes,
            **aiokafka_options(self._settings),
        )
        await self._consumer.start()
        self._consumer.assign(self._partitions)
        # paused between reads: no prefetching of a ledger nobody is reading
        self._consumer.pause(*self._partitions)

    async def stop(self) -> None:
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None

    async def bounds(self) -> tuple[dict[int, int], dict[int, int]]:
        """Per partition, its first offset still retained and its end offset, now."""
        consumer = self._require()
        begin = await consumer.beginning_offsets(self._partitions)
        end = await consumer.end_offsets(self._partitions)
        return (
            {tp.partition: begin[tp] for tp in self._partitions},
            {tp.partition: end[tp] for tp in self._partitions},
        )

    async def read(self, ranges: Mapping[int, tuple[int, int]], handle: Handle) -> int:
        """Hand every message of each partition's ``[start, end)`` to ``handle``, in
        offset order per partition; returns how many were read."""
        consumer = self._require()
        left: dict[TopicPartition, int] = {}
        for partition, (start, end) in ranges.items():
            if end > start:
                tp = TopicPartition(self.topic, partition)
                consumer.seek(tp, start)
                left[tp] = end
        consumer.resume(*left)
        try:
            return await self._read(consumer, left, handle)
        finally:
            consumer.pause(*self._partitions)

    async def _read(
        self, consumer: AIOKafkaConsumer, left: dict[TopicPartition, int], handle: Handle
    ) -> int:
        read = 0
        last_message = time.monotonic()
        while left:
            batches: dict[TopicPartition, list[Any]] = await consumer.getmany(*left, timeout_ms=500)
            if not batches and time.monotonic() - last_message > READ_IDLE_TIMEOUT_SECONDS:
                raise InfrastructureError(
                    f"no message of {self.topic} for {READ_IDLE_TIMEOUT_SECONDS:.0f}s while "
                    f"{len(left)} partitions were not read to their end"
                )
            for tp, records in batches.items():
                last_message = time.monotonic()
                end = left[tp]
                for record in records:
                    if record.offset < end:
                        handle(record.key, record.value, tp.partition, record.offset)
                        read += 1
                if await consumer.position(tp) >= end:
                    del left[tp]
        return read

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the ledger reader has not started")
        return self._consumer


def ledger_entry(value: bytes | None) -> dict[str, Any] | None:
    """The entry, when the message is one: a JSON object with an org_id and a sequence."""
    try:
        entry = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("org_id"), str):
        return None
    if not isinstance(entry.get("sequence"), int) or entry["sequence"] < 1:
        return None
    return entry

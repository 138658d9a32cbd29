"""A small Kafka client for creditgate's callers: publish requests and license commands,
and wait for their answers. Used by the CLI, the demo and the tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from creditgate.connections import aiokafka_options, stop_consumer
from creditgate.domain.charges import Action
from creditgate.errors import CreditgateError
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.limits import BROKER_DEFAULT_MAX_MESSAGE_BYTES, fetch_sizes
from creditgate.stream.topics import TopicRegistry

_REQUEST_TOPICS = {action: logical for logical, action in t.REQUEST_ACTIONS.items()}


class Timeout(CreditgateError):
    """No answer arrived before the deadline."""


class CreditgateClient:
    """Produces to the input topics; follows the output topics from the moment it starts."""

    def __init__(
        self,
        bootstrap: str,
        registry: TopicRegistry,
        follow: tuple[str, ...] = (t.CHARGE_RESULTS, t.LICENSE_EVENTS, t.NOTIFICATIONS),
        *,
        settings: Settings | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self.registry = registry
        self._follow = follow
        # Login and TLS from `settings`, else from the CREDITGATE_* environment.
        self._security = aiokafka_options(settings)
        # requests as large as their topics take (a 10,000-item request is ~3 MB)
        limits = [s.max_message_bytes or 0 for s in registry.specs.values()]
        self._largest = max([BROKER_DEFAULT_MAX_MESSAGE_BYTES, *limits])
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=2,
            max_request_size=self._largest + 64 * 1024,
            **self._security,
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self.seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._arrived = asyncio.Condition()

    async def __aenter__(self) -> CreditgateClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._producer.start()
        if not self._follow:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            **fetch_sizes(self._largest),
            **self._security,
        )
        await consumer.start()
        partitions = [
            TopicPartition(self.registry.name(logical), p)
            for logical in self._follow
            for p in range(self.registry.specs[logical].partitions)
        ]
        consumer.assign(partitions)
        # Pin the positions now, so nothing produced after start() can be missed.
        ends = await consumer.end_offsets(partitions)
        for tp, offset in ends.items():
            consumer.seek(tp, offset)
        self._consumer = consumer
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        try:
            if self._consumer:
                await stop_consumer(self._consumer)
        finally:
            await self._producer.stop()

    async def _read(self) -> None:
        assert self._consumer is not None
        logical = {self.registry.name(name): name for name in self._follow}
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            if not batches:
                continue
            async with self._arrived:
                for tp, records in batches.items():
                    for record in records:
                        self.seen[logical[tp.topic]].append(orjson.loads(record.value))
                self._arrived.notify_all()

    # ---- publishing --------------------------------------------------------------

    async def send(
        self, logical_topic: str, body: dict[str, Any] | bytes, key: str | None = None
    ) -> None:
        value = body if isinstance(body, bytes) else orjson.dumps(body)
        if key is None and isinstance(body, dict):
            key = str(body.get("org_id", ""))
        await self._producer.send_and_wait(
            self.registry.name(logical_topic), value, key=key.encode() if key is not None else None
        )

    async def request(self, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Publish a charge request on its action's topic and wait for its decision."""
        await self.send(_REQUEST_TOPICS[Action(body["action"])], body)
        return await self.wait_for(t.CHARGE_RESULTS, "request_id", body["request_id"], timeout)

    async def command(self, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Publish a license command and wait for its event."""
        await self.send(t.LICENSE_COMMANDS, body)
        return await self.wait_for(t.LICENSE_EVENTS, "command_id", body["command_id"], timeout)

    async def settlement(self, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Publish a hold's settlement or release and wait for its outcome."""
        await self.send(t.HOLD_SETTLEMENTS, body)
        return await self.wait_for(
            t.CHARGE_RESULTS, "settlement_id", body["settlement_id"], timeout
        )

    # ---- waiting -----------------------------------------------------------------

    async def wait_for(
        self, logical_topic: str, field: str, value: Any, timeout: float = 30.0, count: int = 1
    ) -> dict[str, Any]:
        """The first message on a followed topic whose ``field`` equals ``value``."""
        found = await self.wait_many(logical_topic, lambda m: m.get(field) == value, count, timeout)
        return found[0]

    async def wait_many(
        self, logical_topic: str, match: Any, count: int, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        def ready() -> bool:
            return sum(1 for m in self.seen[logical_topic] if match(m)) >= count

        try:
            async with self._arrived:
                await asyncio.wait_for(self._arrived.wait_for(ready), timeout)
        except TimeoutError:
            got = sum(1 for m in self.seen[logical_topic] if match(m))
            raise Timeout(
                f"{got} of {count} expected messages on {logical_topic} after {timeout:.0f}s"
            ) from None
        return [m for m in self.seen[logical_topic] if match(m)]

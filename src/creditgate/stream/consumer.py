"""The worker's consumer: requests and license commands, decided batch by batch.

Each turn takes what the broker has already fetched (up to ``batch_size`` records,
across every input partition), decides it, publishes the outcomes, waits until the
broker has every one of them, and only then marks the batch's offsets as done. A
background task commits the done marks at most once a second, so the next batches are
decided while a commit travels. A rebalance first lets the batch in hand finish and commits it, so a
partition's next owner starts right after the last decision published here.

Why a plain aiokafka consumer inside the faust worker rather than a faust agent:
``python -m bench.run`` measured faust's per-event path (an event, a future, an
acknowledgement and queue hand-offs per message) at about 140 ms of CPU per 1,000
messages before any decision, against 30 ms for aiokafka's ``getmany``; the decision
itself costs about 75. faust still runs the worker: its lifecycle and signals, its
producer and the HTTP views.

At least once, and never an undecided request acknowledged: an offset is committed only
after its decision's messages are on the broker. Anything decided but not committed
(a crash, a commit lost in a rebalance) is read again and, decisions being idempotent,
re-published identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service

from creditgate.connections import aiokafka_options
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.events import Outgoing
from creditgate.stream.processor import Incoming, Processor
from creditgate.stream.publish import Publisher
from creditgate.stream.topics import TopicRegistry

log = logging.getLogger("creditgate.worker")

# how long an idle getmany waits before the loop looks at whether it should stop
_IDLE_POLL_MS = 500
# commits are one broker write each: at most one per interval, so small batches under a
# light load do not each cost one (a crash re-decides at most this much, identically)
_COMMIT_INTERVAL_SECONDS = 1.0
# how long a stopping worker lets the batch in hand finish (during a Redis outage it
# would retry for ever); an unfinished batch is not committed, so nothing is lost
_STOP_GRACE_SECONDS = 15.0

Fetched = Mapping[TopicPartition, Sequence[Any]]  # aiokafka ConsumerRecords


class DecisionLoop(Service):
    """Consume → decide → publish → await delivery → mark done; commit in the background."""

    def __init__(
        self,
        processor: Processor,
        registry: TopicRegistry,
        settings: Settings,
        metrics: Metrics,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._processor = processor
        self._settings = settings
        self._metrics = metrics
        self._commands = registry.name(t.LICENSE_COMMANDS)
        self._topics = [registry.name(n) for n in t.REQUEST_ACTIONS] + [self._commands]
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._publisher: Publisher | None = None
        # held while a batch is decided and published: a rebalance or a stop waits for it
        self._in_batch = asyncio.Lock()
        self._committing = asyncio.Lock()
        self._commit_due = asyncio.Event()
        self._done: dict[TopicPartition, int] = {}  # next offset to read, published
        self._committed: dict[TopicPartition, int] = {}

    # ---- lifecycle ----------------------------------------------------------------

    async def on_start(self) -> None:
        security = aiokafka_options(self._settings)
        # acks=all: a decision counts as published once every in-sync replica has it
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            client_id=f"{self._settings.app_id}-worker",
            acks="all",
            **security,
        )
        await self._producer.start()
        self._publisher = Publisher(self._producer, self._settings, self._metrics)
        session = self._settings.session_timeout_seconds
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            group_id=self._settings.app_id,
            client_id=f"{self._settings.app_id}-worker",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(session * 1000),
            heartbeat_interval_ms=int(max(0.5, session / 6) * 1000),
            max_poll_records=self._settings.batch_size,
            **security,
        )
        self._consumer.subscribe(self._topics, listener=_Handover(self))
        await self._consumer.start()

    async def on_stop(self) -> None:
        if self._consumer is None:
            return
        try:  # taken and kept: the loop starts no further batch
            await asyncio.wait_for(self._in_batch.acquire(), _STOP_GRACE_SECONDS)
        except TimeoutError:
            log.warning(
                "stopping with a batch still unpublished after %.0fs; it stays "
                "uncommitted and is decided again by its partitions' next owner",
                _STOP_GRACE_SECONDS,
            )
        else:
            await self._commit()
        await self._consumer.stop()  # leaves the group: the others take over at once
        if self._producer is not None:
            await self._producer.stop()

    @Service.task
    async def _consume(self) -> None:
        consumer = self._require_consumer()
        size = self._settings.batch_size
        while not self.should_stop:
            fetched = await consumer.getmany(timeout_ms=_IDLE_POLL_MS, max_records=size)
            if not fetched:
                continue
            async with self._in_batch:
                if self.should_stop:
                    return  # not decided, not committed: read again after the restart
                await self._run(self._still_owned(fetched))

    @Service.task
    async def _commit_in_background(self) -> None:
        while not self.should_stop:
            await self._commit_due.wait()
            self._commit_due.clear()
            if await self._commit():
                await self.sleep(_COMMIT_INTERVAL_SECONDS)
            else:
                await self.sleep(self._settings.retry_backoff_seconds)
                self._commit_due.set()

    # ---- a batch --------------------------------------------------------------------

    async def _run(self, fetched: Fetched) -> None:
        charges: list[Incoming] = []
        commands: list[Incoming] = []
        sent_at: list[int] = []
        for tp, records in fetched.items():
            into = commands if tp.topic == self._commands else charges
            into.extend(Incoming(r.topic, r.partition, r.offset, r.key, r.value) for r in records)
            if into is charges:
                sent_at.extend(r.timestamp for r in records)
        if not charges and not commands:
            return

        async def decide() -> list[Outgoing]:
            # license commands first: a period started in the same batch as its first
            # requests is there when they are decided
            out = await self._processor.apply(commands) if commands else []
            if charges:
                out += await self._processor.decide(charges)
            return out

        assert self._publisher is not None  # created before the loop starts
        await self._publisher.until_published(decide, len(charges) + len(commands))
        for tp, records in fetched.items():
            self._done[tp] = records[-1].offset + 1
        self._commit_due.set()
        self._observe(charges, commands, sent_at)

    def _still_owned(self, fetched: Fetched) -> Fetched:
        # records fetched just before a rebalance took their partition away: leave them
        # to the new owner rather than publish them twice
        owned = self._require_consumer().assignment()
        return {tp: records for tp, records in fetched.items() if tp in owned}

    def _observe(
        self, charges: Sequence[Incoming], commands: Sequence[Incoming], sent_at: Iterable[int]
    ) -> None:
        if charges:
            self._metrics.batch_size.labels("charges").observe(len(charges))
            now_ms = time.time() * 1000
            for ms in sent_at:
                self._metrics.decision_seconds.observe(max(0.0, (now_ms - ms) / 1000))
        if commands:
            self._metrics.batch_size.labels("commands").observe(len(commands))

    # ---- offsets ----------------------------------------------------------------------

    async def _commit(self) -> bool:
        """Commit what is published and not yet committed; False if the broker refused."""
        async with self._committing:
            due = {tp: o for tp, o in self._done.items() if self._committed.get(tp) != o}
            if not due:
                return True
            try:
                await self._require_consumer().commit(due)
            except KafkaError as exc:
                # not lost: retried with the next commit, or, if the partitions moved in
                # a rebalance, read again and re-published identically by their owner
                log.warning("offsets not committed yet: %r", exc)
                return False
            self._committed.update(due)
            return True

    async def hand_over(self, revoked: Iterable[TopicPartition]) -> None:
        """Before a rebalance: finish the batch in hand, commit, forget the partitions."""
        async with self._in_batch:
            await self._commit()
            for tp in revoked:
                self._done.pop(tp, None)
                self._committed.pop(tp, None)

    async def take_over(self, assigned: Iterable[TopicPartition]) -> None:
        """After a rebalance: learn where each new partition was committed (for the lag)."""
        consumer = self._require_consumer()
        for tp in assigned:
            with contextlib.suppress(KafkaError):
                committed = await consumer.committed(tp)
                if committed is not None:
                    self._committed[tp] = self._done[tp] = committed

    def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition: the high-water mark minus the committed offset."""
        consumer = self._consumer
        if consumer is None:
            return {}
        lag = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag[(tp.topic, tp.partition)] = max(0, highwater - self._committed.get(tp, 0))
        return lag

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the decision loop has not started")
        return self._consumer


class _Handover(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: DecisionLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._loop.hand_over(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._loop.take_over(assigned)

"""The worker's consumer: requests and license commands, decided batch by batch.

Three stages, each working on another batch at the same time:

1. *prepare* takes what the broker has fetched, across every input partition (license
   commands and hold settlements first, so that they never wait behind a backlog of
   charge requests), reads and validates it and packs its Redis calls, again and again
   while the next stage is busy
   (up to ``batch_size`` records and ``batch_max_bytes`` bytes of input values: records
   fetched beyond that wait for the next batch, and a single larger request is a batch
   of its own);
2. *decide* takes everything prepared so far as one batch, decides it in one Redis
   round trip (two when it holds license commands too) and renders its outcomes;
3. *publish* sends the outcomes, waits until the broker has every one of them, and only
   then marks the batch's offsets as done.

A batch's outcomes are sent only once the batch before it is on the broker, so each
partition's outcomes stay in order even when a publish has to be retried. While Redis
runs a batch's scripts, the worker renders its replies as they come, prepares the next
batch and publishes the one before: in ``python -m bench.run`` publishing in line cost
a quarter of the decide stage's time. A batch holds what arrived during the previous
one: small under light load (a request is decided as soon as it arrives), large under
heavy load (each batch's round trips are shared by more requests).

Before it decides anything after its start, a partition assignment or a (re)connection to
Redis, and whenever a script finds an organisation stale, the decide stage checks Redis
against the ledger and heals what it forgot (``stream.healing``). After each batch is on
the broker it notes where the batch's ledger entries landed, and raises the ledger
checkpoint to there, at most once a second.

A background task commits the done marks at most once a second. A rebalance first lets
the batches in hand finish and commits them, so a partition's next owner starts right after
the last decision published here; parts prepared but not yet decided are dropped, as
the rebalance restarts every partition from its committed offset.

Why a plain aiokafka consumer inside the faust worker rather than a faust agent:
``python -m bench.run`` measured faust's per-event path (an event, a future, an
acknowledgement and queue hand-offs per message) at 90-140 ms of CPU per 1,000
messages before any decision, against about 30 ms for aiokafka's ``getmany``: as much
as the decision's own Python work. faust still runs the worker process: its lifecycle,
signals and HTTP views.

At least once, and never an undecided request acknowledged: an offset is committed only
after its decision's messages are on the broker. Anything decided but not committed
(a crash, a commit lost in a rebalance) is read again and, decisions being idempotent,
re-published identically.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from mode import Service

from creditgate.connections import aiokafka_options, stop_consumer
from creditgate.errors import RedisMayHaveForgotten
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.batches import Batch, Decided, Fetched, incoming, value_bytes, within_bytes
from creditgate.stream.decider import Decider, Incoming
from creditgate.stream.healing import LedgerGuard
from creditgate.stream.limits import fetch_sizes, read_limits
from creditgate.stream.offsets import Offsets
from creditgate.stream.publish import RECORD_BATCH_BYTES, Publisher
from creditgate.stream.retry import until_done
from creditgate.stream.topics import TopicRegistry

log = logging.getLogger("creditgate.worker")

# how long an idle getmany waits before the loop looks at whether it should stop
_IDLE_POLL_MS = 500
# with no batch for this long, the decide stage checks whether Redis was reached anew
# (a restart from an older AOF, a failover) and heals it without waiting for traffic
_IDLE_CHECK_SECONDS = 1.0
# commits are one broker write each: at most one per interval, so small batches under a
# light load do not each cost one (a crash re-decides at most this much, identically)
_COMMIT_INTERVAL_SECONDS = 1.0
# a stop's later steps talk to the broker, which may be away: each gets this long
_STOP_STEP_SECONDS = 5.0
# how long a stopping worker lets the batches in hand finish (during an outage they
# would retry for ever); an unfinished batch is not committed, so nothing is lost
_STOP_GRACE_SECONDS = 10.0


def heartbeat_seconds(session_timeout_seconds: float) -> float:
    """How often the consumer tells the group it is alive: six times a session, so a few
    late heartbeats do not end it, and at most twice a second."""
    return max(0.5, session_timeout_seconds / 6)


async def _at_most(seconds: float, doing: str, step: Awaitable[Any]) -> None:
    """A step of the stop, given up after ``seconds``: an unfinished commit only means
    that some decisions are published again, identically, by the next owner."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("stopping: gave up %s after %.0fs", doing, seconds)
    except KafkaError as exc:
        log.warning("stopping: %s failed: %r", doing, exc)


class DecisionLoop(Service):
    """Consume → decide → publish → await delivery → mark done; commit in the background."""

    def __init__(
        self,
        processor: Decider,
        registry: TopicRegistry,
        settings: Settings,
        metrics: Metrics,
        guard: LedgerGuard | None = None,
        **kwargs: Any,
    ) -> None:
        """``guard``: Redis checked against the ledger and healed from it (without it,
        Redis is trusted as it is)."""
        super().__init__(**kwargs)
        self._processor = processor
        self._guard = guard
        self._ledger = registry.name(t.LEDGER)
        self._settings = settings
        self._metrics = metrics
        self._registry = registry
        self._commands = registry.name(t.LICENSE_COMMANDS)
        self._settlements = registry.name(t.HOLD_SETTLEMENTS)
        self._topics = [registry.name(n) for n in t.INPUTS]
        self._urgent = frozenset({self._commands, self._settlements})  # fetched first
        self._next_sweep = 0.0  # monotonic time the hold sweep is due
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._publisher: Publisher | None = None
        # held while a batch is decided and handed to the publish stage: a rebalance or a
        # stop takes it, then waits for the publish in flight (``_published``)
        self._in_batch = asyncio.Lock()
        self._publishing: asyncio.Future[None] | None = None
        # what the first stage prepared while the second decided the batch before:
        # the next batch, in parts (one per fetch), at most batch_size records
        self._parts: list[Batch] = []
        self._waiting = 0
        self._waiting_bytes = 0
        # fetched beyond a batch's bytes, prepared first next time (with its generation)
        self._carry: tuple[int, Fetched] | None = None
        self._parts_ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._generation = 0  # one more at each rebalance
        self._commit_due = asyncio.Event()
        self._offsets = Offsets()

    # ---- lifecycle ----------------------------------------------------------------

    async def on_start(self) -> None:
        security = aiokafka_options(self._settings)
        # every topic's max.message.bytes as the broker applies it: what the publisher
        # checks its messages against, what the clients must fetch and send
        limits = await read_limits(self._settings, self._registry)
        outputs = [self._registry.name(n) for n in t.OUTPUTS]
        # acks=all: a decision counts as published once every in-sync replica has it (at
        # least min.insync.replicas of them). Idempotent: a send retried after a lost
        # acknowledgement (a broker failing over) is written once, not twice.
        producer_options: dict[str, Any] = {
            "bootstrap_servers": self._settings.kafka_bootstrap,
            "client_id": f"{self._settings.app_id}-worker",
            "acks": "all",
            "enable_idempotence": True,
            "max_batch_size": RECORD_BATCH_BYTES,
            # a record batch is at most its topic's limit (the publisher sees to it)
            "max_request_size": max(limits[name] for name in outputs) + 64 * 1024,
            **security,
        }

        async def new_producer() -> AIOKafkaProducer:
            """A started producer, in place of the one before (stream.publish says why)."""
            if self._producer is not None:
                await _at_most(_STOP_STEP_SECONDS, "closing the producer", self._producer.stop())
            self._producer = AIOKafkaProducer(**producer_options)
            await self._producer.start()
            return self._producer

        self._publisher = Publisher(
            await new_producer(),
            self._settings,
            self._metrics,
            limits={name: limits[name] for name in outputs},
            read_limits=partial(read_limits, self._settings, self._registry),
            results_topic=self._registry.name(t.CHARGE_RESULTS),
            deadletter_topic=self._registry.name(t.DEADLETTER),
            ledger_topic=self._ledger,
            renew=new_producer,
        )
        if self._guard is not None:
            await self._guard.start()
        session = self._settings.session_timeout_seconds
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            group_id=self._settings.app_id,
            client_id=f"{self._settings.app_id}-worker",
            enable_auto_commit=False,
            # Where the group has no committed offset (it expired after
            # offsets.retention.minutes, or CREDITGATE_APP_ID is new): from the earliest
            # message still kept, so nothing undecided is skipped. Everything retained is
            # read again, which is safe only because every idempotency record outlives
            # the messages it answers (retention.ms + segment.ms of each request topic):
            # the worker refuses to start otherwise (creditgate.preflight).
            auto_offset_reset="earliest",
            session_timeout_ms=int(session * 1000),
            heartbeat_interval_ms=int(heartbeat_seconds(session) * 1000),
            max_poll_records=self._settings.batch_size,
            # records as large as the input topics take; one fetch about a batch's bytes
            **fetch_sizes(
                max(limits[name] for name in self._topics), self._settings.batch_max_bytes
            ),
            **security,
        )
        self._consumer.subscribe(self._topics, listener=_Handover(self))
        await self._consumer.start()

    async def on_stop(self) -> None:
        if self._consumer is None:
            return
        try:
            await asyncio.wait_for(self._quiet(), _STOP_GRACE_SECONDS)
        except TimeoutError:
            log.warning(
                "stopping with a batch still unpublished after %.0fs; it stays "
                "uncommitted and is decided again by its partitions' next owner",
                _STOP_GRACE_SECONDS,
            )
        else:
            await _at_most(_STOP_STEP_SECONDS, "committing the last offsets", self._commit())
        self._cancel_publishing()  # still retrying: its batch stays uncommitted
        # leaving the group hands the partitions over at once, instead of after the session
        await _at_most(
            _STOP_STEP_SECONDS, "leaving the consumer group", stop_consumer(self._consumer)
        )
        if self._producer is not None:
            await _at_most(_STOP_STEP_SECONDS, "closing the producer", self._producer.stop())
        if self._guard is not None:
            await _at_most(_STOP_STEP_SECONDS, "closing the ledger reader", self._guard.stop())
        if self._processor.sweep is not None:
            await _at_most(
                _STOP_STEP_SECONDS, "closing the hold sweep", self._processor.sweep.close()
            )
        self._cancel_publishing()  # one started meanwhile would only retry, unheard

    @Service.task
    async def _fetch_and_prepare(self) -> None:
        consumer = self._require_consumer()
        size, max_bytes = self._settings.batch_size, self._settings.batch_max_bytes
        while not self.should_stop:
            # fewer than batch_size records (and batch_max_bytes bytes) wait to be decided
            await self._room.wait()
            if self._carry is not None:
                (generation, fetched), self._carry = self._carry, None
            else:
                generation, fetched = await self._fetch(consumer, size - self._waiting)
            if fetched:
                room = max_bytes - self._waiting_bytes
                fetched, rest = within_bytes(fetched, room, first=not self._parts)
                if rest:
                    self._carry = (generation, rest)
                    self._room.clear()  # the rest starts the next batch
                if fetched:
                    part = self._prepare(fetched, generation)
                    self._parts.append(part)
                    self._waiting += len(part)
                    self._waiting_bytes += part.size
                    if self._waiting >= size or self._waiting_bytes >= max_bytes:
                        self._room.clear()
                    self._parts_ready.set()

    async def _fetch(self, consumer: AIOKafkaConsumer, room: int) -> tuple[int, Fetched]:
        """Up to ``room`` records fetched, license commands and hold settlements first,
        with the rebalance they are in hand in.

        First because the consumer hands out what it fetched partition after partition: a
        command behind a backlog of requests waited until that whole backlog was decided.
        A fault run (20,000 requests on the broker, the worker killed five times) saw
        grants and new periods published 27 s after they were sent, at the very end,
        while the organisations' requests were refused for want of the credits they
        brought. Kafka keeps no order between topics, so nothing is lost by it.
        """
        urgent = [tp for tp in consumer.assignment() if tp.topic in self._urgent]
        fetched: dict[TopicPartition, Sequence[Any]] = {}
        if urgent:
            fetched = await consumer.getmany(*urgent, timeout_ms=0, max_records=room)
            room -= sum(len(records) for records in fetched.values())
        # the generation is read after each fetch, not before: records fetched after a
        # rebalance reset their partitions are past that reset, and dropping them would
        # lose them; records fetched before it are fetched again after it
        generation = self._generation
        if room > 0:
            rest = await consumer.getmany(
                timeout_ms=0 if fetched else _IDLE_POLL_MS, max_records=room
            )
            if self._generation != generation:
                fetched, generation = {}, self._generation
            for tp, records in rest.items():
                fetched[tp] = [*fetched.get(tp, ()), *records]
        return generation, fetched

    async def _quiet(self) -> None:
        """Until no batch is in hand. Once it has the lock it keeps it: no further batch
        starts (if the stop's grace runs out first, the decide stage sees should_stop)."""
        await self._in_batch.acquire()
        await self._published()

    @Service.task
    async def _decide_and_publish(self) -> None:
        while not self.should_stop:
            try:
                await asyncio.wait_for(
                    self._parts_ready.wait(),
                    min(_IDLE_CHECK_SECONDS, self._settings.hold_sweep_seconds),
                )
            except TimeoutError:
                await self._while_idle()
                await self._expire_while_idle()
                continue
            parts = self._take_parts()
            async with self._in_batch:
                if self.should_stop:
                    return  # not decided, not committed: read again after the restart
                # parts in hand before a rebalance are dropped: every partition now
                # restarts from its committed offset, so these records come again (or
                # go to another worker); deciding them now would only publish them twice
                current = [p for p in parts if p.generation == self._generation]
                if current:
                    batch = Batch.joined(current)
                    decided = await until_done(
                        partial(self._decide, batch),
                        "decide",
                        f"deciding a batch of {len(batch)}",
                        self._settings,
                        self._metrics,
                    )
                    await self._published()  # the batch before goes out first
                    # published even if a stop came meanwhile: the stop waits for it
                    # (within its grace), rather than leave decisions in Redis for the
                    # partitions' next owner to publish, whenever one comes
                    self._publishing = asyncio.ensure_future(self._publish(batch, decided))

    async def _while_idle(self) -> None:
        """No batch for a while: check Redis against the ledger now if it was reached anew
        (healing must not wait for the next request), and raise the checkpoint if due.
        A failure (Redis away) is met again by the next batch, which retries it."""
        if self._guard is None:
            return
        async with self._in_batch:
            if self.should_stop:
                return
            try:
                await self._guard.while_idle(self._published)
            except Exception as exc:  # noqa: BLE001 - the next batch meets it and retries
                log.info("idle check of Redis against the ledger failed: %s", exc)

    async def _expire_while_idle(self) -> None:
        """No batch for a while: expire the holds that are due and publish their
        hold.expired, so no traffic is needed for a hold to run out. A failure (Redis or
        the broker away) is met again at the next sweep, which finds the same holds."""
        if not self._sweep_due():
            return
        async with self._in_batch:
            if self.should_stop:
                return
            try:
                await self._published()
                processor = self._processor
                processor.take_rendered_sequences()
                out, expired = await processor.expire_due(self._owned())
                if not out and not any(expired.values()):
                    if expired:
                        await processor.expired_published(expired)
                    return
                assert self._publisher is not None  # created before the stages start
                await self._publisher.until_published(out, 0)
                if self._guard is not None:
                    self._guard.published(
                        processor.take_rendered_sequences(), self._publisher.take_ledger_written()
                    )
                await processor.expired_published(expired)
            except RedisMayHaveForgotten as exc:
                if self._guard is not None:
                    self._guard.heal_due(exc.orgs)
            except Exception as exc:  # noqa: BLE001 - the next sweep finds the same holds
                log.info("expiring holds while idle failed: %s", exc)

    def _owned(self) -> Callable[[str], bool]:
        """Whether an organisation's requests come to this worker: its key's partition
        (as Kafka's default partitioner picks it) is assigned here."""
        topic = self._registry.name(t.EXPORT_REQUESTS)
        count = self._registry.specs[t.EXPORT_REQUESTS].partitions
        mine = {tp.partition for tp in self._require_consumer().assignment() if tp.topic == topic}
        return lambda org_id: (murmur2(org_id.encode()) & 0x7FFFFFFF) % count in mine

    def _sweep_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + self._settings.hold_sweep_seconds
        return True

    def _take_parts(self) -> list[Batch]:
        """Everything prepared since the second stage last took: one batch."""
        parts, self._parts, self._waiting, self._waiting_bytes = self._parts, [], 0, 0
        self._parts_ready.clear()
        self._room.set()
        return parts

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

    def _prepare(self, fetched: Fetched, generation: int) -> Batch:
        charges: list[Incoming] = []
        commands: list[Incoming] = []
        settlements: list[Incoming] = []
        sent_at: list[int] = []
        for tp, records in fetched.items():
            if tp.topic == self._commands:
                commands.extend(incoming(records))
            elif tp.topic == self._settlements:
                settlements.extend(incoming(records))
            else:
                charges.extend(incoming(records))
                sent_at.extend(r.timestamp for r in records)
        return Batch(
            generation,
            {tp: records[-1].offset + 1 for tp, records in fetched.items()},
            self._processor.prepare(charges),
            commands,
            sent_at,
            sum(value_bytes(r) for records in fetched.values() for r in records),
            settlements,
        )

    async def _decide(self, batch: Batch) -> Decided:
        """Decide the batch, checking Redis against the ledger first when that is due."""
        processor = self._processor
        while True:
            processor.take_rendered_sequences()  # of an attempt that failed: unpublished
            try:
                if self._guard is not None:
                    await self._guard.before_batch(self._published)
                # license commands first: a period started in the same batch as its first
                # requests is there when they are decided
                out = await processor.apply(batch.commands) if batch.commands else []
                if batch.charges:
                    out += await processor.decide_prepared(batch.charges)
                # settlements after the charges: a hold and its settlement in one batch
                # are decided in that order
                if batch.settlements:
                    out += await processor.settle(batch.settlements)
                expired: dict[str, list[str]] = {}
                if self._sweep_due():
                    found, expired = await processor.expire_due(self._owned())
                    out += found
                await processor.note_holds()
            except RedisMayHaveForgotten as exc:
                # nothing was decided for those organisations: heal, then the whole batch
                # again (what it did decide comes back as replays, identical)
                log.warning("%s: checking Redis against the ledger", exc)
                assert self._guard is not None  # only a guarded store raises it
                self._guard.heal_due(exc.orgs)
                continue
            return Decided(out, processor.take_rendered_sequences(), expired)

    async def _publish(self, batch: Batch, decided: Decided) -> None:
        assert self._publisher is not None  # created before the stages start
        await self._publisher.until_published(decided.outgoing, len(batch))
        if self._guard is not None:
            self._guard.published(decided.sequences, self._publisher.take_ledger_written())
        try:
            await self._processor.expired_published(decided.expired)
        except Exception as exc:  # noqa: BLE001 - the next sweep publishes them again
            log.info("noting expired holds failed: %s", exc)
        self._offsets.done(batch.next_offsets)
        self._commit_due.set()
        self._observe(batch)

    async def _published(self) -> None:
        """Until the batch being published (if any) is on the broker and marked done.

        Shielded: a waiter given up on (a stop's grace running out) leaves the publish
        running, for ``_cancel_publishing`` to end. The lock is held meanwhile, so there
        is one waiter at a time.
        """
        if self._publishing is not None:
            await asyncio.shield(self._publishing)
            self._publishing = None

    def _cancel_publishing(self) -> None:
        if self._publishing is not None:
            self._publishing.cancel()

    def _observe(self, batch: Batch) -> None:
        if batch.charges:
            self._metrics.batch_size.labels("charges").observe(len(batch.charges))
            now_ms = time.time() * 1000
            for ms in batch.sent_at:
                self._metrics.decision_seconds.observe(max(0.0, (now_ms - ms) / 1000))
        if batch.commands:
            self._metrics.batch_size.labels("commands").observe(len(batch.commands))

    # ---- offsets ----------------------------------------------------------------------

    async def _commit(self) -> bool:
        return await self._offsets.commit(self._require_consumer())

    async def hand_over(self, revoked: Iterable[TopicPartition]) -> None:
        """Before a rebalance: finish the batches in hand, commit, forget the partitions."""
        if self.should_stop:  # set before on_stop runs
            # the stop holds the lock for good and has finished what it could: waiting
            # for the lock would hold the group up until the stop gives up on leaving it
            await self._commit_and_forget(revoked)
            return
        async with self._in_batch:
            await self._published()
            await self._commit_and_forget(revoked)

    async def _commit_and_forget(self, revoked: Iterable[TopicPartition]) -> None:
        try:
            await self._commit()
        finally:
            self._generation += 1  # parts prepared until now are not decided
            self._take_parts()
            self._carry = None  # fetched before the rebalance: read again after it
            self._offsets.forget(revoked)

    async def take_over(self, assigned: Iterable[TopicPartition]) -> None:
        """After a rebalance: learn where each new partition was committed (for the lag),
        and check Redis against the ledger before deciding for them."""
        partitions = list(assigned)
        await self._offsets.learn_committed(self._require_consumer(), partitions)
        if self._guard is not None and partitions:
            # their organisations' last decisions came from another worker, which may
            # have published entries that Redis then forgot
            self._guard.heal_due()

    def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition: the high-water mark minus the committed offset."""
        return {} if self._consumer is None else self._offsets.lag(self._consumer)

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

"""The worker's batched publishing and its Redis pipeline, on a real broker and Redis.

``Publisher.publish`` fills one record batch per topic partition instead of sending
message by message, and ``CreditStore`` packs its pipeline by hand: both must keep what
a consumer sees exactly as before — the partition of each key (an organisation's order
depends on it), the order within a partition, every value and header — and the same
replies from Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.exceptions import ResponseError

from creditgate.domain.charges import ChargeRequest
from creditgate.domain.outgoing import Outgoing
from creditgate.observability import Metrics
from creditgate.settings import Settings
from creditgate.store.calls import ChargeCall, _resp
from creditgate.store.gateway import CreditStore
from creditgate.stream.publish import Publisher
from creditgate.stream.topics import TopicRegistry, TopicSpec, apply_topics

PARTITIONS = 6

pytestmark = pytest.mark.integration


@pytest.fixture
async def producer(endpoints: tuple[str, str]) -> AsyncIterator[AIOKafkaProducer]:
    # small batches, so a batch fills up and the next one starts within one publish
    kafka = AIOKafkaProducer(bootstrap_servers=endpoints[0], acks="all", max_batch_size=4096)
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


async def _topic(bootstrap: str) -> str:
    name = f"t{uuid.uuid4().hex[:10]}.published"
    registry = TopicRegistry({name: TopicSpec(name, PARTITIONS, 1)})
    await apply_topics(bootstrap, registry)
    return name


async def _read(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        records: list[Any] = []
        async with asyncio.timeout(60):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def test_publish_keeps_partitions_order_values_and_headers(
    endpoints: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    bootstrap = endpoints[0]
    topic, reference = await _topic(bootstrap), await _topic(bootstrap)
    publisher = Publisher(producer, Settings())
    messages = [
        Outgoing(
            topic,
            f"org-{i % 37}".encode(),
            # one message larger than a whole batch: it must still go out, alone
            (b"x" * 10_000 if i == 50 else f'{{"n": {i}}}'.encode()),
            [("ce_id", f"org-{i % 37}/r-{i}/result".encode()), ("ce_type", b"charge.approved")],
        )
        for i in range(400)
    ]
    await publisher.publish(messages)
    # what aiokafka's own send does with the same keys
    sent = [await producer.send(reference, m.value, key=m.key) for m in messages]
    expected = [(await result).partition for result in sent]

    records = await _read(bootstrap, topic, len(messages))
    assert len(records) == len(messages)
    by_value = {r.value: r for r in records}
    for message, partition in zip(messages, expected, strict=True):
        record = by_value[message.value]
        assert record.partition == partition
        assert record.key == message.key
        assert list(record.headers) == message.headers
    for p in range(PARTITIONS):
        mine = [r.value for r in sorted(records, key=lambda r: r.offset) if r.partition == p]
        wanted = [m.value for m, q in zip(messages, expected, strict=True) if q == p]
        assert mine == wanted


async def _small_topic(bootstrap: str, limit: int) -> str:
    name = f"t{uuid.uuid4().hex[:10]}.small"
    spec = TopicSpec(name, PARTITIONS, 1, {"max.message.bytes": str(limit)})
    await apply_topics(bootstrap, TopicRegistry({name: spec}))
    return name


async def test_what_the_broker_refuses_as_too_large_is_replaced_not_retried(
    endpoints: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """The publisher believes the limits are 1 MiB; the broker takes 50 KB on one topic.
    A result too large loses its items, anything else becomes a dead letter; the rest
    of the batch is published, once, and publish returns."""
    bootstrap = endpoints[0]
    results, ledger = await _small_topic(bootstrap, 50_000), await _small_topic(bootstrap, 50_000)
    deadletter = await _topic(bootstrap)
    read = [0]

    async def read_limits() -> dict[str, int]:
        read[0] += 1
        return {results: 50_000, ledger: 50_000, deadletter: 1_048_576}

    metrics = Metrics()
    publisher = Publisher(
        producer,
        Settings(),
        metrics,
        limits={results: 1_048_576, ledger: 1_048_576, deadletter: 1_048_576},
        read_limits=read_limits,
        results_topic=results,
        deadletter_topic=deadletter,
    )
    items = [{"type": "contact", "id": f"c-{i:06}", "outcome": "charged"} for i in range(3000)]
    result = {"request_id": "r-1", "counts": {"charged": 3000}, "items": items}
    headers = [("ce_id", b"acme/r-1/result")]
    big_entry = orjson.dumps({"org_id": "acme", "sequence": 1, "blob": "x" * 80_000})
    messages = [
        Outgoing(results, b"acme", b'{"request_id": "r-0", "items": []}', headers),
        Outgoing(results, b"acme", orjson.dumps({**result, "items_truncated": False}), headers),
        Outgoing(ledger, b"acme", big_entry, [("ce_id", b"acme/ledger/1")]),
        Outgoing(results, b"acme", b'{"request_id": "r-2", "items": []}', headers),
    ]

    await asyncio.wait_for(publisher.publish(messages), 60)

    assert read[0] == 1
    # the record batches the broker took (r-0's and r-2's) went out, then the batch again
    # message by message: copies, as after any retried publish, in the batch's order
    records = sorted(await _read(bootstrap, results, 5), key=lambda r: r.offset)
    published = [orjson.loads(r.value) for r in records]
    assert [r["request_id"] for r in published] == ["r-0", "r-2", "r-0", "r-1", "r-2"]
    (truncated,) = [r for r in published if r["request_id"] == "r-1"]
    assert truncated["items"] == []
    assert truncated["items_truncated"] is True
    assert truncated["counts"] == {"charged": 3000}
    (letter,) = [orjson.loads(r.value) for r in await _read(bootstrap, deadletter, 1)]
    assert letter["source"] == {
        "topic": ledger,
        "partition": letter["source"]["partition"],
        "offset": None,
    }
    assert ledger in letter["error"]
    assert letter["value_bytes"] == len(big_entry)
    assert letter["value_sha256"] == hashlib.sha256(big_entry).hexdigest()
    sent = {
        s.labels["sent"]: s.value
        for s in next(iter(metrics.oversized.collect())).samples
        if s.name.endswith("_total")
    }
    assert sent == {"truncated_result": 1.0, "dead_letter": 1.0}

    # now the limits are known: the next such batch is replaced before it is sent
    await asyncio.wait_for(publisher.publish(messages[1:2]), 60)
    assert read[0] == 1


async def test_publish_of_nothing_sends_nothing() -> None:
    asked: list[str] = []

    class Recorder:
        """Stands in for the producer and records every method asked of it."""

        def __getattr__(self, name: str) -> Any:
            asked.append(name)
            raise AttributeError(name)

    await Publisher(Recorder(), Settings()).publish([])
    assert asked == []  # no batch, no send, no partition lookup


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    from redis.asyncio.connection import Connection

    command = ("EVALSHA", "abc", 2, "cg:{é}:k", "x", 0, -17, "", '{"a": "ü"}', 10**15)
    assert _resp(command) == b"".join(Connection().pack_command(*command))


@pytest.mark.single_redis  # the one server's batch connection, used directly
async def test_pipeline_replies_in_order_with_errors_in_place(store: CreditStore) -> None:
    key = f"{uuid.uuid4().hex}:n"
    payload = b"".join(
        _resp(command) for command in (("INCR", key), ("HGET", key, "x"), ("INCRBY", key, 2))
    )
    seen: list[tuple[int, object]] = []
    async with store._batches.connection(pooled=False) as connection:  # the batches' connection
        (first, second, third), count = await store._batches.pipeline(
            connection, payload, 3, lambda i, reply: seen.append((i, reply))
        )
        # the same connection answers the next batch in step
        (after,), _ = await store._batches.pipeline(connection, _resp(("GET", key)), 1)
    assert first == 1
    assert isinstance(second, ResponseError)  # WRONGTYPE, read whole: the rest follows
    assert third == 3
    assert seen == [(0, 1)]  # replies reach on_reply until the first error
    assert count == 1
    assert after == "3"
    await store.client_for_tests.delete(key)


async def test_a_redis_that_lost_its_scripts_gets_them_again(store: CreditStore) -> None:
    request = ChargeRequest.model_validate(
        {
            "request_id": "r-1",
            "org_id": f"o{uuid.uuid4().hex[:8]}",
            "user_id": "u-1",
            "action": "export",
            "items": [{"type": "company", "id": "co-1"}],
            "requested_at": "2026-11-26T10:00:00Z",
        }
    )
    (first,) = await store.charge_many([ChargeCall.of(request)], 1_795_000_000_000)
    await (
        store.client_for_tests.script_flush()
    )  # what a restarted Redis without its cache looks like
    (again,) = await store.charge_many([ChargeCall.of(request)], 1_795_000_000_001)
    assert first.status == "decided"
    assert again.status == "replay"
    assert again.record.raw == first.record.raw

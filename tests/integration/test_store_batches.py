"""Large batches on a real Redis: written while their replies are read, and a batch whose
connection drops half-way is decided once when it is sent again.

The store hands a whole batch to the socket at once and reads the replies as Redis runs
it. A batch far larger than the kernel's socket buffers must still go out whole (the
event loop writes the rest while the replies are being read).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from creditgate.domain.charges import ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.decisions import ChargeRecord
from creditgate.domain.ids import rfc3339
from creditgate.errors import StoreUnavailable
from creditgate.settings import Settings
from creditgate.store.calls import ChargeAnswer, ChargeCall
from creditgate.store.gateway import CreditStore

ORG = "org-batch"
DAY_MS = 86_400_000


def sequences_of(answers: Sequence[ChargeAnswer]) -> list[int]:
    """The answers' ledger sequences, sorted: every decided or replayed answer has one."""
    found = [a.record.sequence for a in answers]
    assert None not in found, found
    return sorted(cast("list[int]", found))


async def licensed(store: CreditStore, credits: int, now: int) -> None:
    """ORG with a period of ``credits`` and one member, u1."""
    bodies: list[dict[str, Any]] = [
        {
            "command_id": "start",
            "type": "license.start_period",
            "period_id": "p1",
            "starts_at": rfc3339(now - DAY_MS),
            "ends_at": rfc3339(now + 30 * DAY_MS),
            "credits": credits,
        },
        {"command_id": "member", "type": "member.upsert", "user_id": "u1", "role": "member"},
    ]
    commands = [license_command_adapter.validate_python({**b, "org_id": ORG}) for b in bodies]
    answers = await store.apply_commands(commands, now)
    assert all(a.record.applied for a in answers), answers


def export(request_id: str, n_items: int, now: int) -> ChargeCall:
    return ChargeCall.of(
        ChargeRequest.model_validate(
            {
                "request_id": request_id,
                "org_id": ORG,
                "user_id": "u1",
                "action": "export",
                "items": [
                    {"type": "contact", "id": f"{request_id}-contact-{i}"} for i in range(n_items)
                ],
                "requested_at": rfc3339(now),
            }
        )
    )


async def test_a_batch_larger_than_the_socket_buffers_is_decided_whole_and_in_order(
    store: CreditStore,
) -> None:
    now = int(time.time() * 1000)
    await licensed(store, credits=1_000_000, now=now)
    calls = [export(f"r-{n}", 100, now) for n in range(1_500)]
    payload = sum(len(p.command(now)) for p in store.pack_charges(calls))
    assert payload > 8 * 1024 * 1024  # more than loopback's socket buffers hold at once

    answers = await store.charge_many(calls, now)

    assert [a.status for a in answers] == ["decided"] * len(calls)
    assert [a.record.request_id for a in answers] == [c.request_id for c in calls]
    assert all(a.record.credits == 100 for a in answers)
    # decided in order: the ledger sequence counts up through the batch
    first = answers[0].record.sequence
    assert first is not None
    assert [a.record.sequence for a in answers] == list(range(first, first + len(calls)))
    credits = await store.credits(ORG, now)
    assert credits is not None
    assert credits["remaining"] == 1_000_000 - 150_000


@pytest.mark.single_redis  # kills the one server's batch connection by its client name
async def test_a_batch_cut_off_half_way_is_decided_once_when_sent_again(
    settings: Settings,
) -> None:
    url = settings.redis_url.get_secret_value()
    # a store whose connection can be told apart from every other test's
    name = f"cut-off-{uuid.uuid4().hex[:8]}"
    store = CreditStore(Redis.from_url(url, decode_responses=True, client_name=name), settings)
    killer = Redis.from_url(url)
    now = int(time.time() * 1000)
    await licensed(store, credits=10_000, now=now)
    calls = [export(f"r-{n}", 1, now) for n in range(3_000)]
    kills: list[asyncio.Task[Any]] = []

    async def cut_off() -> None:
        clients = await killer.client_list()
        (batch,) = [c for c in clients if c["name"] == name and c["cmd"] == "evalsha"]
        await killer.client_kill_filter(_id=batch["id"])

    def cut_off_after_a_few(i: int, answer: ChargeAnswer) -> None:
        if i == 100:  # replies are coming in
            kills.append(asyncio.ensure_future(cut_off()))

    try:
        with pytest.raises(StoreUnavailable):
            await store.charge_packed(store.pack_charges(calls), now, cut_off_after_a_few)
        assert kills, "the batch failed before any reply was read"
        await asyncio.gather(*kills)
        answers = await store.charge_many(calls, now)
        credits = await store.credits(ORG, now)
    finally:
        await killer.aclose()
        await store.close()

    statuses = {a.status for a in answers}
    assert statuses <= {"decided", "replay"}
    assert "replay" in statuses  # the first attempt decided some before the cut
    assert all(a.record.credits == 1 for a in answers)
    sequences = sequences_of(answers)
    assert sequences == list(range(sequences[0], sequences[0] + len(calls)))  # once each
    assert credits is not None
    assert credits["remaining"] == 10_000 - len(calls)


async def test_batches_and_quotes_at_once_each_get_their_own_answers(store: CreditStore) -> None:
    # the decision loop's batches share one connection, a batch at a time; quotes (the
    # HTTP API) run beside them on others: no reply may reach the wrong caller
    now = int(time.time() * 1000)
    await licensed(store, credits=100_000, now=now)
    batches = [[export(f"b{b}-r{n}", 3, now) for n in range(400)] for b in range(3)]
    quotes = [export(f"q-{n}", 5, now) for n in range(20)]

    answered = await asyncio.gather(
        *(store.charge_many(calls, now) for calls in batches),
        *(store.quote(call, now) for call in quotes),
    )

    charged = cast("list[list[ChargeAnswer]]", answered[: len(batches)])
    quoted = cast("list[ChargeRecord]", answered[len(batches) :])
    for calls, answers in zip(batches, charged, strict=True):
        assert [a.record.request_id for a in answers] == [c.request_id for c in calls]
        assert all(a.status == "decided" and a.record.credits == 3 for a in answers)
    for call, quote in zip(quotes, quoted, strict=True):
        assert quote.request_id == call.request_id
        assert quote.needed == 5
    credits = await store.credits(ORG, now)
    assert credits is not None
    assert credits["remaining"] == 100_000 - 3 * 400 * 3  # quotes charge nothing


async def test_an_error_rendering_a_reply_surfaces_as_itself(store: CreditStore) -> None:
    # a bug in the worker's rendering is not a Redis outage: it must not be reported
    # (and retried for ever, without a traceback) as StoreUnavailable
    now = int(time.time() * 1000)
    await licensed(store, credits=100_000, now=now)
    calls = [export(f"r-{n}", 1, now) for n in range(5_000)]

    def broken_render(i: int, answer: ChargeAnswer) -> None:
        if i == 100:
            raise ValueError("a bug in rendering")

    with pytest.raises(ValueError, match="a bug in rendering"):
        await store.charge_packed(store.pack_charges(calls), now, broken_render)

    answers = await store.charge_many(calls, now)  # sent again: each decided once
    sequences = sequences_of(answers)
    assert sequences == list(range(sequences[0], sequences[0] + len(calls)))
    credits = await store.credits(ORG, now)
    assert credits is not None
    assert credits["remaining"] == 100_000 - len(calls)


@pytest.mark.single_redis  # subscribes the one server's batch connection
async def test_server_notices_in_the_middle_of_a_batch_are_not_taken_for_replies(
    store: CreditStore, settings: Settings
) -> None:
    """RESP3 lets Redis push notices (maintenance events on a managed Redis, pub/sub
    messages) between replies; each reply must still reach its own request. Here the
    batch connection also subscribes to a channel that another client publishes to while
    the batch runs."""
    now = int(time.time() * 1000)
    await licensed(store, credits=1_000_000, now=now)
    await store.charge_many([export("warm-up", 1, now)], now)  # opens the batch connection
    assert store._batches.batch_connection is not None
    connection = store._batches.batch_connection.connection
    await connection.send_command("SUBSCRIBE", "notices")
    confirmed = await connection.read_response(push_request=True)
    assert confirmed[0] == "subscribe"

    publisher = Redis.from_url(settings.redis_url.get_secret_value())
    published = 0
    batch_done = asyncio.Event()

    async def publish_meanwhile() -> None:
        nonlocal published
        while not batch_done.is_set():
            published += await publisher.publish("notices", "a notice") > 0

    calls = [export(f"n-{n}", 20, now) for n in range(3_000)]
    noise = asyncio.create_task(publish_meanwhile())
    try:
        answers = await store.charge_many(calls, now)
    finally:
        batch_done.set()
        await noise  # stops after its publish in flight; one that failed fails the test
        await publisher.aclose()

    assert published > 10  # notices did arrive during the batch
    assert [a.record.request_id for a in answers] == [c.request_id for c in calls]
    assert all(a.status == "decided" and a.record.credits == 20 for a in answers)
    # and the next batch on the same connection is still in step
    (after,) = await store.charge_many([export("after", 1, now)], now)
    assert after.record.request_id == "after"

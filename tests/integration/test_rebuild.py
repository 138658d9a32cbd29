"""Rebuilding Redis from ``credits.ledger`` alone (DESIGN §6), on a real broker and Redis.

Traffic goes through the real ``Decider``, and every message it returns is published
on topics of this test's own, so the ledger the rebuild reads is a real one: six
partitions, commands and charges of several organisations, and re-emitted copies of
replayed decisions. The Redis is shared with other tests, so "Redis lost its data"
means deleting this test's key prefix here, never FLUSHALL; in production the rebuild
is meant for an empty Redis (it refuses otherwise, unless ``--replace``).

The decision clock is set explicitly and starts in 2100, as in test_charge_rules.
Redis's own clock does not move with it, which explains the only differences a
rebuild is expected to make (``expected_after_rebuild``): a window the decision clock
has seen end is not restored (in production Redis would have expired it at its end),
and idempotency records, which the scripts expire relatively (``PEXPIRE``), come back
with what is left of their time by the decision clock.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from creditgate.connections import aiokafka_options
from creditgate.domain.clock import Clock
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.domain.outgoing import Outgoing
from creditgate.rebuild import LedgerSequencer, RebuildRefused, rebuild
from creditgate.settings import Settings
from creditgate.store.client import RedisClient, redis_client
from creditgate.store.gateway import CreditStore
from creditgate.store.restore import OrgState
from creditgate.stream import topics as t
from creditgate.stream.decider import Decider, Incoming
from creditgate.stream.topics import TopicRegistry, apply_topics

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
DAY0 = to_ms(datetime(2100, 1, 4, 9, 0, tzinfo=UTC))
TTL_TOLERANCE_MS = 60_000  # real time that passes between a snapshot and a rebuild
REQUEST_TOPICS = {
    "export": t.EXPORT_REQUESTS,
    "crm_push": t.PUSH_REQUESTS,
    "email_verification": t.VERIFICATION_REQUESTS,
}


def day(n: float) -> int:
    return DAY0 + int(n * DAY_MS)


def contact(contact_id: str, company_id: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "contact", "id": contact_id}
    if company_id:
        item["company_id"] = company_id
    return item


def company(company_id: str) -> dict[str, Any]:
    return {"type": "company", "id": company_id}


def request(
    org: str, request_id: str, user: str, items: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "org_id": org,
        "user_id": user,
        "action": fields.pop("action", "export"),
        "items": items,
        "requested_at": rfc3339(DAY0),
        **fields,
    }


def verification(org: str, request_id: str, user: str, contact_id: str, found: bool) -> Any:
    return request(
        org,
        request_id,
        user,
        [contact(contact_id)],
        action="email_verification",
        verified_email_found=found,
    )


def command(org: str, command_id: str, type_: str, **fields: Any) -> dict[str, Any]:
    return {"command_id": command_id, "org_id": org, "type": type_, **fields}


def period(org: str, command_id: str, period_id: str, credits: int, starts: int, ends: int) -> Any:
    return command(
        org,
        command_id,
        "license.start_period",
        period_id=period_id,
        starts_at=rfc3339(starts),
        ends_at=rfc3339(ends),
        credits=credits,
    )


def grant(org: str, command_id: str, grant_id: str, credits: int) -> dict[str, Any]:
    return command(
        org,
        command_id,
        "credits.grant",
        grant_id=grant_id,
        credits=credits,
        reason="top-up",
        granted_by="cs-1",
    )


def allow(org: str, command_id: str, user: str, allowed: bool, by: str) -> dict[str, Any]:
    return command(
        org, command_id, "member.set_credits_allowed", user_id=user, allowed=allowed, set_by=by
    )


def settle(
    org: str, settlement_id: str, hold_id: str, items: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "settlement_id": settlement_id,
        "org_id": org,
        "request_id": hold_id,
        "type": "hold.settle",
        "items": [{"type": i["type"], "id": i["id"]} for i in items],
    }


def refund(
    org: str, command_id: str, request_id: str, items: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"request_id": request_id, "reason": "refused", "refunded_by": "cs-1"}
    if items is not None:
        fields["items"] = [{"type": i["type"], "id": i["id"]} for i in items]
    return command(org, command_id, "charge.refund", **fields)


def upsert(org: str, command_id: str, user: str, role: str = "member") -> dict[str, Any]:
    return command(org, command_id, "member.upsert", user_id=user, role=role)


# ---- the pipeline ------------------------------------------------------------------


class SetClock(Clock):
    """The decision clock, set by the test."""

    def __init__(self, now_ms: int) -> None:
        super().__init__()
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


def parsed(messages: list[Outgoing]) -> list[tuple[str, bytes, Any, list[tuple[str, bytes]]]]:
    """Messages with their JSON values parsed: a stored record comes back from the
    ledger with its fields in another order than the script's cjson wrote them."""
    return [(m.topic, m.key, orjson.loads(m.value), m.headers) for m in messages]


@dataclass
class Deployment:
    """The processor of one key prefix; ``publish`` sends what it returns to the topics."""

    settings: Settings
    registry: TopicRegistry
    clock: SetClock
    store: CreditStore
    producer: AIOKafkaProducer | None = None
    _offsets: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def processor(self) -> Decider:
        return Decider(self.store, self.registry, self.settings, self.clock)

    def _incoming(self, logical: str, org: str, value: bytes) -> Incoming:
        return Incoming(self.registry.name(logical), 0, next(self._offsets), org.encode(), value)

    async def requests(self, at: int, *bodies: dict[str, Any] | bytes) -> list[Outgoing]:
        """Decide requests (a batch per topic, in order) and publish the outcome."""
        self.clock.now = at
        out: list[Outgoing] = []
        for action, logical in REQUEST_TOPICS.items():
            batch = [
                self._incoming(logical, b.get("org_id", ""), orjson.dumps(b))
                if isinstance(b, dict)
                else self._incoming(logical, "", b)
                for b in bodies
                if (b.get("action") if isinstance(b, dict) else "export") == action
            ]
            if batch:
                out.extend(await self.processor.decide(batch))
        await self._publish(out)
        return out

    async def settlements(self, at: int, *bodies: dict[str, Any]) -> list[Outgoing]:
        self.clock.now = at
        batch = [self._incoming(t.HOLD_SETTLEMENTS, b["org_id"], orjson.dumps(b)) for b in bodies]
        out = await self.processor.settle(batch)
        await self._publish(out)
        return out

    async def commands(self, at: int, *bodies: dict[str, Any]) -> list[Outgoing]:
        self.clock.now = at
        batch = [self._incoming(t.LICENSE_COMMANDS, b["org_id"], orjson.dumps(b)) for b in bodies]
        out = await self.processor.apply(batch)
        await self._publish(out)
        return out

    async def _publish(self, messages: list[Outgoing]) -> None:
        if self.producer is None:
            return
        sent = [
            await self.producer.send(m.topic, m.value, key=m.key, headers=m.headers)
            for m in messages
        ]
        await asyncio.gather(*sent)

    def results(self, messages: list[Outgoing]) -> dict[str, dict[str, Any]]:
        name = self.registry.name(t.CHARGE_RESULTS)
        return {body["request_id"]: body for topic, _, body, _ in parsed(messages) if topic == name}


@pytest.fixture
async def deployment(endpoints: tuple[str, str]) -> AsyncIterator[Deployment]:
    bootstrap, redis_url = endpoints
    run = f"rb{uuid.uuid4().hex[:10]}"
    registry = TopicRegistry.load(prefix=f"{run}.")
    await apply_topics(bootstrap, registry)
    settings = Settings(
        kafka_bootstrap=bootstrap,
        redis_url=redis_url,
        key_prefix=run,
        topic_prefix=registry.prefix,
        repeat_window_days=30,
        threshold_percents=(80, 90, 100),
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, **aiokafka_options(settings)
    )
    await producer.start()
    store = CreditStore.from_settings(settings)
    try:
        yield Deployment(settings, registry, SetClock(DAY0), store, producer)
    finally:
        await producer.stop()
        for prefix in (run, f"{run}-shadow"):
            await delete_prefix(store.client_for_tests, prefix)
        await store.close()


async def delete_prefix(client: RedisClient, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


# ---- snapshots of the keys ---------------------------------------------------------


@dataclass(frozen=True)
class KeyState:
    type: str
    value: Any
    ttl_ms: int  # -1: no expiry


async def snapshot(client: RedisClient, prefix: str) -> dict[str, KeyState]:
    """Every key under ``prefix`` (named without it): type, value and time to live."""
    found: dict[str, KeyState] = {}
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = await client.type(key)
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
            # stored records (and open holds) are JSON: compared as data, not as the text
            # cjson wrote
            value = {k: orjson.loads(v) if v[:1] in ("{", "[") else v for k, v in value.items()}
        elif kind == "set":
            value = frozenset(await client.smembers(key))
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        else:
            raise AssertionError(f"{key!r}: a {kind!r} key no script writes")
        found[key.removeprefix(f"{prefix}:")] = KeyState(kind, value, await client.pttl(key))
    return found


def expected_after_rebuild(before: dict[str, KeyState], now: int) -> dict[str, KeyState]:
    """What a rebuild at decision time ``now`` restores of the keys ``before``."""
    expected = {}
    for name, key in before.items():
        kind = name.split("}:", 1)[1].split(":", 1)[0]  # "{org}:<kind>:…"
        if kind == "win" and int(key.value) <= now:
            continue  # the window has ended: Redis would have expired it at its end
        if kind in ("req", "cmd", "hist", "stl"):
            last_write = int(key.value["rec"]["at"]) if kind != "hist" else int(key.value[-1][1])
            # relative expiry: the decision clock moved on since, Redis's clock did not
            expected[name] = KeyState(key.type, key.value, key.ttl_ms - (now - last_write))
        else:
            expected[name] = key
    return expected


def assert_same_keys(actual: dict[str, KeyState], expected: dict[str, KeyState]) -> None:
    assert sorted(actual) == sorted(expected), (
        f"missing: {sorted(set(expected) - set(actual))}, "
        f"unexpected: {sorted(set(actual) - set(expected))}"
    )
    for name, want in expected.items():
        got = actual[name]
        assert (got.type, got.value) == (want.type, want.value), name
        if want.ttl_ms < 0:
            assert got.ttl_ms == want.ttl_ms, name
        else:
            assert abs(got.ttl_ms - want.ttl_ms) <= TTL_TOLERANCE_MS, (name, got, want)


async def shadow_copy(settings: Settings, prefix: str, copy: str) -> None:
    """Copy every key under ``prefix`` to ``copy`` with DUMP/RESTORE, expiries included."""
    # DUMP payloads are bytes, not text: a client that does not decode
    raw = redis_client(settings, decode_responses=False)
    try:
        async for key in raw.scan_iter(match=f"{prefix}:*".encode(), count=1000):
            ttl, payload = await raw.pttl(key), await raw.dump(key)
            assert payload is not None
            target = copy.encode() + key[len(prefix) :]
            await raw.restore(target, max(ttl, 0), payload, replace=True)
    finally:
        await raw.aclose()


async def run_rebuild_cli(settings: Settings, now: int, *args: str) -> tuple[int, str]:
    """``creditgate rebuild`` in a process of its own, its decision clock at ``now``."""
    offset = (now - Clock().now_ms()) / 1000
    env = {
        **os.environ,
        "CREDITGATE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CREDITGATE_REDIS_URL": settings.redis_url.get_secret_value(),
        "CREDITGATE_TOPIC_PREFIX": settings.topic_prefix,
        "CREDITGATE_KEY_PREFIX": settings.key_prefix,
        "CREDITGATE_CLOCK_OFFSET_SECONDS": str(offset),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "creditgate.rebuild",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    return await process.wait(), output.decode()


# ---- the traffic -------------------------------------------------------------------


async def history(d: Deployment) -> dict[str, dict[str, Any]]:
    """A month of three organisations; returns the first result of every request."""
    first: dict[str, dict[str, Any]] = {}

    async def requests(at: int, *bodies: dict[str, Any] | bytes) -> None:
        for request_id, result in d.results(await d.requests(at, *bodies)).items():
            first.setdefault(request_id, result)

    await d.commands(
        day(0),
        upsert("acme", "a-1", "ana", "admin"),
        upsert("acme", "a-2", "u1"),
        upsert("acme", "a-3", "u2"),
        upsert("acme", "a-4", "u3"),
        period("acme", "a-5", "p1", 10, day(0), day(20)),
        grant("acme", "a-6", "g1", 5),
        allow("acme", "a-7", "u2", False, by="ana"),
        allow("acme", "a-8", "u3", False, by="u1"),  # rejected: u1 is no admin
        command("acme", "a-9", "member.remove", user_id="ghost"),  # rejected: no member
        command("acme", "a-10", "member.remove", user_id="u3"),
        upsert("globex", "g-1", "boss", "admin"),
        upsert("globex", "g-2", "u9"),
        period("globex", "g-3", "2100", 3, day(0), day(365)),
        allow("initech", "i-1", "x", False, by="nobody"),  # rejected: only its record
    )
    day0 = [
        request("acme", "r-1", "u1", [contact("c1", "co1"), company("co2")]),
        request("acme", "r-2", "u1", [contact("c1")], action="crm_push"),
        request("acme", "r-3", "u2", [contact("c5")]),  # disallowed
        request("acme", "r-4", "outsider", [contact("c5")]),  # not a member
        verification("acme", "r-5", "u1", "c1", found=True),
        verification("acme", "r-6", "u1", "c2", found=False),
        request("acme", "r-7", "u1", [contact("c2"), contact("c3")], max_credits=1),
        request("globex", "q-1", "u9", [contact(f"c{i}") for i in range(1, 5)]),
        request(
            "globex",
            "q-2",
            "u9",
            [contact(f"c{i}") for i in range(1, 5)],
            on_insufficient="partial",
        ),
        request("initech", "n-1", "u1", [contact("c1")]),  # no members, no license
        {"request_id": "r-bad", "org_id": "acme", "user_id": "u1", "action": "export"},
        b"\x00 not a request",
    ]
    await requests(day(0), *day0)
    # replays re-emit their ledger entries; a second body under r-1 is a conflict
    await requests(day(10), day0[0], day0[1], day0[8])
    await requests(day(10), request("acme", "r-1", "u1", [contact("c99")]))
    await requests(day(10), request("acme", "r-8", "u1", [company("co1"), contact("c4")]))
    # p1 ended at day 20; p2 starts without rollover; windows survive the period change
    await requests(day(21), request("acme", "r-9", "u1", [contact("c6")]))
    await d.commands(day(21), period("acme", "a-11", "p2", 4, day(21), day(400)))
    await requests(
        day(21),
        request("acme", "r-10", "u1", [contact("c1", "co1"), contact("c7"), contact("c8")]),
        request(
            "acme",
            "r-11",
            "u1",
            [contact("c9"), contact("c10"), contact("c11")],
            on_insufficient="partial",
        ),
    )
    await d.commands(day(21), grant("acme", "a-12", "g2", 10))
    # the windows of day 0 have ended: charged again, and open anew until day 61
    await requests(
        day(31),
        request("acme", "r-12", "u1", [contact("c1", "co1"), company("co2")], action="crm_push"),
        verification("acme", "r-13", "u1", "c1", found=True),
    )
    await d.commands(day(31), upsert("initech", "i-2", "zed", "admin"))
    await requests(day(31), request("initech", "n-2", "zed", [contact("c1")]))
    # a refund of c1 (its window, and co1's, close); u4 with a limit of 2 and a partial
    # request cut to it
    await d.commands(
        day(31),
        upsert("acme", "a-16", "u4"),
        command("acme", "a-20", "member.set_credit_limit", user_id="u4", limit=2, set_by="ana"),
        refund("acme", "a-17", "r-12", [contact("c1", "co1")]),
        refund("acme", "a-18", "r-9"),  # r-9 was rejected: nothing to refund
    )
    l_items = [contact(f"l{i}") for i in range(3)]
    await requests(day(31), request("acme", "r-19", "u4", l_items, on_insufficient="partial"))
    # holds: one settled in part, one released, one still open when Redis is rebuilt
    await requests(
        day(31),
        request("acme", "h-1", "u1", [contact("c30", "co30"), contact("c31")], hold={}),
        request("acme", "h-2", "u1", [contact("c32")], hold={}),
        request("acme", "h-3", "u1", [contact("c33")], hold={"expires_in_seconds": 3600}),
    )
    await d.settlements(
        day(31),
        settle("acme", "s-1", "h-1", [contact("c30")]),
        {"settlement_id": "s-2", "org_id": "acme", "request_id": "h-2", "type": "hold.release"},
        settle("acme", "s-3", "h-2", [contact("c32")]),  # rejected: already released
    )
    # the settled hold refunded as its settlement charged it: c30's windows close
    await d.commands(day(31), refund("acme", "a-21", "h-1", [contact("c30", "co30")]))
    return first


async def follow_up(d: Deployment) -> list[Outgoing]:
    """More traffic after the rebuild (it publishes nothing: only compared)."""
    out: list[Outgoing] = []
    out += await d.requests(
        day(31),
        request("acme", "r-1", "u1", [contact("c1", "co1"), company("co2")]),  # a replay
        request("acme", "r-8", "u1", [contact("c12")]),  # a conflict
        request("acme", "r-14", "u1", [contact("c1", "co1")]),
        request("acme", "r-15", "u1", [contact("c20")]),
        request("acme", "r-20", "u1", [contact("c30", "co30")]),  # charged again
        request("globex", "q-3", "u9", [contact("c5")]),
        request("initech", "n-3", "zed", [contact("c1")]),
    )
    out += await d.commands(
        day(31),
        refund("acme", "a-17", "r-12", [contact("c1", "co1")]),  # a replay
        refund("acme", "a-19", "r-19"),
        period("acme", "a-11", "p2", 4, day(21), day(400)),  # a replay
        grant("acme", "a-13", "g1", 3),  # g1 was granted in p1 already
        upsert("acme", "a-14", "u3"),
        allow("acme", "a-15", "u2", True, by="ana"),
    )
    out += await d.settlements(
        day(31),
        settle("acme", "s-1", "h-1", [contact("c30")]),  # a replay
        settle("acme", "s-4", "h-3", [contact("c33")]),  # the hold open at the rebuild
    )
    out += await d.requests(
        day(40),
        request("acme", "r-16", "u2", [contact("c1")]),
        request("acme", "r-17", "u1", [company("co1"), contact("c4")]),
    )
    out += await d.requests(day(62), request("acme", "r-18", "u1", [contact("c1")]))
    return out


# ---- the tests ---------------------------------------------------------------------


async def test_rebuild_restores_every_key_and_later_traffic_is_decided_the_same(
    deployment: Deployment,
) -> None:
    d = deployment
    prefix, shadow = d.settings.key_prefix, f"{d.settings.key_prefix}-shadow"
    first = await history(d)
    now = day(31)
    before = await snapshot(d.store.client_for_tests, prefix)
    # what Redis would have held had nothing been lost, to decide the follow-up on
    await shadow_copy(d.settings, prefix, shadow)

    refused, output = await run_rebuild_cli(d.settings, now)
    assert refused == 1
    assert "already has keys" in output

    await delete_prefix(d.store.client_for_tests, prefix)
    code, output = await run_rebuild_cli(d.settings, now)

    assert code == 0, output
    assert "organisations restored: 3" in output
    assert "re-emitted copies skipped" in output
    assert "(0 re-emitted" not in output
    assert_same_keys(
        await snapshot(d.store.client_for_tests, prefix), expected_after_rebuild(before, now)
    )

    # More traffic, decided once on the rebuilt state and once on the copy
    rebuilt = await follow_up(Deployment(d.settings, d.registry, d.clock, d.store))
    shadow_store = CreditStore.from_settings(d.settings.model_copy(update={"key_prefix": shadow}))
    try:
        copy = Deployment(d.settings, d.registry, d.clock, shadow_store)
        assert parsed(rebuilt) == parsed(await follow_up(copy))
        after_rebuilt = await snapshot(d.store.client_for_tests, prefix)
        after_copy = await snapshot(d.store.client_for_tests, shadow)
    finally:
        await shadow_store.close()
    lasting = {name for name, key in after_copy.items() if key.ttl_ms < 0}
    assert {n: after_rebuilt[n] for n in lasting} == {n: after_copy[n] for n in lasting}

    # ...and what a user would check on the rebuilt side
    results = d.results(rebuilt)
    assert results["r-1"] == first["r-1"]  # a replay gets the first answer
    assert results["r-8"]["reason"] == "request_id_conflict"
    # r-12's c1 was refunded, and its window closed: charged again
    assert [i["outcome"] for i in results["r-14"]["items"]] == ["charged"]
    assert results["r-15"]["credits_charged"] == 1
    # since r-12: r-13 1, the refund +1, r-19 2 (u4's limit), h-1 1 (one of its two
    # held credits settled), its refund +1, h-3 1 (held), r-14 1, r-15 1
    assert results["r-15"]["balance_after"] == first["r-12"]["balance_after"] - 5
    # the settled hold's c30 was refunded, and the windows its settlement opened closed
    assert [i["outcome"] for i in results["r-20"]["items"]] == ["charged"]
    assert results["h-3"]["type"] == "hold.settled"  # the open hold survived the rebuild
    assert results["h-3"]["credits_charged"] == 1
    assert results["h-1"]["type"] == "hold.settled"  # s-1 replayed as first settled
    assert first["r-19"]["credits_charged"] == 2
    assert first["r-19"]["reason"] is None
    assert results["q-3"]["reason"] == "insufficient_credits"
    events = {
        body["command_id"]: body
        for topic, _, body, _ in parsed(rebuilt)
        if topic == d.registry.name(t.LICENSE_EVENTS)
    }
    assert events["a-13"]["reason"] == "duplicate_grant"
    assert events["a-17"]["type"] == "command.applied"  # replayed as first applied
    assert events["a-19"]["message"].startswith("2 credits of request r-19 refunded")
    # the ledger sequence goes on from the restored one: r-14, r-15, r-20, the refund
    # a-19, the rejected a-13, then a-14
    assert events["a-13"]["sequence"] == int(before["{acme}:seq"].value) + 5
    assert events["a-14"]["sequence"] == int(before["{acme}:seq"].value) + 6


async def test_replace_restores_what_a_stale_redis_lost(deployment: Deployment) -> None:
    """Redis came back from its AOF without its last writes: rebuild over it."""
    d = deployment
    prefix, stale = d.settings.key_prefix, f"{d.settings.key_prefix}-shadow"
    await d.commands(
        day(0),
        upsert("acme", "a-1", "ana", "admin"),
        period("acme", "a-2", "p1", 10, day(0), day(100)),
        upsert("globex", "g-1", "boss", "admin"),
        period("globex", "g-2", "p1", 10, day(0), day(100)),
    )
    await d.requests(day(1), request("acme", "r-1", "ana", [contact("c1")]))
    await shadow_copy(d.settings, prefix, stale)
    # the writes Redis will "lose": decided, published, then gone from Redis
    await d.requests(
        day(2),
        request("acme", "r-2", "ana", [contact("c2", "co2")]),
        request("globex", "q-1", "boss", [company("co1")]),
    )
    await d.commands(day(2), grant("globex", "g-3", "g1", 5))
    latest = await snapshot(d.store.client_for_tests, prefix)
    await delete_prefix(d.store.client_for_tests, prefix)
    await shadow_copy(d.settings, stale, prefix)
    now = day(2)

    with pytest.raises(RebuildRefused):
        await rebuild(d.settings, d.registry, now_ms=now)
    only_acme = await rebuild(d.settings, d.registry, org="acme", replace=True, now_ms=now)
    restored = await snapshot(d.store.client_for_tests, prefix)
    await rebuild(d.settings, d.registry, replace=True, now_ms=now)
    everything = await snapshot(d.store.client_for_tests, prefix)

    expected = expected_after_rebuild(latest, now)
    assert only_acme.organisations == 1
    assert restored["{acme}:license"] == expected["{acme}:license"]
    assert restored["{globex}:license"] != expected["{globex}:license"]  # still stale
    assert_same_keys(everything, expected)


async def test_a_rejected_command_gets_its_first_answer_after_a_rebuild(
    deployment: Deployment,
) -> None:
    """Every decided command has a ledger entry, rejected ones too (DESIGN §3): the
    rebuild restores a rejection's record, so a replay gets the first answer, byte for
    byte, even where the state has changed so that it would now be applied."""
    d = deployment
    rejected = [
        command("acme", "a-2", "member.remove", user_id="ghost"),  # not_a_member
        allow("acme", "a-3", "ghost", False, by="ghost"),  # not_an_admin
        grant("acme", "a-4", "g1", 5),  # no_active_license
    ]
    invalid = grant("acme", "a-5", "g2", -5)  # invalid_command
    first = await d.commands(day(0), upsert("acme", "a-1", "ana", "admin"), *rejected)
    first += await d.commands(day(0), invalid)
    # now each of them would be applied: ghost is an admin, and there is a period
    await d.commands(
        day(0),
        upsert("acme", "a-6", "ghost", "admin"),
        period("acme", "a-7", "p1", 10, day(0), day(30)),
    )
    sequence = await d.store.client_for_tests.get(d.store.keys.org("acme").sequence)
    await delete_prefix(d.store.client_for_tests, d.settings.key_prefix)
    report = await rebuild(d.settings, d.registry, now_ms=day(0))

    replays = await d.commands(day(1), *rejected, invalid)

    def by_id(messages: list[Outgoing], logical: str) -> dict[str, bytes]:
        name = d.registry.name(logical)
        return {
            orjson.loads(m.value)["command_id"]: m.value
            for m in messages
            if m.topic == name and orjson.loads(m.value)["command_id"] != "a-1"
        }

    events, ledger = by_id(first, t.LICENSE_EVENTS), by_id(first, t.LEDGER)
    assert {k: orjson.loads(v)["reason"] for k, v in events.items()} == {
        "a-2": "not_a_member",
        "a-3": "not_an_admin",
        "a-4": "no_active_license",
        "a-5": "invalid_command",
    }
    assert {orjson.loads(v)["kind"] for v in ledger.values()} == {"command_rejected"}
    # gap-free: the upsert took 1, the four rejections 2-5, the upsert and the period 6-7
    assert sorted(orjson.loads(v)["sequence"] for v in ledger.values()) == [2, 3, 4, 5]
    assert sequence == "7"
    assert report.complete, report
    assert await d.store.client_for_tests.get(d.store.keys.org("acme").sequence) == "7"
    # the replays: the same command.rejected and the same ledger entry, byte for byte
    assert by_id(replays, t.LICENSE_EVENTS) == events
    assert by_id(replays, t.LEDGER) == ledger


def test_entries_fold_in_sequence_order_once_and_gaps_are_reported() -> None:
    """Entries can arrive out of order and more than once; sequences can be missing."""

    def member_added(sequence: int, user: str) -> dict[str, Any]:
        return {
            "org_id": "acme",
            "sequence": sequence,
            "command_id": f"k-{sequence}",
            "command_type": "member.upsert",
            "command": {"user_id": user, "role": "member"},
            "decision": {"fp": "0" * 32, "at": day(0), "status": "applied", "seq": sequence},
            "balance_after": None,
        }

    def granted(sequence: int, credits: int, balance_after: int) -> dict[str, Any]:
        entry = member_added(sequence, "-")
        return {
            **entry,
            "command_type": "credits.grant",
            "command": {"grant_id": f"g-{sequence}", "credits": credits},
            "balance_after": balance_after,
        }

    started = {
        **member_added(1, "-"),
        "command_type": "license.start_period",
        "command": {},
        "decision": {
            "fp": "0" * 32,
            "at": day(0),
            "status": "applied",
            "seq": 1,
            "state": {
                "period_id": "p1",
                "starts_ms": day(0),
                "ends_ms": day(30),
                "credits": 10,
                "granted": 0,
                "balance": 10,
            },
        },
        "balance_after": 10,
    }
    sequencer = LedgerSequencer(OrgState("acme", 35 * DAY_MS, day(1)))

    added = [
        sequencer.add(member_added(3, "ana")),  # early: waits for 2
        sequencer.add(started),
        sequencer.add(member_added(2, "bo")),
        sequencer.add(member_added(2, "bo")),  # a re-emitted copy
        sequencer.add(member_added(3, "ana")),  # a copy of one already folded
        sequencer.add(granted(6, 5, 16)),  # 4 and 5 never come; the ledger says 16
        # another entry under sequence 2: Redis lost writes and a worker decided on
        sequencer.add({**member_added(2, "cy"), "command_id": "k-other"}),
    ]
    state = sequencer.finish()

    assert added == [True, True, True, False, False, True, False]
    assert sequencer.gaps == [4, 5]
    assert sequencer.conflicts == [2]
    assert state.sequence == 6
    assert state.members == {"bo": "member", "ana": "member"}
    assert state.license is not None
    assert state.license["balance"] == "15"
    assert state.inconsistencies == ["sequence 6: balance 15 after folding, the ledger says 16"]
    assert sorted(state.commands) == ["k-1", "k-2", "k-3", "k-6"]


def long_id(tag: str, n: int) -> str:
    head = f"{tag}{n}:"
    return head + "x" * (128 - len(head))


async def test_a_ledger_with_entries_in_parts_rebuilds_the_same_keys(
    deployment: Deployment,
) -> None:
    """A request of 10,000 contacts with companies (128-character ids) has its ledger
    entry in parts; a replay re-emits copies of them. The rebuild joins them."""
    d = deployment
    await d.commands(
        day(0),
        upsert("acme", "a-1", "ana", "admin"),
        period("acme", "a-2", "p1", 50_000, day(0), day(100)),
    )
    items = [contact(long_id("c", i), long_id("co", i)) for i in range(10_000)]
    big = request("acme", "r-big", "ana", items)
    first = await d.requests(day(1), big, request("acme", "r-small", "ana", [contact("c-x")]))
    replay = await d.requests(day(2), big)  # the same parts again
    ledger = d.registry.name(t.LEDGER)
    parts = [b for tp, _, b, _ in parsed(first + replay) if tp == ledger and "part" in b]
    assert len(parts) == 2 * parts[0]["parts"]
    assert parts[0]["parts"] >= 10
    assert d.results(replay)["r-big"] == d.results(first)["r-big"]

    now = day(3)
    before = await snapshot(d.store.client_for_tests, d.settings.key_prefix)
    await delete_prefix(d.store.client_for_tests, d.settings.key_prefix)
    report = await rebuild(d.settings, d.registry, now_ms=now)

    assert report.complete, report
    assert report.incomplete == {}
    assert report.organisations == 1
    assert_same_keys(
        await snapshot(d.store.client_for_tests, d.settings.key_prefix),
        expected_after_rebuild(before, now),
    )
    # the restored decision answers a replay as the first one did
    again = await d.requests(day(3), big)
    assert d.results(again)["r-big"] == d.results(first)["r-big"]
    assert d.results(again)["r-big"]["counts"] == {"charged": 10_000}

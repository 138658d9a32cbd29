"""The worker's start-up refusals (creditgate.preflight), against a real broker and Redis.

Each test creates topics of its own (a prefix per test), with the configs it needs,
and reads them back through the broker; the eviction tests run a Redis server of their
own (the devstack's), so changing its policy or its users never touches the Redis
other tests share.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from creditgate.devstack.process import find_free_port
from creditgate.devstack.redis import RedisNode
from creditgate.errors import ConfigurationError
from creditgate.preflight import check_lifetimes, check_no_eviction, eviction_policy, preflight
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.topics import TopicRegistry, apply_topics

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


async def deployed(
    bootstrap: str, configs: Mapping[str, dict[str, str]] | None = None
) -> TopicRegistry:
    """Topics of a new prefix on the broker: as topics/ defines them, but for the
    configs given by logical name."""
    registry = TopicRegistry.load(prefix=f"pf{uuid.uuid4().hex[:10]}.")
    specs = dict(registry.specs)
    for logical, changed in (configs or {}).items():
        specs[logical] = replace(specs[logical], configs=changed)
    registry = TopicRegistry(specs, registry.prefix)
    await apply_topics(bootstrap, registry)
    return registry


def settings_for(endpoints: tuple[str, str], registry: TopicRegistry, **fields: Any) -> Settings:
    bootstrap, redis_url = endpoints
    return Settings(
        kafka_bootstrap=bootstrap,
        redis_url=redis_url,
        topic_prefix=registry.prefix,
        key_prefix=f"pf{uuid.uuid4().hex[:10]}",
        **fields,
    )


REQUEST_TOPICS = (*t.REQUEST_ACTIONS, t.LICENSE_COMMANDS, t.HOLD_SETTLEMENTS)


# ---- lifetimes ----------------------------------------------------------------------


async def test_the_topic_definitions_pass_with_the_default_lifetime(
    endpoints: tuple[str, str],
) -> None:
    registry = await deployed(endpoints[0])
    settings = settings_for(endpoints, registry)

    assert await preflight(settings, registry) == []  # nor any drift


async def test_a_request_topic_kept_longer_than_the_lifetime_is_refused(
    endpoints: tuple[str, str],
) -> None:
    # the old definition: 35 days of retention, segments of Kafka's default 7 days
    registry = await deployed(endpoints[0], {t.EXPORT_REQUESTS: {"retention.ms": str(35 * DAY_MS)}})
    settings = settings_for(endpoints, registry)

    with pytest.raises(ConfigurationError) as refused:
        await check_lifetimes(settings, registry)

    message = str(refused.value)
    assert f"topic {registry.name(t.EXPORT_REQUESTS)} keeps a message up to 42 days" in message
    assert "retention.ms=3024000000 + segment.ms=604800000" in message
    assert "CREDITGATE_IDEMPOTENCY_TTL_DAYS=35" in message
    assert "raise CREDITGATE_IDEMPOTENCY_TTL_DAYS to at least 42" in message
    assert registry.name(t.PUSH_REQUESTS) not in message  # the others are fine
    # a lifetime that covers it passes
    await check_lifetimes(settings.model_copy(update={"idempotency_ttl_days": 42.0}), registry)


async def test_a_request_topic_kept_for_ever_is_refused_whatever_the_lifetime(
    endpoints: tuple[str, str],
) -> None:
    registry = await deployed(
        endpoints[0],
        {
            t.LICENSE_COMMANDS: {"retention.ms": "-1"},
            t.EXPORT_REQUESTS: {"cleanup.policy": "compact"},
        },
    )
    settings = settings_for(endpoints, registry, idempotency_ttl_days=36_500.0)

    with pytest.raises(ConfigurationError) as refused:
        await check_lifetimes(settings, registry)

    message = str(refused.value)
    assert f"topic {registry.name(t.LICENSE_COMMANDS)} keeps its messages for ever" in message
    assert "(retention.ms=-1)" in message
    assert f"topic {registry.name(t.EXPORT_REQUESTS)} keeps its messages for ever" in message
    assert "(cleanup.policy=compact)" in message
    assert "give it cleanup.policy=delete and a retention.ms of at most" in message


async def test_a_topic_without_overrides_is_judged_by_the_broker_defaults(
    endpoints: tuple[str, str],
) -> None:
    # no retention.ms nor segment.ms of its own: the broker's 7 + 7 days apply
    registry = await deployed(endpoints[0], {t.EXPORT_REQUESTS: {}})
    settings = settings_for(endpoints, registry, idempotency_ttl_days=10.0)

    with pytest.raises(ConfigurationError) as refused:
        await check_lifetimes(settings, registry)

    message = str(refused.value)
    assert f"topic {registry.name(t.EXPORT_REQUESTS)} keeps a message up to 14 days" in message
    # the defined topics keep 31 days; 31 covers the defaults' 14 too
    await check_lifetimes(settings.model_copy(update={"idempotency_ttl_days": 31.0}), registry)


async def test_offsets_kept_longer_than_the_lifetime_are_refused(
    endpoints: tuple[str, str],
) -> None:
    short = {"retention.ms": str(DAY_MS), "segment.ms": str(DAY_MS)}
    registry = await deployed(endpoints[0], dict.fromkeys(REQUEST_TOPICS, short))
    # the topics are kept 2 days at most, but the broker keeps offsets 7 days
    settings = settings_for(endpoints, registry, idempotency_ttl_days=3.0)

    with pytest.raises(ConfigurationError) as refused:
        await check_lifetimes(settings, registry)

    message = str(refused.value)
    assert "offsets.retention.minutes=10080" in message
    assert "lower offsets.retention.minutes to at most 4320" in message
    assert "topic " not in message
    await check_lifetimes(settings.model_copy(update={"idempotency_ttl_days": 7.0}), registry)


async def test_the_worker_refuses_to_start_and_says_what_to_change(
    endpoints: tuple[str, str],
) -> None:
    """``creditgate worker`` itself: the definitions in topics/ say 30 + 1 days, the
    broker's topic keeps its messages for ever."""
    registry = await deployed(endpoints[0], {t.EXPORT_REQUESTS: {"retention.ms": "-1"}})
    env = {
        **os.environ,
        "CREDITGATE_KAFKA_BOOTSTRAP": endpoints[0],
        "CREDITGATE_REDIS_URL": endpoints[1],
        "CREDITGATE_TOPIC_PREFIX": registry.prefix,
        "CREDITGATE_KEY_PREFIX": f"pf{uuid.uuid4().hex[:10]}",
        "CREDITGATE_APP_ID": f"pf{uuid.uuid4().hex[:10]}",
        "CREDITGATE_HTTP_PORT": str(find_free_port()),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "creditgate",
        "worker",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 120)

    assert process.returncode == 1
    error = stderr.decode()
    assert f"topic {registry.name(t.EXPORT_REQUESTS)} keeps its messages for ever" in error
    assert "a replayed request could be charged again" in error


# ---- eviction -----------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of this test's own (the devstack's node), as a URL."""
    node = RedisNode(tmp_path)
    port = find_free_port()
    node.start(port)
    try:
        node.wait_ready(port, 30.0)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        node.stop()


def redis_settings(url: str) -> Settings:
    return Settings(redis_url=url)


async def test_a_redis_that_may_evict_is_refused(own_redis: str) -> None:
    await check_no_eviction(redis_settings(own_redis))  # the devstack says noeviction
    admin = aioredis.Redis.from_url(own_redis, decode_responses=True)
    try:
        await admin.config_set("maxmemory-policy", "allkeys-lru")

        with pytest.raises(ConfigurationError) as refused:
            await check_no_eviction(redis_settings(own_redis))
    finally:
        await admin.aclose()

    message = str(refused.value)
    assert "maxmemory-policy allkeys-lru" in message
    assert "CONFIG SET maxmemory-policy noeviction" in message
    assert "redis.conf" in message


async def test_a_user_without_config_is_checked_through_info(own_redis: str) -> None:
    admin = aioredis.Redis.from_url(own_redis, decode_responses=True)
    try:
        await admin.config_set("maxmemory-policy", "volatile-ttl")
        rules = ["reset", "on", ">pw", "~*", "+@all", "-config"]
        # redis-py leaves execute_command unannotated
        await admin.execute_command("ACL", "SETUSER", "no-config", *rules)  # type: ignore[no-untyped-call]
        await admin.execute_command("ACL", "SETUSER", "no-info", *rules, "-info")  # type: ignore[no-untyped-call]
    finally:
        await admin.aclose()
    host = own_redis.removeprefix("redis://")
    no_config = aioredis.Redis.from_url(f"redis://no-config:pw@{host}", decode_responses=True)
    try:
        assert await eviction_policy(no_config) == "volatile-ttl"  # from INFO memory
    finally:
        await no_config.aclose()

    with pytest.raises(ConfigurationError) as refused:
        await check_no_eviction(redis_settings(f"redis://no-config:pw@{host}"))
    assert "maxmemory-policy volatile-ttl" in str(refused.value)
    with pytest.raises(ConfigurationError) as unreadable:
        await check_no_eviction(redis_settings(f"redis://no-info:pw@{host}"))
    assert "its ACL rules need +info" in str(unreadable.value)


async def test_the_shared_redis_does_not_evict(endpoints: tuple[str, str]) -> None:
    await check_no_eviction(redis_settings(endpoints[1]))

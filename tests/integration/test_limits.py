"""The limits creditgate checks at start-up, read from a real broker and a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream.limits import broker_limits, check_redis_query_buffer
from creditgate.stream.topics import (
    TopicRegistry,
    TopicSpec,
    admin_client,
    apply_topics,
    topic_configs,
)

pytestmark = pytest.mark.integration


async def test_a_topic_without_its_own_limit_has_the_brokers(endpoints: tuple[str, str]) -> None:
    bootstrap = endpoints[0]
    run = f"lim{uuid.uuid4().hex[:8]}"
    own, default = f"{run}.own", f"{run}.default"
    registry = TopicRegistry(
        {
            own: TopicSpec(own, 1, 1, {"max.message.bytes": "123456"}),
            default: TopicSpec(default, 1, 1),
        }
    )
    await apply_topics(bootstrap, registry)
    admin = await admin_client(bootstrap, None)
    try:
        found = await broker_limits(admin, [own, default])
    finally:
        await admin.close()
    assert found[own] == 123456
    assert found[default] == 1_048_588  # the broker's message.max.bytes (Kafka's default)


async def test_a_batch_payload_must_fit_redis_query_buffer(
    settings: Settings, store: CreditStore
) -> None:
    assert await check_redis_query_buffer(settings, store) is None
    big = settings.model_copy(update={"batch_max_bytes": 200 * 1024 * 1024})
    assert await check_redis_query_buffer(big, store) is None  # under the default 1 GiB
    (before,) = (await store.client_for_tests.config_get("client-query-buffer-limit")).values()
    assert before is not None
    await store.client_for_tests.config_set("client-query-buffer-limit", str(64 * 1024 * 1024))
    try:
        problem = await check_redis_query_buffer(big, store)
    finally:
        await store.client_for_tests.config_set("client-query-buffer-limit", before)
    assert problem is not None
    assert "client-query-buffer-limit of 67108864" in problem
    assert "batch_max_bytes 209715200" in problem


async def test_a_topic_a_broker_has_not_heard_of_yet_is_asked_for_again(
    endpoints: tuple[str, str],
) -> None:
    # a broker behind the controller answers "unknown topic" for one just created (seen
    # on the cluster stack): a describe made before the topic exists stands in for it
    bootstrap = endpoints[0]
    name = f"late{uuid.uuid4().hex[:8]}"
    registry = TopicRegistry({name: TopicSpec(name, 1, 1, {"retention.ms": "3600000"})})

    async def created_a_moment_later() -> None:
        await asyncio.sleep(1.0)
        await apply_topics(bootstrap, registry)

    admin = await admin_client(bootstrap, None)
    try:
        creating = asyncio.create_task(created_a_moment_later())
        found = await topic_configs(admin, [name], ("retention.ms",))
        await creating
    finally:
        await admin.close()
    assert found == {name: {"retention.ms": "3600000"}}

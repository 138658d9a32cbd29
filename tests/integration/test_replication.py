"""Replication from the topic definitions: factor 3 and min.insync.replicas 2 on three
brokers or more, scaled down on fewer; ``topics check`` names any drift."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import NewTopic

from creditgate.stream import topics as t
from creditgate.stream.topics import (
    TopicRegistry,
    TopicSpec,
    admin_client,
    apply_topics,
    broker_count,
    check_topics,
)

pytestmark = pytest.mark.integration


def test_the_definitions_ask_for_three_replicas_two_in_sync_and_scale_down() -> None:
    results = TopicRegistry.load().specs[t.CHARGE_RESULTS]
    assert (results.replication_factor, results.min_insync_replicas) == (3, 2)
    for brokers, factor, in_sync in ((1, 1, "1"), (2, 2, "1"), (3, 3, "2"), (5, 3, "2")):
        spec = results.on_brokers(brokers)
        assert (spec.replication_factor, spec.configs["min.insync.replicas"]) == (
            factor,
            in_sync,
        ), brokers


async def test_applied_topics_have_the_replication_their_brokers_allow(
    endpoints: tuple[str, str],
) -> None:
    bootstrap = endpoints[0]
    registry = TopicRegistry.load(prefix=f"rep{uuid.uuid4().hex[:8]}.")
    await apply_topics(bootstrap, registry)
    admin = await admin_client(bootstrap, None)
    try:
        brokers = await broker_count(admin)
        name = registry.name(t.LEDGER)
        (described,) = await admin.describe_topics([name])
    finally:
        await admin.close()
    assert {len(p["replicas"]) for p in described["partitions"]} == {min(3, brokers)}
    assert await check_topics(bootstrap, registry) == []


async def test_topics_check_names_a_topic_with_too_few_replicas(
    endpoints: tuple[str, str],
) -> None:
    bootstrap = endpoints[0]
    admin = await admin_client(bootstrap, None)
    try:
        brokers = await broker_count(admin)
        if brokers < 3:
            pytest.skip("one broker: a factor of 1 is all a topic can have")
        name = f"rep{uuid.uuid4().hex[:8]}.thin"
        # made by hand with one replica and the broker's default min.insync.replicas
        await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()
    registry = TopicRegistry({name: TopicSpec(name, 1, 3, {}, min_insync_replicas=2)})
    problems = await check_topics(bootstrap, registry)
    assert f"topic {name} has replication factor 1, its definition says 3 on 3 brokers" in problems
    assert f"topic {name}: min.insync.replicas is 1, its definition says 2" in problems

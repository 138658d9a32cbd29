"""Shared fixtures: a real Kafka and a real Redis for the whole session, twice.

The tests on the stack run on two stacks, one after the other: ``single`` (one broker,
one Redis server) and ``cluster`` (three brokers, a Redis Cluster of three primaries
with a replica each), both started by the project's own devstack in a temporary
folder. A test marked ``single_redis`` looks at one server's own parts and runs on the
single stack only. An explicit ``CREDITGATE_KAFKA_BOOTSTRAP`` / ``CREDITGATE_REDIS_URL``
always wins: then every test runs once, on that stack. ``CREDITGATE_TEST_STACKS=single``
(or ``cluster``) runs on one of the two.
Each test gets its own Redis key prefix, and org ids of its own, so tests never see
each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from creditgate.settings import ENV_FILE_VARIABLE, Settings

# no env file: a `creditgate dev up` in the checkout must not reach the tests' settings,
# nor the workers they start (they inherit this); tests of the env file name their own
os.environ[ENV_FILE_VARIABLE] = ""
from creditgate.store.gateway import CreditStore


def _given_stack() -> tuple[str, str] | None:
    bootstrap = os.environ.get("CREDITGATE_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("CREDITGATE_REDIS_URL")
    return (bootstrap, redis_url) if bootstrap and redis_url else None


def _stack_kinds() -> list[str]:
    if _given_stack() is not None:
        return ["given"]
    return os.environ.get("CREDITGATE_TEST_STACKS", "single,cluster").split(",")


@pytest.fixture(scope="session", params=_stack_kinds())
def endpoints(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(kafka_bootstrap, redis_url) of the stack the test runs on. The client finds out
    by itself whether the Redis is a cluster (``store.client.is_cluster``)."""
    given = _given_stack()
    if given is not None:
        yield given
        return
    from creditgate.devstack import ClusterStack, DevStack

    root = Path(tmp_path_factory.mktemp(f"devstack-{request.param}"))
    if request.param == "cluster":
        cluster = ClusterStack(root)
        env = cluster.up()
        try:
            yield env["CREDITGATE_KAFKA_BOOTSTRAP"], env["CREDITGATE_REDIS_URL"]
        finally:
            cluster.down()
        return
    stack = DevStack(root)
    found = stack.up()
    try:
        yield found.kafka_bootstrap, found.redis_url
    finally:
        stack.down()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``single_redis`` are left out on the cluster stack."""
    kept: list[pytest.Item] = []
    left_out: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cluster = callspec is not None and callspec.params.get("endpoints") == "cluster"
        (left_out if on_cluster and item.get_closest_marker("single_redis") else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(endpoints: tuple[str, str], unique: str) -> Settings:
    bootstrap, redis_url = endpoints
    return Settings(kafka_bootstrap=bootstrap, redis_url=redis_url, key_prefix=f"t{unique}")


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[CreditStore]:
    credit_store = CreditStore.from_settings(settings)
    try:
        yield credit_store
    finally:
        await credit_store.close()

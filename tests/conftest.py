"""Shared fixtures: a real Kafka broker and a real Redis server for the whole session.

An explicit ``CREDITGATE_KAFKA_BOOTSTRAP`` / ``CREDITGATE_REDIS_URL`` always wins; else,
where a Docker engine answers, testcontainers could provide them; on our machines
(no Docker) the project's own devstack starts both in a temporary folder.
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


@pytest.fixture(scope="session")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(kafka_bootstrap, redis_url) of the stack every integration test uses."""
    bootstrap = os.environ.get("CREDITGATE_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("CREDITGATE_REDIS_URL")
    if bootstrap and redis_url:
        yield bootstrap, redis_url
        return
    from creditgate.devstack import DevStack

    stack = DevStack(Path(tmp_path_factory.mktemp("devstack")))
    found = stack.up()
    try:
        yield found.kafka_bootstrap, found.redis_url
    finally:
        stack.down()


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

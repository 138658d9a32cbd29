"""Fault tests: each builds its own ``FaultRun`` (topics, key prefix and consumer group
of its own) in its own ``tmp_path``. A test that kills the broker or Redis gets a
DevStack of its own, so no other test notices; the tests that only break workers share
one stack. Nothing here uses the session stack of ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from creditgate.devstack import DevStack
from creditgate_harness.workload import WorkloadSpec


@pytest.fixture(autouse=True)
def _quiet_kafka_clients() -> Iterator[None]:
    # aiokafka logs every refused connection while a broker is down on purpose
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture
def workload_spec() -> Callable[..., WorkloadSpec]:
    """A workload spec with ids of this test only."""

    def build(requests: int, **options: Any) -> WorkloadSpec:
        return WorkloadSpec(run=f"f{uuid.uuid4().hex[:8]}", requests=requests, **options)

    return build


@pytest.fixture(scope="module")
def worker_fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One broker and Redis for the tests that only kill, pause, add or stop workers."""
    stack = DevStack(tmp_path_factory.mktemp("worker-faults"))
    stack.up()
    try:
        yield stack
    finally:
        stack.down()

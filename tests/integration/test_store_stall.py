"""A Redis that stops answering (paused, not gone) fails the batch instead of hanging it.

The store reads a batch's replies under one timer that replies push back, not under a
timer per read; this checks that the timer still fires when the replies stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from creditgate.devstack import find_free_port
from creditgate.devstack.redis import RedisNode
from creditgate.domain.charges import ChargeRequest
from creditgate.errors import StoreUnavailable
from creditgate.settings import Settings
from creditgate.store import wire
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore


@pytest.fixture
async def paused_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisNode, CreditStore]]:
    node = RedisNode(tmp_path)
    port = find_free_port()
    node.start(port)
    node.wait_ready(port, timeout=30)
    store = CreditStore.from_settings(
        Settings(redis_url=f"redis://127.0.0.1:{port}/0", key_prefix="stall")
    )
    try:
        yield node, store
    finally:
        if node.pid is not None:
            os.kill(node.pid, signal.SIGCONT)
        await store.close()
        node.stop()


def charge(request_id: str) -> ChargeCall:
    return ChargeCall.of(
        ChargeRequest.model_validate(
            {
                "request_id": request_id,
                "org_id": "org-stall",
                "user_id": "bob",
                "action": "export",
                "items": [{"type": "contact", "id": "c-1"}],
                "requested_at": "2026-11-26T12:00:00Z",
            }
        )
    )


async def test_a_batch_fails_when_redis_stops_answering_and_works_once_it_answers(
    paused_redis: tuple[RedisNode, CreditStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    node, store = paused_redis
    now = int(time.time() * 1000)
    [first] = await store.charge_many([charge("r-1")], now)  # connected, scripts loaded
    assert first.status == "decided"
    monkeypatch.setattr(wire, "_SILENCE_SECONDS", 1.0)
    assert node.pid is not None
    os.kill(node.pid, signal.SIGSTOP)
    with pytest.raises(StoreUnavailable):
        # without the store's own timer this would wait for ever: wait_for's
        # TimeoutError is not StoreUnavailable, so a hang fails the test
        await asyncio.wait_for(store.charge_many([charge("r-2")], now), 60)
    os.kill(node.pid, signal.SIGCONT)
    [second] = await store.charge_many([charge("r-2")], now)
    # Redis may have run the first attempt once it woke (it was sent before the pause):
    # either way r-2 has one decision
    assert second.status in {"decided", "replay"}
    assert second.record.reason is not None  # org-stall has no license

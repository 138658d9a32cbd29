"""store/wire.py leans on redis-py's private API: this fails loudly when a redis-py
release moves it, before a batch ever does."""

from __future__ import annotations

import inspect

import redis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection

from creditgate.store.wire import BatchConnection


def test_redis_py_still_has_the_private_parts_wire_uses() -> None:
    pool = aioredis.Redis().connection_pool
    connection = pool.make_connection()  # type: ignore[no-untyped-call]  # never connects
    for name in ("_reader", "_writer", "encoder", "next_health_check"):
        assert hasattr(connection, name), f"redis-py {redis.__version__} lost {name}"
    assert connection._reader is None  # not yet connected
    assert connection._writer is None
    assert hasattr(connection, "health_check_interval")
    for name in ("encoding", "encoding_errors", "decode_responses"):
        assert hasattr(connection.encoder, name), f"redis-py's encoder lost {name}"
    for method in ("connect", "check_health", "disconnect", "register_connect_callback"):
        assert callable(getattr(connection, method, None)), f"redis-py lost {method}"
    assert "nowait" in inspect.signature(AbstractConnection.disconnect).parameters
    assert callable(BaseParser.parse_error)
    assert int(redis.__version__.split(".")[0]) == 8, "wire.py is checked against redis-py 8"


def test_a_batch_connection_registers_its_reconnect_watch() -> None:
    connects: list[int] = []
    batch = BatchConnection.dedicated(aioredis.Redis().connection_pool, lambda: connects.append(1))
    (callback,) = batch.connection._connect_callbacks
    found = callback()
    assert found is not None
    found(batch.connection)
    assert connects == [1]

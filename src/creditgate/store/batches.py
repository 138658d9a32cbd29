"""The store's script calls, sent as batches: the batch connection, the reconnect
watch, and the scripts loaded again when Redis has lost them. This is one Redis
server; ``store.cluster`` sends the same batches to a Redis Cluster.

A batch is a list of ``Routed`` commands: each packed command with a key it touches, by
which a cluster finds the node that runs it (one server ignores it).

The decision loop's batches go over a connection of their own, one batch at a time:
taking a pooled connection checks it with a socket read, and while that read waits the
worker's other stages run (preparing, publishing) with the batch not yet sent and Redis
idle. About 4 % more decisions/s in alternating ``python -m bench.run`` runs on one
stack. Quotes from the HTTP API use the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from importlib import resources

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from creditgate.errors import CreditgateError, RedisMayHaveForgotten
from creditgate.store.outages import unavailable_as
from creditgate.store.wire import BatchConnection, OnReply, Reply

# (a key the command touches, the command in the Redis protocol)
Routed = tuple[str, bytes]


class Script:
    """A Lua script of the store, and the name Redis gives it (the SHA1 of its text:
    known before it is loaded, so calls can be packed ahead)."""

    def __init__(self, name: str) -> None:
        self.text = resources.files("creditgate.store").joinpath("lua", name).read_text("utf-8")
        self.sha = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()


class Batches:
    """Sends packed script calls and reads their replies (``wire.BatchConnection``)."""

    def __init__(self, client: aioredis.Redis, scripts: tuple[Script, ...]) -> None:
        self._redis = client
        self._scripts = scripts
        self._scripts_loaded = False
        self._batch_connection: BatchConnection | None = None
        self._batch_turn = asyncio.Lock()
        # Set by ``watch_reconnections``: a (re)connection of the batch connection may
        # reach a Redis that forgot (a restart from an older AOF, a promoted replica), so
        # the batch is not sent until the worker has checked Redis against the ledger.
        self._watching_reconnections = False
        self._connections_made = 0

    async def close(self) -> None:
        async with self._batch_turn:  # after the batch in hand, if any
            if self._batch_connection is not None:
                await self._batch_connection.disconnect()
                self._batch_connection = None

    async def load_scripts(self) -> None:
        """Register the scripts once; a restarted Redis gets them again on NOSCRIPT."""
        async with unavailable_as("loading the Lua scripts"):
            loaded = tuple([await self._redis.script_load(s.text) for s in self._scripts])
        if loaded != tuple(s.sha for s in self._scripts):
            raise CreditgateError(f"Redis named the scripts {loaded}, not by their SHA1")
        self._scripts_loaded = True

    async def routes_to_every_node(self, key: str) -> list[str]:
        """Keys named after ``key``, one on each node that holds data (primaries of a
        cluster): a command sent once per key reaches every node. One server: ``key``."""
        return [key]

    async def run(
        self,
        commands: Sequence[Routed],
        doing: str,
        on_reply: OnReply | None = None,
        *,
        pooled: bool = False,
    ) -> list[Reply]:
        """Send ``commands``, return their replies in order; an error reply raises.
        ``on_reply`` as in ``BatchConnection.exchange``."""
        payload = b"".join(command for _, command in commands)
        count = len(commands)
        async with unavailable_as(doing):
            for attempt in range(2):
                if not self._scripts_loaded:
                    await self.load_scripts()
                async with self.connection(pooled) as connection:
                    replies, seen = await self.pipeline(
                        connection, payload, count, on_reply, pooled=pooled
                    )
                failed = next((r for r in replies if isinstance(r, ResponseError)), None)
                if isinstance(failed, NoScriptError) and not attempt and not seen:
                    # Redis restarted and lost its script cache (so no call ran). Load the
                    # scripts and send the batch again.
                    self._scripts_loaded = False
                    continue
                if failed is not None:
                    raise failed
                return replies
        raise CreditgateError(f"{doing}: the scripts could not be loaded")

    @contextlib.asynccontextmanager
    async def connection(self, pooled: bool) -> AsyncIterator[BatchConnection]:
        """The batch connection (waiting for the batch before, if any), or a pooled one."""
        if pooled:
            pool = self._redis.connection_pool
            # redis-py leaves get_connection unannotated
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                yield BatchConnection(connection)
            finally:
                await pool.release(connection)
            return
        async with self._batch_turn:  # no wait when free, so no other task runs first
            if self._batch_connection is None:
                self._batch_connection = BatchConnection.dedicated(
                    self._redis.connection_pool, self._connected
                )
            yield self._batch_connection

    @property
    def batch_connection(self) -> BatchConnection | None:
        """The batch connection once a batch has opened it (tests look at it)."""
        return self._batch_connection

    def watch_reconnections(self) -> None:
        """From now on, a batch whose connection had to be (re)made is not sent: it raises
        ``RedisMayHaveForgotten`` for every organisation, once per connection made, so the
        worker checks Redis against the ledger first (the first connection included)."""
        self._watching_reconnections = True
        self._connections_made = 1  # whatever connection there is was not checked yet

    def _connected(self) -> None:
        """After every connect of the batch connection, the health check's silent
        reconnect included."""
        self._connections_made += 1

    async def pipeline(
        self,
        connection: BatchConnection,
        payload: bytes,
        count: int,
        on_reply: OnReply | None = None,
        *,
        pooled: bool = False,
    ) -> tuple[list[Reply], int]:
        """Send ``count`` packed commands in one write and read their ``count`` replies;
        also how many replies ``on_reply`` saw (``wire.BatchConnection.exchange``).

        This is redis-py's non-transactional pipeline without its per-command work (see
        ``wire``). A connection failure propagates: the batch is retried, never
        acknowledged.
        """
        await connection.open()
        if self._watching_reconnections and self._connections_made and not pooled:
            # counted by _connected: a Redis reached anew may have forgotten writes.
            # Nothing was sent: the connection stays, checked.
            self._connections_made = 0
            raise RedisMayHaveForgotten("the connection to Redis was made anew", None)
        return await connection.exchange(payload, count, on_reply)

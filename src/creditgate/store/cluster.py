"""The store's batches on a Redis Cluster: split by node, sent to all nodes at once.

redis-py's cluster client knows the slots (``keyslot``, its ``nodes_manager``) and
follows them for single commands, but its pipeline refuses scripts. So a batch is split
here: each command goes to the primary that owns its key's slot, over a connection of
that node's own (``wire.BatchConnection``, the same fast path as one server), and the
nodes' parts are exchanged concurrently. A reply that says the command ran nowhere is
followed and the command sent again, alone:

- ``MOVED``: the slot has a new owner (a failover, a finished migration): the slot map
  is patched and the command goes to the new owner;
- ``ASK``: the slot is being migrated and this key is already on the target: the
  command goes there once, after ``ASKING``;
- ``TRYAGAIN`` (a multi-key command in a slot half migrated), ``CLUSTERDOWN`` (a failover
  under way): wait a moment, reload the slot map, send again;
- ``NOSCRIPT``: the node lost its scripts (a restart, a new primary): load them, send
  again.

None of these ran the command, so following them never repeats a decision. A node that
cannot be reached fails the batch, as one server does; the slot map is reloaded before
the batch is tried again, so a failover's new primary is found. Every connection made
counts for the reconnect watch: a promoted replica may lack the last writes of its
primary (replication is asynchronous), and the worker checks Redis against the ledger
before anything more is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from creditgate.errors import RedisMayHaveForgotten
from creditgate.store.batches import Batches, Routed, Script
from creditgate.store.outages import unavailable_as
from creditgate.store.wire import BatchConnection, OnReply, Reply

# How often a batch follows redirections before it fails (and is tried again whole):
# a slot migration or a failover settles within a few rounds.
_FOLLOW_ROUNDS = 50
_SETTLE_SECONDS = 0.1  # between rounds after TRYAGAIN or CLUSTERDOWN
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
# the checkpoint copies' tags are tried in order until each node has one
_MAX_TAGS = 100_000


class ClusterBatches(Batches):
    """``Batches`` on a Redis Cluster: one batch connection per primary."""

    def __init__(self, client: RedisCluster, scripts: tuple[Script, ...]) -> None:
        super().__init__(client, scripts)  # type: ignore[arg-type]  # only its own methods use it
        self._cluster = client
        self._connections: dict[str, BatchConnection] = {}  # node name -> batch connection
        self._slots: dict[str, int] = {}  # route -> slot, as key_slot is pure
        self._refresh = False  # reload the slot map before the next batch

    async def close(self) -> None:
        async with self._batch_turn:
            for connection in self._connections.values():
                await connection.disconnect()
            self._connections.clear()

    async def load_scripts(self) -> None:
        """Register the scripts on every primary (redis-py sends SCRIPT LOAD to all)."""
        await self._ready()
        await super().load_scripts()

    async def routes_to_every_node(self, key: str) -> list[str]:
        """One key per primary, ``<key>:{<n>}`` with the lowest ``n`` whose slot it owns."""
        async with unavailable_as("finding the cluster's primaries"):
            await self._ready()
        manager = self._cluster.nodes_manager
        wanted = {node.name for node in manager.get_nodes_by_server_type("primary")}
        found: dict[str, str] = {}
        for n in range(_MAX_TAGS):
            name = f"{key}:{{{n}}}"
            owner = manager.get_node_from_slot(self._cluster.keyslot(name)).name
            if owner in wanted and owner not in found:
                found[owner] = name
                if len(found) == len(wanted):
                    break
        return [found[name] for name in sorted(found)]

    @property
    def batch_connection(self) -> BatchConnection | None:
        return next(iter(self._connections.values()), None)

    async def run(
        self,
        commands: Sequence[Routed],
        doing: str,
        on_reply: OnReply | None = None,
        *,
        pooled: bool = False,
    ) -> list[Reply]:
        """Send each command to its slot's primary, every node's part at once; replies
        in the commands' order. ``on_reply(i, reply)`` sees each reply that decided
        something as soon as it is read (in no particular order across nodes)."""
        replies: list[Reply] = [None] * len(commands)
        async with unavailable_as(doing), self._turn(pooled):
            await self._ready()
            if not self._scripts_loaded:
                await super().load_scripts()
            pending = list(range(len(commands)))
            asking: dict[int, str] = {}  # command -> the node it is to be asked of
            for _ in range(_FOLLOW_ROUNDS):
                parts = self._split(commands, pending, asking)
                exchanged = await self._exchange(parts, commands, asking, pooled)
                pending, settle = [], False
                asking_next: dict[int, str] = {}
                for i, reply in exchanged:
                    if isinstance(reply, MovedError):
                        await self._cluster.nodes_manager.move_slot(reply)
                    elif isinstance(reply, AskError):
                        asking_next[i] = f"{reply.host}:{reply.port}"
                    elif isinstance(reply, (TryAgainError, ClusterDownError)):
                        settle = True
                    elif isinstance(reply, NoScriptError):
                        self._scripts_loaded = False
                    else:
                        replies[i] = reply
                        if on_reply is not None and not isinstance(reply, ResponseError):
                            on_reply(i, reply)
                        continue
                    pending.append(i)
                if not pending:
                    break
                asking = asking_next
                if settle:
                    await asyncio.sleep(_SETTLE_SECONDS)
                    await self._reload()
                if not self._scripts_loaded:
                    await super().load_scripts()
            else:
                raise RedisConnectionError(
                    f"the cluster still redirected {len(pending)} commands after "
                    f"{_FOLLOW_ROUNDS} rounds"
                )
        failed = next((r for r in replies if isinstance(r, ResponseError)), None)
        if failed is not None:
            raise failed
        return replies

    def _turn(self, pooled: bool) -> contextlib.AbstractAsyncContextManager[Any]:
        # pooled calls (quotes) take pooled connections: no need to wait for the batch
        return contextlib.nullcontext() if pooled else self._batch_turn

    async def _ready(self) -> None:
        """The slot map, loaded at first use and again after a node failed."""
        if self._refresh:
            self._refresh = False
            await self._reload()
        await self._cluster.initialize()  # once: no-op while the map stands

    async def _reload(self) -> None:
        """The slot map anew, as redis-py itself does after CLUSTERDOWN: close, initialize.
        (The batch connections are this module's own: closing leaves them be.)"""
        await self._cluster.aclose()
        await self._cluster.initialize()

    def _split(
        self, commands: Sequence[Routed], pending: Sequence[int], asking: dict[int, str]
    ) -> dict[ClusterNode, list[int]]:
        manager = self._cluster.nodes_manager
        parts: dict[ClusterNode, list[int]] = defaultdict(list)
        for i in pending:
            target = asking.get(i)
            node = manager.get_node(node_name=target) if target else None
            if node is None:
                route = commands[i][0]
                slot = self._slots.get(route)
                if slot is None:
                    slot = self._slots[route] = self._cluster.keyslot(route)
                node = manager.get_node_from_slot(slot)
            parts[node].append(i)
        return parts

    async def _exchange(
        self,
        parts: dict[ClusterNode, list[int]],
        commands: Sequence[Routed],
        asking: dict[int, str],
        pooled: bool,
    ) -> list[tuple[int, Reply]]:
        """Every node's part at once; (command, reply) pairs. Connections are opened
        first, so a batch that meets a connection made anew sends nothing at all."""
        connections = {node: self._connection(node, pooled) for node in parts}
        try:
            await asyncio.gather(*(c.open() for c in connections.values()))
            if self._watching_reconnections and self._connections_made and not pooled:
                self._connections_made = 0
                raise RedisMayHaveForgotten("a connection to a Redis node was made anew", None)
            results = await asyncio.gather(
                *(
                    self._exchange_part(connections[node], part, commands, asking)
                    for node, part in parts.items()
                ),
                return_exceptions=True,
            )
        except (RedisConnectionError, OSError, TimeoutError):
            self._lost(connections, pooled)
            raise
        finally:
            if pooled:
                for node, connection in connections.items():
                    node.release(connection.connection)  # type: ignore[arg-type]  # its own
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            self._lost(connections, pooled)
            raise failure
        return [
            pair for result in results if not isinstance(result, BaseException) for pair in result
        ]

    async def _exchange_part(
        self,
        connection: BatchConnection,
        part: list[int],
        commands: Sequence[Routed],
        asking: dict[int, str],
    ) -> list[tuple[int, Reply]]:
        # A command asked of a migration's target goes after ASKING, whose +OK is
        # skipped below.
        order: list[int | None] = []
        for i in part:
            if i in asking:
                order.append(None)
            order.append(i)
        payload = b"".join(_ASKING if i is None else commands[i][1] for i in order)
        replies, _ = await connection.exchange(payload, len(order))
        return [(i, reply) for i, reply in zip(order, replies, strict=True) if i is not None]

    def _connection(self, node: ClusterNode, pooled: bool) -> BatchConnection:
        if pooled:
            return BatchConnection(node.acquire_connection())
        found = self._connections.get(node.name)
        if found is None:
            made = node.connection_class(**node.connection_kwargs)
            found = self._connections[node.name] = BatchConnection(made, self._connected)
        return found

    def _lost(self, connections: dict[ClusterNode, BatchConnection], pooled: bool) -> None:
        """A node failed: reload the slot map before the next batch (the node may have
        been failed over), and forget the batch connections the failure dropped (pooled
        ones go back to their node's pool)."""
        self._refresh = True
        if pooled:
            return
        for node, connection in connections.items():
            if not connection.connection.is_connected:
                self._connections.pop(node.name, None)

"""A batch of packed commands over one redis-py connection: the store's only use of
redis-py's private parts.

Why this exists. The worker decides a batch of requests in one round trip, and doing
that through redis-py's public pipeline cost as much of the worker's CPU as Redis
spends running the scripts: it encoded each of a charge call's 25+ arguments through
generic checks (``bench.micro``), and its ``read_response`` coroutine and checks per
reply cost 1.5 µs of the worker's CPU per decision. So ``BatchConnection`` writes bytes
packed ahead (``store.calls``) and parses the replies itself with hiredis, a socket
read at a time, under one silence timer for the whole batch instead of redis-py's timer
per read (arming and cancelling one per reply was 5-7 % of the worker's CPU, py-spy).

What it pins. It relies on redis-py's *private* API, which a minor release may change:
a connection's ``_writer`` (an ``asyncio.StreamWriter``) and ``_reader`` (an
``asyncio.StreamReader``), their transport's ``abort()``, ``redis._parsers.BaseParser``
(``parse_error``: errors as redis-py's own classes), and the connection's ``encoder``,
``health_check_interval``, ``next_health_check`` and ``register_connect_callback``.
``pyproject.toml`` bounds redis below its next major version for that reason, and
``tests/unit/test_wire.py`` fails loudly when one of these parts is gone.
Nothing outside this module touches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A batch's replies are read under one timer rather than redis-py's timer per read: the
# timer is pushed back while replies keep coming, so a Redis silent this long fails the
# batch.
_SILENCE_SECONDS = 10.0
_PUSH_BACK_EVERY_SECONDS = 1.0
_READ_BYTES = 65536  # at most, per socket read while a batch's replies come
_MORE = object()  # the reply parser's "not a whole reply yet"

# a reply of ``exchange``: what hiredis gives (str, int, list, None) or an error reply
Reply = Any
OnReply = Callable[[int, Reply], None]


class BatchConnection:
    """One redis-py connection that sends packed batches and reads their replies.

    Nothing else may read the connection meanwhile (one batch at a time), so the two
    parsers (redis-py's and this one) never share bytes. On any failure the socket is
    dropped at once (``drop``); the connection reconnects on next use.
    """

    def __init__(
        self, connection: AbstractConnection, on_connect: Callable[[], None] | None = None
    ) -> None:
        self.connection = connection  # redis-py's; tests may speak to it directly
        self._on_connect = on_connect
        if on_connect is not None:
            # redis-py keeps a weak reference to a bound method: this object holds it
            connection.register_connect_callback(self._connected)  # type: ignore[no-untyped-call]

    @classmethod
    def dedicated(
        cls, pool: ConnectionPool, on_connect: Callable[[], None] | None = None
    ) -> BatchConnection:
        """A connection of its own, outside the pool. ``on_connect`` runs after every
        connect, the health check's silent reconnect included: a Redis reached anew may
        have forgotten writes (the store's reconnect watch)."""
        # redis-py leaves make_connection unannotated
        connection: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        return cls(connection, on_connect)

    def _connected(self, connection: AbstractConnection) -> None:  # noqa: ARG002 - redis-py passes it
        """redis-py's connect callback (see ``dedicated``)."""
        if self._on_connect is not None:
            self._on_connect()

    async def open(self) -> None:
        """Connect if not connected, then the health check's PING if due (so it goes
        before the batch, not in the middle of its replies)."""
        try:
            # redis-py leaves both unannotated
            await self.connection.connect()  # type: ignore[no-untyped-call]  # no-op if connected
            await self.connection.check_health()  # type: ignore[no-untyped-call]
        except BaseException:
            await self.drop()
            raise

    async def exchange(
        self, payload: bytes, count: int, on_reply: OnReply | None = None
    ) -> tuple[list[Reply], int]:
        """Send ``payload`` (``count`` commands) in one write and read their ``count``
        replies; also how many replies ``on_reply`` saw (each one read before the first
        error reply). An error reply is returned in its place, like redis-py's
        ``execute(raise_on_error=False)``; a connection failure propagates. Replies come
        back while Redis still runs the commands after them, so whatever ``on_reply``
        does overlaps with Redis's work."""
        connection = self.connection
        loop = asyncio.get_running_loop()
        try:
            writer, stream = connection._writer, connection._reader
            if writer is None or stream is None:
                raise RedisConnectionError("the connection to Redis is closed")
            # The batch goes to the socket at once, without awaiting the write's drain as
            # redis-py's send does: with a large batch, the drain returns only once Redis
            # has read (and so run) most of it, and then the tasks that became ready
            # meanwhile (preparing the next batch, publishing the last) run before a reply
            # is read. Now the replies are read while Redis runs the batch, and the event
            # loop writes whatever the socket did not take at once (short ``python -m
            # bench.run`` runs: 7,200 → 11,000 decisions/s). A write to a broken
            # connection fails here or in the reads; either way the batch is retried.
            writer.write(payload)
            parser = _reply_parser(connection)
            replies: list[Reply] = []
            seen = 0
            try:
                async with asyncio.timeout_at(loop.time() + _SILENCE_SECONDS) as silence:
                    pushed_back = loop.time()
                    while len(replies) < count:
                        reply = parser.gets()
                        if reply is _MORE:
                            data = await stream.read(_READ_BYTES)
                            if not data:
                                raise RedisConnectionError("Redis closed the connection")
                            parser.feed(data)
                            now = loop.time()
                            if now - pushed_back > _PUSH_BACK_EVERY_SECONDS:
                                silence.reschedule(now + _SILENCE_SECONDS)
                                pushed_back = now
                            continue
                        if isinstance(reply, hiredis.PushNotification):
                            # RESP3: a server notice (a maintenance event), not a reply
                            continue
                        if isinstance(reply, RedisConnectionError):
                            raise reply  # BusyLoadingError (LOADING) is one
                        i = len(replies)
                        replies.append(reply)  # an error reply in its place, read whole
                        if (
                            on_reply is not None
                            and seen == i
                            and not isinstance(reply, ResponseError)
                        ):
                            on_reply(i, reply)
                            seen += 1
            except TimeoutError:
                raise RedisTimeoutError(
                    f"no reply from Redis for about {_SILENCE_SECONDS:.0f}s"
                ) from None
            if connection.health_check_interval:
                # the connection just answered: as redis-py's own reads do, put its next
                # health-check PING off, so a busy batch connection never waits for one
                connection.next_health_check = loop.time() + connection.health_check_interval
            return replies, seen
        except BaseException:
            await self.drop()
            raise

    async def drop(self) -> None:
        """Close the socket now, unsent bytes and all.

        Replies may be left unread, and the rest of the batch may still wait in the
        transport's buffer: a plain close would send it anyway, for Redis to run beside
        the batch's retry, and wait until it is sent (an error of ours then surfaced as a
        Redis timeout). So the socket is dropped at once; what Redis has already received
        it still runs."""
        writer = self.connection._writer
        if writer is not None:
            writer.transport.abort()
        await self.connection.disconnect(nowait=True)

    async def disconnect(self) -> None:
        await self.connection.disconnect()


def _reply_parser(connection: AbstractConnection) -> hiredis.Reader:
    """A parser of a redis-py connection's replies: errors and text as redis-py's own
    hiredis parser gives them, and ``_MORE`` until a whole reply is in."""
    encoder = connection.encoder
    text = (
        {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
        if encoder.decode_responses
        else {}
    )
    return hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=BaseParser.parse_error,
        notEnoughData=_MORE,
        **text,
    )

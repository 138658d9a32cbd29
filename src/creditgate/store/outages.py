"""Redis failures as creditgate's ``StoreUnavailable``: every store method reads or
writes inside ``unavailable_as``, so no caller of the store handles redis-py's errors.

A Redis Cluster fails in its own words too, all of them passing: a failover under way
(``CLUSTERDOWN``, ``MASTERDOWN``), a slot half migrated (``TRYAGAIN``), no node
reachable or redirections that did not settle (``RedisClusterException``,
``ClusterError``)."""

from __future__ import annotations

from types import TracebackType

from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from creditgate.errors import StoreUnavailable

_CLUSTER_PASSING = (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    RedisClusterException,
    TryAgainError,
)


class unavailable_as:  # noqa: N801 - read as a phrase: `async with unavailable_as(...)`
    """Turns Redis connection failures into ``StoreUnavailable`` (to retry, never to ack)."""

    def __init__(self, doing: str) -> None:
        self._doing = doing

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            raise StoreUnavailable(f"Redis unavailable while {self._doing}: {exc}") from exc
        if isinstance(exc, _CLUSTER_PASSING):
            raise StoreUnavailable(f"the Redis Cluster failed while {self._doing}: {exc}") from exc
        if isinstance(exc, ResponseError) and "LOADING" in str(exc):
            raise StoreUnavailable(f"Redis is loading its data while {self._doing}") from exc

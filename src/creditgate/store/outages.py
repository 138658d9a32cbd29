"""Redis failures as creditgate's ``StoreUnavailable``: every store method reads or
writes inside ``unavailable_as``, so no caller of the store handles redis-py's errors."""

from __future__ import annotations

from types import TracebackType

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from creditgate.errors import StoreUnavailable


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
        if isinstance(exc, ResponseError) and "LOADING" in str(exc):
            raise StoreUnavailable(f"Redis is loading its data while {self._doing}") from exc

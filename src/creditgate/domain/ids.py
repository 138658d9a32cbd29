"""Identifiers and timestamps as DESIGN §3 defines them."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, TypeGuard

from pydantic import AfterValidator, BeforeValidator, StringConstraints

ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


def is_identifier(value: Any) -> TypeGuard[str]:
    """True when ``value`` is a string the contracts accept as an id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _must_be_text(value: Any) -> Any:
    # JSON carries timestamps as RFC 3339 strings; an epoch number is a different contract
    if not isinstance(value, str | datetime):
        raise ValueError("timestamp must be an RFC 3339 string")
    return value


def _must_be_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp needs a time zone (RFC 3339)")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 has no UTC year 1; pydantic reports only ValueError
        raise ValueError("timestamp out of range") from None


# The scripts store a license period's times as milliseconds since the epoch, which the
# contracts say are never negative; the last moment datetime holds is far below 2^53 ms
# (exact in Lua's doubles).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)


def _storable(value: datetime) -> datetime:
    if not EARLIEST <= value <= LATEST:
        raise ValueError(
            "timestamp out of range: it must be between 1970-01-01T00:00:00Z and "
            "9999-12-31T23:59:59.999Z"
        )
    return value


Timestamp = Annotated[datetime, BeforeValidator(_must_be_text), AfterValidator(_must_be_utc)]
# a time the scripts store (as milliseconds since the epoch)
StoredTimestamp = Annotated[Timestamp, AfterValidator(_storable)]


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@lru_cache(maxsize=4096)
def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as an RFC 3339 UTC string with millisecond precision.

    Cached: a batch's decisions share their decision time and their windows' end, and
    each is written several times per message (the result, the ledger entry, headers).
    """
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")

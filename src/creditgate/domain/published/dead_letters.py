"""The dead letters (``credits.deadletter``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints, model_validator

from creditgate.domain.published.common import Count, Message, Time


class DeadLetterSource(Message):
    """Where the message came from; for an output the broker refused (too large even
    after its limits were read again), the topic it was for, and no offset."""

    topic: str
    partition: Count
    offset: Count | None


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class DeadLetter(
    Message,
    # the value is either text or, when it is not UTF-8, hex
    json_schema_extra={
        "oneOf": [
            {"properties": {"value": {"type": "string"}, "value_hex": {"type": "null"}}},
            {"properties": {"value": {"type": "null"}, "value_hex": {"type": "string"}}},
        ]
    },
):
    """Input that carries no decision: not JSON, not an object, or no readable ids; or an
    output too large for its topic.

    Bounded whatever the message's size: ``value`` is the first 64 KiB of the message as
    text, or ``value_hex`` the first 32 KiB of its bytes in hex when they are not UTF-8;
    ``value_bytes`` and ``value_sha256`` are the whole value's size and digest, and
    ``value_truncated`` says whether the prefix is all of it. ``key`` is the first KiB of
    the message's key as received (not necessarily an ``org_id``), with its size and
    digest likewise (null without a key).
    """

    source: DeadLetterSource
    error: str
    key: str | None
    key_bytes: Count | None
    key_sha256: Sha256 | None
    key_truncated: bool
    value: str | None
    value_hex: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{2})*$")] | None
    value_bytes: Count
    value_sha256: Sha256
    value_truncated: bool
    received_at: Time

    @model_validator(mode="after")
    def _text_or_hex(self) -> DeadLetter:
        if (self.value is None) == (self.value_hex is None):
            raise ValueError("exactly one of value and value_hex is set")
        return self

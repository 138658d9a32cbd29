"""Outgoing messages: JSON values keyed by ``org_id`` with CloudEvents binary headers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

SOURCE = "creditgate"


@dataclass(slots=True)  # not frozen: one or more per decision (see ChargeRecord)
class Outgoing:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def outgoing(
    topic: str, org_id: str, body: dict[str, Any], *, ce_id: str, ce_type: str, ce_time: str
) -> Outgoing:
    """One message; ``ce_id`` is deterministic so a re-emitted copy is recognisably the same."""
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", ce_id.encode()),
        ("ce_type", ce_type.encode()),
        ("ce_source", SOURCE.encode()),
        ("ce_time", ce_time.encode()),
        ("content-type", b"application/json"),
    ]
    return Outgoing(topic, org_id.encode(), orjson.dumps(body), headers)

"""Charge calls packed ahead of their decision clock are the bytes redis-py would send."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from creditgate.domain.charges import ChargeRequest
from creditgate.settings import Settings
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore


def _call(**extra: object) -> ChargeCall:
    request = ChargeRequest.model_validate(
        {
            "request_id": "r-1",
            "org_id": "acme",
            "user_id": "u-1",
            "action": "export",
            "items": [
                {"type": "contact", "id": "c-1", "company_id": "co-9"},
                {"type": "company", "id": "co-9"},
            ],
            "requested_at": "2026-11-26T10:00:00Z",
            "reference": {"list": "Zoë's leads"},  # not ASCII: lengths count bytes
            **extra,
        }
    )
    return ChargeCall.of(request)


def test_a_packed_call_completed_with_the_clock_is_the_whole_command() -> None:
    """The bytes are redis-py's for charge.lua's KEYS and ARGV as its header lists them."""
    store = CreditStore(aioredis.Redis(), Settings(key_prefix="cg"))  # never connects
    settings = Settings(key_prefix="cg")
    for call in (_call(), _call(max_credits=3, on_insufficient="partial")):
        for mode in ("charge", "quote"):
            (packed,) = store.pack_charges([call], mode)
            org = "cg:{acme}"
            keys: list[Any] = [
                f"{org}:license",
                f"{org}:members",
                f"{org}:disallowed",
                f"{org}:seq",
                f"{org}:req:r-1",
                f"{org}:usage",
                f"{org}:hist:export:u-1",
                f"{org}:limits",
                f"{org}:holds",
                f"{org}:hold-exp",
                f"{org}:win:contact:c-1",
                f"{org}:win:company:co-9",
            ]
            request = [
                "r-1",
                "u-1",
                "export",
                call.fingerprint,
                call.partial,
                call.max_credits,
                None,  # verified_email_found: not a verification
                "",  # no preset reason
                "",
                # per item its window's KEYS index and its company's
                [11, 12, 12, 0],
                None,  # not a hold
            ]
            args: list[Any] = [
                1_795_000_000_123,  # the decision clock
                "",  # no known sequence: no check
                settings.repeat_window_ms,
                settings.idempotency_ttl_ms,
                "80,90,100",
                mode,
                json.dumps(request, separators=(",", ":")),
                call.summary,
            ]
            whole = ("EVALSHA", store._charge.sha, len(keys), *keys, *args)
            assert packed.command(1_795_000_000_123) == b"".join(Connection().pack_command(*whole))
            # with the organisation's last published sequence, for the check that Redis
            # has not forgotten it
            args[1] = 41
            whole = ("EVALSHA", store._charge.sha, len(keys), *keys, *args)
            known = {"acme": 41}.__getitem__
            assert packed.command(1_795_000_000_123, known) == b"".join(
                Connection().pack_command(*whole)
            )


def test_scripts_are_named_by_the_sha1_redis_gives_them() -> None:
    import hashlib

    store = CreditStore(aioredis.Redis(), Settings())
    assert (
        store._charge.sha
        == hashlib.sha1(store._charge.text.encode(), usedforsecurity=False).hexdigest()
    )
    assert len(store._command.sha) == 40

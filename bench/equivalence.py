"""Byte-for-byte guard for the optimisations: ``python -m bench.equivalence``.

Runs a fixed input set (the benchmark's workload plus every unusual input we know of)
through ``Decider.decide`` on a real Redis, with a fixed decision clock and a fresh key
prefix, and prints one SHA-256 over every produced message (topic, key, value,
headers) in order. The digest must not change when the hot path does:

    python -m bench.equivalence            # prints the digest
    python -m bench.equivalence --dump F   # also writes every message, to diff two runs

Needs ``CREDITGATE_REDIS_URL`` (or a local Redis on the default port).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.run import license_commands_for
from creditgate.domain.clock import Clock
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.decider import Decider, Incoming
from creditgate.stream.topics import TopicRegistry
from creditgate_harness.workload import Workload, WorkloadSpec

NOW_MS = 1_795_000_000_000


class FixedClock(Clock):
    def now_ms(self) -> int:
        return NOW_MS


def _request(request_id: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": request_id,
        "org_id": "org-0001",
        "user_id": "u-1",
        "action": "export",
        "items": [{"type": "contact", "id": "c-edge-1", "company_id": "co-edge-1"}],
        "requested_at": "2026-11-26T10:00:00Z",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def edge_cases() -> list[tuple[str, bytes | None]]:
    """(logical topic, value) pairs for every branch of intake and rendering."""
    export, push, verify = t.EXPORT_REQUESTS, t.PUSH_REQUESTS, t.VERIFICATION_REQUESTS
    dumps = orjson.dumps
    many = [{"type": "contact", "id": f"c-many-{i}"} for i in range(30)]
    cases: list[tuple[str, bytes | None]] = [
        (export, None),
        (export, b""),
        (export, b"not json"),
        (export, b"[1, 2]"),
        (export, b'{"org_id": "bad id!", "request_id": "x"}'),
        (export, b'{"org_id": "org-0001", "request_id": "r-nan", "x": NaN}'),
        (export, b"\xff\xfe"),
        (export, dumps(_request("edge-unknown-field", extra=1))),
        (export, dumps(_request("edge-no-items", items=[]))),
        (export, dumps(_request("edge-bad-time", requested_at=12))),
        (export, dumps(_request("edge-naive-time", requested_at="2026-11-26T10:00:00"))),
        (export, dumps(_request("edge-wrong-topic", action="crm_push"))),
        (push, dumps(_request("edge-push", action="crm_push"))),
        (export, dumps(_request("edge-dup", items=many[:3] + many[:2]))),
        (export, dumps(_request("edge-max", items=many, max_credits=2))),
        (export, dumps(_request("edge-ref", reference={"export_id": "é-1", "n": [1, 2.5]}))),
        (export, dumps(_request("edge-ref-big", reference={"x": "y" * 3000}))),
        (export, dumps(_request("edge-bool-max", max_credits=True))),
        (export, dumps(_request("edge-str-max", max_credits="1"))),
        (export, dumps(_request("edge-company", items=[{"type": "company", "id": "co-x"}]))),
        (export, dumps(_request("edge-stranger", user_id="u-stranger"))),
        (export, dumps(_request("edge-unlicensed", org_id="org-none"))),
        (
            export,
            dumps(
                _request("edge-partial", org_id="org-0040", on_insufficient="partial", items=many)
            ),
        ),
        (export, dumps(_request("edge-short", org_id="org-0039", items=many))),
        (
            verify,
            dumps(
                _request(
                    "edge-verify",
                    action="email_verification",
                    items=[{"type": "contact", "id": "c-v"}],
                    verified_email_found=True,
                )
            ),
        ),
        (
            verify,
            dumps(
                _request(
                    "edge-verify-no",
                    action="email_verification",
                    items=[{"type": "contact", "id": "c-v2"}],
                    verified_email_found=False,
                )
            ),
        ),
        (
            verify,
            dumps(
                _request(
                    "edge-verify-missing",
                    action="email_verification",
                    items=[{"type": "contact", "id": "c-v3"}],
                )
            ),
        ),
        (export, dumps(_request("edge-verified-flag", verified_email_found=True))),
        (export, dumps(_request("edge-too-many", items=[{"type": "company", "id": "c"}] * 101))),
    ]
    # the same request again (a replay), then the same id with another body (a conflict)
    cases.append((push, dumps(_request("edge-push", action="crm_push"))))
    cases.append((push, dumps(_request("edge-push", action="crm_push", user_id="u-0"))))
    # key order and spacing differ, same body: a replay, not a conflict
    cases.append(
        (
            export,
            (
                b'{"org_id":"org-0001", "request_id":"edge-company", "user_id":"u-1",'
                b' "action":"export","items":[{"id":"co-x","type":"company"}],'
                b' "requested_at":"2026-11-26T10:00:00.000Z"}'
            ),
        )
    )
    return cases


async def digest(requests: int) -> tuple[str, list[bytes]]:
    settings = Settings(key_prefix=f"eq{uuid.uuid4().hex[:8]}", max_items=100)
    registry = TopicRegistry.load()
    store = CreditStore.from_settings(settings)
    processor = Decider(store, registry, settings, FixedClock())
    spec = WorkloadSpec.bench(
        "golden", seed=7, big_export_share=0.1, orgs=40, small_plan_credits=30
    )
    workload = Workload(spec)
    await license_commands_for(store, workload, NOW_MS)
    inputs: list[tuple[str, bytes | None]] = [
        (registry.name(r.topic), r.value) for r in workload.requests(requests)
    ]
    inputs += [(registry.name(topic), value) for topic, value in edge_cases()]
    sha = hashlib.sha256()
    lines: list[bytes] = []
    try:
        for start in range(0, len(inputs), 250):
            batch = [
                Incoming(topic, 0, start + i, b"k", value)
                for i, (topic, value) in enumerate(inputs[start : start + 250])
            ]
            for out in await processor.decide(batch):
                line = orjson.dumps(
                    [
                        out.topic,
                        out.key.decode(),
                        out.value.decode(),
                        [[k, v.decode()] for k, v in out.headers],
                    ]
                )
                sha.update(line + b"\n")
                lines.append(line)
        # clean up after ourselves: the keys live under a prefix of their own
        async for key in store.client_for_tests.scan_iter(
            match=f"{settings.key_prefix}:*", count=5000
        ):
            await store.client_for_tests.delete(key)
    finally:
        await store.close()
    return f"{sha.hexdigest()}  ({len(lines)} messages from {len(inputs)} inputs)", lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.equivalence")
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    summary, lines = asyncio.run(digest(args.requests))
    if args.dump:
        args.dump.write_bytes(b"\n".join(lines) + b"\n")
    print(summary)


if __name__ == "__main__":
    main()

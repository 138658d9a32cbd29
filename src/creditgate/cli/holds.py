"""Holds resolved from the command line: ``hold settle`` and ``hold release``, published on
``credits.hold.settlements`` and answered by the worker with the hold's outcome."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import click

from creditgate.cli.licensing import _items, _wait, item_refs
from creditgate.cli.root import _fail, _registry, _settings, main
from creditgate.stream import topics as t


def _publish_settlement(body: dict[str, Any], wait: float) -> None:
    from creditgate.connection_checks import check_kafka
    from creditgate.stream.client import CreditgateClient, Timeout

    body = {"settlement_id": f"cli-{uuid.uuid4().hex[:12]}", **body}
    settings = _settings()

    async def run() -> dict[str, Any] | None:
        await check_kafka(settings)
        follow = (t.CHARGE_RESULTS,) if wait > 0 else ()
        async with CreditgateClient(
            settings.kafka_bootstrap, _registry(settings), follow, settings=settings
        ) as client:
            if wait <= 0:
                await client.send(t.HOLD_SETTLEMENTS, body)
                return None
            try:
                return await client.settlement(body, timeout=wait)
            except Timeout:
                _fail(
                    f"{body['type']} {body['settlement_id']} was published, but no worker "
                    f"answered within {wait:g}s: start one with `creditgate worker` (it "
                    "will still decide it), or wait longer with --wait"
                )

    outcome = asyncio.run(run())
    if outcome is None:
        click.echo(f"published {body['type']} {body['settlement_id']}")
        return
    click.echo(f"{outcome['type']}: {outcome['message']}")
    if outcome["type"] == "hold.rejected":
        sys.exit(1)


@main.group()
def hold() -> None:
    """Holds: settle one with what was delivered, or release it."""


@hold.command("settle")
@click.argument("org")
@click.argument("request_id")
@_items
@click.option("--reason", default=None, help="optional, for the audit")
@_wait
def hold_settle(
    org: str, request_id: str, items: tuple[str, ...], reason: str | None, wait: float
) -> None:
    """Settle the hold REQUEST_ID: the --item's delivered are charged as decided now, the
    rest of the hold released."""
    if not items:
        _fail("name the delivered items with --item (none delivered: `hold release`)")
    body: dict[str, Any] = {
        "org_id": org,
        "request_id": request_id,
        "type": "hold.settle",
        "items": item_refs(items),
    }
    if reason:
        body["reason"] = reason
    _publish_settlement(body, wait)


@hold.command("release")
@click.argument("org")
@click.argument("request_id")
@click.option("--reason", default=None, help="optional, for the audit")
@_wait
def hold_release(org: str, request_id: str, reason: str | None, wait: float) -> None:
    """Release the hold REQUEST_ID: nothing delivered, every held credit back."""
    body: dict[str, Any] = {"org_id": org, "request_id": request_id, "type": "hold.release"}
    if reason:
        body["reason"] = reason
    _publish_settlement(body, wait)

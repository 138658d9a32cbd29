"""License commands, published on Kafka and answered by the worker: ``license``,
``credits grant``, ``member`` (``member limit`` too), ``refund``."""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from creditgate.stream import topics as t

if TYPE_CHECKING:
    pass

from creditgate.cli.reads import json_option, read_from_store, render_view
from creditgate.cli.root import _fail, _registry, _settings, main

# ---- license commands ------------------------------------------------------------


def _publish_command(body: dict[str, Any], wait: float) -> None:
    from creditgate.connection_checks import check_kafka
    from creditgate.stream.client import CreditgateClient, Timeout

    body = {"command_id": f"cli-{uuid.uuid4().hex[:12]}", **body}
    settings = _settings()

    async def run() -> dict[str, Any] | None:
        # a broker that does not answer is named, with why, before a client is built
        await check_kafka(settings)
        follow = (t.LICENSE_EVENTS,) if wait > 0 else ()
        async with CreditgateClient(
            settings.kafka_bootstrap, _registry(settings), follow, settings=settings
        ) as client:
            if wait <= 0:
                await client.send(t.LICENSE_COMMANDS, body)
                return None
            try:
                return await client.command(body, timeout=wait)
            except Timeout:
                _fail(
                    f"{body['type']} {body['command_id']} was published, but no worker "
                    f"answered within {wait:g}s: start one with `creditgate worker` (it "
                    "will still apply the command), or wait longer with --wait"
                )

    event = asyncio.run(run())
    if event is None:
        click.echo(f"published {body['type']} {body['command_id']}")
        return
    click.echo(f"{event['type']}: {event['message']}")
    if event["type"] != "command.applied":
        sys.exit(1)


_wait = click.option(
    "--wait",
    type=float,
    default=30.0,
    show_default=True,
    help="seconds to wait for the worker's answer (0: do not wait)",
)


@main.group()
def license() -> None:
    """License periods."""


@license.command("start-period")
@click.argument("org")
@click.option("--period-id", required=True, help="the new period's id (e.g. 2026-q1)")
@click.option("--credits", "amount", type=int, required=True, help="the period's credits")
@click.option("--starts-at", default=None, help="RFC 3339; default now")
@click.option("--ends-at", required=True, help="RFC 3339")
@_wait
def start_period(
    org: str, period_id: str, amount: int, starts_at: str | None, ends_at: str, wait: float
) -> None:
    """Start a new period: the balance becomes its credits (no rollover)."""
    starts = starts_at or datetime.now(UTC).isoformat()
    _publish_command(
        {
            "org_id": org,
            "type": "license.start_period",
            "period_id": period_id,
            "starts_at": starts,
            "ends_at": ends_at,
            "credits": amount,
        },
        wait,
    )


class OrgFirstGroup(click.Group):
    """A group whose first word may be an organisation instead of a subcommand:
    ``credits acme`` runs ``credits show acme`` (an organisation named like a
    subcommand is reached with ``credits show NAME``)."""

    default_command = "show"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@main.group(cls=OrgFirstGroup)
def credits() -> None:
    """Credits: balances (credits ORG) and top-ups (credits grant ORG)."""


@credits.command("grant")
@click.argument("org")
@click.option("--credits", "amount", type=int, required=True, help="credits to add")
@click.option("--reason", required=True, help="why, as the organisation's admins will read it")
@click.option("--granted-by", required=True, help="who grants them: the id of a person or a system")
@click.option("--grant-id", default=None, help="idempotency id of the grant (default: a new one)")
@_wait
def grant(
    org: str, amount: int, reason: str, granted_by: str, grant_id: str | None, wait: float
) -> None:
    """Top up the current period."""
    _publish_command(
        {
            "org_id": org,
            "type": "credits.grant",
            "grant_id": grant_id or f"grant-{uuid.uuid4().hex[:12]}",
            "credits": amount,
            "reason": reason,
            "granted_by": granted_by,
        },
        wait,
    )


@credits.command("show")
@click.argument("org")
@json_option
def credits_show(org: str, as_json: bool) -> None:
    """The current period's credits, used and remaining, read from Redis."""
    from creditgate.api.tables import credits_table

    view = read_from_store(lambda store, settings, now: store.credits(org, now))
    if view is None:
        _fail(f"{org} has no license")
        return
    render_view(view, credits_table, as_json)


@main.group()
def member() -> None:
    """Members of an organisation and their permission to use credits."""


@member.command("upsert")
@click.argument("org")
@click.argument("user")
@click.option(
    "--role",
    type=click.Choice(["admin", "member"]),
    default="member",
    show_default=True,
    help="admins also receive the organisation's notifications (e.g. credit thresholds)",
)
@_wait
def member_upsert(org: str, user: str, role: str, wait: float) -> None:
    """Add USER to ORG's members, or change their role."""
    _publish_command({"org_id": org, "type": "member.upsert", "user_id": user, "role": role}, wait)


@member.command("remove")
@click.argument("org")
@click.argument("user")
@_wait
def member_remove(org: str, user: str, wait: float) -> None:
    """Remove USER from ORG's members: their requests are rejected from then on."""
    _publish_command({"org_id": org, "type": "member.remove", "user_id": user}, wait)


@member.command("allow")
@click.argument("org")
@click.argument("user")
@click.option("--by", "admin", required=True, help="the admin who allows it")
@_wait
def member_allow(org: str, user: str, admin: str, wait: float) -> None:
    """Allow a user to use credits again."""
    _publish_command(
        {
            "org_id": org,
            "type": "member.set_credits_allowed",
            "user_id": user,
            "allowed": True,
            "set_by": admin,
        },
        wait,
    )


@member.command("disallow")
@click.argument("org")
@click.argument("user")
@click.option("--by", "admin", required=True, help="the admin who disallows it")
@_wait
def member_disallow(org: str, user: str, admin: str, wait: float) -> None:
    """Disallow a user from using credits."""
    _publish_command(
        {
            "org_id": org,
            "type": "member.set_credits_allowed",
            "user_id": user,
            "allowed": False,
            "set_by": admin,
        },
        wait,
    )


@member.command("limit")
@click.argument("org")
@click.argument("user")
@click.argument("limit")
@click.option("--by", "admin", required=True, help="the admin who sets it")
@_wait
def member_limit(org: str, user: str, limit: str, admin: str, wait: float) -> None:
    """Give USER a credit limit per license period (LIMIT credits, or "none")."""
    if limit != "none" and not limit.isdigit():
        _fail(f"LIMIT is a number of credits or none, not {limit!r}")
    _publish_command(
        {
            "org_id": org,
            "type": "member.set_credit_limit",
            "user_id": user,
            "limit": None if limit == "none" else int(limit),
            "set_by": admin,
        },
        wait,
    )


def item_refs(items: tuple[str, ...]) -> list[dict[str, str]]:
    """``contact:c-1`` / ``company:co-9`` as items by type and id."""
    found = []
    for text in items:
        kind, _, item_id = text.partition(":")
        if kind not in ("contact", "company") or not item_id:
            _fail(f"an item is contact:<id> or company:<id>, not {text!r}")
        found.append({"type": kind, "id": item_id})
    return found


_items = click.option(
    "--item",
    "items",
    multiple=True,
    help="an item as contact:<id> or company:<id> (repeat the option for more)",
)


@main.command("refund")
@click.argument("org")
@click.argument("request_id")
@_items
@click.option("--reason", required=True, help="why, for the audit (e.g. the CRM refused it)")
@click.option("--by", "refunded_by", required=True, help="who refunds (customer success)")
@_wait
def refund(
    org: str, request_id: str, items: tuple[str, ...], reason: str, refunded_by: str, wait: float
) -> None:
    """Refund the charged items of a request of the current period (every one, or those
    named with --item): each at most once, its window closed if the request opened it."""
    body: dict[str, Any] = {
        "org_id": org,
        "type": "charge.refund",
        "request_id": request_id,
        "reason": reason,
        "refunded_by": refunded_by,
    }
    if items:
        body["items"] = item_refs(items)
    _publish_command(body, wait)

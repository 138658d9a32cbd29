"""Reads, straight from Redis: ``usage``, ``charges``, ``quote``, ``credits show``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import IO, TYPE_CHECKING, Any

import click
import orjson

from creditgate.domain.charges import Action
from creditgate.settings import Settings

if TYPE_CHECKING:
    from creditgate.store.gateway import CreditStore

from creditgate.cli.root import _fail, _settings, main

# ---- reads, straight from Redis ----------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")

Read = Callable[["CreditStore", Settings, int], Awaitable[Any]]


def read_from_store(read: Read) -> Any:
    """Run one read against Redis with the environment's settings and decision clock."""
    from creditgate.domain.clock import Clock
    from creditgate.store.gateway import CreditStore

    settings = _settings()

    async def run() -> Any:
        store = CreditStore.from_settings(settings)
        try:
            return await read(store, settings, Clock(settings.clock_offset_seconds).now_ms())
        finally:
            await store.close()

    # invalid input and an unreachable Redis become one line in CliGroup.invoke
    return asyncio.run(run())


def render_view(
    answer: dict[str, Any], as_table: Callable[[dict[str, Any]], str], as_json: bool
) -> None:
    if as_json:
        click.echo(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(as_table(answer))


def _identifier(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from creditgate.domain.ids import is_identifier

    if value is not None and not is_identifier(value):
        raise click.BadParameter("1-128 characters of [A-Za-z0-9._:@-]")
    return value


@main.command()
@click.argument("org", callback=_identifier)
@click.option("--period", default=None, callback=_identifier, help="default: the current one")
@json_option
def usage(org: str, period: str | None, as_json: bool) -> None:
    """Credits used per user in a license period (the admin's team view)."""
    from creditgate.api.reports import usage_report
    from creditgate.api.tables import usage_table

    report = read_from_store(lambda store, settings, now: usage_report(store, org, period, now))
    if report is None:
        _fail(f"{org} has no license")
        return
    render_view(report, usage_table, as_json)


@main.command()
@click.argument("org", callback=_identifier)
@click.argument("user", callback=_identifier)
@click.option(
    "--action",
    type=click.Choice([a.value for a in Action]),
    required=True,
    help="the action whose requests to list",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 500),
    default=50,
    show_default=True,
    help="requests per page",
)
@click.option("--before", default=None, help="the cursor printed after the previous page")
@json_option
def charges(
    org: str, user: str, action: str, limit: int, before: str | None, as_json: bool
) -> None:
    """A user's requests for one action, newest first, with what each cost."""
    from creditgate.api.reports import charge_history, parse_history_query
    from creditgate.api.tables import charges_table

    query = {"action": action, "limit": str(limit)}
    if before is not None:
        query["before"] = before

    async def read(store: CreditStore, settings: Settings, now: int) -> Any:
        parsed = parse_history_query(query)
        return await charge_history(store, org, user, parsed, settings.repeat_window_days)

    history = read_from_store(read)
    if history is None:
        _fail(f"{org} is not a known organisation")
        return
    render_view(history, charges_table, as_json)


@main.command()
@click.argument("request_file", metavar="FILE|-", type=click.File("rb"))
@json_option
def quote(request_file: IO[bytes], as_json: bool) -> None:
    """What a charge request (JSON, without request_id) would cost now; changes nothing."""
    from creditgate.api import quotes
    from creditgate.api.tables import quote_table

    try:
        body = orjson.loads(request_file.read())
    except orjson.JSONDecodeError as exc:
        _fail(f"the request is not JSON: {exc}")
        return

    async def read(store: CreditStore, settings: Settings, now: int) -> Any:
        return await quotes.quote(
            store,
            body,
            now,
            max_items=settings.max_items,
            window_days=settings.repeat_window_days,
        )

    render_view(read_from_store(read), quote_table, as_json)

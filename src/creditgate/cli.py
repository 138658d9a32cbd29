"""The ``creditgate`` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import click
import orjson
from pydantic import ValidationError

from creditgate.domain.charges import Action
from creditgate.errors import CreditgateError, InfrastructureError, StoreUnavailable
from creditgate.settings import ENV_FILE, Settings
from creditgate.stream import topics as t
from creditgate.stream.topics import TopicRegistry, apply_topics, check_topics

if TYPE_CHECKING:
    from creditgate.store.gateway import CreditStore

DEVSTACK_DIR = Path(".devstack")


def _settings() -> Settings:
    return Settings()


def _registry(settings: Settings) -> TopicRegistry:
    return TopicRegistry.load(prefix=settings.topic_prefix)


def _fail(message: str) -> NoReturn:
    raise Failure(message)


# ---- expected failures: one line on stderr, exit status 1 ---------------------------


class Failure(click.ClickException):
    """An expected failure, printed as one ``error: ...`` line (no traceback)."""

    def show(self, file: IO[Any] | None = None) -> None:  # noqa: ARG002 - click's signature
        click.echo(f"error: {self.message}", err=True)


_START_STACK = "start the local stack with `creditgate dev up`"


def _settings_problem(exc: ValidationError) -> str:
    # The input values are left out: a malformed secret must not reach a terminal.
    fields = "; ".join(
        f"CREDITGATE_{'_'.join(str(p) for p in err['loc'][:1]).upper()}: {err['msg']}"
        for err in exc.errors()
    )
    return f"bad setting {fields} (fix it in the environment or in {ENV_FILE})"


def _redis_where() -> str:
    try:  # the host and port only: the URL may hold a password
        url = urlsplit(Settings().redis_url.get_secret_value())
        return f" at {url.hostname}:{url.port or 6379}"
    except (ValidationError, ValueError):
        return ""


def _explain(exc: Exception) -> str | None:
    """What failed and what to do, for the failures a user can meet; None: a bug."""
    from aiokafka.errors import KafkaConnectionError, KafkaError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from creditgate.devstack.errors import DevStackError

    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        return _settings_problem(exc)
    # an InfrastructureError may wrap the client's own error (rebuild): look behind it
    causes: list[BaseException] = [exc]
    while (cause := causes[-1].__cause__) is not None and len(causes) < 5:
        causes.append(cause)
    redis_errors = (StoreUnavailable, RedisConnectionError, RedisTimeoutError)
    if any(isinstance(c, redis_errors) for c in causes):
        said = (
            str(exc)
            if isinstance(exc, CreditgateError)
            else f"Redis{_redis_where()} did not answer: {exc}"
        )
        return f"{said.rstrip('. ')}: {_START_STACK}, or set CREDITGATE_REDIS_URL"
    if any(isinstance(c, KafkaConnectionError) for c in causes) or (
        isinstance(exc, InfrastructureError) and str(exc).startswith("no Kafka")
    ):
        return f"{str(exc).rstrip('. ')}: {_START_STACK}, or set CREDITGATE_KAFKA_BOOTSTRAP"
    if isinstance(exc, CreditgateError | KafkaError | DevStackError):
        return str(exc)
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"{type(exc).__name__}: {exc}"
    return None


class CliGroup(click.Group):
    """The root group: every command runs inside its ``invoke``, so an expected failure
    of any of them (a server not answering, a bad setting, a worker not answering in
    time) is turned into one line and exit status 1 here, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            explained = _explain(exc)
            if explained is None:
                raise  # a bug: the traceback is what a maintainer needs
            raise Failure(explained) from exc


@click.group(cls=CliGroup)
@click.version_option(version("creditgate"), "--version", prog_name="creditgate")
def main() -> None:
    """creditgate: the credit meter of the contact-data platform.

    Settings come from CREDITGATE_* environment variables and, for those not set, from
    .devstack/env (written by `creditgate dev up`).
    """
    # aiokafka logs each refused connection; the error line above says it better
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())


# ---- the local stack -------------------------------------------------------------


@main.group()
def dev() -> None:
    """A local single-node Kafka (KRaft) and Redis, without Docker."""


@dev.command("up")
@click.option(
    "--secure",
    is_flag=True,
    help="Kafka with SASL_SSL/SCRAM-SHA-512 and ACLs, Redis over TLS with ACL users, "
    "signed by a throwaway CA",
)
@click.option(
    "--key-prefix",
    "key_prefixes",
    multiple=True,
    help="with --secure: a key prefix creditgate's Redis user may use "
    "(repeatable; default CREDITGATE_KEY_PREFIX)",
)
def dev_up(secure: bool, key_prefixes: tuple[str, ...]) -> None:
    """Start the local stack (or find it running) and print its variables."""
    from creditgate.devstack import DevStack, DevStackError

    prefixes = key_prefixes or (_settings().key_prefix,)
    try:
        endpoints = DevStack(DEVSTACK_DIR, secure=secure, redis_key_prefixes=prefixes).up()
    except DevStackError as exc:
        _fail(str(exc))
        return
    for name, value in endpoints.as_env().items():
        # Passwords go to the env file (0600) only, never to a terminal or a CI log.
        shown = "<in the env file>" if name.endswith("_PASSWORD") else value
        click.echo(f"{name}={shown}")
    click.echo(
        f"# written to {DEVSTACK_DIR / 'env'}, which creditgate reads when run from this "
        f"directory; for other programs: set -a; . {DEVSTACK_DIR}/env; set +a",
        err=True,
    )


@dev.command("down")
def dev_down() -> None:
    """Stop the local stack and delete its data."""
    from creditgate.devstack import DevStack

    DevStack(DEVSTACK_DIR).down()
    click.echo("local stack stopped")


@dev.command("status")
def dev_status() -> None:
    """Whether the local stack runs, and where; exits 1 when it does not."""
    from creditgate.devstack import DevStack

    status = DevStack(DEVSTACK_DIR).status()
    click.echo(str(status))
    sys.exit(0 if status.running else 1)


# ---- topics ----------------------------------------------------------------------


@main.group()
def topics() -> None:
    """Create and check the topics defined in topics/."""


@topics.command("apply")
def topics_apply() -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    settings = _settings()
    created = asyncio.run(apply_topics(settings.kafka_bootstrap, _registry(settings)))
    click.echo("created: " + ", ".join(created) if created else "all topics exist")


@topics.command("check")
def topics_check() -> None:
    """Drift from topics/*.json, and each output topic's worst case against its limit."""
    from creditgate.stream.limits import check_output_limits, limits_report

    settings = _settings()
    registry = _registry(settings)
    problems = asyncio.run(check_topics(settings.kafka_bootstrap, registry))
    found: list[Any] = []
    too_small: list[str] = []
    if not any("missing" in p for p in problems):
        found, too_small = asyncio.run(check_output_limits(settings, registry))
    click.echo("worst-case output size per topic against its limit (max.message.bytes):")
    for line in limits_report(found):
        click.echo("  " + line)
    for problem in problems + too_small:
        click.echo(problem)
    if problems or too_small:
        sys.exit(1)
    click.echo("topics match their definitions")


# ---- the worker ------------------------------------------------------------------


@main.command()
@click.option(
    "--loglevel",
    default="info",
    show_default=True,
    help="debug, info, warning or error (JSON lines on stderr)",
)
def worker(loglevel: str) -> None:
    """Consume requests and commands, decide them, publish the outcomes."""
    from creditgate.api.access import parse_tokens, require_safe_bind
    from creditgate.observability import logging_config
    from creditgate.preflight import preflight
    from creditgate.worker import Worker, create_app, use_fast_event_loop

    # A CreditgateError raised here stops the worker with its message (CliGroup.invoke).
    settings = _settings()
    # before anything connects: an open API must not face the network
    require_safe_bind(bool(parse_tokens(settings.api_tokens)), settings.http_host)
    registry = _registry(settings)
    # a wrong password, a missing topic, a lifetime too short, an evicting Redis or
    # a topic too small for what the worker may write stops it now, with the fix
    problems = asyncio.run(preflight(settings, registry))
    for problem in problems:
        logging.getLogger("creditgate").warning("topic drift: %s", problem)
    use_fast_event_loop()  # before faust creates the worker's loops
    # may raise for e.g. a token scoped to a malformed organisation id
    app = create_app(settings, registry)
    Worker(
        app, loglevel=loglevel, quiet=True, logging_config=logging_config(loglevel)
    ).execute_from_commandline()


# ---- reads, straight from Redis ----------------------------------------------------

_as_json = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")

Read = Callable[["CreditStore", Settings, int], Awaitable[Any]]


def _read(read: Read) -> Any:
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


def _render(
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
@_as_json
def usage(org: str, period: str | None, as_json: bool) -> None:
    """Credits used per user in a license period (the admin's team view)."""
    from creditgate.api.reports import usage_report
    from creditgate.api.tables import usage_table

    report = _read(lambda store, settings, now: usage_report(store, org, period, now))
    if report is None:
        _fail(f"{org} has no license")
        return
    _render(report, usage_table, as_json)


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
@_as_json
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

    history = _read(read)
    if history is None:
        _fail(f"{org} is not a known organisation")
        return
    _render(history, charges_table, as_json)


@main.command()
@click.argument("request_file", metavar="FILE|-", type=click.File("rb"))
@_as_json
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

    _render(_read(read), quote_table, as_json)


# ---- license commands ------------------------------------------------------------


def _publish_command(body: dict[str, Any], wait: float) -> None:
    from creditgate.connections import check_kafka
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
@_as_json
def credits_show(org: str, as_json: bool) -> None:
    """The current period's credits, used and remaining, read from Redis."""
    from creditgate.api.tables import credits_table

    view = _read(lambda store, settings, now: store.credits(org, now))
    if view is None:
        _fail(f"{org} has no license")
        return
    _render(view, credits_table, as_json)


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


# ---- the demo --------------------------------------------------------------------


@main.command()
def demo() -> None:
    """Play a scenario through the real pipeline and print what happened."""
    from creditgate.demo import run_demo

    run_demo()


def _register_commands() -> None:
    """Commands that live beside the code they run."""
    from creditgate.contracts import contracts_command
    from creditgate.rebuild import rebuild_command

    main.add_command(rebuild_command, "rebuild")
    main.add_command(contracts_command, "contracts")


_register_commands()

if __name__ == "__main__":
    main()

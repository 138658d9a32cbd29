"""The ``creditgate`` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from creditgate.errors import CreditgateError
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.topics import TopicRegistry, apply_topics, check_topics

DEVSTACK_DIR = Path(".devstack")


def _settings() -> Settings:
    return Settings()


def _registry(settings: Settings) -> TopicRegistry:
    return TopicRegistry.load(prefix=settings.topic_prefix)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group()
def main() -> None:
    """creditgate: the credit meter of the contact-data platform."""


# ---- the local stack -------------------------------------------------------------


@main.group()
def dev() -> None:
    """A local single-node Kafka (KRaft) and Redis, without Docker."""


@dev.command("up")
def dev_up() -> None:
    """Start the local stack (or find it running) and print its variables."""
    from creditgate.devstack import DevStack, DevStackError

    try:
        endpoints = DevStack(DEVSTACK_DIR).up()
    except DevStackError as exc:
        _fail(str(exc))
        return
    for name, value in endpoints.as_env().items():
        click.echo(f"{name}={value}")
    click.echo(
        f"# written to {DEVSTACK_DIR / 'env'}; load with: set -a; . {DEVSTACK_DIR}/env", err=True
    )


@dev.command("down")
def dev_down() -> None:
    """Stop the local stack and delete its data."""
    from creditgate.devstack import DevStack

    DevStack(DEVSTACK_DIR).down()
    click.echo("local stack stopped")


@dev.command("status")
def dev_status() -> None:
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
    settings = _settings()
    created = asyncio.run(apply_topics(settings.kafka_bootstrap, _registry(settings)))
    click.echo("created: " + ", ".join(created) if created else "all topics exist")


@topics.command("check")
def topics_check() -> None:
    settings = _settings()
    problems = asyncio.run(check_topics(settings.kafka_bootstrap, _registry(settings)))
    for problem in problems:
        click.echo(problem)
    if problems:
        sys.exit(1)
    click.echo("topics match their definitions")


# ---- the worker ------------------------------------------------------------------


def fatal_topic_problems(problems: list[str]) -> list[str]:
    """Missing topics and wrong partition counts stop the worker; config drift does not."""
    return [p for p in problems if "missing" in p or "partitions" in p]


@main.command()
@click.option("--loglevel", default="info", show_default=True)
def worker(loglevel: str) -> None:
    """Consume requests and commands, decide them, publish the outcomes."""
    import faust

    from creditgate.stream.app import create_app

    settings = _settings()
    registry = _registry(settings)
    problems = asyncio.run(check_topics(settings.kafka_bootstrap, registry))
    fatal = fatal_topic_problems(problems)
    if fatal:
        _fail("the worker needs its topics as defined in topics/:\n  " + "\n  ".join(fatal))
    for problem in problems:
        logging.getLogger("creditgate").warning("topic drift: %s", problem)
    app = create_app(settings, registry)
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()


# ---- license commands ------------------------------------------------------------


def _publish_command(body: dict[str, Any], wait: float) -> None:
    from creditgate.stream.client import CreditgateClient

    body = {"command_id": f"cli-{uuid.uuid4().hex[:12]}", **body}
    settings = _settings()

    async def run() -> dict[str, Any] | None:
        follow = (t.LICENSE_EVENTS,) if wait > 0 else ()
        async with CreditgateClient(
            settings.kafka_bootstrap, _registry(settings), follow
        ) as client:
            if wait <= 0:
                await client.send(t.LICENSE_COMMANDS, body)
                return None
            return await client.command(body, timeout=wait)

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
@click.option("--period-id", required=True)
@click.option("--credits", "amount", type=int, required=True)
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


@main.group()
def credits() -> None:
    """Credits: top-ups and balances."""


@credits.command("grant")
@click.argument("org")
@click.option("--credits", "amount", type=int, required=True)
@click.option("--reason", required=True)
@click.option("--granted-by", required=True)
@click.option("--grant-id", default=None)
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
def credits_show(org: str) -> None:
    """The current period's credits, used and remaining, read from Redis."""
    from creditgate.store.gateway import CreditStore
    from creditgate.stream.processor import Clock

    settings = _settings()

    async def run() -> dict[str, Any] | None:
        store = CreditStore.from_settings(settings)
        try:
            return await store.credits(org, Clock(settings.clock_offset_seconds).now_ms())
        finally:
            await store.close()

    view = asyncio.run(run())
    if view is None:
        _fail(f"{org} has no license")
        return
    for name, value in view.items():
        click.echo(f"{name:>15}  {value}")


@main.group()
def member() -> None:
    """Members of an organisation and their permission to use credits."""


@member.command("upsert")
@click.argument("org")
@click.argument("user")
@click.option("--role", type=click.Choice(["admin", "member"]), default="member")
@_wait
def member_upsert(org: str, user: str, role: str, wait: float) -> None:
    _publish_command({"org_id": org, "type": "member.upsert", "user_id": user, "role": role}, wait)


@member.command("remove")
@click.argument("org")
@click.argument("user")
@_wait
def member_remove(org: str, user: str, wait: float) -> None:
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

    try:
        run_demo()
    except CreditgateError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()

"""``creditgate dev``, ``topics`` and ``worker``: the local stack, the topics, the worker."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

import click

from creditgate.stream.topics import apply_topics, check_topics

if TYPE_CHECKING:
    pass

from creditgate.cli.root import DEVSTACK_DIR, _fail, _registry, _settings, main

# ---- the local stack -------------------------------------------------------------


@main.group()
def dev() -> None:
    """A local Kafka (KRaft) and Redis, one node each or clusters, without Docker."""


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
@click.option(
    "--cluster",
    is_flag=True,
    help="three Kafka nodes (KRaft, three controllers) and a Redis Cluster of three "
    "primaries with a replica each",
)
def dev_up(secure: bool, key_prefixes: tuple[str, ...], cluster: bool) -> None:
    """Start the local stack (or find it running) and print its variables."""
    from creditgate.devstack import ClusterStack, DevStack, DevStackError

    if cluster and secure:
        _fail("--cluster runs without --secure: the cluster stack has no logins or TLS")
    if not cluster and ClusterStack.exists_in(DEVSTACK_DIR):
        _fail(f"a cluster stack runs in {DEVSTACK_DIR}: use `dev up --cluster`, or `dev down`")
    prefixes = key_prefixes or (_settings().key_prefix,)
    try:
        if cluster:
            env = ClusterStack(DEVSTACK_DIR).up()
        else:
            env = DevStack(DEVSTACK_DIR, secure=secure, redis_key_prefixes=prefixes).up().as_env()
    except DevStackError as exc:
        _fail(str(exc))
        return
    for name, value in env.items():
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
    from creditgate.devstack import ClusterStack, DevStack

    ClusterStack(DEVSTACK_DIR).down()
    DevStack(DEVSTACK_DIR).down()
    click.echo("local stack stopped")


@dev.command("status")
def dev_status() -> None:
    """Every node of the local stack, its role, and where; exits 1 unless all run."""
    from creditgate.devstack import ClusterStack, ClusterStatus, DevStack, StackStatus

    status: ClusterStatus | StackStatus
    if ClusterStack.exists_in(DEVSTACK_DIR):
        status = ClusterStack(DEVSTACK_DIR).status()
    else:
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

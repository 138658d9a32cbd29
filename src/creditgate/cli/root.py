"""The root of the ``creditgate`` command line: its group, and how it reports failures."""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from creditgate.errors import CreditgateError, InfrastructureError, StoreUnavailable
from creditgate.settings import ENV_FILE, Settings
from creditgate.stream.topics import TopicRegistry

if TYPE_CHECKING:
    pass


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

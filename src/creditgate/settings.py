"""One settings tree for creditgate, read from ``CREDITGATE_*`` environment variables.

Variables not set in the environment are read from ``.devstack/env`` (relative to the
working directory) when it exists: the ``KEY=value`` file ``creditgate dev up`` writes,
so a shell need not source it first. The environment always wins over the file.
``CREDITGATE_ENV_FILE`` names another file, or none when empty (the tests set it empty,
so a stack a developer runs in the checkout never leaks into them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DAY_SECONDS = 86_400
# written by `creditgate dev up` (creditgate.devstack.stack); a missing file is no error
ENV_FILE = Path(".devstack") / "env"
ENV_FILE_VARIABLE = "CREDITGATE_ENV_FILE"


def env_file() -> Path | None:
    """The env file settings read now: CREDITGATE_ENV_FILE, else ENV_FILE ("": none)."""
    named = os.environ.get(ENV_FILE_VARIABLE)
    if named is None:
        return ENV_FILE
    return Path(named) if named else None


MAX_DAYS = 36_500  # a hundred years: longer windows and lifetimes are a mistake


class Settings(BaseSettings):
    """Everything creditgate reads from its environment.

    Secrets are ``SecretStr`` so that logging or dumping the settings never shows them.
    """

    # env file entries need the CREDITGATE_ prefix too; unknown names in it are ignored
    model_config = SettingsConfigDict(
        env_prefix="CREDITGATE_", env_file_encoding="utf-8", extra="ignore"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - replaced below
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # arguments, then the environment, then the env file (chosen at each construction)
        dotenv = DotEnvSettingsSource(settings_cls, env_file=env_file())
        return init_settings, env_settings, dotenv, file_secret_settings

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # Whether CREDITGATE_REDIS_URL names a node of a Redis Cluster (the client learns the
    # others from it and follows the slots as they move). Unset: asked of the server
    # (INFO cluster) when the client is made. Checked against the server at start-up.
    redis_cluster: bool | None = None
    http_port: int = 6066
    http_host: str = "127.0.0.1"
    # Bearer tokens of the HTTP API and the console, as JSON from token to scope:
    # {"<token>": {"org": "acme", "role": "member" | "admin" | "support", "user": "u-17"},
    #  "<another>": "*"} (the first form, a list of organisations, still reads). Kept whole
    # as a secret and read by creditgate.api.access, whose errors never quote it. Empty:
    # no tokens, and then the API has no access control, so it must listen on loopback.
    api_tokens: SecretStr = SecretStr("")
    # how long an HTTP write (a license command) waits for its license event before it
    # answers 504 with the command's id; the command is still applied later
    http_command_timeout_seconds: float = Field(default=10.0, gt=0)

    # The decision clock is the worker's clock shifted by this many seconds: demos and
    # tests move it to reach the end of a repeat window or of a license period.
    clock_offset_seconds: float = 0.0

    app_id: str = "creditgate"
    key_prefix: str = "cg"
    topic_prefix: str = ""

    # Secure connections; creditgate.connections turns these into client arguments and
    # checks them at start-up. SASL_* needs a username and password; the CA files are
    # the PEM bundles that signed the servers' certificates (the system's CAs if unset).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_ca_file: Path | None = None
    # The Redis ACL user and password may also be given in CREDITGATE_REDIS_URL
    # (rediss://user:password@host:port/db), but not in both places.
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_ca_file: Path | None = None

    # Bounded so the scripts' window ends and expiries stay whole milliseconds Redis
    # takes (a PEXPIRE or SET PXAT it refuses would fail a script after its writes).
    repeat_window_days: float = Field(default=30.0, gt=0, le=MAX_DAYS)
    # Idempotency records must outlive the longest replay Kafka allows, or a replay
    # would be decided a second time: the worker refuses to start when a request
    # topic's retention plus one segment, or the group's offsets retention, is longer
    # (creditgate.preflight).
    idempotency_ttl_days: float = Field(default=35.0, gt=0, le=MAX_DAYS)
    max_items: int = Field(default=10_000, ge=1)
    # a hold expires by itself after this long unless its request says otherwise, and
    # never later than hold_max_seconds (DESIGN: 15 minutes by default, 24 hours at most)
    hold_default_seconds: int = Field(default=900, ge=1, le=86_400)
    hold_max_seconds: int = Field(default=86_400, ge=1, le=86_400)
    # how often the worker looks for holds that have expired (it publishes hold.expired
    # whether or not traffic touches their organisation)
    hold_sweep_seconds: float = Field(default=0.5, gt=0, le=60)
    threshold_percents: tuple[Annotated[int, Field(ge=1, le=100)], ...] = (80, 90, 100)

    # a charge result lists at most this many items (beyond it: only those not charged,
    # when they fit, and ``items_truncated``); GET /v1/orgs/{org}/requests/{id} pages all
    result_items_max: int = Field(default=1000, ge=1)

    batch_size: int = Field(default=1000, ge=1)
    # A batch also holds at most this many bytes of input values (a single larger request
    # is a batch of one), so a batch's Python objects, its Redis payload (about twice its
    # input) and the up-to-three batches in flight stay bounded. Capped far below Redis's
    # client-query-buffer-limit (1 GiB by default), which one payload must never reach.
    batch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1, le=256 * 1024 * 1024)
    # consumer-group session: how soon a dead worker's partitions move to another one
    # (at least the broker's group.min.session.timeout.ms, 6 s by default)
    session_timeout_seconds: float = Field(default=10.0, gt=0)
    retry_backoff_seconds: float = 0.5
    retry_backoff_max_seconds: float = 5.0

    @property
    def repeat_window_ms(self) -> int:
        return int(self.repeat_window_days * DAY_SECONDS * 1000)

    @property
    def idempotency_ttl_ms(self) -> int:
        return int(self.idempotency_ttl_days * DAY_SECONDS * 1000)

    def safe_dump(self) -> dict[str, object]:
        """The settings as loggable data: secrets stay masked."""
        return {
            name: str(value) if isinstance(value, SecretStr) else value
            for name, value in self.model_dump().items()
        }

"""One settings tree for creditgate, read from ``CREDITGATE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY_SECONDS = 86_400


class Settings(BaseSettings):
    """Everything creditgate reads from its environment.

    Secrets are ``SecretStr`` so that logging or dumping the settings never shows them.
    """

    model_config = SettingsConfigDict(env_prefix="CREDITGATE_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    http_port: int = 6066
    http_host: str = "127.0.0.1"

    # The decision clock is the worker's clock shifted by this many seconds: demos and
    # tests move it to reach the end of a repeat window or of a license period.
    clock_offset_seconds: float = 0.0

    app_id: str = "creditgate"
    key_prefix: str = "cg"
    topic_prefix: str = ""

    repeat_window_days: float = 30.0
    # Idempotency records must outlive the longest replay Kafka allows (the retention of
    # the request topics), or a replay would be decided a second time.
    idempotency_ttl_days: float = 35.0
    max_items: int = Field(default=10_000, ge=1)
    threshold_percents: tuple[int, ...] = (80, 90, 100)

    batch_size: int = Field(default=1000, ge=1)
    batch_within_seconds: float = 0.05
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

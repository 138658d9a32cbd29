"""How creditgate reaches Kafka and Redis: settings in, client arguments out.

Every client takes its security arguments from here, so that a protocol means the
same thing everywhere: the aiokafka producers, consumers and admin clients of the
worker, the CLI and the tests (`aiokafka_options`; faust itself opens no Kafka
connection, see `creditgate.worker`)
and the store's Redis client (`redis_options`). Every consumer closes through
`stop_consumer`. The start-up check of those logins is
`creditgate.connection_checks`; the Redis ACL creditgate needs, `store.acl`.

Secrets stay `SecretStr` until the moment a client is built, and no message here ever
contains a password or the Redis URL (which may hold one).
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer

from creditgate.errors import ConfigurationError
from creditgate.settings import Settings

SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS = ("SSL", "SASL_SSL")

# ---- Kafka -----------------------------------------------------------------------


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS context that verifies the brokers' certificates and names, or None without TLS."""
    _check_kafka_settings(settings)
    if settings.kafka_security_protocol not in _TLS:
        return None
    cafile = settings.kafka_ca_file
    return ssl.create_default_context(cafile=str(cafile) if cafile else None)


def aiokafka_options(settings: Settings | None = None) -> dict[str, Any]:
    """Security keyword arguments for aiokafka's producer, consumer and admin client.

    Nothing for PLAINTEXT, so plain clients stay exactly as aiokafka's defaults make
    them. Without `settings` they come from the ``CREDITGATE_*`` environment: callers
    handed only a bootstrap address (the CLI's topic commands, tests) then connect the
    way the deployment says.
    """
    settings = settings or Settings()
    protocol = settings.kafka_security_protocol
    context = kafka_ssl_context(settings)
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if context is not None:
        options["ssl_context"] = context
    if protocol in SASL_PROTOCOLS:
        username, password = _sasl_login(settings)
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = username
        options["sasl_plain_password"] = password
    return options


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, even when a fetch to a broker that went away is backing off.

    aiokafka 0.14's fetcher cancels its fetch tasks on close and awaits them, but a task
    sleeping out its retry backoff after a failed fetch lets the CancelledError through:
    ``stop()`` raises it and never closes the connections. Our own task being cancelled
    still stops us.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        await consumer._client.close()


def _sasl_login(settings: Settings) -> tuple[str, str]:
    if not settings.kafka_username or settings.kafka_password is None:
        raise ConfigurationError(
            f"CREDITGATE_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} needs "
            "CREDITGATE_KAFKA_USERNAME and CREDITGATE_KAFKA_PASSWORD"
        )
    return settings.kafka_username, settings.kafka_password.get_secret_value()


def _check_kafka_settings(settings: Settings) -> None:
    """Refuse combinations that would connect with less security than the settings suggest."""
    protocol = settings.kafka_security_protocol
    has_credentials = settings.kafka_username is not None or settings.kafka_password is not None
    if protocol in SASL_PROTOCOLS:
        _sasl_login(settings)
    elif has_credentials:
        raise ConfigurationError(
            f"a Kafka username or password is set, but CREDITGATE_KAFKA_SECURITY_PROTOCOL="
            f"{protocol} does not log in: set it to SASL_SSL (or SASL_PLAINTEXT)"
        )
    if settings.kafka_ca_file is not None:
        if protocol not in _TLS:
            raise ConfigurationError(
                f"CREDITGATE_KAFKA_CA_FILE is set, but CREDITGATE_KAFKA_SECURITY_PROTOCOL="
                f"{protocol} does not use TLS: set it to SASL_SSL (or SSL)"
            )
        _require_file(settings.kafka_ca_file, "CREDITGATE_KAFKA_CA_FILE")


# ---- Redis -----------------------------------------------------------------------


def redis_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url(settings.redis_url, ...)``: user, password, CA.

    redis-py lets the URL's user and password override these silently, so a value
    given in both places is refused rather than guessed at.
    """
    url = urlsplit(settings.redis_url.get_secret_value())
    options: dict[str, Any] = {}
    if settings.redis_username is not None:
        if url.username:
            raise ConfigurationError(
                "the Redis user is given twice, in CREDITGATE_REDIS_URL and in "
                "CREDITGATE_REDIS_USERNAME: keep one"
            )
        options["username"] = settings.redis_username
    if settings.redis_password is not None:
        if url.password:
            raise ConfigurationError(
                "the Redis password is given twice, in CREDITGATE_REDIS_URL and in "
                "CREDITGATE_REDIS_PASSWORD: keep one"
            )
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ca_file is not None:
        if url.scheme != "rediss":
            raise ConfigurationError(
                "CREDITGATE_REDIS_CA_FILE is set, but CREDITGATE_REDIS_URL does not use TLS: "
                "start it with rediss://"
            )
        options["ssl_ca_certs"] = str(
            _require_file(settings.redis_ca_file, "CREDITGATE_REDIS_CA_FILE")
        )
    return options


def _require_file(path: Path, name: str) -> Path:
    if not path.is_file():
        raise ConfigurationError(f"{name}: {path} is not a file")
    return path

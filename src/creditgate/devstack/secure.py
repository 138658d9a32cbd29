"""Secure mode of the dev stack: throwaway passwords, TLS files, Kafka ACLs, Redis users.

Layout under the stack's root folder:

    secure/credentials.json   the generated passwords (0600); its presence marks a
                              secure stack, and it goes with `down`
    secure/ca.pem ...         the throwaway CA and server certificate (creditgate.devstack.tls)

Users:

    Kafka  admin       super user: the broker's own login, and the stack's ACL set-up
           creditgate  SCRAM-SHA-512, allowed on every topic and consumer group
           outsider    SCRAM-SHA-512 with no ACL at all: what a missing ACL looks like
    Redis  default     off: a connection that does not log in can do nothing
           admin       everything (the stack's readiness checks, tests that look around)
           creditgate  creditgate's key prefixes and commands only (store.acl.redis_acl_rules)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest

from creditgate.devstack.errors import DevStackError
from creditgate.devstack.kafka import SCRAM_MECHANISM, KafkaSecurity
from creditgate.devstack.process import write_private
from creditgate.devstack.redis import RedisLogin, RedisSecurity
from creditgate.devstack.tls import TlsFiles, issue_tls_files
from creditgate.store.acl import redis_acl_rules

ADMIN_USER = "admin"
APP_USER = "creditgate"
OUTSIDER_USER = "outsider"

# Kafka's numeric codes for ACL bindings (org.apache.kafka.common.acl / resource).
_TOPIC, _GROUP, _CLUSTER = 2, 3, 4
_LITERAL = 3
_ALLOW = 3
_READ, _WRITE, _CREATE, _DESCRIBE, _DESCRIBE_CONFIGS = 3, 4, 5, 8, 10

# What creditgate does with Kafka: create and check its topics (`topics apply|check`),
# consume and produce them, commit offsets in its consumer groups, read the brokers'
# retention defaults at start-up (creditgate.preflight). Wildcards because
# tests prefix every topic and group name with their own run id; a production cluster
# grants the same operations on the PREFIXED resource `credits.` and the group
# CREDITGATE_APP_ID (README, "Operating creditgate").
APP_ACLS = (
    (_TOPIC, "*", (_DESCRIBE, _DESCRIBE_CONFIGS, _CREATE, _READ, _WRITE)),
    (_GROUP, "*", (_DESCRIBE, _READ)),
    (_CLUSTER, "kafka-cluster", (_DESCRIBE_CONFIGS,)),
)

_ACL_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Credentials:
    """The passwords of one secure stack; hex, so no config syntax ever needs quoting."""

    kafka_admin: str = field(repr=False)
    kafka_app: str = field(repr=False)
    kafka_outsider: str = field(repr=False)
    redis_admin: str = field(repr=False)
    redis_app: str = field(repr=False)
    keystore: str = field(repr=False)

    @classmethod
    def generate(cls) -> Credentials:
        return cls(**{name: secrets.token_hex(16) for name in cls.__dataclass_fields__})


class SecureFiles:
    """The secure folder of one stack root: credentials and TLS files, made on first use."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "secure"
        self._credentials_file = self.folder / "credentials.json"

    @property
    def exists(self) -> bool:
        return self._credentials_file.is_file()

    def credentials(self) -> Credentials:
        """The stack's passwords, generated at the first call and kept until `remove`."""
        try:
            return Credentials(**json.loads(self._credentials_file.read_text()))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError) as exc:
            raise DevStackError(
                f"{self._credentials_file} is unreadable ({exc}): "
                "run `creditgate dev down` and start again"
            ) from exc
        credentials = Credentials.generate()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_private(self._credentials_file, json.dumps(asdict(credentials)) + "\n")
        return credentials

    def tls(self) -> TlsFiles:
        return issue_tls_files(self.folder, self.credentials().keystore)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def kafka_security(self, sasl_plaintext_port: int) -> KafkaSecurity:
        credentials = self.credentials()
        return KafkaSecurity(
            sasl_plaintext_port=sasl_plaintext_port,
            keystore_file=self.tls().keystore_file,
            keystore_password=credentials.keystore,
            admin_user=ADMIN_USER,
            admin_password=credentials.kafka_admin,
            scram_users={
                ADMIN_USER: credentials.kafka_admin,
                APP_USER: credentials.kafka_app,
                OUTSIDER_USER: credentials.kafka_outsider,
            },
        )

    def redis_security(self, key_prefixes: Sequence[str]) -> RedisSecurity:
        credentials = self.credentials()
        tls = self.tls()
        # Test clean-up finds a test's keys with SCAN, which redis_acl_rules allows.
        return RedisSecurity(
            ca_file=tls.ca_file,
            cert_file=tls.cert_file,
            key_file=tls.key_file,
            users={
                ADMIN_USER: (credentials.redis_admin, "~* &* +@all"),
                APP_USER: (credentials.redis_app, redis_acl_rules(*key_prefixes)),
            },
        )

    def redis_login(self) -> RedisLogin:
        return RedisLogin(self.tls().ca_file, ADMIN_USER, self.credentials().redis_admin)


def grant_app_acls(sasl_plaintext_port: int, admin_password: str) -> None:
    """Allow creditgate's user what APP_ACLS lists; creating an existing ACL is a no-op."""
    _run(_grant_app_acls(sasl_plaintext_port, admin_password))


async def _grant_app_acls(port: int, admin_password: str) -> None:
    # aiokafka has no public call for ACLs, but it ships the CreateAcls request.
    admin = AIOKafkaAdminClient(
        bootstrap_servers=f"127.0.0.1:{port}",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=SCRAM_MECHANISM,
        sasl_plain_username=ADMIN_USER,
        sasl_plain_password=admin_password,
        request_timeout_ms=int(_ACL_TIMEOUT_SECONDS * 1000),
    )
    await admin.start()
    try:
        for resource_type, name, operations in APP_ACLS:
            for operation in operations:
                request = CreateAclsRequest(
                    resource_type, name, _LITERAL, f"User:{APP_USER}", "*", operation, _ALLOW
                )
                response = await admin._send_request(request)
                for error_code, error_message in response.creation_responses:
                    if error_code:
                        raise DevStackError(
                            f"Kafka refused to create an ACL for {APP_USER}: "
                            f"error {error_code} {error_message}"
                        )
    finally:
        await admin.close()


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run `coroutine` to the end, also when the caller is inside an event loop (a test)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coroutine)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="devstack-acls")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]

"""creditgate against the local stack in secure mode (`creditgate dev up --secure`).

One stack for the module: Kafka with SCRAM-SHA-512 logins over SASL_SSL and
SASL_PLAINTEXT and StandardAuthorizer ACLs, Redis over TLS only with ACL users and the
`default` user off, all signed by the stack's throwaway CA. creditgate logs in as
`creditgate` everywhere: on Redis that user may touch the key prefixes `cgs*` (this
module) and `t*` (the store-level suites run below) and run REDIS_COMMANDS, nothing else.

What an operator would check: a charge decided end to end by `creditgate worker` over
these connections, SASL_PLAINTEXT too; the store-level suites passing as the restricted
user; and every wrong setting — password, CA, ACL — ending within seconds with a
message that names it, never with minutes of retries or a password in a log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError

from creditgate.connection_checks import (
    PROBED_SCRIPT_COMMANDS,
    check_connections,
    check_kafka,
    check_redis,
)
from creditgate.connections import aiokafka_options, redis_options
from creditgate.devstack import DevStack, Endpoints, default_jars_cache_dir, find_free_port
from creditgate.errors import ConfigurationError
from creditgate.settings import Settings
from creditgate.store.acl import REDIS_COMMANDS, redis_acl_rules
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.client import CreditgateClient, Timeout
from creditgate.stream.topics import TopicRegistry, apply_topics

pytestmark = pytest.mark.secure

PROJECT = Path(__file__).parents[2]
# How long a refused login may take to be reported; the clients' own retries take minutes.
FAIL_FAST_SECONDS = 10.0
# This module's key prefixes start with "cgs"; the store-level suites use "t...".
KEY_PREFIXES = ("cgs*", "t*")


def clean_env() -> dict[str, str]:
    """This process's environment without CREDITGATE_*: a developer's loaded env stays out."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}


def settings_of(env: dict[str, str], **overrides: Any) -> Settings:
    """Settings from a stack's variables; security fields the stack leaves out are unset,
    so nothing comes from this process's environment by accident."""
    values: dict[str, Any] = {
        "kafka_security_protocol": "PLAINTEXT",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_username": None,
        "kafka_password": None,
        "kafka_ca_file": None,
        "redis_username": None,
        "redis_password": None,
        "redis_ca_file": None,
        # a prefix the stack's Redis user may use (the stack allows cgs*)
        "key_prefix": "cgs-check",
    }
    values |= {name.removeprefix("CREDITGATE_").lower(): value for name, value in env.items()}
    return Settings(**(values | overrides))


@dataclass
class SecureStack:
    stack: DevStack
    endpoints: Endpoints
    up_output: str

    def env(self, protocol: str = "SASL_SSL") -> dict[str, str]:
        return self.endpoints.as_env(protocol)

    def settings(self, protocol: str = "SASL_SSL", **overrides: Any) -> Settings:
        return settings_of(self.env(protocol), **overrides)

    def redis_admin(self) -> aioredis.Redis:
        credentials = self.stack.credentials()
        security = self.endpoints.security
        assert security is not None
        return aioredis.Redis.from_url(
            self.endpoints.redis_url.replace(f"{security.redis_username}@", ""),
            username="admin",
            password=credentials.redis_admin,
            ssl_ca_certs=str(security.ca_file),
            decode_responses=True,
        )


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    """The stack, started the way a developer starts it: `creditgate dev up --secure`."""
    folder = tmp_path_factory.mktemp("secure")
    prefixes = [arg for prefix in KEY_PREFIXES for arg in ("--key-prefix", prefix)]
    stack = DevStack(folder / ".devstack")
    try:
        up = subprocess.run(
            [sys.executable, "-m", "creditgate", "dev", "up", "--secure", *prefixes],
            cwd=folder,
            # the project's Kafka jars, not a fresh fetch into ~/.cache
            env=clean_env() | {"CREDITGATE_KAFKA_JARS_DIR": str(default_jars_cache_dir())},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        yield SecureStack(stack, stack.endpoints(), up.stdout + up.stderr)
    finally:
        stack.down()


@pytest.fixture
def run_id() -> str:
    return f"cgs{uuid.uuid4().hex[:10]}"


# ---- the whole charge path over secure connections ----------------------------------


@dataclass
class Worker:
    settings: Settings
    registry: TopicRegistry
    process: subprocess.Popen[bytes]
    log: Path

    def state(self) -> str:
        """For a failure message: whether it still runs, and the end of its log."""
        code = self.process.poll()
        alive = "running" if code is None else f"exited with {code}"
        return f"worker {alive}; its log ends:\n{self.log.read_text(errors='replace')[-3000:]}"


@pytest.fixture(scope="module")
async def worker(
    secure: SecureStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Worker]:
    """`creditgate worker` over SASL_SSL and TLS Redis, as the restricted users."""
    run = f"cgs{uuid.uuid4().hex[:10]}"
    registry = TopicRegistry.load(prefix=f"{run}.")
    settings = secure.settings(key_prefix=run, topic_prefix=registry.prefix, app_id=run)
    await apply_topics(settings.kafka_bootstrap, registry, settings=settings)
    env = (
        clean_env()
        | secure.env()
        | {
            "CREDITGATE_KEY_PREFIX": run,
            "CREDITGATE_TOPIC_PREFIX": registry.prefix,
            "CREDITGATE_APP_ID": run,
            "CREDITGATE_HTTP_PORT": str(find_free_port()),
        }
    )
    log = tmp_path_factory.mktemp("secure-worker") / "worker.log"
    process = start_worker(env, log)
    try:
        yield Worker(settings, registry, process, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "creditgate", "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def open_org(client: CreditgateClient, credits: int, worker: Worker) -> str:
    """A licensed organisation with member `bob`; the first answer waits for the worker."""
    org = f"org-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    start = {
        "command_id": f"c-{uuid.uuid4().hex[:10]}",
        "org_id": org,
        "type": "license.start_period",
        "period_id": "p1",
        "starts_at": iso(now - timedelta(days=1)),
        "ends_at": iso(now + timedelta(days=90)),
        "credits": credits,
    }
    member = {
        "command_id": f"c-{uuid.uuid4().hex[:10]}",
        "org_id": org,
        "type": "member.upsert",
        "user_id": "bob",
        "role": "member",
    }
    # The worker may still be joining its group: the first answer gets time for that.
    try:
        started = await client.command(start, timeout=90)
    except Timeout:
        pytest.fail(f"no answer to a license command: {worker.state()}")
    assert started["type"] == "command.applied"
    assert (await client.command(member))["type"] == "command.applied"
    return org


def export(org: str, *contacts: str) -> dict[str, Any]:
    return {
        "request_id": f"r-{uuid.uuid4().hex[:10]}",
        "org_id": org,
        "user_id": "bob",
        "action": "export",
        "items": [{"type": "contact", "id": contact} for contact in contacts],
        "requested_at": iso(datetime.now(UTC)),
    }


async def test_a_charge_is_decided_end_to_end_over_sasl_ssl_and_tls_redis(
    worker: Worker,
) -> None:
    follow = (t.CHARGE_RESULTS, t.LICENSE_EVENTS)
    async with CreditgateClient(
        worker.settings.kafka_bootstrap, worker.registry, follow, settings=worker.settings
    ) as client:
        org = await open_org(client, credits=5, worker=worker)
        first = await client.request(export(org, "c-1", "c-2"))
        repeat = await client.request(export(org, "c-1"))
    assert (first["type"], first["credits_charged"], first["balance_after"]) == (
        "charge.approved",
        2,
        3,
    )
    assert repeat["credits_charged"] == 0
    assert repeat["items"][0]["outcome"] == "free_repeat"
    store = CreditStore.from_settings(worker.settings)
    try:
        view = await store.credits(org, int(time.time() * 1000))
    finally:
        await store.close()
    assert view is not None
    assert (view["used"], view["remaining"]) == (2, 3)


async def test_clients_on_sasl_plaintext_reach_the_same_worker(
    secure: SecureStack, worker: Worker
) -> None:
    plain = secure.settings(
        "SASL_PLAINTEXT",
        key_prefix=worker.settings.key_prefix,
        topic_prefix=worker.settings.topic_prefix,
        app_id=worker.settings.app_id,
    )
    assert plain.kafka_bootstrap != worker.settings.kafka_bootstrap  # the other listener
    assert "ssl_context" not in aiokafka_options(plain)
    await check_connections(plain, [worker.registry.name(t.EXPORT_REQUESTS)])
    async with CreditgateClient(
        plain.kafka_bootstrap, worker.registry, (t.CHARGE_RESULTS, t.LICENSE_EVENTS), settings=plain
    ) as client:
        org = await open_org(client, credits=1, worker=worker)
        approved = await client.request(export(org, "c-1"))
        rejected = await client.request(export(org, "c-2"))
    assert approved["credits_charged"] == 1
    assert rejected["reason"] == "insufficient_credits"


def test_the_worker_logs_no_secret(secure: SecureStack, worker: Worker) -> None:
    # After the tests above, the worker has connected, decided and answered.
    credentials = secure.stack.credentials()
    text = worker.log.read_text(errors="replace")
    for secret in (credentials.kafka_app, credentials.redis_app):
        assert secret not in text


def test_dev_up_prints_the_settings_and_keeps_passwords_in_the_env_file(
    secure: SecureStack,
) -> None:
    output = secure.up_output
    env_file = secure.stack.env_file
    assert "CREDITGATE_KAFKA_SECURITY_PROTOCOL=SASL_SSL" in output
    assert re.search(r"CREDITGATE_REDIS_URL=rediss://creditgate@127\.0\.0\.1:\d+/0", output)
    credentials = secure.stack.credentials()
    for secret in (credentials.kafka_app, credentials.redis_app):
        assert secret not in output
        assert secret in env_file.read_text()
    assert env_file.stat().st_mode & 0o077 == 0  # owner only
    assert secure.endpoints.security is not None
    assert credentials.kafka_app not in repr(secure.endpoints)


# ---- the restricted Redis user ----------------------------------------------------------


def test_the_store_level_suites_pass_as_the_restricted_redis_user(secure: SecureStack) -> None:
    """The charge rules and license commands, every one, over TLS as `creditgate`."""
    suites = [
        "tests/integration/test_charge_rules.py",
        "tests/integration/test_license_commands.py",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
        cwd=PROJECT,
        env=clean_env() | secure.env(),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


async def test_the_restricted_user_cannot_touch_keys_outside_its_prefix(
    secure: SecureStack, run_id: str
) -> None:
    settings = secure.settings(key_prefix=run_id)
    client = aioredis.Redis.from_url(
        settings.redis_url.get_secret_value(), decode_responses=True, **redis_options(settings)
    )
    try:
        await client.set(f"{run_id}:{{o}}:mine", "1")
        assert await client.get(f"{run_id}:{{o}}:mine") == "1"
        for outside in ("other:{o}:x", "cg:{o}:license", "xcgs:{o}:x"):
            with pytest.raises(NoPermissionError, match="keys"):
                await client.get(outside)
            with pytest.raises(NoPermissionError, match="keys"):
                await client.set(outside, "1")
        # Commands creditgate never sends are refused wherever they point.
        with pytest.raises(NoPermissionError, match="'keys'"):
            await client.keys("*")
        with pytest.raises(NoPermissionError, match="'flushall'"):
            await client.flushall()
        with pytest.raises(NoPermissionError, match="'config"):
            await client.config_get("*")
        with pytest.raises(NoPermissionError, match="'eval'"):
            await client.eval("return redis.call('GET', KEYS[1])", 1, f"{run_id}:{{o}}:mine")
    finally:
        await client.aclose()
    with pytest.raises(ConfigurationError, match="access one of the keys") as refused:
        await check_redis(secure.settings(key_prefix="elsewhere"))
    assert "~elsewhere:*" in str(refused.value)  # it says which rule is missing


async def test_the_default_redis_user_is_off_and_tls_is_required(secure: SecureStack) -> None:
    security = secure.endpoints.security
    assert security is not None
    anonymous_url = secure.endpoints.redis_url.replace(f"{security.redis_username}@", "")
    anonymous = aioredis.Redis.from_url(anonymous_url, ssl_ca_certs=str(security.ca_file))
    plain = aioredis.Redis.from_url(anonymous_url.replace("rediss://", "redis://"))
    admin = secure.redis_admin()
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
        with pytest.raises(RedisConnectionError):
            await plain.ping()
        default = await admin.acl_getuser("default")
        assert default is not None
        flags = default["flags"]
        assert isinstance(flags, list)
        assert "off" in flags
    finally:
        for client in (anonymous, plain, admin):
            await client.aclose()


# ---- failing fast, with the reason ----------------------------------------------------


async def assert_refused_fast(settings: Settings, match: str) -> str:
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=match) as refused:
        await check_connections(settings, ["credits.export.requests"])
    assert time.monotonic() - started < FAIL_FAST_SECONDS
    message = str(refused.value)
    for secret in (settings.kafka_password, settings.redis_password):
        if secret is not None:
            assert secret.get_secret_value() not in message
    return message


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
async def test_a_wrong_kafka_password_fails_fast_and_says_so(
    secure: SecureStack, protocol: str
) -> None:
    message = await assert_refused_fast(
        secure.settings(protocol, kafka_password="not-the-password"),
        "refused user 'creditgate'",
    )
    assert "invalid credentials" in message
    assert "CREDITGATE_KAFKA_PASSWORD" in message


def test_the_worker_exits_at_once_on_a_wrong_kafka_password(secure: SecureStack) -> None:
    env = clean_env() | secure.env() | {"CREDITGATE_KAFKA_PASSWORD": "not-the-password"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "creditgate", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 30  # the process start itself takes a few seconds
    assert "refused user 'creditgate'" in result.stderr
    assert "not-the-password" not in result.stdout + result.stderr


async def test_a_wrong_redis_password_fails_fast_and_says_so(secure: SecureStack) -> None:
    message = await assert_refused_fast(
        secure.settings(redis_password="not-the-password"), "Redis refused user 'creditgate'"
    )
    assert "CREDITGATE_REDIS_PASSWORD" in message


async def test_a_missing_kafka_acl_is_named(secure: SecureStack) -> None:
    outsider = secure.settings(
        kafka_username="outsider", kafka_password=secure.stack.credentials().kafka_outsider
    )
    message = await assert_refused_fast(outsider, "user 'outsider'.* may not use topic")
    assert "credits.export.requests" in message
    with pytest.raises(ConfigurationError, match="consumer group 'creditgate'"):
        await check_kafka(outsider, group="creditgate")


async def test_a_missing_redis_permission_is_named(secure: SecureStack, run_id: str) -> None:
    """A user whose ACL lacks one command creditgate's scripts need: HINCRBY."""
    rules = redis_acl_rules(run_id).replace(" +hincrby", "")
    password = uuid.uuid4().hex
    admin = secure.redis_admin()
    try:
        # redis-py leaves execute_command unannotated
        await admin.execute_command("ACL", "SETUSER", run_id, "on", f">{password}", *rules.split())  # type: ignore[no-untyped-call]
        message = await assert_refused_fast(
            secure.settings(
                key_prefix=run_id,
                redis_url=secure.endpoints.redis_url.replace("creditgate@", f"{run_id}@"),
                redis_password=password,
            ),
            "lacks a permission",
        )
    finally:
        await admin.acl_deluser(run_id)
        await admin.aclose()
    assert "'hincrby'" in message
    assert "+hincrby" in message  # the rules to fix it


@pytest.mark.parametrize("service", ["kafka", "redis"])
async def test_a_server_certificate_from_an_unknown_ca_is_refused(
    secure: SecureStack, service: str
) -> None:
    # The system's CAs do not know the stack's throwaway CA.
    without_ca: dict[str, Any] = {f"{service}_ca_file": None}
    settings = secure.settings(**without_ca)
    message = await assert_refused_fast(settings, "does not trust")
    assert f"CREDITGATE_{service.upper()}_CA_FILE" in message


# ---- settings that cannot work are refused before connecting -----------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs CREDITGATE_KAFKA_USERNAME"),
        ({"kafka_username": "creditgate", "kafka_password": "x"}, "does not log in"),
        ({"kafka_ca_file": "/etc/hostname"}, "does not use TLS"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ca_file": "/nonexistent/ca.pem"},
            "is not a file",
        ),
    ],
)
def test_kafka_settings_that_would_connect_less_securely_are_refused(
    fields: dict[str, Any], match: str
) -> None:
    settings = settings_of({}, **fields)
    with pytest.raises(ConfigurationError, match=match):
        aiokafka_options(settings)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"redis_url": "rediss://u:p@h:6379/0", "redis_password": "q"}, "password is given twice"),
        ({"redis_url": "rediss://u@h:6379/0", "redis_username": "v"}, "user is given twice"),
        ({"redis_url": "redis://h:6379/0", "redis_ca_file": "/etc/hostname"}, "rediss://"),
    ],
)
def test_redis_settings_that_are_ambiguous_or_not_tls_are_refused(
    fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        redis_options(settings_of({}, **fields))


def test_safe_dump_masks_every_secret() -> None:
    settings = settings_of(
        {},
        kafka_security_protocol="SASL_SSL",
        kafka_username="creditgate",
        kafka_password="kafka-secret",
        redis_url="rediss://creditgate:url-secret@h:6379/0",
        redis_password=None,
    )
    dumped = str(settings.safe_dump())
    for secret in ("kafka-secret", "url-secret"):
        assert secret not in dumped
    assert "creditgate" in dumped


def test_the_start_check_probes_every_command_of_the_lua_scripts() -> None:
    """REDIS_COMMANDS and the start-up probe must follow the scripts when they change."""
    lua = resources.files("creditgate.store").joinpath("lua")
    used = {
        command.lower()
        for script in lua.iterdir()
        if script.name.endswith(".lua")
        for command in re.findall(r"redis\.p?call\(\s*['\"](\w+)['\"]", script.read_text())
    }
    assert used, "no redis.call found: has the scripts' folder moved?"
    assert used <= PROBED_SCRIPT_COMMANDS, used - PROBED_SCRIPT_COMMANDS
    assert used <= set(REDIS_COMMANDS), used - set(REDIS_COMMANDS)

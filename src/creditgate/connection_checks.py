"""The start-up check of creditgate's connections: the first of ``preflight``'s checks.

Kafka and Redis clients treat a refused login like an outage and retry it for minutes;
`check_connections` instead ends within seconds with a `ConfigurationError` naming what
is wrong (the password, the CA, the ACL) and the setting to fix, or an
`InfrastructureError` when a server does not answer at all. It logs in as the worker
will (`connections`) and tries what its ACLs must allow, through a probe script that
runs every command the store's scripts use.

No message here ever contains a password or the Redis URL (which may hold one).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from creditgate.connections import SASL_PROTOCOLS, aiokafka_options
from creditgate.errors import ConfigurationError, InfrastructureError
from creditgate.settings import Settings
from creditgate.store.acl import redis_acl_rules
from creditgate.store.client import RedisClient, redis_client
from creditgate.store.keys import Keys

_DEFAULT_KAFKA_PORT = 9092
_CHECK_TIMEOUT_SECONDS = 10.0


# ---- the start-up check ------------------------------------------------------------


async def check_connections(settings: Settings, topics: Iterable[str] = ()) -> None:
    """Log in to Kafka and Redis as the worker will, and try what its ACLs must allow.

    Raises `ConfigurationError` for a refused login, an untrusted certificate or a
    missing permission, `InfrastructureError` when a server does not answer.
    """
    await check_kafka(settings, topics=topics, group=settings.app_id)
    await check_redis(settings)


async def check_kafka(
    settings: Settings,
    *,
    topics: Iterable[str] = (),
    group: str | None = None,
    timeout: float = _CHECK_TIMEOUT_SECONDS,
) -> None:
    """Connect, then ask for `topics` and `group` as the worker will use them.

    Kafka lists only the topics a user may see, so `check_topics` would call the
    others missing; describing them by name gets the authorisation error instead,
    which names the missing ACL.
    """
    options = aiokafka_options(settings)
    who = _kafka_user(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=int(timeout * 1000),
        **options,
    )
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout)
        except (KafkaError, TimeoutError, OSError):
            # aiokafka only says "Unable to bootstrap"; one direct connection says why.
            raise await _kafka_refusal(settings, options, who, timeout) from None
        names = sorted(set(topics))
        if names:
            described = await admin.describe_topics(names)
            denied = [
                entry["topic"]
                for entry in described
                if entry["error_code"] == TopicAuthorizationFailedError.errno
            ]
            if denied:
                raise ConfigurationError(
                    f"Kafka {who} may not use topic{'s' if len(denied) > 1 else ''} "
                    f"{', '.join(denied)}: its ACLs must allow Describe, Read and Write "
                    "on creditgate's topics"
                )
        if group:
            try:
                await admin.find_coordinator(group)
            except GroupAuthorizationFailedError:
                raise ConfigurationError(
                    f"Kafka {who} may not use consumer group {group!r} "
                    "(CREDITGATE_APP_ID): its ACLs must allow Read on that group"
                ) from None
            except KafkaError:
                pass  # a coordinator still loading is not a permission problem
    finally:
        await admin.close()


def _kafka_user(settings: Settings) -> str:
    protocol = settings.kafka_security_protocol
    if protocol in SASL_PROTOCOLS:
        return f"user {settings.kafka_username!r} ({protocol}, {settings.kafka_sasl_mechanism})"
    return f"client ({protocol})"


async def _kafka_refusal(
    settings: Settings, options: dict[str, Any], who: str, timeout: float
) -> Exception:
    """Why no bootstrap server took us, from one direct connection to each."""
    reasons: list[str] = []
    for host, port in _bootstrap_hosts(settings.kafka_bootstrap):
        where = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(
                create_conn(host, port, request_timeout_ms=int(timeout * 1000), **options),
                timeout,
            )
        except (SaslAuthenticationFailed, UnsupportedSaslMechanismError) as exc:
            return ConfigurationError(
                f"Kafka at {where} refused {who}: {_kafka_message(exc)}. "
                "Check CREDITGATE_KAFKA_USERNAME, CREDITGATE_KAFKA_PASSWORD and "
                "CREDITGATE_KAFKA_SASL_MECHANISM"
            )
        except ssl.SSLCertVerificationError as exc:
            return ConfigurationError(
                f"Kafka at {where} sent a certificate this client does not trust "
                f"({exc.verify_message}): check CREDITGATE_KAFKA_CA_FILE"
            )
        except ssl.SSLError as exc:
            return ConfigurationError(
                f"TLS with Kafka at {where} failed ({exc.reason}): does that listener speak "
                f"{settings.kafka_security_protocol}? (CREDITGATE_KAFKA_SECURITY_PROTOCOL)"
            )
        except (KafkaConnectionError, ConnectionResetError, asyncio.IncompleteReadError):
            # The broker hung up during the handshake: the listener speaks another protocol.
            return ConfigurationError(
                f"Kafka at {where} closed the connection during the handshake: does that "
                f"listener speak {settings.kafka_security_protocol}? "
                "(CREDITGATE_KAFKA_SECURITY_PROTOCOL)"
            )
        except (TimeoutError, OSError, KafkaError) as exc:
            reasons.append(f"{where}: {str(exc) or type(exc).__name__}")
        else:
            conn.close()
            reasons.append(f"{where}: connected directly, but not as a cluster member")
    return InfrastructureError(f"no Kafka bootstrap server answered {who}: " + "; ".join(reasons))


def _kafka_message(exc: KafkaError) -> str:
    # aiokafka prefixes its own "[Error 58] SaslAuthenticationFailed: "; keep the broker's words.
    return str(exc).rpartition(": ")[2] or type(exc).__name__


def _bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    hosts = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        if not host:
            host, port = port, ""
        hosts.append((host.strip("[]"), int(port) if port else _DEFAULT_KAFKA_PORT))
    return hosts


# What the check runs as the creditgate user: each command the Lua scripts use, called
# from a script as the worker's scripts call them, on probe keys under the key prefix.
# DEL runs first: if anything is refused, nothing was written before it.
_PROBE_LUA = """
-- KEYS: a hash, a set, a sorted set and a string of the probe organisation
local h, s, z, v = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
redis.call('DEL', h, s, z, v)
redis.call('HSET', h, 'f', '1')
redis.call('HINCRBY', h, 'f', 1)
redis.call('HSETNX', h, 'g', '1')
redis.call('HGET', h, 'f')
redis.call('HMGET', h, 'f')
redis.call('HEXISTS', h, 'f')
redis.call('HDEL', h, 'f')
redis.call('SADD', s, 'm')
redis.call('SISMEMBER', s, 'm')
redis.call('SREM', s, 'm')
redis.call('ZADD', z, 1, 'm')
redis.call('ZREMRANGEBYSCORE', z, 0, 2)
redis.call('ZRANGE', z, 0, -1)
redis.call('ZREM', z, 'm')
redis.call('SET', v, '1')
redis.call('INCR', v)
redis.call('GET', v)
redis.call('MGET', v)
redis.call('PEXPIRE', v, 60000)
redis.call('TIME')
redis.call('DEL', h, s, z, v)
return 1
"""
PROBED_SCRIPT_COMMANDS = frozenset(
    line.split("'")[1].lower() for line in _PROBE_LUA.splitlines() if "redis.call(" in line
)
_PROBE_ORG = "creditgate-start-check"


async def check_redis(settings: Settings, timeout: float = _CHECK_TIMEOUT_SECONDS) -> None:
    """Log in, then run every kind of command creditgate needs on keys under its prefix."""
    who = _redis_user(settings)
    client = redis_client(settings, socket_timeout=timeout, socket_connect_timeout=timeout)
    org = Keys(settings.key_prefix).org(_PROBE_ORG)
    probe_keys = [f"{org.base}:probe:{kind}" for kind in ("hash", "set", "zset", "string")]
    try:
        try:
            await client.ping()
            await _require_cluster_mode(client)
        except AuthenticationError as exc:
            raise ConfigurationError(
                f"Redis refused {who} ({str(exc).rstrip('.')}): check "
                "CREDITGATE_REDIS_USERNAME and CREDITGATE_REDIS_PASSWORD, or the user and "
                "password in CREDITGATE_REDIS_URL"
            ) from None
        except RedisConnectionError as exc:
            raise _redis_connection_problem(exc) from None
        except RedisClusterException as exc:
            if "not enabled" not in str(exc):
                raise InfrastructureError(f"the Redis Cluster did not answer: {exc}") from None
            raise ConfigurationError(
                "CREDITGATE_REDIS_CLUSTER is true, but the Redis at CREDITGATE_REDIS_URL is "
                "not a cluster node: unset CREDITGATE_REDIS_CLUSTER"
            ) from None
        try:
            sha = await client.script_load(_PROBE_LUA)
            await client.evalsha(sha, len(probe_keys), *probe_keys)
            await client.hgetall(probe_keys[0])
            await client.exists(probe_keys[0])
            await client.zrevrangebyscore(probe_keys[2], "+inf", "-inf", start=0, num=1)
            await client.zrevrange(probe_keys[2], 0, 1)
            await client.zrevrank(probe_keys[2], "m")
            await client.zrangebyscore(probe_keys[2], "-inf", "+inf", start=0, num=1)
        except ResponseError as exc:
            refused = _acl_refusal(exc)
            if refused is None:
                raise
            raise ConfigurationError(
                f"Redis {who} lacks a permission creditgate needs: {refused}. "
                f"Its ACL rules should read: {redis_acl_rules(settings.key_prefix)}"
            ) from None
    except RedisError as exc:
        raise InfrastructureError(f"Redis did not answer the start-up check: {exc}") from exc
    finally:
        await client.aclose()


async def _require_cluster_mode(client: RedisClient) -> None:
    """A single-server client on a cluster node would meet MOVED for most organisations:
    say which setting is wrong instead. (The cluster client refuses a plain server by
    itself, with RedisClusterException.)"""
    if isinstance(client, RedisCluster):
        return
    try:
        info = await client.info("cluster")
    except ResponseError:
        return  # an ACL without INFO: the scripts' MOVED will say it, less kindly
    if str(info.get("cluster_enabled", "0")) == "1":
        raise ConfigurationError(
            "the Redis at CREDITGATE_REDIS_URL is a Redis Cluster node: set "
            "CREDITGATE_REDIS_CLUSTER=true"
        )


def _acl_refusal(exc: ResponseError) -> str | None:
    """What the ACL refused, in Redis's words; None when `exc` is not an ACL refusal."""
    text = str(exc)
    if "no permissions" in text:
        # "this user has no permissions to run the 'x' command", also from a script
        # (Redis 7.2+), where the script's hash and line follow
        return text[text.index("this user") :].split(" script:", maxsplit=1)[0].rstrip(".")
    line = re.search(r"@user_script:(\d+)", text)
    if "user executing the script can't" in text and line:
        # Redis 7.0 names only the script's line: the probe's line names the command.
        source = _PROBE_LUA.splitlines()[int(line.group(1)) - 1]
        command = source.split("'")[1].lower()
        reason = text.split("can't", 1)[1].split(" script:", maxsplit=1)[0].strip()
        return f"a script may not run {command!r} (it can't {reason})"
    return None


def _redis_connection_problem(exc: RedisConnectionError) -> Exception:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return ConfigurationError(
            f"Redis sent a certificate this client does not trust ({text}): "
            "check CREDITGATE_REDIS_CA_FILE"
        )
    if "SSL" in text or "Connection reset" in text:
        return ConfigurationError(
            f"Redis closed the connection ({text}): does the server expect TLS "
            "(a rediss:// URL) or plain TCP (redis://)?"
        )
    return InfrastructureError(f"Redis did not answer the start-up check: {text}")


def _redis_user(settings: Settings) -> str:
    url = urlsplit(settings.redis_url.get_secret_value())
    user = settings.redis_username or url.username
    return f"user {user!r}" if user else "the default user"

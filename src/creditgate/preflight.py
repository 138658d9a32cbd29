"""The worker's start-up checks: it refuses to start where it would decide wrongly.

``preflight`` runs them in order; each is a small function against the real broker or
Redis, and a refusal is a ``ConfigurationError`` naming what to change:

1. connections (``connection_checks.check_connections``): logins, certificates, ACLs;
2. topics (``topics.check_topics``): a missing topic or another partition count stops
   the worker (keys by ``org_id`` keep an organisation in order only while the counts
   stay put); other drift from ``topics/`` is returned, to be logged;
3. lifetimes (``check_lifetimes``): idempotency records must outlive every replay Kafka
   allows, or a replay older than its record is decided — and charged — again;
4. eviction (``check_no_eviction``): Redis must never evict a key.

The lifetimes, as DESIGN §4 states them. A request can be read again as long as Kafka
keeps it, and it is decided once, by the idempotency record stored for
``CREDITGATE_IDEMPOTENCY_TTL_DAYS`` after its decision. Kafka deletes a whole segment
once its newest message is older than ``retention.ms``, and a segment takes new
messages for up to ``segment.ms``: a message is kept at most ``retention.ms +
segment.ms`` after it was produced (plus the broker's ``log.retention.check.interval.ms``,
5 minutes by default, which the defaults' margin of days covers). So for every request
topic (the three charge-request topics and the license commands) that sum must not
exceed the lifetime. ``retention.ms=-1``, or a ``cleanup.policy`` without ``delete``,
keeps requests for ever: no finite lifetime covers that, and the worker refuses,
naming the topic and the setting. DESIGN §4 also asks the records to outlive the
consumer group's offsets retention (``offsets.retention.minutes``), how long a group
that stopped can come back and resume at its committed offsets.

When the group's committed offsets are gone (expired, or a new ``CREDITGATE_APP_ID``),
the consumer starts from the earliest message still kept (``auto_offset_reset`` in
``stream/consumer.py``) and re-reads everything retained: safe only because of check
3, which makes every record outlive the messages it answers, so each re-read request
gets its first answer. Starting from the latest instead would skip requests nobody
has decided.

Not checked: a producer that stamps messages far in the future (CreateTime) makes the
broker keep them longer than ``retention.ms`` says; brokers 4.0 and later refuse
timestamps more than an hour ahead (``log.message.timestamp.after.max.ms``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from creditgate.connection_checks import check_connections
from creditgate.connections import aiokafka_options
from creditgate.errors import ConfigurationError, InfrastructureError
from creditgate.settings import DAY_SECONDS, Settings
from creditgate.store.client import RedisClient, redis_client
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.limits import check_output_limits, check_redis_query_buffer
from creditgate.stream.topics import TopicRegistry, check_topics

FOREVER = -1  # retention.ms of a topic that keeps its messages for ever
# Kafka's own defaults, for a broker that reports none (log.retention.hours,
# log.roll.hours, offsets.retention.minutes)
_KAFKA_RETENTION_MS = 7 * DAY_SECONDS * 1000
_KAFKA_SEGMENT_MS = 7 * DAY_SECONDS * 1000
_KAFKA_OFFSETS_RETENTION_MS = 7 * DAY_SECONDS * 1000
_TOPIC_CONFIGS = ("retention.ms", "segment.ms", "cleanup.policy")
_BROKER_CONFIGS = (
    "log.retention.ms",
    "log.retention.minutes",
    "log.retention.hours",
    "log.roll.ms",
    "log.roll.hours",
    "offsets.retention.minutes",
)
_TIMEOUT_MS = 15_000
REQUIRED_EVICTION_POLICY = "noeviction"


async def preflight(settings: Settings, registry: TopicRegistry) -> list[str]:
    """Every start-up check of the worker, in order; raises at the first refusal.

    Returns the topics' config drift that does not stop the worker (to log it).
    """
    await check_connections(settings, [spec.name for spec in registry.specs.values()])
    problems = await check_topics(settings.kafka_bootstrap, registry, settings=settings)
    fatal = fatal_topic_problems(problems)
    if fatal:
        raise ConfigurationError(
            "the worker needs its topics as defined in topics/:\n  " + "\n  ".join(fatal)
        )
    await check_lifetimes(settings, registry)
    await check_no_eviction(settings)
    await check_message_sizes(settings, registry)
    return problems


async def check_message_sizes(settings: Settings, registry: TopicRegistry) -> None:
    """Refuse output topics too small for the largest message the worker may write to
    them (it would stop the stream the day such a request comes), and a batch whose
    Redis payload could exceed Redis's query buffer (``stream.limits``)."""
    _, too_small = await check_output_limits(settings, registry)
    if too_small:
        raise ConfigurationError(
            "the worker's outputs may not fit their topics:\n  " + "\n  ".join(too_small)
        )
    store = CreditStore.from_settings(settings)
    try:
        problem = await check_redis_query_buffer(settings, store)
    finally:
        await store.close()
    if problem:
        raise ConfigurationError(problem)


def fatal_topic_problems(problems: list[str]) -> list[str]:
    """Missing topics and wrong partition counts stop the worker; config drift does not
    (retention and segments that outlive the idempotency records stop it in
    ``check_lifetimes``)."""
    return [p for p in problems if "missing" in p or "partitions" in p]


# ---- lifetimes ---------------------------------------------------------------------


@dataclass(frozen=True)
class TopicLifetime:
    """How long a topic can keep a message: ``retention.ms`` (-1: for ever) plus
    ``segment.ms``; ``kept_forever`` also when compacted without deletion."""

    topic: str
    retention_ms: int
    segment_ms: int
    cleanup_policy: str = "delete"

    @property
    def kept_forever(self) -> bool:
        return self.retention_ms < 0 or "delete" not in self.cleanup_policy.split(",")

    @property
    def longest_ms(self) -> int:
        return self.retention_ms + self.segment_ms


def request_topics(registry: TopicRegistry) -> list[str]:
    """The topics whose messages are decided once: a replay of them must find its record."""
    return [registry.name(n) for n in t.INPUTS]


async def check_lifetimes(settings: Settings, registry: TopicRegistry) -> None:
    """Refuse to start when a replay Kafka allows could outlive its idempotency record."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=_TIMEOUT_MS,
        **aiokafka_options(settings),
    )
    try:
        await admin.start()
        broker = await _broker_configs(admin)
        lifetimes = await topic_lifetimes(admin, request_topics(registry), broker)
    except ClusterAuthorizationFailedError:
        raise ConfigurationError(
            "Kafka refused to describe the brokers' configs: creditgate reads "
            "offsets.retention.minutes and the log retention defaults at start-up, so its "
            "principal needs DescribeConfigs on the cluster resource"
        ) from None
    except UnknownTopicOrPartitionError as exc:
        raise ConfigurationError(f"{exc} (run `creditgate topics apply`)") from None
    except TopicAuthorizationFailedError:
        raise ConfigurationError(
            "Kafka refused to describe the request topics' configs: creditgate reads their "
            "retention.ms and segment.ms at start-up, so its principal needs DescribeConfigs "
            "on its topics"
        ) from None
    except KafkaError as exc:
        raise InfrastructureError(f"Kafka did not answer the lifetime check: {exc!r}") from exc
    finally:
        await admin.close()
    problems = lifetime_problems(settings, lifetimes, _offsets_retention_ms(broker))
    if problems:
        raise ConfigurationError(
            "idempotency records would not outlive every replay Kafka allows, so a replayed "
            "request could be charged again:\n  "
            + "\n  ".join(problems)
            + "\n(a topic's configs change with `kafka-configs.sh --alter --entity-type topics "
            "--entity-name <topic> --add-config retention.ms=<ms>,segment.ms=<ms>`; "
            "`creditgate topics check` lists where the topics differ from topics/)"
        )


def lifetime_problems(
    settings: Settings, lifetimes: Sequence[TopicLifetime], offsets_retention_ms: int
) -> list[str]:
    """One sentence per lifetime the idempotency records do not cover, with its fix."""
    ttl_ms = settings.idempotency_ttl_ms
    ttl = f"CREDITGATE_IDEMPOTENCY_TTL_DAYS={settings.idempotency_ttl_days:g} ({_days(ttl_ms)})"
    problems = []
    for found in lifetimes:
        if found.kept_forever:
            why = (
                "retention.ms=-1"
                if found.retention_ms < 0
                else f"cleanup.policy={found.cleanup_policy}"
            )
            problems.append(
                f"topic {found.topic} keeps its messages for ever ({why}), which no "
                f"idempotency lifetime can cover: give it cleanup.policy=delete and a "
                f"retention.ms of at most {ttl_ms - found.segment_ms} "
                f"({_days(ttl_ms - found.segment_ms)}, {ttl} less segment.ms)"
            )
        elif found.longest_ms > ttl_ms:
            problems.append(
                f"topic {found.topic} keeps a message up to {_days(found.longest_ms)} "
                f"(retention.ms={found.retention_ms} + segment.ms={found.segment_ms}), "
                f"longer than {ttl}: lower its retention.ms and/or segment.ms to a sum of "
                f"at most {ttl_ms}, or raise CREDITGATE_IDEMPOTENCY_TTL_DAYS to at least "
                f"{_days_up(found.longest_ms)}"
            )
    if offsets_retention_ms > ttl_ms:
        problems.append(
            f"the brokers keep a stopped consumer group's offsets for "
            f"{_days(offsets_retention_ms)} (offsets.retention.minutes="
            f"{offsets_retention_ms // 60_000}), longer than {ttl}: lower "
            f"offsets.retention.minutes to at most {ttl_ms // 60_000}, or raise "
            f"CREDITGATE_IDEMPOTENCY_TTL_DAYS to at least {_days_up(offsets_retention_ms)}"
        )
    return problems


async def topic_lifetimes(
    admin: AIOKafkaAdminClient, topics: Sequence[str], broker: Mapping[str, str | None]
) -> list[TopicLifetime]:
    """Each topic's retention and segment time as the broker applies them: its own
    override, else the broker's default (a topic's described value already is one)."""
    found = await t.topic_configs(admin, list(topics), _TOPIC_CONFIGS)
    lifetimes = []
    for name in topics:
        configs = found.get(name, {})
        retention = configs.get("retention.ms")
        segment = configs.get("segment.ms")
        lifetimes.append(
            TopicLifetime(
                name,
                int(retention) if retention is not None else _broker_retention_ms(broker),
                int(segment) if segment is not None else _broker_segment_ms(broker),
                configs.get("cleanup.policy") or "delete",
            )
        )
    return lifetimes


async def _broker_configs(admin: AIOKafkaAdminClient) -> dict[str, str | None]:
    """The brokers' log and offsets retention defaults; where brokers differ, the
    longest (the one a replay could hit)."""
    cluster = await admin.describe_cluster()
    ids = [str(broker["node_id"]) for broker in cluster["brokers"]]
    resources = [
        ConfigResource(ConfigResourceType.BROKER, node, configs=dict.fromkeys(_BROKER_CONFIGS))
        for node in ids
    ]
    responses = await asyncio.gather(*(admin.describe_configs([r]) for r in resources))
    per_broker: list[dict[str, str | None]] = []
    for (response,) in responses:
        for error_code, _, _, name, entries in response.resources:
            if error_code:
                raise for_code(error_code)(f"describing the configs of broker {name}")
            per_broker.append({entry[0]: entry[1] for entry in entries})
    merged: dict[str, str | None] = {}
    for key in _BROKER_CONFIGS:
        values = [c[key] for c in per_broker if c.get(key) is not None]
        merged[key] = max(values, key=_as_length) if values else None
    return merged


def _as_length(value: str | None) -> float:
    # a negative retention is for ever: longer than any other
    return math.inf if int(value or 0) < 0 else int(value or 0)


def _broker_retention_ms(broker: Mapping[str, str | None]) -> int:
    # Kafka reads log.retention.ms, else .minutes, else .hours
    for key, unit_ms in (
        ("log.retention.ms", 1),
        ("log.retention.minutes", 60_000),
        ("log.retention.hours", 3_600_000),
    ):
        value = broker.get(key)
        if value is not None:
            return FOREVER if int(value) < 0 else int(value) * unit_ms
    return _KAFKA_RETENTION_MS


def _broker_segment_ms(broker: Mapping[str, str | None]) -> int:
    for key, unit_ms in (("log.roll.ms", 1), ("log.roll.hours", 3_600_000)):
        value = broker.get(key)
        if value is not None:
            return int(value) * unit_ms
    return _KAFKA_SEGMENT_MS


def _offsets_retention_ms(broker: Mapping[str, str | None]) -> int:
    value = broker.get("offsets.retention.minutes")
    return int(value) * 60_000 if value is not None else _KAFKA_OFFSETS_RETENTION_MS


def _days(ms: int) -> str:
    return f"{ms / (DAY_SECONDS * 1000):g} days"


def _days_up(ms: int) -> str:
    days = -(-ms // (DAY_SECONDS * 1000))
    return f"{days}"


# ---- eviction ----------------------------------------------------------------------


async def check_no_eviction(settings: Settings) -> None:
    """Refuse to start unless Redis's ``maxmemory-policy`` is ``noeviction``.

    An evicted key is state the ledger says exists: a balance, a repeat window, an
    idempotency record (a replay then charged again), the sequence. With
    ``noeviction`` a full Redis refuses writes instead, which the worker retries.
    """
    client = redis_client(settings)
    try:
        policy = await eviction_policy(client)
    except RedisError as exc:
        if isinstance(exc, ResponseError) and "no permissions" in str(exc):
            raise ConfigurationError(
                "Redis refused both CONFIG GET and INFO to creditgate's user: the worker reads "
                "maxmemory-policy at start-up, so its ACL rules need +info (see "
                "store.acl.redis_acl_rules)"
            ) from None
        raise InfrastructureError(f"Redis did not answer the eviction check: {exc}") from exc
    finally:
        await client.aclose()
    if policy != REQUIRED_EVICTION_POLICY:
        raise ConfigurationError(
            f"Redis may evict keys (maxmemory-policy {policy}): an evicted balance, repeat "
            "window or idempotency record would be decided anew, and a replay charged again. "
            "Set `CONFIG SET maxmemory-policy noeviction`, and `maxmemory-policy noeviction` "
            "in redis.conf so that a restart keeps it"
        )


async def eviction_policy(client: RedisClient) -> str:
    """``maxmemory-policy`` by ``CONFIG GET``, else by ``INFO memory``: an ACL user (or
    a managed Redis) may not be allowed CONFIG. On a cluster, the first primary whose
    policy is not ``noeviction``, if any: each primary evicts on its own."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # the nodes are known once it is
        for node in client.get_primaries():
            found = await client.config_get("maxmemory-policy", target_nodes=node)
            policy = str(found.get("maxmemory-policy", ""))
            if policy != REQUIRED_EVICTION_POLICY:
                return policy
        return REQUIRED_EVICTION_POLICY
    try:
        reply = await client.config_get("maxmemory-policy")
        if reply.get("maxmemory-policy"):
            return str(reply["maxmemory-policy"])
    except ResponseError as exc:
        text = str(exc)
        if "no permissions" not in text and "unknown command" not in text.lower():
            raise
    info: dict[str, Any] = await client.info("memory")
    return str(info["maxmemory_policy"])

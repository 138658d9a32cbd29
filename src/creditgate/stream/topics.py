"""The topic registry: ``topics/*.json`` are the source of truth for every topic.

``apply`` creates what is missing, ``check`` reports drift, and the worker refuses to
start on a missing topic or a wrong partition count (keys by ``org_id`` only keep an
organisation in order while partition counts stay put).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)

from creditgate.connection_checks import check_kafka
from creditgate.connections import aiokafka_options
from creditgate.domain.charges import Action
from creditgate.domain.outgoing import OutputTopics
from creditgate.errors import ConfigurationError, InfrastructureError
from creditgate.settings import Settings

EXPORT_REQUESTS = "credits.export.requests"
PUSH_REQUESTS = "credits.push.requests"
VERIFICATION_REQUESTS = "credits.verification.requests"
LICENSE_COMMANDS = "credits.license.commands"
HOLD_SETTLEMENTS = "credits.hold.settlements"
CHARGE_RESULTS = "credits.charge.results"
LICENSE_EVENTS = "credits.license.events"
NOTIFICATIONS = "credits.notifications"
LEDGER = "credits.ledger"
DEADLETTER = "credits.deadletter"

OUTPUTS = (CHARGE_RESULTS, LEDGER, LICENSE_EVENTS, NOTIFICATIONS, DEADLETTER)

REQUEST_ACTIONS = {
    EXPORT_REQUESTS: Action.EXPORT,
    PUSH_REQUESTS: Action.CRM_PUSH,
    VERIFICATION_REQUESTS: Action.EMAIL_VERIFICATION,
}
# what the worker consumes: each message is decided once, by its idempotency record
INPUTS = (*REQUEST_ACTIONS, LICENSE_COMMANDS, HOLD_SETTLEMENTS)


def default_topics_dir() -> Path:
    """``topics/`` of the checkout this package runs from, else of the working directory."""
    here = Path(__file__).resolve().parents[3] / "topics"
    return here if here.is_dir() else Path.cwd() / "topics"


@dataclass(frozen=True)
class TopicSpec:
    """A topic as its definition states it. ``replication_factor`` and
    ``min_insync_replicas`` are what a cluster of that many brokers or more gets; on
    fewer brokers (a laptop's one) ``on_brokers`` scales both down."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)
    min_insync_replicas: int = 1

    def on_brokers(self, brokers: int) -> TopicSpec:
        """The topic as a cluster of ``brokers`` brokers can hold it: the factor is at
        most the broker count, and ``min.insync.replicas`` keeps the definition's margin
        (factor 3, 2 in sync: one broker may be down and writes still go on), at least 1.
        """
        factor = max(1, min(self.replication_factor, brokers))
        margin = self.replication_factor - self.min_insync_replicas
        in_sync = max(1, min(self.min_insync_replicas, factor - margin))
        configs = {**self.configs, "min.insync.replicas": str(in_sync)}
        return TopicSpec(self.name, self.partitions, factor, configs, self.min_insync_replicas)

    @property
    def max_message_bytes(self) -> int | None:
        """The largest record batch the topic takes, as its definition states it."""
        found = self.configs.get("max.message.bytes")
        return int(found) if found is not None else None


@dataclass(frozen=True)
class TopicRegistry:
    """The topic definitions, with the deployment's prefix applied to every name."""

    specs: dict[str, TopicSpec]
    prefix: str = ""

    @classmethod
    def load(cls, directory: Path | None = None, prefix: str = "") -> TopicRegistry:
        directory = directory or default_topics_dir()
        specs = {}
        for path in sorted(directory.glob("*.json")):
            data = json.loads(path.read_text())
            specs[data["name"]] = TopicSpec(
                name=prefix + data["name"],
                partitions=int(data["partitions"]),
                replication_factor=int(data["replication_factor"]),
                configs={k: str(v) for k, v in data.get("configs", {}).items()},
                min_insync_replicas=int(data.get("min_insync_replicas", 1)),
            )
        if not specs:
            raise ConfigurationError(f"no topic definitions found in {directory}")
        return cls(specs, prefix)

    def name(self, logical: str) -> str:
        return self.specs[logical].name

    def with_partitions(self, partitions: int) -> TopicRegistry:
        """The same topics with another partition count (tests and benchmarks)."""
        return TopicRegistry(
            {
                k: TopicSpec(
                    s.name, partitions, s.replication_factor, s.configs, s.min_insync_replicas
                )
                for k, s in self.specs.items()
            },
            self.prefix,
        )


async def admin_client(bootstrap: str, settings: Settings | None) -> AIOKafkaAdminClient:
    """A started admin client; login and TLS from `settings`, else from the environment.

    A refused login or an untrusted certificate raises ConfigurationError at once,
    with the reason (aiokafka itself only says it could not bootstrap).
    """
    settings = settings or Settings()
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=15000, **aiokafka_options(settings)
    )
    try:
        await admin.start()
    except KafkaError:
        await admin.close()
        await check_kafka(settings.model_copy(update={"kafka_bootstrap": bootstrap}))
        raise
    return admin


async def apply_topics(
    bootstrap: str, registry: TopicRegistry, *, settings: Settings | None = None
) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.

    Returns once the broker's metadata shows every created partition with a leader: a
    topic is created in the controller's log a moment before brokers serve it, and a
    worker started right after this (which checks its topics, then joins its group)
    must find all of them.
    """
    admin = await admin_client(bootstrap, settings)
    try:
        existing = set(await admin.list_topics())
        brokers = await broker_count(admin)
        missing = [s.on_brokers(brokers) for s in registry.specs.values() if s.name not in existing]
        created = []
        for spec in missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            spec.partitions,
                            spec.replication_factor,
                            topic_configs=spec.configs,
                        )
                    ]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another process created it meanwhile: that is what we wanted
        if created:
            await _until_served(admin, created)
        return created
    finally:
        await admin.close()


async def broker_count(admin: AIOKafkaAdminClient) -> int:
    """How many brokers the cluster has now (a broker that is down is not counted)."""
    return len((await admin.describe_cluster())["brokers"])


# how long a created topic may take to be served before `apply_topics` gives up
_SERVED_WITHIN_SECONDS = 30.0


def _served(described: dict[str, Any]) -> bool:
    """A topic the broker knows, with a leader for every partition."""
    partitions = described["partitions"]
    return (
        described["error_code"] == 0
        and bool(partitions)
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in partitions)
    )


async def _until_served(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    deadline = time.monotonic() + _SERVED_WITHIN_SECONDS
    while True:
        served = {d["topic"] for d in await admin.describe_topics(names) if _served(d)}
        pending = sorted(set(names) - served)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise InfrastructureError(
                f"topics created but not served after {_SERVED_WITHIN_SECONDS:.0f}s: "
                + ", ".join(pending)
            )
        await asyncio.sleep(0.1)  # polling, bounded by the deadline


# A topic is created in the controller's log a moment before every broker has read it
# there, and a broker still behind answers "unknown topic" for it. On the three-broker
# cluster stack a describe sent to another broker a second after `apply_topics` returned
# (which waits until one broker serves the topic) was answered so: that answer is asked
# again for this long before it stands.
_UNKNOWN_TOPIC_GRACE_SECONDS = 10.0


async def topic_configs(
    admin: AIOKafkaAdminClient, names: list[str], keys: tuple[str, ...] = ()
) -> dict[str, dict[str, str | None]]:
    """Each topic's configs as the broker applies them (only ``keys``, when given); a
    topic the broker refuses to describe raises that refusal."""
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, configs=dict.fromkeys(keys) or None)
        for name in names
    ]
    deadline = time.monotonic() + _UNKNOWN_TOPIC_GRACE_SECONDS
    while True:
        found: dict[str, dict[str, str | None]] = {}
        unknown = False
        for response in await admin.describe_configs(resources):
            for error_code, _, _, name, entries in response.resources:
                if error_code == UnknownTopicOrPartitionError.errno and time.monotonic() < deadline:
                    unknown = True
                elif error_code:
                    raise for_code(error_code)(f"describing the configs of topic {name}")
                else:
                    found[name] = {entry[0]: entry[1] for entry in entries}
        if not unknown:
            return found
        await asyncio.sleep(0.2)  # polling, bounded by the deadline


async def check_topics(
    bootstrap: str, registry: TopicRegistry, *, settings: Settings | None = None
) -> list[str]:
    """Drift between the definitions and the broker, one sentence per problem."""
    admin = await admin_client(bootstrap, settings)
    try:
        existing = set(await admin.list_topics())
        problems = [
            f"topic {s.name} is missing (run `creditgate topics apply`)"
            for s in registry.specs.values()
            if s.name not in existing
        ]
        brokers = await broker_count(admin)
        present = [s.on_brokers(brokers) for s in registry.specs.values() if s.name in existing]
        if not present:
            return problems
        described = await admin.describe_topics([s.name for s in present])
        partitions = {d["topic"]: len(d["partitions"]) for d in described}
        factors = {
            d["topic"]: min((len(p["replicas"]) for p in d["partitions"]), default=0)
            for d in described
        }
        configs = await topic_configs(admin, [s.name for s in present])
        for spec in present:
            if partitions.get(spec.name) != spec.partitions:
                problems.append(
                    f"topic {spec.name} has {partitions.get(spec.name)} partitions, "
                    f"its definition says {spec.partitions}"
                )
            if factors.get(spec.name) != spec.replication_factor:
                problems.append(
                    f"topic {spec.name} has replication factor {factors.get(spec.name)}, its "
                    f"definition says {spec.replication_factor} on {brokers} brokers"
                )
            for key, want in spec.configs.items():
                have = configs.get(spec.name, {}).get(key)
                if have != want:
                    problems.append(
                        f"topic {spec.name}: {key} is {have}, its definition says {want}"
                    )
        return problems
    finally:
        await admin.close()


def output_topics(registry: TopicRegistry) -> OutputTopics:
    """The names decisions are published on, under the registry's prefix."""
    return OutputTopics(
        results=registry.name(CHARGE_RESULTS),
        events=registry.name(LICENSE_EVENTS),
        notifications=registry.name(NOTIFICATIONS),
        ledger=registry.name(LEDGER),
        deadletter=registry.name(DEADLETTER),
    )

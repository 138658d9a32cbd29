"""Whether the broker and Redis take creditgate's largest messages and batches.

At start-up the worker reads each output topic's ``max.message.bytes`` from the broker
(``broker_limits``) and refuses to start when one is smaller than the worst case built
by ``stream.worst_case`` (``too_small``); ``creditgate topics check`` prints the table
(``limits_report``). ``check_redis_query_buffer`` does the same for a batch's Redis
payload. The clients' fetch and request sizes follow the limits (``fetch_sizes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from creditgate.domain.charges import (
    ChargeRequest,
)
from creditgate.domain.intake import MAX_MESSAGE_BYTES
from creditgate.settings import Settings
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.topics import TopicRegistry
from creditgate.stream.worst_case import LATEST_MS, worst_case_output_bytes, worst_case_request

# a broker's own default (message.max.bytes) when a topic has no override
BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# what a consumer may need beyond a record batch's own bytes in one fetch of a partition
_FETCH_MARGIN_BYTES = 64 * 1024
# aiokafka's max_request_size for a producer of requests: the largest a request topic
# takes (intake reads up to MAX_MESSAGE_BYTES), with the record's own bytes
REQUEST_PRODUCER_MAX_BYTES = MAX_MESSAGE_BYTES + _FETCH_MARGIN_BYTES


def fetch_sizes(max_message_bytes: int, fetch_bytes: int | None = None) -> dict[str, int]:
    """aiokafka consumer options to fetch records of up to ``max_message_bytes``."""
    partition = max_message_bytes + _FETCH_MARGIN_BYTES
    return {
        "max_partition_fetch_bytes": partition,
        "fetch_max_bytes": max(partition, fetch_bytes or 0),
    }


async def broker_limits(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` as the broker applies it: its own setting, else
    the broker's ``message.max.bytes``."""
    found: dict[str, int] = {}
    for name, configs in (await t.topic_configs(admin, topics, ("max.message.bytes",))).items():
        limit = configs.get("max.message.bytes")
        if limit is not None:
            found[name] = int(limit)
    missing = [name for name in topics if name not in found]
    if missing:
        default = await _broker_default(admin)
        found.update(dict.fromkeys(missing, default))
    return found


async def _broker_default(admin: AIOKafkaAdminClient) -> int:
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "0")])
        for response in responses:
            for resource in response.resources:
                for entry in resource[4]:
                    if entry[0] == "message.max.bytes" and entry[1] is not None:
                        return int(entry[1])
    except Exception:
        pass
    return BROKER_DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class OutputLimit:
    topic: str  # the topic's name on the broker
    limit: int  # its max.message.bytes
    needed: int  # the worst case under the settings

    @property
    def fits(self) -> bool:
        return self.needed <= self.limit


def compare(
    settings: Settings, registry: TopicRegistry, limits: dict[str, int]
) -> list[OutputLimit]:
    """The worst case of each output topic against its limit (by broker name)."""
    worst = worst_case_output_bytes(settings, registry)
    return [
        OutputLimit(registry.name(logical), limits[registry.name(logical)], needed)
        for logical, needed in sorted(worst.items())
        if registry.name(logical) in limits
    ]


def too_small(found: list[OutputLimit]) -> list[str]:
    """One sentence per output topic whose limit is below its worst case."""
    return [
        f"topic {o.topic} takes messages of up to {o.limit} bytes (max.message.bytes), "
        f"but creditgate may write {o.needed} bytes to it under the current settings "
        "(max_items, result_items_max); raise the topic's max.message.bytes "
        "(topics/*.json) or lower the settings"
        for o in found
        if not o.fits
    ]


def limits_report(found: list[OutputLimit]) -> list[str]:
    """``worst case / limit`` per output topic, one line each."""
    width = max((len(o.topic) for o in found), default=0)
    return [
        f"{o.topic:<{width}}  worst case {o.needed:>9} bytes  limit {o.limit:>9} bytes  "
        + ("ok" if o.fits else "TOO SMALL")
        for o in found
    ]


async def read_limits(settings: Settings, registry: TopicRegistry) -> dict[str, int]:
    """Every topic's ``max.message.bytes`` as the broker applies it, by broker name."""
    admin = await t.admin_client(settings.kafka_bootstrap, settings)
    try:
        return await broker_limits(admin, [s.name for s in registry.specs.values()])
    finally:
        await admin.close()


async def check_output_limits(
    settings: Settings, registry: TopicRegistry
) -> tuple[list[OutputLimit], list[str]]:
    """The worst case of each output topic against the broker's limit, and a sentence
    for each topic too small (the worker refuses to start on any)."""
    found = compare(settings, registry, await read_limits(settings, registry))
    return found, too_small(found)


# ---- Redis's query buffer ------------------------------------------------------------

REDIS_DEFAULT_QUERY_BUFFER_LIMIT = 1024 * 1024 * 1024  # client-query-buffer-limit


def redis_payload_bound(settings: Settings, store: CreditStore) -> int:
    """The largest Redis payload of one batch: ``batch_max_bytes`` of input plus one
    request over it (a batch takes its first record whatever its size), times what
    packing the largest request costs per byte of its input (its keys and summary)."""
    body = worst_case_request(settings)
    raw = len(orjson.dumps(body))
    (packed,) = store.pack_charges([ChargeCall.of(ChargeRequest.model_validate(body))])
    per_byte = len(packed.command(LATEST_MS)) / raw
    return int(per_byte * (settings.batch_max_bytes + raw)) + 1


async def check_redis_query_buffer(settings: Settings, store: CreditStore) -> str | None:
    """A sentence when one batch's payload could exceed Redis's client-query-buffer-limit
    (Redis would close the connection, and the batch would be retried for ever)."""
    try:
        found = await store.config_value("client-query-buffer-limit")
        limit = int(found) if found is not None else REDIS_DEFAULT_QUERY_BUFFER_LIMIT
    except Exception:  # an ACL may forbid CONFIG: Redis's default, which the settings cap keeps
        limit = REDIS_DEFAULT_QUERY_BUFFER_LIMIT
    needed = redis_payload_bound(settings, store)
    if needed <= limit:
        return None
    return (
        f"one batch may send Redis {needed} bytes (batch_max_bytes "
        f"{settings.batch_max_bytes}), more than its client-query-buffer-limit of {limit}: "
        "lower CREDITGATE_BATCH_MAX_BYTES or raise the limit"
    )

"""How large creditgate's messages can be, and whether the broker takes them.

``worst_case_output_bytes`` computes, for every output topic, the largest record batch
of one message creditgate can write from valid input under the current settings. It
does not add up field sizes by hand: it *builds* the worst case (``max_items`` contacts
with companies, every id 128 characters, a reference of ``MAX_REFERENCE_BYTES``, the
longest rejection detail, the largest dead letter) and renders it through the very
functions the worker publishes with (``charge_result``, ``ledger_messages``,
``dead_letter``, ...), so it cannot drift from the code.

At start-up the worker reads each output topic's ``max.message.bytes`` from the broker
(``broker_limits``) and refuses to start when one is smaller than its worst case
(``too_small``); ``creditgate topics check`` prints the table (``limits_report``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from creditgate.domain.charges import (
    MAX_CREDITS,
    MAX_REFERENCE_BYTES,
    Action,
    ChargeRequest,
    Outcome,
    Reason,
)
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    charge_ledger_entry,
    charge_notifications,
    charge_result,
    conflict_result,
)
from creditgate.domain.ids import rfc3339
from creditgate.domain.intake import MAX_DETAIL_CHARS, MAX_ECHOED_TYPE_CHARS, MAX_MESSAGE_BYTES
from creditgate.domain.license_events import (
    CommandRecord,
    CommandView,
    command_ledger_entry,
    command_notifications,
    license_event,
)
from creditgate.domain.outgoing import Outgoing, dead_letter, ledger_messages, outgoing
from creditgate.settings import Settings
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.decider import Incoming
from creditgate.stream.publish import record_bytes
from creditgate.stream.topics import TopicRegistry

MAX_ID = 128  # Identifier: 1-128 characters
# the latest time an RFC 3339 rendering of ms since the epoch spends the most bytes on
_LATE_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
# the most credits validation lets through (domain/charges.py): balances, credits and
# sequences are written with as many digits at most
_BIG = MAX_CREDITS
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


def _id(tag: str, n: int = 0) -> str:
    """A 128-character identifier, distinct per ``(tag, n)``."""
    head = f"{tag}{n}:"
    return head + "x" * (MAX_ID - len(head))


def _reference() -> dict[str, Any]:
    """The largest reference a request may carry (its JSON is MAX_REFERENCE_BYTES)."""
    empty = len(orjson.dumps({"r": ""}))
    return {"r": "x" * (MAX_REFERENCE_BYTES - empty)}


def worst_case_request(settings: Settings) -> dict[str, Any]:
    """The largest valid request: ``max_items`` contacts with companies, 128-char ids."""
    return {
        "request_id": _id("request"),
        "org_id": _id("org"),
        "user_id": _id("user"),
        "action": Action.EXPORT.value,
        "items": [
            {"type": "contact", "id": _id("contact", i), "company_id": _id("company", i)}
            for i in range(settings.max_items)
        ],
        "max_credits": _BIG,
        "on_insufficient": "partial",
        "requested_at": "2026-01-01T00:00:00.000000+00:00",
        "reference": _reference(),
    }


def worst_case_request_bytes(settings: Settings) -> int:
    return len(orjson.dumps(worst_case_request(settings)))


def _view(settings: Settings) -> RequestView:
    body = worst_case_request(settings)
    return RequestView(
        body["org_id"],
        body["request_id"],
        body["user_id"],
        Action.EXPORT,
        body["items"],
        reference=body["reference"],
        max_credits=_BIG,
    )


def _record(
    view: RequestView, settings: Settings, outcomes: list[Outcome], **raw: Any
) -> ChargeRecord:
    """A stored decision as large as the script can write for ``outcomes``: every item
    with a time, two windows opened per item (contact and company)."""
    n = len(view.items)
    data: dict[str, Any] = {
        "request_id": view.request_id,
        "fp": "f" * 32,
        "at": _LATE_MS,
        "status": "approved",
        "credits": _BIG,
        "needed": _BIG,
        "balance": _BIG,
        "period": _id("period"),
        "outcomes": [o.value for o in outcomes],
        "until": [_LATE_MS] * n,
        "opened": [[2 * n + 3, _LATE_MS]] * (2 * n),
        "notes": [
            {"type": "credits.threshold_reached", "to": "admin", "threshold": 100}
            for _ in settings.threshold_percents
        ]
        + [{"type": "credits.insufficient", "to": "user"}],
        "saved": _BIG,
        "seq": _BIG,
        **raw,
    }
    return ChargeRecord.from_script(data)


def _window_names(n: int) -> list[str]:
    # window names are "<kind>:<entity id>"; "company:" and "contact:" are the longest
    return [f"company:{_id('company', i)}" for i in range(2 * n + 4)]


def _results(settings: Settings, names: dict[str, str]) -> list[Outgoing]:
    view = _view(settings)
    n, bound = len(view.items), settings.result_items_max
    # free repeats render the most per item (an outcome and a free_until): as many as a
    # result lists, the rest charged (so exactly those are listed when truncated)
    listed = min(n, bound)
    outcomes = [Outcome.FREE_REPEAT] * listed + [Outcome.CHARGED] * (n - listed)
    approved = _record(view, settings, outcomes)
    rejected = _record(
        view,
        settings,
        [Outcome.NOT_CHARGED] * n,
        status="rejected",
        reason=Reason.INVALID_REQUEST.value,
        detail="\x00" * MAX_DETAIL_CHARS,  # escaped as \u0000: six bytes a character
    )
    bodies = [
        charge_result(view, approved, settings.repeat_window_days, bound),
        charge_result(view, rejected, settings.repeat_window_days, bound),
        conflict_result(view, approved, _LATE_MS, bound),
    ]
    return [
        outgoing(
            names[t.CHARGE_RESULTS],
            view.org_id,
            body,
            ce_type=body["type"],
            ce_id=f"{view.org_id}/{view.request_id}/conflict/{_LATE_MS}",
            ce_time=body["decided_at"],
        )
        for body in bodies
    ]


def _ledger(settings: Settings, names: dict[str, str]) -> list[Outgoing]:
    view = _view(settings)
    n = len(view.items)
    longest = max(Outcome, key=lambda o: len(o.value))
    record = _record(view, settings, [longest] * n)
    entry = charge_ledger_entry(view, record, _window_names(n))
    rejected = _record(
        view,
        settings,
        [longest] * n,
        status="rejected",
        reason=Reason.INSUFFICIENT_CREDITS.value,
        detail="\x00" * MAX_DETAIL_CHARS,
    )
    rejected_entry = charge_ledger_entry(view, rejected, _window_names(n))
    out = ledger_messages(names[t.LEDGER], entry) + ledger_messages(names[t.LEDGER], rejected_entry)
    for view_, command in _commands():
        if command.applied:  # only applied commands have entries
            out += ledger_messages(names[t.LEDGER], command_ledger_entry(view_, command))
    return out


def _commands() -> list[tuple[CommandView, CommandRecord]]:
    """The largest command outcomes: a grant with the longest reason, a period start,
    and a rejection with the longest detail and echoed type."""
    org, state = (
        _id("org"),
        {
            "period_id": _id("period"),
            "starts_ms": _LATE_MS,
            "ends_ms": _LATE_MS,
            "credits": _BIG,
            "granted": _BIG,
            "balance": _BIG,
        },
    )
    grant: dict[str, Any] = {
        "command_id": _id("command"),
        "org_id": org,
        "type": "credits.grant",
        "grant_id": _id("grant"),
        "credits": _BIG,
        "reason": "\x00" * 500,
        "granted_by": _id("user"),
    }
    start: dict[str, Any] = {
        "command_id": _id("command"),
        "org_id": org,
        "type": "license.start_period",
        "period_id": _id("period"),
        "starts_at": rfc3339(_LATE_MS),
        "ends_at": rfc3339(_LATE_MS),
        "credits": _BIG,
    }

    def record(**changes: Any) -> CommandRecord:
        data = {
            "command_id": _id("command"),
            "fp": "f" * 32,
            "at": _LATE_MS,
            "status": "applied",
            "seq": _BIG,
            "state": state,
            "delta": _BIG,
            "balance": _BIG,
            "expired": _BIG,
            **changes,
        }
        return CommandRecord.from_script(data)

    rejected = record(
        status="rejected", reason="invalid_command", detail="\x00" * MAX_DETAIL_CHARS, seq=None
    )
    return [
        (CommandView(org, grant["command_id"], "credits.grant", grant), record()),
        (CommandView(org, start["command_id"], "license.start_period", start), record()),
        (CommandView(org, _id("command"), "\x00" * MAX_ECHOED_TYPE_CHARS, {}), rejected),
    ]


def _events(names: dict[str, str]) -> list[Outgoing]:
    out = []
    for view, record in _commands():
        event = license_event(view, record)
        out.append(
            outgoing(
                names[t.LICENSE_EVENTS],
                view.org_id,
                event,
                ce_type=event["type"],
                ce_id=f"{view.org_id}/{view.command_id}/conflict/{_LATE_MS}",
                ce_time=event["decided_at"],
            )
        )
    return out


def _notifications(settings: Settings, names: dict[str, str]) -> list[Outgoing]:
    view = _view(settings)
    record = _record(view, settings, [Outcome.CHARGED])
    notes = charge_notifications(view, record)
    for view_, command in _commands()[:2]:
        notes += command_notifications(view_, command)
    return [
        outgoing(
            names[t.NOTIFICATIONS],
            note["org_id"],
            note,
            ce_type=note["type"],
            ce_id=note["notification_id"],
            ce_time=note["created_at"],
        )
        for note in notes
    ]


def _dead_letters(registry: TopicRegistry, names: dict[str, str]) -> list[Outgoing]:
    # the largest input a request topic takes, every byte escaped six-fold as text
    size = max(
        [MAX_MESSAGE_BYTES]
        + [registry.specs[n].max_message_bytes or 0 for n in t.REQUEST_ACTIONS]
        + [registry.specs[t.LICENSE_COMMANDS].max_message_bytes or 0]
    )
    topic = max((registry.name(n) for n in t.REQUEST_ACTIONS), key=len)
    text = Incoming(topic, 2**31 - 1, 2**63 - 1, b"\x00" * size, b"\x00" * size)
    binary = Incoming(topic, 2**31 - 1, 2**63 - 1, b"\xff" * size, b"\xff" * size)
    error = "x" * (MAX_DETAIL_CHARS + 1)
    return [
        dead_letter(names[t.DEADLETTER], message, error, rfc3339(_LATE_MS))
        for message in (text, binary)
    ]


def worst_case_output_bytes(settings: Settings, registry: TopicRegistry) -> dict[str, int]:
    """Per output topic (by its logical name): the largest message, as a record batch of
    its own, that creditgate can write there from valid input under ``settings``."""
    names = {logical: registry.name(logical) for logical in registry.specs}
    built = {
        t.CHARGE_RESULTS: _results(settings, names),
        t.LEDGER: _ledger(settings, names),
        t.LICENSE_EVENTS: _events(names),
        t.NOTIFICATIONS: _notifications(settings, names),
        t.DEADLETTER: _dead_letters(registry, names),
    }
    return {logical: max(record_bytes(m) for m in found) for logical, found in built.items()}


# ---- the broker's limits -------------------------------------------------------------


async def broker_limits(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` as the broker applies it: its own setting, else
    the broker's ``message.max.bytes``."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics]
    found: dict[str, int] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            for entry in resource[4]:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    found[resource[3]] = int(entry[1])
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


def output_topics(registry: TopicRegistry) -> list[str]:
    return [
        registry.name(n)
        for n in (t.CHARGE_RESULTS, t.LEDGER, t.LICENSE_EVENTS, t.NOTIFICATIONS, t.DEADLETTER)
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
    per_byte = len(packed.command(_LATE_MS)) / raw
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

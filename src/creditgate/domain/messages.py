"""The contracts of everything creditgate publishes.

``decisions.py`` and ``license_events.py`` render the output messages as plain dicts
(rendering stays cheap on the hot path); these models say what those dicts may hold,
key for key, and are the source of the JSON Schemas in ``topics/schemas/``. A key the
renderers always write is required here even when its value is null; a key they leave
out when it does not apply is optional and, in the schema, not nullable.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.json_schema import SkipJsonSchema

from creditgate.domain.charges import Action, Outcome, Reason
from creditgate.domain.commands import (
    CommandReason,
    Grant,
    LicenseCommand,
    MemberRemove,
    MemberUpsert,
    SetCreditsAllowed,
    StartPeriod,
)
from creditgate.domain.ids import Identifier, Timestamp

# Timestamp checks the RFC 3339 text itself before pydantic parses it, and strict mode
# would then refuse that text: time fields are the one place strictness is relaxed.
Time = Annotated[Timestamp, Field(strict=False)]
Count = Annotated[int, Field(ge=0)]
EpochMs = Annotated[int, Field(ge=0, description="milliseconds since the epoch")]
LedgerSequence = Annotated[
    int, Field(ge=1, description="the organisation's ledger sequence: per org, gap-free")
]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
# Window names are ``windows.window_name(kind, entity_id)``, of the kinds listed in
# ``domain.windows``.
WindowName = Annotated[
    str, StringConstraints(pattern=r"^(contact|company|verify):[A-Za-z0-9._:@-]{1,128}$")
]
CommandType = Literal[
    "license.start_period",
    "credits.grant",
    "member.upsert",
    "member.remove",
    "member.set_credits_allowed",
]


class _Message(BaseModel):
    # strict: a consumer reads JSON, where "1" is not 1 and 1 is not true
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ---- charge results (credits.charge.results) ------------------------------------------


class Contact(_Message):
    """A contact as its request named it, with its company when the request named one."""

    type: Literal["contact"]
    id: Identifier
    company_id: Identifier | SkipJsonSchema[None] = None


class Company(_Message):
    """A company as its request named it."""

    type: Literal["company"]
    id: Identifier


RequestedItem = Annotated[Contact | Company, Field(discriminator="type")]


class _Decided(
    _Message,
    # free_until says until when a free repeat stays free; other outcomes have none
    json_schema_extra={
        "if": {"properties": {"outcome": {"const": Outcome.FREE_REPEAT.value}}},
        "then": {"required": ["free_until"]},
        "else": {"not": {"required": ["free_until"]}},
    },
):
    outcome: Outcome
    free_until: Time | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _free_until_only_for_free_repeats(self) -> _Decided:
        if (self.outcome is Outcome.FREE_REPEAT) != (self.free_until is not None):
            raise ValueError("free_until comes with outcome free_repeat, and only with it")
        return self


class DecidedContact(Contact, _Decided):
    """A contact of an approved request and what happened to it."""


class DecidedCompany(Company, _Decided):
    """A company of an approved request and what happened to it."""


class NotChargedContact(Contact):
    """A contact of a rejected request: nothing is charged."""

    outcome: Literal["not_charged"]


class NotChargedCompany(Company):
    """A company of a rejected request: nothing is charged."""

    outcome: Literal["not_charged"]


DecidedItem = Annotated[DecidedContact | DecidedCompany, Field(discriminator="type")]
NotChargedItem = Annotated[NotChargedContact | NotChargedCompany, Field(discriminator="type")]


class ItemCounts(_Message):
    """Items per outcome; an outcome no item had is left out."""

    charged: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    free_repeat: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    duplicate_in_request: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    no_verified_email: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    not_charged: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None


_ITEMS_TRUNCATED = Field(
    description="true when items lists only some of the request's items: beyond "
    "result_items_max (1,000 by default) a result lists only the items not charged, when "
    "they are at most that many, otherwise none; counts has them all, and "
    "GET /v1/orgs/{org}/requests/{request_id} pages the full list"
)


class _Listed(_Message):
    @model_validator(mode="after")
    def _items_listed_unless_truncated(self) -> _Listed:
        items: list[Any] = getattr(self, "items")  # noqa: B009 - each subclass has them
        counts: ItemCounts = getattr(self, "counts")  # noqa: B009
        total = sum(n for n in counts.model_dump().values() if n is not None)
        if not getattr(self, "items_truncated") and len(items) != total:  # noqa: B009
            raise ValueError("a result not truncated lists every item it counts")
        return self


class ChargeApproved(_Listed):
    """The decision to charge a request (``credits_charged`` may be 0 when all is free)."""

    type: Literal["charge.approved"]
    request_id: Identifier
    org_id: Identifier
    user_id: Identifier
    action: Action
    credits_charged: Count
    counts: ItemCounts
    items: list[DecidedItem]
    items_truncated: bool = _ITEMS_TRUNCATED
    balance_after: Count
    period_id: Identifier
    reason: None
    message: str
    decided_at: Time
    sequence: LedgerSequence
    reference: dict[str, Any] | None


class ChargeRejected(_Listed):
    """A rejection: nothing is charged, and ``reason`` says why.

    A ``request_id_conflict`` answers a second body under a used ``request_id``; it is
    not the request's decision (that one stands), so it has no ``sequence`` and no
    ``balance_after``. A request too broken to read its user has no ``user_id`` and no
    items.
    """

    type: Literal["charge.rejected"]
    request_id: Identifier
    org_id: Identifier
    user_id: Identifier | None
    action: Action
    credits_charged: Literal[0]
    counts: ItemCounts
    items: list[NotChargedItem]
    items_truncated: bool = _ITEMS_TRUNCATED
    balance_after: Count | None
    period_id: Identifier | None
    reason: Reason
    message: str
    decided_at: Time
    sequence: LedgerSequence | None
    reference: dict[str, Any] | None


ChargeResult = Annotated[ChargeApproved | ChargeRejected, Field(discriminator="type")]


# ---- license events (credits.license.events) ------------------------------------------


class LicenseState(_Message):
    """The organisation's license after the command: its current period and balance."""

    period_id: Identifier
    starts_at: Time
    ends_at: Time
    credits: Count
    granted: Count
    balance: Count


class NoLicenseState(_Message):
    """The organisation has no license period."""

    period_id: None


class MemberState(_Message):
    """A user after the command; ``role`` is null when the user is not a member."""

    user_id: Identifier
    role: Literal["admin", "member"] | None
    credits_allowed: bool


class CommandApplied(_Message):
    """A license command took effect; ``state`` is the resulting license or member."""

    type: Literal["command.applied"]
    command_id: Identifier
    command_type: CommandType
    org_id: Identifier
    reason: None
    message: str
    state: LicenseState | MemberState
    sequence: LedgerSequence
    decided_at: Time


class CommandRejected(_Message):
    """A license command changed nothing; ``reason`` says why.

    ``command_type`` echoes what the command said, which for an invalid command may be
    no known type at all; ``state`` is null when the command could not be read.
    """

    type: Literal["command.rejected"]
    command_id: Identifier
    command_type: str
    org_id: Identifier
    reason: CommandReason
    message: str
    state: LicenseState | NoLicenseState | MemberState | None
    # the rejection's ledger entry; null for a command_id_conflict (no decision) and for
    # a rejection stored before rejected commands had ledger entries
    sequence: LedgerSequence | None
    decided_at: Time


LicenseEvent = Annotated[CommandApplied | CommandRejected, Field(discriminator="type")]


# ---- notifications (credits.notifications) --------------------------------------------


class UserRecipient(_Message):
    user_id: Identifier


class AdminRecipient(_Message):
    """Every admin of the organisation."""

    role: Literal["admin"]


class _Notification(_Message):
    notification_id: Annotated[
        str,
        StringConstraints(pattern=r"^[A-Za-z0-9._:@-]+$"),
        Field(description="deterministic: a re-emitted notification has the same id"),
    ]
    org_id: Identifier
    created_at: Time


class DisallowedNotification(_Notification):
    """To a user whose request was rejected because an admin disallowed their credit use."""

    type: Literal["credits.disallowed"]
    recipient: UserRecipient
    request_id: Identifier
    action: Action
    message: str


class InsufficientNotification(_Notification):
    """The balance did not cover a request: to its user, and to admins once per period."""

    type: Literal["credits.insufficient"]
    recipient: UserRecipient | AdminRecipient
    request_id: Identifier
    action: Action
    credits_needed: Count
    credits_left: Count


class ThresholdNotification(_Notification):
    """To admins, once per threshold and period: this share of the credits is used."""

    type: Literal["credits.threshold_reached"]
    recipient: AdminRecipient
    request_id: Identifier
    action: Action
    threshold_percent: Annotated[int, Field(ge=1)]
    credits_left: Count
    period_id: Identifier


class PeriodStartedNotification(_Notification):
    """To admins: a new license period started; what was left of the last one expired."""

    type: Literal["license.period_started"]
    recipient: AdminRecipient
    period_id: Identifier
    credits: Count
    starts_at: Time
    ends_at: Time
    expired_credits: Count


class GrantedNotification(_Notification):
    """To admins: customer success added credits to the current period."""

    type: Literal["credits.granted"]
    recipient: AdminRecipient
    grant_id: Identifier
    credits: Annotated[int, Field(ge=1)]
    reason: str
    granted_by: Identifier
    balance_after: Count


Notification = Annotated[
    DisallowedNotification
    | InsufficientNotification
    | ThresholdNotification
    | PeriodStartedNotification
    | GrantedNotification,
    Field(discriminator="type"),
]


# ---- the ledger (credits.ledger) -------------------------------------------------------
# Each entry carries the script's own record of the decision: Redis state is rebuilt
# from the ledger alone, so that record is part of the contract too.


class EmptyTable(_Message):
    """An empty list as the scripts store it: cjson encodes an empty Lua table as ``{}``."""


class ScriptNote(_Message):
    """A notification the charge script asked for."""

    type: Literal["credits.disallowed", "credits.insufficient", "credits.threshold_reached"]
    to: Literal["user", "admin"]
    threshold: int | SkipJsonSchema[None] = None


class ChargeScriptRecord(_Message):
    """The charge script's stored decision, as it wrote it (times in ms since the epoch)."""

    request_id: Identifier
    fp: Fingerprint
    at: EpochMs
    status: Literal["approved", "rejected"]
    reason: Reason | SkipJsonSchema[None] = None
    detail: str | SkipJsonSchema[None] = None
    credits: Count
    needed: Count
    balance: Count
    period: Identifier | Literal[""] = Field(description='"" when there is no period')
    outcomes: list[Outcome] | EmptyTable
    until: list[EpochMs] | EmptyTable = Field(description="per item; 0 = not free")
    opened: list[tuple[Count, EpochMs]] | EmptyTable = Field(
        description="windows opened: [0-based window slot, window end]"
    )
    notes: list[ScriptNote] | EmptyTable
    saved: Count
    seq: LedgerSequence


class RawLicenseState(_Message):
    period_id: Identifier
    starts_ms: EpochMs
    ends_ms: EpochMs
    credits: Count
    granted: Count
    balance: Count


class RawMemberState(_Message):
    user_id: Identifier
    role: Literal["admin", "member", False]
    credits_allowed: bool


class CommandScriptRecord(_Message):
    """The command script's stored outcome of an applied command."""

    command_id: Identifier
    fp: Fingerprint
    at: EpochMs
    status: Literal["applied"]
    seq: LedgerSequence
    state: RawLicenseState | RawMemberState
    delta: int | SkipJsonSchema[None] = None
    balance: Count | SkipJsonSchema[None] = None
    expired: Count | SkipJsonSchema[None] = None


class RawNoLicenseState(_Message):
    period_id: Literal[False]


class RejectedCommandScriptRecord(_Message):
    """The command script's stored outcome of a rejected command (``state`` is absent
    when the command could not be read)."""

    command_id: Identifier
    fp: Fingerprint
    at: EpochMs
    status: Literal["rejected"]
    reason: CommandReason
    detail: str | SkipJsonSchema[None] = None
    seq: LedgerSequence
    state: RawLicenseState | RawNoLicenseState | RawMemberState | SkipJsonSchema[None] = None


class WindowOpened(_Message):
    window: WindowName
    ends_at_ms: EpochMs


class RequestSummary(_Message):
    """The request as stored beside its decision (what reports show)."""

    user_id: Identifier | None
    action: Action
    items: list[RequestedItem]
    reference: dict[str, Any] | None
    max_credits: Count | None


class _Entry(_Message):
    org_id: Identifier
    sequence: LedgerSequence
    recorded_at: Time


_PART = Field(
    default=None,
    description="set when the entry is split into parts (domain/ledger.py): this is part 1, "
    "with every header field and the first slice of each list",
)
_PARTS = Field(default=None, description="how many parts the entry is split into")


class ChargedEntry(_Entry):
    """An approved request: the credits it took and the repeat windows it opened."""

    kind: Literal["charged"]
    request_id: Identifier
    user_id: Identifier
    action: Action
    credits_delta: Annotated[int, Field(le=0)]
    balance_after: Count
    period_id: Identifier
    windows: list[WindowOpened]
    decision: ChargeScriptRecord
    request: RequestSummary
    part: Literal[1] | SkipJsonSchema[None] = _PART
    parts: Annotated[int, Field(ge=2)] | SkipJsonSchema[None] = _PARTS


class RejectedEntry(_Entry):
    """A rejected request: nothing changes, but a replay after a rebuild gets this answer."""

    kind: Literal["rejected"]
    request_id: Identifier
    user_id: Identifier | None
    action: Action
    credits_delta: Literal[0]
    balance_after: Count
    period_id: Identifier | None
    windows: list[WindowOpened] = Field(max_length=0)
    decision: ChargeScriptRecord
    request: RequestSummary
    part: Literal[1] | SkipJsonSchema[None] = _PART
    parts: Annotated[int, Field(ge=2)] | SkipJsonSchema[None] = _PARTS


class PeriodStartedEntry(_Entry):
    """A new period: the balance becomes its credits, the rest of the last one expires."""

    kind: Literal["period_started"]
    command_id: Identifier
    command_type: Literal["license.start_period"]
    credits_delta: int
    balance_after: Count
    expired_credits: Count
    command: StartPeriod
    state: LicenseState
    decision: CommandScriptRecord


class GrantedEntry(_Entry):
    """Credits added to the current period."""

    kind: Literal["granted"]
    command_id: Identifier
    command_type: Literal["credits.grant"]
    credits_delta: Annotated[int, Field(ge=1)]
    balance_after: Count
    expired_credits: Literal[0]
    command: Grant
    state: LicenseState
    decision: CommandScriptRecord


class MemberChangedEntry(_Entry):
    """A member added, changed, removed, or allowed or disallowed to use credits."""

    kind: Literal["member_changed"]
    command_id: Identifier
    command_type: Literal["member.upsert", "member.remove", "member.set_credits_allowed"]
    credits_delta: Literal[0]
    balance_after: None
    expired_credits: Literal[0]
    command: Annotated[MemberUpsert | MemberRemove | SetCreditsAllowed, Field(discriminator="type")]
    state: MemberState
    decision: CommandScriptRecord


class CommandRejectedEntry(_Entry):
    """A rejected license command: nothing changes, but a replay after a rebuild gets
    this answer. ``command`` is null for an invalid command (its fault is in the
    decision's ``detail``); ``command_type`` echoes what the command said."""

    kind: Literal["command_rejected"]
    command_id: Identifier
    command_type: str
    credits_delta: Literal[0]
    balance_after: None
    expired_credits: Literal[0]
    command: LicenseCommand | None
    state: LicenseState | NoLicenseState | MemberState | None
    decision: RejectedCommandScriptRecord


class DecisionSlices(_Message):
    outcomes: list[Outcome] | SkipJsonSchema[None] = None
    until: list[EpochMs] | SkipJsonSchema[None] = None
    opened: list[tuple[Count, EpochMs]] | SkipJsonSchema[None] = None


class RequestSlices(_Message):
    items: list[RequestedItem]


class ContinuedEntry(_Entry):
    """Part 2 or later of an entry split into parts (``domain/ledger.py``): the next
    slice of each of its lists, under the same names. ``LedgerParts`` joins them."""

    kind: Literal["continued"]
    part: Annotated[int, Field(ge=2)]
    parts: Annotated[int, Field(ge=2)]
    windows: list[WindowOpened] | SkipJsonSchema[None] = None
    decision: DecisionSlices | SkipJsonSchema[None] = None
    request: RequestSlices | SkipJsonSchema[None] = None


LedgerEntry = Annotated[
    ChargedEntry
    | RejectedEntry
    | ContinuedEntry
    | PeriodStartedEntry
    | GrantedEntry
    | MemberChangedEntry
    | CommandRejectedEntry,
    Field(discriminator="kind"),
]


# ---- dead letters (credits.deadletter) -------------------------------------------------


class DeadLetterSource(_Message):
    """Where the message came from; for an output the broker refused (too large even
    after its limits were read again), the topic it was for, and no offset."""

    topic: str
    partition: Count
    offset: Count | None


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class DeadLetter(
    _Message,
    # the value is either text or, when it is not UTF-8, hex
    json_schema_extra={
        "oneOf": [
            {"properties": {"value": {"type": "string"}, "value_hex": {"type": "null"}}},
            {"properties": {"value": {"type": "null"}, "value_hex": {"type": "string"}}},
        ]
    },
):
    """Input that carries no decision: not JSON, not an object, or no readable ids; or an
    output too large for its topic.

    Bounded whatever the message's size: ``value`` is the first 64 KiB of the message as
    text, or ``value_hex`` the first 32 KiB of its bytes in hex when they are not UTF-8;
    ``value_bytes`` and ``value_sha256`` are the whole value's size and digest, and
    ``value_truncated`` says whether the prefix is all of it. ``key`` is the first KiB of
    the message's key as received (not necessarily an ``org_id``), with its size and
    digest likewise (null without a key).
    """

    source: DeadLetterSource
    error: str
    key: str | None
    key_bytes: Count | None
    key_sha256: Sha256 | None
    key_truncated: bool
    value: str | None
    value_hex: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{2})*$")] | None
    value_bytes: Count
    value_sha256: Sha256
    value_truncated: bool
    received_at: Time

    @model_validator(mode="after")
    def _text_or_hex(self) -> DeadLetter:
        if (self.value is None) == (self.value_hex is None):
            raise ValueError("exactly one of value and value_hex is set")
        return self


# ---- headers ---------------------------------------------------------------------------


class CloudEventsHeaders(BaseModel):
    """CloudEvents binary-mode headers of every message creditgate publishes (UTF-8)."""

    # other headers (tracing, say) may ride along
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    ce_specversion: Literal["1.0"]
    ce_id: str = Field(min_length=1, description="deterministic: a re-emitted copy keeps it")
    ce_type: str
    ce_source: Literal["creditgate"]
    ce_time: Time
    content_type: Literal["application/json"] | SkipJsonSchema[None] = Field(
        default=None, alias="content-type"
    )

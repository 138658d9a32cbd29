"""The ledger entries (``credits.ledger``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from creditgate.domain.charges import Action, Outcome, Reason
from creditgate.domain.commands import (
    CommandReason,
    Grant,
    LicenseCommand,
    MemberRemove,
    MemberUpsert,
    Refund,
    SetCreditLimit,
    SetCreditsAllowed,
    StartPeriod,
)
from creditgate.domain.ids import Identifier
from creditgate.domain.published.common import (
    Count,
    EpochMs,
    Fingerprint,
    LedgerSequence,
    Message,
    Time,
    WindowName,
)
from creditgate.domain.published.license_events import LicenseState, MemberState, NoLicenseState
from creditgate.domain.published.results import RequestedItem

# Each entry carries the script's own record of the decision: Redis state is rebuilt
# from the ledger alone, so that record is part of the contract too.


class EmptyTable(Message):
    """An empty list as the scripts store it: cjson encodes an empty Lua table as ``{}``."""


class ScriptNote(Message):
    """A notification the charge script asked for."""

    type: Literal[
        "credits.disallowed",
        "credits.insufficient",
        "credits.threshold_reached",
        "credits.user_limit_reached",
    ]
    to: Literal["user", "admin"]
    threshold: int | SkipJsonSchema[None] = None


class ChargeScriptRecord(Message):
    """The charge script's stored decision, as it wrote it (times in ms since the epoch)."""

    request_id: Identifier
    fp: Fingerprint
    at: EpochMs
    status: Literal["approved", "rejected", "held"]
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
    limit: Count | SkipJsonSchema[None] = Field(
        default=None, description="the member's credit limit, when they have one"
    )
    limit_left: Count | SkipJsonSchema[None] = Field(
        default=None, description="what is left of the member's limit after the decision"
    )
    held: Count | SkipJsonSchema[None] = Field(default=None, description="a hold's credits")
    hold_exp: EpochMs | SkipJsonSchema[None] = Field(default=None, description="its expiry")


class HoldScriptRecord(Message):
    """The charge script's record of a hold resolved (or a settlement refused)."""

    request_id: Identifier = Field(description="the hold's")
    settlement_id: Identifier | SkipJsonSchema[None] = None
    fp: Fingerprint | Literal[""] = Field(description='the settlement\'s; "" for an expiry')
    at: EpochMs
    status: Literal["settled", "released", "expired", "rejected"]
    kind: Literal["settle", "release", "expire"]
    reason: Reason | SkipJsonSchema[None] = None
    detail: str | SkipJsonSchema[None] = None
    credits: Count = Field(description="charged")
    released: Count = Field(description="held credits not charged")
    delta: Count = Field(description="credits back to the balance")
    needed: Count
    balance: Count
    period: Identifier | Literal[""]
    hold_period: Identifier | SkipJsonSchema[None] = None
    user: Identifier | SkipJsonSchema[None] = None
    action: Action | SkipJsonSchema[None] = None
    outcomes: list[Outcome] | EmptyTable
    until: list[EpochMs] | EmptyTable
    opened: list[tuple[Count, EpochMs]] | EmptyTable
    notes: EmptyTable
    saved: Count
    seq: LedgerSequence


class RawLicenseState(Message):
    period_id: Identifier
    starts_ms: EpochMs
    ends_ms: EpochMs
    credits: Count
    granted: Count
    balance: Count


class RawMemberState(Message):
    user_id: Identifier
    role: Literal["admin", "member", False]
    credits_allowed: bool
    credit_limit: Count | Literal[False] = Field(description="false: no limit")


class RefundedRequest(Message):
    user_id: Identifier
    action: Action
    period: Identifier


class CommandScriptRecord(Message):
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
    # a new period's: how many open holds it ended (the sweep expires them)
    holds_ended: Count | SkipJsonSchema[None] = None
    # a refund's: the items refunded now, before, and all so far (1-based item indexes),
    # the window slots closed, and the refunded request's user, action and period
    refunded: list[Annotated[int, Field(ge=1)]] | SkipJsonSchema[None] = None
    already: list[Annotated[int, Field(ge=1)]] | EmptyTable | SkipJsonSchema[None] = None
    refunded_all: list[Annotated[int, Field(ge=1)]] | SkipJsonSchema[None] = None
    closed: list[Count] | EmptyTable | SkipJsonSchema[None] = None
    request: RefundedRequest | SkipJsonSchema[None] = None


class RawNoLicenseState(Message):
    period_id: Literal[False]


class RejectedCommandScriptRecord(Message):
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
    already: list[Annotated[int, Field(ge=1)]] | EmptyTable | SkipJsonSchema[None] = Field(
        default=None, description="a refund's items that were refunded before"
    )


class WindowOpened(Message):
    window: WindowName
    ends_at_ms: EpochMs


class RequestSummary(Message):
    """The request as stored beside its decision (what reports show)."""

    user_id: Identifier | None
    action: Action
    items: list[RequestedItem]
    reference: dict[str, Any] | None
    max_credits: Count | None


class _Entry(Message):
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


class HeldEntry(_Entry):
    """A request with ``hold`` approved: credits taken from the balance and held."""

    kind: Literal["held"]
    request_id: Identifier
    user_id: Identifier
    action: Action
    credits_delta: Annotated[int, Field(le=0)]
    balance_after: Count
    period_id: Identifier
    windows: list[WindowOpened] = Field(max_length=0)
    decision: ChargeScriptRecord
    request: RequestSummary
    part: Literal[1] | SkipJsonSchema[None] = _PART
    parts: Annotated[int, Field(ge=2)] | SkipJsonSchema[None] = _PARTS


class _HoldResolvedEntry(_Entry):
    """A hold settled, released or expired, or a settlement refused: the windows the
    settlement opened and the credits back to the balance."""

    request_id: Identifier = Field(description="the hold's")
    settlement_id: Identifier | None
    user_id: Identifier | None
    action: Action | None
    credits_delta: Count
    balance_after: Count
    period_id: Identifier | None
    windows: list[WindowOpened]
    decision: HoldScriptRecord
    settlement: dict[str, Any] | None = Field(description="the settlement, less its items")
    part: Literal[1] | SkipJsonSchema[None] = _PART
    parts: Annotated[int, Field(ge=2)] | SkipJsonSchema[None] = _PARTS


class HoldSettledEntry(_HoldResolvedEntry):
    """A hold settled: its delivered items charged, the windows they opened."""

    kind: Literal["hold_settled"]


class HoldReleasedEntry(_HoldResolvedEntry):
    """A hold released: its credits back."""

    kind: Literal["hold_released"]


class HoldExpiredEntry(_HoldResolvedEntry):
    """A hold expired (or ended with its period), decided by creditgate's sweep."""

    kind: Literal["hold_expired"]


class HoldRejectedEntry(_HoldResolvedEntry):
    """A settlement or release refused: only its record, for a replay after a rebuild."""

    kind: Literal["hold_rejected"]


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
    command_type: Literal[
        "member.upsert",
        "member.remove",
        "member.set_credits_allowed",
        "member.set_credit_limit",
    ]
    credits_delta: Literal[0]
    balance_after: None
    expired_credits: Literal[0]
    command: Annotated[
        MemberUpsert | MemberRemove | SetCreditsAllowed | SetCreditLimit,
        Field(discriminator="type"),
    ]
    state: MemberState
    decision: CommandScriptRecord


class RefundedEntry(_Entry):
    """Credits of charged items of a decided request given back (``charge.refund``):
    who, why and which items are in ``command``; the windows it closed, by name."""

    kind: Literal["refunded"]
    command_id: Identifier
    command_type: Literal["charge.refund"]
    credits_delta: Annotated[int, Field(ge=1)]
    balance_after: Count
    expired_credits: Literal[0]
    command: Refund
    state: LicenseState
    decision: CommandScriptRecord
    windows_closed: list[WindowName]


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


class DecisionSlices(Message):
    outcomes: list[Outcome] | SkipJsonSchema[None] = None
    until: list[EpochMs] | SkipJsonSchema[None] = None
    opened: list[tuple[Count, EpochMs]] | SkipJsonSchema[None] = None


class RequestSlices(Message):
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
    | HeldEntry
    | HoldSettledEntry
    | HoldReleasedEntry
    | HoldExpiredEntry
    | HoldRejectedEntry
    | ContinuedEntry
    | PeriodStartedEntry
    | GrantedEntry
    | MemberChangedEntry
    | RefundedEntry
    | CommandRejectedEntry,
    Field(discriminator="kind"),
]

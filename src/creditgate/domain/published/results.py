"""The charge results (``credits.charge.results``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from creditgate.domain.charges import Action, Outcome, Reason
from creditgate.domain.ids import Identifier
from creditgate.domain.published.common import Count, LedgerSequence, Message, Time


class Contact(Message):
    """A contact as its request named it, with its company when the request named one."""

    type: Literal["contact"]
    id: Identifier
    company_id: Identifier | SkipJsonSchema[None] = None


class Company(Message):
    """A company as its request named it."""

    type: Literal["company"]
    id: Identifier


RequestedItem = Annotated[Contact | Company, Field(discriminator="type")]


class _Decided(
    Message,
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


class ItemCounts(Message):
    """Items per outcome; an outcome no item had is left out."""

    charged: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    free_repeat: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    duplicate_in_request: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    no_verified_email: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    held: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    released: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None
    not_charged: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = None


_ITEMS_TRUNCATED = Field(
    description="true when items lists only some of the request's items: beyond "
    "result_items_max (1,000 by default) a result lists only the items not charged, when "
    "they are at most that many, otherwise none; counts has them all, and "
    "GET /v1/orgs/{org}/requests/{request_id} pages the full list"
)


class _Listed(Message):
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


class ChargeHeld(_Listed):
    """A request with ``hold`` approved: its chargeable credits are held, not charged,
    until the hold is settled, released or expires (items ``held``, ``free_repeat``,
    ``duplicate_in_request``, ``no_verified_email``, ``not_charged`` with partial)."""

    type: Literal["charge.held"]
    request_id: Identifier
    org_id: Identifier
    user_id: Identifier
    action: Action
    credits_charged: Literal[0]
    credits_held: Count
    hold_expires_at: Time
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


class _HoldOutcome(_Listed):
    """A hold resolved, keyed and identified by the hold's ``request_id``."""

    request_id: Identifier = Field(description="the hold's request_id")
    org_id: Identifier
    user_id: Identifier | None
    action: Action | None
    credits_charged: Count
    credits_released: Count = Field(description="held credits not charged")
    counts: ItemCounts
    items: list[DecidedItem]
    items_truncated: bool = _ITEMS_TRUNCATED
    balance_after: Count | None
    period_id: Identifier | None = Field(description="the hold's period")
    message: str
    decided_at: Time
    reference: dict[str, Any] | None = Field(description="the hold's request's reference")


class HoldSettled(_HoldOutcome):
    """A hold settled: the delivered items charged as decided at settle time (``charged``
    or ``free_repeat``), every other held item ``released``."""

    type: Literal["hold.settled"]
    settlement_id: Identifier
    reason: None
    sequence: LedgerSequence


class HoldReleased(_HoldOutcome):
    """A hold released: nothing delivered, every held credit back."""

    type: Literal["hold.released"]
    settlement_id: Identifier
    credits_charged: Literal[0]
    reason: None
    sequence: LedgerSequence


class HoldExpired(_HoldOutcome):
    """A hold run out at its ``hold_expires_at`` (or ended with its license period),
    decided by creditgate itself; every held credit back (none when its period ended:
    they went with it)."""

    type: Literal["hold.expired"]
    settlement_id: None
    credits_charged: Literal[0]
    reason: None
    sequence: LedgerSequence


class HoldRejected(_HoldOutcome):
    """A settlement or release refused: nothing changes. A second body under a used
    ``settlement_id`` (``request_id_conflict``) is no decision and has no sequence."""

    type: Literal["hold.rejected"]
    settlement_id: Identifier
    credits_charged: Literal[0]
    credits_released: Literal[0]
    reason: Literal[
        "hold_not_found",
        "hold_already_resolved",
        "item_not_held",
        "invalid_request",
        "request_id_conflict",
    ]
    sequence: LedgerSequence | None


ChargeResult = Annotated[
    ChargeApproved
    | ChargeRejected
    | ChargeHeld
    | HoldSettled
    | HoldReleased
    | HoldExpired
    | HoldRejected,
    Field(discriminator="type"),
]

"""What creditgate publishes and receives on each topic, as the contracts describe it:
the value schemas and the message kinds of every topic (the sources are the models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel

from creditgate.domain import published as m
from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.commands import (
    Grant,
    LicenseCommand,
    MemberRemove,
    MemberUpsert,
    Refund,
    SetCreditLimit,
    SetCreditsAllowed,
    StartPeriod,
)
from creditgate.domain.holds import HoldSettlement
from creditgate.stream import topics as t

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# AsyncAPI's default schema format is draft-07-based; pydantic writes draft 2020-12
PAYLOAD_FORMAT = "application/schema+json;version=draft-2020-12"
SCHEMAS_DIR = "topics/schemas"
ASYNCAPI_FILE = "asyncapi.json"
DEAD_LETTER_TYPE = "deadletter"  # the ce_type of dead letters (stream/decider.py)
REGENERATE = "python -m creditgate.contracts  (or: creditgate contracts generate)"


@dataclass(frozen=True)
class ValueSchema:
    """One schema file: what a topic's value may be."""

    name: str
    type_: Any  # a model, or an annotated union of models
    title: str
    description: str

    @property
    def path(self) -> str:
        return f"{SCHEMAS_DIR}/{self.name}.schema.json"


@dataclass(frozen=True)
class Message:
    """One kind of message: an AsyncAPI message whose payload points into a schema file."""

    model: type[BaseModel]
    value: ValueSchema
    ce_type: str | None = None  # CloudEvents type header; None for input we consume
    whole_file: bool = False  # the payload is the whole file, not one of its $defs
    name: str = ""
    constraint: dict[str, Any] | None = None  # narrows the schema for this channel
    summary: str = ""  # else the first line of the model's docstring

    @property
    def id(self) -> str:
        return self.name or self.model.__name__


REQUEST = ValueSchema(
    "charge-request",
    ChargeRequest,
    "ChargeRequest",
    "A request to charge credits for an export, a CRM push or an email verification.",
)
COMMAND = ValueSchema(
    "license-command",
    LicenseCommand,
    "LicenseCommand",
    "A change to an organisation's license, credits or members; idempotent by command_id.",
)
SETTLEMENT = ValueSchema(
    "hold-settlement",
    HoldSettlement,
    "HoldSettlement",
    "Settle a hold with the items delivered, or release it; idempotent by settlement_id.",
)
RESULT = ValueSchema(
    "charge-result",
    m.ChargeResult,
    "ChargeResult",
    "The decision on a charge request (charge.approved, charge.held, charge.rejected), "
    "and the outcomes of holds (hold.settled, hold.released, hold.expired, hold.rejected).",
)
EVENT = ValueSchema(
    "license-event",
    m.LicenseEvent,
    "LicenseEvent",
    "The outcome of a license command: command.applied or command.rejected.",
)
NOTIFICATION = ValueSchema(
    "notification",
    m.Notification,
    "Notification",
    "Something a user or the organisation's admins should hear about, by type.",
)
LEDGER = ValueSchema(
    "ledger-entry",
    m.LedgerEntry,
    "LedgerEntry",
    "One entry per decision and per command, applied or rejected, in per-org sequence; "
    "Redis state can be rebuilt from the ledger alone.",
)
DEAD_LETTER = ValueSchema(
    "dead-letter",
    m.DeadLetter,
    "DeadLetter",
    "Input that could not be read, with where it came from and why.",
)
VALUES = (REQUEST, COMMAND, SETTLEMENT, RESULT, EVENT, NOTIFICATION, LEDGER, DEAD_LETTER)


def _literal(model: type[BaseModel], field: str) -> str:
    (value,) = get_args(model.model_fields[field].annotation)
    return str(value)


def _request(action: Action, name: str) -> Message:
    # one schema for the three request topics; each topic takes one action only
    return Message(
        ChargeRequest,
        REQUEST,
        whole_file=True,
        name=name,
        constraint={"properties": {"action": {"const": action.value}}},
        summary=f"A request to charge credits, with action {action.value}.",
    )


def _typed(value: ValueSchema, *models: type[BaseModel]) -> list[Message]:
    return [Message(model, value, ce_type=_literal(model, "type")) for model in models]


def _ledger(*models: type[BaseModel]) -> list[Message]:
    return [Message(model, LEDGER, ce_type=f"ledger.{_literal(model, 'kind')}") for model in models]


TOPIC_MESSAGES: dict[str, list[Message]] = {
    t.EXPORT_REQUESTS: [_request(Action.EXPORT, "ExportRequest")],
    t.PUSH_REQUESTS: [_request(Action.CRM_PUSH, "CrmPushRequest")],
    t.VERIFICATION_REQUESTS: [_request(Action.EMAIL_VERIFICATION, "VerificationRequest")],
    t.LICENSE_COMMANDS: [
        Message(StartPeriod, COMMAND),
        Message(Grant, COMMAND),
        Message(MemberUpsert, COMMAND, summary="Adds a member, or changes a member's role."),
        Message(MemberRemove, COMMAND, summary="Removes a member."),
        Message(
            SetCreditsAllowed,
            COMMAND,
            summary="An admin allows or disallows a member's use of the credits.",
        ),
        Message(
            SetCreditLimit,
            COMMAND,
            summary="An admin sets (or lifts) a member's credit limit per period.",
        ),
        Message(Refund, COMMAND),
    ],
    t.HOLD_SETTLEMENTS: [Message(HoldSettlement, SETTLEMENT, whole_file=True)],
    t.CHARGE_RESULTS: _typed(
        RESULT,
        m.ChargeApproved,
        m.ChargeRejected,
        m.ChargeHeld,
        m.HoldSettled,
        m.HoldReleased,
        m.HoldExpired,
        m.HoldRejected,
    ),
    t.LICENSE_EVENTS: _typed(EVENT, m.CommandApplied, m.CommandRejected),
    t.NOTIFICATIONS: _typed(
        NOTIFICATION,
        m.DisallowedNotification,
        m.InsufficientNotification,
        m.ThresholdNotification,
        m.UserLimitReachedNotification,
        m.RefundedNotification,
        m.PeriodStartedNotification,
        m.GrantedNotification,
    ),
    t.LEDGER: _ledger(
        m.ChargedEntry,
        m.RejectedEntry,
        m.HeldEntry,
        m.HoldSettledEntry,
        m.HoldReleasedEntry,
        m.HoldExpiredEntry,
        m.HoldRejectedEntry,
        m.ContinuedEntry,
        m.PeriodStartedEntry,
        m.GrantedEntry,
        m.MemberChangedEntry,
        m.RefundedEntry,
        m.CommandRejectedEntry,
    ),
    t.DEADLETTER: [Message(m.DeadLetter, DEAD_LETTER, ce_type=DEAD_LETTER_TYPE, whole_file=True)],
}

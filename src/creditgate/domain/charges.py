"""Charge requests: the contract of the three request topics and its validation."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from creditgate.domain.ids import Identifier, Timestamp

MAX_REFERENCE_BYTES = 2048
# The most credits any number may say: a grant, a period's credits, a request's
# max_credits, and a period's credits and grants together (command.lua refuses a grant
# past it). Balance arithmetic then stays exact and no script write can fail half-way:
# Redis integers are signed 64-bit (an HINCRBY past them fails mid-script), Lua numbers
# are doubles (exact to 2^53), and the scripts' cjson writes 14 significant digits (a
# stored record of 10^14 or more would lose digits).
MAX_CREDITS = 10**12


class Action(StrEnum):
    EXPORT = "export"
    CRM_PUSH = "crm_push"
    EMAIL_VERIFICATION = "email_verification"


class Outcome(StrEnum):
    """What happened to one item of a request."""

    CHARGED = "charged"
    FREE_REPEAT = "free_repeat"
    DUPLICATE_IN_REQUEST = "duplicate_in_request"
    NO_VERIFIED_EMAIL = "no_verified_email"
    NOT_CHARGED = "not_charged"
    # a hold's: credits held (not charged yet), and released by its settlement or end
    HELD = "held"
    RELEASED = "released"
    # in reports only: a charged item whose credit a refund gave back
    REFUNDED = "refunded"


class Reason(StrEnum):
    """Why a request was rejected."""

    CREDITS_DISALLOWED = "credits_disallowed"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    EXCEEDS_MAX_CREDITS = "exceeds_max_credits"
    NOT_A_MEMBER = "not_a_member"
    NO_ACTIVE_LICENSE = "no_active_license"
    LICENSE_PERIOD_ENDED = "license_period_ended"
    REQUEST_ID_CONFLICT = "request_id_conflict"
    USER_LIMIT_REACHED = "user_limit_reached"
    INVALID_REQUEST = "invalid_request"
    # why a hold's settlement or release was refused (``hold.rejected``)
    HOLD_NOT_FOUND = "hold_not_found"
    HOLD_ALREADY_RESOLVED = "hold_already_resolved"
    ITEM_NOT_HELD = "item_not_held"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContactItem(_Strict):
    type: Literal["contact"]
    id: Identifier
    company_id: Identifier | None = None


class CompanyItem(_Strict):
    type: Literal["company"]
    id: Identifier


Item = Annotated[ContactItem | CompanyItem, Field(discriminator="type")]


class HoldOptions(_Strict):
    """``hold`` of a charge request: hold the credits instead of charging them, for at
    most ``expires_in_seconds`` (none: the worker's default)."""

    expires_in_seconds: StrictInt | None = Field(default=None, ge=1, le=86_400)


class ChargeRequest(_Strict):
    request_id: Identifier
    org_id: Identifier
    user_id: Identifier
    action: Action
    items: list[Item] = Field(min_length=1)
    max_credits: StrictInt | None = Field(default=None, ge=0, le=MAX_CREDITS)
    on_insufficient: Literal["reject", "partial"] = "reject"
    verified_email_found: StrictBool | None = None
    requested_at: Timestamp
    reference: dict[str, Any] | None = None
    hold: HoldOptions | None = None

    @model_validator(mode="after")
    def _action_rules(self) -> ChargeRequest:
        if self.action is Action.EMAIL_VERIFICATION:
            if len(self.items) != 1 or self.items[0].type != "contact":
                raise ValueError("email_verification takes exactly one contact item")
            if self.verified_email_found is None:
                raise ValueError("email_verification requires verified_email_found")
        elif self.verified_email_found is not None:
            raise ValueError("verified_email_found applies to email_verification only")
        if self.reference is not None and len(orjson.dumps(self.reference)) > MAX_REFERENCE_BYTES:
            raise ValueError(f"reference is larger than {MAX_REFERENCE_BYTES} bytes")
        return self

    @property
    def partial(self) -> bool:
        return self.on_insufficient == "partial"

    def fingerprint(self) -> str:
        """A digest of the body: the same ``request_id`` with another body is a conflict.
        ``hold`` counts only when given, so a request's digest is what it was before
        requests could hold."""
        body = self.model_dump(mode="json")
        if body["hold"] is None:
            del body["hold"]
        return body_fingerprint(body)


def body_fingerprint(body: Any) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]

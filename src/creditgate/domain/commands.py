"""License commands: the contract of ``credits.license.commands``."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    model_validator,
)

from creditgate.domain.charges import MAX_CREDITS, body_fingerprint
from creditgate.domain.ids import Identifier, StoredTimestamp


class CommandReason(StrEnum):
    """Why a license command was refused."""

    NOT_AN_ADMIN = "not_an_admin"
    NOT_A_MEMBER = "not_a_member"
    NO_ACTIVE_LICENSE = "no_active_license"
    DUPLICATE_GRANT = "duplicate_grant"
    COMMAND_ID_CONFLICT = "command_id_conflict"
    INVALID_COMMAND = "invalid_command"


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command_id: Identifier
    org_id: Identifier

    def fingerprint(self) -> str:
        return body_fingerprint(self.model_dump(mode="json"))


class StartPeriod(_Command):
    """Replaces the current period; the balance becomes ``credits`` (no rollover)."""

    type: Literal["license.start_period"]
    period_id: Identifier
    starts_at: StoredTimestamp
    ends_at: StoredTimestamp
    credits: StrictInt = Field(ge=0, le=MAX_CREDITS)

    @model_validator(mode="after")
    def _ends_after_start(self) -> StartPeriod:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class Grant(_Command):
    """A top-up by customer success; it expires with the period."""

    type: Literal["credits.grant"]
    grant_id: Identifier
    # and with the period's credits and grants at most MAX_CREDITS (command.lua)
    credits: StrictInt = Field(gt=0, le=MAX_CREDITS)
    reason: str = Field(min_length=1, max_length=500)
    granted_by: Identifier


class MemberUpsert(_Command):
    type: Literal["member.upsert"]
    user_id: Identifier
    role: Literal["admin", "member"]


class MemberRemove(_Command):
    type: Literal["member.remove"]
    user_id: Identifier


class SetCreditsAllowed(_Command):
    type: Literal["member.set_credits_allowed"]
    user_id: Identifier
    allowed: StrictBool
    set_by: Identifier


class SetCreditLimit(_Command):
    """The most credits a member may use in a license period (charged + held - refunded);
    ``None``: no limit, the whole pool. It carries over to the next period."""

    type: Literal["member.set_credit_limit"]
    user_id: Identifier
    limit: StrictInt | None = Field(ge=0, le=MAX_CREDITS)
    set_by: Identifier


LicenseCommand = Annotated[
    StartPeriod | Grant | MemberUpsert | MemberRemove | SetCreditsAllowed | SetCreditLimit,
    Field(discriminator="type"),
]
license_command_adapter: TypeAdapter[LicenseCommand] = TypeAdapter(LicenseCommand)

"""The license events (``credits.license.events``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from creditgate.domain.commands import CommandReason
from creditgate.domain.ids import Identifier
from creditgate.domain.published.common import CommandType, Count, LedgerSequence, Message, Time


class LicenseState(Message):
    """The organisation's license after the command: its current period and balance."""

    period_id: Identifier
    starts_at: Time
    ends_at: Time
    credits: Count
    granted: Count
    balance: Count


class NoLicenseState(Message):
    """The organisation has no license period."""

    period_id: None


class MemberState(Message):
    """A user after the command; ``role`` is null when the user is not a member."""

    user_id: Identifier
    role: Literal["admin", "member"] | None
    credits_allowed: bool
    credit_limit: Count | None = Field(
        description="the most credits the member may use per period; null: no limit"
    )


class CommandApplied(Message):
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


class CommandRejected(Message):
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

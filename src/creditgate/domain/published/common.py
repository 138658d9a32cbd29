"""Types and items shared by the message contracts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from creditgate.domain.ids import Timestamp

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
    "member.set_credit_limit",
    "charge.refund",
]


class Message(BaseModel):
    # strict: a consumer reads JSON, where "1" is not 1 and 1 is not true
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

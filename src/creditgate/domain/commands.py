"""License commands: the contract of ``credits.license.commands``."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    TypeAdapter,
    model_validator,
)

from creditgate.domain.charges import MAX_CREDITS, Action, body_fingerprint
from creditgate.domain.ids import Identifier, StoredTimestamp
from creditgate.domain.windows import stored_item_windows, window_slots


class CommandReason(StrEnum):
    """Why a license command was refused."""

    NOT_AN_ADMIN = "not_an_admin"
    NOT_A_MEMBER = "not_a_member"
    NO_ACTIVE_LICENSE = "no_active_license"
    DUPLICATE_GRANT = "duplicate_grant"
    COMMAND_ID_CONFLICT = "command_id_conflict"
    INVALID_COMMAND = "invalid_command"
    REQUEST_NOT_FOUND = "request_not_found"
    LICENSE_PERIOD_ENDED = "license_period_ended"
    NOTHING_TO_REFUND = "nothing_to_refund"


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


class RefundedItem(BaseModel):
    """An item of a decided request, by type and id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["contact", "company"]
    id: Identifier


@dataclass(frozen=True)
class RefundTarget:
    """The refunded request as the worker read it before the refund's script call: the
    script's KEYS name the request's windows, which only its stored items tell.

    ``fingerprint``: its stored decision's ("" when none was found; the script checks
    that it still is); ``windows`` and ``items``: ``windows.window_slots`` of its items;
    ``named``: the 0-based indexes of its items the refund names."""

    fingerprint: str = ""
    windows: tuple[str, ...] = ()
    items: tuple[tuple[int, int | None], ...] = ()
    named: tuple[int, ...] = ()


class Refund(_Command):
    """Credits of charged items of a decided request of the current period back to the
    balance, each item at most once (``items`` omitted: every charged item)."""

    type: Literal["charge.refund"]
    request_id: Identifier
    items: list[RefundedItem] | None = Field(default=None, min_length=1, max_length=10_000)
    reason: str = Field(min_length=1, max_length=500)
    refunded_by: Identifier
    _target: RefundTarget = PrivateAttr(default_factory=RefundTarget)

    @property
    def target(self) -> RefundTarget:
        return self._target

    def aimed(self, summary_items: list[dict[str, Any]], action: str, fingerprint: str) -> Refund:
        """This refund with its target: the stored request's items and decision."""
        pairs = stored_item_windows(Action(action), summary_items)
        windows, items = window_slots(pairs)
        wanted = None if self.items is None else {(i.type, i.id) for i in self.items}
        named = tuple(
            index
            for index, item in enumerate(summary_items)
            if wanted is None or (item["type"], item["id"]) in wanted
        )
        aimed = self.model_copy()
        aimed._target = RefundTarget(fingerprint, windows, items, named)
        return aimed


LicenseCommand = Annotated[
    StartPeriod | Grant | MemberUpsert | MemberRemove | SetCreditsAllowed | SetCreditLimit | Refund,
    Field(discriminator="type"),
]
license_command_adapter: TypeAdapter[LicenseCommand] = TypeAdapter(LicenseCommand)

_Model = (
    type[StartPeriod]
    | type[Grant]
    | type[MemberUpsert]
    | type[MemberRemove]
    | type[SetCreditsAllowed]
    | type[SetCreditLimit]
    | type[Refund]
)
# each command type's model, from the union itself: no second list to keep
_MODELS: dict[str, _Model] = {
    typing.get_args(model.model_fields["type"].annotation)[0]: model
    for model in typing.get_args(typing.get_args(LicenseCommand)[0])
}


def validate_command(body: dict[str, Any]) -> LicenseCommand:
    """``body`` as the license command of its ``type``, by that type's model, so that
    field errors name the body's fields (``allowed``, not the union's
    ``member.set_credits_allowed.allowed``); any other type by the union, which names it
    as not one of the types. Raises ``pydantic.ValidationError``."""
    model = _MODELS.get(body.get("type", ""))
    if model is None:
        return license_command_adapter.validate_python(body)
    return model.model_validate(body)

"""The notifications (``credits.notifications``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from creditgate.domain.charges import Action
from creditgate.domain.ids import Identifier
from creditgate.domain.published.common import Count, Message, Time


class UserRecipient(Message):
    user_id: Identifier


class AdminRecipient(Message):
    """Every admin of the organisation."""

    role: Literal["admin"]


class _Notification(Message):
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


class UserLimitReachedNotification(_Notification):
    """A member's request passed their credit limit of the period: to the member and to
    admins, once per member and period."""

    type: Literal["credits.user_limit_reached"]
    recipient: UserRecipient | AdminRecipient
    request_id: Identifier
    action: Action
    user_id: Identifier
    credit_limit: Count
    credits_needed: Count
    limit_left: Count
    period_id: Identifier


class RefundedNotification(_Notification):
    """To the user whose request was refunded: which credits came back, and why."""

    type: Literal["credits.refunded"]
    recipient: UserRecipient
    request_id: Identifier
    action: Action
    credits_refunded: Annotated[int, Field(ge=1)]
    items_refunded: Annotated[int, Field(ge=1)]
    reason: str
    refunded_by: Identifier
    balance_after: Count


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
    | UserLimitReachedNotification
    | RefundedNotification
    | PeriodStartedNotification
    | GrantedNotification,
    Field(discriminator="type"),
]

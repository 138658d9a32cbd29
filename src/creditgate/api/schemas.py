"""The HTTP API's bodies as pydantic models: the source of ``api/openapi.json``.

``api/openapi.py`` turns these into the document's ``components.schemas``; a model's
name is its schema's name there. The views build their answers as dicts (``reports``,
``quotes``, the decision renderer shared with ``credits.charge.results``); these models
describe those dicts, and the schemathesis test in ``tests/e2e/test_http_secured.py``
checks a running worker's answers against the document generated from them. Requests
are read by the domain's own models (``domain/charges.py``); ``QuoteRequest`` describes
what ``POST /v1/quote`` accepts of them.

Enumerations (``Action``, ``Reason``, the outcomes) and bounds (``MAX_CREDITS``,
``MAX_REFERENCE_BYTES``, the page sizes) come from the code that enforces them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from creditgate.api.reports import MAX_ITEMS_PAGE
from creditgate.domain.charges import MAX_CREDITS, MAX_REFERENCE_BYTES, Outcome
from creditgate.domain.charges import Action as DomainAction
from creditgate.domain.charges import Reason as DomainReason
from creditgate.domain.ids import ID_PATTERN
from creditgate.settings import Settings

COMPONENTS = "#/components/schemas/"
# a request's items, at most: CREDITGATE_MAX_ITEMS as shipped (a deployment may lower it)
MAX_ITEMS: int = Settings.model_fields["max_items"].default


NAMED = "x-creditgate-named"  # a marker ``openapi.py`` replaces with a $ref


def _named(name: str) -> WithJsonSchema:
    """A type written as a reference to the named schema ``name`` of the document (pydantic
    cannot refer to a schema it did not generate, so a marker stands in for the $ref)."""
    return WithJsonSchema({NAMED: name})


# Named scalar schemas: the document defines each once (``SCALARS``) and refers to it.
Identifier = Annotated[str, _named("Identifier")]
Timestamp = Annotated[str, _named("Timestamp")]
Action = Annotated[DomainAction, _named("Action")]
Reason = Annotated[DomainReason, _named("Reason")]

SCALARS: dict[str, dict[str, Any]] = {
    "Identifier": {"type": "string", "pattern": ID_PATTERN},
    "Timestamp": {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"},
    "Action": {"type": "string", "enum": [a.value for a in DomainAction]},
    "Reason": {"type": "string", "enum": [r.value for r in DomainReason]},
}

Count = Annotated[int, Field(ge=0)]
OutcomeName = Literal[
    "charged",
    "free_repeat",
    "duplicate_in_request",
    "no_verified_email",
    "held",
    "released",
    "not_charged",
    "refunded",
]
# the outcomes as the decision renders them, spelled as the domain's enumeration
if set(get_args(OutcomeName)) != {o.value for o in Outcome}:
    raise RuntimeError("api/schemas.py's OutcomeName no longer matches domain Outcome")
ResultType = Literal["charge.approved", "charge.held", "charge.rejected"]


# The default of a key that may be left out but is never null: the schema generator
# (contracts._Schemas) writes no default for it, and the key is not required.
OMITTED: Any = None


class Body(BaseModel):
    """An object the API writes or reads: no other keys than its fields."""

    model_config = ConfigDict(extra="forbid")


# ---- errors: RFC 9457 problem details (api/errors.py) ----------------------------------


class Problem(Body):
    """An error, as RFC 9457 problem details (application/problem+json)."""

    type: str = Field(
        description="urn:creditgate:problem:<code> for creditgate's problems "
        "(the code below), about:blank for a plain HTTP error"
    )
    title: str = Field(description="the same for every problem of its type")
    status: int = Field(ge=400, le=599, description="the HTTP status")
    detail: str = Field(description="this occurrence, in one sentence a person can read")
    code: str = Field(
        description="the problem type's stable name: invalid_request, unauthorized, "
        "forbidden, not_found, command_rejected, no_answer, unavailable, internal_error, "
        "http_error"
    )
    message: str = Field(description="the same text as detail (kept for older clients)")


class FieldError(Body):
    field: str = Field(description="where: a parameter, body, or a path into the body")
    message: str


class InvalidProblem(Problem):
    """A 400: the problem details, with each field's error."""

    errors: list[FieldError]


# The names of the first error shape, kept in the document for clients generated from it.
class Error(Problem):
    """An error (the name kept from the document's first version: see Problem)."""


class InvalidError(InvalidProblem):
    """A 400 (the name kept from the document's first version: see InvalidProblem)."""


# ---- GET /v1/orgs/{org}/credits --------------------------------------------------------


class Credits(Body):
    org_id: Identifier
    period_id: str
    starts_at: Timestamp
    ends_at: Timestamp
    active: bool = Field(description="now within the period")
    period_credits: Count
    granted: Count
    used: int = Field(description="charged less refunded")
    held: Count = Field(description="held by open holds: not charged, not available")
    remaining: Count


# ---- GET /v1/orgs/{org}/usage ----------------------------------------------------------


class UsageCounts(Body):
    credits_used: Count
    requests: Count = Field(description="approved requests")
    credits_saved: Count = Field(description="items that were free within their repeat window")
    rejected: Count = Field(description="rejected requests")
    credits_refunded: Count = Field(description="credits refunded (charge.refund)")
    credits_held: Count = Field(description="credits held by open holds")


ByAction = Annotated[
    dict[Action, UsageCounts],
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {NAMED: "Action"},
            "additionalProperties": {NAMED: "UsageCounts"},
        }
    ),
]


class UsageTotals(UsageCounts):
    """The organisation's totals, over every user."""

    by_action: ByAction


class UsageRow(UsageCounts):
    user_id: Identifier
    by_action: ByAction


class UsageReport(Body):
    org_id: Identifier
    period_id: str
    current_period: bool
    generated_at: Timestamp
    users: list[UsageRow] = Field(description="most credits first")
    totals: UsageTotals


# ---- decisions, as published on credits.charge.results --------------------------------


class ResultItem(Body):
    type: Literal["contact", "company"]
    id: Identifier
    company_id: Identifier = Field(default=OMITTED)
    outcome: OutcomeName
    free_until: Timestamp = Field(default=OMITTED, description="with free_repeat")


class _Decided(Body):
    """What every rendering of a decision has."""

    type: ResultType
    request_id: Identifier
    org_id: Identifier
    user_id: Identifier | None = Field(description="null when the request had no readable user")
    action: Action
    credits_charged: Count


class HoldState(Body):
    """What became of a hold (a decision of type charge.held)."""

    status: Literal["open", "settled", "released", "expired"]
    settlement_id: Identifier | None = Field(
        description="the settlement that settled or released it; null while open or expired"
    )
    resolved_at: Timestamp | None = Field(description="null while open")
    credits_released: Count = Field(description="held credits the resolution gave back")
    message: str = Field(description="one sentence a person can read")


class _DecidedTail(Body):
    credits_held: Count = Field(
        default=OMITTED, description="charge.held: the credits the hold reserved"
    )
    hold_expires_at: Timestamp = Field(
        default=OMITTED, description="charge.held: when the hold expires unless resolved"
    )
    balance_after: Count
    period_id: str | None
    reason: Reason | None
    message: str = Field(description="one sentence a person can read")
    decided_at: Timestamp
    sequence: int | None = Field(
        ge=1, description="the decision's place in the organisation's ledger"
    )
    reference: dict[str, Any] | None = Field(description="echoed from the request")


class ChargeResult(_DecidedTail, _Decided):
    items: list[ResultItem]


PositiveCount = Annotated[int, Field(ge=1)]


class ItemCounts(Body):
    """The decision's items per outcome (outcomes no item had are left out)."""

    charged: PositiveCount = Field(default=OMITTED)
    free_repeat: PositiveCount = Field(default=OMITTED)
    duplicate_in_request: PositiveCount = Field(default=OMITTED)
    no_verified_email: PositiveCount = Field(default=OMITTED)
    held: PositiveCount = Field(default=OMITTED)
    released: PositiveCount = Field(default=OMITTED)
    not_charged: PositiveCount = Field(default=OMITTED)
    refunded: PositiveCount = Field(default=OMITTED)


class Decision(_DecidedTail, _Decided):
    """A decision as published on credits.charge.results, with every item, a page at a
    time: counts has all of them, items the page's."""

    counts: ItemCounts
    items: list[ResultItem] = Field(
        max_length=MAX_ITEMS_PAGE, description="the items of this page, in the request's order"
    )
    items_truncated: bool = Field(
        description="true when this page is not all of the decision's items"
    )
    items_total: Count = Field(description="how many items the decision has")
    credits_refunded: Count = Field(description="credits of its items refunded since")
    hold: HoldState = Field(
        default=OMITTED,
        description="charge.held only; once resolved, credits_charged, counts and items "
        "are the resolution's: what the request cost",
    )
    offset: Count = Field(description="the first item of this page (0-based)")
    limit: int = Field(ge=1, le=MAX_ITEMS_PAGE, description="the page size asked for")
    next_offset: int | None = Field(
        ge=1, description="the offset of the next page; null on the last"
    )


# ---- GET /v1/orgs/{org}/users/{user}/charges -------------------------------------------


class OutcomeCounts(Body):
    charged: Count
    free_repeat: Count
    duplicate_in_request: Count
    no_verified_email: Count
    held: Count
    released: Count
    not_charged: Count
    refunded: Count


class HistoryEntry(_DecidedTail, _Decided):
    item_count: Count
    items_by_outcome: OutcomeCounts
    credits_saved: Count = Field(description="items free within their repeat window")
    free_repeats_until: Timestamp | None = Field(
        description="the latest end of the repeat windows that made items free; null "
        "when no item was a free repeat"
    )
    credits_refunded: Count = Field(description="credits of its items refunded since")
    hold: HoldState = Field(
        default=OMITTED,
        description="charge.held only; once resolved, credits_charged, items_by_outcome "
        "and credits_saved are the resolution's: what the request cost",
    )


class ChargeHistory(Body):
    org_id: Identifier
    user_id: Identifier
    action: Action
    charges: list[HistoryEntry]
    next_before: str | None = Field(description="the cursor of the next page; null on the last")


# ---- POST /v1/quote --------------------------------------------------------------------


class CompanyItem(Body):
    type: Literal["company"]
    id: Identifier


class QuoteContactItem(Body):
    type: Literal["contact"]
    id: Identifier
    company_id: Identifier | None = None
    has_verified_email: bool = Field(
        default=OMITTED, description="a hint: counted in max_credits_verified_only when true"
    )


class _QuoteRequest(Body):
    org_id: Identifier
    user_id: Identifier
    max_credits: int | None = Field(
        default=None,
        ge=0,
        le=MAX_CREDITS,
        description="a ceiling: a request needing more is rejected "
        "(an integer literal: 2.0 is refused)",
    )
    on_insufficient: Literal["reject", "partial"] = "reject"
    requested_at: Timestamp = Field(default=OMITTED, description="default: now")
    reference: dict[str, Any] | None = Field(
        default=None,
        description=f"a small free-form object, echoed (at most {MAX_REFERENCE_BYTES:,} "
        "bytes as JSON)",
    )


class ListQuoteRequest(_QuoteRequest):
    action: Literal["export", "crm_push"]
    items: list[Annotated[QuoteContactItem | CompanyItem, Field(discriminator="type")]] = Field(
        min_length=1, max_length=MAX_ITEMS
    )
    verified_email_found: None = None


class VerificationQuoteRequest(_QuoteRequest):
    action: Literal["email_verification"]
    items: list[QuoteContactItem] = Field(min_length=1, max_length=1)
    verified_email_found: bool


QuoteRequest = Annotated[ListQuoteRequest | VerificationQuoteRequest, Field(discriminator="action")]


class QuoteItem(Body):
    type: Literal["contact", "company"]
    id: Identifier
    company_id: Identifier = Field(default=OMITTED)
    has_verified_email: bool = Field(default=OMITTED)
    outcome: Literal["would_charge", "free_repeat", "duplicate_in_request", "no_charge"] = Field(
        description="what the item costs were the balance and the ceiling no obstacle"
    )
    free_until: Timestamp = Field(
        default=OMITTED, description="with free_repeat: the end of the item's window"
    )
    if_submitted_now: OutcomeName = Field(
        description="the item's outcome in the decision a charge would get now"
    )


class Quote(Body):
    org_id: Identifier
    user_id: Identifier
    action: Action
    quoted_at: Timestamp
    items: list[QuoteItem]
    max_credits: Count = Field(description="the most this request can cost: its chargeable items")
    max_credits_verified_only: Count = Field(
        description="the most it can cost with only the contacts hinted has_verified_email"
    )
    credits_if_submitted_now: Count
    credits_saved: Count
    remaining: Count = Field(description="the balance now")
    period_id: str | None
    credit_limit: Count | None = Field(
        description="the member's credit limit per period (null: none)"
    )
    limit_left: Count | None = Field(
        description="what is left of the member's limit now (null: no limit)"
    )
    would_be_approved: bool
    reason: Reason | None
    message: str = Field(description="the message the decision would carry")


# ---- the team and its admin actions ------------------------------------------------------


class TeamMember(UsageCounts):
    """A member and their usage this period (a former member with usage: role null)."""

    user_id: Identifier
    role: Literal["admin", "member"] | None
    credits_allowed: bool = Field(description="false once an admin disallowed credits use")
    credit_limit: int | None = Field(
        ge=0, le=MAX_CREDITS, description="the most credits per license period; null: none"
    )
    by_action: ByAction


class TeamReport(Body):
    org_id: Identifier
    period_id: str | None = Field(description="the current period; null without a license")
    generated_at: Timestamp
    members: list[TeamMember] = Field(description="by user id")


class CreditsAllowedBody(Body):
    allowed: bool
    set_by: Identifier = Field(
        default=OMITTED,
        description="the admin acting: required of a token without a user of its own "
        "(an operator: 403 without it); an admin token acts as its own user",
    )


class GrantBody(Body):
    credits: int = Field(gt=0, le=MAX_CREDITS)
    reason: str = Field(min_length=1, max_length=500, description="as the admins will read it")
    grant_id: Identifier = Field(
        default=OMITTED, description="the grant's idempotency id; default a new one"
    )
    granted_by: Identifier = Field(
        default=OMITTED,
        description="who grants them: required of a token without a user of its own "
        "(403 without it); a token with a user grants as that user",
    )


class CreditLimitBody(Body):
    limit: int | None = Field(
        ge=0, le=MAX_CREDITS, description="credits per license period; null: no limit"
    )
    set_by: Identifier = Field(
        default=OMITTED,
        description="the admin acting: required of a token without a user of its own "
        "(an operator: 403 without it); an admin token acts as its own user",
    )


class RefundedItem(Body):
    type: Literal["contact", "company"]
    id: Identifier


class RefundBody(Body):
    request_id: Identifier = Field(description="the decided request, of the current period")
    items: list[RefundedItem] = Field(
        default=OMITTED,
        min_length=1,
        max_length=10_000,
        description="the items to refund; default every charged item",
    )
    reason: str = Field(min_length=1, max_length=500)
    refunded_by: Identifier = Field(
        default=OMITTED,
        description="who refunds: required of a token without a user of its own "
        "(403 without it); a token with a user refunds as that user",
    )
    command_id: Identifier = Field(
        default=OMITTED,
        description="the command's idempotency id, so that a retry is the same command; "
        "default a new one per call",
    )


class LicenseEvent(Body):
    """The license event that answered the command (as on credits.license.events)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["command.applied", "command.rejected"]
    command_id: Identifier
    command_type: str
    org_id: Identifier
    reason: str | None
    message: str
    state: dict[str, Any] | None
    decided_at: Timestamp


class CommandProblem(Problem):
    """A 409: the worker refused the license command; its event is included."""

    command_id: Identifier
    reason: str | None
    event: LicenseEvent


class NoAnswerProblem(Problem):
    """A 504: the command was published but not answered in time; it will still be
    applied, and its license event will carry command_id."""

    command_id: Identifier


class Me(Body):
    """The caller's scope, as the console reads it at sign-in."""

    role: Literal["member", "admin", "support", "reader", "*"]
    orgs: list[Identifier] | None = Field(description="null: every organisation")
    user_id: Identifier | None


# ---- operators' endpoints --------------------------------------------------------------


class Health(Body):
    status: Literal["ok"]


# every named schema of the document, in its order
MODELS: tuple[type[BaseModel], ...] = (
    Problem,
    InvalidProblem,
    Error,
    InvalidError,
    Credits,
    UsageCounts,
    UsageTotals,
    UsageRow,
    UsageReport,
    ResultItem,
    ChargeResult,
    ItemCounts,
    Decision,
    OutcomeCounts,
    HistoryEntry,
    ChargeHistory,
    CompanyItem,
    QuoteContactItem,
    ListQuoteRequest,
    VerificationQuoteRequest,
    QuoteItem,
    Quote,
    TeamMember,
    TeamReport,
    CreditsAllowedBody,
    GrantBody,
    CreditLimitBody,
    RefundedItem,
    RefundBody,
    LicenseEvent,
    CommandProblem,
    NoAnswerProblem,
    Me,
    Health,
)

"""The quote: what a charge request would cost now, item by item. It changes nothing.

The quote runs the charge script itself in its writeless ``quote`` mode, with the
same arguments a charge would get, so quote and charge cannot disagree: at the same
instant and state, ``if_submitted_now`` of each item and ``credits_if_submitted_now``,
``would_be_approved``, ``reason`` and ``message`` are what the decision will say.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from creditgate.api.errors import InvalidInput, field_errors
from creditgate.domain.charges import ChargeRequest, Outcome, Reason
from creditgate.domain.decisions import ChargeRecord, RequestView, charge_message
from creditgate.domain.ids import rfc3339
from creditgate.errors import CreditgateError
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore

DEFAULT_MAX_ITEMS = 10_000
DAY_MS = 86_400_000
QUOTE_REQUEST_ID = "quote"
VERIFIED_HINT = "has_verified_email"

# what an item's outcome in the script's decision means for the person asking
QUOTE_OUTCOMES = {
    Outcome.CHARGED: "would_charge",
    Outcome.NOT_CHARGED: "would_charge",
    Outcome.FREE_REPEAT: "free_repeat",
    Outcome.DUPLICATE_IN_REQUEST: "duplicate_in_request",
    Outcome.NO_VERIFIED_EMAIL: "no_charge",
}
# rejections decided after the windows were assessed: the items can still be itemised
_BALANCE_REASONS = (
    Reason.INSUFFICIENT_CREDITS,
    Reason.EXCEEDS_MAX_CREDITS,
    Reason.USER_LIMIT_REACHED,
)


def _strip_hints(
    items: list[Any], errors: list[dict[str, str]]
) -> tuple[list[Any], list[bool | None]]:
    """The items without their ``has_verified_email`` hints, and the hints (None: none)."""
    stripped: list[Any] = []
    hints: list[bool | None] = []
    for index, given in enumerate(items):
        hint: Any = None
        item = given
        if isinstance(given, dict) and VERIFIED_HINT in given:
            item = {k: v for k, v in given.items() if k != VERIFIED_HINT}
            hint = given[VERIFIED_HINT]
            field = f"items.{index}.{VERIFIED_HINT}"
            if not isinstance(hint, bool):
                errors.append({"field": field, "message": "a boolean"})
            elif item.get("type") != "contact":
                errors.append({"field": field, "message": "applies to contact items only"})
        hints.append(hint if isinstance(hint, bool) else None)
        stripped.append(item)
    return stripped, hints


def parse_quote(
    body: Any, now_ms: int, max_items: int = DEFAULT_MAX_ITEMS
) -> tuple[ChargeRequest, list[bool | None]]:
    """A quote body: a ChargeRequest without ``request_id`` (``requested_at`` optional),
    whose contact items may carry a ``has_verified_email`` hint. Raises ``InvalidInput``.

    Returns the request and, per item, its hint (None when it has none).
    """
    if not isinstance(body, dict):
        raise InvalidInput.of("body", "expected a JSON object")
    if "request_id" in body:
        raise InvalidInput.of("request_id", "a quote has no request_id; it decides nothing")
    errors: list[dict[str, str]] = []
    hints: list[bool | None] = []
    items = body.get("items")
    if isinstance(items, list):
        if len(items) > max_items:
            raise InvalidInput.of("items", f"{len(items)} items, at most {max_items}")
        stripped, hints = _strip_hints(items, errors)
        body = {**body, "items": stripped}
    body = {"requested_at": rfc3339(now_ms), **body, "request_id": QUOTE_REQUEST_ID}
    try:
        request = ChargeRequest.model_validate(body)
    except ValidationError as exc:
        errors.extend(field_errors(exc))
    if errors:
        raise InvalidInput(errors)
    return request, hints


def _assessed(record: ChargeRecord) -> tuple[list[Outcome], list[int]] | None:
    """The script's unbounded assessment, when it returns one with a rejection."""
    outcomes, until = record.raw.get("assessed"), record.raw.get("assessed_until")
    if not isinstance(outcomes, list) or not isinstance(until, list):
        return None
    return [Outcome(o) for o in outcomes], [int(u) for u in until]


def _itemise(record: ChargeRecord) -> tuple[list[Outcome], list[int]]:
    """Per item: its outcome were the balance and the ceiling no obstacle, and its
    free-until time (meaningful for free repeats)."""
    if record.approved or record.reason not in _BALANCE_REASONS:
        return record.outcomes, record.free_until_ms
    assessed = _assessed(record)
    if assessed is None:
        raise CreditgateError("the charge script returned no assessment in quote mode")
    return assessed


async def quote(
    store: CreditStore,
    body: Any,
    now_ms: int,
    *,
    max_items: int = DEFAULT_MAX_ITEMS,
    window_days: float = 30.0,
) -> dict[str, Any]:
    """What a charge request would cost now, item by item; it changes nothing."""
    request, hints = parse_quote(body, now_ms, max_items)
    # a hold is quoted as the charge it may become: what it would hold is what it costs
    call = dataclasses.replace(ChargeCall.of(request), hold_ms=None)
    record = await store.quote(call, now_ms)
    assessed = record.approved or record.reason in _BALANCE_REASONS
    outcomes, free_until = _itemise(record)

    items = []
    verified_only = 0
    for index, item in enumerate(request.items):
        entry: dict[str, Any] = item.model_dump(exclude_none=True)
        if hints[index] is not None:
            entry[VERIFIED_HINT] = hints[index]
        # refused before any item was assessed (permission, license): nothing is due
        entry["outcome"] = QUOTE_OUTCOMES[outcomes[index]] if assessed else "no_charge"
        if assessed and outcomes[index] is Outcome.FREE_REPEAT:
            entry["free_until"] = rfc3339(free_until[index])
        entry["if_submitted_now"] = record.outcomes[index].value
        if entry["outcome"] == "would_charge" and entry.get(VERIFIED_HINT) is True:
            verified_only += 1
        items.append(entry)

    view = RequestView.of(request)
    return {
        "org_id": request.org_id,
        "user_id": request.user_id,
        "action": request.action.value,
        "quoted_at": rfc3339(now_ms),
        "items": items,
        "max_credits": record.needed,
        "max_credits_verified_only": verified_only,
        "credits_if_submitted_now": record.credits,
        "credits_saved": outcomes.count(Outcome.FREE_REPEAT) if assessed else 0,
        # what is left now: an approved quote's balance is the one after the charge
        "remaining": record.balance + (record.credits if record.approved else 0),
        "period_id": record.period_id,
        # the member's credit limit of the period and what is left of it now (null: none)
        "credit_limit": record.limit,
        "limit_left": (
            None
            if record.limit_left is None
            else record.limit_left + (record.credits if record.approved else 0)
        ),
        "would_be_approved": record.approved,
        "reason": record.reason.value if record.reason else None,
        "message": charge_message(view, record, window_days),
    }

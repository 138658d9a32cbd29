"""Read-side answers of the HTTP API: usage, charge history, one decision, the quote.

Plain async functions over a ``CreditStore``: they read Redis (the quote runs the
charge script in its writeless "quote" mode) and return JSON-ready dicts. No faust
here; ``views.py`` maps them onto routes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import ValidationError

from creditgate.domain.charges import Action, ChargeRequest, Outcome, Reason
from creditgate.domain.decisions import ChargeRecord
from creditgate.domain.ids import is_identifier, rfc3339
from creditgate.store.gateway import ChargeCall, CreditStore

USAGE_METRICS = ("credits", "requests", "saved", "rejected")
MAX_HISTORY_LIMIT = 500
DEFAULT_MAX_ITEMS = 10_000
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
_BALANCE_REASONS = (Reason.INSUFFICIENT_CREDITS, Reason.EXCEEDS_MAX_CREDITS)


class InvalidInput(ValueError):
    """A query or body the API refuses; ``errors`` are ``{"field", "message"}`` pairs."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


def _field_errors(error: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
        for err in error.errors()
    ]


# ---- usage -------------------------------------------------------------------------


def row_credits(row: Mapping[str, Any]) -> int:
    return int(row["credits_used"])


def _empty_counts() -> dict[str, int]:
    return dict.fromkeys(USAGE_METRICS, 0)


async def usage_report(
    store: CreditStore, org_id: str, period_id: str | None, now_ms: int
) -> dict[str, Any] | None:
    """Per user of a period: credits by action, requests, credits saved, rejections.

    ``period_id`` None means the current period of the license; None is returned when
    the organisation has no license and no period was asked for.
    """
    keys = store.keys.org(org_id)
    current = await store.redis.hget(keys.license, "period_id")
    if period_id is None:
        if current is None:
            return None
        period_id = str(current)
    raw: Mapping[str, str] = await store.redis.hgetall(keys.usage)  # type: ignore[assignment]

    users: dict[str, dict[str, dict[str, int]]] = {}
    for field, value in raw.items():
        parts = field.split("|")
        if len(parts) != 4 or parts[0] != period_id or parts[3] not in USAGE_METRICS:
            continue
        _, user, action, metric = parts
        by_action = users.setdefault(user, {})
        by_action.setdefault(action, _empty_counts())[metric] += int(value)

    totals = _empty_counts()
    totals_by_action: dict[str, dict[str, int]] = {}
    rows = []
    for user, by_action in users.items():
        row = _empty_counts()
        for action, counts in by_action.items():
            action_total = totals_by_action.setdefault(action, _empty_counts())
            for metric, count in counts.items():
                row[metric] += count
                totals[metric] += count
                action_total[metric] += count
        rows.append(
            {
                "user_id": user,
                "credits_used": row["credits"],
                "credits_by_action": {a: c["credits"] for a, c in sorted(by_action.items())},
                "requests": row["requests"],
                "credits_saved": row["saved"],
                "rejected": row["rejected"],
                "by_action": dict(sorted(by_action.items())),
            }
        )
    rows.sort(key=lambda r: (-row_credits(r), str(r["user_id"])))
    return {
        "org_id": org_id,
        "period_id": period_id,
        "current_period": period_id == current,
        "generated_at": rfc3339(now_ms),
        "users": rows,
        "totals": {
            "credits_used": totals["credits"],
            "credits_by_action": {a: c["credits"] for a, c in sorted(totals_by_action.items())},
            "requests": totals["requests"],
            "credits_saved": totals["saved"],
            "rejected": totals["rejected"],
        },
    }


# ---- history and single decisions ------------------------------------------------


def _outcome_counts(record: ChargeRecord) -> dict[str, int]:
    counts = {outcome.value: 0 for outcome in Outcome}
    for outcome in record.outcomes:
        counts[outcome.value] += 1
    return counts


def _history_entry(record: ChargeRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "status": "approved" if record.approved else "rejected",
        "reason": record.reason.value if record.reason else None,
        "credits_charged": record.credits,
        "credits_saved": record.saved,
        "items": len(record.outcomes),
        "items_by_outcome": _outcome_counts(record),
        "balance_after": record.balance,
        "period_id": record.period_id,
        "decided_at": rfc3339(record.decided_ms),
        "sequence": record.sequence,
        # the stored decision does not keep the request's reference (yet)
        "reference": None,
    }


def parse_history_query(query: Mapping[str, str]) -> tuple[Action, int, int | None]:
    """``action`` (required), ``limit`` (1..500, default 50), ``before`` (ms, optional)."""
    errors = []
    action: Action | None = None
    try:
        action = Action(query.get("action", ""))
    except ValueError:
        choices = ", ".join(a.value for a in Action)
        errors.append({"field": "action", "message": f"required, one of {choices}"})
    limit, before = 50, None
    try:
        limit = int(query.get("limit", "50"))
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise ValueError
    except ValueError:
        errors.append({"field": "limit", "message": f"an integer from 1 to {MAX_HISTORY_LIMIT}"})
    if "before" in query:
        try:
            before = int(query["before"])
        except ValueError:
            errors.append({"field": "before", "message": "milliseconds since the epoch"})
    if errors or action is None:
        raise InvalidInput(errors)
    return action, limit, before


async def charge_history(
    store: CreditStore,
    org_id: str,
    user_id: str,
    action: Action | str,
    limit: int,
    before_ms: int | None,
) -> dict[str, Any]:
    """A user's decisions for one action, newest first; page on with ``next_before``.

    ``before_ms`` is exclusive: decisions of the same millisecond as the last entry of a
    page are not on the next one (decision times of one user rarely tie).
    """
    action = Action(action)
    limit = max(1, min(limit, MAX_HISTORY_LIMIT))
    keys = store.keys.org(org_id)
    high = "+inf" if before_ms is None else f"({before_ms}"
    members: list[tuple[str, float]] = await store.redis.zrevrangebyscore(  # type: ignore[assignment]
        keys.history(user_id, action.value), high, "-inf", start=0, num=limit, withscores=True
    )
    raws: list[str | None] = []
    if members:
        pipe = store.redis.pipeline(transaction=False)
        for request_id, _ in members:
            pipe.hget(keys.request(request_id), "rec")
        raws = await pipe.execute()
    entries = [_history_entry(ChargeRecord.from_script(orjson.loads(raw))) for raw in raws if raw]
    return {
        "org_id": org_id,
        "user_id": user_id,
        "action": action.value,
        "charges": entries,
        "next_before": int(members[-1][1]) if len(members) == limit else None,
    }


def render_record(org_id: str, record: ChargeRecord) -> dict[str, Any]:
    """A stored decision as the API shows it (items by position: ids are not stored)."""
    items = []
    for index, outcome in enumerate(record.outcomes):
        item: dict[str, Any] = {"index": index, "outcome": outcome.value}
        if outcome is Outcome.FREE_REPEAT and index < len(record.free_until_ms):
            item["free_until"] = rfc3339(record.free_until_ms[index])
        items.append(item)
    return {
        "org_id": org_id,
        "request_id": record.request_id,
        "status": "approved" if record.approved else "rejected",
        "reason": record.reason.value if record.reason else None,
        "detail": record.detail,
        "credits_charged": record.credits,
        "credits_needed": record.needed,
        "credits_saved": record.saved,
        "balance_after": record.balance,
        "period_id": record.period_id,
        "decided_at": rfc3339(record.decided_ms),
        "sequence": record.sequence,
        "items": items,
        "items_by_outcome": _outcome_counts(record),
        "reference": None,
    }


async def one_decision(store: CreditStore, org_id: str, request_id: str) -> dict[str, Any] | None:
    if not is_identifier(request_id):
        return None
    raw = await store.redis.hget(store.keys.org(org_id).request(request_id), "rec")
    if raw is None:
        return None
    return render_record(org_id, ChargeRecord.from_script(orjson.loads(raw)))


# ---- quote -------------------------------------------------------------------------


def parse_quote(
    body: Any, now_ms: int, max_items: int = DEFAULT_MAX_ITEMS
) -> tuple[ChargeRequest, list[bool | None]]:
    """A quote body: a ChargeRequest without ``request_id`` (``requested_at`` optional),
    whose contact items may carry a ``has_verified_email`` hint. Raises ``InvalidInput``."""
    if not isinstance(body, dict):
        raise InvalidInput([{"field": "body", "message": "expected a JSON object"}])
    if "request_id" in body:
        raise InvalidInput(
            [{"field": "request_id", "message": "a quote has no request_id; it decides nothing"}]
        )
    items = body.get("items")
    hints: list[bool | None] = []
    errors: list[dict[str, str]] = []
    if isinstance(items, list):
        if len(items) > max_items:
            raise InvalidInput(
                [{"field": "items", "message": f"{len(items)} items, at most {max_items}"}]
            )
        stripped = []
        for index, given in enumerate(items):
            item = given
            if isinstance(given, dict) and VERIFIED_HINT in given:
                item = dict(given)
                hint = item.pop(VERIFIED_HINT)
                if not isinstance(hint, bool) and hint is not None:
                    errors.append(
                        {"field": f"items.{index}.{VERIFIED_HINT}", "message": "a boolean"}
                    )
                elif hint is not None and item.get("type") != "contact":
                    errors.append(
                        {
                            "field": f"items.{index}.{VERIFIED_HINT}",
                            "message": "applies to contact items only",
                        }
                    )
                hints.append(hint if isinstance(hint, bool) else None)
            else:
                hints.append(None)
            stripped.append(item)
        body = {**body, "items": stripped}
    body = {"requested_at": rfc3339(now_ms), **body, "request_id": QUOTE_REQUEST_ID}
    try:
        request = ChargeRequest.model_validate(body)
    except ValidationError as exc:
        errors.extend(_field_errors(exc))
    if errors:
        raise InvalidInput(errors)
    return request, hints


async def quote(
    store: CreditStore, body: Any, now_ms: int, max_items: int = DEFAULT_MAX_ITEMS
) -> dict[str, Any]:
    """What a charge request would cost now, item by item; it changes nothing."""
    request, hints = parse_quote(body, now_ms, max_items)
    call = ChargeCall.of(request)
    record = await store.quote(call, now_ms)
    itemised = record
    if not record.approved and record.reason in _BALANCE_REASONS:
        # rejected after the windows were assessed: the script marked every item
        # not_charged; ask again as a partial request without a ceiling to see which
        # items are free and which would be charged
        looser = dataclasses.replace(call, partial=True, max_credits=None)
        retry = await store.quote(looser, now_ms)
        if retry.approved:
            itemised = retry

    items = []
    verified_only = 0
    for index, item in enumerate(request.items):
        outcome = itemised.outcomes[index] if index < len(itemised.outcomes) else None
        entry: dict[str, Any] = item.model_dump(exclude_none=True)
        if not record.approved and record.reason not in _BALANCE_REASONS:
            # refused before any item was assessed (permission, license): nothing is due
            entry["outcome"] = "no_charge"
        elif outcome is not None:
            entry["outcome"] = QUOTE_OUTCOMES[outcome]
            if outcome is Outcome.FREE_REPEAT:
                entry["free_until"] = rfc3339(itemised.free_until_ms[index])
        hint = hints[index] if index < len(hints) else None
        if hint is not None:
            entry[VERIFIED_HINT] = hint
        if entry.get("outcome") == "would_charge" and hint is True:
            verified_only += 1
        items.append(entry)

    remaining = record.balance + (record.credits if record.approved else 0)
    return {
        "org_id": request.org_id,
        "user_id": request.user_id,
        "action": request.action.value,
        "quoted_at": rfc3339(now_ms),
        "items": items,
        "max_credits": record.needed,
        "max_credits_verified_only": verified_only,
        "credits_if_submitted_now": record.credits,
        "credits_saved": itemised.saved,
        "remaining": remaining,
        "period_id": record.period_id,
        "would_be_approved": record.approved,
        "reason": record.reason.value if record.reason else None,
        "detail": record.detail,
    }

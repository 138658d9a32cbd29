"""Read-side reports: team usage, a user's charge history, one decision.

Plain async functions over a ``CreditStore`` returning JSON-ready dicts; the views
and the CLI both call them. Every report reads, through the store, only what the
charge script keeps up to date, by key, never by scanning the keyspace (the layout is
the store's: ``store/keys.py``, ``store/reads.py``):

- usage: the period's counters, O(users x actions) whatever the number of past
  periods the organisation's usage keeps;
- history: a page of the user's decisions of one action, paged by rank, then the
  page's stored decisions in one pipeline: O(page), each entry O(its items) to read
  since a stored decision lists its items' outcomes;
- one decision: its stored decision.

Decisions are rendered with ``charge_result``, the function that renders the message
published on ``credits.charge.results``: the API shows exactly the decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from creditgate.api.errors import InvalidInput
from creditgate.domain.charges import Action, Outcome
from creditgate.domain.decisions import (
    ChargeRecord,
    RequestView,
    charge_result,
    item_counts,
    itemised,
)
from creditgate.domain.holds import resolution_message
from creditgate.domain.ids import is_identifier, rfc3339
from creditgate.store.gateway import USAGE_METRICS, CreditStore, StoredDecision

DEFAULT_HISTORY_LIMIT = 50
MAX_HISTORY_LIMIT = 500
# GET /v1/orgs/{org}/requests/{id} pages a decision's items: this many at most a page
MAX_ITEMS_PAGE = 1000


async def org_exists(store: CreditStore, org_id: str) -> bool:
    """An organisation is known once a command gave it a license or a member."""
    return await store.org_exists(org_id)


# ---- usage -------------------------------------------------------------------------


def _empty_counts() -> dict[str, int]:
    return dict.fromkeys(USAGE_METRICS, 0)


def _usage_row(counts: Mapping[str, int]) -> dict[str, int]:
    return {
        "credits_used": counts["credits"],
        "requests": counts["requests"],
        "credits_saved": counts["saved"],
        "rejected": counts["rejected"],
        "credits_refunded": counts["refunded"],
        "credits_held": counts["held"],
    }


async def usage_report(
    store: CreditStore, org_id: str, period_id: str | None, now_ms: int
) -> dict[str, Any] | None:
    """Per user of a period: credits by action, requests, credits saved, rejections.

    ``period_id`` None means the license's current period. None is returned for an
    organisation without a license. ``requests`` counts approved requests; rejected
    ones are counted apart.
    """
    current = await store.current_period(org_id)
    if current is None:
        return None
    period = period_id or current
    # O(users x actions) reads, whatever the number of past periods
    users = await store.period_usage(org_id, period, [action.value for action in Action])

    totals_by_action: dict[str, dict[str, int]] = {a.value: _empty_counts() for a in Action}
    rows: list[dict[str, Any]] = []
    for user, by_action in users.items():
        row = _empty_counts()
        for action, counts in by_action.items():
            for metric, count in counts.items():
                row[metric] += count
                totals_by_action[action][metric] += count
        rows.append(
            {
                "user_id": user,
                **_usage_row(row),
                "by_action": {a: _usage_row(c) for a, c in sorted(by_action.items())},
            }
        )
    rows.sort(key=lambda r: (-r["credits_used"], r["user_id"]))
    totals = _empty_counts()
    for counts in totals_by_action.values():
        for metric, count in counts.items():
            totals[metric] += count
    return {
        "org_id": org_id,
        "period_id": period,
        "current_period": period == current,
        "generated_at": rfc3339(now_ms),
        "users": rows,
        "totals": {
            **_usage_row(totals),
            "by_action": {a: _usage_row(c) for a, c in sorted(totals_by_action.items())},
        },
    }


# ---- the team ------------------------------------------------------------------------


async def team_report(store: CreditStore, org_id: str, now_ms: int) -> dict[str, Any] | None:
    """The admin's *My team*: per member, their role, whether they may use credits, their
    credit limit per period (None: none) and their usage of the current period by action
    (``usage_report``'s rows).

    Users with usage who are no longer members are listed too (role None): their
    credits were used this period. None for an unknown organisation.
    """
    if not await org_exists(store, org_id):
        return None
    found = await store.members(org_id)
    roles, disallowed = found.roles, found.disallowed
    usage = await usage_report(store, org_id, None, now_ms)
    rows = {row["user_id"]: row for row in (usage or {}).get("users", [])}
    empty = {**_usage_row(_empty_counts()), "by_action": {}}
    members = [
        {
            "user_id": user,
            "role": roles.get(user),
            "credits_allowed": user not in disallowed,
            "credit_limit": found.limits.get(user),
            **{k: v for k, v in rows.get(user, empty).items() if k != "user_id"},
        }
        for user in sorted(set(roles) | set(rows))
    ]
    return {
        "org_id": org_id,
        "period_id": usage["period_id"] if usage else None,
        "generated_at": rfc3339(now_ms),
        "members": members,
    }


# ---- history -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where a history page starts: strictly before ``before_ms``, or, when
    ``request_id`` is given, right after that entry (``"<ms>:<request_id>"``).

    A batch decides many requests at one instant, so entries share times: the
    request id keeps a page boundary between two of them exact.
    """

    before_ms: int
    request_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> Cursor:
        ms, _, request_id = text.partition(":")
        if not ms.isdigit() or (request_id and not is_identifier(request_id)):
            raise ValueError(text)
        return cls(int(ms), request_id or None)

    def __str__(self) -> str:
        return f"{self.before_ms}:{self.request_id}" if self.request_id else str(self.before_ms)


@dataclass(frozen=True)
class HistoryQuery:
    action: Action
    limit: int = DEFAULT_HISTORY_LIMIT
    before: Cursor | None = None


def parse_history_query(query: Mapping[str, str]) -> HistoryQuery:
    """``action`` (required), ``limit`` (1..500, default 50), ``before`` (a cursor)."""
    errors = []
    action: Action | None = None
    try:
        action = Action(query.get("action", ""))
    except ValueError:
        choices = ", ".join(a.value for a in Action)
        errors.append({"field": "action", "message": f"required, one of {choices}"})
    limit = DEFAULT_HISTORY_LIMIT
    if "limit" in query:
        text = query["limit"]
        if text.isdigit() and 1 <= int(text) <= MAX_HISTORY_LIMIT:
            limit = int(text)
        else:
            errors.append(
                {"field": "limit", "message": f"an integer from 1 to {MAX_HISTORY_LIMIT}"}
            )
    before = None
    if "before" in query:
        try:
            before = Cursor.parse(query["before"])
        except ValueError:
            errors.append(
                {
                    "field": "before",
                    "message": "a next_before cursor, or milliseconds since the epoch",
                }
            )
    if errors or action is None:
        raise InvalidInput(errors)
    return HistoryQuery(action, limit, before)


def hold_state(
    record: ChargeRecord, resolution: ChargeRecord | None, window_days: float
) -> dict[str, Any]:
    """What became of a hold: still ``open``, or how it was resolved (``settled``,
    ``released``, ``expired``), by which settlement, when, and what it released."""
    if resolution is None:
        return {
            "status": "open",
            "settlement_id": None,
            "resolved_at": None,
            "credits_released": 0,
            "message": f"{record.held} credit{'' if record.held == 1 else 's'} held",
        }
    return {
        "status": resolution.status,
        "settlement_id": resolution.raw.get("settlement_id"),
        "resolved_at": rfc3339(resolution.decided_ms),
        "credits_released": int(resolution.raw.get("released", 0)),
        "message": resolution_message(resolution, window_days),
    }


def _as_resolved(
    result: dict[str, Any], decision: StoredDecision, window_days: float
) -> tuple[dict[str, Any], ChargeRecord]:
    """A decision as the read side shows it, with the record its items and credits come
    from: a hold's are its resolution's once resolved (what the export cost), and it
    carries ``hold``; any other decision is its result as published."""
    record = decision.record
    if not record.is_hold:
        return result, record
    shown = decision.resolution or record
    return result | {
        "credits_charged": shown.credits,
        "hold": hold_state(record, decision.resolution, window_days),
    }, shown


def history_entry(result: dict[str, Any], record: ChargeRecord) -> dict[str, Any]:
    """A charge result without its item list (a page stays small): counts instead."""
    counts = {outcome.value: 0 for outcome in Outcome}
    for outcome in record.outcomes:
        counts[outcome.value] += 1
    # "free repeats with their end": the latest end of the windows that made items free
    free_ends = [
        until
        for outcome, until in zip(record.outcomes, record.free_until_ms, strict=False)
        if outcome is Outcome.FREE_REPEAT and until
    ]
    return {
        **{
            name: value
            for name, value in result.items()
            if name not in ("items", "counts", "items_truncated")
        },
        "item_count": len(record.outcomes),
        "items_by_outcome": counts,
        "credits_saved": record.saved,
        "free_repeats_until": rfc3339(max(free_ends)) if free_ends else None,
    }


async def charge_history(
    store: CreditStore,
    org_id: str,
    user_id: str,
    query: HistoryQuery,
    window_days: float,
) -> dict[str, Any] | None:
    """A user's decisions for one action, newest first; page on with ``next_before``.

    None for an unknown organisation.
    """
    if not await org_exists(store, org_id):
        return None
    before = query.before
    found = await store.history_page(
        org_id,
        user_id,
        query.action.value,
        query.limit,
        None if before is None else before.before_ms,
        None if before is None else before.request_id,
    )
    members, more = found[: query.limit], len(found) > query.limit
    stored = await store.stored_decisions(org_id, [request_id for request_id, _ in members])
    entries = []
    for (request_id, _), decision in zip(members, stored, strict=True):
        if decision is None:  # the decision expired before its history entry was trimmed
            continue
        # without its items: an entry shows their counts, taken from the record
        view = dataclasses.replace(
            _view(org_id, request_id, decision.summary, user_id, query.action), items=[]
        )
        result, record = _as_resolved(
            charge_result(view, decision.record, window_days), decision, window_days
        )
        entry = history_entry(result, record)
        entries.append(with_refunds(entry, decision.refunded, entry["items_by_outcome"]))
    last = members[-1] if members else None
    return {
        "org_id": org_id,
        "user_id": user_id,
        "action": query.action.value,
        "charges": entries,
        "next_before": str(Cursor(last[1], last[0])) if more and last else None,
    }


def with_refunds(
    entry: dict[str, Any], refunded: tuple[int, ...], by_outcome: dict[str, int]
) -> dict[str, Any]:
    """A history entry with its refunded items counted apart from the charged ones."""
    by_outcome[Outcome.CHARGED.value] -= len(refunded)
    by_outcome[Outcome.REFUNDED.value] += len(refunded)
    return entry | {"credits_refunded": len(refunded)}


def _view(
    org_id: str, request_id: str, summary: str | None, user_id: str, action: Action
) -> RequestView:
    if summary:
        return RequestView.from_summary(org_id, request_id, summary)
    # stored before decisions kept their request: what the history key tells is all
    return RequestView(org_id, request_id, user_id, action, [])


# ---- one decision --------------------------------------------------------------------


@dataclass(frozen=True)
class ItemsPage:
    offset: int = 0
    limit: int = MAX_ITEMS_PAGE


def parse_items_page(query: Mapping[str, str]) -> ItemsPage:
    """``offset`` (from 0, default 0) and ``limit`` (1..1000, default 1000)."""
    errors = []
    offset, limit = 0, MAX_ITEMS_PAGE
    if "offset" in query:
        if query["offset"].isdigit() and len(query["offset"]) <= 9:
            offset = int(query["offset"])
        else:
            errors.append({"field": "offset", "message": "an integer from 0"})
    if "limit" in query:
        text = query["limit"]
        if text.isdigit() and len(text) <= 9 and 1 <= int(text) <= MAX_ITEMS_PAGE:
            limit = int(text)
        else:
            errors.append({"field": "limit", "message": f"an integer from 1 to {MAX_ITEMS_PAGE}"})
    if errors:
        raise InvalidInput(errors)
    return ItemsPage(offset, limit)


async def one_decision(
    store: CreditStore,
    org_id: str,
    request_id: str,
    window_days: float,
    page: ItemsPage | None = None,
) -> dict[str, Any] | None:
    """The request's decision as published on ``credits.charge.results``, with every
    item, a page at a time.

    ``counts`` has all of them; ``items`` those of the page (``offset``, ``limit``,
    default the first 1,000), ``items_total`` how many there are and ``next_offset``
    where the next page starts (null on the last). ``items_truncated`` is true when
    the page is not all of them; for a decision of up to a page of items the answer is
    the published result, plus the paging fields.

    None when there is none (or it was stored without its request, before summaries
    were kept, and so cannot be rendered as its result).
    """
    if not is_identifier(request_id):
        return None
    decision = await store.stored_decision(org_id, request_id)
    if decision is None or decision.summary is None:
        return None
    page = page or ItemsPage()
    view = RequestView.from_summary(org_id, request_id, decision.summary)
    found, record = _as_resolved(
        charge_result(view, decision.record, window_days, None), decision, window_days
    )
    items = found["items"]
    if record is not decision.record:  # a resolved hold: its items as resolved
        items = itemised(view.items, record)
    for index in decision.refunded:
        items[index]["outcome"] = Outcome.REFUNDED.value
    found["counts"] = item_counts([item["outcome"] for item in items])
    found["credits_refunded"] = len(decision.refunded)
    end = page.offset + page.limit
    found["items"] = items[page.offset : end]
    found["items_truncated"] = len(found["items"]) < len(items)
    found["items_total"] = len(items)
    found["offset"] = page.offset
    found["limit"] = page.limit
    found["next_offset"] = end if end < len(items) else None
    return found

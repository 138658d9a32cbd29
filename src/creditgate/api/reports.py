"""Read-side reports: team usage, a user's charge history, one decision.

Plain async functions over a ``CreditStore`` returning JSON-ready dicts; the views
and the CLI both call them. Every report reads only what the charge script keeps up
to date, by key, never by scanning the keyspace:

- usage: one hash per organisation (``HGETALL``), fields ``period|user|action|metric``:
  O(users x actions) for each period the hash holds (it keeps past periods too);
- history: one sorted set per user and action, paged by rank, then the page's stored
  decisions (``HMGET`` of ``rec`` and ``req``), one pipeline: O(page), each entry
  O(its items) to read since a stored decision lists its items' outcomes;
- one decision: its request hash.

Decisions are rendered with ``charge_result``, the function that renders the message
published on ``credits.charge.results``: the API shows exactly the decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from creditgate.api.errors import InvalidInput
from creditgate.domain.charges import Action, Outcome
from creditgate.domain.decisions import ChargeRecord, RequestView, charge_result
from creditgate.domain.ids import is_identifier, rfc3339
from creditgate.store.gateway import CreditStore

USAGE_METRICS = ("credits", "requests", "saved", "rejected")
DEFAULT_HISTORY_LIMIT = 50
MAX_HISTORY_LIMIT = 500
# GET /v1/orgs/{org}/requests/{id} pages a decision's items: this many at most a page
MAX_ITEMS_PAGE = 1000


async def org_exists(store: CreditStore, org_id: str) -> bool:
    """An organisation is known once a command gave it a license or a member."""
    keys = store.keys.org(org_id)
    return bool(await store.redis.exists(keys.license, keys.members))


# ---- usage -------------------------------------------------------------------------


def _empty_counts() -> dict[str, int]:
    return dict.fromkeys(USAGE_METRICS, 0)


def _usage_row(counts: Mapping[str, int]) -> dict[str, int]:
    return {
        "credits_used": counts["credits"],
        "requests": counts["requests"],
        "credits_saved": counts["saved"],
        "rejected": counts["rejected"],
    }


async def usage_report(
    store: CreditStore, org_id: str, period_id: str | None, now_ms: int
) -> dict[str, Any] | None:
    """Per user of a period: credits by action, requests, credits saved, rejections.

    ``period_id`` None means the license's current period. None is returned for an
    organisation without a license. ``requests`` counts approved requests; rejected
    ones are counted apart.
    """
    keys = store.keys.org(org_id)
    current = await store.redis.hget(keys.license, "period_id")
    if current is None:
        return None
    period = period_id or str(current)
    # the charge script lists the period's users in one field: O(users) reads, whatever
    # the number of past periods
    listed = await store.redis.hget(keys.usage, f"{period}|*users")
    period_users = [] if listed is None else str(listed).split(",")
    fields = [
        (user, action.value, metric)
        for user in period_users
        for action in Action
        for metric in USAGE_METRICS
    ]
    names = [f"{period}|{u}|{a}|{m}" for u, a, m in fields]
    values = await store.redis.hmget(keys.usage, names) if names else []

    users: dict[str, dict[str, dict[str, int]]] = {}
    for (user, action, metric), value in zip(fields, values, strict=True):
        by_action = users.setdefault(user, {})
        if value is not None:
            by_action.setdefault(action, _empty_counts())[metric] += int(value)

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


def history_entry(result: dict[str, Any], record: ChargeRecord) -> dict[str, Any]:
    """A charge result without its item list (a page stays small): counts instead."""
    counts = {outcome.value: 0 for outcome in Outcome}
    for outcome in record.outcomes:
        counts[outcome.value] += 1
    return {
        **{
            name: value
            for name, value in result.items()
            if name not in ("items", "counts", "items_truncated")
        },
        "item_count": len(record.outcomes),
        "items_by_outcome": counts,
        "credits_saved": record.saved,
    }


async def _page(
    store: CreditStore, key: str, limit: int, before: Cursor | None
) -> list[tuple[str, int]]:
    """Up to ``limit + 1`` members of a history set, newest first, after the cursor."""
    redis = store.redis
    if before is None:
        found: Any = await redis.zrevrange(key, 0, limit, withscores=True)
        return [(str(member), int(score)) for member, score in found]
    found = None
    if before.request_id is not None:
        rank = await redis.zrevrank(key, before.request_id)
        if isinstance(rank, int):
            found = await redis.zrevrange(key, rank + 1, rank + limit + 1, withscores=True)
    if found is None:
        # only a time was given, or the cursor's entry has expired: go by time
        found = await redis.zrevrangebyscore(
            key, f"({before.before_ms}", "-inf", start=0, num=limit + 1, withscores=True
        )
    return [(str(member), int(score)) for member, score in found]


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
    keys = store.keys.org(org_id)
    found = await _page(store, keys.history(user_id, query.action.value), query.limit, query.before)
    members, more = found[: query.limit], len(found) > query.limit
    pipe = store.redis.pipeline(transaction=False)
    for request_id, _ in members:
        pipe.hmget(keys.request(request_id), "rec", "req")
    stored = await pipe.execute() if members else []
    entries = []
    for (request_id, _), (raw, summary) in zip(members, stored, strict=True):
        if raw is None:  # the decision expired before its history entry was trimmed
            continue
        record = ChargeRecord.from_script(orjson.loads(raw))
        # without its items: an entry shows their counts, taken from the record
        view = dataclasses.replace(
            _view(org_id, request_id, summary, user_id, query.action), items=[]
        )
        entries.append(history_entry(charge_result(view, record, window_days), record))
    last = members[-1] if members else None
    return {
        "org_id": org_id,
        "user_id": user_id,
        "action": query.action.value,
        "charges": entries,
        "next_before": str(Cursor(last[1], last[0])) if more and last else None,
    }


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
    raw, summary = await store.redis.hmget(
        store.keys.org(org_id).request(request_id), ["rec", "req"]
    )
    if not isinstance(raw, str) or not isinstance(summary, str):
        return None
    page = page or ItemsPage()
    view = RequestView.from_summary(org_id, request_id, summary)
    found = charge_result(view, ChargeRecord.from_script(orjson.loads(raw)), window_days, None)
    items = found["items"]
    end = page.offset + page.limit
    found["items"] = items[page.offset : end]
    found["items_truncated"] = len(found["items"]) < len(items)
    found["items_total"] = len(items)
    found["offset"] = page.offset
    found["limit"] = page.limit
    found["next_offset"] = end if end < len(items) else None
    return found

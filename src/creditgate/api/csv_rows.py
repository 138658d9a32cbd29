"""The reports as CSV (``?format=csv``): the same rows as their JSON, one line each.

RFC 4180 through the ``csv`` module (a header line, CRLF line ends, fields quoted when
they hold a comma, a quote or a line break). Pure: a report's dict in, text out. A
reference, free-form JSON, is one field holding its JSON text; a missing value is an
empty field.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from creditgate.domain.charges import Action, Outcome

CSV_CONTENT_TYPE = "text/csv"
_ACTIONS = [a.value for a in Action]
_OUTCOMES = [o.value for o in Outcome]


def _text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(headers)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def history_csv(history: dict[str, Any]) -> str:
    """A page of ``reports.charge_history``: one line per decision."""
    headers = [
        "decided_at",
        "request_id",
        "type",
        "reason",
        "credits_charged",
        "item_count",
        *(f"items_{o}" for o in _OUTCOMES),
        "credits_saved",
        "free_repeats_until",
        "balance_after",
        "period_id",
        "reference",
        "credits_refunded",
        "credits_held",
        "hold_status",
    ]
    rows = [
        [
            c["decided_at"],
            c["request_id"],
            c["type"],
            c["reason"],
            c["credits_charged"],
            c["item_count"],
            *(c["items_by_outcome"].get(o, 0) for o in _OUTCOMES),
            c["credits_saved"],
            c["free_repeats_until"],
            c["balance_after"],
            c["period_id"],
            c["reference"],
            c["credits_refunded"],
            c.get("credits_held"),
            (c.get("hold") or {}).get("status"),
        ]
        for c in history["charges"]
    ]
    return _text(headers, rows)


def _usage_cells(counts: dict[str, Any]) -> list[Any]:
    by_action = counts["by_action"]
    return [
        counts["credits_used"],
        *(by_action.get(a, {}).get("credits_used", 0) for a in _ACTIONS),
        counts["requests"],
        counts["credits_saved"],
        counts["rejected"],
        counts["credits_refunded"],
        counts["credits_held"],
    ]


_USAGE_HEADERS = [
    "credits_used",
    *(f"credits_{a}" for a in _ACTIONS),
    "requests",
    "credits_saved",
    "rejected",
    "credits_refunded",
    "credits_held",
]


def usage_csv(report: dict[str, Any]) -> str:
    """``reports.usage_report``: one line per user of the period, then the totals."""
    rows = [[report["period_id"], u["user_id"], *_usage_cells(u)] for u in report["users"]]
    rows.append([report["period_id"], "", *_usage_cells(report["totals"])])
    return _text(["period_id", "user_id", *_USAGE_HEADERS], rows)


def team_csv(team: dict[str, Any]) -> str:
    """``reports.team_report``: one line per member."""
    rows = [
        [
            team["period_id"],
            m["user_id"],
            m["role"],
            m["credits_allowed"],
            m["credit_limit"],
            *_usage_cells(m),
        ]
        for m in team["members"]
    ]
    headers = ["period_id", "user_id", "role", "credits_allowed", "credit_limit"]
    return _text([*headers, *_USAGE_HEADERS], rows)

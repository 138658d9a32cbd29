"""Plain-text tables of the reports, for the CLI. Pure: a dict in, a string out.

Kept instead of ``rich`` (considered): these tables are a few padded columns, and as
plain text they stay the same in a pipe, a CI log or ``grep`` (rich drops colour and
box drawing there anyway, and wraps or truncates to the terminal's width), they need
no dependency in the worker's image, and tests compare them as strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from creditgate.domain.charges import Action

_ACTIONS = [a.value for a in Action]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, the rest left."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = (
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def credits_table(view: dict[str, Any]) -> str:
    rows = [
        ("organisation", view["org_id"]),
        ("period", view["period_id"]),
        ("starts", view["starts_at"]),
        ("ends", view["ends_at"]),
        ("active", view["active"]),
        ("period credits", view["period_credits"]),
        ("granted", view["granted"]),
        ("used", view["used"]),
        ("remaining", view["remaining"]),
    ]
    return table(("credits", ""), [(k, _cell(v)) for k, v in rows])


def usage_table(report: dict[str, Any]) -> str:
    current = " (current)" if report["current_period"] else ""
    head = f"{report['org_id']}, period {report['period_id']}{current}, at {report['generated_at']}"
    headers = ["user", "credits", *_ACTIONS, "requests", "saved", "rejected"]

    def row(name: str, counts: dict[str, Any]) -> list[Any]:
        by_action = counts["by_action"]
        return [
            name,
            counts["credits_used"],
            *(by_action[a]["credits_used"] if a in by_action else 0 for a in _ACTIONS),
            counts["requests"],
            counts["credits_saved"],
            counts["rejected"],
        ]

    rows = [row(u["user_id"], u) for u in report["users"]]
    rows.append(row("total", report["totals"]))
    return f"{head}\n{table(headers, rows)}"


def charges_table(history: dict[str, Any]) -> str:
    head = f"{history['org_id']} / {history['user_id']}: {history['action']}, newest first"
    headers = ["decided at", "request", "credits", "items", "free", "outcome", "reference"]
    rows = [
        [
            c["decided_at"],
            c["request_id"],
            c["credits_charged"],
            c["item_count"],
            c["credits_saved"],
            "approved" if c["type"] == "charge.approved" else f"rejected: {c['reason']}",
            c["reference"],
        ]
        for c in history["charges"]
    ]
    text = f"{head}\n{table(headers, rows)}"
    if history["next_before"]:
        text += f"\nmore: --before {history['next_before']}"
    return text


def quote_table(quote: dict[str, Any]) -> str:
    headers = ["#", "type", "id", "company", "outcome", "free until", "if submitted now"]
    rows = [
        [
            index,
            item["type"],
            item["id"],
            item.get("company_id"),
            item["outcome"],
            item.get("free_until"),
            item["if_submitted_now"],
        ]
        for index, item in enumerate(quote["items"], start=1)
    ]
    verdict = "approved" if quote["would_be_approved"] else f"rejected ({quote['reason']})"
    summary = [
        ("max credits", quote["max_credits"]),
        ("max, verified emails only", quote["max_credits_verified_only"]),
        ("charged if submitted now", quote["credits_if_submitted_now"]),
        ("saved by repeat windows", quote["credits_saved"]),
        ("remaining now", quote["remaining"]),
        ("would be", verdict),
        ("message", quote["message"]),
    ]
    return f"{table(headers, rows)}\n\n{table(('quote', ''), summary)}"

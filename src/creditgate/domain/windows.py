"""Repeat windows: which window each item of a request opens.

A charged item opens a window, for ``repeat_window_ms``, in which charging the same
entity again is free. Export and CRM push share one window per entity; email
verification has its own, per contact. A contact exported or pushed with its
company also opens its company's window (its company is then "seen" too).

A window's name, ``<kind>:<entity id>``, is what the ledger publishes in
``windows[].window`` (``domain.messages.WindowName``) and what the store's window key
ends with (``store.keys.OrgKeys.window``).
"""

from __future__ import annotations

from typing import Any

from creditgate.domain.charges import Action, ChargeRequest

SHARED_CONTACT = "contact"
SHARED_COMPANY = "company"
VERIFIED_CONTACT = "verify"


def window_name(kind: str, entity_id: str) -> str:
    return f"{kind}:{entity_id}"


def item_windows(request: ChargeRequest) -> list[tuple[str, str | None]]:
    """Per item of ``request``, in order: the name of the window it opens, and of its
    company's window when the item opens that one too (else None)."""
    return [
        _windows(request.action, item.type, item.id, getattr(item, "company_id", None))
        for item in request.items
    ]


def stored_item_windows(
    action: Action, items: list[dict[str, Any]]
) -> list[tuple[str, str | None]]:
    """``item_windows`` of a request as stored beside its decision (its summary's items)."""
    return [_windows(action, i["type"], i["id"], i.get("company_id")) for i in items]


def window_slots(
    pairs: list[tuple[str, str | None]],
) -> tuple[tuple[str, ...], tuple[tuple[int, int | None], ...]]:
    """The distinct window names of a request, in order of first use, and per item its
    window and its company's window (or None) as indexes into them: the slots of the
    charge script's windows, which its stored decision's ``opened`` counts in."""
    index: dict[str, int] = {}

    def slot(name: str) -> int:
        return index.setdefault(name, len(index))

    items = tuple(
        (slot(window), None if company is None else slot(company)) for window, company in pairs
    )
    return tuple(index), items


def _windows(
    action: Action, kind: str, entity_id: str, company: str | None
) -> tuple[str, str | None]:
    if action is Action.EMAIL_VERIFICATION:
        return window_name(VERIFIED_CONTACT, entity_id), None
    if kind == "contact":
        return (
            window_name(SHARED_CONTACT, entity_id),
            window_name(SHARED_COMPANY, company) if company else None,
        )
    return window_name(SHARED_COMPANY, entity_id), None

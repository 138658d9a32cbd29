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

from creditgate.domain.charges import Action, ChargeRequest

SHARED_CONTACT = "contact"
SHARED_COMPANY = "company"
VERIFIED_CONTACT = "verify"


def window_name(kind: str, entity_id: str) -> str:
    return f"{kind}:{entity_id}"


def item_windows(request: ChargeRequest) -> list[tuple[str, str | None]]:
    """Per item of ``request``, in order: the name of the window it opens, and of its
    company's window when the item opens that one too (else None)."""
    found: list[tuple[str, str | None]] = []
    for item in request.items:
        if request.action is Action.EMAIL_VERIFICATION:
            found.append((window_name(VERIFIED_CONTACT, item.id), None))
        elif item.type == "contact":
            company = item.company_id
            found.append(
                (
                    window_name(SHARED_CONTACT, item.id),
                    window_name(SHARED_COMPANY, company) if company else None,
                )
            )
        else:
            found.append((window_name(SHARED_COMPANY, item.id), None))
    return found

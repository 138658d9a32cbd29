"""Reading input messages: a valid request, a readable-but-invalid one, or unreadable bytes.

The three answers matter downstream: a valid request is decided; a readable one
(its ``org_id`` and id can be read) that breaks the contract is rejected with
``invalid_request`` so its producer hears back; unreadable bytes go to the dead-letter
topic with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from creditgate.domain.charges import Action, ChargeRequest, body_fingerprint
from creditgate.domain.commands import LicenseCommand, license_command_adapter
from creditgate.domain.holds import HoldSettlement
from creditgate.domain.ids import is_identifier

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# What a rejection quotes of the input is bounded, so its result (and the Redis record
# and ledger entry that keep the detail) stays bounded whatever the input: a field error
# names the field, and an unknown field's name may be as long as the message.
MAX_DETAIL_CHARS = 1000
MAX_ECHOED_TYPE_CHARS = 128


def bounded_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Unreadable:
    """Bytes that cannot carry a decision: no JSON object, or no readable ids."""

    error: str


@dataclass(frozen=True)
class InvalidRequest:
    org_id: str
    request_id: str
    user_id: str | None
    fingerprint: str
    detail: str


@dataclass(frozen=True)
class InvalidSettlement:
    """A readable settlement (its ``org_id`` and ``settlement_id``) that breaks the
    contract: refused with ``invalid_request``, once."""

    org_id: str
    settlement_id: str
    request_id: str  # the hold's, when readable; else ""
    fingerprint: str
    detail: str


@dataclass(frozen=True)
class InvalidLicenseCommand:
    org_id: str
    command_id: str
    command_type: str
    fingerprint: str
    body: dict[str, Any]
    detail: str


def describe(error: ValidationError, limit: int = 5) -> str:
    """Field errors in one line, e.g. ``items.0.id: String should match pattern ...``."""
    parts = []
    for err in error.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _load_object(raw: bytes | None) -> dict[str, Any] | Unreadable:
    if raw is None:
        return Unreadable("empty message")
    if len(raw) > MAX_MESSAGE_BYTES:
        return Unreadable(f"message of {len(raw)} bytes is larger than {MAX_MESSAGE_BYTES}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Unreadable(f"not UTF-8 JSON: {exc}")
    if not isinstance(body, dict):
        return Unreadable(f"expected a JSON object, got {type(body).__name__}")
    try:
        # orjson reads deeper nesting than it writes; what cannot be written back
        # cannot be fingerprinted or stored
        orjson.dumps(body)
    except TypeError:
        return Unreadable("JSON nested too deeply")
    return body


def read_charge_request(
    raw: bytes | None, expected: Action, max_items: int
) -> ChargeRequest | InvalidRequest | Unreadable:
    body = _load_object(raw)
    if isinstance(body, Unreadable):
        return body
    org_id, request_id = body.get("org_id"), body.get("request_id")
    if not (is_identifier(org_id) and is_identifier(request_id)):
        return Unreadable(
            "org_id and request_id must be identifiers (1-128 characters of [A-Za-z0-9._:@-])"
        )

    def invalid(detail: str) -> InvalidRequest:
        user = body.get("user_id")
        return InvalidRequest(
            org_id,
            request_id,
            user if is_identifier(user) else None,
            body_fingerprint(body),
            bounded_text(f"invalid request: {detail}", MAX_DETAIL_CHARS),
        )

    items = body.get("items")
    if isinstance(items, list) and len(items) > max_items:
        # checked before validation so a huge list costs no per-item work
        return invalid(f"items: {len(items)} items, at most {max_items} allowed")
    try:
        request = ChargeRequest.model_validate(body)
    except ValidationError as exc:
        return invalid(describe(exc))
    if request.action is not expected:
        return invalid(
            f"action {request.action.value!r} does not belong on this topic, "
            f"which takes {expected.value!r}"
        )
    return request


def read_license_command(raw: bytes | None) -> LicenseCommand | InvalidLicenseCommand | Unreadable:
    body = _load_object(raw)
    if isinstance(body, Unreadable):
        return body
    org_id, command_id = body.get("org_id"), body.get("command_id")
    if not (is_identifier(org_id) and is_identifier(command_id)):
        return Unreadable(
            "org_id and command_id must be identifiers (1-128 characters of [A-Za-z0-9._:@-])"
        )
    try:
        return license_command_adapter.validate_python(body)
    except ValidationError as exc:
        kind = body.get("type")
        return InvalidLicenseCommand(
            org_id,
            command_id,
            bounded_text(kind, MAX_ECHOED_TYPE_CHARS) if isinstance(kind, str) else "",
            body_fingerprint(body),
            body,
            bounded_text(f"invalid command: {describe(exc)}", MAX_DETAIL_CHARS),
        )


def read_hold_settlement(raw: bytes | None) -> HoldSettlement | InvalidSettlement | Unreadable:
    body = _load_object(raw)
    if isinstance(body, Unreadable):
        return body
    org_id, settlement_id = body.get("org_id"), body.get("settlement_id")
    if not (is_identifier(org_id) and is_identifier(settlement_id)):
        return Unreadable(
            "org_id and settlement_id must be identifiers (1-128 characters of [A-Za-z0-9._:@-])"
        )
    try:
        return HoldSettlement.model_validate(body)
    except ValidationError as exc:
        request_id = body.get("request_id")
        return InvalidSettlement(
            org_id,
            settlement_id,
            request_id if is_identifier(request_id) else "",
            body_fingerprint(body),
            bounded_text(f"invalid settlement: {describe(exc)}", MAX_DETAIL_CHARS),
        )

"""Reading input bytes: a valid message, a readable-but-invalid one, or unreadable bytes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from creditgate.domain.charges import Action, ChargeRequest, ContactItem, body_fingerprint
from creditgate.domain.commands import Grant, MemberUpsert, StartPeriod
from creditgate.domain.intake import (
    MAX_MESSAGE_BYTES,
    InvalidLicenseCommand,
    InvalidRequest,
    Unreadable,
    read_charge_request,
    read_license_command,
)


def request_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": "exp-2026-11-26-0001",
        "org_id": "acme",
        "user_id": "u-17",
        "action": "export",
        "items": [
            {"type": "contact", "id": "c-1", "company_id": "co-9"},
            {"type": "company", "id": "co-3"},
        ],
        "max_credits": 2,
        "on_insufficient": "reject",
        "verified_email_found": None,
        "requested_at": "2026-11-26T10:00:00Z",
        "reference": {"export_id": "e-55", "crm": "hubspot"},
    }
    body.update(changes)
    return body


def verification_body(**changes: Any) -> dict[str, Any]:
    return request_body(
        action="email_verification",
        items=[{"type": "contact", "id": "c-1"}],
        verified_email_found=True,
        max_credits=None,
        **changes,
    )


def read(
    body: dict[str, Any] | bytes | None,
    topic: Action = Action.EXPORT,
    max_items: int = 10_000,
) -> ChargeRequest | InvalidRequest | Unreadable:
    raw = body if isinstance(body, bytes | None) else orjson.dumps(body)
    return read_charge_request(raw, topic, max_items)


def invalid_detail(body: dict[str, Any], topic: Action = Action.EXPORT, **kw: Any) -> str:
    result = read(body, topic, **kw)
    assert isinstance(result, InvalidRequest), result
    assert result.detail.startswith("invalid request: ")
    return result.detail


# ---- charge requests: valid ---------------------------------------------------------


def test_the_design_example_is_a_valid_request() -> None:
    request = read(request_body())

    assert isinstance(request, ChargeRequest)
    assert request.action is Action.EXPORT
    assert [item.id for item in request.items] == ["c-1", "co-3"]
    first = request.items[0]
    assert isinstance(first, ContactItem)
    assert first.company_id == "co-9"
    assert request.max_credits == 2
    assert not request.partial
    assert request.reference == {"export_id": "e-55", "crm": "hubspot"}


def test_optional_fields_take_their_defaults() -> None:
    body = request_body()
    for name in ("max_credits", "on_insufficient", "verified_email_found", "reference"):
        del body[name]

    request = read(body)

    assert isinstance(request, ChargeRequest)
    assert request.max_credits is None
    assert request.on_insufficient == "reject"
    assert request.reference is None


def test_timestamps_are_read_in_utc() -> None:
    request = read(request_body(requested_at="2026-11-26T11:00:00+01:00"))

    assert isinstance(request, ChargeRequest)
    assert request.requested_at == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    assert request.requested_at.utcoffset() is not None


def test_a_verification_request_is_valid_on_its_topic() -> None:
    request = read(verification_body(), Action.EMAIL_VERIFICATION)

    assert isinstance(request, ChargeRequest)
    assert request.verified_email_found is True


def test_partial_is_read_from_on_insufficient() -> None:
    request = read(request_body(on_insufficient="partial"))

    assert isinstance(request, ChargeRequest)
    assert request.partial


def test_the_fingerprint_ignores_key_order_and_explicit_defaults() -> None:
    body = request_body()
    shuffled = dict(reversed(list(body.items())))
    without_defaults = {k: v for k, v in body.items() if k != "on_insufficient"}

    requests = [read(b) for b in (body, shuffled, without_defaults)]

    assert all(isinstance(r, ChargeRequest) for r in requests)
    assert len({r.fingerprint() for r in requests if isinstance(r, ChargeRequest)}) == 1


def test_the_fingerprint_changes_with_the_body() -> None:
    one = read(request_body())
    other = read(request_body(items=[{"type": "company", "id": "co-3"}]))

    assert isinstance(one, ChargeRequest)
    assert isinstance(other, ChargeRequest)
    assert one.fingerprint() != other.fingerprint()


# ---- charge requests: unreadable --------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (None, "empty message"),
        (b"", "not UTF-8 JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8 JSON"),
        (b'{"org_id": "acme", "request_id": "r-', "not UTF-8 JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"acme"', "expected a JSON object, got str"),
        (b"null", "expected a JSON object"),
        (b"42", "expected a JSON object"),
    ],
    ids=["none", "empty", "garbage", "truncated", "array", "string", "null", "number"],
)
def test_bytes_without_a_json_object_are_unreadable(raw: bytes | None, says: str) -> None:
    result = read(raw)

    assert isinstance(result, Unreadable)
    assert says in result.error


@pytest.mark.parametrize(
    "changes",
    [
        {"org_id": None},
        {"request_id": None},
        {"org_id": ""},
        {"org_id": "acme corp"},
        {"org_id": "acme\n"},
        {"request_id": "r" * 129},
        {"request_id": 17},
        {"org_id": {"id": "acme"}},
    ],
    ids=["no-org", "no-request-id", "empty", "space", "newline", "too-long", "number", "object"],
)
def test_a_request_without_readable_ids_is_unreadable(changes: dict[str, Any]) -> None:
    body = {k: v for k, v in request_body(**changes).items() if v is not None}

    result = read(body)

    assert isinstance(result, Unreadable)
    assert "org_id and request_id must be identifiers" in result.error


def test_an_oversized_message_is_unreadable_before_parsing() -> None:
    result = read(b" " * (MAX_MESSAGE_BYTES + 1))

    assert isinstance(result, Unreadable)
    assert "larger than" in result.error


# ---- charge requests: readable but invalid ---------------------------------------------


def test_an_invalid_request_keeps_its_ids_and_a_fingerprint_of_its_body() -> None:
    body = request_body(colour="red")

    result = read(body)

    assert isinstance(result, InvalidRequest)
    assert (result.org_id, result.request_id, result.user_id) == (
        "acme",
        "exp-2026-11-26-0001",
        "u-17",
    )
    assert result.fingerprint == body_fingerprint(body)
    assert result.fingerprint != body_fingerprint(request_body(colour="blue"))


def test_an_unreadable_user_id_is_left_out_of_an_invalid_request() -> None:
    result = read(request_body(user_id="u 17"))

    assert isinstance(result, InvalidRequest)
    assert result.user_id is None
    assert "user_id" in result.detail


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        (
            {"items": [{"type": "contact", "id": "c-1", "email": "x@y"}]},
            "items.0.contact.email: Extra inputs are not permitted",
        ),
        ({"items": [{"type": "person", "id": "p-1"}]}, "items.0"),
        ({"items": [{"type": "contact", "id": "c 1"}]}, "items.0.contact.id"),
        ({"items": "c-1"}, "items: Input should be a valid list"),
        ({"items": []}, "items: List should have at least 1 item"),
        ({"max_credits": "many"}, "max_credits: Input should be a valid integer"),
        ({"max_credits": -1}, "max_credits: Input should be greater than or equal to 0"),
        ({"on_insufficient": "borrow"}, "on_insufficient"),
        ({"action": "import"}, "action"),
        ({"requested_at": "yesterday"}, "requested_at"),
        ({"requested_at": "2026-11-26T10:00:00"}, "requested_at: Value error, timestamp needs a"),
        ({"reference": {"note": "x" * 3000}}, "reference is larger than 2048 bytes"),
        ({"verified_email_found": True}, "verified_email_found applies to email_verification"),
    ],
    ids=[
        "unknown-field",
        "unknown-item-field",
        "unknown-item-type",
        "bad-item-id",
        "items-not-a-list",
        "no-items",
        "max-credits-type",
        "negative-max-credits",
        "on-insufficient",
        "unknown-action",
        "not-a-timestamp",
        "naive-timestamp",
        "large-reference",
        "verified-on-export",
    ],
)
def test_an_invalid_body_says_what_is_wrong(changes: dict[str, Any], says: str) -> None:
    assert says in invalid_detail(request_body(**changes))


def test_missing_fields_are_all_named() -> None:
    body = {"org_id": "acme", "request_id": "r-1"}

    detail = invalid_detail(body)

    for name in ("user_id", "action", "items", "requested_at"):
        assert f"{name}: Field required" in detail


def test_too_many_items() -> None:
    body = request_body(items=[{"type": "company", "id": f"co-{n}"} for n in range(4)])

    assert invalid_detail(body, max_items=3) == "invalid request: items: 4 items, at most 3 allowed"
    assert isinstance(read(body, max_items=4), ChargeRequest)


@pytest.mark.parametrize(
    ("action", "topic"),
    [
        ("crm_push", Action.EXPORT),
        ("export", Action.CRM_PUSH),
        ("export", Action.EMAIL_VERIFICATION),
    ],
)
def test_the_action_must_match_the_topic(action: str, topic: Action) -> None:
    detail = invalid_detail(request_body(action=action), topic)

    assert f"action {action!r} does not belong on this topic" in detail
    assert repr(topic.value) in detail


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (
            {"items": [{"type": "contact", "id": "c-1"}, {"type": "contact", "id": "c-2"}]},
            "email_verification takes exactly one contact item",
        ),
        ({"items": [{"type": "company", "id": "co-1"}]}, "exactly one contact item"),
        ({"verified_email_found": None}, "email_verification requires verified_email_found"),
    ],
    ids=["two-contacts", "company", "no-verified-email-found"],
)
def test_verification_rules(changes: dict[str, Any], says: str) -> None:
    body = verification_body()
    body.update(changes)

    assert says in invalid_detail(body, Action.EMAIL_VERIFICATION)


def test_the_detail_is_kept_short() -> None:
    body = request_body(items=[{"type": "contact", "id": f"c {n}"} for n in range(20)])

    detail = invalid_detail(body)

    assert detail.endswith("and 15 more")


# DESIGN §3 types are JSON types: no coercion of strings, booleans or epoch numbers.
@pytest.mark.parametrize(
    ("changes", "topic"),
    [
        ({"max_credits": "3"}, Action.EXPORT),
        ({"max_credits": True}, Action.EXPORT),
        ({"requested_at": 1_764_151_200}, Action.EXPORT),
        ({"verified_email_found": "yes"}, Action.EMAIL_VERIFICATION),
        ({"verified_email_found": 1}, Action.EMAIL_VERIFICATION),
    ],
    ids=["int-as-string", "int-as-bool", "epoch-timestamp", "bool-as-string", "bool-as-int"],
)
def test_wrong_json_types_are_not_coerced(changes: dict[str, Any], topic: Action) -> None:
    body = verification_body() if topic is Action.EMAIL_VERIFICATION else request_body()
    body.update(changes)

    assert isinstance(read(body, topic), InvalidRequest)


# ---- license commands -----------------------------------------------------------------


def command_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "command_id": "cmd-1",
        "org_id": "acme",
        "type": "license.start_period",
        "period_id": "2026",
        "starts_at": "2026-01-01T00:00:00Z",
        "ends_at": "2027-01-01T00:00:00Z",
        "credits": 5000,
    }
    body.update(changes)
    return body


def read_command(body: dict[str, Any] | bytes | None) -> Any:
    raw = body if isinstance(body, bytes | None) else orjson.dumps(body)
    return read_license_command(raw)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (command_body(), StartPeriod),
        (
            {
                "command_id": "cmd-2",
                "org_id": "acme",
                "type": "credits.grant",
                "grant_id": "g-1",
                "credits": 500,
                "reason": "goodwill",
                "granted_by": "cs-1",
            },
            Grant,
        ),
        (
            {
                "command_id": "cmd-3",
                "org_id": "acme",
                "type": "member.upsert",
                "user_id": "u-1",
                "role": "admin",
            },
            MemberUpsert,
        ),
    ],
    ids=["start-period", "grant", "member-upsert"],
)
def test_valid_commands(body: dict[str, Any], expected: type) -> None:
    assert isinstance(read_command(body), expected)


@pytest.mark.parametrize(
    "raw",
    [None, b"\x00\x01", b'{"command_id": "c', b"[]", orjson.dumps({"org_id": "acme"})],
    ids=["none", "garbage", "truncated", "array", "no-command-id"],
)
def test_unreadable_commands(raw: bytes | None) -> None:
    assert isinstance(read_command(raw), Unreadable)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"type": "license.cancel"}, "type"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"credits": -1}, "credits: Input should be greater than or equal to 0"),
        ({"ends_at": "2025-01-01T00:00:00Z"}, "ends_at must be after starts_at"),
        ({"period_id": "p 1"}, "period_id"),
    ],
    ids=["unknown-type", "unknown-field", "negative-credits", "ends-before-start", "bad-id"],
)
def test_invalid_commands_say_what_is_wrong(changes: dict[str, Any], says: str) -> None:
    body = command_body(**changes)

    result = read_command(body)

    assert isinstance(result, InvalidLicenseCommand)
    assert (result.org_id, result.command_id) == ("acme", "cmd-1")
    assert result.command_type == body["type"]
    assert result.body == body
    assert result.fingerprint == body_fingerprint(body)
    assert result.detail.startswith("invalid command: ")
    assert says in result.detail


def test_a_grant_of_nothing_is_invalid() -> None:
    body = {
        "command_id": "cmd-2",
        "org_id": "acme",
        "type": "credits.grant",
        "grant_id": "g-1",
        "credits": 0,
        "reason": "goodwill",
        "granted_by": "cs-1",
    }

    result = read_command(body)

    assert isinstance(result, InvalidLicenseCommand)
    assert "credits: Input should be greater than 0" in result.detail


def test_a_command_type_that_is_not_a_string() -> None:
    result = read_command(command_body(type=7))

    assert isinstance(result, InvalidLicenseCommand)
    assert result.command_type == ""

"""Fuzzing the decoder and validator of input messages (``domain/intake.py``).

Whatever bytes arrive, ``read_charge_request`` and ``read_license_command`` must
return one of their three outcomes and never raise: an exception there is a poison
message, retried forever by the worker (the batch is never acknowledged). And each
outcome must keep its promise: an invalid request carries the ids it was sent with
(its producer hears back), and a valid one survives a round trip through its JSON.

Inputs come at three distances from a valid message: arbitrary bytes, arbitrary JSON
values, and valid messages with fields dropped, replaced by any JSON value, added,
or the whole text truncated.
"""

from __future__ import annotations

import json
import os
import re
import string
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.ids import is_identifier
from creditgate.domain.intake import (
    InvalidLicenseCommand,
    InvalidRequest,
    Unreadable,
    read_charge_request,
    read_license_command,
)

# CI-sized; CREDITGATE_FUZZ_EXAMPLES=100000 runs a long fuzzing session by hand
EXAMPLES = int(os.environ.get("CREDITGATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FINGERPRINT = re.compile(r"[0-9a-f]{32}")

# ---- strategies --------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
valid_ids = st.text(string.ascii_letters + string.digits + "._:@-", min_size=1, max_size=128)
# mostly valid ids, so that the validator's paths past the ids are reached
ids = st.one_of(valid_ids, valid_ids, valid_ids, st.sampled_from(["", " ", "a/b", "x" * 129]))
ids_or_anything = st.one_of(ids, ids, json_values)
# RFC 3339 and other texts, over the whole calendar: a time zone can push years 1 and
# 9999 past datetime's range, which must be a validation error, not a crash.
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
# hypothesis takes naive bounds; the time zones come from ``timezones``
timestamps = st.one_of(
    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31), timezones=offsets).map(  # noqa: DTZ001
        datetime.isoformat
    ),
    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31)).map(datetime.isoformat),  # noqa: DTZ001
    json_values,
)


def contact(contact_id: str, company_id: str | None) -> dict[str, Any]:
    item = {"type": "contact", "id": contact_id}
    return item if company_id is None else {**item, "company_id": company_id}


items = st.one_of(
    st.builds(contact, ids_or_anything, st.none() | ids_or_anything),
    st.builds(lambda c: {"type": "company", "id": c}, ids_or_anything),
    json_values,
)


@st.composite
def damaged(draw: st.DrawFn, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with some fields dropped, some replaced by any JSON value, some added."""
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(key, None)
    for key in draw(st.lists(st.sampled_from(sorted(body) or ["x"]), max_size=2)):
        body[key] = draw(json_values)
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return body


@st.composite
def charge_bodies(draw: st.DrawFn) -> dict[str, Any]:
    action = draw(st.sampled_from([a.value for a in Action]))
    body: dict[str, Any] = {
        "request_id": draw(ids),
        "org_id": draw(ids),
        "user_id": draw(ids),
        "action": action,
        "items": draw(st.lists(items, min_size=1, max_size=4)),
        "requested_at": draw(timestamps),
    }
    if action == "email_verification":
        body["verified_email_found"] = draw(st.booleans())
    optional = {
        "max_credits": st.integers(-1, 5),
        "on_insufficient": st.sampled_from(["reject", "partial"]),
        "reference": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            body[name] = draw(values)
    if draw(st.booleans()):
        body = draw(damaged(body))
    return body


@st.composite
def command_bodies(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(
            [
                "license.start_period",
                "credits.grant",
                "member.upsert",
                "member.remove",
                "member.set_credits_allowed",
            ]
        )
    )
    body: dict[str, Any] = {"command_id": draw(ids), "org_id": draw(ids), "type": kind}
    match kind:
        case "license.start_period":
            body |= {
                "period_id": draw(ids),
                "starts_at": draw(timestamps),
                "ends_at": draw(timestamps),
                "credits": draw(st.integers(-1, 10_000)),
            }
        case "credits.grant":
            body |= {
                "grant_id": draw(ids),
                "credits": draw(st.integers(-1, 100)),
                "reason": draw(st.text(max_size=20)),
                "granted_by": draw(ids),
            }
        case "member.upsert":
            body |= {"user_id": draw(ids), "role": draw(st.sampled_from(["admin", "member"]))}
        case "member.remove":
            body |= {"user_id": draw(ids)}
        case _:
            body |= {"user_id": draw(ids), "allowed": draw(st.booleans()), "set_by": draw(ids)}
    if draw(st.booleans()):
        body = draw(damaged(body))
    return body


def encoded(body: Any) -> bytes:
    # json, not orjson: it also writes what orjson refuses to read (integers past 64
    # bits, lone surrogates), which is input a producer can send
    return json.dumps(body).encode()


# ---- the properties ----------------------------------------------------------------


def assert_read_request(raw: bytes | None, action: Action, max_items: int) -> Any:
    """Read, assert that the outcome keeps its promise, and return it."""
    result = read_charge_request(raw, action, max_items)
    assert isinstance(result, ChargeRequest | InvalidRequest | Unreadable)
    sent = _object(raw)
    match result:
        case Unreadable():
            assert result.error
        case InvalidRequest():
            # readable ids, as they were sent: the producer hears back under them
            assert is_identifier(result.org_id)
            assert is_identifier(result.request_id)
            assert (result.org_id, result.request_id) == (sent["org_id"], sent["request_id"])
            assert result.user_id is None or is_identifier(result.user_id)
            assert FINGERPRINT.fullmatch(result.fingerprint)
            assert result.detail.startswith("invalid request: ")
        case ChargeRequest():
            assert result.action is action
            assert len(result.items) <= max_items
            assert (result.org_id, result.request_id) == (sent["org_id"], sent["request_id"])
            again = read_charge_request(
                orjson.dumps(result.model_dump(mode="json")), action, max_items
            )
            assert again == result
            assert isinstance(again, ChargeRequest)
            assert again.fingerprint() == result.fingerprint()
            assert ChargeRequest.model_validate_json(result.model_dump_json()) == result
    return result


def assert_read_command(raw: bytes | None) -> Any:
    result = read_license_command(raw)
    sent = _object(raw)
    match result:
        case Unreadable():
            assert result.error
        case InvalidLicenseCommand():
            assert is_identifier(result.org_id)
            assert is_identifier(result.command_id)
            assert (result.org_id, result.command_id) == (sent["org_id"], sent["command_id"])
            assert isinstance(result.command_type, str)
            assert result.body == sent
            assert FINGERPRINT.fullmatch(result.fingerprint)
            assert result.detail.startswith("invalid command: ")
        case _:
            assert (result.org_id, result.command_id) == (sent["org_id"], sent["command_id"])
            dumped = result.model_dump(mode="json")
            assert read_license_command(orjson.dumps(dumped)) == result
            assert license_command_adapter.validate_json(orjson.dumps(dumped)) == result
            assert (
                result.fingerprint()
                == license_command_adapter.validate_python(dumped).fingerprint()
            )
    return result


def _object(raw: bytes | None) -> Any:
    """The JSON object a readable outcome came from (only called when there is one)."""
    try:
        return orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None


@FUZZ
@given(raw=st.binary(max_size=300), action=st.sampled_from(list(Action)))
def test_arbitrary_bytes(raw: bytes, action: Action) -> None:
    assert_read_request(raw, action, 10_000)
    assert_read_command(raw)


@FUZZ
@given(value=json_values | st.integers(), action=st.sampled_from(list(Action)))
def test_arbitrary_json_values(value: Any, action: Action) -> None:
    assert_read_request(encoded(value), action, 10_000)
    assert_read_command(encoded(value))


@FUZZ
@given(body=charge_bodies(), action=st.sampled_from(list(Action)), max_items=st.integers(1, 5))
def test_charge_requests_near_the_contract(
    body: dict[str, Any], action: Action, max_items: int
) -> None:
    assert_read_request(encoded(body), action, max_items)


@FUZZ
@given(body=charge_bodies(), action=st.sampled_from(list(Action)), cut=st.integers(0, 400))
def test_truncated_charge_requests(body: dict[str, Any], action: Action, cut: int) -> None:
    raw = encoded(body)
    assert_read_request(raw[: min(cut, len(raw) - 1)], action, 10_000)


@FUZZ
@given(body=command_bodies(), cut=st.none() | st.integers(0, 300))
def test_license_commands_near_the_contract(body: dict[str, Any], cut: int | None) -> None:
    raw = encoded(body)
    assert_read_command(raw if cut is None else raw[:cut])


def test_the_fuzzers_reach_all_three_outcomes() -> None:
    """The strategies above are worth something only if they reach every outcome."""
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(body=charge_bodies(), action=st.sampled_from(list(Action)))
    def collect(body: dict[str, Any], action: Action) -> None:
        seen.add(type(assert_read_request(encoded(body), action, 10_000)).__name__)

    collect()
    assert seen == {"ChargeRequest", "InvalidRequest", "Unreadable"}


# ---- crashes found by the fuzzer, open -----------------------------------------------

DEEP = 300  # orjson reads up to 1024 levels of nesting but writes only 254


def _valid_request(**changes: Any) -> dict[str, Any]:
    return {
        "request_id": "r-1",
        "org_id": "acme",
        "user_id": "u-1",
        "action": "export",
        "items": [{"type": "contact", "id": "c-1"}],
        "requested_at": "2100-01-04T09:00:00Z",
        **changes,
    }


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("field", ["reference", "unknown_field"])
def test_a_deeply_nested_request_is_not_a_crash(field: str) -> None:
    head = orjson.dumps(_valid_request())[:-1]
    value = b'{"a":' + _nested(DEEP) + b"}" if field == "reference" else _nested(DEEP)
    read = assert_read_request(
        head + b',"' + field.encode() + b'":' + value + b"}", Action.EXPORT, 10
    )
    assert isinstance(read, Unreadable)
    assert "nested too deeply" in read.error


def test_a_deeply_nested_command_is_not_a_crash() -> None:
    read = assert_read_command(b'{"org_id":"acme","command_id":"k-1","x":' + _nested(DEEP) + b"}")
    assert isinstance(read, Unreadable)


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_timestamp_at_the_calendar_edge_is_not_a_crash(timestamp: str) -> None:
    read = assert_read_request(
        orjson.dumps(_valid_request(requested_at=timestamp)), Action.EXPORT, 10
    )
    assert isinstance(read, InvalidRequest)
    assert "out of range" in read.detail

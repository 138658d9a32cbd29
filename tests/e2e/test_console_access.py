"""Every route of the API against every kind of token, over HTTP, on a running worker.

The worker (``scoped_api``, tests/e2e/conftest.py) has tokens of each kind; its state
was made through Kafka. Each row is a route, each column a token kind, each cell the
status the route must answer: a member reads their own history only, an admin their own
organisation only, support grants and refunds, an admin sets credit limits, an operator
everything. Then the CSV forms, the team report, and the writes' answers (applied,
refused) read back.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import aiohttp
import orjson
import pytest

from creditgate.stream import topics as t

from .conftest import ScopedApi

pytestmark = pytest.mark.e2e

KINDS = (
    "member",  # u-17 of acme, about themselves
    "member_other",  # u-18 of acme, about u-17
    "admin",  # ana, admin of acme
    "admin_other_org",  # bo, admin of beta, about acme
    "support",
    "reader",  # the first form of the setting: ["acme"]
    "operator",
    "none",
    "bad",
)

QUOTE = {
    "org_id": "acme",
    "user_id": "u-17",
    "action": "export",
    "items": [{"type": "contact", "id": "c-1"}],
}
ALLOW = {"allowed": True, "set_by": "ana"}  # u-17 stays allowed: safe to repeat
GRANT = {"credits": 1, "reason": "the access table's top-up", "granted_by": "cs-1"}
# one command (its id fixed): support's call applies it, the operator's is its replay
REFUND = {
    "request_id": "push-0001",
    "reason": "the access table's refund",
    "refunded_by": "cs-1",
    "command_id": "refund-table-1",
}
LIMIT = {"limit": None, "set_by": "ana"}  # u-18 keeps no limit: safe to repeat

# (method, path, body) -> status per kind, in the order of KINDS
TABLE: list[tuple[str, str, Any, tuple[int, ...]]] = [
    ("GET", "/v1/me", None, (200, 200, 200, 200, 200, 200, 200, 401, 401)),
    ("GET", "/v1/orgs/acme/credits", None, (200, 200, 200, 403, 200, 200, 200, 401, 401)),
    ("GET", "/v1/orgs/acme/usage", None, (403, 403, 200, 403, 403, 200, 200, 401, 401)),
    ("GET", "/v1/orgs/acme/usage?format=csv", None, (403, 403, 200, 403, 403, 200, 200, 401, 401)),
    (
        "GET",
        "/v1/orgs/acme/users/u-17/charges?action=export",
        None,
        (200, 403, 200, 403, 403, 200, 200, 401, 401),
    ),
    (
        "GET",
        "/v1/orgs/acme/users/u-17/charges?action=crm_push&format=csv",
        None,
        (200, 403, 200, 403, 403, 200, 200, 401, 401),
    ),
    (
        "GET",
        "/v1/orgs/acme/requests/exp-0001",
        None,
        (200, 403, 200, 403, 403, 200, 200, 401, 401),
    ),
    ("POST", "/v1/quote", QUOTE, (200, 403, 200, 403, 403, 200, 200, 401, 401)),
    ("GET", "/v1/orgs/acme/members", None, (403, 403, 200, 403, 403, 200, 200, 401, 401)),
    (
        "GET",
        "/v1/orgs/acme/members?format=csv",
        None,
        (403, 403, 200, 403, 403, 200, 200, 401, 401),
    ),
    (
        "PUT",
        "/v1/orgs/acme/members/u-17/credits-allowed",
        ALLOW,
        (403, 403, 200, 403, 403, 403, 200, 401, 401),
    ),
    ("POST", "/v1/orgs/acme/grants", GRANT, (403, 403, 403, 403, 200, 403, 200, 401, 401)),
    ("POST", "/v1/orgs/acme/refunds", REFUND, (403, 403, 403, 403, 200, 403, 200, 401, 401)),
    (
        "PUT",
        "/v1/orgs/acme/members/u-18/credit-limit",
        LIMIT,
        (403, 403, 200, 403, 403, 403, 200, 401, 401),
    ),
    ("GET", "/console/", None, (200, 200, 200, 200, 200, 200, 200, 200, 200)),
]


def headers_of(api: ScopedApi, kind: str) -> dict[str, str]:
    if kind == "none":
        return {}
    if kind == "bad":
        return {"Authorization": "Bearer tok-not-one-of-this-worker-0123456789"}
    return api.auth(kind)


async def send(
    api: ScopedApi, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            f"{api.base}{path}",
            headers=headers,
            data=None if body is None else orjson.dumps(body),
        ) as response,
    ):
        return response.status, response.content_type, await response.read()


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"), TABLE, ids=[r[1] + " " + r[0] for r in TABLE]
)
async def test_every_route_answers_each_token_kind_as_its_scope_says(
    scoped_api: ScopedApi, method: str, path: str, body: Any, expected: tuple[int, ...]
) -> None:
    got = {}
    for kind in KINDS:
        status, content_type, raw = await send(
            scoped_api, method, path, headers_of(scoped_api, kind), body
        )
        got[kind] = status
        if status >= 400:
            assert content_type == "application/problem+json", (kind, raw)
            problem = orjson.loads(raw)
            assert problem["status"] == status
            # a refusal names what was asked, never the caller's token
            assert scoped_api.tokens.get(kind, "-") not in raw.decode()
    assert got == dict(zip(KINDS, expected, strict=True))


async def test_a_refusal_tells_nothing_of_the_other_organisation(scoped_api: ScopedApi) -> None:
    status, _, raw = await send(
        scoped_api, "GET", "/v1/orgs/acme/members", scoped_api.auth("admin_other_org")
    )
    problem = orjson.loads(raw)
    assert (status, problem["code"]) == (403, "forbidden")
    assert "acme" in problem["detail"]
    assert "beta" not in raw.decode()  # the caller's own organisation is not quoted back


async def test_a_member_may_see_only_their_own_decisions(scoped_api: ScopedApi) -> None:
    status, _, raw = await send(
        scoped_api, "GET", "/v1/orgs/acme/requests/exp-0001", scoped_api.auth("member_other")
    )
    assert status == 403
    assert "u-17" not in raw.decode()  # whose decision it is stays unsaid
    # their own (empty) history is theirs to read
    status, _, raw = await send(
        scoped_api,
        "GET",
        "/v1/orgs/acme/users/u-18/charges?action=export",
        scoped_api.auth("member_other"),
    )
    assert (status, orjson.loads(raw)["charges"]) == (200, [])


# ---- what the routes answer ------------------------------------------------------------------


async def json_of(api: ScopedApi, path: str, kind: str = "admin") -> Any:
    status, _, raw = await send(api, "GET", path, api.auth(kind))
    assert status == 200, raw
    return orjson.loads(raw)


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def test_csv_has_the_same_rows_as_json(scoped_api: ScopedApi) -> None:
    history = await json_of(scoped_api, "/v1/orgs/acme/users/u-17/charges?action=export")
    status, content_type, raw = await send(
        scoped_api,
        "GET",
        "/v1/orgs/acme/users/u-17/charges?action=export&format=csv",
        scoped_api.auth("member"),
    )
    assert (status, content_type) == (200, "text/csv")
    assert raw.decode().split("\r\n")[0].startswith("decided_at,request_id,type,")
    rows = rows_of(raw.decode())
    assert [r["request_id"] for r in rows] == [c["request_id"] for c in history["charges"]]
    assert [int(r["credits_charged"]) for r in rows] == [
        c["credits_charged"] for c in history["charges"]
    ]
    assert [orjson.loads(r["reference"]) for r in rows] == [
        c["reference"] for c in history["charges"]
    ]

    team = await json_of(scoped_api, "/v1/orgs/acme/members")
    _, _, raw = await send(
        scoped_api, "GET", "/v1/orgs/acme/members?format=csv", scoped_api.auth("admin")
    )
    by_user = {r["user_id"]: r for r in rows_of(raw.decode())}
    assert set(by_user) == {m["user_id"] for m in team["members"]}
    for member in team["members"]:
        row = by_user[member["user_id"]]
        assert int(row["credits_used"]) == member["credits_used"]
        assert row["credits_allowed"] == ("true" if member["credits_allowed"] else "false")

    usage = await json_of(scoped_api, "/v1/orgs/acme/usage")
    _, _, raw = await send(
        scoped_api, "GET", "/v1/orgs/acme/usage?format=csv", scoped_api.auth("admin")
    )
    usage_rows = rows_of(raw.decode())
    assert [r["user_id"] for r in usage_rows] == [u["user_id"] for u in usage["users"]] + [""]
    assert int(usage_rows[-1]["credits_used"]) == usage["totals"]["credits_used"]
    assert int(usage_rows[-1]["credits_refunded"]) == usage["totals"]["credits_refunded"]
    assert int(usage_rows[-1]["credits_held"]) == usage["totals"]["credits_held"]


async def test_history_shows_credits_free_repeats_and_references(scoped_api: ScopedApi) -> None:
    history = await json_of(scoped_api, "/v1/orgs/acme/users/u-17/charges?action=export", "member")
    by_id = {c["request_id"]: c for c in history["charges"]}
    first, second = by_id["exp-0001"], by_id["exp-0002"]
    assert (first["credits_charged"], first["items_by_outcome"]["free_repeat"]) == (2, 0)
    assert first["free_repeats_until"] is None
    # c-2 went out with exp-0001: free within its window, which is when it ends
    assert (second["credits_charged"], second["items_by_outcome"]["free_repeat"]) == (1, 1)
    assert second["free_repeats_until"] is not None
    assert second["reference"] == {"export_id": "e-2"}
    pushes = await json_of(scoped_api, "/v1/orgs/acme/users/u-17/charges?action=crm_push", "member")
    assert [c["reference"]["crm"] for c in pushes["charges"]] == ["hubspot"]


async def test_the_team_lists_roles_permissions_and_usage(scoped_api: ScopedApi) -> None:
    team = await json_of(scoped_api, "/v1/orgs/acme/members")
    members = {m["user_id"]: m for m in team["members"]}
    assert {u: m["role"] for u, m in members.items()} == {
        "ana": "admin", "u-17": "member", "u-18": "member", "u-21": "member",
    }  # fmt: skip
    assert members["u-17"]["by_action"]["export"]["credits_used"] == 3
    assert members["u-17"]["by_action"]["crm_push"]["credits_used"] == 1
    assert members["u-18"]["credits_used"] == 0


async def test_a_grant_over_http_is_applied_by_the_worker(scoped_api: ScopedApi) -> None:
    before = await json_of(scoped_api, "/v1/orgs/acme/credits", "support")
    status, _, raw = await send(
        scoped_api,
        "POST",
        "/v1/orgs/acme/grants",
        scoped_api.auth("support"),
        {"credits": 25, "reason": "campaign", "granted_by": "cs-7", "grant_id": "g-http-1"},
    )
    event = orjson.loads(raw)
    assert (status, event["type"], event["command_type"]) == (
        200,
        "command.applied",
        "credits.grant",
    )
    # the event is the worker's, published on credits.license.events
    seen = await scoped_api.client.wait_for(t.LICENSE_EVENTS, "command_id", event["command_id"])
    assert seen == event
    after = await json_of(scoped_api, "/v1/orgs/acme/credits", "support")
    assert after["granted"] - before["granted"] == 25
    assert after["remaining"] - before["remaining"] == 25
    # the same grant_id again: the worker refuses it, and the answer says why
    status, _, raw = await send(
        scoped_api,
        "POST",
        "/v1/orgs/acme/grants",
        scoped_api.auth("support"),
        {"credits": 25, "reason": "campaign", "granted_by": "cs-7", "grant_id": "g-http-1"},
    )
    problem = orjson.loads(raw)
    assert (status, problem["code"], problem["reason"]) == (
        409,
        "command_rejected",
        "duplicate_grant",
    )
    assert problem["command_id"] == problem["event"]["command_id"]
    assert (await json_of(scoped_api, "/v1/orgs/acme/credits", "support"))["granted"] == after[
        "granted"
    ]


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("admin", {"allowed": "no"}, "allowed"),
        ("admin", {}, "allowed"),
        ("admin", {"allowed": False, "color": "red"}, "color"),
        ("operator", {"allowed": False, "set_by": "a b"}, "set_by"),
    ],
)
async def test_malformed_writes_are_400(
    scoped_api: ScopedApi, kind: str, body: Any, field: str
) -> None:
    status, _, raw = await send(
        scoped_api, "PUT", "/v1/orgs/acme/members/u-18/credits-allowed", scoped_api.auth(kind), body
    )
    problem = orjson.loads(raw)
    assert status == 400, problem
    assert field in [e["field"] for e in problem["errors"]]


async def test_a_token_without_a_user_must_name_who_acts(scoped_api: ScopedApi) -> None:
    for method, path, body, field in (
        ("PUT", "/v1/orgs/acme/members/u-18/credits-allowed", {"allowed": False}, "set_by"),
        ("POST", "/v1/orgs/acme/grants", {"credits": 1, "reason": "r"}, "granted_by"),
        ("PUT", "/v1/orgs/acme/members/u-18/credit-limit", {"limit": 5}, "set_by"),
        (
            "POST",
            "/v1/orgs/acme/refunds",
            {"request_id": "push-0001", "reason": "r"},
            "refunded_by",
        ),
    ):
        status, _, raw = await send(scoped_api, method, path, scoped_api.auth("operator"), body)
        problem = orjson.loads(raw)
        assert (status, problem["code"]) == (403, "forbidden")
        assert field in problem["detail"]


async def test_an_admin_acts_as_themselves_only(scoped_api: ScopedApi) -> None:
    status, _, raw = await send(
        scoped_api,
        "PUT",
        "/v1/orgs/acme/members/u-18/credits-allowed",
        scoped_api.auth("admin"),
        {"allowed": False, "set_by": "someone-else"},
    )
    assert (status, orjson.loads(raw)["code"]) == (403, "forbidden")


# ---- refunds and credit limits ---------------------------------------------------------


async def test_a_refund_over_http_is_answered_with_the_workers_event(
    scoped_api: ScopedApi,
) -> None:
    support = scoped_api.auth("support")
    # the access table's refund of push-0001, whichever runs first: applied, or its replay
    status, _, raw = await send(scoped_api, "POST", "/v1/orgs/acme/refunds", support, REFUND)
    event = orjson.loads(raw)
    assert (status, event["type"], event["command_type"]) == (
        200,
        "command.applied",
        "charge.refund",
    )
    seen = await scoped_api.client.wait_for(t.LICENSE_EVENTS, "command_id", event["command_id"])
    assert seen["type"] == "command.applied"
    decision = await json_of(scoped_api, "/v1/orgs/acme/requests/push-0001", "admin")
    assert decision["credits_refunded"] == 1

    # another refund of it: nothing left to refund (409); of a request never sent: 404
    again = {k: v for k, v in REFUND.items() if k != "command_id"}
    status, _, raw = await send(scoped_api, "POST", "/v1/orgs/acme/refunds", support, again)
    problem = orjson.loads(raw)
    assert (status, problem["code"], problem["reason"]) == (
        409,
        "command_rejected",
        "nothing_to_refund",
    )
    assert problem["command_id"] == problem["event"]["command_id"]
    status, _, raw = await send(
        scoped_api,
        "POST",
        "/v1/orgs/acme/refunds",
        support,
        {**again, "request_id": "never-sent"},
    )
    problem = orjson.loads(raw)
    assert (status, problem["code"], problem["reason"]) == (
        404,
        "command_rejected",
        "request_not_found",
    )
    assert problem["event"]["type"] == "command.rejected"


@pytest.mark.parametrize(
    ("path", "kind", "body", "field"),
    [
        ("/v1/orgs/acme/refunds", "support", {**REFUND, "colour": "red"}, "colour"),
        ("/v1/orgs/acme/refunds", "support", {**REFUND, "items": []}, "items"),
        ("/v1/orgs/acme/refunds", "support", {**REFUND, "reason": ""}, "reason"),
        ("/v1/orgs/acme/members/u-18/credit-limit", "admin", {}, "limit"),
        ("/v1/orgs/acme/members/u-18/credit-limit", "admin", {"limit": -1}, "limit"),
        ("/v1/orgs/acme/members/u-18/credit-limit", "admin", {"limit": "5"}, "limit"),
    ],
)
async def test_malformed_refunds_and_limits_are_400(
    scoped_api: ScopedApi, path: str, kind: str, body: Any, field: str
) -> None:
    method = "POST" if path.endswith("refunds") else "PUT"
    status, _, raw = await send(scoped_api, method, path, scoped_api.auth(kind), body)
    problem = orjson.loads(raw)
    assert status == 400, problem
    assert field in [e["field"] for e in problem["errors"]]


async def test_an_admins_credit_limit_is_applied_by_the_worker(scoped_api: ScopedApi) -> None:
    path = "/v1/orgs/acme/members/u-18/credit-limit"
    admin = scoped_api.auth("admin")
    quote = {**QUOTE, "user_id": "u-18", "items": [{"type": "contact", "id": "c-99"}]}
    status, _, raw = await send(scoped_api, "PUT", path, admin, {"limit": 0})
    event = orjson.loads(raw)
    assert (status, event["type"], event["command_type"]) == (
        200,
        "command.applied",
        "member.set_credit_limit",
    )
    status, _, raw = await send(scoped_api, "POST", "/v1/quote", admin, quote)
    limited = orjson.loads(raw)
    # no limit again: the whole pool
    status_none, _, raw = await send(scoped_api, "PUT", path, admin, {"limit": None})
    status_after, _, after = await send(scoped_api, "POST", "/v1/quote", admin, quote)

    assert status == 200, limited
    assert (limited["would_be_approved"], limited["reason"]) == (False, "user_limit_reached")
    assert status_none == 200, raw
    assert (status_after, orjson.loads(after)["would_be_approved"]) == (200, True)
    # a user who is not a member has no limit to set: the worker refuses it
    status, _, raw = await send(
        scoped_api, "PUT", "/v1/orgs/acme/members/u-404/credit-limit", admin, {"limit": 3}
    )
    assert (status, orjson.loads(raw)["reason"]) == (409, "not_a_member")

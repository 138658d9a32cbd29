"""The OpenAPI 3.1 document of the HTTP API, generated: ``api/openapi.json``.

The bodies' schemas come from the models of ``api/schemas.py`` (through the same JSON
Schema generator as the topics' contracts); the paths, parameters and responses are
written here, their bounds taken from the code that enforces them (``api/reports.py``).
``creditgate contracts generate`` writes the file with the topics' contracts and
``creditgate contracts check`` (and tests/unit/test_contracts.py) fails on drift. The
worker serves the committed file as it is (``views.openapi_document``).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from creditgate.api import schemas
from creditgate.api.csv_rows import CSV_CONTENT_TYPE
from creditgate.api.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX, TITLES, problem
from creditgate.api.reports import DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT, MAX_ITEMS_PAGE
from creditgate.domain.ids import ID_PATTERN

OPENAPI_FILE = "src/creditgate/api/openapi.json"
# the API's own version: 1.1 added problem details, keeping 1.0's code and message; 1.2
# scoped tokens, the team and its admin actions, ?format=csv
API_VERSION = "1.2.0"
JSON = "application/json"

DESCRIPTION = (
    "Credits of an organisation's license: the balance, the team's usage, each user's "
    "charges, single decisions, and quotes of what a request would cost. Served by the "
    "worker (`creditgate worker`, CREDITGATE_HTTP_PORT), with the team's admin actions, "
    "which are published as license commands and answered with their license event. "
    "Bearer tokens come from CREDITGATE_API_TOKENS, each scoped to an organisation and a "
    "role (member, admin, support) or to all (`*`, operators); a list of organisations "
    "(the first form) is a reader of them. Each operation lists the scopes it admits in "
    "`x-creditgate-scopes` (a member: for their own user only, where marked `member "
    "(self)`). With no token configured the API listens on loopback only and asks for "
    "none. Errors are RFC 9457 problem "
    "details (`application/problem+json`: `type`, `title`, `status`, `detail`), with the "
    "extension members `code` (a stable name of the problem type: "
    + ", ".join(f"`{code}`" for code in TITLES)
    + ", or `http_error` with type `about:blank`) and `message` (the same text as "
    f"`detail`); creditgate's problem types are `{PROBLEM_TYPE_PREFIX}<code>`. 400s add "
    "`errors`, the field errors. Unknown query parameters and body fields are refused "
    "(400), like unknown fields of every creditgate message."
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": schemas.COMPONENTS + name}


def _content(schema: dict[str, Any], example: Any = None, media: str = JSON) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": schema}
    if example is not None:
        body["example"] = example
    return {media: body}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": _content(_ref(schema))}


def _not_found(description: str, detail: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": _content(
            _ref("Problem"), problem(404, "not_found", detail), PROBLEM_CONTENT_TYPE
        ),
    }


_ERRORS = {
    "400": {"$ref": "#/components/responses/Invalid"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
}
_UNAVAILABLE = {"503": {"$ref": "#/components/responses/Unavailable"}}

_ORG = {
    "name": "org",
    "in": "path",
    "required": True,
    "description": "the organisation (org_id)",
    "schema": _ref("Identifier"),
    "example": "acme",
}


def _path_id(name: str, example: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": _ref("Identifier"),
        "example": example,
    }


# the scopes each operation admits (access.NEEDS, written out)
_CREDITS = ["member", "admin", "support", "reader", "*"]
_HISTORY = ["member (self)", "admin", "reader", "*"]
_TEAM = ["admin", "reader", "*"]
_ALLOW = ["admin", "*"]
_GRANT = ["support", "*"]
_REFUND = ["support", "*"]
_LIMIT = ["admin", "*"]

_FORMAT = {
    "name": "format",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"},
    "description": "csv: the same rows as text/csv (RFC 4180, a header line)",
}


def _scoped(operation: dict[str, Any], scopes: list[str]) -> dict[str, Any]:
    operation["x-creditgate-scopes"] = scopes
    line = "Scopes: " + ", ".join(scopes) + "."
    operation["description"] = (
        f"{operation['description']} {line}" if "description" in operation else line
    )
    return operation


def _read(
    operation_id: str,
    summary: str,
    parameters: list[dict[str, Any]],
    answer: tuple[str, str],
    not_found: tuple[str, str],
    scopes: list[str],
    description: str | None = None,
    csv: bool = False,
) -> dict[str, Any]:
    ok = _ok(*answer)
    if csv:
        ok["content"][CSV_CONTENT_TYPE] = {"schema": {"type": "string"}}
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [*parameters, _FORMAT] if csv else parameters,
        "responses": {
            "200": ok,
            **_ERRORS,
            "404": _not_found(*not_found),
            **_UNAVAILABLE,
        },
    }
    if description:
        operation["description"] = description
    return {"get": _scoped(operation, scopes)}


def _write(
    method: str,
    operation_id: str,
    summary: str,
    parameters: list[dict[str, Any]],
    body: tuple[str, dict[str, Any]],
    scopes: list[str],
    description: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A write: published as a license command, answered with its license event;
    ``extra``: responses of this write only (a 404 the worker answers)."""
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "parameters": parameters,
        "requestBody": {"required": True, "content": _content(_ref(body[0]), body[1])},
        "responses": {
            "200": _ok("the command was applied: its license event", "LicenseEvent"),
            **_ERRORS,
            **(extra or {}),
            "409": {
                "description": "the worker refused the command: its license event",
                "content": _content(_ref("CommandProblem"), _REFUSED_EXAMPLE, PROBLEM_CONTENT_TYPE),
            },
            "504": {
                "description": "no license event within CREDITGATE_HTTP_COMMAND_TIMEOUT_SECONDS",
                "content": _content(
                    _ref("NoAnswerProblem"),
                    problem(
                        504,
                        "no_answer",
                        "command http-0123 was published, but no license event answered it",
                        command_id="http-0123",
                    ),
                    PROBLEM_CONTENT_TYPE,
                ),
            },
            **_UNAVAILABLE,
        },
    }
    return {method: _scoped(operation, scopes)}


_REFUSED_EVENT = {
    "type": "command.rejected",
    "command_id": "http-0123",
    "command_type": "credits.grant",
    "org_id": "acme",
    "reason": "duplicate_grant",
    "message": "grant g-1 was already applied",
    "state": None,
    "sequence": 12,
    "decided_at": "2026-03-01T09:30:00.000Z",
}
_REFUSED_EXAMPLE = problem(
    409,
    "command_rejected",
    "grant g-1 was already applied",
    command_id="http-0123",
    reason="duplicate_grant",
    event=_REFUSED_EVENT,
)

_NOT_FOUND_EXAMPLE = problem(
    404,
    "command_rejected",
    "no decided request with this request_id is known",
    command_id="http-0124",
    reason="request_not_found",
    event={
        **_REFUSED_EVENT,
        "command_id": "http-0124",
        "command_type": "charge.refund",
        "reason": "request_not_found",
        "message": "no decided request with this request_id is known",
    },
)

_WRITES = (
    "Published as a license command on credits.license.commands and answered with its "
    "license event, matched by command_id (the worker stays the only writer of the "
    "credit state)."
)


def _paths() -> dict[str, Any]:
    return {
        "/v1/orgs/{org}/credits": _read(
            "getCredits",
            "The current period's credits: amount, grants, used, remaining",
            [_ORG],
            ("the current period", "Credits"),
            ("the organisation has no license", "acme has no license"),
            _CREDITS,
        ),
        "/v1/orgs/{org}/usage": _read(
            "getUsage",
            "Credits used per user in a license period (the admin's team view)",
            [
                _ORG,
                {
                    "name": "period",
                    "in": "query",
                    "required": False,
                    "schema": _ref("Identifier"),
                    "description": "a period id; default: the current period",
                },
            ],
            ("per user and totals", "UsageReport"),
            ("the organisation has no license", "acme has no license"),
            _TEAM,
            csv=True,
        ),
        "/v1/orgs/{org}/users/{user}/charges": _read(
            "getCharges",
            "A user's decisions for one action, newest first (My exports, My CRM pushes)",
            [
                _ORG,
                _path_id("user", "u-17"),
                {"name": "action", "in": "query", "required": True, "schema": _ref("Action")},
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_HISTORY_LIMIT,
                        "default": DEFAULT_HISTORY_LIMIT,
                    },
                },
                {
                    "name": "before",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "string",
                        "pattern": "^[0-9]+(:" + ID_PATTERN.strip("^$") + ")?$",
                    },
                    "description": "the next_before of the previous page, or milliseconds "
                    "since the epoch (decisions strictly before)",
                },
            ],
            ("one page", "ChargeHistory"),
            ("unknown organisation", "acme is not a known organisation"),
            _HISTORY,
            description="The whole license period's decisions, kept until the period ends "
            "(plus the idempotency lifetime). As CSV, the next page's cursor is in the Link "
            'header (rel="next").',
            csv=True,
        ),
        "/v1/orgs/{org}/requests/{request_id}": _read(
            "getDecision",
            "One request's decision as published on credits.charge.results, its items paged",
            [
                _ORG,
                _path_id("request_id", "exp-0001"),
                {
                    "name": "offset",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": 999_999_999,
                        "default": 0,
                    },
                    "description": "the first item of the page (0-based)",
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_ITEMS_PAGE,
                        "default": MAX_ITEMS_PAGE,
                    },
                    "description": "items per page",
                },
            ],
            ("the decision", "Decision"),
            ("no such decision", "acme has no decision for exp-0001"),
            _HISTORY,
            description="Every item of the decision, a page at a time (the published result "
            "lists at most result_items_max of them): page on with offset=next_offset.",
        ),
        "/v1/quote": {
            "post": {
                "operationId": "quote",
                "summary": "What a charge request would cost now, item by item; it changes nothing",
                "description": "A ChargeRequest without request_id. The charge script decides it "
                "in its writeless mode: the same rules, the same state. The token's scope is the "
                "body's org_id. An organisation the quote cannot be charged to is a business "
                "answer (would_be_approved false with a reason), not a 404.",
                "requestBody": {
                    "required": True,
                    "content": _content(
                        _ref("QuoteRequest"),
                        {
                            "org_id": "acme",
                            "user_id": "u-17",
                            "action": "export",
                            "items": [
                                {
                                    "type": "contact",
                                    "id": "c-1",
                                    "company_id": "co-9",
                                    "has_verified_email": True,
                                },
                                {"type": "company", "id": "co-3"},
                            ],
                        },
                    ),
                },
                "responses": {"200": _ok("the quote", "Quote"), **_ERRORS, **_UNAVAILABLE},
                "x-creditgate-scopes": _HISTORY,
            }
        },
        "/v1/me": {
            "get": {
                "operationId": "me",
                "summary": "The token's scope: role, organisations, user (the console's sign-in)",
                "x-creditgate-scopes": ["any token"],
                "responses": {
                    "200": _ok("the caller", "Me"),
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                },
            }
        },
        "/v1/orgs/{org}/members": _read(
            "getMembers",
            "My team: each member's role, whether they may use credits, and their usage "
            "this period by action",
            [_ORG],
            ("the team", "TeamReport"),
            ("unknown organisation", "acme is not a known organisation"),
            _TEAM,
            csv=True,
        ),
        "/v1/orgs/{org}/members/{user}/credits-allowed": _write(
            "put",
            "setCreditsAllowed",
            "Allow or disallow a member's credits use (member.set_credits_allowed)",
            [_ORG, _path_id("user", "u-17")],
            ("CreditsAllowedBody", {"allowed": False}),
            _ALLOW,
            _WRITES + " set_by is the admin token's user; an operator names one.",
        ),
        "/v1/orgs/{org}/grants": _write(
            "post",
            "grant",
            "Top up the current period (credits.grant)",
            [_ORG],
            ("GrantBody", {"credits": 500, "reason": "extra credits for the Q3 campaign"}),
            _GRANT,
            _WRITES + " granted_by is the token's user; a token without one names it.",
        ),
        "/v1/orgs/{org}/members/{user}/credit-limit": _write(
            "put",
            "setCreditLimit",
            "Set or clear a member's credit limit per period (member.set_credit_limit)",
            [_ORG, _path_id("user", "u-17")],
            ("CreditLimitBody", {"limit": 500}),
            _LIMIT,
            _WRITES + " The most credits the member may use in a license period (charged + "
            "held - refunded); null: no limit, the whole pool. It carries over to the next "
            "period. set_by is the admin token's user; an operator names one.",
        ),
        "/v1/orgs/{org}/refunds": _write(
            "post",
            "refund",
            "Refund charged items of a request of the current period (charge.refund)",
            [_ORG],
            (
                "RefundBody",
                {
                    "request_id": "push-0042",
                    "items": [{"type": "contact", "id": "c-1"}],
                    "reason": "the CRM refused the contact",
                },
            ),
            _REFUND,
            _WRITES + " Each item is refunded at most once; its repeat window closes if this "
            "request opened it. 409 for license_period_ended and nothing_to_refund, 404 for "
            "request_not_found, each with the command.rejected event. refunded_by is the "
            "token's user; a token without one names it.",
            {
                "404": {
                    "description": "the worker decided no such request (request_not_found): "
                    "its license event",
                    "content": _content(
                        _ref("CommandProblem"), _NOT_FOUND_EXAMPLE, PROBLEM_CONTENT_TYPE
                    ),
                }
            },
        ),
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": _content({"type": "object"}),
                    }
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness of the worker",
                "security": [],
                "responses": {"200": _ok("alive", "Health")},
            }
        },
    }


def _problem_response(
    description: str, status: int, code: str, detail: str, schema: str = "Problem"
) -> dict[str, Any]:
    example = problem(status, code, detail)
    if schema == "InvalidProblem":
        example["errors"] = [{"field": "org_id", "message": detail.partition(": ")[2]}]
    return {
        "description": description,
        "content": _content(_ref(schema), example, PROBLEM_CONTENT_TYPE),
    }


def _responses() -> dict[str, Any]:
    unauthorized = _problem_response(
        "no valid bearer token (tokens are configured)",
        401,
        "unauthorized",
        "the bearer token is not valid",
    )
    unauthorized["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return {
        "Invalid": _problem_response(
            "a malformed path, query or body",
            400,
            "invalid_request",
            "org_id: 1-128 characters of [A-Za-z0-9._:@-]",
            "InvalidProblem",
        ),
        "Unauthorized": unauthorized,
        "Forbidden": _problem_response(
            "the token's scope does not include the organisation, the user or the action",
            403,
            "forbidden",
            "this token may not read the organisation acme",
        ),
        "NotFound": _problem_response("not found", 404, "not_found", "not found"),
        "Unavailable": _problem_response(
            "Redis does not answer; try again",
            int(HTTPStatus.SERVICE_UNAVAILABLE),
            "unavailable",
            "Redis unavailable",
        ),
    }


def _resolve_named(value: Any) -> Any:
    """The models' markers of named schemas as references (``schemas.NAMED``)."""
    if isinstance(value, list):
        return [_resolve_named(v) for v in value]
    if not isinstance(value, dict):
        return value
    resolved = {k: _resolve_named(v) for k, v in value.items() if k != schemas.NAMED}
    if isinstance(resolved.get("description"), str):  # a docstring's lines, as one
        resolved["description"] = " ".join(resolved["description"].split())
    if schemas.NAMED in value:
        return {"$ref": schemas.COMPONENTS + value[schemas.NAMED], **resolved}
    return resolved


def _schemas(generator: type[GenerateJsonSchema]) -> dict[str, Any]:
    _, top = models_json_schema(
        [(model, "validation") for model in schemas.MODELS],
        ref_template=schemas.COMPONENTS + "{model}",
        schema_generator=generator,
    )
    found: dict[str, Any] = top.get("$defs", {})
    # the request's union, named as the document always named it
    request = TypeAdapter(schemas.QuoteRequest).json_schema(
        ref_template=schemas.COMPONENTS + "{model}", schema_generator=generator
    )
    request.pop("$defs", None)
    resolved: dict[str, Any] = _resolve_named({**schemas.SCALARS, **found, "QuoteRequest": request})
    return resolved


def openapi_document(generator: type[GenerateJsonSchema]) -> dict[str, Any]:
    """The document; ``generator`` writes the models' JSON Schemas (contracts._Schemas)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "creditgate", "version": API_VERSION, "description": DESCRIPTION},
        "servers": [{"url": "http://127.0.0.1:6066", "description": "a local worker"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token of CREDITGATE_API_TOKENS",
                }
            },
            "responses": _responses(),
            "schemas": _schemas(generator),
        },
    }

"""api/openapi.json, generated from api/schemas.py: what it keeps, and that the errors
the API renders are the problem details it describes."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from creditgate.api.errors import (
    PROBLEM_CONTENT_TYPE,
    ApiError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
    problem,
)
from creditgate.api.views import openapi_document

DOCUMENT: dict[str, Any] = orjson.loads(openapi_document())

# what version 1.0 of the document (kept by hand) had: generation keeps all of it
PATHS_1_0 = {
    "/v1/orgs/{org}/credits": ["org"],
    "/v1/orgs/{org}/usage": ["org", "period"],
    "/v1/orgs/{org}/users/{user}/charges": ["org", "user", "action", "limit", "before"],
    "/v1/orgs/{org}/requests/{request_id}": ["org", "request_id", "offset", "limit"],
    "/v1/quote": [],
    "/openapi.json": [],
    "/health": [],
}
SCHEMAS_1_0 = {
    "Identifier", "Timestamp", "Action", "Reason", "Error", "InvalidError", "Credits",
    "UsageCounts", "UsageRow", "UsageReport", "ResultItem", "ChargeResult", "Decision",
    "HistoryEntry", "ChargeHistory", "CompanyItem", "QuoteContactItem", "QuoteRequest",
    "ListQuoteRequest", "VerificationQuoteRequest", "QuoteItem", "Quote",
}  # fmt: skip


def validator(name: str) -> jsonschema.Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource.from_contents(DOCUMENT, default_specification=DRAFT202012)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"urn:openapi#/components/schemas/{name}"}, registry=registry
    )


def test_every_path_parameter_and_schema_of_version_1_0_is_kept() -> None:
    for path, parameters in PATHS_1_0.items():
        (operation,) = DOCUMENT["paths"][path].values()
        # kept as they were, in their order; a later version may add optional ones after
        # them (1.2: ``format``)
        names = [p["name"] for p in operation.get("parameters", [])]
        assert names[: len(parameters)] == parameters, path
        assert all(
            not p.get("required") for p in operation.get("parameters", [])[len(parameters) :]
        ), path
    assert not SCHEMAS_1_0 - set(DOCUMENT["components"]["schemas"])


@pytest.mark.parametrize(
    "error",
    [
        ApiError("boom"),
        Unauthenticated("the bearer token is not valid"),
        Forbidden("this token may not read the organisation beta"),
        NotFound("acme has no license"),
    ],
)
def test_each_api_error_is_the_problem_the_document_describes(error: ApiError) -> None:
    body = error.body()

    validator("Problem").validate(body)
    validator("Error").validate(body)  # the 1.0 name of the schema
    assert body["status"] == error.status
    assert body["type"] == f"urn:creditgate:problem:{error.code}"
    assert body["detail"] == body["message"] == error.message
    assert body["code"] == error.code


def test_a_400_lists_its_field_errors() -> None:
    body = InvalidInput.of("org_id", "1-128 characters of [A-Za-z0-9._:@-]").body()

    validator("InvalidProblem").validate(body)
    validator("InvalidError").validate(body)
    assert body["errors"] == [
        {"field": "org_id", "message": "1-128 characters of [A-Za-z0-9._:@-]"}
    ]


def test_a_plain_http_error_is_about_blank_with_the_status_phrase() -> None:
    body = problem(405, "http_error", "Method not allowed")

    validator("Problem").validate(body)
    assert (body["type"], body["title"]) == ("about:blank", "Method Not Allowed")


def test_every_error_response_is_problem_json_with_a_valid_example() -> None:
    responses = dict(DOCUMENT["components"]["responses"])
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and "$ref" not in response:
                    responses[f"{method} {path} {status}"] = response
    for name, response in responses.items():
        (media,) = response["content"]
        assert media == PROBLEM_CONTENT_TYPE, name
        content = response["content"][media]
        schema = content["schema"]["$ref"].rpartition("/")[2]
        validator(schema).validate(content["example"])


def test_the_quote_example_is_a_quote_request() -> None:
    content = DOCUMENT["paths"]["/v1/quote"]["post"]["requestBody"]["content"]
    validator("QuoteRequest").validate(content["application/json"]["example"])

"""Errors the API answers with, as RFC 9457 problem details; each knows its status.

Every HTTP error of the worker is ``application/problem+json`` built by ``problem``
here, whoever raises it (an ``ApiError`` of a view, a Redis outage, faust's 405, a path
no route serves):

- ``type``: ``urn:creditgate:problem:<code>`` for creditgate's own problems, or
  ``about:blank`` for a plain HTTP error (then ``title`` is the status phrase);
- ``title``: the same for every problem of a type; ``status``: the HTTP status;
  ``detail``: this occurrence, in one sentence a person can read;
- extension members kept from the API's first error shape, so clients written for it
  keep working: ``code`` (a stable name of the type), ``message`` (the same text as
  ``detail``), and for 400s ``errors``, the field errors (``{"field", "message"}``).

The CLI prints the same message.
"""

from __future__ import annotations

from http import HTTPStatus

from pydantic import ValidationError

from creditgate.errors import CreditgateError

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:creditgate:problem:"
HTTP_ERROR = "http_error"  # a plain HTTP error (405, an unknown path): type about:blank

# code -> title; the codes are the API's first error shape's, unchanged
TITLES: dict[str, str] = {
    "invalid_request": "The request is malformed",
    "unauthorized": "A valid bearer token is needed",
    "forbidden": "The token's scope does not include this organisation, user or action",
    "command_rejected": "The license command was refused",
    "no_answer": "The license command was published but not answered in time",
    "not_found": "Nothing found",
    "unavailable": "A service creditgate needs does not answer; try again",
    "internal_error": "The request failed",
}


def problem_type(code: str) -> str:
    return "about:blank" if code == HTTP_ERROR else PROBLEM_TYPE_PREFIX + code


def problem(status: int, code: str, detail: str, **extensions: object) -> dict[str, object]:
    """The problem details object of one error (RFC 9457 section 3)."""
    title = TITLES.get(code) or HTTPStatus(status).phrase
    return {
        "type": problem_type(code),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "message": detail,
        **extensions,
    }


class ApiError(CreditgateError):
    status = 500
    code = "internal_error"

    def body(self) -> dict[str, object]:
        return problem(self.status, self.code, self.message)


class InvalidInput(ApiError):
    """A path, query or body the API refuses."""

    status = 400
    code = "invalid_request"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))

    @classmethod
    def of(cls, field: str, message: str) -> InvalidInput:
        return cls([{"field": field, "message": message}])

    def body(self) -> dict[str, object]:
        return problem(self.status, self.code, self.message, errors=self.errors)


class Unauthenticated(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class CommandRefused(ApiError):
    """A write published as a license command and refused by the worker: the body
    carries the command's id and its license event. 409, or 404 when what the command is
    about does not exist (a refund of a request the worker never decided)."""

    status = 409
    code = "command_rejected"

    def __init__(self, event: dict[str, object], status: int = 409) -> None:
        self.event = event
        self.status = status
        super().__init__(str(event.get("message") or event.get("reason") or "refused"))

    def body(self) -> dict[str, object]:
        return problem(
            self.status,
            self.code,
            self.message,
            command_id=self.event.get("command_id"),
            reason=self.event.get("reason"),
            event=self.event,
        )


class NoAnswerInTime(ApiError):
    """A write published as a license command whose event did not come in time: the
    command id lets the caller look for it later (it will still be applied)."""

    status = 504
    code = "no_answer"

    def __init__(self, message: str, command_id: str) -> None:
        self.command_id = command_id
        super().__init__(message)

    def body(self) -> dict[str, object]:
        return problem(self.status, self.code, self.message, command_id=self.command_id)


def field_errors(error: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """pydantic's errors as ``{"field", "message"}`` pairs (``items.0.contact.id``)."""
    return [
        {
            "field": prefix + (".".join(str(p) for p in err["loc"]) or "body"),
            "message": err["msg"],
        }
        for err in error.errors()
    ]

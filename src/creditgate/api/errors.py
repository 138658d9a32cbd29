"""Errors the API answers with: each knows its HTTP status and its ``code``.

The views render them as ``{"code", "message"}`` (400s add ``errors``: the field
errors, ``{"field", "message"}`` pairs). The CLI prints the same message.
"""

from __future__ import annotations

from pydantic import ValidationError

from creditgate.errors import CreditgateError


class ApiError(CreditgateError):
    status = 500
    code = "internal_error"

    def body(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


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
        return {**super().body(), "errors": self.errors}


class Unauthenticated(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


def field_errors(error: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """pydantic's errors as ``{"field", "message"}`` pairs (``items.0.contact.id``)."""
    return [
        {
            "field": prefix + (".".join(str(p) for p in err["loc"]) or "body"),
            "message": err["msg"],
        }
        for err in error.errors()
    ]

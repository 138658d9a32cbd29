"""``POST /v1/orgs/{org}/refunds``: a refund asked for over HTTP (customer success, or the
service whose CRM push failed).

The API writes nothing itself: the refund is published as the ``charge.refund`` license
command on Kafka and answered with the worker's license event for it, so the worker stays
the single writer of credit state. The publishing is given to ``register_refund_routes``
(``Commands``): the API does not import the stream layer, ``creditgate.worker`` wires it.

The body is the command's less its ids: ``request_id``, ``items`` (optional: every charged
item), ``reason``, ``refunded_by``, and optionally a ``command_id`` so that a client's
retry is the same command (by default each call is a new one). Answers: 200 with the
``command.applied`` event; 404 ``request_not_found``; 409 for ``license_period_ended`` and
``nothing_to_refund`` (the event is in the problem's ``event``); 504 when no worker
answered in time (the command stays published and will be applied).
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Protocol

import faust
import orjson
from faust.web import Request, Response
from pydantic import ValidationError

from creditgate.api.access import Access
from creditgate.api.errors import ApiError, InvalidInput, field_errors, problem
from creditgate.api.views import Api, ApiView, Clock, openapi_document
from creditgate.domain.commands import Refund
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore

COMMAND_TIMEOUT_SECONDS = 30.0


class Commands(Protocol):
    """Publishes a license command and returns its license event (raises TimeoutError
    when none came in ``timeout`` seconds)."""

    async def command(self, body: dict[str, Any], timeout: float) -> dict[str, Any]: ...


class CommandRejected(ApiError):
    status = 409

    def __init__(self, event: dict[str, Any], status: int) -> None:
        self.event, self.status, self.code = event, status, str(event["reason"])
        super().__init__(str(event["message"]))

    def body(self) -> dict[str, object]:
        return problem(self.status, self.code, self.message, event=self.event)


class NoAnswer(ApiError):
    status = 504
    code = "no_answer"


def refund_command(org: str, body: Any) -> dict[str, Any]:
    """The ``charge.refund`` command of a request body; raises ``InvalidInput``."""
    if not isinstance(body, dict):
        raise InvalidInput.of("body", "expected a JSON object")
    for name in ("org_id", "type"):
        if name in body:
            raise InvalidInput.of(name, "set by the path and the route")
    command = {
        "command_id": f"http-{uuid.uuid4().hex[:16]}",
        **body,
        "org_id": org,
        "type": "charge.refund",
    }
    try:
        Refund.model_validate(command)
    except ValidationError as exc:
        raise InvalidInput(field_errors(exc)) from None
    return command


class RefundsView(ApiView):
    commands: ClassVar[Commands]

    async def post(self, request: Request, org: str) -> Response:
        self.reader(request, org)
        raw = await self.read_request_content(request)
        try:
            body = orjson.loads(raw or b"null")
        except orjson.JSONDecodeError as exc:
            raise InvalidInput.of("body", f"not JSON: {exc}") from None
        command = refund_command(org, body)
        try:
            event = await self.commands.command(command, COMMAND_TIMEOUT_SECONDS)
        except TimeoutError:
            raise NoAnswer(
                f"refund {command['command_id']} was published; no worker answered within "
                f"{COMMAND_TIMEOUT_SECONDS:.0f}s (it will still be applied)"
            ) from None
        if event["type"] != "command.applied":
            raise CommandRejected(event, 404 if event["reason"] == "request_not_found" else 409)
        return self.json(event)


def register_refund_routes(
    app: faust.App, store: CreditStore, clock: Clock, settings: Settings, commands: Commands
) -> None:
    """Add ``POST /v1/orgs/{org}/refunds`` to ``app`` (after ``register_views``), with the
    same tokens as the other routes."""
    api = Api(
        store=store,
        clock=clock,
        access=Access.from_settings(settings.api_tokens, settings.http_host),
        window_days=settings.repeat_window_days,
        max_items=settings.max_items,
        openapi=openapi_document(),
    )
    bound = type("RefundsView", (RefundsView,), {"api": api, "commands": commands})
    app.page("/v1/orgs/{org}/refunds")(bound)

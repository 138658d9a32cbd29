"""The HTTP routes of the worker, as faust web views.

Every answer is JSON (or CSV for the reports that offer ``?format=csv``); errors are
RFC 9457 problem details (``application/problem+json``, built by ``api.errors.problem``,
with ``code`` and ``message`` kept; 400s add ``errors``, the field errors). Each handler
authenticates first (401), then checks its ids (400) and the caller's scope for what it
does (``access.Need``: 403), then asks ``reports`` / ``quotes`` (404 when there is
nothing). Writes are published as license commands and answered with their license
event (``license_desk``): the worker's decision loop stays the only writer of Redis.
``/openapi.json`` describes all of it and, like ``/health`` and the console's files
(``console.py``), is open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, Protocol, cast

import faust
import orjson
from aiohttp import web
from faust.web import Request, Response, View
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from faust.web.exceptions import WebError
from pydantic import ValidationError

from creditgate.api import csv_rows, quotes, reports
from creditgate.api.access import Access, Caller, Need
from creditgate.api.console import register_console
from creditgate.api.errors import (
    HTTP_ERROR,
    PROBLEM_CONTENT_TYPE,
    ApiError,
    CommandRefused,
    Forbidden,
    InvalidInput,
    NoAnswerInTime,
    NotFound,
    field_errors,
    problem,
)
from creditgate.api.license_desk import LicenseDesk, NoAnswer, new_command_id
from creditgate.domain.commands import CommandReason, LicenseCommand, validate_command
from creditgate.domain.ids import is_identifier
from creditgate.domain.intake import MAX_MESSAGE_BYTES
from creditgate.errors import StoreUnavailable
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream.topics import TopicRegistry

log = logging.getLogger("creditgate.api")

# the store turns every Redis failure into StoreUnavailable: "try later"
_UNAVAILABLE = (StoreUnavailable,)
# the largest body the API reads: what the request topics take. A valid quote of 10,000
# contacts with companies and 128-character ids is about 3 MB, a refund naming 10,000
# items about 1.6 MB; aiohttp's default (1 MiB) would answer both with 413
MAX_BODY_BYTES = MAX_MESSAGE_BYTES


class Clock(Protocol):
    def now_ms(self) -> int: ...


def openapi_document() -> bytes:
    """The OpenAPI 3.1 document of this API, as kept in the package."""
    return resources.files("creditgate.api").joinpath("openapi.json").read_bytes()


@dataclass(frozen=True)
class Api:
    """What the views need, built once per app."""

    store: CreditStore
    clock: Clock
    access: Access
    window_days: float
    max_items: int
    openapi: bytes
    desk: LicenseDesk


def _require_ids(**ids: str) -> None:
    errors = [
        {"field": name, "message": "1-128 characters of [A-Za-z0-9._:@-]"}
        for name, value in ids.items()
        if not is_identifier(value)
    ]
    if errors:
        raise InvalidInput(errors)


class ApiView(View):
    """Turns ``ApiError`` and Redis outages into problem details."""

    api: ClassVar[Api]
    # like unknown fields in a body, an unknown query parameter is refused, not ignored
    query_params: ClassVar[frozenset[str]] = frozenset()

    async def dispatch(self, request: Any) -> Any:
        try:
            return await super().dispatch(request)
        except ApiError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return self._render(exc.body(), exc.status, headers)
        except _UNAVAILABLE as exc:
            return self._problem(503, "unavailable", f"Redis unavailable: {exc}")
        except web.HTTPException as exc:  # aiohttp's, e.g. 413 for a body past client_max_size
            if exc.status < 400:
                raise
            return self._problem(exc.status, HTTP_ERROR, exc.reason)
        except Exception:  # the edge: log it, answer in the API's shape, keep serving
            log.exception("%s %s failed", request.method, request.path)
            return self._problem(500, "internal_error", "the request failed; see the worker log")

    async def on_request_error(self, request: Request, exc: WebError) -> Response:
        # faust's own errors (405 for a method a view lacks) in the API's shape
        return self._problem(int(exc.code), HTTP_ERROR, str(exc.detail))

    def _problem(self, status: int, code: str, message: str) -> Response:
        return self._render(problem(status, code, message), status)

    def _render(
        self, body: dict[str, object], status: int, headers: dict[str, str] | None = None
    ) -> Response:
        return self.json(body, status=status, headers=headers, content_type=PROBLEM_CONTENT_TYPE)

    def caller(self, request: Request) -> Caller:
        """401 without a valid token; then 400 for an unknown query parameter."""
        caller = self.api.access.authenticate(request.headers.get("Authorization"))
        unknown = sorted(set(request.query) - self.query_params)
        if unknown:
            raise InvalidInput(
                [{"field": name, "message": "unknown parameter"} for name in unknown]
            )
        return caller

    def reader(
        self, request: Request, org: str, need: Need, user: str | None = None, **ids: str
    ) -> Caller:
        """401 without a valid token, 400 for a malformed parameter, 403 out of scope."""
        caller = self.caller(request)
        _require_ids(org_id=org, **({} if user is None else {"user_id": user}), **ids)
        self.api.access.authorize(caller, org, need, user)
        return caller

    def as_csv(self, request: Request) -> bool:
        """``?format=csv`` (or ``json``, the default)."""
        chosen = request.query.get("format", "json")
        if chosen not in ("json", "csv"):
            raise InvalidInput.of("format", "json or csv")
        return chosen == "csv"

    def csv(self, text: str, headers: dict[str, str] | None = None) -> Response:
        # aiohttp takes a charset in the header only, not in content_type
        content_type = {"Content-Type": f"{csv_rows.CSV_CONTENT_TYPE}; charset=utf-8"}
        return self.bytes(text.encode(), headers={**content_type, **(headers or {})})

    async def json_body(self, request: Request) -> Any:
        # aiohttp's read() stops at client_max_size (MAX_BODY_BYTES) with 413; faust's
        # read_request_content reads the stream whole, whatever its size
        raw = await cast(web.Request, request).read()
        try:
            return orjson.loads(raw or b"null")
        except orjson.JSONDecodeError as exc:
            raise InvalidInput.of("body", f"not JSON: {exc}") from None


class MeView(ApiView):
    """Who the token is: the console's sign-in asks it (role, organisations, user)."""

    async def get(self, request: Request) -> Response:
        return self.json(self.caller(request).to_json())


class CreditsView(ApiView):
    async def get(self, request: Request, org: str) -> Response:
        self.reader(request, org, Need.CREDITS)
        view = await self.api.store.credits(org, self.api.clock.now_ms())
        if view is None:
            raise NotFound(f"{org} has no license")
        return self.json(view)


class UsageView(ApiView):
    query_params = frozenset({"period", "format"})

    async def get(self, request: Request, org: str) -> Response:
        period = request.query.get("period")
        self.reader(request, org, Need.TEAM, **({} if period is None else {"period": period}))
        as_csv = self.as_csv(request)
        report = await reports.usage_report(self.api.store, org, period, self.api.clock.now_ms())
        if report is None:
            raise NotFound(f"{org} has no license")
        return self.csv(csv_rows.usage_csv(report)) if as_csv else self.json(report)


class ChargesView(ApiView):
    query_params = frozenset({"action", "limit", "before", "format"})

    async def get(self, request: Request, org: str, user: str) -> Response:
        self.reader(request, org, Need.HISTORY, user)
        as_csv = self.as_csv(request)
        query = reports.parse_history_query(request.query)
        history = await reports.charge_history(
            self.api.store, org, user, query, self.api.window_days
        )
        if history is None:
            raise NotFound(f"{org} is not a known organisation")
        if not as_csv:
            return self.json(history)
        # the next page of a CSV: its cursor in a Link header (RFC 8288)
        more = history["next_before"]
        link = (
            f"<?action={query.action.value}&limit={query.limit}&before={more}&format=csv>; "
            'rel="next"'
        )
        return self.csv(csv_rows.history_csv(history), {"Link": link} if more else None)


class DecisionView(ApiView):
    query_params = frozenset({"offset", "limit"})

    async def get(self, request: Request, org: str, request_id: str) -> Response:
        caller = self.reader(request, org, Need.HISTORY, request_id=request_id)
        page = reports.parse_items_page(request.query)
        found = await reports.one_decision(
            self.api.store, org, request_id, self.api.window_days, page
        )
        if found is None:
            raise NotFound(f"{org} has no decision for {request_id}")
        # a member may see their own decisions only: checked on the decision itself,
        # and refused without saying whose it is
        if not caller.may(Need.HISTORY, org, found["user_id"]):
            raise Forbidden(f"a {caller.role.value} token may see its own decisions only")
        return self.json(found)


class QuoteView(ApiView):
    async def post(self, request: Request) -> Response:
        caller = self.caller(request)
        body = await self.json_body(request)
        # the scope is the body's organisation and user; a malformed one is a 400 below
        org = body.get("org_id") if isinstance(body, dict) else None
        user = body.get("user_id") if isinstance(body, dict) else None
        if is_identifier(org):
            self.api.access.authorize(
                caller, org, Need.QUOTE, user if isinstance(user, str) else None
            )
        answer = await quotes.quote(
            self.api.store,
            body,
            self.api.clock.now_ms(),
            max_items=self.api.max_items,
            window_days=self.api.window_days,
        )
        return self.json(answer)


class MembersView(ApiView):
    """*My team*: each member's role, permission and usage this period."""

    query_params = frozenset({"format"})

    async def get(self, request: Request, org: str) -> Response:
        self.reader(request, org, Need.TEAM)
        as_csv = self.as_csv(request)
        team = await reports.team_report(self.api.store, org, self.api.clock.now_ms())
        if team is None:
            raise NotFound(f"{org} is not a known organisation")
        return self.csv(csv_rows.team_csv(team)) if as_csv else self.json(team)


class CommandView(ApiView):
    """A write: its body checked, published as a license command, answered with the
    command's license event (200 applied, 409 refused, 504 no answer in time)."""

    # refusals answered otherwise than 409: the thing the command is about is not there
    not_found: ClassVar[frozenset[str]] = frozenset()

    def command(self, payload: dict[str, Any]) -> LicenseCommand:
        """``payload`` (less its ``command_id``) as the license command of its ``type``,
        checked by the domain's own model; raises ``InvalidInput`` (400)."""
        try:
            return validate_command({"command_id": new_command_id(), **payload})
        except ValidationError as exc:
            raise InvalidInput(field_errors(exc)) from None

    async def publish(self, command: LicenseCommand) -> Response:
        try:
            event = await self.api.desk.submit(command)
        except NoAnswer as exc:
            raise NoAnswerInTime(exc.message, exc.command_id) from None
        if event.get("type") != "command.applied":
            status = 404 if event.get("reason") in self.not_found else 409
            raise CommandRefused(event, status)
        return self.json(event)


def _fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidInput.of("body", "a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput([{"field": name, "message": "unknown field"} for name in unknown])
    return body


def _acting_user(caller: Caller, body: dict[str, Any], field: str) -> Any:
    """Who a write is by: the token's own user; a token without one (an operator, a
    support token without user, or an open API) must name them in the body. Not naming
    anyone is refused like a scope (403): a write is always made by someone."""
    if caller.user is not None:
        if field in body and body[field] != caller.user:
            raise Forbidden(f"this token acts as {caller.user}, not as {body[field]}")
        return caller.user
    if field not in body:
        raise Forbidden(f"this token acts for no user of its own: name one in {field}")
    return body[field]


class CreditsAllowedView(CommandView):
    """ "Disallow credits use" / "Allow": ``member.set_credits_allowed``."""

    async def put(self, request: Request, org: str, user: str) -> Response:
        caller = self.reader(request, org, Need.ALLOW, user)
        body = _fields(await self.json_body(request), {"allowed", "set_by"})
        command = self.command(
            {
                "org_id": org,
                "type": "member.set_credits_allowed",
                "user_id": user,
                "allowed": body.get("allowed"),
                "set_by": _acting_user(caller, body, "set_by"),
            }
        )
        return await self.publish(command)


class GrantsView(CommandView):
    """A top-up by customer success: ``credits.grant``."""

    async def post(self, request: Request, org: str) -> Response:
        caller = self.reader(request, org, Need.GRANT)
        body = _fields(
            await self.json_body(request), {"credits", "reason", "grant_id", "granted_by"}
        )
        command = self.command(
            {
                "org_id": org,
                "type": "credits.grant",
                "grant_id": body["grant_id"] if "grant_id" in body else f"g-{new_command_id()}",
                "credits": body.get("credits"),
                "reason": body.get("reason"),
                "granted_by": _acting_user(caller, body, "granted_by"),
            }
        )
        return await self.publish(command)


class CreditLimitView(CommandView):
    """An admin's per-member credit limit for each period: ``member.set_credit_limit``
    (``{"limit": 500}``; ``{"limit": null}``: no limit, the whole pool)."""

    async def put(self, request: Request, org: str, user: str) -> Response:
        caller = self.reader(request, org, Need.LIMIT, user)
        body = _fields(await self.json_body(request), {"limit", "set_by"})
        command = self.command(
            {
                "org_id": org,
                "type": "member.set_credit_limit",
                "user_id": user,
                # null is a limit (none); a missing one is the model's 400
                **({"limit": body["limit"]} if "limit" in body else {}),
                "set_by": _acting_user(caller, body, "set_by"),
            }
        )
        return await self.publish(command)


class RefundsView(CommandView):
    """Charged items of a decided request of the current period given back (customer
    success, or the service whose CRM push failed): ``charge.refund``. A ``command_id``
    in the body makes a client's retry the same command; by default each call is a new
    one. 404 when the worker knows no such request (``request_not_found``)."""

    not_found = frozenset({CommandReason.REQUEST_NOT_FOUND.value})

    async def post(self, request: Request, org: str) -> Response:
        caller = self.reader(request, org, Need.REFUND)
        body = _fields(
            await self.json_body(request),
            {"request_id", "items", "reason", "refunded_by", "command_id"},
        )
        given: dict[str, Any] = {n: body[n] for n in ("command_id", "items") if n in body}
        command = self.command(
            {
                "org_id": org,
                "type": "charge.refund",
                "request_id": body.get("request_id"),
                "reason": body.get("reason"),
                "refunded_by": _acting_user(caller, body, "refunded_by"),
                **given,
            }
        )
        return await self.publish(command)


class OpenApiView(ApiView):
    async def get(self, request: Request) -> Response:
        return self.bytes(self.api.openapi, content_type="application/json")


ROUTES: tuple[tuple[str, type[ApiView]], ...] = (
    ("/v1/orgs/{org}/credits", CreditsView),
    ("/v1/orgs/{org}/usage", UsageView),
    ("/v1/orgs/{org}/users/{user}/charges", ChargesView),
    ("/v1/orgs/{org}/requests/{request_id}", DecisionView),
    ("/v1/quote", QuoteView),
    ("/v1/me", MeView),
    ("/v1/orgs/{org}/members", MembersView),
    ("/v1/orgs/{org}/members/{user}/credits-allowed", CreditsAllowedView),
    ("/v1/orgs/{org}/members/{user}/credit-limit", CreditLimitView),
    ("/v1/orgs/{org}/grants", GrantsView),
    ("/v1/orgs/{org}/refunds", RefundsView),
    ("/openapi.json", OpenApiView),
)


@web.middleware
async def http_problems(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own errors, raised before any view (a path no route serves: 404), as
    problem details too; the views answer theirs themselves (``ApiView``)."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "www-authenticate"}}
        return web.json_response(
            problem(exc.status, HTTP_ERROR, exc.reason),
            status=exc.status,
            headers=kept,
            content_type=PROBLEM_CONTENT_TYPE,
            dumps=lambda value: orjson.dumps(value).decode(),
        )
    return response


def register_views(
    app: faust.App,
    store: CreditStore,
    clock: Clock,
    settings: Settings,
    registry: TopicRegistry,
) -> None:
    """Add the API routes and the console to ``app`` (served by the worker's web server).

    Raises ``ConfigurationError`` when the access settings are unsafe (no token while
    listening beyond loopback), so the worker refuses to start.
    """
    api = Api(
        store=store,
        clock=clock,
        access=Access.from_settings(settings.api_tokens, settings.http_host),
        window_days=settings.repeat_window_days,
        max_items=settings.max_items,
        openapi=openapi_document(),
        desk=LicenseDesk(settings, registry, settings.http_command_timeout_seconds),
    )
    # faust's web driver is aiohttp's (the default, and the one the worker uses)
    if not isinstance(app.web, AiohttpWeb):
        raise TypeError(f"the HTTP API needs faust's aiohttp web driver, not {app.web!r}")
    app.web.web_app.middlewares.append(http_problems)

    async def close_desk(_: web.Application) -> None:
        await api.desk.close()

    app.web.web_app.on_cleanup.append(close_desk)
    for path, view in ROUTES:
        # a subclass per app binds the views to this app's store, clock and tokens
        bound = type(view.__name__, (view,), {"api": api})
        app.page(path)(bound)
    register_console(app, ApiView)

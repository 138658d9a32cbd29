"""The HTTP routes of the worker (DESIGN §5), as faust web views.

Every answer is JSON; errors are RFC 9457 problem details (``application/problem+json``,
built by ``api.errors.problem``, with ``code`` and ``message`` kept; 400s add ``errors``,
the field errors). Each handler authenticates first (401), then checks its ids (400) and
the caller's scope (403), then asks ``reports`` / ``quotes`` (404 when there is
nothing). ``/openapi.json`` describes all of it and, like ``/health``, is open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, Protocol

import faust
import orjson
from aiohttp import web
from faust.web import Request, Response, View
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from faust.web.exceptions import WebError

from creditgate.api import quotes, reports
from creditgate.api.access import Access, Caller
from creditgate.api.errors import (
    HTTP_ERROR,
    PROBLEM_CONTENT_TYPE,
    ApiError,
    InvalidInput,
    NotFound,
    problem,
)
from creditgate.domain.ids import is_identifier
from creditgate.errors import StoreUnavailable
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore

log = logging.getLogger("creditgate.api")

# the store turns every Redis failure into StoreUnavailable: "try later"
_UNAVAILABLE = (StoreUnavailable,)


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

    def reader(self, request: Request, org: str, **ids: str) -> None:
        """401 without a valid token, 400 for a malformed parameter, 403 out of scope."""
        caller = self.caller(request)
        _require_ids(org_id=org, **ids)
        self.api.access.authorize(caller, org)


class CreditsView(ApiView):
    async def get(self, request: Request, org: str) -> Response:
        self.reader(request, org)
        view = await self.api.store.credits(org, self.api.clock.now_ms())
        if view is None:
            raise NotFound(f"{org} has no license")
        return self.json(view)


class UsageView(ApiView):
    query_params = frozenset({"period"})

    async def get(self, request: Request, org: str) -> Response:
        period = request.query.get("period")
        self.reader(request, org, **({} if period is None else {"period": period}))
        report = await reports.usage_report(self.api.store, org, period, self.api.clock.now_ms())
        if report is None:
            raise NotFound(f"{org} has no license")
        return self.json(report)


class ChargesView(ApiView):
    query_params = frozenset({"action", "limit", "before"})

    async def get(self, request: Request, org: str, user: str) -> Response:
        self.reader(request, org, user_id=user)
        query = reports.parse_history_query(request.query)
        history = await reports.charge_history(
            self.api.store, org, user, query, self.api.window_days
        )
        if history is None:
            raise NotFound(f"{org} is not a known organisation")
        return self.json(history)


class DecisionView(ApiView):
    query_params = frozenset({"offset", "limit"})

    async def get(self, request: Request, org: str, request_id: str) -> Response:
        self.reader(request, org, request_id=request_id)
        page = reports.parse_items_page(request.query)
        found = await reports.one_decision(
            self.api.store, org, request_id, self.api.window_days, page
        )
        if found is None:
            raise NotFound(f"{org} has no decision for {request_id}")
        return self.json(found)


class QuoteView(ApiView):
    async def post(self, request: Request) -> Response:
        caller = self.caller(request)
        raw = await self.read_request_content(request)
        try:
            body = orjson.loads(raw or b"null")
        except orjson.JSONDecodeError as exc:
            raise InvalidInput.of("body", f"not JSON: {exc}") from None
        # the scope is the body's organisation; a malformed one is a 400 below
        org = body.get("org_id") if isinstance(body, dict) else None
        if is_identifier(org):
            self.api.access.authorize(caller, org)
        answer = await quotes.quote(
            self.api.store,
            body,
            self.api.clock.now_ms(),
            max_items=self.api.max_items,
            window_days=self.api.window_days,
        )
        return self.json(answer)


class OpenApiView(ApiView):
    async def get(self, request: Request) -> Response:
        return self.bytes(self.api.openapi, content_type="application/json")


ROUTES: tuple[tuple[str, type[ApiView]], ...] = (
    ("/v1/orgs/{org}/credits", CreditsView),
    ("/v1/orgs/{org}/usage", UsageView),
    ("/v1/orgs/{org}/users/{user}/charges", ChargesView),
    ("/v1/orgs/{org}/requests/{request_id}", DecisionView),
    ("/v1/quote", QuoteView),
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


def register_views(app: faust.App, store: CreditStore, clock: Clock, settings: Settings) -> None:
    """Add the API routes to ``app`` (served by the worker's web server).

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
    )
    # faust's web driver is aiohttp's (the default, and the one the worker uses)
    if not isinstance(app.web, AiohttpWeb):
        raise TypeError(f"the HTTP API needs faust's aiohttp web driver, not {app.web!r}")
    app.web.web_app.middlewares.append(http_problems)
    for path, view in ROUTES:
        # a subclass per app binds the views to this app's store, clock and tokens
        bound = type(view.__name__, (view,), {"api": api})
        app.page(path)(bound)

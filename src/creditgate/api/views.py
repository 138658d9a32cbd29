"""The HTTP routes of the worker (DESIGN §5), as faust web pages.

Every answer is JSON; errors are ``{"code", "message"}`` (400s add ``errors``, the
field errors). The handlers only parse the request and call ``reports``.
"""

from __future__ import annotations

from typing import Any, Protocol

import faust
import orjson
from faust.web import View
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from creditgate.api import reports
from creditgate.domain.ids import is_identifier
from creditgate.errors import StoreUnavailable
from creditgate.store.gateway import CreditStore

# the report functions read Redis directly: its connection errors mean "try later" too
_UNAVAILABLE = (StoreUnavailable, RedisConnectionError, RedisTimeoutError, OSError)


class Clock(Protocol):
    def now_ms(self) -> int: ...


def _error(web: Any, status: int, code: str, message: str, **extra: Any) -> Any:
    return web.json({"code": code, "message": message, **extra}, status=status)


def _invalid(web: Any, exc: reports.InvalidInput) -> Any:
    return _error(web, 400, "invalid_request", str(exc), errors=exc.errors)


def _bad_ids(web: Any, **ids: str) -> Any | None:
    for name, value in ids.items():
        if not is_identifier(value):
            return _error(
                web,
                400,
                "invalid_request",
                f"{name} must be 1-128 characters of [A-Za-z0-9._:@-]",
                errors=[{"field": name, "message": "not an identifier"}],
            )
    return None


def _unavailable(web: Any, exc: Exception) -> Any:
    return _error(web, 503, "unavailable", f"Redis unavailable: {exc}")


def register_views(
    app: faust.App, store: CreditStore, clock: Clock, *, max_items: int = reports.DEFAULT_MAX_ITEMS
) -> None:
    """Add the API routes to ``app`` (served by the worker's web server)."""

    @app.page("/v1/orgs/{org}/credits")
    async def credits(web: Any, request: Any, org: str) -> Any:
        if (bad := _bad_ids(web, org_id=org)) is not None:
            return bad
        try:
            view = await store.credits(org, clock.now_ms())
        except _UNAVAILABLE as exc:
            return _unavailable(web, exc)
        if view is None:
            return _error(web, 404, "not_found", f"{org} has no license")
        return web.json(view)

    @app.page("/v1/orgs/{org}/usage")
    async def usage(web: Any, request: Any, org: str) -> Any:
        period = request.query.get("period") or None
        if (bad := _bad_ids(web, org_id=org, **({"period": period} if period else {}))) is not None:
            return bad
        try:
            report = await reports.usage_report(store, org, period, clock.now_ms())
        except _UNAVAILABLE as exc:
            return _unavailable(web, exc)
        if report is None:
            return _error(web, 404, "not_found", f"{org} has no license")
        return web.json(report)

    @app.page("/v1/orgs/{org}/users/{user}/charges")
    async def charges(web: Any, request: Any, org: str, user: str) -> Any:
        if (bad := _bad_ids(web, org_id=org, user_id=user)) is not None:
            return bad
        try:
            action, limit, before = reports.parse_history_query(request.query)
        except reports.InvalidInput as exc:
            return _invalid(web, exc)
        try:
            history = await reports.charge_history(store, org, user, action, limit, before)
        except _UNAVAILABLE as exc:
            return _unavailable(web, exc)
        return web.json(history)

    @app.page("/v1/orgs/{org}/requests/{request_id}")
    async def decision(web: Any, request: Any, org: str, request_id: str) -> Any:
        if (bad := _bad_ids(web, org_id=org, request_id=request_id)) is not None:
            return bad
        try:
            found = await reports.one_decision(store, org, request_id)
        except _UNAVAILABLE as exc:
            return _unavailable(web, exc)
        if found is None:
            return _error(web, 404, "not_found", f"{org} has no decision for {request_id}")
        return web.json(found)

    @app.page("/v1/quote")
    class Quote(View):
        async def post(self, request: Any) -> Any:
            raw = await self.read_request_content(request)
            try:
                body = orjson.loads(raw or b"null")
            except orjson.JSONDecodeError as exc:
                return _error(self, 400, "invalid_json", f"the body is not JSON: {exc}")
            try:
                answer = await reports.quote(store, body, clock.now_ms(), max_items)
            except reports.InvalidInput as exc:
                return _invalid(self, exc)
            except _UNAVAILABLE as exc:
                return _unavailable(self, exc)
            return self.json(answer)

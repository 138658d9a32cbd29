"""Who may do what over HTTP: bearer tokens, each scoped to an organisation and a role.

Tokens come from ``CREDITGATE_API_TOKENS`` (``Settings.api_tokens``: one ``SecretStr``
holding a JSON object from token to scope)::

    {"t-1": {"org": "acme", "role": "member", "user": "u-17"},
     "t-2": {"org": "acme", "role": "admin", "user": "ana"},
     "t-3": {"org": "acme", "role": "support"},
     "t-ops": "*"}

The roles are the platform's (``Role``): a member sees the organisation's credits and
their own history and quotes; an admin the team, every member's history, allows or
disallows credits use and sets members' credit limits; support (customer success) sees
the credits, grants top-ups and refunds charged items; ``"*"`` is an operator, who may
do everything for every organisation. The first form of the setting, a list of
organisations (``{"t": ["acme", "beta"]}``), still works: such a token is a *reader*,
who may read everything of those organisations and write nothing.

Each route names what it needs (``Need``) and ``Access.authorize`` checks it against the
caller at the level of the object asked for: the organisation, and for a member the
user whose history or quote it is. Nothing here logs a token or quotes one in an error:
a bad token is named by its position. With no token configured the API has no access
control at all, so it may only listen on a loopback address; ``Access.from_settings``
refuses any other address.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import SecretStr

from creditgate.api.errors import Forbidden, Unauthenticated
from creditgate.domain.ids import is_identifier
from creditgate.errors import ConfigurationError

log = logging.getLogger("creditgate.api")

ALL_ORGS = "*"
MIN_TOKEN_LENGTH = 16
_SCHEME = "bearer"


class Role(StrEnum):
    MEMBER = "member"
    ADMIN = "admin"
    SUPPORT = "support"
    OPERATOR = "*"
    # a token of the first form, scoped to a list of organisations: reads only
    READER = "reader"


class Need(StrEnum):
    """What a route does, as the scope check sees it."""

    CREDITS = "see the credits of"  # the balance every user of the platform sees
    HISTORY = "see the history of"  # a user's decisions (a member: their own)
    QUOTE = "quote for"  # a quote for a user (a member: for themselves)
    TEAM = "see the team of"  # members, their usage and permissions
    ALLOW = "allow or disallow credits use in"
    GRANT = "grant credits to"
    REFUND = "refund credits in"
    LIMIT = "set credit limits in"


# the needs of each role; a member's HISTORY and QUOTE are for their own user only
NEEDS: dict[Role, frozenset[Need]] = {
    Role.MEMBER: frozenset({Need.CREDITS, Need.HISTORY, Need.QUOTE}),
    Role.ADMIN: frozenset(
        {Need.CREDITS, Need.HISTORY, Need.QUOTE, Need.TEAM, Need.ALLOW, Need.LIMIT}
    ),
    Role.SUPPORT: frozenset({Need.CREDITS, Need.GRANT, Need.REFUND}),
    Role.READER: frozenset({Need.CREDITS, Need.HISTORY, Need.QUOTE, Need.TEAM}),
    Role.OPERATOR: frozenset(Need),
}
_OWN_ONLY = frozenset({Need.HISTORY, Need.QUOTE})


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its role, the organisations it may act on (None: every
    one) and, for members and admins, its user id."""

    role: Role
    orgs: frozenset[str] | None
    user: str | None = None

    def may_read(self, org_id: str) -> bool:
        return self.orgs is None or org_id in self.orgs

    def may(self, need: Need, org_id: str, user_id: str | None = None) -> bool:
        """Whether the caller may do ``need`` in ``org_id`` (for ``user_id``, when the
        need is about one user)."""
        if not self.may_read(org_id) or need not in NEEDS[self.role]:
            return False
        if self.role is Role.MEMBER and need in _OWN_ONLY:
            return user_id is None or user_id == self.user
        return True

    def to_json(self) -> dict[str, Any]:
        """The scope as the console shows it (``GET /v1/me``); never the token."""
        return {
            "role": self.role.value,
            "orgs": None if self.orgs is None else sorted(self.orgs),
            "user_id": self.user,
        }


EVERYONE = Caller(Role.OPERATOR, None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_safe_bind(has_tokens: bool, http_host: str) -> None:
    """Without tokens the API has no access control: refuse any but a loopback address."""
    if not has_tokens and not is_loopback(http_host):
        raise ConfigurationError(
            f"CREDITGATE_HTTP_HOST is {http_host!r} but no CREDITGATE_API_TOKENS are set: "
            "the API would be open to the network. Set tokens, or listen on a loopback "
            "address (127.0.0.1)."
        )


_SHAPE = (
    'CREDITGATE_API_TOKENS must be a JSON object: {"<token>": {"org": "<org>", "role": '
    '"member" | "admin" | "support", "user": "<user>"} or "*" (or a list of organisations)}'
)


def _scope(name: str, scope: Any) -> Caller:
    if scope == ALL_ORGS:
        return Caller(Role.OPERATOR, None)
    if isinstance(scope, list):
        if scope and all(is_identifier(org) for org in scope):
            return Caller(Role.READER, frozenset(scope))
        raise ConfigurationError(f"{name}: a list of organisations must be a non-empty list of ids")
    if not isinstance(scope, dict) or not set(scope) <= {"org", "role", "user"}:
        raise ConfigurationError(f'{name} must be scoped to "*" or to an object of org, role, user')
    org, role, user = scope.get("org"), scope.get("role"), scope.get("user")
    if not is_identifier(org):
        raise ConfigurationError(f"{name}: org must be an organisation id")
    if role not in (Role.MEMBER, Role.ADMIN, Role.SUPPORT):
        raise ConfigurationError(f'{name}: role must be "member", "admin" or "support"')
    if user is not None and not is_identifier(user):
        raise ConfigurationError(f"{name}: user must be a user id")
    if role in (Role.MEMBER, Role.ADMIN) and user is None:
        raise ConfigurationError(f"{name}: a {role} token needs its user")
    return Caller(Role(role), frozenset({org}), user)


def parse_tokens(setting: SecretStr) -> dict[bytes, Caller]:
    """``CREDITGATE_API_TOKENS`` as token -> the caller it authenticates.

    Raises ``ConfigurationError`` naming a token by its position only, never by value.
    """
    text = setting.get_secret_value().strip()
    if not text:
        return {}
    try:
        given = orjson.loads(text)
    except orjson.JSONDecodeError:
        given = None
    if not isinstance(given, dict):
        raise ConfigurationError(_SHAPE)
    tokens: dict[bytes, Caller] = {}
    for position, (token, scope) in enumerate(given.items(), start=1):
        name = f"CREDITGATE_API_TOKENS: token #{position}"
        if len(token) < MIN_TOKEN_LENGTH or token != token.strip():
            raise ConfigurationError(
                f"{name} must be at least {MIN_TOKEN_LENGTH} characters without surrounding spaces"
            )
        tokens[token.encode()] = _scope(name, scope)
    return tokens


class Access:
    """Authenticates ``Authorization: Bearer <token>`` headers and checks scopes."""

    def __init__(self, tokens: Mapping[bytes, Caller]) -> None:
        self._tokens = list(tokens.items())

    @classmethod
    def from_settings(cls, tokens: SecretStr, http_host: str) -> Access:
        """The access rules of the settings; raises ``ConfigurationError`` when they
        cannot be safe (an open API on a non-loopback address, an unusable token)."""
        access = cls(parse_tokens(tokens))
        require_safe_bind(access.enabled, http_host)
        if not access.enabled:
            log.warning(
                "no CREDITGATE_API_TOKENS configured: the HTTP API has no access control and "
                "listens on %s (loopback) only",
                http_host,
            )
        return access

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a request's ``Authorization`` header; raises ``Unauthenticated``."""
        if not self.enabled:
            return EVERYONE
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != _SCHEME or not given.strip():
            raise Unauthenticated("an Authorization: Bearer <token> header is needed")
        presented = given.strip().encode()
        found: Caller | None = None
        # compare with every token, in constant time, so timing tells nothing of them
        for token, caller in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = caller
        if found is None:
            raise Unauthenticated("the bearer token is not valid")
        return found

    @staticmethod
    def authorize(
        caller: Caller, org_id: str, need: Need = Need.CREDITS, user_id: str | None = None
    ) -> None:
        """Raises ``Forbidden`` when ``need`` (in ``org_id``, for ``user_id``) is out of
        the caller's scope. The message names what was asked, never the caller's own
        organisation: a refusal tells nothing of the token's scope."""
        if not caller.may_read(org_id):
            raise Forbidden(f"this token may not read the organisation {org_id}")
        if not caller.may(need, org_id, user_id):
            whom = f" for {user_id}" if user_id and need in _OWN_ONLY else ""
            raise Forbidden(f"a {caller.role.value} token may not {need.value} {org_id}{whom}")

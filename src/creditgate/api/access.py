"""Who may read what over HTTP: bearer tokens, each scoped to organisations or to all.

Tokens come from ``CREDITGATE_API_TOKENS`` (``Settings.api_tokens``: one ``SecretStr``
holding JSON, ``{"<token>": ["acme", "beta"], "<another>": "*"}``). Nothing here logs
a token or quotes one in an error: a bad token is named by its position. With no token
configured the API has no access control at all, so it may only listen on a loopback
address; ``Access.from_settings`` refuses any other address.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from pydantic import SecretStr

from creditgate.api.errors import Forbidden, Unauthenticated
from creditgate.domain.ids import is_identifier
from creditgate.errors import ConfigurationError

log = logging.getLogger("creditgate.api")

ALL_ORGS = "*"
MIN_TOKEN_LENGTH = 16
_SCHEME = "bearer"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the organisations it may read (None: every one)."""

    orgs: frozenset[str] | None

    def may_read(self, org_id: str) -> bool:
        return self.orgs is None or org_id in self.orgs


EVERYONE = Caller(None)


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


def parse_tokens(setting: SecretStr) -> dict[bytes, frozenset[str] | None]:
    """``CREDITGATE_API_TOKENS`` as token -> organisations (None: all of them).

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
        raise ConfigurationError(
            'CREDITGATE_API_TOKENS must be a JSON object: {"<token>": ["org", ...] or "*"}'
        )
    tokens: dict[bytes, frozenset[str] | None] = {}
    for position, (token, orgs) in enumerate(given.items(), start=1):
        name = f"CREDITGATE_API_TOKENS: token #{position}"
        if len(token) < MIN_TOKEN_LENGTH or token != token.strip():
            raise ConfigurationError(
                f"{name} must be at least {MIN_TOKEN_LENGTH} characters without surrounding spaces"
            )
        if orgs == ALL_ORGS:
            tokens[token.encode()] = None
        elif isinstance(orgs, list) and orgs and all(is_identifier(org) for org in orgs):
            tokens[token.encode()] = frozenset(orgs)
        else:
            raise ConfigurationError(
                f'{name} must be scoped to "*" or to a non-empty list of organisation ids'
            )
    return tokens


class Access:
    """Authenticates ``Authorization: Bearer <token>`` headers and checks scopes."""

    def __init__(self, tokens: Mapping[bytes, frozenset[str] | None]) -> None:
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
        for token, orgs in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = Caller(orgs)
        if found is None:
            raise Unauthenticated("the bearer token is not valid")
        return found

    @staticmethod
    def authorize(caller: Caller, org_id: str) -> None:
        """Raises ``Forbidden`` when ``org_id`` is out of the caller's scope."""
        if not caller.may_read(org_id):
            raise Forbidden(f"this token may not read the organisation {org_id}")

"""Access settings: bearer tokens scoped to organisations, and the loopback rule.

No server is needed here; the same rules over HTTP are in tests/e2e/test_http_secured.py.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from creditgate.api.access import EVERYONE, Access, Need, Role
from creditgate.api.errors import Forbidden, Unauthenticated
from creditgate.cli import main
from creditgate.errors import ConfigurationError
from creditgate.settings import Settings

ACME = "acme-token-0123456789abcdef"
OPS = "ops-token-0123456789abcdef01"


def tokens(scopes: dict[str, Any]) -> SecretStr:
    return SecretStr(orjson.dumps(scopes).decode())


def access(host: str = "127.0.0.1") -> Access:
    return Access.from_settings(tokens({ACME: ["acme", "beta"], OPS: "*"}), host)


def test_tokens_are_read_from_the_environment_and_stay_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDITGATE_API_TOKENS", f'{{"{ACME}": ["acme"], "{OPS}": "*"}}')
    settings = Settings()
    rules = Access.from_settings(settings.api_tokens, "0.0.0.0")
    assert rules.authenticate(f"Bearer {ACME}").orgs == frozenset({"acme"})
    assert rules.authenticate(f"Bearer {OPS}").orgs is None
    for shown in (repr(settings), str(settings), repr(settings.safe_dump())):
        assert ACME not in shown
        assert OPS not in shown


@pytest.mark.parametrize("empty", ["", "  ", "{}"])
def test_an_empty_setting_means_no_tokens(monkeypatch: pytest.MonkeyPatch, empty: str) -> None:
    monkeypatch.setenv("CREDITGATE_API_TOKENS", empty)
    assert not Access.from_settings(Settings().api_tokens, "127.0.0.1").enabled


def test_a_token_reads_its_organisations_and_no_other() -> None:
    rules = access()
    assert rules.enabled
    scoped = rules.authenticate(f"Bearer {ACME}")
    assert scoped.may_read("acme")
    assert scoped.may_read("beta")
    assert not scoped.may_read("gamma")
    rules.authorize(scoped, "beta")
    with pytest.raises(Forbidden):
        rules.authorize(scoped, "gamma")
    everyone = rules.authenticate(f"bearer {OPS}")  # the scheme is case-insensitive
    assert everyone.may_read("gamma")


@pytest.mark.parametrize(
    "header",
    [None, "", f"Basic {ACME}", "Bearer", "Bearer ", f"Bearer {ACME}x", f"Bearer {ACME[:-1]}"],
)
def test_missing_or_invalid_credentials_are_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated) as raised:
        access().authenticate(header)
    assert ACME not in str(raised.value)


def test_without_tokens_the_api_is_open_on_loopback_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="creditgate.api"):
        rules = Access.from_settings(SecretStr(""), "127.0.0.1")
    assert not rules.enabled
    assert rules.authenticate(None) is EVERYONE
    assert "no CREDITGATE_API_TOKENS" in caplog.text
    assert "loopback" in caplog.text
    for host in ("localhost", "::1", "127.0.0.2"):
        Access.from_settings(SecretStr(""), host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "api.example.com"])
def test_without_tokens_a_non_loopback_address_is_refused(host: str) -> None:
    with pytest.raises(ConfigurationError, match="CREDITGATE_API_TOKENS"):
        Access.from_settings(SecretStr(""), host)
    # with tokens, any address will do
    assert access(host).enabled


@pytest.mark.parametrize(
    ("scope", "token"),
    [
        (["acme"], "short-token"),
        ([], ACME),
        (["not an id"], ACME),
        ("all", ACME),
        ({"acme": True}, ACME),
        (["acme"], f" {ACME}"),
        ({"org": "acme", "role": "member"}, ACME),  # a member token needs its user
        ({"org": "acme", "role": "admin"}, ACME),
        ({"org": "acme", "role": "owner", "user": "u-1"}, ACME),
        ({"org": "a b", "role": "support"}, ACME),
        ({"org": "acme", "role": "member", "user": "u 1"}, ACME),
        ({"org": "acme", "role": "support", "team": "cs"}, ACME),
    ],
)
def test_unusable_tokens_are_refused_without_showing_them(scope: Any, token: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Access.from_settings(tokens({OPS: "*", token: scope}), "127.0.0.1")
    assert "token #2" in str(raised.value)
    assert token.strip() not in str(raised.value)


@pytest.mark.parametrize("setting", [f'["{ACME}"]', f'{{"{ACME}": ', f'"{ACME}"'])
def test_a_setting_that_is_not_a_json_object_is_refused_without_showing_it(setting: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Access.from_settings(SecretStr(setting), "127.0.0.1")
    assert ACME not in str(raised.value)


def test_the_worker_refuses_to_start_open_on_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITGATE_HTTP_HOST", "0.0.0.0")
    monkeypatch.delenv("CREDITGATE_API_TOKENS", raising=False)
    # nothing answers on this bootstrap: the refusal comes before any connection
    monkeypatch.setenv("CREDITGATE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code == 1
    assert "no CREDITGATE_API_TOKENS are set" in result.output
    assert "loopback" in result.output


MEMBER = "member-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef0"
SUPPORT = "support-token-0123456789abcdef"


def scoped() -> Access:
    return Access.from_settings(
        tokens(
            {
                MEMBER: {"org": "acme", "role": "member", "user": "u-17"},
                ADMIN: {"org": "acme", "role": "admin", "user": "ana"},
                SUPPORT: {"org": "acme", "role": "support"},
                ACME: ["acme"],
                OPS: "*",
            }
        ),
        "0.0.0.0",
    )


@pytest.mark.parametrize(
    ("token", "need", "org", "user", "allowed"),
    [
        (MEMBER, Need.CREDITS, "acme", None, True),
        (MEMBER, Need.HISTORY, "acme", "u-17", True),
        (MEMBER, Need.HISTORY, "acme", "u-18", False),
        (MEMBER, Need.QUOTE, "acme", "u-18", False),
        (MEMBER, Need.TEAM, "acme", None, False),
        (MEMBER, Need.CREDITS, "beta", None, False),
        (ADMIN, Need.HISTORY, "acme", "u-18", True),
        (ADMIN, Need.TEAM, "acme", None, True),
        (ADMIN, Need.ALLOW, "acme", "u-18", True),
        (ADMIN, Need.GRANT, "acme", None, False),
        (ADMIN, Need.TEAM, "beta", None, False),
        (SUPPORT, Need.GRANT, "acme", None, True),
        (SUPPORT, Need.CREDITS, "acme", None, True),
        (SUPPORT, Need.HISTORY, "acme", "u-17", False),
        (ACME, Need.TEAM, "acme", None, True),  # the list form: a reader
        (ACME, Need.ALLOW, "acme", "u-17", False),
        (OPS, Need.GRANT, "beta", None, True),
        (OPS, Need.ALLOW, "beta", "u-1", True),
    ],
)
def test_each_role_may_do_what_its_scope_says(
    token: str, need: Need, org: str, user: str | None, allowed: bool
) -> None:
    rules = scoped()
    caller = rules.authenticate(f"Bearer {token}")
    assert caller.may(need, org, user) is allowed
    if allowed:
        rules.authorize(caller, org, need, user)
    else:
        with pytest.raises(Forbidden) as refused:
            rules.authorize(caller, org, need, user)
        assert token not in str(refused.value)


def test_a_scoped_token_carries_its_role_and_user() -> None:
    rules = scoped()
    assert rules.authenticate(f"Bearer {MEMBER}").to_json() == {
        "role": "member",
        "orgs": ["acme"],
        "user_id": "u-17",
    }
    assert rules.authenticate(f"Bearer {SUPPORT}").user is None
    assert rules.authenticate(f"Bearer {ACME}").role is Role.READER
    assert rules.authenticate(f"Bearer {OPS}").to_json()["orgs"] is None

"""The CLI's reads (credits, usage, charges, quote) against the session's real Redis.

The commands read their settings from the environment like in production; each test
points them at its own key prefix. Commands run ``asyncio.run`` themselves, so these
tests are synchronous and seed Redis in a loop of their own.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from click.testing import CliRunner, Result

from creditgate.cli import main
from creditgate.domain.charges import ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.ids import rfc3339
from creditgate.settings import Settings
from creditgate.store.calls import ChargeCall
from creditgate.store.gateway import CreditStore

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


async def _seed(settings: Settings, org: str, now: int) -> None:
    store = CreditStore.from_settings(settings)
    try:
        commands: list[dict[str, Any]] = [
            {
                "type": "license.start_period",
                "period_id": "p1",
                "starts_at": rfc3339(now - DAY_MS),
                "ends_at": rfc3339(now + 30 * DAY_MS),
                "credits": 10,
            },
            {"type": "member.upsert", "user_id": "ana", "role": "admin"},
            {"type": "member.upsert", "user_id": "bob", "role": "member"},
        ]
        for n, fields in enumerate(commands):
            command = license_command_adapter.validate_python(
                {"command_id": f"c-{n}", "org_id": org, **fields}
            )
            (answer,) = await store.apply_commands([command], now)
            assert answer.record.applied
        charges = [
            ("bob", "export", ["c-1", "c-2"]),
            ("bob", "export", ["c-2", "c-3"]),
            ("bob", "export", ["c-4"]),
            ("ana", "crm_push", ["c-1", "c-9"]),
        ]
        for n, (user, action, contacts) in enumerate(charges):
            request = ChargeRequest.model_validate(
                {
                    "request_id": f"r-{n}",
                    "org_id": org,
                    "user_id": user,
                    "action": action,
                    "items": [{"type": "contact", "id": c} for c in contacts],
                    "requested_at": rfc3339(now),
                    "reference": {"export_id": f"e-{n}"},
                }
            )
            (charged,) = await store.charge_many([ChargeCall.of(request)], now + n)
            assert charged.record.approved
    finally:
        await store.close()


@pytest.fixture
def org(settings: Settings, monkeypatch: pytest.MonkeyPatch, unique: str) -> str:
    monkeypatch.setenv("CREDITGATE_REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("CREDITGATE_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("CREDITGATE_CLOCK_OFFSET_SECONDS", "0")
    name = f"org-{unique}"
    # a second behind: the commands' decision clock must not run before the seeds'
    asyncio.run(_seed(settings, name, int(time.time() * 1000) - 1000))
    return name


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


def table_rows(output: str) -> list[list[str]]:
    """The rows under the first table's ruler, split on runs of two spaces."""
    lines = output.splitlines()
    ruler = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "})
    rows = []
    for line in lines[ruler + 1 :]:
        if not line.strip() or line.startswith("more:"):
            break
        rows.append([cell.strip() for cell in line.split("  ") if cell.strip()])
    return rows


def table_dict(output: str) -> dict[str, str]:
    """A two-column table's rows as a mapping (a row of another width is an error)."""
    return dict(cast("list[tuple[str, str]]", [tuple(row) for row in table_rows(output)]))


def test_credits_org_and_credits_show_org_are_one_table(org: str) -> None:
    short, show = run("credits", org), run("credits", "show", org)
    assert short.exit_code == 0, short.output
    assert short.output == show.output
    rows = table_dict(short.output)
    assert rows["organisation"] == org
    assert rows["period"] == "p1"
    assert rows["used"] == "5"
    assert rows["remaining"] == "5"
    as_json = orjson.loads(run("credits", org, "--json").output)
    assert as_json["remaining"] == 5


def test_credits_subcommands_still_resolve(org: str) -> None:
    grant = run("credits", "grant", "--help")
    assert grant.exit_code == 0
    assert "--granted-by" in grant.output
    unknown = run("credits", f"{org}-unknown")
    assert unknown.exit_code == 1
    assert "has no license" in unknown.output


def test_usage_table_per_user_and_totals(org: str) -> None:
    result = run("usage", org)
    assert result.exit_code == 0, result.output
    assert f"{org}, period p1 (current)" in result.output
    rows = {row[0]: row[1:] for row in table_rows(result.output)}
    # credits, export, crm_push, email_verification, requests, saved, rejected
    assert rows["bob"] == ["4", "4", "0", "0", "3", "1", "0"]
    # export and push share the window: ana's push of c-1 was free
    assert rows["ana"] == ["1", "0", "1", "0", "1", "1", "0"]
    assert rows["total"] == ["5", "4", "1", "0", "4", "2", "0"]
    assert run("usage", org, "--period", "p0", "--json").exit_code == 0
    assert run("usage", org, "--period", "not an id").exit_code == 2


def test_charges_newest_first_with_pages(org: str) -> None:
    first = run("charges", org, "bob", "--action", "export", "--limit", "2")
    assert first.exit_code == 0, first.output
    rows = table_rows(first.output)
    assert [row[1] for row in rows] == ["r-2", "r-1"]
    assert rows[1][2:5] == ["1", "2", "1"]  # credits, items, free
    assert "export_id=e-1" in first.output
    more = first.output.strip().splitlines()[-1]
    assert more.startswith("more: --before ")
    rest = run("charges", org, "bob", "--action", "export", "--before", more.split()[-1])
    assert [row[1] for row in table_rows(rest.output)] == ["r-0"]
    assert "more:" not in rest.output
    assert run("charges", org, "bob").exit_code == 2  # --action is required
    assert run("charges", org, "bob", "--action", "export", "--before", "x").exit_code == 1


def test_quote_from_a_file_and_from_stdin(org: str, tmp_path: Path) -> None:
    body = {
        "org_id": org,
        "user_id": "bob",
        "action": "export",
        "items": [
            {"type": "contact", "id": "c-1", "has_verified_email": True},
            {"type": "contact", "id": "c-7", "has_verified_email": True},
            {"type": "contact", "id": "c-8"},
            {"type": "contact", "id": "c-8"},
        ],
    }
    path = tmp_path / "request.json"
    path.write_bytes(orjson.dumps(body))
    from_file = run("quote", str(path))
    assert from_file.exit_code == 0, from_file.output
    assert from_file.output == run("quote", "-", stdin=orjson.dumps(body).decode()).output
    rows = table_rows(from_file.output)
    assert [row[4] for row in rows] == [
        "free_repeat",
        "would_charge",
        "would_charge",
        "duplicate_in_request",
    ]
    summary = table_dict(from_file.output.split("\n\n")[1])
    assert summary["max credits"] == "2"
    assert summary["max, verified emails only"] == "1"
    assert summary["remaining now"] == "5"
    assert summary["would be"] == "approved"
    # it changed nothing
    assert table_dict(run("credits", org).output)["remaining"] == "5"


def test_quote_refuses_invalid_requests(org: str) -> None:
    invalid = run("quote", "-", stdin=orjson.dumps({"org_id": org, "items": []}).decode())
    assert invalid.exit_code == 1
    assert "items" in invalid.output
    assert "user_id" in invalid.output
    not_json = run("quote", "-", stdin="{")
    assert not_json.exit_code == 1
    assert "not JSON" in not_json.output


def test_a_license_command_no_worker_answers_is_one_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    # topics of their own, and no worker consuming them
    from creditgate.stream.topics import TopicRegistry, apply_topics

    prefix = f"nowrk{unique}."
    asyncio.run(apply_topics(settings.kafka_bootstrap, TopicRegistry.load(prefix=prefix)))
    monkeypatch.setenv("CREDITGATE_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("CREDITGATE_TOPIC_PREFIX", prefix)

    result = CliRunner().invoke(main, ["member", "upsert", "acme", "u-1", "--wait", "1"])

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    (line,) = result.output.splitlines()
    assert line.startswith("error: member.upsert cli-")
    assert "was published, but no worker answered within 1s" in line
    assert "creditgate worker" in line

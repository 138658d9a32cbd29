"""License commands (DESIGN §3) applied by the real command script on a real Redis.

Each test has its own key prefix and organisation; the decision clock is passed in
explicitly and starts at a fixed day in the future (see test_charge_rules.py for why).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import orjson
import pytest

from creditgate.domain.charges import ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.decisions import ChargeRecord
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.domain.intake import InvalidLicenseCommand, read_license_command
from creditgate.domain.license_events import (
    CommandRecord,
    CommandView,
    command_ledger_entry,
    command_notifications,
    conflict_event,
    license_event,
)
from creditgate.settings import Settings
from creditgate.store.calls import ChargeCall, CommandAnswer, InvalidCommand
from creditgate.store.gateway import CreditStore

DAY_MS = 86_400_000
DAY0 = to_ms(datetime(2100, 1, 4, 9, 0, tzinfo=UTC))


def day(n: float) -> int:
    return DAY0 + int(n * DAY_MS)


@dataclass(frozen=True)
class Applied:
    """A command's answer, with the body it answered (to render its event)."""

    body: dict[str, Any]
    answer: CommandAnswer

    @property
    def status(self) -> str:
        return self.answer.status

    @property
    def record(self) -> CommandRecord:
        return self.answer.record

    @property
    def view(self) -> CommandView:
        return CommandView(
            self.body["org_id"], self.body["command_id"], self.body["type"], self.body
        )

    @property
    def event(self) -> dict[str, Any]:
        return license_event(self.view, self.record)


@dataclass
class Org:
    store: CreditStore
    org_id: str
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def command(
        self, type_: str, *, now: int = DAY0, command_id: str | None = None, **fields: Any
    ) -> Applied:
        raw = {
            "command_id": command_id or f"cmd-{next(self._ids)}",
            "org_id": self.org_id,
            "type": type_,
            **fields,
        }
        command = license_command_adapter.validate_python(raw)
        (answer,) = await self.store.apply_commands([command], now)
        return Applied(command.model_dump(mode="json"), answer)

    async def upsert(self, user_id: str, role: str = "member") -> Applied:
        return await self.command("member.upsert", user_id=user_id, role=role)

    async def start_period(
        self, credits: int, period_id: str = "p1", *, starts: int = DAY0, now: int = DAY0
    ) -> Applied:
        return await self.command(
            "license.start_period",
            now=now,
            period_id=period_id,
            starts_at=rfc3339(starts),
            ends_at=rfc3339(starts + 365 * DAY_MS),
            credits=credits,
        )

    async def grant(
        self, credits: int, grant_id: str = "g-1", *, command_id: str | None = None
    ) -> Applied:
        return await self.command(
            "credits.grant",
            command_id=command_id,
            grant_id=grant_id,
            credits=credits,
            reason="goodwill",
            granted_by="cs-1",
        )

    async def set_allowed(self, user_id: str, allowed: bool, set_by: str) -> Applied:
        return await self.command(
            "member.set_credits_allowed", user_id=user_id, allowed=allowed, set_by=set_by
        )

    async def charge(self, n_contacts: int, *, user: str = "u1", now: int = DAY0) -> ChargeRecord:
        request = ChargeRequest.model_validate(
            {
                "request_id": f"req-{next(self._ids)}",
                "org_id": self.org_id,
                "user_id": user,
                "action": "export",
                "items": [
                    {"type": "contact", "id": f"c-{next(self._ids)}"} for _ in range(n_contacts)
                ],
                "requested_at": rfc3339(now),
            }
        )
        (answer,) = await self.store.charge_many([ChargeCall.of(request)], now)
        return answer.record

    async def credits(self) -> dict[str, Any] | None:
        return await self.store.credits(self.org_id, DAY0)


@pytest.fixture
async def store(endpoints: tuple[str, str]) -> AsyncIterator[CreditStore]:
    settings = Settings(
        redis_url=endpoints[1],
        key_prefix=f"t-{uuid4().hex[:12]}",
    )
    store = CreditStore.from_settings(settings)
    yield store
    keys = [
        key
        async for key in store.client_for_tests.scan_iter(
            match=f"{settings.key_prefix}:*", count=10_000
        )
    ]
    if keys:
        await store.client_for_tests.delete(*keys)
    await store.close()


@pytest.fixture
async def org(store: CreditStore) -> Org:
    """An organisation with a member ``u1`` and an admin ``admin``, no license yet."""
    org = Org(store, f"org-{uuid4().hex[:10]}")
    assert (await org.upsert("u1")).record.applied
    assert (await org.upsert("admin", "admin")).record.applied
    return org


# ---- members ----------------------------------------------------------------------------


async def test_only_an_admin_can_disallow_credit_use(org: Org) -> None:
    await org.start_period(10)
    await org.upsert("u2")

    by_member = await org.set_allowed("u1", False, set_by="u2")
    by_stranger = await org.set_allowed("u1", False, set_by="stranger")

    assert by_member.status == "decided"
    assert not by_member.record.applied
    assert by_member.record.reason == "not_an_admin"
    assert by_member.record.sequence == 5  # the upserts, the period and u2 took 1-4
    assert by_member.event["type"] == "command.rejected"
    assert by_member.event["reason"] == "not_an_admin"
    assert "u2" in by_member.event["message"]
    assert by_member.record.state == {
        "user_id": "u1",
        "role": "member",
        "credits_allowed": True,
        "credit_limit": None,
    }
    assert by_stranger.record.reason == "not_an_admin"
    assert (await org.charge(1)).approved  # nothing changed for u1

    by_admin = await org.set_allowed("u1", False, set_by="admin")

    assert by_admin.record.applied
    assert by_admin.event["type"] == "command.applied"
    assert by_admin.record.state == {
        "user_id": "u1",
        "role": "member",
        "credits_allowed": False,
        "credit_limit": None,
    }
    refused = await org.charge(1)
    assert refused.reason is not None
    assert refused.reason.value == "credits_disallowed"


async def test_an_admin_allows_credit_use_again(org: Org) -> None:
    await org.start_period(10)
    await org.set_allowed("u1", False, set_by="admin")

    allowed = await org.set_allowed("u1", True, set_by="admin")

    assert allowed.record.applied
    assert allowed.record.state is not None
    assert allowed.record.state["credits_allowed"] is True
    assert (await org.charge(1)).approved


async def test_a_promoted_member_can_disallow_others(org: Org) -> None:
    await org.upsert("u2")
    assert (await org.set_allowed("u2", False, set_by="u1")).record.reason == "not_an_admin"

    promoted = await org.upsert("u1", "admin")

    assert promoted.record.applied
    assert promoted.record.state is not None
    assert promoted.record.state["role"] == "admin"
    assert (await org.set_allowed("u2", False, set_by="u1")).record.applied


async def test_allowing_a_non_member_is_refused(org: Org) -> None:
    allowed = await org.set_allowed("stranger", True, set_by="admin")

    assert not allowed.record.applied
    assert allowed.record.reason == "not_a_member"
    assert allowed.record.state == {
        "user_id": "stranger",
        "role": None,
        "credits_allowed": False,
        "credit_limit": None,
    }


async def test_removing_a_non_member_is_refused(org: Org) -> None:
    removed = await org.command("member.remove", user_id="stranger")

    assert not removed.record.applied
    assert removed.record.reason == "not_a_member"
    assert removed.event["type"] == "command.rejected"
    assert removed.event["sequence"] == removed.record.sequence == 3
    entry = command_ledger_entry(removed.view, removed.record)
    assert (entry["kind"], entry["sequence"], entry["credits_delta"]) == ("command_rejected", 3, 0)
    assert entry["decision"] == removed.record.raw


async def test_a_removed_member_can_no_longer_use_the_credits(org: Org) -> None:
    await org.start_period(10)

    removed = await org.command("member.remove", user_id="u1")

    assert removed.record.applied
    assert removed.record.state is not None
    assert removed.record.state["role"] is None
    refused = await org.charge(1)
    assert refused.reason is not None
    assert refused.reason.value == "not_a_member"
    assert (await org.credits() or {})["remaining"] == 10


# ---- periods and grants ----------------------------------------------------------------


async def test_start_period_replaces_the_period_without_rollover(org: Org) -> None:
    await org.start_period(10, "p1")
    assert (await org.grant(2)).record.applied
    assert (await org.charge(3)).credits == 3

    started = await org.start_period(5, "p2", starts=day(40), now=day(40))

    assert started.record.applied
    assert started.record.expired == 9
    assert started.record.balance == 5
    assert started.record.delta == -4
    assert started.record.state == {
        "period_id": "p2",
        "starts_at": rfc3339(day(40)),
        "ends_at": rfc3339(day(405)),
        "credits": 5,
        "granted": 0,
        "balance": 5,
    }
    assert "9" in started.event["message"]
    credits = await org.store.credits(org.org_id, day(40))
    assert credits is not None
    assert (credits["period_credits"], credits["granted"], credits["remaining"]) == (5, 0, 5)

    (note,) = command_notifications(started.view, started.record)
    assert note["type"] == "license.period_started"
    assert note["recipient"] == {"role": "admin"}
    assert note["expired_credits"] == 9
    ledger = command_ledger_entry(started.view, started.record)
    assert ledger["kind"] == "period_started"
    assert (ledger["credits_delta"], ledger["balance_after"]) == (-4, 5)


async def test_the_first_period_expires_nothing(org: Org) -> None:
    started = await org.start_period(10)

    assert started.record.expired == 0
    assert started.record.delta == 10
    assert started.record.balance == 10


async def test_a_grant_adds_to_the_current_period_once_per_grant_id(org: Org) -> None:
    await org.start_period(10)

    granted = await org.grant(5, "g-1")
    again = await org.grant(5, "g-1")

    assert granted.record.applied
    assert granted.record.balance == 15
    (note,) = command_notifications(granted.view, granted.record)
    assert (note["type"], note["credits"], note["balance_after"]) == ("credits.granted", 5, 15)
    assert not again.record.applied
    assert again.record.reason == "duplicate_grant"
    assert granted.body["command_id"] in again.event["message"]
    assert command_notifications(again.view, again.record) == []
    credits = await org.credits()
    assert credits is not None
    assert (credits["granted"], credits["remaining"]) == (5, 15)


async def test_a_grant_without_a_license_is_refused(org: Org) -> None:
    granted = await org.grant(5)

    assert not granted.record.applied
    assert granted.record.reason == "no_active_license"
    assert await org.credits() is None


async def test_a_grant_to_an_ended_period_is_refused(org: Org) -> None:
    ended = DAY0 - 400 * DAY_MS  # the period ran for 365 days from here
    await org.start_period(10, starts=ended, now=ended)

    granted = await org.grant(5)

    assert not granted.record.applied
    assert granted.record.reason == "no_active_license"
    credits = await org.credits()
    assert credits is not None
    assert credits["remaining"] == 10


# ---- idempotency --------------------------------------------------------------------


async def test_the_same_command_twice_is_applied_once(org: Org) -> None:
    await org.start_period(10)

    first = await org.grant(5, "g-1", command_id="grant-1")
    replay = await org.grant(5, "g-1", command_id="grant-1")

    assert first.status == "decided"
    assert replay.status == "replay"
    assert replay.record == first.record
    assert replay.event == first.event
    assert replay.record.applied  # a replay repeats the outcome, not duplicate_grant
    assert (await org.credits() or {})["remaining"] == 15


async def test_a_command_id_reused_for_another_command_is_a_conflict(org: Org) -> None:
    await org.start_period(10)
    first = await org.grant(5, "g-1", command_id="grant-1")

    conflict = await org.grant(50, "g-2", command_id="grant-1")

    assert conflict.status == "conflict"
    assert conflict.record == first.record
    event = conflict_event(conflict.view, day(1))
    assert (event["type"], event["reason"]) == ("command.rejected", "command_id_conflict")
    assert (await org.credits() or {})["remaining"] == 15
    # the other body was not applied under its own grant_id either
    assert (await org.grant(1, "g-2")).record.applied

    original = await org.grant(5, "g-1", command_id="grant-1")
    assert original.status == "replay"
    assert original.record == first.record


async def test_an_invalid_command_is_refused_once_with_its_detail(org: Org) -> None:
    raw = orjson.dumps(
        {
            "command_id": "bad-1",
            "org_id": org.org_id,
            "type": "credits.grant",
            "grant_id": "g-1",
            "credits": -5,
            "reason": "oops",
            "granted_by": "cs-1",
        }
    )
    read = read_license_command(raw)
    assert isinstance(read, InvalidLicenseCommand)
    invalid = InvalidCommand(read.org_id, read.command_id, read.fingerprint, read.detail)

    (first,) = await org.store.apply_commands([invalid], DAY0)
    (again,) = await org.store.apply_commands([invalid], day(1))

    view = CommandView(read.org_id, read.command_id, read.command_type, read.body, valid=False)
    event = license_event(view, first.record)
    assert first.status == "decided"
    assert (event["type"], event["reason"]) == ("command.rejected", "invalid_command")
    assert "credits" in event["message"]
    assert first.record.sequence == 3  # after the fixture's two upserts
    entry = command_ledger_entry(view, first.record)
    assert (entry["kind"], entry["command"]) == ("command_rejected", None)
    assert again.status == "replay"
    assert again.record == first.record


async def test_every_decided_command_takes_the_next_ledger_sequence(org: Org) -> None:
    # the fixture's two upserts took 1 and 2
    started = await org.start_period(10)
    refused = await org.set_allowed("admin", False, set_by="u1")
    granted = await org.grant(1)
    duplicate = await org.grant(1)  # the same grant_id under another command_id
    charged = await org.charge(1)
    removed = await org.command("member.remove", user_id="u1")
    replayed = await org.grant(1, command_id=duplicate.body["command_id"])

    assert started.record.sequence == 3
    assert (refused.record.reason, refused.record.sequence) == ("not_an_admin", 4)
    assert granted.record.sequence == 5
    assert (duplicate.record.reason, duplicate.record.sequence) == ("duplicate_grant", 6)
    assert charged.sequence == 7
    assert removed.record.sequence == 8
    assert (replayed.status, replayed.record.sequence) == ("replay", 6)
    sequence = await org.store.client_for_tests.get(org.store.keys.org(org.org_id).sequence)
    assert sequence == "8"  # a replay takes none

"""Every number the scripts write is bounded, so no script write can fail half-way.

Redis does not roll a script back: an ``HINCRBY`` past a signed 64-bit integer fails
after the writes before it, and Lua's doubles and the scripts' cjson lose digits far
sooner. So every count and time is bounded before it reaches a script (validation),
and the one bound that depends on the state — a period's credits and grants together —
is checked by command.lua before its first write. Out-of-range input is answered like
any invalid input (``command.rejected`` / ``charge.rejected`` with a message saying
what is wrong), and the balance is untouched.

Input goes through the real ``Decider`` (reading, validation, the scripts on a real
Redis, rendering); nothing is published.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import orjson
import pytest

from creditgate.domain.charges import MAX_CREDITS
from creditgate.domain.clock import Clock
from creditgate.domain.ids import rfc3339, to_ms
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.decider import Decider, Incoming
from creditgate.stream.topics import TopicRegistry

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
DAY0 = to_ms(datetime(2100, 1, 4, 9, 0, tzinfo=UTC))


class FixedClock(Clock):
    def now_ms(self) -> int:
        return DAY0


class Org:
    """One organisation with an admin ``ana``, fed through the real processor."""

    def __init__(self, processor: Decider, registry: TopicRegistry) -> None:
        self.processor = processor
        self.registry = registry
        self.org_id = f"org-{uuid4().hex[:10]}"
        self._ids = itertools.count()
        self.ledger: dict[int, dict[str, Any]] = {}  # the commands' entries, by sequence

    def _incoming(self, logical: str, body: dict[str, Any]) -> Incoming:
        value = orjson.dumps(body)
        return Incoming(self.registry.name(logical), 0, 0, self.org_id.encode(), value)

    async def command(self, type_: str, **fields: Any) -> dict[str, Any]:
        """The license event of one command."""
        body = {"command_id": f"cmd-{next(self._ids)}", "org_id": self.org_id, "type": type_}
        out = await self.processor.apply([self._incoming(t.LICENSE_COMMANDS, body | fields)])
        (event,) = [orjson.loads(m.value) for m in out if m.topic.endswith(t.LICENSE_EVENTS)]
        for entry in (orjson.loads(m.value) for m in out if m.topic.endswith(t.LEDGER)):
            self.ledger[entry["sequence"]] = entry
        assert isinstance(event, dict)
        return event

    async def start_period(self, credits: Any, **times: str) -> dict[str, Any]:
        return await self.command(
            "license.start_period",
            period_id="p1",
            starts_at=times.get("starts_at", rfc3339(DAY0)),
            ends_at=times.get("ends_at", rfc3339(DAY0 + 365 * DAY_MS)),
            credits=credits,
        )

    async def grant(self, credits: Any, grant_id: str = "g-1") -> dict[str, Any]:
        return await self.command(
            "credits.grant", grant_id=grant_id, credits=credits, reason="r", granted_by="cs-1"
        )

    async def charge(self, **fields: Any) -> dict[str, Any]:
        """The charge result of one export of a new contact."""
        body = {
            "request_id": f"req-{next(self._ids)}",
            "org_id": self.org_id,
            "user_id": "ana",
            "action": "export",
            "items": [{"type": "contact", "id": f"c-{next(self._ids)}"}],
            "requested_at": rfc3339(DAY0),
        }
        out = await self.processor.decide([self._incoming(t.EXPORT_REQUESTS, body | fields)])
        (result,) = [orjson.loads(m.value) for m in out if m.topic.endswith(t.CHARGE_RESULTS)]
        assert isinstance(result, dict)
        return result

    async def credits(self) -> dict[str, Any] | None:
        return await self.processor.store.credits(self.org_id, DAY0)


@pytest.fixture
async def org(endpoints: tuple[str, str]) -> AsyncIterator[Org]:
    settings = Settings(redis_url=endpoints[1], key_prefix=f"t-{uuid4().hex[:12]}")
    store = CreditStore.from_settings(settings)
    registry = TopicRegistry.load()
    organisation = Org(Decider(store, registry, settings, FixedClock()), registry)
    assert (await organisation.command("member.upsert", user_id="ana", role="admin"))["type"] == (
        "command.applied"
    )
    yield organisation
    keys = [
        key
        async for key in store.client_for_tests.scan_iter(
            match=f"{settings.key_prefix}:*", count=10_000
        )
    ]
    if keys:
        await store.client_for_tests.delete(*keys)
    await store.close()


def rejected_as_invalid(event: dict[str, Any], *words: str) -> bool:
    return (
        event["type"] in ("command.rejected", "charge.rejected")
        and event["reason"] in ("invalid_command", "invalid_request")
        and all(word in event["message"] for word in words)
    )


@pytest.mark.parametrize("credits", [MAX_CREDITS + 1, 2**63, 2**64 - 1])
async def test_a_period_of_more_credits_than_a_period_may_hold_is_invalid(
    org: Org, credits: int
) -> None:
    await org.start_period(10)

    event = await org.start_period(credits)

    assert rejected_as_invalid(event, "credits", "less than or equal to 1000000000000"), event
    assert (await org.credits() or {})["remaining"] == 10


@pytest.mark.parametrize("credits", [MAX_CREDITS + 1, 2**63, 2**64 - 1])
async def test_a_grant_beyond_the_bound_is_invalid_and_changes_nothing(
    org: Org, credits: int
) -> None:
    await org.start_period(10)

    event = await org.grant(credits)

    assert rejected_as_invalid(event, "credits", "less than or equal to 1000000000000"), event
    assert (await org.grant(5))["type"] == "command.applied"  # g-1 was not taken
    credits_now = await org.credits()
    assert credits_now is not None
    assert (credits_now["granted"], credits_now["remaining"]) == (5, 15)


async def test_grants_cannot_take_a_period_past_what_it_may_hold(org: Org) -> None:
    await org.start_period(MAX_CREDITS - 10)
    assert (await org.grant(6, "g-1"))["type"] == "command.applied"

    past = await org.grant(5, "g-2")  # 10^12 - 4 + 5

    assert rejected_as_invalid(past, "5 more would give period p1", "more than the"), past
    # decided, with its ledger entry: the command as it was sent, the period as it is
    entry = org.ledger[past["sequence"]]
    assert (entry["kind"], entry["command"]["credits"]) == ("command_rejected", 5)
    assert entry["state"]["granted"] == 6
    assert (await org.grant(4, "g-2"))["type"] == "command.applied"  # exactly the bound
    credits_now = await org.credits()
    assert credits_now is not None
    assert (credits_now["granted"], credits_now["remaining"]) == (10, MAX_CREDITS)
    # the bound holds the charges' arithmetic exact: one credit off the top
    charged = await org.charge()
    assert (charged["credits_charged"], charged["balance_after"]) == (1, MAX_CREDITS - 1)


@pytest.mark.parametrize(
    "times",
    [
        {"starts_at": "1969-12-31T23:59:59Z"},
        {"starts_at": "0001-01-01T00:00:00Z"},
        {"starts_at": "1970-01-01T00:30:00+01:00"},  # 1969 in UTC
        {"ends_at": "9999-12-31T23:59:59-01:00"},  # year 10000 in UTC
    ],
    ids=["before-1970", "year-1", "offset-into-1969", "offset-past-9999"],
)
async def test_a_period_time_out_of_range_is_invalid(org: Org, times: dict[str, str]) -> None:
    await org.start_period(10)

    event = await org.start_period(20, **times)

    (field,) = times
    assert rejected_as_invalid(event, field, "timestamp out of range"), event
    assert (await org.credits() or {})["period_credits"] == 10


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_credits": MAX_CREDITS + 1}, ("max_credits", "less than or equal to")),
        ({"max_credits": 2**64 - 1}, ("max_credits", "less than or equal to")),
    ],
    ids=["max-credits", "max-credits-64-bit"],
)
async def test_a_request_with_a_number_out_of_range_is_invalid(
    org: Org, fields: dict[str, Any], words: tuple[str, ...]
) -> None:
    await org.start_period(10)

    result = await org.charge(**fields)

    assert rejected_as_invalid(result, *words), result
    assert (await org.credits() or {})["remaining"] == 10
    assert (await org.charge(max_credits=MAX_CREDITS))["credits_charged"] == 1

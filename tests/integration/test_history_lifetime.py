"""A user's history covers the whole license period, whatever the idempotency lifetime.

A year's period with idempotency records kept two days: decisions of day 1, 10 and 100
are all still listed on day 100, and their stored decisions expire at the period's end
plus the idempotency lifetime. A new period trims the last one's entries from the
history once they are past the idempotency lifetime too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from creditgate.api import reports
from creditgate.domain.charges import Action
from creditgate.domain.ids import rfc3339
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore

from .test_api_reports import DAY_MS, charge, command, contact, day, make_org

TTL_DAYS = 2.0


@pytest.fixture
async def short_lived(settings: Settings) -> AsyncIterator[CreditStore]:
    store = CreditStore.from_settings(
        settings.model_copy(update={"idempotency_ttl_days": TTL_DAYS})
    )
    try:
        yield store
    finally:
        await store.close()


async def listed(store: CreditStore, org: str) -> list[str]:
    page = await reports.charge_history(
        store, org, "u1", reports.HistoryQuery(Action.EXPORT, limit=50), 30
    )
    assert page is not None
    return [c["request_id"] for c in page["charges"]]


async def test_history_lives_for_the_whole_period(short_lived: CreditStore) -> None:
    store = short_lived
    org = await make_org(store, 100)  # a period from day 0 to day 365
    for n in (1, 10, 100):
        await charge(store, org, [contact(f"c-{n}")], day(n), request_id=f"d-{n}")

    # days past the two-day idempotency lifetime, every decision of the period is listed
    assert await listed(store, org) == ["d-100", "d-10", "d-1"]
    client = store.client_for_tests
    keys = store.keys.org(org)
    # kept until the period's end plus the idempotency lifetime, counted from the decision
    expected = day(365) + TTL_DAYS * DAY_MS - day(1)
    left = await client.pttl(keys.request("d-1"))
    assert expected - 60_000 < left <= expected
    history = await client.pttl(keys.history("u1", "export"))
    assert day(365) + TTL_DAYS * DAY_MS - day(100) - 60_000 < history


async def test_a_new_period_trims_the_last_ones_history(short_lived: CreditStore) -> None:
    store = short_lived
    org = await make_org(store, 100)
    await charge(store, org, [contact("c-1")], day(1), request_id="old-1")
    await command(
        store,
        org,
        "license.start_period",
        period_id="p2",
        starts_at=rfc3339(day(365)),
        ends_at=rfc3339(day(730)),
        credits=100,
    )
    await charge(store, org, [contact("c-2")], day(366), request_id="new-1")
    # the old period's entry is past the idempotency lifetime and not of this period
    assert await listed(store, org) == ["new-1"]
    # a decision taken once the period has ended is kept the idempotency lifetime only
    await command(
        store,
        org,
        "license.start_period",
        period_id="p3",
        starts_at=rfc3339(day(700)),
        ends_at=rfc3339(day(701)),
        credits=1,
    )
    await charge(store, org, [contact("c-3")], day(702), request_id="late-1")
    left = await store.client_for_tests.pttl(store.keys.org(org).request("late-1"))
    assert TTL_DAYS * DAY_MS - 60_000 < left <= TTL_DAYS * DAY_MS

"""Healing a Redis that forgot from ``credits.ledger``, on a real broker and Redis.

The traffic and its ledger are real (``test_rebuild.Deployment``: the real ``Decider``,
its messages published on topics of this test's own); "Redis forgot" means this test's
keys put back as an earlier copy had them (DUMP/RESTORE), never FLUSHALL, since the
Redis is shared with other tests.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from creditgate.domain.charges import ChargeRequest
from creditgate.domain.ids import to_ms
from creditgate.errors import RedisMayHaveForgotten
from creditgate.observability import Metrics
from creditgate.store.calls import ChargeCall
from creditgate.store.holds import HoldSweepIndex
from creditgate.stream import topics as t
from creditgate.stream.healing import Healer, PublishedSequences

from .test_rebuild import (
    Deployment,
    command,
    contact,
    day,
    delete_prefix,
    grant,
    parsed,
    period,
    request,
    shadow_copy,
    snapshot,
    upsert,
)

pytestmark = pytest.mark.integration

# the rebuild tests' fixture (the parameters below that name it shadow the import)
from .test_rebuild import deployment  # noqa: E402, F401


def call(body: dict[str, Any]) -> ChargeCall:
    return ChargeCall.of(ChargeRequest.model_validate(body))


async def contents(d: Deployment) -> dict[str, tuple[str, Any]]:
    """Every key of the test's prefix: its type and value (times to live left out)."""
    found = await snapshot(d.store.client_for_tests, d.settings.key_prefix)
    return {name: (key.type, key.value) for name, key in found.items()}


def healer(
    d: Deployment, published: PublishedSequences, sweep: HoldSweepIndex | None = None
) -> Healer:
    ledger = d.registry.name(t.LEDGER)
    return Healer(d.store, d.settings, ledger, published, d.clock, Metrics(), sweep=sweep)


async def two_orgs(d: Deployment) -> None:
    """acme and globex, each with an admin and 10 credits from day 0 to day 100."""
    await d.commands(
        day(0),
        upsert("acme", "a-1", "ana", "admin"),
        period("acme", "a-2", "p1", 10, day(0), day(100)),
        upsert("globex", "g-1", "boss", "admin"),
        period("globex", "g-2", "p1", 10, day(0), day(100)),
    )


async def test_a_stale_redis_is_healed_to_what_the_ledger_says(
    deployment: Deployment,  # noqa: F811
) -> None:
    d = deployment
    prefix, stale = d.settings.key_prefix, f"{d.settings.key_prefix}-shadow"
    await two_orgs(d)
    first = await d.requests(day(1), request("acme", "r-1", "ana", [contact("c1")]))
    await shadow_copy(d.settings, prefix, stale)
    # published, then forgotten by Redis: a window opened, a grant, a member removed
    await d.requests(day(2), request("acme", "r-2", "ana", [contact("c2", "co2")]))
    await d.commands(
        day(2),
        grant("globex", "g-3", "g1", 5),
        upsert("acme", "a-3", "bob"),
        command("acme", "a-4", "member.remove", user_id="bob"),
    )
    latest = await snapshot(d.store.client_for_tests, prefix)
    await delete_prefix(d.store.client_for_tests, prefix)
    await shadow_copy(d.settings, stale, prefix)
    assert await snapshot(d.store.client_for_tests, prefix) != latest

    published = PublishedSequences()
    h = healer(d, published)
    await h.start()
    try:
        report = await h.heal({})
        again = await h.heal({})  # nothing more is missing
    finally:
        await h.stop()

    healed = await snapshot(d.store.client_for_tests, prefix)
    # the checkpoint now vouches for the ledger up to where the heal read it (a cluster
    # keeps a copy on each primary: "ledger-checkpoint:{n}")
    checkpoints = [healed.pop(k) for k in list(healed) if k.startswith("ledger-checkpoint")]
    assert checkpoints
    assert all(c.type == "zset" for c in checkpoints)
    assert sorted(healed) == sorted(latest)
    for name, key in latest.items():
        assert (healed[name].type, healed[name].value) == (key.type, key.value), name
        assert (healed[name].ttl_ms < 0) == (key.ttl_ms < 0), name
    assert (report.organisations_healed, report.entries_applied) == (2, 4)
    assert (again.organisations_healed, again.entries_applied) == (0, 0)
    # the worker now knows each organisation's last published sequence
    assert published("acme") == int(latest["{acme}:seq"].value)
    assert published("globex") == int(latest["{globex}:seq"].value)

    # the forgotten request, replayed, gets its published decision; the window it paid
    # for is still open, and the sequence goes on from the ledger
    follow = Deployment(d.settings, d.registry, d.clock, d.store)
    out = await follow.requests(
        day(3),
        request("acme", "r-2", "ana", [contact("c2", "co2")]),
        request("acme", "r-3", "ana", [contact("c2")]),
    )
    results = d.results(out)
    assert results["r-3"]["credits_charged"] == 0
    assert results["r-3"]["sequence"] == published("acme") + 1
    assert d.results(first)["r-1"]["sequence"] < results["r-3"]["sequence"]
    replayed = [m for m in parsed(out) if m[2].get("request_id") == "r-2"]
    assert replayed
    assert replayed[0][2]["credits_charged"] == 1


async def test_scripts_decide_nothing_on_a_redis_behind_what_was_published(
    deployment: Deployment,  # noqa: F811
) -> None:
    d = deployment
    await d.commands(
        day(0),
        upsert("acme", "a-1", "ana", "admin"),
        period("acme", "a-2", "p1", 10, day(0), day(100)),
    )
    before = await contents(d)
    sequence = int(before["{acme}:seq"][1])
    charge = call(request("acme", "r-1", "ana", [contact("c1")]))

    with pytest.raises(RedisMayHaveForgotten) as behind:
        await d.store.charge_many([charge], day(1), known={"acme": sequence + 1}.__getitem__)
    assert behind.value.orgs == frozenset({"acme"})
    # an organisation the worker knows nothing of, and Redis neither
    newcomer = call(request("initech", "i-1", "ana", [contact("c1")]))
    with pytest.raises(RedisMayHaveForgotten) as unknown:
        await d.store.charge_many([newcomer], day(1), known=lambda org: -1)
    assert unknown.value.orgs == frozenset({"initech"})
    assert await contents(d) == before  # nothing written

    # the worker's view of what was published: current, and for a new organisation 0
    published = PublishedSequences()
    published.update({"acme": sequence, "initech": 0})
    (answer,) = await d.store.charge_many([charge], day(1), known=published)
    assert answer.record.credits == 1
    assert answer.record.sequence == sequence + 1


async def test_a_hold_whose_sweep_note_was_forgotten_is_noted_again_by_the_heal_check(
    deployment: Deployment,  # noqa: F811
) -> None:
    """Redis kept the hold (its organisation's node) but lost the sweep index's note of it
    (another node, or a later command of the same one): the heal check that follows
    notes it again from the organisation's own expiries, and the sweep then finds it."""
    d = deployment
    await two_orgs(d)
    out = await d.requests(
        day(1),
        request("acme", "h-1", "ana", [contact("c1")], hold={"expires_in_seconds": 60}),
        request("globex", "r-1", "boss", [contact("c1")]),
    )
    held = d.results(out)["h-1"]
    assert held["type"] == "charge.held"
    # the deployment's decider notes nothing: the index lacks the hold, as if forgotten
    sweep = HoldSweepIndex.from_settings(d.settings)
    expires = to_ms(datetime.fromisoformat(held["hold_expires_at"]))
    try:
        assert await sweep.due(expires, orgs=10, holds=10) == {}

        h = healer(d, PublishedSequences(), sweep)
        await h.start()
        try:
            report = await h.heal({})
        finally:
            await h.stop()

        assert report.entries_applied == 0  # nothing else was missing
        # noted at its expiry, no earlier: globex (no hold) is not noted
        assert await sweep.due(expires - 1, orgs=10, holds=10) == {}
        assert await sweep.due(expires, orgs=10, holds=10) == {"acme": ["h-1"]}
    finally:
        await sweep.close()

"""The invariant checker catches what it claims to: a consistent run passes, and each
kind of corruption a fault could cause is named. No broker or Redis needed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from creditgate_harness.invariants import StoreState, check
from creditgate_harness.traffic import Decision, LedgerEntry, Seen, Sent

ORG = "o1"


def decision(seq: int, credits: int, balance: int, sig: str, *, digest: bytes = b"") -> Decision:
    return Decision(
        digest=digest or f"d{seq}".encode(),
        org=ORG,
        sequence=seq,
        approved=credits > 0,
        reason=None if credits > 0 else "insufficient_credits",
        credits=credits,
        balance_after=balance,
        period_id="p1",
        decided_ms=0,
        items_sig=sig,
        items_charged=credits,
    )


def entry(seq: int, kind: str, cause: str, delta: int, balance: int) -> LedgerEntry:
    return LedgerEntry(f"l{seq}".encode(), kind, cause, delta, balance, "p1")


def consistent_run() -> tuple[Sent, Seen, StoreState]:
    """10 credits, a grant of 5, r1 charged 2, r2 rejected, r3 charged 1 (sent twice,
    the second time with another body, which got its conflict answer)."""
    sent = Sent(
        requests={"r1": (ORG, ["s1"]), "r2": (ORG, ["s2"]), "r3": (ORG, ["s3", "s3x"])},
        commands={"c-period": ORG, "c-grant": ORG},
    )
    seen = Seen()
    seen.decisions = {
        "r1": [decision(3, 2, 13, "s1")],
        "r2": [decision(4, 0, 13, "s2")],
        "r3": [decision(5, 1, 12, "s3")],
    }
    seen.conflicts["r3"].add("s3x")
    seen.events["c-period"]["command.applied"] = 1
    seen.events["c-grant"]["command.applied"] = 1
    seen.ledger[ORG] = {
        1: [entry(1, "period_started", "c-period", 10, 10)],
        2: [entry(2, "granted", "c-grant", 5, 15)],
        3: [entry(3, "charged", "r1", -2, 13)],
        4: [entry(4, "rejected", "r2", 0, 13)],
        5: [entry(5, "charged", "r3", -1, 12)],
    }
    store = StoreState(
        licenses={ORG: {"period_id": "p1", "credits": "10", "granted": "5", "balance": "12"}},
        sequences={ORG: 5},
        stored_sequence={"r1": 3, "r2": 4, "r3": 5},
    )
    return sent, seen, store


def test_a_consistent_run_holds() -> None:
    verdict = check(*consistent_run(), first_body_wins=True)
    assert verdict.ok, verdict.summary()
    assert (verdict.decided, verdict.approved, verdict.credits_charged) == (3, 2, 3)


def charged_again(sent: Sent, seen: Seen, store: StoreState) -> None:
    # r1 decided a second time after its record was lost: another digest, another entry
    seen.decisions["r1"].append(decision(6, 2, 10, "s1", digest=b"again"))
    seen.ledger[ORG][6] = [entry(6, "charged", "r1", -2, 10)]
    store.sequences[ORG] = 6
    store.licenses[ORG]["balance"] = "10"


def never_decided(sent: Sent, seen: Seen, store: StoreState) -> None:
    del seen.decisions["r3"]


def forgotten(sent: Sent, seen: Seen, store: StoreState) -> None:
    store.stored_sequence["r2"] = None


def ledger_gap(sent: Sent, seen: Seen, store: StoreState) -> None:
    del seen.ledger[ORG][4]


def copies_differ(sent: Sent, seen: Seen, store: StoreState) -> None:
    seen.ledger[ORG][4].append(replace(seen.ledger[ORG][4][0], digest=b"other"))


def balance_off(sent: Sent, seen: Seen, store: StoreState) -> None:
    store.licenses[ORG]["balance"] = "11"


def below_zero(sent: Sent, seen: Seen, store: StoreState) -> None:
    seen.decisions["r2"][0] = replace(seen.decisions["r2"][0], balance_after=-1)


def conflict_unanswered(sent: Sent, seen: Seen, store: StoreState) -> None:
    seen.conflicts["r3"].clear()


def later_body_won(sent: Sent, seen: Seen, store: StoreState) -> None:
    seen.decisions["r3"][0] = replace(seen.decisions["r3"][0], items_sig="s3x")
    seen.conflicts["r3"] = {"s3"}


def credits_not_items(sent: Sent, seen: Seen, store: StoreState) -> None:
    seen.decisions["r1"][0] = replace(seen.decisions["r1"][0], items_charged=1)


def command_twice(sent: Sent, seen: Seen, store: StoreState) -> None:
    seen.events["c-grant"]["command.rejected"] = 1


def with_a_hold_and_a_refund(sent: Sent, seen: Seen, store: StoreState) -> None:
    """r4 holds 3 (settled with 1 charged, 2 released), r5 holds 2 (still open), and
    one credit of r1 refunded: 12 - 3 + 2 - 2 + 1 = 10."""
    sent.requests.update({"r4": (ORG, ["s4"]), "r5": (ORG, ["s5"])})
    seen.decisions["r4"] = [replace(decision(6, 0, 9, "s4"), approved=True, held=3)]
    seen.decisions["r5"] = [replace(decision(8, 0, 9, "s5"), approved=True, held=2)]
    seen.hold_outcomes["r4"] = {b"settled"}
    seen.ledger[ORG].update(
        {
            6: [entry(6, "held", "r4", -3, 9)],
            7: [replace(entry(7, "hold_settled", "r4", 2, 11), charged=1, unheld=3)],
            8: [entry(8, "held", "r5", -2, 9)],
            9: [replace(entry(9, "refunded", "c-refund", 1, 10))],
        }
    )
    store.sequences[ORG] = 9
    store.stored_sequence.update({"r4": 6, "r5": 8})
    store.licenses[ORG]["balance"] = "10"


def test_a_consistent_run_with_holds_and_refunds_holds() -> None:
    sent, seen, store = consistent_run()
    with_a_hold_and_a_refund(sent, seen, store)
    verdict = check(sent, seen, store, first_body_wins=True)
    assert verdict.ok, verdict.summary()


def hold_not_counted(sent: Sent, seen: Seen, store: StoreState) -> None:
    # the open hold's credits left the balance, but no ledger entry holds them
    with_a_hold_and_a_refund(sent, seen, store)
    seen.ledger[ORG][8] = [entry(8, "held", "r5", 0, 11)]
    store.licenses[ORG]["balance"] = "9"


def refund_not_given_back(sent: Sent, seen: Seen, store: StoreState) -> None:
    with_a_hold_and_a_refund(sent, seen, store)
    store.licenses[ORG]["balance"] = "9"


def hold_resolved_twice(sent: Sent, seen: Seen, store: StoreState) -> None:
    with_a_hold_and_a_refund(sent, seen, store)
    seen.hold_outcomes["r4"].add(b"expired too")


@pytest.mark.parametrize(
    ("corrupt", "flagged"),
    [
        (charged_again, {"decided_twice", "charged_twice"}),
        (never_decided, {"undecided"}),
        (forgotten, {"forgotten_by_redis"}),
        (ledger_gap, {"ledger_gap", "decision_without_ledger_entry"}),
        (copies_differ, {"ledger_copies_differ"}),
        (balance_off, {"accounting_identity", "ledger_vs_redis_balance"}),
        (below_zero, {"negative_balance", "ledger_disagrees_with_decision"}),
        (conflict_unanswered, {"other_body_without_conflict_answer"}),
        (later_body_won, {"later_body_won"}),
        (credits_not_items, {"credits_differ_from_items_charged"}),
        (command_twice, {"command_with_two_outcomes"}),
        (hold_not_counted, {"accounting_identity"}),
        (refund_not_given_back, {"accounting_identity", "ledger_vs_redis_balance"}),
        (hold_resolved_twice, {"hold_resolved_twice"}),
    ],
)
def test_each_corruption_is_named(
    corrupt: Callable[[Sent, Seen, StoreState], None], flagged: set[str]
) -> None:
    sent, seen, store = consistent_run()
    corrupt(sent, seen, store)
    verdict = check(sent, seen, store, first_body_wins=True)
    assert flagged <= set(verdict.counts), verdict.summary()

"""DESIGN §1 and §6, checked from the outside after a run with faults.

Inputs are what the producer sent (``Sent``), what came out on the results, ledger
and license-event topics (``Seen``), and the organisations' state in Redis. A
violation is recorded with a few examples; ``Verdict.ok`` is true when there is none.

- every request has exactly one decision; re-emitted copies are byte-identical (they
  collapse into one digest; a second digest is a second decision);
- the decision is about a body that was sent under that id, and every other body
  sent under it got a ``request_id_conflict`` answer;
- nothing is charged twice: one ledger entry per decision, one decision per entry,
  and they agree; a decision charges one credit per item marked ``charged``; no item is
  charged again while the window its last charge opened is open;
- no balance below zero, in any decision, ledger entry or in Redis;
- per organisation, the accounting identity of DESIGN §1 for the current period:
  credits + grants - balance = charged - refunded + held (open holds), from the ledger;
  and without holds or refunds, the credits charged by the period's distinct decisions
  add up the same;
- a hold resolves at most once: one settlement, release or expiry published per hold;
- the ledger: per organisation gap-free sequences 1..n (n = Redis's counter), copies of
  one sequence identical, and each entry's balance = the previous one + its delta;
- nothing acknowledged is lost: every published decision is Redis's stored decision.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson

from creditgate.settings import Settings
from creditgate.store.client import redis_client
from creditgate.store.keys import Keys
from creditgate_harness.traffic import Decision, Seen, Sent

_EXAMPLES = 5
_CHUNK = 5000


@dataclass
class StoreState:
    licenses: dict[str, dict[str, str]]
    sequences: dict[str, int]
    stored_sequence: dict[str, int | None]  # request_id -> seq of Redis's stored decision


async def read_store(settings: Settings, sent: Sent, seen: Seen) -> StoreState:
    """The Redis side of the invariants, read in pipelined chunks."""
    keys = Keys(settings.key_prefix)
    client = redis_client(settings)
    try:
        orgs = sorted({org for org, _ in sent.requests.values()} | set(sent.commands.values()))
        pipe = client.pipeline(transaction=False)
        for org in orgs:
            pipe.hgetall(keys.org(org).license)
            pipe.get(keys.org(org).sequence)
        replies = await pipe.execute()
        licenses = {org: replies[2 * i] for i, org in enumerate(orgs)}
        sequences = {org: int(replies[2 * i + 1] or 0) for i, org in enumerate(orgs)}
        decided = [(rid, found[0].org) for rid, found in seen.decisions.items()]
        stored: dict[str, int | None] = {}
        for start in range(0, len(decided), _CHUNK):
            part = decided[start : start + _CHUNK]
            pipe = client.pipeline(transaction=False)
            for rid, org in part:
                pipe.hget(keys.org(org).request(rid), "rec")
            for (rid, _), raw in zip(part, await pipe.execute(), strict=True):
                stored[rid] = orjson.loads(raw).get("seq") if raw else None
        return StoreState(licenses, sequences, stored)
    finally:
        await client.aclose()


@dataclass
class Verdict:
    requests: int = 0
    decided: int = 0
    approved: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    credits_charged: int = 0
    result_copies: int = 0
    conflict_answers: int = 0
    ledger_entries: int = 0
    orgs_out_of_credits: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter[str] = field(default_factory=Counter)

    def flag(self, problem: str, example: str) -> None:
        self.counts[problem] += 1
        if len(self.problems[problem]) < _EXAMPLES:
            self.problems[problem].append(example)

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def double_charges(self) -> int:
        return self.counts["charged_twice"] + self.counts["window_paid_twice"]

    @property
    def lost_decisions(self) -> int:
        return self.counts["undecided"] + self.counts["forgotten_by_redis"]

    def summary(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in self.rejected.most_common())
        lines = [
            (
                f"requests {self.requests}, decided {self.decided} "
                f"(approved {self.approved}; rejected {sum(self.rejected.values())}: {reasons})"
            ),
            (
                f"credits charged {self.credits_charged}; result copies {self.result_copies} "
                f"({self.result_copies - self.decided} re-emitted); conflict answers "
                f"{self.conflict_answers}; ledger entries {self.ledger_entries}; "
                f"organisations that ran out {self.orgs_out_of_credits}"
            ),
            f"double charges {self.double_charges}, lost decisions {self.lost_decisions}",
            f"invariants: {'HOLD' if self.ok else 'VIOLATED'}",
        ]
        for problem, n in sorted(self.counts.items()):
            lines.append(f"  {problem}: {n}, e.g. {'; '.join(self.problems[problem])}")
        return "\n".join(lines)


def check(sent: Sent, seen: Seen, store: StoreState, *, first_body_wins: bool = False) -> Verdict:
    """Every invariant; ``first_body_wins`` when the sends could not have been reordered."""
    verdict = Verdict(
        requests=len(sent.requests),
        result_copies=seen.result_copies,
        conflict_answers=seen.conflict_answers,
    )
    _check_decisions(verdict, sent, seen, store, first_body_wins)
    _check_commands(verdict, sent, seen)
    if seen.windows_paid_twice:
        for example in seen.paid_twice_examples:
            verdict.flag("window_paid_twice", example)
        verdict.counts["window_paid_twice"] = seen.windows_paid_twice
    decisions_by_org: dict[str, list[tuple[str, Decision]]] = defaultdict(list)
    for rid, found in seen.decisions.items():
        decisions_by_org[found[0].org].append((rid, found[0]))
    for org in sorted({org for org, _ in sent.requests.values()} | set(sent.commands.values())):
        _check_balance(verdict, org, decisions_by_org[org], store.licenses.get(org) or {}, seen)
        _check_ledger(verdict, org, seen, store, dict(decisions_by_org[org]))
    _check_holds(verdict, seen)
    return verdict


def _check_holds(verdict: Verdict, seen: Seen) -> None:
    for hold_id, outcomes in seen.hold_outcomes.items():
        if len(outcomes) > 1:
            # copies are identical bytes: more than one digest is more than one outcome
            # (a settlement refused as already resolved is one too; the fault tests
            # send one resolution per hold)
            verdict.flag("hold_resolved_twice", f"{hold_id}: {len(outcomes)} outcomes")


def _check_decisions(
    verdict: Verdict, sent: Sent, seen: Seen, store: StoreState, first_body_wins: bool
) -> None:
    for rid in seen.decisions.keys() - sent.requests.keys():
        verdict.flag("decision_for_unknown_request", rid)
    for rid, (_org, sigs) in sent.requests.items():
        found = seen.decisions.get(rid)
        if not found:
            verdict.flag("undecided", rid)
            continue
        verdict.decided += 1
        decision = found[0]
        if len(found) > 1:
            # a second digest: re-emitted differently, or decided again (the ledger
            # check below tells whether it was also charged again)
            verdict.flag("decided_twice", f"{rid}: credits {[d.credits for d in found]}")
        if decision.approved:
            verdict.approved += 1
            verdict.credits_charged += decision.credits
        else:
            verdict.rejected[decision.reason or "?"] += 1
        if decision.items_charged != decision.credits:
            verdict.flag(
                "credits_differ_from_items_charged",
                f"{rid}: {decision.credits} credits, {decision.items_charged} items charged",
            )
        if decision.balance_after is not None and decision.balance_after < 0:
            verdict.flag("negative_balance", f"{rid}: balance_after {decision.balance_after}")
        if decision.items_sig not in sigs:
            verdict.flag("decision_about_a_body_never_sent", rid)
        elif first_body_wins and decision.items_sig != sigs[0]:
            verdict.flag("later_body_won", rid)
        refused = seen.conflicts.get(rid, set())
        for sig in sigs:
            if sig != decision.items_sig and sig not in refused:
                verdict.flag("other_body_without_conflict_answer", rid)
        if store.stored_sequence.get(rid) != decision.sequence:
            # published (so acknowledged upstream) but not what Redis holds: a later
            # replay would decide it again
            verdict.flag(
                "forgotten_by_redis",
                f"{rid}: published seq {decision.sequence}, "
                f"Redis has {store.stored_sequence.get(rid)}",
            )


def _check_commands(verdict: Verdict, sent: Sent, seen: Seen) -> None:
    for command_id in sent.commands:
        outcomes = seen.events.get(command_id)
        if not outcomes:
            verdict.flag("command_without_event", command_id)
        elif len(outcomes) > 1:
            verdict.flag("command_with_two_outcomes", f"{command_id}: {dict(outcomes)}")


def accounting(seen: Seen, org: str, period: str) -> tuple[int, int, int]:
    """(charged, refunded, held) of ``period`` by the organisation's ledger entries."""
    charged = refunded = held = 0
    for copies in seen.ledger.get(org, {}).values():
        entry = copies[0]
        if entry.period_id != period:
            continue
        if entry.kind == "charged":
            charged -= entry.delta
        elif entry.kind == "held":
            held -= entry.delta
        elif entry.kind == "refunded":
            refunded += entry.delta
        else:  # a hold resolved (else both 0)
            charged += entry.charged
            held -= entry.unheld
    return charged, refunded, held


def _check_balance(
    verdict: Verdict,
    org: str,
    decisions: list[tuple[str, Decision]],
    license: dict[str, str],
    seen: Seen,
) -> None:
    if not license:
        charged = sum(d.credits for _, d in decisions)
        if charged:
            verdict.flag("charged_without_license", f"{org}: {charged}")
        return
    credits, granted, balance = (int(license[f]) for f in ("credits", "granted", "balance"))
    if balance < 0:
        verdict.flag("negative_balance", f"{org}: Redis balance {balance}")
    if any(d.reason == "insufficient_credits" for _, d in decisions):
        verdict.orgs_out_of_credits += 1
    period = license["period_id"]
    charged, refunded, held = accounting(seen, org, period)
    if credits + granted - balance != charged - refunded + held:
        verdict.flag(
            "accounting_identity",
            f"{org} {period}: {credits} + {granted} - {balance} != {charged} charged - "
            f"{refunded} refunded + {held} held",
        )
    if not refunded and not held and not any(d.held for _, d in decisions):
        by_decisions = sum(d.credits for _, d in decisions if d.period_id == period)
        if by_decisions != charged:
            verdict.flag(
                "period_arithmetic",
                f"{org} {period}: decisions charged {by_decisions}, the ledger {charged}",
            )


def _check_ledger(
    verdict: Verdict, org: str, seen: Seen, store: StoreState, decisions: dict[str, Decision]
) -> None:
    entries = seen.ledger.get(org, {})
    verdict.ledger_entries += len(entries)
    top = store.sequences.get(org, 0)
    if sorted(entries) != list(range(1, top + 1)):
        missing = sorted(set(range(1, top + 1)) - entries.keys())
        verdict.flag(
            "ledger_gap",
            f"{org}: {len(entries)} sequences, Redis counter {top}, missing {missing[:5]}",
        )
    running = 0
    causes: Counter[str] = Counter()
    charges: Counter[str] = Counter()
    for sequence in sorted(entries):
        copies = entries[sequence]
        if len(copies) > 1:
            verdict.flag("ledger_copies_differ", f"{org}#{sequence}")
        entry = copies[0]
        running += entry.delta
        if entry.balance_after is not None:
            if entry.balance_after != running:
                verdict.flag(
                    "ledger_arithmetic",
                    f"{org}#{sequence} {entry.kind}: balance {entry.balance_after}, "
                    f"entries add up to {running}",
                )
                running = entry.balance_after  # one report per break, not per entry after it
            if entry.balance_after < 0:
                verdict.flag("negative_balance", f"{org}#{sequence}: {entry.balance_after}")
        if entry.kind in ("charged", "rejected", "held"):
            causes[entry.cause] += 1
            charges[entry.cause] += entry.delta < 0
            decision = decisions.get(entry.cause)
            if decision is None or decision.sequence != sequence:
                verdict.flag("ledger_entry_without_its_decision", f"{org}#{sequence}")
            elif (-entry.delta, entry.balance_after) != (
                decision.credits + decision.held,
                decision.balance_after,
            ):
                verdict.flag("ledger_disagrees_with_decision", f"{org}#{sequence} {entry.cause}")
    for rid, times in causes.items():
        if times > 1:
            verdict.flag("ledger_decided_twice", f"{rid}: {times} ledger entries")
        if charges[rid] > 1:
            verdict.flag("charged_twice", f"{rid}: charged by {charges[rid]} ledger entries")
    for rid, decision in decisions.items():
        if causes[rid] == 0:
            verdict.flag("decision_without_ledger_entry", f"{rid} seq {decision.sequence}")
    license = store.licenses.get(org) or {}
    if license and int(license["balance"]) != running:
        verdict.flag(
            "ledger_vs_redis_balance", f"{org}: ledger {running}, Redis {license['balance']}"
        )


def as_dict(verdict: Verdict) -> dict[str, Any]:
    """The figures a soak run prints and saves."""
    return {
        "requests": verdict.requests,
        "decided": verdict.decided,
        "approved": verdict.approved,
        "rejected": dict(verdict.rejected),
        "credits_charged": verdict.credits_charged,
        "double_charges": verdict.double_charges,
        "lost_decisions": verdict.lost_decisions,
        "violations": dict(verdict.counts),
        "invariants_hold": verdict.ok,
    }

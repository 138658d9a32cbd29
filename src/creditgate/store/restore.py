"""Restoring an organisation's Redis keys from its ledger entries (``creditgate rebuild``).

``charge.lua`` and ``command.lua`` are the only writers of credit state, and every
write they make is told by a ledger entry: a decision carries the stored record (its
outcomes, notes, sequence and time), the request summary and the windows it opened;
an applied command carries its body and the resulting state, a rejected one its
stored record. ``OrgState.apply`` folds one organisation's entries, in sequence order,
into the keys the scripts would have left behind — each step below names the script
write it mirrors — and ``store.writeback.write_org`` writes that state to Redis.

Why fold in Python and write once, rather than replay the entries through a restore
script: the rebuild runs on an idle Redis (workers stopped), so it needs no atomic
read-modify-write; folding first writes each key once instead of once per entry;
expiry is decided here against the rebuild's decision clock (an idempotency record
whose time is up, or a window that has ended, is simply not written); and every key
name still comes from ``store.keys``. The price is a second description of the
scripts' writes: ``tests/integration/test_rebuild.py`` compares every key of a real
run before and after a rebuild, so a key a script starts writing without this module
learning it fails that test.

Expiry, like the scripts set it:
- command records (``cmd:``) live ``idempotency_ttl_ms`` after their write; a
  request's stored decision (``req:``) and a user's history live until the end of the
  period they were decided in plus ``idempotency_ttl_ms``, and at least
  ``idempotency_ttl_ms`` (``charge.lua``'s ``finish``); the scripts use a relative
  ``PEXPIRE``, so the rebuild sets what is left of it by the decision clock;
- windows expire at their end (``PXAT``), pushed out by how far Redis's clock runs
  ahead of the decision clock, as ``charge.lua`` does.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from creditgate.store.keys import (
    LIMIT_NOTIFIED_PREFIX,
    UsageFields,
)


@dataclass(frozen=True)
class StoredRecord:
    """An idempotency record: the ``fp``/``rec`` (and, for requests, ``req``) fields."""

    fingerprint: str
    record: str
    summary: str | None
    decided_ms: int
    # when the script's PEXPIRE ends it (None: decided_ms + the idempotency lifetime)
    expires_ms: int | None = None


@dataclass
class History:
    """A user's request history for one action (``hist:<action>:<user>``, a zset)."""

    scores: dict[str, int] = field(default_factory=dict)
    last_write_ms: int = 0
    expires_ms: int = 0
    # (score, request_id) of every ZADD, oldest first, to trim like ZREMRANGEBYSCORE
    _by_score: list[tuple[int, str]] = field(default_factory=list)

    def add(self, request_id: str, at: int, floor: int, expires_ms: int) -> None:
        # charge.lua: ZADD now id; ZREMRANGEBYSCORE -inf (floor; PEXPIRE (expires - now)
        self.scores[request_id] = at
        heapq.heappush(self._by_score, (at, request_id))
        while self._by_score and self._by_score[0][0] < floor:
            score, old = heapq.heappop(self._by_score)
            if self.scores.get(old) == score:
                del self.scores[old]
        self.last_write_ms = at
        self.expires_ms = expires_ms


@dataclass
class OrgState:
    """The Redis state of one organisation, as the ledger tells it.

    ``now_ms`` is the rebuild's decision clock: records and windows that have expired
    by then are dropped while folding, so memory holds only what will be written.
    """

    org_id: str
    ttl_ms: int
    now_ms: int
    sequence: int = 0
    license: dict[str, str] | None = None
    members: dict[str, str] = field(default_factory=dict)
    disallowed: set[str] = field(default_factory=set)
    grants: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int | str] = field(default_factory=dict)
    requests: dict[str, StoredRecord] = field(default_factory=dict)
    commands: dict[str, StoredRecord] = field(default_factory=dict)
    history: dict[tuple[str, str], History] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)
    # refunds: per refunded request, its refunded items (the ``ref`` field, JSON), and
    # the windows refunds closed (deleted when healing: Redis may still have them)
    refunds: dict[str, str] = field(default_factory=dict)
    closed_windows: set[str] = field(default_factory=set)
    # holds: the open ones (request_id -> JSON), those not yet expired by the sweep
    # (request_id -> expiry), resolutions beside the hold's decision (the ``res`` field,
    # JSON) and settlements' own records
    holds: dict[str, str] = field(default_factory=dict)
    hold_expiries: dict[str, int] = field(default_factory=dict)
    resolutions: dict[str, str] = field(default_factory=dict)
    settlements: dict[str, StoredRecord] = field(default_factory=dict)
    # entries whose balance_after disagrees with the fold: a gap or a damaged ledger
    inconsistencies: list[str] = field(default_factory=list)

    def apply(self, entry: Mapping[str, Any]) -> None:
        """Fold one ledger entry; entries must come in sequence order."""
        self.sequence = max(self.sequence, int(entry["sequence"]))
        try:
            if "command_type" in entry:
                self._command(entry)
            elif str(entry["kind"]).startswith("hold_"):
                self._resolution(entry)
            else:
                self._charge(entry)
        except (KeyError, TypeError, ValueError) as exc:
            # a damaged entry is reported, not guessed at; the fold goes on without it
            self.inconsistencies.append(
                f"sequence {entry['sequence']}: entry not folded ({type(exc).__name__}: {exc})"
            )
            return
        self._check_balance(entry)

    # ---- charge.lua ----------------------------------------------------------------

    def _charge(self, entry: Mapping[str, Any]) -> None:
        decision = entry["decision"]
        request_id = entry["request_id"]
        at = int(decision["at"])
        # the script's user is "" when an invalid request had no readable user_id
        user, action = entry.get("user_id") or "", entry["action"]
        period = decision.get("period") or ""
        summary = entry.get("request")
        # finish(): the stored decision beside the request summary, and the history,
        # kept for the period the script read from the license before deciding
        floor, expires = self._kept_for_period(at)
        self._remember(
            self.requests,
            request_id,
            StoredRecord(
                decision["fp"],
                _json(decision),
                None if summary is None else _json(summary),
                at,
                expires,
            ),
        )
        self.history.setdefault((user, action), History()).add(request_id, at, floor, expires)
        usage = UsageFields.counter_prefix(period, user, action)
        if decision["status"] not in ("approved", "held"):
            # reject(): counted against the period the request was decided in, if any
            if period:
                self._count(usage + "rejected", 1)
        else:
            held = decision["status"] == "held"
            charged = int(decision["held"] if held else decision["credits"])
            saved = int(decision.get("saved", 0))
            for window in entry.get("windows", []):
                self._open_window(window["window"], int(window["ends_at_ms"]))
            if charged > 0 and self.license is not None:
                self._add(self.license, "balance", -charged)
                if held:
                    self._add(self.license, "held", charged)
            self._count(usage + ("held" if held else "credits"), charged)
            self._count(usage + "requests", 1)
            if saved > 0:
                self._count(usage + "saved", saved)
            if held:
                # HSET holds <id> {exp, credits, user, action, period}; ZADD expiries
                expires = int(decision["hold_exp"])
                self.holds[request_id] = _json(
                    {"exp": expires, "credits": charged, "user": user, "action": action}
                    | {"period": period}
                )
                self.hold_expiries[request_id] = expires
        # notes that the script also remembered on the license, once per period
        for note in _as_list(decision.get("notes")):
            if self.license is None:
                continue
            if note.get("type") == "credits.insufficient" and note.get("to") == "admin":
                self.license["insufficient_notified"] = "1"
            elif note.get("type") == "credits.threshold_reached":
                self.license[f"thr:{int(note['threshold'])}"] = "1"
            elif note.get("type") == "credits.user_limit_reached":
                self.license[LIMIT_NOTIFIED_PREFIX + user] = "1"

    def _resolution(self, entry: Mapping[str, Any]) -> None:
        """charge.lua's settle, release or expire."""
        decision, hold_id = entry["decision"], entry["request_id"]
        at = int(decision["at"])
        settlement_id = entry.get("settlement_id")
        if settlement_id:
            # the settlement's own record (HSET stl:<id> fp rec; PEXPIRE ttl)
            stored = StoredRecord(decision["fp"], _json(decision), None, at)
            self._remember(self.settlements, settlement_id, stored)
        if decision["status"] == "rejected":
            return
        self.resolutions[hold_id] = _json(decision)
        self.holds.pop(hold_id, None)
        # an expiry leaves its hold there until the sweep has published it; that it is
        # on the ledger means it was published
        self.hold_expiries.pop(hold_id, None)
        for window in entry.get("windows", []):
            self._open_window(window["window"], int(window["ends_at_ms"]))
        delta = int(decision.get("delta", 0))
        if delta and self.license is not None:
            self._add(self.license, "balance", delta)
        charged, released = int(decision["credits"]), int(decision.get("released", 0))
        same_period = (
            self.license is not None and self.license["period_id"] == decision["hold_period"]
        )
        if same_period and charged + released > 0:
            assert self.license is not None
            self._add(self.license, "held", -(charged + released))
        usage = UsageFields.counter_prefix(
            decision["hold_period"], decision["user"], decision["action"]
        )
        if charged + released:
            self._count(usage + "held", -(charged + released))
        if charged:
            self._count(usage + "credits", charged)
        if int(decision.get("saved", 0)):
            self._count(usage + "saved", int(decision["saved"]))

    def _open_window(self, name: str, ends_ms: int) -> None:
        # SET <window> <end> PXAT <end>: a window that has ended is gone
        self.closed_windows.discard(name)
        if ends_ms > self.now_ms:
            self.windows[name] = ends_ms
        else:
            self.windows.pop(name, None)

    # ---- command.lua ---------------------------------------------------------------

    def _command(self, entry: Mapping[str, Any]) -> None:
        decision, body = entry["decision"], entry["command"]  # body: null when invalid
        command_id, kind = entry["command_id"], entry["command_type"]
        # finish(): the stored record, of an applied or a rejected command
        self._remember(
            self.commands,
            command_id,
            StoredRecord(decision["fp"], _json(decision), None, int(decision["at"])),
        )
        if decision["status"] != "applied":
            return  # a rejected command changed nothing else
        match kind:
            case "license.start_period":
                # every open hold is due now (ZADD expiries now <id>)
                for hold_id in self.hold_expiries:
                    self.hold_expiries[hold_id] = int(decision["at"])
                # DEL license; HSET the new period: flags of the old period go with it
                state = decision["state"]
                self.license = {
                    "period_id": str(state["period_id"]),
                    "starts_ms": str(int(state["starts_ms"])),
                    "ends_ms": str(int(state["ends_ms"])),
                    "credits": str(int(state["credits"])),
                    "granted": "0",
                    "balance": str(int(state["credits"])),
                }
            case "credits.grant":
                self.grants[body["grant_id"]] = command_id
                if self.license is not None:
                    self._add(self.license, "granted", int(body["credits"]))
                    self._add(self.license, "balance", int(body["credits"]))
            case "member.upsert":
                self.members[body["user_id"]] = body["role"]
            case "member.remove":
                self.members.pop(body["user_id"], None)
                self.disallowed.discard(body["user_id"])
                self.limits.pop(body["user_id"], None)
            case "member.set_credits_allowed":
                if body["allowed"]:
                    self.disallowed.discard(body["user_id"])
                else:
                    self.disallowed.add(body["user_id"])
            case "charge.refund":
                # command.lua's refund: the credits back, the request's refunded items,
                # the windows closed and the refunded counter of the request's period
                credits, request = int(decision["delta"]), decision["request"]
                if self.license is not None:
                    self._add(self.license, "balance", credits)
                usage = UsageFields.counter_prefix(
                    request["period"], request.get("user_id") or "", request["action"]
                )
                self._count(usage + "refunded", credits)
                self.refunds[body["request_id"]] = _json(_as_list(decision["refunded_all"]))
                for name in entry.get("windows_closed", []):
                    self.windows.pop(name, None)
                    self.closed_windows.add(name)
            case "member.set_credit_limit":
                if body["limit"] is None:
                    self.limits.pop(body["user_id"], None)
                else:
                    self.limits[body["user_id"]] = str(int(body["limit"]))
            case _:
                self.inconsistencies.append(f"sequence {entry['sequence']}: unknown {kind}")

    # ---- helpers -------------------------------------------------------------------

    def _kept_for_period(self, at: int) -> tuple[int, int]:
        """charge.lua's finish(): the history's trim floor and the expiry of a decision
        taken at ``at`` under the license as it stands."""
        floor, expires = at - self.ttl_ms, at + self.ttl_ms
        if self.license is not None:
            starts, ends = int(self.license["starts_ms"]), int(self.license["ends_ms"])
            expires = max(expires, ends + self.ttl_ms)
            floor = min(floor, starts)
        return floor, expires

    def expiry(self, record: StoredRecord) -> int:
        """When a stored record's PEXPIRE ends it, by the decision clock."""
        return record.expires_ms or record.decided_ms + self.ttl_ms

    def _remember(self, records: dict[str, StoredRecord], key: str, record: StoredRecord) -> None:
        # HSET …; PEXPIRE: a later decision under the same id replaces the record
        if self.expiry(record) > self.now_ms:
            records[key] = record
        else:
            records.pop(key, None)

    def _count(self, usage_field: str, amount: int) -> None:
        # as charge.lua's count_usage: a period's users are listed in order of first use
        period, user = UsageFields.period_and_user(usage_field)
        marker, listed = UsageFields.user_marker(period, user), UsageFields.users(period)
        if marker not in self.usage:
            self.usage[marker] = 1
            users = self.usage.get(listed)
            self.usage[listed] = f"{users},{user}" if users is not None else user
        count = self.usage.get(usage_field, 0)
        assert isinstance(count, int)
        self.usage[usage_field] = count + amount

    @staticmethod
    def _add(hash_: dict[str, str], name: str, amount: int) -> None:
        hash_[name] = str(int(hash_.get(name, "0")) + amount)

    def _check_balance(self, entry: Mapping[str, Any]) -> None:
        expected = entry.get("balance_after")
        if expected is None or self.license is None:
            return
        if int(self.license["balance"]) != int(expected):
            self.inconsistencies.append(
                f"sequence {entry['sequence']}: balance {self.license['balance']} after "
                f"folding, the ledger says {expected}"
            )

    # ---- what will be written ------------------------------------------------------

    def key_count(self) -> int:
        """How many keys ``write_org`` writes for this state."""
        singles = [
            self.license,
            self.members,
            self.disallowed,
            self.grants,
            self.limits,
            self.usage,
            self.holds,
            self.hold_expiries,
            self.sequence,
        ]
        live_history = sum(1 for h in self.history.values() if self.history_ttl(h) > 0)
        return (
            sum(1 for s in singles if s)
            + len(self.requests)
            + len(self.commands)
            + len(self.settlements)
            + len(self.windows)
            + live_history
        )

    def history_ttl(self, history: History) -> int:
        """What is left of a history's expiry by the decision clock (0: none left)."""
        return history.expires_ms - self.now_ms if history.scores else 0


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _as_list(value: Any) -> list[Any]:
    # the scripts' cjson encodes an empty table as {}
    return list(value) if isinstance(value, list) else []

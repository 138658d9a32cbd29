"""Ledger entries too large for one message, split into numbered parts, and joined again.

A charge entry lists its decision item by item (``decision.outcomes``, ``decision.until``
and ``decision.opened``), the repeat ``windows`` it opened and the request's ``items``;
a refund's lists the items it names (``command.items``), those it refunded
(``decision.refunded``, ``decision.refunded_all``) and the windows it closed
(``decision.closed``, ``windows_closed``). For 10,000 items with 128-character ids
that is several megabytes, more than a Kafka message should be. ``split_entry`` cuts
such an entry into *parts* of one ledger sequence:

- every part has ``org_id``, ``sequence``, ``part`` (1-based), ``parts`` (how many) and
  ``recorded_at``, and a slice of at most ``items_per_part`` elements of each of those
  lists, under the same names (``decision.outcomes`` in part 3 is the third slice of
  the decision's outcomes);
- part 1 is the entry itself (every header field in its usual place: kind, ids,
  credits_delta, balance_after, period_id, the decision's other fields, ...) with
  the lists replaced by their first slices;
- parts 2 and on have ``kind`` ``"continued"`` and only the slices.

Entries whose lists all fit one part stay one message, exactly as before, without
``part`` or ``parts``. The split is deterministic: a replayed decision re-emits
identical parts.

``LedgerParts`` joins them back: feed it every ledger message of a topic, in any
order, copies included; it hands back each whole entry once all of its parts are in.
``rebuild`` reads the ledger through it, and anything else that reads the ledger
(self-healing, audits) should too::

    parts = LedgerParts()
    for value in ledger_values:
        entry = parts.add(orjson.loads(value))
        if entry is not None:
            ...  # a whole entry, equal to what split_entry was given
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

CONTINUED = "continued"  # the kind of parts 2 and on
# the lists sliced across parts: (the field holding them, or None for the entry, name)
SLICED: tuple[tuple[str | None, str], ...] = (
    ("decision", "outcomes"),
    ("decision", "until"),
    ("decision", "opened"),
    (None, "windows"),
    ("request", "items"),
    # a refund's: the items it names, those it refunded, and the windows it closed
    ("command", "items"),
    ("decision", "refunded"),
    ("decision", "refunded_all"),
    ("decision", "closed"),
    (None, "windows_closed"),
)
_HOLDERS = ("decision", "request", "command")
# 1,000 items a part: a part of a 10,000-item request with 128-character ids and
# companies is about 600 KB (``stream/limits.py`` computes the worst case)
ITEMS_PER_PART = 1000


def _lists(entry: Mapping[str, Any]) -> Iterator[tuple[str | None, str, list[Any]]]:
    for holder, name in SLICED:
        where = entry if holder is None else entry.get(holder)
        if isinstance(where, Mapping):
            found = where.get(name)
            if isinstance(found, list):  # an empty Lua table comes as {}: not sliced
                yield holder, name, found


def parts_needed(entry: Mapping[str, Any], items_per_part: int = ITEMS_PER_PART) -> int:
    longest = max((len(found) for _, _, found in _lists(entry)), default=0)
    return max(1, -(-longest // items_per_part))


def split_entry(
    entry: Mapping[str, Any], items_per_part: int = ITEMS_PER_PART
) -> list[dict[str, Any]]:
    """The entry as one message (itself) or as its parts, in part order."""
    parts = parts_needed(entry, items_per_part)
    if parts == 1:
        return [dict(entry)]
    out: list[dict[str, Any]] = []
    for number in range(1, parts + 1):
        start, stop = (number - 1) * items_per_part, number * items_per_part
        if number == 1:
            part: dict[str, Any] = {**entry, "part": 1, "parts": parts}
            for nested in _HOLDERS:
                if isinstance(entry.get(nested), Mapping):
                    part[nested] = dict(entry[nested])  # its lists are replaced below
        else:
            part = {
                "org_id": entry["org_id"],
                "sequence": entry["sequence"],
                "kind": CONTINUED,
                "part": number,
                "parts": parts,
                "recorded_at": entry["recorded_at"],
            }
        for holder, name, found in _lists(entry):
            where = part if holder is None else part.setdefault(holder, {})
            where[name] = found[start:stop]
        out.append(part)
    return out


def join_parts(parts: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The whole entry of a complete set of parts (by part number)."""
    first = parts[1]
    entry: dict[str, Any] = {k: v for k, v in first.items() if k not in ("part", "parts")}
    for nested in _HOLDERS:
        if isinstance(entry.get(nested), Mapping):
            entry[nested] = dict(entry[nested])
    for holder, name, _ in list(_lists(first)):
        joined: list[Any] = []
        for number in range(1, int(first["parts"]) + 1):
            part = parts[number]
            where = part if holder is None else part.get(holder, {})
            joined.extend(where.get(name, []))
        (entry if holder is None else entry[holder])[name] = joined
    return entry


def is_part(message: Mapping[str, Any]) -> bool:
    return "part" in message and "parts" in message


class LedgerParts:
    """Joins ledger parts arriving in any order, copies included.

    ``add`` takes every ledger message (a dict with ``org_id`` and ``sequence``): a
    whole entry comes straight back; a part is held until every part of its
    ``(org_id, sequence)`` is in, then the joined entry comes back, once. A part seen
    again after its entry was joined starts a new set, which is joined (and returned)
    again once complete: a re-emitted entry is then a copy, as unsplit ones are, for
    the reader to drop (``rebuild.LedgerSequencer`` does). ``incomplete`` lists the
    entries still missing parts (after reading a whole topic: parts lost or cut off).
    """

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, int], dict[int, Mapping[str, Any]]] = {}
        self._expected: dict[tuple[str, int], int] = {}

    def add(self, message: Mapping[str, Any]) -> dict[str, Any] | None:
        if not is_part(message):
            return dict(message)
        key = (str(message["org_id"]), int(message["sequence"]))
        number, parts = int(message["part"]), int(message["parts"])
        waiting = self._waiting.setdefault(key, {})
        self._expected[key] = parts
        waiting.setdefault(number, message)  # a copy of a part is the same part
        if len(waiting) < parts or any(n not in waiting for n in range(1, parts + 1)):
            return None
        del self._waiting[key], self._expected[key]
        return join_parts(waiting)

    @property
    def incomplete(self) -> dict[tuple[str, int], list[int]]:
        """(org_id, sequence) → the part numbers still missing."""
        return {
            key: [n for n in range(1, self._expected[key] + 1) if n not in waiting]
            for key, waiting in self._waiting.items()
        }

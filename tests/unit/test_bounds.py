"""What creditgate writes stays bounded: results, ledger parts, dead letters, and the
worst case per output topic under the limits ``topics/*.json`` state."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from creditgate.domain.charges import Action
from creditgate.domain.commands import Refund, license_command_adapter
from creditgate.domain.dead_letters import KEY_PREFIX_BYTES, VALUE_PREFIX_BYTES
from creditgate.domain.decisions import ChargeRecord, RequestView, bounded_items, charge_result
from creditgate.domain.intake import MAX_DETAIL_CHARS, MAX_MESSAGE_BYTES, read_charge_request
from creditgate.domain.ledger import ITEMS_PER_PART, LedgerParts, split_entry
from creditgate.domain.license_events import CommandRecord, CommandView, command_ledger_entry
from creditgate.domain.outgoing import dead_letter, ledger_messages
from creditgate.domain.published import ChargeApproved, DeadLetter
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate.stream.batches import within_bytes
from creditgate.stream.decider import Incoming
from creditgate.stream.limits import compare, limits_report, too_small
from creditgate.stream.publish import record_bytes
from creditgate.stream.topics import TopicRegistry
from creditgate.stream.worst_case import (
    worst_case_output_bytes,
    worst_case_refund,
    worst_case_request,
    worst_case_request_bytes,
)

REGISTRY = TopicRegistry.load()


def long_id(tag: str, n: int) -> str:
    head = f"{tag}{n}:"
    return head + "x" * (128 - len(head))


def big_view(n: int = 10_000) -> RequestView:
    items = [
        {"type": "contact", "id": long_id("c", i), "company_id": long_id("co", i)} for i in range(n)
    ]
    return RequestView(long_id("org", 0), long_id("r", 0), long_id("u", 0), Action.EXPORT, items)


def record(outcomes: list[str], **changes: Any) -> ChargeRecord:
    n = len(outcomes)
    data = {
        "request_id": long_id("r", 0),
        "fp": "0" * 32,
        "at": 1_800_000_000_000,
        "status": "approved",
        "credits": outcomes.count("charged"),
        "needed": outcomes.count("charged"),
        "balance": 5,
        "period": "p1",
        "outcomes": outcomes,
        "until": [1_800_000_000_000 + i for i in range(n)],
        "opened": [[i, 1_900_000_000_000 + i] for i in range(2 * n)],
        "notes": {},
        "saved": 0,
        "seq": 42,
        **changes,
    }
    return ChargeRecord.from_script(data)


# ---- results ---------------------------------------------------------------------------


def test_a_result_within_the_bound_lists_every_item() -> None:
    view = big_view(1000)
    result = charge_result(view, record(["charged"] * 1000), 30, 1000)

    assert len(result["items"]) == 1000
    assert result["items_truncated"] is False
    assert result["counts"] == {"charged": 1000}
    ChargeApproved.model_validate_json(orjson.dumps(result))


def test_beyond_the_bound_a_result_lists_only_the_items_not_charged() -> None:
    outcomes = ["charged"] * 9000 + ["free_repeat"] * 999 + ["duplicate_in_request"]
    result = charge_result(big_view(), record(outcomes), 30, 1000)

    assert result["counts"] == {"charged": 9000, "free_repeat": 999, "duplicate_in_request": 1}
    assert result["items_truncated"] is True
    assert len(result["items"]) == 1000
    assert all(i["outcome"] != "charged" for i in result["items"])
    assert [i["id"] for i in result["items"]] == [long_id("c", i) for i in range(9000, 10_000)]
    ChargeApproved.model_validate_json(orjson.dumps(result))


def test_beyond_the_bound_with_too_many_not_charged_a_result_lists_none() -> None:
    outcomes = ["charged"] * 8000 + ["free_repeat"] * 2000
    result = charge_result(big_view(), record(outcomes), 30, 1000)

    assert result["items"] == []
    assert result["items_truncated"] is True
    assert result["counts"] == {"charged": 8000, "free_repeat": 2000}
    ChargeApproved.model_validate_json(orjson.dumps(result))


def test_bounded_items_keeps_small_lists_whole() -> None:
    items = [{"outcome": "charged"}, {"outcome": "free_repeat"}]
    assert bounded_items(items, 2) == (items, False)
    assert bounded_items(items, 1) == ([{"outcome": "free_repeat"}], True)
    assert bounded_items(items * 2, 1) == ([], True)


def test_a_result_not_truncated_must_list_what_it_counts() -> None:
    result = charge_result(big_view(3), record(["charged"] * 3), 30, 1000)
    with pytest.raises(ValueError, match="lists every item"):
        ChargeApproved.model_validate_json(orjson.dumps({**result, "items": []}))


# ---- ledger parts ----------------------------------------------------------------------


def big_entry() -> dict[str, Any]:
    from creditgate.domain.decisions import charge_ledger_entry

    view = big_view()
    view.reference = {"export_id": "e-1"}
    outcomes = ["charged"] * 9000 + ["free_repeat"] * 1000
    names = [f"contact:{long_id('w', i)}" for i in range(20_000)]
    return charge_ledger_entry(view, record(outcomes), names)


def test_a_large_entry_splits_into_parts_well_under_the_ledger_limit() -> None:
    entry = big_entry()
    messages = ledger_messages("credits.ledger", entry)
    parts = [orjson.loads(m.value) for m in messages]

    assert len(parts) == 20  # 20,000 windows, 1,000 a part
    assert [p["part"] for p in parts] == list(range(1, 21))
    assert {p["parts"] for p in parts} == {20}
    assert parts[0]["kind"] == "charged"
    assert parts[0]["credits_delta"] == -9000
    assert {p["kind"] for p in parts[1:]} == {"continued"}
    limit = REGISTRY.specs[t.LEDGER].max_message_bytes
    assert limit is not None
    assert max(record_bytes(m) for m in messages) < limit // 2
    ce_ids = [dict(m.headers)["ce_id"] for m in messages]
    assert len(set(ce_ids)) == 20
    assert ce_ids[2] == f"{entry['org_id']}/ledger/42/3".encode()


def test_parts_join_to_the_entry_in_any_order_with_copies() -> None:
    entry = big_entry()
    parts = split_entry(entry, ITEMS_PER_PART)
    shuffled = parts + parts[3:9]  # copies
    random.Random(7).shuffle(shuffled)
    joiner = LedgerParts()

    joined = [found for p in shuffled if (found := joiner.add(p)) is not None]

    assert len(joined) == 1
    assert joined[0] == entry
    assert orjson.dumps(joined[0]) == orjson.dumps(entry)  # the same keys in the same order
    assert joiner.incomplete == {}


def test_an_incomplete_entry_is_not_joined() -> None:
    parts = split_entry(big_entry())
    joiner = LedgerParts()
    assert all(joiner.add(p) is None for p in parts[:-1])
    assert joiner.incomplete == {(parts[0]["org_id"], 42): [20]}


def test_the_split_is_deterministic_and_small_entries_stay_whole() -> None:
    entry = big_entry()
    first = [m.value for m in ledger_messages("credits.ledger", entry)]
    again = [m.value for m in ledger_messages("credits.ledger", orjson.loads(orjson.dumps(entry)))]
    assert first == again

    small = {"org_id": "acme", "sequence": 3, "kind": "charged", "recorded_at": "x"}
    small |= {"windows": [], "decision": {"outcomes": ["charged"]}, "request": {"items": [{}]}}
    (only,) = ledger_messages("credits.ledger", small)
    assert only.value == orjson.dumps(small)
    assert dict(only.headers)["ce_id"] == b"acme/ledger/3"
    assert LedgerParts().add(small) == small


def test_a_refund_of_ten_thousand_items_splits_and_joins_again() -> None:
    n = 10_000
    body = worst_case_refund(Settings())
    windows = tuple(f"company:{long_id('w', i)}" for i in range(2 * n))
    decision = {
        "command_id": body["command_id"],
        "fp": "0" * 32,
        "at": 1_800_000_000_000,
        "status": "applied",
        "seq": 42,
        "delta": n,
        "balance": 5,
        "refunded": list(range(1, n + 1)),
        "refunded_all": list(range(1, n + 1)),
        "closed": list(range(2 * n)),
        "request": {"user_id": "u", "action": "export", "period": "p1"},
    }
    view = CommandView(body["org_id"], body["command_id"], body["type"], body, windows=windows)
    entry = command_ledger_entry(view, CommandRecord.from_script(decision))
    assert len(entry["windows_closed"]) == 2 * n

    messages = ledger_messages("credits.ledger", entry)

    limit = REGISTRY.specs[t.LEDGER].max_message_bytes
    assert limit is not None
    assert len(messages) == 20  # 20,000 windows closed, 1,000 a part
    assert max(record_bytes(m) for m in messages) < limit // 2
    first = orjson.loads(messages[0].value)
    assert first["kind"] == "refunded"
    assert len(first["command"]["items"]) == ITEMS_PER_PART
    assert len(first["windows_closed"]) == ITEMS_PER_PART
    joiner = LedgerParts()
    joined = [found for m in messages if (found := joiner.add(orjson.loads(m.value)))]
    assert joined == [entry]


def test_the_largest_valid_refund_fits_the_commands_topic() -> None:
    body = worst_case_refund(Settings())
    size = len(orjson.dumps(body))
    assert size > 1_500_000  # 10,000 companies with 128-character ids
    refund = license_command_adapter.validate_python(body)
    assert isinstance(refund, Refund)
    limit = REGISTRY.specs[t.LICENSE_COMMANDS].max_message_bytes
    assert limit is not None
    assert size + 1024 < limit  # with the record's own bytes
    assert size < MAX_MESSAGE_BYTES  # and intake reads it


# ---- dead letters -----------------------------------------------------------------------


@pytest.mark.parametrize("byte", [b"\x00", b"\xff", b"a"])
def test_a_dead_letter_is_bounded_whatever_the_input(byte: bytes) -> None:
    value, key = byte * MAX_MESSAGE_BYTES, byte * MAX_MESSAGE_BYTES
    message = dead_letter(
        "credits.deadletter", Incoming("in", 1, 2, key, value), "bad", "2026-11-26T10:00:00.000Z"
    )
    body = orjson.loads(message.value)

    limit = REGISTRY.specs[t.DEADLETTER].max_message_bytes
    assert limit is not None
    assert record_bytes(message) < limit
    assert len(message.key) <= KEY_PREFIX_BYTES
    assert body["value_bytes"] == MAX_MESSAGE_BYTES
    assert body["key_bytes"] == MAX_MESSAGE_BYTES
    assert body["value_truncated"] is True
    assert body["key_truncated"] is True
    assert body["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert body["key_sha256"] == hashlib.sha256(key).hexdigest()
    if byte == b"\xff":
        assert body["value"] is None
        assert bytes.fromhex(body["value_hex"]) == value[: VALUE_PREFIX_BYTES // 2]
    else:
        assert body["value_hex"] is None
        assert body["value"].encode() == value[:VALUE_PREFIX_BYTES]
    DeadLetter.model_validate_json(message.value)


def test_a_small_dead_letter_keeps_the_whole_input() -> None:
    message = dead_letter(
        "dl", Incoming("in", 0, 7, b"acme", b"not JSON"), "bad", "2026-11-26T10:00:00.000Z"
    )
    body = orjson.loads(message.value)
    assert body["value"] == "not JSON"
    assert body["value_truncated"] is False
    assert body["key"] == "acme"
    assert message.key == b"acme"


def test_a_rejection_detail_is_bounded() -> None:
    body = worst_case_request(Settings(max_items=2))
    body["items"][0]["x" * 100_000] = 1  # an unknown field with a long name
    read = read_charge_request(orjson.dumps(body), Action.EXPORT, 10)
    assert len(getattr(read, "detail")) <= MAX_DETAIL_CHARS  # noqa: B009


# ---- the worst case per topic ------------------------------------------------------------


def test_the_largest_valid_request_fits_the_request_topics() -> None:
    size = worst_case_request_bytes(Settings())
    assert size > 2_500_000  # 10,000 contacts with companies, 128-character ids
    read = read_charge_request(orjson.dumps(worst_case_request(Settings())), Action.EXPORT, 10_000)
    assert not hasattr(read, "detail"), read
    assert not hasattr(read, "error"), read
    for logical in t.REQUEST_ACTIONS:
        limit = REGISTRY.specs[logical].max_message_bytes
        assert limit is not None
        assert size + 1024 < limit  # with the record's own bytes


def test_every_topic_states_its_limit() -> None:
    assert all(spec.max_message_bytes for spec in REGISTRY.specs.values())


def test_the_worst_case_of_every_output_fits_its_topic() -> None:
    worst = worst_case_output_bytes(Settings(), REGISTRY)
    limits = {spec.name: spec.max_message_bytes or 0 for spec in REGISTRY.specs.values()}
    found = compare(Settings(), REGISTRY, limits)
    print("\n".join(limits_report(found)))

    assert set(worst) == set(t.OUTPUTS)
    assert too_small(found) == []
    # the worst cases are real: a result lists 1,000 items, a ledger part 1,000 of each list
    assert worst[t.CHARGE_RESULTS] > 300_000
    assert worst[t.LEDGER] > 400_000


def test_the_worst_case_follows_the_settings() -> None:
    limits = {spec.name: spec.max_message_bytes or 0 for spec in REGISTRY.specs.values()}
    found = compare(Settings(result_items_max=10_000), REGISTRY, limits)
    (problem,) = too_small(found)
    assert "credits.charge.results" in problem
    assert "1048576" in problem


# ---- batches bounded by bytes ------------------------------------------------------------


@dataclass
class Record:
    offset: int
    value: bytes


def test_a_batch_takes_records_up_to_its_bytes_and_keeps_the_rest_in_order() -> None:
    a, b = TopicPartition("in", 0), TopicPartition("in", 1)
    fetched = {
        a: [Record(0, b"x" * 40), Record(1, b"x" * 40), Record(2, b"x" * 40)],
        b: [Record(0, b"x" * 10)],
    }
    taken, rest = within_bytes(fetched, 100)
    assert {tp: [r.offset for r in rs] for tp, rs in taken.items()} == {a: [0, 1]}
    assert {tp: [r.offset for r in rs] for tp, rs in rest.items()} == {a: [2], b: [0]}

    # a single record larger than the bound is a batch of its own...
    taken, rest = within_bytes({a: [Record(0, b"x" * 500), Record(1, b"y")]}, 100)
    assert [r.offset for r in taken[a]] == [0]
    assert [r.offset for r in rest[a]] == [1]
    # ...unless other records wait already: then it starts the next batch
    taken, rest = within_bytes({a: [Record(0, b"x" * 500)]}, 100, first=False)
    assert taken == {}
    assert [r.offset for r in rest[a]] == [0]
    # everything fits: nothing is left
    assert within_bytes(fetched, 10_000) == (fetched, {})

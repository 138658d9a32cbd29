"""The one workload generator: both shapes follow from the spec alone."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import orjson

from creditgate.domain.charges import ChargeRequest
from creditgate.domain.commands import license_command_adapter
from creditgate.domain.intake import read_charge_request
from creditgate.settings import Settings
from creditgate.stream import topics as t
from creditgate_harness.workload import Workload, WorkloadSpec

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_the_bench_shape_is_the_same_bytes_for_the_same_seed() -> None:
    spec = WorkloadSpec.bench("r1", seed=5, orgs=20)
    first, second = Workload(spec), Workload(spec)

    assert [s.value for s in first.setup(NOW)] == [s.value for s in second.setup(NOW)]
    assert [r.value for r in first.requests(2000)] == [r.value for r in second.requests(2000)]
    other = Workload(WorkloadSpec.bench("r1", seed=6, orgs=20))
    assert [r.value for r in other.requests(2000)] != [r.value for r in second.requests(2000)]


def test_the_bench_shape_continues_its_stream_across_calls() -> None:
    workload = Workload(WorkloadSpec.bench("r1", seed=5, orgs=20))
    whole = [r.value for r in Workload(workload.spec).requests(300)]

    assert [r.value for r in workload.requests(100)] == whole[:100]
    assert [r.value for r in workload.requests(200)] == whole[100:]


def test_every_message_of_either_shape_is_one_creditgate_accepts() -> None:
    max_items = Settings().max_items
    for spec in (
        WorkloadSpec.bench("r1", seed=5, orgs=20, big_export_share=0.2),
        WorkloadSpec(run="r2", requests=1500, orgs=10, seed=3),
    ):
        workload = Workload(spec)
        for send in workload.setup(NOW):
            assert send.topic == t.LICENSE_COMMANDS
            license_command_adapter.validate_python(orjson.loads(send.value))
        for send in workload.requests(1500):
            assert send.key == send.org.encode()
            if send.kind == "command":  # the fault shape's grants and new periods
                license_command_adapter.validate_python(orjson.loads(send.value))
                continue
            body = orjson.loads(send.value)
            action = t.REQUEST_ACTIONS[send.topic]
            assert action.value == body["action"]
            assert send.ident == body["request_id"]
            read = read_charge_request(send.value, action, max_items)
            assert isinstance(read, ChargeRequest), read


def test_the_fault_shape_sends_some_ids_twice_some_with_another_body() -> None:
    spec = WorkloadSpec(run="r3", requests=4000, orgs=20, seed=9, duplicate_fraction=0.1)
    sends = list(Workload(spec).stream())
    requests = [s for s in sends if s.kind == "request"]
    bodies: dict[str, set[str]] = {}
    for send in requests:
        bodies.setdefault(send.ident, set()).add(send.items_sig)

    assert len(bodies) == spec.requests
    twice = Counter(s.ident for s in requests)
    assert 300 < sum(1 for n in twice.values() if n == 2) < 500
    assert 50 < sum(1 for sigs in bodies.values() if len(sigs) == 2) < 200
    assert {s.topic for s in sends if s.kind == "command"} == {t.LICENSE_COMMANDS}

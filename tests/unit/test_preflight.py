"""The lifetime rules of creditgate.preflight on figures a test broker cannot be given.

The broker-facing checks run against a real broker in tests/integration/test_preflight.py;
a broker's own defaults (``log.retention.*``, ``log.roll.*``) are fixed when it starts, so
how they are read is checked here.
"""

from __future__ import annotations

from creditgate.preflight import (
    FOREVER,
    TopicLifetime,
    _broker_retention_ms,
    _broker_segment_ms,
    lifetime_problems,
)
from creditgate.settings import Settings

DAY_MS = 86_400_000


def test_the_broker_defaults_are_read_as_kafka_reads_them() -> None:
    assert _broker_retention_ms({"log.retention.ms": None, "log.retention.hours": "168"}) == (
        7 * DAY_MS
    )
    assert _broker_retention_ms({"log.retention.minutes": "60", "log.retention.hours": "1"}) == (
        3_600_000
    )
    assert _broker_retention_ms({"log.retention.ms": "-1", "log.retention.hours": "168"}) == (
        FOREVER
    )
    assert _broker_retention_ms({}) == 7 * DAY_MS  # Kafka's own default
    assert _broker_segment_ms({"log.roll.ms": None, "log.roll.hours": "24"}) == DAY_MS


def test_a_lifetime_exactly_as_long_as_the_records_passes() -> None:
    settings = Settings(idempotency_ttl_days=31)
    exact = TopicLifetime("t", 30 * DAY_MS, DAY_MS)
    longer = TopicLifetime("t", 30 * DAY_MS, DAY_MS + 1)

    assert lifetime_problems(settings, [exact], 7 * DAY_MS) == []
    assert len(lifetime_problems(settings, [longer], 7 * DAY_MS)) == 1
    assert len(lifetime_problems(settings, [exact], 31 * DAY_MS + 60_000)) == 1


def test_a_broker_that_keeps_for_ever_is_refused_like_a_topic_that_does() -> None:
    settings = Settings(idempotency_ttl_days=36_500)
    forever = TopicLifetime("t", _broker_retention_ms({"log.retention.ms": "-1"}), DAY_MS)

    (problem,) = lifetime_problems(settings, [forever], 7 * DAY_MS)

    assert "keeps its messages for ever (retention.ms=-1)" in problem

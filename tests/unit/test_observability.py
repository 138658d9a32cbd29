"""Metrics and JSON logs, as an operator reads them."""

from __future__ import annotations

import json
import logging
import platform
import sys
from importlib.metadata import version

from prometheus_client.parser import text_string_to_metric_families

from creditgate.observability import JsonFormatter, Metrics


def test_decision_log_lines_are_json_with_request_and_org_ids() -> None:
    record = logging.LogRecord(
        "creditgate.decisions", logging.INFO, __file__, 1, "decided %s", ("r-1",), None
    )
    record.request_id = "r-1"
    record.org_id = "acme"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "decided r-1"
    assert line["request_id"] == "r-1"
    assert line["org_id"] == "acme"
    assert line["level"] == "info"
    assert line["ts"].endswith("Z")


def test_metrics_render_counters_histograms_and_lag() -> None:
    metrics = Metrics()
    metrics.decisions.labels("export", "approved", "").inc(3)
    metrics.credits.labels("export").inc(5)
    metrics.batch_size.labels("charges").observe(40)
    metrics.watch_lag(lambda: {("credits.export.requests", 2): 7})
    text = metrics.render().decode()
    assert 'creditgate_decisions_total{action="export",outcome="approved",reason=""} 3.0' in text
    assert 'creditgate_credits_charged_total{action="export"} 5.0' in text
    assert 'creditgate_batch_size_count{agent="charges"} 1.0' in text
    assert 'creditgate_consumer_lag{partition="2",topic="credits.export.requests"} 7.0' in text


def test_each_metrics_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.dead_letters.labels("t").inc()
    assert 'creditgate_dead_letters_total{topic="t"} 1.0' in first.render().decode()
    assert 'creditgate_dead_letters_total{topic="t"}' not in second.render().decode()


def test_metrics_carry_the_process_gc_platform_and_build_info() -> None:
    text = Metrics().render().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}

    (build,) = families["creditgate_build_info"].samples
    assert build.labels == {"version": version("creditgate"), "python": platform.python_version()}
    assert build.value == 1
    assert "python_gc_collections" in families
    (info,) = families["python_info"].samples
    assert info.labels["implementation"] == platform.python_implementation()
    if sys.platform == "linux":  # the process collector reads /proc
        assert families["process_resident_memory_bytes"].samples[0].value > 0
        assert "process_cpu_seconds" in families
        assert "process_open_fds" in families

"""The report's plot and the summary printed at the end of a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a build machine
import matplotlib.pyplot as plt

ORDER = ("passthrough", "faust", "creditgate", "naive")


def _order(variants: dict[str, Any]) -> list[str]:
    """The baselines and the worker, then any scale-out runs (``creditgate_x2``, …)."""
    scaled = sorted((n for n in variants if n.startswith("creditgate_x")), key=len)
    return [n for n in ORDER if n in variants] + scaled


def _label(name: str) -> str:
    if name.startswith("creditgate_x"):
        return f"creditgate\n{name.removeprefix('creditgate_x')} workers"
    return LABELS[name]


LABELS = {
    "passthrough": "aiokafka\npassthrough",
    "faust": "faust\npassthrough",
    "creditgate": "creditgate\nworker",
    "naive": "naive\npipeline",
}


def plot(report: dict[str, Any], path: Path) -> Path:
    variants = report["variants"]
    names = _order(variants)
    # the throughput panel is wider: five bars, each with a two-line label
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    ax = axes[0]
    rates = [variants[n]["per_s"] for n in names]
    colours = {"passthrough": "#999", "faust": "#bbb", "creditgate": "#2a7", "naive": "#c66"}
    # a variant measured in rounds: its median, with a line from the slowest to the fastest
    spans = [
        [r["per_s"] for r in variants[n].get("rounds", [])] or [rate]
        for n, rate in zip(names, rates, strict=True)
    ]
    spread = [
        [rate - min(span) for rate, span in zip(rates, spans, strict=True)],
        [max(span) - rate for rate, span in zip(rates, spans, strict=True)],
    ]
    bars = ax.bar(
        [_label(n) for n in names],
        rates,
        yerr=spread,
        capsize=4,
        color=[colours.get(n, "#5b9") for n in names],
    )
    # CPU per message barely depends on how busy the machine was: it goes on each bar
    cpu = [variants[n].get("cpu_ms_per_1000") for n in names]
    top = max([*(max(span) for span in spans), 10_000])
    for bar, rate, span, ms in zip(bars, rates, spans, cpu, strict=True):
        # above the range line, which bar_label would write over
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            max(span) + top * 0.015,
            f"{rate:,.0f}/s" + ("" if ms is None else f"\n{ms:.0f} ms CPU/1k"),
            ha="center",
            va="bottom",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1, "alpha": 0.8},
        )
    if "passthrough" in variants:
        goal = variants["passthrough"]["per_s"] * 0.5
        ax.axhline(goal, ls="--", color="k", lw=1, label="goal: 0.5 x raw passthrough")
    ax.set_ylim(top=top * 1.2)  # room for the labels
    ax.set_title("throughput, 1-item requests (messages/s; median and range of rounds)")
    ax.legend(loc="upper right")

    _latency_panel(axes[1], report)

    ax = axes[2]
    samples = report.get("rss_samples") or []
    if samples:
        ax.plot(
            [s["decided"] / 1000 for s in samples], [s["kib"] / 1024 for s in samples], color="#2a7"
        )
        ax.set_xlabel("decisions published (thousands)")
        ax.set_ylabel("worker VmRSS (MiB)")
        ax.set_ylim(bottom=0)
        growth = report.get("soak", {}).get("rss_growth_pct")
        ax.set_title(
            "worker memory"
            + (f" (growth after warm-up {growth:+.1f} %)" if growth is not None else "")
        )
    else:
        ax.set_axis_off()
    fig.suptitle(f"creditgate bench {report['started_at']} — {report['command']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_panel(ax: Any, report: dict[str, Any]) -> None:
    """Open-loop latency at each measured rate, and the goals from the passthrough's."""
    points = [p for p in [report.get("latency"), *report.get("latency_more", [])] if p]
    if points:
        points.sort(key=lambda p: p["rate_per_s"])
        keys = ("p50", "p99")
        for offset, (key, colour) in enumerate(zip(keys, ("#2a7", "#c93"), strict=True)):
            values = [p["received_ms"][key] or 0 for p in points]
            xs = [i + offset * 0.4 for i in range(len(points))]
            bars = ax.bar(xs, values, width=0.4, color=colour, label=key)
            ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values], fontsize=8)
        ax.set_xticks(
            [i + 0.2 for i in range(len(points))], [f"{p['rate_per_s']:,.0f}/s" for p in points]
        )
        ax.set_yscale("log")
        raw = report.get("passthrough_latency", {}).get("received_ms", {})
        if raw.get("p50"):
            ax.axhline(2 * raw["p50"], ls=":", color="k", lw=1, label="p50 goal: 2 x passthrough's")
        if raw.get("p99"):
            ax.axhline(
                2 * raw["p99"], ls="--", color="k", lw=1, label="p99 goal: 2 x passthrough's"
            )
        ax.set_title("latency, open loop: produce → decision read (ms)")
        ax.set_xlabel("request rate (the highest is half the measured maximum)")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.set_axis_off()


def _rewrites(run: dict[str, Any]) -> str:
    count = run.get("redis_aof_rewrites")
    return "" if count is None else f" ({count} Redis AOF rewrites meanwhile)"


def print_summary(report: dict[str, Any]) -> None:
    summary = report["summary"]
    print("\n== results ==")
    for name in _order(report["variants"]):
        v = report["variants"][name]
        busy = v.get("machine_cpu_busy_pct")
        rounds = v.get("rounds")
        measured = (
            f"median of {len(rounds)} rounds: " + ", ".join(f"{r['per_s']:,.0f}" for r in rounds)
            if rounds
            else f"{v['records']:,} in {v['seconds']:.1f}s"
        )
        print(
            f"  {name:<14} {v['per_s']:>10,.0f}/s  ({measured}"
            f"; {v['cpu_ms_per_1000']} ms CPU per 1k"
            + (f"; machine {busy:.0f} % busy)" if busy is not None else ")")
        )
    for key in ("creditgate/passthrough", "creditgate/faust_passthrough", "creditgate/naive"):
        if key in summary:
            print(f"  {key:<30} {summary[key]}")
    latency = report.get("latency")
    if latency:
        r = latency["received_ms"]
        print(
            f"  latency at {latency['rate_per_s']:,.0f}/s: p50 {r['p50']} ms, p99 {r['p99']} ms,"
            f" p99.9 {r['p999']} ms{_rewrites(latency)}"
        )
    raw = report.get("passthrough_latency")
    if raw:
        r = raw["received_ms"]
        print(
            f"  raw passthrough at {raw['rate_per_s']:,.0f}/s: p50 {r['p50']} ms, p99 {r['p99']} ms"
            f" → creditgate ÷ passthrough: p50 {summary.get('p50_vs_passthrough')}x, "
            f"p99 {summary.get('p99_vs_passthrough')}x"
        )
    for more in report.get("latency_more", []):
        r = more["received_ms"]
        print(
            f"  latency at {more['rate_per_s']:,.0f}/s: p50 {r['p50']} ms, p99 {r['p99']} ms"
            + _rewrites(more)
        )
    soak = report.get("soak")
    if soak:
        print(
            f"  soak {soak['requests']:,}: {soak['per_s']:,.0f}/s, RSS "
            f"{soak['rss_kib_after_warmup']} → {soak['rss_kib_end']} KiB "
            f"({soak['rss_growth_pct']:+} %)"
        )
    memory = report.get("redis_memory")
    if memory:
        print(
            f"  Redis: {memory['bytes_per_window_info_delta']} B per open window (INFO delta), "
            f"{memory['memory_usage_per_window_key']} B per window key (MEMORY USAGE)"
        )
    print("  goals:")
    for name, goal in summary["goals"].items():
        mark = {True: "met", False: "MISSED", None: "n/a"}[goal["met"]]
        print(f"    {name:<16} {goal['value']!s:>10}  goal {goal['goal']:<8} {mark}")


def main(argv: list[str]) -> None:
    """``python -m bench.report results/X.json``: draw X.png and print X's summary again."""
    path = Path(argv[0])
    data = json.loads(path.read_text())
    plot(data, path.with_suffix(".png"))
    print_summary(data)


if __name__ == "__main__":
    main(sys.argv[1:])

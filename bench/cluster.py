"""``python -m bench.run --cluster``: the cost of a decision on the cluster stack against
the single-node stack, in one run, with 1, 2 and 3 workers on each.

For each stack in turn (single: one broker and one Redis; cluster: three brokers and a
Redis Cluster of three primaries with a replica each), on the same machine:

1. the same pre-produced one-item requests (``--requests``);
2. the raw aiokafka passthrough once, the ratio's denominator on that stack;
3. creditgate with 1, 2, then 3 workers of a new consumer group each, on cleared keys.

Per measurement: decisions/s, and CPU per 1,000 decisions of the workers, of each Redis
node and of the brokers (their processes' CPU time over the measurement). On two cores
the totals cannot grow with more processes; what the capacity model needs is what each
decision costs each part, and whether that cost holds on the cluster.

Writes ``bench/results/<stamp>-cluster.json`` and ``.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import redis.asyncio as aioredis

from bench import kafkaio
from bench.run import REPO, RESULTS_DIR, Run, cpu_seconds, machine
from creditgate.devstack import ClusterStack, DevStack
from creditgate.stream import topics as t

KINDS = ("single", "cluster")


@dataclass
class Servers:
    """The stack's server processes, by role: their pids, for CPU time."""

    redis: dict[str, int]  # node name -> pid
    brokers: dict[str, int]
    redis_ports: list[int]

    def cpu(self) -> dict[str, float]:
        found = {f"redis {n}": cpu_seconds(p) for n, p in self.redis.items()}
        found |= {f"broker {n}": cpu_seconds(p) for n, p in self.brokers.items()}
        return {name: value or 0.0 for name, value in found.items()}


@contextlib.contextmanager
def started(kind: str, root: Path) -> Iterator[tuple[str, str, Servers]]:
    if kind == "single":
        single = DevStack(root, redis_appendfsync="everysec", kafka_heap="1g")
        found = single.up()
        try:
            status = single.status()
            if not (status.redis_pid and status.kafka_pid):
                raise RuntimeError(f"the single-node stack is not running:\n{status}")
            servers = Servers(
                {"redis": status.redis_pid},
                {"kafka": status.kafka_pid},
                [int(found.redis_url.rsplit(":", 1)[1].split("/")[0])],
            )
            yield found.kafka_bootstrap, found.redis_url, servers
        finally:
            single.down()
        return
    cluster = ClusterStack(root)
    env = cluster.up()
    try:
        nodes = cluster.status().nodes
        servers = Servers(
            {n.name: n.pid for n in nodes if n.name.startswith("redis") and n.pid},
            {n.name: n.pid for n in nodes if n.name.startswith("kafka") and n.pid},
            list(cluster.ports().redis),
        )
        yield env["CREDITGATE_KAFKA_BOOTSTRAP"], env["CREDITGATE_REDIS_URL"], servers
    finally:
        cluster.down()


class StackRun(Run):
    """``bench.run.Run`` on either stack: keys are cleared node by node, as a cluster
    refuses a multi-key UNLINK across slots."""

    servers: Servers

    async def clear_redis(self) -> None:
        for port in self.servers.redis_ports:
            node = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
            try:
                role = await node.execute_command("ROLE")  # type: ignore[no-untyped-call]
                if role[0] != "master":
                    continue
                async for key in node.scan_iter(match=f"b{self.run_id}*", count=5000):
                    await node.unlink(key)
            finally:
                await node.aclose()

    async def memory(self, key_prefix: str) -> dict[str, Any]:
        """MEMORY USAGE of what the keys of ``key_prefix`` hold, by kind: per open
        window, per stored decision, and per organisation for the rest (license,
        members, usage, histories, sequence), sampled node by node."""
        sizes: dict[str, list[int]] = {"win": [], "req": [], "org": []}
        orgs: set[str] = set()
        for port in self.servers.redis_ports:
            node = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
            try:
                role = await node.execute_command("ROLE")  # type: ignore[no-untyped-call]
                if role[0] != "master":
                    continue
                async for key in node.scan_iter(match=f"{key_prefix}:*", count=5000):
                    kind = key.split(":")[2] if key.count(":") >= 2 else "org"
                    bucket = kind if kind in ("win", "req") else "org"
                    orgs.add(key.split(":")[1])
                    if bucket != "org" and len(sizes[bucket]) >= 5000:
                        continue
                    sizes[bucket].append(int(await node.memory_usage(key) or 0))
            finally:
                await node.aclose()
        return {
            "bytes_per_open_window": round(sum(sizes["win"]) / max(len(sizes["win"]), 1), 1),
            "bytes_per_stored_decision": round(sum(sizes["req"]) / max(len(sizes["req"]), 1), 1),
            "bytes_per_organisation_besides": round(sum(sizes["org"]) / max(len(orgs), 1), 1),
            "organisations": len(orgs),
            "sampled": {k: len(v) for k, v in sizes.items()},
        }

    async def measured(self, watcher: kafkaio.Watcher, workers: int) -> dict[str, Any]:
        before = self.servers.cpu()
        found = await self.fresh_workers(
            watcher, f"creditgate_x{workers}", f"b{self.run_id}x{workers}", workers
        )
        after = self.servers.cpu()
        decisions = max(found["records"], 1)
        found["workers"] = workers
        found["server_cpu_ms_per_1000"] = {
            name: round(1_000_000 * (after[name] - before[name]) / decisions, 1) for name in after
        }
        return found


async def measure_stack(args: argparse.Namespace, kind: str, run: StackRun) -> dict[str, Any]:
    await run.set_up()
    names = {logical: run.registry.name(logical) for logical in t.REQUEST_ACTIONS}
    print(f"[{kind}] producing {args.requests:,} one-item requests …", flush=True)
    await kafkaio.produce(
        run.bootstrap, names, run.workload.requests(args.requests), args.requests, "produce"
    )
    watcher = kafkaio.Watcher(run.bootstrap, run.partitions)
    await watcher.start()
    try:
        passthrough = await run.baseline(watcher, "passthrough", args.requests)
        workers = [await run.measured(watcher, n) for n in range(1, args.max_workers + 1)]
        memory = await run.memory(f"b{run.run_id}x{args.max_workers}")
    finally:
        await watcher.stop()
        await run.redis.aclose()
    return {"passthrough": passthrough, "creditgate": workers, "redis_memory": memory}


def summarise(stacks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind, found in stacks.items():
        passthrough = found["passthrough"]["per_s"]
        for m in found["creditgate"]:
            servers = m["server_cpu_ms_per_1000"]
            rows.append(
                {
                    "stack": kind,
                    "workers": m["workers"],
                    "decisions_per_s": m["per_s"],
                    "vs_passthrough": round(m["per_s"] / passthrough, 3),
                    "worker_cpu_ms_per_1000": m["cpu_ms_per_1000"],
                    "redis_cpu_ms_per_1000": round(
                        sum(v for k, v in servers.items() if k.startswith("redis")), 1
                    ),
                    "broker_cpu_ms_per_1000": round(
                        sum(v for k, v in servers.items() if k.startswith("broker")), 1
                    ),
                    "redis_busiest_node_cpu_ms_per_1000": max(
                        (v for k, v in servers.items() if k.startswith("redis")), default=0.0
                    ),
                }
            )
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    labels = [f"{r['stack']}\n{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in rows]
    colours = ["#2a7" if r["stack"] == "single" else "#37c" for r in rows]
    bars = axes[0].bar(labels, [r["decisions_per_s"] for r in rows], color=colours)
    axes[0].bar_label(
        bars, labels=[f"{r['decisions_per_s']:,.0f}/s\n{r['vs_passthrough']}x" for r in rows]
    )
    axes[0].set_title("decisions/s (and ÷ that stack's raw passthrough)")
    parts = ("worker_cpu_ms_per_1000", "redis_cpu_ms_per_1000", "broker_cpu_ms_per_1000")
    bottom = [0.0] * len(rows)
    for part, colour in zip(parts, ("#2a7", "#c66", "#999"), strict=True):
        values = [r[part] for r in rows]
        axes[1].bar(labels, values, bottom=bottom, color=colour, label=part.split("_")[0])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[1].set_title("CPU ms per 1,000 decisions, by process kind")
    axes[1].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: argparse.Namespace, argv: list[str]) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = stamp[2:].replace("T", "").replace("Z", "").lower()
    logs = Path(tempfile.mkdtemp(prefix=f"creditgate-bench-{run_id}-"))
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.run", *argv]),
        "started_at": stamp,
        "machine": machine(),
        "stacks": {},
    }
    for kind in KINDS:
        root = Path(tempfile.mkdtemp(prefix=f"creditgate-bench-{kind}-"))
        print(f"starting the {kind} stack in {root} …", flush=True)
        with started(kind, root) as (bootstrap, redis_url, servers):
            run = StackRun(args, bootstrap, redis_url, f"{run_id}{kind[0]}", logs, report={})
            run.servers = servers
            report["stacks"][kind] = asyncio.run(measure_stack(args, kind, run))
        shutil.rmtree(root, ignore_errors=True)
    report["table"] = summarise(report["stacks"])
    name = f"{stamp}-cluster"
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png_path = plot(report["table"], RESULTS_DIR / f"{name}.png", report["command"])
    print("\nstack    workers  decisions/s  ÷passthrough  CPU ms per 1k: worker  redis  brokers")
    for r in report["table"]:
        print(
            f"{r['stack']:<8} {r['workers']:>7}  {r['decisions_per_s']:>11,.0f}  "
            f"{r['vs_passthrough']:>12}  {r['worker_cpu_ms_per_1000']:>21}  "
            f"{r['redis_cpu_ms_per_1000']:>5}  {r['broker_cpu_ms_per_1000']:>7}"
        )
    print(f"\nreport: {json_path.relative_to(REPO)}\nplot:   {png_path.relative_to(REPO)}")

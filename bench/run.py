"""The benchmark: ``python -m bench.run`` — one command for every figure of issue 5.

In one run, on one stack, against the same pre-produced requests:

1. ``passthrough`` raw aiokafka consume → produce (no decision), ``faust`` the same
   inside faust, ``naive`` one script call and one awaited send per message, and
   ``creditgate``: the real ``creditgate worker`` process. Throughput is counted from
   the first to the last record on each variant's output topic (producer timestamps),
   and the consumer group's committed offsets must reach the end of the inputs.
2. Latency: open loop at half of creditgate's measured rate, from each request's
   scheduled produce time to its decision arriving on ``credits.charge.results``.
3. Soak: many more requests through the same worker, sampling its VmRSS; Redis memory
   per open repeat window.

It writes ``bench/results/<stamp>.json`` and ``.png`` and prints the ratios. See
``--help``; the README's "Performance" section shows the command of the committed run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from bench import kafkaio, profiling, report
from bench.variants import output_registry
from creditgate.devstack import find_free_port
from creditgate.domain.commands import license_command_adapter
from creditgate.settings import Settings
from creditgate.store.gateway import CreditStore
from creditgate.stream import topics as t
from creditgate.stream.limits import REQUEST_PRODUCER_MAX_BYTES
from creditgate.stream.publish import RECORD_BATCH_BYTES
from creditgate.stream.topics import TopicRegistry, apply_topics
from creditgate_harness.workload import Workload, WorkloadSpec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# ``creditgate worker`` as an operator starts it (quiet logs: its output is not measured)
WORKER_ARGV = [sys.executable, "-m", "creditgate", "worker", "--loglevel", "warning"]

# The goals are ratios measured in the same run: the same code decided 9,000/s one day
# and 3,900/s another on machines of the same kind, so an absolute rate or a millisecond
# figure describes one machine on one day (the report still gives them). The latency
# goals say creditgate may at most double what the transport alone costs at the same
# open-loop rate; the memory goal is the soak's own growth.
GOALS = {
    "vs_passthrough": 0.5,
    "vs_naive": 10.0,
    "p50_vs_passthrough": 2.0,
    "p99_vs_passthrough": 2.0,
    "rss_growth_pct": 10.0,
}


# ---- the stack -------------------------------------------------------------------


@contextlib.contextmanager
def stack(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """An explicit CREDITGATE_* stack, a kept one under --stack-root, or a throwaway one."""
    bootstrap = os.environ.get("CREDITGATE_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("CREDITGATE_REDIS_URL")
    if bootstrap and redis_url:
        print(f"reusing the configured stack: kafka {bootstrap}")
        yield bootstrap, redis_url
        return
    from creditgate.devstack import DevStack  # noqa: PLC0415

    root = Path(args.stack_root or tempfile.mkdtemp(prefix="creditgate-bench-stack-"))
    devstack = DevStack(root, redis_appendfsync="everysec", kafka_heap="1g")
    print(f"starting Kafka (KRaft) and Redis (appendfsync everysec) in {root} …", flush=True)
    endpoints = devstack.up()
    try:
        yield endpoints.kafka_bootstrap, endpoints.redis_url
    finally:
        if args.stack_root:
            print(f"stack kept running in {root} (stop: DevStack(root).down())")
        else:
            devstack.down()
            shutil.rmtree(root, ignore_errors=True)  # its logs and pid files: a throwaway


# ---- child processes -------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def cpu(self) -> float | None:
        return cpu_seconds(self.process.pid)


@dataclass
class Children:
    """Several workers of one consumer group, measured as one variant."""

    name: str
    members: list[Child]

    def alive(self) -> bool:
        return all(c.alive() for c in self.members)

    def stop(self) -> None:
        for c in self.members:
            c.stop()

    def tail(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{c.tail()}" for c in self.members)

    def cpu(self) -> float | None:
        return sum(cpu_seconds(c.process.pid) or 0.0 for c in self.members)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (``/proc/stat``)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def start_child(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Child:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return Child(name, process, log)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the command name: state is field 3, utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---- one benchmark run -----------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    bootstrap: str
    redis_url: str
    run_id: str
    logs: Path
    prefix: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    rss: list[dict[str, float]] = field(default_factory=list)
    progress: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prefix = f"bench{self.run_id}."
        self.registry = TopicRegistry.load(prefix=self.prefix)
        self.inputs = [self.registry.name(logical) for logical in t.REQUEST_ACTIONS]
        self.partitions = self.registry.specs[t.CHARGE_RESULTS].partitions
        self.workload = Workload(WorkloadSpec.bench(self.run_id, seed=self.args.seed))
        # the harness's own reads and writes (settings, memory, AOF rewrites, clearing);
        # it connects on first use and is closed at the end of ``run``
        self.redis = aioredis.Redis.from_url(self.redis_url, decode_responses=True)

    def env(self, key_prefix: str, group: str) -> dict[str, str]:
        return {
            **os.environ,
            "CREDITGATE_KAFKA_BOOTSTRAP": self.bootstrap,
            "CREDITGATE_REDIS_URL": self.redis_url,
            "CREDITGATE_TOPIC_PREFIX": self.prefix,
            "CREDITGATE_KEY_PREFIX": key_prefix,
            "CREDITGATE_APP_ID": group,
            "CREDITGATE_HTTP_PORT": str(find_free_port()),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]),
        }

    def settings(self, key_prefix: str) -> Settings:
        return Settings(
            kafka_bootstrap=self.bootstrap, redis_url=self.redis_url, key_prefix=key_prefix
        )

    # ---- set-up --------------------------------------------------------------------

    async def set_up(self) -> None:
        await apply_topics(self.bootstrap, self.registry)
        extra = [self.prefix + "passthrough.results", self.prefix + "faust.results"]
        naive = output_registry(self.prefix, self.prefix + "naive.")
        extra += [s.name for k, s in naive.specs.items() if k not in t.REQUEST_ACTIONS]
        await kafkaio.create_topics(self.bootstrap, extra, self.partitions)
        fsync = await self.redis.config_get("appendfsync")
        aof = await self.redis.config_get("appendonly")
        self.report["redis"] = {"appendonly": aof.get("appendonly"), **fsync}
        if fsync.get("appendfsync") != "everysec":
            print(f"warning: Redis runs with appendfsync {fsync}, not everysec")

    async def license_orgs(self, key_prefix: str) -> None:
        store = CreditStore.from_settings(self.settings(key_prefix))
        try:
            await license_commands_for(store, self.workload, int(time.time() * 1000))
        finally:
            await store.close()

    # ---- measuring a variant -------------------------------------------------------

    async def aof_rewrites(self) -> tuple[int, int]:
        """Redis's AOF rewrites so far: (finished, running). Each is a forked child that
        takes a core for a second or more: on this 2-core machine, beside the broker and
        the worker, the latency runs' worst stretches line up with them."""
        found = await self.redis.info("persistence")
        return int(found.get("aof_rewrites", 0)), int(found.get("aof_rewrite_in_progress", 0))

    async def clear_redis(self) -> None:
        """Delete the keys of the measurements before, then rewrite the AOF and wait for
        it: each creditgate measurement starts on the same Redis, holding nothing of this
        run, with no rewrite due. Left as they were, later rounds ran beside the data of
        the earlier ones, and the rounds' AOF rewrites (each a forked child taking a core
        for seconds) came out anywhere from none to two per round."""
        redis = self.redis
        async for keys in _batches(redis.scan_iter(match=f"b{self.run_id}*", count=5000)):
            await redis.unlink(*keys)
        requested_after: int | None = None  # the rewrites finished before ours
        while True:
            finished, running = await self.aof_rewrites()
            if not running:
                if requested_after is None:  # after the one running, if any
                    requested_after = finished
                    await redis.bgrewriteaof()
                elif finished > requested_after:
                    break
            await asyncio.sleep(0.2)

    async def forget_ledger(self, watcher: kafkaio.Watcher) -> None:
        """Delete every record of the ledger topic so far: each creditgate measurement is
        a deployment of its own (its own key prefix) and must start with an empty ledger.
        Left there, the last measurement's entries are a ledger that Redis under the new
        prefix lacks, and the new workers heal them in first (a Redis that forgot, as far
        as they can tell), measuring the heal, not the decisions."""
        ledger = self.registry.name(t.LEDGER)
        ends = await watcher.end_offsets([ledger])
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.delete_records(
                {tp: RecordsToDelete(before_offset=end) for tp, end in ends.items() if end}
            )
        finally:
            await admin.close()

    async def rewrites_since(self, before: tuple[int, int]) -> int:
        """Rewrites that ran in a window that started at ``before``: one already running
        then counts too."""
        finished, running = await self.aof_rewrites()
        return finished + running - before[0]

    async def measure(
        self,
        watcher: kafkaio.Watcher,
        child: Child | Children,
        output: str,
        target: int,
        group: str,
        *,
        check_commits: bool,
    ) -> dict[str, Any]:
        """Wait until ``target`` records are on ``output``, then read the span."""
        since = await watcher.end_offsets([output])
        rewrites_before = await self.aof_rewrites()
        start_total = sum(since.values())
        # CPU is counted from the first output on, so start-up (imports, joining the
        # group) does not count against the messages
        cpu_first: tuple[float, int] | None = None
        machine_first = machine_busy()
        started = time.perf_counter()
        series: list[tuple[float, int]] = []
        last_change, last_done = time.perf_counter(), 0
        while True:
            done = await watcher.total([output]) - start_total
            now = time.perf_counter()
            series.append((now - started, done))
            if cpu_first is None and done > 0:
                cpu_first = (child.cpu() or 0.0, done)
                machine_first = machine_busy()
            kafkaio.progress(child.name, min(done, target), target, started)
            if done >= target:
                break
            if done != last_done:
                last_change, last_done = now, done
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            if now - last_change > self.args.stall_seconds:
                raise RuntimeError(f"{child.name} made no progress:\n{child.tail()}")
            await asyncio.sleep(0.25)
        kafkaio.progress(child.name, target, target, started, end=True)
        # CPU time per message barely depends on how busy the machine is; wall-clock
        # rates do: both go in the report
        cpu_from, done_from = cpu_first or (0.0, 0)
        cpu_used = (child.cpu() or 0.0) - cpu_from
        busy_now, total_now = machine_busy()
        busy_share = (busy_now - machine_first[0]) / max(total_now - machine_first[1], 1e-9)
        cpu_done = max(done - done_from, 1)
        self.progress[child.name] = series
        committed_after = None
        if check_commits:
            marks = await watcher.end_offsets(self.inputs)
            deadline = time.perf_counter() + 30
            while not await watcher.committed_to_end(group, self.inputs, marks):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{child.name}: offsets not committed to the end")
                await asyncio.sleep(0.1)
            committed_after = round(time.perf_counter() - started, 2)
        span = await watcher.span([output], since)
        return {
            "records": span.count,
            "seconds": round(span.seconds, 3),
            "per_s": round(span.count / span.seconds, 1),
            "process_cpu_s": round(cpu_used, 2),
            "cpu_ms_per_1000": round(1_000_000 * cpu_used / cpu_done, 1),
            # every process on the machine (broker, Redis, this harness included)
            "machine_cpu_busy_pct": round(100 * busy_share, 1),
            "offsets_committed_to_end": True if check_commits else None,
            "committed_seen_after_s": committed_after,
            "redis_aof_rewrites": await self.rewrites_since(rewrites_before),
            "since": since,  # kept out of the report (see ``creditgate``)
        }

    async def baseline(
        self, watcher: kafkaio.Watcher, variant: str, target: int, round_no: int = 1
    ) -> Any:
        # each round its own consumer group, so it reads the inputs from the start
        name = variant if round_no == 1 else f"{variant}-r{round_no}"
        group = f"{self.prefix}{name}"
        output = self.prefix + (
            "naive.credits.charge.results" if variant == "naive" else f"{variant}.results"
        )
        key_prefix = f"b{self.run_id}{variant}"
        if variant == "naive":
            await self.license_orgs(key_prefix)
        conf = {
            "inputs": self.inputs,
            "group": group,
            "output": output,
            "outputs_prefix": self.prefix + "naive.",
            "limit": target,  # the naive pipeline stops there (the others read everything)
            # faust's data folder (for tables, which the faust baseline has none of): with
            # the run's logs, not in the checkout the children run in
            "datadir": str(self.logs / f"{variant}-data"),
            # the passthrough batches like the worker; the naive pipeline sends one message
            # at a time and waits for it, so lingering would only add to each wait
            "producer": {
                "acks": "all",
                "linger_ms": 0 if variant == "naive" else 5,
                "max_batch_size": RECORD_BATCH_BYTES,  # the worker's
            },
        }
        child = start_child(
            name,
            [sys.executable, "-m", "bench.variants", variant, json.dumps(conf)],
            self.env(key_prefix, group),
            self.logs,
        )
        try:
            measured = await self.measure(
                watcher, child, output, target, group, check_commits=variant != "naive"
            )
            measured.pop("since")
            return measured
        finally:
            child.stop()

    # ---- creditgate --------------------------------------------------------------

    def start_workers(self, name: str, count: int, key_prefix: str, group: str) -> Children:
        env = self.env(key_prefix, group)
        members = []
        for i in range(count):
            # each its own HTTP port; one consumer group, one Redis key prefix
            own = {**env, "CREDITGATE_HTTP_PORT": str(find_free_port())}
            members.append(start_child(f"{name}-{i + 1}", WORKER_ARGV, own, self.logs))
        return Children(name, members)

    async def fresh_workers(
        self, watcher: kafkaio.Watcher, name: str, key_prefix: str, workers: int
    ) -> dict[str, Any]:
        """The throughput of ``workers`` new worker processes of one new group, on fresh
        Redis keys (every request decided anew, none replayed)."""
        group = f"{self.prefix}{name}"
        await self.clear_redis()
        await self.forget_ledger(watcher)
        await self.license_orgs(key_prefix)
        children = self.start_workers(name, workers, key_prefix, group)
        try:
            measured = await self.measure(
                watcher,
                children,
                self.registry.name(t.CHARGE_RESULTS),
                self.args.requests,
                group,
                check_commits=True,
            )
            measured.pop("since")
            return measured
        finally:
            children.stop()

    async def scale_out(self, watcher: kafkaio.Watcher, workers: int) -> dict[str, Any]:
        """The same requests through ``workers`` worker processes of one group."""
        key_prefix = f"b{self.run_id}x{workers}"
        measured = await self.fresh_workers(watcher, f"creditgate_x{workers}", key_prefix, workers)
        measured["workers"] = workers
        return measured

    async def creditgate_round(self, watcher: kafkaio.Watcher, round_no: int) -> dict[str, Any]:
        """An earlier throughput round: one worker of its own."""
        key_prefix = f"b{self.run_id}cg{round_no}"
        return await self.fresh_workers(watcher, f"creditgate-r{round_no}", key_prefix, 1)

    async def creditgate(
        self, watcher: kafkaio.Watcher, earlier: list[dict[str, Any]] | None = None
    ) -> None:
        """The last throughput round (after the ``earlier`` ones), then latency and soak
        through the same worker."""
        args = self.args
        key_prefix = f"b{self.run_id}cg"
        group = f"{self.prefix}creditgate"
        await self.clear_redis()
        await self.forget_ledger(watcher)
        await self.license_orgs(key_prefix)
        memory_before = int((await self.redis.info("memory"))["used_memory"])
        results = self.registry.name(t.CHARGE_RESULTS)
        child = start_child(
            "creditgate",
            WORKER_ARGV,
            self.env(key_prefix, group),
            self.logs,
        )
        sampler = asyncio.create_task(self.sample_rss(child, watcher, results))
        profiler = None
        try:
            if args.profile:
                profiler = profiling.attach(child.process.pid, self.logs, args.profile_seconds)
            throughput = await self.measure(
                watcher, child, results, args.requests, group, check_commits=True
            )
            if profiler is not None:
                self.report["profile"] = profiling.finish(profiler, RESULTS_DIR, self.run_id)
            since = throughput.pop("since")
            # the measured maximum: the median of the rounds, as the report gives it
            measured = self.report["variants"]["creditgate"] = with_rounds(
                [*(earlier or []), throughput]
            )
            memory_after = int((await self.redis.info("memory"))["used_memory"])
            self.report["outcomes"] = await self.outcomes(watcher, results, since)
            self.report["redis_memory"] = await self.window_memory(
                key_prefix, memory_before, memory_after
            )
            if args.latency_seconds > 0:
                maximum = measured["per_s"]
                rate = args.latency_rate or maximum / 2
                self.report["latency"] = await self.latency(rate)
                # lighter loads too: where the latency goals are met, if not at half
                self.report["latency_more"] = [
                    await self.latency(maximum * fraction) for fraction in args.latency_fractions
                ]
            if args.soak_requests > 0:
                self.report["soak"] = await self.soak(watcher, child, results, group)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            child.stop()
        if "latency" in self.report and "passthrough" in args.baselines:
            # with the worker gone, at creditgate's own latency rate
            rate = self.report["latency"]["rate_per_s"]
            self.report["passthrough_latency"] = await self.passthrough_latency(watcher, rate)

    async def sample_rss(self, child: Child, watcher: kafkaio.Watcher, results: str) -> None:
        started = time.perf_counter()
        while child.alive():
            kib = rss_kib(child.process.pid)
            done = await watcher.total([results])
            if kib is not None:
                self.rss.append({"t": time.perf_counter() - started, "decided": done, "kib": kib})
            await asyncio.sleep(1.0)

    async def outcomes(
        self, watcher: kafkaio.Watcher, results: str, since: dict[TopicPartition, int]
    ) -> dict[str, Any]:
        """Every result read back once: one per request message, and the mix of outcomes."""
        kinds: dict[str, int] = {}
        request_ids: set[str] = set()
        async for value in watcher.read([results], since):
            body = json.loads(value or b"{}")
            kind = body["reason"] or "approved"
            kinds[kind] = kinds.get(kind, 0) + 1
            request_ids.add(body["request_id"])
        return {
            "results": sum(kinds.values()),
            "distinct_request_ids": len(request_ids),
            "by_outcome": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        }

    async def window_memory(self, key_prefix: str, before: int, after: int) -> dict[str, Any]:
        """INFO memory growth over the run, per open repeat window key."""
        client = self.redis
        windows = requests = 0
        window_sample: list[int] = []
        request_sample: list[int] = []
        async for key in client.scan_iter(match=f"{key_prefix}:*", count=5000):
            if ":win:" in key:
                windows += 1
                if len(window_sample) < 2000:
                    window_sample.append(int(await client.memory_usage(key) or 0))
            elif ":req:" in key:
                requests += 1
                if len(request_sample) < 2000:
                    request_sample.append(int(await client.memory_usage(key) or 0))
        delta = after - before
        return {
            "used_memory_delta_bytes": delta,
            "open_windows": windows,
            "stored_decisions": requests,
            "bytes_per_window_info_delta": round(delta / windows, 1) if windows else None,
            "memory_usage_per_window_key": _mean(window_sample),
            "memory_usage_per_stored_decision": _mean(request_sample),
            "note": "INFO delta / window keys counts everything a decision stores (its "
            "idempotency record, usage, history) against the windows it opened; "
            "MEMORY USAGE gives the window key alone",
        }

    # ---- latency -------------------------------------------------------------------

    async def passthrough_latency(self, watcher: kafkaio.Watcher, rate: float) -> dict[str, Any]:
        """The raw passthrough's latency at ``rate``, the same open loop as creditgate's:
        the denominator of creditgate's latency ratios. It starts at the inputs' end and is
        probed until it passes messages, so every timed request is one it reads."""
        group = f"{self.prefix}passthrough-latency"
        output = self.prefix + "passthrough.results"
        conf = {
            "inputs": self.inputs,
            "group": group,
            "output": output,
            "from_end": True,
            "datadir": str(self.logs / "passthrough-latency-data"),
            "producer": {"acks": "all", "linger_ms": 5, "max_batch_size": RECORD_BATCH_BYTES},
        }
        argv = [sys.executable, "-m", "bench.variants", "passthrough", json.dumps(conf)]
        child = start_child("passthrough-latency", argv, self.env("unused", group), self.logs)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        try:
            before = await watcher.total([output])
            deadline = time.perf_counter() + 60
            while await watcher.total([output]) == before:
                if not child.alive() or time.perf_counter() > deadline:
                    raise RuntimeError(f"the passthrough passed nothing:\n{child.tail()}")
                await producer.send_and_wait(self.inputs[0], b"{}", key=b"probe")
                await asyncio.sleep(0.5)
            return await self.latency(rate, output)
        finally:
            await producer.stop()
            child.stop()

    async def latency(self, rate: float, results: str | None = None) -> dict[str, Any]:
        """Open loop at ``rate``: each request's scheduled produce time to its decision
        on ``results`` (creditgate's results topic unless another is named)."""
        args = self.args
        count = int(rate * args.latency_seconds)
        print(f"  latency: open loop at {rate:,.0f}/s for {args.latency_seconds}s", flush=True)
        rewrites_before = await self.aof_rewrites()
        requests = list(self.workload.requests(count))
        names = {logical: self.registry.name(logical) for logical in t.REQUEST_ACTIONS}
        scheduled: dict[str, float] = {}
        wall_sent: dict[str, float] = {}
        observer = kafkaio.DecisionObserver(
            self.bootstrap, results or self.registry.name(t.CHARGE_RESULTS), self.partitions
        )
        await observer.start()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=0,
            max_request_size=REQUEST_PRODUCER_MAX_BYTES,  # a request may be ~3 MB
        )
        await producer.start()
        try:
            started = time.perf_counter()
            sent = 0
            while sent < count:
                due = min(count, int((time.perf_counter() - started) * rate) + 1)
                for request in requests[sent:due]:
                    # the scheduled time, not the time we got round to it: an open loop
                    # that falls behind must not hide its own delay
                    scheduled.setdefault(request.ident, started + sent / rate)
                    wall_sent.setdefault(request.ident, time.time() * 1000)
                    # named as a decision names its request (ce_id): the passthrough
                    # forwards it, the worker writes its own
                    ce_id = b"%s/%s/request" % (request.key, request.ident.encode())
                    await producer.send(
                        names[request.topic],
                        request.value,
                        key=request.key,
                        headers=[("ce_id", ce_id)],
                    )
                    sent += 1
                kafkaio.progress("latency", sent, count, started)
                await asyncio.sleep(0.001)
            kafkaio.progress("latency", sent, count, started, end=True)
            seen = await observer.wait_for(set(scheduled), timeout=60)
        finally:
            await producer.stop()
            await observer.stop()
        warm = [
            r
            for r, at in scheduled.items()
            if r in seen and at >= started + args.latency_warmup_seconds
        ]
        return {
            "rate_per_s": round(rate, 1),
            "seconds": args.latency_seconds,
            "warmup_seconds": args.latency_warmup_seconds,
            "requests": len(scheduled),
            "answered": len(seen),
            "redis_aof_rewrites": await self.rewrites_since(rewrites_before),
            "received_ms": _percentiles(sorted((seen[r][0] - scheduled[r]) * 1000 for r in warm)),
            "decided_ms": _percentiles(sorted(seen[r][1] - wall_sent[r] for r in warm)),
            "note": "received: scheduled produce time to the decision read by a consumer; "
            "decided: to the result's producer timestamp (ms resolution)",
        }

    # ---- soak ----------------------------------------------------------------------

    async def soak(
        self, watcher: kafkaio.Watcher, child: Child, results: str, group: str
    ) -> dict[str, Any]:
        total = self.args.soak_requests
        names = {logical: self.registry.name(logical) for logical in t.REQUEST_ACTIONS}
        first = len(self.rss)
        measuring = asyncio.create_task(
            self.measure(watcher, child, results, total, group, check_commits=True)
        )
        await kafkaio.produce(
            self.bootstrap, names, self.workload.requests(total), total, "soak produce"
        )
        measured = await measuring
        samples = self.rss[first:]
        start_done = samples[0]["decided"] if samples else 0
        warm = [s for s in samples if s["decided"] - start_done >= total * 0.1]
        baseline = warm[0]["kib"] if warm else None
        final = samples[-1]["kib"] if samples else None
        return {
            "requests": total,
            **{k: measured[k] for k in ("records", "seconds", "per_s")},
            "rss_kib_after_warmup": baseline,
            "rss_kib_end": final,
            "rss_kib_max": max((s["kib"] for s in samples), default=None),
            "rss_growth_pct": round((final / baseline - 1) * 100, 2)
            if baseline and final
            else None,
            "warmup": "the first 10 % of the soak's requests",
        }

    # ---- everything ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self.redis.aclose()

    async def _run(self) -> None:
        args = self.args
        await self.set_up()
        self.report["variants"] = {}
        names = {logical: self.registry.name(logical) for logical in t.REQUEST_ACTIONS}
        print(f"producing {args.requests:,} one-item requests …", flush=True)
        self.report["produce_per_s"] = round(
            await kafkaio.produce(
                self.bootstrap,
                names,
                self.workload.requests(args.requests),
                args.requests,
                "produce",
            ),
            1,
        )
        watcher = kafkaio.Watcher(self.bootstrap, self.partitions)
        await watcher.start()
        try:
            # the other baselines first: the passthrough goes in turns with creditgate
            for variant in [b for b in args.baselines if b != "passthrough"]:
                target = (
                    min(args.naive_requests, args.requests)
                    if variant == "naive"
                    else (args.requests)
                )
                self.report["variants"][variant] = await self.baseline(watcher, variant, target)
            if args.scale_out > 1:
                # before the latency and soak runs add requests to the inputs: this
                # group, new, reads the inputs from the start
                name = f"creditgate_x{args.scale_out}"
                self.report["variants"][name] = await self.scale_out(watcher, args.scale_out)
            # The rates the goals compare, measured in turns (passthrough, creditgate,
            # passthrough, …): on this machine one variant's rate moved by 25 % from one
            # run to the next, and by more within a run, so one measurement of each says
            # little. creditgate's last round is the worker that then goes on to the
            # latency and soak runs.
            passthrough: list[dict[str, Any]] = []
            earlier: list[dict[str, Any]] = []
            for round_no in range(1, args.rounds + 1):
                if "passthrough" in args.baselines:
                    passthrough.append(
                        await self.baseline(watcher, "passthrough", args.requests, round_no)
                    )
                if round_no < args.rounds:
                    earlier.append(await self.creditgate_round(watcher, round_no))
            if passthrough:
                self.report["variants"]["passthrough"] = with_rounds(passthrough)
            await self.creditgate(watcher, earlier)
        finally:
            await watcher.stop()


async def _batches(keys: AsyncIterator[Any], size: int = 5000) -> AsyncIterator[list[Any]]:
    batch: list[Any] = []
    async for key in keys:
        batch.append(key)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def license_commands_for(store: CreditStore, workload: Workload, now_ms: int) -> None:
    """Periods and members, applied with the same command script the worker runs."""
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    commands = [
        license_command_adapter.validate_python(orjson.loads(send.value))
        for send in workload.setup(now)
    ]
    for i in range(0, len(commands), 500):
        answers = await store.apply_commands(commands[i : i + 500], now_ms)
        refused = [a for a in answers if not a.record.applied]
        if refused:
            raise RuntimeError(f"set-up command refused: {refused[0]}")


ROUND_FIELDS = (
    "records",
    "seconds",
    "per_s",
    "cpu_ms_per_1000",
    "machine_cpu_busy_pct",
    "redis_aof_rewrites",
)


def with_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant measured in several rounds: the median of each rate, every round, and
    what is not per round (the last round's commit check, its outcomes' ``since``)."""
    if len(rounds) == 1:
        return rounds[0]
    merged = {k: v for k, v in rounds[-1].items() if k not in (*ROUND_FIELDS, "process_cpu_s")}
    for key in ("per_s", "cpu_ms_per_1000", "machine_cpu_busy_pct"):
        merged[key] = round(statistics.median(r[key] for r in rounds), 1)
    merged["redis_aof_rewrites"] = sum(r.get("redis_aof_rewrites") or 0 for r in rounds)
    merged["rounds"] = [{key: r.get(key) for key in ROUND_FIELDS} for r in rounds]
    merged["median_of"] = len(rounds)
    return merged


def _mean(values: list[int]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    def at(q: float) -> float | None:
        if not values:
            return None
        return round(values[min(len(values) - 1, int(q * len(values)))], 2)

    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(values[-1], 2) if values else None,
    }


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures and the goals they meet."""
    v = report["variants"]
    cg = v.get("creditgate", {}).get("per_s")
    summary: dict[str, Any] = {"creditgate_decisions_per_s": cg}
    if cg and "passthrough" in v:
        summary["creditgate/passthrough"] = round(cg / v["passthrough"]["per_s"], 3)
    if cg and "faust" in v:
        summary["creditgate/faust_passthrough"] = round(cg / v["faust"]["per_s"], 3)
    if cg and "naive" in v:
        summary["creditgate/naive"] = round(cg / v["naive"]["per_s"], 1)
    for name in v:
        if name.startswith("creditgate_x"):  # scale-out: reported, not a goal
            summary[f"{name}_decisions_per_s"] = v[name]["per_s"]
    latency = report.get("latency", {}).get("received_ms", {})
    summary["p50_ms"], summary["p99_ms"] = latency.get("p50"), latency.get("p99")
    raw = report.get("passthrough_latency", {}).get("received_ms", {})
    for q in ("p50", "p99"):
        mine, theirs = latency.get(q), raw.get(q)
        summary[f"passthrough_{q}_ms"] = theirs
        summary[f"{q}_vs_passthrough"] = round(mine / theirs, 2) if mine and theirs else None
    summary["rss_growth_pct"] = report.get("soak", {}).get("rss_growth_pct")
    summary["redis_bytes_per_window"] = report.get("redis_memory", {}).get(
        "bytes_per_window_info_delta"
    )
    checks: dict[str, tuple[Any, Callable[[Any], bool]]] = {
        "vs_passthrough": (
            summary.get("creditgate/passthrough"),
            lambda x: x >= GOALS["vs_passthrough"],
        ),
        "vs_naive": (summary.get("creditgate/naive"), lambda x: x >= GOALS["vs_naive"]),
        "p50_vs_passthrough": (
            summary["p50_vs_passthrough"],
            lambda x: x <= GOALS["p50_vs_passthrough"],
        ),
        "p99_vs_passthrough": (
            summary["p99_vs_passthrough"],
            lambda x: x <= GOALS["p99_vs_passthrough"],
        ),
        "rss_growth_pct": (summary["rss_growth_pct"], lambda x: x <= GOALS["rss_growth_pct"]),
    }
    summary["goals"] = {
        name: {
            "goal": GOALS[name],
            "value": value,
            "met": None if value is None else bool(test(value)),
        }
        for name, (value, test) in checks.items()
    }
    return summary


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=200_000,
        help="one-item requests of the throughput run (default 200,000)",
    )
    parser.add_argument(
        "--naive-requests",
        type=int,
        default=10_000,
        help="the naive baseline decides only the first N (it is slow)",
    )
    parser.add_argument(
        "--baselines",
        default="passthrough,faust,naive",
        help="comma-separated: passthrough, faust, naive (empty: none)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=30.0,
        help="open-loop latency run at half the measured rate (0: skip)",
    )
    parser.add_argument("--latency-warmup-seconds", type=float, default=3.0)
    parser.add_argument(
        "--latency-fractions",
        default="0.25,0.1",
        help="more latency runs at these fractions of the measured rate (empty: none)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="requests/s of the latency run (default: half the measured rate)",
    )
    parser.add_argument(
        "--soak-requests",
        type=int,
        default=1_000_000,
        help="requests of the RSS soak through the same worker (0: skip)",
    )
    parser.add_argument(
        "--scale-out",
        type=int,
        default=2,
        help="then the same requests through this many workers of one group (<2: skip)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="creditgate's and the passthrough's throughput are measured this many times "
        "in turns; the report gives each round and the median (default 3)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stall-seconds", type=float, default=60.0)
    parser.add_argument(
        "--stack-root",
        default=None,
        help="keep the local stack in this folder and reuse it next time",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to the worker during the throughput run",
    )
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--label", default="", help="a word for the report's file name")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead: the single-node stack against the cluster stack, 1 to --max-workers "
        "workers on each, CPU per decision by process (bench/cluster.py)",
    )
    parser.add_argument("--max-workers", type=int, default=3, help="with --cluster")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.baselines = [b for b in args.baselines.split(",") if b]
    args.latency_fractions = [float(f) for f in args.latency_fractions.split(",") if f]
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.cluster:
        from bench import cluster  # noqa: PLC0415  # matplotlib and both stacks: only then

        cluster.main(args, argv)
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = stamp[2:].replace("T", "").replace("Z", "").lower()
    logs = Path(tempfile.mkdtemp(prefix=f"creditgate-bench-{run_id}-"))
    RESULTS_DIR.mkdir(exist_ok=True)
    base: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.run", *argv]),
        "started_at": stamp,
        "machine": machine(),
        "args": dict(vars(args)),
        "settings": Settings().model_dump(include={"batch_size", "repeat_window_days"}),
        "workload": WorkloadSpec.bench("", seed=args.seed).bench_options(),
    }
    # aiokafka logs an error for every topic the harness has just created until its
    # metadata arrives; the children's logs keep their own messages
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    print(f"bench run {run_id}; logs in {logs}", flush=True)
    with stack(args) as (bootstrap, redis_url):
        run = Run(args, bootstrap, redis_url, run_id, logs, report=base)
        try:
            asyncio.run(run.run())
        finally:
            base["machine"]["load_average_at_end"] = os.getloadavg()
            base["rss_samples"] = run.rss
            base["progress"] = {k: v[:: max(1, len(v) // 200)] for k, v in run.progress.items()}
    base["summary"] = summarise(base)
    name = f"{stamp}{'-' + args.label if args.label else ''}"
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(base, indent=2, default=str) + "\n")
    png_path = report.plot(base, RESULTS_DIR / f"{name}.png")
    report.print_summary(base)
    print(f"\nreport: {json_path.relative_to(REPO)}\nplot:   {png_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()

"""A Kafka broker, a Redis server and ``creditgate worker`` processes to break.

A rig that breaks servers runs its own ``DevStack`` in its own folder, so killing its
broker or Redis touches nobody else's tests; rigs that only break workers may share a
stack. A cluster rig (``cluster=True``) runs a ``ClusterStack`` of its own instead:
three brokers and a Redis Cluster, whose nodes it kills, fails over and reshards.
Every rig has its own topic prefix, key prefix and consumer group.
Workers are started exactly as an operator would start them (``python -m creditgate
worker`` with ``CREDITGATE_*`` variables) and are only ever signalled by their pid.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from creditgate.devstack import ClusterStack, DevStack, find_free_port
from creditgate.settings import Settings
from creditgate.stream.topics import TopicRegistry, apply_topics

# 6 s is the broker's minimum session (group.min.session.timeout.ms); a worker killed
# with -9 keeps its partitions until its session expires, so the shorter, the less
# silence after each kill.
SESSION_TIMEOUT_SECONDS = 6.0


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    http_port: int
    paused: bool = False
    # set when we ended it on purpose; an exit without it is a crash
    ended_by_us: bool = False


@dataclass
class Rig:
    root: Path
    run: str
    redis_appendfsync: str = "everysec"
    batch_size: int = 1000
    worker_loglevel: str = "warning"  # "info" shows faust's rebalance flight recorder
    # a stack shared with other rigs (never broken by this one); None: a stack of its own
    shared_stack: DevStack | None = None
    cluster: bool = False  # a ClusterStack of its own instead of a DevStack
    faults: Counter[str] = field(default_factory=Counter)
    workers: dict[str, Worker] = field(default_factory=dict)
    retired: list[Worker] = field(default_factory=list)
    # workers that ignored SIGTERM until we killed them (a stop takes 1-3 s normally)
    hung_on_stop: list[str] = field(default_factory=list)
    _copies: int = 0  # copies of Redis's AOF made by copy_redis

    def __post_init__(self) -> None:
        self.stack = self.shared_stack or DevStack(
            self.root / "stack",
            redis_appendfsync=self.redis_appendfsync,
            # a restarted Redis answers only once it has loaded its whole AOF: a soak's
            # million keys take far longer than the 10 s default on a busy machine
            redis_timeout=120.0,
        )
        self.cluster_stack = ClusterStack(self.root / "cluster", redis_timeout=120.0)
        self.registry = TopicRegistry.load(prefix=f"{self.run}.")
        self._logs = self.root / "workers"
        self.bootstrap = ""
        self.redis_url = ""

    # ---- the stack -------------------------------------------------------------

    async def up(self) -> None:
        if self.cluster:
            env = await asyncio.to_thread(self.cluster_stack.up)
            self.bootstrap = env["CREDITGATE_KAFKA_BOOTSTRAP"]
            self.redis_url = env["CREDITGATE_REDIS_URL"]
        else:
            if self.shared_stack is not None:
                found = self.stack.endpoints()
            else:
                found = await asyncio.to_thread(self.stack.up)
            self.bootstrap, self.redis_url = found.kafka_bootstrap, found.redis_url
        await apply_topics(self.bootstrap, self.registry)
        self._logs.mkdir(parents=True, exist_ok=True)

    async def down(self) -> None:
        for worker in [*self.workers.values()]:
            if worker.paused:
                self.resume_worker(worker.name)
            self.kill_worker(worker.name, count=False)
        if self.cluster:
            await asyncio.to_thread(self.cluster_stack.down)
        elif self.shared_stack is None:
            await asyncio.to_thread(self.stack.down)

    def settings(self) -> Settings:
        """What a worker of this rig reads; for the test's own Redis reads."""
        return Settings(
            kafka_bootstrap=self.bootstrap, redis_url=self.redis_url, key_prefix=self.run
        )

    # ---- workers ---------------------------------------------------------------

    def start_worker(self, name: str) -> Worker:
        http_port = find_free_port()
        env = {
            **os.environ,
            "CREDITGATE_SESSION_TIMEOUT_SECONDS": str(SESSION_TIMEOUT_SECONDS),
            "CREDITGATE_KAFKA_BOOTSTRAP": self.bootstrap,
            "CREDITGATE_REDIS_URL": self.redis_url,
            "CREDITGATE_TOPIC_PREFIX": self.registry.prefix,
            "CREDITGATE_KEY_PREFIX": self.run,
            "CREDITGATE_APP_ID": f"{self.run}-workers",
            "CREDITGATE_HTTP_PORT": str(http_port),
            "CREDITGATE_BATCH_SIZE": str(self.batch_size),
        }
        log = self._logs / f"{name}-{sum(1 for w in self.retired if w.name == name)}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "creditgate", "worker", "--loglevel", self.worker_loglevel],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        worker = Worker(name, process, log, http_port)
        self.workers[name] = worker
        return worker

    def join_worker(self, name: str) -> Worker:
        """Another worker joins the group mid-stream (a scale-out)."""
        self.faults["worker_join"] += 1
        return self.start_worker(name)

    def kill_worker(self, name: str, *, count: bool = True) -> None:
        """SIGKILL: the worker dies wherever it is, between Redis and Kafka included."""
        worker = self.workers.pop(name)
        worker.ended_by_us = True
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(30)
        self.retired.append(worker)
        if count:
            self.faults["worker_kill"] += 1

    async def stop_worker(self, name: str, timeout: float = 30.0, *, count: bool = True) -> None:
        """SIGTERM: the worker leaves its group cleanly (SIGKILL if it hangs)."""
        worker = self.workers.pop(name)
        worker.ended_by_us = True
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
            try:
                # in a thread: the observer keeps reading while the worker shuts down
                await asyncio.to_thread(worker.process.wait, timeout)
            except subprocess.TimeoutExpired:
                self.hung_on_stop.append(
                    f"{name} (pid {worker.process.pid}) still running {timeout:g}s after "
                    f"SIGTERM, killed:\n{_tail(worker.log)}"
                )
                worker.process.send_signal(signal.SIGKILL)
                worker.process.wait(30)
        self.retired.append(worker)
        if count:
            self.faults["worker_leave"] += 1

    def pause_worker(self, name: str) -> None:
        """SIGSTOP: frozen mid-flight, heartbeats included, as in a long GC or VM stall."""
        worker = self.workers[name]
        worker.process.send_signal(signal.SIGSTOP)
        worker.paused = True
        self.faults["worker_pause"] += 1

    def resume_worker(self, name: str) -> None:
        worker = self.workers[name]
        worker.process.send_signal(signal.SIGCONT)
        worker.paused = False

    def crashed(self) -> list[str]:
        """Workers that exited although nobody asked them to, with their log's end."""
        dead = [w for w in [*self.workers.values(), *self.retired] if not w.ended_by_us]
        return [
            f"{w.name} (pid {w.process.pid}) exited with {w.process.returncode}:\n{_tail(w.log)}"
            for w in dead
            if w.process.poll() is not None
        ]

    def tracebacks(self) -> list[str]:
        """Log tails of workers that logged a traceback (shown when a test fails)."""
        return [
            f"--- {w.log.name} ---\n{_tail(w.log)}"
            for w in [*self.workers.values(), *self.retired]
            if "Traceback" in w.log.read_text(errors="replace")
        ]

    # ---- servers ---------------------------------------------------------------

    def _own_stack(self) -> None:
        if self.shared_stack is not None:
            raise RuntimeError("a shared stack is not this rig's to break")

    async def kill_redis(self) -> float:
        """SIGKILL Redis; returns the moment it was dead (epoch seconds)."""
        self._own_stack()
        await asyncio.to_thread(self.stack.kill_redis)
        self.faults["redis_kill"] += 1
        return time.time()

    async def start_redis(self) -> float:
        """Start Redis again (it reloads its AOF); returns the moment it was started."""
        started = time.time()
        await asyncio.to_thread(self.stack.start_redis)
        return started

    async def copy_redis(self) -> Path:
        """A copy of Redis's AOF as it is now, for ``redis_forgets``."""
        self._own_stack()
        self._copies += 1
        copy = self.root / "redis-copies" / str(self._copies)
        await asyncio.to_thread(self.stack.copy_redis_data, copy)
        return copy

    async def redis_forgets(self, since: Path | None) -> float:
        """Redis killed and started again from an older copy of its AOF (None: empty),
        so it lacks every write after the copy; returns the moment it was started."""
        self._own_stack()
        await asyncio.to_thread(self.stack.restore_redis_data, since)
        self.faults["redis_forgets"] += 1
        return time.time()

    async def restart_broker(self, *, down_for: float, crash: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL for ``crash``), keep it down, start it."""
        self._own_stack()
        await asyncio.to_thread(self.stack.kill_kafka if crash else self.stack.stop_kafka)
        self.faults["broker_crash" if crash else "broker_restart"] += 1
        await asyncio.sleep(down_for)  # the outage itself is the fault schedule
        await asyncio.to_thread(self.stack.start_kafka)

    # ---- cluster nodes (cluster=True) ----------------------------------------------

    async def kill_redis_primary(self, port: int) -> float:
        """SIGKILL one Redis primary; its replica takes over after the node timeout.
        Returns the moment it was dead."""
        await asyncio.to_thread(self.cluster_stack.kill_redis, port)
        self.faults["redis_primary_kill"] += 1
        return time.time()

    async def failed_over(self, dead: int, timeout: float = 60.0) -> float:
        """Until the slots of the primary on port ``dead`` have a new primary (its replica)
        and the cluster is whole again; returns the moment it was."""
        await asyncio.to_thread(self.cluster_stack.wait_failover, dead, timeout)
        return time.time()

    async def start_redis_node(self, port: int) -> None:
        """Start a killed node again: it comes back as a replica of its successor."""
        await asyncio.to_thread(self.cluster_stack.start_redis, port)

    async def kill_broker(self, index: int) -> None:
        """SIGKILL Kafka node ``index`` (0-based), a broker and controller."""
        await asyncio.to_thread(self.cluster_stack.kill_kafka, index)
        self.faults["broker_crash"] += 1

    async def start_broker(self, index: int) -> None:
        await asyncio.to_thread(self.cluster_stack.start_kafka, index)

    async def reshard(self, source: int, target: int, slots: int) -> None:
        """Move ``slots`` slots from one primary to another while traffic goes on."""
        await asyncio.to_thread(self.cluster_stack.reshard, source, target, slots)
        self.faults["slot_migration"] += 1


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:]

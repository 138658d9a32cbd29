"""Soak: DESIGN §6 over a long stream with every kind of fault, many times.

    python -m bench.soak                                   # the full soak (20-50 min)
    python -m bench.soak --requests 100000 --worker-kills 10 --pauses 2 \\
        --redis-kills 2 --broker-restarts 1                # a smaller one (2-5 min)

It starts its own Kafka broker and Redis (a DevStack in a temporary folder, stopped
and its data removed afterwards; the worker logs stay), two ``creditgate worker``
processes in one consumer group, and streams the requests of many organisations
through them while it kills a worker with SIGKILL (and restarts it), freezes one with
SIGSTOP for longer than its session, kills Redis (AOF ``appendfsync always``), starts
Redis again from an older copy of its AOF (a Redis that forgets) and stops or crashes
the broker — each at a random point of the stream, in random order.
Then it checks the invariants of ``creditgate_harness.invariants`` and prints a summary.
Exit status 0 when they hold.

The fault tests (``pytest -m faults``) are the CI-sized version of the same harness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from creditgate_harness.faultrun import FaultRun
from creditgate_harness.invariants import Verdict, as_dict
from creditgate_harness.rig import SESSION_TIMEOUT_SECONDS
from creditgate_harness.workload import WorkloadSpec

log = logging.getLogger("soak")

# while a fault is being recovered from, progress can stall for a while
_PROGRESS_TIMEOUT = 900.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--orgs", type=int, default=200)
    parser.add_argument("--worker-kills", type=int, default=100, help="SIGKILL + restart")
    parser.add_argument("--pauses", type=int, default=20, help="SIGSTOP beyond the session")
    parser.add_argument("--redis-kills", type=int, default=20, help="SIGKILL + restart")
    parser.add_argument(
        "--redis-forgets",
        type=int,
        default=20,
        help="Redis started again from a copy of its AOF taken 0.3-2 s earlier",
    )
    parser.add_argument("--broker-restarts", type=int, default=10, help="stop or crash")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duplicates", type=float, default=0.05, help="ids sent twice")
    parser.add_argument(
        "--appendfsync",
        choices=("always", "everysec", "no"),
        default="always",
        help="Redis AOF fsync; everysec survives process kills but not a machine crash",
    )
    parser.add_argument("--root", type=Path, help="keep the stack and worker logs here")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser.parse_args(argv)


class Soak:
    def __init__(self, run: FaultRun, args: argparse.Namespace) -> None:
        self.run = run
        self.args = args
        self.rng = random.Random(args.seed)
        self.workers = [f"w{i}" for i in range(1, args.workers + 1)]
        self.skipped = 0

    def schedule(self) -> list[tuple[int, str]]:
        """Every fault at a random point of the stream (a count of decided requests)."""
        args = self.args
        kinds = (
            ["worker_kill"] * args.worker_kills
            + ["worker_pause"] * args.pauses
            + ["redis_kill"] * args.redis_kills
            + ["redis_forgets"] * args.redis_forgets
            + ["broker_restart"] * args.broker_restarts
        )
        self.rng.shuffle(kinds)
        points = sorted(
            self.rng.randint(int(0.01 * args.requests), int(0.97 * args.requests)) for _ in kinds
        )
        return list(zip(points, kinds, strict=True))

    async def inject(self, kind: str) -> None:
        rig, rng = self.run.rig, self.rng
        if kind == "worker_kill":
            name = rng.choice(self.workers)
            rig.kill_worker(name)
            rig.start_worker(name)
        elif kind == "worker_pause":
            name = rng.choice(self.workers)
            rig.pause_worker(name)
            # frozen past its session, so that the group moves its partitions away
            await asyncio.sleep(SESSION_TIMEOUT_SECONDS + rng.uniform(1, 6))
            rig.resume_worker(name)
        elif kind == "redis_kill":
            await rig.kill_redis()
            await asyncio.sleep(rng.uniform(0.5, 4))  # the outage
            await rig.start_redis()
        elif kind == "redis_forgets":
            # what a host crash (appendfsync everysec) or a lagging replica leaves: the
            # workers must heal Redis from the ledger by themselves
            copy = await rig.copy_redis()
            await asyncio.sleep(rng.uniform(0.3, 2.0))  # decisions that will be forgotten
            await rig.redis_forgets(copy)
            shutil.rmtree(copy)
        else:
            await rig.restart_broker(down_for=rng.uniform(0.5, 3), crash=rng.random() < 0.5)

    async def play(self) -> Verdict:
        run = self.run
        await run.setup(self.workers, timeout=180)
        run.start_stream()
        reporter = asyncio.create_task(self.report_progress())
        try:
            for point, kind in self.schedule():
                if run.decided >= self.args.requests:
                    self.skipped += 1  # the stream is over: a fault now would prove nothing
                    continue
                await run.reach(point / self.args.requests, _PROGRESS_TIMEOUT)
                await asyncio.sleep(self.rng.uniform(0, 0.5))  # a random moment after it
                log.info("%s at %d decided", kind, run.decided)
                await self.inject(kind)
            return await run.finish(timeout=3600)
        finally:
            reporter.cancel()

    async def report_progress(self) -> None:
        started, run = time.monotonic(), self.run
        while True:
            await asyncio.sleep(30)  # a progress line, not a wait for anything
            elapsed = time.monotonic() - started
            faults = ", ".join(f"{k} {v}" for k, v in sorted(run.rig.faults.items()))
            log.info(
                "%d/%d decided in %.0fs (%.0f/s); faults so far: %s",
                run.decided,
                self.args.requests,
                elapsed,
                run.decided / elapsed,
                faults or "none",
            )


def summary(soak: Soak, verdict: Verdict, elapsed: float) -> dict[str, object]:
    rig = soak.run.rig
    return {
        **as_dict(verdict),
        "faults": {
            "worker_kills": rig.faults["worker_kill"],
            "worker_pauses": rig.faults["worker_pause"],
            "redis_kills": rig.faults["redis_kill"],
            "redis_forgets": rig.faults["redis_forgets"],
            "broker_restarts": rig.faults["broker_restart"] + rig.faults["broker_crash"],
            "of_which_broker_crashes": rig.faults["broker_crash"],
            "skipped_after_the_stream": soak.skipped,
        },
        "sequence_numbers_reused": verdict.counts["ledger_copies_differ"],
        "windows_paid_twice": verdict.counts["window_paid_twice"],
        "sends_resent": soak.run.feeder.sent.resent,
        "result_copies": verdict.result_copies,
        "elapsed_seconds": round(elapsed),
        # this process's peak memory: it keeps a digest of every request and output
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "decisions_per_second": round(verdict.decided / elapsed),
    }


async def main(args: argparse.Namespace) -> int:
    spec = WorkloadSpec(
        run=f"soak{uuid.uuid4().hex[:6]}",
        requests=args.requests,
        orgs=args.orgs,
        seed=args.seed,
        duplicate_fraction=args.duplicates,
        grants=max(20, args.requests // 2000),
        new_periods=max(10, args.requests // 5000),
    )
    root = args.root or Path(tempfile.mkdtemp(prefix="creditgate-soak-"))
    started = time.monotonic()
    async with FaultRun(root, spec, redis_appendfsync=args.appendfsync) as run:
        soak = Soak(run, args)
        verdict = await soak.play()
        figures = summary(soak, verdict, time.monotonic() - started)
        print(run.report(verdict))
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # aiokafka logs every refused connection while the broker is down on purpose
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(parse_args())))

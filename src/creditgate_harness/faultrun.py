"""One fault run: a rig, a workload streamed into it, an observer, and the verdict.

The fault tests and ``bench/soak.py`` both drive a ``FaultRun``:

    async with FaultRun(root, spec) as run:
        await run.setup(["w1"])                 # workers up, licenses and members applied
        run.start_stream()                      # requests flow in the background
        await run.reach(0.3)                    # 30 % of the requests decided
        ...inject faults through run.rig...
        verdict = await run.finish()            # everything decided, then every invariant
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from creditgate.devstack import DevStack
from creditgate_harness.invariants import Verdict, check, read_store
from creditgate_harness.rig import Rig
from creditgate_harness.traffic import Deadline, Feeder, Observer
from creditgate_harness.workload import Workload, WorkloadSpec

log = logging.getLogger("faults")


@dataclass
class Timings:
    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic() - self.started

    def __str__(self) -> str:
        return ", ".join(f"{name} at {at:.1f}s" for name, at in self.marks.items())


class FaultRun:
    def __init__(
        self,
        root: Path,
        spec: WorkloadSpec,
        *,
        redis_appendfsync: str = "everysec",
        batch_size: int = 1000,
        rate: float | None = None,
        shared_stack: DevStack | None = None,
        cluster: bool = False,
    ) -> None:
        self.spec = spec
        self.workload = Workload(spec)
        self.rig = Rig(
            root,
            spec.run,
            redis_appendfsync=redis_appendfsync,
            batch_size=batch_size,
            shared_stack=shared_stack,
            cluster=cluster,
        )
        self.rate = rate
        self.timings = Timings()
        self._feeder: Feeder | None = None
        self._observer: Observer | None = None
        self._stream: asyncio.Task[None] | None = None
        self._sends = self.workload.stream()

    async def __aenter__(self) -> Self:
        await self.rig.up()
        self._feeder = Feeder(self.rig.bootstrap, self.rig.registry)
        self._observer = Observer(self.rig.bootstrap, self.rig.registry)
        await self._feeder.start()
        await self._observer.start()
        self.timings.mark("stack up")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stream and not self._stream.done():
            self._stream.cancel()
        for part in (self._feeder, self._observer):
            if part is not None:
                try:
                    await asyncio.wait_for(part.stop(), 30)
                # the broker may be down after a failure: whatever stopping raises, the
                # rig still comes down
                except Exception as error:  # noqa: BLE001
                    log.warning("stopping %s: %s", type(part).__name__, error)
        await self.rig.down()

    @property
    def feeder(self) -> Feeder:
        if self._feeder is None:
            raise RuntimeError("a FaultRun is used inside `async with`")
        return self._feeder

    @property
    def observer(self) -> Observer:
        if self._observer is None:
            raise RuntimeError("a FaultRun is used inside `async with`")
        return self._observer

    @property
    def decided(self) -> int:
        return self.observer.decided

    async def setup(self, workers: list[str], timeout: float = 90.0) -> None:
        """Start the workers and apply every license and member before any request."""
        for name in workers:
            self.rig.start_worker(name)
        commands = self.workload.setup()
        await self.feeder.send_all(commands)
        await self.observer.wait_events([c.ident for c in commands], timeout)
        self.timings.mark("setup applied")

    def start_stream(self, messages: int | None = None) -> None:
        """Produce the next ``messages`` of the stream (all the rest: None) in the background."""
        assert self._stream is None or self._stream.done(), "one part of the stream at a time"
        part = self._sends if messages is None else itertools.islice(self._sends, messages)
        self._stream = asyncio.create_task(self.feeder.send_all(part, rate=self.rate))

    async def stream_sent(self, timeout: float = 240.0) -> None:
        assert self._stream is not None
        await asyncio.wait_for(asyncio.shield(self._stream), timeout)

    async def wait_sent_decided(self, timeout: float) -> None:
        """Until every request sent so far has its decision."""
        await self.observer.wait_decided(list(self.feeder.sent.requests), timeout)

    async def reach(self, fraction: float, timeout: float = 120.0) -> None:
        """Until that fraction of the run's requests has a decision."""
        target = int(fraction * self.spec.requests)
        await self.observer.wait(
            lambda: self.decided >= target,
            timeout,
            f"{target} of {self.spec.requests} requests decided (have {self.decided})",
        )

    async def reach_more(self, requests: int, timeout: float = 120.0) -> None:
        """Until ``requests`` more requests than now have a decision."""
        target = min(self.decided + requests, self.spec.requests)
        await self.observer.wait(
            lambda: self.decided >= target,
            timeout,
            f"{target} of {self.spec.requests} requests decided (have {self.decided})",
        )

    async def finish(self, timeout: float = 240.0, *, first_body_wins: bool = False) -> Verdict:
        """Send the rest of the stream, wait for every decision and license event, stop
        the workers, read to the end, check everything."""
        if self._stream is not None:
            await self.stream_sent(timeout)
        await asyncio.wait_for(self.feeder.send_all(self._sends, rate=self.rate), timeout)
        self.timings.mark("stream sent")
        try:
            await self.observer.wait_decided(self.feeder.sent.requests, timeout)
            # and every license command: they come on a topic of their own, so the last
            # requests can be decided before the last commands
            await self.observer.wait_events(self.feeder.sent.commands, timeout)
        except Deadline:
            # fall through to the verdict: it names what is missing, beside the rest
            log.exception("not every request or command was decided")
        self.timings.mark("all decided")
        crashed = self.rig.crashed()
        for name, worker in self.rig.workers.items():
            if worker.paused:
                self.rig.resume_worker(name)
        # stopped so that no copy is still on its way while we read to the end
        await asyncio.gather(*(self.rig.stop_worker(n, count=False) for n in [*self.rig.workers]))
        await self.observer.catch_up(60)
        store = await read_store(self.rig.settings(), self.feeder.sent, self.observer.seen)
        verdict = check(
            self.feeder.sent, self.observer.seen, store, first_body_wins=first_body_wins
        )
        for crash in crashed:
            verdict.flag("worker_crashed", crash)
        # with Redis and the broker up, a worker that ignores SIGTERM is stuck (e.g. in a
        # rebalance that waits for events its agent will never acknowledge)
        for hang in self.rig.hung_on_stop:
            verdict.flag("worker_hung_on_stop", hang)
        self.timings.mark("checked")
        return verdict

    def report(self, verdict: Verdict) -> str:
        """The verdict with the faults injected, the timings and any worker traceback."""
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.rig.faults.items())) or "none"
        lines = [
            verdict.summary(),
            f"faults: {faults}; sends not acknowledged and sent again: {self.feeder.sent.resent}",
            f"timings: {self.timings}",
        ]
        if not verdict.ok:
            lines.extend(self.rig.tracebacks())
        return "\n".join(lines)


def assert_holds(run: FaultRun, verdict: Verdict) -> None:
    """The test's verdict: every invariant holds (the report is printed either way)."""
    report = run.report(verdict)
    print(report)  # noqa: T201  # shown with -s or -rP, and with a failure
    assert verdict.ok, report

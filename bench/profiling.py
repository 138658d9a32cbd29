"""py-spy attached to the worker: where its time goes, summarised by function.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;… count``).
Self time is the innermost frame of a sample; inclusive time counts a function once per
sample it appears in. ``--nonblocking`` keeps py-spy from pausing the worker, so the
profiled run's throughput stays close to an unprofiled one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
# Innermost frames that mean "in the event loop": waiting, or running uvloop's own
# (native, so invisible) code, which py-spy charges to the frame that started the loop.
_LOOP_FRAMES = (
    "EpollSelector.select (",
    "BaseEventLoop._run_once (",
    "Worker.execute_from_commandline (",
    "BaseEventLoop.run_until_complete (",
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    return found


def attach(pid: int, logs: Path, seconds: float) -> tuple[subprocess.Popen[bytes], Path]:
    out = logs / "profile.raw.txt"
    process = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(logs / "py-spy.log").open("wb"),
    )
    return process, out


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['func']} ({file})"


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in raw.read_text().splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        count = int(match["count"])
        frames = [_name(f) for f in match["stack"].split(";") if "(" in f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        if frames[-1].startswith(_LOOP_FRAMES):
            idle += count
        for name in set(frames):
            inclusive[name] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "pct": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self": rows(own),
        "inclusive": rows(inclusive),
        "event_loop_pct": round(100 * idle / total, 1) if total else None,
    }


def finish(
    profiler: tuple[subprocess.Popen[bytes], Path], results: Path, run_id: str
) -> dict[str, Any]:
    process, raw = profiler
    process.wait(120)
    kept = results / f"profile-{run_id}.txt"
    shutil.copyfile(raw, kept)
    summary = summarise(raw)
    summary["raw"] = kept.name
    return summary


def main(argv: list[str]) -> None:
    """``python -m bench.profiling FILE``: print the summary of a raw py-spy profile."""
    summary = summarise(Path(argv[0]))
    print(f"in the event loop (waiting, or uvloop's native code): {summary['event_loop_pct']}%")
    for kind in ("self", "inclusive"):
        print(f"\n{kind} time, of {summary['samples']} samples:")
        for row in summary[kind]:
            print(f"  {row['pct']:5.1f}%  {row['function']}")


if __name__ == "__main__":
    main(sys.argv[1:])

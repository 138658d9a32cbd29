"""The decision clock."""

from __future__ import annotations

import time


class Clock:
    """The decision clock: the worker's clock shifted by the configured offset (demos and
    tests move it to reach the end of a repeat window or of a license period)."""

    def __init__(self, offset_seconds: float = 0.0) -> None:
        self.offset_seconds = offset_seconds

    def now_ms(self) -> int:
        return int((time.time() + self.offset_seconds) * 1000)

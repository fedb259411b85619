"""Time as the scheduling core sees it: injected, so the simulator can run it on sim time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds; only differences matter to the core, event stamps use it as-is."""
        ...


class SystemClock:
    """Wall-clock unix seconds (event stamps are readable by other processes)."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to: tests and the simulator."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        """Move forward by ``dt`` seconds and return the new time."""
        if dt < 0:
            raise ValueError("time does not go backwards")
        self.t += dt
        return self.t

    def set(self, t: float) -> None:
        if t < self.t:
            raise ValueError("time does not go backwards")
        self.t = t

"""Prefill throughput measured on the device's own clock, without stalling it.

On CUDA a step's kernels run after its Python code returns. Timing a prefill step with
``perf_counter`` therefore measures the launches, unless the step happens to wait for
its results: a chunk that completes a prompt samples its first token (which waits),
a chunk in the middle of a long prompt does not. The rate the scheduler places by
then swings between a fraction of the real rate and hundreds of times it, by whether
the last step sampled.

:class:`StepClock` brackets each step with CUDA events and folds a step's tokens/s into
the moving average once its end event has completed (checked without blocking at the
next step and when stats are read). On CPU the work is done when the call returns, so
``perf_counter`` is exact and the figure is folded in at once.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Union

import torch

_Mark = Union[float, "torch.cuda.Event"]


class StepClock:
    """An exponential moving average of tokens per second over timed steps.

    Args:
        device: where the steps run.
        alpha: weight of the newest step in the average.
    """

    def __init__(self, device: torch.device, alpha: float = 0.2) -> None:
        self._cuda = device.type == "cuda"
        self._alpha = alpha
        self._pending: deque[tuple[int, torch.cuda.Event, torch.cuda.Event]] = deque()
        self._rate = 0.0
        self._tokens = 0.0
        self._seconds = 0.0

    def start(self) -> _Mark:
        """Mark the start of a step (on CUDA: an event on the current stream)."""
        if not self._cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, started: _Mark, tokens: int) -> None:
        """Mark the end of the step begun at ``started``, which computed ``tokens`` tokens."""
        if isinstance(started, float):
            self._fold(tokens, time.perf_counter() - started)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((tokens, started, end))
        self.poll()

    def add(self, seconds: float, tokens: int) -> None:
        """Fold in a step the caller timed itself (CPU steps, where the clock is exact)."""
        self._fold(tokens, seconds)

    def poll(self) -> None:
        """Fold in every pending step whose end event has completed (never waits)."""
        while self._pending and self._pending[0][2].query():
            tokens, start, end = self._pending.popleft()
            self._fold(tokens, start.elapsed_time(end) / 1000.0)

    @property
    def rate(self) -> float:
        """Tokens per second, averaged over the steps completed so far (0 before any)."""
        self.poll()
        return self._rate

    @property
    def step(self) -> tuple[float, float]:
        """(tokens, seconds) of a step, each averaged over the same steps as :attr:`rate`
        ((0, 0) before any): steps of several sizes tell a step's fixed cost from its cost
        per token."""
        self.poll()
        return self._tokens, self._seconds

    def _fold(self, tokens: int, seconds: float) -> None:
        self._rate = ema(self._rate, tokens / max(seconds, 1e-9), self._alpha)
        self._tokens = ema(self._tokens, float(tokens), self._alpha)
        self._seconds = ema(self._seconds, max(seconds, 1e-9), self._alpha)


def ema(old: float, new: float, alpha: float) -> float:
    """An exponential moving average step; ``old == 0`` means no sample yet."""
    return new if old == 0.0 else (1 - alpha) * old + alpha * new

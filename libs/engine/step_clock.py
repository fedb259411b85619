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

    def add_mixed(self, seconds: float, decode_s: float, tokens: int) -> None:
        """Fold in a step that ran ``tokens`` prompt tokens and a decode batch in one forward
        (CPU), ``seconds`` in all, the batch's own step measured at ``decode_s``: the prompt
        tokens took what the step took beyond a decode step's time, folded only where that
        is at least the decode step's own. A small chunk beside a decode batch leaves a
        difference of two similar times, which the decode step's swings (node processes
        preempting each other, a batch that just grew) can make near zero: a chunk of 20
        tokens read as 8,000 tokens/s on a node that prefills 850, and a node pacing its
        prompts by that rate gives them ten times the time its streams can spare."""
        prefill_s = seconds - decode_s
        if prefill_s >= decode_s and prefill_s > 0:
            self._fold(tokens, prefill_s)

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


class CpuShare:
    """The share of its threads' time a CPU engine's steps got, an exponential moving
    average over the steps: CPU time spent over wall time times threads.

    Node processes that share cores (several nodes on one host, more threads than cores
    between them) are preempted by each other: a step then takes longer on the wall clock
    than the work it did, and this share says by how much (1: the step had its cores to
    itself). With one thread the work runs on the stepping thread and its CPU time is
    exact; with more, the process's CPU time counts every thread (threads that spin while
    they wait count as busy, so the share errs high).

    Args:
        threads: the threads the engine computes with (``torch.get_num_threads()``).
        alpha: weight of the newest step in the average.
    """

    def __init__(self, threads: int, alpha: float = 0.2) -> None:
        self.threads = max(1, threads)
        self._clock = time.thread_time if self.threads == 1 else time.process_time
        self._alpha = alpha
        self._share = 0.0

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), self._clock()

    def stop(self, started: tuple[float, float]) -> None:
        wall = time.perf_counter() - started[0]
        if wall < _MIN_TIMED_S:
            return  # too short to time
        share = (self._clock() - started[1]) / (wall * self.threads)
        self._share = ema(self._share, min(1.0, max(share, 1e-3)), self._alpha)

    @property
    def share(self) -> float:
        """The moving share, in (0, 1] (0 before any step was timed)."""
        return self._share


_MIN_TIMED_S = 1e-4


def ema(old: float, new: float, alpha: float) -> float:
    """An exponential moving average step; ``old == 0`` means no sample yet."""
    return new if old == 0.0 else (1 - alpha) * old + alpha * new

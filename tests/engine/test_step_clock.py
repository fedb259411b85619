"""StepClock: prefill tokens/s from device time, folded in only once a step has completed."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from libs.engine import step_clock
from libs.engine.step_clock import StepClock


class FakeEvent:
    """A CUDA event on a fake timeline: ``record`` stamps the next scripted time,
    ``query`` says whether the device has reached it."""

    now_ms = 0.0  # how far the fake device has run
    script: ClassVar[list[float]] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None

    def record(self) -> None:
        self.at = FakeEvent.script.pop(0)

    def query(self) -> bool:
        assert self.at is not None
        return self.at <= FakeEvent.now_ms

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.query() and end.query(), "elapsed_time of an event not completed would block"
        return end.at - self.at  # type: ignore[operator]


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> type[FakeEvent]:
    FakeEvent.now_ms = 0.0
    FakeEvent.script = []
    monkeypatch.setattr(step_clock.torch.cuda, "Event", FakeEvent)
    return FakeEvent


def test_cuda_step_counts_device_time_once_done_not_launch_time(fake_cuda: type[FakeEvent]) -> None:
    clock = StepClock(torch.device("cuda", 0), alpha=0.5)
    # Step 1: 8000 tokens from t=0 to t=400 ms on the device; its Python returned long before.
    fake_cuda.script = [0.0, 400.0]
    mark = clock.start()
    clock.stop(mark, 8000)
    assert clock.rate == 0.0  # not done: nothing folded, and nothing waited for
    fake_cuda.now_ms = 400.0
    assert clock.rate == pytest.approx(20_000.0)
    # Step 2 (2000 tokens, 400 -> 600 ms) and step 3 (4000 tokens, 600 -> 1000 ms): folded in order.
    fake_cuda.script = [400.0, 600.0, 600.0, 1000.0]
    for tokens in (2000, 4000):
        clock.stop(clock.start(), tokens)
    fake_cuda.now_ms = 700.0
    assert clock.rate == pytest.approx(0.5 * 20_000 + 0.5 * 10_000)  # step 3 still running
    fake_cuda.now_ms = 1000.0
    assert clock.rate == pytest.approx(0.5 * 15_000 + 0.5 * 10_000)
    # The mean step over the same steps, tokens and device seconds each (what lets the
    # scheduler fit a pass's fixed and per-token cost): 8000/0.4 s, then 2000/0.2, 4000/0.4.
    tokens, seconds = clock.step
    assert tokens == pytest.approx(0.5 * (0.5 * 8000 + 0.5 * 2000) + 0.5 * 4000)
    assert seconds == pytest.approx(0.5 * (0.5 * 0.4 + 0.5 * 0.2) + 0.5 * 0.4)


def test_cpu_step_is_folded_at_once() -> None:
    clock = StepClock(torch.device("cpu"), alpha=0.2)
    assert clock.rate == 0.0 and clock.step == (0.0, 0.0)
    mark = clock.start()
    sum(range(10_000))
    clock.stop(mark, 1000)
    first = clock.rate
    assert first > 0
    clock.stop(clock.start(), 0)  # a step of no tokens pulls the average down by alpha
    assert clock.rate == pytest.approx(0.8 * first)


def test_cpu_share_is_cpu_time_over_wall_time_of_the_steps() -> None:
    """A step that computes gets its thread's time; one that waits (preempted, or here
    asleep) gets none of it: the share tells the two apart, whatever the machine's speed."""
    import time

    from libs.engine.step_clock import CpuShare

    waiting, computing = CpuShare(threads=1, alpha=1.0), CpuShare(threads=1, alpha=1.0)
    assert waiting.share == 0.0  # nothing timed yet
    mark = waiting.start()
    time.sleep(0.02)
    waiting.stop(mark)
    mark = computing.start()
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        pass
    computing.stop(mark)
    assert 0.0 < waiting.share < 0.5 and 0.0 < computing.share <= 1.0
    assert computing.share > waiting.share


def test_a_cpu_engine_reports_its_threads_and_their_share() -> None:
    from tests.engine.conftest import make_engine, run_all

    engine = make_engine()
    assert engine.stats().cpu_threads == torch.get_num_threads() and engine.stats().cpu_share == 0.0
    run_all(engine, {"a": list(range(1, 40)), "b": list(range(5, 30))})
    assert 0.0 < engine.stats().cpu_share <= 1.0


def test_a_mixed_step_is_charged_to_the_prefill_only_where_the_prefill_is_the_larger_part() -> None:
    clock = StepClock(torch.device("cpu"), alpha=1.0)
    # 400 prompt tokens beside a 20 ms decode batch in 0.5 s: 480 ms of prefill.
    clock.add_mixed(0.5, 0.02, 400)
    assert clock.rate == pytest.approx(400 / 0.48)
    # 20 tokens in a 43 ms step beside a batch measured at 40 ms: 3 ms left would read as
    # 6,700 tokens/s; the difference is the decode step's noise, not the prompt's time.
    clock.add_mixed(0.043, 0.04, 20)
    assert clock.rate == pytest.approx(400 / 0.48)
    clock.add_mixed(0.1, 0.04, 50)  # 60 ms beside 40: folded
    assert clock.rate == pytest.approx(50 / 0.06)

"""Bounded steps: the token budget follows the target step time and the measured rates,
and every step advances every running decode."""

from __future__ import annotations

from libs.engine.sampling import SamplingParams
from tests.engine.conftest import make_engine, run_all, tokens_of


def test_budget_follows_the_measured_prefill_rate_and_the_decode_step():
    engine = make_engine(max_num_batched_tokens=4096, target_step_s=0.25, min_step_tokens=32)
    # Before any prefill was measured: the floor.
    assert engine.step_budget() == 32
    engine._prefill_clock._rate = 1000.0  # tokens/s, as if measured
    assert engine.step_budget() == 250
    # With running decodes, their step time comes off the target and they are counted.
    engine._decode_step_s = 0.05
    engine.scheduler.running = [_Decoding() for _ in range(3)]
    assert engine.step_budget() == 3 + 200
    # A fast device is capped by max_num_batched_tokens, a slow one floored.
    engine._prefill_clock._rate = 1e9
    assert engine.step_budget() == 4096
    engine._prefill_clock._rate = 10.0
    assert engine.step_budget() == 3 + 32
    engine.scheduler.running = []


def test_zero_target_is_a_fixed_budget():
    engine = make_engine(max_num_batched_tokens=512, target_step_s=0.0)
    engine._prefill_clock._rate = 100.0
    assert engine.step_budget() == 512


def test_decodes_advance_every_step_while_a_long_prompt_is_chunked():
    # A tiny budget forces the 300-token prompt into many chunks.
    engine = make_engine(max_num_batched_tokens=4096, target_step_s=1e-9, min_step_tokens=16, num_blocks=256)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request("short", list(range(10, 18)), params)
    while not any(o.token_ids for o in engine.step()):
        pass  # the short request's prefill, then its first token
    engine.add_request("long", list(range(100, 400)), params)
    chunked_steps = 0
    while True:
        plan_before = engine.scheduler.num_prefill_tokens_left()
        outs = {o.request_id: o for o in engine.step()}
        if plan_before > 0:
            chunked_steps += 1
            # the short request got its token in this step, whatever the prefill did
            assert "short" in outs and outs["short"].token_ids, outs
        if engine.scheduler.num_prefill_tokens_left() == 0:
            break
    assert chunked_steps >= 300 // 16 - 1


def test_outputs_are_the_same_whatever_the_budget():
    prompts = {f"r{i}": list(range(5 + i, 5 + i + 37 * (i + 1))) for i in range(3)}
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    small = run_all(make_engine(target_step_s=1e-9, min_step_tokens=8), prompts, params)
    large = run_all(make_engine(target_step_s=0.0), prompts, params)
    assert {r: tokens_of(o) for r, o in small.items()} == {r: tokens_of(o) for r, o in large.items()}


class _Decoding:
    """Stands in for a running request with one token left to compute (a decode)."""

    num_uncomputed = 1

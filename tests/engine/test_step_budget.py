"""Bounded steps: the token budget follows the target step time and the measured rates,
and every step advances every running decode."""

from __future__ import annotations

from libs.engine.config import EngineConfig
from libs.engine.sampling import SamplingParams
from tests.engine.conftest import make_engine, run_all, tokens_of


def test_budget_follows_the_measured_prefill_rate_and_the_decode_step():
    engine = make_engine(max_num_batched_tokens=4096, target_step_s=0.25, min_step_tokens=32)
    engine.scheduler.running = [_Decoding() for _ in range(3)]
    # Before any prefill was measured: the decodes and the floor.
    assert engine.step_budget() == 3 + 32
    engine._prefill_clock._rate = 1000.0  # tokens/s, as if measured
    # The decodes' step time comes off the target and they are counted.
    engine._decode_step_s = 0.05
    assert engine.step_budget() == 3 + 200
    # A fast device is capped by max_num_batched_tokens, a slow one floored.
    engine._prefill_clock._rate = 1e9
    assert engine.step_budget() == 4096
    engine._prefill_clock._rate = 10.0
    assert engine.step_budget() == 3 + 32
    engine.scheduler.running = []


def test_a_step_without_decodes_takes_the_whole_budget_unless_its_prompts_are_prefill_only():
    engine = make_engine(max_num_batched_tokens=4096, target_step_s=0.25, min_step_tokens=32)
    engine._prefill_clock._rate = 1000.0
    params = SamplingParams(max_tokens=4, temperature=0.0)
    engine.add_request("here", list(range(10, 50)), params)
    assert engine.step_budget() == 4096  # no stream to stall
    engine.add_request("handoff", list(range(60, 100)), params, prefill_only=True)
    assert engine.step_budget() == 250  # a prefill node: one prompt after another, each handed off sooner


def test_a_wave_of_prompts_prefills_in_one_step_then_decodes_together():
    # The target alone would chunk each 40-token prompt into 3 steps.
    engine = make_engine(max_num_batched_tokens=4096, target_step_s=1e-9, min_step_tokens=16, num_blocks=256)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", list(range(10 + i, 50 + i)), params)
    first = {o.request_id for o in engine.step() if o.token_ids}
    assert first == {"r0", "r1", "r2", "r3"}
    engine.add_request("late", list(range(200, 240)), params)  # decodes run now: this one is chunked
    plan = engine.scheduler.schedule(engine.step_budget())
    assert len(plan.decodes) == 4 and [n for _, n in plan.prefills] == [16]


def test_a_prompt_a_little_over_the_budget_is_finished_rather_than_split():
    params = SamplingParams(max_tokens=4, temperature=0.0)

    def chunks(prompt_len: int, budget: int, **kw) -> list[int]:
        engine = make_engine(num_blocks=256, **kw)
        engine.add_request("p", list(range(10, 10 + prompt_len)), params)
        return [n for _, n in engine.scheduler.schedule(budget).prefills]

    assert chunks(80, 40) == [80]  # twice the budget: one step
    assert chunks(81, 40) == [40]  # more: split at the budget
    assert chunks(60, 40, chunk_slack=0.5) == [60]
    assert chunks(61, 40, chunk_slack=0.5) == [40]
    assert chunks(60, 40, chunk_slack=0.0) == [40]
    assert chunks(60, 40, max_num_batched_tokens=50) == [40]  # never past max_num_batched_tokens
    assert EngineConfig(device="cpu").chunk_slack == 1.0
    assert EngineConfig(device="cuda", dtype="bfloat16").chunk_slack == 0.0  # split at the budget on a GPU
    # The rest of a prompt already being chunked follows the same rule.
    engine = make_engine(num_blocks=256)
    engine.add_request("p", list(range(10, 130)), params)
    plan = engine.scheduler.schedule(40)
    assert [n for _, n in plan.prefills] == [40]
    engine.scheduler.running[0].num_computed_tokens = 40
    assert [n for _, n in engine.scheduler.schedule(40).prefills] == [80]


def test_gather_wait_is_a_share_of_the_expected_prefill_and_only_for_an_idle_engine():
    engine = make_engine(max_num_batched_tokens=4096, prefill_gather_s=0.02)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    engine.add_request("a", list(range(10, 110)), params)  # 100 tokens
    assert engine.gather_wait_s() == 0.0  # no prefill measured yet
    engine._prefill_clock._rate = 1000.0
    assert abs(engine.gather_wait_s() - 0.005) < 1e-9  # 5% of 0.1 s
    engine._prefill_clock._rate = 100.0
    assert engine.gather_wait_s() == 0.02  # capped
    engine.add_request("p", list(range(10, 20)), params, prefill_only=True)
    assert engine.gather_wait_s() == 0.0  # a prefill-only prompt never waits
    engine.abort("p")
    engine.step()  # "a" is running now
    engine.add_request("b", list(range(10, 20)), params)
    assert engine.gather_wait_s() == 0.0
    assert make_engine(prefill_gather_s=0.0).gather_wait_s() == 0.0


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

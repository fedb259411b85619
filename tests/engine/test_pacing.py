"""Pacing prompts against the decodes' objectives (:mod:`libs.engine.pacing`): the rules,
and the engine's step budget that follows them."""

from __future__ import annotations

import math

from libs.engine.pacing import (STEP_GROWTH, TTFT_GUARD, Decoding, Objectives, Waiting, prefill_allowance, prefill_slack,
                                prompt_due)
from libs.engine.sampling import SamplingParams
from tests.engine.conftest import make_engine


def test_the_slack_is_what_the_tightest_sequence_leaves_after_its_own_steps():
    # 10 steps of 50 ms left, due in 1 s: a pass may take 1 - 1.2 x 0.5 s.
    loose, tight = Decoding(limit=101.0, steps_left=10), Decoding(limit=100.8, steps_left=10)
    assert math.isclose(prefill_slack(100.0, [loose], 0.05), 1.0 - STEP_GROWTH * 0.5)
    assert math.isclose(prefill_slack(100.0, [loose, tight], 0.05), 0.8 - STEP_GROWTH * 0.5)
    # Within its objective only with no growth at all: no slack, but still held for.
    assert prefill_slack(100.0, [Decoding(100.55, 10)], 0.05) == 0.0
    # One that misses its objective even without any prefill is not waited for.
    assert prefill_slack(100.0, [Decoding(100.3, 10)], 0.05) == math.inf
    assert prefill_slack(100.0, [Decoding(100.3, 10), loose], 0.05) == prefill_slack(100.0, [loose], 0.05)
    assert prefill_slack(100.0, [], 0.05) == math.inf


def test_a_prompt_is_due_when_one_more_step_of_waiting_would_cost_its_ttft_objective():
    step = 0.05
    # Due in 3 s, 0.5 s of prefill: waiting a step still leaves it in time.
    assert not prompt_due(100.0, [Waiting(103.0, 3.0, 0.5)], step)
    # The guard (a tenth of the objective) is kept in hand: 0.35 s before the deadline
    # less the guard, the prompt is due.
    late = 103.0 - TTFT_GUARD * 3.0 - (step + 0.5 + step)
    assert prompt_due(late, [Waiting(103.0, 3.0, 0.5)], step)
    assert not prompt_due(late - 0.01, [Waiting(103.0, 3.0, 0.5)], step)
    # Prompts are run in order: one behind a long prompt is due sooner than alone.
    queue = [Waiting(110.0, 3.0, 2.5), Waiting(103.0, 3.0, 0.1)]
    assert prompt_due(100.0, queue, step) and not prompt_due(100.0, queue[1:], step)
    # A due prompt lifts the streams' bound; otherwise the bound is theirs.
    tight = [Decoding(limit=100.55, steps_left=10)]
    assert prefill_allowance(100.0, tight, queue, step) == math.inf
    assert prefill_allowance(100.0, tight, queue[1:], step) == prefill_slack(100.0, tight, step) == 0.0


def _decoding_engine(tpot_slo_s: float, step_s: float):  # type: ignore[no-untyped-def]
    """An engine with one request decoding under ``tpot_slo_s`` (39 tokens to go), its
    prefill rate measured at 1000 tokens/s and its decode step at ``step_s``."""
    engine = make_engine(max_num_batched_tokens=4096, target_step_s=0.25, min_step_tokens=32)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request("d", list(range(10, 30)), params, objectives=Objectives(ttft_slo_s=10.0, tpot_slo_s=tpot_slo_s))
    while not any(o.token_ids for o in engine.step()):
        pass
    engine._prefill_clock._rate = 1000.0  # as if measured
    engine._decode_step_s = step_s
    return engine, params


def test_prompts_get_only_what_the_decodes_tpot_objectives_leave():
    # 100 ms objective, 80 ms steps: 39 x (0.1 - 1.2 x 0.08) = 0.156 s of prefill a step.
    engine, params = _decoding_engine(0.1, 0.08)
    engine.add_request("p", list(range(40, 540)), params, objectives=Objectives(ttft_slo_s=3.0, tpot_slo_s=0.1))
    assert engine.scheduler.num_decoding == 1
    assert abs(engine.step_budget() - (1 + 156)) <= 1  # the target alone gives 1 + 170
    # 90 ms steps: nothing left over; the step only decodes, and the prompt waits.
    engine, params = _decoding_engine(0.1, 0.09)
    engine.add_request("p", list(range(40, 540)), params, objectives=Objectives(ttft_slo_s=3.0, tpot_slo_s=0.1))
    assert engine.step_budget() == 1
    plan = engine.scheduler.schedule(engine.step_budget())
    assert [r.request_id for r in plan.decodes] == ["d"] and not plan.prefills


def test_a_prompt_due_or_without_a_ttft_objective_does_not_wait():
    engine, params = _decoding_engine(0.1, 0.09)
    # It waited 2.9 s of its 3 s before it came: due now.
    engine.add_request("p", list(range(40, 540)), params,
                       objectives=Objectives(ttft_slo_s=3.0, tpot_slo_s=0.1, waited_s=2.9))
    assert engine.step_budget() == 1 + 160  # the target's budget
    engine, params = _decoding_engine(0.1, 0.09)
    engine.add_request("p", list(range(40, 540)), params)  # no objectives
    assert engine.step_budget() == 1 + 160
    # Nor does one when no decoding sequence has a TPOT objective.
    engine, params = _decoding_engine(0.0, 0.09)
    engine.add_request("p", list(range(40, 540)), params, objectives=Objectives(ttft_slo_s=3.0))
    assert engine.step_budget() == 1 + 160


def test_a_paced_prompt_runs_in_the_slack_the_decodes_build_and_its_output_is_unchanged():
    # The decodes run far faster than the 90 ms taken for them: their lead over their
    # objective grows, and the prompt runs in it, well before its own TTFT is due.
    engine, params = _decoding_engine(0.1, 0.09)
    engine.add_request("p", list(range(40, 140)), params, objectives=Objectives(ttft_slo_s=60.0, tpot_slo_s=0.1))
    p = engine.scheduler.waiting[0]
    outs: dict[str, list[int]] = {"d": [], "p": []}
    waited = 0
    for _ in range(1000):
        if not engine.has_work():
            break
        engine._decode_step_s = 0.09  # the measured steps of this tiny model are far shorter
        paced = engine.scheduler.num_decoding and engine.step_budget() == engine.scheduler.num_decoding
        before = p.num_computed_tokens
        for o in engine.step():
            outs[o.request_id] += o.token_ids
        if paced:
            waited += 1
            assert p.num_computed_tokens == before  # a paced step only decodes
    assert waited >= 1 and outs["d"] and len(outs["p"]) == 40
    alone = make_engine(max_num_batched_tokens=4096)
    alone.add_request("p", list(range(40, 140)), params)
    expected: list[int] = []
    while alone.has_work():
        for o in alone.step():
            expected += o.token_ids
    assert outs["p"] == expected

"""Goodput planning: which shape the flowkv policy moves toward, and prefix-aware placement."""

from __future__ import annotations

import math

import pytest

from libs.protocol.messages import Placement, PlaceRequest, Role
from libs.scheduler.clock import ManualClock
from libs.scheduler.cost_model import CostModel
from libs.scheduler.demand import Placed
from libs.scheduler.goodput import Load, Objectives, Rates, Shape, next_move, path, shapes
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import make_policy
from libs.scheduler.role_controller import RoleConfig, RoleController
from tests.scheduler.helpers import report


def _registry(*reports, at: float = 20.0):
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=1000.0)
    for r in reports:
        reg.update(r)
    clock.set(at)
    return clock, reg


def _controller(reg: NodeRegistry, **kw) -> RoleController:
    return RoleController(reg, RoleConfig(min_dwell_s=10.0, demand_window_s=10.0, **kw), CostModel())


def _prompt_heavy(ctl: RoleController, now: float, **slo) -> None:
    # 30 requests of 6000 prompt tokens and 20 output tokens in 10 s: 18k prompt tokens/s
    # against 10k tok/s nodes; 60 output tokens/s.
    for i in range(30):
        ctl.demand.record(now - 5.0, f"r{i}", 6000, 20, 377, **slo)


def test_shapes_cover_every_split_and_keep_both_sides() -> None:
    assert len(shapes(4)) == 13  # 15 shapes of 4 nodes minus all-prefill and all-decode
    assert Shape(4, 0, 0) not in shapes(4) and Shape(0, 4, 0) in shapes(4) and Shape(1, 0, 3) in shapes(4)
    assert next_move(Shape(2, 0, 2), Shape(0, 4, 0))[0] == (Role.PREFILL, Role.HYBRID)
    assert next_move(Shape(0, 4, 0), Shape(3, 0, 1)) == [(Role.HYBRID, Role.PREFILL), (Role.HYBRID, Role.DECODE)]


def test_a_move_goes_through_the_best_shapes_on_its_way() -> None:
    assert path(Shape(2, 0, 2), Shape(2, 0, 2)) == []
    assert path(Shape(2, 0, 2), Shape(0, 4, 0)) == [Shape(1, 1, 2), Shape(1, 2, 1), Shape(0, 3, 1), Shape(0, 4, 0)]
    rates = Rates(prefill_tokens_per_s=10_000.0, step_a_s=0.02, step_b_s=0.0, batch_cap=64.0)
    load = Load([Placed(0.0, f"r{i}", 6000, 20, 377) for i in range(30)], 10.0, rates, Objectives(3.0, 0.2), 0.0)
    # Ranked by the forecast, decode nodes go first: 2P/1H/1D gives the prompts three nodes
    # (u = 0.6, all within the objectives), 1P/1H/2D leaves them two (u = 0.9: the 2.7 s
    # wait puts every prompt past the 3 s TTFT objective).
    way = path(Shape(2, 0, 2), Shape(0, 4, 0), lambda s: -load.forecast(s).goodput)
    assert way == [Shape(2, 1, 1), Shape(2, 2, 0), Shape(1, 3, 0), Shape(0, 4, 0)]
    assert load.forecast(Shape(2, 1, 1)).goodput == pytest.approx(1.0) and load.forecast(Shape(1, 1, 2)).goodput == 0.0


def test_forecast_tpot_on_decode_and_hybrid_nodes() -> None:
    rates = Rates(prefill_tokens_per_s=10_000.0, step_a_s=0.02, step_b_s=0.0, batch_cap=64.0)
    placed = [Placed(0.0, f"r{i}", 6000, 20, 377) for i in range(30)]
    load = Load(placed, 10.0, rates, Objectives(3.0, 0.2), confidence=0.0)
    split = load.forecast(Shape(3, 0, 1))
    # u = 18k / (10k x 3) = 0.6 on the prefill nodes; the decode node steps at a = 20 ms.
    assert split.load == pytest.approx(0.6)
    assert split.tpot_decode_s == pytest.approx(0.02)
    hybrid = load.forecast(Shape(0, 4, 0))
    # u = 0.45; 0.75 prompts/s per node: TPOT = a / (1 - u - a x 0.75) = 0.02 / 0.535
    assert hybrid.tpot_hybrid_s == pytest.approx(0.02 / 0.535)
    assert hybrid.goodput == pytest.approx(1.0)
    # Two prefill nodes run at 0.9: the M/G/1 wait, 1.5/s x 0.36 s^2 / (2 x 0.1) = 2.7 s,
    # puts every 0.6 s prompt past the 3 s TTFT objective.
    two = load.forecast(Shape(2, 0, 2))
    assert two.ttft_wait_s == pytest.approx(2.7) and two.goodput == 0.0


def test_prompt_heavy_load_with_tpot_slack_goes_all_hybrid() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1), report("d2", Role.DECODE))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.2)
    _prompt_heavy(ctl, clock.now())
    change, events = ctl.step()
    assert ctl.last_plan is not None and ctl.last_plan.shape == Shape(0, 4, 0)
    # The first flip is the one whose shape on the way serves best: a decode node going
    # hybrid gives the prompts a third node (2P/1H/1D), a prefill node would not (1P/1H/2D).
    assert change is not None and change.new_role == Role.HYBRID and change.old_role == Role.DECODE
    assert "goodput: 2P/0H/2D" in events[0].detail and "0P/4H/0D" in events[0].detail


def test_decode_interference_breaking_tpot_splits_a_hybrid_cluster() -> None:
    clock, reg = _registry(*(report(f"h{i}", Role.HYBRID, running=1) for i in range(4)))
    # The same load, but a TPOT objective of 30 ms: a hybrid node's decode steps wait for
    # the prompts between them (37 ms a token), a decode node's do not (20 ms).
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.03)
    _prompt_heavy(ctl, clock.now())
    change, _ = ctl.step()
    best = ctl.last_plan
    assert best is not None and best.shape.hybrid == 0 and best.shape.decode >= 1
    assert best.tpot_decode_s <= 0.03 < ctl.goodput_load(reg.nodes())[0].forecast(Shape(0, 4, 0)).tpot_hybrid_s
    assert change is not None and change.old_role == Role.HYBRID and change.new_role in (Role.PREFILL, Role.DECODE)


def test_without_objectives_the_default_planner_plans_for_throughput() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1), report("d2", Role.DECODE))
    ctl = _controller(reg)  # no objectives: every served request counts
    _prompt_heavy(ctl, clock.now())
    load, _ = ctl.goodput_load(reg.nodes())
    assert list(load.groups) == [(math.inf, math.inf)]
    # 2P/2D: prefill nodes at u = 18k / 20k = 0.9 (x 1.18 for the window's 30 requests: past
    # capacity); four hybrid nodes share the prompts at 0.53: the shape of most capacity.
    change, _ = ctl.step()
    assert ctl.last_plan is not None and ctl.last_plan.shape == Shape(0, 4, 0)
    assert change is not None and change.new_role == Role.HYBRID


def test_objectives_per_request_turn_planning_on_under_the_split_planner() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1), report("d2", Role.DECODE))
    ctl = _controller(reg, planner="split")  # no deployment objectives: the split rules
    _prompt_heavy(ctl, clock.now())
    assert ctl.goodput_load(reg.nodes()) is None
    ctl2 = _controller(reg, planner="split")
    _prompt_heavy(ctl2, clock.now(), ttft_slo_s=3.0, tpot_slo_s=0.2)
    load, _ = ctl2.goodput_load(reg.nodes())
    assert list(load.groups) == [(3.0, 0.2)]
    change, _ = ctl2.step()
    assert change is not None and change.new_role == Role.HYBRID


def test_a_thin_window_with_objectives_flips_nothing() -> None:
    clock, reg = _registry(report("h1", Role.HYBRID), report("h2", Role.HYBRID, waiting_tokens=90_000))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.2)
    ctl.demand.record(clock.now() - 1.0, "only", 6000, 20, 377)
    # The queue signals alone would give a hybrid back a single role; with objectives the
    # controller waits for a window it can plan from.
    assert ctl.step() == (None, [])


@pytest.mark.parametrize("policy", ["flowkv", "colocated"])
def test_prompt_goes_where_its_prefix_sits_when_that_wins(policy: str) -> None:
    hashes = list(range(1, 257))  # a 4096-token prompt, every block cached on h1
    _, reg = _registry(report("h1", Role.HYBRID, waiting_tokens=1000, cached=hashes), report("h2", Role.HYBRID))
    pol = make_policy(policy, reg)
    req = PlaceRequest(request_id="a", model="m", num_prompt_tokens=4096, max_tokens=8, prefix_hashes=hashes)
    out = pol.place(req)
    # h1: (1000 queued + 1 uncached) / 10k = 0.10 s against h2's 4096 / 10k = 0.41 s.
    assert isinstance(out, Placement) and (out.prefill_node, out.decode_node) == ("h1", "h1")
    _, reg = _registry(report("h1", Role.HYBRID, waiting_tokens=10_000, cached=hashes), report("h2", Role.HYBRID))
    out = make_policy(policy, reg).place(req)
    # h1's backlog (1.0 s) now outweighs the hit: h2 prefills it from scratch.
    assert isinstance(out, Placement) and out.prefill_node == "h2"


def test_colocated_pins_every_node_hybrid() -> None:
    _, reg = _registry(report("p1"), report("d1", Role.DECODE))
    pol = make_policy("colocated", reg)
    change, _ = pol.roles.step()
    assert change is not None and change.new_role == Role.HYBRID

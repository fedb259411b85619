"""Goodput planning: which shape the flowkv policy moves toward, and prefix-aware placement."""

from __future__ import annotations

import math
from dataclasses import replace

import msgspec
import pytest

from libs.protocol.messages import Placement, PlaceRequest, Role
from libs.scheduler.clock import ManualClock
from libs.scheduler.cost_model import CostModel
from libs.scheduler.demand import Placed
from libs.scheduler.goodput import Cores, Forecast, Load, Objectives, Rates, Shape, next_move, path, shape_of, shapes
from libs.scheduler.node_registry import NodeEntry, NodeRegistry
from libs.scheduler.placement_policies import make_policy
from libs.scheduler.role_controller import RoleChange, RoleConfig, RoleController
from tests.scheduler.helpers import first_flip, report


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
    # Spread evenly over the window (a steady load, no burst).
    for i in range(30):
        ctl.demand.record(now - 10.0 + (i + 0.5) / 3, f"r{i}", 6000, 20, 377, **slo)


def _steady(n: int = 30, window_s: float = 10.0, prompt: int = 6000, output: int = 20) -> list[Placed]:
    """``n`` requests arriving evenly over ``window_s``."""
    return [Placed((i + 0.5) * window_s / n, f"r{i}", prompt, output, 377) for i in range(n)]


def test_shapes_cover_every_split_and_keep_both_sides() -> None:
    assert len(shapes(4)) == 13  # 15 shapes of 4 nodes minus all-prefill and all-decode
    assert Shape(4, 0, 0) not in shapes(4) and Shape(0, 4, 0) in shapes(4) and Shape(1, 0, 3) in shapes(4)
    assert next_move(Shape(2, 0, 2), Shape(0, 4, 0))[0] == (Role.PREFILL, Role.HYBRID)
    assert next_move(Shape(0, 4, 0), Shape(3, 0, 1)) == [(Role.HYBRID, Role.PREFILL), (Role.HYBRID, Role.DECODE)]


def test_a_move_goes_through_the_best_shapes_on_its_way() -> None:
    assert path(Shape(2, 0, 2), Shape(2, 0, 2)) == []
    assert path(Shape(2, 0, 2), Shape(0, 4, 0)) == [Shape(1, 1, 2), Shape(1, 2, 1), Shape(0, 3, 1), Shape(0, 4, 0)]
    rates = Rates(prefill_tokens_per_s=10_000.0, step_a_s=0.02, step_b_s=0.0, batch_cap=64.0)
    load = Load(_steady(), 10.0, rates, Objectives(1.5, 0.2), 0.0, end_s=10.0)
    # Ranked by the forecast, decode nodes go first: 2P/1H/1D gives the prompts three nodes
    # (u = 0.6, all within the objectives), 1P/1H/2D leaves them two (u = 0.9: the 1.28 s
    # wait puts every 0.6 s prompt past the 1.5 s TTFT objective).
    way = path(Shape(2, 0, 2), Shape(0, 4, 0), lambda s: -load.forecast(s).goodput)
    assert way == [Shape(2, 1, 1), Shape(2, 2, 0), Shape(1, 3, 0), Shape(0, 4, 0)]
    assert load.forecast(Shape(2, 1, 1)).goodput == pytest.approx(1.0) and load.forecast(Shape(1, 1, 2)).goodput == 0.0


def test_forecast_tpot_on_decode_and_hybrid_nodes() -> None:
    rates = Rates(prefill_tokens_per_s=10_000.0, step_a_s=0.02, step_b_s=0.0, batch_cap=64.0)
    load = Load(_steady(), 10.0, rates, Objectives(1.5, 0.2), confidence=0.0, end_s=10.0)
    split = load.forecast(Shape(3, 0, 1))
    # u = 18k / (10k x 3) = 0.6 on the prefill nodes; the decode node steps at a = 20 ms.
    assert split.load == pytest.approx(0.6)
    assert split.tpot_decode_s == pytest.approx(0.02)
    hybrid = load.forecast(Shape(0, 4, 0))
    # u = 0.45; 0.75 prompts/s per node: TPOT = a / (1 - u - a x 0.75) = 0.02 / 0.535
    assert hybrid.tpot_hybrid_s == pytest.approx(0.02 / 0.535)
    assert hybrid.goodput == pytest.approx(1.0)
    # Two prefill nodes run at 0.9. Placement sends each prompt to the node that starts it
    # soonest, so the two serve one queue (M/G/2): a prompt waits only when both are busy
    # (Erlang C 0.853), 0.853 x 0.36 s^2 / (2 x 0.6 s x 2 x 0.1) = 1.28 s, not the 2.7 s of
    # two queues fed half the prompts each; still every 0.6 s prompt misses 1.5 s.
    two = load.forecast(Shape(2, 0, 2))
    assert two.ttft_wait_s == pytest.approx(1.2789, abs=1e-3) and two.goodput == 0.0
    # One node at 0.9 (half the requests): the Pollaczek-Khinchine wait, 1.5/s x 0.36 s^2 /
    # (2 x 0.1) = 2.7 s.
    half = Load(_steady(15), 10.0, rates, Objectives(1.5, 0.2), confidence=0.0, end_s=10.0)
    one = half.forecast(Shape(1, 0, 3))
    assert one.load == pytest.approx(0.9) and one.ttft_wait_s == pytest.approx(2.7)


def test_prompt_heavy_load_with_tpot_slack_goes_all_hybrid() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1), report("d2", Role.DECODE))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.2)
    _prompt_heavy(ctl, clock.now())
    changes, events = ctl.step()
    assert ctl.last_plan is not None and ctl.last_plan.shape == Shape(0, 4, 0)
    # Flips into hybrid take nothing from their nodes: the whole move is asked for at once,
    # each flip planned from the shape the ones before it leave. The first is the one whose
    # shape on the way serves best: a decode node going hybrid gives the prompts a third
    # node (2P/1H/1D), a prefill node would not (1P/1H/2D).
    assert [c.new_role for c in changes] == [Role.HYBRID] * 4
    assert {c.node_id for c in changes} == {"p1", "p2", "d1", "d2"} and changes[0].old_role == Role.DECODE
    assert [e.detail.split(":")[0] for e in events] == ["requested"] * 4
    assert "goodput: 2P/0H/2D" in events[0].detail and "0P/4H/0D" in events[0].detail
    assert "goodput: 2P/1H/1D" in events[1].detail
    tpot = ctl.last_plan.tpot_hybrid_s
    assert events[0].detail.endswith(f"(TPOT hybrid {1e3 * tpot:.0f} ms)") and 0 < tpot < 0.2
    assert ctl.step() == ([], [])  # every node is on its way: nothing more to ask
    for node_id in ("p1", "d1"):
        reg.update(report(node_id, Role.HYBRID))
    _, events = ctl.step()
    assert sorted(e.node_id for e in events) == ["d1", "p1"] and {e.detail for e in events} == {"done"}
    assert set(ctl.in_flight) == {"p2", "d2"}


def test_the_plan_is_on_the_schedulers_metrics() -> None:
    from prometheus_client import REGISTRY

    from services.scheduler import metrics

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1), report("d2", Role.DECODE))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.2)
    metrics.refresh_plan(ctl)  # nothing planned yet: no plan gauge
    assert value("flowkv_scheduler_plan_goodput", shape="best") is None
    _prompt_heavy(ctl, clock.now())
    first_flip(ctl)
    metrics.refresh_plan(ctl)
    best, now = ctl.last_plan, ctl.last_current
    assert best is not None and now is not None and now.shape == Shape(2, 0, 2)
    assert value("flowkv_scheduler_plan_goodput", shape="best") == best.goodput
    assert value("flowkv_scheduler_plan_goodput", shape="current") == now.goodput
    assert value("flowkv_scheduler_plan_load", shape="current") == now.load > best.load
    assert value("flowkv_scheduler_plan_nodes", shape="best", role="hybrid") == 4
    assert value("flowkv_scheduler_plan_nodes", shape="current", role="prefill") == 2
    assert value("flowkv_scheduler_plan_tpot_seconds", shape="best", role="hybrid") == best.tpot_hybrid_s
    assert value("flowkv_scheduler_plan_tpot_seconds", shape="best", role="decode") is None  # no decode node
    assert value("flowkv_scheduler_plan_tpot_seconds", shape="current", role="decode") == now.tpot_decode_s
    metrics.refresh_plan(None)  # a follower: no plan of its own
    assert value("flowkv_scheduler_plan_goodput", shape="best") is None


def test_decode_interference_breaking_tpot_splits_a_hybrid_cluster() -> None:
    clock, reg = _registry(*(report(f"h{i}", Role.HYBRID, running=1) for i in range(4)))
    # The same load, but a TPOT objective of 30 ms: a hybrid node's decode steps wait for
    # the prompts between them (37 ms a token), a decode node's do not (20 ms).
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.03)
    _prompt_heavy(ctl, clock.now())
    change, _ = first_flip(ctl)
    best = ctl.last_plan
    assert best is not None and best.shape.hybrid == 0 and best.shape.decode >= 1
    assert best.tpot_decode_s <= 0.03 < ctl.goodput_load(reg.nodes())[0].forecast(Shape(0, 4, 0)).tpot_hybrid_s
    assert change is not None and change.old_role == Role.HYBRID and change.new_role in (Role.PREFILL, Role.DECODE)


def test_flips_out_of_hybrid_go_one_at_a_time_and_after_the_flips_in_flight() -> None:
    # The split above takes several nodes out of hybrid; each drains work it no longer
    # serves, so they go one at a time, and none while another flip is in flight.
    clock, reg = _registry(*(report(f"h{i}", Role.HYBRID, running=1) for i in range(3)), report("d3", Role.DECODE))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.03)
    _prompt_heavy(ctl, clock.now())
    ctl.in_flight["d3"] = RoleChange("d3", Role.DECODE, Role.HYBRID, "test", clock.now())
    assert ctl.step() == ([], [])  # planned from 0P/4H/0D, but d3 is still on its way into hybrid
    assert ctl.last_current is not None and ctl.last_current.shape == Shape(0, 4, 0)
    reg.update(report("d3", Role.HYBRID, running=1))
    changes, events = ctl.step()
    assert [e.detail for e in events][0] == "done" and len(changes) == 1 and changes[0].old_role == Role.HYBRID
    assert ctl.step() == ([], [])  # its node has not reported the new role yet
    reg.update(report(changes[0].node_id, changes[0].new_role))
    later, _ = ctl.step()
    assert len(later) == 1 and later[0].old_role == Role.HYBRID and later[0].node_id != changes[0].node_id


def test_without_objectives_the_default_planner_plans_for_throughput() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1), report("d2", Role.DECODE))
    ctl = _controller(reg)  # no objectives: every served request counts
    _prompt_heavy(ctl, clock.now())
    load, _ = ctl.goodput_load(reg.nodes())
    assert list(load.groups) == [(math.inf, math.inf)]
    # 2P/2D: prefill nodes at u = 18k / 20k = 0.9 (x 1.18 for the window's 30 requests: past
    # capacity); four hybrid nodes share the prompts at 0.53: the shape of most capacity.
    change, _ = first_flip(ctl)
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
    change, _ = first_flip(ctl2)
    assert change is not None and change.new_role == Role.HYBRID


def test_a_thin_window_with_objectives_flips_nothing() -> None:
    clock, reg = _registry(report("h1", Role.HYBRID), report("h2", Role.HYBRID, waiting_tokens=90_000))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.2)
    ctl.demand.record(clock.now() - 1.0, "only", 6000, 20, 377)
    # The queue signals alone would give a hybrid back a single role; with objectives the
    # controller waits for a window it can plan from.
    assert ctl.step() == ([], [])


def test_a_light_load_is_planned_from_the_plans_own_window() -> None:
    # 0.5 req/s: a 5 s demand window holds two or three placements, fewer than the eight a
    # demand needs; the 30 s the plan weighs hold fifteen. The plan is made from those.
    clock, reg = _registry(report("p1", rate=250.0, step_s=0.06, device="cpu"),
                           report("p2", rate=250.0, step_s=0.06, device="cpu"),
                           report("d1", Role.DECODE, running=1, rate=250.0, step_s=0.06, device="cpu"),
                           report("d2", Role.DECODE, running=1, rate=250.0, step_s=0.06, device="cpu"), at=30.0)
    ctl = RoleController(reg, RoleConfig(min_dwell_s=3.0, demand_window_s=5.0, goodput_window_s=30.0,
                                         ttft_slo_s=5.0, tpot_slo_s=0.5), CostModel())
    for i in range(15):
        ctl.demand.record(1.0 + 2.0 * i, f"r{i}", 600, 32, 40)
    assert len(ctl.demand.window(clock.now())) < ctl.demand.min_placements
    view = ctl.goodput_load(reg.nodes())
    assert view is not None and view[0].num_requests == 15
    first_flip(ctl)
    assert ctl.last_plan is not None


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
    change, _ = first_flip(pol.roles)
    assert change is not None and change.new_role == Role.HYBRID


def test_a_burst_builds_a_backlog_that_the_windows_mean_hides() -> None:
    rates = Rates(prefill_tokens_per_s=10_000.0, step_a_s=0.02, step_b_s=0.0, batch_cap=64.0)
    steady = Load(_steady(), 10.0, rates, Objectives(3.0, 0.2), confidence=0.0, end_s=10.0)
    # The same 30 requests, all in the window's first 2 s.
    burst = Load(_steady(window_s=2.0), 10.0, rates, Objectives(3.0, 0.2), confidence=0.0, end_s=10.0)
    assert burst.prompt_tokens_per_s == steady.prompt_tokens_per_s
    # 3P/1D keeps up with the mean (u = 0.6: a 0.45 s wait, every prompt within 3 s), but
    # the burst brings 90k prompt tokens a second to 30k tok/s of prefill: 2 s of backlog
    # after its first second (a 1 s wait in it, all within), 4 s after its second (a 3 s
    # wait: none within).
    assert steady.forecast(Shape(3, 0, 1)).goodput == pytest.approx(1.0)
    assert burst.forecast(Shape(3, 0, 1)).goodput == pytest.approx(0.5)
    # Bursty arrivals tell the load less precisely than as many steady ones.
    assert steady.effective_requests == 30
    assert burst.effective_requests < 5


def test_overload_under_a_ttft_objective_plans_for_capacity() -> None:
    rates = Rates(prefill_tokens_per_s=10_000.0, step_a_s=0.02, step_b_s=0.0, batch_cap=64.0)
    # 24k prompt tokens and 6k output tokens a second: more than any shape of 4 nodes keeps up with.
    load = Load(_steady(60, prompt=4000, output=1000), 10.0, rates, Objectives(3.0, 0.2), confidence=0.0, end_s=10.0)
    forecasts = {s: load.forecast(s) for s in shapes(4)}
    assert all(f.load >= 1.0 for f in forecasts.values())
    # A mixed shape seems to serve a share (its prefill and decode nodes, while the hybrid
    # ones' queues grow), all hybrid none; all hybrid has the most capacity.
    seeming = max(forecasts.values(), key=lambda f: f.goodput)
    assert seeming.goodput > 0.1 and seeming.shape.hybrid not in (0, 4)
    best, _ = load.best(4, Shape(2, 0, 2))
    assert best.shape == Shape(0, 4, 0) == min(forecasts.values(), key=lambda f: f.load).shape
    # Without a TTFT objective a growing queue misses nothing: the share served within
    # the TPOT objective per second still decides.
    tpot_only = Load(_steady(60, prompt=4000, output=1000), 10.0, rates, Objectives(0.0, 0.2), confidence=0.0,
                     end_s=10.0)
    best, _ = tpot_only.best(4, Shape(2, 0, 2))
    assert best.shape != Shape(0, 4, 0) and best.goodput > 0


@pytest.mark.parametrize(("scale", "moves"), [(1.0, False), (1.4, True)])
def test_an_overload_within_the_windows_error_moves_nothing(scale: float, moves: bool) -> None:
    clock, reg = _registry(report("p0", Role.PREFILL), *(report(f"h{i}", Role.HYBRID, running=1) for i in range(3)))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.1)
    now = clock.now()
    n = round(30 * scale)  # 6000-token prompts and 1920-token answers, steady
    for i in range(n):
        ctl.demand.record(now - 10.0 + (i + 0.5) * 10 / n, f"r{i}", 6000, 1920, 10)
    load, _ = ctl.goodput_load(reg.nodes())
    best, current = load.best(4, Shape(1, 3, 0))
    # At the high end of what the window says of the load no shape keeps up, and all
    # hybrid has the most capacity: the move an overload asks for.
    assert best.shape == Shape(0, 4, 0) and 1.0 <= best.load < current.load * 0.95
    # At the low end 1P/3H/0D keeps up with 30 requests, and is left as it is; with 42 it
    # falls behind at both ends, and the prefill node turns hybrid.
    low = 1 - 1 / math.sqrt(load.effective_requests)
    assert (load.forecast(Shape(1, 3, 0), low).load >= 1.0) is moves
    change, _ = first_flip(ctl)
    assert (change.node_id, change.new_role) == ("p0", Role.HYBRID) if moves else change is None


def test_a_gain_within_the_windows_error_moves_nothing() -> None:
    clock, reg = _registry(*(report(f"h{i}", Role.HYBRID, running=1) for i in range(4)))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.03)
    now = clock.now()
    for i in range(30):  # 9k prompt tokens/s, steady
        ctl.demand.record(now - 10.0 + (i + 0.5) / 3, f"r{i}", 3000, 20, 377)
    load, _ = ctl.goodput_load(reg.nodes())
    best, current = load.best(4, Shape(0, 4, 0))
    # Weighed at the high end of what 30 requests say of the load (1 + 1 / sqrt(30)), the
    # interference puts a fifth of the hybrid nodes' requests past 30 ms a token and 2P/2D
    # gains more than the margin; at the low end hybrid nodes serve nearly all of them.
    margin = 0.5 / math.sqrt(30)
    assert best.shape == Shape(2, 0, 2) and best.goodput > current.goodput + margin
    low = 1 - 1 / math.sqrt(30)
    assert load.forecast(Shape(0, 4, 0), low).goodput > load.forecast(Shape(2, 0, 2), low).goodput - margin
    change, _ = first_flip(ctl)
    assert change is None


@pytest.mark.parametrize(("tpot_slo_s", "hybrid_runs", "moves"), [(0.04, False, False), (0.05, False, False),
                                                                  (0.06, False, True), (0.05, True, True)])
def test_a_lighter_shape_is_taken_only_at_no_predicted_loss(tpot_slo_s: float, hybrid_runs: bool, moves: bool) -> None:
    # 3P/1D keeps every request within the objectives at load 0.53; all hybrid would be
    # lighter (0.40), its TPOT predicted at 28 ms. At a 40 ms TPOT objective the
    # interference is predicted to cost it a few requests in a thousand, a loss within the
    # window's error (0.5 / sqrt(30)): a quiet window would move the cluster to a shape
    # that the load coming back finds short, so the split stays. At 50 ms and 60 ms both
    # are predicted to keep every request. With no hybrid node running, the 28 ms is the
    # model's guess: the lighter shape is taken for its room where the guess is within
    # half the objective (60 ms), not at 50 ms; once a hybrid node runs and measures what
    # its prompts cost its decode steps (2P/1H/1D), at 50 ms as well.
    nodes = ([report(f"p{i}", Role.PREFILL) for i in range(2)]
             + [report("h0", Role.HYBRID, running=2), report("d0", Role.DECODE, running=2)] if hybrid_runs
             else [report(f"p{i}", Role.PREFILL) for i in range(3)] + [report("d0", Role.DECODE, running=4)])
    clock, reg = _registry(*nodes)
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=tpot_slo_s)
    now = clock.now()
    for i in range(30):  # 9k prompt tokens/s, steady
        ctl.demand.record(now - 10.0 + (i + 0.5) / 3, f"r{i}", 3000, 20, 377)
    load, _ = ctl.goodput_load(reg.nodes())
    best, current = load.best(4, shape_of([r.role for r in nodes]))
    assert best.shape == Shape(0, 4, 0) and best.load < current.load * 0.8
    assert best.goodput > current.goodput - 0.5 / math.sqrt(30)
    assert best.goodput > current.goodput - 1e-3 or not moves
    if not hybrid_runs:
        assert current.goodput == pytest.approx(1.0, abs=1e-4)
        assert (best.goodput > current.goodput - 1e-3) == (tpot_slo_s >= 0.05)
        assert 0.025 < best.tpot_hybrid_s < 0.03
    change, _ = first_flip(ctl)
    assert (change is not None and change.new_role == Role.HYBRID) == moves


def _lighter_from_3p1d(nodes: list, tpot_slo_s: float, steps_seen: list[tuple[int, float, float]],
                       requests: tuple[int, int, int, int], lighter: Shape) -> tuple[RoleController, Load, Forecast]:
    """3P/1D ``nodes`` under ``requests`` (count over 10 s, steady; prompt, output tokens;
    KV blocks each), the step fits having seen ``steps_seen`` (batch, step with a core of
    its own, step as measured) 20 times each: (the controller, the window's load, the best
    shape's forecast), ``lighter`` being as good and lighter, so that only the room-alone
    rule can move the cluster."""
    clock, reg = _registry(*nodes)
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=tpot_slo_s)
    for _ in range(20):
        for batch, step, measured in steps_seen:
            ctl.demand.fit.add(batch, step)
            ctl.demand.measured_fit.add(batch, measured)
    now = clock.now()
    n, prompt, output, blocks = requests
    for i in range(n):
        ctl.demand.record(now - 10.0 + (i + 0.5) * 10.0 / n, f"r{i}", prompt, output, blocks)
    load, _ = ctl.goodput_load(reg.nodes())
    best, current = load.best(4, Shape(3, 0, 1))
    assert best.shape == lighter and best.load < current.load * 0.95 and current.load > 0.5
    assert best.goodput > current.goodput - 1e-3
    return ctl, load, best


def _lighter_all_hybrid(step_now_s: float, steps_seen: list[tuple[int, float]],
                        tpot_slo_s: float) -> tuple[RoleController, Load, Forecast]:
    """3P/1D at 13.5k prompt tokens/s, steady, with the decode node reporting
    ``step_now_s`` and the step fit having seen ``steps_seen`` (batch, step) 20 times each,
    all hybrid being as good and lighter (:func:`_lighter_from_3p1d`)."""
    nodes = [report(f"p{i}", Role.PREFILL) for i in range(3)] + [report("d0", Role.DECODE, running=4, step_s=step_now_s)]
    return _lighter_from_3p1d(nodes, tpot_slo_s, [(b, step, step) for b, step in steps_seen], (30, 4500, 20, 377),
                              Shape(0, 4, 0))


@pytest.mark.parametrize(("step_s", "moves"), [(0.02, True), (0.04, False)])
def test_the_hybrid_guess_is_no_lower_than_the_decode_nodes_step_now(step_s: float, moves: bool) -> None:
    # Node processes sharing a device: a decode node's step lengthens with the other
    # processes' prompts more than with its own batch, and the line through the (batch,
    # step) pairs the nodes reported (6 ms at 1 sequence, 40 ms at 8) puts nearly all of the
    # step on the batch. A hybrid node's small batch then looks nearly free: all hybrid,
    # lighter than 3P/1D and as good, is guessed at a few ms a token. The decode node runs
    # a 20 ms or a 40 ms step now; taken at that step whatever its batch, a hybrid node
    # would run 34 ms or 71 ms a token beside its prompts (u = 0.4): within half the 80 ms
    # objective at 20 ms, past it at 40 ms, where the split stays.
    ctl, load, best = _lighter_all_hybrid(step_s, [(1, 0.006), (8, 0.04)], tpot_slo_s=0.08)
    assert best.tpot_hybrid_s < 0.005
    assert load.tpot_hybrid_at_step(best.shape, step_s) == pytest.approx(0.034 if step_s == 0.02 else 0.071, rel=0.02)
    change, _ = first_flip(ctl)
    assert (change is not None and change.new_role == Role.HYBRID) == moves


@pytest.mark.parametrize(("late_step_s", "moves"), [(0.012, True), (0.04, False)])
def test_the_hybrid_guess_is_no_lower_than_the_steps_reported_lately(late_step_s: float, moves: bool) -> None:
    # The decode node's report now says 5 ms (a step between the other processes' prompts),
    # but its reports lately averaged 12 ms or 40 ms. All hybrid, lighter than 3P/1D and as
    # good, is a bet on the guess; taken at the recent mean, a hybrid node would run about
    # 20 ms or 71 ms a token beside its prompts (u = 0.4): within half the 60 ms objective
    # at 12 ms, past it at 40 ms, where the split stays. At the step now alone (9 ms), both
    # would move.
    ctl, load, best = _lighter_all_hybrid(0.005, [(1, late_step_s * 0.25), (8, late_step_s * 1.75)], tpot_slo_s=0.06)
    assert ctl.demand.fit.mean_step() == pytest.approx(late_step_s, rel=0.03)
    assert 2 * best.tpot_hybrid_s < 0.06
    assert 2 * load.tpot_hybrid_at_step(best.shape, 0.005) < 0.06
    assert load.tpot_hybrid_at_step(best.shape, late_step_s) == pytest.approx({0.012: 0.020, 0.04: 0.071}[late_step_s], rel=0.03)
    change, _ = first_flip(ctl)
    assert (change is not None and change.new_role == Role.HYBRID) == moves


@pytest.mark.parametrize(("decode_share", "late_share", "moves"),
                         [(1.0, 1.0, True), (0.5, 0.5, False), (1.0, 0.5, False)])
def test_on_shared_cores_the_hybrid_guess_is_no_lower_than_the_decode_step_as_measured(
        decode_share: float, late_share: float, moves: bool) -> None:
    # Four single-threaded CPU nodes on two cores, 3P/1D, 7 requests/s of 400 prompt and 8
    # output tokens. 3P/1H/0D is as good and lighter (0.37 against 0.56), and with cores
    # of their own the nodes' figures guess a hybrid node at 48 ms a token, within half the
    # 100 ms objective. The decode node runs 30 ms steps on a core of its own; where it
    # measures them at half its thread's time (60 ms on the wall clock: the cores are
    # busier than the model of the shape says), a hybrid node would take at least that
    # beside its prompts (105 ms), and the split stays; also where its report now, made
    # between the other nodes' prompts, says 30 ms and its reports lately said 60 ms.
    nodes = [_cpu_node(f"n{i}", Role.PREFILL, 2, 1.0, step_s=0.03) for i in range(3)]
    nodes.append(_cpu_node("n3", Role.DECODE, 2, decode_share, step_s=0.03))
    ctl, load, best = _lighter_from_3p1d(nodes, 0.1, [(2, 0.03, 0.03 / late_share)], (70, 400, 8, 30), Shape(3, 1, 0))
    assert 2 * load.tpot_hybrid_at_step(best.shape, 0.03) <= 0.1
    assert load.tpot_hybrid_at_step(best.shape, 0.03 / decode_share, stretched=False) >= 0.03 / decode_share
    change, _ = first_flip(ctl)
    assert (change is not None and change.new_role == Role.HYBRID) == moves


def _cpu_node(node_id: str, role: Role, cores: int, share: float, step_s: float = 0.04):  # type: ignore[no-untyped-def]
    """A single-threaded CPU node on one host with ``cores`` cores, measuring a ``step_s``
    decode step and 2,500 prompt tokens/s on a core of its own, reported at ``share`` of
    its thread's time (a step then takes 1 / share as long on the wall clock)."""
    r = report(node_id, role, running=2 if role != Role.PREFILL else 0, rate=2500.0 * share, step_s=step_s / share,
               device="cpu", device_name="cpu", transports=["shm", "tcp"])
    return msgspec.structs.replace(r, cpu_threads=1, cpu_set=list(range(cores)), cpu_share=share)


def _cpu_nodes(roles: list[Role], cores: int, share: float) -> list:
    """:func:`_cpu_node` in each of ``roles``, all at ``share``."""
    return [_cpu_node(f"n{i}", role, cores, share) for i, role in enumerate(roles)]


@pytest.mark.parametrize(("cores", "share", "split"), [(2, 0.5, True), (4, 1.0, False)])
def test_cpu_nodes_sharing_too_few_cores_are_weighed_at_the_shapes_stretch(cores: int, share: float, split: bool) -> None:
    # Four single-threaded hybrid nodes on one host, 2.5 requests/s of 400 prompt and 32
    # output tokens, TTFT 3 s and TPOT 100 ms. On four cores each node has its own, the
    # steps take 40 ms and all hybrid serves every request. On two cores the same nodes
    # measure 80 ms steps at half their thread's time: all hybrid keeps four threads busy
    # on two cores (stretch 2, about 105 ms a token beside the prompts, past the
    # objective), while three prefill nodes and one decode node keep one thread busy and
    # the prompts a fraction of three more: the decode node runs its 40 ms steps.
    clock, reg = _registry(*_cpu_nodes([Role.HYBRID] * 4, cores, share))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.1)
    now = clock.now()
    for i in range(50):
        ctl.demand.record(now - 20.0 + (i + 0.5) / 2.5, f"r{i}", 400, 32, 30)
    load, _ = ctl.goodput_load(reg.nodes())
    assert load.rates.prefill_tokens_per_s == pytest.approx(2500.0) and load.rates.step_a_s == pytest.approx(0.04)
    assert (load.rates.cores == Cores(1.0, 2)) if split else load.rates.cores is None
    hybrid, three_one = load.forecast(Shape(0, 4, 0)), load.forecast(Shape(3, 0, 1))
    assert three_one.tpot_decode_s < 0.05 and three_one.goodput == pytest.approx(1.0, abs=1e-3)
    assert (hybrid.tpot_hybrid_s > 0.1 and hybrid.goodput < 0.6) if split else hybrid.tpot_hybrid_s < 0.06
    change, _ = first_flip(ctl)
    assert ctl.last_plan is not None and (ctl.last_plan.shape.hybrid == 0) == split
    assert (change is not None and change.old_role == Role.HYBRID) == split


def test_cores_count_once_per_host_and_only_for_cpu_engines_that_report_them() -> None:
    def node(i: int, host: str, cpus: list[int], threads: int = 1) -> NodeEntry:
        r = report(f"n{i}", host=host, device="cpu", device_name="cpu")
        return NodeEntry(msgspec.structs.replace(r, cpu_threads=threads, cpu_set=cpus, cpu_share=1.0), 0.0, 0.0)

    # Four nodes on two cores of one host: short by half.
    assert Cores.of([node(i, "h", [0, 1]) for i in range(4)]) == Cores(1.0, 2)
    # Each pinned to cores of its own, or each on a host of its own: cores enough.
    assert Cores.of([node(i, "h", [i]) for i in range(4)]) is None
    assert Cores.of([node(i, f"h{i}", [0]) for i in range(4)]) is None
    # Two hosts of two cores, three two-threaded nodes on each: 12 threads on 4 cores.
    assert Cores.of([node(i, f"h{i % 2}", [0, 1], threads=2) for i in range(6)]) == Cores(2.0, 4)
    # A node that does not report its threads (a vLLM engine, a GPU): no model of the cores.
    bare = NodeEntry(report("x", host="h", device="cpu", device_name="cpu"), 0.0, 0.0)
    assert Cores.of([node(i, "h", [0, 1]) for i in range(4)] + [bare]) is None
    assert Cores(1.0, 2).stretch(Shape(0, 4, 0), 0.1, decoding=True) == pytest.approx(2.0)
    assert Cores(1.0, 2).stretch(Shape(3, 0, 1), 0.1, decoding=True) == 1.0
    # 2P/2D: two decoding threads and two prefill threads busy 0.4 of the time, 2.8 > 2:
    # stretch 2 / (2 - 0.8).
    assert Cores(1.0, 2).stretch(Shape(2, 0, 2), 0.4, decoding=True) == pytest.approx(2 / 1.2)
    assert Cores(1.0, 2).stretch(Shape(3, 0, 1), 0.7, decoding=True) == math.inf


def test_a_shape_whose_prompts_alone_need_more_than_the_cores_keeps_up_with_nothing() -> None:
    # 12k prompt tokens/s against 2,500 tokens/s per core, two cores shared by four
    # single-threaded nodes: the prompts alone need 4.8 cores.
    rates = Rates(2500.0, 0.04, 0.0, 64.0, 0.0, Cores(1.0, 2))
    load = Load(_steady(20, 10.0, prompt=6000), 10.0, rates, Objectives(3.0, 0.1), 0.0, end_s=10.0)
    three_one = load.forecast(Shape(3, 0, 1))
    assert three_one.load == math.inf and three_one.goodput == 0.0 and three_one.tpot_decode_s == math.inf
    # With cores enough (no Cores), the same load is a heavy one and no more.
    assert Load(_steady(20, 10.0, prompt=6000), 10.0, replace(rates, cores=None), Objectives(3.0, 0.1), 0.0,
                end_s=10.0).forecast(Shape(3, 0, 1)).load == pytest.approx(1.6)


def test_nodes_with_cores_enough_keep_their_figures_as_measured() -> None:
    # The same four nodes reporting half their thread's time, but on eight cores: what
    # slows them is not each other (other programs on the host) and would slow every
    # shape alike, so the steps and rates stay as measured and no shape is stretched.
    clock, reg = _registry(*_cpu_nodes([Role.HYBRID] * 4, 8, 0.5))
    ctl = _controller(reg, ttft_slo_s=3.0, tpot_slo_s=0.1)
    now = clock.now()
    for i in range(50):
        ctl.demand.record(now - 20.0 + (i + 0.5) / 2.5, f"r{i}", 400, 32, 30)
    load, _ = ctl.goodput_load(reg.nodes())
    assert load.rates.cores is None
    assert load.rates.step_a_s == pytest.approx(0.08) and load.rates.prefill_tokens_per_s == pytest.approx(1250.0)

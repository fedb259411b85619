"""Demand signal: offered load counted once per request, node-equivalents, flips by utilisation."""

from __future__ import annotations

import pytest

from libs.protocol.messages import Role
from services.scheduler.clock import ManualClock
from services.scheduler.demand import DemandTracker, StepFit, node_speed
from services.scheduler.placement import CostModel
from services.scheduler.registry import NodeRegistry
from services.scheduler.roles import RoleConfig, RoleController
from tests.scheduler.helpers import report


def _registry(*reports, at: float = 20.0):
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=1000.0)
    for r in reports:
        reg.update(r)
    clock.set(at)
    return clock, reg


def test_step_fit_recovers_a_line_and_needs_spread() -> None:
    fit = StepFit(decay=1.0)
    fit.add(10, 0.02)
    assert fit.predict(64) is None  # one batch size says nothing about the slope
    for b in (2, 6, 14, 30):
        fit.add(b, 0.01 + 0.001 * b)
    fit.add(10, 0.02)
    assert fit.predict(64) == pytest.approx(0.074)


def test_demand_counts_each_request_once_in_node_equivalents() -> None:
    _, reg = _registry(report("p1", rate=10_000.0, step_s=0.0), report("d1", Role.DECODE, running=0, step_s=0.04))
    tr = DemandTracker(window_s=10.0, min_placements=2)
    tr.record(1.0, "a", 50_000, 100, 10)
    tr.record(2.0, "a", 50_000, 100, 10)  # a retry of a rejected request: same demand
    assert tr.demand(5.0, reg.nodes(), CostModel()) is None  # one request < min_placements
    tr.record(3.0, "b", 50_000, 540, 10)
    d = tr.demand(5.0, reg.nodes(), CostModel())
    # prefill: 100k tokens / 10 s / 10k tok/s = 1 node; decode: 640 tokens / 10 s x 0.04 s / 64 slots.
    assert d.prefill_nodes == pytest.approx(1.0)
    assert d.decode_nodes == pytest.approx(640 / 10 * 0.04 / 64)
    assert d.utilisation(2.0, 0.5) == pytest.approx(0.5)
    assert tr.demand(11.5, reg.nodes(), CostModel()) is None  # "a" left the window


def test_node_speed_by_measured_rate_and_device_kind() -> None:
    _, reg = _registry(report("f1", rate=20_000.0), report("s1", rate=10_000.0),
                       report("s2", Role.DECODE, rate=0.0), report("x1", Role.DECODE, rate=0.0))
    nodes = reg.nodes()
    nodes[2].report = nodes[2].report.__class__(**{**{f: getattr(nodes[2].report, f) for f in nodes[2].report.__struct_fields__}, "device_name": "slow"})
    nodes[1].report = nodes[1].report.__class__(**{**{f: getattr(nodes[1].report, f) for f in nodes[1].report.__struct_fields__}, "device_name": "slow"})
    speeds = [round(node_speed(n, nodes, CostModel()), 3) for n in nodes]
    assert speeds == [1.333, 0.667, 0.667, 1.333]  # x1 is of f1's kind ("gpu")


def _controller(reg: NodeRegistry, **kw) -> RoleController:
    return RoleController(reg, RoleConfig(min_dwell_s=10.0, demand_window_s=10.0, **kw), CostModel())


def test_prompt_heavy_demand_flips_a_decode_node_before_any_queue_builds() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1),
                           report("d2", Role.DECODE))
    ctl = _controller(reg)
    # 30 x 6000 prompt tokens in 10 s = 1.8 nodes at 10k tok/s; decode: 30 x 380 blocks x 20 steps
    # x 0.02 s / 10 s / 1000 blocks = 0.46 nodes (KV-bound)
    for i in range(30):
        ctl.demand.record(clock.now() - 5.0, f"r{i}", 6000, 20, 380)
    change, events = ctl.step()
    assert (change.node_id, change.old_role, change.new_role) == ("d2", Role.DECODE, Role.PREFILL)
    assert events[0].detail.startswith("requested: demand: prefill 1.80 / decode 0.46 node-equivalents on 2.00 / 2.00")


def test_demand_below_busy_or_within_margin_does_not_flip() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE), report("d2", Role.DECODE))
    ctl = _controller(reg)
    for i in range(10):  # 10 x 6000 tokens / 10 s = 0.6 nodes on 2: 0.3 < demand_busy
        ctl.demand.record(clock.now() - 1.0, f"r{i}", 6000, 20, 380)
    assert ctl.step() == (None, [])
    # Balanced and busy: 3:1 would make prefill's side 1.0 -> 0.67 but decode 1.0 -> 2.0.
    clock2, reg2 = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, step_s=0.02),
                             report("d2", Role.DECODE, step_s=0.02))
    ctl2 = _controller(reg2)
    for i in range(20):
        ctl2.demand.record(clock2.now() - 1.0, f"r{i}", 10_000, 64 * 50, 10)
    d = ctl2.demand.demand(clock2.now(), reg2.nodes(), CostModel())
    assert (d.prefill_nodes, d.decode_nodes) == pytest.approx((2.0, 2.0))
    assert ctl2.step() == (None, [])


def test_decode_heavy_demand_flips_a_prefill_node_and_fixed_split_ignores_demand() -> None:
    clock, reg = _registry(report("p1"), report("p2", waiting_tokens=500), report("d1", Role.DECODE, step_s=0.02),
                           report("d2", Role.DECODE, step_s=0.02))
    ctl = _controller(reg)
    for i in range(40):  # 40 x 1000 tokens / 10 s x 0.02 / 64 = 1.25 decode nodes; prefill 0.04
        ctl.demand.record(clock.now() - 1.0, f"r{i}", 100, 1000, 70)
    change, _ = ctl.step()
    assert (change.node_id, change.new_role) == ("p1", Role.DECODE)  # p1 has no queue: it drains first
    pinned = RoleController(reg, RoleConfig(), CostModel(), target=lambda nodes: None)
    assert pinned.demand is None

"""Demand signal: offered load counted once per request, node-equivalents, flips by utilisation."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from libs.protocol.messages import Role
from libs.scheduler.clock import ManualClock
from libs.scheduler.cost_model import CostModel
from libs.scheduler.demand import DemandTracker, StepFit, prefill_speeds
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.role_controller import RoleConfig, RoleController
from tests.scheduler.helpers import one_step, report


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


def test_prefill_passes_of_several_sizes_tell_what_a_full_pass_runs_at() -> None:
    # Hybrid nodes prefill between decode steps: passes of 1,000-3,000 tokens, each paying
    # a fixed 15 ms, report 25-33k tok/s. A prefill node's full pass (16,384 tokens, the
    # budget) runs at 16384 / (0.015 + 16384 / 40000) = 38.6k tok/s; no node ever ran one.
    def passes(node_id: str, tokens: float):
        seconds = 0.015 + tokens / 40_000.0
        r = report(node_id, Role.HYBRID, rate=tokens / seconds)
        return msgspec.structs.replace(r, prefill_pass_tokens=tokens, prefill_pass_s=seconds, max_pass_tokens=16_384)

    _, reg = _registry(passes("h1", 1000.0), passes("h2", 1000.0))
    tr = DemandTracker(window_s=10.0, min_placements=2)
    tr.observe(reg.nodes())
    assert tr.full_pass_rate("gpu") == 0.0  # passes of one size: the fixed cost is not known
    assert tr.prefill_rates(reg.nodes())["h1"] == pytest.approx(1000 / 0.04)
    for tokens in (1500.0, 2200.0, 3000.0):
        reg.update(passes("h1", tokens))
        reg.update(passes("h2", tokens * 0.9))
        tr.observe(reg.nodes())
    # The line is taken out to the budget only as far as 4 x the largest pass seen (12,000,
    # fading a little a report).
    full = 12_000 / (0.015 + 12_000 / 40_000.0)
    assert tr.full_pass_rate("gpu") == pytest.approx(full, rel=1e-3)
    assert tr.prefill_rates(reg.nodes()) == {"h1": pytest.approx(full, rel=1e-3), "h2": pytest.approx(full, rel=1e-3)}
    assert tr.full_pass_rate("another gpu") == 0.0  # each device kind by its own passes
    # Without a token budget in the reports (older nodes) nothing is extrapolated.
    _, reg2 = _registry(msgspec.structs.replace(passes("h1", 1000.0), max_pass_tokens=0))
    tr2 = DemandTracker(window_s=10.0, min_placements=2)
    for tokens in (1000.0, 2000.0, 3000.0):
        reg2.update(msgspec.structs.replace(passes("h1", tokens), max_pass_tokens=0))
        tr2.observe(reg2.nodes())
    assert tr2.full_pass_rate("gpu") == 0.0


def test_step_fit_needs_a_relative_spread_when_asked() -> None:
    fit = StepFit(decay=1.0, min_var=0.0, min_cv=0.1)
    for x in (1000.0, 1010.0, 1020.0):
        fit.add(x, 0.015 + x / 40_000)
    assert fit.line() is None  # 1% spread: the slope would be noise
    fit.add(1500.0, 0.015 + 1500 / 40_000)
    a, b = fit.line()
    assert (a, b) == (pytest.approx(0.015), pytest.approx(1 / 40_000))


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


def test_prefill_speed_by_measured_rate_and_device_kind() -> None:
    _, reg = _registry(report("f1", rate=20_000.0), report("s1", rate=10_000.0),
                       report("s2", Role.DECODE, rate=0.0), report("x1", Role.DECODE, rate=0.0))
    nodes = reg.nodes()
    nodes[2].report = nodes[2].report.__class__(**{**{f: getattr(nodes[2].report, f) for f in nodes[2].report.__struct_fields__}, "device_name": "slow"})
    nodes[1].report = nodes[1].report.__class__(**{**{f: getattr(nodes[1].report, f) for f in nodes[1].report.__struct_fields__}, "device_name": "slow"})
    speeds = [round(prefill_speeds(nodes, CostModel())[n.node_id], 3) for n in nodes]
    assert speeds == [1.333, 0.667, 0.667, 1.333]  # x1 is of f1's kind ("gpu")


def _controller(reg: NodeRegistry, **kw) -> RoleController:
    return RoleController(reg, RoleConfig(min_dwell_s=10.0, demand_window_s=10.0, planner="split", **kw), CostModel())


def test_prompt_heavy_demand_flips_a_decode_node_before_any_queue_builds() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, running=1),
                           report("d2", Role.DECODE))
    ctl = _controller(reg)
    # 30 x 6000 prompt tokens in 10 s = 1.8 nodes at 10k tok/s; decode: 30 x 380 blocks x 20 steps
    # x 0.02 s / 10 s / 1000 blocks = 0.46 nodes (KV-bound)
    for i in range(30):
        ctl.demand.record(clock.now() - 5.0, f"r{i}", 6000, 20, 380)
    change, events = one_step(ctl)
    assert (change.node_id, change.old_role, change.new_role) == ("d2", Role.DECODE, Role.PREFILL)
    assert events[0].detail.startswith("requested: demand: prefill 1.80 / decode 0.46 node-equivalents on 2.00 / 2.00")


def test_demand_below_busy_or_within_margin_does_not_flip() -> None:
    clock, reg = _registry(report("p1"), report("p2"), report("d1", Role.DECODE), report("d2", Role.DECODE))
    ctl = _controller(reg)
    for i in range(10):  # 10 x 6000 tokens / 10 s = 0.6 nodes on 2: 0.3 < demand_busy
        ctl.demand.record(clock.now() - 1.0, f"r{i}", 6000, 20, 380)
    assert ctl.step() == ([], [])
    # Balanced and busy: 3:1 would make prefill's side 1.0 -> 0.67 but decode 1.0 -> 2.0.
    clock2, reg2 = _registry(report("p1"), report("p2"), report("d1", Role.DECODE, step_s=0.02),
                             report("d2", Role.DECODE, step_s=0.02))
    ctl2 = _controller(reg2)
    for i in range(20):
        ctl2.demand.record(clock2.now() - 1.0, f"r{i}", 10_000, 64 * 50, 10)
    d = ctl2.demand.demand(clock2.now(), reg2.nodes(), CostModel())
    assert (d.prefill_nodes, d.decode_nodes) == pytest.approx((2.0, 2.0))
    assert ctl2.step() == ([], [])


def test_decode_heavy_demand_flips_a_prefill_node_and_fixed_split_ignores_demand() -> None:
    clock, reg = _registry(report("p1"), report("p2", waiting_tokens=500), report("d1", Role.DECODE, step_s=0.02),
                           report("d2", Role.DECODE, step_s=0.02))
    ctl = _controller(reg)
    for i in range(40):  # 40 x 1000 tokens / 10 s x 0.02 / 64 = 1.25 decode nodes; prefill 0.04
        ctl.demand.record(clock.now() - 1.0, f"r{i}", 100, 1000, 70)
    change, _ = one_step(ctl)
    assert (change.node_id, change.new_role) == ("p1", Role.DECODE)  # p1 has no queue: it drains first
    pinned = RoleController(reg, RoleConfig(), CostModel(), target=lambda nodes: None)
    assert pinned.demand is None


def test_full_batch_counts_requests_by_the_steps_they_stay() -> None:
    # Half long prompts with short answers (400 blocks, 20 steps), half short prompts with
    # long answers (40 blocks, 700 steps). A batch holds them in proportion to the steps
    # they stay: (10 x 400 x 20 + 10 x 40 x 700) / 7200 = 50 blocks a sequence, so 200
    # sequences fit in 10,000 blocks. Counting each request once (220 blocks) made the full
    # batch 45 sequences and the decode need 4.4 times too high.
    big = {"total_blocks": 10_000, "free_blocks": 5000, "max_num_seqs": 256}
    _, reg = _registry(report("p1", rate=10_000.0, step_s=0.0, **big),
                       report("d1", Role.DECODE, running=100, step_s=0.04, **big))
    tr = DemandTracker(window_s=10.0, min_placements=2)
    for i in range(10):
        tr.record(1.0, f"a{i}", 6000, 20, 400)
        tr.record(1.0, f"b{i}", 200, 700, 40)
    d = tr.demand(5.0, reg.nodes(), CostModel())
    assert d.decode_nodes == pytest.approx(7200 / 10 * 0.04 / 200)  # 0.144 (was 0.634)
    assert d.prefill_nodes == pytest.approx(62_000 / 10 / 10_000)
    # Standard errors of the sums: the root of the sum of squares, in the same units.
    assert d.decode_se == pytest.approx((10 * 20**2 + 10 * 700**2) ** 0.5 / 10 * 0.04 / 200)
    assert d.prefill_se == pytest.approx((10 * 6000**2 + 10 * 200**2) ** 0.5 / 10 / 10_000)


def test_prefill_rate_is_the_one_measured_while_backlogged() -> None:
    # p1 measured 30k tok/s with 2 s of prompts queued (full batches); then a trickle of
    # short prompts in small batches brought its reported rate to 10k. Its capacity is
    # still 30k: the need is 3000 tok/s on a mean of 20k (p1 30k, d1 10k), not on 10k.
    clock, reg = _registry(report("p1", rate=30_000.0, waiting_tokens=60_000), report("d1", Role.DECODE))
    tr = DemandTracker(window_s=10.0, min_placements=2)
    tr.observe(reg.nodes())
    reg.update(report("p1", rate=10_000.0, waiting_tokens=2_000))  # 0.2 s queued: not backlogged
    for i in range(30):
        tr.record(clock.now() - 1.0, f"r{i}", 1000, 10, 10)
    d = tr.demand(clock.now(), reg.nodes(), CostModel())
    rates = tr.prefill_rates(reg.nodes())
    assert rates == {"p1": 30_000.0, "d1": 10_000.0}
    assert d.prefill_nodes == pytest.approx(0.15)
    # One device kind: one capability, whatever batches each node happened to run.
    assert prefill_speeds(reg.nodes(), CostModel(), rates) == {"p1": 1.0, "d1": 1.0}
    assert d.prefill_speed == {"p1": 1.0, "d1": 1.0}
    # Two kinds: each node is as fast as its kind.
    other = {n.node_id: n for n in reg.nodes()}
    other["d1"] = dataclasses.replace(other["d1"], report=msgspec.structs.replace(other["d1"].report,
                                                                                  device_name="slower gpu"))
    assert prefill_speeds(list(other.values()), CostModel(), rates) == {"p1": 1.5, "d1": 0.5}
    # Backlogged again at a lower rate (its average still holds the small batches): the
    # best rate wins, fading by busy_fade a report.
    reg.update(report("p1", rate=20_000.0, waiting_tokens=40_000))
    tr.observe(reg.nodes())
    assert tr.prefill_rates(reg.nodes())["p1"] == pytest.approx(30_000 * tr.busy_fade)


def test_decode_capacity_by_device_kind() -> None:
    # Two kinds, each with its own line: "fast" steps 0.01 + 0.0001 b, "slow" twice that.
    # At a full batch of 64 they do 3902 and 1951 tokens/s: decode speeds 4/3 and 2/3 of
    # the mean node, whatever their prefill rates (equal here).
    clock, reg = _registry(report("f1", Role.DECODE), report("s1", Role.DECODE))
    tr = DemandTracker(window_s=10.0, min_placements=2)
    for b in (8, 16, 32, 48):
        reg.update(report("f1", Role.DECODE, running=b, step_s=0.01 + 0.0001 * b))
        reg.update(msgspec.structs.replace(report("s1", Role.DECODE, running=b, step_s=0.02 + 0.0002 * b),
                                           device_name="slow"))
        tr.observe(reg.nodes())
    for i in range(10):
        tr.record(clock.now() - 1.0, f"r{i}", 100, 1000, 10)
    d = tr.demand(clock.now(), reg.nodes(), CostModel())
    fast, slow = 64 / (0.01 + 0.0064), 64 / (0.02 + 0.0128)
    assert d.decode_speed == pytest.approx({"f1": 2 * fast / (fast + slow), "s1": 2 * slow / (fast + slow)})
    assert d.decode_nodes == pytest.approx(10_000 / 10 / ((fast + slow) / 2))


def _cluster(num_prefill: int, num_decode: int) -> tuple[ManualClock, NodeRegistry]:
    reports = [report(f"p{i:02d}") for i in range(num_prefill)]
    reports += [report(f"d{i:02d}", Role.DECODE) for i in range(num_decode)]
    return _registry(*reports)


def test_a_move_of_several_flips_pays_where_each_flip_is_below_the_margin() -> None:
    # 6 prefill, 10 decode; needs: prefill 0.95, decode 12.9 (100 x 4128 tokens / 10 s x
    # 0.02 s / 64 sequences). One flip takes decode from 1.29 to 1.17 (9%, under the 10%
    # margin), the move to 2:14 takes it to 0.92 (29%): the first flip of it goes ahead.
    clock, reg = _cluster(6, 10)
    ctl = _controller(reg, demand_margin=0.1, demand_confidence=0.0)
    for i in range(100):
        ctl.demand.record(clock.now() - 1.0, f"r{i}", 950, 4128, 10)
    change, events = one_step(ctl)
    assert (change.old_role, change.new_role) == (Role.PREFILL, Role.DECODE)
    assert "prefill 0.95 / decode 12.90 node-equivalents on 6.00 / 10.00" in events[0].detail


def test_a_window_too_small_to_tell_does_not_flip() -> None:
    # 2:2; eight 40k-token prompts: prefill 3.2 nodes on 2 (1.6), decode 1.2 (8 x 4800
    # tokens / 10 s x 0.02 s / 64). By the point estimate 3:1 lowers the busier side to 1.2
    # (25%), but the prefill need's standard error is 1.13 nodes (8 requests): one standard
    # error against the move (prefill 2.07, decode 1.62) and 3:1 is the worse split.
    clock, reg = _cluster(2, 2)
    careful = _controller(reg, demand_confidence=1.0)
    sure = _controller(reg, demand_confidence=0.0)
    for ctl in (careful, sure):
        for i in range(8):
            ctl.demand.record(clock.now() - 1.0, f"r{i}", 40_000, 4800, 10)
    d = careful.demand.demand(clock.now(), reg.nodes(), CostModel())
    assert (d.prefill_nodes, d.decode_nodes, d.prefill_se) == pytest.approx((3.2, 1.2, 8**0.5 * 0.4))
    assert careful.step() == ([], [])
    change, _ = one_step(sure)
    assert (change.node_id, change.new_role) == ("d00", Role.PREFILL)

"""RoleController: flips under imbalance, dwell, hysteresis, capacity floors, hybrid under overload."""

from __future__ import annotations

from libs.protocol.messages import EventKind, NodeState, Role
from libs.scheduler.clock import ManualClock
from libs.scheduler.cost_model import CostModel
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import make_policy
from libs.scheduler.role_controller import RoleConfig, RoleController
from tests.scheduler.helpers import one_step, report


def _setup(*reports, at: float = 20.0):
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=1000.0)
    for r in reports:
        reg.update(r)
    clock.set(at)
    return clock, reg, RoleController(reg, RoleConfig(min_dwell_s=10.0, planner="split"), CostModel())


def test_prefill_backlog_flips_idle_decode_node_then_waits_for_its_report() -> None:
    # 60k queued tokens at 2 x 10k tok/s = 3 s backlog; decode 3/128 slots used.
    clock, reg, ctl = _setup(report("p1", waiting_tokens=30_000), report("p2", waiting_tokens=30_000),
                             report("d1", Role.DECODE, running=2), report("d2", Role.DECODE, running=1))
    change, events = one_step(ctl)
    assert (change.node_id, change.old_role, change.new_role) == ("d2", Role.DECODE, Role.PREFILL)
    assert [(e.kind, e.node_id, e.detail.split(":")[0]) for e in events] == [(EventKind.ROLE_FLIP, "d2", "requested")]
    assert ctl.step() == ([], [])  # one flip in flight at a time
    clock.advance(1.0)
    reg.update(report("d2", Role.PREFILL))
    change, events = one_step(ctl)
    assert [(e.node_id, e.detail, e.new_role) for e in events] == [("d2", "done", Role.PREFILL)]
    assert ctl.num_flips == 1
    # d1 is the last decode node: never flipped even though prefill is still short.
    assert change is None


def test_dwell_time_blocks_a_flip() -> None:
    clock, reg, ctl = _setup(report("p1", waiting_tokens=60_000), report("d1", Role.DECODE),
                             report("d2", Role.DECODE), at=5.0)
    assert ctl.step() == ([], [])
    clock.set(10.0)
    change, _ = one_step(ctl)
    assert (change.node_id, change.new_role) == ("d1", Role.PREFILL)


def test_decode_saturation_flips_a_prefill_node() -> None:
    # Full decode batches AND prefilled requests held waiting for room: decode is short.
    _, _, ctl = _setup(report("p1", waiting_tokens=100, held=3), report("p2"),
                       report("d1", Role.DECODE, running=60), report("d2", Role.DECODE, running=62))
    change, _ = one_step(ctl)
    assert (change.node_id, change.new_role) == ("p2", Role.DECODE)


def test_hysteresis_gap_and_floors() -> None:
    # Decode short but the prefill backlog (1 s) sits between its thresholds: no flip.
    _, _, ctl = _setup(report("p1", waiting_tokens=10_000, held=2), report("p2", waiting_tokens=10_000),
                       report("d1", Role.DECODE, running=60))
    assert ctl.step() == ([], [])
    # Decode full with nobody waiting is busy, not short: prefill room does not flip a P node.
    _, _, ctl = _setup(report("p1"), report("p2"), report("d1", Role.DECODE, running=64))
    assert ctl.step() == ([], [])
    # Prefill short but hand-offs wait for decode room: no D node leaves decode.
    _, _, ctl = _setup(report("p1", waiting_tokens=60_000, held=1), report("d1", Role.DECODE, running=45),
                       report("d2", Role.DECODE, running=45))
    assert ctl.step() == ([], [])
    # One node of each role: nothing may leave its side empty.
    _, _, ctl = _setup(report("p1", waiting_tokens=90_000), report("d1", Role.DECODE))
    assert ctl.step() == ([], [])
    _, _, ctl = _setup(report("p1", held=5), report("d1", Role.DECODE, running=64))
    assert ctl.step() == ([], [])


def test_overload_goes_hybrid_and_back() -> None:
    clock, reg, ctl = _setup(report("p1", waiting_tokens=40_000, held=4), report("p2", waiting_tokens=40_000),
                             report("d1", Role.DECODE, running=60), report("d2", Role.DECODE, running=63))
    change, _ = one_step(ctl)
    assert (change.node_id, change.new_role) == ("d1", Role.HYBRID)
    clock.advance(1.0)
    reg.update(report("d1", Role.HYBRID, running=60))
    reg.update(report("p1", waiting_tokens=40_000, held=4))
    change, _ = one_step(ctl)  # d1 done; still overloaded: the next node goes hybrid too
    assert (change.node_id, change.new_role) == ("p2", Role.HYBRID)
    ctl.failed("p2", "refused")
    clock.advance(12.0)
    # Load falls: prefill idle, decode moderate -> the hybrid returns to a single role.
    for nid in ("p1", "p2"):
        reg.update(report(nid))
    reg.update(report("d1", Role.HYBRID, running=40))
    reg.update(report("d2", Role.DECODE, running=40))
    change, _ = one_step(ctl)
    assert (change.node_id, change.old_role, change.new_role) == ("d1", Role.HYBRID, Role.DECODE)


def test_no_flip_straight_back_within_the_cooldown() -> None:
    clock, reg, ctl = _setup(report("p1", waiting_tokens=60_000), report("d1", Role.DECODE),
                             report("d2", Role.DECODE), report("d3", Role.DECODE))
    change, _ = one_step(ctl)
    assert (change.node_id, change.new_role) == ("d1", Role.PREFILL)
    clock.advance(1.0)
    reg.update(report("d1", Role.PREFILL))
    # Now decode is short and prefill idle; p1 has dwelt long enough but the reverse waits 30 s.
    reg.update(report("p1", held=5))
    for nid in ("d2", "d3"):
        reg.update(report(nid, Role.DECODE, running=64))
    change, events = one_step(ctl)
    assert change is None and [e.detail for e in events] == ["done"]
    clock.advance(30.0)
    change, _ = one_step(ctl)
    assert (change.node_id, change.new_role) == ("d1", Role.DECODE)  # p1 holds hand-offs: d1 drains first


def test_failed_and_timed_out_flips_are_forgotten() -> None:
    clock, reg, ctl = _setup(report("p1", waiting_tokens=60_000), report("d1", Role.DECODE),
                             report("d2", Role.DECODE))
    change, _ = one_step(ctl)
    assert [e.detail for e in ctl.failed(change.node_id, "timeout")] == ["failed: timeout"]
    change, _ = one_step(ctl)
    assert change is not None
    clock.advance(121.0)
    for nid, role in (("p1", Role.PREFILL), ("d1", Role.DECODE), ("d2", Role.DECODE)):
        reg.update(report(nid, role))
    _, events = one_step(ctl)
    assert events[0].detail.startswith("failed: no report in the new role")


def test_fixed_split_pins_roles() -> None:
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock)
    for nid in ("n0", "n1", "n2", "n3"):
        reg.update(report(nid, Role.DECODE))
    pol = make_policy("fixed:1:3", reg)
    change, _ = one_step(pol.roles)
    assert (change.node_id, change.new_role) == ("n0", Role.PREFILL)
    reg.update(report("n0", Role.PREFILL))
    assert one_step(pol.roles)[0] is None
    assert make_policy("fixed:1:1", reg).target_roles(reg.nodes()) == {
        "n0": Role.PREFILL, "n1": Role.PREFILL, "n2": Role.DECODE, "n3": Role.DECODE}


def test_fixed_split_keeps_a_launched_split() -> None:
    # `flowkv up --prefill-nodes 1 --decode-nodes 1` names its nodes decode-0 and
    # prefill-0; pinning by id alone would swap both roles (two needless flips).
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock)
    reg.update(report("decode-0", Role.DECODE))
    reg.update(report("prefill-0", Role.PREFILL))
    pol = make_policy("fixed:1:1", reg)
    assert pol.target_roles(reg.nodes()) == {"prefill-0": Role.PREFILL, "decode-0": Role.DECODE}
    assert one_step(pol.roles)[0] is None
    # Prefill places go to prefill nodes first, then hybrids, then decode nodes by id.
    for nid in ("decode-1", "hybrid-0"):
        reg.update(report(nid, Role.DECODE if nid.startswith("decode") else Role.HYBRID))
    assert make_policy("fixed:3:1", reg).target_roles(reg.nodes()) == {
        "prefill-0": Role.PREFILL, "hybrid-0": Role.PREFILL, "decode-0": Role.PREFILL, "decode-1": Role.DECODE}


def test_fixed_split_does_not_flip_a_cluster_still_registering() -> None:
    # flowkv up --prefill-nodes 1 --decode-nodes 3 under fixed:1:3; the nodes report one
    # at a time, decode-0 first. No flip at any point: each is in its launched role.
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock)
    pol = make_policy("fixed:1:3", reg)
    for nid in ("decode-0", "prefill-0", "decode-1", "decode-2"):
        reg.update(report(nid, Role.PREFILL if nid.startswith("prefill") else Role.DECODE))
        clock.advance(1.0)
        assert one_step(pol.roles)[0] is None, nid
    # Short of nodes with one side empty (both prefill nodes of a fixed:2:2 up first): one flips.
    reg2 = NodeRegistry(clock)
    for nid in ("prefill-0", "prefill-1"):
        reg2.update(report(nid, Role.PREFILL))
    change, _ = one_step(make_policy("fixed:2:2", reg2).roles)
    assert change is not None and (change.node_id, change.new_role) == ("prefill-1", Role.DECODE)


def test_a_lone_hybrid_node_keeps_both_roles() -> None:
    # One colocated node with no load: the "load fell" rule would give it a single role,
    # which would leave the cluster with no prefill (or no decode) node at all.
    clock, reg, ctl = _setup(report("h1", Role.HYBRID))
    assert ctl.step() == ([], [])
    # With a second node that can prefill, the hybrid may become decode-only.
    _, reg2, ctl2 = _setup(report("h1", Role.HYBRID), report("p1"))
    change, _ = one_step(ctl2)
    assert change is not None and (change.node_id, change.new_role) == ("h1", Role.DECODE)


def test_overload_does_not_go_hybrid_when_the_demand_is_balanced() -> None:
    # Both queues say short, as in test_overload_goes_hybrid_and_back, but the demand is
    # 3.0 prefill and 3.0 decode nodes on 2 + 2 (utilisation 1.5 each): d1 hybrid would
    # leave decode at 3.0 / 1.5 = 2.0. Half a node on the other side only moves the bottleneck.
    clock, _, ctl = _setup(report("p1", waiting_tokens=40_000, held=4), report("p2", waiting_tokens=40_000),
                           report("d1", Role.DECODE, running=60), report("d2", Role.DECODE, running=63))
    for i in range(30):  # 30 x 10k prompt tokens / 10 s / 10k tok/s; 30 x 3200 / 10 s x 0.02 s / 64
        ctl.demand.record(clock.now() - 1.0, f"r{i}", 10_000, 3200, 10)
    assert ctl.step() == ([], [])


def test_nodes_of_several_models_keep_their_roles() -> None:
    # The backlog that flips d2 in the first test, but d1/d2 serve another model than p1/p2:
    # a flip would move a node of model "b" to serve model "a"'s prompts.
    clock, reg, ctl = _setup(report("p1", waiting_tokens=30_000, model="a"), report("p2", waiting_tokens=30_000, model="a"),
                             report("d1", Role.DECODE, running=2, model="b"), report("d2", Role.DECODE, running=1, model="b"))
    assert ctl.step() == ([], [])
    for node_id in ("d1", "d2"):  # the same cluster with one model flips (see the first test)
        reg.update(report(node_id, Role.DECODE, running=1, model="a"))
    change, _ = one_step(ctl)
    assert change is not None and change.new_role == Role.PREFILL


def test_a_side_lost_with_its_last_node_comes_back_at_once() -> None:
    # p1 was the only prefill node and died: without a flip no new request could be
    # served, so the least busy decode node turns hybrid within its dwell time, whatever
    # the planner (goodput here, the default) would say of so thin a window.
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=1000.0)
    ctl = RoleController(reg, RoleConfig(min_dwell_s=10.0), CostModel())
    for r in (report("p1"), report("d1", Role.DECODE, running=3), report("d2", Role.DECODE, running=1)):
        reg.update(r)
    clock.set(1.0)
    assert ctl.step() == ([], [])
    reg.remove("p1", "no load report")
    change, events = one_step(ctl)
    assert change is not None and (change.node_id, change.old_role, change.new_role) == ("d2", Role.DECODE, Role.HYBRID)
    assert "no ready node of m can prefill" in events[0].detail
    reg.update(report("d2", Role.HYBRID, running=1))
    assert [e.detail for e in one_step(ctl)[1]] == ["done"]
    assert ctl.step() == ([], [])  # both sides again: nothing more to restore
    # d1 drains to stop: d2, hybrid now, still decodes, so no side is lost.
    reg.update(report("d1", Role.DECODE, state=NodeState.DRAINING))
    assert ctl.step() == ([], [])


def test_a_side_never_had_is_not_restored() -> None:
    # flowkv up's nodes register one at a time, decode first: no flip before prefill-0 is up.
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=1000.0)
    ctl = RoleController(reg, RoleConfig(), CostModel())
    reg.update(report("decode-0", Role.DECODE))
    assert ctl.step() == ([], [])
    reg.update(report("prefill-0"))
    assert ctl.step() == ([], [])
    # A model that lost every node forgets what it had: its first node back keeps its role.
    reg.remove("prefill-0", "gone")
    reg.remove("decode-0", "gone")
    assert ctl.step() == ([], [])
    reg.update(report("decode-1", Role.DECODE))
    assert ctl.step() == ([], [])


def test_a_lost_side_is_restored_per_model() -> None:
    # Model b lost its decode node; model a is whole. b's prefill node turns hybrid, a's
    # nodes are left alone (the several-models rule keeps roles otherwise).
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=1000.0)
    ctl = RoleController(reg, RoleConfig(planner="split"), CostModel())
    for r in (report("pa", model="a"), report("da", Role.DECODE, model="a"),
              report("pb", model="b"), report("db", Role.DECODE, model="b")):
        reg.update(r)
    assert ctl.step() == ([], [])
    reg.update(report("db", Role.DECODE, model="b", state=NodeState.DRAINING))
    change, _ = one_step(ctl)
    assert change is not None and (change.node_id, change.new_role) == ("pb", Role.HYBRID)

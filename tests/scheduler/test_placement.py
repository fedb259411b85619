"""Placement decisions on hand-made load states: exact node choices."""

from __future__ import annotations

import pytest

from libs.protocol.messages import ErrorCode, KVLink, NodeState, PlaceRequest, Placement, Rejected, Role
from libs.scheduler.clock import ManualClock
from libs.scheduler.cost_model import CostModel
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import PlacementConfig, make_policy
from libs.scheduler.role_controller import RoleConfig
from tests.scheduler.helpers import report


def _cluster(*reports, policy: str = "flowkv", max_ttft_s: float = 30.0):
    reg = NodeRegistry(ManualClock(0.0))
    for r in reports:
        reg.update(r)
    return make_policy(policy, reg, PlacementConfig(max_ttft_s=max_ttft_s))


def _req(rid: str = "r1", tokens: int = 1600, max_tokens: int = 160, **kw) -> PlaceRequest:
    return PlaceRequest(request_id=rid, model="m", num_prompt_tokens=tokens, max_tokens=max_tokens, **kw)


def test_queue_heavy_prefill_avoided_and_least_loaded_decode() -> None:
    pol = _cluster(report("p1", waiting_tokens=50_000), report("p2"),
                   report("d1", Role.DECODE, running=10), report("d2", Role.DECODE, running=2))
    out = pol.place(_req())
    assert isinstance(out, Placement)
    assert (out.prefill_node, out.decode_node) == ("p2", "d2")
    # 1600 tokens at 10k tok/s + 1 ms latency + 100 blocks x 1 MB over 300 GB/s.
    assert out.predicted_ttft_s == pytest.approx(0.16 + 0.001 + 1e8 / 300e9)


def test_prefix_cache_hit_preferred() -> None:
    pol = _cluster(report("p1", cached=[11, 12, 13]), report("p2", cached=[12, 13]), report("d1", Role.DECODE))
    out = pol.place(_req(prefix_hashes=[11, 12, 13, 14]))
    assert out.prefill_node == "p1"
    assert out.predicted_ttft_s == pytest.approx((1600 - 48) / 10000 + 0.001 + 1e8 / 300e9)


def test_decode_without_room_skipped() -> None:
    # 1600 + 160 tokens need 110 blocks; d2 is idle but has 109.
    pol = _cluster(report("p1"), report("d1", Role.DECODE, running=30), report("d2", Role.DECODE, free_blocks=109))
    assert pol.place(_req()).decode_node == "d1"


def test_admission_rejects_with_retry_after() -> None:
    pol = _cluster(report("p1", waiting_tokens=400_000), report("d1", Role.DECODE), max_ttft_s=30.0)
    out = pol.place(_req())
    assert isinstance(out, Rejected)
    assert out.code == ErrorCode.OVERLOADED
    assert out.retry_after_s == 11.0  # predicted 40.16 s, 10.16 s over the limit, rounded up


def test_no_nodes_and_exclusions() -> None:
    empty = _cluster()
    assert empty.place(_req()).code == ErrorCode.NO_NODES
    pol = _cluster(report("p1", waiting_tokens=20_000), report("p2"), report("d1", Role.DECODE))
    assert pol.place(_req("a", exclude_nodes=["p2"])).prefill_node == "p1"
    assert pol.place(_req("b", exclude_nodes=["p1", "p2", "d1"])).code == ErrorCode.NO_NODES
    other_model = PlaceRequest(request_id="c", model="other", num_prompt_tokens=10, max_tokens=1)
    assert pol.place(other_model).code == ErrorCode.NO_NODES


def test_excluding_the_only_node_of_a_role_is_answered_at_once() -> None:
    # The only prefill node excluded (its submit was lost while the broker failed over): no
    # wait in the queue can place the request, so it is not OVERLOADED (queued) but NO_NODES.
    pol = _cluster(report("p1"), report("d1", Role.DECODE), report("d2", Role.DECODE))
    out = pol.place(_req("a", exclude_nodes=["p1"]))
    assert (out.code, out.reason) == (ErrorCode.NO_NODES, "no prefill node but the excluded p1")
    assert pol.place(_req("b", exclude_nodes=["d1", "d2"])).code == ErrorCode.NO_NODES
    # Another node of the role, only not ready now (draining): that one is worth waiting for.
    pol = _cluster(report("p1"), report("p2", state=NodeState.DRAINING), report("d1", Role.DECODE))
    assert pol.place(_req("c", exclude_nodes=["p1"])).code == ErrorCode.OVERLOADED


def test_only_draining_or_full_nodes_is_overloaded() -> None:
    pol = _cluster(report("p1", state=NodeState.DRAINING), report("d1", Role.DECODE))
    out = pol.place(_req())
    assert (out.code, out.retry_after_s) == (ErrorCode.OVERLOADED, 1.0)


def test_burst_between_reports_is_spread() -> None:
    pol = _cluster(report("p1"), report("p2"), report("d1", Role.DECODE), report("d2", Role.DECODE))
    chosen = [pol.place(_req(f"r{i}")) for i in range(4)]
    assert [(c.prefill_node, c.decode_node) for c in chosen] == [("p1", "d1"), ("p2", "d2"), ("p1", "d1"),
                                                                 ("p2", "d2")]


def test_hybrid_node_colocates() -> None:
    pol = _cluster(report("h1", Role.HYBRID))
    out = pol.place(_req())
    assert (out.prefill_node, out.decode_node) == ("h1", "h1")
    assert out.predicted_ttft_s == pytest.approx(0.16)  # no hand-off


def test_a_prefill_node_still_decoding_takes_prompts_only_when_it_starts_them_much_sooner() -> None:
    # p1 was hybrid and still decodes 30 sequences (20 ms steps by default): a prompt there
    # runs between their steps. p2 has 2,000 tokens queued (0.2 s): p2 is chosen. Against a
    # backlog longer than those sequences' steps (30 x 20 ms: 0.6 s), p1 is.
    pol = _cluster(report("p1", running=30), report("p2", waiting_tokens=2_000), report("d1", Role.DECODE))
    assert pol.place(_req()).prefill_node == "p2"
    pol = _cluster(report("p1", running=30), report("p2", waiting_tokens=8_000), report("d1", Role.DECODE))
    assert pol.place(_req()).prefill_node == "p1"
    # Done decoding, it is an idle prefill node like any other.
    pol = _cluster(report("p1"), report("p2", waiting_tokens=2_000), report("d1", Role.DECODE))
    assert pol.place(_req()).prefill_node == "p1"


def test_under_objectives_a_prompt_goes_where_no_stream_holds_it_back() -> None:
    # 1P/1H: h1 decodes 4 streams at 50 ms a step, p1 has 1,000 prompt tokens queued
    # (0.1 s). Without objectives h1 starts the prompt sooner (0.05 + 0.16 s against 0.1 +
    # 0.16 s plus the hand-off) and takes it. Under a 100 ms TPOT objective h1 paces its
    # prompts: its streams spare half of each token's time, so the prompt takes twice as
    # long there, and p1 takes it. The objectives are the request's own or the deployment's.
    nodes = (report("p1", waiting_tokens=1_000), report("h1", Role.HYBRID, running=4, step_s=0.05))
    assert _cluster(*nodes).place(_req()).prefill_node == "h1"
    assert _cluster(*nodes).place(_req(ttft_slo_s=3.0, tpot_slo_s=0.1)).prefill_node == "p1"
    reg = NodeRegistry(ManualClock(0.0))
    for r in nodes:
        reg.update(r)
    pol = make_policy("flowkv", reg, PlacementConfig(), RoleConfig(ttft_slo_s=3.0, tpot_slo_s=0.1))
    assert pol.place(_req()).prefill_node == "p1"
    # Without a TTFT objective a prompt is not held back (pacing leaves it alone).
    assert _cluster(*nodes).place(_req(tpot_slo_s=0.1)).prefill_node == "h1"
    # A node with nothing decoding gives its prompts all its time.
    idle = (report("p1", waiting_tokens=1_000), report("h1", Role.HYBRID, step_s=0.05), report("d1", Role.DECODE))
    assert _cluster(*idle).place(_req(ttft_slo_s=3.0, tpot_slo_s=0.1)).prefill_node == "h1"


def test_full_hybrid_node_hands_off_to_a_decode_node_or_a_roomy_hybrid_node() -> None:
    # 1600 + 160 tokens need 110 blocks. h1 is idle but full; h2 has room and a backlog. By
    # default h2 serves the request alone, whatever its room: h1 must not prefill it and hand
    # it to h2 (a second copy of the KV, a reservation h2 may refuse by then).
    full = dict(free_blocks=100)

    def cluster(*reports, room: float = PlacementConfig.hybrid_handoff_room):
        reg = NodeRegistry(ManualClock(0.0))
        for r in reports:
            reg.update(r)
        return make_policy("flowkv", reg, PlacementConfig(hybrid_handoff_room=room))

    h1 = report("h1", Role.HYBRID, **full)
    out = cluster(h1, report("h2", Role.HYBRID, waiting_tokens=20_000, free_blocks=10_000)).place(_req())
    assert (out.prefill_node, out.decode_node) == ("h2", "h2")
    # A decode node beside them takes it whatever its room beyond this request.
    out = cluster(h1, report("h2", Role.HYBRID, waiting_tokens=20_000, free_blocks=10_000),
                  report("d1", Role.DECODE, free_blocks=110)).place(_req())
    assert (out.prefill_node, out.decode_node) == ("h1", "d1")
    # hybrid_handoff_room=2: to a hybrid node with room for it twice over (220 blocks), not less.
    out = cluster(h1, report("h2", Role.HYBRID, waiting_tokens=20_000, free_blocks=219), room=2).place(_req())
    assert (out.prefill_node, out.decode_node) == ("h2", "h2")
    out = cluster(h1, report("h2", Role.HYBRID, waiting_tokens=20_000, free_blocks=220), room=2).place(_req())
    assert (out.prefill_node, out.decode_node) == ("h1", "h2")


def test_faster_device_wins_by_measured_rate() -> None:
    # p1 is a slow kind (2k tok/s) with an empty queue; p2 a fast one (40k tok/s) with 4000 queued.
    pol = _cluster(report("p1", rate=2000.0, device_name="slow"),
                   report("p2", rate=40000.0, waiting_tokens=4000, device_name="fast"), report("d1", Role.DECODE))
    assert pol.place(_req()).prefill_node == "p2"


def test_nodes_of_one_kind_are_rated_alike() -> None:
    # One kind: p2's higher report (its last steps were full chunks) does not outweigh its
    # queue; both are rated at the kind's mean, 20k tok/s, so the emptier p1 takes the prompt.
    pol = _cluster(report("p1", rate=12000.0, waiting_tokens=2000), report("p2", rate=28000.0, waiting_tokens=6000),
                   report("d1", Role.DECODE, rate=20000.0))
    out = pol.place(_req())
    assert out.prefill_node == "p1"
    p1 = pol.registry.get("p1")
    assert p1 is not None and pol.config.cost.prefill_rate(p1) == pytest.approx(20000.0)


def _link(peer: str, bandwidth: float, latency_s: float = 0.0, transfers: int = 3) -> KVLink:
    return KVLink(peer=peer, bandwidth_bytes_per_s=bandwidth, latency_s=latency_s, transfers=transfers)


def test_measured_slow_link_moves_the_pair() -> None:
    nodes = (report("p2"), report("d1", Role.DECODE), report("d2", Role.DECODE))
    # All on one host, both GPU: by the class figures every pair ties and ids decide.
    out = _cluster(report("p1"), *nodes).place(_req())
    assert (out.prefill_node, out.decode_node) == ("p1", "d1")
    # p1 measured 100 MB/s to d1 (100 blocks of 1 MB take a second there) and nothing to d2 yet.
    slow = report("p1", links=[_link("d1", 1e8, latency_s=0.002)])
    out = _cluster(slow, *nodes).place(_req())
    assert (out.prefill_node, out.decode_node) == ("p1", "d2")
    assert out.predicted_ttft_s == pytest.approx(0.16 + 0.001 + 1e8 / 300e9)  # d2: the class default


def test_measured_fast_link_beats_the_class_figure() -> None:
    # Across hosts over TCP the planning figure is 1 GB/s; p1 measured 20 GB/s to d2.
    p1 = report("p1", host="h1", transports=["tcp"], links=[_link("d2", 20e9, latency_s=0.0005)])
    d1 = report("d1", Role.DECODE, host="h2", transports=["tcp"])
    d2 = report("d2", Role.DECODE, host="h3", transports=["tcp"])
    out = _cluster(p1, d1, d2).place(_req())
    assert (out.prefill_node, out.decode_node) == ("p1", "d2")
    assert out.predicted_ttft_s == pytest.approx(0.16 + 0.0005 + 1e8 / 20e9)


def test_cost_model_uses_a_link_only_once_measured() -> None:
    reg = NodeRegistry(ManualClock(0.0))
    for r in (report("p1", links=[_link("d1", 2e9, latency_s=0.003), _link("d2", 5e9, transfers=0)]),
              report("d1", Role.DECODE), report("d2", Role.DECODE)):
        reg.update(r)
    p1, d1, d2 = reg.get("p1"), reg.get("d1"), reg.get("d2")
    cost = CostModel()
    assert cost.bandwidth(p1, d1) == 2e9 and cost.transfer_s(p1, d1, 10) == pytest.approx(0.003 + 1e7 / 2e9)
    assert cost.bandwidth(p1, d2) == 300e9  # no transfer yet: the class figure
    assert cost.transfer_s(p1, d2, 10) == pytest.approx(0.001 + 1e7 / 300e9)
    assert cost.bandwidth(d1, p1) == 300e9  # links are directed: d1 reported none
    assert cost.transfer_s(p1, p1, 10) == 0.0
    reg.update(report("p1"))  # a newer report without links forgets them
    assert cost.bandwidth(reg.get("p1"), d1) == 300e9


def test_round_robin_and_least_loaded() -> None:
    rr = _cluster(report("p1"), report("p2"), report("d1", Role.DECODE), report("d2", Role.DECODE),
                  policy="round_robin")
    assert [(o.prefill_node, o.decode_node) for o in (rr.place(_req("a")), rr.place(_req("b")))] == [
        ("p1", "d1"), ("p2", "d2")]
    ll = _cluster(report("p1", waiting_tokens=5), report("p2"), report("d1", Role.DECODE, running=1),
                  report("d2", Role.DECODE, running=3), policy="least_loaded")
    out = ll.place(_req())
    assert (out.prefill_node, out.decode_node) == ("p2", "d1")


def test_policy_names() -> None:
    reg = NodeRegistry(ManualClock())
    assert make_policy("fixed:1:3", reg).name == "fixed:1:3"
    for bad in ("fixed:0:1", "fixed:1", "fixed:a:b", "nope"):
        with pytest.raises(ValueError):
            make_policy(bad, reg)


@pytest.mark.parametrize("policy", ["flowkv", "round_robin", "least_loaded", "fixed:1:2"])
def test_decode_only_placement_for_a_refused_hand_off(policy: str) -> None:
    # p1 prefilled the request; its decode node d1 refused (flipped to prefill). A decode
    # node is chosen among the others, p1 stays the prefill node, p2 gets no prefill work.
    pol = _cluster(report("p1"), report("p2"), report("d1", Role.PREFILL), report("d2", Role.DECODE, running=9),
                   report("d3", Role.DECODE, running=1), report("h1", Role.HYBRID, running=30), policy=policy)
    if pol.roles is not None and pol.roles.demand is not None:
        before = len(pol.roles.demand)
    out = pol.place(_req(exclude_nodes=["d1"], prefill_node="p1"))
    assert isinstance(out, Placement)
    assert (out.prefill_node, out.decode_node) == ("p1", "d3")  # least decode load
    reg = pol.registry
    assert reg.get("p1").queued_prefill_tokens() == 0 and reg.get("p2").queued_prefill_tokens() == 0
    assert reg.get("d3").num_decode_seqs() == 2
    if pol.roles is not None and pol.roles.demand is not None:
        assert len(pol.roles.demand) == before  # not new demand
    # The prefill node itself is never the answer, nor an excluded one; none left: overloaded.
    out = pol.place(_req(rid="r2", exclude_nodes=["d2", "d3", "h1"], prefill_node="p1"))
    assert isinstance(out, Rejected) and out.code is ErrorCode.OVERLOADED


def test_a_node_that_never_prefilled_is_as_fast_as_its_kind() -> None:
    # d1 launched as decode and flipped to prefill: no rate of its own yet. It is rated at
    # its kind's measured 30k tok/s (not the 8k default), so it shares the prompts with p1.
    pol = _cluster(report("p1", rate=30_000.0, waiting_tokens=20_000), report("d1", Role.PREFILL, rate=0.0),
                   report("d2", Role.DECODE, rate=0.0))
    assert CostModel().prefill_rate(pol.registry.get("d1")) == 30_000.0
    out = pol.place(_req(tokens=6000))
    assert isinstance(out, Placement) and out.prefill_node == "d1"

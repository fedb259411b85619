"""The simulator: deterministic for a seed, sane metrics, the real scheduler core inside."""

from __future__ import annotations

import pytest

from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import FlowKV
from libs.sim.__main__ import main
from libs.sim.calibration import A100_80G_8B, H100_8B, parse_mix
from libs.sim.metrics import by_device, percentile
from libs.sim.sweep import run_one, sweep_policies
from libs.sim.workload import generate


def test_calibration_reproduces_the_measured_prefill() -> None:
    assert H100_8B.prefill_s([8192]) == pytest.approx(0.253, abs=0.002)
    assert H100_8B.prefill_s([512] * 32) == pytest.approx(0.453, abs=0.002)


def test_workload_is_deterministic_and_scales() -> None:
    a, b = generate("imbalance", 4, seed=3, scale=0.1), generate("imbalance", 4, seed=3, scale=0.1)
    assert [(r.arrival, r.num_prompt_tokens, r.max_tokens) for r in a] == [
        (r.arrival, r.num_prompt_tokens, r.max_tokens) for r in b]
    assert generate("imbalance", 4, seed=4, scale=0.1) != a
    assert all(4000 <= r.num_prompt_tokens <= 8000 for r in a if r.arrival < 6.0)
    with pytest.raises(ValueError):
        generate("nope", 4)


def test_same_seed_same_metrics_and_real_core() -> None:
    m1, cl = run_one(4, "imbalance", "flowkv", seed=1, scale=0.15)
    m2, _ = run_one(4, "imbalance", "flowkv", seed=1, scale=0.15)
    assert m1 == m2
    assert isinstance(cl.policy, FlowKV) and isinstance(cl.registry, NodeRegistry)
    assert len(cl.registry) == 4
    # Sane: requests complete, TTFT and TPOT positive and ordered, throughput <= offered.
    assert 0 < m1.num_completed <= m1.num_requests
    assert 0 < m1.ttft_p50 <= m1.ttft_p90 <= m1.ttft_p99
    assert 0 < m1.tpot_p50 <= m1.tpot_p99
    assert m1.throughput_rps <= m1.num_requests / (0.15 * 240.0)
    assert 0.0 <= m1.slo_attainment <= 1.0
    # Every finished request has its tokens in order: arrival < first token <= finish.
    assert all(j.req.arrival < j.first_token_s <= j.finish_s for j in cl.finished)


def test_fixed_split_starts_in_its_split() -> None:
    _, cl = run_one(4, "normal", "fixed:1:3", scale=0.05)
    assert [n.role.value for n in cl.nodes.values()] == ["prefill", "decode", "decode", "decode"]
    assert cl.flips == []


def test_sweep_policies_and_percentile() -> None:
    assert sweep_policies(4) == ["flowkv", "round_robin", "least_loaded", "fixed:1:3", "fixed:2:2", "fixed:3:1"]
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 99) == 5.0
    assert percentile([], 50) == 0.0


def test_cli_writes_table_json_and_plots(tmp_path) -> None:
    assert main(["--nodes", "4", "--scenario", "normal", "--policy", "flowkv", "--scale", "0.05",
                 "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "roles_normal.png",
                                                          "slo.png", "throughput.png"]
    assert "| normal | flowkv |" in (tmp_path / "results.md").read_text()


def test_a100_is_the_h100_scaled_by_phase() -> None:
    assert H100_8B.prefill_s([8192]) / A100_80G_8B.prefill_s([8192]) == pytest.approx(0.32)
    assert H100_8B.decode_step_s(64, 64_000) / A100_80G_8B.decode_step_s(64, 64_000) == pytest.approx(0.61)
    assert A100_80G_8B.total_blocks == H100_8B.total_blocks
    assert H100_8B.scaled(1.0, H100_8B.device_name) == H100_8B
    assert [c.device_name for c in parse_mix("h100:1,a100:2")] == [
        H100_8B.device_name, A100_80G_8B.device_name, A100_80G_8B.device_name]
    for bad in ("v100:2", "h100", "h100:0", "h100:x"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_mixed_cluster_places_prefill_by_capability() -> None:
    # Slow nodes first, so ties on node id favour them; n00, n01 start as prefill, n02, n03 as decode.
    costs = parse_mix("a100:1,h100:1,a100:1,h100:1")
    per_node = {}
    for policy in ("flowkv", "least_loaded", "round_robin"):
        m, cl = run_one(4, "imbalance", policy, scale=0.1, costs=costs)
        assert m.num_completed > 0
        assert {n.report.device_name for n in cl.registry.nodes()} == {H100_8B.device_name, A100_80G_8B.device_name}
        shares = {d.device_name: d for d in by_device(cl, cl.horizon_s)}
        assert [d.num_nodes for d in shares.values()] == [2, 2]
        per_node[policy] = (shares[H100_8B.device_name].prefill_tokens_per_node
                            / shares[A100_80G_8B.device_name].prefill_tokens_per_node)
    # Load-aware placement gives an H100 far more prompt tokens than an A100; round robin does not.
    assert per_node["flowkv"] > 1.5
    assert per_node["least_loaded"] > 1.5
    assert per_node["round_robin"] < 1.1


def test_cli_mix_writes_device_table(tmp_path) -> None:
    assert main(["--mix", "h100:1,a100:1", "--scenario", "normal", "--policy", "least_loaded", "--scale", "0.05",
                 "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| normal | least_loaded | NVIDIA A100-SXM4-80GB (simulated) | 1 |" in text
    assert (tmp_path / "devices.json").exists()
    with pytest.raises(SystemExit):
        main(["--mix", "h100:1,a100:1", "--nodes", "4"])


def test_wait_queue_holds_what_retries_would_refuse() -> None:
    from dataclasses import replace

    from libs.sim.cluster import SimConfig

    # A fixed split, whose decode side the overload fills (flowkv plans roles for the SLOs).
    retry, _ = run_one(4, "overload", "fixed:1:1", seed=0, scale=0.25)
    queued, cl = run_one(4, "overload", "fixed:1:1", seed=0, scale=0.25, config=replace(SimConfig(), queue_wait_s=30.0))
    assert retry.num_rejections > 0 and retry.num_dropped > 0  # decode pools full: clients refused and retrying
    assert (queued.num_rejections, queued.num_dropped) == (0, 0)
    assert queued.queue_wait_p99 > 0
    waited = [j for j in cl.finished if j.queued_s > 0]
    assert waited and all(j.first_token_s - j.req.arrival >= j.queued_s for j in waited)

"""The full-stack benchmark's pure parts: hand-off aggregate, targets, greedy comparison, markdown."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "stack_report.py"
_spec = importlib.util.spec_from_file_location("stack_report", _PATH)
assert _spec is not None and _spec.loader is not None
rep = importlib.util.module_from_spec(_spec)
sys.modules["stack_report"] = rep
_spec.loader.exec_module(rep)


def _summary(rps: float, tpot_p99: float | None, e2e_mean: float = 2.0, out_tps: float = 100.0) -> dict:
    stat = {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"num_requests": 10, "completed": 10, "failed": 0, "duration_s": 10.0, "request_throughput": rps,
            "output_throughput": out_tps, "ttft": {**stat, "p50": 0.1, "p99": 0.2},
            "tpot": {**stat, "p50": tpot_p99, "p99": tpot_p99}, "itl": stat, "e2e": {**stat, "mean": e2e_mean}}


def _h(handoff_s: float, ok: bool = True, transport: str = "cuda_ipc") -> rep.Handoff:
    return rep.Handoff(t=0.0, request_id="r", prompt_tokens=8000, handoff_s=handoff_s, transfer_s=handoff_s / 2,
                       bytes=1 << 20, calls=1, segments=1, transport=transport, ok=ok)


def _row(exp: str, kind: str, workload: str, rate: float, summary: dict, handoffs=(), mean_in: float = 8000.0) -> dict:
    lengths = {"mean_input_len": mean_in, "max_input_len": mean_in, "mean_output_len": 256.0, "max_output_len": 256}
    return rep.run_row(exp, kind, {"workload": workload, "rate": rate}, summary, lengths, list(handoffs))


def test_handoff_stats_share_and_failed_not_timed():
    s = rep.handoff_stats([_h(0.010), _h(0.030), _h(5.0, ok=False, transport="nccl")], mean_e2e_s=2.0)
    assert s["count"] == 3 and s["failed"] == 1
    assert s["handoff_s"]["mean"] == pytest.approx(0.020)
    assert s["handoff_s"]["p50"] == pytest.approx(0.020)
    assert s["transfer_s"]["mean"] == pytest.approx(0.010)
    assert s["share_of_e2e"] == pytest.approx(0.010)
    assert s["transports"] == ["cuda_ipc"]
    assert s["calls_per_transfer"] == 1.0


def test_handoff_stats_empty():
    s = rep.handoff_stats([], mean_e2e_s=1.0)
    assert s["count"] == 0 and s["share_of_e2e"] is None and s["handoff_s"]["p99"] is None


def test_target_handoff_pass_fail_skip():
    rows = [_row("1p1d_ipc", "disagg", "10k", 1.5, _summary(1.5, 0.01, e2e_mean=3.0), [_h(0.03)])]
    t = rep.target_handoff(rows, 8000)
    assert t["status"] == "PASS" and t["value"] == pytest.approx(0.01)
    rows.append(_row("1p1d_nccl", "disagg", "10k", 1.5, _summary(1.5, 0.01, e2e_mean=3.0), [_h(0.09)]))
    t = rep.target_handoff(rows, 8000)
    assert t["status"] == "FAIL" and t["value"] == pytest.approx(0.03)
    assert rep.target_handoff(rows, 9000)["status"] == "SKIP"  # no run with prompts that long
    colo_only = [_row("2colo", "colo", "10k", 1.5, _summary(1.5, 0.01))]
    assert rep.target_handoff(colo_only, 0)["status"] == "SKIP"


def test_target_tpot_needs_equal_throughput_and_lower_p99():
    rows = [_row("1p1d_ipc", "disagg", "gov_report", 2.0, _summary(2.0, 0.015)),
            _row("2colo", "colo", "gov_report", 2.0, _summary(1.95, 0.090)),
            _row("1p1d_ipc", "disagg", "gov_report", 4.0, _summary(3.0, 0.020)),
            _row("2colo", "colo", "gov_report", 4.0, _summary(3.9, 0.200))]
    t = rep.target_tpot(rows, "gov_report")
    assert t["status"] == "PASS"
    assert "@2 req/s" in t["detail"] and "@4" not in t["detail"]  # 3.0 vs 3.9 req/s is not equal throughput
    rows[1] = _row("2colo", "colo", "gov_report", 2.0, _summary(2.0, 0.010))
    assert rep.target_tpot(rows, "gov_report")["status"] == "FAIL"
    assert rep.target_tpot(rows[2:], "gov_report")["detail"] == "no rate where both carried the same throughput"
    assert rep.target_tpot(rows, "qmsum")["status"] == "SKIP"


def test_equal_throughput_tolerance():
    a = _row("a", "disagg", "x", 1, _summary(10.0, 0.01))
    assert rep.equal_throughput(a, _row("b", "colo", "x", 1, _summary(9.0, 0.01)))
    assert not rep.equal_throughput(a, _row("b", "colo", "x", 1, _summary(8.9, 0.01)))


def test_target_scheduler_within_five_percent():
    rows = [_row("2p2d", "disagg", "gov_report", 8, _summary(8, 0.01, out_tps=960.0)),
            _row("3p1d", "disagg", "gov_report", 8, _summary(8, 0.01, out_tps=1000.0)),
            _row("1p3d", "disagg", "gov_report", 8, _summary(5, 0.01, out_tps=600.0)),
            _row("shift", "disagg", "shift", 10, _summary(10, 0.01, out_tps=900.0)),
            _row("3p1d", "disagg", "shift", 10, _summary(10, 0.01, out_tps=1000.0))]
    out = rep.target_scheduler(rows, {"gov_report": "2p2d", "shift": "shift", "qmsum": "2p2d"}, ("3p1d", "1p3d"))
    assert [t["status"] for t in out] == ["PASS", "FAIL", "SKIP"]
    assert out[0]["value"] == pytest.approx(0.96) and out[1]["value"] == pytest.approx(0.9)


def test_greedy_compare_reports_first_difference():
    outs = {"2colo": [["a", "b", "c"], ["d", "e"]], "1p1d_ipc": [["a", "b", "c"], ["d", "x"]],
            "1p1d_nccl": [["a", "b", "c"], ["d", "e"]]}
    cmp = rep.greedy_compare(outs, "2colo")
    assert cmp == {"1p1d_ipc": {"prompts": 2, "equal": 1, "first_diff": [1, 1]},
                   "1p1d_nccl": {"prompts": 2, "equal": 2, "first_diff": None}}
    assert rep.target_greedy(cmp, "2colo")["status"] == "FAIL"
    del outs["1p1d_ipc"]
    assert rep.target_greedy(rep.greedy_compare(outs, "2colo"), "2colo")["status"] == "PASS"
    assert rep.target_greedy(rep.greedy_compare({}, "2colo"), "2colo")["status"] == "SKIP"


def test_markdown_has_targets_and_rows():
    rows = [_row("1p1d_ipc", "disagg", "10k", 1.5, _summary(1.5, 0.012, e2e_mean=3.0), [_h(0.03)])]
    t = rep.target_handoff(rows, 8000)
    md = rep.markdown(rows, [t], {"gpus": 2, "model": "m", "device": "cuda"}, ["skipped: x"])
    assert "- **PASS** KV hand-off < 2% of E2E" in md
    assert "| 1p1d_ipc | 10k | 1.5 | 8000/256 | 10/10 | 1.50 | 100 | 100.0 | 200.0 | 12.0 | 12.0 | 3.00 |" in md
    assert "| 1p1d_ipc | 10k | 1.5 | 1 (0 failed) | cuda_ipc | 1.0 | 1.00 | 30.0 | 30.0 | 15.0 | 15.0 | 1.000% |" in md
    assert md.rstrip().endswith("- skipped: x")


def _bench_module():
    path = _PATH.parent / "stack_bench.py"
    spec = importlib.util.spec_from_file_location("stack_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_exactly_once_flags_lost_and_wrong_length():
    sb = _bench_module()
    from libs.loadgen.metrics import RequestRecord
    from libs.loadgen.workloads import RequestSpec

    specs = [RequestSpec(i, [1, 2], 4) for i in range(3)]
    recs = [RequestRecord(i, 0.0, 2, output_tokens=4, status=200) for i in range(3)]
    assert sb.exactly_once(specs, recs) == {"ok": True, "sent": 3, "lost": 0, "wrong_length": 0}
    recs[1].status, recs[2].output_tokens = 429, 5
    assert sb.exactly_once(specs, recs) == {"ok": False, "sent": 3, "lost": 1, "wrong_length": 1}


@pytest.mark.parametrize("gpus, first, colo", [(2, "1p1d_ipc", "2colo"), (4, "flowkv", "4colo"), (8, "flowkv", "8colo")])
def test_plan_per_gpu_count(gpus, first, colo):
    sb = _bench_module()
    args = sb.parse(["--gpus", str(gpus), "--device", "cuda", "--model", "llama-3.1-8b"])
    exps = sb.plan(args, sb.PROFILES[args.model])
    assert exps[0].name == first and colo in [e.name for e in exps]
    by = {e.name: e for e in exps}
    assert [s.device for s in by[colo].shapes] == [f"cuda:{i}" for i in range(gpus)]
    assert all(s.policy == "least_loaded" for s in by[colo].shapes)
    if gpus >= 4:
        # The scheduler against every fixed split (three at 8 GPUs), each on both workloads.
        fixed = {4: ["3p1d", "2p2d", "1p3d"], 8: ["6p2d", "4p4d", "2p6d"]}[gpus]
        assert [e.name for e in exps] == ["flowkv", colo, *fixed]
        assert sb.scheduler_targets(gpus) == ({"long": "flowkv", "shift": "flowkv"}, tuple(fixed))
        assert by["flowkv"].shapes[0].policy == "flowkv"
        # Every cluster is measured after the same lead-in (pools past their first fill).
        assert {e.lead_in_s for e in exps} == {sb.PROFILES[args.model].lead_in_s} and exps[0].lead_in_s > 0
        for name in fixed:
            p = int(name.split("p")[0])
            assert by[name].want_roles == (p, gpus - p)
            assert [r["workload"] for r in by[name].runs] == ["gov_report", "shift"]


def test_plan_one_gpu_shares_it():
    sb = _bench_module()
    by = {e.name: e for e in sb.plan(sb.parse(["--gpus", "1", "--device", "cuda"]), sb.PROFILES["llama-3.1-8b"])}
    assert list(by) == ["1p1d_ipc", "1colo"]  # no NCCL (two ranks on one device) and no second GPU
    # Both nodes land on the one visible GPU, each with a fixed pool so the second finds room.
    assert by["1p1d_ipc"].env == {"FLOWKV_NODE_NUM_BLOCKS": str(sys.modules["stack_plan"].shared_gpu_num_blocks())}
    assert by["1p1d_ipc"].shapes[0].device == "cuda" and by["1colo"].shapes[0].device == "cuda:0"
    with pytest.raises(SystemExit):
        sb.plan(sb.parse(["--gpus", "1", "--device", "cuda", "--experiments", "2colo"]), sb.PROFILES["llama-3.1-8b"])
    two = {e.name: e for e in sb.plan(sb.parse(["--gpus", "2", "--device", "cuda"]), sb.PROFILES["llama-3.1-8b"])}
    assert two["1p1d_ipc"].env == {}


def test_shared_gpu_pools_fit_the_card():
    _bench_module()  # puts stack_plan on the path
    sizes = sys.modules["stack_plan"]
    # An 80 GB H100 (79.18 GiB usable): two pools of 16,000 blocks overran it by 26 GiB.
    h100 = sizes.shared_gpu_num_blocks(79.18)
    assert h100 == 8000
    assert 2 * (sizes.SHARED_GPU_NODE_GIB + h100 * sizes.SHARED_GPU_BLOCK_GIB) < 79.18
    assert sizes.shared_gpu_num_blocks(139.8) == sizes.SHARED_GPU_NUM_BLOCKS  # an H200 keeps the recorded runs' pools


def test_plan_lead_in_override():
    sb = _bench_module()
    args = sb.parse(["--gpus", "4", "--device", "cpu", "--model", "tiny", "--lead-in-s", "0"])
    assert {e.lead_in_s for e in sb.plan(args, sb.PROFILES["tiny"])} == {0.0}
    args = sb.parse(["--gpus", "4", "--device", "cpu", "--model", "tiny", "--lead-in-s", "3",
                     "--experiments", "flowkv,2p2d,4colo,1p1d_ipc"])
    by = {e.name: e.lead_in_s for e in sb.plan(args, sb.PROFILES["tiny"])}
    assert by["flowkv"] == by["2p2d"] == by["4colo"] == 3.0
    assert by["1p1d_ipc"] == 0.0  # the 2-GPU set has no lead-in to override


def test_plan_rates_and_cpu_transports():
    sb = _bench_module()
    args = sb.parse(["--gpus", "2", "--device", "cpu", "--model", "tiny", "--rates", "1,3", "--duration-s", "2"])
    by = {e.name: e for e in sb.plan(args, sb.PROFILES["tiny"])}
    assert [(r["workload"], r["rate"]) for r in by["1p1d_ipc"].runs] == [
        ("gov_report", 1.0), ("gov_report", 3.0), ("10k", 2.0), ("1k", 4.0)]
    assert all(r["duration_s"] == 2 for r in by["2colo"].runs)
    assert (by["1p1d_ipc"].kv_transport, by["1p1d_nccl"].kv_transport) == ("shm", "tcp")
    args = sb.parse(["--gpus", "2", "--device", "cpu", "--model", "tiny", "--rates", "1.5,2", "--workloads", "gov_report"])
    by = {e.name: e for e in sb.plan(args, sb.PROFILES["tiny"])}
    assert [(r["workload"], r["rate"]) for r in by["1p1d_ipc"].runs] == [("gov_report", 1.5), ("gov_report", 2.0)]
    assert [r["workload"] for r in by["1p1d_nccl"].runs] == ["gov_report"]
    args = sb.parse(["--gpus", "2", "--device", "cpu", "--model", "tiny", "--experiments", "1p1d_ipc,1p1d_nccl",
                     "--synth", "5k=1,2.5", "--synth", "10k=3", "--workloads", "5k,10k"])
    by = {e.name: e for e in sb.plan(args, sb.PROFILES["tiny"])}
    assert [(r["workload"], r["rate"]) for r in by["1p1d_ipc"].runs] == [("5k", 1.0), ("5k", 2.5), ("10k", 3.0)]
    assert by["1p1d_ipc"].runs[0]["length_scale"] == sb.PROFILES["tiny"].synth_scale["5k"]
    assert [(r["workload"], r["rate"]) for r in by["1p1d_nccl"].runs] == [("10k", 2.0)]  # only 1P1D ipc and 2colo
    with pytest.raises(SystemExit):
        sb.plan(sb.parse(["--gpus", "2", "--synth", "7k=1"]), sb.PROFILES["tiny"])
    args = sb.parse(["--gpus", "2", "--experiments", "1colo,bogus"])
    with pytest.raises(SystemExit):
        sb.plan(args, sb.PROFILES["llama-3.1-8b"])


def test_node_summary_shows_where_the_prefill_work_went():
    samples = [rep.NodeSample(t, n, role, q, rate, run, 0.01)
               for t, n, role, q, rate, run in ((1.0, "p0", "prefill", 8000, 20000.0, 0), (2.0, "p0", "prefill", 4000, 0.0, 0),
                                                (1.0, "p1", "decode", 0, 0.0, 3), (2.0, "p1", "prefill", 0, 30000.0, 0),
                                                (1.0, "d0", "decode", 0, 0.0, 5))]
    hs = [rep.Handoff(t=0.0, request_id="r", prompt_tokens=n, handoff_s=0.01, transfer_s=0.001, bytes=1, calls=1,
                      segments=1, transport="cuda_ipc", ok=True, prefill_node=p, decode_node="d0")
          for n, p in ((6000, "p0"), (2000, "p0"), (1000, "p1"))]
    trace = rep.run_trace(samples, hs, t0=0.5)
    assert trace["samples"][0] == [0.5, "p0", "prefill", 8000, 20000, 0, 10.0]
    assert trace["handoffs"][2] == [-0.5, 1000, "p1", "d0", 10.0, 1]
    got = rep.node_summary(samples, hs)
    assert list(got) == ["d0", "p0", "p1"]
    assert got["p0"]["mean_waiting_prefill_tokens"] == 6000 and got["p0"]["mean_prefill_tokens_per_s"] == 20000.0
    assert (got["p0"]["handoffs_sent"], got["p0"]["mean_prompt_tokens_sent"]) == (2, 4000)
    assert got["p1"]["roles"] == ["decode", "prefill"] and got["p1"]["handoffs_sent"] == 1
    assert (got["d0"]["handoffs_received"], got["d0"]["mean_running"], got["d0"]["handoffs_sent"]) == (3, 5, 0)

"""The headline comparison of the stack benchmark (block-wise baseline against FlowKV): its
plan per GPU count and its report, on hand-made rows (nothing is started)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


rep = _load("stack_report")
sb = _load("stack_bench")


def _plan(gpus: int, device: str = "cuda", *extra: str) -> dict:
    model = "llama-3.1-8b" if device == "cuda" else "tiny"
    args = sb.parse(["--gpus", str(gpus), "--device", device, "--model", model, "--experiments", "headline", *extra])
    return {e.name: e for e in sb.plan(args, sb.PROFILES[model])}


def test_one_gpu_runs_the_cuda_ipc_pair_flowkv_first():
    by = _plan(1)
    assert list(by) == ["flowkv_ipc", "baseline_ipc"]  # NCCL cannot put two ranks on one device
    base, flow = by["baseline_ipc"], by["flowkv_ipc"]
    assert (base.shapes[0].policy, flow.shapes[0].policy) == ("round_robin", "flowkv")
    assert base.shapes[0].device == flow.shapes[0].device == "cuda"  # both nodes share cuda:0
    assert base.env["FLOWKV_NODE_KV_TRANSFER_GRANULARITY"] == "blockwise"
    assert flow.env["FLOWKV_NODE_KV_TRANSFER_GRANULARITY"] == "merged"
    for e in (base, flow):
        assert e.kv_transport == "cuda_ipc" and e.want_roles == (1, 1) and e.kind == "disagg"
        assert e.env["FLOWKV_NODE_NUM_BLOCKS"] == "16000" and e.env["FLOWKV_NODE_MAX_MODEL_LEN"] == "49152"
    # Same arrivals: same workloads, rates and lengths on both sides (the seed is the workload and rate).
    assert base.runs == flow.runs
    assert [(r["workload"], r["rate"]) for r in base.runs] == [
        ("gov_report", 0.5), ("gov_report", 1.0), ("qmsum", 0.5), ("qmsum", 1.0), ("multi_news", 2.0),
        ("multi_news", 4.0)]
    assert {r["length_scale"] for r in base.runs} == {1.0}


def test_two_and_four_gpus_add_nccl_and_scale():
    two = _plan(2)
    assert list(two) == ["flowkv_nccl", "baseline_nccl", "flowkv_ipc", "baseline_ipc"]
    assert two["baseline_nccl"].kv_transport == "nccl" and "FLOWKV_NODE_NUM_BLOCKS" not in two["baseline_nccl"].env
    four = _plan(4, "cuda", "--workloads", "qmsum", "--duration-s", "7")
    assert four["flowkv_nccl"].shapes[0].prefill == four["flowkv_nccl"].want_roles[0] == 2
    assert [(r["workload"], r["rate"], r["duration_s"]) for r in four["baseline_ipc"].runs] == [
        ("qmsum", 1.0, 7.0), ("qmsum", 2.0, 7.0)]
    cpu = _plan(2, "cpu")
    assert (cpu["baseline_ipc"].kv_transport, cpu["baseline_nccl"].kv_transport) == ("shm", "tcp")


def _summary(e2e: float, ttft: float, n: int = 10) -> dict:
    def stat(v: float) -> dict:
        return {"mean": v, "p50": v, "p90": v, "p99": v * 1.5}
    return {"num_requests": n, "completed": n, "failed": 0, "duration_s": 10.0, "request_throughput": n / 10,
            "output_throughput": 100.0, "ttft": stat(ttft), "tpot": stat(0.01), "itl": stat(0.01), "e2e": stat(e2e)}


def _row(exp: str, workload: str, rate: float, e2e: float, transfer: float, calls: int) -> dict:
    hs = [rep.Handoff(t=0.0, request_id=f"r{i}", prompt_tokens=11000, handoff_s=transfer + 0.01, transfer_s=transfer,
                      bytes=1 << 30, calls=calls, segments=1, transport="cuda_ipc", ok=True) for i in range(10)]
    lengths = {"mean_input_len": 11000.0, "max_input_len": 20000, "mean_output_len": 400.0, "max_output_len": 512}
    return rep.run_row(exp, "disagg", {"workload": workload, "rate": rate}, _summary(e2e, 0.5), lengths, hs)


def test_headline_ratios_and_targets():
    rows = [_row("flowkv_ipc", "gov_report", 0.5, e2e=4.0, transfer=0.004, calls=1),
            _row("baseline_ipc", "gov_report", 0.5, e2e=5.0, transfer=0.200, calls=44000),
            _row("baseline_ipc", "qmsum", 1.0, e2e=2.0, transfer=0.250, calls=55000)]  # no FlowKV run: no pair
    (e,) = rep.headline(rows, sb.HEADLINE_PAIRS)
    assert (e["transport"], e["workload"], e["rate"]) == ("cuda_ipc", "gov_report", 0.5)
    assert e["ratio"]["e2e_mean"] == pytest.approx(1.25) and e["ratio"]["transfer_mean"] == pytest.approx(50)
    assert e["transfer_reduction"] == pytest.approx(0.98) and e["e2e_gain"] == pytest.approx(0.2)
    assert e["baseline"]["calls"] == 44000 and e["flowkv"]["calls"] == 1
    assert e["baseline"]["share"] == pytest.approx(0.21 / 5.0)
    cut, gain = rep.target_headline([e])
    assert cut["status"] == "PASS" and "98.0%" in cut["detail"]
    assert gain["status"] == "SKIP"  # the baseline's hand-off is 4.2% of E2E: not a comparable share
    e["baseline"]["share"], e["e2e_gain"] = 0.3, 0.1
    assert rep.target_headline([e])[1]["status"] == "FAIL"
    e["transfer_reduction"] = 0.9
    assert rep.target_headline([e])[0]["status"] == "FAIL"
    assert [t["status"] for t in rep.target_headline([])] == ["SKIP", "SKIP"]
    md = "\n".join(rep.headline_markdown([e]))
    assert "| cuda_ipc | gov_report | 0.5 |" in md and "(1.25)" in md and "44000 / 1.00" in md

"""benchmarks/goodput_real.py: the cluster each policy launches, the shared workload, and
goodput counted from request records."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from libs.loadgen.metrics import RequestRecord

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "goodput_real.py"
_spec = importlib.util.spec_from_file_location("goodput_real", _PATH)
assert _spec is not None and _spec.loader is not None
gr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gr)


def _args(**kw) -> argparse.Namespace:
    base = dict(rate=2.0, lead_in_s=5.0, duration_s=10.0, input_len="10:20", output_len="4:8", seed=0,
                ttft_slo=1.0, tpot_slo=0.1)
    return argparse.Namespace(**(base | kw))


def test_each_policy_launches_its_shape() -> None:
    assert gr.shape_of("colocated", 4, "cpu").up_args()[:2] == ["--colocated", "4"]
    assert gr.shape_of("fixed:3:1", 4, "cuda").up_args()[:4] == ["--prefill-nodes", "3", "--decode-nodes", "1"]
    assert gr.shape_of("flowkv", 4, "cpu").up_args()[-2:] == ["--policy", "flowkv"]
    assert (gr.shape_of("flowkv", 4, "cpu").prefill, gr.shape_of("flowkv", 4, "cpu").decode) == (2, 2)
    # The same policy launched all hybrid, as `flowkv up --colocated 4` with the default policy.
    assert gr.shape_of("flowkv@hybrid", 4, "cpu").up_args() == ["--colocated", "4", "--device", "cpu", "--policy", "flowkv"]
    assert gr.is_flowkv("flowkv@hybrid") and gr.is_flowkv("flowkv") and not gr.is_flowkv("colocated")


def test_workload_is_seeded_and_within_the_window() -> None:
    specs, gaps = gr.workload(_args())
    again, gaps2 = gr.workload(_args())
    assert [s.prompt_token_ids for s in specs] == [s.prompt_token_ids for s in again] and gaps == gaps2
    assert sum(gaps) < 15.0 and len(specs) == len(gaps) > 10
    assert all(10 <= s.input_len <= 20 and 4 <= s.output_len <= 8 for s in specs)


def test_goodput_counts_the_window_within_both_objectives() -> None:
    def rec(i: int, ttft: float, e2e: float, out: int = 5, status: int = 200) -> RequestRecord:
        return RequestRecord(i, 0.0, 10, out, status, "", ttft, e2e)

    records = [rec(0, 0.1, 0.5),  # in the lead-in: not counted
               rec(1, 0.5, 0.9),  # TPOT 0.1: within
               rec(2, 1.5, 1.6),  # TTFT past 1 s
               rec(3, 0.2, 1.0),  # TPOT 0.2: past 0.1
               rec(4, 0.2, 0.3, status=500)]  # failed
    row = gr.measure(records, [1.0, 6.0, 7.0, 8.0, 9.0], _args())
    assert row["num_requests"] == 4 and row["num_completed"] == 3
    assert row["goodput_rps"] == 0.1 and row["slo_attainment"] == 0.25
    assert row["throughput_tok_s"] == 1.5
    assert row["missed"] == [[7.0, 1.5, 0.025], [8.0, 0.2, 0.2], [9.0, None, None]]


def test_roles_over_time_follow_the_flips_done() -> None:
    flips = [[-0.4, "decode-0", "decode", "prefill", "requested: pinned by policy"],
             [5.0, "decode-1", "decode", "hybrid", "requested: goodput: ..."],
             [5.2, "decode-1", "decode", "hybrid", "done"],
             [6.0, "decode-0", "decode", "prefill", "done"],
             [9.0, "prefill-0", "prefill", "decode", "failed: node left"]]
    assert gr.roles_over_time(gr.shape_of("flowkv", 4, "cpu"), flips) == [
        (-0.4, 2, 0, 2), (5.2, 2, 1, 1), (6.0, 3, 1, 0)]
    assert gr.roles_over_time(gr.shape_of("flowkv@hybrid", 4, "cpu"), []) == [(0.0, 0, 4, 0)]

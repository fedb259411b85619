"""The real-cluster scheduler benchmark's pure parts: CPU plan, rates, streams, window figures, targets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from scheduler_real import plan, report
from scheduler_real.plan import ClusterCpus, Durations, Multipliers, Phase

from libs.loadgen.metrics import RequestRecord
from libs.loadgen.workloads import RequestSpec


def test_parse_and_label_cpus():
    assert plan.parse_cpus("16-19,22, 24-25") == [16, 17, 18, 19, 22, 24, 25]
    assert plan.cpus_label([25, 16, 17, 18, 19, 22, 24]) == "16-19,22,24-25"
    with pytest.raises(ValueError):
        plan.parse_cpus("5-3")


def test_plan_48_cores_five_clusters_in_parallel():
    p = plan.plan_cpus(list(range(16, 64)), 5, node_threads=2)
    assert p.parallel and not p.shared
    # 5 x (4 nodes x 2 + 1 service) = 45 cores; the 3 left drive the load.
    assert p.clusters[0] == ClusterCpus(((16, 17), (18, 19), (20, 21), (22, 23)), (24,))
    assert p.clusters[4].all == tuple(range(52, 61))
    assert p.driver == (61, 62, 63)
    every = [c for cl in p.clusters for c in cl.all] + list(p.driver)
    assert sorted(every) == list(range(16, 64))  # disjoint, nothing lost


def test_plan_gives_two_service_cores_when_room_is_left():
    p = plan.plan_cpus(list(range(64)), 5, node_threads=2)
    assert [len(c.service) for c in p.clusters] == [2] * 5
    assert p.driver == tuple(range(50, 64))


def test_plan_gives_up_a_service_core_so_the_driver_has_one():
    p = plan.plan_cpus(list(range(50)), 5, node_threads=2)  # 5 x 10 would leave none
    assert [len(c.service) for c in p.clusters] == [1] * 5
    assert p.driver == tuple(range(45, 50))


def test_plan_falls_back_to_sequential_or_shares():
    seq = plan.plan_cpus(list(range(12)), 5, node_threads=2)
    assert not seq.parallel and not seq.shared and len(seq.clusters) == 1
    assert seq.clusters[0].nodes[3] == (6, 7) and seq.clusters[0].service == (8, 9) and seq.driver == (10, 11)
    shared = plan.plan_cpus([0, 1], 2, node_threads=2, parallel=True)
    assert shared.parallel and shared.shared and shared.driver == ()
    assert [c.all for c in shared.clusters] == [(0, 1), (0, 1)] and shared.clusters[0].nodes == ()
    forced = plan.plan_cpus(list(range(64)), 5, node_threads=2, parallel=False)
    assert not forced.parallel and len(forced.clusters) == 1


def test_placement_gives_the_gateway_a_core_of_its_own():
    one = plan.plan_cpus(list(range(16, 64)), 5, node_threads=2)
    got = plan.placement(one.clusters[1], one.driver)
    assert got["prefill-0"] == (25, 26) and got["decode-1"] == (31, 32)
    assert got["gateway"] == (33,) and got["scheduler"] == got["nats"] == got["flowkv-up"] == (61, 62, 63)
    two = plan.plan_cpus(list(range(64)), 5, node_threads=2)
    got = plan.placement(two.clusters[0], two.driver)
    assert got["gateway"] == (8,) and got["scheduler"] == (9,)
    assert plan.placement(plan.plan_cpus([0, 1], 2, 2, parallel=True).clusters[0], ()) == {}


CAPACITY = {"prefill": 40.0, "decode": 20.0, "normal": 60.0, "mixed": 24.0}


def test_scenario_rates_are_multiples_of_the_2_2_capacity():
    ph = plan.scenario_phases(CAPACITY, Multipliers(0.5, 1.4, 2.0), Durations(20.0, 25.0, 15.0))
    assert ph["normal"] == [Phase(20.0, 30.0, "normal")]
    assert ph["imbalance_prefill"] == [Phase(25.0, 56.0, "prefill")]
    assert ph["imbalance_decode"] == [Phase(25.0, 28.0, "decode")]
    assert ph["overload"] == [Phase(15.0, 48.0, "mixed")]
    assert list(ph) == list(plan.SCENARIOS) and plan.window_s(ph["imbalance_prefill"]) == 25.0
    with pytest.raises(ValueError, match="decode"):
        plan.scenario_phases({**CAPACITY, "decode": 0.0}, Multipliers(), Durations())


def test_streams_are_deterministic_and_follow_the_phases():
    phases = [Phase(5.0, 4.0, "prefill"), Phase(5.0, 4.0, "decode")]
    a, ta = plan.make_specs(phases, "0:imbalance")
    b, tb = plan.make_specs(phases, "0:imbalance")
    assert a == b and ta == tb
    assert plan.make_specs(phases, "0:normal")[0] != a
    assert ta == sorted(ta) and all(0 < t < 10.0 for t in ta)
    for spec, t in zip(a, ta):
        kind = plan.PROMPT_HEAVY if t < 5.0 else plan.OUTPUT_HEAVY
        assert kind.prompt[0] <= spec.input_len <= kind.prompt[1]
        assert kind.output[0] <= spec.output_len <= kind.output[1]
    assert [s.index for s in a] == list(range(len(a)))


def test_imbalance_bound():
    # 2:2 carries 1.0x of the side in demand, a flipped 3:1 / 1:3 split up to 1.5x.
    assert report.imbalance_bound(1.4) == pytest.approx(1.4)
    assert report.imbalance_bound(2.0) == 1.5 and report.imbalance_bound(0.8) == 1.0


def _rec(i: int, start: float, e2e: float, out: int, ttft: float = 0.1, ok: bool = True) -> RequestRecord:
    gaps = [(e2e - ttft) / (out - 1)] * (out - 1) if out > 1 else []
    return RequestRecord(index=i, start=start, prompt_tokens=10, output_tokens=out, status=200 if ok else 429,
                         error="" if ok else "busy", ttft=ttft, e2e=e2e, itl=gaps)


def test_window_stats_count_only_completions_inside_the_window():
    recs = [_rec(0, 0.0, 1.0, 4), _rec(1, 4.0, 2.0, 4), _rec(2, 9.0, 3.0, 4), _rec(3, 1.0, 1.0, 4, ok=False)]
    w = report.window_stats(recs, [5.0, 5.0])
    assert w["window_completed"] == 2 and w["window_rps"] == 0.2
    assert w["phase_completed"] == [1, 1]  # 1.0 in the first phase, 6.0 in the second; 12.0 is past the window
    assert w["window_out_tok_s"] == 0.8


def test_burst_rate_counts_tokens_in_the_window():
    # Ten requests of 5 tokens, one chunk a second from t=1..5 each: 50 tokens, 10 per second at t in (1, 5].
    recs = [_rec(i, 0.0, 5.0, 5, ttft=1.0) for i in range(10)]
    r = report.burst_rate(recs, 2.0, 5.0, mean_output=5.0)
    assert r["out_tok_s"] == pytest.approx(10.0)  # chunks at 3, 4, 5 of each request
    assert r["rps"] == pytest.approx(2.0) and r["completed_rps"] == pytest.approx(10 / 3)
    assert r["failed"] == 0 and r["sent"] == 10


def test_answer_check():
    specs = [RequestSpec(0, [1] * 10, 4), RequestSpec(1, [1] * 10, 4), RequestSpec(2, [1] * 10, 4)]
    good = [_rec(0, 0, 1, 4), _rec(1, 0, 1, 4), _rec(2, 0, 1, 4)]
    assert report.answer_check(specs, good)["all_once_in_full"]
    short = [_rec(0, 0, 1, 4), _rec(1, 0, 1, 3), _rec(2, 0, 1, 4, ok=False)]
    got = report.answer_check(specs, short)
    assert not got["all_once_in_full"]
    assert got["answered_in_full"] == 1 and got["wrong_or_partial"] == 1 and got["not_answered"] == {"429": 1}
    twice = _rec(2, 0, 1, 4)
    twice.itl.append(0.1)  # five chunks for four tokens: a chunk streamed twice
    assert report.answer_check(specs, [good[0], good[1], twice])["wrong_or_partial"] == 1


def _row(sc: str, pol: str, rps: float, late: float | None = None) -> dict:
    return {"scenario": sc, "policy": pol, "window_rps": rps, "request_throughput": late or rps}


def test_targets_pass_and_fail():
    rows = [_row("imbalance_prefill", "flowkv", 12.0), _row("imbalance_prefill", "round_robin", 9.0),
            _row("imbalance_prefill", "fixed:1:1", 10.0), _row("imbalance_prefill", "fixed:3:1", 11.0),
            _row("imbalance_prefill", "fixed:1:3", 8.0),
            _row("overload", "flowkv", 9.4), _row("overload", "fixed:1:1", 10.0), _row("overload", "fixed:3:1", 9.0)]
    got = {t.name: t for t in report.targets(rows)}
    gain = got["imbalance_prefill: flowkv / fixed:1:1"]
    assert gain.ratio == pytest.approx(1.2) and gain.verdict == "PASS"
    assert got["imbalance_prefill: flowkv / best fixed (fixed:3:1)"].verdict == "PASS"
    assert got["imbalance_prefill: flowkv / round_robin"].verdict == "info"
    over = got["overload: flowkv / best fixed (fixed:1:1)"]
    assert over.ratio == pytest.approx(0.94) and over.verdict == "FAIL"
    assert got["overload: flowkv / round_robin"].verdict == "n/a"
    assert "normal" not in " ".join(got)


def test_markdown_has_a_row_per_run_and_the_verdicts():
    stat = {"mean": None, "p50": 0.1, "p90": None, "p99": 0.2}
    rows = [{**_row("imbalance_prefill", p, r), "output_throughput": 100.0, "ttft": stat, "tpot": stat, "flips": 0,
             "roles_before": ["decode", "decode", "prefill", "prefill"], "roles_after": ["decode"] + ["prefill"] * 3,
             "answers": {"answered_in_full": 5, "requests": 5, "all_once_in_full": True}}
            for p, r in (("flowkv", 12.0), ("fixed:1:1", 10.0))]
    meta = {"date": "d", "calibration": {"capacity": CAPACITY}, "multipliers": {"imbalance": 1.4}}
    md = report.markdown(meta, rows)
    assert "| imbalance_prefill | flowkv | 12.00 |" in md and "2P 2D -> 3P 1D" in md
    assert "**PASS** imbalance_prefill: flowkv / fixed:1:1 = 1.200" in md
    assert "answered once in full: yes" in md
    assert "could reach flowkv / fixed:1:1 = 1.400" in md and "Busy processes" not in md
    rows[0]["cpu_util"] = {"gateway": 0.93, "decode-0": 2.0}
    assert report.busy_processes(rows) == ["imbalance_prefill/flowkv: gateway 0.93"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(sc, p, r) for sc in ("normal", "overload") for p, r in (("flowkv", 3.0), ("fixed:1:1", 2.0))]
    assert report.plot(str(tmp_path / "t.png"), rows)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert not report.plot(str(tmp_path / "empty.png"), [])

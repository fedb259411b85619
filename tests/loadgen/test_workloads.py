"""Workloads: deterministic for a seed, exact lengths, the documented means and shapes."""

from __future__ import annotations

import pytest

from libs.loadgen.arrivals import intervals
from libs.loadgen.workloads import LONGBENCH_MIXES, Workload, WorkloadOptions, make_workload


def test_same_seed_same_requests_other_seed_other_ids() -> None:
    a = make_workload("random", 20, seed=7)
    b = make_workload("random", 20, seed=7)
    c = make_workload("random", 20, seed=8)
    assert a == b
    assert [s.prompt_token_ids for s in a] != [s.prompt_token_ids for s in c]


def test_fixed_lengths_are_exact_and_ids_stay_in_range() -> None:
    specs = make_workload("fixed", 5, opts=WorkloadOptions(input_len=37, output_len=9, token_id_range=(1000, 1010)))
    assert [(s.index, s.input_len, s.output_len) for s in specs] == [(i, 37, 9) for i in range(5)]
    assert {t for s in specs for t in s.prompt_token_ids} <= set(range(1000, 1010))


def test_random_lengths_within_ratio() -> None:
    specs = make_workload("random", 200, seed=1, opts=WorkloadOptions(input_len=100, output_len=20, range_ratio=0.5))
    ins, outs = [s.input_len for s in specs], [s.output_len for s in specs]
    assert (min(ins) >= 50, max(ins) <= 150, min(outs) >= 10, max(outs) <= 30) == (True, True, True, True)
    assert len(set(ins)) > 20  # really spread, not one value


@pytest.mark.parametrize(("name", "n_in"), [("1k", 1000), ("5k", 5000), ("10k", 10000)])
def test_paper_synthetic_sets(name: str, n_in: int) -> None:
    assert {(s.input_len, s.output_len) for s in make_workload(name, 3)} == {(n_in, 256)}


def test_length_scale_shrinks_every_length() -> None:
    specs = make_workload("10k", 2, opts=WorkloadOptions(length_scale=0.01))
    assert [(s.input_len, s.output_len) for s in specs] == [(100, 3), (100, 3)]


@pytest.mark.parametrize("name", ["gov_report", "multi_news", "qmsum"])
def test_longbench_mixes_match_their_means(name: str) -> None:
    mix = LONGBENCH_MIXES[Workload(name)]
    specs = make_workload(name, 2000, seed=3, opts=WorkloadOptions(length_scale=0.1))
    mean_in = sum(s.input_len for s in specs) / len(specs)
    outs = [s.output_len for s in specs]
    # Seeded draws: the sample mean of 2,000 lognormals lands within a few percent of the target.
    assert abs(mean_in - mix.input_mean * 0.1) / (mix.input_mean * 0.1) < 0.05
    assert max(outs) <= round(512 * 0.1)
    assert min(s.input_len for s in specs) >= int(mix.input_mean * 0.1 / 8)


def test_longbench_published_means() -> None:
    # LongBench task.md average lengths (words) x 1.3 tokens/word; reference summaries likewise.
    got = {w.value: (round(m.input_mean), round(m.output_mean)) for w, m in LONGBENCH_MIXES.items()}
    assert got == {"gov_report": (11354, 719), "multi_news": (2747, 343), "qmsum": (13798, 91)}


def test_shift_is_prompt_heavy_then_output_heavy() -> None:
    specs = make_workload("shift", 5, opts=WorkloadOptions(input_len=100, output_len=40))
    assert [(s.input_len, s.output_len) for s in specs] == [(400, 10), (400, 10), (25, 160), (25, 160), (25, 160)]


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        WorkloadOptions(range_ratio=1.0)
    with pytest.raises(ValueError):
        make_workload("nope", 3)
    with pytest.raises(ValueError):
        make_workload("fixed", 0)


def test_arrivals_poisson_mean_and_inf() -> None:
    gaps = intervals(4000, request_rate=20.0, seed=1)
    assert abs(sum(gaps) / len(gaps) - 0.05) < 0.0025
    assert intervals(4000, 20.0, seed=1) == gaps
    assert intervals(3, float("inf")) == [0.0, 0.0, 0.0]
    bursty = intervals(4000, 20.0, burstiness=0.25, seed=1)
    assert abs(sum(bursty) / len(bursty) - 0.05) < 0.005  # same mean, larger spread
    assert max(bursty) > max(gaps)

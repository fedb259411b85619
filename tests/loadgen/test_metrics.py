"""Metrics math on hand-made records: exact means, percentiles, throughputs, goodput."""

from __future__ import annotations

import pytest

from libs.loadgen.metrics import RequestRecord, Slo, stats, summarize, throughput_timeline


def rec(i: int, ttft: float, e2e: float, out: int, prompt: int = 10, itl: list[float] | None = None,
        status: int = 200, error: str = "", start: float = 0.0) -> RequestRecord:
    return RequestRecord(index=i, start=start, prompt_tokens=prompt, output_tokens=out, status=status, error=error,
                         ttft=ttft, e2e=e2e, itl=itl or [])


def test_percentiles_interpolate_linearly() -> None:
    s = stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s == {"mean": 3.0, "p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96), "max": 5.0}
    assert stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}


def test_tpot_excludes_the_first_token() -> None:
    assert rec(0, 0.1, 1.1, 11).tpot == pytest.approx(0.1)
    assert rec(0, 0.1, 0.1, 1).tpot is None


def test_summary_of_a_small_run() -> None:
    records = [
        rec(0, 0.1, 0.5, 5, itl=[0.1, 0.1, 0.1, 0.1]),
        rec(1, 0.2, 1.0, 9, itl=[0.1] * 8),
        rec(2, 0.3, 0.3, 1),
        rec(3, 0.0, 0.0, 0, status=429, error="busy"),
        rec(4, 0.0, 0.0, 0, status=200, error="node failed"),
        rec(5, 0.0, 0.0, 0, status=0, error="ClientConnectorError"),
    ]
    s = summarize(records, duration_s=2.0, slo=Slo(ttft_s=0.25, tpot_s=0.1))
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 3, 3)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 15)
    assert (s["request_throughput"], s["output_throughput"], s["total_token_throughput"]) == (1.5, 7.5, 22.5)
    assert s["ttft"] == {"mean": pytest.approx(0.2), "p50": 0.2, "p90": pytest.approx(0.28), "p99": pytest.approx(0.298),
                         "max": 0.3}
    assert s["tpot"]["mean"] == pytest.approx(0.1)  # (0.5-0.1)/4 and (1.0-0.2)/8
    assert s["itl"]["p50"] == pytest.approx(0.1)
    assert s["e2e"]["p50"] == 0.5
    # request 0: TTFT 0.1, TPOT 0.1 -> met; 1: TPOT 0.1 -> met; 2: TTFT 0.3 > 0.25 -> missed
    assert s["goodput_rps"] == 1.0
    assert s["failures"] == {"429": 1, "no_response": 1, "stream_error": 1}


def test_no_slo_no_goodput() -> None:
    assert summarize([rec(0, 0.1, 0.2, 2)], 1.0)["goodput_rps"] is None


def test_throughput_timeline_bins_every_token() -> None:
    records = [rec(0, 0.5, 2.5, 4, itl=[1.0, 0.5, 0.5]), rec(1, 0.2, 0.2, 2, start=1.0)]
    times, rates = throughput_timeline(records, bin_s=1.0)
    # arrivals: r0 at 0.5, 1.5, 2.0, 2.5 (one token each); r1 at 1.2 (both tokens)
    assert times == [0.0, 1.0, 2.0]
    assert rates == [1.0, 3.0, 2.0]

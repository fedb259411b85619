"""Value checks on load reports (measured KV links that would poison the cost model) and on
placement requests (objectives that are not a number of seconds)."""

from __future__ import annotations

import math

import pytest

from libs.protocol.messages import KVLink, PlaceRequest
from services.scheduler.validation import place_problem, report_problem
from tests.scheduler.helpers import report


def test_sane_links_pass() -> None:
    link = KVLink(peer="d1", bandwidth_bytes_per_s=1e9, latency_s=0.0, transfers=0)
    assert report_problem(report("p1", links=[link])) is None


@pytest.mark.parametrize("bandwidth, latency, transfers", [
    (0.0, 0.0, 1), (-1e9, 0.0, 1), (math.nan, 0.0, 1), (math.inf, 0.0, 1),
    (1e9, -0.001, 1), (1e9, math.nan, 1), (1e9, 0.0, -1),
])
def test_absurd_links_are_refused(bandwidth: float, latency: float, transfers: int) -> None:
    link = KVLink(peer="d1", bandwidth_bytes_per_s=bandwidth, latency_s=latency, transfers=transfers)
    problem = report_problem(report("p1", links=[link]))
    assert problem is not None and problem.startswith("kv link to 'd1'")


@pytest.mark.parametrize("field", ["ttft_slo_s", "tpot_slo_s"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_absurd_objectives_are_refused(field: str, value: float) -> None:
    ok = PlaceRequest(request_id="r", model="m", num_prompt_tokens=8, max_tokens=4, ttft_slo_s=2.0, tpot_slo_s=0.05)
    assert place_problem(ok) is None
    bad = PlaceRequest(**{**{f: getattr(ok, f) for f in ok.__struct_fields__}, field: value})
    problem = place_problem(bad)
    assert problem is not None and problem.startswith(field)

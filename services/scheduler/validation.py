"""Value checks on what reaches the scheduler over NATS (msgspec has checked the types).

A load report with a node id that is not one subject token would be placed on and then
break every subject built from it; negative or non-finite load figures would poison the
cost model (a negative predicted TTFT wins every placement; so would a negative measured
KV link bandwidth). Such reports are dropped and counted, and placement requests with
absurd sizes are rejected as ``invalid`` (found by tests/fuzz).
"""

from __future__ import annotations

import math

from libs.protocol.messages import LoadReport, PlaceRequest
from libs.protocol.subjects import check_token

_COUNTS = ("device_memory_bytes", "kv_block_bytes", "total_blocks", "free_blocks", "largest_free_segment",
           "num_waiting", "waiting_prefill_tokens", "num_running", "num_held", "max_num_seqs", "max_pass_tokens")
_RATES = ("prefill_tokens_per_s", "decode_step_s", "started_at", "prefill_pass_tokens", "prefill_pass_s")


def report_problem(report: LoadReport) -> str | None:
    """Why ``report`` cannot be trusted, or None when its values are sane."""
    try:
        check_token(report.node_id, "node id")
    except ValueError as exc:
        return str(exc)
    negative = [name for name in _COUNTS if getattr(report, name) < 0]
    if negative:
        return f"negative {', '.join(negative)}"
    if report.block_size <= 0 or report.max_model_len <= 0:
        return "block_size and max_model_len must be positive"
    if report.free_blocks > report.total_blocks or report.largest_free_segment > report.free_blocks:
        return "more free blocks than the pool holds"
    bad = [name for name in _RATES if not math.isfinite(getattr(report, name)) or getattr(report, name) < 0]
    if bad:
        return f"{', '.join(bad)} must be finite and >= 0"
    return link_problem(report)


def link_problem(report: LoadReport) -> str | None:
    """Why one of ``report``'s measured KV links cannot be trusted, or None."""
    for link in report.kv_links:
        if not (math.isfinite(link.bandwidth_bytes_per_s) and link.bandwidth_bytes_per_s > 0):
            return f"kv link to {link.peer!r}: bandwidth must be finite and > 0"
        if not (math.isfinite(link.latency_s) and link.latency_s >= 0) or link.transfers < 0:
            return f"kv link to {link.peer!r}: latency and transfers must be finite and >= 0"
    return None


def place_problem(req: PlaceRequest) -> str | None:
    """Why ``req`` cannot be placed whatever the cluster, or None."""
    if req.num_prompt_tokens < 1 or req.max_tokens < 1:
        return f"num_prompt_tokens ({req.num_prompt_tokens}) and max_tokens ({req.max_tokens}) must be >= 1"
    for name in ("ttft_slo_s", "tpot_slo_s"):
        # A negative or non-finite objective would count the request as never (or always) served in time.
        value = getattr(req, name)
        if not (math.isfinite(value) and value >= 0):
            return f"{name} ({value}) must be finite and >= 0"
    return None

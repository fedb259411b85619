"""Per-request records of a benchmark run and their summary.

Definitions (as vLLM's ``benchmark_serving.py`` has them, which users compare against):

- TTFT: request sent -> first streamed chunk with output text.
- ITL: the gaps between consecutive streamed chunks with output after the first (a chunk
  may carry more than one token; a token whose text is held back arrives with the next).
- E2E: request sent -> last chunk.
- TPOT: ``(e2e - ttft) / (output_tokens - 1)``, for requests with more than one output token.
- Throughputs divide by the run's duration (first send -> last completion): requests/s,
  output tokens/s, and prompt + output tokens/s.
- Goodput: successful requests per second that met every SLO given (TTFT and/or TPOT).

Percentiles are numpy's linear interpolation (``np.percentile``), over successful requests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did; times in seconds, ``start`` relative to the run's start.

    ``status`` is the HTTP status (0 when no response came); ``error`` is empty on success.
    """

    index: int
    start: float
    prompt_tokens: int
    output_tokens: int = 0
    status: int = 0
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    server_timing: dict[str, Any] | None = None  # the gateway's ``flowkv`` extension, when asked for

    @property
    def ok(self) -> bool:
        return not self.error and self.status == 200

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def failure_key(self) -> str:
        """How it failed, for the failure table: the HTTP status, or ``stream_error`` / ``no_response``."""
        if self.status and self.status != 200:
            return str(self.status)
        return "stream_error" if self.status == 200 else "no_response"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tpot"] = self.tpot
        return out


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput, in seconds; None means no objective."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.ttft_s is not None and r.ttft > self.ttft_s:
            return False
        tpot = r.tpot
        return not (self.tpot_s is not None and tpot is not None and tpot > self.tpot_s)


def stats(values: list[float]) -> dict[str, float | None]:
    """Mean, p50/p90/p99 and max of ``values`` (all None when empty). The max of the
    inter-token gaps is the longest a stream stalled."""
    keys = ["mean"] + [f"p{p}" for p in PERCENTILES] + ["max"]
    if not values:
        return dict.fromkeys(keys, None)
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["max"] = float(arr.max())
    return out


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo | None = None) -> dict[str, Any]:
    """The aggregate figures of a run.

    Args:
        records: every request's record, failures included.
        duration_s: first send -> last completion, in seconds.
        slo: objectives for goodput (None: goodput is not reported).

    Returns:
        A JSON-ready dict: counts, throughputs, ``ttft``/``tpot``/``itl``/``e2e`` stats in
        seconds, ``goodput_rps`` (or None) and ``failures`` by kind.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "ttft": stats([r.ttft for r in ok]),
        "tpot": stats([t for r in ok if (t := r.tpot) is not None]),
        "itl": stats([g for r in ok for g in r.itl]),
        "e2e": stats([r.e2e for r in ok]),
        "goodput_rps": None,
        "failures": dict(sorted(Counter(r.failure_key for r in records if not r.ok).items())),
    }
    if slo is not None and (slo.ttft_s is not None or slo.tpot_s is not None):
        summary["goodput_rps"] = sum(1 for r in records if slo.met(r)) / duration_s
        summary["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}
    return summary


def throughput_timeline(records: list[RequestRecord], bin_s: float = 1.0) -> tuple[list[float], list[float]]:
    """Output tokens per second in bins of ``bin_s`` since the run's start.

    Each chunk's arrival is known (start + ttft + the ITLs so far); a chunk's tokens are
    spread evenly over its record's chunks, so the totals equal the output tokens.

    Returns:
        (bin start times, tokens per second in each bin).
    """
    times: list[float] = []
    weights: list[float] = []
    for r in records:
        if not r.ok or r.output_tokens == 0:
            continue
        arrivals = list(np.cumsum([r.start + r.ttft, *r.itl]))
        times.extend(arrivals)
        weights.extend([r.output_tokens / len(arrivals)] * len(arrivals))
    if not times:
        return [], []
    nbins = int(max(times) // bin_s) + 1
    counts, _ = np.histogram(times, bins=nbins, range=(0.0, nbins * bin_s), weights=weights)
    return [i * bin_s for i in range(nbins)], [float(c) / bin_s for c in counts]

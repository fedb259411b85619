"""Reports of a run: the human table, the JSON file, the PNG of CDFs and throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libs.loadgen.metrics import RequestRecord, throughput_timeline


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def table(summary: dict[str, Any], title: str = "flowkv bench") -> str:
    """The summary as a fixed-width table (latencies in ms)."""
    w = 44
    lines = [f"{' ' + title + ' ':=^{w + 14}}"]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name:<{w}}{value:>14}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", f"{summary['duration_s']:.2f}")
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", f"{summary['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{summary['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{summary['total_token_throughput']:.2f}")
    if summary.get("goodput_rps") is not None:
        row("Request goodput (req/s):", f"{summary['goodput_rps']:.2f}")
    for key, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
        lines.append(f"{' ' + label + ' ':-^{w + 14}}")
        s = summary[key]
        row(f"Mean {key.upper()} (ms):", _ms(s["mean"]))
        for p in ("p50", "p90", "p99"):
            row(f"{p.upper()} {key.upper()} (ms):", _ms(s[p]))
        if key == "itl":
            row("Max ITL (ms):", _ms(s.get("max")))
    if summary["failures"]:
        lines.append(f"{' Failures ':-^{w + 14}}")
        for k, n in summary["failures"].items():
            row(f"{k}:", n)
    lines.append("=" * (w + 14))
    return "\n".join(lines)


def write_json(path: str | Path, records: list[RequestRecord], summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """``{"meta": ..., "summary": ..., "requests": [...]}`` with every request's record."""
    doc = {"meta": meta, "summary": summary, "requests": [r.to_json() for r in records]}
    Path(path).write_text(json.dumps(doc, indent=1))


def write_png(path: str | Path, records: list[RequestRecord]) -> None:
    """TTFT and TPOT CDFs and output-token throughput over time, in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name, values in ((axes[0], "TTFT (ms)", [r.ttft * 1000 for r in ok]),
                             (axes[1], "TPOT (ms)", [t * 1000 for r in ok if (t := r.tpot) is not None])):
        xs = sorted(values)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))] if xs else [], where="post")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    times, rates = throughput_timeline(records)
    axes[2].plot(times, rates, drawstyle="steps-post")
    axes[2].set_xlabel("time since start (s)")
    axes[2].set_ylabel("output tokens/s")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

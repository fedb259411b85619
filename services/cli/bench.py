"""``flowkv bench``: a serving benchmark against any OpenAI-compatible server.

Like vLLM's ``benchmarks/benchmark_serving.py``: requests of a workload
(:mod:`libs.loadgen.workloads`) are streamed at a Poisson (or gamma) rate, each one's
TTFT, ITL, TPOT and E2E measured, and the run summarised (stdout table, ``--out-json``,
``--out-png``). ``--launch`` starts ``flowkv up`` first (with ``--launch-args``) and stops
it afterwards; otherwise point ``--base-url`` at a running gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import shlex
import subprocess
import urllib.parse
from typing import Any

from libs.loadgen import report
from libs.loadgen.client import ClientOptions
from libs.loadgen.metrics import Slo, summarize
from libs.loadgen.runner import run_benchmark
from libs.loadgen.workloads import DEFAULT_TOKEN_ID_RANGE, Workload, WorkloadOptions, describe, make_workload
from services.cli.launch import start_cluster, stop_cluster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="the gateway (default: %(default)s)")
    g.add_argument("--model", default="smollm2", help="model name the server serves (default: %(default)s)")
    g.add_argument("--api-key", default="", help="Bearer API key (default: none)")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="completions (token-id prompts, exact lengths) or chat (text prompts)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: greedy)")
    g.add_argument("--no-ignore-eos", action="store_true", help="let EOS end outputs early (lengths then vary)")
    g.add_argument("--server-timing", action="store_true",
                   help="ask the gateway for per-request timings (flowkv_timing) and keep them in the JSON")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds")
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=[x.value for x in Workload], default="fixed", help="see docs/benchmarks/flowkv-bench.md")
    w.add_argument("--num-requests", type=int, default=100)
    w.add_argument("--input-len", type=int, default=128, help="fixed/random/shift: prompt tokens")
    w.add_argument("--output-len", type=int, default=128, help="fixed/random/shift: output tokens")
    w.add_argument("--range-ratio", type=float, default=0.5, help="random: lengths uniform in len*(1 +- ratio)")
    w.add_argument("--length-scale", type=float, default=1.0, help="multiply every length (short runs on CPU)")
    w.add_argument("--token-id-range", type=int, nargs=2, default=list(DEFAULT_TOKEN_ID_RANGE), metavar=("LO", "HI"),
                   help="prompt token ids are drawn from [LO, HI) (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrivals")
    a = parser.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    a.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    o = parser.add_argument_group("output")
    o.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT objective for goodput")
    o.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT objective for goodput")
    o.add_argument("--out-json", default="", help="write the summary and every request's record here")
    o.add_argument("--out-png", default="", help="write TTFT/TPOT CDFs and throughput over time here")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    la = parser.add_argument_group("launch")
    la.add_argument("--launch", action="store_true", help="start `flowkv up` on --base-url's port first, stop it after")
    la.add_argument("--launch-args", default="", help="extra `flowkv up` flags, one string (e.g. '--model tiny --colocated 1')")
    la.add_argument("--launch-timeout", type=float, default=300.0, help="wait this long for the cluster's /ready")


def _launch(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """Start ``flowkv up`` on the port of ``--base-url`` and wait for its /ready."""
    port = urllib.parse.urlparse(args.base_url).port or 8000
    return start_cluster(shlex.split(args.launch_args), port=port, timeout=args.launch_timeout)


def _meta(args: argparse.Namespace, specs_info: dict[str, Any]) -> dict[str, Any]:
    keep = ("base_url", "model", "endpoint", "workload", "num_requests", "input_len", "output_len", "range_ratio",
            "length_scale", "seed", "request_rate", "burstiness", "max_concurrency", "temperature")
    meta = {k: getattr(args, k) for k in keep}
    meta["request_rate"] = str(meta["request_rate"])
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta.update(specs_info)
    return meta


def run(args: argparse.Namespace) -> int:
    try:
        wopts = WorkloadOptions(args.input_len, args.output_len, args.range_ratio, args.length_scale,
                                tuple(args.token_id_range))
        specs = make_workload(args.workload, args.num_requests, args.seed, wopts)
    except ValueError as exc:
        raise SystemExit(f"flowkv bench: {exc}") from None
    client = ClientOptions(args.base_url, args.model, args.endpoint, args.api_key, not args.no_ignore_eos,
                           args.temperature, args.server_timing, args.timeout)
    slo = Slo(None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
              None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000)
    proc = _launch(args) if args.launch else None
    try:
        result = asyncio.run(run_benchmark(specs, client, args.request_rate, args.burstiness, args.max_concurrency,
                                           args.seed, progress=not args.no_progress))
    finally:
        if proc is not None:
            stop_cluster(proc)
    summary = summarize(result.records, result.duration_s, slo)
    print(report.table(summary, f"flowkv bench: {args.workload}"))
    if args.out_json:
        report.write_json(args.out_json, result.records, summary, _meta(args, describe(specs)))
    if args.out_png:
        report.write_png(args.out_png, result.records)
    return 0 if summary["completed"] == summary["num_requests"] else 1

"""1,000 concurrent streaming clients against a CPU cluster of the ``tiny`` model.

Starts nats-server, the scheduler, the gateway and the nodes as separate processes
(``--layout 1p1d``: one prefill and one decode node; ``--layout 2h``: two hybrid nodes),
fires every request at once through ``libs.loadgen`` (streaming completions, fixed prompt
and output lengths, ``ignore_eos``), and reports the run's figures plus the peak RSS
(VmHWM) of every process. Every stream must complete: the exit status is 1 otherwise.

    .venv/bin/python benchmarks/load_1000.py --layout 1p1d --out-json benchmarks/results/load_1000.json

The limits that would turn a 1,000-request burst into errors are raised on purpose: the
gateway's ``--max-concurrent-requests`` (429 above it), the scheduler's ``--max-ttft-s``
(429 when the predicted TTFT is above it) and the gateway's ``--stall-timeout-s`` (a queued
request would be re-placed). The file-descriptor limit is raised to its hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.loadgen.client import ClientOptions  # noqa: E402
from libs.loadgen.metrics import summarize  # noqa: E402
from libs.loadgen.runner import run_benchmark  # noqa: E402
from libs.loadgen.workloads import WorkloadOptions, make_workload  # noqa: E402
from services.common.natsserver import free_port  # noqa: E402
from tests.fuzz.procs import Cluster  # noqa: E402

LAYOUTS = {"1p1d": [("prefill-0", "prefill"), ("decode-0", "decode")],
           "2h": [("hybrid-0", "hybrid"), ("hybrid-1", "hybrid")]}


def proc_memory(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


class RssSampler:
    """Samples every child's memory every ``period_s``; keeps each one's peak."""

    def __init__(self, cluster: Cluster, period_s: float = 0.5) -> None:
        self.cluster, self.period_s = cluster, period_s
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, child in self.cluster.children.items():
            try:
                mem = proc_memory(child.proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            self.peak_kib[name] = max(self.peak_kib.get(name, 0), mem.get("VmHWM", 0), mem.get("VmRSS", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def start_cluster(cluster: Cluster, layout: str, port: int, clients: int) -> str:
    cluster.start_nats("127.0.0.1", free_port())
    cluster.start_scheduler("--max-ttft-s", "3600", "--max-retry-after-s", "1")
    for node_id, role in LAYOUTS[layout]:
        cluster.start_node(node_id, role, "--block-size", "16", "--num-blocks", "8192", "--max-num-seqs", "512",
                           "--drain-timeout-s", "5")
    cluster.start_gateway(port, "--max-concurrent-requests", str(clients * 2), "--stall-timeout-s", "600",
                          "--submit-timeout-s", "60", "--place-timeout-s", "60")
    base = f"http://127.0.0.1:{port}"
    cluster.wait_ready(base, {n for n, _ in LAYOUTS[layout]}, timeout=300)
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="1p1d")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    specs = make_workload("fixed", args.clients, seed=args.seed,
                          opts=WorkloadOptions(input_len=args.input_len, output_len=args.output_len))
    log_dir = Path(tempfile.mkdtemp(prefix="flowkv-load1000-"))
    cluster = Cluster(log_dir)
    try:
        base = start_cluster(cluster, args.layout, free_port(), args.clients)
        client = ClientOptions(base_url=base, model="tiny", timeout_s=900.0)
        with RssSampler(cluster) as sampler:
            result = asyncio.run(run_benchmark(specs, client, request_rate=float("inf"), max_concurrency=args.clients))
        dead = cluster.dead()
    finally:
        cluster.stop()
    summary = summarize(result.records, result.duration_s)
    doc = {
        "layout": args.layout, "clients": args.clients, "input_len": args.input_len, "output_len": args.output_len,
        "nofile": [hard, hard], "summary": summary, "peak_rss_mib": {k: round(v / 1024, 1) for k, v in sampler.peak_kib.items()},
        "dead_processes": dead, "logs": str(log_dir), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(json.dumps({k: v for k, v in doc.items()}, indent=2, default=str))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps({**doc, "requests": [r.to_json() for r in result.records]}, default=str))
    ok = summary["failed"] == 0 and not dead
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""vLLM nodes under FlowKV (1P1D, FlowKV's KV connector) against vLLM serving alone, on CPU.

Same machine, same run, same requests, one server at a time:

- ``vllm``: vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``) on SmolLM2-135M
  (the Hugging Face directory FlowKV's loader makes of the GGUF it ships), its compute
  threads bound to every core this process may use (one thread per core);
- ``vllm-1t``: the same with one compute thread, bound to the first core (what each
  FlowKV node below gets);
- ``flowkv-vllm``: ``flowkv up --engine vllm``: one prefill and one decode node, each
  hosting vLLM's engine with FlowKV's KV connector; ``flowkv up`` gives each node half the
  cores (``VLLM_CPU_OMP_THREADS_BIND``). The gateway, scheduler and NATS share the cores.

Both run vLLM with the same engine settings: float32, blocks of 32 tokens, ``--num-blocks``
KV blocks (per node for FlowKV), ``--max-model-len``, eager unless ``--compile``, prefix
caching on (every prompt is distinct, so it never hits).

Workload: ``flowkv bench``'s ``fixed`` requests (random token-id prompts of
``--input-len``, exactly ``--output-len`` tokens out, greedy, ``ignore_eos``, streamed) at
each ``--concurrency``, ``max(8, 3 x concurrency)`` requests each (``--num-requests``), a
distinct seed per concurrency. Printed per system and concurrency: served, output tok/s,
TTFT and TPOT p50/p99; for FlowKV also the hand-offs of that workload from the prefill
node's ``kv.transfer`` trace spans: how many, the copy calls per hand-off (mean, max),
the hand-off time (reservation on D + copy + done, p50/p99) and the copy time alone (p50).

Run with the vLLM venv (``make setup-vllm``):

    .venv-vllm-node/bin/python benchmarks/vllm_cluster_cpu.py --out-json bench-results/vllm_cluster_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.loadgen.client import ClientOptions  # noqa: E402
from libs.loadgen.metrics import stats, summarize  # noqa: E402
from libs.loadgen.runner import run_benchmark  # noqa: E402
from libs.loadgen.workloads import WorkloadOptions, make_workload  # noqa: E402
from services.cli.launch import start_cluster, stop_cluster  # noqa: E402
from services.common.natsserver import free_port  # noqa: E402

MODEL = "smollm2"
BLOCK_SIZE = 32


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited while starting; {log} ends with:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(1.0)
    raise SystemExit(f"{url} not up after {timeout}s")


class VllmAlone:
    """vLLM's own OpenAI server, in its own process group."""

    def __init__(self, args: argparse.Namespace, model_dir: str, log: Path, cores: list[int]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.threads = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)), "OMP_NUM_THREADS": str(len(cores))}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", MODEL, "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
               "--num-gpu-blocks-override", str(args.num_blocks), "--kv-cache-memory-bytes", str(kv_bytes(model_dir, args.num_blocks)),
               "--max-model-len", str(args.max_model_len), "--seed", "0", "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-log-stats"]
        if not args.compile:
            cmd.append("--enforce-eager")
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **self.threads}, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(self.base_url + "/v1/models", args.start_timeout, self.proc, log)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()


class FlowkvVllm:
    """``flowkv up --engine vllm`` (1P1D), tracing to a file for the hand-off spans."""

    def __init__(self, args: argparse.Namespace, log: Path, traces: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.traces = traces
        env = {"FLOWKV_NODE_NUM_BLOCKS": str(args.num_blocks), "FLOWKV_NODE_MAX_MODEL_LEN": str(args.max_model_len),
               "FLOWKV_NODE_VLLM_ENFORCE_EAGER": "false" if args.compile else "true",
               "OTEL_TRACES_EXPORTER": "file", "FLOWKV_TRACE_FILE": str(traces)}
        self._out = log.open("wb")
        self.proc = start_cluster(["--engine", "vllm", "--model", MODEL], port=self.port, num_nodes=2,
                                  timeout=args.start_timeout, env=env, output=self._out)

    def handoffs(self, start_ns: int, end_ns: int) -> dict[str, Any]:
        spans = []
        if self.traces.exists():
            for line in self.traces.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    s = json.loads(line)
                    if s.get("name") == "kv.transfer" and start_ns <= s["start_ns"] and s["end_ns"] <= end_ns:
                        spans.append(s)
        moved = [s for s in spans if s["attributes"].get("flowkv.kv.calls", 0) > 0]
        calls = [s["attributes"]["flowkv.kv.calls"] for s in moved]
        return {
            "hand_offs": len(spans), "moved_kv": len(moved),
            "calls_mean": sum(calls) / len(calls) if calls else None, "calls_max": max(calls) if calls else None,
            "segments_max": max((s["attributes"]["flowkv.kv.segments"] for s in moved), default=None),
            "hand_off_s": stats([(s["end_ns"] - s["start_ns"]) / 1e9 for s in spans]),
            "copy_s": stats([s["attributes"]["flowkv.kv.duration_s"] for s in moved]),
        }

    def stop(self) -> None:
        stop_cluster(self.proc)
        self._out.close()


def kv_bytes(model_dir: str, num_blocks: int) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return num_blocks * cfg.num_hidden_layers * 2 * BLOCK_SIZE * cfg.num_key_value_heads * head_dim * 4


async def run_workloads(base_url: str, args: argparse.Namespace, server: Any) -> list[dict[str, Any]]:
    client = ClientOptions(base_url=base_url, model=MODEL, timeout_s=args.request_timeout)
    warm = make_workload("fixed", 2, seed=999, opts=WorkloadOptions(input_len=32, output_len=4, range_ratio=0.0))
    await run_benchmark(warm, client, max_concurrency=1)
    rows = []
    for c in args.concurrency:
        n = args.num_requests or max(8, 3 * c)
        specs = make_workload("fixed", n, seed=c, opts=WorkloadOptions(
            input_len=args.input_len, output_len=args.output_len, range_ratio=0.0))
        t0 = time.time_ns()
        result = await run_benchmark(specs, client, max_concurrency=c)
        t1 = time.time_ns()
        row = {"concurrency": c, **summarize(result.records, result.duration_s)}
        if isinstance(server, FlowkvVllm):
            await asyncio.sleep(1.0)  # the last spans reach the file
            row["handoff"] = server.handoffs(t0, time.time_ns())
        rows.append(row)
        print(f"  c={c}: {row['completed']}/{n} served, {row['output_throughput']:.1f} out tok/s "
              f"({(t1 - t0) / 1e9:.0f} s)", flush=True)
    return rows


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:,.0f}" if v >= 0.1 else f"{v * 1000:.1f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    base = {r["concurrency"]: r for r in results.get("vllm", [])}
    lines = ["| system | concurrency | served | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | tok/s ÷ vLLM "
             "| hand-offs | calls per hand-off (mean / max) | hand-off p50 / p99 | copy p50 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for system, rows in results.items():
        for r in rows:
            b = base.get(r["concurrency"])
            ratio = f"{r['output_throughput'] / b['output_throughput']:.2f}" if b and b["output_throughput"] else "–"
            h = r.get("handoff")
            hand = ("| – | – | – | – |" if h is None else
                    f"| {h['hand_offs']} | {h['calls_mean']:.1f} / {h['calls_max']} | {_ms(h['hand_off_s']['p50'])} / "
                    f"{_ms(h['hand_off_s']['p99'])} | {_ms(h['copy_s']['p50'])} |" if h['calls_mean'] is not None
                    else f"| {h['hand_offs']} | – | – | – |")
            lines.append(f"| {system} | {r['concurrency']} | {r['completed']}/{r['num_requests']} | "
                         f"{r['output_throughput']:.1f} | {_ms(r['ttft']['p50'])} | {_ms(r['ttft']['p99'])} | "
                         f"{_ms(r['tpot']['p50'])} | {_ms(r['tpot']['p99'])} | {ratio} {hand}")
    return "\n".join(lines) + "\n\n(times in ms)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="vllm,vllm-1t,flowkv-vllm", help="any of vllm, vllm-1t, flowkv-vllm")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--num-requests", type=int, default=0, help="requests per concurrency (0: max(8, 3 x c))")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-blocks", type=int, default=256, help="vLLM KV blocks (per node for FlowKV)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: eager, both)")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default="bench-results/vllm_cluster_cpu")
    p.add_argument("--out-json", default="")
    args = p.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    from libs.engine.loader import smollm2_dir

    model_dir = smollm2_dir()
    results: dict[str, list[dict[str, Any]]] = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    for system in args.systems.split(","):
        print(f"{system}: starting", flush=True)
        t0 = time.monotonic()
        if system == "vllm":
            server: Any = VllmAlone(args, model_dir, log_dir / "vllm.log", _cores())
        elif system == "vllm-1t":
            server = VllmAlone(args, model_dir, log_dir / "vllm-1t.log", _cores()[:1])
        elif system == "flowkv-vllm":
            server = FlowkvVllm(args, log_dir / "flowkv-vllm.log", log_dir / "traces.jsonl")
        else:
            raise SystemExit(f"unknown system {system!r}")
        print(f"{system}: up in {time.monotonic() - t0:.0f} s", flush=True)
        try:
            results[system] = asyncio.run(run_workloads(server.base_url, args, server))
        finally:
            server.stop()
    print(table(results))
    if args.out_json:
        import torch
        import vllm

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        out = {"started": started.isoformat(), "commit": commit, "machine": platform.processor() or platform.machine(),
               "cores": _cores(), "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
               "args": vars(args), "results": results}
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(out, indent=1))
    failed = sum(r["failed"] for rows in results.values() for r in rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

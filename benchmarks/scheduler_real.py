"""The scheduler on a real 4-node CPU cluster: flowkv vs round_robin vs every fixed split.

For each policy: ``flowkv up --model tiny --prefill-nodes 2 --decode-nodes 2 --policy POL``
(scheduler, gateway and 4 node processes, 1 torch thread each) on one nats-server started
here; wait until a fixed split has pinned its roles; then the three scenarios, scaled down
to CPU, one after the other on the same cluster, driven by ``libs.loadgen`` (streaming
completions, token-id prompts, ``ignore_eos``):

  normal     steady mixed load the cluster carries
  imbalance  prompt-heavy phase (long prompts, 2-4 tokens out) then output-heavy phase
             (short prompts, long outputs), twice
  overload   both kinds mixed, well above capacity

Every policy gets the same request streams (same seeds). Usage:

  .venv/bin/python benchmarks/scheduler_real.py --out bench-out/scheduler_real
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.loadgen.client import ClientOptions  # noqa: E402
from libs.loadgen.metrics import Slo, summarize  # noqa: E402
from libs.loadgen.runner import run_benchmark  # noqa: E402
from libs.loadgen.workloads import RequestSpec  # noqa: E402
from libs.protocol import messages  # noqa: E402
from libs.protocol.messages import ClusterQuery  # noqa: E402
from libs.protocol.subjects import sched_cluster  # noqa: E402
from services.cli.launch import start_cluster, stop_cluster  # noqa: E402
from services.common.natsserver import NatsServer, free_port  # noqa: E402

POLICIES = ["flowkv", "round_robin", "fixed:1:1", "fixed:1:3", "fixed:3:1"]
# The role controller on CPU time scales (seconds-long phases): same for every scenario.
SCHED_ENV = {"FLOWKV_SCHEDULER_MIN_DWELL_S": "3", "FLOWKV_SCHEDULER_DEMAND_WINDOW_S": "4",
             "FLOWKV_SCHEDULER_ROLE_INTERVAL_S": "0.25"}


@dataclass(frozen=True)
class Phase:
    duration_s: float
    rate: float
    prompt: tuple[int, int]
    output: tuple[int, int]


SHORT_IN_LONG_OUT = ((32, 64), (96, 160))
LONG_IN_SHORT_OUT = ((1200, 1800), (2, 4))
SCENARIOS: dict[str, list[Phase]] = {
    "normal": [Phase(20.0, 3.0, (100, 400), (16, 48))],
    "imbalance": [Phase(10.0, 5.0, *LONG_IN_SHORT_OUT), Phase(10.0, 5.0, *SHORT_IN_LONG_OUT)] * 2,
    "overload": [Phase(20.0, 14.0, (32, 1800), (2, 160))],  # mixed below
}


def make_specs(scenario: str, seed: int) -> tuple[list[RequestSpec], list[float]]:
    """The scenario's requests and their send times (Poisson), the same for every policy."""
    rng = random.Random(seed)
    specs, times, t0 = [], [], 0.0
    for ph in SCENARIOS[scenario]:
        t = t0 + rng.expovariate(ph.rate)
        while t < t0 + ph.duration_s:
            if scenario == "overload":
                prompt, output = LONG_IN_SHORT_OUT if rng.random() < 0.5 else SHORT_IN_LONG_OUT
            else:
                prompt, output = ph.prompt, ph.output
            n_in = rng.randint(*prompt)
            ids = [rng.randint(100, 40000) for _ in range(n_in)]
            specs.append(RequestSpec(len(specs), ids, rng.randint(*output)))
            times.append(t)
            t += rng.expovariate(ph.rate)
        t0 += ph.duration_s
    return specs, times


async def drive(specs: list[RequestSpec], times: list[float], opts: ClientOptions) -> tuple[list[Any], float]:
    """Send each spec at its time (one run_benchmark per request keeps loadgen's client and records)."""
    t0 = time.perf_counter()

    async def one(spec: RequestSpec, at: float) -> Any:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        res = await run_benchmark([spec], opts)
        return res.records[0]

    records = await asyncio.gather(*(one(s, t) for s, t in zip(specs, times)))
    return list(records), time.perf_counter() - t0


async def roles(nats_url: str) -> list[str]:
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(sched_cluster(), messages.encode(ClusterQuery()), timeout=5)
        state = messages.decode(reply.data)
        return sorted(n.role.value for n in state.nodes)
    finally:
        await nc.drain()


def launch(nats_url: str, port: int, policy: str) -> subprocess.Popen[bytes]:
    up_args = ["--model", "tiny", "--nats-url", nats_url, "--prefill-nodes", "2", "--decode-nodes", "2",
               "--policy", policy, "--log-level", "warning"]
    return start_cluster(up_args, port=port, num_nodes=4, env={"OMP_NUM_THREADS": "1", **SCHED_ENV})


def wanted(policy: str) -> list[str] | None:
    if not policy.startswith("fixed:"):
        return None
    p, d = (int(x) for x in policy.split(":")[1:])
    k = min(max(round(4 * p / (p + d)), 1), 3)
    return sorted(["prefill"] * k + ["decode"] * (4 - k))


def run_policy(policy: str, nats_url: str, scenarios: list[str], seed: int) -> list[dict[str, Any]]:
    port = free_port()
    proc = launch(nats_url, port, policy)
    out = []
    try:
        want = wanted(policy)
        deadline = time.monotonic() + 60
        while want and asyncio.run(roles(nats_url)) != want and time.monotonic() < deadline:
            time.sleep(0.5)
        opts = ClientOptions(base_url=f"http://127.0.0.1:{port}", model="tiny", timeout_s=120.0)
        for sc in scenarios:
            before = asyncio.run(roles(nats_url))
            specs, times = make_specs(sc, seed)
            records, duration = asyncio.run(drive(specs, times, opts))
            s = summarize(records, duration, Slo(ttft_s=2.0, tpot_s=0.2))
            s.update(policy=policy, scenario=sc, roles_before=before, roles_after=asyncio.run(roles(nats_url)))
            print(f"{sc:10s} {policy:12s} {s['request_throughput']:6.2f} req/s {s['output_throughput']:7.1f} tok/s "
                  f"ok {s['completed']}/{s['num_requests']} ttft p50 {s['ttft']['p50']} roles {s['roles_after']}",
                  file=sys.stderr, flush=True)
            out.append(s)
            time.sleep(2.0)
    finally:
        stop_cluster(proc)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-out/scheduler_real"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "python": platform.python_version(), "command": " ".join(sys.argv)}
    with NatsServer() as server:
        for pol in args.policies.split(","):
            results += run_policy(pol, server.url, args.scenarios.split(","), args.seed)
            (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

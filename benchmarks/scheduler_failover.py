"""Placement pause when the leader scheduler is SIGKILLed: the failover-time distribution.

What it shows: how long no request can be placed after the leading scheduler replica
dies, with a second replica following the load reports. Each kill:

1. find the leader (a brief ``ClusterQuery``; only the leader answers);
2. SIGKILL it, note the time;
3. send a ``PlaceRequest`` every ``--probe-s`` (each with a ``--probe-s`` reply timeout;
   "no responders" comes back at once) until one is answered with a ``Placement``: the
   pause is the time from the kill to that answer;
4. restart the killed replica (it joins as a follower) and wait until it says so.

The nodes are two load-report publishers in this process (one prefill, one decode node,
every 0.2 s), so the schedulers place as they would in a cluster and nothing else runs.
The pause is bounded by the lease (``--lease-s``, the schedulers' default 1.2 s) plus a
follower's poll (a tenth of it); a dead leader renewed its lease at most a fifth of it
before dying.

    .venv/bin/python benchmarks/scheduler_failover.py --kills 20 --out-json /tmp/failover.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from libs.protocol import subjects
from libs.protocol.messages import (
    ClusterQuery, ClusterState, LoadReport, NodeState, Placement, PlaceRequest, Role, decode, encode,
)
from services.common.natsserver import NatsCluster, NatsServer

ROOT = Path(__file__).resolve().parents[1]


def _report(node_id: str, role: Role, seq: int) -> LoadReport:
    return LoadReport(
        node_id=node_id, role=role, state=NodeState.READY, seq=seq, started_at=1.0, model="m", device="cpu",
        device_name="cpu", device_memory_bytes=1 << 30, max_model_len=4096, block_size=16, kv_block_bytes=1 << 16,
        total_blocks=4096, free_blocks=4096, largest_free_segment=4096, num_waiting=0, waiting_prefill_tokens=0,
        num_running=0, num_held=0, prefill_tokens_per_s=5000.0, decode_step_s=0.02, max_num_seqs=64,
    )


async def _publish_loads(nc: nats.NATS) -> None:
    seq = 0
    while True:
        seq += 1
        for node_id, role in (("prefill-0", Role.PREFILL), ("decode-0", Role.DECODE)):
            await nc.publish(subjects.node_load(), encode(_report(node_id, role, seq)))
        await asyncio.sleep(0.2)


class Replicas:
    """Scheduler replica processes (``python -m services.scheduler``), logs in ``workdir``."""

    def __init__(self, url: str, workdir: Path, count: int, lease_s: float, lease_replicas: int) -> None:
        self.url, self.workdir, self.lease_s, self.lease_replicas = url, workdir, lease_s, lease_replicas
        self.names = [f"scheduler-{i}" for i in range(count)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def start(self, name: str) -> None:
        env = {**os.environ, "FLOWKV_NATS_URL": self.url, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "services.scheduler", "--scheduler-id", name, "--policy", "round_robin",
                "--leader-lease-s", str(self.lease_s), "--lease-replicas", str(self.lease_replicas)]
        with open(self.workdir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def _leader(nc: nats.NATS) -> str:
    while True:
        with contextlib.suppress(NatsTimeoutError, NoRespondersError):
            reply = decode((await nc.request(subjects.sched_cluster(), encode(ClusterQuery(brief=True)), 1.0)).data)
            if isinstance(reply, ClusterState) and reply.leader:
                return reply.leader
        await asyncio.sleep(0.05)


async def _placed(nc: nats.NATS, rid: str, timeout: float) -> bool:
    req = PlaceRequest(request_id=rid, model="m", num_prompt_tokens=16, max_tokens=4)
    try:
        reply = decode((await nc.request(subjects.sched_place(), encode(req), timeout)).data)
    except (NatsTimeoutError, NoRespondersError):
        return False
    return isinstance(reply, Placement)


async def _until_follower(replicas: Replicas, name: str, before: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while replicas.log(name).count("up (follower)") <= before:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not come back as a follower:\n{replicas.log(name)[-2000:]}")
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="flowkv-failover-"))
    broker = NatsCluster(args.nats_cluster, log_dir=str(workdir)) if args.nats_cluster > 1 else NatsServer()
    broker.start()
    replicas = Replicas(broker.url, workdir, 2, args.lease_s, min(3, max(1, args.nats_cluster)))
    pauses: list[float] = []
    nc = await nats.connect(servers=broker.url.split(","), max_reconnect_attempts=-1)
    loads = asyncio.create_task(_publish_loads(nc))
    try:
        for name in replicas.names:
            replicas.start(name)
        await _leader(nc)
        for name in replicas.names:
            await _until_follower(replicas, name, -1) if name != await _leader(nc) else None
        while not await _placed(nc, "warm", 1.0):
            await asyncio.sleep(0.1)
        for k in range(args.kills):
            leader = await _leader(nc)
            followers_before = replicas.log(leader).count("up (follower)")
            killed_at = time.monotonic()
            replicas.kill(leader)
            i = 0
            while not await _placed(nc, f"k{k}-{i}", args.probe_s):
                i += 1
                await asyncio.sleep(max(0.0, args.probe_s - (time.monotonic() - killed_at) % args.probe_s))
            pauses.append(time.monotonic() - killed_at)
            print(f"kill {k + 1}/{args.kills}: {leader} down, placement resumed after {pauses[-1]:.3f}s", flush=True)
            replicas.start(leader)
            await _until_follower(replicas, leader, followers_before)
    finally:
        loads.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loads
        await nc.close()
        replicas.stop()
        broker.stop()
    qs = statistics.quantiles(pauses, n=10, method="inclusive") if len(pauses) >= 2 else pauses * 9
    return {
        "what": "placement pause after SIGKILL of the leader scheduler (2 replicas)",
        "kills": len(pauses), "lease_s": args.lease_s, "probe_s": args.probe_s, "nats_servers": max(1, args.nats_cluster),
        "pause_s": {"min": min(pauses), "p50": statistics.median(pauses), "p90": qs[8], "max": max(pauses),
                    "mean": statistics.fmean(pauses)},
        "pauses_s": [round(p, 4) for p in pauses],
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--lease-s", type=float, default=1.2, help="the schedulers' --leader-lease-s")
    parser.add_argument("--probe-s", type=float, default=0.02, help="time between placement probes (and their timeout)")
    parser.add_argument("--nats-cluster", type=int, default=0, help="run against this many routed nats-servers")
    parser.add_argument("--out-json", default="")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    p = result["pause_s"]
    print(f"placement pause over {result['kills']} kills (lease {args.lease_s:g}s): min {p['min']:.3f}s, "
          f"p50 {p['p50']:.3f}s, p90 {p['p90']:.3f}s, max {p['max']:.3f}s, mean {p['mean']:.3f}s")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

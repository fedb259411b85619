"""One cluster of the real-cluster scheduler benchmark, in its own process.

Life of a worker:

1. pin itself to the cluster's cores; start a nats-server and ``flowkv up`` (both inherit them);
2. once the cluster serves, pin every node (all its threads) to its own cores, the gateway,
   scheduler, nats-server and ``flowkv up`` to the service cores, and itself (the load
   generator) to the driver cores;
3. wait until a fixed split has pinned its roles, then send ``("ready", info)``;
4. run the main process's commands, each answered ``("ok", result)`` or ``("error", traceback)``:
   ``burst`` (closed loop, calibration) and ``scenario`` (open loop, Poisson), both started
   at a given wall-clock time so that every cluster runs them at once;
5. on ``stop``, a closed pipe or SIGTERM: stop ``flowkv up`` and the nats-server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from libs.loadgen.client import ClientOptions
from libs.loadgen.metrics import RequestRecord, Slo, summarize
from scheduler_real import plan, report
from scheduler_real.load import drive_closed, drive_open, roles_now, watch_roles
from scheduler_real.plan import ClusterCpus, Phase
from services.cli.launch import start_cluster, stop_cluster
from services.common.lifecycle import run as run_async
from services.common.natsserver import NatsServer, free_port

SLO = Slo(ttft_s=2.0, tpot_s=0.2)


@dataclass(frozen=True)
class WorkerOptions:
    node_threads: int = 2
    kv_blocks: int = 16384  # per node; the engine's CPU default (2 GiB of /dev/shm a node) is far more than needed
    request_timeout_s: float = 120.0
    drain_s: float = 30.0  # after a scenario's window, wait this long for answers, then cut off
    startup_timeout_s: float = 180.0
    log_dir: str = ""
    sched_env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- processes


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def descendants(root: int) -> list[int]:
    """Every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                children.setdefault(int(_stat(int(d))[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def argv_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def role_name(argv: list[str]) -> str:
    """``flowkv up``'s child by its command line: a node id, ``gateway``, ``scheduler`` or ``other``."""
    if "--node-id" in argv and argv.index("--node-id") + 1 < len(argv):
        return argv[argv.index("--node-id") + 1]
    for name in ("gateway", "scheduler"):
        if f"services.{name}" in argv:
            return name
    return "other"


def pin(pid: int, cpus: tuple[int, ...]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads made later inherit from their creator)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def cpu_seconds(pid: int) -> float:
    try:
        f = _stat(pid)
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def free_port_block(n: int) -> int:
    """A port p with p..p+n-1 all free now (``flowkv up --metrics-port``: scheduler, then a port per node)."""
    import socket

    for _ in range(100):
        base = free_port()
        if base + n >= 65536:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


def wait_until(at: float) -> float:
    """Sleep until wall-clock ``at``; returns how late we are (0 if on time)."""
    delay = at - time.time()
    if delay > 0:
        time.sleep(delay)
        return 0.0
    return -delay


# ---------------------------------------------------------------- the cluster


def wanted_roles(policy: str) -> list[str] | None:
    """The roles a fixed split pins (the scheduler's rounding), sorted; None for the others."""
    if not policy.startswith("fixed:"):
        return None
    p, d = (int(x) for x in policy.split(":")[1:])
    k = min(max(round(plan.NODES * p / (p + d)), 1), plan.NODES - 1)
    return sorted(["prefill"] * k + ["decode"] * (plan.NODES - k))


class ClusterWorker:
    """One ``flowkv up`` cluster with its own nats-server, on its own cores."""

    def __init__(self, policy: str, cpus: ClusterCpus, driver: tuple[int, ...], opts: WorkerOptions) -> None:
        self.policy = policy
        self.cpus = cpus
        self.driver = driver or cpus.service
        self.opts = opts
        self.nats: NatsServer | None = None
        self.proc: Any = None
        self.pids: dict[str, int] = {}
        self.port = 0
        self.metrics_port = 0

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} {self.policy}] {text}", file=sys.stderr, flush=True)

    @property
    def client(self) -> ClientOptions:
        return ClientOptions(base_url=f"http://127.0.0.1:{self.port}", model="tiny",
                             timeout_s=self.opts.request_timeout_s)

    def start(self) -> dict[str, Any]:
        os.sched_setaffinity(0, self.cpus.all)  # what we start now inherits the cluster's cores
        self.nats = NatsServer().start()
        self.port = free_port()
        self.metrics_port = free_port_block(1 + plan.NODES)
        nt = str(self.opts.node_threads)
        env = {"OMP_NUM_THREADS": nt, "MKL_NUM_THREADS": nt, "FLOWKV_NODE_NUM_BLOCKS": str(self.opts.kv_blocks),
               **self.opts.sched_env}
        up_args = ["--model", "tiny", "--nats-url", self.nats.url, "--prefill-nodes", "2", "--decode-nodes", "2",
                   "--policy", self.policy, "--metrics-port", str(self.metrics_port), "--log-level", "warning"]
        out: Any = None
        if self.opts.log_dir:
            out = open(Path(self.opts.log_dir) / f"{self.policy.replace(':', '_')}.log", "ab")  # noqa: SIM115
        t = time.monotonic()
        self.proc = start_cluster(up_args, port=self.port, num_nodes=plan.NODES, env=env,
                                  timeout=self.opts.startup_timeout_s, **({"output": out} if out else {}))
        self.pids = {"flowkv-up": self.proc.pid, "nats": self.nats.proc.pid if self.nats.proc else 0}
        for pid in descendants(self.proc.pid):
            name = role_name(argv_of(pid))
            if name != "other":
                self.pids[name] = pid
        self._pin()
        want = wanted_roles(self.policy)
        deadline = time.monotonic() + 60
        roles = roles_now(self.nats.url)
        while want and roles != want and time.monotonic() < deadline:
            time.sleep(0.5)
            roles = roles_now(self.nats.url)
        self.log(f"ready in {time.monotonic() - t:.0f}s, roles {report.roles_label(roles)}")
        return {"policy": self.policy, "pids": self.pids, "roles": roles, "startup_s": time.monotonic() - t,
                "affinity": {n: sorted(os.sched_getaffinity(p)) for n, p in self.pids.items() if p}}

    def _pin(self) -> None:
        for name, cores in plan.placement(self.cpus, self.driver).items():
            if self.pids.get(name):
                pin(self.pids[name], cores)
        pin(os.getpid(), self.driver)

    def stop(self) -> None:
        if self.proc is not None:
            stop_cluster(self.proc, timeout=30)
            self.proc = None
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def flips(self) -> int | None:
        """Role flips done so far (the scheduler's ``flowkv_scheduler_role_flips_total{stage="done"}``)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("flowkv_scheduler_role_flips_total{") and 'stage="done"' in line))

    def _cpu(self) -> dict[str, float]:
        pids = {**self.pids, "loadgen": os.getpid()}
        return {name: cpu_seconds(pid) for name, pid in pids.items() if pid}

    # ------------------------------------------------------------ commands

    def burst(self, mix: str, seed: str, concurrency: int, duration_s: float, warm_s: float,
              start_at: float) -> dict[str, Any]:
        """A closed-loop burst of ``mix``; what it carried after ``warm_s`` (see :func:`report.burst_rate`)."""
        late = wait_until(start_at)
        cpu0, t = self._cpu(), time.monotonic()
        records = run_async(drive_closed(mix, seed, concurrency, duration_s, self.client, self.opts.drain_s))
        out = report.burst_rate(records, warm_s, duration_s, plan.mean_output(mix))
        out.update(mix=mix, concurrency=concurrency, duration_s=duration_s, late_start_s=late,
                   cpu_util=self._util(cpu0, time.monotonic() - t), roles_after=roles_now(self.nats.url))
        self.log(f"burst {mix:8s} {out['rps']:7.2f} req/s ({out['out_tok_s']:.0f} out tok/s, "
                 f"{out['failed']} failed of {out['sent']})")
        return out

    def _util(self, before: dict[str, float], wall: float) -> dict[str, float]:
        after = self._cpu()
        return {n: round((after[n] - before.get(n, 0.0)) / wall, 2) for n in after} if wall > 0 else {}

    def scenario(self, name: str, phases: list[dict[str, Any]], seed: str, start_at: float,
                 cutoff_s: float) -> dict[str, Any]:
        """Run one scenario (open loop) and return its summary row; requests open after ``cutoff_s`` are cut off."""
        ph = [Phase(p["duration_s"], p["rate"], p["mix"]) for p in phases]
        specs, times = plan.make_specs(ph, seed)
        before, flips0 = roles_now(self.nats.url), self.flips()
        late = wait_until(start_at)
        cpu0, t = self._cpu(), time.monotonic()
        timeline: list[list[Any]] = []

        async def run() -> tuple[list[RequestRecord], float]:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_roles(self.nats.url, time.perf_counter(), timeline, stop))
            try:
                return await drive_open(specs, times, self.client, cutoff_s)
            finally:
                stop.set()
                await asyncio.gather(watcher, return_exceptions=True)

        records, duration = run_async(run())
        util = self._util(cpu0, time.monotonic() - t)
        flips1 = self.flips()
        row = summarize(records, duration, SLO)
        row.update(report.window_stats(records, [p.duration_s for p in ph]))
        row.update(policy=self.policy, scenario=name, roles_before=before, roles_after=roles_now(self.nats.url),
                   role_timeline=timeline, flips=None if flips0 is None or flips1 is None else flips1 - flips0,
                   answers=report.answer_check(specs, records), cpu_util=util, late_start_s=late)
        self.log(f"{name:9s} window {row['window_rps']:6.2f} req/s, to last {row['request_throughput']:6.2f} req/s, "
                 f"{row['answers']['answered_in_full']}/{len(specs)} in full, flips {row['flips']}, "
                 f"roles {report.roles_label(row['roles_after'])}")
        return row


def serve(policy: str, cpus: ClusterCpus, driver: tuple[int, ...], opts: WorkerOptions, conn: Connection) -> None:
    """The worker process's entry: start the cluster, then run commands until ``stop``."""

    def on_term(*_: object) -> None:
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, on_term)
    worker = ClusterWorker(policy, cpus, driver, opts)
    try:
        conn.send(("ready", worker.start()))
        while True:
            try:
                cmd, kwargs = conn.recv()
            except EOFError:
                break
            if cmd == "stop":
                break
            try:
                conn.send(("ok", getattr(worker, cmd)(**kwargs)))
            except Exception:  # noqa: BLE001 - reported to the main process, which decides
                conn.send(("error", traceback.format_exc()))
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        worker.stop()
        worker.log("stopped")

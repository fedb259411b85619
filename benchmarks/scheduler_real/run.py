"""The scheduler on real 4-node CPU clusters: flowkv vs round_robin vs every fixed split, at once.

One cluster per policy (flowkv, round_robin, fixed:1:1 = 2:2, fixed:1:3, fixed:3:1), each
``flowkv up --model tiny --prefill-nodes 2 --decode-nodes 2 --policy POL`` (run as
``sys.executable -m services.cli up``) with its own nats-server, driven by its own worker
process (``worker.py``), on its own cores (``plan.py``): every node on
``--node-threads`` cores with that many torch threads, the gateway on a core of its own, the
scheduler and nats-server on a second service core or the driver's, the load generators on
the cores left over (the driver). With enough cores (5 x (4 x 2 + 1) = 45 of 48) the clusters
run at once; else one after another (``--sequential``; ``--parallel`` forces sharing).

1. calibration: closed-loop bursts of each mix on every cluster at once (so the machine is
   as loaded as later); what the fixed:1:1 (2:2) cluster carried sets the rates;
2. scenarios, every cluster at once, the same requests (seed) for each:
   normal     100-400 in, 16-48 out at ``--normal-mult`` (0.5) x its 2:2 capacity, 20 s
   imbalance_prefill  prompt-heavy (1200-1800 in, 2-4 out) at ``--imbalance-mult`` (1.4) x
              the 2:2 capacity for it, sustained for ``--phase-s`` (30 s)
   imbalance_decode   output-heavy (32-64 in, 96-160 out) likewise
   overload   both kinds half/half at ``--overload-mult`` (2.0) x the 2:2 capacity for it, 20 s
3. ``results.json`` (meta with the CPU plan and calibration; a row per policy and scenario:
   summarize(), window throughput, roles before/after and over time, flips, the answer
   check, CPU use per process), ``results.md`` (the same-run table and the scheduler's targets,
   PASS/FAIL) and ``throughput.png`` in ``--out``, rewritten after every step; cluster logs in ``--out/logs``.
   Target throughput is the simulator's: requests completed within the arrival window.

Scheduler timescale for every policy: FLOWKV_SCHEDULER_MIN_DWELL_S=3, DEMAND_WINDOW_S=4,
ROLE_INTERVAL_S=0.25. On a 64-core machine (python3 with torch and the repo's
dependencies, nats-server on PATH; nothing pip-installed), about 5 minutes, at most ~7
(``--deadline-s`` 420 skips scenarios that would end later):

  PYTHONPATH=$PWD python3 benchmarks/scheduler_real/run.py --cpus 16-63 --out bench-out/scheduler_real

Local functional check (2 policies sharing the cores, short phases, ~2.5 minutes on 2
cores; meaningless figures):

  .venv/bin/python benchmarks/scheduler_real/run.py --quick --out bench-out/scheduler_real_quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

from scheduler_real import plan, report, worker
from scheduler_real.plan import CpuPlan, Durations, Multipliers

from services.common.natsserver import find_binary

POLICIES = ["flowkv", "round_robin", "fixed:1:1", "fixed:1:3", "fixed:3:1"]
QUICK_POLICIES = ["flowkv", "fixed:1:1"]
SCHED_ENV = {"FLOWKV_SCHEDULER_MIN_DWELL_S": "3", "FLOWKV_SCHEDULER_DEMAND_WINDOW_S": "4",
             "FLOWKV_SCHEDULER_ROLE_INTERVAL_S": "0.25"}
# Closed-loop senders per calibration burst: enough to fill the 2:2 cluster (decode: 64 sequences a node).
BURSTS = {"prefill": 24, "decode": 128, "normal": 64, "mixed": 128}
START_LEAD_S = 3.0  # commands start this long after they are sent, at once on every cluster


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Fleet:
    """The worker processes of one group of clusters, driven through pipes."""

    def __init__(self, policies: list[str], cpu_plan: CpuPlan, opts: worker.WorkerOptions) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: dict[str, Any] = {}
        self.procs: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        for i, pol in enumerate(policies):
            cpus = cpu_plan.clusters[i if cpu_plan.parallel else 0]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker.serve, args=(pol, cpus, cpu_plan.driver, opts, child), daemon=True)
            proc.start()
            child.close()
            self.conns[pol], self.procs[pol] = parent, proc

    def live(self) -> list[str]:
        return [p for p in self.conns if p not in self.errors]

    def collect(self, timeout: float) -> dict[str, Any]:
        """One answer from every live worker (errors and silence recorded in ``self.errors``)."""
        waiting = {self.conns[p]: p for p in self.live()}
        out: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for conn in wait(list(waiting), timeout=max(0.0, deadline - time.monotonic())):
                pol = waiting.pop(conn)
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    kind, value = "error", "the worker died"
                if kind == "error":
                    self.errors[pol] = value
                    log(f"{pol}: ERROR\n{value}")
                else:
                    out[pol] = value
        for pol in waiting.values():
            self.errors[pol] = f"no answer within {timeout:.0f}s"
            log(f"{pol}: no answer within {timeout:.0f}s")
        return out

    def command(self, cmd: str, timeout: float, **kwargs: Any) -> dict[str, Any]:
        for pol in self.live():
            self.conns[pol].send((cmd, kwargs))
        return self.collect(timeout)

    def stop(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send(("stop", {}))
            except OSError:
                pass
        for proc in self.procs.values():
            proc.join(90)
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker still stops its cluster
                proc.join(30)


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"machine": f"{platform.machine()}, {model or platform.processor()}, {os.cpu_count()} CPUs",
            "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "python": platform.python_version()}


def siblings(cpus: list[int]) -> dict[int, str]:
    """Hyperthread siblings of each CPU (which cores really share a physical core)."""
    out = {}
    for c in cpus:
        try:
            out[c] = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            pass
    return out


def preflight(num_nodes: int, kv_blocks: int) -> None:
    find_binary()  # a clear error when nats-server is missing
    need = num_nodes * kv_blocks * 8192  # the tiny model's block: 2 layers x K,V x 2 heads x 16 x 16 tokens x 4 B
    free = shutil.disk_usage("/dev/shm").free
    if free < need * 1.2:
        raise SystemExit(f"/dev/shm has {free >> 20} MiB free; the nodes' KV pools need {need >> 20} MiB "
                         f"(lower --kv-blocks or --policies)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/scheduler_real"))
    ap.add_argument("--policies", default=None, help=f"comma-separated (default {','.join(POLICIES)}; fixed:1:1 "
                                                       "is always added: it calibrates)")
    ap.add_argument("--scenarios", default=",".join(plan.SCENARIOS))
    ap.add_argument("--cpus", default="", help="cores to use, taskset syntax (default: this process's affinity)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--parallel", dest="parallel", action="store_true", default=None,
                      help="run the clusters at once (default when the cores suffice; forced on too few, they share them)")
    mode.add_argument("--sequential", dest="parallel", action="store_false", help="one cluster after another")
    ap.add_argument("--node-threads", type=int, default=2, help="torch threads and cores per node")
    ap.add_argument("--kv-blocks", type=int, default=16384, help="KV blocks per node (8 KiB each for tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--burst-concurrency", default="", help="closed-loop senders per burst, e.g. decode=96 "
                    f"(default {','.join(f'{k}={v}' for k, v in BURSTS.items())})")
    ap.add_argument("--burst-s", type=float, default=9.0, help="each calibration burst")
    ap.add_argument("--burst-warm-s", type=float, default=3.0, help="a burst's ramp-up, not measured")
    ap.add_argument("--normal-mult", type=float, default=Multipliers.normal)
    ap.add_argument("--imbalance-mult", type=float, default=Multipliers.imbalance)
    ap.add_argument("--overload-mult", type=float, default=Multipliers.overload)
    ap.add_argument("--normal-s", type=float, default=Durations.normal_s)
    ap.add_argument("--phase-s", type=float, default=Durations.phase_s, help="each imbalance scenario")
    ap.add_argument("--overload-s", type=float, default=Durations.overload_s)
    ap.add_argument("--drain-s", type=float, default=30.0, help="wait this long past a window for answers")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip scenarios that would end later (default 420 in parallel, none sequential)")
    ap.add_argument("--quick", action="store_true", help="local functional check: 2 policies, short phases")
    args = ap.parse_args(argv)
    if args.quick:
        args.policies = args.policies or ",".join(QUICK_POLICIES)
        args.parallel = True if args.parallel is None else args.parallel
        args.burst_s, args.burst_warm_s = 4.0, 1.5
        args.normal_s, args.phase_s, args.overload_s, args.drain_s = 4.0, 3.0, 4.0, 15.0
        args.bursts = {mix: max(2, n // 8) for mix, n in BURSTS.items()}
    else:
        args.bursts = dict(BURSTS)
    for item in filter(None, args.burst_concurrency.split(",")):
        mix, _, n = item.partition("=")
        if mix not in BURSTS or not n.isdigit() or int(n) < 1:
            ap.error(f"--burst-concurrency: bad item {item!r}")
        args.bursts[mix] = int(n)
    args.policies = args.policies or ",".join(POLICIES)
    return args


class Run:
    """One benchmark run: the meta, the rows, the rates once calibrated; saved after every step."""

    def __init__(self, args: argparse.Namespace, meta: dict[str, Any], shown: list[str]) -> None:
        self.args, self.meta, self.shown = args, meta, shown
        self.scenarios = [s for s in args.scenarios.split(",") if s]
        self.mult = Multipliers(args.normal_mult, args.imbalance_mult, args.overload_mult)
        self.dur = Durations(args.normal_s, args.phase_s, args.overload_s)
        self.rows: list[dict[str, Any]] = []
        self.phases: dict[str, list[plan.Phase]] = {}
        self.started = time.monotonic()

    def save(self) -> None:
        out = self.args.out
        (out / "results.json").write_text(json.dumps({"meta": self.meta, "results": self.rows}, indent=1))
        (out / "results.md").write_text(report.markdown(self.meta, self.rows))
        report.plot(str(out / "throughput.png"), self.rows)

    def calibrate(self, fleet: Fleet) -> None:
        """Every burst on every cluster at once; the first time, the 2:2 cluster's figures set the rates."""
        a, by_policy = self.args, self.meta["calibration"]["by_policy"]
        for mix, conc in a.bursts.items():
            got = fleet.command("burst", a.burst_s + a.drain_s + 60, mix=mix, seed=f"{a.seed}:burst:{mix}",
                                concurrency=conc, duration_s=a.burst_s, warm_s=a.burst_warm_s,
                                start_at=time.time() + START_LEAD_S)
            for pol, fig in got.items():
                by_policy.setdefault(pol, {})[mix] = fig
        if self.phases:
            return
        base = by_policy.get(report.BASELINE)
        if not base or len(base) < len(a.bursts):
            raise SystemExit("calibration failed on the fixed:1:1 cluster; see the errors above")
        capacity = {mix: fig["rps"] for mix, fig in base.items()}
        self.meta["calibration"]["capacity"] = capacity
        try:
            self.phases = plan.scenario_phases(capacity, self.mult, self.dur)
        except ValueError as exc:  # nothing answered within burst + drain: say so, not a traceback
            raise SystemExit(f"{exc} (raise --drain-s or lower --burst-concurrency)") from None
        self.meta["phases"] = {sc: [p.to_json() for p in ph] for sc, ph in self.phases.items()}
        log("capacity (2:2): " + ", ".join(f"{k} {v:.2f} req/s" for k, v in capacity.items()))

    def scenario(self, fleet: Fleet, sc: str, group: list[str]) -> None:
        """Run ``sc`` on every cluster at once, unless it would end past the deadline."""
        window = plan.window_s(self.phases[sc])
        left = self.args.deadline_s - (time.monotonic() - self.started)
        if left < window + START_LEAD_S + 20:
            self.meta["skipped"] += [f"{sc}/{p}" for p in group]
            log(f"skipping {sc}: {left:.0f}s left before the deadline")
            return
        drain = min(self.args.drain_s, left - window - START_LEAD_S - 20)
        log(f"{sc}: " + ", ".join(f"{p.mix} {p.rate:.2f} req/s x {p.duration_s:g}s" for p in self.phases[sc]))
        got = fleet.command("scenario", window + drain + START_LEAD_S + 90, name=sc,
                            phases=[p.to_json() for p in self.phases[sc]], seed=f"{self.args.seed}:{sc}",
                            start_at=time.time() + START_LEAD_S, cutoff_s=window + drain)
        self.rows += [got[p] for p in group if p in got]
        self.rows.sort(key=lambda r: (self.scenarios.index(r["scenario"]), self.shown.index(r["policy"])))

    def group(self, policies: list[str], cpu_plan: CpuPlan, opts: worker.WorkerOptions) -> None:
        fleet = Fleet(policies, cpu_plan, opts)
        try:
            self.meta["startup"].update(fleet.collect(opts.startup_timeout_s + 120))
            self.calibrate(fleet)
            self.save()
            for sc in self.scenarios:
                self.scenario(fleet, sc, policies)
                self.save()
        finally:
            fleet.stop()
            self.meta["errors"].update(fleet.errors)
            self.save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shown = [p for p in args.policies.split(",") if p]  # the table's order
    if report.BASELINE not in shown:
        shown.append(report.BASELINE)
    policies = sorted(shown, key=lambda p: p != report.BASELINE)  # sequential runs calibrate on it first
    mine = sorted(os.sched_getaffinity(0))
    pool = plan.parse_cpus(args.cpus) if args.cpus else mine
    if not set(pool) <= set(mine):
        raise SystemExit(f"--cpus {args.cpus}: not all of them are available to this process ({len(mine)} are)")
    cpu_plan = plan.plan_cpus(pool, len(policies), args.node_threads, args.parallel)
    if args.deadline_s is None:
        args.deadline_s = 420.0 if cpu_plan.parallel else float("inf")
    preflight(plan.NODES * (len(policies) if cpu_plan.parallel else 1), args.kv_blocks)
    os.sched_setaffinity(0, cpu_plan.driver or pool)  # the workers start here too
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    opts = worker.WorkerOptions(node_threads=args.node_threads, kv_blocks=args.kv_blocks, drain_s=args.drain_s,
                                log_dir=str(args.out / "logs"), sched_env=SCHED_ENV)
    run = Run(args, {}, shown)
    run.meta.update({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **machine(), "command": " ".join(sys.argv),
        "cpu_pool": plan.cpus_label(pool), "cpu_plan": cpu_plan.to_json(), "hyperthread_siblings": siblings(pool),
        "node_threads": args.node_threads, "kv_blocks": args.kv_blocks, "scheduler_env": SCHED_ENV,
        "multipliers": vars(run.mult), "durations": vars(run.dur), "drain_s": args.drain_s, "seed": args.seed,
        "bursts": {"concurrency": args.bursts, "duration_s": args.burst_s, "warm_s": args.burst_warm_s},
        "calibration": {"by_policy": {}}, "phases": {}, "skipped": [], "errors": {}, "startup": {}})
    log(f"{len(policies)} clusters, {'parallel' if cpu_plan.parallel else 'sequential'}"
        f"{' (sharing cores)' if cpu_plan.shared else ''}, pool {plan.cpus_label(pool)}, "
        f"driver {plan.cpus_label(list(cpu_plan.driver)) or 'service cores'}")
    for group in [policies] if cpu_plan.parallel else [[p] for p in policies]:
        run.group(group, cpu_plan, opts)
    log(f"done in {time.monotonic() - run.started:.0f}s: {args.out / 'results.md'}")
    for t in report.targets(run.rows):
        log(f"{t.verdict:4s} {t.name} = {'-' if t.ratio is None else f'{t.ratio:.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

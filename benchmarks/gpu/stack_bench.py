"""The whole FlowKV stack on real GPUs: disaggregated against colocated, one command.

For each experiment (see ``stack_plan.py``): start ``flowkv up`` (or K independent
colocated ones, one per GPU) on free ports, wait until every node is ready (and a fixed
split has pinned its roles), warm up, send a fixed set of greedy prompts (outputs compared
across clusters), then drive each load run (``libs.loadgen``, Poisson arrivals, streamed
completions with token-id prompts and ``ignore_eos``) while a NATS tap records every KV
hand-off and role flip; stop the cluster; next. Results are rewritten after every run, so
a run cut short by the time budget (or a kill) still leaves them.

Writes under ``--out``: ``results.json``, ``results.md`` (tables and PASS/FAIL targets),
``stack.png`` and ``stack.log`` (every service's output).

  python benchmarks/gpu/stack_bench.py --gpus 2 --device cuda --model llama-3.1-8b --out $OUT
  python benchmarks/gpu/stack_bench.py --gpus 2 --device cpu --model tiny --out /tmp/sb   # dry run
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import platform
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import aiohttp  # noqa: E402

import stack_report as rep  # noqa: E402
from libs.loadgen.arrivals import intervals  # noqa: E402
from libs.loadgen.client import ClientOptions  # noqa: E402
from libs.loadgen.metrics import RequestRecord, summarize, throughput_timeline  # noqa: E402
from libs.loadgen.runner import run_benchmark  # noqa: E402
from libs.loadgen.workloads import RequestSpec, WorkloadOptions, describe, make_workload  # noqa: E402
from stack_cluster import Cluster, Tap, wait_all_ready  # noqa: E402
from stack_plan import (  # noqa: E402
    HEADLINE_PAIRS,
    PROFILES,
    Experiment,
    Profile,
    catalog,
    default_experiments,
    headline_experiments,
    scheduler_targets,
)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


class Bench:
    """State of one invocation: plan, collected rows, greedy outputs, notes; writes the results."""

    def __init__(self, args: argparse.Namespace, profile: Profile, log: IO[str]) -> None:
        self.args, self.p, self.log = args, profile, log
        self.budget = Budget(args.time_budget_s)
        self.rows: list[dict[str, Any]] = []
        self.greedy: dict[str, list[list[str]]] = {}
        self.greedy_kind: dict[str, str] = {}
        self.timelines: dict[str, Any] = {}
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.clusters_info: dict[str, Any] = {}
        self.gpu_names = gpu_names(args.device)

    def say(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.budget.t0:6.1f}s] {line}"
        print(stamp, flush=True)
        self.log.write(f"stack_bench | {stamp}\n")
        self.log.flush()

    # ------------------------------------------------------------ experiments

    def run_experiment(self, exp: Experiment) -> None:
        first = exp.runs[0]
        need = self.p.startup_s + exp.lead_in_s + first["duration_s"] + self.p.tail_s
        if self.budget.left() < need:
            self.skip(f"{exp.name}: whole experiment ({self.budget.left():.0f}s left, needs ~{need:.0f}s)")
            return
        env = {**self.p.node_env, **exp.env}
        if exp.kv_transport:
            env["FLOWKV_NODE_KV_TRANSPORT"] = exp.kv_transport
        clusters = [Cluster(f"{exp.name}[{i}]", shape, self.args.model, self.p.dtype, env, self.log)
                    for i, shape in enumerate(exp.shapes)]
        t0 = time.monotonic()
        try:
            for c in clusters:
                c.start()
            ready_s = wait_all_ready(clusters, self.args.ready_timeout_s)
            self.say(f"{exp.name}: {len(clusters)} cluster(s) ready in {ready_s:.1f}s")
            self.clusters_info[exp.name] = {"ready_s": ready_s, "shapes": [c.command()[3:] for c in clusters],
                                            "env": env}
            asyncio.run(self._drive_experiment(exp, clusters))
        except Exception as exc:  # one experiment failing must not lose the others' results
            self.say(f"{exp.name}: FAILED {type(exc).__name__}: {exc}")
            self.notes.append(f"{exp.name} failed: {type(exc).__name__}: {exc}")
        finally:
            for c in clusters:
                c.stop()
            self.say(f"{exp.name}: stopped ({time.monotonic() - t0:.0f}s in all)")
            self.write()

    async def _drive_experiment(self, exp: Experiment, clusters: list[Cluster]) -> None:
        taps = [Tap() for _ in clusters]
        for tap, c in zip(taps, clusters):
            await tap.start(c.nats_url)
        try:
            if exp.want_roles:
                roles = await taps[0].wait_roles(exp.want_roles[0], timeout=60)
                self.say(f"{exp.name}: roles {roles}")
            await self._warm_up(clusters)
            if exp.greedy:
                self.greedy[exp.name] = await greedy_outputs(clusters[0].url, self.args.model, self.p)
                self.greedy_kind[exp.name] = exp.kind
            if exp.lead_in_s > 0 and exp.runs:
                await self._lead_in(exp, clusters, taps[0])
            for run in exp.runs:
                need = run["duration_s"] + self.p.tail_s + 10
                if self.budget.left() < need:
                    self.skip(f"{exp.name}: {run['workload']}@{run['rate']:g} ({self.budget.left():.0f}s left)")
                    continue
                # The same workload and rate get the same requests in every experiment.
                await self._one_run(exp, clusters, taps, run, seed=zlib.crc32(f"{run['workload']}@{run['rate']}".encode()))
                self.write()
        finally:
            for tap in taps:
                await tap.close()

    async def _warm_up(self, clusters: list[Cluster]) -> None:
        """Every node sees a long prefill and some decode before timing starts (kernels, graphs, allocator)."""
        specs = make_workload("fixed", 4 * sum(c.shape.num_nodes for c in clusters), 99,
                              WorkloadOptions(input_len=self.p.warm_input, output_len=8))
        await drive(specs, clusters, math.inf, self.client_opts(""), seed=99)

    async def _lead_in(self, exp: Experiment, clusters: list[Cluster], tap: Tap) -> None:
        """``exp.lead_in_s`` of the first run's workload (other requests: another seed),
        driven to the end and not measured; the roles it leaves are logged."""
        run = exp.runs[0]
        n = max(1, round(run["rate"] * exp.lead_in_s))
        wopts = WorkloadOptions(input_len=run.get("input_len", 128), output_len=run.get("output_len", 128),
                                length_scale=run["length_scale"])
        specs = make_workload(run["workload"], n, 7, wopts)
        before = await tap.roles()
        t0 = time.perf_counter()
        records, _ = await drive(specs, clusters, run["rate"], self.client_opts(""), seed=7)
        flips = [e for _, e in tap.flips_between(t0, time.perf_counter()) if e.detail == "done"]
        after = await tap.roles()
        self.say(f"{exp.name}: lead-in {exp.lead_in_s:g}s of {run['workload']}@{run['rate']:g}: "
                 f"{sum(r.ok for r in records)}/{len(records)} ok, {len(flips)} flips, roles {before} -> {after}")
        self.clusters_info.setdefault(exp.name, {})["lead_in"] = {
            "seconds": exp.lead_in_s, "workload": run["workload"], "rate": run["rate"], "requests": len(records),
            "ok": sum(r.ok for r in records), "roles_before": before, "roles_after": after,
            "flips": [{"node": e.node_id, "to": e.new_role.value if e.new_role else ""} for e in flips]}

    def client_opts(self, url: str) -> ClientOptions:
        return ClientOptions(url, self.args.model, server_timing=True, timeout_s=self.p.request_timeout_s)

    async def _one_run(self, exp: Experiment, clusters: list[Cluster], taps: list[Tap], run: dict[str, Any],
                       seed: int) -> None:
        n = max(1, round(run["rate"] * run["duration_s"]))
        wopts = WorkloadOptions(input_len=run.get("input_len", 128), output_len=run.get("output_len", 128),
                                length_scale=run["length_scale"])
        specs = make_workload(run["workload"], n, seed, wopts)
        roles_before = await taps[0].roles()
        t0 = time.perf_counter()
        records, duration = await drive(specs, clusters, run["rate"], self.client_opts(""), seed)
        t1 = time.perf_counter()
        await asyncio.sleep(0.2)  # the last KVDone copies are in flight with the last tokens
        handoffs = [h for tap in taps for h in tap.handoffs_between(t0, t1 + 0.2)]
        # The scheduler reports a flip when it asks ("requested: ...") and when it is "done" (or failed).
        events = [(t - t0, e) for t, e in taps[0].flips_between(t0, t1)]
        samples = taps[0].samples_between(t0, t1) if len(taps) == 1 else None
        flips = [(t, e) for t, e in events if e.detail == "done"]
        summary = summarize(records, duration)
        extra = {"roles_before": roles_before, "roles_after": await taps[0].roles(),
                 "role_flips": [{"t": round(t, 2), "node": e.node_id, "from": e.old_role.value if e.old_role else "",
                                 "to": e.new_role.value if e.new_role else ""} for t, e in flips],
                 "role_events": [{"t": round(t, 2), "node": e.node_id, "detail": e.detail} for t, e in events],
                 "exactly_once": exactly_once(specs, records), "errors": sorted({r.error[:200] for r in records if r.error})[:5],
                 # One cluster's nodes (K colocated clusters would mix K nodes of one name).
                 "nodes": rep.node_summary(samples, handoffs) if samples is not None else {},
                 "trace": rep.run_trace(samples, handoffs, t0) if samples is not None else {},
                 "requests": compact(records)}
        row = rep.run_row(exp.name, exp.kind, dict(run), summary, describe(specs), handoffs, extra)
        self.rows.append(row)
        if run["workload"] == "shift":
            ts, rates = throughput_timeline(records)
            self.timelines[exp.name] = {"t": ts, "tok_s": rates, "flips": [t for t, _ in flips]}
        h = row["handoff"]
        self.say(f"{exp.name}: {run['workload']}@{run['rate']:g} ok {summary['completed']}/{summary['num_requests']} "
                 f"{summary['request_throughput']:.2f} req/s {summary['output_throughput']:.0f} tok/s "
                 f"TTFT p99 {fmt_ms(summary['ttft']['p99'])} TPOT p99 {fmt_ms(summary['tpot']['p99'])} "
                 f"hand-offs {h['count']} p50 {fmt_ms(h['handoff_s']['p50'])} flips {len(flips)}")

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self.say(f"SKIPPED (time budget): {what}")

    # ------------------------------------------------------------ results

    def targets(self) -> list[dict[str, Any]]:
        long = self.p.long[0]
        baselines = {base for base, _ in HEADLINE_PAIRS.values()}
        flowkv_rows = [r for r in self.rows if r["experiment"] not in baselines]  # the 2% target is FlowKV's
        out = [rep.target_handoff(flowkv_rows, self.p.handoff_min_prompt), rep.target_tpot(self.rows, long)]
        if any(r["experiment"] in baselines for r in self.rows):
            out += rep.target_headline(rep.headline(self.rows, HEADLINE_PAIRS))
        sched, fixed = scheduler_targets(self.args.gpus)
        if self.args.gpus >= 4:
            out += rep.target_scheduler(self.rows, {long: sched["long"], "shift": sched["shift"]}, fixed)
        colo = [k for k, v in self.greedy_kind.items() if v == "colo"]
        ref = colo[0] if colo else next(iter(self.greedy), "")
        out.append(rep.target_greedy(rep.greedy_compare(self.greedy, ref), ref))
        shift = [r for r in self.rows if r["workload"] == "shift" and r["experiment"] == sched["shift"]]
        if shift:
            r = shift[0]
            ok = r["exactly_once"]["ok"] and len(r["role_flips"]) > 0
            out.append({"target": "shift: the scheduler flips roles and every request completes exactly once",
                        "status": "PASS" if ok else "FAIL",
                        "detail": f"{len(r['role_flips'])} flips {r['role_flips']}; {r['exactly_once']}"})
        return out

    def meta(self) -> dict[str, Any]:
        return {"gpus": self.args.gpus, "model": self.args.model, "device": self.args.device,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
                "python": platform.python_version(), "command": " ".join(sys.argv),
                "elapsed_s": round(time.monotonic() - self.budget.t0, 1), "gpu_names": self.gpu_names}

    def write(self) -> None:
        out = Path(self.args.out)
        targets = self.targets()
        head = rep.headline(self.rows, HEADLINE_PAIRS)
        doc = {"meta": self.meta(), "targets": targets, "skipped": self.skipped, "notes": self.notes,
               "clusters": self.clusters_info, "greedy": self.greedy, "headline": head, "rows": self.rows,
               "timelines": self.timelines}
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
        extras = self.notes + [f"skipped: {s}" for s in self.skipped]
        md = rep.markdown(self.rows, targets, self.meta(), extras)
        (out / "results.md").write_text(md + "\n".join(rep.headline_markdown(head)) + ("\n" if head else ""))
        rep.plot(str(out / "stack.png"), self.rows, self.p.long[0], self.timelines)


async def drive(specs: list[RequestSpec], clusters: list[Cluster], rate: float, opts: ClientOptions,
                seed: int) -> tuple[list[RequestRecord], float]:
    """Send ``specs`` at ``rate``; with K clusters, request i goes to cluster i mod K at the time
    it would be sent to one (a round-robin load balancer in front of independent servers): every
    configuration sees the same arrival schedule, so their durations and throughputs compare."""
    k = len(clusters)
    times = list(itertools.accumulate(intervals(len(specs), rate, 1.0, seed)))
    runs = []
    for i, c in enumerate(clusters[:len(specs)]):
        mine = times[i::k]
        client = ClientOptions(c.url, opts.model, server_timing=opts.server_timing, timeout_s=opts.timeout_s)
        runs.append(run_benchmark(specs[i::k], client, gaps=[b - a for a, b in zip([0.0, *mine], mine)]))
    done = await asyncio.gather(*runs)
    records = sorted((r for res in done for r in res.records), key=lambda r: r.index)
    return records, max(res.duration_s for res in done)


async def greedy_outputs(url: str, model: str, p: Profile, n: int = 8) -> list[list[str]]:
    """The token strings of ``n`` fixed greedy prompts, one at a time (no batching effects)."""
    specs = make_workload("fixed", n, 1234, WorkloadOptions(input_len=p.greedy_prompt, output_len=p.greedy_output))
    out = []
    async with aiohttp.ClientSession() as session:
        for s in specs:
            body = {"model": model, "prompt": s.prompt_token_ids, "max_tokens": s.output_len, "temperature": 0,
                    "ignore_eos": True, "logprobs": 1}
            async with session.post(url + "/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=p.request_timeout_s)) as resp:
                doc = await resp.json()
            out.append(list(doc["choices"][0]["logprobs"]["tokens"]) if resp.status == 200 else [f"HTTP {resp.status}"])
    return out


def exactly_once(specs: list[RequestSpec], records: list[RequestRecord]) -> dict[str, Any]:
    """Every request answered once, in full: one ok record per spec with exactly its output length."""
    by_index = {r.index: r for r in records}
    lost = [s.index for s in specs if s.index not in by_index or not by_index[s.index].ok]
    wrong = [s.index for s in specs if s.index in by_index and by_index[s.index].ok
             and by_index[s.index].output_tokens != s.output_len]
    return {"ok": not lost and not wrong and len(records) == len(specs), "sent": len(specs),
            "lost": len(lost), "wrong_length": len(wrong)}


def compact(records: list[RequestRecord]) -> list[list[Any]]:
    """[index, start, prompt, output, ttft, e2e, tpot, ok, server prefill_s] per request."""
    return [[r.index, round(r.start, 3), r.prompt_tokens, r.output_tokens, round(r.ttft, 4), round(r.e2e, 4),
             None if r.tpot is None else round(r.tpot, 5), r.ok, (r.server_timing or {}).get("prefill_s")]
            for r in records]


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}ms"


def gpu_names(device: str) -> list[str]:
    """From nvidia-smi, not torch: a CUDA context in this process would take GPU memory the nodes sized."""
    if device == "cpu":
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2, help="GPUs to use (1, 2, 4 or 8); on CPU: the node counts")
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(PROFILES))
    ap.add_argument("--device", default="cuda", help="cuda (nodes on cuda:0..N-1) or cpu (dry run)")
    ap.add_argument("--experiments", default="",
                    help="comma list (default: the set for --gpus, most important first); 'headline' stands for "
                         "FlowKV against the block-wise baseline over every transport the GPUs allow")
    ap.add_argument("--duration-s", type=float, default=None, help="seconds of arrivals per run (default: the profile's)")
    ap.add_argument("--lead-in-s", type=float, default=None,
                    help="seconds of un-measured load before each multi-GPU experiment's runs (default: the profile's; 0: none)")
    ap.add_argument("--synth", action="append", default=[], metavar="W=R1,R2",
                    help="the paper's synthetic set W (1k, 5k, 10k) at these rates in the 2-GPU set's 1P1D and "
                         "colocated runs, replacing its default rates (repeatable)")
    ap.add_argument("--workloads", default="", help="comma list: keep only these workloads' runs (default: all)")
    ap.add_argument("--rates", default="", help="comma list: replaces the long-prompt mix's rates (2-GPU set)")
    ap.add_argument("--time-budget-s", type=float, default=480.0, help="start nothing that would end past this")
    ap.add_argument("--ready-timeout-s", type=float, default=240.0, help="give up on a cluster's start after this")
    ap.add_argument("--out", default="bench-results/stack", help="output folder")
    return ap.parse_args(argv)


# The 2-GPU set's experiments whose rates --rates and --synth set (the TPOT comparison's pair and one colocated node).
SWEPT = ("1p1d_ipc", "2colo", "1colo")


def plan(args: argparse.Namespace, profile: Profile) -> list[Experiment]:
    cat = catalog(profile, args.device, args.gpus)
    names = [n for n in (args.experiments.split(",") if args.experiments else default_experiments(args.gpus)) if n]
    names = [m for n in names for m in (headline_experiments(args.gpus, args.device) if n == "headline" else [n])]
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}; known for --gpus {args.gpus}: {sorted(cat)}")
    exps = [cat[n] for n in names]
    rates = [float(x) for x in args.rates.split(",") if x]
    synth: dict[str, list[float]] = {}
    for spec in args.synth:
        workload, _, values = spec.partition("=")
        if workload not in profile.synth_scale or not values:
            raise SystemExit(f"--synth {spec!r}: want W=R1,R2 with W one of {sorted(profile.synth_scale)}")
        synth[workload] = [float(x) for x in values.split(",") if x]
    for exp in exps:
        if rates and exp.name in SWEPT:
            template = next(r for r in exp.runs if r["workload"] == profile.long[0])
            exp.runs = [{**template, "rate": r} for r in rates] + [
                r for r in exp.runs if r["workload"] != profile.long[0]]
        if exp.name in SWEPT:
            for workload, synth_rates in synth.items():
                exp.runs = [r for r in exp.runs if r["workload"] != workload] + [
                    {"workload": workload, "rate": r, "length_scale": profile.synth_scale[workload],
                     "duration_s": profile.duration_s} for r in synth_rates]
        if args.workloads:
            exp.runs = [r for r in exp.runs if r["workload"] in args.workloads.split(",")]
        if args.lead_in_s is not None and exp.lead_in_s > 0:
            exp.lead_in_s = args.lead_in_s
        if args.duration_s is not None:
            for run in exp.runs:
                run["duration_s"] = args.duration_s * (2 if run["workload"] == "shift" else 1)
    return [e for e in exps if e.runs]  # --workloads may leave an experiment nothing to run


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    # `timeout` sends SIGTERM: unwind so every cluster is stopped and the results written.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse(argv)
    profile = PROFILES[args.model]
    exps = plan(args, profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stack.log", "a", buffering=1) as log:
        bench = Bench(args, profile, log)
        bench.say(f"plan: {[e.name for e in exps]} within {args.time_budget_s:.0f}s")
        try:
            for exp in exps:
                bench.run_experiment(exp)
        finally:
            bench.write()
        for t in bench.targets():
            bench.say(f"{t['status']}: {t['target']} -- {t.get('detail', '')}")
        bench.say(f"done; results in {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Goodput on real processes: ``flowkv`` against colocated nodes and fixed splits.

For each policy, one ``flowkv up`` of ``--nodes`` nodes (colocated: ``--colocated N`` with
the ``colocated`` policy; a fixed split ``P:D``: launched P prefill and D decode nodes;
``flowkv``: launched half prefill, half decode; ``flowkv@hybrid``: the same policy launched
all hybrid, as ``flowkv up --colocated N`` launches it), one after another, each driven with the same requests
(seeded prompt and output lengths, Poisson arrivals): an unmeasured lead-in, then the
measured window, then a drain. Goodput is the number of requests per second of the window
that completed within both objectives. Every cluster's scheduler has the objectives as its
``ttft_slo_s`` / ``tpot_slo_s`` (``--objectives all``): flowkv plans its roles by them, and
every policy's nodes pace their prompts by them; ``--objectives flowkv`` gives them to the
flowkv clusters alone (the others' nodes then do not pace).

  .venv/bin/python benchmarks/goodput_real.py --model tiny --rate 4 --out /tmp/goodput_real
  python3 benchmarks/goodput_real.py --device cuda --model llama-3.1-8b --dtype bfloat16 ...

Writes ``results.json`` and ``results.md`` under ``--out``, each cluster's log and, with
matplotlib, ``goodput_real.png``: flowkv's roles over time and, for every cluster, the
requests that missed an objective by when they arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "gpu")]

from libs.loadgen.client import ClientOptions  # noqa: E402
from libs.loadgen.runner import run_benchmark  # noqa: E402
from libs.loadgen.workloads import RequestSpec  # noqa: E402
from stack_cluster import Cluster, Shape, Tap, wait_all_ready  # noqa: E402

# The role controller on the time scale of a run of minutes (its defaults suit hours).
SCHED_ENV = {"FLOWKV_SCHEDULER_MIN_DWELL_S": "3", "FLOWKV_SCHEDULER_DEMAND_WINDOW_S": "5",
             "FLOWKV_SCHEDULER_GOODPUT_WINDOW_S": "15", "FLOWKV_SCHEDULER_REVERSE_COOLDOWN_S": "15",
             "FLOWKV_SCHEDULER_ROLE_INTERVAL_S": "0.25"}


def shape_of(policy: str, nodes: int, device: str) -> Shape:
    if policy == "colocated":
        return Shape(colocated=nodes, device=device, policy="colocated")
    if policy.startswith("fixed:"):
        p, d = (int(x) for x in policy.split(":")[1:])
        return Shape(p, d, 0, device, policy)
    if policy == "flowkv@hybrid":
        return Shape(colocated=nodes, device=device, policy="flowkv")
    return Shape(nodes // 2, nodes - nodes // 2, 0, device, policy)


def is_flowkv(policy: str) -> bool:
    return policy.split("@")[0] == "flowkv"


def workload(args: argparse.Namespace) -> tuple[list[RequestSpec], list[float]]:
    """The requests and their gaps: the same for every policy (seeded)."""
    rng = random.Random(args.seed)
    total = args.lead_in_s + args.duration_s
    gaps, t = [], 0.0
    while True:
        gap = rng.expovariate(args.rate)
        if t + gap >= total:
            break
        t += gap
        gaps.append(gap)
    lo, hi = (int(x) for x in args.input_len.split(":"))
    olo, ohi = (int(x) for x in args.output_len.split(":"))
    specs = [RequestSpec(i, [rng.randint(100, 4000) for _ in range(rng.randint(lo, hi))], rng.randint(olo, ohi))
             for i in range(len(gaps))]
    return specs, gaps


def measure(records: list[Any], starts: list[float], args: argparse.Namespace) -> dict[str, Any]:
    window = [(r, s) for r, s in zip(records, starts) if args.lead_in_s <= s < args.lead_in_s + args.duration_s]
    done = [r for r, _ in window if r.ok]
    good = [r for r in done if r.ttft <= args.ttft_slo and (r.tpot is None or r.tpot <= args.tpot_slo)]
    kept = {id(r) for r in good}
    # Each request of the window that missed: when it arrived (seconds from the first
    # arrival), its TTFT and TPOT (None: failed, or a single token), to set against the
    # role flips.
    missed = [[round(s, 1), round(r.ttft, 2) if r.ok else None, round(r.tpot, 3) if r.ok and r.tpot is not None else None]
              for r, s in window if id(r) not in kept]
    ttft = sorted(r.ttft for r in done)
    tpot = sorted(r.tpot for r in done if r.tpot is not None)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else 0.0

    return {"num_requests": len(window), "num_completed": len(done), "goodput_rps": len(good) / args.duration_s,
            "slo_attainment": len(good) / len(window) if window else 0.0,
            "throughput_tok_s": sum(r.output_tokens for r in done) / args.duration_s,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "missed": missed}


async def drive(cluster: Cluster, specs: list[RequestSpec], gaps: list[float], client: ClientOptions,
                cutoff: float) -> tuple[Any, list[list[Any]]]:
    """Send the requests; meanwhile note the scheduler's role flips, as [seconds from the first
    arrival, node, old role, new role, reason]."""
    tap = Tap()
    await tap.start(cluster.nats_url)
    try:
        t0 = time.perf_counter()
        result = await run_benchmark(specs, client, gaps=gaps, cutoff_s=cutoff)
    finally:
        await tap.close()
    flips = [[round(t - t0, 1), e.node_id, e.old_role.value if e.old_role else "", e.new_role.value if e.new_role else "",
              e.detail] for t, e in tap.flips_between(t0 - 600, float("inf"))]
    return result, flips


def run_policy(policy: str, args: argparse.Namespace, specs: list[RequestSpec], gaps: list[float],
               log: Any) -> dict[str, Any]:
    env = {**SCHED_ENV, **dict(kv.split("=", 1) for kv in args.env)}
    if is_flowkv(policy) or args.objectives == "all":
        env |= {"FLOWKV_SCHEDULER_TTFT_SLO_S": str(args.ttft_slo), "FLOWKV_SCHEDULER_TPOT_SLO_S": str(args.tpot_slo)}
    cluster = Cluster(policy.replace(":", "_").replace("@", "_"), shape_of(policy, args.nodes, args.device), args.model, args.dtype, env, log)
    t0 = time.monotonic()
    cluster.start()
    try:
        ready_s = wait_all_ready([cluster], args.ready_timeout_s)
        client = ClientOptions(base_url=cluster.url, model=args.model, timeout_s=args.request_timeout_s)
        cutoff = args.lead_in_s + args.duration_s + args.drain_s
        result, flips = asyncio.run(drive(cluster, specs, gaps, client, cutoff))
    finally:
        cluster.stop()
    starts = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    row = {"policy": policy, "ready_s": round(ready_s, 1), "wall_s": round(time.monotonic() - t0, 1),
           **measure(result.records, starts, args), "role_timeline": flips}
    print(f"{policy:11s} goodput {row['goodput_rps']:6.2f} req/s  tok/s {row['throughput_tok_s']:7.1f}  "
          f"TTFT p50/p99 {row['ttft_p50']:.2f}/{row['ttft_p99']:.2f} s  TPOT p50/p99 "
          f"{row['tpot_p50'] * 1e3:.0f}/{row['tpot_p99'] * 1e3:.0f} ms  done {row['num_completed']}/{row['num_requests']}"
          f"  [{row['wall_s']}s]", flush=True)
    for t, node, old, new, why in flips:
        print(f"  {t:+7.1f} s  {node} {old} -> {new}  ({why})", flush=True)
    return row


def roles_over_time(launch: Shape, flips: list[list[Any]]) -> list[tuple[float, int, int, int]]:
    """(seconds from the first arrival, prefill, hybrid, decode nodes) at launch (time 0 or
    the first flip's, if earlier) and after each flip done, from the run's role timeline."""
    counts = {"prefill": launch.prefill if not launch.colocated else 0, "hybrid": launch.colocated,
              "decode": launch.decode if not launch.colocated else 0}
    start = min([0.0, *(t for t, *_ in flips)])
    out = [(start, counts["prefill"], counts["hybrid"], counts["decode"])]
    for t, _node, old, new, detail in flips:
        if detail == "done" and old in counts and new in counts:
            counts[old] -= 1
            counts[new] += 1
            out.append((t, counts["prefill"], counts["hybrid"], counts["decode"]))
    return out


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """``goodput_real.png``: each flowkv cluster's roles over time, and every cluster's
    missed requests, counted up by arrival time (where a policy falls behind shows as a
    steeper line)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flows = [r for r in rows if is_flowkv(r["policy"])]
    end = meta["lead_in_s"] + meta["duration_s"]
    fig, axes = plt.subplots(len(flows) + 1, 1, figsize=(7, 2.2 * (len(flows) + 1)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], flows):
        steps = roles_over_time(shape_of(r["policy"], meta["nodes"], meta["device"]), r["role_timeline"])
        ts = [s[0] for s in steps] + [end]
        for k, (label, color) in enumerate((("prefill", "tab:orange"), ("hybrid", "tab:gray"), ("decode", "tab:blue"))):
            ys = [s[1 + k] for s in steps]
            ax.step(ts, ys + ys[-1:], where="post", label=label, color=color)
        ax.set_ylabel("nodes", fontsize=8)
        ax.set_title(f"{r['policy']}: roles", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1, 0]
    colors = {"flowkv": "tab:red", "flowkv@hybrid": "tab:purple"}
    seen: dict[str, int] = {}
    for r in rows:
        policy = r["policy"]
        seen[policy] = seen.get(policy, 0) + 1
        repeated = sum(x["policy"] == policy for x in rows) > 1  # e.g. a baseline run before and after
        times = sorted(m[0] for m in r.get("missed", []))
        ax.step([meta["lead_in_s"], *times, end], [0, *range(1, len(times) + 1), len(times)], where="post",
                label=f"{policy} ({seen[policy]})" if repeated else policy, color=colors.get(policy))
    ax.set_xlabel("arrival, seconds from the first (the window starts at the lead-in's end)", fontsize=8)
    ax.set_ylabel("missed", fontsize=8)
    ax.set_yscale("symlog", linthresh=10)  # a policy missing most requests leaves the others readable
    ax.set_title(f"requests missing TTFT {meta['ttft_slo']:g} s or TPOT {meta['tpot_slo'] * 1e3:g} ms", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    for a in axes[:, 0]:
        a.axvline(meta["lead_in_s"], color="black", linewidth=0.5, linestyle=":")
        a.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "goodput_real.png", dpi=90)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"{meta['nodes']} nodes, {meta['model']} on {meta['device']}; objectives TTFT {meta['ttft_slo']:g} s, "
             f"TPOT {meta['tpot_slo'] * 1e3:g} ms; {meta['rate']:g} req/s, prompts {meta['input_len']}, outputs "
             f"{meta['output_len']}; lead-in {meta['lead_in_s']:g} s, window {meta['duration_s']:g} s.", "",
             "| policy | goodput req/s | SLO | out tok/s | TTFT p50/p99 s | TPOT p50/p99 ms | completed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['goodput_rps']:.2f} | {r['slo_attainment']:.0%} | {r['throughput_tok_s']:.1f} | "
                     f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f} | {r['tpot_p50'] * 1e3:.0f}/{r['tpot_p99'] * 1e3:.0f} | "
                     f"{r['num_completed']}/{r['num_requests']} |")
    flows = [r for r in rows if is_flowkv(r["policy"])]
    others = [r for r in rows if not is_flowkv(r["policy"])]
    for flow in flows if others else []:
        bg = max(others, key=lambda r: r["goodput_rps"])
        bt = max(others, key=lambda r: r["throughput_tok_s"])
        g = flow["goodput_rps"] / bg["goodput_rps"] if bg["goodput_rps"] else 1.0
        t = flow["throughput_tok_s"] / bt["throughput_tok_s"] if bt["throughput_tok_s"] else 1.0
        lines += ["", f"{flow['policy']} goodput / best other ({bg['policy']}): {g:.3f}; "
                  f"tok/s / best ({bt['policy']}): {t:.3f}"]
    for flow in flows:
        if flow.get("role_timeline"):
            lines += ["", f"{flow['policy']}'s role flips (seconds from the first arrival; the window starts at "
                      f"{meta['lead_in_s']:g} s):", ""]
            lines += [f"- {t:+.1f} s: {node} {old} -> {new} ({why})" for t, node, old, new, why in flow["role_timeline"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--policies", default="flowkv,colocated,fixed:1:3,fixed:2:2,fixed:3:1")
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s")
    ap.add_argument("--input-len", default="200:600", help="LO:HI prompt tokens")
    ap.add_argument("--output-len", default="16:48", help="LO:HI output tokens")
    ap.add_argument("--ttft-slo", type=float, default=3.0)
    ap.add_argument("--tpot-slo", type=float, default=0.3)
    ap.add_argument("--objectives", choices=("all", "flowkv"), default="all",
                    help="the clusters whose scheduler gets the objectives (their nodes pace prompts by them)")
    ap.add_argument("--lead-in-s", type=float, default=10.0)
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--drain-s", type=float, default=20.0)
    ap.add_argument("--ready-timeout-s", type=float, default=300.0)
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for every service (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-s", type=float, default=0.0,
                    help="start no cluster that would end past this many seconds (by the longest so far; 0: none)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--replot", action="store_true", help="only redraw the plot of the results.json in --out")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        plot([r for r in saved["runs"] if "error" not in r], saved["meta"], args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    specs, gaps = workload(args)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    rows: list[dict[str, Any]] = []
    t0, longest = time.monotonic(), 0.0
    with open(args.out / "clusters.log", "a") as log:
        for policy in [p for p in args.policies.split(",") if p]:
            if args.time_budget_s and time.monotonic() - t0 + longest > args.time_budget_s:
                print(f"{policy}: skipped (the time budget of {args.time_budget_s:g} s would run out)", flush=True)
                rows.append({"policy": policy, "error": "skipped: time budget"})
                continue
            started = time.monotonic()
            try:
                rows.append(run_policy(policy, args, specs, gaps, log))
            except Exception as e:  # one cluster failing leaves the others' rows
                print(f"{policy}: failed: {e!r}", flush=True)
                rows.append({"policy": policy, "error": repr(e)})
            longest = max(longest, time.monotonic() - started)
            ok = [r for r in rows if "error" not in r]
            (args.out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
            (args.out / "results.md").write_text(markdown(ok, meta))
    ok = [r for r in rows if "error" not in r]
    plot(ok, meta, args.out)
    print(markdown(ok, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

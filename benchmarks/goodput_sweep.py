"""Goodput sweep on the simulator: ``flowkv`` against all-colocated and fixed splits.

For each cluster size and scenario (``libs.sim.workload.GOODPUT_SCENARIOS``: the long
mix, ``shift``, the 1k / 5k / 10k sets and a bursty trace), every policy serves the same
arrivals (one seed) under the same objectives, with the real scheduler core on simulated
H100 nodes. Each run has an unmeasured lead-in of its first phase (every policy is measured
from a cluster already serving, as the GPU stack benchmark does) and a drain after the
last arrival so that the window's last requests finish and count.

Targets, per scenario and size: ``flowkv``'s goodput (requests/s completed within both
objectives) at least the best of the others, and its output tok/s within 3% of the best.

  .venv/bin/python benchmarks/goodput_sweep.py --out benchmarks/results/goodput_sim
  .venv/bin/python benchmarks/goodput_sweep.py --nodes 4 --scenarios long,10k --out /tmp/g
  .venv/bin/python benchmarks/goodput_sweep.py --nodes 4,8 --policies flowkv,colocated \
      --no-scheduler-objectives --out benchmarks/results/goodput_sim_default

Writes ``results.json`` (one row per run, with flowkv's role timeline and flip reasons),
``results.md`` (tables and the target check) and, with matplotlib, ``goodput.png`` and
``roles_<nodes>_<scenario>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libs.sim.cluster import SimConfig  # noqa: E402
from libs.sim.metrics import SLO  # noqa: E402
from libs.sim.sweep import run_one  # noqa: E402
from libs.sim.workload import GOODPUT_SCENARIOS  # noqa: E402


def policies(n: int, split_step: int) -> list[str]:
    """flowkv, colocated and the fixed splits p:n-p for p = 1, 1 + step, ... (and n - 1)."""
    ps = sorted(set(range(1, n, split_step)) | {n - 1, n // 2})
    return ["flowkv", "colocated"] + [f"fixed:{p}:{n - p}" for p in ps]


def run(job: tuple[int, str, str, float, float, float, float, float, int, bool, str]) -> dict[str, Any]:
    n, scenario, policy, ttft, tpot, scale, lead_in, drain, seed, plan_slo, launch = job
    t0 = time.perf_counter()
    m, cl = run_one(n, scenario, policy, seed, scale, config=SimConfig(launch=launch), slo=SLO(ttft, tpot),
                    lead_in_s=lead_in, drain_s=drain, plan_slo=plan_slo)
    row = m.as_dict()
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    if policy == "flowkv":
        row["role_timeline"] = [list(r) for r in cl.role_timeline]
        row["flips"] = [[round(t, 2), nid, old.value, new.value, why]
                        for (t, nid, old, new), why in zip(cl.flips, cl.flip_reasons)]
    return row


def check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (nodes, scenario): flowkv against the best other policy on goodput and tok/s."""
    out = []
    for n in sorted({r["num_nodes"] for r in rows}):
        for sc in [s for s in GOODPUT_SCENARIOS if any(r["scenario"] == s and r["num_nodes"] == n for r in rows)]:
            runs = [r for r in rows if r["num_nodes"] == n and r["scenario"] == sc]
            flow = next((r for r in runs if r["policy"] == "flowkv"), None)
            others = [r for r in runs if r["policy"] != "flowkv"]
            if flow is None or not others:
                continue
            best_g = max(others, key=lambda r: r["goodput_rps"])
            best_t = max(others, key=lambda r: r["throughput_tok_s"])
            g = flow["goodput_rps"] / best_g["goodput_rps"] if best_g["goodput_rps"] else 1.0
            t = flow["throughput_tok_s"] / best_t["throughput_tok_s"] if best_t["throughput_tok_s"] else 1.0
            out.append({"nodes": n, "scenario": sc, "best_goodput_policy": best_g["policy"],
                        "goodput_ratio": round(g, 4), "best_tok_policy": best_t["policy"], "tok_ratio": round(t, 4),
                        "goodput_met": g >= 1.0, "tok_met": t >= 0.97, "flips": flow["num_flips"]})
    return out


def markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Objectives: TTFT {meta['ttft_slo_s']:g} s, TPOT {meta['tpot_slo_s'] * 1e3:g} ms"
             + ("" if meta.get("scheduler_objectives", True) else
                " (goodput counted at them; the scheduler ran with its defaults, no objectives)")
             + f"; lead-in {meta['lead_in_s']:g} s, drain {meta['drain_s']:g} s, scale {meta['scale']:g}, seed {meta['seed']}.",
             "", "| nodes | scenario | flowkv goodput / best (policy) | flowkv tok/s / best (policy) | flowkv flips | goodput | tok/s |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['nodes']} | {c['scenario']} | {c['goodput_ratio']:.3f} ({c['best_goodput_policy']}) | "
                     f"{c['tok_ratio']:.3f} ({c['best_tok_policy']}) | {c['flips']} | "
                     f"{'met' if c['goodput_met'] else 'MISSED'} | {'met' if c['tok_met'] else 'MISSED'} |")
    lines += ["", "| nodes | scenario | policy | goodput req/s | req/s | out tok/s | TTFT p50/p99 s | TPOT p50/p99 ms | "
              "SLO | rejections | flips |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['num_nodes']} | {r['scenario']} | {r['policy']} | {r['goodput_rps']:.2f} | "
                     f"{r['throughput_rps']:.2f} | {r['throughput_tok_s']:.0f} | {r['ttft_p50']:.2f}/{r['ttft_p99']:.2f} | "
                     f"{r['tpot_p50'] * 1e3:.0f}/{r['tpot_p99'] * 1e3:.0f} | {r['slo_attainment']:.0%} | "
                     f"{r['num_rejections']} | {r['num_flips']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["num_nodes"] for r in rows})
    scenarios = [s for s in GOODPUT_SCENARIOS if any(r["scenario"] == s for r in rows)]
    fig, axes = plt.subplots(len(sizes), len(scenarios), figsize=(3.2 * len(scenarios), 2.8 * len(sizes)), squeeze=False)
    for i, n in enumerate(sizes):
        for j, sc in enumerate(scenarios):
            ax = axes[i][j]
            rs = [r for r in rows if r["num_nodes"] == n and r["scenario"] == sc]
            labels = [r["policy"].replace("fixed:", "") for r in rs]
            colors = ["tab:red" if r["policy"] == "flowkv" else "tab:gray" if r["policy"] == "colocated" else "tab:blue"
                      for r in rs]
            ax.bar(labels, [r["goodput_rps"] for r in rs], color=colors)
            ax.set_title(f"{n} nodes, {sc}", fontsize=9)
            ax.tick_params(axis="x", rotation=90, labelsize=6)
            ax.tick_params(axis="y", labelsize=7)
            if j == 0:
                ax.set_ylabel("goodput req/s", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "goodput.png", dpi=90)
    plt.close(fig)
    for r in rows:
        if r["policy"] != "flowkv" or not r.get("role_timeline"):
            continue
        tl = r["role_timeline"]
        end = tl[-1][0] + 10
        fig, ax = plt.subplots(figsize=(6, 2.6))
        ts = [row[0] for row in tl] + [end]
        for k, (label, color) in enumerate((("prefill", "tab:orange"), ("decode", "tab:blue"), ("hybrid", "tab:gray"))):
            ys = [row[1 + k] for row in tl]
            ax.step(ts, ys + ys[-1:], where="post", label=label, color=color)
        ax.set_xlabel("sim time (s)")
        ax.set_ylabel("nodes")
        ax.set_title(f"flowkv roles, {r['num_nodes']} nodes, {r['scenario']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"roles_{r['num_nodes']}_{r['scenario']}.png", dpi=90)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="4,8,16,32", help="cluster sizes, comma-separated")
    ap.add_argument("--scenarios", default=",".join(GOODPUT_SCENARIOS))
    ap.add_argument("--ttft-slo", type=float, default=3.0, help="TTFT objective, seconds")
    ap.add_argument("--tpot-slo", type=float, default=0.05, help="TPOT objective, seconds")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the scenario durations")
    ap.add_argument("--lead-in-s", type=float, default=20.0)
    ap.add_argument("--drain-s", type=float, default=30.0)
    ap.add_argument("--split-step", default="4:1,8:1,16:2,32:4",
                    help="N:STEP,...: fixed splits p:N-p for p = 1, 1+STEP, ... (plus N/2 and N-1); 1 = every split")
    ap.add_argument("--policies", default="",
                    help="only these policies, comma-separated (flowkv, colocated, fixed:P:D; default: all)")
    ap.add_argument("--no-scheduler-objectives", action="store_true",
                    help="the scheduler plans with its defaults (no objectives); goodput is still counted at the SLOs")
    ap.add_argument("--launch", choices=("split", "hybrid"), default="split",
                    help="the roles flowkv's nodes start in: split (half prefill, half decode, as `flowkv up` "
                         "launches them by default) or hybrid (every node both, as `flowkv up --colocated N`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    steps = {int(k): int(v) for k, v in (p.split(":") for p in args.split_step.split(",") if p)}
    sizes = [int(x) for x in args.nodes.split(",")]
    scenarios = [s for s in args.scenarios.split(",") if s]
    only = {p for p in args.policies.split(",") if p}
    jobs = [(n, sc, pol, args.ttft_slo, args.tpot_slo, args.scale, args.lead_in_s, args.drain_s, args.seed,
             not args.no_scheduler_objectives, args.launch)
            for n in sizes for sc in scenarios for pol in policies(n, steps.get(n, 1)) if not only or pol in only]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"ttft_slo_s": args.ttft_slo, "tpot_slo_s": args.tpot_slo, "scale": args.scale, "lead_in_s": args.lead_in_s,
            "drain_s": args.drain_s, "seed": args.seed, "split_step": steps, "node": "simulated H100, Llama-3.1-8B shape",
            "scheduler_objectives": not args.no_scheduler_objectives, "launch": args.launch}
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run, jobs):
            rows.append(row)
            print(f"{row['num_nodes']:3d} {row['scenario']:7s} {row['policy']:12s} goodput {row['goodput_rps']:7.2f} "
                  f"tok/s {row['throughput_tok_s']:8.0f} flips {row['num_flips']:3d} [{row['wall_s']}s]", file=sys.stderr)
    checks = check(rows)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "checks": checks, "runs": rows}, indent=1))
    (args.out / "results.md").write_text(markdown(rows, checks, meta))
    plot(rows, args.out)
    print(markdown([], checks, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

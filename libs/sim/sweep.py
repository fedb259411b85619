"""Run one simulation, or sweep policies x scenarios, and write JSON, a markdown table and PNGs
(and, for a cluster of mixed device kinds, what work each kind took)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from libs.sim.calibration import NodeCosts
from libs.sim.cluster import Cluster, SimConfig
from libs.sim.metrics import SLO, RunMetrics, by_device, summarize
from libs.sim.workload import GOODPUT_SCENARIOS, SCENARIOS, duration, generate


def run_one(num_nodes: int, scenario: str, policy: str, seed: int = 0, scale: float = 1.0,
            config: SimConfig | None = None, slo: SLO | None = None,
            costs: list[NodeCosts] | None = None, lead_in_s: float = 0.0,
            drain_s: float = 0.0, plan_slo: bool = True) -> tuple[RunMetrics, Cluster]:
    """Simulate ``policy`` on ``scenario``; the same seed gives the same requests for every policy.
    ``costs`` gives each node its device kind (default: all H100); ``lead_in_s`` of the
    first phase run before the scenario, unmeasured; the run goes on ``drain_s`` after the
    last arrival so that requests of the window's end can finish (and count). With
    ``plan_slo`` false the scheduler keeps ``config``'s objectives (the defaults: none) and
    ``slo`` only counts the goodput."""
    window = duration(scenario, scale, lead_in_s)
    slo = slo or SLO()
    config = config or SimConfig()
    if plan_slo:
        # The deployment's objectives reach the role controller, as the scheduler's
        # ttft_slo_s / tpot_slo_s do: flowkv plans its roles for goodput under them.
        config = replace(config, roles=replace(config.roles, ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s))
    requests = generate(scenario, num_nodes, seed, scale, lead_in_s)
    cluster = Cluster(num_nodes, policy, requests, window + drain_s, config, costs).run()
    return summarize(cluster, policy, scenario, window, slo, lead_in_s), cluster


def sweep_policies(num_nodes: int) -> list[str]:
    """flowkv, round_robin, least_loaded and every fixed split p:d with p + d = nodes."""
    return ["flowkv", "round_robin", "least_loaded"] + [f"fixed:{p}:{num_nodes - p}" for p in range(1, num_nodes)]


def markdown(results: list[RunMetrics]) -> str:
    head = ("| scenario | policy | req/s | out tok/s | TTFT p50/p90/p99 (s) | TPOT p50/p90/p99 (ms) | SLO | "
            "rejections | flips |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = [
        f"| {m.scenario} | {m.policy} | {m.throughput_rps:.2f} | {m.throughput_tok_s:.0f} | "
        f"{m.ttft_p50:.2f}/{m.ttft_p90:.2f}/{m.ttft_p99:.2f} | "
        f"{m.tpot_p50 * 1e3:.0f}/{m.tpot_p90 * 1e3:.0f}/{m.tpot_p99 * 1e3:.0f} | {m.slo_attainment:.0%} | "
        f"{m.num_rejections} | {m.num_flips} |"
        for m in results
    ]
    return head + "\n".join(rows) + "\n"


def device_markdown(clusters: dict[tuple[str, str], Cluster]) -> str:
    """Per run and device kind: prefill and decode work per node, and time in the prefill role."""
    head = ("| scenario | policy | device | nodes | prefill ktok/node | per prefill node | output ktok/node | "
            "prefill-role time |\n|---|---|---|---|---|---|---|---|\n")
    rows = [
        f"| {sc} | {pol} | {d.device_name} | {d.num_nodes} | {d.prefill_tokens_per_node / 1e3:.0f} | "
        f"{d.prefill_tokens_per_prefill_node / 1e3:.0f} | {d.output_tokens_per_node / 1e3:.0f} | {d.prefill_role_share:.0%} |"
        for (sc, pol), cl in clusters.items() for d in by_device(cl, cl.horizon_s)
    ]
    return head + "\n".join(rows) + "\n"


def is_mixed(clusters: dict[tuple[str, str], Cluster]) -> bool:
    return any(len({n.costs.device_name for n in cl.nodes.values()}) > 1 for cl in clusters.values())


def targets(results: list[RunMetrics]) -> list[str]:
    """The FlowKV targets, checked on requests/s: +15% over fixed 1:1 under imbalance,
    within 5% of the best fixed split in every scenario."""
    lines = []
    for sc in sorted({m.scenario for m in results}):
        by = {m.policy: m for m in results if m.scenario == sc}
        if "flowkv" not in by:
            continue
        fixed = {k: v for k, v in by.items() if k.startswith("fixed:")}
        if fixed:
            best = max(fixed.values(), key=lambda m: m.throughput_rps)
            ratio = by["flowkv"].throughput_rps / best.throughput_rps
            lines.append(f"{sc}: flowkv / best fixed ({best.policy}) = {ratio:.3f} "
                         f"({'ok' if ratio >= 0.95 else 'MISSED'}: >= 0.95)")
        half = [k for k in fixed if k.split(":")[1] == k.split(":")[2]]
        if sc == "imbalance" and half:
            ratio = by["flowkv"].throughput_rps / by[half[0]].throughput_rps
            lines.append(f"{sc}: flowkv / {half[0]} = {ratio:.3f} ({'ok' if ratio >= 1.15 else 'MISSED'}: >= 1.15)")
    return lines


def plot(results: list[RunMetrics], clusters: dict[tuple[str, str], Cluster], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    scenarios = [s for s in (*SCENARIOS, *GOODPUT_SCENARIOS) if any(m.scenario == s for m in results)]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        ms = [m for m in results if m.scenario == sc]
        ax.bar([m.policy for m in ms], [m.throughput_rps for m in ms], color="tab:blue")
        ax.set_title(f"{sc}: throughput (req/s)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    written.append(out / "throughput.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        ms = [m for m in results if m.scenario == sc]
        ax.bar([m.policy for m in ms], [m.slo_attainment for m in ms], color="tab:green")
        ax.set_title(f"{sc}: SLO attainment")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    written.append(out / "slo.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    for (sc, pol), cl in clusters.items():
        if pol != "flowkv" or not cl.role_timeline:
            continue
        fig, ax = plt.subplots(figsize=(6, 3))
        ts = [t for t, *_ in cl.role_timeline] + [cl.horizon_s]
        for i, (label, color) in enumerate((("prefill", "tab:orange"), ("decode", "tab:blue"), ("hybrid", "tab:gray"))):
            ys = [row[1 + i] for row in cl.role_timeline]
            ax.step(ts, ys + ys[-1:], where="post", label=label, color=color)
        ax.set_xlabel("sim time (s)")
        ax.set_ylabel("nodes")
        ax.set_title(f"flowkv roles, {sc}")
        ax.legend()
        fig.tight_layout()
        written.append(out / f"roles_{sc}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def write(results: list[RunMetrics], clusters: dict[tuple[str, str], Cluster], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([m.as_dict() for m in results], indent=1))
    text = markdown(results) + "\n" + "\n".join(targets(results)) + "\n"
    if is_mixed(clusters):
        text += "\nWork per device kind:\n\n" + device_markdown(clusters)
        shares = [{"scenario": sc, "policy": pol, **asdict(d),
                   "prefill_tokens_per_prefill_node": d.prefill_tokens_per_prefill_node}
                  for (sc, pol), cl in clusters.items() for d in by_device(cl, cl.horizon_s)]
        (out / "devices.json").write_text(json.dumps(shares, indent=1))
    (out / "results.md").write_text(text)
    plot(results, clusters, out)
    return text

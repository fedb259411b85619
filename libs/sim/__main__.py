"""``python -m libs.sim``: simulate a FlowKV cluster with the real scheduler core.

  python -m libs.sim --nodes 8 --scenario imbalance --policy flowkv --out DIR
  python -m libs.sim --nodes 4 --sweep --out DIR      # every policy x every scenario
  python -m libs.sim --mix h100:4,a100:4 --sweep      # 8 nodes of two device kinds (n00-n03 H100)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from libs.sim.calibration import DEVICE_KINDS, parse_mix
from libs.sim.cluster import SimConfig
from libs.sim.metrics import SLO
from libs.sim.sweep import run_one, sweep_policies, write
from libs.sim.workload import GOODPUT_SCENARIOS, SCENARIOS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m libs.sim", description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=None, help="cluster size (4 to 64; default 4, or the --mix total)")
    ap.add_argument("--mix", default="", help=f"device kinds in node order, KIND:COUNT,... (kinds: "
                    f"{', '.join(DEVICE_KINDS)}; default all h100), e.g. h100:4,a100:4")
    ap.add_argument("--scenario", choices=[*SCENARIOS, *GOODPUT_SCENARIOS, "all"], default="all",
                    help="all: the paper's three (normal, imbalance, overload)")
    ap.add_argument("--policy", default="flowkv", help="round_robin, least_loaded, fixed:P:D, colocated or flowkv")
    ap.add_argument("--sweep", action="store_true", help="every policy and fixed split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the scenario durations")
    ap.add_argument("--ttft-slo", type=float, default=5.0, help="TTFT SLO in seconds")
    ap.add_argument("--tpot-slo", type=float, default=0.1, help="TPOT SLO in seconds")
    ap.add_argument("--strict-drain", action="store_true",
                    help="nodes take no new work until their old role's work is done (default: switch at once)")
    ap.add_argument("--queue-wait-s", type=float, default=0.0,
                    help="how long a request may wait in the scheduler's queue (the gateway's queue_timeout_s; "
                         "default 0: an overloaded request goes back to its client, who retries after Retry-After)")
    ap.add_argument("--out", type=Path, default=Path("sim-out"))
    args = ap.parse_args(argv)
    try:
        costs = parse_mix(args.mix) if args.mix else None
    except ValueError as e:
        ap.error(str(e))
    if args.nodes is None:
        args.nodes = len(costs) if costs else 4
    if costs and len(costs) != args.nodes:
        ap.error(f"--mix has {len(costs)} nodes, --nodes {args.nodes}")
    if not 1 <= args.nodes <= 64:
        ap.error("--nodes must be 1..64")
    if args.queue_wait_s < 0:
        ap.error("--queue-wait-s must not be negative")
    config = replace(SimConfig(), strict_drain=args.strict_drain, queue_wait_s=args.queue_wait_s)
    slo = SLO(args.ttft_slo, args.tpot_slo)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    policies = sweep_policies(args.nodes) if args.sweep else [args.policy]
    results, clusters = [], {}
    for sc in scenarios:
        for pol in policies:
            m, cl = run_one(args.nodes, sc, pol, args.seed, args.scale, config, slo, costs)
            results.append(m)
            clusters[(sc, pol)] = cl
            print(f"{sc:10s} {pol:14s} {m.throughput_rps:7.2f} req/s {m.throughput_tok_s:8.0f} tok/s "
                  f"TTFT p50 {m.ttft_p50:.2f}s SLO {m.slo_attainment:.0%} rejections {m.num_rejections} "
                  f"dropped {m.num_dropped}", file=sys.stderr)
    print(write(results, clusters, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

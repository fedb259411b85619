"""``flowkv status``: the cluster as the scheduler sees it (nodes and recent events).

Sends a ``ClusterQuery`` on ``subjects.sched_cluster()`` and prints the ``ClusterState``
reply as tables, or as JSON with ``--json``. ``--check`` and ``--check-node ID`` make it a
health probe (exit 0 when healthy, 1 otherwise), used by compose.yaml's health checks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import msgspec

from libs.protocol.messages import ClusterState, NodeState, SchedEvent
from services.common.nats import add_nats_arguments, nats_config_from
from services.common.messaging import ask_cluster
from services.common.nats import NatsConfig, connect

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_UNREACHABLE = 3

HEADERS = ("NODE", "ROLE", "STATE", "DEVICE", "RUNNING", "WAITING", "WAIT TOKENS", "FREE/TOTAL BLOCKS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the ClusterState as JSON")
    parser.add_argument("--events", type=int, default=10, help="how many recent events to show (default 10)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for NATS and the scheduler")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument("--check", action="store_true", help="health probe: exit 0 if the scheduler answers")
    probe.add_argument(
        "--check-node", metavar="ID", default=None, help="health probe: exit 0 if node ID is registered and ready"
    )
    add_nats_arguments(parser)


async def query(nats: NatsConfig, timeout: float) -> ClusterState:
    """Ask the scheduler for its view of the cluster.

    Args:
        nats: how to reach the broker.
        timeout: seconds for the connection and for the reply, each.

    Returns:
        The scheduler's :class:`ClusterState`.

    Raises:
        TimeoutError: the broker or the scheduler did not answer in time.
    """
    nc = await asyncio.wait_for(connect(nats, "flowkv-status"), timeout)
    try:
        return await ask_cluster(nc, timeout)
    finally:
        await nc.close()


def format_nodes(state: ClusterState) -> str:
    """The node table: one row per node, sorted by id."""
    rows = [HEADERS]
    for n in sorted(state.nodes, key=lambda n: n.node_id):
        rows.append(
            (
                n.node_id,
                n.role.value,
                n.state.value,
                n.device,
                str(n.num_running),
                str(n.num_waiting),
                str(n.waiting_prefill_tokens),
                f"{n.free_blocks}/{n.total_blocks}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def format_event(e: SchedEvent) -> str:
    """One event as a line: time, kind, then whatever fields it carries."""
    parts = [time.strftime("%H:%M:%S", time.localtime(e.ts)), e.kind.value]
    for name in ("node_id", "request_id", "prefill_node", "decode_node"):
        value = getattr(e, name)
        if value:
            parts.append(f"{name}={value}")
    if e.old_role is not None and e.new_role is not None:
        parts.append(f"role={e.old_role.value}->{e.new_role.value}")
    elif e.new_role is not None or e.old_role is not None:
        parts.append(f"role={(e.new_role or e.old_role).value}")
    if e.detail:
        parts.append(e.detail)
    return " ".join(parts)


def format_state(state: ClusterState, num_events: int) -> str:
    out = [f"policy: {state.policy}    nodes: {len(state.nodes)}    waiting for a node: {state.num_waiting}", "",
           format_nodes(state)]
    events = state.events[-num_events:] if num_events > 0 else []
    if events:
        out += ["", "recent events:"] + ["  " + format_event(e) for e in events]
    return "\n".join(out)


def health(state: ClusterState, node_id: str | None) -> tuple[int, str]:
    """Exit status and a line for the ``--check``/``--check-node`` probes."""
    if node_id is None:
        return EXIT_OK, f"scheduler up, {len(state.nodes)} node(s)"
    for n in state.nodes:
        if n.node_id == node_id:
            if n.state is NodeState.READY:
                return EXIT_OK, f"node {node_id} ready ({n.role.value})"
            return EXIT_UNHEALTHY, f"node {node_id} is {n.state.value}"
    return EXIT_UNHEALTHY, f"node {node_id} is not registered with the scheduler"


def run(args: argparse.Namespace) -> int:
    # The connection's own warnings (e.g. "disconnected" as we close it) are noise in a CLI.
    logging.getLogger("services.common.nats").setLevel(logging.ERROR)
    nats = nats_config_from(args)
    try:
        state = asyncio.run(query(nats, args.timeout))
    except (TimeoutError, asyncio.TimeoutError, OSError) as exc:
        print(f"no answer from the scheduler on {nats.redacted_url()}: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.check or args.check_node:
        code, line = health(state, args.check_node)
        print(line, file=sys.stdout if code == EXIT_OK else sys.stderr)
        return code
    if args.json:
        print(msgspec.json.encode(state).decode())
    else:
        print(format_state(state, args.events))
    return EXIT_OK

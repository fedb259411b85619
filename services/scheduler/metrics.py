"""Prometheus metrics of the scheduler (``flowkv_scheduler_*``), served on ``--metrics-port``."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

from libs.protocol.messages import EventKind, NodeState, Role, SchedEvent
from libs.scheduler.node_registry import NodeRegistry

PLACEMENTS = Counter(
    "flowkv_scheduler_placements_total",
    "PlaceRequests answered, by policy and outcome (disaggregated, colocated, rejected)",
    ["policy", "outcome"],
)
REJECTIONS = Counter("flowkv_scheduler_rejections_total", "PlaceRequests rejected, by reason (error code)", ["reason"])
ROLE_FLIPS = Counter(
    "flowkv_scheduler_role_flips_total",
    "Role flip events, by old and new role and stage (requested, done, failed)",
    ["old", "new", "stage"],
)
NODE_EVENTS = Counter("flowkv_scheduler_node_events_total", "Nodes joining and leaving, by kind (node_up, node_down)", ["kind"])
NODES = Gauge("flowkv_scheduler_nodes", "Live nodes in the registry, by role and state", ["role", "state"])
PLACE_SECONDS = Histogram(
    "flowkv_scheduler_place_seconds",
    "Time the policy took to answer one PlaceRequest",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)

LEADER = Gauge("flowkv_scheduler_leader", "1 while this replica leads the schedulers (places, holds the queue, flips roles), else 0")
ELECTIONS = Counter("flowkv_scheduler_elections_total", "Times this replica took the lead")

WAITING = Gauge("flowkv_scheduler_waiting_requests", "Requests held in the scheduler's queue for a node with room")
WAIT_SECONDS = Histogram(
    "flowkv_scheduler_wait_seconds",
    "Time a held request waited, by how it left the queue (placed, rejected, timeout, cancelled; handed_over or deposed: left to the next leader)",
    ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def observe_events(events: list[SchedEvent]) -> None:
    """Count role flips and node arrivals/departures among published events."""
    for ev in events:
        if ev.kind is EventKind.ROLE_FLIP:
            stage = ev.detail.split(":", 1)[0] or "unknown"
            ROLE_FLIPS.labels(ev.old_role.value if ev.old_role else "", ev.new_role.value if ev.new_role else "",
                              stage).inc()
        elif ev.kind in (EventKind.NODE_UP, EventKind.NODE_DOWN):
            NODE_EVENTS.labels(ev.kind.value).inc()


def refresh_nodes(registry: NodeRegistry) -> None:
    """Set ``flowkv_scheduler_nodes`` from the registry (every role x state, zeros included)."""
    counts = Tally((n.report.role, n.report.state) for n in registry.nodes())
    for role in Role:
        for state in NodeState:
            NODES.labels(role.value, state.value).set(counts.get((role, state), 0))

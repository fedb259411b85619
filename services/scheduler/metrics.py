"""Prometheus metrics of the scheduler (``flowkv_scheduler_*``), served on ``--metrics-port``."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

from libs.protocol.messages import EventKind, NodeState, Role, SchedEvent
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.role_controller import RoleController

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

PLAN_GOODPUT = Gauge(
    "flowkv_scheduler_plan_goodput",
    "The goodput planner's latest forecast: the share of the window's requests predicted within their objectives, "
    "for the cluster's shape (current) and the best shape (best); absent until the leader has planned",
    ["shape"],
)
PLAN_LOAD = Gauge("flowkv_scheduler_plan_load",
                  "The busiest node's predicted utilisation in the current and the best shape (past 1: it cannot keep up)",
                  ["shape"])
PLAN_TPOT = Gauge("flowkv_scheduler_plan_tpot_seconds",
                  "Predicted mean time per output token on the decode and hybrid nodes of the current and the best shape "
                  "(+Inf: saturated; absent: no node of that role)", ["shape", "role"])
PLAN_NODES = Gauge("flowkv_scheduler_plan_nodes", "Nodes in each role in the current and the best shape", ["shape", "role"])
_PLAN_GAUGES = (PLAN_GOODPUT, PLAN_LOAD, PLAN_TPOT, PLAN_NODES)


def refresh_plan(roles: RoleController | None) -> None:
    """Set the ``flowkv_scheduler_plan_*`` gauges from the goodput planner's latest forecasts
    (cleared where there is none: a follower, another planner, too few placements yet)."""
    for gauge in _PLAN_GAUGES:
        gauge.clear()
    if roles is None or roles.last_plan is None or roles.last_current is None:
        return
    for name, f in (("current", roles.last_current), ("best", roles.last_plan)):
        PLAN_GOODPUT.labels(name).set(f.goodput)
        PLAN_LOAD.labels(name).set(f.load)
        for role, tpot in ((Role.DECODE, f.tpot_decode_s), (Role.HYBRID, f.tpot_hybrid_s)):
            if f.shape.count(role):
                PLAN_TPOT.labels(name, role.value).set(tpot)
        for role in (Role.PREFILL, Role.HYBRID, Role.DECODE):
            PLAN_NODES.labels(name, role.value).set(f.shape.count(role))


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

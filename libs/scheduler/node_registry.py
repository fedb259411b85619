"""The scheduler's view of the cluster: one entry per live node, built from its LoadReports.

A node's life in the registry:
  1. its first LoadReport (or one from a restarted process) adds it: NODE_UP event;
  2. every newer report replaces its load (and its measured KV links to decode peers);
     stale or out-of-order reports are ignored;
  3. placements made since its last report are kept as in-flight work, so a burst of
     requests between two reports is spread instead of piling on one node;
  4. a NodeBye, or ``node_timeout_s`` without a report, removes it: NODE_DOWN event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from libs.protocol.messages import (
    EventKind,
    KVLink,
    LoadReport,
    NodeState,
    Role,
    SchedEvent,
)
from libs.scheduler.clock import Clock

# Engines that do not report their decode batch cap are assumed to have this one.
DEFAULT_MAX_NUM_SEQS = 64


@dataclass
class Inflight:
    """Work placed on a node that its reports may not show yet."""

    request_id: str
    expires_at: float  # a report received after this time is assumed to include it
    prefill_tokens: int = 0  # prompt tokens still to compute (P side)
    decode_seqs: int = 0  # sequences about to join the decode batch (D side)
    blocks: int = 0  # KV blocks the request will take on the D side


@dataclass
class NodeEntry:
    """One live node: its latest report plus what the scheduler knows beyond it."""

    report: LoadReport
    last_seen: float
    role_since: float  # when the node was first seen in its current role (dwell time)
    inflight: list[Inflight] = field(default_factory=list)
    cached_hashes: frozenset[int] = frozenset()
    # Mean measured prefill tokens/s of the live nodes of this device kind: the rate of a
    # node that has not prefilled yet (one launched as decode and flipped to prefill).
    kind_prefill_rate: float = 0.0
    kv_links: dict[str, KVLink] = field(default_factory=dict)  # the report's links by decode peer id

    @property
    def node_id(self) -> str:
        return self.report.node_id

    @property
    def role(self) -> Role:
        return self.report.role

    @property
    def ready(self) -> bool:
        return self.report.state == NodeState.READY

    @property
    def can_prefill(self) -> bool:
        return self.report.role in (Role.PREFILL, Role.HYBRID)

    @property
    def can_decode(self) -> bool:
        return self.report.role in (Role.DECODE, Role.HYBRID)

    @property
    def max_num_seqs(self) -> int:
        return self.report.max_num_seqs or DEFAULT_MAX_NUM_SEQS

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens waiting on this node, its report plus placements since."""
        return self.report.waiting_prefill_tokens + sum(i.prefill_tokens for i in self.inflight)

    def num_decode_seqs(self) -> int:
        """Decoding sequences, its report plus hand-offs placed on it since."""
        return self.report.num_running + sum(i.decode_seqs for i in self.inflight)

    def free_blocks(self) -> int:
        """Free KV blocks minus those promised to in-flight placements."""
        return self.report.free_blocks - sum(i.blocks for i in self.inflight)


_MAX_GONE = 4096  # removed nodes whose last report is remembered


class NodeRegistry:
    """Live nodes by id, with liveness from an injected clock.

    Args:
        clock: the time source (``SystemClock`` in the service, sim time in the simulator).
        node_timeout_s: a node with no report for this long is dead.
    """

    def __init__(self, clock: Clock, node_timeout_s: float = 3.0) -> None:
        if node_timeout_s <= 0:
            raise ValueError("node_timeout_s must be positive")
        self.clock = clock
        self.node_timeout_s = node_timeout_s
        self._nodes: dict[str, NodeEntry] = {}
        # (started_at, seq) of the last report of each node removed: a copy of a report
        # already applied (NATS redelivery, a late duplicate) must not bring it back.
        self._gone: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._nodes

    def get(self, node_id: str) -> NodeEntry | None:
        return self._nodes.get(node_id)

    def nodes(self) -> list[NodeEntry]:
        """Live nodes sorted by id (policies rely on the stable order)."""
        return [self._nodes[k] for k in sorted(self._nodes)]

    def update(self, report: LoadReport) -> list[SchedEvent]:
        """Apply one LoadReport.

        Returns:
            ``[NODE_UP]`` for a new node or a restarted process, else ``[]``.
        """
        now = self.clock.now()
        entry = self._nodes.get(report.node_id)
        events: list[SchedEvent] = []
        gone = self._gone.get(report.node_id)
        if entry is None and gone is not None and report.started_at == gone[0] and report.seq <= gone[1]:
            return []  # an old report of a process already removed
        if entry is not None and report.started_at == entry.report.started_at:
            if report.seq <= entry.report.seq:
                return []  # stale or duplicate: NATS gives no ordering across reconnects
            if report.role != entry.report.role:
                entry.role_since = now
            entry.report = report
            entry.last_seen = now
            entry.inflight = [i for i in entry.inflight if i.expires_at > now]
        else:
            # A new process (different started_at) forgets the old one's in-flight work.
            entry = NodeEntry(report=report, last_seen=now, role_since=now)
            self._nodes[report.node_id] = entry
            self._gone.pop(report.node_id, None)
            events.append(
                SchedEvent(kind=EventKind.NODE_UP, ts=now, node_id=report.node_id, new_role=report.role,
                           detail=f"{report.device_name} {report.model}")
            )
        if report.cached_prefix_hashes or entry.cached_hashes:
            entry.cached_hashes = frozenset(report.cached_prefix_hashes)
        entry.kv_links = {link.peer: link for link in report.kv_links}
        self._refresh_kind_rate(report.device_name)
        return events

    def _refresh_kind_rate(self, device_name: str) -> None:
        kin = [e for e in self._nodes.values() if e.report.device_name == device_name]
        mean = kind_means(kin, lambda e: e.report.prefill_tokens_per_s).get(device_name, 0.0)
        for e in kin:
            e.kind_prefill_rate = mean

    def remove(self, node_id: str, reason: str) -> list[SchedEvent]:
        """Forget a node (NodeBye, or dead). Returns ``[NODE_DOWN]`` if it was known."""
        entry = self._nodes.pop(node_id, None)
        if entry is None:
            return []
        self._gone[node_id] = (entry.report.started_at, entry.report.seq)
        if len(self._gone) > _MAX_GONE:
            del self._gone[next(iter(self._gone))]  # the longest gone
        return [SchedEvent(kind=EventKind.NODE_DOWN, ts=self.clock.now(), node_id=node_id, detail=reason,
                           old_role=entry.role)]

    def expire(self) -> list[SchedEvent]:
        """Remove every node silent for longer than ``node_timeout_s``; their NODE_DOWN events."""
        now = self.clock.now()
        dead = [k for k, e in self._nodes.items() if now - e.last_seen > self.node_timeout_s]
        events: list[SchedEvent] = []
        for node_id in sorted(dead):
            events += self.remove(node_id, f"no load report for {self.node_timeout_s:g}s")
        return events

    def add_inflight(self, node_id: str, item: Inflight) -> None:
        """Record work just placed on ``node_id`` (no-op for an unknown node)."""
        entry = self._nodes.get(node_id)
        if entry is not None:
            entry.inflight.append(item)


def kind_means(nodes: Iterable[NodeEntry], rate: Callable[[NodeEntry], float]) -> dict[str, float]:
    """Device kind -> mean ``rate`` of its nodes that measured one (> 0); kinds with none are absent.

    Nodes of one device kind are equally capable, while one node's measured rate moves
    with the batches it happened to run: placement and the role controller both rate a
    node at its kind's mean.
    """
    by_kind: dict[str, list[float]] = {}
    for n in nodes:
        r = rate(n)
        if r > 0:
            by_kind.setdefault(n.report.device_name, []).append(r)
    return {kind: sum(rs) / len(rs) for kind, rs in by_kind.items()}

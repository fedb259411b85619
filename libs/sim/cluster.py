"""The simulated cluster: an event queue on sim time driving the real scheduler core.

Each request arrives, is placed by the policy (``libs.scheduler.placement_policies``,
the same objects the service uses); one that no node can take now waits in the
scheduler's wait queue (``libs.scheduler.wait_queue``, as the service runs it) for up to
``queue_wait_s``, and a Rejected one retries after its Retry-After like a client of the
gateway would. Nodes report load every ``report_interval_s`` into the real
NodeRegistry; the real RoleController runs every ``role_interval_s`` and its SetRoles
reach the simulated nodes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from libs.protocol.messages import ErrorCode, PlaceRequest, Placement, Rejected, Role
from libs.scheduler.clock import ManualClock
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import PlacementConfig, make_policy
from libs.scheduler.role_controller import RoleConfig
from libs.scheduler.wait_queue import WaitQueue
from libs.sim.calibration import H100_8B, NodeCosts
from libs.sim.node import Job, SimNode
from libs.sim.workload import SimRequest


@dataclass(frozen=True)
class SimConfig:
    """Knobs of one simulation run (the scheduler's own knobs are its real configs)."""

    report_interval_s: float = 0.2
    role_interval_s: float = 0.5
    max_retries: int = 3
    strict_drain: bool = False
    # The wait a request asks of the scheduler's queue (the gateway's queue_timeout_s);
    # 0: none, every OVERLOADED goes back to the client, who retries after Retry-After.
    queue_wait_s: float = 0.0
    queue_limit: int = 1024
    # The roles nodes start in before the policy acts: "split" (the first half prefill,
    # the rest decode, as `flowkv up --prefill-nodes/--decode-nodes` launches them) or
    # "hybrid" (every node both, as `flowkv up --colocated N`). Fixed splits and the
    # colocated policy pin their own roles either way.
    launch: str = "split"
    placement: PlacementConfig = field(default_factory=lambda: PlacementConfig(max_ttft_s=10.0))
    roles: RoleConfig = field(default_factory=RoleConfig)


class Cluster:
    """Nodes, scheduler and the event queue of one run.

    Args:
        num_nodes: cluster size.
        policy: a policy name for ``make_policy``.
        requests: the workload (sorted by arrival).
        horizon_s: simulated time at which the run stops.
        config: simulation knobs.
        costs: one NodeCosts per node, n00 first (default: all H100 8B).

    Raises:
        ValueError: ``costs`` does not have one entry per node.
    """

    def __init__(self, num_nodes: int, policy: str, requests: list[SimRequest], horizon_s: float,
                 config: SimConfig | None = None, costs: list[NodeCosts] | None = None) -> None:
        if costs is not None and len(costs) != num_nodes:
            raise ValueError(f"{len(costs)} node costs for {num_nodes} nodes")
        self.config = config or SimConfig()
        self.clock = ManualClock(0.0)
        self.registry = NodeRegistry(self.clock, node_timeout_s=3.0)
        self.policy = make_policy(policy, self.registry, self.config.placement, self.config.roles)
        self.horizon_s = horizon_s
        self.requests = requests
        self.jobs: list[Job] = [Job(r) for r in requests]
        self.finished: list[Job] = []
        self.num_rejections = 0
        self.queue = WaitQueue(self.config.queue_limit, self.config.queue_wait_s)
        self.flips: list[tuple[float, str, Role, Role]] = []
        self.flip_reasons: list[str] = []  # the controller's reason for each flip in ``flips``
        self.role_timeline: list[tuple[float, int, int, int]] = []  # (t, #prefill, #decode, #hybrid)
        self.role_seconds: dict[str, dict[Role, float]] = {}  # node id -> role -> seconds, at role ticks
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._tie = itertools.count()
        costs = costs or [H100_8B] * num_nodes
        ids = [f"n{i:02d}" for i in range(num_nodes)]
        self.nodes: dict[str, SimNode] = {}
        if self.config.launch not in ("split", "hybrid"):
            raise ValueError(f"launch must be split or hybrid, got {self.config.launch!r}")
        for i, nid in enumerate(ids):
            if self.config.launch == "hybrid":
                role = Role.HYBRID
            else:
                role = Role.PREFILL if i < max(num_nodes // 2, 1) else Role.DECODE
            self.nodes[nid] = SimNode(nid, role, costs[i], self.schedule, self._first_token, self._finished,
                                      strict_drain=self.config.strict_drain, ttft_slo_s=self.config.roles.ttft_slo_s,
                                      tpot_slo_s=self.config.roles.tpot_slo_s)
        self._pin_fixed_roles()

    def _pin_fixed_roles(self) -> None:
        # A fixed split starts in its split (as an operator would deploy it).
        for node in self.nodes.values():
            self.registry.update(node.report())
        target = self.policy.target_roles(self.registry.nodes())
        if target:
            for nid, role in target.items():
                self.nodes[nid].role = role
            for node in self.nodes.values():
                self.registry.update(node.report())

    def schedule(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (t, next(self._tie), fn, args))

    def run(self) -> Cluster:
        """Run until the horizon; returns self (metrics read the jobs)."""
        for job in self.jobs:
            self.schedule(job.req.arrival, self._arrive, job)
        n = len(self.nodes)
        for i, node in enumerate(self.nodes.values()):
            self.schedule(self.config.report_interval_s * (i + 1) / n, self._report, node)
        self.schedule(self.config.role_interval_s, self._role_tick)
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            if t > self.horizon_s:
                break
            self.clock.set(t)
            fn(t, *args)
        return self

    def _arrive(self, now: float, job: Job) -> None:
        # As the scheduler service does (services/scheduler/service.py: _place).
        job.attempts += 1
        req = PlaceRequest(request_id=job.req.request_id, model="sim-8b", num_prompt_tokens=job.req.num_prompt_tokens,
                           max_tokens=job.req.max_tokens, queue_timeout_s=self.config.queue_wait_s)
        waits = self.queue.wants(req)
        if waits and len(self.queue):
            self.policy.offer(req)  # behind the ones waiting, untried
            out: Placement | Rejected = Rejected(request_id=req.request_id, code=ErrorCode.OVERLOADED,
                                                 retry_after_s=1.0, reason="behind others")
        else:
            out = self.policy.place(req)
        if waits and isinstance(out, Rejected) and out.code is ErrorCode.OVERLOADED:
            if self.queue.add(req, job, out, now):
                return
        self._answer(now, job, out)

    def _drain(self, now: float) -> None:
        for w, out in self.queue.drain(self.policy.place, now):
            w.handle.queued_s = now - w.since
            self._answer(now, w.handle, out)

    def _answer(self, now: float, job: Job, out: Placement | Rejected) -> None:
        if isinstance(out, Placement):
            job.prefill_node, job.decode_node = out.prefill_node, out.decode_node
            self.nodes[out.prefill_node].submit(job, now)
            return
        self.num_rejections += 1
        if job.attempts > self.config.max_retries:
            job.dropped = True
            return
        self.schedule(now + max(out.retry_after_s, 0.5), self._arrive, job)

    def _first_token(self, job: Job, src: SimNode, now: float) -> None:
        job.first_token_s = now
        if job.req.max_tokens <= 1:
            self._finished(job, now)
            return
        dst = self.nodes[job.decode_node]
        if dst is src:
            if dst.has_room(job):
                dst.reserve(job)
                dst.join(job, now)
                return
        elif dst.has_room(job) and not dst.waiters:
            dst.reserve(job)
            self.schedule(now + src.transfer_s(dst, job), dst._transfer_done, job, src)
            return
        src.num_held += 1
        dst.waiters.append((src, job))

    def _finished(self, job: Job, now: float) -> None:
        job.finish_s = now
        self.finished.append(job)

    def _report(self, now: float, node: SimNode) -> None:
        self.registry.update(node.report())
        self._drain(now)
        self.schedule(now + self.config.report_interval_s, self._report, node)

    def _role_tick(self, now: float) -> None:
        self.registry.expire()
        roles = self.policy.roles
        if roles is not None:
            changes, _ = roles.step()
            for change in changes:
                self.flips.append((now, change.node_id, change.old_role, change.new_role))
                self.flip_reasons.append(change.reason)
                self.nodes[change.node_id].set_role(change.new_role)
        for node in self.nodes.values():
            seconds = self.role_seconds.setdefault(node.node_id, {})
            seconds[node.role] = seconds.get(node.role, 0.0) + self.config.role_interval_s
        counts = [sum(1 for n in self.nodes.values() if n.role == r) for r in (Role.PREFILL, Role.DECODE, Role.HYBRID)]
        if not self.role_timeline or self.role_timeline[-1][1:] != tuple(counts):
            self.role_timeline.append((now, *counts))
        self._drain(now)  # deadlines, and room a role flip made
        self.schedule(now + self.config.role_interval_s, self._role_tick)

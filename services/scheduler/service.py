"""The scheduler service: the pure core (registry, policy, role controller) on NATS.

  1. node_load / node_bye update the registry (NODE_UP / NODE_DOWN events);
  2. sched_place answers each PlaceRequest with a Placement or Rejected;
  3. sched_cluster answers a ClusterQuery with the live nodes and recent events;
  4. a housekeeping task expires silent nodes and runs the role controller, sending
     SetRole to ``node(id, ROLE)``;
  5. every event goes out on sched_events.
Garbage on any subject is dropped and counted (``services.common.messaging``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.trace import Span, SpanKind

from libs.protocol import subjects
from libs.protocol.messages import (
    Ack,
    ClusterQuery,
    ClusterState,
    ErrorCode,
    EventKind,
    LoadReport,
    NodeBye,
    PlaceRequest,
    Placement,
    Rejected,
    SchedEvent,
    SetRole,
    encode,
)
from services.common.lifecycle import TaskGroup
from services.common.logs import request_id_var
from services.common.messaging import DROPPED, request, respond, subscribe
from services.common.tracing import extract_context, tracer
from services.scheduler import metrics
from services.scheduler.clock import Clock, SystemClock
from services.scheduler.config import SchedulerConfig
from services.scheduler.policies import make_policy
from services.scheduler.registry import NodeRegistry
from services.scheduler.roles import RoleChange
from services.scheduler.validation import place_problem, report_problem

log = logging.getLogger(__name__)
_TRACER = tracer("flowkv.scheduler")


class SchedulerService:
    """One scheduler on one NATS connection.

    Args:
        config: the scheduler settings.
        nc: a connected NATS client (the caller owns and closes it).
        clock: time source (tests may inject one).
    """

    def __init__(self, config: SchedulerConfig, nc: Client, clock: Clock | None = None) -> None:
        self.config = config
        self.nc = nc
        self.clock = clock or SystemClock()
        self.registry = NodeRegistry(self.clock, config.node_timeout_s)
        self.policy = make_policy(config.policy, self.registry, config.placement_config(), config.role_config())
        self.events: deque[SchedEvent] = deque(maxlen=config.max_events)
        self.tasks = TaskGroup("scheduler")
        self._subs: list = []
        self.num_placed = 0
        self.num_rejected = 0

    async def start(self) -> None:
        """Subscribe to the subjects and start housekeeping."""
        self._subs = [
            await subscribe(self.nc, subjects.node_load(), self._on_load, (LoadReport,)),
            await subscribe(self.nc, subjects.node_bye(), self._on_bye, (NodeBye,)),
            await subscribe(self.nc, subjects.sched_place(), self._on_place, (PlaceRequest,)),
            await subscribe(self.nc, subjects.sched_cluster(), self._on_cluster, (ClusterQuery,)),
        ]
        await self.nc.flush()
        self.tasks.spawn(self._housekeeping(), "housekeeping")
        log.info("scheduler up: policy %s, node timeout %gs", self.policy.name, self.config.node_timeout_s)

    async def close(self) -> None:
        """Stop housekeeping and unsubscribe (the caller drains the connection)."""
        await self.tasks.cancel_all()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closing: nothing left to undo
                pass
        self._subs = []

    def refresh_metrics(self) -> None:
        """Refresh the gauges read from live state (called before each ``/metrics`` scrape)."""
        metrics.refresh_nodes(self.registry)

    async def _publish(self, events: list[SchedEvent]) -> None:
        metrics.observe_events(events)
        for ev in events:
            if ev.kind != EventKind.PLACEMENT:  # placements are too many to keep; they are published
                self.events.append(ev)
            log.log(logging.DEBUG if ev.kind == EventKind.PLACEMENT else logging.INFO, "event %s %s %s",
                    ev.kind.value, ev.node_id or ev.request_id, ev.detail)
            await self.nc.publish(subjects.sched_events(), encode(ev))

    async def _on_load(self, report: LoadReport, msg: Msg) -> None:
        problem = report_problem(report)
        if problem:  # never registered: it would be placed on, or poison the cost model
            DROPPED.labels(msg.subject, "invalid").inc()
            log.debug("dropped a load report: %s", problem)
            return
        await self._publish(self.registry.update(report))

    async def _on_bye(self, bye: NodeBye, msg: Msg) -> None:
        await self._publish(self.registry.remove(bye.node_id, bye.reason or "bye"))

    async def _on_place(self, req: PlaceRequest, msg: Msg) -> None:
        token = request_id_var.set(req.request_id)
        try:
            with _TRACER.start_as_current_span("scheduler.place", context=extract_context(msg.headers),
                                               kind=SpanKind.SERVER) as span:
                span.set_attributes({"flowkv.request_id": req.request_id, "flowkv.policy": self.policy.name,
                                     "flowkv.tokens.prompt": req.num_prompt_tokens})
                await self._place(req, msg, span)
        finally:
            request_id_var.reset(token)

    async def _place(self, req: PlaceRequest, msg: Msg, span: Span) -> None:
        started = time.perf_counter()
        problem = place_problem(req)
        out = (Rejected(request_id=req.request_id, code=ErrorCode.INVALID, reason=problem) if problem
               else self.policy.place(req))
        metrics.PLACE_SECONDS.observe(time.perf_counter() - started)
        await respond(msg, out)
        now = self.clock.now()
        if isinstance(out, Placement):
            outcome = "colocated" if out.prefill_node == out.decode_node else "disaggregated"
            metrics.PLACEMENTS.labels(self.policy.name, outcome).inc()
            span.set_attributes({"flowkv.outcome": outcome, "flowkv.prefill_node": out.prefill_node,
                                 "flowkv.decode_node": out.decode_node})
            self.num_placed += 1
            ev = SchedEvent(kind=EventKind.PLACEMENT, ts=now, request_id=req.request_id,
                            prefill_node=out.prefill_node, decode_node=out.decode_node,
                            detail=f"predicted ttft {out.predicted_ttft_s:.3f}s")
        else:
            metrics.PLACEMENTS.labels(self.policy.name, "rejected").inc()
            metrics.REJECTIONS.labels(out.code.value).inc()
            span.set_attributes({"flowkv.outcome": "rejected", "flowkv.reject_reason": out.code.value})
            self.num_rejected += 1
            ev = SchedEvent(kind=EventKind.REJECTED, ts=now, request_id=req.request_id,
                            detail=f"{out.code.value}: {out.reason}")
        await self._publish([ev])

    async def _on_cluster(self, query: ClusterQuery, msg: Msg) -> None:
        state = ClusterState(policy=self.policy.name, nodes=[n.report for n in self.registry.nodes()],
                             events=list(self.events))
        await respond(msg, state)

    async def _housekeeping(self) -> None:
        period = min(self.config.role_interval_s, self.config.node_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            await self.tick()

    async def tick(self) -> None:
        """One round: expire silent nodes, advance the role controller."""
        await self._publish(self.registry.expire())
        if self.policy.roles is None:
            return
        change, events = self.policy.roles.step()
        await self._publish(events)
        if change is not None:
            self.tasks.spawn(self._send_role(change), f"set-role-{change.node_id}")

    async def _send_role(self, change: RoleChange) -> None:
        msg = SetRole(node_id=change.node_id, role=change.new_role, reason=change.reason)
        error = ""
        try:
            reply = await request(self.nc, subjects.node(change.node_id, subjects.NodeVerb.ROLE), msg,
                                  timeout=self.config.set_role_timeout_s)
            if isinstance(reply, Ack) and not reply.ok:
                error = reply.error or "refused"
        except Exception as exc:  # timeout, no responders, garbage reply: the flip did not start
            error = f"{type(exc).__name__}: {exc}"
        if error and self.policy.roles is not None:
            log.warning("SetRole %s -> %s failed: %s", change.node_id, change.new_role.value, error)
            await self._publish(self.policy.roles.failed(change.node_id, error))

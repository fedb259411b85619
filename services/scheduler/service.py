"""The scheduler service: the pure core (registry, policy, role controller) on NATS.

  1. node_load / node_bye update the registry (NODE_UP / NODE_DOWN events);
  2. sched_place answers each PlaceRequest with a Placement or Rejected; one that no node
     can take now and that asks to wait is held in the wait queue
     (``libs.scheduler.wait_queue``) and answered when a load report, an expired
     reservation or a role flip makes room, or when its wait runs out; a Cancel on
     request_cancel drops a held request;
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

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.trace import Span, SpanKind, use_span

from libs.protocol import subjects
from libs.protocol.messages import (
    Ack,
    Cancel,
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
from libs.scheduler.clock import Clock, SystemClock
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import make_policy
from libs.scheduler.role_controller import RoleChange
from libs.scheduler.wait_queue import WaitQueue
from services.common.lifecycle import TaskGroup
from services.common.logs import request_id_var
from services.common.messaging import DROPPED, request, respond, subscribe
from services.common.tracing import extract_context, tracer
from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
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
        self.queue = WaitQueue(config.queue_limit, config.max_queue_wait_s)
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
            await subscribe(self.nc, subjects.request_cancel(), self._on_cancel, (Cancel,)),
        ]
        await self.nc.flush()
        self.tasks.spawn(self._housekeeping(), "housekeeping")
        log.info("scheduler up: policy %s, node timeout %gs", self.policy.name, self.config.node_timeout_s)

    async def close(self) -> None:
        """Stop housekeeping and unsubscribe, then answer every held request OVERLOADED
        (its requester retries, instead of waiting out its timeout for a scheduler that is
        gone); the caller drains the connection."""
        await self.tasks.cancel_all()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closing: nothing left to undo
                pass
        self._subs = []
        now = self.clock.now()
        for w in self.queue.take_all():
            msg, span = w.handle
            metrics.WAIT_SECONDS.labels("rejected").observe(now - w.since)
            out = Rejected(request_id=w.req.request_id, code=ErrorCode.OVERLOADED, retry_after_s=1.0,
                           reason=f"the scheduler is stopping (waited {now - w.since:.1f}s for capacity)")
            try:
                await self._answer(w.req, msg, span, out)
            except Exception:  # connection already closed: the requester's timeout answers
                log.debug("could not answer waiting request %s on close", w.req.request_id)
        metrics.WAITING.set(0)

    def refresh_metrics(self) -> None:
        """Refresh the gauges read from live state (called before each ``/metrics`` scrape)."""
        metrics.refresh_nodes(self.registry)
        metrics.WAITING.set(len(self.queue))

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
        await self._drain()

    async def _on_bye(self, bye: NodeBye, msg: Msg) -> None:
        await self._publish(self.registry.remove(bye.node_id, bye.reason or "bye"))
        await self._drain()

    async def _on_place(self, req: PlaceRequest, msg: Msg) -> None:
        # The span stays open while the request waits: it ends when the answer goes out.
        span = _TRACER.start_span("scheduler.place", context=extract_context(msg.headers), kind=SpanKind.SERVER)
        span.set_attributes({"flowkv.request_id": req.request_id, "flowkv.policy": self.policy.name,
                             "flowkv.tokens.prompt": req.num_prompt_tokens})
        token = request_id_var.set(req.request_id)
        try:
            with use_span(span, end_on_exit=False):
                await self._place(req, msg, span)
        except BaseException:
            if span.is_recording():  # not answered: the span ends here
                span.end()
            raise
        finally:
            request_id_var.reset(token)

    async def _place(self, req: PlaceRequest, msg: Msg, span: Span) -> None:
        started = time.perf_counter()
        problem = place_problem(req)
        waits = not problem and self.queue.wants(req)
        if problem:
            out: Placement | Rejected = Rejected(request_id=req.request_id, code=ErrorCode.INVALID, reason=problem)
        elif waits and len(self.queue):
            # Others wait already: behind them, untried (first come, first served).
            self.policy.offer(req)
            out = Rejected(request_id=req.request_id, code=ErrorCode.OVERLOADED, retry_after_s=1.0,
                           reason=f"behind {len(self.queue)} waiting request(s)")
        else:
            out = self.policy.place(req)
        metrics.PLACE_SECONDS.observe(time.perf_counter() - started)
        if waits and isinstance(out, Rejected) and out.code is ErrorCode.OVERLOADED:
            if self.queue.add(req, (msg, span), out, self.clock.now()):
                span.set_attribute("flowkv.queued", True)
                metrics.WAITING.set(len(self.queue))
                return
            out = msgspec.structs.replace(out, reason=f"{out.reason}; the scheduler's queue is full "
                                                      f"({self.queue.limit} waiting)")
        await self._answer(req, msg, span, out)

    async def _drain(self) -> None:
        """Answer the waiting requests that can be answered now (see ``WaitQueue.drain``)."""
        if not len(self.queue):
            return
        now = self.clock.now()
        for w, out in self.queue.drain(self.policy.place, now):
            msg, span = w.handle
            timed_out = isinstance(out, Rejected) and out.code is ErrorCode.OVERLOADED
            outcome = "placed" if isinstance(out, Placement) else "timeout" if timed_out else "rejected"
            metrics.WAIT_SECONDS.labels(outcome).observe(now - w.since)
            if isinstance(out, Placement):
                out = msgspec.structs.replace(out, queued_s=now - w.since)
            span.set_attribute("flowkv.queued_s", now - w.since)
            await self._answer(w.req, msg, span, out)
        metrics.WAITING.set(len(self.queue))

    async def _answer(self, req: PlaceRequest, msg: Msg, span: Span, out: Placement | Rejected) -> None:
        """Send the answer, count it, publish its event and end the request's span."""
        try:
            await respond(msg, out)
            now = self.clock.now()
            if isinstance(out, Placement):
                outcome = "colocated" if out.prefill_node == out.decode_node else "disaggregated"
                metrics.PLACEMENTS.labels(self.policy.name, outcome).inc()
                span.set_attributes({"flowkv.outcome": outcome, "flowkv.prefill_node": out.prefill_node,
                                     "flowkv.decode_node": out.decode_node})
                self.num_placed += 1
                waited = f", queued {out.queued_s:.3f}s" if out.queued_s else ""
                ev = SchedEvent(kind=EventKind.PLACEMENT, ts=now, request_id=req.request_id,
                                prefill_node=out.prefill_node, decode_node=out.decode_node,
                                detail=f"predicted ttft {out.predicted_ttft_s:.3f}s{waited}")
            else:
                metrics.PLACEMENTS.labels(self.policy.name, "rejected").inc()
                metrics.REJECTIONS.labels(out.code.value).inc()
                span.set_attributes({"flowkv.outcome": "rejected", "flowkv.reject_reason": out.code.value})
                self.num_rejected += 1
                ev = SchedEvent(kind=EventKind.REJECTED, ts=now, request_id=req.request_id,
                                detail=f"{out.code.value}: {out.reason}")
            await self._publish([ev])
        finally:
            span.end()

    async def _on_cancel(self, cancel: Cancel, msg: Msg) -> None:
        w = self.queue.cancel(cancel.request_id)
        if w is None:
            return
        _, span = w.handle
        waited = self.clock.now() - w.since
        metrics.WAIT_SECONDS.labels("cancelled").observe(waited)
        metrics.WAITING.set(len(self.queue))
        span.set_attributes({"flowkv.outcome": "cancelled", "flowkv.queued_s": waited})
        span.end()
        log.info("dropped waiting request %s after %.2fs: %s", cancel.request_id, waited, cancel.reason or "cancelled")

    async def _on_cluster(self, query: ClusterQuery, msg: Msg) -> None:
        if query.brief:
            state = ClusterState(policy=self.policy.name, nodes=[], events=[], num_waiting=len(self.queue))
        else:
            state = ClusterState(policy=self.policy.name, nodes=[n.report for n in self.registry.nodes()],
                                 events=list(self.events), num_waiting=len(self.queue))
        await respond(msg, state)

    async def _housekeeping(self) -> None:
        period = min(self.config.role_interval_s, self.config.node_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            await self.tick()

    async def tick(self) -> None:
        """One round: expire silent nodes, advance the role controller, answer what waits."""
        await self._publish(self.registry.expire())
        if self.policy.roles is not None:
            change, events = self.policy.roles.step()
            await self._publish(events)
            if change is not None:
                self.tasks.spawn(self._send_role(change), f"set-role-{change.node_id}")
        await self._drain()  # deadlines, and reservations that expired since the last report

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

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

Replicas (``services.scheduler.leadership``): every replica follows node_load and
node_bye, so its registry is warm; only the leader, elected through a JetStream KV lease,
subscribes to sched_place, sched_cluster and request_cancel, publishes events, holds the
wait queue and runs the role controller. A leader whose lease is not certain for a moment
(a renew came late) keeps its subscriptions: placements wait until the renew repeated at
once settles it (see ``Leadership.run``). Placement stays with the leader: two replicas
placing at once would each promise the same free KV blocks (the in-flight reservations
of one are invisible to the other). A replica that takes over adopts the role flip in
flight from the leader state, announces itself with a ``leader`` event, and the
gateways re-send the placements that waited on the old leader. A deposed leader stops
placing at once and drops its queue (the gateways re-send it to the new leader).
"""

from __future__ import annotations

import asyncio
import contextlib
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
    LeaderState,
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
    RoleFlip,
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
from services.scheduler.leadership import Leadership, NotLeader
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
        # NODE_DOWN events this replica saw while not leading, by node: published when it
        # leads again (elected, or its late renew taken) if the node has not come back.
        self._unpublished_downs: dict[str, SchedEvent] = {}
        self.queue = WaitQueue(config.queue_limit, config.max_queue_wait_s)
        self.tasks = TaskGroup("scheduler")
        self._subs: list = []
        self._leader_subs: list = []
        self.leadership = Leadership(nc, config.scheduler_id, config.leader_lease_s, config.lease_replicas,
                                     self._on_elected, self._on_deposed)
        self.num_placed = 0
        self.num_rejected = 0

    @property
    def is_leader(self) -> bool:
        return self.leadership.leads()

    async def start(self) -> None:
        """Follow the load reports, run one round of the election (a lone replica leads
        when this returns), then keep campaigning or renewing and start housekeeping."""
        self._subs = [
            await subscribe(self.nc, subjects.node_load(), self._on_load, (LoadReport,)),
            await subscribe(self.nc, subjects.node_bye(), self._on_bye, (NodeBye,)),
        ]
        await self.nc.flush()
        if await self.leadership.start():
            with contextlib.suppress(Exception):  # a broker still electing: the task tries again
                await self.leadership.campaign()
            self.tasks.spawn(self.leadership.run(), "leadership")
        else:
            await self.leadership.lead_alone()
        self.tasks.spawn(self._housekeeping(), "housekeeping")
        log.info("scheduler %s up (%s): policy %s, node timeout %gs", self.config.scheduler_id,
                 "leader" if self.is_leader else "follower", self.policy.name, self.config.node_timeout_s)

    async def _on_elected(self, epoch: int) -> None:
        """This replica leads now: adopt the flips in flight, take the leader's subjects, say so."""
        state = self.leadership.state
        roles = self.policy.roles
        if roles is not None:
            roles.in_flight = {f.node_id: RoleChange(f.node_id, f.old_role, f.new_role, f.reason,
                                                     self.clock.now() - max(0.0, time.time() - f.requested_at))
                               for f in state.flips}
            for f in state.flips:
                log.info("adopted the role flip in flight: %s -> %s", f.node_id, f.new_role.value)
        self._leader_subs = [
            await subscribe(self.nc, subjects.sched_place(), self._on_place, (PlaceRequest,)),
            await subscribe(self.nc, subjects.sched_cluster(), self._on_cluster, (ClusterQuery,)),
            await subscribe(self.nc, subjects.request_cancel(), self._on_cancel, (Cancel,)),
        ]
        await self.nc.flush()
        metrics.LEADER.set(1)
        metrics.ELECTIONS.inc()
        await self._publish([SchedEvent(kind=EventKind.LEADER, ts=self.clock.now(), epoch=epoch,
                                         detail=f"{self.config.scheduler_id} leads")])
        await self._publish_missed_downs()

    async def _publish_missed_downs(self) -> None:
        """Publish the NODE_DOWNs this replica saw while it did not lead, for nodes still gone.

        A replica's registry expires a silent node whether it leads or not, and only the
        leader publishes. A lone scheduler that lost its lease for a moment (its event loop
        ran late on a busy machine) and expired a node in that moment would otherwise never
        say so, and gateways would wait for the dead node's tokens until their own timeout.
        Called on election and, for a term that went on after a late renew, by :meth:`tick`.
        Recent ones only (``node_timeout_s`` plus two leases): an older one was the previous
        leader's to publish. A gateway may so hear of one node's death twice; failing a dead
        node's attempts again finds none.
        """
        missed, self._unpublished_downs = self._unpublished_downs, {}
        horizon = self.clock.now() - (self.config.node_timeout_s + 2 * self.config.leader_lease_s)
        for node_id, ev in sorted(missed.items()):
            if ev.ts >= horizon and node_id not in self.registry:
                log.info("event %s %s %s (seen while not leading)", ev.kind.value, node_id, ev.detail)
                await self._send(ev)

    async def _on_deposed(self, reason: str) -> None:
        """Another replica leads (or may): stop placing, drop the queue and the flip at once."""
        metrics.LEADER.set(0)
        await self._unsubscribe(self._leader_subs)
        self._leader_subs = []
        if self.policy.roles is not None:
            self.policy.roles.in_flight = {}  # the new leader adopts them from the leader state
        self._drop_queue("deposed")

    def _drop_queue(self, outcome: str) -> None:
        """Forget every held request without an answer: its gateway re-sends it to the leader."""
        now = self.clock.now()
        for w in self.queue.take_all():
            _, span = w.handle
            metrics.WAIT_SECONDS.labels(outcome).observe(now - w.since)
            span.set_attributes({"flowkv.outcome": outcome, "flowkv.queued_s": now - w.since})
            span.end()
        metrics.WAITING.set(0)

    @staticmethod
    async def _unsubscribe(subs: list) -> None:
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closing: nothing left to undo
                pass

    async def close(self) -> None:
        """Stop housekeeping and unsubscribe, give the lease up, then hand the held requests
        over: when another replica takes the lead within a moment, they are dropped (their
        gateways re-send them to it); else each is answered OVERLOADED (its requester
        retries, instead of waiting out its timeout for a scheduler that is gone). The
        caller drains the connection."""
        await self.tasks.cancel_all()
        await self._unsubscribe(self._subs + self._leader_subs)
        self._subs, self._leader_subs = [], []
        if self.leadership.is_leader and self.leadership.enabled:
            await self.leadership.close()
            if len(self.queue) and await self.leadership.successor(self.config.leader_lease_s / 3):
                log.info("handing %d waiting request(s) over to the new leader", len(self.queue))
                self._drop_queue("handed_over")
        metrics.LEADER.set(0)
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
        metrics.refresh_plan(self.policy.roles if self.is_leader else None)

    async def _publish(self, events: list[SchedEvent]) -> None:
        """Keep and log ``events``; the leader also publishes them (a follower's registry
        sees the same nodes come and go, but one voice on sched_events is enough)."""
        leader = self.is_leader
        if leader:
            metrics.observe_events(events)
        for ev in events:
            if ev.kind != EventKind.PLACEMENT:  # placements are too many to keep; they are published
                self.events.append(ev)
            log.log(logging.DEBUG if ev.kind == EventKind.PLACEMENT or not leader else logging.INFO,
                    "event %s %s %s", ev.kind.value, ev.node_id or ev.request_id, ev.detail)
            if leader:
                await self._send(ev)
            elif ev.kind is EventKind.NODE_DOWN and ev.node_id:
                self._unpublished_downs[ev.node_id] = ev

    async def _send(self, ev: SchedEvent) -> None:
        """Publish one event on sched_events, stamped with this leader's epoch."""
        await self.nc.publish(subjects.sched_events(), encode(msgspec.structs.replace(ev, epoch=self.leadership.epoch)))

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
        # A lease not certain right now (a renew came late: a busy machine) is renewed at
        # once: wait for that rather than leave the request unanswered.
        if not self.is_leader and not await self.leadership.certain(self.config.leader_lease_s * 2):
            # Deposed a moment ago: the new leader answers the re-send.
            span.set_attribute("flowkv.outcome", "not_leader")
            span.end()
            return
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
        if not len(self.queue) or not self.is_leader:
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
            if isinstance(out, Placement):
                # The objectives the request is held to, for the nodes to pace it by.
                out = msgspec.structs.replace(out, ttft_slo_s=req.ttft_slo_s or self.config.ttft_slo_s,
                                              tpot_slo_s=req.tpot_slo_s or self.config.tpot_slo_s)
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
            state = ClusterState(policy=self.policy.name, nodes=[], events=[], num_waiting=len(self.queue),
                                 leader=self.config.scheduler_id, epoch=self.leadership.epoch)
        else:
            state = ClusterState(policy=self.policy.name, nodes=[n.report for n in self.registry.nodes()],
                                 events=list(self.events), num_waiting=len(self.queue),
                                 leader=self.config.scheduler_id, epoch=self.leadership.epoch)
        await respond(msg, state)

    async def _housekeeping(self) -> None:
        period = min(self.config.role_interval_s, self.config.node_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            await self.tick()

    async def tick(self) -> None:
        """One round: expire silent nodes; on the leader, advance the role controller and
        answer what waits."""
        await self._publish(self.registry.expire())
        if self._unpublished_downs and self.is_leader:  # its lease is certain again, same term
            await self._publish_missed_downs()
        roles = self.policy.roles
        if roles is not None and self.is_leader:
            changes, events = roles.step()
            try:
                await self._record_flips(list(roles.in_flight.values()))  # before SetRole goes out: the fence
            except NotLeader:
                roles.in_flight = {}
                return
            await self._publish(events)
            for change in changes:
                self.tasks.spawn(self._send_role(change), f"set-role-{change.node_id}")
        await self._drain()  # deadlines, and reservations that expired since the last report

    async def _record_flips(self, changes: list[RoleChange]) -> None:
        """Write the flips in flight into the leader state by compare-and-set, when they
        changed. A deposed leader's write fails (NotLeader): it sends no SetRole, and the
        leader that took over adopts the flips it finds there."""
        state = self.leadership.state
        if {(f.node_id, f.new_role) for f in state.flips} == {(c.node_id, c.new_role) for c in changes}:
            return
        now, wall = self.clock.now(), time.time()
        flips = [RoleFlip(node_id=c.node_id, old_role=c.old_role, new_role=c.new_role, reason=c.reason,
                          requested_at=wall - (now - c.requested_at)) for c in changes]
        await self.leadership.write_state(LeaderState(scheduler_id=self.config.scheduler_id,
                                                      epoch=self.leadership.epoch, flips=flips))

    async def _send_role(self, change: RoleChange) -> None:
        msg = SetRole(node_id=change.node_id, role=change.new_role, reason=change.reason, epoch=self.leadership.epoch)
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

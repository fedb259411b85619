"""Dispatcher: place a request, submit it, follow its tokens, and survive node failures.

Life cycle of one request (one *attempt* per placement):
1. ``PlaceRequest`` to the scheduler leader -> ``Placement`` (or ``Rejected``: 429 / 503
   to the client); when no node can take it now, the leader holds it up to
   ``queue_timeout_s`` for one that can (a client that leaves meanwhile gets its place
   dropped by a ``Cancel``). When another scheduler replica takes the lead (a ``leader``
   event, or a probe answered with a new epoch), or none answers, the request is re-sent
   with what is left of its wait, for up to ``scheduler_failover_s`` without a leader;
2. the router opens the attempt's stream, then ``SubmitRequest`` goes to the prefill node,
   which acks;
3. ordered tokens are yielded to the HTTP handler as they arrive;
4. a failure (a NODE_DOWN event for a node of the attempt, a node error chunk, a failed
   submit, or no token for ``stall_timeout_s`` from a node that is not busy: one whose
   load reports stopped, whose engine step has run longer than ``stall_timeout_s``, or
   that reports no work at all) cancels the attempt and starts the next:
   re-placed with the failed node excluded, the prompt extended by the tokens already
   delivered, ``output_offset`` = their count, so the client sees no gap and no duplicate;
5. after ``max_retries`` re-placements the request fails (502 ``node_failed``);
6. however it ends early (client gone, stop string seen), the attempt's ``Cancel`` is
   published so every node frees its blocks.

Each attempt has its own wire id (``<request id>`` then ``<request id>-r1``, ...): a late
chunk from a failed attempt can never be mistaken for one of the new attempt, and its
``Cancel`` can never abort the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from libs.protocol import subjects
from libs.protocol.messages import (
    Ack, Cancel, ErrorCode, EventKind, LoadReport, Placement, PlaceRequest, Rejected, SamplingParams, SchedEvent,
    SubmitRequest, encode,
)
from services.common.messaging import ask_cluster, request, subscribe
from services.common.tracing import tracer
from services.gateway import metrics
from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError, from_code
from services.gateway.events import EventLog
from services.gateway.streams import Delivery, RequestStream, StreamRouter

log = logging.getLogger(__name__)
_TRACER = tracer("flowkv.gateway")
_EXCLUSION_POLL_S = 0.5  # how often a re-placement that only failed nodes could take asks again


class AttemptFailed(Exception):
    """One attempt failed in a way a re-placement may fix."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(reason)
        self.node_id = node_id
        self.reason = reason


@dataclass
class Job:
    """What the dispatcher needs of a validated request."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    ttft_slo_s: float = 0.0  # the request's own objectives (0: the deployment's)
    tpot_slo_s: float = 0.0


@dataclass
class _Progress:
    delivered: list[int] = field(default_factory=list)  # output tokens the client has
    excluded: list[str] = field(default_factory=list)  # nodes that failed this request
    submitted: bool = False  # the current attempt reached a node (so it needs a cancel)
    started: float = field(default_factory=time.monotonic)  # when the dispatch began


class Dispatcher:
    """Places and follows requests for one gateway.

    Args:
        nc: the gateway's NATS connection.
        router: the gateway's token stream router (already started).
        config: timeouts and retry bound.
        events: the gateway's scheduler-event log (its one ``sched_events()`` subscription);
            a ``node_down`` there fails the attempts on that node.
    """

    def __init__(self, nc: Client, router: StreamRouter, config: GatewayConfig, events: EventLog) -> None:
        self.nc = nc
        self.router = router
        self.config = config
        self.events = events
        self._load_sub: Subscription | None = None
        # node id -> (when its latest load report arrived, monotonic; that report)
        self._loads: dict[str, tuple[float, LoadReport]] = {}
        self._probe: asyncio.Future[bool] | None = None  # the liveness probe in flight, shared
        self._answered_at = -math.inf  # when the scheduler last answered a probe (monotonic)
        self._epoch = 0  # the scheduler leader's epoch, as last heard (events, probes)
        self._new_leader: asyncio.Future[None] | None = None  # resolved when the epoch changes

    async def start(self) -> None:
        self.events.listen(self._on_event)
        self._load_sub = await subscribe(self.nc, subjects.node_load(), self._on_load, (LoadReport,))

    async def stop(self) -> None:
        if self._load_sub is not None:
            await self._load_sub.unsubscribe()
            self._load_sub = None

    async def _on_load(self, report: LoadReport, msg: Msg) -> None:
        self._loads[report.node_id] = (asyncio.get_running_loop().time(), report)

    def busy(self, node_id: str) -> bool:
        """Whether ``node_id`` is alive and working, so a request waiting on it is slow, not lost:
        a load report within ``stall_timeout_s``, no engine step running longer than that,
        and some work reported (queued, running or held requests)."""
        seen = self._loads.get(node_id)
        if seen is None:
            return False
        at, report = seen
        stall = self.config.stall_timeout_s
        if asyncio.get_running_loop().time() - at > stall or report.step_age_s > stall:
            return False
        return report.num_waiting + report.num_running + report.num_held > 0

    def _leader_seen(self, epoch: int) -> None:
        """Note the leader's epoch; a new one wakes every placement waiting on the old leader."""
        if epoch and epoch != self._epoch:
            self._epoch = epoch
            if self._new_leader is not None and not self._new_leader.done():
                self._new_leader.set_result(None)
            self._new_leader = None

    def _leader_changed(self) -> asyncio.Future[None]:
        """A future resolved at the next change of leader."""
        if self._new_leader is None:
            self._new_leader = asyncio.get_running_loop().create_future()
        return self._new_leader

    async def _on_event(self, event: SchedEvent) -> None:
        if event.kind is EventKind.LEADER:
            log.info("scheduler leader changed: %s (epoch %d)", event.detail, event.epoch)
            self._leader_seen(event.epoch)
        if event.kind is EventKind.NODE_DOWN and event.node_id:
            self._loads.pop(event.node_id, None)  # a node that left is never busy (and not kept)
            n = self.router.fail_node(event.node_id, f"node {event.node_id} is down ({event.detail or 'no reason'})")
            if n:
                log.warning("node %s down: %d request(s) will be re-placed", event.node_id, n)

    async def generate(self, job: Job) -> AsyncIterator[Delivery]:
        """Yield the request's tokens in order until it finishes; retries transparently.

        Raises:
            ApiError: the scheduler rejected the request, or retries ran out.
        """
        progress = _Progress()
        attempt = 0
        finished = False
        wire_id = job.request_id
        try:
            while True:
                wire_id = job.request_id if attempt == 0 else f"{job.request_id}-r{attempt}"
                progress.submitted = False
                try:
                    async with contextlib.aclosing(self._attempt(job, wire_id, progress)) as items:
                        async for item in items:
                            progress.delivered.extend(item.token_ids)
                            if not item.finished and len(progress.delivered) >= job.sampling.max_tokens:
                                # The node overran max_tokens: end here (it gets a cancel below).
                                item.finished, item.finish_reason = True, "length"
                            finished = item.finished and progress.submitted
                            yield item
                            if item.finished:
                                return
                    return
                except AttemptFailed as exc:
                    await self._publish_cancel(wire_id, f"attempt failed: {exc.reason}")
                    progress.submitted = False
                    if exc.node_id and exc.node_id not in progress.excluded:
                        progress.excluded.append(exc.node_id)
                    attempt += 1
                    metrics.RETRIES.labels(_reason_label(exc.reason)).inc()
                    if attempt > self.config.max_retries:
                        raise ApiError(
                            502, f"the request failed after {attempt} attempts: {exc.reason}", type="server_error",
                            code=ErrorCode.NODE_FAILED.value,
                        ) from None
                    log.warning(
                        "attempt %d failed (%s); re-placing without %s after %d tokens",
                        attempt, exc.reason, progress.excluded, len(progress.delivered),
                    )
        finally:
            if progress.submitted and not finished:
                await self._publish_cancel(wire_id, "cancelled by the gateway")

    async def _attempt(self, job: Job, wire_id: str, progress: _Progress) -> AsyncIterator[Delivery]:
        delivered, excluded = progress.delivered, progress.excluded
        prompt = job.prompt_token_ids + delivered
        remaining = job.sampling.max_tokens - len(delivered)
        placement = await self._place(job, wire_id, len(prompt), remaining, excluded)
        nodes = {placement.prefill_node, placement.decode_node}
        stream = self.router.open(wire_id, nodes, len(delivered))
        try:
            sampling = msgspec.structs.replace(
                job.sampling, max_tokens=remaining, min_tokens=max(0, job.sampling.min_tokens - len(delivered))
            )
            submit = SubmitRequest(
                request_id=wire_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                decode_node=placement.decode_node,
                reply_subject=self.router.subject,
                output_offset=len(delivered),
                num_original_prompt_tokens=len(job.prompt_token_ids),
                ttft_slo_s=placement.ttft_slo_s,
                tpot_slo_s=placement.tpot_slo_s,
                waited_s=time.monotonic() - progress.started,
            )
            progress.submitted = True  # from here the node may hold blocks, even if the ack is lost
            await self._submit(placement.prefill_node, submit)
            got = 0
            while True:
                item = await self._next(stream, placement, got)
                if got == 0:
                    item.queued_s = placement.queued_s
                got += len(item.token_ids)
                yield item
                if item.finished:
                    return
        finally:
            self.router.close(wire_id)

    async def _next(self, stream: RequestStream, placement: Placement, got: int) -> Delivery:
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), self.config.stall_timeout_s)
                break
            except asyncio.TimeoutError:
                node = _serving(placement, stream, got)
                if self.busy(node):
                    metrics.SLOW_WAITS.inc()
                    log.info("%s: no token for %gs from %s, which is busy: waiting on", stream.request_id,
                             self.config.stall_timeout_s, node)
                    continue
                raise AttemptFailed(node, f"no token for {self.config.stall_timeout_s:g}s") from None
        if item.error_code is ErrorCode.INVALID:
            raise ApiError(400, f"the node rejected the request: {item.error}", code="invalid_request")
        if item.error_code is not None:
            raise AttemptFailed(item.node_id or _serving(placement, stream, got), item.error)
        return item

    async def _place(self, job: Job, wire_id: str, num_prompt: int, max_tokens: int, excluded: list[str]) -> Placement:
        with _TRACER.start_as_current_span("place") as span:
            span.set_attributes({"flowkv.request_id": wire_id, "flowkv.tokens.prompt": num_prompt})
            placement = await self._place_traced(job, wire_id, num_prompt, max_tokens, excluded)
            span.set_attributes({"flowkv.prefill_node": placement.prefill_node,
                                 "flowkv.decode_node": placement.decode_node})
            return placement

    async def _place_traced(self, job: Job, wire_id: str, num_prompt: int, max_tokens: int,
                            excluded: list[str]) -> Placement:
        reply = await self._ask_placement(job, wire_id, num_prompt, max_tokens, excluded)
        if isinstance(reply, Rejected) and excluded and reply.code is ErrorCode.NO_NODES:
            # Only the excluded nodes could take it. The gateway may have seen a node die
            # before the scheduler has (its node timeout): asked again a moment later, the
            # scheduler places the request elsewhere or queues it for a node to come.
            # Placing it on the dead node now would spend the retries in milliseconds.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.exclusion_wait_s
            while isinstance(reply, Rejected) and reply.code is ErrorCode.NO_NODES and loop.time() < deadline:
                await asyncio.sleep(min(_EXCLUSION_POLL_S, max(0.0, deadline - loop.time())))
                reply = await self._ask_placement(job, wire_id, num_prompt, max_tokens, excluded)
        if isinstance(reply, Rejected) and excluded and reply.code is not ErrorCode.INVALID:
            # Exclusion is a preference: a node that is really dead has left the scheduler's
            # registry by now, so what is left failed this request for a passing reason
            # (a stall while the broker restarted, a refused reservation). Try it again.
            log.warning("no placement without %s (%s): placing on any node", excluded, reply.reason)
            return await self._place_traced(job, wire_id, num_prompt, max_tokens, [])
        if isinstance(reply, Rejected):
            metrics.REJECTED.labels(reply.code.value).inc()
            raise from_code(reply.code, reply.reason or reply.code.value, reply.retry_after_s or (1.0 if reply.code is ErrorCode.OVERLOADED else 0.0))
        if not isinstance(reply, Placement):
            raise ApiError(502, f"unexpected scheduler reply {type(reply).__name__}", type="server_error", code="bad_gateway")
        if reply.queued_s:
            metrics.QUEUED_SECONDS.observe(reply.queued_s)
        log.info("placed on prefill=%s decode=%s%s", reply.prefill_node, reply.decode_node,
                 f" after {reply.queued_s:.2f}s in the scheduler's queue" if reply.queued_s else "")
        return reply

    async def _ask_placement(self, job: Job, wire_id: str, num_prompt: int, max_tokens: int,
                             excluded: list[str]) -> object:
        """The scheduler leader's answer to the request's ``PlaceRequest``.

        The request is re-sent (same id, what is left of its queue wait) when the leader
        changes, so a request that waited in a dead leader's queue is not lost; with no
        scheduler answering (no responders, a timeout, a failed probe), it is re-sent until
        one leads again, for at most ``scheduler_failover_s``; then 503.
        """
        loop = asyncio.get_running_loop()
        wait = self.config.queue_timeout_s
        deadline = loop.time() + wait
        down_since: float | None = None  # since when no scheduler answered

        def unavailable(what: str) -> ApiError:
            metrics.REJECTED.labels("scheduler_unavailable").inc()
            return ApiError(503, what, type="server_error", code="scheduler_unavailable", retry_after_s=1.0)

        left = wait
        while True:
            place = PlaceRequest(
                request_id=wire_id, model=job.model, num_prompt_tokens=num_prompt, max_tokens=max_tokens,
                exclude_nodes=list(excluded), queue_timeout_s=left, ttft_slo_s=job.ttft_slo_s,
                tpot_slo_s=job.tpot_slo_s,
            )
            changed = self._leader_changed()
            pending = asyncio.ensure_future(request(self.nc, subjects.sched_place(), place, self.config.place_timeout_s + left))
            resend = False
            try:
                # A request may wait in the scheduler's queue, so no answer within place_timeout_s
                # is no sign of a dead scheduler: ask it, every place_timeout_s, whether it is there.
                while not pending.done():
                    done, _ = await asyncio.wait({pending, changed}, timeout=self.config.place_timeout_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if pending in done:
                        break
                    if changed in done:
                        resend = True
                        break
                    if left > 0 and not await self._scheduler_answers():
                        down_since = loop.time() if down_since is None else down_since
                        if loop.time() - down_since >= self.config.scheduler_failover_s:
                            await self._publish_cancel(wire_id, "the scheduler stopped answering")
                            raise unavailable("the scheduler stopped answering while the request waited for a placement")
                if resend:
                    log.info("%s: re-sending the placement to the new scheduler leader", wire_id)
                    left = max(0.0, deadline - loop.time()) if wait > 0 else 0.0
                    continue
                try:
                    return pending.result()
                except (NatsTimeoutError, NoRespondersError, asyncio.TimeoutError):
                    down_since = loop.time() if down_since is None else down_since
                    if loop.time() - down_since >= self.config.scheduler_failover_s:
                        raise unavailable("the scheduler did not answer") from None
                    # No leader now (one is being elected): wait for it, briefly, and re-send.
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(changed), 0.25)
                    left = max(0.0, deadline - loop.time()) if wait > 0 else 0.0
            except asyncio.CancelledError:
                if wait > 0:  # the client left: free its place in the scheduler's queue
                    await self._publish_cancel(wire_id, "cancelled while waiting for placement")
                raise
            finally:
                pending.cancel()

    async def _scheduler_answers(self) -> bool:
        """Whether the scheduler answers a brief ``ClusterQuery`` within ``place_timeout_s``.
        One probe at a time serves every waiting request, and an answer counts for
        ``place_timeout_s``."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._answered_at < self.config.place_timeout_s:
            return True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._ask_scheduler())
        return await asyncio.shield(self._probe)

    async def _ask_scheduler(self) -> bool:
        try:
            state = await ask_cluster(self.nc, self.config.place_timeout_s, brief=True)
        except Exception as exc:  # a timeout, no responders, a closed connection, a wrong reply: all say "not there"
            log.warning("the scheduler did not answer a liveness probe within %.1fs: %s",
                        self.config.place_timeout_s, exc.__class__.__name__)
            return False
        self._answered_at = asyncio.get_running_loop().time()
        self._leader_seen(state.epoch)
        return True

    async def _submit(self, node_id: str, submit: SubmitRequest) -> None:
        try:
            ack = await request(self.nc, subjects.node(node_id, subjects.NodeVerb.SUBMIT), submit, self.config.submit_timeout_s)
        except (NatsTimeoutError, NoRespondersError, asyncio.TimeoutError):
            raise AttemptFailed(node_id, f"node {node_id} did not acknowledge the submit") from None
        if not isinstance(ack, Ack):
            raise AttemptFailed(node_id, f"node {node_id} answered {type(ack).__name__} to a submit")
        if not ack.ok:
            if ack.code is ErrorCode.INVALID:
                raise ApiError(400, f"the node rejected the request: {ack.error}", code="invalid_request")
            raise AttemptFailed(node_id, f"node {node_id} refused the submit: {ack.error or ack.code}")

    async def _publish_cancel(self, wire_id: str, reason: str) -> None:
        try:
            await self.nc.publish(subjects.request_cancel(), encode(Cancel(request_id=wire_id, reason=reason)))
        except Exception:  # a closed connection must not hide the request's own outcome
            log.warning("could not publish the cancel of %s", wire_id, exc_info=True)


def _serving(placement: Placement, stream: RequestStream, got: int) -> str:
    """The node an attempt waits on: the prefill node before the first token, after it the
    decode node (the one the hand-off moved to, if it moved)."""
    return placement.prefill_node if got == 0 else stream.moved_to or placement.decode_node


def _reason_label(reason: str) -> str:
    """A bounded metric label for a failure reason."""
    if reason.startswith("no token"):
        return "stall"
    if "is down" in reason:
        return "node_down"
    if "acknowledge" in reason or "refused" in reason or "answered" in reason:
        return "submit"
    return "node_error"

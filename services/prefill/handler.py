"""Prefill role: prefill a request, publish its first token, hand its KV to the decode node.

A disaggregated request on P (one step a line):

1. SubmitRequest on ``node(P, SUBMIT)``: the node acks at once (or refuses; see node.py).
2. PREFILL: ``engine.prefill()`` computes the prompt and samples the first token; the
   prompt's blocks stay held.
3. publish the first token as ``TokenChunk(index=output_offset)``.
4. finished already (EOS, max_tokens=1, stop): release the blocks; done (no reservation
   was made, so D has nothing to drop).
5. HANDOFF: ``KVAllocRequest`` (P's block ids, ``agent.info()``) to ``node(D, KV_ALLOC)``;
   D reserves blocks, starts ``agent.expect`` and replies.
6. refused or no reply: release, recompute the rest here (prompt + first token) so the
   client still gets its tokens.
7. ``agent.send(src[k:], dst[k:])`` with k = D's prefix-cache hit in blocks, in calls of
   the node's ``kv_transfer_granularity`` (advertised in its ``AgentInfo``, so D's plan
   matches).
8. ``KVDone(ok, first_token_id, stats)`` to ``node(D, KV_DONE)``; D decodes (or recomputes).
9. ``engine.release()`` P's blocks: the transfer has returned or failed, they are ours.

Colocated (``decode_node`` is this node): LOCAL: ``engine.generate()`` streamed from
``output_offset``.

Cancel: in PREFILL or LOCAL the task is cancelled and the engine aborts the request. In
HANDOFF the transfer is aborted instead and the task runs to its end (release, then
``KVDone(ok=False)`` so D frees its reservation): blocks in flight belong to the transfer.

P asks for the reservation after its prefill, not while it runs: D's ``expect`` needs P's
block ids to plan the same copies as P, and they are final only once the prompt is cached.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, StatusCode

from libs.engine.pacing import Objectives
from libs.kvtransfer.base import AgentInfo, TransferError, TransferMode
from libs.protocol import messages
from libs.protocol.messages import (
    ErrorCode,
    KVAllocReply,
    KVAllocRequest,
    KVDone,
    Placement,
    PlaceRequest,
    SubmitRequest,
    TokenChunk,
    TransferReport,
)
from libs.protocol.subjects import NodeVerb, node, sched_place
from services.common import faults
from services.common.logs import request_id_var
from services.common.messaging import request
from services.common.tracing import extract_context, inject_headers, tracer
from services.node_common import metrics
from services.node_common.context import NodeContext
from services.node_common.metrics import transfer_attributes
from services.node_common.streaming import (
    Streamer,
    Usage,
    chunk_of,
    continuation_params,
    engine_params,
    error_chunk,
    prior_outputs,
)

log = logging.getLogger(__name__)
# A refused hand-off is re-placed on another decode node this many times, then computed here.
MAX_DECODE_REPLACEMENTS = 2
_TRACER = tracer("flowkv.node")


class Phase(str, enum.Enum):
    PREFILL = "prefill"
    HANDOFF = "handoff"
    LOCAL = "local"


@dataclass
class PrefillJob:
    """One request on this node as its prefill (or colocated) node."""

    req: SubmitRequest
    phase: Phase
    transfer_id: str = ""
    first_token_id: int = -1  # sampled by the prefill; D's reservation carries it
    colocated: bool = False  # decode_node is this node: the whole generation runs here
    cancelled: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class PrefillHandler:
    """Runs SubmitRequests: colocated generation, or prefill plus hand-off to a decode node."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.jobs: dict[str, PrefillJob] = {}

    # ---------------------------------------------------------------- control

    def num_inflight(self, colocated: bool | None = None) -> int:
        """Requests in flight here; only the colocated (or only the handed-off) ones if given."""
        return sum(1 for j in self.jobs.values() if colocated is None or j.colocated == colocated)

    def start(self, req: SubmitRequest, headers: Mapping[str, str] | None) -> None:
        """Run ``req`` in the background (the caller has validated and acked it)."""
        local = req.decode_node == self.ctx.node_id
        job = PrefillJob(req, Phase.LOCAL if local else Phase.PREFILL, colocated=local)
        self.jobs[req.request_id] = job
        job.task = self.ctx.tasks.spawn(self._run(job, headers), f"prefill:{req.request_id}", critical=False)

    def cancel(self, request_id: str) -> bool:
        """Abort a request wherever it is on this node; returns whether it was here."""
        job = self.jobs.get(request_id)
        if job is None:
            return False
        job.cancelled = True
        if job.phase is Phase.HANDOFF:
            if job.transfer_id:
                self.ctx.agent.abort(job.transfer_id, "cancelled")
        elif job.task is not None:
            job.task.cancel()
        return True

    async def wait_idle(self, timeout: float, colocated: bool | None = None) -> bool:
        """Wait until no request (of the given kind) is in flight; False on timeout."""
        return await self.ctx.work_finished.wait_until(lambda: not self.num_inflight(colocated), timeout)

    async def cancel_all(self) -> None:
        for rid in list(self.jobs):
            self.cancel(rid)
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------- request

    async def _run(self, job: PrefillJob, headers: Mapping[str, str] | None) -> None:
        req = job.req
        request_id_var.set(req.request_id)
        # This task's spans join the gateway's trace (the submit's traceparent).
        otel_context.attach(extract_context(headers))
        streamer = Streamer(self.ctx.nc, self.ctx.node_id, req.reply_subject, headers)
        outcome = "error"
        try:
            params = engine_params(req.sampling)
            if job.colocated:
                await self._generate(req, req.prompt_token_ids, params, req.output_offset, streamer)
                outcome = "ok"
                return
            outcome = await self._prefill_and_hand_off(job, params, streamer, headers)
        except asyncio.CancelledError:
            outcome = "cancelled"
            await self.ctx.engine.abort(req.request_id)
        except Exception as exc:
            log.exception("request %s failed on %s", req.request_id, self.ctx.node_id)
            await streamer.publish(error_chunk(req.request_id, self.ctx.node_id, req.output_offset,
                                               ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            await self.ctx.engine.abort(req.request_id)
        finally:
            self.jobs.pop(req.request_id, None)
            self.ctx.work_finished.notify()
            metrics.REQUESTS.labels("colocated" if job.colocated else "prefill", outcome).inc()

    def _usage(self, req: SubmitRequest) -> Usage:
        return Usage(num_prompt_tokens=req.num_original_prompt_tokens or len(req.prompt_token_ids))

    async def _generate(self, req: SubmitRequest, prompt: list[int], params, first_index: int,  # type: ignore[no-untyped-def]
                        streamer: Streamer) -> None:
        usage = self._usage(req)
        outputs = self.ctx.engine.generate(req.request_id, prompt, params, objectives=objectives_of(req),
                                           **prior_outputs(len(prompt), len(req.prompt_token_ids),
                                                           req.num_original_prompt_tokens))
        await streamer.stream(outputs, first_index, usage)

    async def _prefill_and_hand_off(self, job: PrefillJob, params, streamer: Streamer,  # type: ignore[no-untyped-def]
                                    headers: Mapping[str, str] | None) -> str:
        req = job.req
        engine = self.ctx.engine
        with _TRACER.start_as_current_span("node.prefill") as span:
            span.set_attributes({"flowkv.request_id": req.request_id, "flowkv.node_id": self.ctx.node_id,
                                 "flowkv.role": "prefill", "flowkv.tokens.prompt": len(req.prompt_token_ids)})
            result = await engine.prefill(req.request_id, req.prompt_token_ids, params, objectives=objectives_of(req),
                                          **prior_outputs(len(req.prompt_token_ids), len(req.prompt_token_ids),
                                                          req.num_original_prompt_tokens))
            span.set_attributes({"flowkv.tokens.cached": result.output.num_cached_tokens,
                                 "flowkv.kv.blocks": len(result.block_ids)})
        out = result.output
        usage = self._usage(req)
        usage.num_cached_tokens = out.num_cached_tokens
        job.phase = Phase.HANDOFF
        try:
            if out.token_ids or out.finish_reason is not None:
                await streamer.publish(chunk_of(out, self.ctx.node_id, req.output_offset, usage))
            if out.finish_reason is not None or not out.token_ids or job.cancelled:
                return "cancelled" if job.cancelled else "ok"
            first = out.token_ids[0]
            return await self._hand_off(job, list(result.block_ids), first, params, streamer, headers)
        finally:
            await engine.release(req.request_id)

    async def _hand_off(self, job: PrefillJob, src_ids: list[int], first: int, params,  # type: ignore[no-untyped-def]
                        streamer: Streamer, headers: Mapping[str, str] | None) -> str:
        with _TRACER.start_as_current_span("kv.transfer") as span:
            span.set_attributes({"flowkv.request_id": job.req.request_id, "flowkv.node_id": self.ctx.node_id,
                                 "flowkv.role": "prefill", "flowkv.decode_node": job.req.decode_node})
            # D's spans (kv.receive, node.decode) become children of this one.
            return await self._hand_off_traced(job, src_ids, first, params, streamer,
                                               inject_headers(dict(headers) if headers else None), span)

    async def _hand_off_traced(self, job: PrefillJob, src_ids: list[int], first: int, params,  # type: ignore[no-untyped-def]
                               streamer: Streamer, headers: dict[str, str], span: Span) -> str:
        req, ctx = job.req, self.ctx
        job.transfer_id = f"{req.request_id}.{uuid.uuid4().hex[:12]}"
        job.first_token_id = first
        span.set_attribute("flowkv.transfer_id", job.transfer_id)
        reply = await self._reserve(job, src_ids, headers)
        refused = [req.decode_node]
        for _ in range(MAX_DECODE_REPLACEMENTS):
            if reply is not None or job.cancelled or not await self._move_hand_off(job, streamer, refused):
                break
            reply = await self._reserve(job, src_ids, headers)
            refused.append(job.req.decode_node)
        req = job.req
        if reply is None:
            if job.cancelled:
                return "cancelled"
            await ctx.engine.release(req.request_id)
            metrics.RECOMPUTES.labels("no_reservation").inc()
            span.set_attribute("flowkv.outcome", "recomputed")
            job.phase = Phase.LOCAL
            prompt = list(req.prompt_token_ids) + [first]
            await self._generate(req, prompt, continuation_params(params), req.output_offset + 1, streamer)
            return "ok"
        done = KVDone(request_id=req.request_id, transfer_id=job.transfer_id, ok=True, first_token_id=first)
        if job.cancelled:
            done.ok, done.error = False, "cancelled"
        else:
            k = reply.num_cached_tokens // ctx.block_size
            span.set_attributes({"flowkv.kv.blocks": len(src_ids) - k, "flowkv.tokens.cached": reply.num_cached_tokens,
                                 "flowkv.kv.transport": reply.transport})
            try:
                stats = await self._send(job, reply, src_ids[k:], list(reply.dst_block_ids[k:]))
                done.stats = stats
                span.set_attributes(transfer_attributes(stats))
            except TransferError as exc:
                log.warning("transfer %s to %s failed: %s", job.transfer_id, req.decode_node, exc.reason)
                done.ok, done.error = False, exc.reason
                span.set_status(StatusCode.ERROR, exc.reason)
        await self._notify_done(req, done, headers)
        return "ok" if done.ok else ("cancelled" if job.cancelled else "transfer_failed")

    async def _move_hand_off(self, job: PrefillJob, streamer: Streamer, refused: list[str]) -> bool:
        """The placed decode node refused the hand-off (a role flip got there first, or it
        is full): ask the scheduler for another decode node (none of ``refused``), tell the
        gateway the hand-off moved, and point the job at it. False if there is none (the
        caller computes the rest here, as after any failed reservation)."""
        req, ctx = job.req, self.ctx
        place = PlaceRequest(request_id=req.request_id, model=ctx.engine.model_name,
                             num_prompt_tokens=len(req.prompt_token_ids), max_tokens=req.sampling.max_tokens,
                             exclude_nodes=list(refused), prefill_node=ctx.node_id)
        try:
            reply = await request(ctx.nc, sched_place(), place, ctx.config.kv_alloc_timeout_s)
        except Exception as exc:  # timeout, no scheduler, garbage: fall back to computing it here
            log.warning("no new decode node for %s: %r", req.request_id, exc)
            return False
        if not isinstance(reply, Placement) or reply.decode_node in ("", ctx.node_id, *refused):
            log.warning("no new decode node for %s: %s", req.request_id, getattr(reply, "reason", reply))
            return False
        log.info("hand-off of %s moves from %s to %s", req.request_id, req.decode_node, reply.decode_node)
        metrics.HANDOFF_MOVES.inc()
        # The gateway takes the new node's chunks only once it has heard of it (and NATS keeps
        # this node's messages in order: this notice reaches it before the KV does the node).
        await streamer.publish(TokenChunk(request_id=req.request_id, node_id=ctx.node_id, index=req.output_offset + 1,
                                          token_ids=[], handoff_to=reply.decode_node))
        job.req = msgspec.structs.replace(req, decode_node=reply.decode_node)
        return True

    async def _reserve(self, job: PrefillJob, src_ids: list[int], headers: dict[str, str] | None) -> KVAllocReply | None:
        """Ask D for blocks; returns its reply, or None if it refused or did not answer."""
        req, ctx = job.req, self.ctx
        alloc = KVAllocRequest(
            request_id=req.request_id, transfer_id=job.transfer_id, prefill_node=ctx.node_id,
            prompt_token_ids=req.prompt_token_ids, sampling=req.sampling, reply_subject=req.reply_subject,
            sender_info=self._sender_info(), output_offset=req.output_offset,
            num_original_prompt_tokens=req.num_original_prompt_tokens, src_block_ids=src_ids,
            first_token_id=job.first_token_id, tpot_slo_s=req.tpot_slo_s,
        )
        try:
            msg = await ctx.nc.request(node(req.decode_node, NodeVerb.KV_ALLOC), messages.encode(alloc),
                                       timeout=ctx.config.kv_alloc_timeout_s, headers=headers)
            reply = messages.decode(msg.data)
        except Exception as exc:  # timeout, no responders, garbage
            log.warning("no reservation from %s: %r", req.decode_node, exc)
            return None
        if not isinstance(reply, KVAllocReply) or not reply.ok:
            log.warning("%s refused the reservation: %s", req.decode_node, getattr(reply, "error", reply))
            return None
        if len(reply.dst_block_ids) != len(src_ids):
            log.error("%s reserved %d blocks for %d", req.decode_node, len(reply.dst_block_ids), len(src_ids))
            return None
        return reply

    @property
    def transfer_mode(self) -> TransferMode:
        """How this node issues the KV it sends (``kv_transfer_granularity``)."""
        return TransferMode(self.ctx.config.kv_transfer_granularity)

    def _sender_info(self) -> bytes:
        """The agent's info with this node's transfer granularity: D plans the same calls."""
        info = self.ctx.agent.info()
        if info.transfer_mode != self.transfer_mode.value:
            info = msgspec.structs.replace(info, transfer_mode=self.transfer_mode.value)
        return msgspec.msgpack.encode(info)

    async def _send(self, job: PrefillJob, reply: KVAllocReply, src: list[int], dst: list[int]) -> TransferReport | None:
        if not src:  # D had every block cached: nothing moves
            return None
        peer = msgspec.msgpack.decode(reply.receiver_info, type=AgentInfo)
        ctx = self.ctx
        if faults.fire("kv_send_fail"):  # test-only (FLOWKV_FAULT_INJECT); off by default
            raise TransferError("injected fault kv_send_fail")
        stall = faults.seconds("kv_send_stall")
        if stall:  # test-only: D has reserved, nothing is written yet
            log.warning("injected fault kv_send_stall: %gs before writing %s", stall, job.transfer_id)
            await asyncio.sleep(stall)
        stats = await ctx.agent.send(job.transfer_id, peer, src, dst, mode=self.transfer_mode,
                                     timeout=ctx.config.transfer_timeout_s)
        metrics.record_send(stats, ctx.transfers, peer=job.req.decode_node)
        return stats

    async def _notify_done(self, req: SubmitRequest, done: KVDone, headers: Mapping[str, str] | None) -> None:
        subject = node(req.decode_node, NodeVerb.KV_DONE)
        if faults.fire("kv_done_drop"):  # test-only: P "dies" after the transfer, D's lease must end it
            return
        try:
            reply = await self.ctx.nc.request(subject, messages.encode(done), timeout=self.ctx.config.kv_alloc_timeout_s,
                                              headers=dict(headers) if headers else None)
            ack = messages.decode(reply.data)
            if isinstance(ack, messages.Ack) and not ack.ok:
                log.warning("%s did not take KVDone: %s", req.decode_node, ack.error)
        except Exception as exc:
            # D is gone: the gateway sees the decode node leave and retries from what the client has.
            log.warning("KVDone to %s got no answer: %r", req.decode_node, exc)


def objectives_of(req: SubmitRequest) -> Objectives | None:
    """The objectives the engine paces ``req`` by (None: it has none)."""
    if req.ttft_slo_s <= 0 and req.tpot_slo_s <= 0:
        return None
    return Objectives(req.ttft_slo_s, req.tpot_slo_s, req.waited_s)

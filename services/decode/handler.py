"""Decode role: reserve blocks for a hand-off, receive the KV, decode and stream the tokens.

A request on D (one step a line):

1. ``KVAllocRequest`` on ``node(D, KV_ALLOC)``: ``engine.allocate_remote()`` reserves the
   prompt's blocks (prefix hits reused), ``agent.expect(dst[k:], src[k:])`` starts (in the
   sender's transfer granularity, from its ``AgentInfo``), and D replies ``KVAllocReply``
   (block ids, cached tokens, its agent info, the transport).
2. AWAITING: the reservation waits for ``KVDone`` on ``node(D, KV_DONE)``, at most
   ``lease_s``; without it the expect is aborted and the blocks are released.
3. ``KVDone(ok=True)``: ``agent.complete()``, await the expect future (the bytes landed).
4. DECODING: ``engine.decode_remote()`` (prompt + first token); chunks from
   ``output_offset + 1`` to the gateway's stream.
5. ``KVDone(ok=False)`` or a failed transfer: release the reservation, RECOMPUTING:
   ``engine.generate(prompt + first token)``, chunks numbered on from ``output_offset + 1``.

Cancel: AWAITING -> the expect is aborted, and the blocks are released when ``KVDone``
comes (P may still be writing into them) or the lease ends. DECODING / RECOMPUTING -> the
task is cancelled and the engine aborts the request (its blocks are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry.trace import StatusCode

from libs.engine.pacing import Objectives
from libs.kvtransfer.allocator import NoFreeBlocks
from libs.kvtransfer.base import AgentInfo, TransferError, TransferMode
from libs.protocol.messages import Ack, ErrorCode, KVAllocReply, KVAllocRequest, KVDone, TransferReport
from services.common.logs import request_id_var
from services.common.tracing import extract_context, tracer
from services.node_common import metrics
from services.node_common.context import NodeContext
from services.node_common.metrics import transfer_attributes
from services.node_common.streaming import Streamer, Usage, continuation_params, engine_params, prior_outputs
from services.node_common.validation import (check_block_ids, check_offsets, check_prompt, check_reply_subject,
                                             vocab_size)

log = logging.getLogger(__name__)
_TRACER = tracer("flowkv.node")


class Phase(str, enum.Enum):
    AWAITING = "awaiting"
    DECODING = "decoding"
    RECOMPUTING = "recomputing"


@dataclass
class Reservation:
    """Blocks set aside on this node for one request's KV, and the request's decode."""

    req: KVAllocRequest
    block_ids: list[int]
    num_cached_tokens: int
    expect: asyncio.Future[Any] | None
    done: asyncio.Future[KVDone]
    phase: Phase = Phase.AWAITING
    cancelled: bool = False
    received: TransferReport | None = None  # what landed (None: nothing moved, or not yet)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class DecodeHandler:
    """Serves KVAllocRequest and KVDone: reservations, hand-off reception, decode."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.reservations: dict[str, Reservation] = {}
        self.reserving: set[str] = set()  # KVAllocRequests whose blocks the engine is reserving now

    def num_inflight(self) -> int:
        """Reservations held and being made (a role flip away from decode waits for both)."""
        return len(self.reservations) + len(self.reserving)

    # ------------------------------------------------------------------ verbs

    async def reserve(self, req: KVAllocRequest, headers: Mapping[str, str] | None) -> KVAllocReply:
        """Reserve blocks for ``req`` and expect its KV; the reply goes back to P."""
        ctx = self.ctx
        refuse = dict(request_id=req.request_id, transfer_id=req.transfer_id, ok=False)
        if req.request_id in self.reservations:
            return KVAllocReply(**refuse, code=ErrorCode.INVALID, error=f"{req.request_id} is already reserved")
        try:
            peer = msgspec.msgpack.decode(req.sender_info, type=AgentInfo)
            params = engine_params(req.sampling)
            ctx.agent.check_peer(peer)
            mode = TransferMode.parse(peer.transfer_mode)  # P's granularity: plan the same calls
            check_prompt(req.prompt_token_ids, vocab_size(ctx.engine), ctx.engine.max_model_len)
            check_reply_subject(req.reply_subject)
            check_offsets(req.output_offset, req.num_original_prompt_tokens, len(req.prompt_token_ids))
            check_block_ids(req.src_block_ids, peer.num_blocks, "source block ids")
            transport = ctx.agent.transport_for(peer).name
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TransferError) as exc:
            return KVAllocReply(**refuse, code=ErrorCode.INVALID, error=str(exc))
        # Accepted in the decode role: in flight from here, though the engine may take a
        # while to reserve (vLLM's does it in a step of its own).
        self.reserving.add(req.request_id)
        try:
            alloc = await ctx.engine.allocate_remote(req.request_id, list(req.prompt_token_ids),
                                                     first_token_id=req.first_token_id, params=params)
        except NoFreeBlocks as exc:
            metrics.REFUSED.labels("kv_alloc", ErrorCode.OVERLOADED.value).inc()
            return KVAllocReply(**refuse, code=ErrorCode.OVERLOADED, error=str(exc))
        except ValueError as exc:
            return KVAllocReply(**refuse, code=ErrorCode.INVALID, error=str(exc))
        finally:
            # On success the reservation below is in place before anyone waiting runs.
            self.reserving.discard(req.request_id)
            ctx.work_finished.notify()
        dst = list(alloc.block_ids)
        if len(dst) != len(req.src_block_ids):
            await ctx.engine.release(req.request_id)
            return KVAllocReply(**refuse, code=ErrorCode.INVALID,
                                error=f"{len(req.src_block_ids)} source blocks for {len(dst)} prompt blocks")
        k = alloc.num_cached_tokens // ctx.block_size
        expect = None
        if k < len(dst):
            try:
                expect = ctx.agent.expect(req.transfer_id, peer, dst[k:], list(req.src_block_ids[k:]),
                                          mode=mode, timeout=ctx.config.lease_s)
            except TransferError as exc:  # e.g. this transfer id is already in flight
                await ctx.engine.release(req.request_id)
                return KVAllocReply(**refuse, code=ErrorCode.INVALID, error=exc.reason)
            expect.add_done_callback(_retrieve)
        res = Reservation(req, dst, alloc.num_cached_tokens, expect, asyncio.get_running_loop().create_future())
        self.reservations[req.request_id] = res
        res.task = ctx.tasks.spawn(self._run(res, params, headers), f"decode:{req.request_id}", critical=False)
        return KVAllocReply(request_id=req.request_id, transfer_id=req.transfer_id, ok=True, dst_block_ids=dst,
                            num_cached_tokens=alloc.num_cached_tokens,
                            receiver_info=msgspec.msgpack.encode(ctx.agent.info()), transport=transport)

    def kv_done(self, done: KVDone) -> Ack:
        """P finished (or failed) writing the KV: let the reservation go on."""
        res = self.reservations.get(done.request_id)
        if res is None or res.req.transfer_id != done.transfer_id:
            return Ack(request_id=done.request_id, ok=False, code=ErrorCode.INVALID,
                       error=f"{self.ctx.node_id} holds no reservation for transfer {done.transfer_id}")
        if not res.done.done():
            res.done.set_result(done)
        return Ack(request_id=done.request_id)

    def cancel(self, request_id: str) -> bool:
        """Abort a request held here; returns whether it was here."""
        res = self.reservations.get(request_id)
        if res is None:
            return False
        res.cancelled = True
        if res.phase is Phase.AWAITING:
            self.ctx.agent.abort(res.req.transfer_id, "cancelled")
        elif res.task is not None:
            res.task.cancel()
        return True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no reservation is held or being made; False on timeout."""
        return await self.ctx.work_finished.wait_until(lambda: not self.num_inflight(), timeout)

    async def cancel_all(self) -> None:
        for rid in list(self.reservations):
            self.cancel(rid)
            res = self.reservations.get(rid)
            if res is not None and not res.done.done():  # nobody will write now: shutting down
                res.done.cancel()
        tasks = [r.task for r in self.reservations.values() if r.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------- request

    async def _run(self, res: Reservation, params: Any, headers: Mapping[str, str] | None) -> None:
        req, engine = res.req, self.ctx.engine
        request_id_var.set(req.request_id)
        # This task's spans join the trace of P's kv.transfer (the KVAllocRequest's traceparent).
        otel_context.attach(extract_context(headers))
        outcome = "error"
        try:
            with _TRACER.start_as_current_span("kv.receive") as span:
                span.set_attributes(self._span_attributes(res))
                done = await self._await_done(res)
                if done is None or res.cancelled:
                    await engine.release(req.request_id)
                    outcome = "cancelled" if res.cancelled else "lease_expired"
                    span.set_attribute("flowkv.outcome", outcome)
                    return
                failure = await self._landed(res, done)
                span.set_attributes(transfer_attributes(res.received))
                if failure is not None:
                    span.set_status(StatusCode.ERROR, failure)
            streamer = Streamer(self.ctx.nc, self.ctx.node_id, req.reply_subject, headers)
            if failure is None:
                res.phase = Phase.DECODING
                usage = Usage(req.num_original_prompt_tokens or len(req.prompt_token_ids),
                              res.num_cached_tokens, from_engine=False)
                with _TRACER.start_as_current_span("node.decode") as span:
                    span.set_attributes(self._span_attributes(res))
                    pace = Objectives(tpot_slo_s=req.tpot_slo_s) if req.tpot_slo_s > 0 else None
                    outputs = engine.decode_remote(req.request_id, list(req.prompt_token_ids), done.first_token_id,
                                                   params, objectives=pace,
                                                   **prior_outputs(len(req.prompt_token_ids),
                                                                   len(req.prompt_token_ids),
                                                                   req.num_original_prompt_tokens))
                    last = await streamer.stream(outputs, req.output_offset + 1, usage)
                    if last is not None:
                        span.set_attributes({"flowkv.finish_reason": last.finish_reason or "",
                                             "flowkv.tokens.output": last.num_output_tokens})
                outcome = "ok"
            else:
                await self._recompute(res, done, params, streamer, failure)
                outcome = "recomputed"
        except asyncio.CancelledError:
            outcome = "cancelled"
            await engine.abort(req.request_id)
        except Exception:
            log.exception("decode of %s failed", req.request_id)
            await engine.abort(req.request_id)
        finally:
            self.reservations.pop(req.request_id, None)
            self.ctx.work_finished.notify()
            metrics.REQUESTS.labels("decode", outcome).inc()

    async def _await_done(self, res: Reservation) -> KVDone | None:
        """KVDone, or None when the lease ran out first (the transfer is then aborted)."""
        try:
            return await asyncio.wait_for(asyncio.shield(res.done), self.ctx.config.lease_s)
        except asyncio.TimeoutError:
            log.warning("no KVDone for %s within %.1fs: releasing its blocks", res.req.request_id,
                        self.ctx.config.lease_s)
            metrics.LEASES_EXPIRED.inc()
            self.ctx.agent.abort(res.req.transfer_id, "lease expired")
            return None

    async def _landed(self, res: Reservation, done: KVDone) -> str | None:
        """None when the KV is in the reserved blocks, else why not."""
        tid = res.req.transfer_id
        if not done.ok:
            self.ctx.agent.abort(tid, done.error or "sender failed")
            return done.error or "sender failed"
        if res.expect is None:
            return None
        with contextlib.suppress(KeyError):
            self.ctx.agent.complete(tid)
        try:
            res.received = await res.expect
        except TransferError as exc:
            return exc.reason
        if res.received is not None:
            metrics.record_receive(res.received, self.ctx.transfers)
        return None

    def _span_attributes(self, res: Reservation) -> dict[str, Any]:
        k = res.num_cached_tokens // self.ctx.block_size
        return {"flowkv.request_id": res.req.request_id, "flowkv.node_id": self.ctx.node_id, "flowkv.role": "decode",
                "flowkv.prefill_node": res.req.prefill_node, "flowkv.tokens.prompt": len(res.req.prompt_token_ids),
                "flowkv.tokens.cached": res.num_cached_tokens, "flowkv.kv.blocks": len(res.block_ids) - k}

    async def _recompute(self, res: Reservation, done: KVDone, params: Any, streamer: Streamer, why: str) -> None:
        req = res.req
        log.info("recomputing %s locally: %s", req.request_id, why)
        metrics.RECOMPUTES.labels("transfer_failed").inc()
        await self.ctx.engine.release(req.request_id)
        res.phase = Phase.RECOMPUTING
        if res.cancelled:
            return
        if done.first_token_id < 0:
            raise RuntimeError(f"KVDone for {req.request_id} carries no first token")
        prompt = list(req.prompt_token_ids) + [done.first_token_id]
        usage = Usage(req.num_original_prompt_tokens or len(req.prompt_token_ids))
        outputs = self.ctx.engine.generate(req.request_id, prompt, continuation_params(params), **prior_outputs(
            len(prompt), len(req.prompt_token_ids), req.num_original_prompt_tokens))
        await streamer.stream(outputs, req.output_offset + 1, usage)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # The reservation reads the outcome when it needs it; this keeps asyncio from logging
    # "exception never retrieved" for expects that failed while nobody awaited them.
    if not fut.cancelled():
        fut.exception()

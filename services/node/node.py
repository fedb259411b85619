"""The node process: one engine, one KV agent, the handler(s) of its current role.

Life of a node (one step a line):

1. ``start``: build the engine (weights, KV pool; shared memory on CPU), start the KV
   agent, connect to NATS, subscribe to its verbs and to cancels, start load reports.
2. READY: SubmitRequest -> prefill handler; KVAllocRequest / KVDone -> decode handler;
   Cancel -> both; NcclRendezvous -> the agent; a LoadReport every ``report_interval_s``.
3. SetRole: ack; DRAINING; new work is accepted only if the *new* role serves it (the
   rest is refused with OVERLOADED so the gateway re-places it); work of the old role
   already running finishes (bounded by ``role_drain_timeout_s``; past it, it still runs
   to its end, since the one engine serves both kinds); then the new role, READY.
4. ``stop``: STOPPING (new work refused), NodeBye, in-flight work drains (bounded by
   ``drain_timeout_s``, then cancelled), engine stopped, agent closed, ``nc.drain()``.

Which work a role serves: ``prefill`` and ``hybrid`` take SubmitRequests to hand off;
``decode`` and ``hybrid`` take KVAllocRequests; a colocated SubmitRequest
(``decode_node`` is this node) is taken in every role, so the scheduler may fall back to
one node for a whole request. KVDone and Cancel always reach the work they belong to.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from libs.engine.async_engine import AsyncEngine
from libs.engine.config import EngineConfig
from libs.engine.protocol import Engine
from libs.kvtransfer.agent import KVAgent
from libs.protocol import messages
from libs.protocol.messages import (
    Ack, Cancel, ErrorCode, KVAllocReply, KVAllocRequest, KVDone, NcclRendezvous, NcclRendezvousReply, NodeBye,
    NodeState, Role, SetRole, SubmitRequest,
)
from libs.protocol.subjects import NodeVerb, check_token, node, node_bye, node_load, request_cancel
from services.common import faults
from services.common.lifecycle import TaskGroup
from services.common.messaging import respond, subscribe
from services.decode.handler import DecodeHandler
from services.node_common import metrics
from services.node_common.config import NodeConfig
from services.node_common.context import NodeContext
from services.node.load import build_report, device_info
from services.node_common.streaming import engine_params
from services.node_common.validation import check_offsets, check_prompt, check_reply_subject, vocab_size
from services.prefill.handler import PrefillHandler

log = logging.getLogger(__name__)


class Work(str, enum.Enum):
    """Kinds of work a node takes; a role serves some of them."""

    PREFILL = "prefill"  # prefill and hand off
    DECODE = "decode"  # receive a hand-off and decode
    COLOCATED = "colocated"  # the whole request here


SERVES: dict[Role, frozenset[Work]] = {
    Role.PREFILL: frozenset({Work.PREFILL, Work.COLOCATED}),
    Role.DECODE: frozenset({Work.DECODE, Work.COLOCATED}),
    Role.HYBRID: frozenset({Work.PREFILL, Work.DECODE, Work.COLOCATED}),
}


def engine_config(config: NodeConfig) -> EngineConfig:
    return EngineConfig(
        model=config.model, device=config.device, dtype=config.dtype, block_size=config.block_size,
        num_blocks=config.num_blocks, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, target_step_s=config.target_step_s,
        prefill_gather_s=config.prefill_gather_s,
        max_model_len=config.max_model_len,
        enable_prefix_caching=config.enable_prefix_caching, shared_pool=config.shared_pool, seed=config.seed,
    )


def build_engine(config: NodeConfig) -> Engine:
    """The engine ``config.engine`` names, not started."""
    if config.engine == "vllm":
        from libs.engine.loader import smollm2_dir
        from libs.vllm_engine.engine import VllmEngine

        model = smollm2_dir() if config.model == "smollm2" else config.model
        return VllmEngine(model, model_name=config.model, dtype=config.dtype, block_size=config.block_size,
                          num_blocks=config.num_blocks, max_model_len=config.max_model_len,
                          max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          enable_prefix_caching=config.enable_prefix_caching, seed=config.seed,
                          alloc_timeout_s=config.kv_alloc_timeout_s / 2, enforce_eager=config.vllm_enforce_eager)
    return AsyncEngine(engine_config(config), prefix_hash_sample=config.prefix_hash_sample,
                       step_delay_s=faults.seconds("engine_slow_step"))


class Node:
    """A FlowKV node. ``await start(nc)``, serve, then ``await stop()``.

    Args:
        config: the node's configuration.
        engine: an engine already started (tests share one per process); None builds one
            from ``config``.
    """

    def __init__(self, config: NodeConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.role = config.role_enum  # the role reported; the old one while draining
        self.target_role = self.role  # the role whose work is accepted
        self.state = NodeState.READY
        self.started_at = time.time()
        self.engine = engine
        self._own_engine = engine is None
        self.agent: KVAgent | None = None
        self.nc: Client | None = None
        self.ctx: NodeContext | None = None
        self.prefill: PrefillHandler | None = None
        self.decode: DecodeHandler | None = None
        self._seq = 0
        self._subs: list[Any] = []
        self.tasks = TaskGroup(f"node-{self.node_id}")  # a failed critical task ends the process
        self._report_task: asyncio.Task[None] | None = None
        self._flip_task: asyncio.Task[None] | None = None
        self.leader_epoch = 0  # the highest scheduler-leader epoch a SetRole came with (the fence)
        self._device = device_info(config.device)

    # ------------------------------------------------------------- life cycle

    async def start(self, nc: Client) -> None:
        """Build what is missing, subscribe, start reporting. ``nc`` stays the caller's."""
        self.nc = nc
        if self.engine is None:
            self.engine = build_engine(self.config)
            await self.engine.start()
        self.agent = KVAgent(self.engine.pool, self.node_id, rendezvous=self._rendezvous,
                             tcp_host=self.config.kv_host, tcp_port=self.config.kv_port,
                             force_transport=self.config.kv_transport or None)
        await self.agent.start()
        self.ctx = NodeContext(nc, self.engine, self.agent, self.config, tasks=self.tasks)
        self.prefill = PrefillHandler(self.ctx)
        self.decode = DecodeHandler(self.ctx)
        verbs = [
            (node(self.node_id, NodeVerb.SUBMIT), self._on_submit, (SubmitRequest,)),
            (node(self.node_id, NodeVerb.KV_ALLOC), self._on_kv_alloc, (KVAllocRequest,)),
            (node(self.node_id, NodeVerb.KV_DONE), self._on_kv_done, (KVDone,)),
            (node(self.node_id, NodeVerb.ROLE), self._on_set_role, (SetRole,)),
            (node(self.node_id, NodeVerb.NCCL), self._on_nccl, (NcclRendezvous,)),
            (request_cancel(), self._on_cancel, (Cancel,)),
        ]
        for subject, handler, accept in verbs:
            self._subs.append(await subscribe(nc, subject, handler, accept))
        await nc.flush()
        self._report_task = self.tasks.spawn(self._report_loop(), "load")
        log.info("node %s up: role %s, model %s on %s, kv transports %s", self.node_id, self.role.value,
                 self.config.model, self._device.device_name, sorted(self.agent.transports))

    async def stop(self, reason: str = "shutdown") -> None:
        """Say bye, drain in-flight work (bounded), stop the engine and the agent."""
        assert self.nc is not None and self.prefill is not None and self.decode is not None
        self.state = NodeState.STOPPING
        with contextlib.suppress(Exception):
            await self.nc.publish(node_bye(), messages.encode(NodeBye(node_id=self.node_id, reason=reason)))
        await self._drain(self.config.drain_timeout_s)
        for task in (self._report_task, self._flip_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self.agent is not None:
            await self.agent.close()
        if self._own_engine and self.engine is not None:
            await self.engine.stop()
            self.engine.pool.close()  # unlinks the shared-memory pool
        log.info("node %s stopped (%s)", self.node_id, reason)

    async def _drain(self, timeout: float) -> None:
        assert self.prefill is not None and self.decode is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.prefill.wait_idle(timeout)
        await self.decode.wait_idle(max(0.0, deadline - loop.time()))
        if self.prefill.num_inflight() or self.decode.num_inflight():
            log.warning("drain timed out: cancelling %d prefill and %d decode requests",
                        self.prefill.num_inflight(), self.decode.num_inflight())
        await self.prefill.cancel_all()
        await self.decode.cancel_all()

    # ------------------------------------------------------------------ roles

    def accepts(self, work: Work) -> bool:
        """Whether new work of this kind is taken now (role, draining, stopping)."""
        return self.state is not NodeState.STOPPING and work in SERVES[self.target_role]

    def _inflight(self, work: Work) -> int:
        assert self.prefill is not None and self.decode is not None
        if work is Work.PREFILL:
            return self.prefill.num_inflight(colocated=False)
        if work is Work.DECODE:
            return self.decode.num_inflight()
        return self.prefill.num_inflight(colocated=True)

    async def set_role(self, role: Role) -> None:
        """Switch to ``role`` once the old role's work has drained (returns at once)."""
        if self._flip_task is not None:
            self._flip_task.cancel()
        self.target_role = role
        if self.state is not NodeState.STOPPING:
            self.state = NodeState.DRAINING
        self._flip_task = self.tasks.spawn(self._flip(role), "flip")

    async def _flip(self, role: Role) -> None:
        old = self.role
        leaving = SERVES[old] - SERVES[role]
        assert self.ctx is not None
        drained = await self.ctx.work_finished.wait_until(lambda: not any(self._inflight(w) for w in leaving),
                                                          self.config.role_drain_timeout_s)
        if not drained:
            log.warning("role flip %s -> %s: old-role work still running after %.0fs; it finishes in the new role",
                        old.value, role.value, self.config.role_drain_timeout_s)
        self.role = role
        if self.state is NodeState.DRAINING:
            self.state = NodeState.READY
        if old is not role:
            metrics.ROLE_FLIPS.labels(old.value, role.value).inc()
            log.info("role %s -> %s", old.value, role.value)
        try:
            await self._publish_report()  # the new role now, not at the next interval
        except Exception:  # a report lost is not worth the node: the next one follows
            log.exception("load report failed")

    # --------------------------------------------------------------- handlers

    def _refusal(self, work: Work) -> str:
        if self.state is NodeState.STOPPING:
            return f"{self.node_id} is stopping"
        return f"{self.node_id} does not take {work.value} work as {self.target_role.value}"

    async def _on_submit(self, req: SubmitRequest, msg: Msg) -> None:
        assert self.prefill is not None and self.ctx is not None
        work = Work.COLOCATED if req.decode_node == self.node_id else Work.PREFILL
        code, error = None, ""
        try:
            check_token(req.decode_node, "decode node")
            engine_params(req.sampling)
            check_prompt(req.prompt_token_ids, vocab_size(self.ctx.engine), self.ctx.engine.max_model_len)
            check_reply_subject(req.reply_subject)
            check_offsets(req.output_offset, req.num_original_prompt_tokens, len(req.prompt_token_ids))
        except ValueError as exc:
            code, error = ErrorCode.INVALID, str(exc)
        if code is None and self.ctx.was_cancelled(req.request_id):
            code, error = ErrorCode.CANCELLED, f"{req.request_id} was cancelled"
        elif code is None and not self.accepts(work):
            code, error = ErrorCode.OVERLOADED, self._refusal(work)
        if code is not None:
            metrics.REFUSED.labels("submit", code.value).inc()
            await respond(msg, Ack(request_id=req.request_id, ok=False, code=code, error=error))
            return
        await respond(msg, Ack(request_id=req.request_id))
        if req.request_id not in self.prefill.jobs:  # a resent submit must not run twice
            self.prefill.start(req, msg.headers)

    async def _on_kv_alloc(self, req: KVAllocRequest, msg: Msg) -> None:
        assert self.decode is not None and self.ctx is not None
        if self.ctx.was_cancelled(req.request_id):
            reply = KVAllocReply(request_id=req.request_id, transfer_id=req.transfer_id, ok=False,
                                 code=ErrorCode.CANCELLED, error=f"{req.request_id} was cancelled")
        elif not self.accepts(Work.DECODE):
            metrics.REFUSED.labels("kv_alloc", ErrorCode.OVERLOADED.value).inc()
            reply = KVAllocReply(request_id=req.request_id, transfer_id=req.transfer_id, ok=False,
                                 code=ErrorCode.OVERLOADED, error=self._refusal(Work.DECODE))
        else:
            reply = await self.decode.reserve(req, msg.headers)
        await respond(msg, reply)

    async def _on_kv_done(self, done: KVDone, msg: Msg) -> None:
        assert self.decode is not None
        await respond(msg, self.decode.kv_done(done))

    async def _on_cancel(self, cancel: Cancel, msg: Msg) -> None:
        assert self.ctx is not None and self.prefill is not None and self.decode is not None
        self.ctx.mark_cancelled(cancel.request_id)
        here = self.prefill.cancel(cancel.request_id) | self.decode.cancel(cancel.request_id)
        if here:
            log.info("cancelled %s: %s", cancel.request_id, cancel.reason or "no reason given")

    async def _on_set_role(self, req: SetRole, msg: Msg) -> None:
        if req.node_id != self.node_id:
            await respond(msg, Ack(request_id="", ok=False, code=ErrorCode.INVALID,
                                   error=f"SetRole for {req.node_id} reached {self.node_id}"))
            return
        if req.epoch and req.epoch < self.leader_epoch:  # from a scheduler that is no longer the leader
            await respond(msg, Ack(request_id="", ok=False, code=ErrorCode.INVALID,
                                   error=f"SetRole from a deposed scheduler (epoch {req.epoch} < {self.leader_epoch})"))
            return
        self.leader_epoch = max(self.leader_epoch, req.epoch)
        if self.state is NodeState.STOPPING:
            await respond(msg, Ack(request_id="", ok=False, code=ErrorCode.OVERLOADED, error=self._refusal(Work.PREFILL)))
            return
        await respond(msg, Ack(request_id=""))
        log.info("set role %s (%s)", req.role.value, req.reason or "no reason given")
        await self.set_role(req.role)

    async def _on_nccl(self, req: NcclRendezvous, msg: Msg) -> None:
        assert self.agent is not None
        result = self.agent.handle_rendezvous(req.payload)
        payload = await result if asyncio.iscoroutine(result) else result
        await respond(msg, NcclRendezvousReply(payload=payload))

    async def _rendezvous(self, peer: str, payload: bytes) -> bytes:
        """KVAgent's rendezvous callback: a NATS request to the peer's NCCL verb."""
        assert self.nc is not None
        reply = await self.nc.request(node(peer, NodeVerb.NCCL),
                                      messages.encode(NcclRendezvous(from_node=self.node_id, payload=payload)),
                                      timeout=self.config.kv_alloc_timeout_s)
        answer = messages.decode(reply.data)
        if not isinstance(answer, NcclRendezvousReply):
            raise RuntimeError(f"{peer} answered the NCCL rendezvous with {type(answer).__name__}")
        return answer.payload

    # ----------------------------------------------------------------- load

    async def _report_loop(self) -> None:
        while True:
            try:
                await self._publish_report()
            except Exception:  # a report lost is not worth the node: the next one follows
                log.exception("load report failed")
            await asyncio.sleep(self.config.report_interval_s)

    async def _publish_report(self) -> None:
        assert self.nc is not None and self.engine is not None and self.agent is not None
        # Never waits for the engine: a step may run for seconds on a busy CPU node, and
        # a report late past the scheduler's node timeout would make a busy node "dead".
        hashes = self.engine.prefix_hashes()
        self._seq += 1
        report = build_report(
            node_id=self.node_id, role=self.role, state=self.state, seq=self._seq, started_at=self.started_at,
            engine=self.engine, device=self._device, hashes=hashes, transports=sorted(self.agent.transports),
            host_id=self.agent.host_id, max_num_seqs=self.config.max_num_seqs, transfers=self.ctx.transfers,
        )
        metrics.observe_report(report)
        await self.nc.publish(node_load(), messages.encode(report))


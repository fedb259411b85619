"""A protocol-conformant stand-in for the scheduler and the nodes, on a real nats-server.

Test double only (never product code). It answers ``sched_place`` and ``sched_cluster``,
serves ``node(id, SUBMIT)`` for each of its nodes, and streams deterministic tokens: the
output token at position ``k`` of a request is ``prompt[k % len(prompt)]`` of its
*original* prompt, so a retry that resumes at ``output_offset`` continues the very same
sequence. Knobs make it misbehave the ways real clusters do: chunks split between a
prefill and a decode node, sent out of order, duplicated; a node that dies mid-stream
(silently, or announced by a NODE_DOWN event); a scheduler that rejects.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg

from libs.protocol import subjects
from libs.protocol.messages import (
    Ack, Cancel, ClusterQuery, ClusterState, ErrorCode, EventKind, LoadReport, NodeState, Placement, PlaceRequest,
    Rejected, Role, SchedEvent, SubmitRequest, TokenChunk, TokenLogprob, encode,
)
from services.common.messaging import respond, subscribe


def expected_tokens(prompt: list[int], n: int, start: int = 0) -> list[int]:
    """The tokens the fake produces for ``prompt`` at output positions ``start..start+n``."""
    return [prompt[k % len(prompt)] for k in range(start, start + n)]


@dataclass
class FakeCluster:
    """Scheduler + nodes double.

    Args:
        nc: a NATS connection of its own.
        pairs: (prefill node, decode node) pairs, tried in order by placement; a pair
            with the same id twice is one node doing both.
        chunk_size: tokens per chunk from the decode node.
        reverse: publish each request's chunks in reverse order.
        duplicate: publish every chunk twice.
        die_after: node id -> it dies once the request reaches this many output tokens
            (chunks from it stop; its submit subject stops answering).
        announce_death: publish NODE_DOWN on ``sched_events()`` when a node dies.
        reject: answer every placement with this instead.
        noticed_after_s: the scheduler places on a dead node until it has been dead this
            long (a real scheduler notices a silent node after its node timeout).
        hold: don't stream anything after the ack (for cancel tests) until released.
        hold_place: never answer a placement (a request waiting in the scheduler's queue).
        hung: answer neither placements nor cluster queries (a scheduler that hangs).
        queued_s: wait this long before answering a placement, and report it as the
            Placement's ``queued_s`` (a request held in a real scheduler's queue).
        prefill_s: the engine prefill time the first token reports (``TokenChunk.prefill_s``).
        eos_token_id: finish with reason "stop" when this token is produced.
    """

    nc: Client
    pairs: list[tuple[str, str]] = field(default_factory=lambda: [("P0", "D0")])
    chunk_size: int = 2
    reverse: bool = False
    duplicate: bool = False
    die_after: dict[str, int] = field(default_factory=dict)
    announce_death: bool = True
    reject: Rejected | None = None
    noticed_after_s: float = 0.0
    hold: bool = False
    hold_place: bool = False
    hung: bool = False
    cluster_queries: list[ClusterQuery] = field(default_factory=list)
    queued_s: float = 0.0
    prefill_s: float = 0.0
    eos_token_id: int | None = None
    with_logprobs: bool = True
    places: list[PlaceRequest] = field(default_factory=list)
    submits: list[SubmitRequest] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    died_at: dict[str, float] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    _subs: dict[str, object] = field(default_factory=dict)
    _tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def node_ids(self) -> list[str]:
        return sorted({n for pair in self.pairs for n in pair})

    async def start(self) -> FakeCluster:
        self._subs["place"] = await subscribe(self.nc, subjects.sched_place(), self._on_place, (PlaceRequest,))
        self._subs["cluster"] = await subscribe(self.nc, subjects.sched_cluster(), self._on_cluster, (ClusterQuery,))
        self._subs["cancel"] = await subscribe(self.nc, subjects.request_cancel(), self._on_cancel, (Cancel,))
        for node_id in self.node_ids:
            self._subs[node_id] = await subscribe(
                self.nc, subjects.node(node_id, subjects.NodeVerb.SUBMIT), self._submit_handler(node_id), (SubmitRequest,)
            )
        await self.nc.flush()
        return self

    async def add_node(self, node_id: str) -> None:
        """A node joins: its submit subject answers from now on."""
        self._subs[node_id] = await subscribe(
            self.nc, subjects.node(node_id, subjects.NodeVerb.SUBMIT), self._submit_handler(node_id), (SubmitRequest,)
        )
        await self.nc.flush()

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs.values():
            try:
                await sub.unsubscribe()  # type: ignore[attr-defined]
            except Exception:
                pass

    async def _on_place(self, req: PlaceRequest, msg: Msg) -> None:
        self.places.append(req)
        if self.hold_place or self.hung:
            return
        if self.reject is not None:
            await respond(msg, Rejected(request_id=req.request_id, code=self.reject.code, reason=self.reject.reason,
                                        retry_after_s=self.reject.retry_after_s))
            return
        if self.queued_s:
            await asyncio.sleep(self.queued_s)
        noticed = {n for n in self.dead if time.monotonic() - self.died_at[n] >= self.noticed_after_s}
        for p, d in self.pairs:
            if {p, d} & (noticed | set(req.exclude_nodes)):
                continue
            await respond(msg, Placement(request_id=req.request_id, prefill_node=p, decode_node=d, queued_s=self.queued_s))
            return
        await respond(msg, Rejected(request_id=req.request_id, code=ErrorCode.NO_NODES, reason="no live node pair"))

    async def _on_cluster(self, q: ClusterQuery, msg: Msg) -> None:
        self.cluster_queries.append(q)
        if self.hung:
            return
        nodes = [_report(n) for n in self.node_ids if n not in self.dead]
        await respond(msg, ClusterState(policy="fake", nodes=nodes, events=[]))

    async def _on_cancel(self, c: Cancel, msg: Msg) -> None:
        self.cancels.append(c)

    def _submit_handler(self, node_id: str):
        async def on_submit(req: SubmitRequest, msg: Msg) -> None:
            if node_id in self.dead:
                return  # a dead node answers nothing
            self.submits.append(req)
            await respond(msg, Ack(request_id=req.request_id))
            task = asyncio.create_task(self._run(node_id, req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_submit

    def _chunks(self, prefill: str, req: SubmitRequest) -> list[TokenChunk]:
        original = req.prompt_token_ids[: req.num_original_prompt_tokens or len(req.prompt_token_ids)]
        n = req.sampling.max_tokens
        out = expected_tokens(original, n, req.output_offset)
        finish_at = len(out)
        reason = "length"
        if self.eos_token_id is not None and self.eos_token_id in out:
            finish_at, reason = out.index(self.eos_token_id) + 1, "stop"
        out = out[:finish_at]
        chunks: list[TokenChunk] = []
        pos = 0
        while pos < len(out):
            size = 1 if pos == 0 else self.chunk_size  # the prefill node's first token, then decode chunks
            node = prefill if pos == 0 else req.decode_node
            ids = out[pos : pos + size]
            lps = [TokenLogprob(t, -0.5, [t, t + 1], [-0.5, -1.5]) for t in ids] if self.with_logprobs else None
            chunks.append(TokenChunk(
                request_id=req.request_id, node_id=node, index=req.output_offset + pos, token_ids=ids, logprobs=lps,
                num_prompt_tokens=len(req.prompt_token_ids), prefill_s=self.prefill_s if pos == 0 else 0.0,
            ))
            pos += size
        if chunks:
            chunks[-1].finished, chunks[-1].finish_reason = True, reason
        return chunks

    async def _run(self, prefill: str, req: SubmitRequest) -> None:
        if self.hold:
            await self.released.wait()
        chunks = self._chunks(prefill, req)
        if self.reverse:
            chunks.reverse()
        for c in chunks:
            limit = self.die_after.get(c.node_id)
            if c.node_id in self.dead:
                return
            if limit is not None and c.index + len(c.token_ids) > limit:
                await self.kill(c.node_id)
                return
            if any(x.request_id == req.request_id for x in self.cancels):
                return
            for _ in range(2 if self.duplicate else 1):
                await self.nc.publish(req.reply_subject, encode(c))
            await asyncio.sleep(0)

    async def kill(self, node_id: str) -> None:
        """The node dies: it stops streaming and answering; NODE_DOWN if ``announce_death``."""
        if node_id in self.dead:
            return
        self.dead.add(node_id)
        self.died_at[node_id] = time.monotonic()
        if self.announce_death:
            await self.nc.publish(
                subjects.sched_events(), encode(SchedEvent(kind=EventKind.NODE_DOWN, ts=time.time(), node_id=node_id, detail="killed"))
            )


def _report(node_id: str) -> LoadReport:
    return LoadReport(
        node_id=node_id, role=Role.PREFILL if node_id.startswith("P") else Role.DECODE, state=NodeState.READY, seq=1,
        started_at=0.0, model="tiny", device="cpu", device_name="cpu", device_memory_bytes=0, max_model_len=2048,
        block_size=16, kv_block_bytes=1, total_blocks=100, free_blocks=100, largest_free_segment=100, num_waiting=0,
        waiting_prefill_tokens=0, num_running=0, num_held=0, prefill_tokens_per_s=0.0, decode_step_s=0.0,
    )

"""Node services end to end over a real nats-server: a P node and a D node in this process.

The test plays the gateway: it sends SubmitRequests straight to the prefill node and
collects TokenChunks from its stream subject. Each node has its own engine (the tiny
preset, shared-memory pools, so the hand-off uses ``shm``) and its own NATS connection.
"""

from __future__ import annotations

import asyncio
import os
import contextlib
from collections.abc import AsyncIterator, Callable

import msgspec
import nats
import pytest
import torch
from prometheus_client import REGISTRY

from libs.engine.async_engine import AsyncEngine
from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.engine.sampling import SamplingParams as EngineParams
from libs.kvtransfer.base import TransferError
from libs.protocol import messages
from libs.protocol.messages import (
    Ack, Cancel, ErrorCode, KVAllocReply, KVAllocRequest, LoadReport, NodeState, Role, SamplingParams, SetRole,
    SubmitRequest, TokenChunk,
)
from libs.protocol.subjects import NodeVerb, all_subjects_of, node, node_load, request_cancel, stream
from services.node.node import Node
from services.node_common.config import NodeConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService

BLOCKS = 48
BS = 4
GW = "gw0"
PROMPT = [(7 * i + 3) % 4000 + 10 for i in range(37)]  # 37 tokens: 9 full blocks and a partial one
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def reference(llm: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    """The engine's own colocated greedy output (run before any AsyncEngine drives ``llm``)."""
    llm.add_request("ref", list(prompt), EngineParams(**msgspec.structs.asdict(params)))
    tokens: list[int] = []
    while llm.has_work():
        for out in llm.step():
            tokens += out.token_ids
    return tokens


@pytest.fixture(scope="module")
def engines():
    """Two tiny engines (same seed, so same weights) and the reference outputs, built once."""
    torch.set_num_threads(2)
    make = lambda: LLMEngine(EngineConfig(model="tiny", num_blocks=BLOCKS, block_size=BS, shared_pool=True))  # noqa: E731
    p, d = make(), make()
    refs = {"greedy": reference(p, PROMPT, GREEDY),
            "long": reference(p, PROMPT, msgspec.structs.replace(GREEDY, max_tokens=100))}
    yield p, d, refs
    p.pool.close()
    d.pool.close()


@contextlib.asynccontextmanager
async def running_node(url: str, llm: LLMEngine, node_id: str, role: Role, **overrides) -> AsyncIterator[Node]:
    engine = AsyncEngine(engine=llm)
    await engine.start()
    nc = await nats.connect(url)
    config = NodeConfig(node_id=node_id, role=role.value, model="tiny", block_size=BS, num_blocks=BLOCKS,
                        report_interval_s=0.05, **overrides)
    node_ = Node(config, engine=engine)
    await node_.start(nc)
    try:
        yield node_
    finally:
        await node_.stop("test over")
        await engine.stop()
        await nc.drain()


class Gateway:
    """Plays the gateway: submits requests and gathers their chunks."""

    def __init__(self, nc) -> None:  # type: ignore[no-untyped-def]
        self.nc = nc
        self.chunks: dict[str, list[TokenChunk]] = {}
        self.finished: dict[str, asyncio.Event] = {}

    async def start(self) -> Gateway:
        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            chunk = messages.decode(msg.data)
            self.chunks.setdefault(chunk.request_id, []).append(chunk)
            if chunk.finished:
                self.finished.setdefault(chunk.request_id, asyncio.Event()).set()

        await self.nc.subscribe(stream(GW), cb=on_chunk)
        await self.nc.flush()
        return self

    async def submit(self, to: str, rid: str, decode_node: str, params: SamplingParams = GREEDY,
                     prompt: list[int] = PROMPT) -> Ack:
        self.finished.setdefault(rid, asyncio.Event())
        req = SubmitRequest(request_id=rid, prompt_token_ids=prompt, sampling=params, decode_node=decode_node,
                            reply_subject=stream(GW))
        reply = await self.nc.request(node(to, NodeVerb.SUBMIT), messages.encode(req), timeout=10)
        return messages.decode(reply.data)

    async def result(self, rid: str) -> list[TokenChunk]:
        await asyncio.wait_for(self.finished.setdefault(rid, asyncio.Event()).wait(), 60)
        return sorted(self.chunks[rid], key=lambda c: c.index)


def tokens(chunks: list[TokenChunk]) -> list[int]:
    out: list[int] = []
    for c in chunks:
        assert c.index == len(out), f"chunk index {c.index} after {len(out)} tokens"
        out += c.token_ids
    return out


async def eventually(pred: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Wait until ``pred()`` holds (the limit only bounds a hung test; it asserts no speed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


def idle(*nodes: Node) -> bool:
    return all(n.engine.stats().free_blocks == BLOCKS and not n.prefill.jobs and not n.decode.reservations
               for n in nodes)


# ------------------------------------------------------------------------ tests


async def test_disaggregated_greedy_equals_colocated(nats_server, engines):
    p_llm, d_llm, refs = engines
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE) as d:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        ack = await gw.submit("p0", "r1", decode_node="d0")
        assert ack == Ack(request_id="r1")
        chunks = await gw.result("r1")
        assert tokens(chunks) == refs["greedy"]
        assert chunks[0].node_id == "p0" and chunks[0].index == 0
        assert {c.node_id for c in chunks[1:]} == {"d0"}
        assert chunks[-1].finish_reason == "length" and chunks[-1].num_prompt_tokens == len(PROMPT)
        await eventually(lambda: idle(p, d), "blocks free on both nodes")
        # Again: D now has the prompt's 9 full blocks cached, so only the partial block moves.
        await gw.submit("p0", "r2", decode_node="d0")
        chunks = await gw.result("r2")
        assert tokens(chunks) == refs["greedy"]
        assert chunks[-1].num_cached_tokens == 36
        await eventually(lambda: idle(p, d), "blocks free on both nodes")
        await gw.nc.drain()


async def test_colocated_on_one_node(nats_server, engines):
    p_llm, _, refs = engines
    async with running_node(nats_server.url, p_llm, "h0", Role.HYBRID) as h:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        assert (await gw.submit("h0", "c1", decode_node="h0")).ok
        chunks = await gw.result("c1")
        assert tokens(chunks) == refs["greedy"]
        assert {c.node_id for c in chunks} == {"h0"}
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
        await eventually(lambda: idle(h), "blocks free")
        await gw.nc.drain()


async def test_cancel_frees_blocks_on_both_nodes(nats_server, engines):
    p_llm, d_llm, _ = engines
    long = msgspec.structs.replace(GREEDY, max_tokens=100)
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE) as d:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        assert (await gw.submit("p0", "x1", decode_node="d0", params=long)).ok
        await eventually(lambda: any(c.node_id == "d0" for c in gw.chunks.get("x1", [])), "D streams tokens")
        assert d.decode.reservations["x1"].phase.value == "decoding"
        await gw.nc.publish(request_cancel(), messages.encode(Cancel(request_id="x1", reason="client left")))
        await eventually(lambda: idle(p, d), "blocks free on both nodes after the cancel")
        assert sum(len(c.token_ids) for c in gw.chunks["x1"]) < 100
        # A reservation asked for after the cancel is refused (the cancel may outrun it).
        alloc = KVAllocRequest(request_id="x1", transfer_id="x1.t", prefill_node="p0", prompt_token_ids=PROMPT,
                               sampling=GREEDY, reply_subject=stream(GW), sender_info=msgspec.msgpack.encode(p.agent.info()),
                               src_block_ids=list(range(10)))
        reply = messages.decode((await gw.nc.request(node("d0", NodeVerb.KV_ALLOC), messages.encode(alloc), timeout=5)).data)
        assert reply.ok is False and reply.code is ErrorCode.CANCELLED
        await gw.nc.drain()


async def test_failed_transfer_recomputes_on_decode_node(nats_server, engines):
    p_llm, d_llm, refs = engines
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE) as d:

        async def broken_send(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise TransferError("link down")

        p.agent.send = broken_send  # P sends KVDone(ok=False, error="link down")
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        assert (await gw.submit("p0", "f1", decode_node="d0")).ok
        chunks = await gw.result("f1")
        assert tokens(chunks) == refs["greedy"]
        assert [c.node_id for c in chunks][:2] == ["p0", "d0"]
        assert chunks[-1].num_prompt_tokens == len(PROMPT)
        await eventually(lambda: idle(p, d), "blocks free on both nodes")
        await gw.nc.drain()


async def test_reservation_without_kv_done_is_released_after_the_lease(nats_server, engines):
    p_llm, d_llm, _ = engines
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE, lease_s=0.5) as d:
        nc = await nats.connect(nats_server.url)
        alloc = KVAllocRequest(request_id="l1", transfer_id="l1.t", prefill_node="p0", prompt_token_ids=PROMPT,
                               sampling=GREEDY, reply_subject=stream(GW),
                               sender_info=msgspec.msgpack.encode(p.agent.info()), src_block_ids=list(range(10)))
        reply = messages.decode((await nc.request(node("d0", NodeVerb.KV_ALLOC), messages.encode(alloc), timeout=5)).data)
        assert isinstance(reply, KVAllocReply) and reply.ok and reply.transport == "shm"
        assert len(reply.dst_block_ids) == 10
        assert d.engine.stats().free_blocks <= BLOCKS - 10 + reply.num_cached_tokens // BS
        await eventually(lambda: idle(d), "the reservation released after its lease")
        await nc.drain()


async def test_set_role_flips_without_losing_requests(nats_server, engines):
    p_llm, d_llm, refs = engines
    long = msgspec.structs.replace(GREEDY, max_tokens=100)
    reports: list[LoadReport] = []
    async with running_node(nats_server.url, p_llm, "a", Role.PREFILL) as a, \
            running_node(nats_server.url, d_llm, "b", Role.DECODE) as b:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        await gw.nc.subscribe(node_load(), cb=collect_into(reports))
        assert (await gw.submit("a", "s1", decode_node="b", params=long)).ok
        await eventually(lambda: any(c.node_id == "b" for c in gw.chunks.get("s1", [])), "b decodes s1")
        for who, role in (("a", Role.DECODE), ("b", Role.PREFILL)):
            ack = messages.decode((await gw.nc.request(node(who, NodeVerb.ROLE),
                                                       messages.encode(SetRole(node_id=who, role=role)), timeout=5)).data)
            assert ack.ok
        assert b.state is NodeState.DRAINING and b.role is Role.DECODE  # s1 still decodes on b
        refused = await gw.submit("a", "s2", decode_node="b")  # a no longer takes prefill work
        assert (refused.ok, refused.code) == (False, ErrorCode.OVERLOADED)
        chunks = await gw.result("s1")
        assert tokens(chunks) == refs["long"]  # the in-flight request finished, nothing lost
        await eventually(lambda: (a.role, b.role, a.state, b.state) == (Role.DECODE, Role.PREFILL, NodeState.READY,
                                                                         NodeState.READY), "both flipped")
        await eventually(lambda: any(r.node_id == "b" and r.role is Role.PREFILL and r.state is NodeState.READY
                                     for r in reports), "b reports its new role")
        assert (await gw.submit("b", "s3", decode_node="a")).ok  # now the other way round
        chunks = await gw.result("s3")
        assert tokens(chunks) == refs["greedy"]
        assert [c.node_id for c in chunks][:2] == ["b", "a"]
        await eventually(lambda: idle(a, b), "blocks free on both nodes")
        await gw.nc.drain()


async def test_set_role_waits_for_a_reservation_still_being_made(nats_server, engines):
    # An engine may take a while to reserve a hand-off's blocks (vLLM's reserves in a step of
    # its own). A SetRole away from decode that lands meanwhile must wait for that request as
    # for any other decode work: the node reports the new role only once it is decoded.
    p_llm, d_llm, refs = engines
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE) as d:
        reserving = asyncio.Event()
        allocate = d.engine.allocate_remote

        async def slow_allocate(*args, **kwargs):  # type: ignore[no-untyped-def]
            reserving.set()
            await asyncio.sleep(1.0)
            return await allocate(*args, **kwargs)

        d.engine.allocate_remote = slow_allocate
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        assert (await gw.submit("p0", "w1", decode_node="d0")).ok
        await asyncio.wait_for(reserving.wait(), 30)
        ack = messages.decode((await gw.nc.request(node("d0", NodeVerb.ROLE),
                                                   messages.encode(SetRole(node_id="d0", role=Role.PREFILL)),
                                                   timeout=5)).data)
        assert ack.ok
        await eventually(lambda: d.target_role is Role.PREFILL, "d0 took the SetRole")
        await asyncio.sleep(0.2)  # the flip has looked at the work in flight by now
        assert (d.role, d.state) == (Role.DECODE, NodeState.DRAINING)
        chunks = await gw.result("w1")
        assert tokens(chunks) == refs["greedy"]
        assert [c.node_id for c in chunks][:2] == ["p0", "d0"]  # decoded where it was reserved
        await eventually(lambda: (d.role, d.state) == (Role.PREFILL, NodeState.READY), "d0 flipped")
        await eventually(lambda: idle(p, d), "blocks free on both nodes")
        await gw.nc.drain()


async def test_flips_into_and_out_of_hybrid_keep_every_request(nats_server, engines):
    # The moves the goodput planner makes: a hybrid node turned prefill while it decodes a
    # hand-off and a request of its own, a decode node turned hybrid while it decodes.
    # Every request is answered once, with the colocated greedy tokens, where it started
    # decoding; the blocks come back.
    p_llm, d_llm, refs = engines
    long = msgspec.structs.replace(GREEDY, max_tokens=100)
    short = msgspec.structs.replace(GREEDY, max_tokens=8)

    async def set_role(gw: Gateway, who: str, role: Role) -> None:
        ack = messages.decode((await gw.nc.request(node(who, NodeVerb.ROLE),
                                                   messages.encode(SetRole(node_id=who, role=role)), timeout=5)).data)
        assert ack.ok

    async with running_node(nats_server.url, p_llm, "h0", Role.HYBRID) as h, \
            running_node(nats_server.url, d_llm, "p0", Role.PREFILL) as p:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        assert (await gw.submit("p0", "x1", decode_node="h0", params=long)).ok  # a hand-off h0 decodes
        assert (await gw.submit("h0", "c1", decode_node="h0", params=short)).ok  # h0's own request
        await eventually(lambda: any(c.node_id == "h0" for c in gw.chunks.get("x1", [])[1:]), "h0 decodes x1")
        await set_role(gw, "h0", Role.PREFILL)
        if not gw.finished["x1"].is_set():
            assert h.role is Role.HYBRID  # a decode it took is still running: the role waits for it
        x1, c1 = await gw.result("x1"), await gw.result("c1")
        assert tokens(x1) == refs["long"] and {c.node_id for c in x1[1:]} == {"h0"}
        assert tokens(c1) == refs["long"][:8] and {c.node_id for c in c1} == {"h0"}
        await eventually(lambda: (h.role, h.state) == (Role.PREFILL, NodeState.READY), "h0 turned prefill")
        # Now p0 turns decode (nothing to drain) and decodes a hand-off from h0, during which
        # it turns hybrid: that takes nothing from it, so the flip does not wait.
        await set_role(gw, "p0", Role.DECODE)
        await eventually(lambda: (p.role, p.state) == (Role.DECODE, NodeState.READY), "p0 turned decode")
        assert (await gw.submit("h0", "x2", decode_node="p0", params=long)).ok
        await eventually(lambda: any(c.node_id == "p0" for c in gw.chunks.get("x2", [])[1:]), "p0 decodes x2")
        await set_role(gw, "p0", Role.HYBRID)
        await eventually(lambda: (p.role, p.state) == (Role.HYBRID, NodeState.READY), "p0 turned hybrid")
        assert (await gw.submit("p0", "c2", decode_node="p0")).ok  # a hybrid node serves a request alone
        x2, c2 = await gw.result("x2"), await gw.result("c2")
        assert tokens(x2) == refs["long"] and x2[0].node_id == "h0" and {c.node_id for c in x2[1:]} == {"p0"}
        assert tokens(c2) == refs["greedy"] and {c.node_id for c in c2} == {"p0"}
        assert sorted(gw.chunks) == ["c1", "c2", "x1", "x2"]  # nothing else answered
        await eventually(lambda: idle(h, p), "blocks free on both nodes")
        await gw.nc.drain()


def collect_into(reports: list[LoadReport]):  # type: ignore[no-untyped-def]
    async def on_report(msg) -> None:  # type: ignore[no-untyped-def]
        reports.append(messages.decode(msg.data))

    return on_report


async def test_load_reports(nats_server, engines):
    p_llm, _, _ = engines
    reports: list[LoadReport] = []
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p:
        nc = await nats.connect(nats_server.url)
        await nc.subscribe(node_load(), cb=collect_into(reports))
        await eventually(lambda: len(reports) >= 2, "two load reports")
        r = reports[-1]
        assert (r.node_id, r.role, r.state, r.model, r.device) == ("p0", Role.PREFILL, NodeState.READY, "tiny", "cpu")
        assert (r.total_blocks, r.free_blocks, r.block_size) == (BLOCKS, BLOCKS, BS)
        assert r.kv_block_bytes == p.engine.layout.block_bytes
        assert r.kv_transports == ["shm", "tcp"] and r.host_id == p.agent.host_id
        assert reports[-1].seq > reports[-2].seq and r.max_num_seqs == 64
        # A CPU engine says how many threads it computes with and where it may run (its
        # share of the cores is measured once it steps).
        assert r.cpu_threads == torch.get_num_threads() and set(r.cpu_set) == os.sched_getaffinity(0)
        await nc.drain()


async def test_garbage_on_every_subject_does_not_crash_the_node(nats_server, engines):
    p_llm, _, refs = engines
    async with running_node(nats_server.url, p_llm, "h0", Role.HYBRID) as h:
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        wrong = messages.encode(Ack(request_id="zz"))  # well formed, but no subject of a node takes it
        for subject in all_subjects_of("h0"):
            for payload in (b"", b"\x00garbage\xff", b"\x81\xa4type\xa6submit", wrong, b"x" * 100_000):
                await gw.nc.publish(subject, payload)
                with contextlib.suppress(Exception):
                    await gw.nc.request(subject, payload, timeout=0.2)
        bad = SubmitRequest(request_id="bad", prompt_token_ids=[], sampling=GREEDY, decode_node="h0",
                            reply_subject=stream(GW))
        ack = messages.decode((await gw.nc.request(node("h0", NodeVerb.SUBMIT), messages.encode(bad), timeout=5)).data)
        assert (ack.ok, ack.code) == (False, ErrorCode.INVALID)
        assert (await gw.submit("h0", "ok1", decode_node="h0")).ok
        assert tokens(await gw.result("ok1")) == refs["greedy"]
        await eventually(lambda: idle(h), "blocks free")
        await gw.nc.drain()


async def test_hand_off_over_tcp(nats_server, engines):
    p_llm, d_llm, refs = engines
    reports: list[LoadReport] = []
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL, kv_transport="tcp") as p, \
            running_node(nats_server.url, d_llm, "d0", Role.DECODE, kv_transport="tcp") as d:
        before = {t: _sent_bytes(t) for t in ("tcp", "shm")}
        gw = await Gateway(await nats.connect(nats_server.url)).start()
        await gw.nc.subscribe(node_load(), cb=collect_into(reports))
        assert (await gw.submit("p0", "t1", decode_node="d0", prompt=PROMPT[:30])).ok
        assert (await gw.submit("p0", "t2", decode_node="d0")).ok
        assert tokens(await gw.result("t2")) == refs["greedy"]
        chunks = await gw.result("t1")
        assert len(tokens(chunks)) == 12 and chunks[1].node_id == "d0"
        tcp_bytes = _sent_bytes("tcp") - before["tcp"]
        assert tcp_bytes > 0 and tcp_bytes % p.engine.layout.block_bytes == 0
        assert _sent_bytes("shm") == before["shm"]
        await eventually(lambda: idle(p, d), "blocks free on both nodes")
        # P reports the link it measured to d0, from the transfers it made.
        sent = p.ctx.transfers
        await eventually(lambda: any(r.node_id == "p0" and r.kv_sent_transfers == sent.sent_transfers
                                     for r in reports), "a report after the hand-offs")
        r = next(r for r in reversed(reports) if r.node_id == "p0")
        assert sent.sent_transfers == 2 and r.kv_links == sent.links.snapshot()
        (link,) = r.kv_links
        assert (link.peer, link.transfers) == ("d0", 2)
        assert link.bandwidth_bytes_per_s > 0 and link.latency_s >= 0
        await gw.nc.drain()


async def test_refused_hand_off_moves_to_another_decode_node(nats_server, engines):
    # The placed decode node is gone (or flipped to prefill) when P asks it for blocks: P
    # asks the scheduler for another, tells the gateway, and hands the KV off there.
    p_llm, d_llm, refs = engines
    sched_nc = await nats.connect(nats_server.url)
    sched = SchedulerService(SchedulerConfig(policy="least_loaded", role_interval_s=0.05), sched_nc)
    await sched.start()
    moves = REGISTRY.get_sample_value("flowkv_node_handoff_moves_total") or 0.0
    try:
        async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL) as p, \
                running_node(nats_server.url, d_llm, "d0", Role.DECODE) as d:
            await eventually(lambda: len(sched.registry) == 2, "the scheduler knows both nodes")
            gw = await Gateway(await nats.connect(nats_server.url)).start()
            assert (await gw.submit("p0", "m1", decode_node="gone")).ok
            chunks = await gw.result("m1")
            notice = [c for c in chunks if c.handoff_to]
            assert [(c.node_id, c.handoff_to, c.token_ids) for c in notice] == [("p0", "d0", [])]
            toks = [c for c in chunks if not c.handoff_to]
            assert tokens(toks) == refs["greedy"]
            assert toks[0].node_id == "p0" and {c.node_id for c in toks[1:]} == {"d0"}
            assert REGISTRY.get_sample_value("flowkv_node_handoff_moves_total") == moves + 1
            await eventually(lambda: idle(p, d), "blocks free on both nodes")
            await gw.nc.drain()
    finally:
        await sched.close()
        await sched_nc.drain()


def _sent_bytes(transport: str) -> float:
    return REGISTRY.get_sample_value("flowkv_node_kv_transfer_bytes_total", {"transport": transport}) or 0.0


async def test_nccl_rendezvous_is_answered(nats_server, engines):
    p_llm, _, _ = engines
    async with running_node(nats_server.url, p_llm, "p0", Role.PREFILL):
        nc = await nats.connect(nats_server.url)
        ask = messages.NcclRendezvous(from_node="d9", payload=b"hello")
        reply = messages.decode((await nc.request(node("p0", NodeVerb.NCCL), messages.encode(ask), timeout=5)).data)
        # A CPU node has no NCCL transport: the agent answers with its refusal.
        from libs.kvtransfer.transports.nccl import rendezvous_refusal

        assert reply == messages.NcclRendezvousReply(payload=rendezvous_refusal("p0 has no NCCL transport"))
        await nc.drain()

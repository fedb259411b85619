"""The node setting ``kv_transfer_granularity``: real P and D nodes (tiny preset, CPU) over
a real nats-server, for each granularity over ``shm`` and ``tcp``.

Each hand-off must land the same bytes in D's pool (checked the moment P's send returns,
before D is told), give the same greedy tokens as a colocated engine, and make the calls
its granularity says: ``merged`` 1 for a fresh (contiguous on both sides) hand-off,
``layerwise`` one per layer, ``blockwise`` blocks × layers × 2. D follows P's granularity
(from P's ``AgentInfo``) even when its own setting differs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
import torch

from libs.engine.async_engine import AsyncEngine
from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.engine.sampling import SamplingParams as EngineParams
from libs.kvtransfer.base import AgentInfo, TransferMode
from libs.kvtransfer.layout import KVLayout
from libs.protocol import messages
from libs.protocol.messages import ErrorCode, KVAllocReply, KVAllocRequest, Role, SamplingParams, SubmitRequest, TokenChunk
from libs.protocol.subjects import NodeVerb, node, stream
from services.common import config as config_loader
from services.node.node import Node
from services.node_common.config import ENV_PREFIX, KV_TRANSFER_GRANULARITIES, NodeConfig

BLOCKS = 64
BS = 4
PROMPT = [(11 * i + 5) % 4000 + 10 for i in range(40)]  # 40 tokens: exactly 10 full blocks
NUM_PROMPT_BLOCKS = len(PROMPT) // BS
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", num_blocks=BLOCKS, block_size=BS, shared_pool=True))


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """The colocated greedy output of PROMPT (same preset and seed as the nodes' engines)."""
    torch.set_num_threads(2)
    llm = _engine()
    llm.add_request("ref", list(PROMPT), EngineParams(**msgspec.structs.asdict(GREEDY)))
    out: list[int] = []
    while llm.has_work():
        for o in llm.step():
            out += o.token_ids
    llm.pool.close()
    return out


@contextlib.asynccontextmanager
async def running_node(url: str, node_id: str, role: Role, **overrides) -> AsyncIterator[Node]:
    llm = _engine()  # a fresh pool: the hand-off is contiguous on both sides
    engine = AsyncEngine(engine=llm)
    await engine.start()
    nc = await nats.connect(url)
    cfg = NodeConfig(node_id=node_id, role=role.value, model="tiny", block_size=BS, num_blocks=BLOCKS,
                     report_interval_s=0.05, **overrides)
    node_ = Node(cfg, engine=engine)
    await node_.start(nc)
    try:
        yield node_
    finally:
        await node_.stop("test over")
        await engine.stop()
        await nc.drain()
        llm.pool.close()


async def _generate(nc, to: str, decode_node: str, rid: str) -> list[TokenChunk]:  # type: ignore[no-untyped-def]
    done = asyncio.Event()
    chunks: list[TokenChunk] = []

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunk = messages.decode(msg.data)
        chunks.append(chunk)
        if chunk.finished:
            done.set()

    sub = await nc.subscribe(stream("gw0"), cb=on_chunk)
    req = SubmitRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=GREEDY, decode_node=decode_node,
                        reply_subject=stream("gw0"))
    ack = messages.decode((await nc.request(node(to, NodeVerb.SUBMIT), messages.encode(req), timeout=10)).data)
    assert ack.ok, ack
    await asyncio.wait_for(done.wait(), 60)
    await sub.unsubscribe()
    return sorted(chunks, key=lambda c: c.index)


def expected_calls(mode: TransferMode, num_layers: int) -> int:
    return {TransferMode.MERGED: 1, TransferMode.LAYERWISE: num_layers,
            TransferMode.BLOCKWISE: NUM_PROMPT_BLOCKS * num_layers * 2}[mode]


@pytest.mark.parametrize("granularity", [m.value for m in TransferMode])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_every_granularity_lands_the_same_bytes(nats_server, reference, transport: str, granularity: str):
    mode = TransferMode(granularity)
    async with running_node(nats_server.url, "p0", Role.PREFILL, kv_transport=transport,
                            kv_transfer_granularity=granularity) as p, \
            running_node(nats_server.url, "d0", Role.DECODE, kv_transport=transport) as d:  # D: merged
        sends = []
        send = p.agent.send

        async def checked_send(tid, peer, src, dst, **kw):  # type: ignore[no-untyped-def]
            stats = await send(tid, peer, src, dst, **kw)
            # P's send returned: the bytes are in D's pool, and D has not been told yet.
            landed = torch.equal(p.engine.pool.tensor[list(src)], d.engine.pool.tensor[list(dst)])
            sends.append((tid, list(src), list(dst), stats, landed))
            return stats

        p.agent.send = checked_send  # type: ignore[method-assign]
        nc = await nats.connect(nats_server.url)
        chunks = await _generate(nc, "p0", "d0", "r1")
        await nc.drain()

        out = [t for c in chunks for t in c.token_ids]
        assert out == reference and chunks[-1].node_id == "d0"
        ((tid, src, dst, stats, landed),) = sends
        layout = p.engine.pool.layout
        assert landed and len(src) == NUM_PROMPT_BLOCKS
        assert (stats.transport, stats.mode) == (transport, granularity)
        assert stats.bytes == NUM_PROMPT_BLOCKS * layout.block_bytes and stats.segments == 1
        assert stats.calls == expected_calls(mode, layout.num_layers)
        # What P's LoadReport sums (kv_sent_calls), and D planned with P's granularity.
        assert (p.ctx.transfers.sent_calls, p.ctx.transfers.sent_bytes) == (stats.calls, stats.bytes)
        d_stats = d.agent.stats(tid)
        assert d_stats is not None and (d_stats.mode, d_stats.calls, d_stats.bytes) == (granularity, stats.calls,
                                                                                         stats.bytes)


async def test_decode_node_refuses_an_unknown_granularity(nats_server):
    async with running_node(nats_server.url, "d0", Role.DECODE, kv_transport="tcp") as d:
        bogus = msgspec.structs.replace(d.agent.info(), node_id="p9", transfer_mode="chunkwise")
        alloc = KVAllocRequest(request_id="r1", transfer_id="r1.x", prefill_node="p9", prompt_token_ids=PROMPT,
                               sampling=GREEDY, reply_subject=stream("gw0"), sender_info=msgspec.msgpack.encode(bogus),
                               src_block_ids=list(range(NUM_PROMPT_BLOCKS)))
        nc = await nats.connect(nats_server.url)
        reply = messages.decode((await nc.request(node("d0", NodeVerb.KV_ALLOC), messages.encode(alloc),
                                                  timeout=10)).data)
        await nc.drain()
        assert isinstance(reply, KVAllocReply) and not reply.ok and reply.code == ErrorCode.INVALID
        assert "chunkwise" in reply.error and d.engine.stats().free_blocks == BLOCKS


def test_agent_info_without_the_field_means_merged():
    info = AgentInfo(node_id="p0", host_id="h", device="cpu", layout=KVLayout("float32", 2, 4, 2, 16), num_blocks=8)
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(info))
    del raw["transfer_mode"]  # a sender from before the field
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(raw), type=AgentInfo).transfer_mode == "merged"


def test_config_field_flag_env_and_validation(monkeypatch):
    assert KV_TRANSFER_GRANULARITIES == tuple(m.value for m in TransferMode)
    assert NodeConfig().kv_transfer_granularity == "merged"
    monkeypatch.setenv(f"{ENV_PREFIX}_KV_TRANSFER_GRANULARITY", "blockwise")
    assert config_loader.build(NodeConfig, ENV_PREFIX).kv_transfer_granularity == "blockwise"
    parser = argparse.ArgumentParser()
    config_loader.add_arguments(parser, NodeConfig, ENV_PREFIX)
    args = parser.parse_args(["--kv-transfer-granularity", "layerwise"])
    assert config_loader.build(NodeConfig, ENV_PREFIX, args).kv_transfer_granularity == "layerwise"
    with pytest.raises(ValueError, match="kv_transfer_granularity"):
        NodeConfig(kv_transfer_granularity="chunkwise")
    with pytest.raises(ValueError, match="merged, layerwise, blockwise"):
        TransferMode.parse("chunkwise")

"""shm and tcp between two real processes; timeouts and a SIGKILLed peer end FAILED."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal

import msgspec
import pytest

from libs.kvtransfer.agent import KVAgent
from libs.kvtransfer.align import align
from libs.kvtransfer.allocator import SegmentAllocator
from libs.kvtransfer.base import AgentInfo, TransferError, TransferMode, TransferState
from libs.kvtransfer.layout import KVLayout
from libs.kvtransfer.pool import KVPool
from libs.kvtransfer.transports.tcp import TcpHeader, encode_header
from libs.protocol.messages import TransferReport
from tests.kvtransfer import _peer

NUM_BLOCKS = 64
CTX = mp.get_context("spawn")


def _layout(dtype: str) -> KVLayout:
    return KVLayout(dtype, num_layers=4, block_size=16, num_kv_heads=2, head_dim=32)


class Child:
    """A peer process running a real KVAgent, driven over a pipe."""

    def __init__(self, target, *args) -> None:
        self.conn, child_conn = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child_conn, *args), daemon=True)
        self.proc.start()

    async def recv(self, timeout: float = 60.0) -> bytes:
        ready = await asyncio.to_thread(self.conn.poll, timeout)
        assert ready, "child did not answer"
        return self.conn.recv_bytes()

    async def call(self, **cmd) -> dict:
        self.conn.send_bytes(msgspec.msgpack.encode(cmd))
        return msgspec.msgpack.decode(await self.recv())

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)


def _churned_ids(n: int, seed: int) -> list[int]:
    """Ids of an n-block request allocated from a pool fragmented by churn."""
    rng = random.Random(seed)
    a = SegmentAllocator(NUM_BLOCKS)
    live = []
    while a.num_free_blocks:
        live.append(a.allocate(min(rng.randint(1, 4), a.num_free_blocks)))
    for ids in live[::2]:
        a.free(ids)
    return a.allocate(n)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_two_process_transfer(transport: str, dtype: str) -> None:
    layout = _layout(dtype)
    pool = KVPool.allocate(layout, NUM_BLOCKS, shared=True)
    _peer.fill_random(pool, seed=1)
    agent = KVAgent(pool, "parent", force_transport=transport)
    await agent.start()
    child = Child(_peer.agent_main, msgspec.json.encode(layout), NUM_BLOCKS, transport)
    try:
        peer = msgspec.msgpack.decode(await child.recv(), type=AgentInfo)
        assert peer.host_id == agent.info().host_id
        me = msgspec.msgpack.encode(agent.info())
        cases = [  # (tid, src, dst, mode)
            ("fresh", list(range(3, 11)), list(range(20, 28)), TransferMode.MERGED),
            ("frag", _churned_ids(10, 5), _churned_ids(10, 6), TransferMode.MERGED),
            ("frag-bw", _churned_ids(10, 7), _churned_ids(10, 8), TransferMode.BLOCKWISE),
            ("frag-lw", _churned_ids(10, 9), _churned_ids(10, 10), TransferMode.LAYERWISE),
        ]
        for tid, src, dst, mode in cases:
            ops = align(src, dst)
            assert (len(ops) == 1) == (tid == "fresh")
            r = await child.call(op="expect", tid=tid, peer=me, dst=dst, src=src, mode=mode.value, timeout=20.0)
            assert r["ok"]
            stats = await agent.send(tid, peer, src, dst, mode=mode, timeout=20.0)
            calls = {TransferMode.MERGED: len(ops), TransferMode.LAYERWISE: 4 * len(ops),
                     TransferMode.BLOCKWISE: 8 * 10 if tid != "fresh" else 64}[mode]
            assert (stats.transport, stats.calls, stats.segments) == (transport, calls, len(ops))
            assert stats.bytes == len(src) * layout.block_bytes
            r = await child.call(op="await", tid=tid, complete=transport == "shm")
            assert r["ok"], r
            d_stats = msgspec.msgpack.decode(r["stats"], type=TransferReport)
            assert (d_stats.calls, d_stats.bytes) == (stats.calls, stats.bytes)
            assert agent.state(tid) == TransferState.DONE
            r = await child.call(op="read", ids=dst)
            assert r["data"] == _peer.block_bytes_of(pool, src)
        # the other direction: the child sends into our pool
        src, dst = _churned_ids(6, 11), list(range(40, 46))
        await child.call(op="fill", seed=2)
        fut = agent.expect("back", peer, dst, src, timeout=20.0)
        r = await child.call(op="send", tid="back", peer=me, src=src, dst=dst, mode="merged")
        assert r["ok"], r
        if transport == "shm":
            agent.complete("back")
        assert (await fut).bytes == 6 * layout.block_bytes
        assert _peer.block_bytes_of(pool, dst) == (await child.call(op="read", ids=src))["data"]
        await child.call(op="stop")
    finally:
        child.kill()
        await agent.close()
        pool.close()


async def test_layout_mismatch_fails_at_once_naming_both() -> None:
    a = KVAgent(KVPool.allocate(_layout("float32"), 8), "prefill-0", force_transport="tcp")
    b = KVAgent(KVPool.allocate(_layout("bfloat16"), 8), "decode-1", force_transport="tcp")
    await a.start()
    await b.start()
    with pytest.raises(TransferError, match="prefill-0 and decode-1 differ.*dtype"):
        await a.send("t", b.info(), [0], [0])
    assert a.state("t") == TransferState.FAILED and "decode-1" in a.reason("t")
    with pytest.raises(TransferError, match="decode-1 and prefill-0 differ"):
        await b.expect("t", a.info(), [0], [0])
    await a.close()
    await b.close()


async def test_expect_times_out_and_send_to_silent_peer_times_out() -> None:
    layout = _layout("float32")
    a = KVAgent(KVPool.allocate(layout, 8), "P", force_transport="tcp")
    b = KVAgent(KVPool.allocate(layout, 8), "D", force_transport="tcp")
    await a.start()
    await b.start()
    with pytest.raises(TransferError, match="expect t1 from P timed out after 0.2s"):
        await b.expect("t1", a.info(), [0, 1], [2, 3], timeout=0.2)
    assert b.state("t1") == TransferState.FAILED

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # swallow everything, never ack

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    mute = msgspec.structs.replace(b.info(), tcp_port=server.sockets[0].getsockname()[1])
    with pytest.raises(TransferError, match="send t2 to D timed out after 0.3s"):
        await a.send("t2", mute, [0, 1], [2, 3], timeout=0.3)
    assert a.state("t2") == TransferState.FAILED
    server.close()
    # abort on D fails its future with the reason
    fut = b.expect("t3", a.info(), [0], [1], timeout=5)
    await asyncio.sleep(0)
    b.abort("t3", "P left the cluster")
    with pytest.raises(TransferError, match="P left the cluster"):
        await fut
    await a.close()
    await b.close()


async def test_sender_killed_mid_transfer_fails_receiver() -> None:
    layout = _layout("float32")
    pool = KVPool.allocate(layout, NUM_BLOCKS)
    agent = KVAgent(pool, "D", force_transport="tcp")
    await agent.start()
    src, dst = list(range(0, 32)), list(range(32, 64))
    fut = agent.expect("k", msgspec.structs.replace(agent.info(), node_id="P"), dst, src, timeout=30.0)
    await asyncio.sleep(0)
    nbytes = 32 * layout.block_bytes
    header = encode_header(TcpHeader("k", "P", layout, "merged", align(src, dst), nbytes))
    child = Child(_peer.dying_sender_main, "127.0.0.1", agent.info().tcp_port, header, nbytes)
    try:
        assert await child.recv() == b"half"
        child.kill()
        with pytest.raises(TransferError, match="connection from P lost mid-transfer"):
            await asyncio.wait_for(fut, 10)
        assert agent.state("k") == TransferState.FAILED
    finally:
        child.kill()
        await agent.close()


async def test_receiver_killed_mid_transfer_fails_sender() -> None:
    layout = _layout("float32")
    pool = KVPool.allocate(layout, NUM_BLOCKS)
    agent = KVAgent(pool, "P", force_transport="tcp")
    await agent.start()
    child = Child(_peer.dying_receiver_main)
    try:
        port = int(await child.recv())
        peer = msgspec.structs.replace(agent.info(), node_id="D", tcp_port=port)
        send = asyncio.ensure_future(agent.send("k", peer, list(range(64)), list(range(64)), timeout=30.0))
        assert await child.recv() == b"reading"
        child.kill()
        with pytest.raises(TransferError, match="connection to D lost"):
            await asyncio.wait_for(send, 10)
        assert agent.state("k") == TransferState.FAILED
    finally:
        child.kill()
        await agent.close()

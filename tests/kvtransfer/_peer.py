"""The other process of the two-process transfer tests (started with multiprocessing spawn).

Commands arrive as msgpack maps over a Pipe; the child runs a real ``KVAgent`` on its own
pool, or plays a peer that dies mid-transfer (raw framing from the tcp transport).
"""

from __future__ import annotations

import asyncio
import socket
import time
from multiprocessing.connection import Connection

import msgspec
import torch

from libs.kvtransfer.agent import KVAgent
from libs.kvtransfer.base import AgentInfo, TransferError, TransferMode
from libs.kvtransfer.layout import KVLayout
from libs.kvtransfer.pool import KVPool


def fill_random(pool: KVPool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=gen).to(pool.tensor.dtype))


def block_bytes_of(pool: KVPool, ids: list[int]) -> bytes:
    return pool.tensor[ids].contiguous().view(-1).view(torch.uint8).numpy().tobytes()


async def _serve(conn: Connection, agent: KVAgent, pool: KVPool) -> None:
    futures: dict[str, asyncio.Future] = {}
    while True:
        cmd = msgspec.msgpack.decode(await asyncio.to_thread(conn.recv_bytes))
        op = cmd["op"]
        reply: dict = {"ok": True}
        try:
            if op == "fill":
                fill_random(pool, cmd["seed"])
            elif op == "read":
                reply["data"] = block_bytes_of(pool, cmd["ids"])
            elif op == "expect":
                peer = msgspec.msgpack.decode(cmd["peer"], type=AgentInfo)
                futures[cmd["tid"]] = agent.expect(cmd["tid"], peer, cmd["dst"], cmd["src"],
                                                   mode=TransferMode(cmd["mode"]), timeout=cmd["timeout"])
            elif op == "await":
                if cmd["complete"]:
                    agent.complete(cmd["tid"])
                reply["stats"] = msgspec.msgpack.encode(await futures.pop(cmd["tid"]))
            elif op == "send":
                peer = msgspec.msgpack.decode(cmd["peer"], type=AgentInfo)
                stats = await agent.send(cmd["tid"], peer, cmd["src"], cmd["dst"], mode=TransferMode(cmd["mode"]))
                reply["stats"] = msgspec.msgpack.encode(stats)
            elif op == "stop":
                conn.send_bytes(msgspec.msgpack.encode(reply))
                return
        except TransferError as exc:
            reply = {"ok": False, "reason": exc.reason}
        conn.send_bytes(msgspec.msgpack.encode(reply))


def agent_main(conn: Connection, layout_json: bytes, num_blocks: int, transport: str) -> None:
    """Run a node with a shared CPU pool; first message out is its AgentInfo."""
    torch.set_num_threads(1)

    async def main() -> None:
        pool = KVPool.allocate(msgspec.json.decode(layout_json, type=KVLayout), num_blocks, shared=True)
        agent = KVAgent(pool, "child", force_transport=transport)
        await agent.start()
        conn.send_bytes(msgspec.msgpack.encode(agent.info()))
        try:
            await _serve(conn, agent, pool)
        finally:
            await agent.close()
            pool.close()

    asyncio.run(main())


def dying_sender_main(conn: Connection, host: str, port: int, header: bytes, nbytes: int) -> None:
    """Send a header and half the bytes, say so, then hang until killed."""
    sock = socket.create_connection((host, port))
    sock.sendall(header + b"\0" * (nbytes // 2))
    conn.send_bytes(b"half")
    time.sleep(3600)


def dying_receiver_main(conn: Connection) -> None:
    """Accept one connection, read a little, report the port and progress, then hang."""
    srv = socket.create_server(("127.0.0.1", 0))
    conn.send_bytes(str(srv.getsockname()[1]).encode())
    sock, _ = srv.accept()
    sock.recv(65536)
    conn.send_bytes(b"reading")
    time.sleep(3600)

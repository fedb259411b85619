"""A KVAgent in a child process, driven over a pipe: the D side of benchmarks and GPU checks.

The parent plays P with its own agent; the child owns a pool on its device and answers
msgpack commands (``expect``, ``await``, ``read``, ``rendezvous``, ``stop``). The NCCL
rendezvous goes over the same pipe, standing in for NATS request/reply.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from libs.kvtransfer.base import AgentInfo, TransferError, TransferMode


def _read_blocks(pool: Any, ids: list[int]) -> bytes:
    import torch

    return pool.tensor[ids].contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()


async def _serve(conn: Connection, agent: Any, pool: Any) -> None:
    futures: dict[str, asyncio.Future] = {}
    while True:
        cmd = msgspec.msgpack.decode(await asyncio.to_thread(conn.recv_bytes))
        op = cmd["op"]
        reply: dict[str, Any] = {"ok": True}
        try:
            if op == "expect":
                peer = msgspec.msgpack.decode(cmd["peer"], type=AgentInfo)
                futures[cmd["tid"]] = agent.expect(cmd["tid"], peer, cmd["dst"], cmd["src"],
                                                   mode=TransferMode(cmd["mode"]), timeout=cmd.get("timeout", 60.0))
            elif op == "await":
                if cmd["complete"]:
                    agent.complete(cmd["tid"])
                reply["stats"] = msgspec.msgpack.encode(await futures.pop(cmd["tid"]))
            elif op == "read":
                reply["data"] = _read_blocks(pool, cmd["ids"])
            elif op == "rendezvous":
                reply["reply"] = agent.handle_rendezvous(cmd["payload"])
            elif op == "stop":
                conn.send_bytes(msgspec.msgpack.encode(reply))
                return
        except TransferError as exc:
            reply = {"ok": False, "reason": exc.reason}
        conn.send_bytes(msgspec.msgpack.encode(reply))


def peer_main(conn: Connection, layout_json: bytes, num_blocks: int, device: str, node_id: str,
              host_id: str | None, force: str | None, shared: bool) -> None:
    import torch

    from libs.kvtransfer.agent import KVAgent
    from libs.kvtransfer.layout import KVLayout
    from libs.kvtransfer.pool import KVPool

    torch.set_num_threads(1)

    async def rendezvous_unused(peer: str, payload: bytes) -> bytes:
        raise TransferError("the child never starts a rendezvous")

    async def main() -> None:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        pool = KVPool.allocate(msgspec.json.decode(layout_json, type=KVLayout), num_blocks, device=device, shared=shared)
        agent = KVAgent(pool, node_id, rendezvous=rendezvous_unused, host_id=host_id, force_transport=force)
        await agent.start()
        conn.send_bytes(msgspec.msgpack.encode(agent.info()))
        try:
            await _serve(conn, agent, pool)
        finally:
            await agent.close()
            pool.close()

    asyncio.run(main())


class PeerProcess:
    """Start :func:`peer_main` in a spawned process and talk to it."""

    def __init__(self, layout_json: bytes, num_blocks: int, device: str, node_id: str = "D",
                 host_id: str | None = None, force: str | None = None, shared: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=peer_main, daemon=True,
                                args=(child, layout_json, num_blocks, device, node_id, host_id, force, shared))
        self.proc.start()
        self._lock = asyncio.Lock()

    async def _recv(self, timeout: float) -> bytes:
        if not await asyncio.to_thread(self.conn.poll, timeout):
            raise TransferError(f"peer process gave no answer in {timeout}s")
        return self.conn.recv_bytes()

    async def info(self, timeout: float = 300.0) -> AgentInfo:
        return msgspec.msgpack.decode(await self._recv(timeout), type=AgentInfo)

    async def call(self, timeout: float = 120.0, **cmd: Any) -> dict[str, Any]:
        async with self._lock:
            self.conn.send_bytes(msgspec.msgpack.encode(cmd))
            return msgspec.msgpack.decode(await self._recv(timeout))

    async def rendezvous(self, peer: str, payload: bytes) -> bytes:
        """The P side's rendezvous callback (stands in for NATS request/reply)."""
        return (await self.call(op="rendezvous", payload=payload))["reply"]

    async def stop(self) -> None:
        if self.proc.is_alive():
            try:
                await self.call(op="stop", timeout=30.0)
            except (TransferError, OSError, EOFError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

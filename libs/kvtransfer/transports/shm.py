"""``shm``: CPU pools of two processes on one host, through POSIX shared memory.

The owner allocates its pool with ``KVPool.allocate(shared=True)`` and publishes the
segment's name in its :class:`AgentInfo`. The sender maps the receiver's pool once per
peer (cached) and copies each piece straight from its own pool into the peer's: no
staging, one ``copy_`` per merged op. The copy runs in a worker thread so the event loop
keeps serving. One-sided: D learns of completion from the control plane
(``KVAgent.complete``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from libs.kvtransfer.align import CopyOp, check_bounds, copy_pieces, expand
from libs.kvtransfer.base import AgentInfo, Transport, TransferError, TransferMode
from libs.kvtransfer.pool import KVPool


class ShmTransport(Transport):
    name = "shm"
    one_sided = True

    def __init__(self, pool: KVPool, node_id: str) -> None:
        super().__init__(pool, node_id)
        self._peers: dict[str, tuple[str, KVPool]] = {}  # node_id -> (shm name, mapped pool)

    def info_fields(self) -> dict[str, object]:
        return {"shm_name": self.pool.shm_name}

    def _peer_pool(self, peer: AgentInfo) -> KVPool:
        if peer.shm_name is None:
            raise TransferError(f"peer {peer.node_id} has no shared-memory pool")
        cached = self._peers.get(peer.node_id)
        if cached is not None and cached[0] == peer.shm_name:
            return cached[1]
        if cached is not None:  # the peer restarted with a new pool
            cached[1].close()
        try:
            mapped = KVPool.attach_shm(peer.shm_name, peer.layout, peer.num_blocks)
        except (FileNotFoundError, ValueError) as exc:
            raise TransferError(f"cannot map the pool of {peer.node_id} ({peer.shm_name}): {exc}") from exc
        self._peers[peer.node_id] = (peer.shm_name, mapped)
        return mapped

    async def send(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        dst = self._peer_pool(peer)
        check_bounds(ops, self.pool.num_blocks, dst.num_blocks)
        pieces = expand(ops, self.pool.layout, mode, src_blocks=self.pool.num_blocks, dst_blocks=dst.num_blocks)
        await asyncio.to_thread(copy_pieces, self.pool.byte_view(), dst.byte_view(), pieces)

    async def close(self) -> None:
        for _, mapped in self._peers.values():
            mapped.close()
        self._peers.clear()

"""``cuda_ipc``: CUDA pools of two processes on one host (same GPU or peer GPUs).

Each node exports its pool once (``cudaIpcGetMemHandle``) in its :class:`AgentInfo`;
the sender opens the peer's handle once (``cudaIpcOpenMemHandle`` with lazy peer access,
cached per peer) and issues each piece as one ``cudaMemcpyAsync`` (``cudaMemcpy2DAsync``
for a layer-wise strided piece) on a dedicated stream, synchronised before ``send``
returns. One-sided: D learns of completion from the control plane.

A handle names the whole ``cudaMalloc`` allocation that holds the pool; torch's caching
allocator may place the pool inside a larger segment, so the offset of the pool in that
allocation travels with the handle. A handle cannot be opened by the process that made
it: pools exported by this process are looked up in a local table instead. A pool this
process itself mapped from another (a vLLM worker's cache, ``KVPool.attach_cuda_ipc``)
is advertised with its owner's handle, as mapped memory cannot be exported again. IPC needs
``PYTORCH_CUDA_ALLOC_CONF`` without ``expandable_segments``. cupy is imported lazily.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from libs.kvtransfer.align import CopyOp, Piece, check_bounds, expand
from libs.kvtransfer.base import AgentInfo, Transport, TransferError, TransferMode
from libs.kvtransfer.pool import KVPool

_LOCAL_EXPORTS: dict[bytes, int] = {}  # handle -> pool pointer, for pools of this process
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from unified addressing
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - CPU machines
        raise TransferError("cuda_ipc needs cupy (pip install cupy-cuda12x or -cuda13x)") from exc
    return cupy


def allocation_offset(ptr: int, device: int) -> int:
    """Offset of ``ptr`` inside the cudaMalloc allocation that holds it (torch caching allocator)."""
    import torch

    for seg in torch.cuda.memory_snapshot():
        if seg.get("device") == device and seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return ptr - seg["address"]
    return 0  # not from torch's allocator: a raw allocation starts at the pointer


def export_handle(ptr: int, device: int) -> tuple[bytes, int]:
    """The CUDA IPC handle of the allocation holding ``ptr`` and ``ptr``'s offset in it."""
    cp = _cupy()
    with cp.cuda.Device(device):
        handle = bytes(cp.cuda.runtime.ipcGetMemHandle(ptr))
    return handle, allocation_offset(ptr, device)


def open_handle(handle: bytes, offset: int, device: int) -> tuple[int, int]:
    """Open another process's export in this one: ``(pointer, base)``; ``base`` goes to
    :func:`close_handle`. Raises :class:`TransferError` where it cannot be opened."""
    cp = _cupy()
    with cp.cuda.Device(device):
        try:
            base = cp.cuda.runtime.ipcOpenMemHandle(handle, _LAZY_PEER_ACCESS)
        except Exception as exc:
            raise TransferError(f"cannot open a CUDA IPC handle: {exc}") from exc
    return base + offset, base


def close_handle(base: int, device: int) -> None:
    try:
        with _cupy().cuda.Device(device):
            _cupy().cuda.runtime.ipcCloseMemHandle(base)
    except Exception:  # the exporter's memory may already be gone; nothing to release then
        pass


def gpu_uuid(device: int) -> str | None:
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return str(uuid) if uuid is not None else None


def issue_pieces(rt: Any, src_ptr: int, dst_ptr: int, pieces: Sequence[Piece], stream_ptr: int) -> None:
    """One memcpy (2D for strided pieces) per piece on ``stream_ptr``; does not synchronise."""
    for p in pieces:
        if p.height == 1:
            rt.memcpyAsync(dst_ptr + p.dst_offset, src_ptr + p.src_offset, p.width, _MEMCPY_DEFAULT, stream_ptr)
        else:
            rt.memcpy2DAsync(dst_ptr + p.dst_offset, p.pitch, src_ptr + p.src_offset, p.pitch,
                             p.width, p.height, _MEMCPY_DEFAULT, stream_ptr)


class CudaIpcTransport(Transport):
    name = "cuda_ipc"
    one_sided = True

    def __init__(self, pool: KVPool, node_id: str) -> None:
        super().__init__(pool, node_id)
        cp = _cupy()
        self._rt = cp.cuda.runtime
        self.device = pool.device.index if pool.device.index is not None else 0
        self._ptr = pool.tensor.data_ptr()
        with cp.cuda.Device(self.device):
            self._stream = cp.cuda.Stream(non_blocking=True)
        if pool.cuda_ipc_export is not None:
            # Memory this process mapped from its owner (a vLLM worker's KV cache): memory
            # from cudaIpcOpenMemHandle cannot be exported again, so peers get the owner's handle.
            self._handle, self._offset = pool.cuda_ipc_export
        else:
            self._handle, self._offset = export_handle(self._ptr, self.device)
        _LOCAL_EXPORTS[self._handle] = self._ptr
        self._peers: dict[str, tuple[bytes, int, int | None]] = {}  # node -> (handle, pool ptr, opened base)

    def info_fields(self) -> dict[str, object]:
        return {"cuda_ipc_handle": self._handle, "cuda_ipc_offset": self._offset, "gpu_uuid": gpu_uuid(self.device)}

    def peer_pointer(self, peer: AgentInfo) -> int:
        """Device pointer of the peer's pool in this process (opened once per peer)."""
        if not peer.cuda_ipc_handle:
            raise TransferError(f"peer {peer.node_id} exported no CUDA IPC handle")
        cached = self._peers.get(peer.node_id)
        if cached is not None and cached[0] == peer.cuda_ipc_handle:
            return cached[1]
        if cached is not None:
            self._close_peer(cached)
        local = _LOCAL_EXPORTS.get(peer.cuda_ipc_handle)
        if local is not None:  # same process: the handle cannot be opened here
            entry: tuple[bytes, int, int | None] = (peer.cuda_ipc_handle, local, None)
        else:
            try:
                ptr, base = open_handle(peer.cuda_ipc_handle, peer.cuda_ipc_offset, self.device)
            except TransferError as exc:
                raise TransferError(f"{peer.node_id}: {exc.reason}") from exc
            entry = (peer.cuda_ipc_handle, ptr, base)
        self._peers[peer.node_id] = entry
        return entry[1]

    def _copy(self, dst_ptr: int, pieces: list[Piece]) -> None:
        with _cupy().cuda.Device(self.device):
            issue_pieces(self._rt, self._ptr, dst_ptr, pieces, self._stream.ptr)
            self._stream.synchronize()

    async def send(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        check_bounds(ops, self.pool.num_blocks, peer.num_blocks)
        dst_ptr = self.peer_pointer(peer)
        pieces = expand(ops, self.pool.layout, mode, src_blocks=self.pool.num_blocks, dst_blocks=peer.num_blocks)
        await asyncio.to_thread(self._copy, dst_ptr, pieces)

    def _close_peer(self, entry: tuple[bytes, int, int | None]) -> None:
        if entry[2] is not None:
            close_handle(entry[2], self.device)

    async def close(self) -> None:
        for entry in self._peers.values():
            self._close_peer(entry)
        self._peers.clear()
        _LOCAL_EXPORTS.pop(self._handle, None)

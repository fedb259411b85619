"""The node's KV pool: one pre-allocated tensor in FlowKV's block-major layout.

The engine computes attention straight out of :attr:`KVPool.tensor`; the transports
read and write the same memory, so a hand-off needs no staging copy on either side.
A CPU pool can live in POSIX shared memory so that a peer process on the same host can
map it (the ``shm`` transport); a CUDA pool is exported through a CUDA IPC handle by the
``cuda_ipc`` transport.
"""

from __future__ import annotations

import os
import secrets
from multiprocessing import shared_memory

import torch

from libs.kvtransfer.layout import KVLayout


def _open_untracked(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without letting this process's resource tracker unlink it.

    The owner, not a peer that maps the segment, unlinks it. Python 3.13 has ``track=``;
    before that the segment must be unregistered by hand, unless this process made it
    (two nodes in one process, as in tests): the tracker keeps one entry per name, and
    taking the owner's away makes its unlink report a KeyError at exit.
    """
    try:
        return shared_memory.SharedMemory(name=name, create=False, track=False)  # type: ignore[call-arg]
    except TypeError:
        from multiprocessing import resource_tracker

        shm = shared_memory.SharedMemory(name=name, create=False)
        if name.lstrip("/") not in _MADE_HERE:
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return shm


_SHM_DIR = "/dev/shm"
_SHM_PREFIX = "flowkv-"
_MADE_HERE: set[str] = set()  # the shared pools this process made (and will unlink)


def sweep_stale_segments() -> list[str]:
    """Unlink shared pools left by FlowKV processes that died without cleaning up.

    A pool's segment is named ``flowkv-<pid>-<random>``; a SIGKILLed node cannot unlink
    its own, and the memory stays taken until someone does. Called before a new shared
    pool is made. Returns the names removed.
    """
    removed = []
    try:
        names = os.listdir(_SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_SHM_PREFIX):
            continue
        try:
            pid = int(name[len(_SHM_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(_SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
        except PermissionError:
            pass  # alive, another user's
    return removed


class KVPool:
    """A pre-allocated ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]`` tensor.

    Use :meth:`allocate` on the owning node and :meth:`attach_shm` on a peer that maps
    a shared CPU pool.
    """

    def __init__(
        self,
        layout: KVLayout,
        tensor: torch.Tensor,
        shm: shared_memory.SharedMemory | None = None,
        owner: bool = True,
    ) -> None:
        expected = layout.pool_shape(layout.pool_num_blocks(tuple(tensor.shape)))
        if tuple(tensor.shape) != expected or tensor.dtype != layout.torch_dtype:
            raise ValueError(f"pool tensor {tuple(tensor.shape)}/{tensor.dtype} does not match {layout}")
        if not tensor.is_contiguous():
            raise ValueError("the KV pool must be contiguous")
        self.layout = layout
        self.tensor = tensor
        self._shm = shm
        self._owner = owner
        # (handle, offset) of memory mapped from another process's CUDA IPC export, and the
        # mapping's base to close; see attach_cuda_ipc.
        self.cuda_ipc_export: tuple[bytes, int] | None = None
        self._ipc_base: int | None = None

    @classmethod
    def allocate(
        cls,
        layout: KVLayout,
        num_blocks: int,
        device: str | torch.device = "cpu",
        shared: bool = False,
    ) -> KVPool:
        """Allocate a pool of ``num_blocks`` blocks.

        Args:
            layout: what one block is.
            num_blocks: blocks in the pool.
            device: ``"cpu"`` or a CUDA device.
            shared: CPU only: back the pool with named POSIX shared memory so a peer
                process can map it (see :attr:`shm_name`).
        """
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        device = torch.device(device)
        shape = layout.pool_shape(num_blocks)
        if shared:
            if device.type != "cpu":
                raise ValueError("shared=True is for CPU pools; CUDA pools are shared through CUDA IPC")
            nbytes = num_blocks * layout.block_bytes
            sweep_stale_segments()
            name = f"{_SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
            _MADE_HERE.add(name)
            tensor = torch.frombuffer(shm.buf, dtype=layout.torch_dtype, count=nbytes // layout.itemsize)
            tensor = tensor.view(shape)
            tensor.zero_()
            return cls(layout, tensor, shm=shm, owner=True)
        return cls(layout, torch.zeros(shape, dtype=layout.torch_dtype, device=device))

    @classmethod
    def attach_shm(cls, name: str, layout: KVLayout, num_blocks: int) -> KVPool:
        """Map a peer's shared CPU pool by its shared-memory name (no copy)."""
        shm = _open_untracked(name)
        nbytes = num_blocks * layout.block_bytes
        if shm.size < nbytes:
            shm.close()
            raise ValueError(f"shared pool {name!r} has {shm.size} bytes, expected {nbytes}")
        tensor = torch.frombuffer(shm.buf, dtype=layout.torch_dtype, count=nbytes // layout.itemsize)
        return cls(layout, tensor.view(layout.pool_shape(num_blocks)), shm=shm, owner=False)

    @classmethod
    def attach_cuda_ipc(cls, handle: bytes, offset: int, layout: KVLayout, num_blocks: int,
                        device: int = 0) -> KVPool:
        """Map another process's CUDA memory, exported as ``(handle, offset)`` (no copy).

        The ``cuda_ipc`` transport advertises such a pool with the same handle, since
        mapped memory cannot be exported again. Needs cupy.
        """
        import cupy as cp

        from libs.kvtransfer.transports.cuda_ipc import open_handle

        ptr, base = open_handle(handle, offset, device)
        nbytes = num_blocks * layout.block_bytes
        with cp.cuda.Device(device):
            memory = cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, nbytes, owner=None, device_id=device), 0)
            array = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=memory)
            tensor = torch.as_tensor(array, device=f"cuda:{device}")
        tensor = tensor.view(layout.torch_dtype).view(layout.pool_shape(num_blocks))
        pool = cls(layout, tensor, owner=False)
        pool.cuda_ipc_export, pool._ipc_base = (handle, offset), base
        return pool

    @property
    def num_blocks(self) -> int:
        return self.layout.pool_num_blocks(tuple(self.tensor.shape))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def shm_name(self) -> str | None:
        """Name of the shared-memory segment backing a shared CPU pool, else None."""
        return self._shm.name if self._shm is not None else None

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes

    def blocks(self, start: int, count: int) -> torch.Tensor:
        """View of ``count`` consecutive blocks from ``start``: one contiguous span (block-major pools)."""
        if self.layout.layer_major:
            raise ValueError("a layer-major pool has no block-major view")
        if start < 0 or count < 0 or start + count > self.num_blocks:
            raise IndexError(f"blocks [{start}, {start + count}) outside a pool of {self.num_blocks}")
        return self.tensor[start : start + count]

    def byte_view(self) -> torch.Tensor:
        """The whole pool as a flat uint8 tensor (no copy)."""
        return self.tensor.view(-1).view(torch.uint8)

    def close(self) -> None:
        """Release shared memory (unlinking it if this process created it), or a CUDA mapping."""
        if self._ipc_base is not None:
            from libs.kvtransfer.transports.cuda_ipc import close_handle

            base, self._ipc_base = self._ipc_base, None
            device = self.tensor.device.index or 0
            self.tensor = torch.empty(0, dtype=self.layout.torch_dtype)
            close_handle(base, device)
            return
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        # Drop our views before closing the mapping; torch keeps no reference of its own.
        self.tensor = torch.empty(0, dtype=self.layout.torch_dtype)
        try:
            shm.close()
        except BufferError:
            # A tensor view is still alive somewhere; the OS unmaps at process exit.
            pass
        if self._owner:
            _MADE_HERE.discard(shm.name)
            try:
                shm.unlink()
            except FileNotFoundError:
                pass

"""vLLM's KV cache made reachable from the node process: one code path for CPU and CUDA.

vLLM allocates its whole KV cache as one buffer (``torch.zeros(n, dtype=torch.int8)`` on
its device) and views it per layer, layer-major: layer ``l`` of block ``b`` at
``l * num_blocks * page + b * page``. :class:`KVCacheExport` is the part of FlowKV's
connector that lives in vLLM's worker process:

- :meth:`KVCacheExport.allocation` is the allocation context vLLM runs that
  ``torch.zeros`` in (``get_mem_pool_context``). On the CPU it puts the buffer in a new
  named POSIX shared-memory segment; on CUDA the buffer is allocated as vLLM would, and
  kept, to be exported through a CUDA IPC handle.
- :meth:`KVCacheExport.describe` checks vLLM's per-layer views against the buffer (one
  layer-major buffer, as FlowKV's layer-major :class:`libs.kvtransfer.layout.KVLayout`
  reads it) and returns what the node needs to map it: the segment's name, or the IPC
  handle, its offset and the device.

The node maps the same memory with :func:`attach` (``KVPool.attach_shm`` or
``KVPool.attach_cuda_ipc``) and moves KV in and out of it with FlowKV's transports
(``shm``/``tcp`` on CPU, ``cuda_ipc``/``nccl`` on CUDA). Nothing here imports vLLM.
"""

from __future__ import annotations

import _posixshmem
import os
import secrets
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from libs.kvtransfer.layout import KVLayout, dtype_name
from libs.kvtransfer.pool import KVPool, sweep_stale_segments

_SHM_PREFIX = "flowkv-"  # the same prefix as KVPool's segments: sweep_stale_segments cleans both


class _Allocation(TorchFunctionMode):
    """Catches vLLM's one KV-cache allocation (``torch.zeros(n, dtype=int8)``)."""

    def __init__(self, owner: KVCacheExport) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.zeros and self.owner.buffer is None and kwargs.get("dtype") is torch.int8:
            size = args[0] if len(args) == 1 else args
            nbytes = int(size if isinstance(size, int) else torch.Size(size).numel())
            device = torch.device(kwargs.get("device") or "cpu")
            self.owner.buffer = self.owner._allocate(nbytes, device) if device.type == "cpu" else func(*args, **kwargs)
            return self.owner.buffer
        return func(*args, **kwargs)


class KVCacheExport:
    """The KV cache buffer of one vLLM worker, and how the node maps it."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.shm: shared_memory.SharedMemory | None = None

    def allocation(self) -> TorchFunctionMode:
        """The context vLLM allocates its KV cache in."""
        return _Allocation(self)

    def _allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        sweep_stale_segments()
        name = f"{_SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        # The node maps this segment too and shares vLLM's resource tracker (spawned
        # processes inherit it); left registered, the tracker's books go wrong. close()
        # unlinks it at shutdown, sweep_stale_segments after a SIGKILL.
        resource_tracker.unregister(self.shm._name, "shared_memory")  # type: ignore[attr-defined]
        buf = torch.frombuffer(self.shm.buf, dtype=torch.int8, count=nbytes)
        buf.zero_()
        return buf

    def describe(self, kv_caches: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Check vLLM's per-layer views (``[num_blocks, kv_heads, block_size, ...]``, a block one
        page of the layer's K and V) and return the pool info the node attaches with
        (:func:`attach`)."""
        if self.buffer is None:
            raise RuntimeError("FlowKV connector: vLLM allocated its KV cache outside the connector's allocation "
                               "context")
        base = self.buffer.data_ptr()
        views = sorted({t.data_ptr(): t for t in kv_caches.values()}.items())
        first = views[0][1]
        num_blocks, num_kv_heads, block_size = (int(x) for x in first.shape[:3])
        page = first[0].numel() * first.element_size()
        for layer, (ptr, view) in enumerate(views):
            if view.device != self.buffer.device or ptr != base + layer * num_blocks * page \
                    or view.stride(0) * view.element_size() != page:
                raise RuntimeError("FlowKV connector: vLLM's KV cache is not one layer-major buffer")
        info: dict[str, Any] = {
            "num_blocks": num_blocks, "num_layers": len(views), "block_size": block_size,
            "num_kv_heads": num_kv_heads, "head_dim": page // (2 * block_size * num_kv_heads * first.element_size()),
            "dtype": dtype_name(first.dtype),
        }
        if self.shm is not None:
            info["shm_name"] = self.shm.name
        else:
            from libs.kvtransfer.transports.cuda_ipc import export_handle

            device = self.buffer.device.index or 0
            handle, offset = export_handle(base, device)
            info.update(cuda_ipc_handle=handle, cuda_ipc_offset=offset, device=device)
        return info

    def close(self) -> None:
        if self.shm is not None:
            shm, self.shm = self.shm, None
            try:
                shm.close()
            except BufferError:
                pass  # vLLM's views are still alive; the mapping goes with the process
            try:
                # unlink() would also unregister from the tracker, which never had it.
                _posixshmem.shm_unlink(shm._name)  # type: ignore[attr-defined]
            except FileNotFoundError:
                pass
        self.buffer = None


def layout_of(info: dict[str, Any]) -> KVLayout:
    """The layer-major layout of an exported cache (:meth:`KVCacheExport.describe`)."""
    return KVLayout(dtype=info["dtype"], num_layers=info["num_layers"], block_size=info["block_size"],
                    num_kv_heads=info["num_kv_heads"], head_dim=info["head_dim"], order="layer")


def attach(info: dict[str, Any]) -> KVPool:
    """Map an exported cache in this process (the node): the same memory, no copy."""
    layout = layout_of(info)
    if "shm_name" in info:
        return KVPool.attach_shm(info["shm_name"], layout, info["num_blocks"])
    return KVPool.attach_cuda_ipc(info["cuda_ipc_handle"], info["cuda_ipc_offset"], layout, info["num_blocks"],
                                  device=info["device"])

"""vLLM's KV cache exported to the node (libs/vllm_engine/kv_export), without vLLM.

The allocation and the per-layer views are made the way vLLM's ``allocate_kv_cache``
makes them (one ``torch.zeros(n, dtype=int8)``, then a ``[num_blocks, kv_heads,
block_size, 2 * head_dim]`` view per layer, layer-major). The CUDA side of the same
path is checked on a GPU by ``benchmarks/gpu/kvtransfer_check.py --vllm-export``.
"""

from __future__ import annotations

import os

import pytest
import torch

from libs.vllm_engine.kv_export import KVCacheExport, attach

LAYERS, BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 3, 10, 2, 4, 8


def vllm_like_cache(export: KVCacheExport, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    page = HEADS * BLOCK_SIZE * 2 * HEAD_DIM * dtype.itemsize
    with export.allocation():
        buf = torch.zeros(LAYERS * BLOCKS * page, dtype=torch.int8)
        other = torch.zeros(16, dtype=torch.int8)  # only the first int8 allocation is the cache
    assert other.data_ptr() != buf.data_ptr()
    per_layer = buf.view(LAYERS, BLOCKS * page)
    return {f"layers.{i}.attn": per_layer[i].view(dtype).view(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
            for i in range(LAYERS)}


def test_the_node_maps_the_same_memory_vllm_writes():
    export = KVCacheExport()
    caches = vllm_like_cache(export)
    info = export.describe(caches)
    assert info["shm_name"].startswith("flowkv-")
    assert (info["num_blocks"], info["num_layers"], info["block_size"], info["num_kv_heads"], info["head_dim"]) \
        == (BLOCKS, LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM)
    pool = attach(info)
    try:
        gen = torch.Generator().manual_seed(0)
        for layer, view in enumerate(caches.values()):
            view.copy_(torch.randn(view.shape, generator=gen).to(view.dtype))
        page_elems = HEADS * BLOCK_SIZE * 2 * HEAD_DIM
        mapped = pool.tensor.reshape(LAYERS, BLOCKS, page_elems)  # layer-major, one page a block
        for layer, view in enumerate(caches.values()):
            for block in (0, 4, BLOCKS - 1):
                assert torch.equal(mapped[layer, block], view[block].reshape(-1))
        mapped[1, 7].fill_(3.0)  # a write through the node's mapping lands in vLLM's view
        assert bool((list(caches.values())[1][7] == 3.0).all())
    finally:
        pool.close()
        export.close()
    assert not os.path.exists(f"/dev/shm/{info['shm_name']}")


def test_a_cache_that_is_not_one_layer_major_buffer_is_refused():
    export = KVCacheExport()
    caches = vllm_like_cache(export)
    names = list(caches)
    caches[names[0]], caches[names[1]] = caches[names[1]], caches[names[0]]  # same set of views: still fine
    export.describe(caches)
    strided = {n: v[::2] for n, v in caches.items()}  # every second block: not one page a block
    with pytest.raises(RuntimeError, match="layer-major"):
        export.describe(strided)
    export.close()


def test_a_cache_allocated_outside_the_context_is_refused():
    export = KVCacheExport()
    with pytest.raises(RuntimeError, match="outside"):
        export.describe({"l0": torch.zeros(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)})

"""Write new tokens' K and V into the block-major pool by slot (``block * block_size + offset``).

On CUDA a small Triton kernel does the scatter so that padded batch entries (slot < 0)
are skipped without a data-dependent shape: the call is CUDA-graph safe. On the CPU a
native kernel copies each token's row (:mod:`libs.engine.kernels.cpu`); elsewhere a
torch masked scatter does the same.
"""

from __future__ import annotations

import torch

from libs.engine.kernels import cpu
from libs.engine.kernels.paged_attention import INTERPRET, tl, triton


def write_kv(
    kv_pool: torch.Tensor,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``k[t]`` and ``v[t]`` at slot ``slot_mapping[t]`` of layer ``layer``.

    Args:
        kv_pool: ``[N, L, 2, block_size, Hkv, D]`` pool.
        layer: the layer written.
        k: ``[T, Hkv, D]`` keys (cast to the pool's dtype).
        v: ``[T, Hkv, D]`` values.
        slot_mapping: ``[T]`` int64 slots ``block * block_size + offset``; negative slots
            (padding) are not written.
    """
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if triton is not None and (kv_pool.is_cuda or INTERPRET):
        _write_kv_triton(kv_pool, layer, k, v, slot_mapping)
        return
    if kv_pool.is_cpu and cpu.write_kv(kv_pool, layer, k, v, slot_mapping):
        return
    write_kv_ref(kv_pool, layer, k, v, slot_mapping)


def write_kv_ref(
    kv_pool: torch.Tensor,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch version of :func:`write_kv` (boolean mask: not for CUDA-graph capture)."""
    block_size = kv_pool.shape[3]
    if slot_mapping.device.type == "cpu" and slot_mapping.numel() == 1:
        # One token (a batch-1 decode step): a plain slice copy, no advanced indexing.
        slot = int(slot_mapping[0])
        if slot >= 0:
            kv_pool[slot // block_size, layer, 0, slot % block_size].copy_(k[0])
            kv_pool[slot // block_size, layer, 1, slot % block_size].copy_(v[0])
        return
    if slot_mapping.device.type == "cpu" and int(slot_mapping.min()) >= 0:
        # No padding (the CPU engine never pads): plain indexing, no boolean-mask gathers.
        blocks, offs = slot_mapping // block_size, slot_mapping % block_size
        kv_pool[blocks, layer, 0, offs] = k.to(kv_pool.dtype)
        kv_pool[blocks, layer, 1, offs] = v.to(kv_pool.dtype)
        return
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offs = slots // block_size, slots % block_size
    kv_pool[blocks, layer, 0, offs] = k[keep].to(kv_pool.dtype)
    kv_pool[blocks, layer, 1, offs] = v[keep].to(kv_pool.dtype)


if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_cn, stride_ct, stride_ch, stride_cd,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One token: copy its [Hkv, D] K and V rows to their slot unless the slot is < 0."""
        tok = tl.program_id(0)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        # The slot test as a full tile (not a scalar) keeps the mask's type one the CPU
        # interpreter accepts too.
        slot_tile = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot
        mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :] & (slot_tile >= 0)
        safe = tl.where(slot >= 0, slot, 0)
        dst = (safe // BLOCK_SIZE) * stride_cn + (safe % BLOCK_SIZE) * stride_ct
        dst_offs = dst + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd
        tok64 = tok.to(tl.int64)
        k = tl.load(k_ptr + tok64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
        v = tl.load(v_ptr + tok64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
        tl.store(k_cache_ptr + dst_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _write_kv_triton(
    kv_pool: torch.Tensor,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if tuple(v.shape) != tuple(k.shape) or kv_pool.shape[4] != num_heads or kv_pool.shape[5] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit pool {tuple(kv_pool.shape)}")
    k_cache = kv_pool[:, layer, 0]
    v_cache = kv_pool[:, layer, 1]
    _write_kv_kernel[(num_tokens,)](
        k, v, slot_mapping, k_cache, v_cache,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=kv_pool.shape[3],
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )

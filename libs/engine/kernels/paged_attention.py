"""Paged decode attention over FlowKV's block-major KV pool (Triton), and its torch reference.

The pool is ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``; a sequence's
tokens live in the blocks its row of ``block_tables`` names, token ``t`` at block
``block_tables[b, t // block_size]``, offset ``t % block_size``. The kernel reads K and V
in place through that table (no dense gather).

Work split (flash-decoding): one program per (sequence, KV head, split). All query heads
of a KV head's group are handled by that program, so each K/V tile is read from memory
once per group. A sequence's context is cut into ``num_splits`` equal ranges computed on
the device from its own ``context_len``, so the grid depends only on the batch size and
head counts (CUDA-graph safe) and long and short sequences are both spread over the
splits. Each split writes an unnormalised partial result (running max, sum of
exponentials, weighted V); a second kernel merges the splits. With one split the first
kernel writes the output directly.

A sequence with ``context_len == 0`` gets an all-zero output row (padded batch entries).
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch reference path only.
    triton = None
    tl = None

# Triton's CPU interpreter (tests): switched on in the environment before triton is imported,
# so read once; the CPU paths ask for every kernel call.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634
_BLOCK_N = 64  # tokens per K/V tile
_MAX_SPLITS = 32


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch decode attention (gather, then softmax in fp32): the tests' reference.

    Args:
        q: ``[B, Hq, D]`` queries of the token being decoded.
        kv_pool: ``[N, L, 2, block_size, Hkv, D]`` pool.
        layer: which layer's K/V to read.
        block_tables: ``[B, M]`` int32 block ids per sequence.
        context_lens: ``[B]`` int32 tokens of context (the new token's K/V included).
        scale: softmax scale (usually ``head_dim ** -0.5``).
        out: optional ``[B, Hq, D]`` tensor to write into.

    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype; rows with no context are zero.
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_pool.shape[3], kv_pool.shape[4]
    group = num_q_heads // num_kv_heads
    result = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    lens = context_lens.tolist()
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        tok = torch.arange(n, device=q.device)
        blocks = block_tables[b].long()[tok // block_size]
        offs = tok % block_size
        k = kv_pool[blocks, layer, 0, offs].float()  # [n, Hkv, D]
        v = kv_pool[blocks, layer, 1, offs].float()
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        probs = torch.softmax(scores, dim=-1)
        result[b] = torch.einsum("hn,nhd->hd", probs, v)
    result = result.to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence: enough programs for about two waves over the SMs.

    Depends only on static shapes (batch size, heads, the block table's capacity), so a
    captured graph keeps its value. A power of two to bound the number of compiled variants.

    Args:
        batch: sequences in the call.
        num_kv_heads: KV heads.
        max_context: the most tokens a block table row can address (``M * block_size``).
        device: where the kernel runs (its SM count is used on CUDA).

    Returns:
        A power of two in ``[1, 32]``.
    """
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 16
    wanted = -(-2 * sms // max(1, batch * num_kv_heads))
    useful = max(1, -(-max_context // _BLOCK_N))  # a split smaller than one tile is wasted
    splits = min(wanted, useful, _MAX_SPLITS)
    return 1 << max(0, math.ceil(math.log2(max(1, splits))))


if triton is not None:

    @triton.jit
    def _paged_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        stride_qb, stride_qh, stride_qd,
        stride_kn, stride_kt, stride_kh, stride_kd,
        stride_btb, stride_btm,
        stride_ob, stride_oh, stride_od,
        qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        """One (sequence, KV head, split): online softmax over the split's token range.

        K and V share strides (same pool, K/V index differs only in the base pointer).
        ``qk_scale`` already includes log2(e) so the kernel works in base 2. ``DOT_FP32``
        computes the dots in full fp32 (fp32 pools, and the CPU interpreter).
        Partial results: ``part_acc[b, hq, split, :]`` (unnormalised), ``part_ml[b, hq, split, 0/1]``
        = (running max, sum of exponentials).
        """
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        num_q_heads = tl.num_programs(1) * GROUP

        ctx = tl.load(lens_ptr + seq)
        per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, ctx)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q_heads = kv_head * GROUP + offs_g

        q_ptrs = q_ptr + seq * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        else:
            q = q.to(k_ptr.dtype.element_ty)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

        bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
        head_off = kv_head.to(tl.int64) * stride_kh
        # Every tile of [start, end) holds at least one valid token, so m_i becomes finite
        # on the first iteration and exp2(m_i - m_new) never sees (-inf) - (-inf).
        for tile in range(start, end, BLOCK_N):
            tok = tile + offs_n
            valid = tok < end
            block = tl.load(bt_row + (tok // BLOCK_SIZE) * stride_btm, mask=valid, other=0)
            tok_off = block.to(tl.int64) * stride_kn + (tok % BLOCK_SIZE) * stride_kt + head_off
            kv_offs = tok_off[:, None] + offs_d[None, :] * stride_kd
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
            if DOT_FP32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
            if DOT_FP32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if NUM_SPLITS == 1:
            safe_l = tl.where(l_i > 0, l_i, 1.0)
            result = tl.where((l_i > 0)[:, None], acc / safe_l[:, None], 0.0)
            o_ptrs = out_ptr + seq * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            row = (seq * num_q_heads + q_heads) * NUM_SPLITS + split  # [BLOCK_G]
            acc_ptrs = part_acc_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(acc_ptrs, acc, mask=g_mask[:, None] & d_mask[None, :])
            tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)

    @triton.jit
    def _paged_decode_reduce_kernel(
        part_acc_ptr, part_ml_ptr, out_ptr,
        stride_ob, stride_oh, stride_od,
        HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Merge the splits of one (sequence, query head) into the normalised output."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        num_q_heads = tl.num_programs(1)
        offs_s = tl.arange(0, NUM_SPLITS)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        row = (seq * num_q_heads + head) * NUM_SPLITS + offs_s  # [NUM_SPLITS]
        m = tl.load(part_ml_ptr + row * 2)
        l = tl.load(part_ml_ptr + row * 2 + 1)
        m_max = tl.max(m, 0)
        # Empty splits carry m = -inf and weigh nothing; guard the all-empty row too.
        w = tl.where(m > float("-inf"), tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)), 0.0)
        denom = tl.sum(w * l, 0)
        acc = tl.load(part_acc_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], mask=d_mask[None, :], other=0.0)
        num = tl.sum(acc * w[:, None], 0)  # [BLOCK_D]
        result = tl.where(denom > 0, num / tl.where(denom > 0, denom, 1.0), 0.0)
        o_ptrs = out_ptr + seq * stride_ob + head * stride_oh + offs_d * stride_od
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence, read in place from the paged pool.

    No host synchronisation and a grid fixed by the shapes of the arguments, so the call
    can be captured in a CUDA graph (after one warm-up call has compiled the kernels).

    Args:
        q: ``[B, Hq, D]`` queries (bf16, fp16 or fp32; cast to the pool's dtype for the dots).
        kv_pool: ``[N, L, 2, block_size, Hkv, D]`` pool (the engine's ``KVPool.tensor``).
        layer: the layer to read.
        block_tables: ``[B, M]`` int32 block ids; entries past a sequence's blocks are ignored.
        context_lens: ``[B]`` int32 tokens of context per sequence, ``<= M * block_size``
            (the current token's K/V must already be written, see :func:`write_kv`).
        scale: softmax scale applied to ``q @ k``.
        out: optional ``[B, Hq, D]`` destination (any strides).

    Returns:
        ``[B, Hq, D]`` attention output in ``q``'s dtype (``out`` if given); zero rows for
        sequences with ``context_len == 0``.
    """
    if triton is None or (q.device.type != "cuda" and not INTERPRET):
        return paged_decode_attention_ref(q, kv_pool, layer, block_tables, context_lens, scale, out)
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_pool.shape[3], kv_pool.shape[4]
    if num_q_heads % num_kv_heads or kv_pool.shape[5] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit pool {tuple(kv_pool.shape)}")
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    k_cache = kv_pool[:, layer, 0]  # [N, bs, Hkv, D] views; K and V have the same strides
    v_cache = kv_pool[:, layer, 1]
    num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    if num_splits > 1:
        part_acc = torch.empty(batch * num_q_heads * num_splits * head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch * num_q_heads * num_splits * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused by the single-split variant
    block_d = triton.next_power_of_2(head_dim)
    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        float(scale) * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=_BLOCK_N,
        # fp32 pools keep full precision (no tf32). The interpreter's dot mishandles
        # bf16/fp16 operands (numpy has no bf16), so there the tiles are upcast too.
        DOT_FP32=kv_pool.dtype == torch.float32 or INTERPRET,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _paged_decode_reduce_kernel[(batch, num_q_heads)](
            part_acc, part_ml, out,
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_D=block_d,
            num_warps=4,
        )
    return out


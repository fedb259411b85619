"""Paged attention over the block-major pool ``[blocks, layers, 2, block_size, kv_heads, head_dim]``.

New K/V are written in place by slot (``block_id * block_size + offset``). Prefill
gathers a sequence's context blocks when part of it is already cached (chunked prefill,
prefix hits) and runs SDPA with the causal diagonal aligned to the lower right (the
chunk's queries are the last of the keys): on CUDA that is flash attention with no mask
built. Decode
takes static-shaped tensors only (no host sync, no data-dependent Python), so the
decode forward can be captured in a CUDA graph; on CUDA it calls the Triton kernel of
:mod:`libs.engine.kernels` that reads the pool directly.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclasses.dataclass
class PrefillSeq:
    """One sequence's chunk inside a prefill batch.

    Attributes:
        q_start: index of the chunk's first token in the batch's token dimension.
        q_len: tokens in the chunk.
        context_start: tokens of the sequence already in the cache (first query's position).
        block_ids: the sequence's blocks covering ``context_start + q_len`` tokens (int64, on device).
    """

    q_start: int
    q_len: int
    context_start: int
    block_ids: torch.Tensor


@dataclasses.dataclass
class PrefillMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    seqs: list[PrefillSeq]
    # CPU only: the native kernel's tables of this step, built by the first layer and shared
    # by the rest (an empty tuple: the kernel cannot run here).
    cpu_tables: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class DecodeMetadata:
    slot_mapping: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, M] int32
    context_lens: torch.Tensor  # [B] int32, including the token being decoded
    # CPU only: the key mask of this step, built by the first layer and shared by the rest.
    cpu_mask: torch.Tensor | None = None


@dataclasses.dataclass
class MixedMetadata:
    """A step of prefill chunks and decodes in one forward (CPU): the first
    ``num_prefill_tokens`` rows are the chunks (``prefill``), the rest one token a decoding
    sequence (``decode``). The linear layers read their weights once for both."""

    slot_mapping: torch.Tensor  # [T] int64: the chunks' slots, then the decodes'
    prefill: PrefillMetadata
    decode: DecodeMetadata
    num_prefill_tokens: int


AttentionMetadata = PrefillMetadata | DecodeMetadata | MixedMetadata


def write_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``k``, ``v`` [T, Hkv, D] of one layer at their slots of the pool (in place).

    Slots < 0 (padding rows of a captured decode batch) are skipped; on CUDA this is a
    graph-safe Triton kernel (:func:`libs.engine.kernels.write_kv`).
    """
    from libs.engine.kernels import write_kv as _write_kv

    _write_kv(pool, layer, k, v, slot_mapping)


def _gather_context(pool: torch.Tensor, layer: int, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[length, Hkv, D]`` of one sequence, gathered from its blocks."""
    blocks = pool[:, layer].index_select(0, block_ids)  # [nb, 2, bs, Hkv, D]
    k = blocks[:, 0].flatten(0, 1)[:length]
    v = blocks[:, 1].flatten(0, 1)[:length]
    return k, v


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, layer: int,
    meta: PrefillMetadata, scale: float,
) -> torch.Tensor:
    """Attention of a batch of prefill chunks; ``q`` [T, Hq, D] -> [T, Hq, D].

    ``k``/``v`` are the chunk's own keys and values (already written to the pool). On
    the CPU (float32 or bfloat16) the native kernel (:mod:`libs.engine.kernels.cpu`) reads
    every chunk's keys and values from the pool in place, all chunks in one call;
    elsewhere, or without it, each chunk runs SDPA.
    """
    if not q.is_cuda and q.dtype == pool.dtype and q.dtype in (torch.float32, torch.bfloat16):
        from libs.engine.kernels import cpu as cpu_kernels

        if meta.cpu_tables is None:
            tables = cpu_kernels.prefill_tables([(s.q_start, s.q_len, s.context_start, s.block_ids) for s in meta.seqs])
            meta.cpu_tables = tables if tables is not None else ()
        if meta.cpu_tables:
            native_out = cpu_kernels.paged_prefill_attention(q, pool, layer, meta.cpu_tables, scale)
            if native_out is not None:
                return native_out
            meta.cpu_tables = ()  # shapes it does not take: the other layers go straight to SDPA
    out = torch.empty_like(q)
    for s in meta.seqs:
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        if s.context_start == 0:
            ks = k[s.q_start : s.q_start + s.q_len]
            vs = v[s.q_start : s.q_start + s.q_len]
            mask, causal = None, True
        else:
            # Query i sits at position context_start + i and sees keys 0 .. context_start + i:
            # causal, aligned to the lower right. As a boolean mask this took SDPA's masked
            # path, whose first call on a fresh H200 cost 0.8 s (docs/benchmarks/first-requests.md,
            # "The first requests of a fresh engine"); the bias runs flash, 1.1-1.3x faster too.
            # One query sees every key: no mask at all (the bias's dispatch costs ~0.1 ms).
            total = s.context_start + s.q_len
            ks, vs = _gather_context(pool, layer, s.block_ids, total)
            mask = causal_lower_right(s.q_len, total) if s.q_len > 1 else None
            causal = False
        o = F.scaled_dot_product_attention(
            qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
    return out


def decode_key_mask(context_lens: torch.Tensor, num_keys: int) -> torch.Tensor:
    """True where key position >= the row's context length, shaped [B, 1, 1, num_keys]."""
    key_pos = torch.arange(num_keys, device=context_lens.device)
    return (key_pos[None, :] >= context_lens[:, None])[:, None, None, :]


def decode_attention_torch(
    q: torch.Tensor, pool: torch.Tensor, layer: int, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged decode off CUDA: gather each sequence's blocks, masked softmax; [B, Hq, D] -> [B, Hq, D].

    Plain matmuls over the query-head groups rather than SDPA: with one query row and a
    mask, CPU SDPA takes its flash path and costs milliseconds a call (most of a SmolLM2
    decode step). Scores and softmax in float32. Rows with no context are zero.
    """
    num_seqs, max_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = pool.shape[3], pool.shape[4], pool.shape[5]
    group = q.shape[1] // num_kv_heads
    gathered = pool[:, layer].index_select(0, block_tables.reshape(-1).long())  # [B*M, 2, bs, Hkv, D]
    gathered = gathered.view(num_seqs, max_blocks, 2, block_size, num_kv_heads, head_dim)
    k = gathered[:, :, 0].flatten(1, 2).permute(0, 2, 3, 1).float()  # [B, Hkv, D, S]
    v = gathered[:, :, 1].flatten(1, 2).transpose(1, 2).float()  # [B, Hkv, S, D]
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim).float()
    scores = torch.matmul(qg, k).mul_(scale)  # [B, Hkv, G, S]
    masked = mask if mask is not None else decode_key_mask(context_lens, max_blocks * block_size)
    probs = torch.softmax(scores.masked_fill_(masked, float("-inf")), dim=-1).nan_to_num_(0.0)
    return torch.matmul(probs, v).reshape(num_seqs, num_kv_heads * group, head_dim).to(q.dtype)


def decode_attention(
    q: torch.Tensor, pool: torch.Tensor, layer: int, meta: DecodeMetadata, scale: float,
) -> torch.Tensor:
    """Paged decode attention: the Triton kernel on CUDA; on CPU the native kernel
    (:mod:`libs.engine.kernels.cpu`, reads the pool in place), or the torch path without one."""
    if q.is_cuda:
        from libs.engine.kernels import paged_decode_attention

        return paged_decode_attention(q, pool, layer, meta.block_tables, meta.context_lens, scale)
    from libs.engine.kernels import cpu as cpu_kernels

    out = cpu_kernels.paged_decode_attention(q, pool, layer, meta.block_tables, meta.context_lens, scale)
    if out is not None:
        return out
    if q.shape[0] == 1:
        return _decode_one_cpu(q, pool, layer, meta.block_tables[0], int(meta.context_lens[0]), scale)
    if meta.cpu_mask is None:
        meta.cpu_mask = decode_key_mask(meta.context_lens, meta.block_tables.shape[1] * pool.shape[3])
    return decode_attention_torch(q, pool, layer, meta.block_tables, meta.context_lens, scale, meta.cpu_mask)


def _decode_one_cpu(
    q: torch.Tensor, pool: torch.Tensor, layer: int, block_ids: torch.Tensor, length: int, scale: float,
) -> torch.Tensor:
    """One sequence off CUDA: its exact context, so SDPA runs without a mask (half the
    cost of the masked batch path; batch 1 is the common case on CPU)."""
    k, v = _gather_context(pool, layer, block_ids.long(), length)  # [S, Hkv, D]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), scale=scale, enable_gqa=True,
    )
    return o.squeeze(2)

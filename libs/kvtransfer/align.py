"""Bidirectional segment alignment: the fewest copies that move a request's KV.

P holds the request's tokens in blocks ``src_ids`` and D has reserved ``dst_ids`` for
the same tokens (position ``i`` of both lists holds the same 16 tokens). A copy op moves
``num_blocks`` blocks from ``src_block ..`` to ``dst_block ..``; it can cover every pair
``(s + i, d + i)``, i.e. a stretch where the ids are contiguous on *both* sides. Sorting
the pairs by source id and merging neighbours with the same offset ``d - s`` gives the
shortest list (each maximal chain is one op). With segment allocation on both sides a
fresh request needs one op.

The plan then expands into *pieces*, the unit every transport issues as one call:

- ``MERGED``: one contiguous span of ``num_blocks * block_bytes`` per op (FlowKV).
- ``LAYERWISE``: per op, per layer, one strided piece: that layer's K and V of every
  block of the op (``num_blocks`` rows of ``2 * chunk_bytes`` bytes, ``block_bytes`` apart);
  one ``cudaMemcpy2DAsync`` / one torch strided copy / one NCCL message (packed).
  Calls = ``num_layers * num_ops``.
- ``BLOCKWISE``: the vLLM-disagg baseline on a per-layer layout: one contiguous piece per
  layer, per K/V, per block. Calls = ``2 * num_layers * num_blocks``.

A layer-major pool (``KVLayout.order == "layer"``, vLLM's) holds an op's blocks as one
contiguous span *per layer*: ``MERGED`` and ``LAYERWISE`` both issue one piece per layer
per op (calls = ``num_layers * num_ops``), ``BLOCKWISE`` one per layer per block (K and
V of a block share its page there). Its offsets depend on each pool's size, so
:func:`expand` needs ``src_blocks``/``dst_blocks``; a transport that addresses only one
of the two pools passes only that one (the other side's offsets are then -1).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np
import torch

from libs.kvtransfer.base import TransferMode
from libs.kvtransfer.layout import KVLayout


class CopyOp(msgspec.Struct, frozen=True, array_like=True):
    """Copy ``num_blocks`` blocks from ``src_block`` (P) to ``dst_block`` (D)."""

    src_block: int
    dst_block: int
    num_blocks: int


class Piece(msgspec.Struct, frozen=True, array_like=True):
    """One transport call: ``height`` rows of ``width`` bytes, ``pitch`` bytes apart.

    Offsets are bytes from the start of each pool; ``height == 1`` is a contiguous span.
    """

    src_offset: int
    dst_offset: int
    width: int
    height: int = 1
    pitch: int = 0

    @property
    def nbytes(self) -> int:
        return self.width * self.height


def align(src_ids: Sequence[int], dst_ids: Sequence[int], skip_blocks: int = 0) -> list[CopyOp]:
    """The shortest list of copy ops moving ``src_ids[k]`` to ``dst_ids[k]`` for ``k >= skip_blocks``.

    Args:
        src_ids: P's block ids for the request, in token order.
        dst_ids: D's block ids for the same tokens.
        skip_blocks: blocks D already holds (a cached prefix); only the rest move.

    Returns:
        Ops sorted by source block.

    Raises:
        ValueError: the lists differ in length, or an id repeats or is negative.
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if not 0 <= skip_blocks <= len(src_ids):
        raise ValueError(f"skip_blocks={skip_blocks} outside 0..{len(src_ids)}")
    pairs = sorted(zip(src_ids[skip_blocks:], dst_ids[skip_blocks:]))
    for side, ids in (("source", [s for s, _ in pairs]), ("destination", [d for _, d in pairs])):
        if len(set(ids)) != len(ids):
            raise ValueError(f"repeated {side} block id")
        if ids and min(ids) < 0:
            raise ValueError(f"negative {side} block id")
    ops: list[CopyOp] = []
    for s, d in pairs:
        if ops:
            last = ops[-1]
            if s == last.src_block + last.num_blocks and d == last.dst_block + last.num_blocks:
                ops[-1] = CopyOp(last.src_block, last.dst_block, last.num_blocks + 1)
                continue
        ops.append(CopyOp(s, d, 1))
    return ops


def num_blocks_of(ops: Sequence[CopyOp]) -> int:
    return sum(op.num_blocks for op in ops)


def check_bounds(ops: Sequence[CopyOp], num_src_blocks: int, num_dst_blocks: int) -> None:
    """Raise ValueError if an op reaches outside either pool."""
    for op in ops:
        if op.src_block + op.num_blocks > num_src_blocks:
            raise ValueError(f"{op} reads past the source pool of {num_src_blocks} blocks")
        if op.dst_block + op.num_blocks > num_dst_blocks:
            raise ValueError(f"{op} writes past the destination pool of {num_dst_blocks} blocks")


def op_byte_range(op: CopyOp, layout: KVLayout) -> tuple[int, int, int]:
    """``(src_offset, dst_offset, nbytes)`` of a merged op in the two pools."""
    bb = layout.block_bytes
    return op.src_block * bb, op.dst_block * bb, op.num_blocks * bb


def _expand_layer_major(ops: Sequence[CopyOp], layout: KVLayout, mode: TransferMode,
                        src_blocks: int | None, dst_blocks: int | None) -> list[Piece]:
    page = layout.page_bytes

    def offset(num_blocks: int | None, layer: int, block: int) -> int:
        return -1 if num_blocks is None else (layer * num_blocks + block) * page

    if src_blocks is None and dst_blocks is None:
        raise ValueError("a layer-major plan needs the size of at least one pool")
    if mode in (TransferMode.MERGED, TransferMode.LAYERWISE):
        return [Piece(offset(src_blocks, l, op.src_block), offset(dst_blocks, l, op.dst_block), op.num_blocks * page)
                for l in range(layout.num_layers) for op in ops]
    if mode == TransferMode.BLOCKWISE:
        blocks = [(op.src_block + i, op.dst_block + i) for op in ops for i in range(op.num_blocks)]
        return [Piece(offset(src_blocks, l, s), offset(dst_blocks, l, d), page)
                for l in range(layout.num_layers) for s, d in blocks]
    raise ValueError(f"unknown transfer mode {mode!r}")


def expand(ops: Sequence[CopyOp], layout: KVLayout, mode: TransferMode, *, src_blocks: int | None = None,
           dst_blocks: int | None = None) -> list[Piece]:
    """The pieces (transport calls) of a plan in the given mode (see the module docstring).

    ``src_blocks``/``dst_blocks``: the sizes of P's and D's pools, needed by layer-major layouts.
    """
    if layout.layer_major:
        return _expand_layer_major(ops, layout, mode, src_blocks, dst_blocks)
    bb = layout.block_bytes
    chunk = layout.chunk_bytes
    if mode == TransferMode.MERGED:
        return [Piece(s, d, n) for s, d, n in (op_byte_range(op, layout) for op in ops)]
    if mode == TransferMode.LAYERWISE:
        layer = 2 * chunk
        return [
            Piece(op.src_block * bb + l * layer, op.dst_block * bb + l * layer, layer, op.num_blocks, bb)
            for l in range(layout.num_layers)
            for op in ops
        ]
    if mode == TransferMode.BLOCKWISE:
        # One piece per (layer, K/V, block): what a per-layer pool forces.
        blocks = [(op.src_block + i, op.dst_block + i) for op in ops for i in range(op.num_blocks)]
        return [
            Piece(s * bb + lk * chunk, d * bb + lk * chunk, chunk)
            for lk in range(2 * layout.num_layers)
            for s, d in blocks
        ]
    raise ValueError(f"unknown transfer mode {mode!r}")


def num_calls(ops: Sequence[CopyOp], layout: KVLayout, mode: TransferMode) -> int:
    """``len(expand(ops, layout, mode))`` without building the pieces."""
    if layout.layer_major:
        return layout.num_layers * (num_blocks_of(ops) if mode == TransferMode.BLOCKWISE else len(ops))
    if mode == TransferMode.MERGED:
        return len(ops)
    if mode == TransferMode.LAYERWISE:
        return layout.num_layers * len(ops)
    return 2 * layout.num_layers * num_blocks_of(ops)


def piece_view(byte_view: torch.Tensor, offset: int, width: int, height: int = 1, pitch: int = 0) -> torch.Tensor:
    """A ``[height, width]`` uint8 view of a flat byte tensor (rows ``pitch`` bytes apart)."""
    if height == 1:
        return byte_view[offset : offset + width].view(1, width)
    return torch.as_strided(byte_view, (height, width), (pitch, 1), byte_view.storage_offset() + offset)


def host_copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src`` for CPU tensors of one shape, on the calling thread alone.

    torch splits a large CPU copy over its OpenMP threads, which starts an OpenMP team in
    the calling thread. A transfer thread (or the event loop) with a team of its own beside
    the engine thread's takes libgomp over the core count, and libgomp then stops spinning
    between parallel regions, which slows every engine step after it (see
    ``AsyncEngine.start``). numpy copies on the one thread, as fast for these rows.
    """
    np.copyto(dst.numpy(), src.numpy())


def copy_pieces(src_bytes: torch.Tensor, dst_bytes: torch.Tensor, pieces: Sequence[Piece]) -> None:
    """Issue each piece as one copy from ``src_bytes`` to ``dst_bytes`` (flat uint8 views):
    a torch copy on a device, :func:`host_copy_` between host buffers."""
    host = not (src_bytes.is_cuda or dst_bytes.is_cuda)
    for p in pieces:
        dst = piece_view(dst_bytes, p.dst_offset, p.width, p.height, p.pitch)
        src = piece_view(src_bytes, p.src_offset, p.width, p.height, p.pitch)
        if host:
            host_copy_(dst, src)
        else:
            dst.copy_(src, non_blocking=True)

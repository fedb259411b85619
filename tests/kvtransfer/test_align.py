"""Bidirectional alignment: exact copy lists, brute-force reference, mode expansion."""

from __future__ import annotations

import random

import pytest

from libs.kvtransfer.align import CopyOp, Piece, align, expand, num_calls
from libs.kvtransfer.allocator import SegmentAllocator
from libs.kvtransfer.base import TransferMode
from libs.kvtransfer.layout import KVLayout, LayoutMismatch

LAYOUT = KVLayout("float32", num_layers=3, block_size=4, num_kv_heads=2, head_dim=8)
CHUNK = 4 * 2 * 8 * 4  # block_size * heads * head_dim * 4 bytes = 256
BLOCK = 3 * 2 * CHUNK  # 1536


def test_hand_made_lists() -> None:
    assert align([], []) == []
    assert align([0, 1, 2, 3], [10, 11, 12, 13]) == [CopyOp(0, 10, 4)]
    # contiguous on P only -> split where D breaks
    assert align([0, 1, 2, 3], [10, 11, 20, 21]) == [CopyOp(0, 10, 2), CopyOp(2, 20, 2)]
    # contiguous on D only
    assert align([5, 6, 0, 1], [0, 1, 2, 3]) == [CopyOp(0, 2, 2), CopyOp(5, 0, 2)]
    # reversed order of pairs still merges (pairs, not positions, decide)
    assert align([1, 0], [11, 10]) == [CopyOp(0, 10, 2)]
    assert align([0, 1], [11, 10]) == [CopyOp(0, 11, 1), CopyOp(1, 10, 1)]


def test_partial_handoff_skips_cached_prefix() -> None:
    src, dst = [0, 1, 2, 3, 4, 5], [40, 41, 7, 8, 9, 10]
    assert align(src, dst) == [CopyOp(0, 40, 2), CopyOp(2, 7, 4)]
    assert align(src, dst, skip_blocks=2) == [CopyOp(2, 7, 4)]
    assert align(src, dst, skip_blocks=2) == align(src[2:], dst[2:])
    assert align(src, dst, skip_blocks=6) == []


def test_errors() -> None:
    with pytest.raises(ValueError, match="3 source blocks but 2"):
        align([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="repeated destination"):
        align([0, 1], [5, 5])
    with pytest.raises(ValueError, match="skip_blocks"):
        align([0], [0], skip_blocks=2)


def _brute_force_num_ops(src: list[int], dst: list[int]) -> int:
    """Components of the graph linking (s, d) to (s+1, d+1): each is one op, no fewer possible."""
    pairs = set(zip(src, dst))
    return sum(1 for s, d in pairs if (s - 1, d - 1) not in pairs)


def _fragmented(rng: random.Random, num_blocks: int) -> SegmentAllocator:
    a = SegmentAllocator(num_blocks)
    live = []
    for _ in range(60):
        if live and rng.random() < 0.5:
            a.free(live.pop(rng.randrange(len(live))))
        elif a.can_allocate(8):
            live.append(a.allocate(rng.randint(1, 8)))
    return a


def test_random_fragmented_pools_match_brute_force() -> None:
    rng = random.Random(3)
    for _ in range(200):
        p, d = _fragmented(rng, 128), _fragmented(rng, 128)
        n = rng.randint(0, min(p.num_free_blocks, d.num_free_blocks))
        src, dst = p.allocate(n), d.allocate(n)
        ops = align(src, dst)
        assert len(ops) == _brute_force_num_ops(src, dst)
        # the ops cover exactly the pairs
        covered = {(op.src_block + i, op.dst_block + i) for op in ops for i in range(op.num_blocks)}
        assert covered == set(zip(src, dst))


def test_fresh_request_is_one_op() -> None:
    p, d = SegmentAllocator(1000), SegmentAllocator(1000)
    p.allocate(17)
    src, dst = p.allocate(625), d.allocate(625)
    assert align(src, dst) == [CopyOp(17, 0, 625)]


def test_expand_modes() -> None:
    ops = [CopyOp(0, 10, 2), CopyOp(5, 3, 1)]
    assert expand(ops, LAYOUT, TransferMode.MERGED) == [Piece(0, 10 * BLOCK, 2 * BLOCK), Piece(5 * BLOCK, 3 * BLOCK, BLOCK)]
    lw = expand(ops, LAYOUT, TransferMode.LAYERWISE)
    assert len(lw) == 3 * 2 == num_calls(ops, LAYOUT, TransferMode.LAYERWISE)
    assert lw[0] == Piece(0, 10 * BLOCK, 2 * CHUNK, 2, BLOCK)
    assert lw[3] == Piece(5 * BLOCK + 2 * CHUNK, 3 * BLOCK + 2 * CHUNK, 2 * CHUNK, 1, BLOCK)
    bw = expand(ops, LAYOUT, TransferMode.BLOCKWISE)
    assert len(bw) == 2 * 3 * 3 == num_calls(ops, LAYOUT, TransferMode.BLOCKWISE)
    assert bw[:4] == [Piece(0, 10 * BLOCK, CHUNK), Piece(BLOCK, 11 * BLOCK, CHUNK),
                      Piece(5 * BLOCK, 3 * BLOCK, CHUNK), Piece(CHUNK, 10 * BLOCK + CHUNK, CHUNK)]
    for mode in TransferMode:
        assert sum(p.nbytes for p in expand(ops, LAYOUT, mode)) == 3 * BLOCK
        assert num_calls(ops, LAYOUT, mode) == len(expand(ops, LAYOUT, mode))


def test_llama8b_call_counts() -> None:
    layout = KVLayout("bfloat16", 32, 16, 8, 128)
    ops = align(list(range(625)), list(range(625)))  # 10,000 tokens
    assert num_calls(ops, layout, TransferMode.MERGED) == 1
    assert num_calls(ops, layout, TransferMode.LAYERWISE) == 32
    assert num_calls(ops, layout, TransferMode.BLOCKWISE) == 40_000


def test_layout_mismatch_names_both_sides() -> None:
    other = KVLayout("bfloat16", num_layers=3, block_size=4, num_kv_heads=2, head_dim=8)
    with pytest.raises(LayoutMismatch, match=r"prefill-0 and decode-1 differ \(dtype: prefill-0='float32' decode-1='bfloat16'\)"):
        LAYOUT.check_compatible(other, local="prefill-0", peer="decode-1")

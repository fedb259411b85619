"""Layer-major pools (vLLM's KV layout): hand-offs over ``shm`` and ``tcp`` between pools
of different sizes land the right bytes, in one call per layer per aligned segment."""

from __future__ import annotations

import pytest
import torch

from libs.kvtransfer.agent import KVAgent
from libs.kvtransfer.align import align, expand, num_calls
from libs.kvtransfer.base import TransferMode
from libs.kvtransfer.layout import KVLayout
from libs.kvtransfer.pool import KVPool

LAYOUT = KVLayout(dtype="float32", num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, order="layer")


def _filled(num_blocks: int, seed: int) -> KVPool:
    pool = KVPool.allocate(LAYOUT, num_blocks, shared=True)
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def test_layer_major_pool_shape_and_pieces() -> None:
    pool = KVPool.allocate(LAYOUT, 10)
    try:
        assert pool.num_blocks == 10
        assert tuple(pool.tensor.shape) == (3, 10, 2, 4, 2, 8)
        ops = align([2, 3, 4, 7], [5, 6, 7, 0])
        assert len(ops) == 2
        pieces = expand(ops, LAYOUT, TransferMode.MERGED, src_blocks=10, dst_blocks=12)
        assert len(pieces) == num_calls(ops, LAYOUT, TransferMode.MERGED) == 3 * 2
        page = LAYOUT.page_bytes
        assert pieces[0].src_offset == 2 * page and pieces[0].dst_offset == 5 * page
        assert pieces[0].width == 3 * page
        layer1 = pieces[2]  # layer 1, first op
        assert layer1.src_offset == (10 + 2) * page and layer1.dst_offset == (12 + 5) * page
        assert num_calls(ops, LAYOUT, TransferMode.BLOCKWISE) == 3 * 4
        with pytest.raises(ValueError):
            expand(ops, LAYOUT, TransferMode.MERGED)
    finally:
        pool.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_hand_off_between_layer_major_pools(transport: str) -> None:
    src_pool, dst_pool = _filled(16, 1), _filled(24, 2)
    p = KVAgent(src_pool, "p", force_transport=transport)
    d = KVAgent(dst_pool, "d", force_transport=transport)
    await p.start()
    await d.start()
    try:
        src, dst = [3, 4, 5, 6, 9], [10, 11, 12, 13, 20]
        before = dst_pool.tensor.clone()
        fut = d.expect("t1", p.info(), dst, src)
        stats = await p.send("t1", d.info(), src, dst)
        d.complete("t1")
        await fut
        assert stats.calls == LAYOUT.num_layers * 2  # two aligned segments, one call per layer each
        for s, t in zip(src, dst):
            assert torch.equal(dst_pool.tensor[:, t], src_pool.tensor[:, s])
        untouched = [b for b in range(24) if b not in dst]
        assert torch.equal(dst_pool.tensor[:, untouched], before[:, untouched])
    finally:
        await p.close()
        await d.close()
        src_pool.close()
        dst_pool.close()

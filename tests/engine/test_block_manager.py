"""Block manager: exact ids and segments, prefix cache refcounts, eviction; preemption."""

from __future__ import annotations

import random

import pytest

from libs.engine.block_manager import BlockManager
from libs.engine.sampling import SamplingParams
from libs.kvtransfer.allocator import NoFreeBlocks
from tests.engine.conftest import make_engine, run_all, tokens_of


def test_prompt_in_one_segment_and_decode_growth_extends_it() -> None:
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    assert bm.allocate("a", list(range(10)), 10, 0) == 0
    assert bm.block_ids("a") == [0, 1, 2]
    bm.allocate("b", list(range(5)), 5, 0)
    assert bm.block_ids("b") == [3, 4]
    assert bm.append_slots("a", 12) and bm.block_ids("a") == [0, 1, 2]
    assert bm.append_slots("a", 13) and bm.block_ids("a") == [0, 1, 2, 5]
    assert bm.segments("a") == [(0, 3), (5, 1)]
    bm.free("b")
    assert bm.append_slots("a", 17) and bm.block_ids("a") == [0, 1, 2, 5, 6]
    # b's run [3, 5) is free again; a 2-block prompt takes it (best fit), a 4-block one the tail.
    bm.allocate("c", list(range(8)), 8, 0)
    assert bm.segments("c") == [(3, 2)]
    bm.allocate("d", list(range(16)), 16, 0)
    assert bm.segments("d") == [(7, 4)]
    assert bm.num_free_blocks == 5 and bm.largest_free_segment == 5
    with pytest.raises(NoFreeBlocks):
        bm.allocate("e", list(range(24)), 24, 0)
    assert not bm.has("e") and bm.num_free_blocks == 5


def test_prefix_cache_refcounts_and_lru_eviction() -> None:
    bm = BlockManager(8, 4)
    prompt = list(range(100, 112))  # 3 full blocks
    assert bm.allocate("a", prompt, 12, 2) == 0
    assert bm.block_ids("a") == [0, 1, 2]
    bm.register_computed("a", prompt, 12)
    assert bm.allocate("b", prompt + [5], 13, 3) == 12
    assert bm.block_ids("b") == [0, 1, 2, 3]
    assert [bm.ref_count(i) for i in range(4)] == [2, 2, 2, 1]
    bm.free("a")
    assert [bm.ref_count(i) for i in range(4)] == [1, 1, 1, 1]
    bm.free("b")
    assert bm.num_evictable_blocks == 3 and bm.num_free_blocks == 8
    # A different prompt needing 6 blocks evicts the LRU cached blocks (tail first).
    other = list(range(200, 224))
    assert bm.allocate("c", other, 24, 5) == 0
    # The evicted block 2 merges with the free run after it: one segment.
    assert bm.block_ids("c") == [2, 3, 4, 5, 6, 7] and bm.segments("c") == [(2, 6)]
    assert bm.is_cached(0) and bm.is_cached(1) and not bm.is_cached(2)
    bm.free("c")
    # The surviving 2-block prefix still hits; its third block is gone.
    assert bm.allocate("d", prompt, 12, 2) == 8
    assert bm.block_ids("d")[:2] == [0, 1]


def test_same_hash_different_tokens_never_hits() -> None:
    bm = BlockManager(8, 2)
    bm.allocate("a", [1, 2, 3, 4], 4, 2)
    bm.register_computed("a", [1, 2, 3, 4], 4)
    assert bm.allocate("b", [1, 2, 9, 9], 4, 2) == 2  # only the first block matches
    assert bm.block_ids("b")[0] == bm.block_ids("a")[0]


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(11)
    return {f"r{i}": [rng.randrange(3, 49152) for _ in range(n)] for i, n in enumerate([9, 14, 6, 11])}


def test_preemption_by_recompute_keeps_greedy_tokens() -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = {k: tokens_of(v) for k, v in run_all(make_engine(num_blocks=128), _prompts(), params).items()}
    tight = make_engine(num_blocks=12)  # 4 requests up to 26 tokens = up to 7 blocks each
    got = {k: tokens_of(v) for k, v in run_all(tight, _prompts(), params).items()}
    assert got == expected
    assert tight.stats().num_preemptions > 0
    assert tight.stats().free_blocks == 12


def test_impossible_request_errors_and_engine_goes_on() -> None:
    engine = make_engine(num_blocks=8)  # 32 tokens at most
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("big", list(range(3, 43)), params)
    engine.add_request("empty", [], params)
    engine.add_request("ok", [5, 6, 7], params)
    outs = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs["big"][-1].finish_reason == "error" and "max_model_len 32" in outs["big"][-1].error
    assert outs["empty"][-1].finish_reason == "error"
    assert len(tokens_of(outs["ok"])) == 4 and outs["ok"][-1].finish_reason == "length"
    # A request that reaches the pool's size stops with "length".
    engine.add_request("long", list(range(3, 30)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    last = None
    while engine.has_work():
        for o in engine.step():
            last = o
    assert last.finish_reason == "length" and last.num_output_tokens == 5


def test_abort_frees_blocks() -> None:
    engine = make_engine(num_blocks=16)
    engine.add_request("a", list(range(3, 20)), SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    assert engine.stats().free_blocks < 16
    assert engine.abort("a")
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort"
    assert engine.stats().free_blocks == 16 and not engine.abort("a")

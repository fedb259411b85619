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


def test_largest_free_segment_counts_evictable_blocks() -> None:
    """Cached blocks no request holds are free for the next allocation: a run of them and
    free blocks is what a hand-off gets in one copy (the allocator alone reads 0 here)."""
    bm = BlockManager(12, 4)
    for rid, first in (("a", 0), ("b", 100), ("c", 200)):  # 3 full blocks each: [0, 3), [3, 6), [6, 9)
        prompt = list(range(first, first + 12))
        bm.allocate(rid, prompt, 12, 0)
        bm.register_computed(rid, prompt, 12)
    bm.allocate("d", list(range(300, 312)), 12, 0)  # [9, 12), never registered: freed to the allocator
    assert (bm.num_free_blocks, bm.largest_free_segment, bm.fragmentation()) == (0, 0, 0.0)
    bm.free("a")
    bm.free("c")
    assert bm.num_evictable_blocks == 6 and bm._alloc.largest_free_segment == 0
    assert bm.num_free_blocks == 6 and bm.largest_free_segment == 3 and bm.fragmentation() == 0.5
    bm.free("d")  # [6, 9) cached + [9, 12) free: one run of 6
    assert bm.largest_free_segment == 6 and bm.fragmentation() == pytest.approx(1 - 6 / 9)
    # A 6-block allocation takes that run whole (the window eviction), in one segment.
    bm.allocate("e", list(range(400, 424)), 24, 0)
    assert bm.segments("e") == [(6, 6)] and bm.largest_free_segment == 3
    bm.free("b")
    assert bm.largest_free_segment == 6 and bm.num_free_blocks == 6 and bm.fragmentation() == 0.0


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


def _one_block_requests(bm: BlockManager, free_order: list[int]) -> None:
    """Fill a 1-token-block pool with cached one-block requests; free some in the given order."""
    for i in range(bm.num_total_blocks):
        bm.allocate(f"r{i}", [1000 + i], 1, 1)
        bm.register_computed(f"r{i}", [1000 + i], 1)
        assert bm.block_ids(f"r{i}") == [i]
    for i in free_order:
        bm.free(f"r{i}")


def test_eviction_finds_one_run_among_older_cached_blocks() -> None:
    bm = BlockManager(16, 1)
    # LRU order 0, 8, 1, 9, 2, 10, 3, ...: the 4 oldest alone are two runs of 2.
    _one_block_requests(bm, [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])
    bm.allocate("x", [1, 2, 3, 4], 4, 4)
    # Evicting the 4 oldest (0, 8, 1, 9) gave [0, 1] + [8, 9]; with the next oldest, 2, 10
    # and 3, [0, 4) is one run: 2 and 3 are evicted, 10 was only looked at; 8, 9 are free.
    assert bm.segments("x") == [(0, 4)]
    assert bm.num_evicted_blocks == 6 and bm.num_evictable_blocks == 10 and bm.num_free_blocks == 12
    assert bm.is_cached(10) and not bm.is_cached(8) and not bm.is_cached(9)
    # 10 is still the least recently used block: the next shortfall evicts it first.
    bm.allocate("y", [5, 6, 7], 3, 3)
    assert bm.segments("y") == [(8, 3)] and not bm.is_cached(10) and bm.is_cached(11)
    # A cached block still hits and is never handed out while it is cached.
    assert bm.allocate("z", [1011], 1, 1) == 1 and bm.block_ids("z") == [11]


def test_eviction_without_a_run_in_reach_evicts_n_more_and_takes_largest_runs() -> None:
    bm = BlockManager(16, 1)
    _one_block_requests(bm, [0, 2, 4, 6, 8, 10, 12, 14])  # odd blocks stay held
    bm.allocate("x", [1, 2], 2, 2)
    # No two free blocks can ever be adjacent: the two oldest are evicted (the shortfall)
    # and, as no run of 2 is in reach, two more (4, 6): free space builds up where the oldest were.
    assert bm.block_ids("x") == [0, 2]
    assert bm.num_evicted_blocks == 4 and [bm.is_cached(b) for b in (4, 6, 8, 14)] == [False, False, True, True]
    assert bm.num_free_blocks == 6 and bm.num_evictable_blocks == 4


def _check_consistent(bm: BlockManager) -> None:
    free = {b for s, n in bm._alloc.free_runs() for b in range(s, s + n)}
    evictable = set(bm._evictable)
    held = {b for b in range(bm.num_total_blocks) if bm.ref_count(b) > 0}
    assert len(free) + len(evictable) + len(held) == bm.num_total_blocks  # disjoint and complete
    cached = set(bm._hash_of_block)
    assert evictable <= cached and not free & cached
    assert all(bm._block_by_hash[h] == b for b, h in bm._hash_of_block.items())


def test_random_churn_keeps_pool_and_cache_consistent() -> None:
    rng = random.Random(5)
    bm = BlockManager(64, 2)
    heads = [[rng.randrange(3, 99) for _ in range(rng.randint(2, 20))] for _ in range(4)]
    live: dict[str, list[int]] = {}
    for step in range(3000):
        if live and (rng.random() < 0.4 or bm.num_free_blocks < 16):
            rid = rng.choice(sorted(live))
            if rng.random() < 0.5:
                bm.free(rid)
                del live[rid]
            else:  # decode growth
                live[rid].append(rng.randrange(3, 99))
                if bm.append_slots(rid, len(live[rid])):
                    bm.register_computed(rid, live[rid], len(live[rid]) - 1)
                else:
                    live[rid].pop()
        else:
            prompt = rng.choice(heads) + [rng.randrange(3, 99) for _ in range(rng.randint(1, 24))]
            rid = f"r{step}"
            try:
                hit = bm.allocate(rid, prompt, len(prompt), len(prompt) // 2)
            except NoFreeBlocks:
                continue
            ids = bm.block_ids(rid)
            assert len(ids) == bm.blocks_for(len(prompt)) and len(set(ids)) == len(ids)
            # Hits hand out only blocks holding exactly these tokens.
            assert all(bm._tokens_of_block[b] == tuple(prompt[2 * i : 2 * i + 2]) for i, b in enumerate(ids[: hit // 2]))
            bm.register_computed(rid, prompt, len(prompt))
            live[rid] = prompt
        _check_consistent(bm)
    assert bm.num_evicted_blocks > 500 and bm.num_hit_tokens > 0


def test_prompt_ignores_a_hint_run_too_short_for_it() -> None:
    bm = BlockManager(16, 1)
    bm.allocate("a", [1, 2, 3, 4], 4, 4)
    bm.register_computed("a", [1, 2, 3, 4], 2)  # blocks 0, 1 cached; 2, 3 go back free
    bm.allocate("pad", [9], 1, 0)  # block 4: free runs [2, 4) and [5, 16) once a is freed
    bm.free("a")
    # Past the 2-block hit, [2, 4) cannot hold 3 blocks: one run elsewhere, not 2 + 1.
    assert bm.allocate("b", [1, 2, 7, 7, 7], 5, 5) == 2
    assert bm.segments("b") == [(0, 2), (5, 3)]
    # Where the run after the last block holds the rest, it continues there.
    assert bm.allocate("c", [1, 2, 8], 3, 3) == 2 and bm.block_ids("c") == [0, 1, 2]
    assert bm.append_slots("b", 9) and bm.segments("b") == [(0, 2), (5, 7)]


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

"""SegmentAllocator: exact ids, run counts and merging."""

from __future__ import annotations

import random

import pytest

from libs.kvtransfer.allocator import NoFreeBlocks, SegmentAllocator, ids_to_runs


def test_ids_to_runs() -> None:
    assert ids_to_runs([]) == []
    assert ids_to_runs([4, 5, 6, 9, 2, 3]) == [(4, 3), (9, 1), (2, 2)]
    assert ids_to_runs([3, 2]) == [(3, 1), (2, 1)]


def test_fresh_pool_gives_one_run_each() -> None:
    a = SegmentAllocator(100)
    assert a.allocate(10) == list(range(0, 10))
    assert a.allocate(5) == list(range(10, 15))
    assert a.num_free_blocks == 85
    assert a.num_free_segments == 1
    assert a.largest_free_segment == 85
    assert a.free_runs() == [(15, 85)]
    assert a.fragmentation() == 0.0


def test_free_merges_both_sides() -> None:
    a = SegmentAllocator(30)
    x, y, z = a.allocate(10), a.allocate(10), a.allocate(10)
    assert a.num_free_blocks == 0 and a.largest_free_segment == 0 and a.fragmentation() == 0.0
    a.free(x)
    a.free(z)
    assert a.free_runs() == [(0, 10), (20, 10)]
    assert a.fragmentation() == 0.5
    a.free(y)
    assert a.free_runs() == [(0, 30)]
    assert a.num_free_segments == 1


def test_best_fit_takes_smallest_fitting_run() -> None:
    a = SegmentAllocator(40)
    blocks = [a.allocate(1)[0] for _ in range(40)]
    # free runs of lengths 5 (0..4), 3 (10..12), 8 (20..27)
    a.free(blocks[0:5])
    a.free(blocks[10:13])
    a.free(blocks[20:28])
    assert a.allocate(3) == [10, 11, 12]
    assert a.allocate(4) == [0, 1, 2, 3]
    assert a.free_runs() == [(4, 1), (20, 8)]


def test_no_fitting_run_takes_largest_first() -> None:
    a = SegmentAllocator(40)
    a.allocate(40)
    a.free(range(0, 4))  # 4
    a.free(range(10, 16))  # 6
    a.free(range(20, 22))  # 2
    a.free(range(30, 33))  # 3
    # 9 = 6 (largest) + best fit of 3 -> run at 30 exactly
    assert a.allocate(9) == [10, 11, 12, 13, 14, 15, 30, 31, 32]
    assert a.free_runs() == [(0, 4), (20, 2)]
    assert ids_to_runs(a.allocate(6)) == [(0, 4), (20, 2)]
    assert a.num_free_blocks == 0


def test_hint_grows_last_run() -> None:
    a = SegmentAllocator(20)
    r1 = a.allocate(4)  # 0..3
    a.allocate(16)
    a.free(range(4, 9))
    a.free(range(12, 15))  # free runs: (4, 5), (12, 3)
    # best fit alone would take 12..14; the hint continues the request's run at 4
    assert a.allocate(3, hint=r1[-1] + 1) == [4, 5, 6]
    assert ids_to_runs(r1 + [4, 5, 6]) == [(0, 7)]
    # hint not free -> ordinary best fit
    assert a.allocate(2, hint=0) == [7, 8]
    assert a.free_runs() == [(12, 3)]


def test_hint_partial_then_rest() -> None:
    a = SegmentAllocator(20)
    a.allocate(20)
    a.free([5, 6])
    a.free([10, 11, 12, 13])
    assert a.allocate(4, hint=5) == [5, 6, 10, 11]
    assert a.free_runs() == [(12, 2)]
    # hint in the middle of a run splits it
    a.free([0, 1, 2, 3])
    assert a.allocate(2, hint=1) == [1, 2]
    assert a.free_runs() == [(0, 1), (3, 1), (12, 2)]


def test_free_run_of_a_block() -> None:
    a = SegmentAllocator(20)
    a.allocate(20)
    a.free([2, 3, 4, 5, 9, 10, 19])
    assert [a.free_run(b) for b in (2, 5, 6, 10, 19, 0)] == [(2, 4), (2, 4), None, (9, 2), (19, 1), None]


def test_find_run_as_candidates_would_be_freed() -> None:
    a = SegmentAllocator(20)
    a.allocate(20)
    a.free([2, 3, 9, 10, 19])  # free runs (2, 2), (9, 2), (19, 1)
    # 4 joins (2, 2) into a run of 3; 8 then joins (9, 2) into (8, 3); 7 makes (7, 4).
    assert a.find_run(4, iter([4, 8, 15, 7, 6])) == (7, 4)
    assert a.find_run(3, [4, 8]) == (2, 1)
    # 12 alone, 11 joins it to (9, 2), 13 bridges to (14, 1): (9, 6) after 3 candidates.
    a.free([14])
    assert a.find_run(6, [12, 11, 13]) == (9, 3) and a.find_run(7, [12, 11, 13]) is None
    assert a.find_run(2, [0]) is None and a.find_run(2, [1]) == (1, 1) and a.find_run(2, [18]) == (18, 1)
    assert a.free_runs() == [(2, 2), (9, 2), (14, 1), (19, 1)]  # nothing changed


def test_errors() -> None:
    a = SegmentAllocator(8)
    ids = a.allocate(4)
    with pytest.raises(NoFreeBlocks):
        a.allocate(5)
    assert a.num_free_blocks == 4
    assert a.can_allocate(4) and not a.can_allocate(5)
    a.free(ids)
    with pytest.raises(ValueError, match="double free of block 0"):
        a.free([0])
    ids = a.allocate(2)
    with pytest.raises(ValueError, match="twice"):
        a.free([ids[0], ids[0]])
    with pytest.raises(ValueError, match="outside"):
        a.free([8])
    with pytest.raises(ValueError):
        a.free([ids[0], 7])  # 7 is free: nothing freed
    assert a.num_free_blocks == 6
    assert a.allocate(0) == []
    with pytest.raises(ValueError):
        SegmentAllocator(0)


def _check_invariants(a: SegmentAllocator, owned: set[int]) -> None:
    runs = a.free_runs()
    free = {i for s, n in runs for i in range(s, s + n)}
    assert free.isdisjoint(owned)
    assert len(free) + len(owned) == a.num_total_blocks == 200
    assert a.num_free_blocks == len(free)
    for (s1, n1), (s2, _) in zip(runs, runs[1:]):
        assert s1 + n1 < s2  # maximal runs: never adjacent
    assert a.largest_free_segment == max((n for _, n in runs), default=0)


def test_churn_keeps_runs_maximal_and_segment_counts_minimal() -> None:
    rng = random.Random(7)
    a = SegmentAllocator(200)
    live: list[list[int]] = []
    owned: set[int] = set()
    for _ in range(2000):
        if live and (rng.random() < 0.45 or not a.can_allocate(20)):
            ids = live.pop(rng.randrange(len(live)))
            a.free(ids)
            owned -= set(ids)
        else:
            n = rng.randint(1, 20)
            before = sorted((n_ for _, n_ in a.free_runs()), reverse=True)
            ids = a.allocate(n)
            assert len(ids) == n and owned.isdisjoint(ids)
            # fewest segments: the k largest runs are needed iff their sum < n
            k, total = 0, 0
            while total < n:
                total += before[k]
                k += 1
            assert len(ids_to_runs(ids)) == max(k, 1)
            live.append(ids)
            owned |= set(ids)
        _check_invariants(a, owned)
    for ids in live:
        a.free(ids)
    assert a.free_runs() == [(0, 200)]

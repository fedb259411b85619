"""Segment allocation: free KV blocks kept as runs of contiguous ids.

FlowKV's alignment can merge a hand-off into one copy only if a request's blocks are
contiguous, so the allocator hands out *runs*, never single scattered ids:

- free space is a set of maximal runs ``(start, length)``; adjacent runs never coexist
  (``free`` merges a freed run with its neighbours on both sides);
- ``allocate(n)`` takes the smallest run with ``length >= n`` (best fit), from its start;
  if no single run is long enough it takes the largest runs first, so the request gets
  the fewest segments, and the remainder by best fit;
- ``allocate(n, hint=h)`` first extends from block ``h`` if it is free, which lets a
  growing request continue its last run (decode appends blocks one at a time);
- ``find_run(n, candidates)`` only looks: where a run of ``n`` would appear if some
  allocated blocks were freed in a given order (the block manager asks it which cached
  blocks to evict, see :mod:`libs.engine.block_manager`).

Runs are indexed twice, by start (to find neighbours) and by (length, start) (best fit),
in sorted lists searched with :mod:`bisect`: O(log n) searches, O(n) memmove inserts of
machine words, which is fast for the few thousand runs a pool holds.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Sequence


class NoFreeBlocks(Exception):
    """Fewer free blocks than requested."""


def ids_to_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Group consecutive ids (in the given order) into ``(start, length)`` runs.

    Example: ``[4, 5, 6, 9, 2, 3]`` -> ``[(4, 3), (9, 1), (2, 2)]``.
    """
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


class SegmentAllocator:
    """Best-fit allocator over block ids ``0 .. num_blocks - 1`` that keeps free runs merged.

    Args:
        num_blocks: blocks in the pool; all start free as one run.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._num_blocks = num_blocks
        self._num_free = num_blocks
        self._starts: list[int] = [0]  # sorted starts of free runs
        self._length: dict[int, int] = {0: num_blocks}  # start -> length
        self._by_len: list[tuple[int, int]] = [(num_blocks, 0)]  # sorted (length, start)

    # ----------------------------------------------------------------- queries

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def largest_free_segment(self) -> int:
        return self._by_len[-1][0] if self._by_len else 0

    @property
    def num_free_segments(self) -> int:
        return len(self._starts)

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed (in any number of segments)."""
        return 0 <= n <= self._num_free

    def fragmentation(self) -> float:
        """``1 - largest_free_segment / num_free_blocks``; 0 when nothing is free."""
        if self._num_free == 0:
            return 0.0
        return 1.0 - self.largest_free_segment / self._num_free

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs ``(start, length)`` in id order (for tests and debugging)."""
        return [(s, self._length[s]) for s in self._starts]

    def is_free(self, block_id: int) -> bool:
        return self._run_containing(block_id) is not None

    def free_run(self, block_id: int) -> tuple[int, int] | None:
        """The free run ``(start, length)`` that holds ``block_id``, or None if it is not free."""
        start = self._run_containing(block_id)
        return None if start is None else (start, self._length[start])

    def find_run(self, n: int, candidates: Iterable[int]) -> tuple[int, int] | None:
        """Where a free run of ``n`` blocks first appears if allocated ``candidates`` are freed in order.

        Args:
            n: the run length wanted.
            candidates: distinct allocated block ids (the block manager's cached blocks,
                least recently used first); read lazily, up to the first that completes a run.

        Returns:
            ``(start, count)``: ``[start, start + n)`` is free once the first ``count``
            candidates are; None if freeing all of them gives no such run. Nothing changes.
        """
        starts, length = self._starts, self._length
        start_of: dict[int, int] = {}  # end -> start of the runs of free and candidate blocks so far
        end_of: dict[int, int] = {}  # start -> end
        for count, b in enumerate(candidates, 1):
            lo, hi = b, b + 1
            if b in start_of:
                lo = start_of.pop(b)
                del end_of[lo]
            elif b:  # a free run ending at b?
                i = bisect_right(starts, b - 1) - 1
                if i >= 0 and starts[i] + length[starts[i]] == b:
                    lo = starts[i]
            if hi in end_of:
                hi = end_of.pop(hi)
                del start_of[hi]
            elif hi in length:  # a free run starting at b + 1
                hi += length[hi]
            if hi - lo >= n:
                return lo, count
            start_of[hi], end_of[lo] = lo, hi
        return None

    # ---------------------------------------------------------------- changes

    def allocate(self, n: int, hint: int | None = None) -> list[int]:
        """Allocate ``n`` blocks as few, long runs.

        Args:
            n: blocks wanted (0 returns ``[]``).
            hint: preferred first id. If block ``hint`` is free, the allocation starts
                there and takes as much of its free run as it needs (used to grow a
                request's last run); the rest is allocated as without a hint.

        Returns:
            The ids, run after run in the order they were taken (each run ascending).

        Raises:
            NoFreeBlocks: fewer than ``n`` blocks are free (nothing is allocated).
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self._num_free:
            raise NoFreeBlocks(f"wanted {n} blocks, {self._num_free} free")
        ids: list[int] = []
        if n and hint is not None:
            start = self._run_containing(hint)
            if start is not None:
                avail = start + self._length[start] - hint
                take = min(n, avail)
                self._take(start, hint, take)
                ids.extend(range(hint, hint + take))
        while len(ids) < n:
            need = n - len(ids)
            i = bisect_left(self._by_len, (need, -1))
            if i < len(self._by_len):
                length, start = self._by_len[i]
                take = need
            else:
                # No run fits: the largest (lowest start among equals) goes whole.
                length = self._by_len[-1][0]
                length, start = self._by_len[bisect_left(self._by_len, (length, -1))]
                take = length
            self._take(start, start, take)
            ids.extend(range(start, start + take))
        return ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the free runs, merging with free neighbours on both sides.

        Raises:
            ValueError: an id is out of range, repeated, or already free (nothing is freed).
        """
        ids = sorted(block_ids)
        for i, block_id in enumerate(ids):
            if not 0 <= block_id < self._num_blocks:
                raise ValueError(f"block id {block_id} outside 0..{self._num_blocks - 1}")
            if i and ids[i - 1] == block_id:
                raise ValueError(f"block {block_id} freed twice in one call")
            if self._run_containing(block_id) is not None:
                raise ValueError(f"double free of block {block_id}")
        for start, length in ids_to_runs(ids):
            self._add_run(start, length)
        self._num_free += len(ids)

    # --------------------------------------------------------------- internals

    def _run_containing(self, block_id: int) -> int | None:
        i = bisect_right(self._starts, block_id) - 1
        if i < 0:
            return None
        start = self._starts[i]
        return start if block_id < start + self._length[start] else None

    def _remove_run(self, start: int) -> int:
        length = self._length.pop(start)
        del self._starts[bisect_left(self._starts, start)]
        del self._by_len[bisect_left(self._by_len, (length, start))]
        return length

    def _insert_run(self, start: int, length: int) -> None:
        self._length[start] = length
        insort(self._starts, start)
        insort(self._by_len, (length, start))

    def _take(self, run_start: int, at: int, count: int) -> None:
        """Carve ``[at, at + count)`` out of the free run starting at ``run_start``."""
        length = self._remove_run(run_start)
        if at > run_start:
            self._insert_run(run_start, at - run_start)
        end = at + count
        if end < run_start + length:
            self._insert_run(end, run_start + length - end)
        self._num_free -= count

    def _add_run(self, start: int, length: int) -> None:
        """Insert a freed run, merging with the free runs just before and after it."""
        i = bisect_left(self._starts, start)
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._length[prev] == start:
                length += self._remove_run(prev)
                start = prev
        end = start + length
        if end in self._length:
            length += self._remove_run(end)
        self._insert_run(start, length)

"""Per-request KV blocks over the segment allocator, with prefix caching.

A request's blocks are allocated in as few runs as possible: a prompt in one
``allocate`` call (continuing the run of its last prefix-cache hit if the free run there
holds all of it), decode growth one block at a time with ``hint=last_block + 1`` so the
run keeps extending.

Prefix caching: a *full* block whose KV is computed is registered under a chained hash
(parent block's hash + the block's token ids; the token ids are stored too, so a hash
collision can never hand out wrong KV). Blocks carry reference counts; a registered
block whose count drops to 0 stays cached and *evictable* (LRU) until space is needed.
Only full, registered blocks are ever shared, and a request writes only past its
cached prefix, so a shared block is never written while in use.

Eviction keeps allocations contiguous. Once the pool is full of cached blocks (after
about one pool's worth of traffic), evicting exactly the shortfall in LRU order would
hand a new request exactly the LRU victims, wherever they lie: the previous requests'
scattered decode blocks, their prompts' tails, the odd free block, i.e. one KV hand-off
split into dozens of copies. So an allocation of ``n`` blocks evicts the shortfall
(LRU first) as before, and then, if no free run holds ``n`` blocks, looks through the
next ``EVICTION_HORIZON * n`` least recently used cached blocks, oldest first, for the
first place where they and free blocks make a run of ``n``, and evicts only the cached
blocks in that window. A cached block is thus never evicted while more than
``shortfall + EVICTION_HORIZON * n`` cached blocks are older than it. If no such place
exists, ``n`` more LRU blocks are evicted (free space then builds up where the oldest
blocks are, for the next time) and the request takes the largest free runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from libs.kvtransfer.allocator import NoFreeBlocks, SegmentAllocator, ids_to_runs

# How far past the shortfall an allocation of n blocks may look, in LRU order, for cached
# blocks to evict so that its blocks form one run (in units of n).
EVICTION_HORIZON = 16


@dataclasses.dataclass
class _SeqBlocks:
    block_ids: list[int]
    hashes: list[int]  # chained hashes of the first len(hashes) full blocks
    num_registered: int  # leading full blocks already offered to the prefix cache


class BlockManager:
    """Allocates and frees blocks per request and keeps the prefix cache.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        enable_prefix_caching: share full blocks between requests with the same prefix.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._alloc = SegmentAllocator(num_blocks)
        self._ref = [0] * num_blocks
        self._seqs: dict[str, _SeqBlocks] = {}
        self._block_by_hash: dict[int, int] = {}
        self._hash_of_block: dict[int, int] = {}
        self._tokens_of_block: dict[int, tuple[int, ...]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._evictable_mask = np.zeros(num_blocks, dtype=np.int8)  # 1 where a block is in _evictable
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_evicted_blocks = 0

    # ----------------------------------------------------------------- queries

    @property
    def num_total_blocks(self) -> int:
        return self._alloc.num_total_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation may take: free in the allocator plus evictable cached ones."""
        return self._alloc.num_free_blocks + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def largest_free_segment(self) -> int:
        """Longest run of consecutive blocks an allocation may take, free or cached and
        evictable: how many blocks a hand-off can get in one copy.

        The allocator's own largest run leaves out the evictable blocks, which after the
        first pool's worth of traffic are most of the free ones: an idle node then read
        as 90% fragmented. Costs O(blocks) with numpy (about 0.1 ms at 60k blocks), so
        :meth:`LLMEngine.stats` refreshes it at most every 0.1 s.
        """
        alloc = self._alloc
        if not self._evictable:
            return alloc.largest_free_segment
        takeable = np.zeros(alloc.num_total_blocks + 2, dtype=np.int8)  # a 0 on each end
        takeable[1:-1] = self._evictable_mask
        for start, length in alloc.free_runs():
            takeable[start + 1 : start + 1 + length] = 1
        edges = np.diff(takeable)
        return int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max())

    def fragmentation(self, largest_free_segment: int | None = None) -> float:
        """``1 - largest_free_segment / num_free_blocks`` (evictable blocks count as free); 0
        when nothing is free."""
        free = self.num_free_blocks
        if free == 0:
            return 0.0
        largest = self.largest_free_segment if largest_free_segment is None else largest_free_segment
        return 1.0 - largest / free

    def has(self, request_id: str) -> bool:
        return request_id in self._seqs

    def block_ids(self, request_id: str) -> list[int]:
        return list(self._seqs[request_id].block_ids)

    def segments(self, request_id: str) -> list[tuple[int, int]]:
        """The request's blocks as ``(start, length)`` runs, in token order."""
        return ids_to_runs(self._seqs[request_id].block_ids)

    def recent_prefix_hashes(self, limit: int) -> list[int]:
        """The ``limit`` most recently cached prefix-block hashes, oldest first."""
        if limit <= 0:
            return []
        recent = list(itertools.islice(reversed(self._block_by_hash), limit))
        recent.reverse()
        return recent

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of_block

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- changes

    def allocate(self, request_id: str, token_ids: Sequence[int], num_tokens: int, max_cached_blocks: int) -> int:
        """Give a new request blocks for its first ``num_tokens`` tokens, reusing cached prefix blocks.

        Args:
            request_id: the request (must hold no blocks yet).
            token_ids: its tokens (at least ``num_tokens``).
            num_tokens: tokens to cover.
            max_cached_blocks: most leading blocks taken from the prefix cache.

        Returns:
            Tokens covered by prefix-cache hits (a multiple of ``block_size``).

        Raises:
            NoFreeBlocks: not enough free or evictable blocks (nothing changes).
        """
        if request_id in self._seqs:
            raise ValueError(f"request {request_id!r} already holds blocks")
        hashes = self._chain_hashes(token_ids, min(max_cached_blocks, num_tokens // self.block_size), [])
        hits = self._match(token_ids, hashes) if self.enable_prefix_caching else []
        need = self.blocks_for(num_tokens) - len(hits)
        evictable_hits = sum(1 for b in hits if self._ref[b] == 0)
        if need > self.num_free_blocks - evictable_hits:
            raise NoFreeBlocks(f"request {request_id!r} needs {need} blocks, {self.num_free_blocks - evictable_hits} free")
        for b in hits:
            if self._ref[b] == 0:
                del self._evictable[b]
                self._evictable_mask[b] = 0
            self._ref[b] += 1
        new = self._take(need, hint=hits[-1] + 1 if hits else None)
        self._seqs[request_id] = _SeqBlocks(hits + new, hashes[: len(hits)], len(hits))
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def append_slots(self, request_id: str, num_tokens: int) -> bool:
        """Make the request's blocks cover ``num_tokens`` tokens; False (nothing changes) if no room."""
        seq = self._seqs[request_id]
        need = self.blocks_for(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        seq.block_ids.extend(self._take(need, hint=seq.block_ids[-1] + 1 if seq.block_ids else None))
        return True

    def register_computed(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Offer the request's full blocks whose KV is now computed to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[request_id]
        full = min(num_computed // self.block_size, len(seq.block_ids))
        if full <= seq.num_registered:
            return
        seq.hashes = self._chain_hashes(token_ids, full, seq.hashes)
        for i in range(seq.num_registered, full):
            block, h = seq.block_ids[i], seq.hashes[i]
            if h in self._block_by_hash or block in self._hash_of_block:
                continue  # the same prefix is cached in another block already
            self._block_by_hash[h] = block
            self._hash_of_block[block] = h
            self._tokens_of_block[block] = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
        seq.num_registered = full

    def free(self, request_id: str) -> None:
        """Drop the request's references; cached blocks stay (evictable), the rest go back."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        to_free = []
        # Tail first, so a prompt's last blocks are evicted before its shared head.
        for b in reversed(seq.block_ids):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of_block:
                    self._evictable[b] = None
                    self._evictable_mask[b] = 1
                else:
                    to_free.append(b)
        if to_free:
            self._alloc.free(to_free)

    # --------------------------------------------------------------- internals

    def _chain_hashes(self, token_ids: Sequence[int], num_blocks: int, known: list[int]) -> list[int]:
        hashes = list(known)
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else 0
            hashes.append(hash((parent, tuple(token_ids[i * bs : (i + 1) * bs]))))
        return hashes

    def _match(self, token_ids: Sequence[int], hashes: list[int]) -> list[int]:
        hits: list[int] = []
        bs = self.block_size
        for i, h in enumerate(hashes):
            b = self._block_by_hash.get(h)
            if b is None or self._tokens_of_block[b] != tuple(token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(b)
        return hits

    def _take(self, n: int, hint: int | None) -> list[int]:
        """Allocate ``n`` blocks in as few runs as possible, evicting cached blocks as needed.

        If the free run at ``hint`` holds all ``n`` blocks, they come from there (a request
        growing in place). Otherwise the hint is dropped (one run elsewhere moves in one
        copy, where a short extension plus the rest would take two) and eviction goes as
        the module docstring says.
        """
        alloc = self._alloc
        if hint is not None and (run := alloc.free_run(hint)) is not None and run[0] + run[1] - hint >= n:
            ids = alloc.allocate(n, hint=hint)
        else:
            self._evict(self._pop_lru(n - alloc.num_free_blocks))
            start = None
            if alloc.largest_free_segment < n:
                window = self._find_window(n)
                if window is None:
                    self._evict(self._pop_lru(n))
                else:
                    start, victims = window
                    for b in victims:
                        del self._evictable[b]
                        self._evictable_mask[b] = 0
                    self._evict(victims)
            # Where a window was found, [start, start + n) is free now: the hint takes it whole.
            ids = alloc.allocate(n, hint=start)
        for b in ids:
            self._ref[b] = 1
        return ids

    def _find_window(self, n: int) -> tuple[int, list[int]] | None:
        """The first place where free blocks and the least recently used cached blocks (at
        most ``EVICTION_HORIZON * n``, oldest first) make a run of ``n``.

        Returns:
            The run's first block and the cached blocks in ``[start, start + n)``, or None.
            Nothing changes.
        """
        found = self._alloc.find_run(n, itertools.islice(self._evictable, EVICTION_HORIZON * n))
        if found is None:
            return None
        start, count = found
        return start, [b for b in itertools.islice(self._evictable, count) if start <= b < start + n]

    def _pop_lru(self, count: int) -> list[int]:
        """Take up to ``count`` least recently used blocks off the evictable list (still cached)."""
        taken = [self._evictable.popitem(last=False)[0] for _ in range(min(count, len(self._evictable)))]
        self._evictable_mask[taken] = 0
        return taken

    def _evict(self, blocks: list[int]) -> None:
        """Drop cached blocks (already off the evictable list) from the prefix cache and free them."""
        for b in blocks:
            del self._block_by_hash[self._hash_of_block.pop(b)]
            del self._tokens_of_block[b]
        if blocks:
            self._alloc.free(blocks)
            self.num_evicted_blocks += len(blocks)

"""Continuous batching: which requests run in the next step, and with how many tokens.

Order of one :meth:`Scheduler.schedule`:

1. every running request that decodes gets its token (decodes run every step); if its
   next block cannot be allocated, the newest running request is preempted by
   recompute (blocks freed, back to the front of the waiting queue) until it can;
2. running requests in the middle of a chunked prefill get the next chunk within
   the token budget left;
3. waiting requests are admitted in order while a running slot, blocks for all their
   tokens, and budget remain; the first that does not fit stops admission (FIFO).

A prompt whose rest exceeds the budget left by at most ``chunk_slack`` of it (and fits
``max_num_batched_tokens``; on CPU by default) is finished in this step rather than split:
the second part of a split prompt reads the first part's KV back and costs a step of its
own (a 256-token SmolLM2 prompt in two chunks took 7-10% longer than in one on a 2-core CPU).
"""

from __future__ import annotations

import collections
import dataclasses

from libs.engine.block_manager import BlockManager
from libs.engine.config import EngineConfig
from libs.engine.request import Request, RequestStatus
from libs.kvtransfer.allocator import NoFreeBlocks


@dataclasses.dataclass
class StepPlan:
    prefills: list[tuple[Request, int]] = dataclasses.field(default_factory=list)  # (request, chunk tokens)
    decodes: list[Request] = dataclasses.field(default_factory=list)
    failed: list[tuple[Request, str]] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes or self.failed)


@dataclasses.dataclass
class _Room:
    """What is left of a step: ``budget`` (the token budget asked for) and ``cap`` (what
    ``max_num_batched_tokens`` allows, which finishing a prompt may use past the budget)."""

    budget: int
    cap: int

    def take(self, n: int) -> None:
        self.budget -= n
        self.cap -= n


class Scheduler:
    """Owns the waiting queue and the running list; allocates through the block manager."""

    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order; the last is the newest
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_decoding(self) -> int:
        return sum(1 for r in self.running if r.num_uncomputed == 1)

    def num_prefill_tokens_left(self) -> int:
        return sum(r.num_uncomputed for r in self.waiting) + sum(
            r.num_uncomputed for r in self.running if r.num_uncomputed > 1
        )

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose blocks and KV are already in place (a committed hand-off)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def remove(self, req: Request) -> None:
        if req.status is RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        elif req.status is RequestStatus.RUNNING and req in self.running:
            self.running.remove(req)

    def schedule(self, budget: int | None = None) -> StepPlan:
        """Plan one step within ``budget`` tokens (default ``max_num_batched_tokens``);
        decodes are scheduled whatever the budget."""
        plan = StepPlan()
        cap = self.config.max_num_batched_tokens
        if budget is None:
            budget = cap
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or req.num_uncomputed != 1:
                continue
            if self._reserve_decode_slot(req):
                plan.decodes.append(req)
        budget -= len(plan.decodes)
        room = _Room(budget, cap - len(plan.decodes))
        for req in self.running:
            if room.budget <= 0:
                break
            if req.num_uncomputed > 1:
                n = self._chunk(req.num_uncomputed, room, plan)
                if n:
                    plan.prefills.append((req, n))
                    room.take(n)
        self._admit(plan, room)
        return plan

    def _reserve_decode_slot(self, req: Request) -> bool:
        while not self.blocks.append_slots(req.request_id, len(req.token_ids)):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def preempt(self, req: Request) -> None:
        """Free a running request's blocks and requeue it (first) to be recomputed."""
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _chunk(self, remaining: int, room: _Room, plan: StepPlan) -> int:
        budget = room.budget
        slack = self.config.chunk_slack or 0.0
        if remaining <= budget or remaining <= min(int(budget * (1.0 + slack)), room.cap):
            return remaining
        if self.config.enable_chunked_prefill:
            return budget
        # Unchunked: a prompt over the budget runs alone rather than never.
        return remaining if not (plan.prefills or plan.decodes) else 0

    def _admit(self, plan: StepPlan, room: _Room) -> None:
        bs = self.blocks.block_size
        while self.waiting and room.budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n_tokens = len(req.token_ids)
            if self.blocks.blocks_for(n_tokens) > self.blocks.num_total_blocks:
                self.waiting.popleft()
                req.status = RequestStatus.FINISHED
                plan.failed.append((req, f"{n_tokens} tokens need more blocks than the pool has"))
                continue
            try:
                # At least the last token is computed, so its logits exist to sample from.
                cached = self.blocks.allocate(req.request_id, req.token_ids, n_tokens, (n_tokens - 1) // bs)
            except NoFreeBlocks:
                break
            n = self._chunk(n_tokens - cached, room, plan)
            if n == 0:
                self.blocks.free(req.request_id)
                break
            self.waiting.popleft()
            req.num_computed_tokens = cached
            if req.num_output_tokens == 0:
                req.num_cached_tokens = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.prefills.append((req, n))
            room.take(n)

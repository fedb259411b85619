"""A simulated node: one engine that prefills, decodes, or both, with costs from calibration.

A request on the simulated cluster:
  1. queued on its prefill node; prefilled in token-budget batches (first token at the end);
  2. handed off: the decode node reserves blocks and a batch slot (if it has none free,
     the request is held on the prefill node), the KV moves in one transfer;
  3. decoded one token per engine iteration until ``max_tokens``; blocks freed.
An engine iteration runs the prefill batch (if any) and one decode step (if any sequence
runs), so a hybrid node, or one still finishing old-role work after a role switch,
interleaves both. Under TTFT and TPOT objectives a node paces its prompts as the engine
does (:mod:`libs.engine.pacing`): a pass that would put a running sequence past its TPOT
objective waits, unless a queued prompt would miss its TTFT objective by waiting.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from libs.engine.pacing import Decoding, Waiting, prefill_allowance
from libs.protocol.messages import LoadReport, NodeState, Role
from libs.sim.calibration import NodeCosts
from libs.sim.workload import SimRequest

_tiebreak = itertools.count()


@dataclass
class Job:
    """One request's state in the simulated cluster."""

    req: SimRequest
    prefill_node: str = ""
    decode_node: str = ""
    first_token_s: float = -1.0
    finish_s: float = -1.0
    attempts: int = 0
    dropped: bool = False
    queued_s: float = 0.0  # the wait in the scheduler's queue before its placement (last attempt)

    @property
    def blocks(self) -> int:
        return -(-(self.req.num_prompt_tokens + self.req.max_tokens) // 16)


class SimNode:
    """One simulated node. ``schedule(t, fn, *args)`` puts events on the cluster's queue."""

    def __init__(self, node_id: str, role: Role, costs: NodeCosts, schedule: Callable[..., None],
                 on_first_token: Callable[[Job, SimNode, float], None], on_finish: Callable[[Job, float], None],
                 strict_drain: bool = False, ttft_slo_s: float = 0.0, tpot_slo_s: float = 0.0) -> None:
        self.node_id = node_id
        self.role = role
        self.state = NodeState.READY
        self.pending_role: Role | None = None
        self.costs = costs
        self.schedule = schedule
        self.on_first_token = on_first_token
        self.on_finish = on_finish
        self.strict_drain = strict_drain
        self.queue: deque[Job] = deque()
        self.queued_tokens = 0
        self.num_held = 0  # prefilled here, waiting for room on their decode node
        self.running: list[tuple[int, int, Job]] = []  # (end step, tiebreak, job)
        self.step = 0
        self.context = 0
        self.used_blocks = 0
        self.reserved_blocks = 0
        self.reserved_slots = 0
        self.waiters: deque[tuple[SimNode, Job]] = deque()  # hand-offs waiting for room here
        self.busy = False
        self.seq = 0
        self.prefill_rate = 0.0
        self.pass_tokens = 0.0
        self.pass_s = 0.0
        self.step_s = 0.0
        self.ttft_slo_s = ttft_slo_s  # the objectives it paces prompts by (0: none)
        self.tpot_slo_s = tpot_slo_s

    # ------------------------------------------------------------ prefill side

    def submit(self, job: Job, now: float) -> None:
        self.queue.append(job)
        self.queued_tokens += job.req.num_prompt_tokens
        self.kick(now)

    def kick(self, now: float) -> None:
        if self.busy or not (self.queue or self.running):
            return
        batch: list[Job] = []
        tokens = 0
        n = len(self.running)
        t_decode = self.costs.decode_step_s(n, self.context) if n else 0.0
        slack = self._slack(now, t_decode)
        while self.queue and (not batch or tokens + self.queue[0].req.num_prompt_tokens <= self.costs.max_batched_tokens):
            job = self.queue[0]
            if slack < math.inf and self.costs.prefill_s([j.req.num_prompt_tokens for j in (*batch, job)]) > slack:
                break  # paced: the running sequences cannot spare this pass
            self.queue.popleft()
            batch.append(job)
            tokens += job.req.num_prompt_tokens
        self.queued_tokens -= tokens
        t_prefill = self.costs.prefill_s([j.req.num_prompt_tokens for j in batch]) if batch else 0.0
        if batch:
            self.prefill_rate = _ema(self.prefill_rate, tokens / t_prefill)
            self.pass_tokens = _ema(self.pass_tokens, float(tokens))
            self.pass_s = _ema(self.pass_s, t_prefill)
        if n:
            self.step_s = _ema(self.step_s, t_decode)
        self.busy = True
        self.schedule(now + t_prefill + t_decode, self._iteration_done, batch, n > 0)

    def _slack(self, now: float, step_s: float) -> float:
        """The prefill time this iteration may take (:mod:`libs.engine.pacing`): unbounded
        without objectives, with nothing queued, or when a queued prompt is due."""
        if self.tpot_slo_s <= 0 or self.ttft_slo_s <= 0 or not self.running or not self.queue:
            return math.inf
        ttft, tpot = self.ttft_slo_s, self.tpot_slo_s
        prefill_s = self.costs.prefill_s
        waiting = (Waiting(j.req.arrival + ttft, ttft, prefill_s([j.req.num_prompt_tokens])) for j in self.queue)
        decoding = (Decoding(job.first_token_s + tpot * (job.req.max_tokens - 1), end - self.step)
                    for end, _, job in self.running)
        return prefill_allowance(now, decoding, waiting, step_s)

    def _iteration_done(self, now: float, batch: list[Job], decoded: bool) -> None:
        self.busy = False
        if decoded:
            self._decode_step(now)
        for job in batch:
            self.on_first_token(job, self, now)
        self.admit_waiters(now)
        self.check_drained()
        self.kick(now)

    # ------------------------------------------------------------ decode side

    def has_room(self, job: Job) -> bool:
        c = self.costs
        return (self.used_blocks + self.reserved_blocks + job.blocks <= c.total_blocks
                and len(self.running) + self.reserved_slots < c.max_num_seqs)

    def reserve(self, job: Job) -> None:
        self.reserved_blocks += job.blocks
        self.reserved_slots += 1

    def join(self, job: Job, now: float) -> None:
        """The KV of ``job`` has landed (reserved before): it decodes from the next iteration."""
        self.reserved_blocks -= job.blocks
        self.reserved_slots -= 1
        self.used_blocks += job.blocks
        self.context += job.req.num_prompt_tokens + 1
        heapq.heappush(self.running, (self.step + job.req.max_tokens - 1, next(_tiebreak), job))
        self.kick(now)

    def _decode_step(self, now: float) -> None:
        self.step += 1
        self.context += len(self.running)
        while self.running and self.running[0][0] <= self.step:
            _, _, job = heapq.heappop(self.running)
            self.used_blocks -= job.blocks
            self.context -= job.req.num_prompt_tokens + job.req.max_tokens
            self.on_finish(job, now)

    def admit_waiters(self, now: float) -> None:
        """Start the transfers of held hand-offs that now fit, in arrival order."""
        while self.waiters and self.has_room(self.waiters[0][1]):
            src, job = self.waiters.popleft()
            src.num_held -= 1
            self.reserve(job)
            self.schedule(now + src.transfer_s(self, job), self._transfer_done, job, src)

    def _transfer_done(self, now: float, job: Job, src: SimNode) -> None:
        self.join(job, now)
        src.check_drained()

    def transfer_s(self, dst: SimNode, job: Job) -> float:
        return self.costs.transfer_s(-(-job.req.num_prompt_tokens // self.costs.block_size))

    # ------------------------------------------------------------ roles and reports

    def set_role(self, role: Role) -> None:
        """SetRole: switch now, finishing old-role work interleaved (default), or, with
        ``strict_drain``, take no new work until the old role's work is done."""
        if role == self.role:
            return
        if not self.strict_drain or role == Role.HYBRID:
            self.role = role
            return
        self.state = NodeState.DRAINING
        self.pending_role = role
        self.check_drained()

    def check_drained(self) -> None:
        if self.pending_role is None:
            return
        if self.pending_role == Role.PREFILL:
            done = not self.running and not self.reserved_slots and not self.waiters
        else:
            done = not self.queue and not self.num_held and not self.busy
        if done:
            self.role, self.pending_role, self.state = self.pending_role, None, NodeState.READY

    def report(self) -> LoadReport:
        self.seq += 1
        c = self.costs
        free = c.total_blocks - self.used_blocks - self.reserved_blocks
        return LoadReport(
            node_id=self.node_id, role=self.role, state=self.state, seq=self.seq, started_at=0.0, model="sim-8b",
            device="cuda:0", device_name=c.device_name, device_memory_bytes=80 << 30, max_model_len=32768,
            block_size=c.block_size, kv_block_bytes=c.kv_block_bytes, total_blocks=c.total_blocks, free_blocks=free,
            largest_free_segment=free, num_waiting=len(self.queue), waiting_prefill_tokens=self.queued_tokens,
            num_running=len(self.running) + self.reserved_slots, num_held=self.num_held,
            prefill_tokens_per_s=self.prefill_rate, decode_step_s=self.step_s, kv_transports=["cuda_ipc"],
            host_id="sim-host", max_num_seqs=c.max_num_seqs, prefill_pass_tokens=self.pass_tokens,
            prefill_pass_s=self.pass_s, max_pass_tokens=c.max_batched_tokens,
        )


def _ema(old: float, new: float, alpha: float = 0.2) -> float:
    return new if old == 0.0 else old + alpha * (new - old)

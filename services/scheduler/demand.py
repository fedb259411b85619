"""Demand: what recent placements ask of prefill and of decode, in node-equivalents.

The role controller's queue signals (prefill backlog, hand-offs waiting) only fire once
a side is already short, and they fire one node at a time. The demand signal sets the
split directly: over the last ``window_s`` of placements,

  prefill need = placed prompt tokens/s / measured prefill tokens/s of a node
  decode need  = placed output tokens/s / decode tokens/s of a node at a full batch

A full batch is the batch cap or what the KV blocks hold of the recent requests,
whichever is smaller; its step time comes from a line fitted through the (batch, step)
pairs the nodes report (the step grows with the batch and the context), so the decode
capacity is what a busy node does, not what a half-idle one measures. Both needs are in
units of "the cluster's mean node", so they compare, and the same rule holds for 4 or 64
nodes: the controller moves nodes so that the busier side's utilisation
(need / nodes on that side) drops.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from services.scheduler.placement import CostModel
from services.scheduler.registry import NodeEntry


@dataclass(frozen=True)
class Placed:
    """One request as the demand tracker keeps it (at its first placement attempt)."""

    t: float
    request_id: str
    prompt_tokens: int  # uncached prompt tokens the prefill node computes
    output_tokens: int  # max_tokens: the decode steps the request asks for
    blocks: int  # KV blocks the request holds on its decode node at its longest


@dataclass(frozen=True)
class Demand:
    """Recent demand in node-equivalents (1.0 = one mean node kept fully busy)."""

    prefill_nodes: float
    decode_nodes: float

    def utilisation(self, prefill_capacity: float, decode_capacity: float) -> float:
        """The busier side's utilisation with this much capacity (in mean nodes) on each side."""
        up = self.prefill_nodes / prefill_capacity if prefill_capacity > 0 else math.inf
        ud = self.decode_nodes / decode_capacity if decode_capacity > 0 else math.inf
        return max(up, ud)


class StepFit:
    """Least-squares line ``step = a + b * batch`` through reported (batch, step) pairs,
    older pairs fading by ``decay`` per new one."""

    def __init__(self, decay: float = 0.995) -> None:
        self.decay = decay
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, batch: float, step_s: float) -> None:
        k = self.decay
        self.w, self.sx, self.sy = self.w * k + 1, self.sx * k + batch, self.sy * k + step_s
        self.sxx, self.sxy = self.sxx * k + batch * batch, self.sxy * k + batch * step_s

    def predict(self, batch: float) -> float | None:
        """The fitted step at ``batch``; None until the batches seen spread over 2 sequences."""
        if self.w <= 0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var < 4.0:
            return None
        slope = max((self.sxy / self.w - mx * my) / var, 0.0)
        return max(my + slope * (batch - mx), my)


class DemandTracker:
    """A sliding window of placements and a fit of the decode step.

    Args:
        window_s: how far back placements count.
        min_placements: fewer placements than this in the window say nothing (``None``).
    """

    def __init__(self, window_s: float = 5.0, min_placements: int = 8) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.min_placements = min_placements
        self.fit = StepFit()
        self._placed: deque[Placed] = deque()  # within the window
        self._old: deque[Placed] = deque()  # out of the window, ids still remembered
        self._ids: set[str] = set()
        self._seen: dict[str, int] = {}  # node id -> seq of the last report fitted

    def record(self, t: float, request_id: str, prompt_tokens: int, output_tokens: int, blocks: int) -> None:
        """Count one request asked for at time ``t``, once: a retry of a rejected request
        (same id) is the same demand, so what is counted is the offered load, not only
        what admission let in (which would shrink with the side that is short)."""
        self._trim(t)
        if request_id in self._ids:
            return
        self._ids.add(request_id)
        self._placed.append(Placed(t, request_id, prompt_tokens, output_tokens, blocks))

    def observe(self, nodes: list[NodeEntry]) -> None:
        """Feed the decode steps of reports not seen yet into the step fit."""
        for n in nodes:
            r = n.report
            if r.num_running > 0 and r.decode_step_s > 0 and self._seen.get(r.node_id) != r.seq:
                self._seen[r.node_id] = r.seq
                self.fit.add(r.num_running, r.decode_step_s)

    def _trim(self, now: float) -> None:
        # Ids are kept twice the window: a retry after a long Retry-After is not new demand.
        while self._placed and self._placed[0].t <= now - self.window_s:
            self._old.append(self._placed.popleft())
        while self._old and self._old[0].t <= now - 2 * self.window_s:
            self._ids.discard(self._old.popleft().request_id)

    def __len__(self) -> int:
        return len(self._placed)

    def demand(self, now: float, nodes: list[NodeEntry], cost: CostModel) -> Demand | None:
        """Demand of the placements in ``(now - window_s, now]`` against ``nodes``' measured figures.

        Returns:
            The demand, or None with too few placements or no nodes to measure against.
        """
        self.observe(nodes)
        self._trim(now)
        if len(self._placed) < self.min_placements or not nodes:
            return None
        n, w = len(self._placed), self.window_s
        prompt_rate = sum(p.prompt_tokens for p in self._placed) / w
        output_rate = sum(p.output_tokens for p in self._placed) / w
        slots = sum(x.max_num_seqs for x in nodes) / len(nodes)
        blocks = sum(x.report.total_blocks for x in nodes) / len(nodes)
        mean_blocks = sum(p.blocks for p in self._placed) / n
        batch = min(slots, blocks / mean_blocks) if blocks > 0 and mean_blocks > 0 else slots
        step = self.fit.predict(batch) or mean_decode_step_s(nodes, cost)
        return Demand(prefill_nodes=prompt_rate / mean_prefill_rate(nodes, cost),
                      decode_nodes=output_rate * step / max(batch, 1.0))


def mean_prefill_rate(nodes: list[NodeEntry], cost: CostModel) -> float:
    """Mean measured prefill tokens/s of the nodes that measured one (any role: a decode
    node keeps the rate it measured as prefill), else the cost model's default."""
    rates = [n.report.prefill_tokens_per_s for n in nodes if n.report.prefill_tokens_per_s > 0]
    return sum(rates) / len(rates) if rates else cost.default_prefill_tokens_per_s


def mean_decode_step_s(nodes: list[NodeEntry], cost: CostModel) -> float:
    """Mean measured decode step of the nodes that decode now, else of any that measured one.

    The step grows with the batch, so at light load this underestimates the step of a full
    batch and the decode need with it; that errs on the side of fewer flips until decode
    batches fill, when the measurement is right.
    """
    busy = [n.report.decode_step_s for n in nodes if n.can_decode and n.report.num_running and n.report.decode_step_s > 0]
    steps = busy or [n.report.decode_step_s for n in nodes if n.report.decode_step_s > 0]
    return sum(steps) / len(steps) if steps else cost.default_decode_step_s


def node_speed(node: NodeEntry, nodes: list[NodeEntry], cost: CostModel) -> float:
    """A node's capacity relative to the cluster's mean node (1.0 = average).

    Its measured prefill rate against the mean; a node that has not measured one (it has
    only decoded so far) takes the mean rate of the nodes of its device kind that have,
    else it counts as average.
    """
    mean_rate = mean_prefill_rate(nodes, cost)
    if node.report.prefill_tokens_per_s > 0:
        return node.report.prefill_tokens_per_s / mean_rate
    kin = [n.report.prefill_tokens_per_s for n in nodes
           if n.report.device_name == node.report.device_name and n.report.prefill_tokens_per_s > 0]
    return (sum(kin) / len(kin)) / mean_rate if kin else 1.0

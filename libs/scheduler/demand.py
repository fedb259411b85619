"""Demand: what recent placements ask of prefill and of decode, in node-equivalents.

The role controller's queue signals (prefill backlog, hand-offs waiting) only fire once
a side is already short, and they fire one node at a time. The demand signal sets the
split directly: over the last ``window_s`` of placements,

  prefill need = placed prompt tokens/s / prefill tokens/s of a busy node
  decode need  = placed output tokens/s / decode tokens/s of a node at a full batch

Both capacities are what a busy node does, not what a half-idle one measures. A node's
prefill rate is the best it reported while it had a backlog (full batches; a trickle of
short prompts in small batches reports a fraction of it), or what a line through its
device kind's passes (seconds against prompt tokens: a fixed cost and a cost per token)
gives for a full pass, whichever is higher: nodes that never had a backlog (hybrid nodes
prefilling between decode steps) still tell what a prefill node does. A full decode batch is the
batch cap or what the KV blocks hold of the recent requests, each counted for the steps
it stays in the batch (its output tokens), whichever is smaller; its step time comes
from a line fitted through the (batch, step) pairs the nodes of its device kind report
(the step grows with the batch and the context). Each need is in units of "the
cluster's mean node" on its side, and each node has a speed on each side (its capacity
in mean nodes: device kinds rank differently in prefill and decode), so the same rule
holds for 4 or 64 nodes of one or several kinds: the controller moves nodes so that the
busier side's utilisation (need / capacity on that side) drops. Each need comes with
its standard error (the window is a sample of Poisson arrivals), so the controller can
tell a shift in the load from a window that by chance held more of one kind.

Where CPU node processes need more threads than their hosts have cores, every step and
rate is kept at what the node would measure on cores of its own: each reports the share
of its threads' time its steps got (:func:`cpu_shares`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from libs.scheduler.cost_model import CostModel
from libs.scheduler.node_registry import NodeEntry, kind_means


_PASS_SPREAD = 0.1  # prefill pass sizes must spread this much (std / mean) to fit their cost
_PASS_REACH = 4.0  # a full pass is taken at most this many times the largest pass seen


@dataclass(frozen=True)
class Placed:
    """One request as the demand tracker keeps it (at its first placement attempt)."""

    t: float
    request_id: str
    prompt_tokens: int  # uncached prompt tokens the prefill node computes
    output_tokens: int  # max_tokens: the decode steps the request asks for
    blocks: int  # KV blocks the request holds on its decode node at its longest
    ttft_slo_s: float = 0.0  # the request's own TTFT objective (0: the deployment's)
    tpot_slo_s: float = 0.0  # the request's own TPOT objective (0: the deployment's)


@dataclass(frozen=True)
class Demand:
    """Recent demand in node-equivalents (1.0 = one mean node kept fully busy), each side
    in its own unit: prefill in the mean node's prefill rate, decode in its full-batch
    decode rate (device kinds rank differently in the two)."""

    prefill_nodes: float
    decode_nodes: float
    # Standard errors of the two needs: a window of Poisson arrivals with spread-out
    # sizes holds by chance more or less than the load it samples.
    prefill_se: float = 0.0
    decode_se: float = 0.0
    # Node id -> its capacity in mean nodes on each side (absent: 1.0).
    prefill_speed: dict[str, float] = field(default_factory=dict, compare=False)
    decode_speed: dict[str, float] = field(default_factory=dict, compare=False)

    def utilisation(self, prefill_capacity: float, decode_capacity: float) -> float:
        """The busier side's utilisation with this much capacity (in mean nodes) on each side."""
        up = self.prefill_nodes / prefill_capacity if prefill_capacity > 0 else math.inf
        ud = self.decode_nodes / decode_capacity if decode_capacity > 0 else math.inf
        return max(up, ud)

    def against(self, to_prefill: bool, k: float) -> Demand:
        """The demand ``k`` standard errors against a move of capacity to prefill
        (``to_prefill``) or to decode: the side gaining less busy, the other busier."""
        sp, sd = (-k, k) if to_prefill else (k, -k)
        return replace(self, prefill_nodes=max(self.prefill_nodes + sp * self.prefill_se, 0.0),
                       decode_nodes=max(self.decode_nodes + sd * self.decode_se, 0.0))


class StepFit:
    """Least-squares line ``step = a + b * batch`` through reported (batch, step) pairs,
    older pairs fading by ``decay`` per new one.

    Args:
        decay: weight an older pair keeps per new one.
        min_var: the line is known once the batches seen spread this much (variance).
        min_cv: ... and their standard deviation is at least this share of their mean.
    """

    def __init__(self, decay: float = 0.995, min_var: float = 4.0, min_cv: float = 0.0) -> None:
        self.decay = decay
        self.min_var = min_var
        self.min_cv = min_cv
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, batch: float, step_s: float) -> None:
        k = self.decay
        self.w, self.sx, self.sy = self.w * k + 1, self.sx * k + batch, self.sy * k + step_s
        self.sxx, self.sxy = self.sxx * k + batch * batch, self.sxy * k + batch * step_s

    def mean_step(self) -> float:
        """The mean of the steps seen, older ones fading as in the line (0: none seen)."""
        return self.sy / self.w if self.w > 0 else 0.0

    def _moments(self) -> tuple[float, float, float] | None:
        """(mean batch, mean step, slope at least 0), or None while the batches seen do
        not spread enough to tell the slope."""
        if self.w <= 0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var < self.min_var or var <= 0 or var < (self.min_cv * mx) ** 2:
            return None
        return mx, my, max((self.sxy / self.w - mx * my) / var, 0.0)

    def line(self) -> tuple[float, float] | None:
        """(intercept, slope) of the fitted step, the slope at least 0; None until the
        batches seen spread enough (by default over 2 sequences)."""
        m = self._moments()
        if m is None:
            return None
        mx, my, slope = m
        return max(my - slope * mx, 0.0), slope

    def predict(self, batch: float) -> float | None:
        """The fitted step at ``batch``; None until the batches seen spread enough."""
        m = self._moments()
        if m is None:
            return None
        mx, my, slope = m
        return max(my + slope * (batch - mx), my)


class DemandTracker:
    """A sliding window of placements, fits of the decode step and busy prefill rates.

    Args:
        window_s: how far back placements count.
        min_placements: fewer placements than this in the window say nothing (``None``).
        busy_backlog_s: a node with this many seconds of prompts queued (at its rate) is
            backlogged: its batches are full and its reported rate is its capacity.
        busy_fade: a node's best backlogged rate fades by this factor per backlogged report.
        keep_s: placements are kept this long (at least twice ``window_s``) for
            :meth:`history`, the longer view that goodput planning averages over.
    """

    def __init__(self, window_s: float = 5.0, min_placements: int = 8, busy_backlog_s: float = 1.0,
                 busy_fade: float = 0.99, keep_s: float = 0.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.keep_s = max(keep_s, 2 * window_s)
        self.min_placements = min_placements
        self.busy_backlog_s = busy_backlog_s
        self.busy_fade = busy_fade
        self.fit = StepFit()  # every node's reports
        self.measured_fit = StepFit()  # the same, each step as measured (with what shared its cores)
        self.kind_fits: dict[str, StepFit] = {}  # device name -> its nodes' reports
        self._placed: deque[Placed] = deque()  # within the window
        self._old: deque[Placed] = deque()  # out of the window, ids still remembered
        self._ids: set[str] = set()
        self._seen: dict[str, int] = {}  # node id -> seq of the last report observed
        self._busy_rate: dict[str, float] = {}  # node id -> prefill tokens/s measured while backlogged
        # Device name -> a line through (prompt tokens per pass, seconds per pass) of its
        # nodes' prefill passes, the largest pass seen (fading) and the pass token budget.
        self.pass_fits: dict[str, StepFit] = {}
        self._largest_pass: dict[str, float] = {}
        self._pass_budget: dict[str, int] = {}
        self.peak_rate: dict[str, float] = {}  # device name -> best prefill tokens/s of its nodes (fading)

    def record(self, t: float, request_id: str, prompt_tokens: int, output_tokens: int, blocks: int,
               ttft_slo_s: float = 0.0, tpot_slo_s: float = 0.0) -> None:
        """Count one request asked for at time ``t``, once: a retry of a rejected request
        (same id) is the same demand, so what is counted is the offered load, not only
        what admission let in (which would shrink with the side that is short)."""
        self._trim(t)
        if request_id in self._ids:
            return
        self._ids.add(request_id)
        self._placed.append(Placed(t, request_id, prompt_tokens, output_tokens, blocks, ttft_slo_s, tpot_slo_s))

    def observe(self, nodes: list[NodeEntry]) -> None:
        """Take in the reports not seen yet: decode steps into the step fits, and the
        prefill rate of a backlogged node as what it does when busy."""
        shares = cpu_shares(nodes)
        for n in nodes:
            r = n.report
            if self._seen.get(r.node_id) == r.seq:
                continue
            self._seen[r.node_id] = r.seq
            # What the node would have measured with its cores to itself (node processes
            # sharing a host's cores stretch each other's steps; see `cpu_shares`).
            share = shares[r.node_id]
            if r.num_running > 0 and r.decode_step_s > 0:
                self.fit.add(r.num_running, r.decode_step_s * share)
                self.measured_fit.add(r.num_running, r.decode_step_s)
                self.kind_fits.setdefault(r.device_name, StepFit()).add(r.num_running, r.decode_step_s * share)
            rate, busy = r.prefill_tokens_per_s / share, self._busy_rate.get(r.node_id, 0.0)
            if r.prefill_pass_tokens > 0 and r.prefill_pass_s > 0:
                # Passes of several sizes (hybrid nodes' small ones, prefill nodes' full
                # ones, a load that varies) tell a pass's fixed cost from its cost per token.
                kind = r.device_name
                self.pass_fits.setdefault(kind, StepFit(min_var=0.0, min_cv=_PASS_SPREAD)).add(
                    r.prefill_pass_tokens, r.prefill_pass_s * share)
                self._largest_pass[kind] = max(r.prefill_pass_tokens, self._largest_pass.get(kind, 0.0) * 0.9995)
                if r.max_pass_tokens > 0:
                    self._pass_budget[kind] = r.max_pass_tokens
            if rate > 0:
                # The rate of the fullest batches a node of this kind has run: the nearest
                # measure of its capacity when no node was ever backlogged.
                self.peak_rate[r.device_name] = max(rate, self.peak_rate.get(r.device_name, 0.0) * 0.9995)
            if rate > 0 and r.waiting_prefill_tokens >= max(rate, busy) * share * self.busy_backlog_s:
                # The rate is an average over recent batches, which lags when a backlog
                # starts after small ones: the best seen wins, fading so that a node that
                # got slower is believed after some backlogged reports.
                self._busy_rate[r.node_id] = max(rate, busy * self.busy_fade)

    def prefill_rates(self, nodes: list[NodeEntry]) -> dict[str, float]:
        """Node id -> prefill tokens/s a node does when busy (0: never measured).

        The engine's rate is tokens over time of its recent prefill batches. Fed a trickle
        of short prompts, a node runs small batches whose fixed cost dominates and reports
        a fraction of what it does with full ones; with a backlog its batches are full.
        So a node's rate is the best it reported while backlogged, its current one if that
        is higher or it never was, or what its kind's passes say a full pass runs at
        (:meth:`full_pass_rate`), whichever is highest: nodes that only ever ran small
        passes (hybrid nodes between decode steps) still tell what a prefill node does.
        """
        shares = cpu_shares(nodes)
        return {n.node_id: max(self._busy_rate.get(n.node_id, 0.0), n.report.prefill_tokens_per_s / shares[n.node_id],
                               self.full_pass_rate(n.report.device_name)) for n in nodes}

    def full_pass_rate(self, device_name: str) -> float:
        """Prompt tokens/s of a node of this kind running full passes, from the line
        through its nodes' passes (time against prompt tokens), taken out to the pass
        token budget but no further than ``_PASS_REACH`` times the largest pass seen;
        0 until the passes seen spread enough to tell the line, or with no budget."""
        fit = self.pass_fits.get(device_name)
        budget = min(self._pass_budget.get(device_name, 0), _PASS_REACH * self._largest_pass.get(device_name, 0.0))
        line = fit.line() if fit is not None else None
        if line is None or budget <= 0 or line[1] <= 0:
            return 0.0
        a, b = line
        return budget / (a + b * budget)

    def _trim(self, now: float) -> None:
        # Ids are kept at least twice the window: a retry after a long Retry-After is not new demand.
        while self._placed and self._placed[0].t <= now - self.window_s:
            self._old.append(self._placed.popleft())
        while self._old and self._old[0].t <= now - self.keep_s:
            self._ids.discard(self._old.popleft().request_id)

    def __len__(self) -> int:
        return len(self._placed)

    def window(self, now: float) -> list[Placed]:
        """The placements in ``(now - window_s, now]``, oldest first."""
        self._trim(now)
        return list(self._placed)

    def history(self, now: float, span_s: float) -> list[Placed]:
        """The placements in ``(now - span_s, now]`` (``span_s`` at most ``keep_s``), oldest first."""
        self._trim(now)
        return [p for p in self._old if p.t > now - span_s] + list(self._placed)

    def demand(self, now: float, nodes: list[NodeEntry], cost: CostModel,
               over: tuple[list[Placed], float] | None = None) -> Demand | None:
        """Demand of the placements in ``(now - window_s, now]`` against ``nodes``' measured figures.

        Args:
            over: ``(placements, seconds)``: these placements of a longer span instead
                (from :meth:`history`): a light load fills a short window with too few
                placements to say anything, a longer one not.

        Returns:
            The demand, or None with too few placements or no nodes to measure against.
        """
        self.observe(nodes)
        self._trim(now)
        placed, window_s = (list(self._placed), self.window_s) if over is None else over
        if len(placed) < self.min_placements or not nodes or window_s <= 0:
            return None
        held = held_blocks_per_seq(placed)
        prefill_rates = self.prefill_rates(nodes)
        decode_rates = {n.node_id: self.decode_rate(n, held, nodes, cost) for n in nodes}
        mean_decode = sum(decode_rates.values()) / len(nodes)
        # Mean-node seconds per prompt token and per output token, over the window.
        per_prompt = 1.0 / mean_prefill_rate(nodes, cost, prefill_rates) / window_s
        per_output = 1.0 / mean_decode / window_s
        prompts = [p.prompt_tokens for p in placed]
        outputs = [p.output_tokens for p in placed]
        # Standard error of a sum of Poisson arrivals: the root of the sum of squares.
        return Demand(prefill_nodes=sum(prompts) * per_prompt, decode_nodes=sum(outputs) * per_output,
                      prefill_se=math.sqrt(sum(x * x for x in prompts)) * per_prompt,
                      decode_se=math.sqrt(sum(x * x for x in outputs)) * per_output,
                      prefill_speed=prefill_speeds(nodes, cost, prefill_rates),
                      decode_speed={i: r / mean_decode for i, r in decode_rates.items()})

    def decode_rate(self, node: NodeEntry, held_blocks: float, nodes: list[NodeEntry], cost: CostModel) -> float:
        """Output tokens/s of ``node`` at a full batch: its batch cap or what its KV blocks
        hold at ``held_blocks`` a sequence, at the step its device kind's fit predicts for
        that batch (every node's fit for a kind that has not decoded yet)."""
        slots, blocks = node.max_num_seqs, node.report.total_blocks
        batch = max(min(slots, blocks / held_blocks) if blocks > 0 and held_blocks > 0 else slots, 1.0)
        fit = self.kind_fits.get(node.report.device_name)
        step = (fit.predict(batch) if fit else None) or self.fit.predict(batch) or mean_decode_step_s(nodes, cost)
        return batch / step


def held_blocks_per_seq(placed: deque[Placed] | list[Placed]) -> float:
    """Mean KV blocks of a sequence in a decode batch fed by ``placed``.

    A request holds its blocks for as many steps as it has output tokens, so a batch is
    made of its requests in proportion to their output tokens, not one each (Little's
    law): a short-answer request with a long prompt passes through in a few steps, while
    a long-answer one stays. Weighting each placement equally instead counts the big,
    brief ones as if they stayed, which makes the full batch look KV-bound and small,
    and the decode need too high.
    """
    steps = sum(p.output_tokens for p in placed)
    if steps <= 0:
        return sum(p.blocks for p in placed) / len(placed) if placed else 0.0
    return sum(p.blocks * p.output_tokens for p in placed) / steps


def mean_prefill_rate(nodes: list[NodeEntry], cost: CostModel, rates: dict[str, float] | None = None) -> float:
    """Mean measured prefill tokens/s of the nodes that measured one (any role: a decode
    node keeps the rate it measured as prefill), else the cost model's default.

    Args:
        rates: node id -> rate to use (:meth:`DemandTracker.prefill_rates`); default: the
            rates the nodes report now.
    """
    got = [r for r in (_rates(nodes, rates)[n.node_id] for n in nodes) if r > 0]
    return sum(got) / len(got) if got else cost.default_prefill_tokens_per_s


def _rates(nodes: list[NodeEntry], rates: dict[str, float] | None) -> dict[str, float]:
    if rates is not None:
        return rates
    shares = cpu_shares(nodes)
    return {n.node_id: n.report.prefill_tokens_per_s / shares[n.node_id] for n in nodes}


def core_sharing(nodes: Sequence[NodeEntry]) -> tuple[float, int] | None:
    """(the mean node's compute threads, the cores of the nodes' hosts all together, on
    each host the union of its nodes' core sets) when the nodes' threads outnumber those
    cores; None when they do not, or when some node is not a CPU engine that reports its
    threads and cores (GPU and vLLM nodes), which the planner then takes as measured."""
    hosts: dict[str, set[int]] = {}
    threads = 0
    for n in nodes:
        r = n.report
        if r.cpu_threads <= 0 or not r.cpu_set:
            return None
        hosts.setdefault(r.host_id, set()).update(r.cpu_set)
        threads += r.cpu_threads
    cores = sum(len(c) for c in hosts.values())
    if not nodes or threads <= cores:
        return None
    return threads / len(nodes), cores


def cpu_shares(nodes: Sequence[NodeEntry]) -> dict[str, float]:
    """Node id -> the share of its threads' time the node's steps got, where the nodes
    share too few cores (:func:`core_sharing`), else 1. A step measured at share ``s``
    would have taken ``s`` times as long on cores of its own, a prefill pass likewise: the
    tracker keeps every figure at that, and the goodput planner stretches it again by how
    many threads a shape would run at once on the cores (:class:`libs.scheduler.goodput.Cores`).
    Where the threads fit the cores, what slows the nodes (other programs) is there in
    every shape, and the figures are kept as measured."""
    if core_sharing(nodes) is None:
        return {n.node_id: 1.0 for n in nodes}
    return {n.node_id: n.report.cpu_share if 0.0 < n.report.cpu_share < 1.0 else 1.0 for n in nodes}


def mean_decode_step_s(nodes: list[NodeEntry], cost: CostModel) -> float:
    """Mean measured decode step of the nodes that decode now, else of any that measured one.

    The step grows with the batch, so at light load this underestimates the step of a full
    batch and the decode need with it; that errs on the side of fewer flips until decode
    batches fill, when the measurement is right.
    """
    shares = cpu_shares(nodes)
    busy = [n.report.decode_step_s * shares[n.node_id] for n in nodes
            if n.can_decode and n.report.num_running and n.report.decode_step_s > 0]
    steps = busy or [n.report.decode_step_s * shares[n.node_id] for n in nodes if n.report.decode_step_s > 0]
    return sum(steps) / len(steps) if steps else cost.default_decode_step_s


def prefill_speeds(nodes: list[NodeEntry], cost: CostModel, rates: dict[str, float] | None = None) -> dict[str, float]:
    """Node id -> prefill capacity relative to the cluster's mean node (1.0 = average).

    The mean measured rate of the nodes of its device kind against the cluster's mean:
    capability is the device's, while one node's rate moves with the batches it happened
    to run (on 4 H100s, per-node rates made a 2:2 cluster read 2.88 / 1.12 node-equivalents
    and flip back and forth). A kind no node of which has measured a rate counts as average.
    ``rates`` as for :func:`mean_prefill_rate`.
    """
    rates = _rates(nodes, rates)
    mean_rate = mean_prefill_rate(nodes, cost, rates)
    kind_rate = kind_means(nodes, lambda n: rates[n.node_id])
    return {n.node_id: kind_rate[n.report.device_name] / mean_rate if n.report.device_name in kind_rate else 1.0
            for n in nodes}

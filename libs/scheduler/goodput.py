"""Goodput planning: the mix of prefill, hybrid and decode nodes that serves the most
requests within their TTFT and TPOT objectives.

A cluster *shape* is how many nodes are in each role: P prefill, H hybrid (both phases on
one node, as a colocated server runs them), D decode, with P + H + D = n and at least one
node able to prefill and one able to decode. For every shape the planner predicts, from
the last window's demand and the nodes' measured rates, what each request would see, with
the placement spreading each phase evenly over the nodes able to run it (a fluid model,
per node):

  u     = prompt tokens/s / (prefill rate x (P + H))   share of a prefilling node's time spent on prompts
  r     = output tokens/s / (D + H)                     output tokens/s of a decoding node
  step  = a + b x batch                                 the decode step fitted to the nodes' reports
  TPOT  = a / (1 - b r)       on a decode node          (steps back to back; batch = r x TPOT)
  TPOT  = (a + a x f) / (1 - u - b r)  on a hybrid node (every decode step also waits for
                                                         the prompt work run between two of them,
                                                         the interference that splitting removes,
                                                         and in a share f of them for the fixed
                                                         cost of a prefill pass, taken to be a
                                                         decode step's: f = prompts/s x TPOT, at most 1)
  TTFT  = W + L / rate        on a prefill node, W the M/G/c wait at utilisation u (the
          P + H nodes as one queue: placement sends a prompt where it starts soonest) or the
          backlog the request's arrival met, whichever is longer, plus two decode steps
          on a hybrid node (the one running, the one in its iteration). The backlog is a
          fluid queue run through the window in one-second bins: the prompt tokens each
          bin brought against what the shape's prefill-capable nodes run in a second
          (a hybrid node what its decode share leaves). A burst that outruns the nodes
          builds one and the lull after it drains it, so a window of bursts and lulls
          is not weighed as a steady load at its mean.
  load  = the busiest node's utilisation: u (prefill), r / full-batch rate (decode), their
          sum (hybrid); past 1 the shape cannot keep up.

  goodput(shape) = share of the window's requests within both objectives (a request
                   prefills on a prefill or a hybrid node and decodes on a decode or a
                   hybrid node in proportion to their numbers) x min(1, 1 / load)

The best shape is among those that keep up (load below 1) the one of highest goodput;
among the shapes within ``tolerance`` of it, the one with the lowest load (room for
bursts, and throughput when no shape meets the objectives), then the one closest to the
current shape. When no shape keeps up (overload) and requests have a TTFT objective, the
predicted shares mean nothing (every queue grows while it lasts): the best shape is then
the one of most capacity, the lowest load (within ``tolerance``), and among those the
one of highest goodput. Without a TTFT objective a growing queue misses nothing, and
the highest goodput among all shapes wins.

The window is weighed at the high end of what it says of the load: its rate is known to
``1 / sqrt(N_eff)``, where ``N_eff`` is its number of requests divided by the index of
dispersion of its per-bin counts (1 for Poisson arrivals, far more for bursts): a window
of bursts and lulls tells the load less precisely than as many steady arrivals.

CPU nodes whose processes need more threads than their hosts have cores (several nodes
on a laptop) slow each other, and by how many of them are busy at once, which the shape
decides: every node that decodes is busy all the time, a prefill node only while it has
prompts. The nodes report the share of their threads' time their steps got; the planner
keeps every rate at what it would be on cores of their own, and weighs each shape at the
stretch its own busy threads cause (:class:`Cores`): four single-threaded nodes on two
cores, all hybrid, run at half speed, three prefill nodes and a decode node at nearly
full speed. Nodes on GPUs, and on cores enough, run as measured.

All prompt-heavy loads whose hybrid TPOT stays within its objective come out all hybrid
(n nodes share every prompt and nothing is handed off); when the interference breaks the
TPOT objective, the split that meets it wins; and every shape between is a candidate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from libs.protocol.messages import Role
from libs.scheduler.cost_model import CostModel
from libs.scheduler.demand import (DemandTracker, Placed, core_sharing, cpu_shares, held_blocks_per_seq,
                                   mean_decode_step_s, mean_prefill_rate)
from libs.scheduler.node_registry import NodeEntry


@dataclass(frozen=True)
class Shape:
    """How many nodes take each role."""

    prefill: int
    hybrid: int
    decode: int

    @property
    def num_nodes(self) -> int:
        return self.prefill + self.hybrid + self.decode

    def count(self, role: Role) -> int:
        return {Role.PREFILL: self.prefill, Role.HYBRID: self.hybrid, Role.DECODE: self.decode}[role]

    def distance(self, other: Shape) -> int:
        """Role flips that turn one shape into the other."""
        return (abs(self.prefill - other.prefill) + abs(self.hybrid - other.hybrid)
                + abs(self.decode - other.decode)) // 2

    def __str__(self) -> str:
        return f"{self.prefill}P/{self.hybrid}H/{self.decode}D"


@dataclass(frozen=True)
class Objectives:
    """The deployment's service-level objectives (0: none on that measure)."""

    ttft_s: float = 0.0
    tpot_s: float = 0.0

    @property
    def any(self) -> bool:
        return self.ttft_s > 0 or self.tpot_s > 0


@dataclass(frozen=True)
class Cores:
    """CPU nodes whose processes need more threads than their hosts have cores.

    Nodes that share a host's cores slow each other: a node's step takes as long as its
    work at the share of a core each of its threads gets. The nodes' figures are kept at
    what they measure with cores of their own (each report's ``cpu_share`` says how much
    of its threads' time its steps got), and each shape is weighed at the share its own
    mix of busy threads leaves: a node that decodes steps back to back, so its threads are
    always busy; a prefill node's are busy while it has prompts, ``u`` of the time with
    cores of its own and ``u x stretch`` at the stretch the others cause. With ``T`` threads
    always busy, ``T_p`` prefill threads and ``C`` cores:

      stretch = 1                      when T + T_p x u <= C
      stretch = T / (C - T_p x u)      otherwise (busy threads x stretch fill the cores)

    Four single-threaded nodes on two cores, all hybrid, run every step at half speed
    (stretch 2); three prefill nodes and one decode node, with prompts a tenth of the
    prefill nodes' time, at full speed. The roles are taken to spread evenly over the
    hosts when there are several.

    Args:
        threads: the mean node's compute threads.
        cores: the cores of the nodes' hosts, all together (on each host the union of its
            nodes' core sets).
    """

    threads: float
    cores: int

    def stretch(self, shape: Shape, u: float, decoding: bool) -> float:
        """How many times longer than with cores of its own a node's work takes in
        ``shape``, its prefill-capable nodes busy ``u`` of the time (with cores of their
        own), ``decoding``: whether any output is asked for (inf: the prompts alone need
        more than the cores)."""
        always = self.threads * (shape.decode + shape.hybrid if decoding else 0)
        by_prompts = self.threads * (shape.prefill + (0 if decoding else shape.hybrid)) * u
        if always + by_prompts <= self.cores:
            return 1.0
        room = self.cores - by_prompts
        return always / room if room > 0 and always > 0 else math.inf

    @classmethod
    def of(cls, nodes: Sequence[NodeEntry]) -> Cores | None:
        """The nodes' cores, or None when they cannot run short (:func:`core_sharing`)."""
        sharing = core_sharing(nodes)
        return cls(*sharing) if sharing is not None else None


@dataclass(frozen=True)
class Rates:
    """What the nodes measured, as the mean node of the cluster.

    Args:
        prefill_tokens_per_s: prompt tokens/s of a busy node.
        step_a_s / step_b_s: the decode step, ``a + b x batch`` seconds.
        batch_cap: the largest decode batch a node holds (its batch slots, or what its KV
            blocks hold of the recent requests).
        hybrid_prefill_tokens_per_s: the prompt tokens/s hybrid nodes report, from the
            passes they run between decode steps (each pays a pass's fixed cost for the
            prompts queued since the last); 0 when no hybrid node has prefilled.
        cores: CPU nodes whose threads outnumber their cores (:class:`Cores`); every
            time above is then what a node takes with cores of its own.
    """

    prefill_tokens_per_s: float
    step_a_s: float
    step_b_s: float
    batch_cap: float
    hybrid_prefill_tokens_per_s: float = 0.0  # what hybrid nodes measured in their own passes (0: none)
    cores: Cores | None = None  # CPU nodes sharing too few cores (None: each runs as on cores of its own)

    def full_batch_rate(self) -> float:
        """Output tokens/s of a node decoding a full batch."""
        return self.batch_cap / (self.step_a_s + self.step_b_s * self.batch_cap)


@dataclass(frozen=True)
class Forecast:
    """What a shape is predicted to give the window's load."""

    shape: Shape
    goodput: float  # share of the offered requests served within their objectives (0..1)
    load: float  # the busiest node's utilisation
    tpot_decode_s: float  # on a decode node (inf: saturated; 0: no decode node)
    tpot_hybrid_s: float  # on a hybrid node (inf: saturated; 0: no hybrid node)
    ttft_wait_s: float  # the prompt queue's mean wait on a prefill-capable node


def measured_rates(tracker: DemandTracker, nodes: list[NodeEntry], cost: CostModel, placed: Sequence[Placed]) -> Rates:
    """The mean node's rates from what ``nodes`` reported (through ``tracker``'s fits and
    busy prefill rates) and the KV the requests of ``placed`` hold."""
    busy = tracker.prefill_rates(nodes)
    rates = {n.node_id: max(busy[n.node_id], tracker.peak_rate.get(n.report.device_name, 0.0)) for n in nodes}
    prefill = mean_prefill_rate(nodes, cost, rates)
    line = tracker.fit.line()
    a, b = line if line is not None else (mean_decode_step_s(nodes, cost), 0.0)
    held = held_blocks_per_seq(list(placed))
    caps = [min(n.max_num_seqs, n.report.total_blocks / held) if held > 0 and n.report.total_blocks > 0
            else n.max_num_seqs for n in nodes]
    shares = cpu_shares(nodes)
    hybrid = [n.report.prefill_tokens_per_s / shares[n.node_id] for n in nodes
              if n.role == Role.HYBRID and n.report.prefill_tokens_per_s > 0]
    return Rates(prefill, max(a, 1e-6), b, max(sum(caps) / len(caps), 1.0) if caps else 1.0,
                 sum(hybrid) / len(hybrid) if hybrid else 0.0, Cores.of(nodes))


def decode_step_now_s(nodes: Sequence[NodeEntry], own_cores: bool = True) -> float:
    """The decode step the decode nodes report now, the mean over their running sequences,
    as with cores of their own (:func:`cpu_shares`), or with ``own_cores`` false as they
    measure it, beside what the other nodes on their cores run (0: none is decoding)."""
    shares = cpu_shares(nodes) if own_cores else {n.node_id: 1.0 for n in nodes}
    running = [(n.report.num_running, n.report.decode_step_s * shares[n.node_id]) for n in nodes
               if n.role == Role.DECODE and n.report.num_running > 0 and n.report.decode_step_s > 0]
    total = sum(k for k, _ in running)
    return sum(k * step for k, step in running) / total if total else 0.0


class Load:
    """The window's requests grouped by their objectives, ready to be weighed against
    shapes (each group keeps its prefill times sorted, so a TTFT objective is one bisect).

    Args:
        placed: the window's requests.
        window_s: the window's length.
        rates: the mean node's measured rates.
        objectives: the deployment's objectives, for requests that bring none.
        confidence: shapes are weighed at the load this many standard errors of the
            window's request count above what it measured (1 / sqrt(N_eff) relative
            each, ``N_eff`` = :attr:`effective_requests`).
        end_s: when the window ends (default: its last arrival).
        bin_s: the length of the bins the prompt queue is run through (about; the
            window holds a whole number of them).
    """

    def __init__(self, placed: Sequence[Placed], window_s: float, rates: Rates, objectives: Objectives,
                 confidence: float = 1.0, end_s: float | None = None, bin_s: float = 1.0) -> None:
        self.rates = rates
        self.confidence = confidence
        self.num_requests = len(placed)
        rate = rates.prefill_tokens_per_s
        self.prompt_tokens_per_s = sum(p.prompt_tokens for p in placed) / window_s
        self.output_tokens_per_s = sum(p.output_tokens for p in placed) / window_s
        self.requests_per_s = len(placed) / window_s
        service = [p.prompt_tokens / rate for p in placed]
        self.service_mean_s = sum(service) / len(service) if service else 0.0
        self.service_sq_s2 = sum(s * s for s in service) / len(service) if service else 0.0
        groups: dict[tuple[float, float], list[float]] = {}
        keys = []
        for p, s in zip(placed, service):
            key = (p.ttft_slo_s or objectives.ttft_s or math.inf, p.tpot_slo_s or objectives.tpot_s or math.inf)
            groups.setdefault(key, []).append(s)
            keys.append(key)
        self.groups = {k: sorted(v) for k, v in groups.items()}
        self.ttft_bound = any(ttft < math.inf for ttft, _ in self.groups)  # some request has a TTFT objective
        # The window (ending at ``end_s``, default the last arrival) in bins of about
        # ``bin_s`` seconds, oldest first: the prompt tokens each bin brought and its
        # requests per objective group. A forecast runs each shape's prompt queue through
        # them (bursts build a backlog that the lulls drain), so a window of bursts and
        # lulls is not weighed as its mean.
        num_bins = max(1, math.ceil(window_s / bin_s - 1e-9))
        self.bin_s = window_s / num_bins
        end = end_s if end_s is not None else max((p.t for p in placed), default=0.0)
        self.bins: list[tuple[float, dict[tuple[float, float], int]]] = [(0.0, {}) for _ in range(num_bins)]
        for p, key in zip(placed, keys):
            k = min(num_bins - 1, max(0, num_bins - 1 - int((end - p.t) / self.bin_s)))
            tokens, counts = self.bins[k]
            counts[key] = counts.get(key, 0) + 1
            self.bins[k] = (tokens + p.prompt_tokens, counts)
        self.peak_bin_tokens = max(tokens for tokens, _ in self.bins)
        # What the window says of the load is as uncertain as its arrivals are uneven: N
        # Poisson arrivals give the rate to 1 / sqrt(N); arrivals in bursts and lulls
        # (bin counts spread D times as much as Poisson ones, D their index of
        # dispersion) to sqrt(D / N), as if the window held N / D requests.
        seen = [sum(c.values()) for _, c in self.bins]
        while len(seen) > 1 and seen[0] == 0:
            seen.pop(0)  # bins before the first placement seen
        mean = sum(seen) / len(seen)
        dispersion = sum((x - mean) ** 2 for x in seen) / len(seen) / mean if mean > 0 else 1.0
        self.effective_requests = self.num_requests / max(1.0, dispersion)
        self._forecasts: dict[tuple[Shape, float], Forecast] = {}

    def forecast(self, shape: Shape, scale: float | None = None) -> Forecast:
        """Predict ``shape`` under this load (see the module docstring), the load taken
        ``scale`` times as high (default: the window's own sampling error higher, so a shape
        that only just keeps up with the window is not preferred to one with room).
        Remembered: a load is weighed against the same shapes for each flip it plans."""
        if scale is None:
            scale = self._scale()
        key = (shape, scale)
        if key not in self._forecasts:
            self._forecasts[key] = self._forecast(shape, scale)
        return self._forecasts[key]

    def _forecast(self, shape: Shape, scale: float) -> Forecast:
        rt, stretch = self._stretched(self.rates, shape, scale)
        if stretch == math.inf:
            return Forecast(shape, 0.0, math.inf, math.inf if shape.decode else 0.0, math.inf if shape.hybrid else 0.0,
                            math.inf)
        n_p, n_d = shape.prefill + shape.hybrid, shape.decode + shape.hybrid
        u = scale * self.prompt_tokens_per_s / (rt.prefill_tokens_per_s * n_p)
        r = scale * self.output_tokens_per_s / n_d
        d_share = r / rt.full_batch_rate()
        loads = [u] + ([d_share] if shape.decode else []) + ([u + d_share] if shape.hybrid else [])
        load = max(loads)
        tpot_d = _tpot(rt, 0.0, r) if shape.decode else 0.0
        if rt.hybrid_prefill_tokens_per_s > 0:
            # Measured on hybrid nodes: the rate holds the fixed cost of their own passes.
            u_h = scale * self.prompt_tokens_per_s / (rt.hybrid_prefill_tokens_per_s * n_p)
            tpot_h = _tpot(rt, u_h, r) if shape.hybrid else 0.0
        else:
            tpot_h = self._guess_tpot_hybrid(rt, shape, scale) if shape.hybrid else 0.0
        # Prompts take ``stretch`` times their time on cores of their own.
        wait = _mgc_wait(n_p, u, self.service_mean_s * stretch, self.service_sq_s2 * stretch**2)
        step_h = rt.step_a_s + rt.step_b_s * r * tpot_h if shape.hybrid and math.isfinite(tpot_h) else math.inf
        within = 0.0
        f_tpot = {(ttft_slo, tpot_slo): (shape.decode * _share_tpot(tpot_d, tpot_slo)
                                         + shape.hybrid * _share_tpot(tpot_h, tpot_slo)) / n_d
                  for ttft_slo, tpot_slo in self.groups}
        # The prompt queue through the window's bins, a fluid backlog in seconds of work
        # of the prefill-capable nodes: a request waits the steady queue's mean wait or
        # the backlog its bin met, whichever is longer. Hybrid nodes give the prompts what
        # their decode share leaves (the window's mean share: a request's decode steps
        # spread over its whole life, not over its arrival's bin).
        free = n_p - shape.hybrid * min(1.0, d_share)
        cap_p = rt.prefill_tokens_per_s * free * self.bin_s  # prompt tokens those nodes run in a bin

        def f_ttft(ttft_slo: float, service: list[float], w: float) -> float:
            if ttft_slo == math.inf:
                return 1.0  # no TTFT objective: any wait will do
            ok_p = _share_within(service, (ttft_slo - w) / stretch) if shape.prefill else 0.0
            ok_hp = _share_within(service, (ttft_slo - w - 2 * step_h) / stretch) if shape.hybrid else 0.0
            return (shape.prefill * ok_p + shape.hybrid * ok_hp) / n_p

        if not self.ttft_bound or scale * self.peak_bin_tokens <= cap_p:
            # No bin outruns the nodes (or no wait matters): no backlog, every request
            # waits the steady queue's wait.
            for key, service in self.groups.items():
                within += f_ttft(key[0], service, wait) * f_tpot[key] * len(service)
        else:
            backlog = 0.0
            for prompt_tokens, counts in self.bins:
                busy = scale * prompt_tokens / cap_p if cap_p > 0 else math.inf
                before = backlog
                backlog = max(0.0, backlog + (busy - 1.0) * self.bin_s)
                w = max(wait, 0.5 * (before + backlog))
                for key, num in counts.items():
                    within += f_ttft(key[0], self.groups[key], w) * f_tpot[key] * num
        goodput = within / self.num_requests if self.num_requests else 0.0
        return Forecast(shape, goodput * min(1.0, 1.0 / load) if load > 0 else goodput, load, tpot_d, tpot_h, wait)

    def _scale(self) -> float:
        """The load the forecasts weigh: the window's, one sampling error (``confidence`` of
        them) higher."""
        return 1.0 + self.confidence / math.sqrt(max(self.effective_requests, 1.0))

    def tpot_hybrid_at_step(self, shape: Shape, step_s: float, stretched: bool = True) -> float:
        """A hybrid node's TPOT in ``shape`` (as :meth:`forecast` predicts it before any
        hybrid node has measured its prompts' cost) with every decode step ``step_s`` long,
        however small its batch: the guess a step measured now gives, where the fitted line
        would credit a hybrid node's smaller batch with shorter steps. ``step_s`` is as
        with cores of its own, stretched as ``shape`` would run on the cores its nodes
        share (:class:`Cores`); with ``stretched`` false it is taken as measured, with the
        sharing it had, and nothing is stretched."""
        if not shape.hybrid:
            return 0.0
        scale = self._scale()
        rt = replace(self.rates, step_a_s=step_s, step_b_s=0.0)
        if stretched:
            rt, _ = self._stretched(rt, shape, scale)
        return self._guess_tpot_hybrid(rt, shape, scale)

    def _stretched(self, rt: Rates, shape: Shape, scale: float) -> tuple[Rates, float]:
        """(``rt`` as ``shape``'s nodes would run on the cores they share, the stretch:
        :class:`Cores`); ``rt`` itself and 1 when the nodes have cores enough."""
        if rt.cores is None:
            return rt, 1.0
        u = scale * self.prompt_tokens_per_s / (rt.prefill_tokens_per_s * (shape.prefill + shape.hybrid))
        stretch = rt.cores.stretch(shape, u, self.output_tokens_per_s > 0)
        if stretch == 1.0 or stretch == math.inf:
            return rt, stretch
        return replace(rt, prefill_tokens_per_s=rt.prefill_tokens_per_s / stretch, step_a_s=rt.step_a_s * stretch,
                       step_b_s=rt.step_b_s * stretch,
                       hybrid_prefill_tokens_per_s=rt.hybrid_prefill_tokens_per_s / stretch), stretch

    def _guess_tpot_hybrid(self, rt: Rates, shape: Shape, scale: float) -> float:
        """A hybrid node's TPOT in ``shape`` from the rates ``rt`` and the prefill rate of
        prefill nodes (:func:`_tpot_hybrid`), the load taken ``scale`` times the window's."""
        n_p, n_d = shape.prefill + shape.hybrid, shape.decode + shape.hybrid
        u = scale * self.prompt_tokens_per_s / (rt.prefill_tokens_per_s * n_p)
        return _tpot_hybrid(rt, u, scale * self.output_tokens_per_s / n_d, scale * self.requests_per_s / n_p)

    def best(self, num_nodes: int, current: Shape, tolerance: float = 0.01) -> tuple[Forecast, Forecast]:
        """(the best shape's forecast, the current shape's) for ``num_nodes`` nodes."""
        forecasts = [self.forecast(s) for s in shapes(num_nodes)]
        # A shape past its capacity falls further behind every second: while some shape
        # keeps up, only those that do are candidates.
        keeping_up = [f for f in forecasts if f.load < 1.0]
        if keeping_up or not self.ttft_bound:
            forecasts = keeping_up or forecasts
            top = max(f.goodput for f in forecasts)
            near = [f for f in forecasts if f.goodput >= top - tolerance]
            best = min(near, key=lambda f: (round(f.load, 3), f.shape.distance(current), -f.shape.hybrid))
        else:
            # Overload under a TTFT objective: no shape keeps up, so none has the steady
            # state its shares are predicted for (the share a shape seems to serve comes
            # from nodes its other nodes' queues will soon hold up), and every queue grows
            # while it lasts, putting requests past the objective. The shape of most
            # capacity (the lowest busiest-node load) falls behind slowest and drains first
            # once the load eases; among those as light, the one predicted to serve best.
            low = min(f.load for f in forecasts)
            near = [f for f in forecasts if f.load <= low * (1.0 + tolerance)]
            best = min(near, key=lambda f: (-round(f.goodput, 3), f.shape.distance(current), -f.shape.hybrid))
        now = self.forecast(current) if current.num_nodes == num_nodes and valid(current) else best
        return best, now


def _mgc_wait(c: int, u: float, mean_s: float, sq_s2: float) -> float:
    """Mean wait of an M/G/c queue: ``c`` nodes each busy ``u`` of the time, services of
    mean ``mean_s`` and second moment ``sq_s2`` (inf at ``u >= 1``).

    Placement sends each prompt to the node that will start it soonest (the least queued
    work), so the prefill-capable nodes serve the cluster's prompts as one queue does c
    servers, not as c queues each fed a c-th of the arrivals: a prompt waits only when every
    node is busy. The Erlang C probability of that times the M/M/c wait, scaled for the
    services' spread ((1 + Cs^2) / 2, the Lee-Longton approximation); for c = 1 it is the
    Pollaczek-Khinchine wait.
    """
    if u >= 1:
        return math.inf
    if u <= 0 or mean_s <= 0:
        return 0.0
    a = c * u  # offered load in nodes
    # Erlang B by its recursion, then C.
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    erlang_c = b / (1 - u * (1 - b))
    return erlang_c * sq_s2 / (2 * mean_s * c * (1 - u))


def _tpot(rt: Rates, u: float, r: float, fixed_s: float | None = None) -> float:
    """Mean time per output token on a node spending ``u`` of its time on prompts and
    decoding ``r`` tokens/s, with ``fixed_s`` of fixed cost per iteration (default: a
    decode step's); inf when it cannot keep up, or its batch would overflow."""
    free = 1.0 - u - rt.step_b_s * r
    if free <= 0:
        return math.inf
    tpot = (rt.step_a_s if fixed_s is None else fixed_s) / free
    return tpot if r * tpot <= rt.batch_cap else math.inf


def _tpot_hybrid(rt: Rates, u: float, r: float, prompts_per_s: float) -> float:
    """Mean TPOT on a hybrid node: as :func:`_tpot`, with a prefill pass's fixed cost
    (taken to be a decode step's, ``a``) in the iterations that run one, a share
    ``min(1, prompts/s x TPOT)`` of them: many short prompts put one in nearly every
    iteration, a few long ones in few."""
    a = rt.step_a_s
    free = 1.0 - u - rt.step_b_s * r
    if free - a * prompts_per_s > 0:
        tpot = a / (free - a * prompts_per_s)
        if prompts_per_s * tpot <= 1.0:
            return tpot if r * tpot <= rt.batch_cap else math.inf
    return _tpot(rt, u, r, 2 * a)


def _share_tpot(tpot_s: float, slo_s: float) -> float:
    """Share of requests within a TPOT objective on a node whose mean TPOT is ``tpot_s``.

    Requests' TPOTs spread around the mean (one decoding beside a long prompt's prefill
    waits longer per token than one that runs between prompts), so the share falls
    smoothly as the mean nears the objective: half at the objective, 97% at 0.8 of it,
    18% at 1.1 times it. A cliff would make a window whose mean sits by chance just past
    the objective look as bad as a saturated shape.
    """
    if slo_s == math.inf or tpot_s <= 0:
        return 1.0
    if tpot_s == math.inf:
        return 0.0
    return 1.0 / (1.0 + (tpot_s / slo_s) ** 16)


def _share_within(sorted_service: list[float], limit_s: float) -> float:
    """Share of the requests whose prefill takes at most ``limit_s``."""
    if limit_s == math.inf:
        return 1.0
    if limit_s < 0 or not sorted_service:
        return 0.0
    return bisect.bisect_right(sorted_service, limit_s) / len(sorted_service)


def valid(shape: Shape) -> bool:
    return shape.prefill + shape.hybrid >= 1 and shape.decode + shape.hybrid >= 1


def shapes(num_nodes: int) -> list[Shape]:
    """Every shape of ``num_nodes`` nodes with a node able to prefill and one able to decode."""
    out = []
    for h in range(num_nodes + 1):
        for p in range(num_nodes - h + 1):
            s = Shape(p, h, num_nodes - h - p)
            if valid(s):
                out.append(s)
    return out


def shape_of(roles: Sequence[Role]) -> Shape:
    return Shape(sum(r == Role.PREFILL for r in roles), sum(r == Role.HYBRID for r in roles),
                 sum(r == Role.DECODE for r in roles))


def next_move(current: Shape, target: Shape) -> list[tuple[Role, Role]]:
    """(from role, to role) pairs that each take ``current`` one flip toward ``target``,
    best first: moves into hybrid first (they add to both sides), then from the role
    with the largest surplus to the one with the largest deficit."""
    roles = (Role.PREFILL, Role.HYBRID, Role.DECODE)
    surplus = [(current.count(r) - target.count(r), r) for r in roles if current.count(r) > target.count(r)]
    deficit = [(target.count(r) - current.count(r), r) for r in roles if target.count(r) > current.count(r)]
    moves = [(src, dst, (dst != Role.HYBRID, -ns, -nd)) for ns, src in surplus for nd, dst in deficit]
    return [(src, dst) for src, dst, _ in sorted(moves, key=lambda m: m[2])]


def moved(shape: Shape, src: Role, dst: Role) -> Shape:
    """``shape`` after one node moves from ``src`` to ``dst``."""
    counts = {r: shape.count(r) for r in (Role.PREFILL, Role.HYBRID, Role.DECODE)}
    counts[src] -= 1
    counts[dst] += 1
    return Shape(counts[Role.PREFILL], counts[Role.HYBRID], counts[Role.DECODE])


def path(current: Shape, target: Shape, rank: Callable[[Shape], Any] | None = None) -> list[Shape]:
    """The shapes one flip after another from ``current`` to ``target``, ``target`` last
    (empty when they are equal): each flip the one of :func:`next_move` whose shape ranks
    lowest by ``rank`` (default: the first)."""
    out: list[Shape] = []
    shape = current
    while shape != target:
        steps = [moved(shape, src, dst) for src, dst in next_move(shape, target)]
        shape = min(steps, key=rank) if rank is not None else steps[0]
        out.append(shape)
    return out

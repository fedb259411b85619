"""The role controller: moves nodes between prefill, decode and hybrid as the load shifts.

A flip's life:
  1. ``step()`` finds a shape predicted to serve better (or, with the ``split`` planner,
     prefill backlog piling up while decode idles, or the reverse) and returns a
     RoleChange for a node (a ROLE_FLIP "requested" event);
  2. the service sends SetRole to the node, which drains its old-role work and switches;
  3. a later ``step()`` sees the node's LoadReport in the new role, READY: the flip is done
     (ROLE_FLIP "done"); a failed request (``failed()``), a vanished node or
     ``flip_timeout_s`` ends it too.
Flips into hybrid take nothing from their nodes (a hybrid node keeps serving what it did)
and run several at a time: a move of many nodes into hybrid is made at once, not one
report interval per node. Any other flip drains work and runs alone, with nothing else in
flight. A node keeps a role at least ``min_dwell_s``; the gap between the high and low
thresholds is the hysteresis; no flip leaves the cluster without prefill or without
decode capacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from libs.protocol.messages import EventKind, Role, SchedEvent
from libs.scheduler.cost_model import CostModel, decode_utilisation
from libs.scheduler.demand import Demand, DemandTracker
from libs.scheduler.goodput import (Forecast, Load, Objectives, Shape, decode_step_now_s, measured_rates, moved, next_move,
                                    path, shape_of)
from libs.scheduler.node_registry import NodeEntry, NodeRegistry


_SAME = 1e-3  # predicted goodputs this close are the same (the forecasts' rounding)


@dataclass(frozen=True)
class RoleConfig:
    """Thresholds of the role controller.

    Args:
        min_dwell_s: a node keeps a role at least this long before it may flip again.
        flip_timeout_s: give up on a flip whose node never reports the new role.
        prefill_high_s / prefill_low_s: cluster prefill backlog (seconds of queued prompt
            work at the measured rates) above which prefill is short / below which it has room.
        decode_high / decode_low: mean decode utilisation (batch slots or KV blocks) above
            which decode is short / below which it has room.
        allow_hybrid: turn nodes hybrid when both sides are short, back when load falls.
        reverse_cooldown_s: a flip opposite to the last one (decode->prefill after
            prefill->decode, or the reverse) waits this long: flipping straight back is
            the sign of a load both sides are near capacity for, where flips only cost.
        demand_window_s: placements of this many recent seconds set the target split
            (:mod:`~libs.scheduler.demand`); 0 turns the demand signal off.
        demand_busy: the demand signal flips only while the busier side's utilisation
            (need / capacity, :mod:`~libs.scheduler.demand`) is above this.
        demand_margin: the move a demand flip starts (it and the flips after it toward the
            best split) must lower that utilisation by more than this fraction (the demand
            signal's hysteresis).
        demand_confidence: that move must still pay with each need this many standard
            errors against it (a window's sampling noise is no reason to flip).
        ttft_slo_s / tpot_slo_s: the deployment's objectives (0: none). With either set,
            or once requests bring their own (``PlaceRequest.ttft_slo_s``), the controller
            plans for goodput (:mod:`~libs.scheduler.goodput`): it moves nodes among
            prefill, hybrid and decode toward the shape predicted to serve the most
            requests within their objectives.
        goodput_margin: a goodput move must raise the predicted share of requests within
            their objectives by more than this (or, at equal goodput, cut the busiest
            node's load by more than ``demand_margin`` while it is above ``demand_busy``).
        planner: ``goodput`` (default): roles follow the goodput plan whether or not
            objectives are set; without any, every served request counts and the plan is
            the shape of most measured capacity (throughput). ``split``: without
            objectives, the prefill/decode split rules (queue signals, demand) with hybrid
            nodes only when both sides are saturated.
        goodput_window_s: the goodput plan weighs the placements of this many recent
            seconds (at least ``demand_window_s``): a shape is chosen for what wins on
            average, not for one burst.
        flip_cost_s: what one flip costs in seconds of the cluster serving the shape it
            passes through; a move is made only when the predicted gain, held for
            ``reverse_cooldown_s``, outweighs the losses of the shapes on its way.

    A goodput move is made when the best shape's predicted goodput beats the current
    one's by the margin both at the high and at the low end of what the window says of
    the load (its error, 1 / sqrt of its effective request count: bursts count for
    fewer requests); or when, no worse, it is lighter by ``demand_margin``; or, in
    overload under a TTFT objective (the current shape falling behind at the low end of
    the load too), when it has that much more capacity; a move under way goes on while
    its target stays the plan and no worse.
    """

    min_dwell_s: float = 10.0
    flip_timeout_s: float = 120.0
    prefill_high_s: float = 2.0
    prefill_low_s: float = 0.5
    decode_high: float = 0.85
    decode_low: float = 0.6
    allow_hybrid: bool = True
    reverse_cooldown_s: float = 30.0
    demand_window_s: float = 10.0
    demand_busy: float = 0.5
    demand_margin: float = 0.05
    demand_confidence: float = 1.0
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0
    goodput_margin: float = 0.02
    planner: str = "goodput"
    goodput_window_s: float = 30.0
    flip_cost_s: float = 2.0

    def __post_init__(self) -> None:
        if self.planner not in ("goodput", "split"):
            raise ValueError(f"planner must be goodput or split, got {self.planner!r}")
        if self.goodput_window_s < 0 or self.flip_cost_s < 0:
            raise ValueError("goodput_window_s and flip_cost_s must be >= 0")
        if self.ttft_slo_s < 0 or self.tpot_slo_s < 0 or not 0 <= self.goodput_margin < 1:
            raise ValueError("ttft_slo_s and tpot_slo_s must be >= 0, goodput_margin in [0, 1)")
        if self.demand_window_s < 0 or self.demand_busy < 0 or self.demand_confidence < 0:
            raise ValueError("demand_window_s, demand_busy and demand_confidence must be >= 0")
        if not 0 <= self.demand_margin < 1:
            raise ValueError("demand_margin must be in [0, 1)")
        if not (self.prefill_low_s < self.prefill_high_s and self.decode_low < self.decode_high):
            raise ValueError("each low threshold must be below its high threshold (hysteresis)")


@dataclass
class RoleChange:
    node_id: str
    old_role: Role
    new_role: Role
    reason: str
    requested_at: float


@dataclass(frozen=True)
class Pressure:
    """The cluster's load as the controller sees it."""

    prefill_backlog_s: float  # queued prompt tokens / total prefill rate of prefill-capable nodes
    decode_occupancy: float  # mean decode utilisation (batch slots or KV blocks) of decode-capable nodes
    decode_waiting: float  # prefilled requests held for lack of decode room, per decode batch slot
    num_prefill: int  # READY nodes able to prefill (prefill + hybrid)
    num_decode: int  # READY nodes able to decode (decode + hybrid)


def pressure(nodes: list[NodeEntry], cost: CostModel) -> Pressure:
    ps = [n for n in nodes if n.ready and n.can_prefill]
    ds = [n for n in nodes if n.ready and n.can_decode]
    rate = sum(cost.prefill_rate(n) for n in ps)
    backlog = sum(n.queued_prefill_tokens() for n in ps) / rate if rate > 0 else 0.0
    occupancy = sum(decode_utilisation(n) for n in ds) / len(ds) if ds else 0.0
    slots = sum(n.max_num_seqs for n in ds)
    held = sum(n.report.num_held for n in nodes if n.can_prefill)
    return Pressure(backlog, occupancy, held / slots if slots else 0.0, len(ps), len(ds))


def _tpots(f: Forecast) -> str:
    """The TPOTs a forecast predicts, for a flip's reason: " (TPOT decode 12 ms, hybrid 30 ms)"."""
    parts = [f"{kind} {1e3 * t:.0f} ms" if math.isfinite(t) else f"{kind} saturated"
             for kind, t, n in (("decode", f.tpot_decode_s, f.shape.decode), ("hybrid", f.tpot_hybrid_s, f.shape.hybrid))
             if n]
    return f" (TPOT {', '.join(parts)})" if parts else ""


class RoleController:
    """Decides role flips: several into hybrid at once, any other alone.

    Args:
        registry: the live nodes.
        config: thresholds.
        cost: the cost model (prefill rates).
        target: for a policy that pins roles (``fixed:P:D``), node id -> wanted role;
            the controller then only brings nodes to their target.
    """

    def __init__(
        self,
        registry: NodeRegistry,
        config: RoleConfig,
        cost: CostModel,
        target: Callable[[list[NodeEntry]], dict[str, Role] | None] | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.cost = cost
        self.target = target
        # Only a controller that chooses roles itself needs to know the demand.
        use_demand = target is None and config.demand_window_s > 0
        self.demand: DemandTracker | None = (
            DemandTracker(config.demand_window_s, keep_s=config.goodput_window_s) if use_demand else None)
        self.in_flight: dict[str, RoleChange] = {}  # node id -> its flip, requested and not yet seen done
        self.num_flips = 0
        self._last: tuple[Role, float] | None = None  # direction (the role gained) and time of the last flip
        self.last_plan: Forecast | None = None  # the goodput planner's latest best shape
        self.last_current: Forecast | None = None  # ... and its forecast of the shape it found
        self._heading: Shape | None = None  # the shape the goodput planner's last flip moved toward
        self._moved: set[str] = set()  # nodes this controller has flipped
        self._sides: dict[str, tuple[bool, bool]] = {}  # model -> (has had a prefill node, a decode node)

    def step(self) -> tuple[list[RoleChange], list[SchedEvent]]:
        """Advance the flips in flight; maybe start more.

        Returns:
            (the new RoleChanges to send as SetRole, oldest first; events to publish).
        """
        events = self._observe()
        if any(c.new_role is not Role.HYBRID for c in self.in_flight.values()):
            return [], events  # a flip that drains work runs alone
        nodes = self.registry.nodes()
        restore = self._restore_lost_side(nodes) if self.target is None else None
        if restore is not None:
            changes = [restore]
        elif self.target is None and len({n.report.model for n in nodes}) > 1:
            # The demand and the rates are not kept per model: a flip could take one
            # model's node to serve another's load. Roles stay as launched.
            return [], events
        elif self.target is not None:
            change = None if self.in_flight else self._decide_target(nodes)
            changes = [change] if change is not None else []
        else:
            changes = self._decide(nodes)
            if not keeps_both_sides(nodes, *self.in_flight.values(), *changes):
                changes = []  # e.g. a lone hybrid node must not become decode-only
        for change in changes:
            self.in_flight[change.node_id] = change
            events.append(self._event(change, f"requested: {change.reason}"))
        return changes, events

    def failed(self, node_id: str, reason: str) -> list[SchedEvent]:
        """The SetRole request for ``node_id`` failed: forget its flip."""
        change = self.in_flight.pop(node_id, None)
        return [self._event(change, f"failed: {reason}")] if change is not None else []

    def _observe(self) -> list[SchedEvent]:
        events = []
        now = self.registry.clock.now()
        for node_id, change in list(self.in_flight.items()):
            entry = self.registry.get(node_id)
            if entry is None:
                del self.in_flight[node_id]
                events.append(self._event(change, "failed: node left"))
            elif entry.role == change.new_role and entry.ready:
                del self.in_flight[node_id]
                self.num_flips += 1
                self._moved.add(node_id)
                self._last = (change.new_role, now)
                events.append(self._event(change, "done"))
            elif now - change.requested_at > self.config.flip_timeout_s:
                del self.in_flight[node_id]
                events.append(self._event(
                    change, f"failed: no report in the new role after {self.config.flip_timeout_s:g}s"))
        return events

    def _event(self, change: RoleChange, detail: str) -> SchedEvent:
        return SchedEvent(kind=EventKind.ROLE_FLIP, ts=self.registry.clock.now(), node_id=change.node_id,
                          detail=detail, old_role=change.old_role, new_role=change.new_role)

    def _change(self, node: NodeEntry, role: Role, reason: str) -> RoleChange:
        return RoleChange(node.node_id, node.role, role, reason, self.registry.clock.now())

    def _decide_target(self, nodes: list[NodeEntry]) -> RoleChange | None:
        wanted = self.target(nodes) if self.target else None
        for node in nodes:
            if wanted and node.ready and wanted.get(node.node_id, node.role) != node.role:
                return self._change(node, wanted[node.node_id], "pinned by policy")
        return None

    def _restore_lost_side(self, nodes: list[NodeEntry]) -> RoleChange | None:
        """A model whose nodes had both sides and lost one (its last prefill-capable or
        decode-capable node left) gets it back at once: its least busy ready node turns
        hybrid, keeping what it did. Neither dwell nor cooldown holds this back, since
        until then no new request of the model can be served; the planner may reshape the
        cluster later. A side the model never had (nodes still registering one at a time)
        is not restored: a cluster is launched with the roles its operator chose."""
        by_model: dict[str, list[NodeEntry]] = {}
        for n in nodes:
            by_model.setdefault(n.report.model, []).append(n)
        change = None
        for model, group in sorted(by_model.items()):
            ready = [n for n in group if n.ready]
            # A node on its way into hybrid brings both sides with it.
            roles = [self._role(n) for n in ready]
            sides = (any(r is not Role.DECODE for r in roles), any(r is not Role.PREFILL for r in roles))
            had = self._sides.get(model, (False, False))
            self._sides[model] = (had[0] or sides[0], had[1] or sides[1])
            lost = [what for what, have, seen in zip(("prefill", "decode"), sides, had) if seen and not have]
            if change is None and lost and ready:
                node = self._least_busy(ready)
                change = self._change(node, Role.HYBRID, f"no ready node of {model} can {lost[0]}")
        for model in set(self._sides) - set(by_model):
            del self._sides[model]  # every node of the model left: what it had is forgotten
        return change

    def _role(self, node: NodeEntry) -> Role:
        """``node``'s role once its flip in flight, if any, is done."""
        change = self.in_flight.get(node.node_id)
        return change.new_role if change is not None else node.role

    def _decide(self, nodes: list[NodeEntry]) -> list[RoleChange]:
        c = self.config
        now = self.registry.clock.now()
        ready = [n for n in nodes if n.ready and n.node_id not in self.in_flight]
        free = [n for n in ready if now - n.role_since >= c.min_dwell_s]
        # A node in the role it was started with has no flip of this controller to dwell
        # on: the goodput plan may move it at once (the dwell keeps its later roles).
        movable = [n for n in ready if n in free or n.node_id not in self._moved]
        planned, changes = self._decide_by_goodput(nodes, movable)
        if planned or c.planner == "goodput" or c.ttft_slo_s > 0 or c.tpot_slo_s > 0:
            # With objectives, roles follow the goodput plan only; a window too thin to
            # plan from is a light load, which any shape serves.
            return changes
        if self.in_flight:
            return []  # the split rules move one node at a time
        change = self._decide_split(nodes, free)
        return [change] if change is not None else []

    def _decide_split(self, nodes: list[NodeEntry], free: list[NodeEntry]) -> RoleChange | None:
        """The ``split`` planner without objectives: a flip by the demand or the queues."""
        c = self.config
        now = self.registry.clock.now()
        pr = pressure(nodes, self.cost)
        p_short, p_room = pr.prefill_backlog_s > c.prefill_high_s, pr.prefill_backlog_s < c.prefill_low_s
        # Decode is short only when it is full AND prefilled requests wait for it; a full
        # batch that nobody waits on is busy, not short (it drains as its sequences end).
        d_short = pr.decode_occupancy > c.decode_high and pr.decode_waiting > 0
        d_room = pr.decode_waiting == 0
        d_idle = pr.decode_waiting == 0 and pr.decode_occupancy < c.decode_low
        hybrids = [n for n in free if n.role == Role.HYBRID]
        prefills = [n for n in free if n.role == Role.PREFILL]
        decodes = [n for n in free if n.role == Role.DECODE]
        why = (f"prefill backlog {pr.prefill_backlog_s:.2f}s, decode occupancy {pr.decode_occupancy:.2f}, "
               f"waiting {pr.decode_waiting:.2f}")
        by_demand = self._decide_by_demand(nodes, free)
        if by_demand is not None:
            return by_demand
        if p_short and d_short:
            if c.allow_hybrid and (prefills or decodes):
                # Both sides saturated: let a node do both rather than idle between phases,
                # unless the demand says the half of it that changes sides is better where it is.
                group = prefills if len(prefills) > len(decodes) else decodes or prefills
                node = self._least_busy(group)
                if self._demand_allows(nodes, node, Role.HYBRID):
                    return self._change(node, Role.HYBRID, f"overload ({why})")
            return None
        if hybrids and (p_room or d_idle):
            # Load fell on one side (below the low threshold: the gap keeps it from
            # flapping): give hybrids back a single role, the one the cluster lacks more.
            to = Role.PREFILL if d_idle and not p_room else Role.DECODE
            return self._change(self._least_busy(hybrids), to, f"load fell ({why})")
        if self._last is not None and now - self._last[1] < c.reverse_cooldown_s:
            # Only flips in the same direction as the last one until the cooldown ends.
            recent = self._last[0]
            d_short = d_short and recent != Role.PREFILL
            p_short = p_short and recent != Role.DECODE
        if p_short and d_room and pr.num_decode >= 2:
            cands = hybrids or decodes
            if cands and self._demand_allows(nodes, self._least_busy(cands), Role.PREFILL):
                return self._change(self._least_busy(cands), Role.PREFILL, f"prefill short ({why})")
        if d_short and p_room and pr.num_prefill >= 2:
            cands = hybrids or prefills
            projected = pr.prefill_backlog_s * pr.num_prefill / (pr.num_prefill - 1)
            if cands and projected < c.prefill_high_s and self._demand_allows(nodes, self._least_busy(cands), Role.DECODE):
                return self._change(self._least_busy(cands), Role.DECODE, f"decode short ({why})")
        return None

    def goodput_load(self, nodes: list[NodeEntry], span_s: float | None = None) -> tuple[Load, Demand] | None:
        """The load of the last ``span_s`` seconds (default: ``goodput_window_s``, at least
        the demand window, at most what has been seen) for goodput planning, or None: the
        ``split`` planner and no objectives (neither the deployment's nor any request's),
        no demand tracker, or too few placements over that span."""
        ready = [n for n in nodes if n.ready]
        if self.demand is None or len(ready) < 2:
            return None
        c = self.config
        now = self.registry.clock.now()
        self.demand.observe(ready)  # every interval, planned or not: the reports feed the step fits
        span = max(c.goodput_window_s if span_s is None else span_s, self.demand.window_s)
        placed = self.demand.history(now, span)
        if not placed:
            return None
        objectives = Objectives(c.ttft_slo_s, c.tpot_slo_s)
        if c.planner == "split" and not objectives.any and not any(p.ttft_slo_s or p.tpot_slo_s for p in placed):
            return None
        # A window reaching back past the first placement seen covers only the time since.
        span = min(span, max(now - placed[0].t, self.demand.window_s))
        # Enough placements over the plan's own span: a light load leaves the shorter
        # demand window too thin to plan from most of the time, and the plan with it.
        demand = self.demand.demand(now, ready, self.cost, over=(placed, span))
        if demand is None:
            return None
        rates = measured_rates(self.demand, ready, self.cost, placed)
        return Load(placed, span, rates, objectives, c.demand_confidence, end_s=now), demand

    def _decide_by_goodput(self, nodes: list[NodeEntry], free: list[NodeEntry]) -> tuple[bool, list[RoleChange]]:
        """(whether goodput planning applies, the flips it asks for): flips toward the
        shape of best predicted goodput, when that beats the current shape's by more than
        ``goodput_margin``, or matches it with a busiest-node load lower by more than
        ``demand_margin`` while the current one is above ``demand_busy``.

        Each flip is planned from the shape the flips before it (in flight or asked for
        here) leave, as if they were done: a flip into hybrid is followed by the next one
        the plan makes, as long as that goes into hybrid too; a flip out of hybrid, or
        between prefill and decode, is asked for only with nothing else in flight."""
        view = self.goodput_load(nodes)
        if view is None:
            self.last_plan = self.last_current = None  # nothing to plan from: no forecast stands
            return False, []
        load, demand = view
        self.last_plan, self.last_current = load.best(len(nodes), shape_of([self._role(n) for n in nodes]))
        changes: list[RoleChange] = []
        while True:
            pending = [*self.in_flight.values(), *changes]
            change = self._goodput_flip(nodes, free, load, demand, pending)
            if change is None:
                break
            changes.append(change)
            free = [n for n in free if n.node_id != change.node_id]
            if change.new_role is not Role.HYBRID:
                break
        return True, changes

    def _goodput_flip(self, nodes: list[NodeEntry], free: list[NodeEntry], load: Load, demand: Demand,
                      pending: list[RoleChange]) -> RoleChange | None:
        """The next flip of the goodput plan from the shape that ``pending`` (flips into
        hybrid) leave, or None."""
        c = self.config
        roles = {ch.node_id: ch.new_role for ch in pending}
        current = shape_of([roles.get(n.node_id, n.role) for n in nodes])
        best, now = load.best(len(nodes), current)
        # A share estimated from N requests is uncertain by up to 0.5 / sqrt(N) (its
        # standard error at one half): a gain within that is the window's noise.
        margin = max(c.goodput_margin, c.demand_confidence * 0.5 / math.sqrt(max(load.effective_requests, 1.0)))
        # Overload under a TTFT objective (no shape keeps up, :meth:`Load.best`): the
        # predicted shares are of queues growing without bound; only capacity counts, and
        # a move must add it.
        overload = best.load >= 1.0 and load.ttft_bound
        err = c.demand_confidence / math.sqrt(max(load.effective_requests, 1.0))
        low = max(0.0, 1.0 - err)  # the low end of what the window says of the load
        if overload and err > 0 and load.forecast(current, low).load < 1.0:
            # Overloaded only at the high end of what the window says of the load: at its
            # low end the current shape keeps up. Moves for capacity alone are then a bet
            # on the window's noise (on CPU nodes sharing cores, near where their threads
            # fill the cores, a few more prompts in the window turned a shape that kept up
            # into one "overloaded" twice over, and the cluster flipped into hybrid and back
            # within 8 s); the shape stays.
            return None
        gains = not overload and best.goodput > now.goodput + margin
        if gains and err > 0:
            # The forecasts weigh the load at the high end of what the window says of it;
            # a gain that is gone at the low end is within the estimate's error.
            gains = load.forecast(best.shape, low).goodput > load.forecast(current, low).goodput + margin
        # Lighter at no predicted loss: room for bursts is worth a move only where it costs
        # nothing the forecast can see. (Within the window's error a lighter shape would
        # win every lull: a quiet window makes every shape look fine, and the load that
        # comes back finds the shape the lull chose.)
        lighter = ((overload or best.goodput >= now.goodput - _SAME) and now.load > c.demand_busy
                   and best.load < now.load * (1.0 - c.demand_margin))
        if lighter and not overload and best.shape.hybrid > current.hybrid and load.rates.hybrid_prefill_tokens_per_s <= 0:
            # More hybrid nodes for room alone, while none runs: what their prompts cost
            # their decode steps is then the model's guess, not a measurement. A move that
            # gains nothing is worth that bet only with the guess at half the TPOT objective
            # (on CPU processes sharing cores, the guess kept every request where the hybrid
            # nodes measured none, and the cluster turned back within 3 s). The guess is
            # taken no lower than the decode nodes' step now gives it: where node processes
            # share a device, their steps lengthen with the other processes' prompts more
            # than with their own batch, and the fitted line credits a hybrid node's smaller
            # batch with steps shorter than any node runs (on one GPU shared by three
            # processes: guessed at most 15 ms, measured 24 ms on the hybrid nodes).
            # Nor shorter than the mean of the steps reported lately: one report, made between
            # the other processes' prompts, can be short (with the step now alone, the shared
            # GPU still took the move at a 30 ms objective: guessed 14 ms, measured 24 ms).
            # On CPU nodes sharing cores, nor shorter than those steps as the nodes measure
            # them, sharing included: the model may see room on the cores that their steps
            # do not (4 nodes on 2 cores: a decode node's steps took 50-75 ms where the
            # model, at 30 ms with cores of its own and no stretch for the shape, guessed a
            # hybrid TPOT of 43 ms, and the streams of that shape ran 65 ms at the median).
            step = max(decode_step_now_s(nodes), self.demand.fit.mean_step() if self.demand else 0.0)
            measured = max(decode_step_now_s(nodes, own_cores=False),
                           self.demand.measured_fit.mean_step() if self.demand else 0.0)
            guess = max(best.tpot_hybrid_s, load.tpot_hybrid_at_step(best.shape, step),
                        load.tpot_hybrid_at_step(best.shape, measured, stretched=False))
            lighter = 2 * guess <= min(tpot for _, tpot in load.groups)
        # A move under way is finished while its target is still the plan and no worse than
        # the shape reached: stopping one flip short leaves a shape between the two, which
        # no forecast chose.
        onward = (self._heading is not None and best.shape == self._heading and best.load <= now.load
                  and (overload or best.goodput >= now.goodput - margin))
        if best.shape == current or not (gains or lighter or onward):
            return None
        # The move must pay for its way: each flip leaves the cluster for a while in a
        # shape between the two, which may serve fewer requests than the current one.
        # Each flip goes to the shape between that is predicted to serve best.
        forecast = load.forecast

        def rank(s: Shape) -> tuple[float, float]:
            if overload:
                return round(forecast(s).load, 3), -forecast(s).goodput
            return -round(forecast(s).goodput, 3), forecast(s).load

        passing = path(current, best.shape, rank)[:-1]
        cost = sum(max(now.goodput - forecast(s).goodput, 0.0) for s in passing) * c.flip_cost_s
        if gains and (best.goodput - now.goodput) * c.reverse_cooldown_s <= cost:
            return None
        if overload and any(forecast(s).load > now.load for s in passing):
            return None
        if not gains and not overload and any(forecast(s).goodput < now.goodput - margin for s in passing):
            return None
        settled = self._last is not None and self.registry.clock.now() - self._last[1] < c.reverse_cooldown_s
        heading = self._heading is not None and best.shape == self._heading
        clearly = (best.load < now.load * (1.0 - 2 * c.demand_margin) if overload
                   else best.goodput > now.goodput + 2 * margin)
        if settled and not heading and not clearly:
            # A shape just reached is kept for the cooldown unless another is clearly better:
            # windows near a boundary between two shapes would otherwise swing between them.
            # A move on its way to the shape it set out for goes on.
            return None
        why = (f"goodput: {current} predicted {now.goodput:.2f} within objectives at load {now.load:.2f}, "
               f"{best.shape} {best.goodput:.2f} at {best.load:.2f}{_tpots(best)}")
        for src, dst in sorted(next_move(current, best.shape), key=lambda m: rank(moved(current, *m))):
            movers = [n for n in free if n.role == src]
            if not movers:
                continue
            ratio = {n.node_id: demand.prefill_speed.get(n.node_id, 1.0) / max(demand.decode_speed.get(n.node_id, 1.0), 1e-9)
                     for n in movers}
            sign = {Role.PREFILL: -1.0, Role.DECODE: 1.0}.get(dst, 0.0)
            node = min(movers, key=lambda n: (sign * ratio[n.node_id], n.queued_prefill_tokens() + n.report.num_held,
                                              n.num_decode_seqs(), n.node_id))
            change = self._change(node, dst, why)
            if keeps_both_sides(nodes, *pending, change):
                if pending and dst is not Role.HYBRID:
                    return None  # it drains work: it waits until nothing else is in flight
                self._heading = best.shape
                return change
        return None

    def _decide_by_demand(self, nodes: list[NodeEntry], free: list[NodeEntry]) -> RoleChange | None:
        """Flip one node from the less busy side to the busier one, by the recent demand, when
        the busier side is above ``demand_busy`` and the move it starts is worth making
        (:meth:`_move_pays`)."""
        view = self._demand_view(nodes)
        if view is None:
            return None
        demand, cap_p, cap_d = view
        now_u = demand.utilisation(cap_p, cap_d)
        if now_u < self.config.demand_busy:
            return None
        up, ud = demand.utilisation(cap_p, math.inf), demand.utilisation(math.inf, cap_d)
        to, src = (Role.PREFILL, Role.DECODE) if up > ud else (Role.DECODE, Role.PREFILL)
        if sum(1 for n in nodes if n.ready and (n.can_decode if src == Role.DECODE else n.can_prefill)) < 2:
            return None
        if not self._move_pays(view, to, [n for n in nodes if n.ready and n.role == src]):
            return None
        fits = [n for n in free
                if n.role == src and demand.utilisation(*_moved(demand, cap_p, cap_d, n, to)) < now_u]
        if not fits:
            return None
        why = (f"demand: prefill {demand.prefill_nodes:.2f} / decode {demand.decode_nodes:.2f} node-equivalents "
               f"on {cap_p:.2f} / {cap_d:.2f}, utilisation {now_u:.2f}")
        return self._change(self._least_busy(fits), to, why)

    def _move_pays(self, view: tuple[Demand, float, float], to: Role, movers: list[NodeEntry]) -> bool:
        """Whether moving ``movers`` to ``to``, one at a time while each lowers the busier
        side's utilisation, lowers it by more than ``demand_margin``, with each need
        ``demand_confidence`` standard errors against the move.

        The whole move is weighed, not one flip: with many nodes on a side one flip changes
        its capacity by little, so a margin per flip would stop short of the split the
        demand asks for. The standard errors keep a window that by chance holds more of
        one kind of request from starting a move that the next window undoes.
        """
        demand, cap_p, cap_d = view
        d = demand.against(to == Role.PREFILL, self.config.demand_confidence)
        now_u = best = d.utilisation(cap_p, cap_d)
        left = list(movers)
        while len(left) > 1:  # the side losing nodes keeps one
            u, i = min((d.utilisation(*_moved(d, cap_p, cap_d, n, to)), i) for i, n in enumerate(left))
            if u >= best:
                break
            cap_p, cap_d = _moved(d, cap_p, cap_d, left.pop(i), to)
            best = u
        return best < now_u * (1.0 - self.config.demand_margin)

    def _demand_view(self, nodes: list[NodeEntry]) -> tuple[Demand, float, float] | None:
        """(demand, prefill capacity, decode capacity), each capacity in mean nodes of its side."""
        ready = [n for n in nodes if n.ready]
        if self.demand is None or len(ready) < 2:
            return None
        demand = self.demand.demand(self.registry.clock.now(), ready, self.cost)
        if demand is None:
            return None
        cap_p = sum(demand.prefill_speed.get(n.node_id, 1.0) * _prefill_part(n.role) for n in ready)
        cap_d = sum(demand.decode_speed.get(n.node_id, 1.0) * (1.0 - _prefill_part(n.role)) for n in ready)
        return demand, cap_p, cap_d

    def _demand_allows(self, nodes: list[NodeEntry], node: NodeEntry, to: Role) -> bool:
        """A queue-signal flip of ``node`` to ``to`` (a hybrid has half its capacity on each
        side) may go ahead unless the demand signal says it leaves the busier side busier
        or starts a move that does not pay (:meth:`_move_pays`)."""
        view = self._demand_view(nodes)
        if view is None:
            return True
        demand, cap_p, cap_d = view
        if demand.utilisation(*_moved(demand, cap_p, cap_d, node, to)) >= demand.utilisation(cap_p, cap_d):
            return False
        side = Role.PREFILL if _prefill_part(to) > _prefill_part(node.role) else Role.DECODE
        return self._move_pays(view, side, [n for n in nodes if n.ready and n.role == node.role])

    def _least_busy(self, group: list[NodeEntry]) -> NodeEntry:
        """The node whose current work drains fastest (queued prompt tokens, then sequences)."""
        return min(group, key=lambda n: (n.queued_prefill_tokens() + n.report.num_held, n.num_decode_seqs(),
                                         n.node_id))


def keeps_both_sides(nodes: list[NodeEntry], *changes: RoleChange) -> bool:
    """Whether the cluster still has a READY node able to prefill and one able to decode
    after ``changes``: no flip may leave requests with nowhere to go."""
    new = {c.node_id: c.new_role for c in changes}

    def role_of(n: NodeEntry) -> Role:
        return new.get(n.node_id, n.role)

    ready = [n for n in nodes if n.ready]
    prefill = any(role_of(n) in (Role.PREFILL, Role.HYBRID) for n in ready)
    decode = any(role_of(n) in (Role.DECODE, Role.HYBRID) for n in ready)
    return prefill and decode


def _moved(demand: Demand, cap_p: float, cap_d: float, node: NodeEntry, to: Role) -> tuple[float, float]:
    """(prefill, decode) capacity after ``node`` takes role ``to``."""
    shift = _prefill_part(to) - _prefill_part(node.role)
    return (cap_p + shift * demand.prefill_speed.get(node.node_id, 1.0),
            cap_d - shift * demand.decode_speed.get(node.node_id, 1.0))


def _prefill_part(role: Role) -> float:
    """How much of a node's capacity goes to prefill in a role (a hybrid splits it)."""
    return {Role.PREFILL: 1.0, Role.DECODE: 0.0}.get(role, 0.5)

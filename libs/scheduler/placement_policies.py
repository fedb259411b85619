"""Placement policies, pluggable by name: ``round_robin``, ``least_loaded``, ``fixed:P:D``, ``colocated``, ``flowkv``.

Every policy places one request at a time:
  1. candidates: live READY nodes serving the request's model, minus ``exclude_nodes``;
  2. the policy picks a prefill node (role prefill or hybrid) and a decode node (decode
     or hybrid, with room for the request's KV); a hybrid node may be both;
  3. admission: if even the best prefill node predicts a TTFT over ``max_ttft_s`` the
     request is Rejected(OVERLOADED) with a retry-after; no nodes at all -> NO_NODES;
  4. the placement is recorded as in-flight work on both nodes until their reports show it.

``flowkv`` and ``fixed:P:D`` share the cost-model placement
(:mod:`~libs.scheduler.cost_model`); they differ in roles: ``fixed`` pins the first
P/(P+D) of the nodes by id to prefill and the rest to decode, ``colocated`` makes every
node hybrid and serves each request on one node, ``flowkv`` has a
:class:`~libs.scheduler.role_controller.RoleController` move them among prefill, decode
and hybrid (for goodput under the TTFT and TPOT objectives when they are set,
:mod:`~libs.scheduler.goodput`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from libs.protocol.messages import ErrorCode, Placement, PlaceRequest, Rejected, Role
from libs.scheduler.cost_model import (
    CostModel,
    decode_blocks_needed,
    decode_has_room,
    decode_load,
    estimate,
    prompt_blocks,
)
from libs.scheduler.node_registry import Inflight, NodeEntry, NodeRegistry
from libs.scheduler.role_controller import RoleConfig, RoleController

POLICY_NAMES = ("round_robin", "least_loaded", "fixed:P:D", "colocated", "flowkv")


@dataclass(frozen=True)
class PlacementConfig:
    """Knobs every policy shares.

    Args:
        max_ttft_s: admission limit on the best predicted TTFT.
        inflight_grace_s: how long after a placement a node's report is assumed to include it.
        max_retry_after_s: cap on the Retry-After handed back with OVERLOADED.
        decode_candidates: how many of the least-loaded decode nodes ``flowkv`` pairs with each P.
        hybrid_handoff_room: ``flowkv``: a hybrid node without room for a request may prefill
            it for another hybrid node only when that one has room for it this many times
            over (0: only for decode nodes).
    """

    max_ttft_s: float = 30.0
    inflight_grace_s: float = 0.5
    max_retry_after_s: float = 30.0
    decode_candidates: int = 3
    hybrid_handoff_room: float = 0.0
    cost: CostModel = field(default_factory=CostModel)


class Policy:
    """Base: candidate filtering, admission, in-flight bookkeeping. Subclasses implement ``choose``."""

    name = "base"

    def __init__(self, registry: NodeRegistry, config: PlacementConfig | None = None) -> None:
        self.registry = registry
        self.config = config or PlacementConfig()
        self.roles: RoleController | None = None

    def target_roles(self, nodes: list[NodeEntry]) -> dict[str, Role] | None:
        """Roles this policy wants the nodes to have, or None when it does not pin them."""
        return None

    def choose(self, req: PlaceRequest, ps: list[NodeEntry], ds: list[NodeEntry]) -> tuple[NodeEntry, NodeEntry]:
        raise NotImplementedError

    def place(self, req: PlaceRequest) -> Placement | Rejected:
        """Place ``req`` on a (prefill, decode) pair, or reject it.

        Returns:
            Placement, or Rejected(NO_NODES) when no live node serves the model (after
            ``exclude_nodes``) or only excluded ones can prefill (or decode) it,
            Rejected(INVALID) when the prompt fits no node's ``max_model_len``,
            Rejected(OVERLOADED, retry_after_s) when none can take it now.
        """
        live = [n for n in self._serving(req) if n.node_id not in req.exclude_nodes]
        if not live:
            return Rejected(request_id=req.request_id, code=ErrorCode.NO_NODES,
                            reason=f"no live node serves model {req.model!r}" if req.model else "no live nodes")
        if req.exclude_nodes and not req.prefill_node:
            # Only excluded nodes have the role the request needs: waiting for room cannot
            # place it (it would hold up every request queued behind it). Answered at once;
            # its requester may try it on any node.
            missing = [what for what, able in (("prefill", "can_prefill"), ("decode", "can_decode"))
                       if not any(getattr(n, able) for n in live)]
            if missing:
                return Rejected(request_id=req.request_id, code=ErrorCode.NO_NODES,
                                reason=f"no {' or '.join(missing)} node but the excluded {', '.join(req.exclude_nodes)}")
        ready = [n for n in live if n.ready]
        if req.prefill_node:
            return self._place_decode(req, ready)
        longest = max(n.report.max_model_len for n in live)
        if req.num_prompt_tokens >= longest:  # what each node's own check would refuse
            return Rejected(request_id=req.request_id, code=ErrorCode.INVALID,
                            reason=f"a prompt of {req.num_prompt_tokens} tokens does not fit the nodes' "
                                   f"max_model_len (at most {longest})")
        self._offer(req, live)
        ps = [n for n in ready if n.can_prefill]
        ds = [n for n in ready if n.can_decode and decode_has_room(req, n)]
        if not ps or not ds:
            what = "prefill node" if not ps else "decode node with room for the KV"
            return Rejected(request_id=req.request_id, code=ErrorCode.OVERLOADED, reason=f"no ready {what}",
                            retry_after_s=1.0)
        cost = self.config.cost
        best = min(estimate(cost, req, p, p).ttft_s for p in ps)
        if best > self.config.max_ttft_s:
            retry = min(max(math.ceil(best - self.config.max_ttft_s), 1.0), self.config.max_retry_after_s)
            return Rejected(request_id=req.request_id, code=ErrorCode.OVERLOADED, retry_after_s=float(retry),
                            reason=f"predicted TTFT {best:.2f}s exceeds {self.config.max_ttft_s:g}s")
        p, d = self.choose(req, ps, ds)
        est = estimate(cost, req, p, d)
        self._record(req, p, d, est.uncached_tokens, est.ttft_s)
        return Placement(request_id=req.request_id, prefill_node=p.node_id, decode_node=d.node_id,
                         predicted_ttft_s=est.ttft_s)

    def offer(self, req: PlaceRequest) -> None:
        """Count ``req`` as demand without placing it (it waits behind others in the
        scheduler's queue: the role controller must see the load it brings meanwhile)."""
        live = self._serving(req)
        if live and not req.prefill_node:
            self._offer(req, live)

    def _serving(self, req: PlaceRequest) -> list[NodeEntry]:
        """The live nodes of the request's model."""
        return [n for n in self.registry.nodes() if not req.model or n.report.model == req.model]

    def _offer(self, req: PlaceRequest, live: list[NodeEntry]) -> None:
        if self.roles is not None and self.roles.demand is not None:
            # Offered load, counted before admission (retries and waits are recognised by id).
            self.roles.demand.record(self.registry.clock.now(), req.request_id, req.num_prompt_tokens, req.max_tokens,
                                     decode_blocks_needed(req, live[0]), req.ttft_slo_s, req.tpot_slo_s)

    def _place_decode(self, req: PlaceRequest, ready: list[NodeEntry]) -> Placement | Rejected:
        """A decode node for a request already prefilled on ``req.prefill_node`` (its placed
        decode node refused the hand-off): the least decode load plus transfer time, among
        ready decode nodes with room, the excluded ones and the prefill node left out. Not
        counted as new demand; only the decode side's in-flight work is recorded."""
        ds = [n for n in ready if n.can_decode and decode_has_room(req, n) and n.node_id != req.prefill_node]
        if not ds:
            return Rejected(request_id=req.request_id, code=ErrorCode.OVERLOADED, retry_after_s=1.0,
                            reason="no ready decode node with room for the KV")
        cost = self.config.cost
        p = self.registry.get(req.prefill_node)
        blocks = prompt_blocks(req.num_prompt_tokens, (p.report.block_size if p else 0) or 16)

        def score(d: NodeEntry) -> tuple[float, str]:
            move = cost.transfer_s(p, d, blocks) if p is not None else 0.0
            return decode_load(cost, d) + move, d.node_id

        d = min(ds, key=score)
        now = self.registry.clock.now()
        self.registry.add_inflight(d.node_id, Inflight(req.request_id, now + self.config.inflight_grace_s, decode_seqs=1,
                                                       blocks=decode_blocks_needed(req, d)))
        return Placement(request_id=req.request_id, prefill_node=req.prefill_node, decode_node=d.node_id)

    def _record(self, req: PlaceRequest, p: NodeEntry, d: NodeEntry, uncached: int, ttft_s: float) -> None:
        now = self.registry.clock.now()
        grace = self.config.inflight_grace_s
        self.registry.add_inflight(p.node_id, Inflight(req.request_id, now + grace, prefill_tokens=uncached))
        # The hand-off reaches D only after the prefill: keep it until then.
        self.registry.add_inflight(
            d.node_id,
            Inflight(req.request_id, now + ttft_s + grace, decode_seqs=1, blocks=decode_blocks_needed(req, d)),
        )


class RoundRobin(Policy):
    """Next prefill node and next decode node in id order, each on its own counter."""

    name = "round_robin"

    def __init__(self, registry: NodeRegistry, config: PlacementConfig | None = None) -> None:
        super().__init__(registry, config)
        self._next_p = 0
        self._next_d = 0

    def choose(self, req: PlaceRequest, ps: list[NodeEntry], ds: list[NodeEntry]) -> tuple[NodeEntry, NodeEntry]:
        p = ps[self._next_p % len(ps)]
        d = ds[self._next_d % len(ds)]
        self._next_p += 1
        self._next_d += 1
        return p, d


class LeastLoaded(Policy):
    """Fewest queued prefill tokens for P, fewest decoding sequences for D (ties: lowest id)."""

    name = "least_loaded"

    def choose(self, req: PlaceRequest, ps: list[NodeEntry], ds: list[NodeEntry]) -> tuple[NodeEntry, NodeEntry]:
        p = min(ps, key=lambda n: n.queued_prefill_tokens())
        d = min(ds, key=lambda n: n.num_decode_seqs())
        return p, d


class FlowKV(Policy):
    """Cost-model placement: minimise predicted TTFT (backlog, prefix-cache hit, hand-off)
    plus the decode load of D; the role controller moves nodes between roles. A hybrid
    node with room decodes what it prefills (as a colocated server does: no hand-off). One
    without room prefills for a decode node (or, with ``hybrid_handoff_room`` set, for a
    hybrid node with room for the request that many times over); with none, the node with
    room serves the request alone: a hybrid node's room may be gone by the time the prefill
    ends and asks for it (it keeps placing its own requests meanwhile), and a refused
    hand-off computes the prompt again. A prefill node still decoding what it took in an
    earlier role carries that decode load too (its prompts would stall those steps).

    Under objectives a node that decodes paces its prompts: it gives them only what its
    streams can spare of their TPOT objective, ``1 - step / TPOT`` of its time
    (:func:`paced_share`), so a prompt is predicted to take that much longer there. A
    prefill node with nothing to decode then wins a prompt that a hybrid node with a
    shorter queue would hold back for its streams' sake: on four CPU nodes sharing two
    cores, 3P/1H/0D with prompts placed on its hybrid node as on the others ran its
    streams at 62 ms p50 and 139 ms p99 a token, where 3P/0H/1D ran 50 and 73. Where every
    candidate paces, the queues and decode loads decide as they do without objectives."""

    name = "flowkv"

    def choose(self, req: PlaceRequest, ps: list[NodeEntry], ds: list[NodeEntry]) -> tuple[NodeEntry, NodeEntry]:
        cost = self.config.cost
        k = self.config.decode_candidates
        d_loads = {d.node_id: decode_load(cost, d) for d in ds}
        ranked = sorted(ds, key=lambda d: (d_loads[d.node_id], d.node_id))
        top = ranked[:k]
        decode_only = [d for d in ranked if d.role == Role.DECODE][:k]
        best: tuple[float, str, str] | None = None
        pair: tuple[NodeEntry, NodeEntry] = (ps[0], top[0])
        objectives = self.roles.config if self.roles is not None else None
        ttft_slo = req.ttft_slo_s or (objectives.ttft_slo_s if objectives else 0.0)
        tpot_slo = req.tpot_slo_s or (objectives.tpot_slo_s if objectives else 0.0)
        shares = {p.node_id: paced_share(cost, p, tpot_slo) if ttft_slo > 0 else 1.0 for p in ps}
        if all(v < 1.0 for v in shares.values()):
            # Every candidate paces: among them the queues and decode loads decide, as
            # without objectives (weighed by their slack, four hybrid nodes in bursts
            # kept 0.5% fewer requests in the simulator than weighed as they were).
            shares = dict.fromkeys(shares, 1.0)
        for p in ps:
            share = shares[p.node_id]
            if p.role == Role.HYBRID:
                room = self.config.hybrid_handoff_room
                cands = [p] if p.node_id in d_loads else decode_only + [
                    d for d in top if d.role == Role.HYBRID and room > 0
                    and d.free_blocks() >= room * decode_blocks_needed(req, d)]
            else:
                cands = top if not (p.node_id in d_loads and p not in top) else [*top, p]
            # A prefill node still finishing the sequences it decoded in its former role
            # (hybrid or decode) runs each prompt between their steps, as a hybrid node does:
            # its decode load counts against it, or the prompts of the nodes still hybrid
            # flow to it and stretch those sequences' steps past their TPOT objective.
            draining = p.num_decode_seqs() * cost.decode_step_s(p) if p.role == Role.PREFILL else 0.0
            for d in cands:
                score = estimate(cost, req, p, d).ttft_s / share + d_loads[d.node_id] + draining
                key = (score, p.node_id, d.node_id)
                if best is None or key < best:
                    best, pair = key, (p, d)
        return pair


def paced_share(cost: CostModel, node: NodeEntry, tpot_slo_s: float) -> float:
    """The share of its time a node that paces its prompts gives them: what its decoding
    streams can spare of their TPOT objective, ``1 - step / TPOT`` (at least a tenth: a
    prompt about to miss its own objective runs whatever the streams need); 1 for a node
    with nothing decoding, or without a TPOT objective (:mod:`libs.engine.pacing`)."""
    if tpot_slo_s <= 0 or node.num_decode_seqs() == 0:
        return 1.0
    return max(_PACED_FLOOR, 1.0 - cost.decode_step_s(node) / tpot_slo_s)


_PACED_FLOOR = 0.1


class Colocated(Policy):
    """``colocated``: every node hybrid, each request prefilled and decoded on one node
    (no hand-off), the one with the least predicted TTFT (backlog, prefix-cache hit) plus
    decode load: the colocated baseline, one server per node behind a load balancer."""

    name = "colocated"

    def target_roles(self, nodes: list[NodeEntry]) -> dict[str, Role]:
        return {n.node_id: Role.HYBRID for n in nodes}

    def choose(self, req: PlaceRequest, ps: list[NodeEntry], ds: list[NodeEntry]) -> tuple[NodeEntry, NodeEntry]:
        cost = self.config.cost
        both = [p for p in ps if p in ds] or ps
        node = min(both, key=lambda n: (estimate(cost, req, n, n).ttft_s + decode_load(cost, n), n.node_id))
        return node, node if node in ds else min(ds, key=lambda d: (decode_load(cost, d), d.node_id))


class FixedSplit(FlowKV):
    """``fixed:P:D``: P of every P+D nodes prefill, the rest decode.

    With exactly P+D nodes that is P nodes; with more, the ratio is kept (rounded, at
    least one of each); with fewer, nodes keep their roles unless one side has none.
    """

    def __init__(self, p: int, d: int, registry: NodeRegistry, config: PlacementConfig | None = None) -> None:
        if p < 1 or d < 1:
            raise ValueError("fixed:P:D needs P >= 1 and D >= 1")
        super().__init__(registry, config)
        self.p, self.d = p, d
        self.name = f"fixed:{p}:{d}"

    def num_prefill(self, n: int) -> int:
        if n <= 1:
            return n
        return min(max(round(n * self.p / (self.p + self.d)), 1), n - 1)

    def target_roles(self, nodes: list[NodeEntry]) -> dict[str, Role]:
        """The first ``k`` nodes prefill, the rest decode, in an order that keeps nodes in
        the role they have (prefill, then hybrid, then decode; by id within a role): a
        cluster launched with the right split is left as it is, and no pinning flips a
        node that another node could take the role from without a flip.

        With fewer than P + D live nodes, every node keeps its role while some node can
        prefill and some can decode (or while there is only one): a cluster registers one
        node at a time, and pinning the ratio of the first few flipped nodes that the
        later ones made wrong again (``flowkv up`` with fixed:1:3 turned decode-0 into a
        prefill node when it reported first, then prefill-0 into a decode node).
        """
        short = len(nodes) < self.p + self.d
        if short and (len(nodes) < 2 or (any(n.can_prefill for n in nodes) and any(n.can_decode for n in nodes))):
            return {n.node_id: n.role for n in nodes}
        rank = {Role.PREFILL: 0, Role.HYBRID: 1, Role.DECODE: 2}
        ordered = sorted(nodes, key=lambda n: (rank.get(n.role, 1), n.node_id))
        k = self.num_prefill(len(ordered))
        return {n.node_id: (Role.PREFILL if i < k else Role.DECODE) for i, n in enumerate(ordered)}


def make_policy(
    spec: str,
    registry: NodeRegistry,
    config: PlacementConfig | None = None,
    role_config: RoleConfig | None = None,
) -> Policy:
    """Build a policy from its name.

    Args:
        spec: ``round_robin``, ``least_loaded``, ``flowkv`` or ``fixed:P:D`` (e.g. ``fixed:1:1``).
        registry: the node registry the policy reads (and records in-flight work in).
        config: placement knobs shared by all policies.
        role_config: role-controller knobs (``flowkv``, and ``fixed`` which pins roles).

    Returns:
        The policy; ``policy.roles`` is its RoleController (None for round_robin/least_loaded).
    """
    config = config or PlacementConfig()
    if spec == "round_robin":
        return RoundRobin(registry, config)
    if spec == "least_loaded":
        return LeastLoaded(registry, config)
    if spec == "colocated":
        colocated = Colocated(registry, config)
        colocated.roles = RoleController(registry, role_config or RoleConfig(), config.cost,
                                         target=colocated.target_roles)
        return colocated
    if spec == "flowkv":
        policy: Policy = FlowKV(registry, config)
        policy.roles = RoleController(registry, role_config or RoleConfig(), config.cost)
        return policy
    if spec.startswith("fixed:"):
        parts = spec.split(":")
        try:
            p, d = int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise ValueError(f"bad fixed split {spec!r}: use fixed:P:D, e.g. fixed:1:1") from None
        if len(parts) != 3:
            raise ValueError(f"bad fixed split {spec!r}: use fixed:P:D, e.g. fixed:1:1")
        fixed = FixedSplit(p, d, registry, config)
        fixed.roles = RoleController(registry, role_config or RoleConfig(), config.cost, target=fixed.target_roles)
        return fixed
    raise ValueError(f"unknown policy {spec!r}; one of {', '.join(POLICY_NAMES)}")

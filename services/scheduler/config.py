"""The scheduler's configuration: one dataclass, each field a ``--flag`` and a ``FLOWKV_SCHEDULER_*`` variable."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields

from libs.scheduler.clock import ManualClock
from libs.scheduler.cost_model import CostModel
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import PlacementConfig, make_policy
from libs.scheduler.role_controller import RoleConfig

ENV_PREFIX = "FLOWKV_SCHEDULER"


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SchedulerConfig:
    """Scheduler service settings (validated here; NATS settings live in ``NatsConfig``).

    The placement and role-controller settings take their defaults from
    :class:`~libs.scheduler.placement_policies.PlacementConfig` and
    :class:`~libs.scheduler.role_controller.RoleConfig`, which hold them once.
    """

    policy: str = field(default="flowkv", metadata=_h("round_robin, least_loaded, fixed:P:D, colocated or flowkv"))
    node_timeout_s: float = field(default=3.0, metadata=_h("a node is dead after this long without a load report"))
    max_ttft_s: float = field(default=PlacementConfig.max_ttft_s, metadata=_h("reject (429) when the best predicted TTFT exceeds this"))
    max_retry_after_s: float = field(default=PlacementConfig.max_retry_after_s, metadata=_h("cap on Retry-After of a rejection"))
    queue_limit: int = field(default=1024, metadata=_h("requests held waiting for a node with room; past it, 429 at once"))
    max_queue_wait_s: float = field(default=60.0, metadata=_h("cap on the wait a PlaceRequest may ask for (0: never hold one)"))
    inflight_grace_s: float = field(default=PlacementConfig.inflight_grace_s, metadata=_h("how long a placement counts before reports show it"))
    hybrid_handoff_room: float = field(default=PlacementConfig.hybrid_handoff_room, metadata=_h("flowkv: a full hybrid node prefills for another hybrid node only with room for the request this many times over there (0, the default: only for decode nodes)"))
    role_interval_s: float = field(default=0.5, metadata=_h("how often the role controller runs"))
    min_dwell_s: float = field(default=RoleConfig.min_dwell_s, metadata=_h("minimum time a node keeps a role"))
    flip_timeout_s: float = field(default=RoleConfig.flip_timeout_s, metadata=_h("give up on a role flip after this long"))
    prefill_high_s: float = field(default=RoleConfig.prefill_high_s, metadata=_h("prefill backlog (s) above which prefill is short"))
    prefill_low_s: float = field(default=RoleConfig.prefill_low_s, metadata=_h("prefill backlog (s) below which prefill has room"))
    decode_high: float = field(default=RoleConfig.decode_high, metadata=_h("decode utilisation above which decode is short"))
    decode_low: float = field(default=RoleConfig.decode_low, metadata=_h("decode utilisation below which decode has room"))
    demand_window_s: float = field(default=RoleConfig.demand_window_s, metadata=_h("placements of this many recent seconds set the target P:D split (0: off)"))
    demand_busy: float = field(default=RoleConfig.demand_busy, metadata=_h("demand flips only while the busier side's utilisation is above this"))
    demand_margin: float = field(default=RoleConfig.demand_margin, metadata=_h("the move a demand flip starts must cut that utilisation by more than this fraction"))
    demand_confidence: float = field(default=RoleConfig.demand_confidence, metadata=_h("and must still pay with each need this many standard errors against it (window sampling noise)"))
    allow_hybrid: bool = field(default=RoleConfig.allow_hybrid, metadata=_h("turn nodes hybrid when both sides are saturated"))
    ttft_slo_s: float = field(default=RoleConfig.ttft_slo_s, metadata=_h("the deployment's TTFT objective in seconds: flowkv's goodput plan counts the requests within it, and with a TPOT objective nodes pace their prompts by both (0: none)"))
    tpot_slo_s: float = field(default=RoleConfig.tpot_slo_s, metadata=_h("the deployment's TPOT objective in seconds (0: none); see --ttft-slo-s"))
    planner: str = field(default=RoleConfig.planner, metadata=_h("flowkv's roles: goodput (the shape predicted to serve the most requests within the objectives; without objectives, the most throughput) or split (prefill/decode split rules when no objective is set)"))
    goodput_window_s: float = field(default=RoleConfig.goodput_window_s, metadata=_h("the goodput plan weighs the placements of this many recent seconds"))
    flip_cost_s: float = field(default=RoleConfig.flip_cost_s, metadata=_h("seconds of service one flip costs; a move must gain more than the shapes on its way lose"))
    set_role_timeout_s: float = field(default=5.0, metadata=_h("timeout of the SetRole request to a node"))
    max_events: int = field(default=200, metadata=_h("recent events kept for cluster queries"))
    scheduler_id: str = field(default="", metadata=_h("this replica's id among the scheduler replicas (default: host-pid)"))
    leader_lease_s: float = field(default=1.2, metadata=_h("the leader's lease in the broker's JetStream KV: a dead leader is replaced within about this long"))
    lease_replicas: int = field(default=1, metadata=_h("JetStream replicas of the lease buckets (3 on a 3-server NATS cluster)"))
    metrics_port: int = field(default=0, metadata=_h("serve Prometheus /metrics and /health on this port (0: off)"))
    metrics_host: str = field(default="127.0.0.1", metadata=_h("address the /metrics endpoint binds"))
    log_level: str = field(default="info", metadata=_h("debug, info, warning, error"))
    json_logs: bool = field(default=False, metadata=_h("log one JSON object per line"))

    def __post_init__(self) -> None:
        for name in ("node_timeout_s", "max_ttft_s", "role_interval_s", "set_role_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.queue_limit < 0 or self.max_queue_wait_s < 0 or self.hybrid_handoff_room < 0:
            raise ValueError("queue_limit, max_queue_wait_s and hybrid_handoff_room must not be negative")
        if self.leader_lease_s < 0.3:
            raise ValueError("leader_lease_s must be at least 0.3")
        if not 1 <= self.lease_replicas <= 5:
            raise ValueError("lease_replicas must be in 1..5 (JetStream's limit)")
        if not self.scheduler_id:
            self.scheduler_id = f"{socket.gethostname()}-{os.getpid()}"
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        self.role_config()  # validates the thresholds
        make_policy(self.policy, NodeRegistry(ManualClock()))  # validates the policy name

    def placement_config(self) -> PlacementConfig:
        return PlacementConfig(max_ttft_s=self.max_ttft_s, inflight_grace_s=self.inflight_grace_s,
                               max_retry_after_s=self.max_retry_after_s, hybrid_handoff_room=self.hybrid_handoff_room,
                               cost=CostModel())

    def role_config(self) -> RoleConfig:
        """The role controller's settings: each ``RoleConfig`` field this config has (the
        others, e.g. ``reverse_cooldown_s``, keep ``RoleConfig``'s default)."""
        return RoleConfig(**{f.name: getattr(self, f.name) for f in fields(RoleConfig) if hasattr(self, f.name)})

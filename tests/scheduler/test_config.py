"""The scheduler service's config: its placement and role settings are those of the core's dataclasses."""

from __future__ import annotations

from dataclasses import fields

from libs.scheduler.placement_policies import PlacementConfig
from libs.scheduler.role_controller import RoleConfig
from services.scheduler.config import SchedulerConfig


def test_defaults_come_from_the_core():
    config = SchedulerConfig()
    assert config.role_config() == RoleConfig()
    placement = config.placement_config()
    for name in ("max_ttft_s", "inflight_grace_s", "max_retry_after_s", "hybrid_handoff_room"):
        assert getattr(placement, name) == getattr(PlacementConfig(), name)
    assert SchedulerConfig(hybrid_handoff_room=0).placement_config().hybrid_handoff_room == 0


def test_every_role_setting_reaches_the_controller():
    own = {f.name for f in fields(SchedulerConfig)}
    shared = [f.name for f in fields(RoleConfig) if f.name in own]
    assert len(shared) == 16  # all but reverse_cooldown_s and goodput_margin
    changed = SchedulerConfig(min_dwell_s=3.0, flip_timeout_s=7.0, prefill_high_s=4.0, prefill_low_s=1.0,
                              decode_high=0.9, decode_low=0.2, demand_window_s=5.0, demand_busy=0.3,
                              demand_margin=0.1, demand_confidence=2.0, allow_hybrid=False, ttft_slo_s=2.0,
                              tpot_slo_s=0.05, planner="split", goodput_window_s=20.0, flip_cost_s=1.0)
    roles = changed.role_config()
    for name in shared:
        assert getattr(roles, name) == getattr(changed, name) != getattr(RoleConfig(), name), name
    assert roles.reverse_cooldown_s == RoleConfig().reverse_cooldown_s

"""NodeRegistry: join, stale reports, liveness on an injected clock, in-flight work."""

from __future__ import annotations

from libs.protocol.messages import EventKind, Role
from libs.scheduler.clock import ManualClock
from libs.scheduler.node_registry import Inflight, NodeRegistry
from tests.scheduler.helpers import report


def test_join_update_and_stale_reports() -> None:
    clock = ManualClock(100.0)
    reg = NodeRegistry(clock, node_timeout_s=3.0)
    first = report("a", waiting_tokens=10)
    events = reg.update(first)
    assert [(e.kind, e.node_id, e.ts) for e in events] == [(EventKind.NODE_UP, "a", 100.0)]
    newer = report("a", waiting_tokens=20)
    assert reg.update(newer) == []
    assert reg.get("a").report.waiting_prefill_tokens == 20
    assert reg.update(first) == []  # older seq: ignored
    assert reg.get("a").report.waiting_prefill_tokens == 20
    # A restarted process (new started_at) is a new node even with a low seq.
    events = reg.update(report("a", started_at=2.0))
    assert [e.kind for e in events] == [EventKind.NODE_UP]


def test_node_dead_after_timeout_and_on_bye() -> None:
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=3.0)
    reg.update(report("a"))
    reg.update(report("b"))
    clock.advance(2.0)
    reg.update(report("b"))
    clock.advance(1.0)
    assert reg.expire() == []  # a is exactly at the timeout: still alive
    clock.advance(0.5)
    events = reg.expire()
    assert [(e.kind, e.node_id) for e in events] == [(EventKind.NODE_DOWN, "a")]
    assert [n.node_id for n in reg.nodes()] == ["b"]
    assert [e.kind for e in reg.remove("b", "bye")] == [EventKind.NODE_DOWN]
    assert reg.remove("b", "bye") == []
    assert len(reg) == 0


def test_an_old_report_does_not_bring_a_removed_node_back() -> None:
    """A copy of a report already applied (a late duplicate, NATS redelivery) that arrives
    after its node was declared dead is stale; a newer report of that process, or any
    report of a restarted one, brings the node back."""
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock, node_timeout_s=3.0)
    old, last = report("a"), report("a")
    reg.update(old)
    reg.update(last)
    clock.advance(4.0)
    assert [e.kind for e in reg.expire()] == [EventKind.NODE_DOWN]
    assert reg.update(last) == [] and reg.update(old) == []
    assert "a" not in reg
    assert [e.kind for e in reg.update(report("a"))] == [EventKind.NODE_UP]  # busy, not dead: it reports again
    reg.remove("a", "bye")
    assert [e.kind for e in reg.update(report("a", started_at=2.0))] == [EventKind.NODE_UP]  # restarted


def test_inflight_counts_until_a_later_report() -> None:
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock)
    reg.update(report("a", waiting_tokens=100, running=2, free_blocks=50))
    reg.add_inflight("a", Inflight("r1", expires_at=0.5, prefill_tokens=300, decode_seqs=1, blocks=10))
    node = reg.get("a")
    assert (node.queued_prefill_tokens(), node.num_decode_seqs(), node.free_blocks()) == (400, 3, 40)
    clock.advance(0.2)
    reg.update(report("a", waiting_tokens=100, running=2, free_blocks=50))
    assert reg.get("a").queued_prefill_tokens() == 400  # too soon: the report may predate it
    clock.advance(0.4)
    reg.update(report("a", waiting_tokens=400, running=2, free_blocks=50))
    assert reg.get("a").queued_prefill_tokens() == 400  # now the report carries it
    assert reg.get("a").inflight == []


def test_role_since_moves_on_role_change() -> None:
    clock = ManualClock(0.0)
    reg = NodeRegistry(clock)
    reg.update(report("a", Role.PREFILL))
    clock.advance(5.0)
    reg.update(report("a", Role.PREFILL))
    assert reg.get("a").role_since == 0.0
    clock.advance(1.0)
    reg.update(report("a", Role.DECODE))
    assert reg.get("a").role_since == 6.0

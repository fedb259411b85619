"""The scheduler's wait queue: pure (ManualClock) and over a real nats-server."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from libs.protocol import subjects
from libs.protocol.messages import (
    Cancel, ClusterQuery, ErrorCode, NodeState, PlaceRequest, Placement, Rejected, Role, decode, encode,
)
from libs.scheduler.clock import ManualClock
from libs.scheduler.cost_model import decode_blocks_needed
from libs.scheduler.node_registry import NodeRegistry
from libs.scheduler.placement_policies import PlacementConfig, make_policy
from libs.scheduler.wait_queue import WaitQueue
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from tests.scheduler.helpers import announce, report, until


def _req(rid: str, tokens: int = 100, max_tokens: int = 10, wait: float = 20.0, **kw) -> PlaceRequest:
    return PlaceRequest(request_id=rid, model="m", num_prompt_tokens=tokens, max_tokens=max_tokens,
                        queue_timeout_s=wait, **kw)


def _busy(rid: str) -> Rejected:
    return Rejected(request_id=rid, code=ErrorCode.OVERLOADED, retry_after_s=2.0, reason="no decode room")


class _Nodes:
    """A stand-in for the policy: places a request iff its id is in ``room``."""

    def __init__(self) -> None:
        self.room: set[str] = set()
        self.gone: set[str] = set()
        self.tried: list[str] = []

    def place(self, req: PlaceRequest) -> Placement | Rejected:
        self.tried.append(req.request_id)
        if req.request_id in self.gone:
            return Rejected(request_id=req.request_id, code=ErrorCode.NO_NODES, reason="no live nodes")
        if req.request_id in self.room:
            return Placement(request_id=req.request_id, prefill_node="p", decode_node="d")
        return _busy(req.request_id)


def _ids(answers) -> list[tuple[str, str]]:
    return [(w.req.request_id, type(a).__name__ if isinstance(a, Placement) else a.code.value) for w, a in answers]


def test_who_may_wait() -> None:
    q = WaitQueue(limit=4, max_wait_s=10.0)
    assert q.wants(_req("a"))
    assert not q.wants(_req("b", wait=0.0))  # asked to be answered at once
    assert not q.wants(_req("c", prefill_node="p1"))  # a decode re-placement: its prefill node asks again
    assert not WaitQueue(limit=4, max_wait_s=0.0).wants(_req("d"))  # waiting switched off
    assert not WaitQueue(limit=0, max_wait_s=10.0).wants(_req("e"))


def test_first_come_first_served_and_head_of_line() -> None:
    q, nodes = WaitQueue(limit=8, max_wait_s=60.0), _Nodes()
    for i, rid in enumerate("abc"):
        assert q.add(_req(rid), handle=rid, last=_busy(rid), now=float(i))
    assert q.add(_req("b"), handle="b-again", last=_busy("b"), now=3.0)  # a resend keeps its place
    assert len(q) == 3

    nodes.room = {"b", "c"}  # room for the later ones, not the head: nobody jumps ahead of "a"
    assert q.drain(nodes.place, now=4.0) == []
    assert nodes.tried == ["a"]

    nodes.room = {"a", "b"}
    out = q.drain(nodes.place, now=5.0)
    assert _ids(out) == [("a", "Placement"), ("b", "Placement")]
    assert out[1][0].handle == "b-again"  # answered on the resend's reply subject
    assert [w.since for w, _ in out] == [0.0, 1.0]
    assert nodes.tried[-3:] == ["a", "b", "c"]  # stops at the first it cannot place
    assert len(q) == 1


def test_deadline_is_the_smaller_of_asked_and_cap() -> None:
    q, nodes = WaitQueue(limit=8, max_wait_s=3.0), _Nodes()
    q.add(_req("short", wait=1.0), None, _busy("short"), now=0.0)
    q.add(_req("long", wait=100.0), None, _busy("long"), now=0.0)  # capped at 3 s
    assert q.drain(nodes.place, now=0.5) == []
    out = q.drain(nodes.place, now=1.0)
    assert _ids(out) == [("short", "overloaded")]
    assert out[0][1].retry_after_s == 2.0
    assert out[0][1].reason == "no decode room (waited 1.0s for capacity)"
    assert _ids(q.drain(nodes.place, now=2.9)) == []
    assert _ids(q.drain(nodes.place, now=3.0)) == [("long", "overloaded")]
    assert len(q) == 0


def test_final_answers_leave_and_the_rest_move_up() -> None:
    q, nodes = WaitQueue(limit=8, max_wait_s=60.0), _Nodes()
    for rid in "abc":
        q.add(_req(rid), None, _busy(rid), now=0.0)
    nodes.gone, nodes.room = {"a"}, {"b"}  # a's model lost its nodes; b fits; c does not
    assert _ids(q.drain(nodes.place, now=1.0)) == [("a", "no_nodes"), ("b", "Placement")]
    assert [w.req.request_id for w in q._waiting.values()] == ["c"]
    assert q._waiting["c"].last.reason == "no decode room"


def test_full_queue_and_cancel() -> None:
    q = WaitQueue(limit=2, max_wait_s=60.0)
    assert q.add(_req("a"), None, _busy("a"), 0.0)
    assert q.add(_req("b"), None, _busy("b"), 0.0)
    assert not q.add(_req("c"), None, _busy("c"), 0.0)
    assert len(q) == 2
    assert q.cancel("a").req.request_id == "a"
    assert q.cancel("a") is None  # once
    assert q.cancel("unknown") is None
    assert q.add(_req("c"), None, _busy("c"), 0.0)


# --- the policy's part: what it answers a request that waits ----------------------------------------


def _policy(*reports):
    reg = NodeRegistry(ManualClock(0.0))
    for r in reports:
        reg.update(r)
    return make_policy("flowkv", reg, PlacementConfig())


def test_decode_room_counts_no_further_than_max_model_len() -> None:
    # A node whose engine capped max_model_len to its 2048-token pool (128 blocks of 16), and a
    # request that left max_tokens to the gateway's default (the model's 32k context): the KV
    # can never grow past 2048 tokens there, so it needs 128 blocks, not 2048.
    small = msgspec.structs.replace(report("c1", Role.HYBRID, free_blocks=128, total_blocks=128), max_model_len=2048)
    req = _req("r", tokens=100, max_tokens=32_000)
    pol = _policy(small)
    assert decode_blocks_needed(req, pol.registry.get("c1")) == 128
    out = pol.place(req)
    assert isinstance(out, Placement) and out.decode_node == "c1"


def test_prompt_longer_than_every_node_is_invalid_not_overloaded() -> None:
    a = msgspec.structs.replace(report("c1", Role.HYBRID), max_model_len=2048)
    b = msgspec.structs.replace(report("c2", Role.HYBRID), max_model_len=4096)
    pol = _policy(a, b)
    out = pol.place(_req("long", tokens=4096))
    assert isinstance(out, Rejected) and out.code is ErrorCode.INVALID  # waiting would never help
    assert "at most 4096" in out.reason
    assert isinstance(pol.place(_req("fits", tokens=3000)), Placement)


# --- the service: a request waits over NATS, and is answered when room appears ----------------------


@pytest.fixture
async def sched(nats_server):
    nc = await nats.connect(nats_server.url)
    client = await nats.connect(nats_server.url)
    service = SchedulerService(SchedulerConfig(policy="flowkv", role_interval_s=0.05, min_dwell_s=1000.0,
                                               queue_limit=2, max_queue_wait_s=30.0), nc)
    await service.start()
    yield service, client
    await service.close()
    await client.drain()
    await nc.drain()


async def _ask(client, req: PlaceRequest):
    reply = await client.request(subjects.sched_place(), encode(req), timeout=15)
    return decode(reply.data)


async def test_held_until_a_report_makes_room_then_cancel_and_overflow(sched) -> None:
    service, client = sched
    # A decode node with no free block: nothing can be placed now.
    await announce(client, service.registry, report("p1"), report("d1", Role.DECODE, free_blocks=0))

    now = await _ask(client, _req("at-once", wait=0.0))  # did not ask to wait
    assert isinstance(now, Rejected) and now.code is ErrorCode.OVERLOADED

    first = asyncio.create_task(_ask(client, _req("first")))
    await until(lambda: len(service.queue) == 1)
    second = asyncio.create_task(_ask(client, _req("second")))
    await until(lambda: len(service.queue) == 2)
    full = await _ask(client, _req("third"))  # queue_limit=2
    assert isinstance(full, Rejected) and full.code is ErrorCode.OVERLOADED
    assert "queue is full" in full.reason
    reply = await client.request(subjects.sched_cluster(), encode(ClusterQuery()), timeout=5)
    assert decode(reply.data).num_waiting == 2
    reply = await client.request(subjects.sched_cluster(), encode(ClusterQuery(brief=True)), timeout=5)
    brief = decode(reply.data)
    assert (brief.num_waiting, brief.nodes, brief.events) == (2, [], [])  # the gateway's liveness probe

    # The second one's requester gives up: it leaves without an answer.
    await client.publish(subjects.request_cancel(), encode(Cancel(request_id="second", reason="client gone")))
    await until(lambda: len(service.queue) == 1)
    assert not second.done()
    second.cancel()

    # A load report frees room: the first is placed, with the time it waited.
    await client.publish(subjects.node_load(), encode(report("d1", Role.DECODE, free_blocks=1000)))
    out = await asyncio.wait_for(first, 10)
    assert isinstance(out, Placement)
    assert (out.prefill_node, out.decode_node) == ("p1", "d1")
    assert out.queued_s > 0
    assert len(service.queue) == 0


async def test_wait_runs_out_and_draining_nodes(sched) -> None:
    service, client = sched
    await announce(client, service.registry, report("p1", state=NodeState.DRAINING), report("d1", Role.DECODE))
    out = await _ask(client, _req("late", wait=0.3))  # answered by the housekeeping tick
    assert isinstance(out, Rejected) and out.code is ErrorCode.OVERLOADED
    assert "waited" in out.reason
    assert len(service.queue) == 0


async def test_held_requests_are_answered_when_the_scheduler_stops(nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    client = await nats.connect(nats_server.url)
    service = SchedulerService(SchedulerConfig(policy="flowkv", max_queue_wait_s=60.0), nc)
    await service.start()
    try:
        await announce(client, service.registry, report("p1"), report("d1", Role.DECODE, free_blocks=0))
        held = asyncio.create_task(_ask(client, _req("held", wait=60.0)))
        await until(lambda: len(service.queue) == 1)
        await service.close()  # a SIGTERM'd scheduler: the requester need not wait out its minute
        out = await asyncio.wait_for(held, 10)
        assert isinstance(out, Rejected) and out.code is ErrorCode.OVERLOADED
        assert "stopping" in out.reason and out.retry_after_s == 1.0
    finally:
        await service.close()
        await client.drain()
        await nc.drain()

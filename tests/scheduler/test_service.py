"""The scheduler service over a real nats-server: placement, garbage, dead nodes, SetRole."""

from __future__ import annotations

import asyncio

import nats
import pytest
from prometheus_client import REGISTRY

from libs.protocol import subjects
from libs.protocol.messages import (
    Ack, ClusterQuery, ClusterState, EventKind, NodeBye, PlaceRequest, Placement, Role, SchedEvent, SetRole,
    decode, encode,
)
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from tests.scheduler.helpers import announce, report, until


@pytest.fixture
async def cluster(nats_server):
    nc = await nats.connect(nats_server.url)
    client = await nats.connect(nats_server.url)
    config = SchedulerConfig(policy="flowkv", node_timeout_s=0.6, role_interval_s=0.05, min_dwell_s=1000.0)
    service = SchedulerService(config, nc)
    await service.start()
    yield service, client
    await service.close()
    await client.drain()
    await nc.drain()


async def _place(client, rid: str) -> object:
    req = PlaceRequest(request_id=rid, model="m", num_prompt_tokens=100, max_tokens=10)
    reply = await client.request(subjects.sched_place(), encode(req), timeout=5)
    return decode(reply.data)


def _dropped(reason: str, subject: str) -> float:
    return REGISTRY.get_sample_value("flowkv_messages_dropped_total", {"subject": subject, "reason": reason}) or 0.0


async def test_place_garbage_and_dead_node(cluster) -> None:
    service, client = cluster
    events: list[SchedEvent] = []

    async def on_event(msg) -> None:
        events.append(decode(msg.data))

    await client.subscribe(subjects.sched_events(), cb=on_event)
    await announce(client, service.registry, report("p1", waiting_tokens=0), report("d1", Role.DECODE))
    out = await _place(client, "r1")
    assert isinstance(out, Placement)
    assert (out.prefill_node, out.decode_node) == ("p1", "d1")

    before = _dropped("malformed", subjects.node_load())
    await client.publish(subjects.node_load(), b"\xc1garbage")
    await client.publish(subjects.node_load(), encode(ClusterQuery()))  # valid message, wrong subject
    await client.publish(subjects.sched_place(), b"not msgpack at all")
    await client.publish(subjects.node_bye(), b"")
    await client.flush()
    out = await _place(client, "r2")  # still answering
    assert isinstance(out, Placement)
    assert _dropped("malformed", subjects.node_load()) == before + 1
    assert _dropped("unexpected", subjects.node_load()) >= 1

    # p1 keeps reporting, d1 falls silent: it is dropped after the timeout.
    while "d1" in service.registry:
        await client.publish(subjects.node_load(), encode(report("p1")))
        await asyncio.sleep(0.1)
    reply = await client.request(subjects.sched_cluster(), encode(ClusterQuery()), timeout=5)
    state = decode(reply.data)
    assert isinstance(state, ClusterState)
    assert [n.node_id for n in state.nodes] == ["p1"]
    await until(lambda: any(e.kind == EventKind.NODE_DOWN and e.node_id == "d1" for e in events))
    kinds = [(e.kind, e.node_id or e.request_id) for e in events if e.kind != EventKind.NODE_DOWN]
    assert (EventKind.PLACEMENT, "r1") in kinds
    out = await _place(client, "r3")
    assert out.code.value == "overloaded"  # no decode node left

    await client.publish(subjects.node_bye(), encode(NodeBye(node_id="p1", reason="shutdown")))
    await until(lambda: len(service.registry) == 0)
    out = await _place(client, "r4")
    assert out.code.value == "no_nodes"


async def test_fixed_policy_sends_set_role(nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    client = await nats.connect(nats_server.url)
    service = SchedulerService(SchedulerConfig(policy="fixed:1:1", role_interval_s=0.05), nc)
    await service.start()
    got: list[SetRole] = []

    async def on_role(msg) -> None:
        got.append(decode(msg.data))
        await msg.respond(encode(Ack(request_id="")))

    await client.subscribe(subjects.node("n0", subjects.NodeVerb.ROLE), cb=on_role)
    await client.flush()
    await announce(client, service.registry, report("n0", Role.DECODE), report("n1", Role.DECODE))
    await until(lambda: len(got) == 1)
    assert (got[0].node_id, got[0].role) == ("n0", Role.PREFILL)
    await client.publish(subjects.node_load(), encode(report("n0", Role.PREFILL)))
    await until(lambda: service.policy.roles.num_flips == 1)
    assert [e.detail.split(":")[0] for e in service.events if e.kind == EventKind.ROLE_FLIP] == ["requested", "done"]
    await service.close()
    await client.drain()
    await nc.drain()

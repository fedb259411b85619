"""Scheduler replicas over a real nats-server with JetStream: one leader, elected by a KV lease.

Two ``SchedulerService``s share one broker: only the leader answers placements and
publishes events; when it stops, the other takes over with a higher epoch and the role
flips in flight; a deposed leader can neither write the leader state nor start a flip.
"""

from __future__ import annotations

import asyncio
import time

import nats
import nats.js.errors
import pytest

from libs.protocol import subjects
from libs.protocol.messages import (
    Ack, ClusterQuery, ClusterState, EventKind, PlaceRequest, Placement, Role, SchedEvent, SetRole, decode, encode,
)
from libs.scheduler.role_controller import RoleChange
from services.scheduler.config import SchedulerConfig
from services.scheduler.leadership import NotLeader
from services.scheduler.service import SchedulerService
from tests.scheduler.helpers import announce, report, until

LEASE_S = 0.6


def _config(sid: str, policy: str = "round_robin", **kw: float) -> SchedulerConfig:
    return SchedulerConfig(policy=policy, scheduler_id=sid, leader_lease_s=LEASE_S, role_interval_s=0.1, **kw)


async def _place(client, rid: str) -> object:
    req = PlaceRequest(request_id=rid, model="m", num_prompt_tokens=10, max_tokens=4)
    return decode((await client.request(subjects.sched_place(), encode(req), timeout=3)).data)


async def _place_as_the_gateway(client, rid: str) -> object:
    """``_place``, re-sent on "no responders" for up to a second, as the gateway re-sends a
    placement while a leader takes over: right after a replica subscribes again, the
    broker has answered the first request with "no responders" (seen on a loaded 2-core
    machine, once in about twenty runs; the next request, 20 ms later, was placed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while True:
        try:
            return await _place(client, rid)
        except nats.errors.NoRespondersError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)


async def _who_answers(client) -> ClusterState:
    state = decode((await client.request(subjects.sched_cluster(), encode(ClusterQuery(brief=True)), timeout=3)).data)
    assert isinstance(state, ClusterState)
    return state


async def _drive_by_hand(s: SchedulerService, *rounds: str) -> None:
    """Stop the scheduler's named background rounds ("leadership", "housekeeping"): the
    test drives them from here, once the tasks have ended."""
    stopped = [t for t in s.tasks._tasks if t.get_name().endswith(rounds)]
    for task in stopped:
        task.cancel()
    done, _ = await asyncio.wait(stopped, timeout=10)
    assert len(done) == len(stopped)


async def _node_downs(client) -> list[SchedEvent]:
    """The NODE_DOWN events published on sched_events from now on, as they come."""
    downs: list[SchedEvent] = []

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        ev = decode(msg.data)
        if isinstance(ev, SchedEvent) and ev.kind is EventKind.NODE_DOWN:
            downs.append(ev)

    await client.subscribe(subjects.sched_events(), cb=on_event)
    await client.flush()
    return downs


@pytest.fixture
async def replicas(nats_server):
    client = await nats.connect(nats_server.url)
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    services = [SchedulerService(_config(f"s{i}"), nc) for i, nc in enumerate(conns)]
    for s in services:
        await s.start()  # s0 first: it takes the free lease at once, s1 finds it held
    try:
        yield services, client
    finally:
        for s in services:
            await s.close()
        for nc in [*conns, client]:
            await nc.drain()


async def test_one_leader_answers_and_the_other_follows_the_load(replicas) -> None:
    (s0, s1), client = replicas
    assert (s0.is_leader, s1.is_leader) == (True, False)
    await announce(client, s0.registry, report("p1"), report("d1", Role.DECODE))
    await until(lambda: "p1" in s1.registry and "d1" in s1.registry)  # the follower's registry is warm
    state = await _who_answers(client)
    assert (state.leader, state.epoch) == ("s0", s0.leadership.epoch)
    for i in range(3):
        assert isinstance(await _place(client, f"r{i}"), Placement)
    assert (s0.num_placed, s1.num_placed) == (3, 0)


async def test_the_follower_takes_over_when_the_leader_stops(replicas) -> None:
    (s0, s1), client = replicas
    events: list[SchedEvent] = []

    async def on_event(msg) -> None:
        events.append(decode(msg.data))

    await client.subscribe(subjects.sched_events(), cb=on_event)
    await client.flush()
    await announce(client, s0.registry, report("p1"), report("d1", Role.DECODE))
    await until(lambda: "d1" in s1.registry)
    old_epoch = s0.leadership.epoch
    await s0.close()  # a clean stop gives the lease up
    await until(lambda: s1.is_leader)
    assert s1.leadership.epoch > old_epoch
    await until(lambda: any(e.kind is EventKind.LEADER for e in events))
    leader_events = [e for e in events if e.kind is EventKind.LEADER]
    assert [(e.epoch, e.detail) for e in leader_events] == [(s1.leadership.epoch, "s1 leads")]
    assert isinstance(await _place(client, "after"), Placement)
    assert (await _who_answers(client)).leader == "s1"


async def test_the_new_leader_adopts_every_flip_into_hybrid_in_flight(nats_server) -> None:
    client = await nats.connect(nats_server.url)
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    s0 = SchedulerService(_config("s0", "flowkv"), conns[0])
    s1 = SchedulerService(_config("s1", "flowkv"), conns[1])
    try:
        await s0.start()
        await s1.start()
        await announce(client, s0.registry, report("p1"), report("d1", Role.DECODE), report("d2", Role.DECODE))
        await until(lambda: "d2" in s1.registry)
        # Two flips into hybrid asked for in one round (the nodes never report them done).
        flips = [RoleChange(n, Role.DECODE, Role.HYBRID, "goodput", s0.clock.now()) for n in ("d1", "d2")]
        await s0._record_flips(flips)
        assert [(f.node_id, f.new_role) for f in s0.leadership.state.flips] == [("d1", Role.HYBRID), ("d2", Role.HYBRID)]
        await s0.close()
        await until(lambda: s1.is_leader)
        roles = s1.policy.roles
        assert roles is not None
        assert sorted((c.node_id, c.old_role, c.new_role) for c in roles.in_flight.values()) == [
            ("d1", Role.DECODE, Role.HYBRID), ("d2", Role.DECODE, Role.HYBRID)]
        await asyncio.sleep(0.3)  # rounds of the new leader: both stay in flight, written as they were
        assert sorted(roles.in_flight) == ["d1", "d2"]
        assert sorted(f.node_id for f in s1.leadership.state.flips) == ["d1", "d2"]
    finally:
        for s in (s0, s1):
            await s.close()
        for nc in [*conns, client]:
            await nc.drain()


async def test_a_crashed_leader_is_replaced_and_cannot_write_once_deposed(replicas) -> None:
    (s0, s1), client = replicas
    # s0 stops renewing (as if its process hung): its lease expires and s1 takes over.
    for task in list(s0.tasks._tasks):
        if task.get_name().endswith("leadership"):
            task.cancel()
    await until(lambda: s1.is_leader, timeout=10)
    assert s1.leadership.epoch > s0.leadership.epoch
    assert not s0.is_leader  # its lease is no longer certain: it places nothing
    s0.leadership._valid_until = float("inf")  # even if it believed it still led ...
    change = RoleChange("d1", Role.DECODE, Role.PREFILL, "test", 0.0)
    with pytest.raises(NotLeader):  # ... its compare-and-set on the leader state fails
        await s0._record_flips([change])
    assert not s0.leadership.is_leader  # and that deposes it


async def test_the_new_leader_adopts_the_flip_in_flight_and_fences_set_role(nats_server) -> None:
    client = await nats.connect(nats_server.url)
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    s0 = SchedulerService(_config("s0", "fixed:1:1"), conns[0])
    s1 = SchedulerService(_config("s1", "fixed:1:1"), conns[1])
    set_roles: list[SetRole] = []

    async def on_role(msg) -> None:  # the node never reports the new role: the flip stays in flight
        set_roles.append(decode(msg.data))
        await msg.respond(encode(Ack(request_id="")))

    await client.subscribe(subjects.node("n2", subjects.NodeVerb.ROLE), cb=on_role)
    await client.flush()
    try:
        await s0.start()
        await s1.start()
        await announce(client, s0.registry, report("n1"), report("n2"))  # two prefill nodes: one must flip
        await until(lambda: "n2" in s1.registry)
        await until(lambda: len(set_roles) == 1)
        assert [f.node_id for f in s0.leadership.state.flips] == ["n2"] and set_roles[0].epoch == s0.leadership.epoch
        await s0.close()
        await until(lambda: s1.is_leader)
        roles = s1.policy.roles
        assert roles is not None
        assert [(c.node_id, c.new_role) for c in roles.in_flight.values()] == [("n2", Role.DECODE)]
        await asyncio.sleep(0.5)  # several role-controller rounds of the new leader
        assert len(set_roles) == 1  # the flip was not started a second time
        assert [f.node_id for f in s1.leadership.state.flips] == ["n2"]
    finally:
        for s in (s0, s1):
            await s.close()
        for nc in [*conns, client]:
            await nc.drain()


async def _lease_gone(client) -> bool:
    """Whether the lease bucket holds no lease now (it expired or was deleted)."""
    kv = await client.jetstream().key_value(subjects.sched_lease_bucket())
    try:
        await kv.get("leader")
    except nats.js.errors.KeyNotFoundError:
        return True
    return False


async def test_a_lone_leader_whose_renew_comes_after_its_lease_expired_keeps_leading(nats_server) -> None:
    """A busy machine runs the scheduler's event loop late, so its renew reaches the broker
    after the lease expired. Nobody else took the lease: the scheduler takes it again and
    its term goes on (same epoch, never deposed), and a placement that arrived while the
    lease was not certain is answered once it is, not left without an answer or a responder."""
    client = await nats.connect(nats_server.url)
    nc = await nats.connect(nats_server.url)
    s = SchedulerService(_config("s0"), nc)
    await s.start()
    try:
        assert s.is_leader
        epoch = s.leadership.epoch
        deposed: list[str] = []
        on_deposed = s.leadership.on_deposed

        async def record(reason: str) -> None:
            deposed.append(reason)
            await on_deposed(reason)

        s.leadership.on_deposed = record
        await announce(client, s.registry, report("p1"), report("d1", Role.DECODE))
        # Fault injection: every renew waits on a gate (a late event loop, made deterministic).
        gate = asyncio.Event()
        renew = s.leadership._renew

        async def late_renew() -> bool:
            await gate.wait()
            return await renew()

        s.leadership._renew = late_renew  # type: ignore[method-assign]
        while not await _lease_gone(client):  # the broker expired the lease (a condition, not a timing)
            await asyncio.sleep(0.05)
        assert not s.is_leader and s.leadership.is_leader  # not certain: places nothing, still in its term
        place_sub = s._leader_subs[0]
        before = place_sub.delivered
        pending = asyncio.ensure_future(_place(client, "during"))
        await until(lambda: place_sub.delivered > before)  # the scheduler holds the placement ...
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()  # ... and only now does the late renew reach the broker
        assert isinstance(await pending, Placement)
        await until(lambda: s.is_leader)
        assert (deposed, s.leadership.epoch) == ([], epoch)
        assert not await _lease_gone(client)
        assert isinstance(await _place(client, "after"), Placement)
    finally:
        await s.close()
        await nc.drain()
        await client.drain()


async def test_a_replica_that_stepped_down_takes_its_own_lease_back_at_once(nats_server) -> None:
    """A leader that stepped down (renews it counted as failed) while its lease is still in
    the bucket (they had been applied) takes that lease back by compare-and-set at its next
    campaign, in a new term, instead of leaving placement to nobody until it expires."""
    client = await nats.connect(nats_server.url)
    nc = await nats.connect(nats_server.url)
    s = SchedulerService(_config("s0"), nc)
    await s.start()
    try:
        await announce(client, s.registry, report("p1"), report("d1", Role.DECODE))
        await _drive_by_hand(s, "leadership")
        epoch = s.leadership.epoch
        await s.leadership._renew()  # the lease is fresh in the bucket ...
        await s.leadership._step_down("test: renews counted as failed")  # ... and its holder stepped down
        assert not s.leadership.is_leader
        await s.leadership.campaign()
        assert s.is_leader and s.leadership.epoch > epoch
        assert isinstance(await _place_as_the_gateway(client, "after"), Placement)
    finally:
        await s.close()
        await nc.drain()
        await client.drain()


async def test_start_waits_for_a_jetstream_cluster_still_electing(monkeypatch) -> None:
    """Servers started a moment ago may take seconds to elect JetStream's leader; until then
    the buckets' API times out or answers "temporarily unavailable". The replica waits for
    it (it must not lead alone: another replica may lead through the lease); a broker with
    no JetStream at all makes it lead alone at once."""
    from services.scheduler.leadership import JS_TEMPORARILY_UNAVAILABLE, Leadership

    answers = [nats.errors.TimeoutError(), nats.js.errors.ServiceUnavailableError(
        code=503, err_code=JS_TEMPORARILY_UNAVAILABLE, description="JetStream system temporarily unavailable")]

    async def electing(self) -> None:
        if answers:
            raise answers.pop(0)

    async def nothing(_epoch_or_reason) -> None:
        return None

    monkeypatch.setattr(Leadership, "_open", electing)
    lead = Leadership(None, "s0", LEASE_S, 3, nothing, nothing)
    assert await lead.start(ready_timeout_s=30) and lead.enabled and not answers

    async def no_jetstream(self) -> None:
        raise nats.js.errors.ServiceUnavailableError()

    monkeypatch.setattr(Leadership, "_open", no_jetstream)
    alone = Leadership(None, "s1", LEASE_S, 1, nothing, nothing)
    assert not await alone.start() and not alone.enabled


async def test_a_node_that_died_while_the_scheduler_did_not_lead_is_announced_when_it_leads_again(nats_server) -> None:
    """A lone scheduler whose event loop ran late lost its lease for a moment, and a dead
    node's silence expired in that moment: only a leader publishes events, so no gateway
    heard of it and the dead node's requests waited for their token timeout (seen on a
    loaded 2-core machine). Re-elected, the scheduler publishes that NODE_DOWN, unless the
    node has come back since."""
    client = await nats.connect(nats_server.url)
    nc = await nats.connect(nats_server.url)
    # Subscribed before the scheduler publishes on sched_events at all: an event its
    # connection published within milliseconds of this SUB was missed now and then on a
    # loaded machine (as announce's reports were, see tests/scheduler/helpers.py).
    events = await _node_downs(client)
    s = SchedulerService(_config("s0", node_timeout_s=60.0), nc)  # a node dies when the test says
    await s.start()
    try:
        await announce(client, s.registry, report("p1"), report("d1", Role.DECODE), report("d2", Role.DECODE))
        await _drive_by_hand(s, "leadership", "housekeeping")
        await s.leadership._step_down("test: renews counted as failed")
        assert not s.is_leader
        # While it follows, d1 and d2 go silent past the node timeout (what tick() publishes) ...
        await s._publish(s.registry.remove("d1", "no load report for 3s"))
        await s._publish(s.registry.remove("d2", "no load report for 3s"))
        await announce(client, s.registry, report("d2", Role.DECODE))  # ... and d2 comes back
        await asyncio.sleep(0.2)
        assert events == []  # a follower publishes nothing
        await s.leadership.campaign()
        assert s.is_leader
        await until(lambda: len(events) >= 1)
        await asyncio.sleep(0.2)
        assert [(e.node_id, e.epoch) for e in events] == [("d1", s.leadership.epoch)]
    finally:
        await s.close()
        await nc.drain()
        await client.drain()


async def test_a_node_that_died_while_the_lease_was_uncertain_is_announced_when_it_is_certain(nats_server) -> None:
    """The same when the term goes on: a late renew taken by the broker makes the lease
    certain again without an election, and the next housekeeping round publishes."""
    client = await nats.connect(nats_server.url)
    nc = await nats.connect(nats_server.url)
    # Subscribed before the scheduler publishes on sched_events at all: an event its
    # connection published within milliseconds of this SUB was missed now and then on a
    # loaded machine (as announce's reports were, see tests/scheduler/helpers.py).
    events = await _node_downs(client)
    s = SchedulerService(_config("s0", node_timeout_s=60.0), nc)  # a node dies when the test says
    await s.start()
    try:
        await announce(client, s.registry, report("p1"), report("d1", Role.DECODE))
        await _drive_by_hand(s, "leadership", "housekeeping")
        epoch = s.leadership.epoch
        s.leadership._valid_until = 0.0  # the renew is late: the lease is not certain
        assert not s.is_leader and s.leadership.is_leader
        await s._publish(s.registry.remove("d1", "no load report for 3s"))
        s.leadership._valid_until = time.monotonic() + 10  # the late renew was taken: same term
        await s.tick()
        await until(lambda: len(events) >= 1)
        assert [(e.node_id, e.epoch) for e in events] == [("d1", epoch)]
    finally:
        await s.close()
        await nc.drain()
        await client.drain()

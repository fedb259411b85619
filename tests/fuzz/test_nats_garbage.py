"""Garbage on every subject a FlowKV service listens to, against a real cluster.

nats-server, the scheduler, the gateway, a prefill node ``p0`` and a decode node ``d0``
run as their own processes. On every subject of ``libs.protocol.subjects`` (each node's
verbs, the cancel broadcast, load reports, byes, placement, cluster queries, scheduler
events and the gateway's token stream) the test publishes random bytes, truncated
messages, valid messages of every wrong kind and well-formed messages with absurd values,
both fire-and-forget and as requests. Afterwards no process has died, the drop counter
``flowkv_messages_dropped_total`` moved on every process that serves /metrics, absurd
requests got refusals (never a reservation of the pool), and normal requests (streamed
and whole) are still served end to end through the P -> D hand-off.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import nats
import pytest
from nats.errors import MaxPayloadError, NoRespondersError, TimeoutError as NatsTimeout

from libs.protocol import messages as m
from libs.protocol import subjects
from services.common.natsserver import free_port
from tests.fuzz import garbage
from tests.fuzz.procs import Cluster, scrape

GATEWAY_ID = "gwfuzz"
NODES = ("p0", "d0")
DROPPED = "flowkv_messages_dropped_total"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("garbage-cluster"))
    ports = {"gateway": free_port(), "scheduler": free_port(), "p0": free_port(), "d0": free_port()}
    try:
        c.start_nats("127.0.0.1", free_port())
        c.start_scheduler("--metrics-port", str(ports["scheduler"]))
        c.start_node("p0", "prefill", "--metrics-port", str(ports["p0"]), "--lease-s", "5")
        c.start_node("d0", "decode", "--metrics-port", str(ports["d0"]), "--lease-s", "5")
        c.start_gateway(ports["gateway"], "--gateway-id", GATEWAY_ID, "--stall-timeout-s", "10")
        base = f"http://127.0.0.1:{ports['gateway']}"
        c.wait_ready(base, set(NODES))
        c.metrics = {"gateway": base + "/metrics", **{n: f"http://127.0.0.1:{ports[n]}/metrics" for n in ("scheduler", *NODES)}}
        c.base = base
        yield c
    finally:
        c.stop()


def every_subject() -> dict[str, str]:
    """subject -> the kind of message its listener takes (a key of ``garbage.absurd_messages``)."""
    out: dict[str, str] = {}
    for node_id in NODES:
        for verb in subjects.NodeVerb:
            out[subjects.node(node_id, verb)] = verb.value
    out.update({subjects.request_cancel(): "cancel", subjects.node_load(): "load", subjects.node_bye(): "bye",
                subjects.sched_place(): "place", subjects.sched_cluster(): "cluster",
                subjects.sched_events(): "events", subjects.stream(GATEWAY_ID): "tokens"})
    # The list above is every subject any service subscribes to; keep it in step with the protocol.
    assert set(subjects.all_subjects_of("p0")) <= set(out)
    return out


async def ask(nc, subject: str, data: bytes) -> m.Message | None:  # type: ignore[no-untyped-def]
    """A request expecting a reply: the decoded reply, or None when nobody answers (dropped)."""
    try:
        reply = await nc.request(subject, data, timeout=1.0)
    except (NatsTimeout, NoRespondersError):
        return None
    return m.decode(reply.data)


async def completion(session: aiohttp.ClientSession, base: str, stream: bool) -> tuple[int, str]:
    body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    async with session.post(base + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)) as resp:
        return resp.status, await resp.text()


async def spray(nc, rng: random.Random) -> dict[str, list[m.Message | None]]:  # type: ignore[no-untyped-def]
    """Publish and request every kind of garbage on every subject; returns the replies per kind."""
    replies: dict[str, list[m.Message | None]] = {}
    absurd = {n: garbage.absurd_messages(n, GATEWAY_ID) for n in NODES}
    wrong = [m.encode(w) for w in garbage.wrong_type_messages()]
    dropped_asks = []
    for subject, kind in every_subject().items():
        target = subject.split(".")[3] if subject.split(".")[3] in NODES else "d0"
        blobs = garbage.random_blobs(rng) + garbage.truncated(absurd[target]["submit"][0], rng)
        for data in blobs + wrong:
            await nc.publish(subject, data)
        for message in absurd[target].get(kind, []):
            await nc.publish(subject, m.encode(message))
        # As requests too: garbage is dropped (nobody answers), absurd values are refused.
        asks = [ask(nc, subject, m.encode(message)) for message in absurd[target].get(kind, [])]
        replies.setdefault(kind, []).extend(await asyncio.gather(*asks))
        dropped_asks += [(subject, data, ask(nc, subject, data)) for data in blobs[:4]]
    answers = await asyncio.gather(*(a for _, _, a in dropped_asks))
    assert [(s, d) for (s, d, _), r in zip(dropped_asks, answers) if r is not None] == []
    await nc.flush()
    return replies


async def test_garbage_on_every_subject_is_dropped_and_service_goes_on(cluster) -> None:
    rng = random.Random(1234)
    t0 = time.monotonic()
    before = {name: scrape(url, DROPPED) for name, url in cluster.metrics.items()}
    nc = await nats.connect(cluster.nats_url)
    try:
        # Oversized: the client refuses it before the server sees it (the server's max_payload is 8 MB).
        with pytest.raises(MaxPayloadError):
            await nc.publish(subjects.node("d0", subjects.NodeVerb.SUBMIT), b"\x00" * (nc.max_payload + 1))
        # Just under the limit: delivered, and dropped as garbage.
        await nc.publish(subjects.node("d0", subjects.NodeVerb.SUBMIT), b"\x93" * (nc.max_payload - 1024))
        replies = await spray(nc, rng)
    finally:
        await nc.drain()

    print(f"sprayed in {time.monotonic() - t0:.1f}s")
    # Absurd requests were answered with refusals, never accepted.
    # (A submit naming an unknown decode node looks valid to P: it is served, the hand-off falls back.)
    refusals = [r for kind in ("submit", "kv_alloc", "kv_done") for r in replies[kind]
                if r is not None and r.request_id != "g-ghost"]
    assert refusals and all(not r.ok for r in refusals), [r for r in refusals if r.ok]
    assert {r.code for r in replies["kv_alloc"] if r is not None} <= {m.ErrorCode.INVALID, m.ErrorCode.OVERLOADED}
    # The absurd place requests were rejected, never placed.
    assert all(isinstance(r, m.Rejected) for r in replies["place"]), replies["place"]

    await asyncio.sleep(3.5)  # the ghost nodes' reports expire (node_timeout_s is 3 s)
    assert cluster.dead() == [], cluster.tails()
    after = {name: scrape(url, DROPPED) for name, url in cluster.metrics.items()}
    assert all(after[name] > before[name] for name in after), (before, after)

    async with aiohttp.ClientSession() as session:
        async with session.get(cluster.base + "/ready") as resp:
            assert resp.status == 200 and set(json.loads(await resp.text())["nodes"]) == set(NODES)
        whole = await completion(session, cluster.base, stream=False)
        streamed = await completion(session, cluster.base, stream=True)
    assert whole[0] == 200, whole
    assert json.loads(whole[1])["usage"]["completion_tokens"] == 6
    assert streamed[0] == 200 and streamed[1].rstrip().endswith("data: [DONE]"), streamed
    d0_decoded = scrape(cluster.metrics["d0"], "flowkv_node_requests_total")
    assert d0_decoded >= 2  # the P -> D hand-off still works
    assert cluster.dead() == [], cluster.tails()

"""Per-request objectives end to end: ``flowkv_ttft_slo_s`` / ``flowkv_tpot_slo_s`` in an
OpenAI body reach the scheduler, whose flowkv policy counts the request against them.

A real nats-server, the scheduler service with the flowkv policy, a prefill and a decode
node (tiny model, CPU) and the gateway app, as in :mod:`tests.e2e.test_serving`.
"""

from __future__ import annotations

import math

import aiohttp

from libs.protocol import messages
from libs.protocol.subjects import NodeVerb, node
from libs.scheduler.demand import Placed
from libs.scheduler.goodput import Load, Objectives, Rates
from tests.e2e.test_serving import MODEL, PROMPTS, cluster, gateway


def _placed(c, request_id: str) -> Placed:  # type: ignore[no-untyped-def]
    roles = c.scheduler.policy.roles
    now = c.scheduler.registry.clock.now()
    return next(p for p in roles.demand.history(now, roles.config.goodput_window_s) if p.request_id == request_id)


async def test_objectives_in_the_body_reach_the_schedulers_goodput_window(nats_server):  # type: ignore[no-untyped-def]
    async with cluster(nats_server.url, policy="flowkv") as c, gateway(c) as base:
        assert c.scheduler is not None and c.scheduler.policy.roles.demand is not None
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession() as http:
            # With objectives (a chat request too: both endpoints take them), and without.
            async with http.post(base + "/v1/completions", headers={"X-Request-Id": "with-slo"},
                                 json={**body, "flowkv_ttft_slo_s": 1.5, "flowkv_tpot_slo_s": 0.25}) as r:
                assert r.status == 200, await r.text()
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                    "flowkv_tpot_slo_s": 0.125}
            async with http.post(base + "/v1/chat/completions", headers={"X-Request-Id": "chat-slo"}, json=chat) as r:
                assert r.status == 200, await r.text()
            async with http.post(base + "/v1/completions", headers={"X-Request-Id": "no-slo"}, json=body) as r:
                assert r.status == 200, await r.text()
            # Not a positive number: 400, and nothing reaches the scheduler.
            for bad in ({"flowkv_ttft_slo_s": 0}, {"flowkv_tpot_slo_s": -0.05}, {"flowkv_ttft_slo_s": "2"},
                        {"flowkv_tpot_slo_s": True}):
                async with http.post(base + "/v1/completions", headers={"X-Request-Id": "bad"},
                                     json={**body, **bad}) as r:
                    out = await r.json()
                    assert r.status == 400 and out["error"]["param"] == next(iter(bad)), out
        with_slo, chat_slo, no_slo = (_placed(c, rid) for rid in ("with-slo", "chat-slo", "no-slo"))
        assert (with_slo.ttft_slo_s, with_slo.tpot_slo_s) == (1.5, 0.25)
        assert (chat_slo.ttft_slo_s, chat_slo.tpot_slo_s) == (0.0, 0.125)
        assert (no_slo.ttft_slo_s, no_slo.tpot_slo_s) == (0.0, 0.0)
        roles = c.scheduler.policy.roles
        assert not any(p.request_id == "bad" for p in roles.demand.history(c.scheduler.registry.clock.now(), 30.0))
        # The goodput plan weighs each request against its own objectives, the rest against
        # the deployment's (none here).
        load = Load([with_slo, chat_slo, no_slo], 10.0, Rates(10_000.0, 0.02, 0.0, 64.0), Objectives())
        assert sorted(load.groups) == [(1.5, 0.25), (math.inf, 0.125), (math.inf, math.inf)]


async def test_the_objectives_a_request_is_held_to_reach_the_nodes_that_pace_it(nats_server):  # type: ignore[no-untyped-def]
    # The deployment's TPOT objective, no TTFT one: a request's own objectives come first.
    async with cluster(nats_server.url, policy="flowkv", tpot_slo_s=0.5) as c, gateway(c) as base:
        seen: dict[str, list] = {"submit": [], "kv_alloc": []}  # type: ignore[type-arg]

        async def keep(msg) -> None:  # type: ignore[no-untyped-def]
            seen[msg.subject.rsplit(".", 1)[1]].append(messages.decode(msg.data))

        # Plain subscribers beside the nodes' own: each sees every message.
        nc = c.scheduler.nc
        subs = [await nc.subscribe(node("p0", NodeVerb.SUBMIT), cb=keep),
                await nc.subscribe(node("d0", NodeVerb.KV_ALLOC), cb=keep)]
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/v1/completions", headers={"X-Request-Id": "own"},
                                 json={**body, "flowkv_ttft_slo_s": 1.5, "flowkv_tpot_slo_s": 0.25}) as r:
                assert r.status == 200, await r.text()
            async with http.post(base + "/v1/completions", headers={"X-Request-Id": "deployment"}, json=body) as r:
                assert r.status == 200, await r.text()
        await nc.flush()
        for sub in subs:
            await sub.unsubscribe()
        own, deployment = seen["submit"]
        assert (own.ttft_slo_s, own.tpot_slo_s) == (1.5, 0.25) and 0.0 <= own.waited_s < 1.5
        assert (deployment.ttft_slo_s, deployment.tpot_slo_s) == (0.0, 0.5)
        # The decode node is told the TPOT objective with the hand-off.
        assert [a.tpot_slo_s for a in seen["kv_alloc"]] == [0.25, 0.5]

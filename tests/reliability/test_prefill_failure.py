"""A prefill node SIGKILLed with requests queued on it: they are placed again and complete.

2 prefill + 1 decode nodes, round-robin placement so requests land on both prefill
nodes. ``prefill-0`` is frozen (SIGSTOP) first so the requests placed on it stay queued
in its connection, then SIGKILLed. The scheduler must publish NODE_DOWN for it (it stops
reporting: ``node_timeout_s``), the gateway re-places its requests on ``prefill-1``,
and every request ends with the same greedy tokens as on the healthy cluster.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from tests.reliability.cluster import Cluster, poll

PROMPTS = [[(29 * i + 13 * k) % 3000 + 40 for i in range(24)] for k in range(6)]
MAX_TOKENS = 12


def body(k: int) -> dict:  # type: ignore[type-arg]
    return {"prompt": PROMPTS[k], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}


@pytest.mark.timeout(400)
async def test_prefill_node_killed_its_requests_are_placed_again_and_complete(tmp_path):
    with Cluster(tmp_path, prefill=2, decode=1, scheduler_args=["--policy", "round_robin"]) as c:
        async with aiohttp.ClientSession() as s:
            reference = []
            for k in range(len(PROMPTS)):
                status, out, _ = await c.complete(s, body(k))
                assert status == 200, out
                reference.append(out["choices"][0]["logprobs"]["tokens"])
            assert all(len(r) == MAX_TOKENS for r in reference)

            nc, downs = await c.watch_node_downs()

            victim = c.services["prefill-0"]
            os.kill(victim.pid, signal.SIGSTOP)  # its queue fills with what is placed on it
            try:
                calls = [asyncio.create_task(c.complete(s, body(k))) for k in range(len(PROMPTS))]
                await asyncio.sleep(0.5)
            finally:
                c.kill_node("prefill-0")
            results = await asyncio.wait_for(asyncio.gather(*calls), 180)
            for k, (status, out, _) in enumerate(results):
                assert status == 200, (k, out)
                assert out["choices"][0]["logprobs"]["tokens"] == reference[k], k
                assert out["usage"]["completion_tokens"] == MAX_TOKENS

            await poll(lambda: _true(any(e.node_id == "prefill-0" for e in downs)), 30, "no NODE_DOWN for prefill-0")
            down = next(e for e in downs if e.node_id == "prefill-0")
            assert down.detail.startswith("no load report for") and down.old_role.value == "prefill"
            await nc.close()
            assert "re-placing without ['prefill-0']" in c.services["gateway"].log()
            assert "prefill-0" not in await c.reports()
            blocks = await c.wait_no_leak(["prefill-1", "decode-0"])
            assert all(f == t for f, t in blocks.values()), blocks


async def _true(value: bool) -> bool:
    return value


@pytest.mark.timeout(400)
async def test_the_only_prefill_node_killed_a_decode_node_turns_hybrid_and_serves(tmp_path):
    # One prefill node and two decode nodes under the default policy. With prefill-0 gone
    # no new request could be served: the scheduler turns a decode node hybrid at once, and
    # the requests sent meanwhile wait for it (none is refused) and end with the tokens of
    # the healthy cluster.
    with Cluster(tmp_path, prefill=1, decode=2) as c:
        async with aiohttp.ClientSession() as s:
            reference = []
            for k in range(3):
                status, out, _ = await c.complete(s, body(k))
                assert status == 200, out
                reference.append(out["choices"][0]["logprobs"]["tokens"])
            nc, downs = await c.watch_node_downs()
            c.kill_node("prefill-0")
            results = await asyncio.wait_for(asyncio.gather(*(c.complete(s, body(k)) for k in range(3))), 180)
            for k, (status, out, _) in enumerate(results):
                assert status == 200, (k, out)
                assert out["choices"][0]["logprobs"]["tokens"] == reference[k], k
            assert any(e.node_id == "prefill-0" for e in downs)
            await nc.close()
        events = (await c.cluster_state()).events
        flips = [e for e in events if e.kind.value == "role_flip" and "can prefill" in e.detail]
        assert flips and flips[0].node_id in ("decode-0", "decode-1") and flips[0].new_role.value == "hybrid", events
        roles = {n: r.role.value for n, r in (await c.reports()).items()}
        assert sorted(roles.values()) == ["decode", "hybrid"], roles

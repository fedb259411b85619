"""No single point of failure in the control plane: scheduler replicas and a NATS cluster.

Real processes throughout (``tests/reliability/cluster.py``): two scheduler replicas
elect a leader through the broker's JetStream KV lease; three routed nats-servers carry
everything. Under 32 concurrent streams (greedy, ``tiny`` model, more than the decode
node's blocks hold at once, so some requests wait in the leader's queue):

- the leader is SIGKILLed: every request completes with exactly the tokens of an
  undisturbed run; the other replica leads; the killed one, restarted, follows; the new
  leader is SIGKILLed in turn and the restarted one takes over, losing nothing again;
- one nats-server of three is SIGKILLed: every request completes; it is restarted and,
  once it is back in the cluster, another server is SIGKILLed: every request completes.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.reliability.cluster import Cluster, poll, tokens_of

PROMPTS = [[(31 * i + 7 * k) % 3000 + 50 for i in range(24 + 4 * k)] for k in range(4)]
MAX_TOKENS = 32
STREAMS = 32


def _body(k: int) -> dict:
    return {"prompt": PROMPTS[k], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}


async def _references(c: Cluster, s: aiohttp.ClientSession) -> list[list[str]]:
    refs = []
    for k in range(len(PROMPTS)):
        status, out, _ = await c.complete(s, _body(k))
        assert status == 200, out
        refs.append(out["choices"][0]["logprobs"]["tokens"])
        assert len(refs[-1]) == MAX_TOKENS
    return refs


async def _load_with_failure(c: Cluster, s: aiohttp.ClientSession, refs: list[list[str]], fail) -> None:  # type: ignore[no-untyped-def]
    """32 streams, started a few at a time; ``fail()`` runs once a third of them stream.
    Asserts that every one completes with its reference tokens."""
    started = [0]

    async def one(i: int) -> tuple[int, list[dict]]:
        await asyncio.sleep(0.05 * i)  # arrivals spread over the failure, not one burst before it

        async def on_event(ev: dict) -> None:
            if len(tokens_of([ev])) and ev is not None:
                started[0] += 1 if not seen[i] else 0
                seen[i] = True
        return await c.stream(s, _body(i % len(PROMPTS)), on_event, timeout=240)

    seen = [False] * STREAMS
    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    await poll(lambda: _true(started[0] >= STREAMS // 3), 120, lambda: f"streams did not start: {started[0]}")
    fail()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)
    for i, r in enumerate(results):
        assert not isinstance(r, BaseException), r
        status, events = r
        assert status == 200, events
        assert "error" not in events[-1], events[-1]
        assert tokens_of(events) == refs[i % len(PROMPTS)], i


async def _true(value: bool) -> bool:
    return value


@pytest.mark.timeout(900)
async def test_scheduler_leader_killed_twice_under_load_loses_no_request(tmp_path):
    with Cluster(tmp_path, prefill=1, decode=1, schedulers=2) as c:
        async with aiohttp.ClientSession() as s:
            refs = await _references(c, s)
            first = await c.leader()
            other = next(n for n in c.scheduler_names if n != first)

            await _load_with_failure(c, s, refs, lambda: c.kill_service(first))
            assert await c.leader() == other
            assert "leading the schedulers" in c.services[other].log()

            # The killed replica comes back as a follower: the lease is held.
            c.start_scheduler(first)
            await poll(lambda: _true("up (follower)" in c.services[first].log()), 120, f"{first} did not rejoin")
            assert await c.leader() == other

            # The second failure, on the other replica: the restarted one takes over.
            await _load_with_failure(c, s, refs, lambda: c.kill_service(other))
            assert await c.leader() == first
            await c.wait_no_leak()


@pytest.mark.timeout(900)
async def test_one_nats_server_of_three_killed_twice_under_load_loses_no_request(tmp_path):
    with Cluster(tmp_path, prefill=1, decode=1, schedulers=2, nats_cluster=3) as c:
        async with aiohttp.ClientSession() as s:
            refs = await _references(c, s)
            await _load_with_failure(c, s, refs, lambda: c.kill_nats(0))
            c.restart_nats(0)

            async def rejoined() -> bool:  # a leader answers, and every server's JetStream is current again
                return await c.leader() != "" and await asyncio.to_thread(c.nats_healthy)

            await poll(rejoined, 60, "nats-0 did not come back")
            await _load_with_failure(c, s, refs, lambda: c.kill_nats(1))
            await c.leader()  # a leader answers after both failures
            await c.wait_no_leak()

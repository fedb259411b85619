"""A decode pool too small for the burst: the requests wait in the scheduler's queue, none is lost.

1 prefill + 1 decode node with 40 KV blocks of 16 tokens each. A request of a 200-token
prompt and 60 output tokens needs 17 blocks on the decode node at its longest, so two fit
and a third does not. Before the scheduler had a wait queue, the third request of a burst
was answered 429 ("no ready decode node with room for the KV": 4 of 80 long-mix requests
of the 3P1D run on 4 H100s in docs/benchmarks/stack-4gpu.md). Now a burst of six is served whole:
the requests that found no room wait (``queued_s`` > 0 in their timing) and each output
equals the same greedy request served alone.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.reliability.cluster import Cluster

NUM = 6
PROMPTS = [[(31 * i + 7 * k + 3) % 3000 + 60 for i in range(200)] for k in range(NUM)]
MAX_TOKENS = 60


def body(prompt: list[int]) -> dict:  # type: ignore[type-arg]
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "flowkv_timing": True}


@pytest.mark.timeout(400)
async def test_burst_past_the_decode_pool_waits_and_is_served_whole(tmp_path):
    with Cluster(tmp_path, prefill=1, decode=1, node_args=["--num-blocks", "40"],
                 gateway_args=["--queue-timeout-s", "120"]) as c:
        async with aiohttp.ClientSession() as s:
            reference = []
            for prompt in PROMPTS:  # one at a time (it may wait a moment for the report that
                status, out, _ = await c.complete(s, body(prompt))  # shows the last one's blocks free)
                assert status == 200, out
                reference.append(out["choices"][0]["text"])

            burst = await asyncio.gather(*(c.complete(s, body(p), timeout=300) for p in PROMPTS))
            assert [status for status, _, _ in burst] == [200] * NUM, [out for _, out, _ in burst]
            assert [out["choices"][0]["text"] for _, out, _ in burst] == reference
            assert all(out["usage"]["completion_tokens"] == MAX_TOKENS for _, out, _ in burst)
            waited = [out["flowkv"]["queued_s"] for _, out, _ in burst]
            print(f"\nqueued_s of the burst: {[round(w, 3) for w in waited]}")
            assert sum(w > 0 for w in waited) >= NUM - 2  # only two fit the decode pool at once

            assert (await c.cluster_state()).num_waiting == 0
            await c.wait_no_leak()

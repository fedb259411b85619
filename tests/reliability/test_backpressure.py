"""Backpressure: the gateway's admission limits and the scheduler's TTFT admission answer
429 with ``Retry-After``; a burst far past the limits leaves the gateway's memory bounded.

Gateway limits here: 2 requests and 60 prompt tokens in flight, and 1 s in the scheduler's
wait queue. The scheduler is then restarted with ``--max-ttft-s 1e-6`` (every predicted
TTFT is above it): a request waits its second, then gets the 429.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.reliability.cluster import Cluster, poll

SHORT = [(7 * i + 5) % 3000 + 80 for i in range(5)]
LONG = [(7 * i + 5) % 3000 + 80 for i in range(40)]
BURST = 300
RSS_GROWTH_BOUND_KB = 64 * 1024


def body(prompt: list[int], max_tokens: int) -> dict:  # type: ignore[type-arg]
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.timeout(500)
async def test_admission_limits_answer_429_with_retry_after_and_memory_stays_bounded(tmp_path):
    gw_args = ["--max-concurrent-requests", "2", "--max-queued-tokens", "60", "--retry-after-s", "2",
               "--queue-timeout-s", "1"]
    with Cluster(tmp_path, prefill=1, decode=1, gateway_args=gw_args) as c:
        async with aiohttp.ClientSession() as s:
            # Requests in flight: 10 at once, only 2 are admitted.
            results = await asyncio.gather(*(c.complete(s, body(SHORT, 40)) for _ in range(10)))
            codes = sorted(status for status, _, _ in results)
            assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) == {200, 429}, codes
            for status, out, headers in results:
                if status == 429:
                    assert headers["Retry-After"] == "2" and out["error"]["code"] == "too_many_requests"

            # Prompt tokens in flight: one 40-token prompt running, a second one is over 60.
            first = asyncio.create_task(c.complete(s, body(LONG, 150)))
            await asyncio.sleep(0.3)
            status, out, headers = await c.complete(s, body(LONG, 4))
            assert first.done() or (status, headers.get("Retry-After")) == (429, "2"), (status, out)
            assert (await first)[0] == 200

            # A burst far past the limits: refused fast, the gateway's memory stays bounded.
            gw = c.services["gateway"].pid
            before = rss_kb(gw)
            burst = await asyncio.gather(*(c.complete(s, body(SHORT, 8), timeout=300) for _ in range(BURST)))
            after = rss_kb(gw)
            burst_codes = [st for st, _, _ in burst]
            print(f"\ngateway RSS before {before} KiB, after a burst of {BURST}: {after} KiB "
                  f"(+{after - before} KiB); {burst_codes.count(200)} served, {burst_codes.count(429)} refused")
            assert set(burst_codes) <= {200, 429} and burst_codes.count(429) > 0
            assert after - before < RSS_GROWTH_BOUND_KB
            await c.wait_no_leak()

            # Scheduler admission: every predicted TTFT is over the cap -> 429 overloaded.
            c.services["scheduler"].stop()
            c._spawn("scheduler", "services.scheduler", ["--node-timeout-s", "1.5", "--max-ttft-s", "0.000001"])
            await poll(lambda: _nodes_back(c), 120, "nodes did not register with the new scheduler")
            status, out, headers = await c.complete(s, body(SHORT, 4))
            assert status == 429, out
            assert out["error"]["code"] == "overloaded" and int(headers["Retry-After"]) >= 1
            assert "ttft" in out["error"]["message"].lower(), out
            assert "waited 1." in out["error"]["message"], out  # held for the gateway's queue_timeout_s


async def _nodes_back(c: Cluster) -> bool:
    return {"prefill-0", "decode-0"} <= set(await c.reports())

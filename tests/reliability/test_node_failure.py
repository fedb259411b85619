"""A decode node SIGKILLed mid-stream: the stream goes on elsewhere, exactly once per token.

1 prefill + 2 decode nodes. The reference is the same greedy request on the healthy
cluster. Mid-decode the decode node serving it is killed; the gateway re-places the
request (prompt + tokens delivered so far, ``output_offset``) and the client's token
sequence must equal the reference: nothing missing, nothing twice. With no node left the
stream must end with an error event, never hang.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.reliability.cluster import Cluster, poll, tokens_of

PROMPT = [(37 * i + 11) % 3000 + 50 for i in range(40)]
MAX_TOKENS = 300
# Each decode step also sleeps 10 ms: 300 tokens take at least 3 s, so the kill after the
# 20th token lands mid-decode however fast the machine (an unslowed tiny model decodes
# 300 tokens in a third of a second on some CPUs, before the client has read 20).
SLOW_DECODE = {"FLOWKV_FAULT_INJECT": "engine_slow_step:0.01"}
BODY = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}


async def decoding_node(c: Cluster, candidates: list[str]) -> str:
    """The decode node whose load report shows a running sequence."""
    found: list[str] = []

    async def one() -> bool:
        reports = await c.reports()
        found[:] = [n for n in candidates if n in reports and reports[n].num_running > 0]
        return len(found) == 1

    await poll(one, 30, "no decode node reports the running request")
    return found[0]


@pytest.mark.timeout(400)
async def test_decode_node_killed_mid_stream_continues_elsewhere_without_gap_or_duplicate(tmp_path):
    with Cluster(tmp_path, prefill=1, decode=2, node_env_of={"decode-0": SLOW_DECODE, "decode-1": SLOW_DECODE}) as c:
        async with aiohttp.ClientSession() as s:
            status, ref_events = await c.stream(s, BODY)
            assert status == 200
            reference = tokens_of(ref_events)
            assert len(reference) == MAX_TOKENS
            await c.wait_no_leak()

            killed: dict[str, int] = {}
            got: list[str] = []

            async def on_event(ev: dict) -> None:  # type: ignore[type-arg]
                got.extend(tokens_of([ev]))
                if not killed and len(got) >= 20:
                    victim = await decoding_node(c, ["decode-0", "decode-1"])
                    c.kill_node(victim)
                    killed[victim] = len(got)

            status, events = await c.stream(s, BODY, on_event)
            assert status == 200
            assert killed, "the request finished before a decode node was killed"
            (victim, at), = killed.items()
            assert at < MAX_TOKENS, f"{victim} was killed after the last token"
            assert "error" not in events[-1], events[-1]
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert tokens_of(events) == reference
            survivors = [n for n in c.node_ids if n != victim]
            blocks = await c.wait_no_leak(survivors)
            assert all(free == total for free, total in blocks.values()), blocks
            gw = c.services["gateway"].log()
            assert "re-placing without" in gw and victim in gw


@pytest.mark.timeout(400)
async def test_no_node_left_ends_the_stream_with_an_error_not_a_hang(tmp_path):
    with Cluster(tmp_path, prefill=1, decode=1) as c:
        async with aiohttp.ClientSession() as s:
            killed: list[str] = []

            async def on_event(ev: dict) -> None:  # type: ignore[type-arg]
                if not killed and tokens_of([ev]):
                    for n in ("decode-0", "prefill-0"):  # nothing left to re-place on
                        c.kill_node(n)
                        killed.append(n)

            status, events = await asyncio.wait_for(c.stream(s, BODY, on_event), 120)
            assert status == 200 and killed == ["decode-0", "prefill-0"]
            err = events[-1].get("error")
            assert err is not None, events[-1]
            # Which error depends on which dead node the scheduler forgets first (each
            # after its own report timeout): none left, the retries used up, or the
            # prefill node still listed with no decode node beside it ("overloaded").
            assert err["code"] in ("no_nodes", "node_failed", "overloaded"), err
            # A new request is refused with a clear status, not left hanging: 429 while the
            # scheduler still lists the dead prefill node, then, once it has forgotten both
            # (a report timeout), 502/503.
            for _ in range(30):
                status, body, _ = await c.complete(s, {"prompt": PROMPT, "max_tokens": 4}, timeout=60)
                if status != 429:
                    break
                assert body["error"]["code"] == "overloaded", body
                await asyncio.sleep(0.5)
            assert status in (502, 503), (status, body)
            assert body["error"]["code"] in ("no_nodes", "node_failed", "scheduler_unavailable"), body

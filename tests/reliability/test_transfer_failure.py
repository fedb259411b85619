"""KV transfers that fail: the decode node recomputes, and a reservation whose KVDone
never comes is released when its lease ends.

Faults are injected in the real prefill node process through the test-only
``FLOWKV_FAULT_INJECT`` (``services/common/faults.py``), with the ``tcp`` transport forced:
- ``kv_send_fail:1``: the first send fails; P sends ``KVDone(ok=False)`` and D recomputes
  the prompt, the client's tokens are exactly the healthy ones;
- ``kv_done_drop:1`` (second test): P never sends ``KVDone``; the client's stream stalls,
  the gateway re-places it on the other decode node, and the first decode node's lease
  (``--lease-s 3``) gives its blocks back.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.reliability.cluster import Cluster, poll

PROMPT = [(41 * i + 3) % 3000 + 60 for i in range(50)]
BODY = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 0}


async def run_twice(c: Cluster) -> tuple[list[str], list[str]]:
    """The request with the fault armed (first), then again once the fault is used up."""
    async with aiohttp.ClientSession() as s:
        status, faulty, _ = await c.complete(s, BODY)
        assert status == 200, faulty
        await c.wait_no_leak()
        status, healthy, _ = await c.complete(s, BODY)
        assert status == 200, healthy
    return faulty["choices"][0]["logprobs"]["tokens"], healthy["choices"][0]["logprobs"]["tokens"]


@pytest.mark.timeout(400)
async def test_failed_transfer_is_recomputed_on_the_decode_node(tmp_path):
    with Cluster(tmp_path, prefill=1, decode=1, node_args=["--kv-transport", "tcp"],
                 node_env={"FLOWKV_FAULT_INJECT": "kv_send_fail:1"}) as c:
        faulty, healthy = await run_twice(c)
        assert faulty == healthy and len(faulty) == 16
        assert "injected fault kv_send_fail" in c.services["prefill-0"].log()
        assert "recomputing" in c.services["decode-0"].log()
        blocks = await c.wait_no_leak()
        assert all(f == t for f, t in blocks.values()), blocks


@pytest.mark.timeout(400)
async def test_reservation_without_kv_done_comes_back_when_its_lease_ends(tmp_path):
    with Cluster(tmp_path, prefill=1, decode=2, node_args=["--kv-transport", "tcp", "--lease-s", "3"],
                 node_env={"FLOWKV_FAULT_INJECT": "kv_done_drop:1"},
                 scheduler_args=["--policy", "round_robin"]) as c:
        faulty, healthy = await run_twice(c)
        assert faulty == healthy and len(faulty) == 16
        assert "injected fault kv_done_drop" in c.services["prefill-0"].log()
        # The first attempt's decode node held the reservation until its lease ran out.
        await poll(lambda: _any_lease_log(c), 30, "no decode node logged a lease expiry")
        blocks = await c.wait_no_leak()
        assert all(f == t for f, t in blocks.values()), blocks


async def _any_lease_log(c: Cluster) -> bool:
    return any("no KVDone for" in c.services[n].log() for n in ("decode-0", "decode-1"))

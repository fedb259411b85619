"""vLLM nodes through the failures of docs/reliability.md: a lost KVDone, a role flip
during a hand-off, a prefill node SIGKILLed mid-hand-off.

1 prefill + 2 decode vLLM nodes (CPU, SmolLM2), ``least_loaded`` placement (no role
controller: the roles change only when a test flips one, as the controller would; among
idle nodes the lowest id is chosen). ``prefill-0`` runs with the test-only faults
``kv_send_stall:4`` (every hand-off waits 4 s after the decode node reserved its blocks,
before a byte is written) and ``kv_done_drop:1`` (its first hand-off writes the KV but
never sends ``KVDone``). Decode nodes hold a reservation for at most ``--lease-s 8``; the
gateway re-places a request that got no token for 10 s from a node that is not busy, and
the scheduler declares a node dead after 3 s without a load report.
Every output is compared with vLLM serving alone. In file order:

1. ``KVDone`` lost: the decode node's lease ends the reservation (vLLM aborts the request
   and frees its blocks), the gateway re-places the stalled request on the other decode
   node, the client gets exactly vLLM alone's output; every block comes back;
2. role flip: while ``prefill-0`` stalls with its KV not yet written into the decode
   node's blocks, that decode node is told to become a prefill node (the ``SetRole`` the
   scheduler's role controller sends). It drains: it takes the KV, decodes the request to
   its end, and only then reports the new role. The request is served once, where it was
   placed, exactly; the flipped node then prefills a new request for the other decode
   node; flipped back, every block is free;
3. ``prefill-0`` SIGKILLed after the decode node reserved, before it wrote: the scheduler
   declares it down, the gateway re-places the request (prompt + the first token the
   client has) without it. No node can prefill now: the request waits (in the scheduler's queue, or asked again
   by the gateway) until the other decode node is flipped to prefill and is served there; the
   output is exactly vLLM alone's; the dead attempt's reservation comes back when its
   lease ends.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from libs.engine.loader import smollm2_dir
from libs.protocol import messages
from libs.protocol.messages import Ack, NodeState, Role, SetRole
from libs.protocol.subjects import NodeVerb, node
from tests.reliability.cluster import Cluster, poll
from tests.vllm.common import TEXTS, alive, descendants, handoffs, run_vllm_alone, tokenize, vllm_cluster

MODEL = "smollm2"
NUM_BLOCKS = 24
MAX_MODEL_LEN = 512
MAX_TOKENS = 16
STALL_S = 4  # P waits this long between D's reservation and the write
LEASE_S = 8  # D's reservation without KVDone
STALL_TIMEOUT_S = 20  # the gateway's: a loaded 2-core machine pauses every process for seconds at times (at 10 s a
# hand-off stalled 4 s on purpose was re-placed once: the decode node's next token came 10 s after the first)
LOST_DONE, FLIPPED, AFTER_FLIP, KILLED, ALONE = 0, 1, 2, 3, 4  # the prompts, one per request
TEXT_OF = [TEXTS[1], TEXTS[5], TEXTS[10], TEXTS[13], TEXTS[16]]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return tokenize(smollm2_dir(), TEXT_OF)


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory, prompts: list[list[int]]) -> dict:  # type: ignore[type-arg]
    out = run_vllm_alone(tmp_path_factory.mktemp("alone"), smollm2_dir(), prompts, MAX_TOKENS, MAX_MODEL_LEN)
    # Each goes past its first token: P hands every one of them off.
    assert all(len(ids) == MAX_TOKENS for ids in out["token_ids"]), out
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, alone: dict):  # type: ignore[no-untyped-def,type-arg]
    with vllm_cluster(tmp_path_factory.mktemp("vllm-reliability"), MODEL, prefill=1, decode=2, num_blocks=NUM_BLOCKS,
                      max_model_len=MAX_MODEL_LEN, scheduler_args=["--policy", "least_loaded", "--node-timeout-s", "3"],
                      node_env_of={"prefill-0": {"FLOWKV_FAULT_INJECT": f"kv_send_stall:{STALL_S},kv_done_drop:1"}},
                      extra_node_args=["--lease-s", str(LEASE_S)],
                      extra_gateway_args=["--stall-timeout-s", str(STALL_TIMEOUT_S)]) as c:
        yield c


def body(prompt: list[int]) -> dict:  # type: ignore[type-arg]
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def placements(c: Cluster, completion_id: str) -> list[tuple[str, str]]:
    """Every (prefill, decode) placement of a completion, attempt by attempt (gateway log)."""
    return re.findall(rf"\[{re.escape(completion_id)}\][^\n]*placed on prefill=(\S+) decode=(\S+)",
                      c.services["gateway"].log())


async def reserving(c: Cluster) -> str:
    """The decode node that holds a reservation (its load report counts it as held)."""
    found: list[str] = []

    async def one() -> bool:
        reports = await c.reports()
        found[:] = [n for n in ("decode-0", "decode-1") if n in reports and reports[n].num_held > 0]
        return len(found) == 1

    await poll(one, 30, "no decode node reports a reservation")
    return found[0]


async def set_role(c: Cluster, node_id: str, role: Role) -> None:
    """What the scheduler's role controller sends a node to flip it."""
    nc = await c.nats_connect()
    try:
        reply = await nc.request(node(node_id, NodeVerb.ROLE),
                                 messages.encode(SetRole(node_id=node_id, role=role, reason="test")), timeout=5)
    finally:
        await nc.close()
    ack = messages.decode(reply.data)
    assert isinstance(ack, Ack) and ack.ok, ack


async def wait_role(c: Cluster, node_id: str, role: Role) -> None:
    async def there() -> bool:
        r = (await c.reports()).get(node_id)
        return r is not None and r.role is role and r.state is NodeState.READY

    await poll(there, 60, f"{node_id} never reported {role.value}, ready")


async def all_blocks_back(c: Cluster, nodes: list[str] | None = None) -> None:
    blocks = await c.wait_no_leak(nodes, timeout=LEASE_S + 60)
    assert all(free == total == NUM_BLOCKS for free, total in blocks.values()), blocks


async def test_lost_kv_done_the_lease_frees_the_reservation_and_the_request_is_placed_again(  # type: ignore[no-untyped-def]
        cluster: Cluster, alone: dict, prompts):  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as s:
        status, out, _ = await cluster.complete(s, body(prompts[LOST_DONE]), timeout=300)
    assert status == 200, out
    assert out["choices"][0]["text"] == alone["texts"][LOST_DONE]
    assert out["usage"]["completion_tokens"] == MAX_TOKENS
    rid = out["id"]
    # The first attempt's KV went to decode-0 (idle, lowest id) and was never announced; the
    # second attempt, decode-0 excluded, went to decode-1.
    first, again = placements(cluster, rid)
    assert first == ("prefill-0", "decode-0") and again[1] == "decode-1", (first, again)
    assert "injected fault kv_done_drop" in cluster.services["prefill-0"].log()
    assert f"no KVDone for {rid} within {LEASE_S:.1f}s: releasing its blocks" in cluster.services["decode-0"].log()
    gw = cluster.services["gateway"].log()
    assert re.search(rf"\[{rid}\][^\n]*attempt 1 failed \(no token for {STALL_TIMEOUT_S}s\); "
                     r"re-placing without \['decode-0'\] after 1 tokens", gw), gw[-3000:]
    await all_blocks_back(cluster)


async def test_decode_node_flipped_to_prefill_mid_hand_off_finishes_it_then_prefills(  # type: ignore[no-untyped-def]
        cluster: Cluster, alone: dict, prompts):  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as s:
        call = asyncio.create_task(cluster.complete(s, body(prompts[FLIPPED]), timeout=300))
        target = await reserving(cluster)  # prefill-0 stalls now, nothing written yet
        await set_role(cluster, target, Role.PREFILL)

        async def draining() -> bool:  # the reservation keeps the old role until it is done
            r = (await cluster.reports())[target]
            return r.state is NodeState.DRAINING and r.role is Role.DECODE and r.num_held > 0

        await poll(draining, 10, f"{target} did not drain its decode work")
        status, out, _ = await call
        assert status == 200, out
        assert out["choices"][0]["text"] == alone["texts"][FLIPPED]
        rid = out["id"]
        assert placements(cluster, rid) == [("prefill-0", target)]  # served once, where it was placed
        await wait_role(cluster, target, Role.PREFILL)
        log = cluster.services[target].log()
        assert "set role prefill (test)" in log and "role decode -> prefill" in log
        assert f"recomputing {rid}" not in log
        await poll(lambda: _true(any(a.get("flowkv.request_id") == rid and a["flowkv.decode_node"] == target
                                     for a in handoffs(cluster))), 30, f"no hand-off of {rid} to {target} traced")
        assert "moves from" not in cluster.services["prefill-0"].log()

        # The flipped node takes prefill work now; the one decode node left decodes.
        other = "decode-1" if target == "decode-0" else "decode-0"
        status, out, _ = await cluster.complete(s, body(prompts[AFTER_FLIP]), timeout=300)
        assert status == 200, out
        assert out["choices"][0]["text"] == alone["texts"][AFTER_FLIP]
        assert placements(cluster, out["id"]) == [(target, other)]  # idle, its id sorts first
    await set_role(cluster, target, Role.DECODE)
    await wait_role(cluster, target, Role.DECODE)
    await all_blocks_back(cluster)


async def test_a_decode_node_flipped_to_hybrid_serves_a_request_alone_then_decodes_again(  # type: ignore[no-untyped-def]
        cluster: Cluster, alone: dict, prompts):  # type: ignore[type-arg]
    await set_role(cluster, "decode-0", Role.HYBRID)
    await wait_role(cluster, "decode-0", Role.HYBRID)
    moved_before = len(handoffs(cluster))
    async with aiohttp.ClientSession() as s:
        status, out, _ = await cluster.complete(s, body(prompts[ALONE]), timeout=300)
    assert status == 200, out
    assert out["choices"][0]["text"] == alone["texts"][ALONE]
    assert out["usage"]["completion_tokens"] == MAX_TOKENS
    # least_loaded: the hybrid node has the fewest queued prefill tokens and decoding
    # sequences, and the lowest id: it prefills and decodes the request itself.
    assert placements(cluster, out["id"]) == [("decode-0", "decode-0")]
    assert len(handoffs(cluster)) == moved_before  # no KV moved
    await set_role(cluster, "decode-0", Role.DECODE)
    await wait_role(cluster, "decode-0", Role.DECODE)
    await all_blocks_back(cluster)


async def test_prefill_node_sigkilled_mid_hand_off_the_request_completes_exactly(  # type: ignore[no-untyped-def]
        cluster: Cluster, alone: dict, prompts):  # type: ignore[type-arg]
    nc, downs = await cluster.watch_node_downs()
    engine_procs: list[int] = []
    try:
        async with aiohttp.ClientSession() as s:
            call = asyncio.create_task(cluster.complete(s, body(prompts[KILLED]), timeout=300))
            target = await reserving(cluster)  # D reserved, prefill-0 stalls before writing
            engine_procs.extend(descendants(cluster.services["prefill-0"].proc.pid))
            cluster.kill_node("prefill-0")
            await poll(lambda: _true(any(e.node_id == "prefill-0" for e in downs)), 30, "no NODE_DOWN for prefill-0")
            other = "decode-1" if target == "decode-0" else "decode-0"
            await set_role(cluster, other, Role.PREFILL)  # the cluster's prefill side again
            status, out, _ = await call
    finally:
        await nc.close()
    assert status == 200, out
    assert out["choices"][0]["text"] == alone["texts"][KILLED]
    assert out["usage"]["completion_tokens"] == MAX_TOKENS
    rid = out["id"]
    first, again = placements(cluster, rid)
    assert (first, again) == (("prefill-0", target), (other, target))
    gw = cluster.services["gateway"].log()
    # The failure is the dead prefill node's, though the client had its first token.
    assert re.search(rf"\[{rid}\][^\n]*attempt 1 failed \(node prefill-0 is down [^\n]*\); "
                     r"re-placing without \['prefill-0'\] after 1 tokens", gw), gw[-3000:]
    # Placed once the other decode node prefills: from the scheduler's queue, or asked
    # again by the gateway while no node could take it (exclusion_wait_s).
    assert re.search(rf"\[{rid}\][^\n]*placed on prefill={other} decode={target}", gw), gw[-3000:]
    await poll(lambda: _true(f"no KVDone for {rid} within {LEASE_S:.1f}s" in cluster.services[target].log()),
               LEASE_S + 30, f"{target} kept the dead attempt's reservation")
    await all_blocks_back(cluster, [n for n in cluster.node_ids if n != "prefill-0"])
    # The killed node's vLLM engine core and workers stop with it.
    assert engine_procs
    await poll(lambda: _true(not alive(engine_procs)), 60, f"prefill-0's vLLM processes outlived it: {engine_procs}")


async def _true(value: bool) -> bool:
    return value

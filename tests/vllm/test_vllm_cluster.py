"""vLLM nodes under FlowKV's scheduler and gateway: 1 prefill + 2 decode vLLM nodes (CPU), SmolLM2.

One cluster for the module (a vLLM node takes tens of seconds to start on a small CPU);
the tests run in file order and the node kill comes last:

1. greedy outputs of 20 varied prompts through the cluster (prefill on one vLLM node,
   hand-off into another's blocks through FlowKV's connector, decode there) equal vLLM
   serving alone, whose token ids equal transformers'; streamed through the ``openai``
   client too;
2. every hand-off took ``num_layers`` copy calls per aligned segment of vLLM's block ids,
   one segment (one call per layer) for a hand-off between fresh pools;
3. a client that leaves mid-stream: the request is cancelled on the decode node (vLLM
   aborts it) and every block comes back;
4. a burst larger than the decode pools: requests wait or are refused (429), none fails,
   the outputs equal serving alone, every block comes back;
5. the decode node serving a stream is SIGKILLed: the stream goes on on the other one
   with the same tokens, nothing missing or twice (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from libs.engine.loader import smollm2_dir
from tests.reliability.cluster import Cluster, poll, tokens_of
from tests.vllm.common import (
    TEXTS,
    alive,
    check_calls_per_hand_off,
    descendants,
    handoffs,
    longest_first,
    openai_stream,
    placed_decode_node,
    run_vllm_alone,
    tokenize,
    vllm_cluster,
    wait_handed_off,
)

MODEL = "smollm2"
NUM_LAYERS = 30  # SmolLM2-135M
NUM_BLOCKS = 24  # per node: 768 tokens, three of the burst's requests
MAX_MODEL_LEN = 512
MAX_TOKENS = 16
# Prompts of about 200 tokens: with 16 output tokens each holds 7 blocks, three fit a decode pool of 24.
BURST_TEXTS = [f"Story {k}: the river ran past the old mill where {k + 2} children played every day. " * 10
               for k in range(10)]


@pytest.fixture(scope="module")
def model_dir() -> str:
    return smollm2_dir()


@pytest.fixture(scope="module")
def prompts(model_dir: str) -> list[list[int]]:
    return tokenize(model_dir, TEXTS)


@pytest.fixture(scope="module")
def burst(model_dir: str) -> list[list[int]]:
    return tokenize(model_dir, BURST_TEXTS)


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory, model_dir: str, prompts: list[list[int]],
          burst: list[list[int]]) -> dict:  # type: ignore[type-arg]
    """vLLM serving alone, before the cluster starts (the cores are not shared)."""
    return run_vllm_alone(tmp_path_factory.mktemp("alone"), model_dir, prompts + burst, MAX_TOKENS, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, alone: dict):  # type: ignore[no-untyped-def,type-arg]
    # Roles pinned: these tests count hand-offs from the prefill node and room in the two
    # decode pools, which the goodput planner would reshape (it made prefill-0 hybrid a
    # minute in, and the SIGKILL test then killed the only node able to prefill).
    with vllm_cluster(tmp_path_factory.mktemp("vllm-cluster"), MODEL, prefill=1, decode=2, num_blocks=NUM_BLOCKS,
                      max_model_len=MAX_MODEL_LEN, scheduler_args=["--policy", "fixed:1:2"]) as c:
        yield c


def body(prompt: list[int], **extra: object) -> dict:  # type: ignore[type-arg]
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


async def test_greedy_outputs_equal_vllm_alone_and_transformers(cluster: Cluster, alone: dict, prompts, model_dir):  # type: ignore[no-untyped-def,type-arg]
    from tests.vllm.references import transformers_greedy

    n = len(prompts)
    assert transformers_greedy(model_dir, prompts, MAX_TOKENS) == alone["token_ids"][:n]
    async with aiohttp.ClientSession() as s:
        texts, ids = [""] * n, []
        for i in longest_first(prompts):
            status, out, _ = await cluster.complete(s, body(prompts[i]))
            assert status == 200, out
            texts[i] = out["choices"][0]["text"]
            ids.append(out["id"])
        assert texts == alone["texts"][:n]
        # Streamed, with logprobs: the same tokens, one event at a time.
        status, events = await cluster.stream(s, body(prompts[0], logprobs=0))
        assert status == 200
        assert "".join(tokens_of(events)) == alone["texts"][0]
    await wait_handed_off(cluster, ids)  # each went through a hand-off, none was computed in one place


async def test_openai_client_streams_the_same_text(cluster: Cluster, alone: dict, prompts):  # type: ignore[no-untyped-def,type-arg]
    for i in (2, 8, 18):
        text, finish = await openai_stream(cluster, MODEL, prompts[i], MAX_TOKENS)
        assert text == alone["texts"][i]
        assert finish in ("length", "stop")


async def test_every_hand_off_takes_one_call_per_layer_per_segment(cluster: Cluster):
    spans = handoffs(cluster)
    check_calls_per_hand_off(spans, NUM_LAYERS)
    print(f"\ncalls per hand-off: {[a['flowkv.kv.calls'] for a in spans]}")


async def test_client_leaving_mid_stream_cancels_and_gives_the_blocks_back(cluster: Cluster, prompts):  # type: ignore[no-untyped-def]
    req = {"model": MODEL, "prompt": prompts[18], "max_tokens": 200, "temperature": 0, "ignore_eos": True,
           "logprobs": 0, "stream": True}
    got: list[str] = []
    completion_id = ""
    async with aiohttp.ClientSession() as s:
        async with s.post(cluster.url + "/v1/completions", json=req) as resp:
            assert resp.status == 200
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data:") and line != "data: [DONE]":
                    chunk = json.loads(line[5:])
                    completion_id = chunk["id"]
                    got.extend(tokens_of([chunk]))
                if len(got) >= 5:
                    break  # leave: the connection closes with the stream open
    await poll(lambda: _cancelled_on_its_decode_node(cluster, completion_id), 30,
               "the request's decode node did not cancel it")
    blocks = await cluster.wait_no_leak()
    assert all(free == total == NUM_BLOCKS for free, total in blocks.values()), blocks


async def _cancelled_on_its_decode_node(c: Cluster, completion_id: str) -> bool:
    """The node the gateway placed the request on to decode cancelled it (the fixed policy
    pins roles by the order nodes come up, not by their names)."""
    return f"cancelled {completion_id}" in c.services[placed_decode_node(c, completion_id)].log()


async def test_burst_past_the_decode_pools_waits_or_is_refused_and_gives_every_block_back(cluster: Cluster, alone: dict, prompts, burst):  # type: ignore[no-untyped-def,type-arg]
    assert all(190 <= len(p) <= 224 for p in burst), [len(p) for p in burst]
    expected = alone["texts"][len(prompts):]
    async with aiohttp.ClientSession() as s:
        outs = await asyncio.gather(*(cluster.complete(s, body(p, flowkv_timing=True), timeout=300) for p in burst))
    statuses = [status for status, _, _ in outs]
    print(f"\nburst statuses: {statuses}; queued_s: "
          f"{[round(out['flowkv']['queued_s'], 2) for status, out, _ in outs if status == 200]}")
    assert set(statuses) <= {200, 429}, [out for _, out, _ in outs]
    assert statuses.count(200) >= 4, statuses
    # Ten requests of 7 blocks, room for six in the decode pools: the full pools were met,
    # as waiting for room (the scheduler's queue) or as a 429.
    waited = [out["flowkv"]["queued_s"] for status, out, _ in outs if status == 200 and out["flowkv"]["queued_s"] > 0.5]
    assert waited or 429 in statuses, outs
    for (status, out, _), want in zip(outs, expected):
        if status == 200:
            assert out["choices"][0]["text"] == want
    assert all(cluster.services[n].alive() for n in cluster.node_ids)
    blocks = await cluster.wait_no_leak()
    assert all(free == total == NUM_BLOCKS for free, total in blocks.values()), blocks


async def test_decode_node_sigkilled_mid_stream_continues_on_the_other(cluster: Cluster, prompts):  # type: ignore[no-untyped-def]
    req = {"model": MODEL, "prompt": prompts[1], "max_tokens": 64, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    async with aiohttp.ClientSession() as s:
        status, ref_events = await cluster.stream(s, req)
        assert status == 200
        reference = tokens_of(ref_events)
        assert len(reference) == 64
        await cluster.wait_no_leak()

        killed: list[str] = []
        got: list[str] = []
        engine_procs: list[int] = []

        async def on_event(ev: dict) -> None:  # type: ignore[type-arg]
            got.extend(tokens_of([ev]))
            if not killed and len(got) >= 8:
                victim = placed_decode_node(cluster, ev["id"])

                async def counted() -> bool:  # the victim's load report counts the stream
                    return (await cluster.reports())[victim].num_running > 0

                await poll(counted, 30, f"{victim}'s load report never counted the running stream")
                engine_procs.extend(descendants(cluster.services[victim].proc.pid))
                cluster.kill_node(victim)
                killed.append(victim)

        status, events = await cluster.stream(s, req, on_event, timeout=300)
    assert status == 200 and killed
    assert "error" not in events[-1], events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert tokens_of(events) == reference
    survivors = [n for n in cluster.node_ids if n != killed[0]]
    blocks = await cluster.wait_no_leak(survivors)
    assert all(free == total for free, total in blocks.values()), blocks
    gw = cluster.services["gateway"].log()
    assert "re-placing without" in gw and killed[0] in gw
    # The killed node's vLLM engine core and workers stop with it.
    assert engine_procs

    async def stopped() -> bool:
        return not alive(engine_procs)

    await poll(stopped, 60, f"{killed[0]}'s vLLM processes outlived it: {engine_procs}")

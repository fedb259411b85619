"""A second architecture through vLLM nodes: a tiny random-weight Qwen3, 1 prefill + 1 decode.

The test writes the model as a Hugging Face directory (tests/vllm/models.py); vLLM serves
it on both nodes and FlowKV's connector hands its KV (per-head query/key norms, a head dim
of its own) from one to the other. In file order:

1. the first hand-off's send fails (test-only fault ``kv_send_fail:1`` in the prefill
   node): the decode node drops its vLLM reservation, recomputes, and the output is the
   one vLLM alone gives; every block comes back;
2. greedy outputs of 20 prompts equal vLLM serving alone and transformers';
3. the ``openai`` client streams the same text;
4. every hand-off took one copy call per layer per aligned segment;
5. the same gateway also serves the ``tiny`` preset, on one hybrid node of FlowKV's own
   engine started beside the vLLM nodes: requests for both models, sent together, are
   each served by their own model's nodes with that model's output (vLLM alone's for
   Qwen3; FlowKV's engine alone's, equal to transformers', for ``tiny``).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from libs.engine.loader import smollm2_dir
from tests.reliability.cluster import Cluster
from tests.vllm.common import (
    TEXTS,
    check_calls_per_hand_off,
    handoffs,
    longest_first,
    openai_stream,
    placement,
    run_vllm_alone,
    tokenize,
    vllm_cluster,
    wait_handed_off,
)
from tests.vllm.models import NUM_LAYERS, write_tiny_qwen3

NUM_BLOCKS = 24
MAX_MODEL_LEN = 512
MAX_TOKENS = 16
FLOWKV_MODEL = "tiny"  # served beside Qwen3 by a node of FlowKV's own engine
FLOWKV_NODE = "flowkv-0"
MIXED = (0, 5, 17)  # the prompts sent to both models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_qwen3(str(tmp_path_factory.mktemp("qwen3-tiny")), smollm2_dir())


@pytest.fixture(scope="module")
def prompts(model_dir: str) -> list[list[int]]:
    return tokenize(model_dir, TEXTS)


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory, model_dir: str, prompts: list[list[int]]) -> dict:  # type: ignore[type-arg]
    return run_vllm_alone(tmp_path_factory.mktemp("qwen-alone"), model_dir, prompts, MAX_TOKENS, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def flowkv_alone(prompts: list[list[int]]) -> dict:  # type: ignore[type-arg]
    from tests.vllm.references import flowkv_greedy

    return flowkv_greedy(FLOWKV_MODEL, [prompts[i] for i in MIXED], MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: str, alone: dict, flowkv_alone: dict):  # type: ignore[no-untyped-def,type-arg]
    with vllm_cluster(tmp_path_factory.mktemp("qwen-cluster"), model_dir, prefill=1, decode=1, num_blocks=NUM_BLOCKS,
                      max_model_len=MAX_MODEL_LEN, node_env={"FLOWKV_FAULT_INJECT": "kv_send_fail:1"},
                      flowkv_model=FLOWKV_MODEL, flowkv_nodes={FLOWKV_NODE: "hybrid"}) as c:
        yield c


async def test_qwen3_failed_transfer_is_recomputed_on_the_decode_node(cluster: Cluster, alone: dict, prompts,  # type: ignore[no-untyped-def,type-arg]
                                                                     model_dir):
    async with aiohttp.ClientSession() as s:
        status, out, _ = await cluster.complete(
            s, {"model": model_dir, "prompt": prompts[3], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200, out
    assert out["choices"][0]["text"] == alone["texts"][3]
    assert "injected fault kv_send_fail" in cluster.services["prefill-0"].log()
    assert "recomputing" in cluster.services["decode-0"].log()
    assert handoffs(cluster) == []  # nothing was moved: the recompute did it all
    blocks = await cluster.wait_no_leak(["prefill-0", "decode-0"])
    assert all(free == total == NUM_BLOCKS for free, total in blocks.values()), blocks


async def test_qwen3_greedy_outputs_equal_vllm_alone_and_transformers(cluster: Cluster, alone: dict, prompts,  # type: ignore[no-untyped-def,type-arg]
                                                                      model_dir):
    from transformers import AutoConfig

    from tests.vllm.references import transformers_greedy

    assert AutoConfig.from_pretrained(model_dir).model_type == "qwen3"
    assert transformers_greedy(model_dir, prompts, MAX_TOKENS) == alone["token_ids"]
    async with aiohttp.ClientSession() as s:
        outs, ids = [""] * len(prompts), []
        for i in longest_first(prompts):
            status, out, _ = await cluster.complete(
                s, {"model": model_dir, "prompt": prompts[i], "max_tokens": MAX_TOKENS, "temperature": 0})
            assert status == 200, out
            outs[i] = out["choices"][0]["text"]
            ids.append(out["id"])
    assert outs == alone["texts"]
    await wait_handed_off(cluster, ids)  # each went through a hand-off, none was computed in one place


async def test_qwen3_openai_client_streams_the_same_text(cluster: Cluster, alone: dict, prompts):  # type: ignore[no-untyped-def,type-arg]
    model = cluster.node_args[cluster.node_args.index("--model") + 1]
    for i in (0, 17, 19):
        text, _ = await openai_stream(cluster, model, prompts[i], MAX_TOKENS)
        assert text == alone["texts"][i]


async def test_qwen3_hand_offs_take_one_call_per_layer_per_segment(cluster: Cluster):
    check_calls_per_hand_off(handoffs(cluster), NUM_LAYERS)


async def test_one_gateway_serves_qwen3_on_vllm_and_tiny_on_flowkv(cluster: Cluster, alone: dict, prompts,  # type: ignore[no-untyped-def,type-arg]
                                                                 model_dir, flowkv_alone: dict):
    assert flowkv_alone["token_ids"] == flowkv_alone["transformers_token_ids"]
    async with aiohttp.ClientSession() as s:
        async with s.get(cluster.url + "/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == [model_dir, FLOWKV_MODEL]

        async def complete(model: str, i: int) -> dict:  # type: ignore[type-arg]
            extra = {"ignore_eos": True} if model == FLOWKV_MODEL else {}
            status, out, _ = await cluster.complete(
                s, {"model": model, "prompt": prompts[i], "max_tokens": MAX_TOKENS, "temperature": 0, **extra})
            assert status == 200, out
            return out

        # Both models at once: each request goes to its own model's nodes.
        outs = await asyncio.gather(*[complete(m, i) for i in MIXED for m in (model_dir, FLOWKV_MODEL)])
        status, err, _ = await cluster.complete(s, {"model": "qwen3", "prompt": prompts[0], "max_tokens": 2})
    assert status == 404 and err["error"]["code"] == "model_not_found", err
    for k, i in enumerate(MIXED):
        qwen, tiny = outs[2 * k], outs[2 * k + 1]
        assert (qwen["model"], tiny["model"]) == (model_dir, FLOWKV_MODEL)
        assert qwen["choices"][0]["text"] == alone["texts"][i]
        assert placement(cluster, qwen["id"]) == ("prefill-0", "decode-0")
        assert tiny["choices"][0]["text"] == flowkv_alone["texts"][k]
        assert tiny["usage"]["completion_tokens"] == MAX_TOKENS
        assert placement(cluster, tiny["id"]) == (FLOWKV_NODE, FLOWKV_NODE)
    blocks = await cluster.wait_no_leak()
    assert all(free == total for free, total in blocks.values()), blocks

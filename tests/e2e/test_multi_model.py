"""One gateway, two models side by side: each request is served by the nodes of the model it names.

Everything is real: a nats-server, the scheduler service, the nodes with their own engines
and the gateway on a free port. The two models differ in everything the gateway keeps per
model: weights, context length and chat template.

- ``tiny``: the preset (random weights, SmolLM2's tokenizer, 2048 tokens), served 1P1D;
- a second tiny Llama written here as a Hugging Face directory: other random weights,
  SmolLM2's tokenizer with a chat template of its own, 512 tokens, served by one hybrid
  node, under the served name ``other``.

The reference of each model is one engine of that model doing the whole request by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import nats
import pytest
import torch
from aiohttp import web

from libs.engine.async_engine import AsyncEngine
from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.models.names import smollm2_tokenizer_dir
from libs.protocol.messages import SamplingParams
from services.common.nats import NatsConfig
from services.common.natsserver import free_port
from services.gateway.app import create_app, make_runner
from services.gateway.config import GatewayConfig
from services.node.node import Node
from services.node_common.config import NodeConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from tests.e2e.test_serving import BLOCKS, BS, wait_until

TINY = "tiny"
OTHER_NAME = "other"  # the served name of the second model
OTHER_LEN = 512
# A chat template unlike SmolLM2's: the same conversation is other tokens under each model.
OTHER_TEMPLATE = ("{% for m in messages %}### {{ m['role'] | upper }}\n{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}### ASSISTANT\n{% endif %}")
PROMPTS = [[(7 * i + 3 * k) % 4000 + 10 for i in range(n)] for k, n in enumerate((5, 17, 40))]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def write_other_model(target: str) -> str:
    """A random-weight Llama (2 layers, 512 positions) with SmolLM2's tokenizer and OTHER_TEMPLATE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=OTHER_LEN,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.1)
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).to(torch.float32).eval().save_pretrained(target)
    src = smollm2_tokenizer_dir()
    shutil.copy(os.path.join(src, "tokenizer.json"), target)
    with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
        tok_cfg = json.load(f)
    tok_cfg["chat_template"] = OTHER_TEMPLATE
    with open(os.path.join(target, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f)
    with open(os.path.join(target, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(OTHER_TEMPLATE)
    return target


@dataclass
class Served:
    base: str
    models: dict[str, str]  # served name -> the nodes' --model
    nodes: dict[str, list[str]]  # served name -> its node ids
    engines: dict[str, LLMEngine]  # node id -> engine
    references: dict[str, LLMEngine]  # served name -> one engine of that model alone

    def expected(self, name: str, prompt: list[int], max_tokens: int) -> list[int]:
        ref = self.references[name]
        ref.add_request(f"ref-{len(prompt)}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                    ignore_eos=True))
        out: list[int] = []
        while ref.has_work():
            for o in ref.step():
                out += o.token_ids
        return out

    def text(self, name: str, ids: list[int]) -> str:
        return self.references[name].tokenizer.decode(ids, skip_special_tokens=True)

    def chat_ids(self, name: str) -> list[int]:
        ids = self.references[name].tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_other_model(str(tmp_path_factory.mktemp("other-model")))


@pytest.fixture
async def served(nats_server, other_dir: str) -> AsyncIterator[Served]:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    models = {TINY: TINY, OTHER_NAME: other_dir}
    shapes = {TINY: (("p0", "prefill"), ("d0", "decode")), OTHER_NAME: (("h0", "hybrid"),)}
    async with contextlib.AsyncExitStack() as stack:
        sched_nc = await nats.connect(nats_server.url)
        stack.push_async_callback(sched_nc.drain)
        # The role controller must not flip the nodes' roles during the test.
        sched = SchedulerService(SchedulerConfig(policy="least_loaded", min_dwell_s=3600.0), sched_nc)
        await sched.start()
        stack.push_async_callback(sched.close)
        engines: dict[str, LLMEngine] = {}
        for name, model in models.items():
            for nid, role in shapes[name]:
                llm = LLMEngine(EngineConfig(model=model, num_blocks=BLOCKS, block_size=BS, shared_pool=True))
                engine = AsyncEngine(engine=llm)
                await engine.start()
                stack.push_async_callback(engine.stop)
                stack.callback(llm.pool.close)
                nc = await nats.connect(nats_server.url)
                stack.push_async_callback(nc.drain)
                node = Node(NodeConfig(node_id=nid, role=role, model=model, block_size=BS, num_blocks=BLOCKS,
                                       report_interval_s=0.1), engine=engine)
                await node.start(nc)
                stack.push_async_callback(node.stop, "test over")
                engines[nid] = llm
        refs = {name: LLMEngine(EngineConfig(model=model, num_blocks=BLOCKS, block_size=BS))
                for name, model in models.items()}

        port = free_port()
        gw_nc = await nats.connect(nats_server.url)
        stack.push_async_callback(gw_nc.drain)
        config = GatewayConfig(model=f"{TINY},{other_dir}", served_model_name=f",{OTHER_NAME}", port=port,
                               gateway_id="gw-mm")
        runner = make_runner(create_app(config, NatsConfig(url=nats_server.url), nc=gw_nc))
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(400):  # until the scheduler has seen every node
                async with http.get(base + "/ready") as r:
                    if r.status == 200 and set((await r.json())["nodes"]) == set(engines):
                        break
                await asyncio.sleep(0.05)
        yield Served(base, models, {n: [nid for nid, _ in s] for n, s in shapes.items()}, engines, refs)
        await wait_until(lambda: all(e.stats().free_blocks == e.stats().total_blocks for e in engines.values()))


def _placements(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(prefill node, decode node) of every placement the gateway logged."""
    out = []
    for rec in caplog.records:
        m = re.match(r"placed on prefill=(\S+) decode=(\S+)", rec.getMessage())
        if m:
            out.append((m.group(1), m.group(2)))
    return out


async def test_each_model_is_served_by_its_own_nodes(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    s = served
    caplog.set_level(logging.INFO, logger="services.gateway.dispatch")
    async with aiohttp.ClientSession() as http:
        async with http.get(s.base + "/v1/models") as r:
            cards = (await r.json())["data"]
        assert [(c["id"], c["max_model_len"]) for c in cards] == [(TINY, 2048), (OTHER_NAME, OTHER_LEN)]

        for prompt in PROMPTS:
            wants = {name: s.expected(name, prompt, 10) for name in s.models}
            assert wants[TINY] != wants[OTHER_NAME]  # the two models are told apart by their output
            for name in (OTHER_NAME, TINY):  # interleaved, the other model first
                caplog.clear()
                body = {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
                async with http.post(s.base + "/v1/completions", json=body) as r:
                    out = await r.json()
                assert r.status == 200, out
                assert out["model"] == name
                assert out["choices"][0]["text"] == s.text(name, wants[name])
                assert out["usage"]["completion_tokens"] == 10
                (p, d), = _placements(caplog)
                assert {p, d} <= set(s.nodes[name]), (name, p, d)

        # Chat: each model's own template (the same messages are other tokens), its own nodes.
        for name in s.models:
            ids = s.chat_ids(name)
            want = s.text(name, s.expected(name, ids, 8))
            caplog.clear()
            body = {"model": name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            async with http.post(s.base + "/v1/chat/completions", json=body) as r:
                out = await r.json()
            assert r.status == 200, out
            assert out["choices"][0]["message"]["content"] == want and out["usage"]["prompt_tokens"] == len(ids)
            (p, d), = _placements(caplog)
            assert {p, d} <= set(s.nodes[name])
            async with http.post(s.base + "/tokenize", json={"model": name, "messages": MESSAGES}) as r:
                tok = await r.json()
            assert tok["tokens"] == ids and tok["max_model_len"] == (2048 if name == TINY else OTHER_LEN)
        assert s.chat_ids(TINY) != s.chat_ids(OTHER_NAME)
        async with http.post(s.base + "/detokenize", json={"model": OTHER_NAME, "tokens": s.chat_ids(OTHER_NAME)}) as r:
            assert (await r.json())["prompt"].startswith("### USER\n")

        # Each model's context length: 600 tokens fit tiny's 2048, not the other's 512.
        long_prompt = [(5 * i) % 4000 + 10 for i in range(600)]
        async with http.post(s.base + "/v1/completions", json={"model": OTHER_NAME, "prompt": long_prompt,
                                                               "max_tokens": 1}) as r:
            err = await r.json()
        assert r.status == 400 and err["error"]["code"] == "context_length_exceeded", err
        async with http.post(s.base + "/v1/completions", json={"model": TINY, "prompt": long_prompt,
                                                               "max_tokens": 1}) as r:
            assert r.status == 200, await r.text()

        # A model the gateway does not serve, the nodes' path of a renamed one included.
        for wrong in ("nope", s.models[OTHER_NAME]):
            async with http.post(s.base + "/v1/completions", json={"model": wrong, "prompt": "Hi"}) as r:
                err = await r.json()
            assert r.status == 404 and err["error"]["code"] == "model_not_found", err
            async with http.post(s.base + "/tokenize", json={"model": wrong, "prompt": "Hi"}) as r:
                assert r.status == 404
        async with http.get(s.base + "/openapi.json") as r:
            schema = (await r.json())["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
        assert schema["enum"] == [TINY, OTHER_NAME]


def test_gateway_config_lists_models_with_their_served_names() -> None:
    one = GatewayConfig(model="tiny")
    assert (one.model, one.served_model_name, one.served_models) == ("tiny", "tiny", [("tiny", "tiny")])
    assert GatewayConfig(model="tiny", served_model_name="t").served_models == [("t", "tiny")]
    two = GatewayConfig(model="tiny, /m/qwen", served_model_name="t,")
    assert two.served_models == [("t", "tiny"), ("/m/qwen", "/m/qwen")]
    assert GatewayConfig(model="tiny,/m/qwen").served_models == [("tiny", "tiny"), ("/m/qwen", "/m/qwen")]
    for bad in ({"model": "tiny,"}, {"model": "tiny,tiny"}, {"model": "a,b", "served_model_name": "x"},
                {"model": "a,b", "served_model_name": "x,x"}):
        with pytest.raises(ValueError):
            GatewayConfig(**bad)

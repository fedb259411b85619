"""End to end: gateway -> scheduler -> prefill node -> KV hand-off -> decode node -> client.

Everything is real except the process boundaries: a real nats-server, the scheduler
service, a prefill and a decode node each with its own engine (tiny model, CPU, shared
pools so the hand-off goes over ``shm``) and NATS connection, and the gateway app on a
free port. The reference is one engine doing the whole request by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats
import openai
import pytest
import torch
from aiohttp import web

from libs.engine.async_engine import AsyncEngine
from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.protocol.messages import SamplingParams
from services.common.nats import NatsConfig
from services.common.natsserver import free_port
from services.gateway.app import create_app, make_runner
from services.gateway.config import GatewayConfig
from services.node.node import Node
from services.node_common.config import NodeConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService

MODEL = "tiny"
BLOCKS = 128
BS = 16


@dataclass
class Cluster:
    url: str
    nodes: dict[str, Node]
    engines: dict[str, LLMEngine]
    reference: LLMEngine
    scheduler: SchedulerService | None = None

    def free_blocks(self) -> dict[str, tuple[int, int]]:
        return {nid: (e.stats().free_blocks, e.stats().total_blocks) for nid, e in self.engines.items()}

    def expected(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The reference engine's greedy tokens for ``prompt`` (one engine, whole request)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.reference.add_request("ref", prompt, params)
        out: list[int] = []
        while self.reference.has_work():
            for o in self.reference.step():
                out += o.token_ids
        return out


@contextlib.asynccontextmanager
async def cluster(nats_url: str, policy: str = "least_loaded", **scheduler: Any) -> AsyncIterator[Cluster]:
    torch.set_num_threads(1)
    stack = contextlib.AsyncExitStack()
    async with stack:
        sched_nc = await nats.connect(nats_url)
        stack.push_async_callback(sched_nc.drain)
        sched = SchedulerService(SchedulerConfig(policy=policy, **scheduler), sched_nc)
        await sched.start()
        stack.push_async_callback(sched.close)
        nodes: dict[str, Node] = {}
        engines: dict[str, LLMEngine] = {}
        for nid, role in (("p0", "prefill"), ("d0", "decode")):
            llm = LLMEngine(EngineConfig(model=MODEL, num_blocks=BLOCKS, block_size=BS, shared_pool=True))
            engine = AsyncEngine(engine=llm)
            await engine.start()
            stack.push_async_callback(engine.stop)
            stack.callback(llm.pool.close)
            nc = await nats.connect(nats_url)
            stack.push_async_callback(nc.drain)
            node = Node(NodeConfig(node_id=nid, role=role, model=MODEL, block_size=BS, num_blocks=BLOCKS,
                                   report_interval_s=0.1), engine=engine)
            await node.start(nc)
            stack.push_async_callback(node.stop, "test over")
            nodes[nid], engines[nid] = node, llm
        reference = LLMEngine(EngineConfig(model=MODEL, num_blocks=BLOCKS, block_size=BS))
        yield Cluster(nats_url, nodes, engines, reference, sched)


@contextlib.asynccontextmanager
async def gateway(c: Cluster) -> AsyncIterator[str]:
    port = free_port()
    gw_nc = await nats.connect(c.url)
    app = create_app(GatewayConfig(model=MODEL, port=port, gateway_id="gw-e2e"), NatsConfig(url=c.url), nc=gw_nc)
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # until the scheduler has seen both nodes
                async with http.get(base + "/ready") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
        yield base
    finally:
        await runner.cleanup()
        await gw_nc.drain()


async def wait_until(pred, limit: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``pred`` (the limit only bounds a hung test; nothing here asserts speed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not pred():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def sse_tokens(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[str, list[dict]]:
    """Stream a completion; the concatenated text and the parsed events."""
    events = []
    async with http.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    text = "".join(e["choices"][0].get("text", "") for e in events if e.get("choices"))
    return text, events


PROMPTS = [[(7 * i + 3 * k) % 4000 + 10 for i in range(n)] for k, n in enumerate((5, 16, 17, 40, 70))]


@pytest.fixture
async def served(nats_server) -> AsyncIterator[tuple[Cluster, str]]:  # type: ignore[no-untyped-def]
    async with cluster(nats_server.url) as c, gateway(c) as base:
        yield c, base


async def test_disaggregated_completions_equal_one_engine(served) -> None:  # type: ignore[no-untyped-def]
    c, base = served
    tok = c.reference.tokenizer
    async with aiohttp.ClientSession() as http:
        for prompt in PROMPTS:
            want = c.expected(prompt, 12)
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                    "logprobs": 0}
            async with http.post(base + "/v1/completions", json=body) as r:
                out = await r.json()
            assert r.status == 200, out
            got = out["choices"][0]["logprobs"]["tokens"]
            assert len(got) == 12 and out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12,
                                                        "total_tokens": len(prompt) + 12}
            assert out["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
            text, events = await sse_tokens(http, base + "/v1/completions", body)
            assert text == out["choices"][0]["text"]
            assert events[-1]["choices"][0]["finish_reason"] == "length"
    # Every request went P -> D and left no block behind; what P sent, D received.
    await wait_until(lambda: all(f == t for f, t in c.free_blocks().values()))
    sent, got = c.nodes["p0"].ctx.transfers, c.nodes["d0"].ctx.transfers
    assert sent.sent_transfers > 0 and sent.sent_calls == sent.sent_transfers  # fresh pools: one call each
    assert (sent.sent_transfers, sent.sent_bytes) == (got.received_transfers, got.received_bytes)


async def test_openai_client_both_endpoints(served) -> None:  # type: ignore[no-untyped-def]
    c, base = served
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    try:
        prompt = PROMPTS[3]
        want = c.reference.tokenizer.decode(c.expected(prompt, 10), skip_special_tokens=True)
        done = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert done.choices[0].text == want and done.usage.completion_tokens == 10
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        assert "".join([ch.choices[0].text async for ch in stream if ch.choices]) == want

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat_ids = c.reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(chat_ids, list):  # transformers 5 returns a BatchEncoding
            chat_ids = chat_ids["input_ids"]
        chat_want = c.reference.tokenizer.decode(c.expected(list(chat_ids), 8), skip_special_tokens=True)
        chat = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                    extra_body={"ignore_eos": True})
        assert chat.choices[0].message.content == chat_want
        assert chat.usage.prompt_tokens == len(chat_ids)
        chat_stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        parts = [ch.choices[0].delta.content or "" async for ch in chat_stream if ch.choices]
        assert "".join(parts) == chat_want
    finally:
        await client.close()


async def test_concurrent_requests_interleave(served) -> None:  # type: ignore[no-untyped-def]
    c, base = served
    arrivals: dict[int, list[float]] = {}
    loop = asyncio.get_running_loop()

    async def one(http: aiohttp.ClientSession, k: int) -> str:
        body = {"model": MODEL, "prompt": PROMPTS[k], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "stream": True}
        text = ""
        async with http.post(base + "/v1/completions", json=body) as r:
            async for line in r.content:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    ev = json.loads(line[len("data: "):])
                    if ev.get("choices") and ev["choices"][0]["text"]:
                        arrivals.setdefault(k, []).append(loop.time())
                        text += ev["choices"][0]["text"]
        return text

    async with aiohttp.ClientSession() as http:
        texts = await asyncio.gather(*(one(http, k) for k in range(len(PROMPTS))))
    for k, text in enumerate(texts):
        assert text == c.reference.tokenizer.decode(c.expected(PROMPTS[k], 24), skip_special_tokens=True)
    # Interleaved, not one after another: some request got tokens while another was mid-stream.
    spans = [(min(t), max(t)) for t in arrivals.values()]
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for (b0, b1) in spans[i + 1:])


async def test_cancelled_stream_frees_blocks_on_both_nodes(served) -> None:  # type: ignore[no-untyped-def]
    c, base = served
    aborted: list[str] = []
    d_engine = c.engines["d0"]
    real_abort = d_engine.abort

    def spy_abort(request_id: str) -> bool:
        aborted.append(request_id)
        return real_abort(request_id)

    d_engine.abort = spy_abort  # type: ignore[method-assign]
    body = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 1900, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/completions", json=body) as r:
            seen = 0
            async for line in r.content:
                if line.startswith(b"data: ") and b'"text"' in line:
                    seen += 1
                if seen >= 3:
                    break  # leave mid-stream: the connection closes with the context
            request_id = r.headers["X-Request-Id"]
    # The cancel reached the decode node, which aborted the request mid-decode...
    await wait_until(lambda: any(rid.startswith(request_id) for rid in aborted))
    # ...and both pools are whole again.
    await wait_until(lambda: all(f == t for f, t in c.free_blocks().values()))
    assert c.engines["d0"].stats().num_running == 0 and c.engines["p0"].stats().num_held == 0

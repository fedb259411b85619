"""The OpenAI surface through the official ``openai`` client, against a real cluster.

Two shapes, each test run in both: 1P1D (a prefill node and a decode node, the KV handed
off over ``shm``) and colocated (one hybrid node does both). Everything is real: a
nats-server, the scheduler service, the nodes with their own engines (the ``tiny`` preset
on CPU) and the gateway on a free port. The reference is one engine doing the whole
request by itself with the same sampling parameters.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import jsonschema
import nats
import openai
import pytest
import torch

from libs.engine.async_engine import AsyncEngine
from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.protocol.messages import SamplingParams, StructuredOutput
from services.node.node import Node
from services.node_common.config import NodeConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from tests.e2e.test_serving import BLOCKS, BS, MODEL, Cluster, gateway, wait_until

SHAPES = {"1p1d": (("p0", "prefill"), ("d0", "decode")), "colocated": (("h0", "hybrid"),)}
PROMPT = [(7 * i) % 4000 + 10 for i in range(24)]
PROMPT2 = [(11 * i) % 3000 + 20 for i in range(9)]


@dataclass
class Served:
    cluster: Cluster
    base: str
    client: openai.AsyncOpenAI

    def reference(self, prompt: list[int], **sampling: object) -> list[int]:
        """One engine's tokens for ``prompt`` under ``sampling`` (the whole request in one place)."""
        ref = self.cluster.reference
        ref.add_request(f"ref-{id(sampling)}-{len(prompt)}", prompt, SamplingParams(**sampling))  # type: ignore[arg-type]
        out: list[int] = []
        while ref.has_work():
            for o in ref.step():
                out += o.token_ids
        return out

    def text(self, ids: list[int]) -> str:
        return self.cluster.reference.tokenizer.decode(ids, skip_special_tokens=True)


@contextlib.asynccontextmanager
async def shaped_cluster(nats_url: str, shape: str) -> AsyncIterator[Cluster]:
    torch.set_num_threads(1)
    async with contextlib.AsyncExitStack() as stack:
        sched_nc = await nats.connect(nats_url)
        stack.push_async_callback(sched_nc.drain)
        # The role controller must not flip the one hybrid node (nor either node of the pair).
        sched = SchedulerService(SchedulerConfig(policy="least_loaded", min_dwell_s=3600.0), sched_nc)
        await sched.start()
        stack.push_async_callback(sched.close)
        nodes: dict[str, Node] = {}
        engines: dict[str, LLMEngine] = {}
        for nid, role in SHAPES[shape]:
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
        yield Cluster(nats_url, nodes, engines, reference)


@pytest.fixture(params=list(SHAPES))
async def served(request, nats_server) -> AsyncIterator[Served]:  # type: ignore[no-untyped-def]
    async with shaped_cluster(nats_server.url, request.param) as c, gateway(c) as base:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        try:
            yield Served(c, base, client)
        finally:
            await client.close()
        # Whatever a test did, every block came back.
        await wait_until(lambda: all(f == t for f, t in c.free_blocks().values()))


async def test_n_greedy_seeded_and_batched(served: Served) -> None:
    s, client = served, served.client
    want = s.text(s.reference(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True))
    greedy = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=3,
                                             extra_body={"ignore_eos": True})
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.text for c in greedy.choices] == [want] * 3
    assert greedy.usage.prompt_tokens == len(PROMPT) and greedy.usage.completion_tokens == 24

    async def seeded() -> list[str]:
        out = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7,
                                              extra_body={"ignore_eos": True})
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first, again = await seeded(), await seeded()
    assert first == again  # seeded choices are reproducible...
    assert len(set(first)) > 1  # ...and the choices are not copies of each other (seed + j each)
    # Choice j of a seeded request samples as a request of its own with seed + j does.
    assert first[1] == s.text(s.reference(PROMPT, max_tokens=8, temperature=1.0, seed=8, ignore_eos=True))

    batch = await client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT2], max_tokens=5, temperature=0, n=2,
                                            extra_body={"ignore_eos": True})
    want2 = s.text(s.reference(PROMPT2, max_tokens=5, temperature=0.0, ignore_eos=True))
    want1 = s.text(s.reference(PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True))
    assert sorted((c.index, c.text) for c in batch.choices) == [(0, want1), (1, want1), (2, want2), (3, want2)]
    assert batch.usage.prompt_tokens == len(PROMPT) + len(PROMPT2) and batch.usage.completion_tokens == 20

    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                                max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) == 1


async def test_best_of_echo_and_text_batch(served: Served) -> None:
    s, client = served, served.client
    best = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, n=2, best_of=4,
                                           seed=3, logprobs=0, extra_body={"ignore_eos": True})
    assert [c.index for c in best.choices] == [0, 1]
    # The two returned are the two of the four candidates (seeds 3..6) with the highest cumulative logprob.
    cands = []
    for j in range(4):
        ids = s.reference(PROMPT, max_tokens=6, temperature=1.0, seed=3 + j, ignore_eos=True, logprobs=0)
        cands.append(s.text(ids))
    got_sums = [sum(c.logprobs.token_logprobs) for c in best.choices]
    assert got_sums[0] >= got_sums[1]
    assert {c.text for c in best.choices} <= set(cands)

    echo = await client.completions.create(model=MODEL, prompt=["Once upon a time", "The sky"], max_tokens=4,
                                           temperature=0, echo=True, extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(echo.choices, key=lambda c: c.index)]
    assert texts[0].startswith("Once upon a time") and texts[1].startswith("The sky")
    assert len(texts[0]) > len("Once upon a time")


async def test_stream_n_with_usage_and_tokens_in_order(served: Served) -> None:
    s, client = served, served.client
    want = s.text(s.reference(PROMPT, max_tokens=10, temperature=0.0, ignore_eos=True))
    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, n=2,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    finishes, usage = {}, None
    async for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: want, 1: want} and finishes == {0: "length", 1: "length"}
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 20)

    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                max_tokens=5, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts: dict[int, str] = {0: "", 1: ""}
    roles = set()
    async for ch in chat:
        for c in ch.choices:
            parts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.add(c.index)
        if ch.usage is not None:
            assert ch.usage.completion_tokens == 10
    assert roles == {0, 1} and parts[0] == parts[1] != ""


async def test_sampling_parameters_reach_the_engine(served: Served) -> None:
    s, client = served, served.client
    greedy_ids = s.reference(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    greedy = s.text(greedy_ids)

    async def text(**kw: object) -> str:
        extra = {"ignore_eos": True, **kw.pop("extra_body", {})}  # type: ignore[dict-item]
        out = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body=extra, **kw)
        return out.choices[0].text

    # top_k=1 and min_p=1 leave only the most likely token: greedy, whatever the temperature.
    assert await text(temperature=1.0, seed=1, extra_body={"top_k": 1}) == greedy
    assert await text(temperature=1.0, seed=1, extra_body={"min_p": 1.0}) == greedy
    # logit_bias +100 on one token makes it the only one picked.
    forced = 1234
    assert await text(temperature=0, logit_bias={str(forced): 100}) == s.text([forced] * 8)
    # A stop token id ends the output right after it (the id itself not shown).
    stop_at = greedy_ids[3]
    out = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                          extra_body={"stop_token_ids": [stop_at]})
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == greedy_ids.index(stop_at) + 1
    # Penalties: the cluster's greedy output equals one engine's under the same penalties, on P then D.
    for kw in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.5}, {"repetition_penalty": 1.8}):
        want = s.text(s.reference(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True, **kw))
        extra = {"repetition_penalty": kw["repetition_penalty"]} if "repetition_penalty" in kw else {}
        top = {k: v for k, v in kw.items() if k != "repetition_penalty"}
        assert await text(temperature=0, extra_body=extra, **top) == want, kw


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


async def test_response_format_json_schema_validates_20_of_20(served: Served) -> None:
    client = served.client
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(20):
        out = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A person?"}],
                                                   max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    # json_object: any keys, so a random model may write one longer than max_tokens; what it
    # finishes is one JSON object, and what it does not is a prefix of one.
    finished = 0
    for seed in range(5):
        obj = await client.completions.create(model=MODEL, prompt="JSON:", max_tokens=60, temperature=1.0, seed=seed,
                                              extra_body={"response_format": {"type": "json_object"}})
        text = obj.choices[0].text
        assert text.startswith("{"), text
        if obj.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
    print(f"json_object: {finished} of 5 finished within 60 tokens")


async def test_guided_choice_and_regex(served: Served) -> None:
    client = served.client
    for seed in range(4):
        pick = await client.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=8, temperature=1.0, seed=seed,
                                               extra_body={"guided_choice": ["yes", "no", "maybe"]})
        assert pick.choices[0].text in {"yes", "no", "maybe"}
        code = await client.completions.create(model=MODEL, prompt="A code:", max_tokens=12, temperature=1.0, seed=seed,
                                               extra_body={"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}})
        assert re.fullmatch("[a-c]{3}-[0-9]{2}", code.choices[0].text), code.choices[0].text


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


async def test_tool_calls_required_and_named_parse(served: Served) -> None:
    client = served.client
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    # One call each (parallel_tool_calls false: the array has one element), else a random model
    # may go on adding calls until max_tokens.
    for seed in range(3):
        out = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                                   parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id
            jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])

    named = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=1.0, seed=5,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and named.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), params["get_weather"])

    # Streamed: the first tool-call delta names the function; the arguments arrive in pieces.
    stream = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=60, temperature=1.0, seed=5, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, args, finish = "", "", None
    async for ch in stream:
        for c in ch.choices:
            for tc in c.delta.tool_calls or []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    jsonschema.validate(json.loads(args), params["get_weather"])

    # The call and its result go back in the history, and the conversation goes on.
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    after = await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                                 max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert after.choices[0].message.content and after.choices[0].message.tool_calls is None


async def test_auto_tool_choice_reads_hermes_calls(served: Served) -> None:
    """``auto``: the calls are read from <tool_call> blocks in the text. A regex makes the model
    write one (the default model's template shows it no tools)."""
    client = served.client
    forced = {"structured_outputs": {"regex": r'Checking\. <tool_call>\{"name": "get_time", "arguments": '
                                              r'\{"zone": "(UTC|CET)"\}\}</tool_call>'}}
    out = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                               temperature=1.0, seed=2, extra_body=forced)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content == "Checking. "
    (call,) = msg.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in {"UTC", "CET"}

    stream = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                                  temperature=1.0, seed=2, stream=True, extra_body=forced)
    content, calls, finish = "", [], None
    async for ch in stream:
        for c in ch.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content == "Checking. " and finish == "tool_calls"
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (0, "get_time", call.function.arguments)]
    plain = await client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                                 max_tokens=60, temperature=1.0, seed=2, extra_body=forced)
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


async def test_tokenize_and_detokenize(served: Served) -> None:
    tok = served.cluster.reference.tokenizer
    async with aiohttp.ClientSession() as http:
        async with http.post(served.base + "/tokenize", json={"model": MODEL, "prompt": "Hello world",
                                                             "return_token_strs": True}) as r:
            out = await r.json()
        assert r.status == 200, out
        assert out["tokens"] == tok.encode("Hello world", add_special_tokens=True)
        assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 2048
        assert "".join(out["token_strs"]) == "Hello world"
        async with http.post(served.base + "/tokenize", json={"messages": ASK}) as r:
            chat = await r.json()
        text = tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
        assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
        async with http.post(served.base + "/detokenize", json={"model": MODEL, "tokens": out["tokens"]}) as r:
            assert (r.status, await r.json()) == (200, {"prompt": "Hello world"})
        async with http.post(served.base + "/detokenize", json={"model": "other", "tokens": [1]}) as r:
            assert r.status == 404


async def test_hostile_bodies_are_4xx_and_serving_goes_on(served: Served) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    hostile = [
        b'{"model": "tiny", "messages": ' + deep + b"}",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": ' + deep + b"}",
        b'{"model": "tiny", "prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}",
        b'{"model": "tiny", "prompt": "\xff\xfe"}',
        b'{"model": "tiny", "prompt": "x", "n": "3"}',
        b'{"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
        b'{"model": "tiny", "prompt": "x", "logit_bias": {"1": 1e400}}',
    ]
    async with aiohttp.ClientSession() as http:
        for raw in hostile:
            for path in ("/v1/completions", "/v1/chat/completions"):
                async with http.post(served.base + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                    body = await r.json()
                assert 400 <= r.status < 500 and body["error"]["message"], (path, raw[:60], r.status)
    with pytest.raises(openai.BadRequestError):
        await served.client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_regex": "(("})
    ok = await served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert ok.choices[0].text == served.text(served.reference(PROMPT, max_tokens=3, temperature=0.0))


async def test_client_leaving_a_streamed_n_request_cancels_every_choice(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
                "stream": True, "n": 3}
        async with http.post(served.base + "/v1/completions", json=body) as r:
            seen = set()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    seen.add(json.loads(line[6:])["choices"][0]["index"])
                if len(seen) == 3:
                    break
    # Every sub-request's blocks come back on every node (checked by the fixture too).
    c = served.cluster
    await wait_until(lambda: all(f == t for f, t in c.free_blocks().values()))
    assert all(e.stats().num_running == 0 for e in c.engines.values())


@pytest.mark.parametrize("choice", ["required", "named"])
def test_tool_constraint_schema(choice: str) -> None:
    """The gateway builds the constraint the engine compiles (a JSON Schema for the calls)."""
    from services.gateway import bodies
    from services.gateway.tools import tool_spec

    tools = [bodies.Tool(type="function", function=bodies.FunctionDef(name="get_weather",
                                                                     parameters=WEATHER["function"]["parameters"]))]
    named = bodies.NamedToolChoice(type="function", function=bodies.ToolChoiceFunction(name="get_weather"))
    spec = tool_spec(tools, named if choice == "named" else "required", None)
    assert spec is not None
    constraint = StructuredOutput(json_schema=json.dumps(spec.schema()))
    schema = json.loads(constraint.json_schema or "")
    good = {"city": "Paris", "days": 2}
    jsonschema.validate(good if choice == "named" else [{"name": "get_weather", "parameters": good}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": 5} if choice == "named" else [], schema)

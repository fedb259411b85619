"""What the gateway makes of the OpenAI parameters, seen on the wire (FakeCluster, real nats-server),
and how it reads tool calls out of an output."""

from __future__ import annotations

import asyncio
import json

import jsonschema

from services.gateway.tools import ToolMode, ToolSpec, ToolStream, parse_calls
from tests.services.fake_cluster import expected_tokens
from tests.services.gateway_harness import MODEL, gateway, tokenizer  # noqa: F401 (fixture)

C, CHAT = "/v1/completions", "/v1/chat/completions"
P1, P2 = [101, 202, 303], [7, 8, 9, 10]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


async def test_n_and_batches_fan_out_with_seeds_and_indices(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        status, out, headers = await gw.post(C, {"model": MODEL, "prompt": [P1, P2], "n": 2, "max_tokens": 3, "seed": 41})
        subs = sorted(gw.cluster.submits, key=lambda s: s.request_id)
    assert status == 200
    rid = headers["X-Request-Id"]
    assert [s.request_id for s in subs] == [f"{rid}-{k}" for k in range(4)]
    assert [(s.prompt_token_ids, s.sampling.seed) for s in subs] == [(P1, 41), (P1, 42), (P2, 41), (P2, 42)]
    assert [(c["index"], c["text"]) for c in out["choices"]] == [
        (0, gw.decode(expected_tokens(P1, 3))), (1, gw.decode(expected_tokens(P1, 3))),
        (2, gw.decode(expected_tokens(P2, 3))), (3, gw.decode(expected_tokens(P2, 3)))]
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}


async def test_best_of_asks_for_logprobs_and_returns_n(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        status, out, _ = await gw.post(C, {"model": MODEL, "prompt": P1, "n": 1, "best_of": 3, "max_tokens": 2})
        subs = gw.cluster.submits
    assert status == 200 and len(subs) == 3 and all(s.sampling.logprobs == 0 for s in subs)
    assert [c["index"] for c in out["choices"]] == [0] and out["choices"][0]["logprobs"] is None
    assert out["usage"]["completion_tokens"] == 2


async def test_echo_prepends_the_prompt(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        status, out, _ = await gw.post(C, {"model": MODEL, "prompt": "Hello there", "echo": True, "max_tokens": 2})
        events = await gw.sse(C, {"model": MODEL, "prompt": "Hello there", "echo": True, "max_tokens": 2, "stream": True})
    ids = gw.encode("Hello there")
    assert status == 200 and out["choices"][0]["text"] == "Hello there" + gw.decode(expected_tokens(ids, 2))
    assert events[0]["choices"][0]["text"] == "Hello there"
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == out["choices"][0]["text"]


async def test_streamed_n_chunks_carry_their_index_and_usage_sums(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        events = await gw.sse(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3,
                                     "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
        prompt = gw.cluster.submits[0].prompt_token_ids
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == [] and usage["completion_tokens"] == 12 and usage["prompt_tokens"] == len(prompt)
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    for e in events[:-2]:
        (c,) = e["choices"]
        text[c["index"]] = text.get(c["index"], "") + (c["delta"].get("content") or "")
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert text == {i: gw.decode(expected_tokens(prompt, 4)) for i in range(3)}
    assert finish == {0: "length", 1: "length", 2: "length"}


async def test_sampling_fields_reach_the_nodes(nats_server, tokenizer):
    body = {"model": MODEL, "prompt": P1, "max_tokens": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "repetition_penalty": 1.2, "min_p": 0.1, "top_k": 5, "logit_bias": {"17": -100, "18": 2.5},
            "stop_token_ids": [5, 6], "min_tokens": 1, "ignore_eos": True, "guided_regex": "[ab]+"}
    async with gateway(nats_server.url, tokenizer) as gw:
        status, _, _ = await gw.post(C, body)
        s = gw.cluster.submits[0].sampling
    assert status == 200
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p, s.top_k) == (0.5, -0.5, 1.2, 0.1, 5)
    assert s.logit_bias == {17: -100.0, 18: 2.5} and s.stop_token_ids == [5, 6] and s.min_tokens == 1 and s.ignore_eos
    assert s.structured is not None and s.structured.regex == "[ab]+"


async def test_response_format_and_tool_choice_become_constraints(nats_server, tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with gateway(nats_server.url, tokenizer) as gw:
        await gw.post(CHAT, {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        await gw.post(CHAT, {**chat, "response_format": {"type": "json_object"}})
        await gw.post(C, {"model": MODEL, "prompt": P1, "max_tokens": 2, "structured_outputs": {"choice": ["y", "n"]}})
        await gw.post(CHAT, {**chat, "tools": [WEATHER, TIME], "tool_choice": "required"})
        await gw.post(CHAT, {**chat, "tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
        await gw.post(CHAT, {**chat, "tools": [WEATHER], "tool_choice": "auto"})
        got = [s.sampling.structured for s in gw.cluster.submits]
        prompts = [s.prompt_token_ids for s in gw.cluster.submits]
    assert json.loads(got[0].json_schema) == schema and got[1].json_object and got[2].choice == ["y", "n"]
    required = json.loads(got[3].json_schema)
    jsonschema.validate([{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "x"}}], required)
    assert json.loads(got[4].json_schema) == WEATHER["function"]["parameters"]
    assert got[5] is None  # auto: free text, read for <tool_call> blocks
    # The default template shows no tools (it does not read them): the prompt is the plain chat's.
    assert prompts[5] == prompts[0]


async def test_tool_history_is_rendered(nats_server, tokenizer):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "rain"}]
    async with gateway(nats_server.url, tokenizer) as gw:
        status, out, _ = await gw.post(CHAT, {"model": MODEL, "messages": messages, "tools": [WEATHER], "max_tokens": 2})
        prompt = gw.decode(gw.cluster.submits[0].prompt_token_ids)
    assert status == 200, out
    assert "rain" in prompt and "weather?" in prompt


async def test_client_leaving_cancels_every_choice(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, cluster={"hold": True}) as gw:
        body = {"model": MODEL, "prompt": P1, "n": 3, "max_tokens": 5, "stream": True}
        task = asyncio.create_task(gw.post(C, body))
        while len(gw.cluster.submits) < 3:
            await asyncio.sleep(0.02)
        task.cancel()
        while len(gw.cluster.cancels) < 3:
            await asyncio.sleep(0.02)
        assert sorted(c.request_id for c in gw.cluster.cancels) == sorted(s.request_id for s in gw.cluster.submits)


async def test_tokenize_detokenize(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        _, t, _ = await gw.post("/tokenize", {"prompt": "Hi there", "add_special_tokens": False})
        _, d, _ = await gw.post("/detokenize", {"tokens": t["tokens"]})
        bad = await gw.post("/tokenize", {"model": "nope", "prompt": "x"})
        wrong = await gw.post("/detokenize", {"tokens": [49152]})
    assert t == {"count": len(gw.encode("Hi there")), "max_model_len": 2048, "tokens": gw.encode("Hi there")}
    assert d == {"prompt": "Hi there"}
    assert bad[0] == 404 and wrong[0] == 400 and wrong[1]["error"]["param"] == "tokens"


def _spec(mode: ToolMode, name: str = "") -> ToolSpec:
    return ToolSpec(mode, [WEATHER, TIME], name=name)


def test_parse_calls_each_mode():
    content, calls = parse_calls(_spec(ToolMode.AUTO), 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert content == "Sure." and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Rome"})]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("chatcmpl-tool-")
    assert parse_calls(_spec(ToolMode.AUTO), "no calls here") == ("no calls here", [])
    assert parse_calls(_spec(ToolMode.AUTO), "<tool_call>{broken") == ("<tool_call>{broken", [])
    _, calls = parse_calls(_spec(ToolMode.REQUIRED), '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "x"}}]')
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"] and calls[0]["function"]["arguments"] == "{}"
    content, calls = parse_calls(_spec(ToolMode.NAMED, "get_weather"), '{"city": "Nice"}')
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Nice"}'}


def test_tool_stream_deltas():
    named = ToolStream(_spec(ToolMode.NAMED, "get_weather"))
    deltas = named.feed('{"ci') + named.feed('ty": "A"}') + named.finish()
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "A"}'
    assert named.called

    auto = ToolStream(_spec(ToolMode.AUTO))
    out = auto.feed("Let me check <tool") + auto.feed('_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert out == [{"content": "Let me check "}]  # "<tool" is held back until it is known
    end = auto.finish()
    assert end[0]["tool_calls"][0]["index"] == 0 and end[0]["tool_calls"][0]["function"]["name"] == "get_time"

    plain = ToolStream(_spec(ToolMode.AUTO))
    assert plain.feed("a <b") + plain.feed("c <t") + plain.finish() == [
        {"content": "a <b"}, {"content": "c "}, {"content": "<t"}]
    required = ToolStream(_spec(ToolMode.REQUIRED))
    assert required.feed('[{"name": "get_time", ') == []
    assert required.feed('"parameters": {}}]') == []
    assert required.finish()[0]["tool_calls"][0]["function"]["name"] == "get_time"

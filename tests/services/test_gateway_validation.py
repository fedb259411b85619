"""Every bad request body gets the exact OpenAI-style 4xx, never a 5xx, and never reaches NATS."""

from __future__ import annotations

import json

import pytest

from tests.services.gateway_harness import MODEL, gateway, tokenizer  # noqa: F401 (fixture)

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

CASES = [
    # (path, body, status, code, param)
    (C, {**OK_C, "model": "gpt-9"}, 404, "model_not_found", "model"),
    (C, {"prompt": [1]}, 400, "missing_required_parameter", "model"),
    (C, {**OK_C, "model": 7}, 400, "invalid_type", "model"),
    (C, {**OK_C, "user": 0}, 400, "invalid_type", "user"),
    (C, {**OK_C, "stream_options": {"include_usage": [1]}}, 400, "invalid_type", "stream_options.include_usage"),
    (C, {**OK_C, "stream_options": {"include_usage": True, "x": 1}}, 400, "unknown_parameter", "stream_options.x"),
    (C, {"model": MODEL}, 400, "missing_required_parameter", "prompt"),
    (C, {**OK_C, "prompt": ""}, 400, "invalid_value", "prompt"),
    (C, {**OK_C, "prompt": []}, 400, "invalid_value", "prompt"),
    (C, {**OK_C, "prompt": ["a", [1]]}, 400, "invalid_type", "prompt"),
    (C, {**OK_C, "prompt": ["a", ""]}, 400, "invalid_value", "prompt[1]"),
    (C, {**OK_C, "prompt": [[1], []]}, 400, "invalid_value", "prompt[1]"),
    (C, {**OK_C, "prompt": ["a"] * 33}, 400, "invalid_value", "prompt"),
    (C, {**OK_C, "prompt": ["a"] * 8, "n": 9}, 400, "invalid_value", "n"),
    (C, {**OK_C, "prompt": [1, "x"]}, 400, "invalid_type", "prompt"),
    (C, {**OK_C, "prompt": [1, 1.5]}, 400, "invalid_type", "prompt[1]"),
    (C, {**OK_C, "prompt": [1, 2**70]}, 400, "invalid_value", "prompt[1]"),
    (C, {**OK_C, "prompt": [1, 49152]}, 400, "invalid_value", "prompt"),
    (C, {**OK_C, "prompt": [-1]}, 400, "invalid_value", "prompt[0]"),
    (C, {**OK_C, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    (C, {**OK_C, "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    (C, {**OK_C, "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    (C, {**OK_C, "max_tokens": 2046}, 400, "context_length_exceeded", "max_tokens"),
    (C, {**OK_C, "prompt": [5] * 2048}, 400, "context_length_exceeded", "prompt"),
    (C, {**OK_C, "temperature": 2.5}, 400, "invalid_value", "temperature"),
    (C, {**OK_C, "temperature": -0.1}, 400, "invalid_value", "temperature"),
    (C, {**OK_C, "top_p": 0}, 400, "invalid_value", "top_p"),
    (C, {**OK_C, "top_p": 1.5}, 400, "invalid_value", "top_p"),
    (C, {**OK_C, "top_k": -2}, 400, "invalid_value", "top_k"),
    (C, {**OK_C, "max_tokens": 2, "min_tokens": 5}, 400, "invalid_value", "min_tokens"),  # was a 500 (fuzzer)
    (C, {k: v for k, v in OK_C.items() if k != "max_tokens"} | {"min_tokens": 20}, 400, "invalid_value", "min_tokens"),
    (C, {**OK_C, "seed": 1.5}, 400, "invalid_type", "seed"),
    (C, {**OK_C, "seed": 2**64}, 400, "invalid_value", "seed"),
    (C, {**OK_C, "temperature": 1e308 * 10}, 400, "invalid_json", None),  # sent as Infinity: not JSON
    (C, {**OK_C, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    (C, {**OK_C, "stop": [1]}, 400, "invalid_type", "stop[0]"),
    (C, {**OK_C, "stop_token_ids": [49152]}, 400, "invalid_value", "stop_token_ids"),
    (C, {**OK_C, "stop_token_ids": ["a"]}, 400, "invalid_type", "stop_token_ids[0]"),
    (C, {**OK_C, "stop": ""}, 400, "invalid_value", "stop"),
    (C, {**OK_C, "n": 0}, 400, "invalid_value", "n"),
    (C, {**OK_C, "n": 17}, 400, "invalid_value", "n"),
    (C, {**OK_C, "n": 3, "best_of": 2}, 400, "invalid_value", "best_of"),
    (C, {**OK_C, "n": 1, "best_of": 2, "stream": True}, 400, "unsupported_value", "best_of"),
    (C, {**OK_C, "echo": True, "logprobs": 1}, 400, "unsupported_value", "echo"),
    (C, {**OK_C, "suffix": "x"}, 400, "unsupported_value", "suffix"),
    (C, {**OK_C, "repetition_penalty": 0}, 400, "invalid_value", "repetition_penalty"),
    (C, {**OK_C, "min_p": 1.5}, 400, "invalid_value", "min_p"),
    (C, {**OK_C, "logit_bias": {"x": 1}}, 400, "invalid_value", "logit_bias"),
    (C, {**OK_C, "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias"),
    (C, {**OK_C, "logit_bias": {"49152": 1}}, 400, "invalid_value", "logit_bias"),
    (C, {**OK_C, "logit_bias": [1]}, 400, "invalid_type", "logit_bias"),
    (C, {**OK_C, "response_format": {"type": "xml"}}, 400, "invalid_value", "response_format.type"),
    (C, {**OK_C, "response_format": {"type": "json_schema"}}, 400, "missing_required_parameter", "response_format.json_schema"),
    (C, {**OK_C, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     400, "invalid_value", "response_format.json_schema.schema"),
    (C, {**OK_C, "response_format": {"type": "json_object", "extra": 1}}, 400, "unknown_parameter", "response_format.extra"),
    (C, {**OK_C, "guided_regex": "(unclosed"}, 400, "invalid_value", "guided_regex"),
    (C, {**OK_C, "guided_json": "{not json"}, 400, "invalid_value", "guided_json"),
    (C, {**OK_C, "guided_choice": []}, 400, "invalid_value", "guided_choice"),
    (C, {**OK_C, "guided_choice": ["a"], "guided_regex": "a+"}, 400, "invalid_value", "guided_choice"),
    (C, {**OK_C, "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "invalid_value", "structured_outputs"),
    (C, {**OK_C, "stream": "yes"}, 400, "invalid_type", "stream"),
    (C, {**OK_C, "logprobs": 6}, 400, "invalid_value", "logprobs"),
    (C, {**OK_C, "presence_penalty": "0.5"}, 400, "invalid_type", "presence_penalty"),
    (C, {**OK_C, "frequency_penalty": 3}, 400, "invalid_value", "frequency_penalty"),
    (C, {**OK_C, "echo": 1}, 400, "invalid_type", "echo"),
    (C, {**OK_C, "ignore_eos": "yes"}, 400, "invalid_type", "ignore_eos"),
    (C, {**OK_C, "flowkv_timing": 1}, 400, "invalid_type", "flowkv_timing"),
    (C, [1, 2], 400, "invalid_type", None),
    (CHAT, {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    (CHAT, {**OK_CHAT, "messages": []}, 400, "invalid_value", "messages"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "invalid_value",
     "messages[0].content[0].type"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user"}]}, 400, "missing_required_parameter", "messages[0].content"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400, "invalid_value",
     "messages[0].tool_calls"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}]}, 400,
     "missing_required_parameter", "messages[0].tool_calls[0].function"),
    (CHAT, {**OK_CHAT, "tool_choice": "required"}, 400, "invalid_value", "tool_choice"),
    (CHAT, {**OK_CHAT, "tools": [TOOL], "tool_choice": "sometimes"}, 400, "invalid_value", "tool_choice"),
    (CHAT, {**OK_CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, 400,
     "invalid_value", "tool_choice"),
    (CHAT, {**OK_CHAT, "tools": [TOOL, TOOL]}, 400, "invalid_value", "tools"),
    (CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "invalid_value",
     "tools[0].function.name"),
    (CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     400, "invalid_value", "tools.function.parameters"),
    (CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}, "x": 1}]}, 400, "unknown_parameter",
     "tools[0].x"),
    (CHAT, {**OK_CHAT, "tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, 400,
     "invalid_value", "tool_choice"),
    (CHAT, {**OK_CHAT, "messages": [[[[[[]]]]]]}, 400, "invalid_type", "messages[0]"),
    (CHAT, {**OK_CHAT, "messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    (CHAT, {**OK_CHAT, "messages": "hi"}, 400, "invalid_type", "messages"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y", "name": 7}]},
     400, "invalid_type", "messages[1].name"),
    (CHAT, {**OK_CHAT, "max_completion_tokens": -1}, 400, "invalid_value", "max_completion_tokens"),
    (CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "invalid_value", "top_logprobs"),
    (CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    (CHAT, {**OK_CHAT, "n": 65}, 400, "invalid_value", "n"),
    (CHAT, {**OK_CHAT, "logprobs": 3}, 400, "invalid_type", "logprobs"),
]


@pytest.fixture
async def gw(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, max_body_bytes=64 * 1024) as g:
        yield g


async def test_bad_bodies(gw):
    wrong = []
    for path, body, status, code, param in CASES:
        got, out, _ = await gw.post(path, body)
        if (got, out["error"]["code"], out["error"]["param"]) != (status, code, param):
            wrong.append((path, body, got, out["error"]))
        assert out["error"]["type"] == "invalid_request_error"
        assert isinstance(out["error"]["message"], str) and out["error"]["message"]
    assert not wrong, "\n".join(map(repr, wrong))
    assert gw.cluster.places == []


async def test_unknown_fields_ignored_and_valid_extras_accepted(gw):
    body = {**OK_CHAT, "frobnicate": {"x": 1}, "user": "u", "presence_penalty": 0, "n": 1, "seed": 3, "top_k": -1,
            "stop": "zzz", "logprobs": True, "top_logprobs": 2, "messages": [{"role": "developer", "content": "x"},
                                                                            {"role": "user", "content": "y"}]}
    status, out, _ = await gw.post(CHAT, body)
    assert status == 200
    assert [e["top_logprobs"][0]["logprob"] for e in out["choices"][0]["logprobs"]["content"]] == [-0.5, -0.5]
    sampling = gw.cluster.submits[0].sampling
    assert (sampling.seed, sampling.top_k, sampling.stop, sampling.logprobs, sampling.max_tokens) == (3, 0, ["zzz"], 2, 2)


async def test_ignore_eos_and_timing_extensions(gw):
    status, out, _ = await gw.post(C, {**OK_C, "ignore_eos": True, "flowkv_timing": True})
    plain_status, plain, _ = await gw.post(C, OK_C)
    assert (status, plain_status) == (200, 200)
    assert [s.sampling.ignore_eos for s in gw.cluster.submits] == [True, False]
    assert set(out["flowkv"]) == {"ttft_s", "prefill_s", "queued_s", "control_plane_s"} and out["flowkv"]["ttft_s"] > 0
    assert "flowkv" not in plain


async def test_malformed_json_and_oversized_body(gw):
    async with gw.http.post(gw.url + C, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        bad = (r.status, (await r.json())["error"]["code"])
    async with gw.http.post(gw.url + C, data=b'{"x": "' + b"a" * 70_000 + b'"}') as r:
        big = (r.status, (await r.json())["error"]["code"])
    async with gw.http.get(gw.url + "/v1/nope") as r:
        missing = (r.status, (await r.json())["error"]["code"])
    async with gw.http.get(gw.url + C) as r:
        wrong_method = (r.status, (await r.json())["error"]["code"])
    assert bad == (400, "invalid_json")
    assert big == (413, "request_too_large")
    assert missing == (404, "not_found")
    assert wrong_method == (405, "method_not_allowed")


async def test_chat_default_max_tokens_fills_the_context(gw):
    status, out, _ = await gw.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    submit = gw.cluster.submits[0]
    assert status == 200
    assert submit.sampling.max_tokens == 2048 - len(submit.prompt_token_ids)


async def test_hostile_bodies_get_a_4xx_and_the_gateway_serves_after(gw):
    deep = b"[" * 5000 + b"]" * 5000
    bodies = [
        b'{"model": "tiny", "max_tokens": 2, "messages": ' + deep + b"}",  # 5,000 nested arrays in messages
        b'{"model": "tiny", "max_tokens": 2, "prompt": "x", "guided_json": {"a": ' + deep + b"}}",  # in a free-form field
        b'{"model": "tiny", "max_tokens": 2, "prompt": "x", "logit_bias": {"1": ' + deep + b"}}",
        b'{"model": "tiny", "max_tokens": 2, "prompt": "caf\xe9 \xff"}',  # invalid UTF-8
        b'{"model": "tiny", "max_tokens": 1' + b"0" * 5000 + b', "prompt": "x"}',  # a 5,001-digit integer
        b'{"model": "tiny", "max_tokens": 2, "prompt": "x", "temperature": 1e99999}',
        b'{"model": "tiny", "max_tokens": 2, "prompt": "x", "temperature": NaN}',
        b'{"model": "tiny", "max_tokens": 2, "prompt": "x", "top_p": -Infinity}',
        b'{"model": "tiny", "max_tokens": 2, "prompt": "x", "stop": "\\ud800"}',  # a lone surrogate escape
        b'{"model": "tiny", "max_tokens": 2, "prompt": "x",}',
        b"\xef\xbb\xbf\x00\x00",
        b"",
        b"null",
        b'"a string"',
    ]
    for raw in bodies:
        for path in (C, CHAT, "/tokenize", "/detokenize"):
            async with gw.http.post(gw.url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                out = await r.json()
            assert 400 <= r.status < 500, (path, raw[:80], r.status, out)
            assert set(out["error"]) == {"message", "type", "param", "code"}, out
    assert gw.cluster.places == []
    status, out, _ = await gw.post(C, OK_C)
    assert status == 200 and out["choices"][0]["finish_reason"] == "length"


def _types(schema: dict, components: dict) -> set[str]:
    """The JSON types a property's schema admits."""
    if "$ref" in schema:
        return _types(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "anyOf" in schema:
        return set().union(*(_types(s, components) for s in schema["anyOf"]))
    if "enum" in schema:
        return {{str: "string", int: "integer", type(None): "null"}[type(v)] for v in schema["enum"]}
    t = schema.get("type")
    if t is None:
        return {"string", "integer", "number", "boolean", "array", "object", "null"}
    return set(t) if isinstance(t, list) else {t}


_WRONG = {"object": {"x": [1]}, "array": [[{}]], "string": "?", "number": 1.5, "boolean": True}


async def test_a_wrong_type_in_any_field_at_any_level_is_a_400_naming_it(gw):
    """For every field of every (nested) request object, a value of a JSON type its schema does not
    admit: always a 400 whose ``param`` is that field's path."""
    from services.gateway.openapi import openapi_document

    components = openapi_document(MODEL)["components"]["schemas"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    # (path, body with a hole, where the hole is, that object's schema)
    places = [
        (C, OK_C, lambda b: b, "CompletionRequest", ""),
        (CHAT, OK_CHAT, lambda b: b, "ChatCompletionRequest", ""),
        (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x"}]}, lambda b: b["messages"][0], "ChatMessage",
         "messages[0]."),
        (CHAT, {**OK_CHAT, "tools": [tool]}, lambda b: b["tools"][0]["function"], "FunctionDef", "tools[0].function."),
        (C, {**OK_C, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}},
         lambda b: b["response_format"]["json_schema"], "JsonSchemaFormat", "response_format.json_schema."),
        (C, {**OK_C, "stream_options": {"include_usage": True}}, lambda b: b["stream_options"], "StreamOptions",
         "stream_options."),
    ]
    wrong = []
    tried = 0
    for path, base, hole, name, prefix in places:
        for field_name, schema in components[name]["properties"].items():
            allowed = _types(schema, components)
            if "number" in allowed:
                allowed.add("integer")
            for jtype, value in _WRONG.items():
                if jtype in allowed:
                    continue
                body = json.loads(json.dumps(base))
                hole(body)[field_name] = value
                got, out, _ = await gw.post(path, body)
                tried += 1
                if got != 400 or not (out["error"]["param"] or "").startswith(prefix + field_name):
                    wrong.append((path, prefix + field_name, value, got, out))
    print(f"{tried} wrong-typed bodies")
    assert tried > 150 and not wrong, wrong[:5]
    assert gw.cluster.places == []

"""Gateway happy paths against a FakeCluster on a real nats-server: exact tokens, text, usage."""

from __future__ import annotations

import openai
import pytest

from tests.services.fake_cluster import expected_tokens
from tests.services.gateway_harness import MODEL, gateway, tokenizer  # noqa: F401 (fixture)

PROMPT_IDS = [101, 202, 303]


async def test_models_lists_the_served_model(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        async with gw.http.get(gw.url + "/v1/models") as r:
            body = await r.json()
    assert r.status == 200
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == 2048


async def test_completion_token_prompt_exact_output_and_usage(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        status, body, headers = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 7})
        submit = gw.cluster.submits[0]
    want = expected_tokens(PROMPT_IDS, 7)
    assert status == 200
    assert body["choices"][0]["text"] == gw.decode(want)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    assert body["id"] == headers["X-Request-Id"] == submit.request_id
    assert submit.prompt_token_ids == PROMPT_IDS and submit.output_offset == 0
    assert submit.decode_node == "D0" and submit.reply_subject == "flowkv.v1.stream.gwtest"


async def test_completion_text_prompt_is_tokenized(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        status, body, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": ["Hello there world"], "max_tokens": 4})
        ids = gw.encode("Hello there world")
        assert gw.cluster.submits[0].prompt_token_ids == ids
    assert status == 200
    assert body["choices"][0]["text"] == gw.decode(expected_tokens(ids, 4))
    assert body["usage"]["prompt_tokens"] == len(ids)


async def test_chat_uses_the_chat_template(nats_server, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
    async with gateway(nats_server.url, tokenizer) as gw:
        status, body, _ = await gw.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 5})
        want_prompt = gw.encode(tokenizer.tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False))
        assert gw.cluster.submits[0].prompt_token_ids == want_prompt
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": gw.decode(expected_tokens(want_prompt, 5))}
    assert body["usage"] == {"prompt_tokens": len(want_prompt), "completion_tokens": 5, "total_tokens": len(want_prompt) + 5}


async def test_streamed_completion_with_usage(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        events = await gw.sse("/v1/completions", {
            "model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == gw.decode(expected_tokens(PROMPT_IDS, 6))
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_streamed_chat_role_then_content(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        events = await gw.sse("/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "Hey"}], "max_tokens": 5, "stream": True})
        prompt = gw.cluster.submits[0].prompt_token_ids
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == gw.decode(expected_tokens(prompt, 5))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("cluster", [{"reverse": True}, {"duplicate": True}, {"reverse": True, "duplicate": True, "chunk_size": 1}])
async def test_out_of_order_and_duplicate_chunks_delivered_once_in_order(nats_server, tokenizer, cluster):
    async with gateway(nats_server.url, tokenizer, cluster) as gw:
        status, body, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 9, "logprobs": 1})
        events = await gw.sse("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 9, "stream": True})
    want = expected_tokens(PROMPT_IDS, 9)
    assert status == 200
    assert body["choices"][0]["text"] == gw.decode(want)
    assert body["usage"]["completion_tokens"] == 9
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-0.5] * 9
    assert body["choices"][0]["logprobs"]["tokens"] == [tokenizer.tokenizer.decode([t]) for t in want]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == gw.decode(want)


async def test_stop_string_cuts_text_and_cancels(nats_server, tokenizer):
    ids = tokenizer.tokenizer.encode(" alpha beta gamma delta", add_special_tokens=False)
    async with gateway(nats_server.url, tokenizer) as gw:
        status, body, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 12, "stop": [" gamma"]})
    assert status == 200
    assert body["choices"][0]["text"] == " alpha beta"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert [c.request_id for c in gw.cluster.cancels] == [body["id"]]


async def test_eos_finishes_with_stop(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, {"eos_token_id": 303}) as gw:
        status, body, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 10})
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3
    assert gw.cluster.cancels == []


async def test_request_id_honoured_or_generated(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        _, body, headers = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 1},
                                         headers={"X-Request-Id": "my-req_1"})
        _, body2, headers2 = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 1},
                                           headers={"X-Request-Id": "bad id.with>subject"})
    assert headers["X-Request-Id"] == body["id"] == "my-req_1"
    assert headers2["X-Request-Id"].startswith("cmpl-") and body2["id"] == headers2["X-Request-Id"]
    assert [s.request_id for s in gw.cluster.submits] == ["my-req_1", headers2["X-Request-Id"]]


async def test_openai_client_unchanged(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        comp = await client.completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=5)
        parts = [c.choices[0].text async for c in await client.completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=5, stream=True)]
        chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        chat_prompt = gw.cluster.submits[-1].prompt_token_ids
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True, stream_options={"include_usage": True})
        deltas, usage = [], None
        async for c in stream:
            if c.choices:
                deltas.append(c.choices[0].delta.content or "")
            usage = c.usage or usage
        models = await client.models.list()
        await client.close()
    assert comp.choices[0].text == "".join(parts) == gw.decode(expected_tokens(PROMPT_IDS, 5))
    assert comp.usage.total_tokens == 8
    assert chat.choices[0].message.content == "".join(deltas) == gw.decode(expected_tokens(chat_prompt, 4))
    assert usage.completion_tokens == 4 and usage.prompt_tokens == len(chat_prompt)
    assert [m.id for m in models.data] == [MODEL]


async def test_health_ready_metrics_openapi(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer) as gw:
        await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3})
        async with gw.http.get(gw.url + "/health") as r:
            assert r.status == 200
        async with gw.http.get(gw.url + "/ready") as r:
            assert r.status == 200 and (await r.json())["nodes"] == ["D0", "P0"]
        async with gw.http.get(gw.url + "/metrics") as r:
            metrics_text = await r.text()
        async with gw.http.get(gw.url + "/openapi.json") as r:
            doc = await r.json()
        await gw.cluster.stop()
        async with gw.http.get(gw.url + "/ready") as r:
            assert r.status == 503
    for name in ("flowkv_gateway_time_to_first_token_seconds_bucket", "flowkv_gateway_time_per_output_token_seconds_bucket",
                 "flowkv_gateway_e2e_request_latency_seconds_count", 'flowkv_gateway_requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in metrics_text
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                 "/health", "/ready", "/metrics", "/openapi.json"}

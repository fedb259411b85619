"""Gateway failure handling: cancels, node death and retries, scheduler rejections, admission, auth."""

from __future__ import annotations

import asyncio

import pytest

from libs.protocol.messages import ErrorCode, Rejected
from tests.services.fake_cluster import expected_tokens
from tests.services.gateway_harness import MODEL, gateway, tokenizer  # noqa: F401 (fixture)

PROMPT_IDS = [11, 22, 33, 44]
TWO_PAIRS = [("P0", "D0"), ("P1", "D1")]


async def _wait_for(cond, what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_client_disconnect_publishes_cancel(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, {"hold": True}) as gw:
        body = {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 5, "stream": True}
        task = asyncio.create_task(gw.http.post(gw.url + "/v1/completions", json=body, headers={"X-Request-Id": "gone-1"}))
        await _wait_for(lambda: gw.cluster.submits, "submit")
        task.cancel()  # the client hangs up before any token
        await asyncio.gather(task, return_exceptions=True)
        await _wait_for(lambda: gw.cluster.cancels, "cancel")
    assert [c.request_id for c in gw.cluster.cancels] == ["gone-1"]


async def test_client_leaving_while_queued_frees_its_place(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, {"hold_place": True}, queue_timeout_s=20.0) as gw:
        body = {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 5}
        task = asyncio.create_task(gw.http.post(gw.url + "/v1/completions", json=body, headers={"X-Request-Id": "queued-1"}))
        await _wait_for(lambda: gw.cluster.places, "placement request")
        assert gw.cluster.places[0].queue_timeout_s == 20.0  # the scheduler may hold it that long
        task.cancel()  # the client hangs up while the scheduler holds the request
        await asyncio.gather(task, return_exceptions=True)
        await _wait_for(lambda: gw.cluster.cancels, "cancel")
    assert [c.request_id for c in gw.cluster.cancels] == ["queued-1"]
    assert not gw.cluster.submits


async def test_a_scheduler_that_hangs_while_a_request_waits_is_a_503(nats_server, tokenizer):
    # The placement may wait 600 s in the scheduler's queue; the liveness probe, not that
    # timeout, finds out that the scheduler is gone (a partitioned host, a stuck loop).
    async with gateway(nats_server.url, tokenizer, {"hung": True}, place_timeout_s=0.3, queue_timeout_s=600.0,
                       scheduler_failover_s=0.0) as gw:
        status, out, headers = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3})
    assert (status, out["error"]["code"], headers["Retry-After"]) == (503, "scheduler_unavailable", "1")
    assert "stopped answering" in out["error"]["message"]
    assert [q.brief for q in gw.cluster.cluster_queries] == [True]
    assert [c.request_id for c in gw.cluster.cancels] == [gw.cluster.places[0].request_id]  # its place is freed


async def test_a_long_wait_for_a_live_scheduler_is_served(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, {"queued_s": 1.0}, place_timeout_s=0.3) as gw:
        status, out, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3})
    assert status == 200, out
    assert gw.cluster.cluster_queries and all(q.brief for q in gw.cluster.cluster_queries)  # probed, answered


async def test_queue_wait_is_reported_apart_from_control_plane(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, {"queued_s": 0.25, "prefill_s": 0.01}) as gw:
        body = {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3, "flowkv_timing": True}
        status, out, _ = await gw.post("/v1/completions", body)
    assert status == 200
    timing = out["flowkv"]
    assert (timing["queued_s"], timing["prefill_s"]) == (0.25, 0.01)
    assert timing["ttft_s"] >= 0.25
    # What is left of TTFT is the gateway's and the network's own part, not the wait.
    assert timing["control_plane_s"] == pytest.approx(timing["ttft_s"] - 0.01 - 0.25)


@pytest.mark.parametrize("stream", [False, True])
async def test_node_death_mid_stream_resubmits_gap_free(nats_server, tokenizer, stream):
    cluster = {"pairs": TWO_PAIRS, "die_after": {"D0": 5}, "chunk_size": 2}
    body = {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 10, "stream": stream}
    async with gateway(nats_server.url, tokenizer, cluster, stall_timeout_s=5.0) as gw:
        if stream:
            events = await gw.sse("/v1/completions", body)
            text = "".join(e["choices"][0]["text"] for e in events[:-1])
            assert events[-1] == "[DONE]"
        else:
            status, out, _ = await gw.post("/v1/completions", body)
            assert status == 200 and out["usage"]["completion_tokens"] == 10
            text = out["choices"][0]["text"]
        first, retry = gw.cluster.submits
        places = gw.cluster.places
    want = expected_tokens(PROMPT_IDS, 10)
    assert text == gw.decode(want)
    k = retry.output_offset
    assert 1 <= k <= 5  # tokens the client had when D0 died (the NODE_DOWN may overtake the last chunks)
    assert retry.request_id == first.request_id + "-r1"
    assert retry.prompt_token_ids == PROMPT_IDS + want[:k]
    assert retry.num_original_prompt_tokens == 4 and retry.sampling.max_tokens == 10 - k
    assert retry.decode_node == "D1" and places[1].exclude_nodes == ["D0"]
    assert places[1].num_prompt_tokens == 4 + k
    assert first.request_id in [c.request_id for c in gw.cluster.cancels]


async def test_silent_stall_is_retried_after_timeout(nats_server, tokenizer):
    cluster = {"pairs": TWO_PAIRS, "die_after": {"D0": 3}, "announce_death": False}
    async with gateway(nats_server.url, tokenizer, cluster, stall_timeout_s=0.3) as gw:
        status, out, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 8})
        retry = gw.cluster.submits[1]
    assert status == 200
    assert out["choices"][0]["text"] == gw.decode(expected_tokens(PROMPT_IDS, 8))
    assert retry.output_offset == 3 and retry.prompt_token_ids == PROMPT_IDS + expected_tokens(PROMPT_IDS, 3)


async def test_retries_exhausted_is_a_clear_error(nats_server, tokenizer):
    cluster = {"pairs": [("P0", "D0"), ("P1", "D1"), ("P2", "D2")], "die_after": {"D0": 2, "D1": 3, "D2": 4}}
    async with gateway(nats_server.url, tokenizer, cluster, max_retries=1) as gw:
        status, out, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 8})
    assert status == 502
    assert out["error"]["code"] == "node_failed" and out["error"]["type"] == "server_error"
    assert len(gw.cluster.submits) == 2


async def test_retries_exhausted_mid_sse_sends_error_event_then_done(nats_server, tokenizer):
    cluster = {"pairs": [("P0", "D0")], "die_after": {"D0": 3}}
    async with gateway(nats_server.url, tokenizer, cluster) as gw:
        events = await gw.sse("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 8, "stream": True})
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == ErrorCode.NO_NODES.value  # the re-placement found no live pair
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == gw.decode(expected_tokens(PROMPT_IDS, 3))


async def test_a_dead_node_the_scheduler_has_not_noticed_gets_no_retries(nats_server, tokenizer):
    """The gateway sees D0 die (its NODE_DOWN came from elsewhere, or its stream broke)
    before the scheduler's node timeout: the re-placement without D0 finds no node, and
    rather than placing on "any node" (D0 again, which would spend every retry on it in
    milliseconds) the gateway asks again until the scheduler agrees, and then D1 has
    joined: the request completes there."""
    cluster = {"pairs": [("P0", "D0")], "die_after": {"D0": 3}, "noticed_after_s": 1.0, "announce_death": True}
    async with gateway(nats_server.url, tokenizer, cluster, max_retries=1) as gw:
        async def d1_joins() -> None:  # a decode node comes (a flip, a restart) once D0 is gone
            await _wait_for(lambda: "D0" in gw.cluster.dead, "D0's death")
            await asyncio.sleep(1.5)
            gw.cluster.pairs.append(("P0", "D1"))
            await gw.cluster.add_node("D1")

        joining = asyncio.create_task(d1_joins())
        status, out, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 8})
        await joining
        submits = [(s.request_id, s.decode_node) for s in gw.cluster.submits]
        places = gw.cluster.places
    assert status == 200, out
    assert out["choices"][0]["text"] == gw.decode(expected_tokens(PROMPT_IDS, 8))
    assert [d for _, d in submits] == ["D0", "D1"]  # no attempt went back to the dead D0
    assert len(places) >= 3 and all(p.exclude_nodes == ["D0"] for p in places[1:])


@pytest.mark.parametrize("code,status,retry_after", [(ErrorCode.OVERLOADED, 429, "3"), (ErrorCode.NO_NODES, 503, None)])
async def test_scheduler_rejection(nats_server, tokenizer, code, status, retry_after):
    reject = Rejected(request_id="x", code=code, reason="busy", retry_after_s=2.5 if code is ErrorCode.OVERLOADED else 0.0)
    async with gateway(nats_server.url, tokenizer, {"reject": reject}) as gw:
        got, out, headers = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3})
        got_stream, _, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3, "stream": True})
    assert (got, got_stream) == (status, status)
    assert out["error"]["code"] == code.value
    assert headers.get("Retry-After") == retry_after
    assert gw.cluster.submits == [] and gw.cluster.cancels == []


async def test_no_scheduler_is_503(nats_server, tokenizer):
    # queue_timeout_s=0: a scheduler that may hold requests is given place + queue timeout.
    async with gateway(nats_server.url, tokenizer, place_timeout_s=0.3, queue_timeout_s=0.0,
                       scheduler_failover_s=0.5) as gw:
        await gw.cluster.stop()
        status, out, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3})
    assert status == 503 and out["error"]["code"] == "scheduler_unavailable"


async def test_admission_limits_before_nats(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, {"hold": True}, max_concurrent_requests=1, retry_after_s=2.0) as gw:
        first = asyncio.create_task(gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3}))
        await _wait_for(lambda: gw.cluster.submits, "first submit")
        status, out, headers = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3})
        assert (status, headers["Retry-After"], out["error"]["code"]) == (429, "2", "too_many_requests")
        assert len(gw.cluster.places) == 1  # the refused request never reached the scheduler
        gw.cluster.released.set()
        status1, out1, _ = await first
    assert status1 == 200 and out1["usage"]["completion_tokens"] == 3


async def test_queued_token_limit(nats_server, tokenizer):
    async with gateway(nats_server.url, tokenizer, {"hold": True}, max_queued_tokens=6) as gw:
        first = asyncio.create_task(gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3}))
        await _wait_for(lambda: gw.cluster.submits, "first submit")
        status, _, _ = await gw.post("/v1/completions", {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 3})
        gw.cluster.released.set()
        await first
    assert status == 429


async def test_api_keys(nats_server, tokenizer):
    body = {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 2}
    async with gateway(nats_server.url, tokenizer, api_keys=["k1", "k2"]) as gw:
        none, out_none, _ = await gw.post("/v1/completions", body)
        bad, out_bad, _ = await gw.post("/v1/completions", body, headers={"Authorization": "Bearer nope"})
        good, _, _ = await gw.post("/v1/completions", body, headers={"Authorization": "Bearer k2"})
        async with gw.http.get(gw.url + "/v1/models") as r:
            models_status = r.status
        async with gw.http.get(gw.url + "/health") as r:
            health_status = r.status
        async with gw.http.get(gw.url + "/metrics") as r:
            metrics_status = r.status
    assert (none, bad, good) == (401, 401, 200)
    assert out_none["error"]["code"] == out_bad["error"]["code"] == "invalid_api_key"
    assert (models_status, health_status, metrics_status) == (401, 200, 200)
    assert "k1" not in repr(gw.config) and "k2" not in repr(gw.config)

"""The bench against an aiohttp double of the gateway's HTTP API that streams SSE like it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from typing import Any

import pytest
from aiohttp import web

from libs.loadgen.client import ClientOptions
from libs.loadgen.runner import run_benchmark
from libs.loadgen.workloads import WorkloadOptions, make_workload
from services.cli import main as cli

FIRST_TOKEN_DELAY_S = 0.02


class FakeGateway:
    """Answers /v1/completions and /v1/chat/completions with one SSE chunk per token.

    Request ``index`` 3 (the prompt's first id is 3) gets a 429; every body is kept.
    """

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.serve)
        app.router.add_post("/v1/chat/completions", self.serve)
        return app

    async def serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body.get("prompt", [None])[0] == 3:
            return web.json_response({"error": {"message": "busy", "code": "overloaded"}}, status=429)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chat = "messages" in body
            n = body["max_completion_tokens"] if chat else body["max_tokens"]
            await asyncio.sleep(FIRST_TOKEN_DELAY_S)
            for i in range(n):
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                choice["finish_reason"] = "length" if i == n - 1 else None
                event: dict[str, Any] = {"choices": [choice]}
                if i == n - 1 and body.get("flowkv_timing"):
                    event["flowkv"] = {"ttft_s": 0.02, "prefill_s": 0.015, "control_plane_s": 0.005}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                await asyncio.sleep(0.001)
            prompt_tokens = len(body["prompt"]) if not chat else 7
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def fake_gateway():
    fake = FakeGateway()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_fixed_rate_run_counts_times_and_failures(fake_gateway) -> None:
    fake, url = fake_gateway
    specs = make_workload("random", 8, seed=2, opts=WorkloadOptions(input_len=20, output_len=6, token_id_range=(10, 20)))
    specs[3].prompt_token_ids[0] = 3  # the double refuses this one
    started = time.perf_counter()
    result = await run_benchmark(specs, ClientOptions(url, "m", server_timing=True), request_rate=40.0, seed=1)
    wall = time.perf_counter() - started
    assert len(fake.bodies) == 8
    assert [b["prompt"] for b in fake.bodies] == [s.prompt_token_ids for s in specs]
    assert all(b["ignore_eos"] is True and b["stream"] is True and b["flowkv_timing"] is True for b in fake.bodies)
    assert [b["max_tokens"] for b in fake.bodies] == [s.output_len for s in specs]
    recs = result.records
    assert [r.index for r in recs] == list(range(8))
    assert [r.status for r in recs] == [200, 200, 200, 429, 200, 200, 200, 200]
    ok = [r for r in recs if r.ok]
    assert [r.output_tokens for r in ok] == [s.output_len for s in specs if s.index != 3]
    assert [r.prompt_tokens for r in ok] == [s.input_len for s in specs if s.index != 3]
    for r in ok:
        assert FIRST_TOKEN_DELAY_S <= r.ttft <= r.e2e
        assert len(r.itl) == r.output_tokens - 1 and all(g >= 0 for g in r.itl)
        assert r.server_timing == {"ttft_s": 0.02, "prefill_s": 0.015, "control_plane_s": 0.005}
    starts = [r.start for r in recs]
    assert starts == sorted(starts) and starts[0] >= 0
    assert 0 < result.duration_s <= wall


async def test_explicit_gaps_set_the_send_times(fake_gateway) -> None:
    # One arrival schedule split over several servers: each part is sent on its own gaps.
    _, url = fake_gateway
    specs = make_workload("fixed", 4, opts=WorkloadOptions(input_len=4, output_len=2))
    result = await run_benchmark(specs, ClientOptions(url, "m"), gaps=[0.0, 0.2, 0.0, 0.1])
    starts = [r.start for r in result.records]
    assert starts[1] >= 0.2 and starts[2] >= 0.2 and starts[3] >= 0.3
    assert all(r.ok for r in result.records)
    for bad in ([0.1], [0.0, -1.0, 0.0, 0.0]):
        with pytest.raises(ValueError):
            await run_benchmark(specs, ClientOptions(url, "m"), gaps=bad)


async def test_cutoff_cancels_the_requests_still_open(fake_gateway) -> None:
    _, url = fake_gateway
    short = make_workload("fixed", 2, opts=WorkloadOptions(input_len=4, output_len=2))
    long = dataclasses.replace(make_workload("fixed", 1, opts=WorkloadOptions(input_len=4, output_len=5000))[0],
                               index=2)  # >= 5 s of tokens from the double
    result = await run_benchmark([*short, long], ClientOptions(url, "m"), gaps=[0.0, 0.05, 0.1], cutoff_s=0.5)
    recs = result.records
    assert [r.index for r in recs] == [0, 1, 2]
    assert recs[0].ok and recs[1].ok and recs[1].start >= 0.05
    assert not recs[2].ok and recs[2].error == "cut off" and recs[2].start == pytest.approx(0.15)


async def test_max_concurrency_caps_in_flight(fake_gateway) -> None:
    fake, url = fake_gateway
    specs = make_workload("fixed", 6, opts=WorkloadOptions(input_len=4, output_len=5))
    result = await run_benchmark(specs, ClientOptions(url, "m", endpoint="chat"), max_concurrency=2)
    assert fake.max_in_flight == 2
    assert all(r.ok and r.output_tokens == 5 for r in result.records)
    assert all(b["messages"][0]["role"] == "user" and b["max_completion_tokens"] == 5 for b in fake.bodies)


async def test_cli_writes_json_and_png(fake_gateway, tmp_path, capsys) -> None:
    fake, url = fake_gateway
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    argv = ["bench", "--base-url", url, "--model", "m", "--workload", "fixed", "--num-requests", "4", "--input-len", "8",
            "--output-len", "3", "--request-rate", "50", "--slo-ttft-ms", "10000", "--no-progress",
            "--out-json", str(out_json), "--out-png", str(out_png)]
    status = await asyncio.to_thread(cli.main, argv)
    assert status == 0
    doc = json.loads(out_json.read_text())
    assert (doc["summary"]["completed"], doc["summary"]["total_output_tokens"]) == (4, 12)
    assert doc["summary"]["goodput_rps"] == pytest.approx(doc["summary"]["request_throughput"])
    assert [r["output_tokens"] for r in doc["requests"]] == [3, 3, 3, 3]
    assert doc["meta"]["workload"] == "fixed" and doc["meta"]["mean_input_len"] == 8.0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Successful requests:" in capsys.readouterr().out

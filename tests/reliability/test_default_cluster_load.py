"""Ordinary load on the cluster a new user starts: ``flowkv up`` with its defaults (the
SmolLM2 model on CPU, one prefill and one decode node sharing the machine's cores).

32 concurrent streams of 256-token prompts must all complete with exactly the length
they asked for, and the scheduler must never call a node down: a node busy computing is
not a dead one. The second test makes every engine step of a node sleep past the
scheduler's node timeout (test-only fault injection) and checks the same: its load
reports still arrive on time, so it is never declared dead and loses no request.

The scheduler's events are read from NATS directly (the embedded broker, started on a
known port with a known token), so no event can be missed.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from libs.protocol import messages
from libs.protocol.messages import EventKind, SchedEvent
from libs.protocol.subjects import sched_events
from services.cli.launch import start_cluster, stop_cluster
from services.common.natsserver import free_port

pytestmark = pytest.mark.slow

PROMPT_TOKENS = 256
STREAMS = 32
OUTPUT_TOKENS = 16


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]


async def stream_one(session: aiohttp.ClientSession, url: str, seed: int, max_tokens: int) -> dict[str, Any]:
    """One streamed completion; its HTTP status, token count, finish reason and usage."""
    body = {"model": "smollm2", "prompt": prompt(seed), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result: dict[str, Any] = {"status": 0, "chunks": 0, "finish_reason": None, "usage": None, "error": None}
    async with session.post(url + "/v1/completions", json=body) as resp:
        result["status"] = resp.status
        if resp.status != 200:
            result["error"] = await resp.text()
            return result
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                result["error"] = event["error"]
            for choice in event.get("choices", []):
                if choice.get("finish_reason"):
                    result["finish_reason"] = choice["finish_reason"]
                if choice.get("text") is not None:
                    result["chunks"] += 1
            if event.get("usage"):
                result["usage"] = event["usage"]
    return result


class DefaultCluster:
    """``flowkv up`` (defaults, plus the given flags) on free ports, with an events listener."""

    def __init__(self, tmp_path: Path, up_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.port, self.nats_port = free_port(), free_port()
        self.token = secrets.token_hex(16)
        self.up_args = ["--nats-port", str(self.nats_port), *(up_args or [])]
        self.env = {"FLOWKV_UP_NATS_TOKEN": self.token, **(env or {})}
        self.log_path = tmp_path / "up.log"
        self.events: list[SchedEvent] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._nc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> DefaultCluster:
        log = open(self.log_path, "wb")
        try:
            self.proc = await asyncio.to_thread(
                start_cluster, self.up_args, port=self.port, timeout=600, env=self.env, output=log)
        finally:
            log.close()
        self._nc = await nats.connect(f"nats://127.0.0.1:{self.nats_port}", token=self.token)

        async def on_event(msg: Any) -> None:
            event = messages.decode(msg.data)
            if isinstance(event, SchedEvent):
                self.events.append(event)

        await self._nc.subscribe(sched_events(), cb=on_event)
        await self._nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()
        if self.proc is not None:
            await asyncio.to_thread(stop_cluster, self.proc)

    def down_events(self) -> list[SchedEvent]:
        return [e for e in self.events if e.kind is EventKind.NODE_DOWN]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


async def run_streams(url: str, count: int, max_tokens: int) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=1500)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await asyncio.gather(*(stream_one(session, url, seed, max_tokens) for seed in range(count)))


def assert_all_complete(results: list[dict[str, Any]], max_tokens: int, log: str) -> None:
    bad = [r for r in results
           if r["status"] != 200 or r["error"] or r["finish_reason"] != "length"
           or not r["usage"] or r["usage"]["completion_tokens"] != max_tokens
           or r["usage"]["prompt_tokens"] != PROMPT_TOKENS]
    assert not bad, f"{len(bad)} of {len(results)} requests did not complete exactly: {bad[:3]}\n{log}"


@pytest.mark.timeout(1500)
async def test_default_cluster_serves_32_streams_of_256_token_prompts_with_no_node_down(tmp_path):
    async with DefaultCluster(tmp_path) as cluster:
        results = await run_streams(cluster.url, STREAMS, OUTPUT_TOKENS)
        assert_all_complete(results, OUTPUT_TOKENS, cluster.log())
        assert not cluster.down_events(), f"busy nodes declared down: {cluster.down_events()}\n{cluster.log()}"
        # The listener heard the scheduler (so the absence of NODE_DOWN means something).
        assert any(e.kind is EventKind.PLACEMENT for e in cluster.events), cluster.events


@pytest.mark.timeout(900)
async def test_node_whose_steps_outlast_the_node_timeout_is_not_declared_dead(tmp_path):
    # Every engine step sleeps 4 s, past the scheduler's 3 s node timeout (its default).
    env = {"FLOWKV_FAULT_INJECT": "engine_slow_step:4"}
    async with DefaultCluster(tmp_path, ["--colocated", "1"], env) as cluster:
        results = await run_streams(cluster.url, 4, 3)
        assert_all_complete(results, 3, cluster.log())
        assert not cluster.down_events(), f"a slow node was declared down: {cluster.down_events()}\n{cluster.log()}"

"""A gateway on a free port in-process, wired to a FakeCluster over a real nats-server."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp import web

from services.common.nats import NatsConfig
from services.common.natsserver import free_port
from services.gateway.app import create_app, make_runner
from services.gateway.config import GatewayConfig
from services.gateway.tokenizer import ModelTokenizer, load_model_tokenizer
from tests.services.fake_cluster import FakeCluster

MODEL = "tiny"


@pytest.fixture(scope="session")
def tokenizer() -> ModelTokenizer:
    return load_model_tokenizer(MODEL)


@dataclass
class Harness:
    url: str
    cluster: FakeCluster
    config: GatewayConfig
    http: aiohttp.ClientSession
    tokenizer: ModelTokenizer

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        async with self.http.post(self.url + path, json=body, headers=headers) as r:
            text = await r.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = text
            return r.status, data, r.headers

    async def sse(self, path: str, body: Any) -> list[Any]:
        """POST with stream=true; the parsed ``data:`` events ('[DONE]' kept as a string)."""
        events: list[Any] = []
        async with self.http.post(self.url + path, json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = (await r.read()).decode()
        for block in raw.split("\n\n"):
            if block.startswith("data: "):
                payload = block[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        return events

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.tokenizer.encode(text, add_special_tokens=False)


@contextlib.asynccontextmanager
async def gateway(nats_url: str, tokenizer: ModelTokenizer, cluster: dict[str, Any] | None = None, **config: Any) -> AsyncIterator[Harness]:
    """Start a FakeCluster (its own connection) and a gateway; stop both after."""
    nc = await nats.connect(nats_url)
    fake = await FakeCluster(nc, **(cluster or {})).start()
    port = free_port()
    cfg = GatewayConfig(model=MODEL, port=port, gateway_id="gwtest", **config)
    # The gateway gets a connection of its own, opened here so the test controls its life.
    gw_nc = await nats.connect(nats_url)
    runner = make_runner(create_app(cfg, NatsConfig(url=nats_url), nc=gw_nc, tokenizer=tokenizer))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    http = aiohttp.ClientSession()
    try:
        yield Harness(f"http://127.0.0.1:{port}", fake, cfg, http, tokenizer)
    finally:
        await http.close()
        await runner.cleanup()
        await gw_nc.drain()
        await fake.stop()
        await nc.drain()

"""The benchmark's load and its view of the roles: open-loop and closed-loop drivers, role polls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import nats

from libs.loadgen.client import ClientOptions, send
from libs.loadgen.metrics import RequestRecord
from libs.loadgen.runner import run_benchmark
from libs.loadgen.workloads import RequestSpec
from scheduler_real import plan, report
from services.common.lifecycle import run as run_async
from services.common.messaging import ask_cluster


async def drive_open(specs: list[RequestSpec], times: list[float], opts: ClientOptions,
                     cutoff_s: float) -> tuple[list[RequestRecord], float]:
    """Send each spec at its time; requests still open ``cutoff_s`` after the start are cut off."""
    res = await run_benchmark(specs, opts, gaps=[b - a for a, b in zip([0.0, *times], times)], cutoff_s=cutoff_s)
    return res.records, res.duration_s


async def drive_closed(mix: str, seed: str, concurrency: int, duration_s: float, opts: ClientOptions,
                       drain_s: float) -> list[RequestRecord]:
    """``concurrency`` senders, each sending its next request when the last is answered, for ``duration_s``."""
    stream = plan.spec_stream(mix, seed)
    records: list[RequestRecord] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()

        async def sender() -> None:
            while time.perf_counter() - t0 < duration_s:
                rec = await send(session, next(stream), opts, t0)
                records.append(rec)
                if not rec.ok:
                    await asyncio.sleep(0.1)  # a refusing cluster: do not spin

        try:
            await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(concurrency))), duration_s + drain_s)
        except TimeoutError:
            pass
    return records


async def query_roles(nc: nats.NATS) -> list[str]:
    return sorted(n.role.value for n in (await ask_cluster(nc, 5.0)).nodes)


async def watch_roles(url: str, t0: float, timeline: list[list[Any]], stop: asyncio.Event) -> None:
    """Append ``[t, "2P 2D"]`` whenever the roles change (polled every second)."""
    nc = await nats.connect(url)
    try:
        while not stop.is_set():
            try:
                label = report.roles_label(await query_roles(nc))
            except Exception:  # noqa: BLE001 - a missed poll is only a gap in the timeline
                label = None
            if label and (not timeline or timeline[-1][1] != label):
                timeline.append([round(time.perf_counter() - t0, 2), label])
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        await nc.drain()


def roles_now(url: str) -> list[str]:
    async def one() -> list[str]:
        nc = await nats.connect(url)
        try:
            return await query_roles(nc)
        finally:
            await nc.drain()

    return run_async(one())

"""Drive a workload against a server: arrivals, a concurrency cap, one task per request."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from libs.loadgen.arrivals import intervals
from libs.loadgen.client import ClientOptions, send
from libs.loadgen.metrics import RequestRecord
from libs.loadgen.workloads import RequestSpec


@dataclass
class RunResult:
    """Every request's record (in request order) and the run's duration in seconds."""

    records: list[RequestRecord]
    duration_s: float


async def run_benchmark(specs: list[RequestSpec], client: ClientOptions, request_rate: float = float("inf"),
                        burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                        progress: bool = False, gaps: list[float] | None = None) -> RunResult:
    """Send ``specs`` on a Poisson/gamma schedule and wait for every answer.

    A request's arrival time is fixed by the schedule; with ``max_concurrency`` it may be
    sent later, when a slot frees (like vLLM: the cap wins over the rate).

    Args:
        specs: the requests, in sending order.
        client: server, model, endpoint and request options.
        request_rate: mean requests per second (``inf``: all at once).
        burstiness: gamma shape of the gaps (1: Poisson).
        max_concurrency: requests in flight at most (None: no cap).
        seed: seeds the arrival schedule.
        progress: show a tqdm bar on stderr.
        gaps: seconds to wait before each request (the first included), instead of drawing
            them from ``request_rate``/``burstiness``/``seed``: one arrival schedule split
            over several servers keeps every request's send time.

    Returns:
        The records and the duration (first send -> last completion).
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if gaps is None:
        gaps = intervals(len(specs), request_rate, burstiness, seed)
    elif len(gaps) != len(specs) or any(g < 0 for g in gaps):
        raise ValueError("gaps must be one non-negative gap per request")
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), unit="req", dynamic_ncols=True)
    conn = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec) -> RequestRecord:
            if limit is None:
                rec = await send(session, spec, client, t0)
            else:
                async with limit:
                    rec = await send(session, spec, client, t0)
            if bar is not None:
                bar.update(1)
            return rec

        tasks = []
        for spec, gap in zip(specs, gaps):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(spec)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return RunResult(list(records), duration)

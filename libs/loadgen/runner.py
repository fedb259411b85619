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
                        progress: bool = False, gaps: list[float] | None = None,
                        cutoff_s: float | None = None) -> RunResult:
    """Send ``specs`` on a Poisson/gamma schedule and wait for every answer.

    A request's arrival time is fixed by the schedule (kept against the clock: a late
    send does not delay the ones after it); with ``max_concurrency`` it may be sent later,
    when a slot frees (like vLLM: the cap wins over the rate).

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
        cutoff_s: stop waiting this long after the start: requests still open are
            cancelled and recorded with the error ``"cut off"`` (None: wait for all).

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

        tasks, ats = [], []
        at = 0.0
        for spec, gap in zip(specs, gaps):
            at += gap
            ats.append(at)
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec)))
        if cutoff_s is None:
            records = list(await asyncio.gather(*tasks))
        else:
            records = await _until_cutoff(specs, ats, tasks, cutoff_s - (time.perf_counter() - t0))
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return RunResult(records, duration)


async def _until_cutoff(specs: list[RequestSpec], ats: list[float], tasks: list[asyncio.Task[RequestRecord]],
                        timeout: float) -> list[RequestRecord]:
    """Every request's record once ``timeout`` has passed or all are answered; the rest are
    cancelled (their records start at their scheduled time)."""
    pending: set[asyncio.Task[RequestRecord]] = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    records = []
    for spec, at, task in zip(specs, ats, tasks):
        exc = None if task in pending else task.exception()
        if task in pending or exc is not None:  # send() records the errors it expects; others land here
            records.append(RequestRecord(index=spec.index, start=at, prompt_tokens=spec.input_len,
                                         error="cut off" if exc is None else repr(exc)))
        else:
            records.append(task.result())
    return records

"""One HTTP request, many generations: ``n``, ``best_of`` and batches of prompts.

Each (prompt, candidate) pair is a sub-request of its own on the cluster: placed, retried
and cancelled by the dispatcher like any request, with its own wire id (``<id>-<k>`` when
there are several). A task per sub-request reads its deliveries through a
:class:`Generation` (stop strings, counts) and puts the text on one queue; the handler
reads that queue. Leaving the ``async with`` (the response is done, it failed, or the
client went away) cancels every task still running, and each one's dispatcher stream
then publishes its cancel, so no node keeps a block of an abandoned request.

With a seed, candidate ``j`` of every prompt samples with ``seed + j`` (as vLLM seeds the
children of an ``n > 1`` request): seeded requests are reproducible, and the candidates
differ from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from services.gateway.dispatch import Dispatcher, Job
from services.gateway.generation import Generation
from services.gateway.schemas import GenerationRequest


@dataclass
class Candidate:
    """One sub-request: prompt ``prompt``, candidate ``number`` of that prompt."""

    key: int  # position among all sub-requests (prompt * best_of + number)
    prompt: int
    number: int
    job: Job
    gen: Generation
    index: int = -1  # the choice index the client sees (prompt * n + rank); -1: not returned


@dataclass
class Output:
    """New text (and its logprobs) of one candidate; ``finished`` on its last."""

    candidate: Candidate
    text: str
    logprobs: dict[str, Any] | None
    finished: bool


def candidates(req: GenerationRequest, request_id: str, model: str, tokenizer: Any, started: float) -> list[Candidate]:
    """The sub-requests of ``req`` (tokenized), in prompt-major order."""
    out: list[Candidate] = []
    many = len(req.prompts) * req.best_of > 1
    for i, prompt in enumerate(req.prompts):
        for j in range(req.best_of):
            key = i * req.best_of + j
            sampling = req.sampling
            if req.sampling.seed is not None and j:
                sampling = msgspec.structs.replace(sampling, seed=_wrap_seed(req.sampling.seed + j))
            job = Job(f"{request_id}-{key}" if many else request_id, model, prompt.token_ids, sampling,
                      req.ttft_slo_s, req.tpot_slo_s)
            c = Candidate(key, i, j, job, Generation(req, tokenizer, started, prompt.token_ids))
            if req.best_of == req.n:
                c.index = i * req.n + j
            out.append(c)
    return out


def _wrap_seed(seed: int) -> int:
    """Keep ``seed + j`` a signed 64-bit integer."""
    return (seed + 2**63) % 2**64 - 2**63


def rank(req: GenerationRequest, cands: list[Candidate]) -> list[Candidate]:
    """The candidates returned, in choice order: per prompt the ``n`` best by cumulative logprob
    when ``best_of > n`` (vLLM's rule), else all of them."""
    returned: list[Candidate] = []
    for i in range(len(req.prompts)):
        mine = [c for c in cands if c.prompt == i]
        if req.best_of > req.n:
            mine = sorted(mine, key=lambda c: c.gen.cum_logprob, reverse=True)[: req.n]
        for r, c in enumerate(mine):
            c.index = i * req.n + r
            returned.append(c)
    return returned


class FanOut:
    """Runs the candidates' generations concurrently; use as ``async with``.

    Args:
        dispatcher: the gateway's dispatcher.
        cands: the sub-requests.
    """

    def __init__(self, dispatcher: Dispatcher, cands: list[Candidate]) -> None:
        self.dispatcher = dispatcher
        self.cands = cands
        self._queue: asyncio.Queue[Output | BaseException] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> FanOut:
        self._tasks = [asyncio.create_task(self._run(c), name=f"generate-{c.job.request_id}") for c in self.cands]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        # Each cancelled stream publishes its cancel on the way out; wait for them all.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, c: Candidate) -> None:
        try:
            async with contextlib.aclosing(self.dispatcher.generate(c.job)) as items:
                async for item in items:
                    text, lp = c.gen.take(item)
                    self._queue.put_nowait(Output(c, text, lp, c.gen.finished))
                    if c.gen.finished:
                        return
            if not c.gen.finished:  # the dispatcher ended the stream without a finish marker
                c.gen.finished, c.gen.finish_reason = True, c.gen.finish_reason or "stop"
                self._queue.put_nowait(Output(c, "", None, True))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an ApiError (rejected, retries spent) or a bug: the handler answers it
            self._queue.put_nowait(exc)

    async def outputs(self) -> AsyncIterator[Output]:
        """Every candidate's outputs as they come, until all have finished.

        Raises:
            ApiError: a candidate's request failed (the first failure ends the whole request).
        """
        left = len(self.cands)
        while left:
            out = await self._queue.get()
            if isinstance(out, BaseException):
                raise out
            if out.finished:
                left -= 1
            yield out

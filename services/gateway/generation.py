"""One request's output as the client sees it: text deltas, stop strings, counts, timings.

The gateway turns token ids into text itself (with the engine's incremental
detokenizer), so the text stays continuous when a retry moves the request to another
node, and a stop string is cut here even if it spans two nodes' chunks.
"""

from __future__ import annotations

import time
from typing import Any

from libs.engine.detokenizer import IncrementalDetokenizer
from services.common.tracing import tracer
from services.gateway import metrics
from services.gateway.responses import LogprobsBuilder
from services.gateway.schemas import GenerationRequest
from services.gateway.streams import Delivery

_TRACER = tracer("flowkv.gateway")


class Generation:
    """Follows one request's deliveries.

    Args:
        req: the validated, tokenized request.
        tokenizer: the model's tokenizer.
        started: ``time.monotonic()`` when the request arrived.
        prompt_token_ids: the prompt this generation continues (default: the request's first).
    """

    def __init__(self, req: GenerationRequest, tokenizer: Any, started: float,
                 prompt_token_ids: list[int] | None = None) -> None:
        self.req = req
        self.prompt_token_ids = req.prompt_token_ids if prompt_token_ids is None else prompt_token_ids
        self.detok = IncrementalDetokenizer(tokenizer, self.prompt_token_ids, req.sampling.stop)
        self.logprobs = LogprobsBuilder(req.endpoint, tokenizer) if req.logprobs is not None else None
        self.started = started
        self.first_token_at: float | None = None
        self.first_token_ns = 0  # wall clock (the stream span's start)
        self.last_token_ns = 0
        self.prefill_s = 0.0  # the engine's prefill time reported with the first token (0: not reported)
        self.queued_s = 0.0  # time in the scheduler's queue before the first token
        self.num_output = 0
        self.num_cached = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.cum_logprob = 0.0  # sum of the sampled tokens' logprobs (ranks best_of candidates)

    def take(self, item: Delivery) -> tuple[str, dict[str, Any] | None]:
        """Consume one delivery; returns the new text and the logprobs of its tokens.

        After a stop string the rest of the delivery is dropped and the generation is
        finished with reason ``stop``.
        """
        now = time.monotonic()
        if self.first_token_at is None:
            self.queued_s += item.queued_s  # every attempt's wait before the first token
        if item.token_ids:
            self.last_token_ns = time.time_ns()
        if item.token_ids and self.first_token_at is None:
            self.first_token_at = now
            self.first_token_ns = self.last_token_ns
            metrics.TTFT.observe(now - self.started)
            self.prefill_s = item.prefill_s
            if item.prefill_s > 0:
                metrics.CONTROL_PLANE.observe(max(0.0, now - self.started - item.prefill_s - self.queued_s))
        self.num_cached = max(self.num_cached, item.num_cached_tokens)
        used: list[int] = []
        for tid in item.token_ids:
            self.detok.add_token(tid)
            used.append(tid)
            if self.detok.stopped:
                break
        self.num_output += len(used)
        self.cum_logprob += sum(lp.logprob for lp in (item.logprobs or [])[: len(used)])
        metrics.GENERATION_TOKENS.inc(len(used))
        if self.detok.stopped:
            self.finished, self.finish_reason = True, "stop"
        elif item.finished:
            self.finished, self.finish_reason = True, item.finish_reason or "stop"
        text = self.detok.take_delta(final=self.finished)
        lp = self.logprobs.build(used, item.logprobs[: len(used)] if item.logprobs else None) if self.logprobs else None
        if self.finished:
            self._observe_end(now)
        return text, lp

    def timing(self) -> dict[str, float | None]:
        """The ``flowkv`` extension object: TTFT, the engine's prefill time, the wait in the
        scheduler's queue, and what is left of TTFT without those two.

        ``ttft_s`` is the gateway's arrival -> first token received; ``control_plane_s`` is
        ``ttft_s - prefill_s - queued_s`` (None while no token came or the node reported no
        prefill time).
        """
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        overhead = None if ttft is None or self.prefill_s <= 0 else ttft - self.prefill_s - self.queued_s
        return {"ttft_s": ttft, "prefill_s": self.prefill_s, "queued_s": self.queued_s, "control_plane_s": overhead}

    def record_stream_span(self, request_id: str) -> None:
        """Emit the ``stream`` span (first token -> last token) under the current span; nothing
        if no token came."""
        if not self.first_token_ns:
            return
        span = _TRACER.start_span("stream", start_time=self.first_token_ns)
        span.set_attributes({"flowkv.request_id": request_id, "flowkv.tokens.output": self.num_output,
                             "flowkv.finish_reason": self.finish_reason or ""})
        span.end(end_time=max(self.last_token_ns, self.first_token_ns))

    def _observe_end(self, now: float) -> None:
        metrics.E2E.observe(now - self.started)
        metrics.PROMPT_TOKENS.inc(len(self.prompt_token_ids))
        if self.first_token_at is not None and self.num_output > 1:
            metrics.TPOT.observe((now - self.first_token_at) / (self.num_output - 1))

"""One request's state inside the engine."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

from libs.engine.detokenizer import IncrementalDetokenizer
from libs.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks; prefilling (maybe in chunks) or decoding
    HELD = "held"  # prefill_only and done: blocks kept for the hand-off until release()
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """A request and its progress.

    ``token_ids`` is prompt + output so far. ``num_computed_tokens`` of them have KV in
    the pool; the engine computes the rest (a prefill chunk, or the one decode token)
    and samples when all are computed.

    The last ``num_prior_output_tokens`` of the prompt are output the request produced
    before it came to this engine (a recompute after a failed hand-off, a retry): the
    seeds, the penalties and the grammar treat them as output, so the request continues
    as if it had never moved.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detok: IncrementalDetokenizer
    prefill_only: bool = False
    seed: int = 0  # the request's seed; each output token draws from (seed, its index)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # perf_counter() at the start of the step that first scheduled this prompt, for TokenOutput.prefill_s
    prefill_started_at: float | None = None
    num_prior_output_tokens: int = 0
    matcher: Any = None  # the grammar matcher (llguidance.LLMatcher) of a structured request
    # Objectives the engine paces prompts by (libs.engine.pacing): perf_counter() times.
    ttft_deadline: float = 0.0  # when the first token is due (0: no TTFT objective)
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0  # 0: no TPOT objective
    decode_limit: float = 0.0  # when its last token is due under tpot_slo_s (set as it starts decoding here)

    @property
    def needs_logits_processing(self) -> bool:
        """Whether the sampler changes this request's logits (bias, penalties, grammar)."""
        p = self.params
        return bool(p.penalized or p.logit_bias or self.matcher is not None)

    @property
    def num_original_prompt_tokens(self) -> int:
        """The prompt without the output that came with it."""
        return len(self.prompt_token_ids) - self.num_prior_output_tokens

    @property
    def output_index(self) -> int:
        """The index, in the whole request's output, of the next token to sample."""
        return self.num_prior_output_tokens + self.num_output_tokens

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

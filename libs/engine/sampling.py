"""Sampling parameters (on the wire) and the sampler that turns logits into tokens.

Each request draws from its own ``torch.Generator``: a request with a seed gets the
same tokens whatever else shares its batch, and a request preempted and recomputed
continues the same random stream (the generator lives on the request).
"""

from __future__ import annotations

import msgspec
import torch

from libs.engine.outputs import TokenLogprob


class SamplingParams(msgspec.Struct, omit_defaults=True):
    """How to pick a request's tokens and when to stop.

    Args:
        max_tokens: most tokens to generate.
        temperature: 0 is greedy.
        top_p: nucleus mass kept (1 = off).
        top_k: most likely tokens kept (0 = off).
        seed: seeds the request's own generator (None: drawn from the engine's seed).
        stop: strings that end the output; the text is cut before the stop string.
        stop_token_ids: token ids that end the output (besides EOS).
        ignore_eos: keep going past EOS.
        logprobs: return this many top logprobs per sampled token (0: only the sampled one).
        min_tokens: EOS and stop tokens are masked until this many tokens exist.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus of one row."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep a token if the mass before it is below top_p (so the first is always kept).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_row(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    banned_ids: list[int],
) -> int:
    """Pick one token from one row of logits (float32, [vocab]).

    Args:
        logits: the row (not modified).
        params: the request's parameters.
        generator: the request's generator (advanced only when sampling at random).
        banned_ids: ids masked out (EOS and stop tokens before ``min_tokens``).

    Returns:
        The token id.
    """
    if banned_ids:
        logits = logits.clone()
        logits[banned_ids] = float("-inf")
    # A temperature below 1e-5 only overflows the scaled logits (inf - inf is nan in the
    # softmax, and multinomial raises): it is greedy in all but name.
    if params.greedy or params.temperature < 1e-5:
        return int(torch.argmax(logits).item())
    logits = _filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def token_logprob(logits: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """Logprob of ``token_id`` and the ``num_top`` best tokens under the raw logits of one row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entry = TokenLogprob(token_id=token_id, logprob=float(logp[token_id].item()))
    if num_top:
        values, ids = torch.topk(logp, num_top)
        entry.top_token_ids = ids.tolist()
        entry.top_logprobs = values.tolist()
    return entry

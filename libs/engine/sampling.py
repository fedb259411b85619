"""Sampling parameters (on the wire) and the sampler that turns logits into tokens.

Each request draws from its own ``torch.Generator``, re-seeded for every output token
from (request seed, token index): a request with a seed gets the same tokens whatever
else shares its batch, after a preemption and recompute, and when its first token is
sampled on a prefill node and the rest on a decode node.
"""

from __future__ import annotations

import torch

from libs.engine.outputs import TokenLogprob
from libs.protocol.messages import SamplingParams

__all__ = ["SamplingParams", "draw", "filter_min_p", "sample_row", "token_logprob", "token_seed"]


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
        # The most likely token always stays: a top_p that rounds to 0 in float32 (5e-324
        # did, from the fuzzer) would otherwise drop every token and sample from NaNs.
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def token_seed(seed: int, index: int) -> int:
    """The generator seed for output token ``index`` of a request seeded with ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & (2**63 - 1)


def filter_min_p(scaled: torch.Tensor, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens of one row whose probability is below ``min_p`` times the top one's."""
    if min_p <= 0.0:
        return scaled
    probs = torch.softmax(scaled, dim=-1)
    return scaled.masked_fill(probs < min_p * probs.max(), float("-inf"))


def draw(scaled: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a row already divided by the temperature (and ``min_p``-filtered):
    top-k, top-p, then a multinomial draw from ``generator``."""
    probs = torch.softmax(_filter_top_k_top_p(scaled, params.top_k, params.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


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
    return draw(filter_min_p(logits / params.temperature, params.min_p), params, generator)


def token_logprob(logits: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """Logprob of ``token_id`` and the ``num_top`` best tokens under the raw logits of one row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entry = TokenLogprob(token_id=token_id, logprob=float(logp[token_id].item()))
    if num_top:
        values, ids = torch.topk(logp, num_top)
        entry.top_token_ids = ids.tolist()
        entry.top_logprobs = values.tolist()
    return entry

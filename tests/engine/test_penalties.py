"""Penalties, logit bias, min_p and the grammar bitmask against plain per-token references.

The references loop over token ids in Python, straight from the definitions (OpenAI's
presence/frequency penalties, Hugging Face's repetition penalty). They run on CPU, and
on CUDA too when ``FLOWKV_TEST_DEVICE=cuda`` is set on a machine that has one.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from libs.engine.penalties import PenaltyState, apply_penalties
from libs.engine.request import Request
from libs.engine.sampler import Sampler
from libs.engine.sampling import SamplingParams, filter_min_p
from libs.engine.structured import MaskJob, apply_bitmask

DEVICE = os.environ.get("FLOWKV_TEST_DEVICE", "cpu")
VOCAB = 1000


def _ref_penalize(logits: list[float], prompt: list[int], output: list[int], presence: float, frequency: float,
                  repetition: float) -> torch.Tensor:
    row = torch.tensor(logits, dtype=torch.float32)
    for t in set(prompt) | set(output):
        row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
    for t in set(output):
        row[t] = row[t] - torch.tensor(frequency, dtype=torch.float32) * output.count(t)
        row[t] = row[t] - torch.tensor(presence, dtype=torch.float32)
    return row


def _history(rng: random.Random) -> tuple[list[int], list[int]]:
    # Small id range so tokens repeat, within and between prompt and output.
    prompt = [rng.randrange(0, 60) for _ in range(rng.randrange(1, 40))]
    output = [rng.randrange(0, 60) for _ in range(rng.randrange(0, 30))]
    return prompt, output


def _request(rid: str, prompt: list[int], output: list[int], params: SamplingParams, prior: int = 0) -> Request:
    req = Request(rid, list(prompt), params, torch.Generator(device=DEVICE), detok=None,  # type: ignore[arg-type]
                  num_prior_output_tokens=prior)
    req.token_ids = list(prompt) + list(output)
    return req


@pytest.mark.parametrize("seed", range(5))
def test_apply_penalties_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = 6
    logits = torch.randn((rows, VOCAB), generator=gen) * 3
    hist = [_history(rng) for _ in range(rows)]
    pres = [rng.uniform(-2, 2) for _ in range(rows)]
    freq = [rng.uniform(-2, 2) for _ in range(rows)]
    rep = [rng.uniform(0.5, 2.0) for _ in range(rows)]
    state = PenaltyState(VOCAB, DEVICE)
    idx = state.rows([(f"r{i}", p + o, len(p)) for i, (p, o) in enumerate(hist)])
    prompt_mask, counts = state.gather(idx)
    got = apply_penalties(logits.to(DEVICE), prompt_mask, counts, torch.tensor(pres, device=DEVICE),
                          torch.tensor(freq, device=DEVICE), torch.tensor(rep, device=DEVICE)).cpu()
    for i, (p, o) in enumerate(hist):
        want = _ref_penalize(logits[i].tolist(), p, o, pres[i], freq[i], rep[i])
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-6)
        assert torch.argmax(got[i]) == torch.argmax(want)


def test_penalty_counts_kept_incrementally() -> None:
    """Rows follow appended tokens step by step, and a freed row starts clean for the next request."""
    state = PenaltyState(VOCAB, DEVICE)
    tokens = [5, 6, 7]  # prompt of 2 + one output token
    state.rows([("a", tokens, 2)])
    for t in (7, 9, 7):
        tokens.append(t)
        idx = state.rows([("a", tokens, 2)])
    prompt_mask, counts = state.gather(idx)
    assert prompt_mask[0].nonzero().flatten().tolist() == [5, 6]
    assert {i: int(counts[0, i]) for i in counts[0].nonzero().flatten().tolist()} == {7: 3, 9: 1}
    state.free("a")
    idx = state.rows([("b", [1, 2], 2)])
    prompt_mask, counts = state.gather(idx)
    assert prompt_mask[0].nonzero().flatten().tolist() == [1, 2] and int(counts.sum()) == 0
    for i in range(20):  # grows past its first rows
        state.rows([(f"c{i}", [i], 1)])
    assert state.num_rows == 21


def test_sampler_greedy_with_bias_and_penalties_matches_reference() -> None:
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    reqs, want = [], []
    logits = torch.randn((8, VOCAB), generator=gen) * 2
    for i in range(8):
        prompt, output = _history(rng)
        bias = {rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randrange(0, 4))}
        if i % 3 == 0:
            bias[int(torch.argsort(logits[i])[-2])] = 5.0  # moves the argmax
        params = SamplingParams(temperature=0.0, presence_penalty=rng.uniform(-2, 2) * (i % 2),
                                frequency_penalty=rng.uniform(-2, 2) * (i % 2), repetition_penalty=1.0 + 0.5 * (i % 2),
                                logit_bias=bias)
        reqs.append(_request(f"r{i}", prompt, output, params))
        row = logits[i].clone()
        for t, v in bias.items():
            row[t] += v
        row = _ref_penalize(row.tolist(), prompt, output, params.presence_penalty, params.frequency_penalty,
                            params.repetition_penalty)
        want.append(int(torch.argmax(row)))
    got = Sampler(VOCAB, DEVICE).sample(reqs, logits.to(DEVICE), None, lambda r: [])
    assert got == want


def test_prior_output_counts_as_output() -> None:
    """Tokens at the end of the prompt that are earlier output get presence/frequency penalties."""
    logits = torch.zeros((1, VOCAB))
    logits[0, 42] = 1.0
    logits[0, 43] = 0.9
    params = SamplingParams(temperature=0.0, presence_penalty=0.5)
    plain = _request("a", [1, 2, 42], [], params, prior=0)
    moved = _request("b", [1, 2, 42], [], params, prior=1)
    sampler = Sampler(VOCAB, DEVICE)
    assert sampler.sample([plain, moved], logits.repeat(2, 1).to(DEVICE), None, lambda r: []) == [42, 43]


def test_min_p_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        row = torch.randn(VOCAB, generator=gen) * 4
        min_p = float(torch.rand(1, generator=gen)) * 0.5
        probs = torch.softmax(row, dim=-1).tolist()
        top = max(probs)
        keep = [i for i, p in enumerate(probs) if p >= min_p * top]
        got = filter_min_p(row.to(DEVICE), min_p).cpu()
        assert torch.isfinite(got).nonzero().flatten().tolist() == keep


def test_min_p_sampling_only_draws_kept_tokens() -> None:
    row = torch.full((1, VOCAB), -5.0)
    row[0, :4] = torch.tensor([3.0, 2.9, 1.0, 0.5])  # with min_p 0.5 only 0 and 1 stay
    params = SamplingParams(temperature=1.0, min_p=0.5, seed=1)
    drawn = set()
    sampler = Sampler(VOCAB, DEVICE)
    for i in range(40):
        req = _request(f"r{i}", [1], [], params)
        req.seed = i
        drawn.update(sampler.sample([req], row.to(DEVICE), None, lambda r: []))
    assert drawn == {0, 1}


def test_bitmask_applies_bits() -> None:
    allowed = [0, 31, 32, 500, 999]
    words = torch.zeros((1, (VOCAB + 31) // 32), dtype=torch.int64)
    for t in allowed:
        words[0, t // 32] |= 1 << (t % 32)
    bitmask = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same 32 bits, as int32
    logits = torch.randn((1, VOCAB)).to(DEVICE)
    apply_bitmask(logits, bitmask)
    assert torch.isfinite(logits.cpu()[0]).nonzero().flatten().tolist() == allowed


def test_grammar_mask_wins_over_min_tokens() -> None:
    """A row whose grammar only allows EOS still samples it when min_tokens would ban it."""
    eos = 3
    words = torch.zeros((1, (VOCAB + 31) // 32), dtype=torch.int32)
    words[0, 0] = 1 << eos
    import concurrent.futures

    fut: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
    fut.set_result(words)
    req = _request("a", [1, 2], [], SamplingParams(temperature=0.0, min_tokens=5))
    req.matcher = object()
    got = Sampler(VOCAB, DEVICE).sample([req], torch.randn((1, VOCAB)).to(DEVICE), MaskJob(fut, {"a": 0}),
                                        lambda r: [eos])
    assert got == [eos]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_vanishing_repetition_penalty_samples_a_seen_token(temperature: float) -> None:
    """r = 5e-324 (admitted by the API: r > 0) is 0 in float32 and divides positive logits
    to infinity; the request must still sample, a token it has seen, not fail on a NaN."""
    logits = torch.full((1, VOCAB), -1.0)
    logits[0, 3], logits[0, 9] = 2.0, 50.0
    params = SamplingParams(temperature=temperature, top_p=5e-324, repetition_penalty=5e-324, seed=1)
    req = _request("r", [3, 4], [], params)
    got = Sampler(VOCAB, DEVICE).sample([req], logits.to(DEVICE), None, lambda r: [])
    assert got == [3]  # the only seen token with a positive logit

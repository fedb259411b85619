"""Prefill on one engine, copy the KV block by block into another, decode there."""

from __future__ import annotations

import random

import msgspec
import pytest

from libs.engine.sampling import SamplingParams
from tests.engine.conftest import make_engine, run_all, tokens_of

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _prompt(n: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


def _handoff(prefill, decode, rid: str, prompt: list[int], params: SamplingParams = PARAMS) -> list[int]:  # type: ignore[no-untyped-def]
    prefill.add_request(rid, prompt, params, prefill_only=True)
    outs = []
    while prefill.has_work():
        outs.extend(prefill.step())
    (first,) = outs
    assert first.finished and first.prefilled and first.finish_reason is None
    src = prefill.held_block_ids(rid)
    alloc = decode.allocate_remote(rid, prompt)
    assert len(alloc.block_ids) == len(src) == -(-len(prompt) // 4)
    start = alloc.num_cached_tokens // 4
    for s, d in zip(src[start:], alloc.block_ids[start:]):
        decode.pool.tensor[d].copy_(prefill.pool.tensor[s])
    prefill.release(rid)
    decode.commit_remote(rid, prompt, first.token_ids[0], params)
    rest = []
    while decode.has_work():
        rest.extend(decode.step())
    assert rest[-1].finished and rest[-1].finish_reason == "length"
    return first.token_ids + tokens_of(rest), alloc.num_cached_tokens


@pytest.mark.parametrize("n", [1, 4, 13, 32])
def test_handoff_equals_single_engine(n: int) -> None:
    prompt = _prompt(n)
    expected = tokens_of(run_all(make_engine(), {"x": prompt}, PARAMS)["x"])
    p, d = make_engine(num_blocks=64), make_engine(num_blocks=96)
    d.blocks.allocate("pad", list(range(9)), 9, 0)  # so D's ids differ from P's
    tokens, cached = _handoff(p, d, "x", prompt)
    assert tokens == expected and cached == 0
    assert p.stats().free_blocks == 64
    stats = p.stats()  # the prefill pass it ran, for the scheduler's fit of a pass's cost
    assert stats.prefill_pass_tokens == n and stats.prefill_pass_s > 0
    assert stats.max_pass_tokens == p.config.max_num_batched_tokens
    d.blocks.free("pad")
    assert d.stats().free_blocks == 96


def test_partial_handoff_reuses_decode_prefix_cache() -> None:
    prefix = _prompt(12, seed=5)
    prompt = prefix + _prompt(9, seed=6)
    expected = tokens_of(run_all(make_engine(), {"x": prompt}, PARAMS)["x"])
    p, d = make_engine(), make_engine()
    run_all(d, {"warm": prefix + [7, 7, 7]}, PARAMS)  # D now caches the prefix's 3 full blocks
    tokens, cached = _handoff(p, d, "x", prompt)
    assert cached == 12
    assert tokens == expected


def test_remote_blocks_are_not_cached_until_commit() -> None:
    d = make_engine(num_blocks=16)
    prompt = _prompt(8)
    alloc = d.allocate_remote("x", prompt)
    assert alloc.num_cached_tokens == 0 and alloc.block_ids == [0, 1]
    other = d.allocate_remote("y", prompt)  # same prompt: nothing registered yet, no hit
    assert other.num_cached_tokens == 0 and other.block_ids == [2, 3]
    d.release("y")
    d.release("x")
    assert d.stats().free_blocks == 16 and d.blocks.num_evictable_blocks == 0
    with pytest.raises(ValueError):
        d.allocate_remote("z", _prompt(64))  # longer than the pool


def test_seeded_sampling_is_the_same_across_a_handoff() -> None:
    """A seeded request gives the same tokens on one engine and split across two."""
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=1234, ignore_eos=True)
    prompt = _prompt(13, seed=9)
    expected = tokens_of(run_all(make_engine(), {"x": prompt}, params)["x"])
    # A different seed really changes the tokens, so equality below is not luck.
    other = tokens_of(run_all(make_engine(), {"x": prompt}, msgspec.structs.replace(params, seed=99))["x"])
    assert other != expected
    tokens, _ = _handoff(make_engine(num_blocks=64), make_engine(num_blocks=96), "x", prompt, params)
    assert tokens == expected

"""Greedy tokens of the random ``tiny`` preset equal transformers' ``generate`` on the same weights."""

from __future__ import annotations

import random

import pytest

from libs.engine.sampling import SamplingParams
from tests.engine.conftest import hf_greedy, make_engine, run_all, tokens_of

MAX_TOKENS = 10


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 49152) for _ in range(12)]  # a shared prefix of 3 blocks
    prompts = {}
    for i, n in enumerate([1, 3, 4, 5, 9, 16, 23, 40, 61]):
        prompts[f"r{i}"] = [rng.randrange(3, 49152) for _ in range(n)]
    for i, n in enumerate([0, 1, 7, 13]):
        prompts[f"s{i}"] = shared + [rng.randrange(3, 49152) for _ in range(n)]
    return prompts


@pytest.fixture(scope="module")
def reference(tiny_hf) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    return {rid: hf_greedy(tiny_hf, ids, MAX_TOKENS) for rid, ids in _prompts().items()}


@pytest.mark.parametrize(
    "prefix_caching,chunked,budget",
    [(True, True, 2048), (False, True, 2048), (True, True, 7), (False, False, 64)],
)
def test_greedy_matches_transformers(reference, prefix_caching: bool, chunked: bool, budget: int) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(
        enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked, max_num_batched_tokens=budget,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = run_all(engine, _prompts(), params)
    assert {rid: tokens_of(o) for rid, o in outs.items()} == reference
    assert all(o[-1].finish_reason == "length" for o in outs.values())
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks == 128


def test_second_pass_hits_prefix_cache(reference) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    run_all(engine, _prompts(), params)
    before = engine.stats().prefix_cache_hits
    outs = run_all(engine, {f"again-{k}": v for k, v in _prompts().items()}, params)
    assert {k[len("again-"):]: tokens_of(o) for k, o in outs.items()} == reference
    # Every full block except one holding a prompt's last token is a hit the second time.
    expected = sum(((len(v) - 1) // 4) * 4 for v in _prompts().values())
    assert engine.stats().prefix_cache_hits - before == expected
    assert all(o[-1].num_cached_tokens == ((len(_prompts()[k[6:]]) - 1) // 4) * 4 for k, o in outs.items())


@pytest.mark.parametrize("num_blocks", [128, 20])
def test_warmup_leaves_no_trace(reference, num_blocks: int) -> None:  # type: ignore[no-untyped-def]
    """The warm-up forwards write garbage KV into the pool's first blocks (all of them when
    the pool is smaller than the step budget): none of it may be read back as a prefix hit."""
    engine = make_engine(warmup=True, num_blocks=num_blocks, max_num_batched_tokens=2048)
    assert engine.pool.tensor.abs().sum().item() > 0  # the warm-up ran and wrote KV
    stats = engine.stats()
    assert (stats.free_blocks, stats.prefix_cache_queries, stats.prefix_cache_hits) == (num_blocks, 0, 0)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = _prompts() if num_blocks == 128 else {k: v for k, v in _prompts().items() if k in ("r0", "r4", "s1")}
    outs = run_all(engine, prompts, params)
    assert {rid: tokens_of(o) for rid, o in outs.items()} == {rid: reference[rid] for rid in prompts}


def test_warmup_is_off_by_default_on_cpu() -> None:
    engine = make_engine()
    assert not engine.config.warms_up
    assert engine.pool.tensor.abs().sum().item() == 0


def test_steps_of_prefills_and_decodes_run_as_one_forward_on_cpu(reference) -> None:  # type: ignore[no-untyped-def]
    """Prompts arriving while others decode: on the CPU such steps run one forward for both
    (ModelRunner.mixed), and the tokens are still transformers'."""
    engine = make_engine(max_num_batched_tokens=24)
    mixed_calls: list[tuple[int, int]] = []
    run_mixed = engine.runner.mixed

    def spy(chunks, seqs):  # type: ignore[no-untyped-def]
        mixed_calls.append((len(chunks), len(seqs)))
        return run_mixed(chunks, seqs)

    engine.runner.mixed = spy  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = _prompts()
    pending = list(prompts.items())
    outs: dict[str, list] = {rid: [] for rid in prompts}  # type: ignore[type-arg]
    while pending or engine.has_work():
        if pending:  # one new prompt a step, the earlier ones decoding
            rid, ids = pending.pop(0)
            engine.add_request(rid, ids, params)
        for o in engine.step():
            outs[o.request_id].append(o)
    assert {rid: tokens_of(o) for rid, o in outs.items()} == reference
    assert len(mixed_calls) >= len(prompts) - 2, mixed_calls
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks

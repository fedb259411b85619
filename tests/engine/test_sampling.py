"""Sampling: seeds, stop strings, stop token ids, max_tokens, min_tokens, logprobs."""

from __future__ import annotations

import random

import msgspec
import pytest
import torch

from libs.engine.sampling import SamplingParams
from tests.engine.conftest import hf_reference, make_engine, run_all, tokens_of


def _prompt(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return make_engine(num_blocks=256)


def test_same_seed_same_tokens_whatever_the_batch(engine) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=42, ignore_eos=True)
    alone = tokens_of(run_all(engine, {"a": _prompt(7)}, params)["a"])
    others = {f"o{i}": _prompt(5 + i, seed=i) for i in range(4)}
    batch = run_all(engine, {"a": _prompt(7), **others}, params)
    assert tokens_of(batch["a"]) == alone
    other_seed = msgspec.structs.replace(params, seed=43)
    assert tokens_of(run_all(engine, {"a": _prompt(7)}, other_seed)["a"]) != alone


def test_stop_string_cuts_text(engine) -> None:  # type: ignore[no-untyped-def]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = "".join(o.text for o in run_all(engine, {"a": _prompt(9)}, greedy)["a"])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    outs = run_all(engine, {"a": _prompt(9)}, msgspec.structs.replace(greedy, stop=[stop]))["a"]
    assert "".join(o.text for o in outs) == full[: full.index(stop)]
    assert outs[-1].finish_reason == "stop"


def test_stop_token_ids_and_max_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ref = tokens_of(run_all(engine, {"a": _prompt(6)}, greedy)["a"])
    assert len(ref) == 10
    outs = run_all(engine, {"a": _prompt(6)}, msgspec.structs.replace(greedy, stop_token_ids=[ref[3]]))["a"]
    assert tokens_of(outs) == ref[: ref.index(ref[3]) + 1] and outs[-1].finish_reason == "stop"
    outs = run_all(engine, {"a": _prompt(6)}, msgspec.structs.replace(greedy, max_tokens=3))["a"]
    assert tokens_of(outs) == ref[:3] and outs[-1].finish_reason == "length"
    assert [o.num_output_tokens for o in outs] == [1, 2, 3]


def test_min_tokens_masks_stop_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = tokens_of(run_all(engine, {"a": _prompt(6)}, greedy)["a"])
    params = msgspec.structs.replace(greedy, stop_token_ids=[ref[0]], min_tokens=2)
    got = tokens_of(run_all(engine, {"a": _prompt(6)}, params)["a"])
    assert got[0] != ref[0] and len(got) >= 2


def test_logprobs_of_greedy_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3)
    outs = run_all(engine, {"a": _prompt(8)}, params)["a"]
    for o in outs:
        (lp,) = o.logprobs
        assert lp.token_id == o.token_ids[0]
        assert len(lp.top_token_ids) == 3 and lp.top_token_ids[0] == lp.token_id
        assert lp.logprob == pytest.approx(lp.top_logprobs[0]) and lp.logprob <= 0.0
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
    # The first token's logprob is log_softmax's max over the logits of the whole prompt.
    hf = hf_reference("tiny")
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([_prompt(8)])).logits[0, -1].float(), -1)
    assert outs[0].logprobs[0].logprob == pytest.approx(ref.max().item(), abs=1e-4)


def test_params_travel_on_the_wire() -> None:
    p = SamplingParams(max_tokens=5, temperature=0.5, stop=["\n"], seed=3, logprobs=2)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_a_vanishing_top_p_keeps_the_most_likely_token() -> None:
    """top_p = 5e-324 is 0 in float32: the nucleus must still hold the top token."""
    import torch

    from libs.engine.sampling import sample_row

    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=5e-324)
    assert sample_row(logits, params, torch.Generator().manual_seed(0), []) == 1

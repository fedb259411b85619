"""Penalties, biases and structured output through the engine, and across a P -> D hand-off.

Penalties are compared token for token with transformers' ``generate`` on the same weights
(its repetition penalty and sequence bias, and a presence/frequency processor written from
OpenAI's definition). Structured output runs on the seeded ``tiny`` model, whose text is
noise: only the grammar makes it valid, so every check below fails without the mask.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import msgspec
import pytest
import torch

from libs.engine.sampling import SamplingParams
from libs.protocol.messages import StructuredOutput
from tests.engine.conftest import hf_reference, make_engine, run_all, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{3}"
CHOICES = ["alpha", "beta", "gamma delta"]


def _prompt(n: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return make_engine(num_blocks=256)


def _text(outs) -> str:  # type: ignore[no-untyped-def]
    return "".join(o.text for o in outs)


# ------------------------------------------------------------------ penalties vs transformers


class _PresenceFrequency:
    """OpenAI's presence/frequency penalties over the generated tokens, one token id at a time."""

    def __init__(self, num_prompt: int, presence: float, frequency: float) -> None:
        self.num_prompt, self.presence, self.frequency = num_prompt, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        out = input_ids[0, self.num_prompt:].tolist()
        for t in set(out):
            scores[0, t] -= torch.tensor(self.frequency) * out.count(t)
            scores[0, t] -= torch.tensor(self.presence)
        return scores


def _hf_generate(hf, prompt: list[int], n: int, **kw) -> list[int]:  # type: ignore[no-untyped-def]
    from transformers import LogitsProcessorList

    procs = kw.pop("processors", [])
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                          logits_processor=LogitsProcessorList(procs), **kw)
    return out[0, len(prompt):].tolist()


def _repeating_prompt() -> list[int]:
    base = _prompt(6, seed=11)
    return base * 4


N_PENALIZED = 20


@pytest.fixture(scope="module")
def smollm2():  # type: ignore[no-untyped-def]
    """The default model (it repeats itself, so penalties change its greedy output), its
    transformers twin, a prompt it repeats, and its plain greedy output."""
    engine, hf = make_engine("smollm2", num_blocks=256, block_size=16), hf_reference("smollm2")
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    plain = tokens_of(run_all(engine, {"a": prompt}, SamplingParams(max_tokens=N_PENALIZED, temperature=0.0,
                                                                    ignore_eos=True))["a"])
    return engine, hf, prompt, plain


@pytest.mark.timeout(900)  # two 135M-parameter generations on a shared 2-core machine
@pytest.mark.parametrize("case", ["repetition", "presence_frequency", "logit_bias"])
def test_penalties_match_transformers(smollm2, case: str) -> None:  # type: ignore[no-untyped-def]
    engine, hf, prompt, plain = smollm2
    ours, theirs = {
        "repetition": (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
        "presence_frequency": (dict(presence_penalty=2.0, frequency_penalty=2.0),
                               dict(processors=[_PresenceFrequency(len(prompt), 2.0, 2.0)])),
        "logit_bias": (dict(logit_bias={plain[3]: -100.0, 777: 40.0}),
                       dict(sequence_bias={(plain[3],): -100.0, (777,): 40.0})),
    }[case]
    params = SamplingParams(max_tokens=N_PENALIZED, temperature=0.0, ignore_eos=True, **ours)
    got = tokens_of(run_all(engine, {"a": prompt}, params)["a"])
    assert got == _hf_generate(hf, prompt, N_PENALIZED, **theirs)
    assert got != plain  # the parameter changed the output


def test_plain_greedy_unchanged_beside_penalized_requests(engine) -> None:  # type: ignore[no-untyped-def]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = tokens_of(run_all(engine, {"a": _prompt(9)}, greedy)["a"])
    for rid, ids in {"a": _prompt(9), "b": _repeating_prompt()}.items():
        params = greedy if rid == "a" else msgspec.structs.replace(greedy, repetition_penalty=1.8, logit_bias={5: 9.0})
        engine.add_request(rid, ids, params)
    outs: dict[str, list] = {"a": [], "b": []}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert tokens_of(outs["a"]) == alone


def test_bad_logit_bias_id_fails_the_request(engine) -> None:  # type: ignore[no-untyped-def]
    out = run_all(engine, {"a": _prompt(5)}, SamplingParams(logit_bias={10**6: 1.0}))["a"]
    assert out[-1].finish_reason == "error" and "logit_bias" in out[-1].error


# ------------------------------------------------------------------------- structured output


def _structured(kind: str) -> StructuredOutput:
    return {
        "json_schema": StructuredOutput(json_schema=json.dumps(SCHEMA)),
        "regex": StructuredOutput(regex=REGEX),
        "choice": StructuredOutput(choice=CHOICES),
    }[kind]


def _check(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICES, text


@pytest.mark.parametrize("kind", ["json_schema", "regex", "choice"])
def test_structured_output_is_valid(engine, kind: str) -> None:  # type: ignore[no-untyped-def]
    prompts = {f"s{seed}": _prompt(5 + seed, seed=seed) for seed in range(6)}
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=64, temperature=temperature, seed=7, structured=_structured(kind))
        outs = run_all(engine, prompts, params)
        for rid, o in outs.items():
            assert o[-1].finish_reason == "stop", (rid, _text(o))
            _check(kind, _text(o))


def test_structured_and_free_requests_share_a_batch(engine) -> None:  # type: ignore[no-untyped-def]
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = tokens_of(run_all(engine, {"f": _prompt(8)}, free)["f"])
    engine.add_request("f", _prompt(8), free)
    engine.add_request("c", _prompt(6), SamplingParams(max_tokens=30, temperature=0.0, structured=_structured("regex")))
    outs: dict[str, list] = {"f": [], "c": []}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert tokens_of(outs["f"]) == alone
    _check("regex", _text(outs["c"]))


def test_structured_output_needs_the_mask(engine) -> None:  # type: ignore[no-untyped-def]
    """Without the constraint the tiny model's text matches none of the checks (so they can fail)."""
    text = _text(run_all(engine, {"a": _prompt(7)}, SamplingParams(max_tokens=12, temperature=0.0))["a"])
    assert not re.fullmatch(REGEX, text) and text not in CHOICES


@pytest.mark.parametrize("spec", [
    StructuredOutput(regex="[a-"),
    StructuredOutput(json_schema="{not json"),
    StructuredOutput(json_schema='{"type": "no-such-type"}'),
    StructuredOutput(grammar="start: ("),
])
def test_bad_spec_fails_the_request_not_the_engine(engine, spec: StructuredOutput) -> None:  # type: ignore[no-untyped-def]
    ok = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("bad", _prompt(5), SamplingParams(structured=spec))
    engine.add_request("good", _prompt(5), ok)
    outs: dict[str, list] = {"bad": [], "good": []}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert outs["bad"][-1].finish_reason == "error" and outs["bad"][-1].error.startswith("invalid structured output")
    assert len(tokens_of(outs["good"])) == 4


def test_lark_grammar(engine) -> None:  # type: ignore[no-untyped-def]
    grammar = 'start: "x=" NUM (";" NUM)?\nNUM: /[0-9]{1,3}/'
    out = run_all(engine, {"a": _prompt(6)}, SamplingParams(max_tokens=20, temperature=0.0,
                                                           structured=StructuredOutput(grammar=grammar)))["a"]
    assert re.fullmatch(r"x=[0-9]{1,3}(;[0-9]{1,3})?", _text(out)), _text(out)


# ------------------------------------------------------------------------- across a hand-off


def _handoff(prefill, decode, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:  # type: ignore[no-untyped-def]
    prefill.add_request(rid, prompt, params, prefill_only=True)
    outs = []
    while prefill.has_work():
        outs.extend(prefill.step())
    (first,) = outs
    if not first.prefilled:  # it ended at its first token
        prefill.release(rid)
        return first.token_ids
    src = prefill.held_block_ids(rid)
    alloc = decode.allocate_remote(rid, prompt)
    for s, d in zip(src, alloc.block_ids):
        decode.pool.tensor[d].copy_(prefill.pool.tensor[s])
    prefill.release(rid)
    decode.commit_remote(rid, prompt, first.token_ids[0], params)
    rest = []
    while decode.has_work():
        rest.extend(decode.step())
    return first.token_ids + tokens_of(rest)


HANDOFF_PARAMS = [
    SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, presence_penalty=2.0, frequency_penalty=1.0,
                   repetition_penalty=1.6),
    SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True, min_p=0.05, frequency_penalty=2.0),
    SamplingParams(max_tokens=64, temperature=1.0, seed=9, structured=StructuredOutput(json_schema=json.dumps(SCHEMA)),
                   repetition_penalty=1.3),
    SamplingParams(max_tokens=64, temperature=0.0, structured=StructuredOutput(regex=REGEX)),
]


@pytest.mark.parametrize("index", range(len(HANDOFF_PARAMS)))
def test_handoff_continues_exactly(engine, index: int) -> None:  # type: ignore[no-untyped-def]
    params = HANDOFF_PARAMS[index]
    prompt = _repeating_prompt()
    expected = tokens_of(run_all(engine, {"x": prompt}, params)["x"])
    p, d = make_engine(num_blocks=64), make_engine(num_blocks=96)
    assert _handoff(p, d, "x", prompt, params) == expected


@pytest.mark.parametrize("index", range(len(HANDOFF_PARAMS)))
def test_recompute_with_earlier_output_continues_exactly(engine, index: int) -> None:  # type: ignore[no-untyped-def]
    """The prompt + the first k outputs, marked as earlier output, yield the rest unchanged."""
    params = HANDOFF_PARAMS[index]
    prompt = _repeating_prompt()
    expected = tokens_of(run_all(engine, {"x": prompt}, params)["x"])
    k = 3
    rest_params = msgspec.structs.replace(params, max_tokens=params.max_tokens - k)
    engine.add_request("y", prompt + expected[:k], rest_params, num_prior_output_tokens=k)
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    assert expected[:k] + tokens_of(outs) == expected

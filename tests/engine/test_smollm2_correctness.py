"""SmolLM2-135M-Instruct (GGUF): greedy tokens equal transformers' ``generate`` on 20 prompts."""

from __future__ import annotations

import pytest

from libs.engine.sampling import SamplingParams
from tests.engine.conftest import hf_greedy, hf_reference, make_engine, run_all, tokens_of

MAX_TOKENS = 8
_QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue? Answer in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous painting by Leonardo da Vinci.",
    "Explain in detail how a steam engine converts heat into motion, covering the boiler, "
    "the piston, the valves and the condenser, and say why the condenser matters for efficiency.",
    "Summarise the plot of Romeo and Juliet for a ten year old reader who has never heard of "
    "Shakespeare, in a friendly tone, with no spoilers about the ending please.",
]
_RAW = [
    "The",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "In 1969, astronauts landed on the Moon. The mission was called",
    "Paris is the capital of",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n    def __init__(self):",
    "Water boils at",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z " * 3,
]


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    engine = make_engine("smollm2", num_blocks=16, block_size=16)
    tok = engine.tokenizer
    out = {}
    for i, q in enumerate(_QUESTIONS):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out[f"chat{i}"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    for i, text in enumerate(_RAW):
        out[f"raw{i}"] = tok(text)["input_ids"]
    return out


@pytest.fixture(scope="module")
def reference(prompts) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    hf = hf_reference("smollm2")
    return {rid: hf_greedy(hf, ids, MAX_TOKENS) for rid, ids in prompts.items()}


def test_prompt_lengths_span_many_blocks(prompts) -> None:  # type: ignore[no-untyped-def]
    lengths = sorted(len(v) for v in prompts.values())
    assert len(lengths) == 20
    assert lengths[0] <= 2 and lengths[-1] > 16 * 4


@pytest.mark.parametrize("prefix_caching,budget", [(True, 4096), (False, 4096), (True, 48)])
def test_greedy_matches_transformers(prompts, reference, prefix_caching: bool, budget: int) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(
        "smollm2", num_blocks=256, block_size=16, enable_prefix_caching=prefix_caching,
        max_num_batched_tokens=budget,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = run_all(engine, prompts, params)
    assert {rid: tokens_of(o) for rid, o in outs.items()} == reference
    stats = engine.stats()
    if prefix_caching and budget < 100:
        # Small steps admit the chat prompts one after another, so the later ones reuse
        # the blocks of the shared system prompt.
        assert stats.prefix_cache_hits > 0
    assert stats.free_blocks == 256


def test_text_is_decoded_incrementally(prompts) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine("smollm2", num_blocks=256, block_size=16)
    outs = run_all(engine, {"q": prompts["chat1"]}, SamplingParams(max_tokens=20, temperature=0.0))
    text = "".join(o.text for o in outs["q"])
    assert text == "The capital of France is Paris."
    assert outs["q"][-1].finish_reason == "stop"
    ids = tokens_of(outs["q"])
    assert ids[-1] in engine.eos_token_ids
    assert engine.tokenizer.decode(ids, skip_special_tokens=True) == text

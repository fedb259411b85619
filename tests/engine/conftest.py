"""Engine test helpers: engines over shared weights and transformers references."""

from __future__ import annotations

import pytest
import torch

from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.engine.loader import load_model
from libs.engine.outputs import TokenOutput
from libs.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def make_engine(model: str = "tiny", **kw) -> LLMEngine:  # type: ignore[no-untyped-def]
    kw.setdefault("num_blocks", 128)
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=model, **kw))


def run_all(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams = GREEDY) -> dict[str, list[TokenOutput]]:
    """Add every prompt at once and step until all finish; outputs per request."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    outs: dict[str, list[TokenOutput]] = {rid: [] for rid in prompts}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for o in engine.step():
            outs[o.request_id].append(o)
    assert not engine.has_work()
    return outs


def tokens_of(outs: list[TokenOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def hf_reference(model: str):  # type: ignore[no-untyped-def]
    """A transformers LlamaForCausalLM with exactly our engine's weights (float32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    loaded = load_model(model, torch.float32, "cpu")
    hf = LlamaForCausalLM(LlamaConfig(**loaded.config.to_hf_dict()))
    sd = dict(loaded.state_dict)
    if loaded.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def tiny_hf():  # type: ignore[no-untyped-def]
    return hf_reference("tiny")

"""Greedy references for the vLLM tests: vLLM serving alone, FlowKV's engine alone, and transformers.

``python -m tests.vllm.references IN OUT`` runs plain vLLM (no FlowKV, no connector) on
the prompts of IN (``{"model": dir, "prompts": [[ids]], "max_tokens": n, "max_model_len": m}``) and writes
``{"token_ids": [[ids]], "texts": [str]}`` to OUT. It runs as its own process because
vLLM's engine spawns children that must not outlive it.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def vllm_alone(model: str, prompts: list[list[int]], max_tokens: int, max_model_len: int = 1024) -> dict[str, Any]:
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=max_model_len, block_size=32,
              kv_cache_memory_bytes=256 << 20, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs]}


def transformers_greedy(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations by transformers (stopping at the model's EOS, as vLLM does)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))
            out.append(ids[0, len(p):].tolist())
    eos = hf.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    # generate() leaves the EOS in and pads after it; vLLM returns the EOS as the last token.
    trimmed = []
    for seq in out:
        cut = next((i + 1 for i, t in enumerate(seq) if t in eos_ids), len(seq))
        trimmed.append(seq[:cut])
    return trimmed


def flowkv_greedy(model: str, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """FlowKV's engine alone (one engine, whole requests), greedy, EOS ignored; and the same
    continuations by transformers with the engine's weights (a Llama-family model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.loader import load_model
    from libs.protocol.messages import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, num_blocks=128, block_size=16))
    ids: list[list[int]] = []
    for k, p in enumerate(prompts):
        engine.add_request(f"ref-{k}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        out: list[int] = []
        while engine.has_work():
            for o in engine.step():
                out += o.token_ids
        ids.append(out)
    loaded = load_model(model, torch.float32, "cpu")
    hf = LlamaForCausalLM(LlamaConfig(**loaded.config.to_hf_dict()))
    sd = dict(loaded.state_dict)
    if loaded.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True)
    hf_ids = []
    with torch.inference_mode():
        for p in prompts:
            gen = hf.eval().generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            hf_ids.append(gen[0, len(p):].tolist())
    texts = [engine.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    return {"token_ids": ids, "texts": texts, "transformers_token_ids": hf_ids}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    result = vllm_alone(spec["model"], spec["prompts"], spec["max_tokens"], spec.get("max_model_len", 1024))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)

"""Greedy references for the vLLM tests: vLLM serving alone, and transformers.

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


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    result = vllm_alone(spec["model"], spec["prompts"], spec["max_tokens"], spec.get("max_model_len", 1024))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)

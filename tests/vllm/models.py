"""A second, non-Llama architecture for the vLLM tests: a tiny random-weight Qwen3.

Qwen3 differs from Llama where it matters to a KV hand-off: RMS norms on the queries and
keys before RoPE, and a head dim that is not hidden / heads. The weights are random (a
fixed seed), the tokenizer is SmolLM2's, copied in; the directory is a plain Hugging Face
model that vLLM and transformers both load.
"""

from __future__ import annotations

import os
import shutil

NUM_LAYERS = 4
VOCAB = 49152  # SmolLM2's tokenizer


def write_tiny_qwen3(target: str, tokenizer_dir: str, seed: int = 0) -> str:
    """Write the model into ``target`` (created) and return it."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        initializer_range=0.1,  # wider logits than the default 0.02: no near-ties for greedy decoding
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    os.makedirs(target, exist_ok=True)
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(target, name))
    return target

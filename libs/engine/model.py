"""The Llama-family decoder in plain torch, computing attention out of the paged KV pool.

Each layer holds its projections fused: ``qkv_proj`` (q, k and v rows stacked, biases
too) and ``gate_up_proj`` (gate rows, then up rows), so a decode step runs 4 GEMMs a
layer instead of 7. Checkpoints keep transformers' ``LlamaForCausalLM`` names;
:mod:`libs.engine.weight_fusion` maps them to ours (without copying when the loader
packed them) and back (:meth:`LlamaForCausalLM.hf_state_dict`). Tokens of all
sequences in a step are flattened into one ``[T]`` dimension; positions and the
attention metadata say where each belongs.

``fused_kernels`` picks the layer's path: True runs the fused GEMMs and the fused
element-wise kernels of :mod:`libs.engine.kernels.fused` (Triton on CUDA, their torch
references elsewhere); False runs the plain torch ops on row views of the fused
weights (7 GEMMs a layer, RMSNorm/rotary/SiLU as separate ops): the baseline the
benchmark compares against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from libs.engine.attention import (
    AttentionMetadata, DecodeMetadata, MixedMetadata, decode_attention, prefill_attention, write_kv,
)
from libs.engine.kernels.fused import add_rms_norm, add_rms_norm_ref, rotary_, silu_mul
from libs.engine.model_config import ModelConfig
from libs.engine.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``; float32 math whatever the dtype, as transformers does."""
        if fused:
            return add_rms_norm(x, residual, self.weight, self.eps)
        return add_rms_norm_ref(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def _project(self, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sizes = [self.q_size, self.kv_size, self.kv_size]
        if fused:
            return self.qkv_proj(x).split(sizes, dim=-1)
        w, b = self.qkv_proj.weight.split(sizes), self.qkv_proj.bias
        bs = b.split(sizes) if b is not None else (None, None, None)
        return tuple(F.linear(x, wi, bi) for wi, bi in zip(w, bs))  # type: ignore[return-value]

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
        meta: AttentionMetadata, pool: torch.Tensor, fused: bool = False,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self._project(x, fused)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if fused:
            q, k = rotary_(q, k, positions, rope.cos, rope.sin)
        else:
            q, k = rope(positions, q, k)
        write_kv(pool, self.layer, k, v, meta.slot_mapping)
        if isinstance(meta, DecodeMetadata):
            o = decode_attention(q, pool, self.layer, meta, self.scale)
        elif isinstance(meta, MixedMetadata):
            p = meta.num_prefill_tokens
            o = torch.cat((prefill_attention(q[:p], k[:p], v[:p], pool, self.layer, meta.prefill, self.scale),
                           decode_attention(q[p:], pool, self.layer, meta.decode, self.scale)))
        else:
            o = prefill_attention(q, k, v, pool, self.layer, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return self.down_proj(silu_mul(self.gate_up_proj(x)))
        gate_w, up_w = self.gate_up_proj.weight.split(self.intermediate_size)
        return self.down_proj(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(  # type: ignore[no-untyped-def]
        self, x, residual, positions, rope, meta, pool, fused: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's output not yet added to ``residual`` (None for the first)."""
        h, residual = self.input_layernorm(x, residual, fused)
        h = self.self_attn(h, positions, rope, meta, pool, fused)
        h, residual = self.post_attention_layernorm(h, residual, fused)
        return self.mlp(h, fused), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)


class LlamaForCausalLM(nn.Module):
    """Llama decoder + LM head. ``forward`` returns hidden states; ``compute_logits`` the logits.

    Attributes:
        fused_kernels: run the fused path (see the module docstring). Switching it
            changes the kernels a CUDA graph would capture: recapture after.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, fused_kernels: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.fused_kernels = fused_kernels
        self.model = LlamaModel(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, pool: torch.Tensor,
    ) -> torch.Tensor:
        """Run ``input_ids`` [T] at ``positions`` [T]; writes their K/V into ``pool``; -> [T, hidden]."""
        fused = self.fused_kernels
        x = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, self.model.rotary_emb, meta, pool, fused)
        return self.model.norm(x, residual, fused)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def hf_state_dict(self) -> dict[str, Any]:
        """The weights under transformers' names; q/k/v and gate/up are views of ours (no copy)."""
        from libs.engine.weight_fusion import unfuse_state_dict

        return unfuse_state_dict(dict(self.state_dict()), self.config)

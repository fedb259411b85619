"""Checkpoint names <-> the engine's fused projections (``qkv_proj``, ``gate_up_proj``).

Checkpoints (transformers, GGUF, the seeded presets) name ``q_proj``/``k_proj``/``v_proj``
and ``gate_proj``/``up_proj`` separately. The loader stores each group's tensors back to
back in one buffer (:func:`pack_state_dict`) and keeps the checkpoint names as views of
it, so :func:`fuse_state_dict` makes the fused tensor as a view over the same memory: no
copy, and two engines in one process share one set of weights. Unpacked groups are
concatenated (a copy). :func:`unfuse_state_dict` goes back to checkpoint names as views.
"""

from __future__ import annotations

import torch

from libs.engine.model_config import ModelConfig

# fused module -> its checkpoint modules, in row order
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _groups(sd: dict[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    """``(fused name, [part names])`` for every complete group of checkpoint tensors in ``sd``."""
    out = []
    for name in list(sd):
        for fused, parts in FUSED_GROUPS.items():
            first = parts[0]
            for suffix in (".weight", ".bias"):
                if name.endswith(f".{first}{suffix}"):
                    prefix = name[: -len(first + suffix)]
                    names = [f"{prefix}{p}{suffix}" for p in parts]
                    if all(n in sd for n in names):
                        out.append((f"{prefix}{fused}{suffix}", names))
    return out


def _as_one_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the parts are consecutive rows of, as a view, or None if they are not."""
    first = parts[0]
    offset = first.storage_offset()
    for p in parts:
        same = p.dtype == first.dtype and p.device == first.device and p.shape[1:] == first.shape[1:]
        if not (same and p.is_contiguous() and p.storage_offset() == offset):
            return None
        if p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return torch.as_strided(first, (rows, *first.shape[1:]), first.stride(), first.storage_offset())


def pack_state_dict(sd: dict[str, torch.Tensor]) -> None:
    """Re-store each fusable group in one buffer, its names becoming views of it (in place).

    One group is copied at a time, so loading needs one group's worth of extra memory.
    """
    for _, names in _groups(sd):
        parts = [sd[n] for n in names]
        if _as_one_view(parts) is not None:
            continue
        buf = torch.cat(parts)
        row = 0
        for n, p in zip(names, parts):
            sd[n] = buf[row : row + p.shape[0]]
            row += p.shape[0]
        del parts


def fuse_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the engine's names; packed groups become views, others are concatenated."""
    out = dict(sd)
    for fused, names in _groups(sd):
        parts = [out.pop(n) for n in names]
        view = _as_one_view(parts)
        out[fused] = view if view is not None else torch.cat(parts)
    return out


def unfuse_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The engine's names -> checkpoint names, each part a row view of the fused tensor."""
    sizes = {
        "self_attn.qkv_proj": [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2,
        "mlp.gate_up_proj": [cfg.intermediate_size] * 2,
    }
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        for fused, parts in FUSED_GROUPS.items():
            for suffix in (".weight", ".bias"):
                if name.endswith(f".{fused}{suffix}"):
                    prefix = name[: -len(fused + suffix)]
                    for part, piece in zip(parts, t.split(sizes[fused])):
                        out[f"{prefix}{part}{suffix}"] = piece
                    break
            else:
                continue
            break
        else:
            out[name] = t
    return out


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's shape under transformers' names, in transformers' order (lm_head last)."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name, rows, cols in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h)):
            shapes[f"{p}self_attn.{name}.weight"] = (rows, cols)
            if cfg.attention_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, q)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes

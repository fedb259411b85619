"""Builds the per-step input tensors and runs the model on them.

Prefill chunks of a step run as one varlen forward; decodes run as a second forward
(on the CPU, a step with both runs them as one, :meth:`ModelRunner.mixed`) with
static-shaped tensors (``input_ids [B]``, ``positions [B]``, ``block_tables [B, M]``,
``context_lens [B]``, ``slot_mapping [B]``), the function a CUDA graph captures
(:attr:`ModelRunner.decode_fn` may be replaced by a graph runner with the same signature).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from libs.engine.attention import DecodeMetadata, MixedMetadata, PrefillMetadata, PrefillSeq
from libs.engine.model import LlamaForCausalLM
from libs.engine.model_config import ModelConfig
from libs.engine.weight_fusion import fuse_state_dict

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fused_kernels_default() -> bool:
    """The model's fused path is on unless ``FLOWKV_FUSED_KERNELS=0`` (benchmarks, debugging)."""
    return os.environ.get("FLOWKV_FUSED_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


class ModelRunner:
    """Owns the model and runs prefill and decode forwards against the KV pool tensor.

    Args:
        cfg: the model's architecture.
        state_dict: weights already on ``device`` in the wanted dtype, under the
            checkpoint's names (shared, not copied: see :mod:`libs.engine.weight_fusion`).
        pool: the KV pool tensor ``[blocks, layers, 2, block_size, kv_heads, head_dim]``.
        max_positions: size of the rotary tables.
    """

    def __init__(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], pool: torch.Tensor, max_positions: int) -> None:
        self.device = pool.device
        self.pool = pool
        self.block_size = pool.shape[3]
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, max_positions, fused_kernels=fused_kernels_default())
        model.load_state_dict(fuse_state_dict(state_dict), strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb = type(model.model.rotary_emb)(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling
        ).to(self.device)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {missing[:5]}")
        self.model = model.eval()
        if self.device.type == "cpu":
            from libs.engine.cpu_linear import pack_linears

            pack_linears(self.model)
        self.decode_fn: DecodeFn = self.decode_forward

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """Run prefill chunks and return the last position's hidden state of each, [n, hidden].

        Args:
            chunks: per sequence ``(token_ids of the chunk, context_start, block_ids)``
                where ``block_ids`` cover ``context_start + len(chunk)`` tokens.
        """
        ids, positions, slots, seqs = self._prefill_inputs(chunks)
        meta = PrefillMetadata(slot_mapping=self._tensor(slots), seqs=seqs)
        hidden = self.model(self._tensor(ids), self._tensor(positions), meta, self.pool)
        last = self._tensor([s.q_start + s.q_len - 1 for s in seqs])
        return hidden.index_select(0, last)

    @torch.inference_mode()
    def mixed(
        self, chunks: list[tuple[list[int], int, list[int]]], seqs: list[tuple[int, int, list[int]]],
    ) -> torch.Tensor:
        """Prefill chunks and decodes in one forward (CPU): each weight is read once for both,
        and the decodes' rows ride in the chunks' GEMMs. Arguments as :meth:`prefill` and
        :meth:`decode`; -> the hidden states of each chunk's last token, then of each
        decode, ``[n + B, hidden]`` (:meth:`logits` turns the rows that sample into logits)."""
        ids, positions, slots, pseqs = self._prefill_inputs(chunks)
        num_prefill = len(ids)
        bs = self.block_size
        width = max(len(b) for _, _, b in seqs)
        ids.extend(t for t, _, _ in seqs)
        positions.extend(p for _, p, _ in seqs)
        slots.extend(b[p // bs] * bs + p % bs for _, p, b in seqs)
        slot_mapping = self._tensor(slots)
        decode = DecodeMetadata(
            slot_mapping=slot_mapping[num_prefill:],
            block_tables=torch.tensor([b + [0] * (width - len(b)) for _, _, b in seqs], dtype=torch.int32),
            context_lens=torch.tensor([p + 1 for _, p, _ in seqs], dtype=torch.int32),
        )
        meta = MixedMetadata(slot_mapping=slot_mapping, prefill=PrefillMetadata(slot_mapping[:num_prefill], pseqs),
                             decode=decode, num_prefill_tokens=num_prefill)
        hidden = self.model(self._tensor(ids), self._tensor(positions), meta, self.pool)
        rows = self._tensor([s.q_start + s.q_len - 1 for s in pseqs] + list(range(num_prefill, len(ids))))
        return hidden.index_select(0, rows)

    def _prefill_inputs(
        self, chunks: list[tuple[list[int], int, list[int]]],
    ) -> tuple[list[int], list[int], list[int], list[PrefillSeq]]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[PrefillSeq] = []
        bs = self.block_size
        for tokens, start, block_ids in chunks:
            q_start = len(ids)
            ids.extend(tokens)
            pos = range(start, start + len(tokens))
            positions.extend(pos)
            slots.extend(block_ids[p // bs] * bs + p % bs for p in pos)
            nb = -(-(start + len(tokens)) // bs)
            seqs.append(PrefillSeq(q_start, len(tokens), start, self._tensor(block_ids[:nb])))
        return ids, positions, slots, seqs

    @torch.inference_mode()
    def decode(self, seqs: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """One decode step; ``seqs`` are ``(last token, its position, block_ids)``; -> logits [B, vocab]."""
        bs = self.block_size
        width = max(len(b) for _, _, b in seqs)
        table = [b + [0] * (width - len(b)) for _, _, b in seqs]
        input_ids = self._tensor([t for t, _, _ in seqs])
        positions = self._tensor([p for _, p, _ in seqs])
        slots = self._tensor([b[p // bs] * bs + p % bs for _, p, b in seqs])
        block_tables = torch.tensor(table, dtype=torch.int32).to(self.device, non_blocking=True)
        context_lens = torch.tensor([p + 1 for _, p, _ in seqs], dtype=torch.int32).to(self.device, non_blocking=True)
        return self.decode_fn(input_ids, positions, block_tables, context_lens, slots)

    def decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
        context_lens: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """The capturable decode forward: static shapes in, logits ``[B, vocab]`` (float32) out."""
        meta = DecodeMetadata(slot_mapping=slot_mapping, block_tables=block_tables, context_lens=context_lens)
        return self.model.compute_logits(self.model(input_ids, positions, meta, self.pool))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.compute_logits(hidden)

    @property
    def fused_kernels(self) -> bool:
        return self.model.fused_kernels

    def set_fused_kernels(self, on: bool) -> None:
        """Switch the model's fused path; captured CUDA graphs keep the old path until recaptured."""
        self.model.fused_kernels = bool(on)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

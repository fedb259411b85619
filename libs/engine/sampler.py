"""The batch sampler: logits of the requests that sample in a step -> one token each.

For one step (one row per request):

1. a batch where every request is greedy with nothing to change in its logits takes the
   argmax of the raw logits (the fast path; no copy);
2. otherwise a copy of the logits gets, in order: ``logit_bias`` (one scatter for the
   batch), the penalties (rows of penalized requests, from :class:`PenaltyState`), the
   grammar bitmask (rows of constrained requests, filled during the forward pass), and the
   ``min_tokens`` ban on EOS and stop tokens (skipped for a row where the grammar allows
   nothing else);
3. greedy rows take the argmax; the others are divided by their temperature, filtered by
   ``min_p`` (both for all of them at once), then by top-k/top-p, and draw from the
   request's own generator, re-seeded from (seed, output token index).

Logprobs are taken from the raw logits by the caller (as vLLM reports them by default).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from libs.engine.penalties import PenaltyState, apply_penalties
from libs.engine.request import Request
from libs.engine.sampling import draw, token_seed
from libs.engine.structured import MaskJob, apply_bitmask

__all__ = ["Sampler"]


def _plain(req: Request) -> bool:
    p = req.params
    return (p.greedy or p.temperature < 1e-5) and not req.needs_logits_processing


class Sampler:
    """Samples one token per row; owns the penalties' per-request counts.

    Args:
        vocab_size: the logits' width.
        device: where the logits are.
    """

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.penalties = PenaltyState(vocab_size, self.device)

    def forget(self, request_id: str) -> None:
        """Drop a request's sampling state (it will not sample here again)."""
        self.penalties.free(request_id)

    def sample(
        self, reqs: list[Request], logits: torch.Tensor, masks: MaskJob | None,
        banned: Callable[[Request], list[int]],
    ) -> list[int]:
        """One token per request.

        Args:
            reqs: the requests, one per row of ``logits``.
            logits: ``[len(reqs), vocab]`` raw logits (not modified).
            masks: this step's grammar bitmasks (rows by request id), if any.
            banned: the ids a request may not sample now (``min_tokens``).
        """
        bans = [banned(r) for r in reqs]
        if all(_plain(r) and not b for r, b in zip(reqs, bans)):
            return torch.argmax(logits, dim=-1).tolist()
        x = logits.float().clone()
        self._bias(reqs, x)
        self._penalize(reqs, x)
        if masks is not None:
            self._mask(reqs, x, masks)
        for i, b in enumerate(bans):
            if b:
                row = x[i].clone()
                row[b] = float("-inf")
                if reqs[i].matcher is None or bool(torch.isfinite(row).any()):
                    x[i] = row
        return self._pick(reqs, x)

    def _bias(self, reqs: list[Request], x: torch.Tensor) -> None:
        rows: list[int] = []
        ids: list[int] = []
        vals: list[float] = []
        for i, r in enumerate(reqs):
            for t, v in r.params.logit_bias.items():
                rows.append(i)
                ids.append(t)
                vals.append(v)
        if ids:
            dev = x.device
            x.index_put_((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                         torch.tensor(vals, dtype=x.dtype, device=dev), accumulate=True)

    def _penalize(self, reqs: list[Request], x: torch.Tensor) -> None:
        sel = [i for i, r in enumerate(reqs) if r.params.penalized]
        if not sel:
            return
        dev = x.device
        rows = self.penalties.rows(
            [(reqs[i].request_id, reqs[i].token_ids, reqs[i].num_original_prompt_tokens) for i in sel])
        prompt_mask, counts = self.penalties.gather(rows)
        ps = [reqs[i].params for i in sel]
        idx = torch.tensor(sel, device=dev)
        x[idx] = apply_penalties(
            x.index_select(0, idx), prompt_mask, counts,
            torch.tensor([p.presence_penalty for p in ps], device=dev),
            torch.tensor([p.frequency_penalty for p in ps], device=dev),
            torch.tensor([p.repetition_penalty for p in ps], device=dev),
        )

    def _mask(self, reqs: list[Request], x: torch.Tensor, masks: MaskJob) -> None:
        pairs = [(i, masks.rows[r.request_id]) for i, r in enumerate(reqs) if r.request_id in masks.rows]
        if not pairs:
            return
        bitmask = masks.result()
        assert bitmask is not None
        idx = torch.tensor([i for i, _ in pairs], device=x.device)
        sub = x.index_select(0, idx)
        apply_bitmask(sub, bitmask[[j for _, j in pairs]])
        x[idx] = sub

    def _pick(self, reqs: list[Request], x: torch.Tensor) -> list[int]:
        tokens = [0] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy or r.params.temperature < 1e-5]
        if greedy:
            picked = torch.argmax(x[greedy], dim=-1).tolist()
            for i, t in zip(greedy, picked):
                tokens[i] = t
        rand = [i for i in range(len(reqs)) if i not in set(greedy)]
        if not rand:
            return tokens
        dev = x.device
        scaled = x[rand] / torch.tensor([reqs[i].params.temperature for i in rand], device=dev).unsqueeze(1)
        min_p = [reqs[i].params.min_p for i in rand]
        if any(min_p):
            probs = torch.softmax(scaled, dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=dev).unsqueeze(1)
            scaled = scaled.masked_fill(probs < threshold, float("-inf"))
        for k, i in enumerate(rand):
            r = reqs[i]
            # Seeding each token from (seed, index) makes a seeded request's tokens the
            # same on one node or split across a prefill and a decode node.
            r.generator.manual_seed(token_seed(r.seed, r.output_index))
            tokens[i] = draw(scaled[k], r.params, r.generator)
        return tokens

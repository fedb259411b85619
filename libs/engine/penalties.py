"""Repetition, frequency and presence penalties and logit bias on a batch of logits.

Definitions (OpenAI for presence/frequency, Hugging Face and vLLM for repetition), for one
row of logits ``l`` and token id ``t``:

- ``logit_bias``: ``l[t] += bias[t]``.
- ``repetition_penalty`` r: if ``t`` occurs in the prompt or the output so far,
  ``l[t] = l[t] / r`` when ``l[t] > 0`` and ``l[t] * r`` otherwise.
- ``frequency_penalty`` f: ``l[t] -= f * count(t in output)``.
- ``presence_penalty`` p: ``l[t] -= p`` if ``t`` occurs in the output.

They apply in that order (vLLM's): bias, repetition, frequency, presence.

:class:`PenaltyState` keeps, per penalized request, one row of output token counts and one
row of prompt-token presence on the logits' device. A row is built once from the request's
tokens when it first samples, then only the tokens appended since are added, in one batched
scatter per step. A request's "output" includes tokens produced before it reached this engine
(the first token a prefill node sampled, earlier output of a recomputed request): the counts
are the same on whichever node the request continues.
"""

from __future__ import annotations

import torch

__all__ = ["PenaltyState", "apply_penalties"]

_MIN_ROWS = 8


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Penalize a batch of rows (returns a new tensor).

    Args:
        logits: ``[rows, vocab]`` float.
        prompt_mask: ``[rows, vocab]`` bool, True where the token occurs in the prompt.
        output_counts: ``[rows, vocab]`` integer, occurrences of each token in the output.
        presence, frequency, repetition: ``[rows]`` float, one value per row.
    """
    counts = output_counts.to(logits.dtype)
    in_output = output_counts > 0
    # A penalty the API admits (any r > 0) may round to 0 in the logits' dtype (5e-324), or
    # divide a logit past the largest float: keep r normal and the result finite, so the
    # seen tokens become the (equally) likeliest instead of a NaN failing the request.
    info = torch.finfo(logits.dtype)
    rep = repetition.to(logits.dtype).clamp(min=info.tiny).unsqueeze(1)
    seen = prompt_mask | in_output
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits.clamp(max=info.max)  # -inf (a masked token) stays
    logits = logits - frequency.to(logits.dtype).unsqueeze(1) * counts
    return logits - presence.to(logits.dtype).unsqueeze(1) * in_output.to(logits.dtype)


class PenaltyState:
    """Per-request token counts for the penalties, kept up to date one step at a time.

    Args:
        vocab_size: the logits' width.
        device: where the logits are (CPU or CUDA).
    """

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=self.device)
        self._prompt = torch.zeros((0, vocab_size), dtype=torch.bool, device=self.device)
        self._free: list[int] = []
        self._rows: dict[str, int] = {}
        self._num_counted: dict[str, int] = {}  # output tokens of the request already in its row

    @property
    def num_rows(self) -> int:
        """Rows in use (one per penalized request that has sampled and not finished)."""
        return len(self._rows)

    def rows(self, items: list[tuple[str, list[int], int]]) -> torch.Tensor:
        """The rows of these requests, brought up to date with their tokens.

        Args:
            items: ``(request id, token ids, number of prompt tokens)`` per request, where
                ``token ids`` is prompt + output and the output is everything after the prompt.

        Returns:
            The row indices (int64, on the device), in the order of ``items``.
        """
        new_rows: list[int] = []
        add_rows: list[int] = []
        add_ids: list[int] = []
        indices = []
        for rid, token_ids, num_prompt in items:
            row = self._rows.get(rid)
            if row is None:
                row = self._allocate(rid)
                new_rows.append(row)
                self._prompt[row, torch.tensor(token_ids[:num_prompt], dtype=torch.int64, device=self.device)] = True
            done = self._num_counted[rid]
            fresh = token_ids[num_prompt + done :]
            if fresh:
                add_rows.extend([row] * len(fresh))
                add_ids.extend(fresh)
                self._num_counted[rid] = done + len(fresh)
            indices.append(row)
        if add_ids:
            r = torch.tensor(add_rows, dtype=torch.int64, device=self.device)
            t = torch.tensor(add_ids, dtype=torch.int64, device=self.device)
            self._counts.index_put_((r, t), torch.ones(len(add_ids), dtype=torch.int32, device=self.device),
                                    accumulate=True)
        return torch.tensor(indices, dtype=torch.int64, device=self.device)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_mask, output_counts)`` of these rows."""
        return self._prompt.index_select(0, rows), self._counts.index_select(0, rows)

    def free(self, request_id: str) -> None:
        """Forget a request (finished, aborted or handed off); its row is reused."""
        row = self._rows.pop(request_id, None)
        if row is not None:
            del self._num_counted[request_id]
            self._free.append(row)

    def _allocate(self, request_id: str) -> int:
        if not self._free:
            self._grow()
        row = self._free.pop()
        self._counts[row].zero_()
        self._prompt[row].zero_()
        self._rows[request_id] = row
        self._num_counted[request_id] = 0
        return row

    def _grow(self) -> None:
        old = self._counts.shape[0]
        new = max(_MIN_ROWS, 2 * old)
        counts = torch.zeros((new, self.vocab_size), dtype=torch.int32, device=self.device)
        prompt = torch.zeros((new, self.vocab_size), dtype=torch.bool, device=self.device)
        counts[:old] = self._counts
        prompt[:old] = self._prompt
        self._counts, self._prompt = counts, prompt
        self._free.extend(range(new - 1, old - 1, -1))

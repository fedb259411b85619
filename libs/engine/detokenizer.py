"""Incremental detokenization and stop strings, one instance per request.

Text is decoded from a short window of token ids (``prefix_offset``..end) and the text
of the window's already-emitted part is subtracted, so tokenizers that merge or drop
spaces at word starts and multi-byte characters split over tokens both come out right.
Text that could be the beginning of a stop string is held back until it is not.
"""

from __future__ import annotations

from typing import Any

_PROMPT_CONTEXT = 6  # prompt tokens decoded before the first output (spacing context)


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas and finds stop strings.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_token_ids: the prompt (its tail gives context for the first word).
        stop: stop strings (the text is cut before the first one found).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str]) -> None:
        self._tok = tokenizer
        self._vocab = len(tokenizer)
        self._ids: list[int] = [t for t in prompt_token_ids[-_PROMPT_CONTEXT:] if t < self._vocab]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far (cut at a stop string once found)
        self._emitted = 0  # chars of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> None:
        """Append one token's text (unknown ids beyond the tokenizer's vocab add nothing)."""
        if token_id >= self._vocab:
            return
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next token
        start = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._check_stop(start)

    def _check_stop(self, start: int) -> None:
        if self.stopped or not self._stop:
            return
        search_from = max(0, start - self._hold)
        cut = -1
        for s in self._stop:
            i = self.text.find(s, search_from)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True

    def take_delta(self, final: bool) -> str:
        """Text not returned yet; unless ``final``, minus a tail that may start a stop string."""
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def mark_emitted(self) -> None:
        """Treat all text so far as already returned (a decode node resuming a hand-off)."""
        self._emitted = len(self.text)

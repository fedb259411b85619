"""Checks a node runs on work that arrives over NATS, before it touches the engine or the pool.

msgspec already guarantees the types; these check the values. One bad token id in an
engine step fails every request batched with it (the embedding lookup raises), and a
wildcard reply subject would spray a request's tokens over other subscribers, so such
work is refused with ``ErrorCode.INVALID`` at the door (found by tests/fuzz).
"""

from __future__ import annotations

from typing import Any

_MAX_SUBJECT_CHARS = 512


def vocab_size(engine: Any) -> int:
    """The model's vocabulary size (the embedding's rows) of a node's engine or an ``LLMEngine``."""
    if isinstance(getattr(engine, "vocab_size", None), int):
        return int(engine.vocab_size)
    core = getattr(engine, "engine", None) or engine
    return int(core.model_config.vocab_size)


def check_prompt(token_ids: list[int], num_vocab: int, max_model_len: int) -> None:
    """Raise ValueError unless the prompt is non-empty, fits the model and every id is in the vocabulary."""
    if not token_ids:
        raise ValueError("empty prompt")
    if len(token_ids) >= max_model_len:
        raise ValueError(f"prompt of {len(token_ids)} tokens does not fit max_model_len {max_model_len}")
    if min(token_ids) < 0 or max(token_ids) >= num_vocab:
        raise ValueError(f"prompt token ids must be in [0, {num_vocab})")


def check_reply_subject(subject: str) -> None:
    """Raise ValueError unless ``subject`` is one concrete NATS subject (no wildcard, no empty token)."""
    tokens = subject.split(".")
    if (not subject or len(subject) > _MAX_SUBJECT_CHARS or any(not t for t in tokens)
            or any(t in ("*", ">") for t in tokens) or any(c.isspace() for c in subject)):
        raise ValueError(f"reply subject {subject[:80]!r} is not a concrete NATS subject")


def check_offsets(output_offset: int, num_original_prompt_tokens: int, num_prompt_tokens: int) -> None:
    """Raise ValueError unless a retry's offsets are consistent with its prompt."""
    if output_offset < 0 or not 0 <= num_original_prompt_tokens <= num_prompt_tokens:
        raise ValueError(f"offsets out of range: output_offset {output_offset}, "
                         f"num_original_prompt_tokens {num_original_prompt_tokens} of {num_prompt_tokens}")


def check_block_ids(block_ids: list[int], num_blocks: int, what: str = "block ids") -> None:
    """Raise ValueError unless every id is a distinct block of a pool of ``num_blocks``."""
    if block_ids and (min(block_ids) < 0 or max(block_ids) >= num_blocks):
        raise ValueError(f"{what} must be in [0, {num_blocks})")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"{what} must be distinct")

"""Structured output: grammars compiled against the model's vocabulary, one matcher per request.

A request with ``SamplingParams.structured`` goes through these steps (one a line):

1. ``GrammarCompiler.matcher`` turns the spec (JSON schema, JSON object, regex, choice or
   Lark/GBNF grammar) into an llguidance grammar and checks it against the tokenizer; the
   checked matcher is cached per spec and every request gets a ``deep_copy`` of it. A spec
   the library refuses raises :class:`GrammarError` (the engine fails the request as invalid).
2. Before each step's forward pass, ``GrammarMasks.start`` fills one token bitmask row
   per constrained request that samples in this step, in a worker thread (llguidance
   drops the GIL), while the model runs.
3. The sampler takes the rows (``MaskJob.result``) and sets every token outside the mask
   to -inf (``apply_bitmask``, plain torch on the logits' device).
4. The engine feeds each accepted token to the request's matcher (``consume_token``); when
   the matcher is stopped the grammar is complete and the request ends with ``stop``.

The matcher is replayed over tokens that exist before sampling starts (the first token a
prefill node sampled, or earlier output of a recomputed request), so decoding continues
from the same grammar state on any node.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
from typing import Any

import torch

from libs.protocol.messages import StructuredOutput

__all__ = ["GrammarCompiler", "GrammarError", "GrammarMasks", "MaskJob", "apply_bitmask"]

# JSON without free whitespace between tokens: small models otherwise often emit spaces or
# newlines until max_tokens. Output stays valid JSON (compact separators).
_JSON_OPTIONS = {"whitespace_flexible": False}
_CACHE_SIZE = 256


class GrammarError(ValueError):
    """The structured-output spec cannot be compiled (bad JSON schema, regex or grammar)."""


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar (serialized) for one spec.

    Raises:
        GrammarError: the spec is not well-formed (e.g. the schema is not JSON).
    """
    import llguidance

    try:
        if spec.json_schema is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=_JSON_OPTIONS)
        if spec.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
        if spec.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            if not spec.choice or any(not c for c in spec.choice):
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return llguidance.grammar_from("choice", json.dumps(spec.choice))
        if spec.grammar is not None:
            return llguidance.grammar_from("grammar", spec.grammar)
    except GrammarError:
        raise
    except Exception as exc:  # the library raises ValueError, and others for malformed text
        raise GrammarError(f"invalid structured output spec: {exc}") from exc
    raise GrammarError("structured output spec sets no constraint")


def _spec_key(spec: StructuredOutput) -> tuple[str, str]:
    if spec.json_schema is not None:
        return ("json_schema", spec.json_schema)
    if spec.json_object:
        return ("json_object", "")
    if spec.regex is not None:
        return ("regex", spec.regex)
    if spec.choice is not None:
        return ("choice", json.dumps(spec.choice))
    return ("grammar", spec.grammar or "")


class GrammarCompiler:
    """Compiles specs against one tokenizer and hands out a fresh matcher per request.

    Args:
        tokenizer: the model's Hugging Face fast tokenizer.
        vocab_size: the logits' width (may exceed the tokenizer's vocabulary).
        eos_token_ids: the tokens that end a sequence; the grammar allows them once complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()
        # spec key -> checked template matcher, or the error message of a spec that failed
        self._cache: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()

    @property
    def ll_tokenizer(self) -> Any:
        """The llguidance tokenizer (built on first use: about a second for a 50k vocabulary)."""
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos or None,
            )
        return self._ll_tokenizer

    def matcher(self, spec: StructuredOutput) -> Any:
        """A new ``llguidance.LLMatcher`` at the start of ``spec``'s grammar.

        Raises:
            GrammarError: the spec does not compile (the message says why).
        """
        import llguidance

        key = _spec_key(spec)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            try:
                grammar = grammar_text(spec)
                template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
                cached = f"invalid structured output spec: {template.get_error()}" if template.is_error() else template
            except GrammarError as exc:
                cached = str(exc)
            with self._lock:
                self._cache[key] = cached
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(cached, str):
            raise GrammarError(cached)
        return cached.deep_copy()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf (in place) every logit whose bit is 0 in ``bitmask``.

    Args:
        logits: ``[rows, vocab]`` on any device.
        bitmask: ``[rows, ceil(vocab' / 32)]`` int32 (bit ``j % 32`` of word ``j // 32`` allows
            token ``j``); tokens past ``32 * words`` are disallowed.
    """
    rows, vocab = logits.shape
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, -1)
    if allowed.shape[1] < vocab:
        pad = torch.zeros((rows, vocab - allowed.shape[1]), dtype=torch.bool, device=logits.device)
        allowed = torch.cat([allowed, pad], dim=1)
    logits.masked_fill_(~allowed[:, :vocab], float("-inf"))


class MaskJob:
    """The bitmask rows of one step, being filled in the background."""

    def __init__(self, future: concurrent.futures.Future[torch.Tensor] | None, rows: dict[str, int]) -> None:
        self._future = future
        self.rows = rows  # request id -> row of the bitmask

    def result(self) -> torch.Tensor | None:
        """The ``[len(rows), words]`` int32 bitmask (waits for the worker if needed)."""
        return None if self._future is None else self._future.result()


class GrammarMasks:
    """Fills next-token bitmasks for a batch of matchers in a worker thread.

    Args:
        compiler: gives the tokenizer's vocabulary size (the mask's width).
    """

    def __init__(self, compiler: GrammarCompiler) -> None:
        self._compiler = compiler
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor: Any = None
        self.fill_seconds = 0.0  # worker time spent filling masks, summed (for benchmarks)

    def start(self, matchers: dict[str, Any]) -> MaskJob:
        """Begin filling one row per ``request id -> matcher`` (in insertion order)."""
        if not matchers:
            return MaskJob(None, {})
        if self._pool is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        rows = {rid: i for i, rid in enumerate(matchers)}
        batch = list(matchers.values())
        return MaskJob(self._pool.submit(self._fill, batch), rows)

    def _fill(self, matchers: list[Any]) -> torch.Tensor:
        import time

        from llguidance.torch import fill_next_token_bitmask_par

        t0 = time.perf_counter()
        words = (self._compiler.ll_tokenizer.vocab_size + 31) // 32
        bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        self.fill_seconds += time.perf_counter() - t0
        return bitmask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

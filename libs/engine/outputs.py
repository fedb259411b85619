"""What the engine hands back: per-step token outputs, the hand-off allocation, stats.

All of these are msgspec Structs because the node services put them on the wire.
"""

from __future__ import annotations

import dataclasses
import enum

import msgspec

from libs.protocol.messages import TokenLogprob


class FinishReason(str, enum.Enum):
    """Why a request stopped producing tokens."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the caller
    ERROR = "error"  # could not run (see TokenOutput.error)


class TokenOutput(msgspec.Struct, omit_defaults=True):
    """What one request produced in one engine step.

    ``token_ids`` are the tokens new this step and ``text`` their text (a delta; text that
    might be the start of a stop string is held back until it is known not to be).
    ``finished`` is True on the request's last output. A ``prefill_only`` request ends
    with ``finished=True, prefilled=True, finish_reason=None`` when its first token is
    sampled and its KV is complete: decoding goes on elsewhere.
    """

    request_id: str
    token_ids: list[int] = []
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    prefilled: bool = False
    prefill_s: float = 0.0  # on the first token's output: start of its first prefill step -> sampled


class RemoteAllocation(msgspec.Struct, frozen=True):
    """Blocks a decode engine set aside for a prompt whose KV comes from a prefill node.

    ``block_ids`` cover the whole prompt, in token order. The first
    ``num_cached_tokens // block_size`` of them already hold the prompt's prefix (prefix
    cache hits); the transfer must write the rest.
    """

    block_ids: list[int]
    num_cached_tokens: int


@dataclasses.dataclass
class PrefillResult:
    """A finished prefill: its output (``prefilled=True`` unless it already ended) and
    the prompt's blocks, held until the engine's ``release`` (empty if it errored)."""

    output: TokenOutput
    block_ids: list[int]


class EngineStats(msgspec.Struct):
    """A snapshot of the engine's load, for load reports and metrics."""

    num_waiting: int
    num_running: int
    num_held: int
    num_remote_pending: int
    waiting_prefill_tokens: int
    num_running_decode: int
    free_blocks: int
    total_blocks: int
    largest_free_segment: int  # longest run of free or evictable blocks (refreshed every 0.1 s at most)
    fragmentation: float  # 1 - largest_free_segment / free_blocks
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    prefill_tokens_per_s: float
    decode_step_time_s: float
    num_preemptions: int
    prefill_pass_tokens: float = 0.0  # prompt tokens per timed prefill step (EMA over the steps of prefill_tokens_per_s)
    prefill_pass_s: float = 0.0  # seconds per timed prefill step (EMA over the same steps)
    max_pass_tokens: int = 0  # the most prompt tokens one step may take (max_num_batched_tokens); 0: unknown
    cpu_threads: int = 0  # threads a CPU engine computes with (0: not a CPU engine, or not known)
    cpu_share: float = 0.0  # share of those threads' time its steps got, EMA (0: not measured)

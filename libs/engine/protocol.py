"""The engine a node hosts, as the node's role handlers use it.

A node runs one engine behind this protocol: FlowKV's own paged engine
(:class:`libs.engine.async_engine.AsyncEngine`) or vLLM's v1 engine
(:class:`libs.vllm_engine.engine.VllmEngine`). The handlers in ``services/prefill``,
``services/decode`` and ``services/node`` see nothing else of it.

A disaggregated request uses it like this:

- P: :meth:`Engine.prefill` computes the prompt, samples the first token and *holds* the
  prompt's blocks (their ids come back); the KV agent reads them from :attr:`Engine.pool`;
  :meth:`Engine.release` gives them back once the transfer has returned or failed.
- D: :meth:`Engine.allocate_remote` reserves blocks for the prompt (prefix-cache hits
  reused) that P writes into through the agent; :meth:`Engine.decode_remote` then decodes
  from prompt + first token once the bytes have landed, or :meth:`Engine.release` drops the
  reservation when they did not.
- colocated (or a recompute after a failed hand-off): :meth:`Engine.generate`.

Every request-level call is a coroutine; ``stats``, ``prefix_hashes`` and ``busy_s`` are
snapshots that never wait for the engine, so a node reports its load on time whatever the
engine is doing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from libs.engine.outputs import EngineStats, PrefillResult, RemoteAllocation, TokenOutput
from libs.engine.pacing import Objectives
from libs.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from libs.kvtransfer.layout import KVLayout
    from libs.kvtransfer.pool import KVPool

__all__ = ["Engine", "EngineStats", "PrefillResult", "RemoteAllocation", "TokenOutput"]


@runtime_checkable
class Engine(Protocol):
    """What a node needs of its engine (see the module docstring for the call order)."""

    # ----------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Build the engine (weights, KV pool) and start serving."""

    async def stop(self) -> None:
        """Stop serving; open streams end with an error."""

    # ---------------------------------------------------------------- model

    @property
    def model_name(self) -> str:
        """The name the node reports and the scheduler matches requests against."""

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output, in tokens."""

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are ``0 .. vocab_size - 1``."""

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a generation."""

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (decoding stop strings, logprob texts)."""

    # -------------------------------------------------------- KV for transfers

    @property
    def layout(self) -> KVLayout:
        """What one KV block is; both ends of a hand-off must agree on it."""

    @property
    def pool(self) -> KVPool:
        """The KV memory the node's agent reads (P) and writes (D), by block id."""

    # -------------------------------------------------------------- snapshots

    def stats(self) -> EngineStats:
        """The latest load snapshot (never waits for a running step)."""

    def prefix_hashes(self) -> list[int]:
        """Recently cached prefix-block hashes (empty if the engine does not share them)."""

    @property
    def busy_s(self) -> float:
        """How long the current step has been running (0 between steps)."""

    # --------------------------------------------------------------- requests

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 num_prior_output_tokens: int = 0, objectives: Objectives | None = None) -> AsyncIterator[TokenOutput]:
        """Run a request here from prompt to finish; the last output has ``finished``.

        ``num_prior_output_tokens``: the prompt's last tokens that are the request's own
        earlier output (a retry, a recompute); seeds, penalties and grammars go on after
        them where the engine supports it. ``objectives``: the request's TTFT and TPOT
        objectives, which an engine may pace its prompts by (FlowKV's does,
        :mod:`libs.engine.pacing`; vLLM's does not). The same on :meth:`prefill` and
        :meth:`decode_remote`.
        """

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                      num_prior_output_tokens: int = 0, objectives: Objectives | None = None) -> PrefillResult:
        """Prefill and sample the first token; the prompt's blocks stay held until :meth:`release`.

        Returns once the KV is complete in :attr:`pool`. ``output.prefilled`` is False when
        the request ended at its first token (nothing to hand over).
        """

    async def allocate_remote(self, request_id: str, prompt_token_ids: list[int], *, first_token_id: int = -1,
                              params: SamplingParams | None = None) -> RemoteAllocation:
        """Reserve blocks for a prompt whose KV another node sends (prefix hits reused).

        ``first_token_id`` and ``params`` are the request's first token (sampled by P) and
        its sampling: an engine that starts the request at reservation time needs them then
        (vLLM's does; FlowKV's own waits for :meth:`decode_remote`). Raises
        :class:`libs.kvtransfer.allocator.NoFreeBlocks` when the pool cannot hold the prompt.
        """

    def decode_remote(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                      params: SamplingParams, *, num_prior_output_tokens: int = 0,
                      objectives: Objectives | None = None) -> AsyncIterator[TokenOutput]:
        """The hand-off landed in the reserved blocks: decode on from prompt + first token."""

    async def release(self, request_id: str) -> None:
        """Give back a prefill's held blocks or a reservation that will not be decoded."""

    async def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if it was unknown."""

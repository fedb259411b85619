"""VllmEngine: vLLM's v1 async engine behind the node's engine protocol.

:class:`VllmEngine` implements :class:`libs.engine.protocol.Engine` on ``AsyncLLM`` with
FlowKV's KV connector (:mod:`libs.vllm_engine.connector`), so a node runs vLLM in the
prefill, decode or hybrid role under FlowKV's scheduler and gateway:

- ``generate``: a plain vLLM request (colocated, or a recompute after a failed hand-off).
- ``prefill``: the request with ``max_tokens=1`` and ``flowkv_hold``; vLLM keeps its blocks
  and returns their ids; ``release`` gives them back.
- ``allocate_remote``: the request (prompt + P's first token, the rest of its sampling)
  enters vLLM as an external load of the prompt; vLLM reserves the blocks and the
  connector tells this object their ids. ``decode_remote`` reports the bytes landed and
  streams the tokens after the first. ``release`` aborts it and frees the blocks.
- ``pool``: vLLM's own KV cache, mapped from the shared segment vLLM allocated it in (CPU)
  or through the CUDA IPC handle of its allocation (CUDA).

``num_prior_output_tokens`` (a retry's or a recompute's earlier output at the end of the
prompt) is accepted and not used: vLLM takes every prompt token as prompt, so greedy
output continues exactly, while seeded sampling and output penalties start over.

Load (``stats``) comes from vLLM's scheduler stats (a stat logger): waiting and running
requests, KV usage, the prompt tokens per second of steps that prefilled, the time of
steps that only decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import torch

from libs.engine.outputs import EngineStats, PrefillResult, RemoteAllocation, TokenLogprob, TokenOutput
from libs.engine.pacing import Objectives
from libs.engine.sampling import SamplingParams
from libs.kvtransfer.allocator import NoFreeBlocks
from libs.kvtransfer.layout import KVLayout
from libs.kvtransfer.pool import KVPool
from libs.vllm_engine.connector import BLOCK_IDS, HOLD, NODE_ID, REMOTE, Allocation
from libs.vllm_engine.kv_export import attach, layout_of

log = logging.getLogger(__name__)
_DEFAULT_KV_BYTES = 1 << 30
_EMA = 0.2  # weight of the newest step in the prefill-rate and decode-step averages


def _logprobs(comp: Any, num_top: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-token logprob maps (sampled token and the ``num_top`` best, by rank) as
    FlowKV's :class:`TokenLogprob` list."""
    if num_top is None or comp.logprobs is None:
        return None
    entries = []
    for token_id, ranked in zip(comp.token_ids, comp.logprobs):
        best = sorted((lp.rank, tid, lp.logprob) for tid, lp in ranked.items() if lp.rank is not None)[:num_top]
        entries.append(TokenLogprob(token_id=int(token_id), logprob=float(ranked[token_id].logprob),
                                    top_token_ids=[int(t) for _, t, _ in best],
                                    top_logprobs=[float(v) for _, _, v in best]))
    return entries


class VllmEngine:
    """vLLM's engine as a node's engine (see the module docstring).

    Args:
        model: a Hugging Face model directory (or hub name vLLM can load).
        model_name: the name the node reports.
        dtype: the weights' and KV cache's dtype.
        block_size: vLLM's KV block size (a multiple of 32 on CPU).
        num_blocks: KV blocks (None: 1 GiB of them, or ``VLLM_CPU_KVCACHE_SPACE`` GiB if set).
        max_model_len: longest prompt plus output (None: the model's).
        max_num_seqs, max_num_batched_tokens: vLLM's batch limits (None: vLLM's defaults).
        enable_prefix_caching: vLLM's prefix cache.
        seed: vLLM's seed.
        alloc_timeout_s: how long ``allocate_remote`` waits for vLLM to reserve the blocks
            before it answers that the pool is full.
        enforce_eager: run the model eagerly (no torch.compile). With ``num_blocks`` set
            too, vLLM skips its warm-up pass, so the engine starts in seconds on CPU.
    """

    def __init__(self, model: str, model_name: str = "", dtype: str = "float32", block_size: int = 32,
                 num_blocks: int | None = None, max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True, seed: int = 0,
                 alloc_timeout_s: float = 2.0, enforce_eager: bool = False) -> None:
        self._model = model
        self._model_name = model_name or os.path.basename(model.rstrip("/"))
        self._dtype = dtype
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._max_model_len = max_model_len
        self._max_num_seqs = max_num_seqs
        self._max_num_batched_tokens = max_num_batched_tokens
        self._prefix_caching = enable_prefix_caching
        self._seed = seed
        self._alloc_timeout_s = alloc_timeout_s
        self._enforce_eager = enforce_eager
        self._llm: Any = None
        self._tokenizer: Any = None
        self._pool: KVPool | None = None
        self._layout: KVLayout | None = None
        self._events_dir: str | None = None
        self._events: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._allocations: dict[str, asyncio.Future[Allocation]] = {}
        self._collectors: dict[str, Any] = {}  # D: reserved requests' output queues
        self._landing: set[str] = set()  # D: landed, no output from vLLM yet (its stats may not show them)
        self._held: set[str] = set()
        self._stats = EngineStats(num_waiting=0, num_running=0, num_held=0, num_remote_pending=0,
                                  waiting_prefill_tokens=0, num_running_decode=0, free_blocks=0, total_blocks=0,
                                  largest_free_segment=0, fragmentation=0.0, prefix_cache_queries=0,
                                  prefix_cache_hits=0, prefix_cache_hit_rate=0.0, prefill_tokens_per_s=0.0,
                                  decode_step_time_s=0.0, num_preemptions=0)
        self._last_step: float | None = None

    # ------------------------------------------------------------- life cycle

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._events_dir = tempfile.mkdtemp(prefix="flowkv-vllm-")
        path = os.path.join(self._events_dir, "events.sock")
        self._events = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._events.bind(path)
        self._events.setblocking(False)
        self._reader = asyncio.create_task(self._read_events(), name="vllm-events")
        args = AsyncEngineArgs(
            model=self._model, served_model_name=[self._model_name], dtype=self._dtype, block_size=self._block_size,
            max_model_len=self._max_model_len, enable_prefix_caching=self._prefix_caching, seed=self._seed,
            num_gpu_blocks_override=self._num_blocks, kv_cache_memory_bytes=self._kv_cache_bytes(),
            enforce_eager=self._enforce_eager, worker_extension_cls="libs.vllm_engine.connector.FlowKVWorkerExtension",
            kv_transfer_config=KVTransferConfig(
                kv_connector="FlowKVConnector", kv_connector_module_path="libs.vllm_engine.connector",
                kv_role="kv_both", kv_connector_extra_config={"events_socket": path, "node_pid": os.getpid()}),
            **{k: v for k, v in (("max_num_seqs", self._max_num_seqs),
                                 ("max_num_batched_tokens", self._max_num_batched_tokens)) if v is not None},
        )
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=[self._stat_logger])
        self._tokenizer = AutoTokenizer.from_pretrained(self._model)
        (info,) = await self._llm.collective_rpc("flowkv_pool_info")
        self._layout = layout_of(info)
        self._pool = attach(info)
        self._stats.total_blocks = self._stats.free_blocks = self._stats.largest_free_segment = info["num_blocks"]
        sched = getattr(getattr(self._llm, "vllm_config", None), "scheduler_config", None)
        self._stats.max_pass_tokens = int(getattr(sched, "max_num_batched_tokens", 0) or 0)

    def _kv_cache_bytes(self) -> int | None:
        """The bytes ``num_blocks`` blocks take, so vLLM sizes its cache without profiling.

        Without ``num_blocks``: ``_DEFAULT_KV_BYTES`` (``VLLM_CPU_KVCACHE_SPACE``, in GiB,
        overrides it inside vLLM). vLLM's own default reserves 90% of the machine's memory
        per engine, which two nodes on one host cannot both have.
        """
        if self._num_blocks is None:
            return _DEFAULT_KV_BYTES
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self._model)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = getattr(torch, self._dtype).itemsize
        return self._num_blocks * cfg.num_hidden_layers * 2 * self._block_size * kv_heads * head_dim * itemsize

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
        if self._pool is not None:
            self._pool.close()
        if self._events is not None:
            self._events.close()
        if self._events_dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._events_dir, "events.sock"))
                os.rmdir(self._events_dir)

    # ------------------------------------------------------------- properties

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self._llm.model_config.get_vocab_size())

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self._tokenizer.eos_token_id
        return [] if eos is None else [int(eos)]

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def layout(self) -> KVLayout:
        assert self._layout is not None, "start() first"
        return self._layout

    @property
    def pool(self) -> KVPool:
        assert self._pool is not None, "start() first"
        return self._pool

    def stats(self) -> EngineStats:
        self._stats.num_held = len(self._held)
        self._stats.num_remote_pending = len(self._collectors) + len(self._landing)
        return self._stats

    def prefix_hashes(self) -> list[int]:
        return []  # vLLM's block hashes are not FlowKV's: nothing to share with the scheduler

    @property
    def busy_s(self) -> float:
        return 0.0  # vLLM steps in its own process; this process never waits on one

    # ---------------------------------------------------------------- requests

    def _params(self, params: SamplingParams, **override: Any) -> Any:
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VllmParams

        fields = {
            "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1, "seed": params.seed, "stop": list(params.stop) or None,
            "stop_token_ids": list(params.stop_token_ids) or None, "ignore_eos": params.ignore_eos,
            "logprobs": params.logprobs, "min_tokens": params.min_tokens, "min_p": params.min_p,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty,
            "logit_bias": dict(params.logit_bias) or None, "output_kind": RequestOutputKind.DELTA,
        }
        fields.update(override)
        return VllmParams(**fields)

    def _output(self, request_id: str, out: Any, num_top: int | None, prefilled: bool = False) -> TokenOutput:
        comp = out.outputs[0]
        finished = bool(out.finished)
        reason = comp.finish_reason if finished and not prefilled else None
        return TokenOutput(
            request_id=request_id, token_ids=list(comp.token_ids), text=comp.text, finished=finished,
            finish_reason=None if reason is None else str(reason), num_prompt_tokens=len(out.prompt_token_ids or []),
            num_output_tokens=len(comp.token_ids), num_cached_tokens=int(out.num_cached_tokens or 0),
            prefilled=prefilled, logprobs=_logprobs(comp, num_top),
        )

    async def _stream(self, request_id: str, collector: Any, num_top: int | None,
                      offset_tokens: int = 0) -> AsyncIterator[TokenOutput]:
        finished = False
        produced = offset_tokens
        try:
            while not finished:
                out = collector.get_nowait() or await collector.get()
                token = self._output(request_id, out, num_top)
                produced += len(token.token_ids)
                token.num_output_tokens = produced
                finished = token.finished
                yield token
        finally:
            if not finished:
                await self._llm.abort(request_id)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       num_prior_output_tokens: int = 0,
                       objectives: Objectives | None = None) -> AsyncIterator[TokenOutput]:
        # ``objectives`` are not used: vLLM's scheduler does not pace prompts by them.
        collector = await self._llm.add_request(request_id, {"prompt_token_ids": list(prompt_token_ids)},
                                                self._params(params))
        async for out in self._stream(request_id, collector, params.logprobs):
            yield out

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                      num_prior_output_tokens: int = 0, objectives: Objectives | None = None) -> PrefillResult:
        hold = params.max_tokens > 1
        vparams = self._params(params, max_tokens=1, min_tokens=min(params.min_tokens, 1),
                               extra_args={"kv_transfer_params": {HOLD: hold, NODE_ID: request_id}})
        collector = await self._llm.add_request(request_id, {"prompt_token_ids": list(prompt_token_ids)}, vparams)
        out = None
        try:
            while out is None or not out.finished:
                out = collector.get_nowait() or await collector.get()
        except BaseException:
            await self._llm.abort(request_id)
            raise
        block_ids = list((out.kv_transfer_params or {}).get(BLOCK_IDS, []))
        if block_ids:
            self._held.add(request_id)
        comp = out.outputs[0]
        ended = not block_ids or comp.finish_reason != "length" or not comp.token_ids
        return PrefillResult(self._output(request_id, out, params.logprobs, prefilled=not ended), block_ids)

    async def allocate_remote(self, request_id: str, prompt_token_ids: list[int], *, first_token_id: int = -1,
                              params: SamplingParams | None = None) -> RemoteAllocation:
        if first_token_id < 0 or params is None:
            raise ValueError("a vLLM decode node needs the first token and the sampling of a hand-off")
        need = -(-len(prompt_token_ids) // self.layout.block_size)
        if need > self._stats.total_blocks:
            raise NoFreeBlocks(f"{need} blocks needed, the pool has {self._stats.total_blocks}")
        fut: asyncio.Future[Allocation] = asyncio.get_running_loop().create_future()
        self._allocations[request_id] = fut
        rest = self._params(params, max_tokens=max(1, params.max_tokens - 1), min_tokens=max(0, params.min_tokens - 1),
                            extra_args={"kv_transfer_params": {REMOTE: True, NODE_ID: request_id,
                                                               "num_prompt_tokens": len(prompt_token_ids)}})
        try:
            self._collectors[request_id] = await self._llm.add_request(
                request_id, {"prompt_token_ids": [*prompt_token_ids, first_token_id]}, rest)
            alloc = await asyncio.wait_for(asyncio.shield(fut), self._alloc_timeout_s)
        except asyncio.TimeoutError:
            await self._drop(request_id)
            raise NoFreeBlocks(f"vLLM did not reserve {need} blocks within {self._alloc_timeout_s}s") from None
        except BaseException:
            await self._drop(request_id)
            raise
        finally:
            self._allocations.pop(request_id, None)
        return RemoteAllocation(block_ids=list(alloc.block_ids), num_cached_tokens=alloc.num_cached_tokens)

    async def decode_remote(self, request_id: str, prompt_token_ids: list[int], first_token_id: int,
                            params: SamplingParams, *, num_prior_output_tokens: int = 0,
                            objectives: Objectives | None = None) -> AsyncIterator[TokenOutput]:
        collector = self._collectors.pop(request_id, None)
        if collector is None:
            raise ValueError(f"{request_id} has no reservation here")
        # Counted as pending until vLLM's first output: until its next stats it may show the
        # request nowhere, and a node that reports no work is one that lost its requests.
        self._landing.add(request_id)
        try:
            await self._llm.collective_rpc("flowkv_landed", args=(request_id,))
            async for out in self._stream(request_id, collector, params.logprobs, offset_tokens=1):
                self._landing.discard(request_id)
                yield out
        finally:
            self._landing.discard(request_id)

    async def release(self, request_id: str) -> None:
        if request_id in self._held:
            self._held.discard(request_id)
            await self._llm.collective_rpc("flowkv_release", args=(request_id,))
        elif request_id in self._collectors:
            await self._drop(request_id)

    async def abort(self, request_id: str) -> bool:
        known = request_id in self._held or request_id in self._collectors
        await self.release(request_id)
        await self._llm.abort(request_id)
        return known

    async def _drop(self, request_id: str) -> None:
        """End a reservation: abort the vLLM request, then free its blocks (reported landed)."""
        self._collectors.pop(request_id, None)
        await self._llm.abort(request_id)
        await self._llm.collective_rpc("flowkv_landed", args=(request_id,))

    # ---------------------------------------------------------------- plumbing

    async def _read_events(self) -> None:
        assert self._events is not None
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._events, 1 << 20)
            try:
                event = msgspec.msgpack.decode(data, type=Allocation)
            except msgspec.DecodeError:
                log.warning("undecodable event from the vLLM engine core")
                continue
            fut = self._allocations.get(event.request_id)
            if fut is not None and not fut.done():
                fut.set_result(event)

    def _stat_logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _Logger(StatLoggerBase):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                engine._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger()

    def _record(self, sched: Any, it: Any) -> None:
        now = time.monotonic()
        step_s = None if self._last_step is None else now - self._last_step
        self._last_step = now
        s = self._stats
        if sched is not None:
            s.num_waiting = int(sched.num_waiting_reqs)
            s.num_running = int(sched.num_running_reqs)
            # Every snapshot, not only steps with outputs: after an abort the engine's last
            # stats come with none, and a stale count would keep the node looking busy.
            s.num_running_decode = s.num_running
            used = float(sched.kv_cache_usage)
            s.free_blocks = max(0, round(s.total_blocks * (1.0 - used)))
            s.largest_free_segment = s.free_blocks
            pc = getattr(sched, "prefix_cache_stats", None)
            if pc is not None:
                s.prefix_cache_queries += int(pc.queries)
                s.prefix_cache_hits += int(pc.hits)
                s.prefix_cache_hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        if it is not None and step_s is not None and 0 < step_s < 10:
            prompt = int(getattr(it, "num_prompt_tokens", 0))
            if prompt > 0:
                rate = prompt / step_s
                s.prefill_tokens_per_s = rate if s.prefill_tokens_per_s == 0 else (1 - _EMA) * s.prefill_tokens_per_s + _EMA * rate
                s.prefill_pass_tokens = (prompt if s.prefill_pass_tokens == 0
                                         else (1 - _EMA) * s.prefill_pass_tokens + _EMA * prompt)
                s.prefill_pass_s = step_s if s.prefill_pass_s == 0 else (1 - _EMA) * s.prefill_pass_s + _EMA * step_s
            elif int(getattr(it, "num_generation_tokens", 0)) > 0:
                s.decode_step_time_s = step_s if s.decode_step_time_s == 0 else (1 - _EMA) * s.decode_step_time_s + _EMA * step_s

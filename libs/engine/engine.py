"""LLMEngine: a paged engine whose KV cache is one block-major KVPool, with the P/D hand-off API.

Request life cycle (one step a line):

1. ``add_request`` -> WAITING (a request that can never fit finishes at once with ``error``).
2. admitted by ``step`` when a running slot and blocks for all its tokens are free
   (prefix-cache hits reused) -> RUNNING.
3. prefill: its uncomputed tokens run in chunks within ``max_num_batched_tokens``.
4. the chunk that completes the tokens samples the first token.
5. decode: one token per step; a new block is appended when the last fills up
   (no room: the newest running request is preempted, its blocks freed, and it goes
   back to the front of WAITING with prompt + output so far, to be recomputed).
6. finished (stop / length / abort / error): blocks freed (cached full blocks stay
   evictable in the prefix cache).

Hand-off: a ``prefill_only`` request stops after step 4 as HELD, its prompt blocks
kept until ``release``. A decode engine calls ``allocate_remote`` (blocks for the prompt,
prefix hits reused), lets the transfer write the blocks past the hits straight into the
pool, then ``commit_remote`` enters the request at step 5 with the first token.

One ``step`` = schedule (decodes first, then running prefill chunks, then admissions),
one prefill forward and one decode forward, sampling, stop checks, outputs.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from libs.engine.block_manager import BlockManager
from libs.engine.config import EngineConfig
from libs.engine.detokenizer import IncrementalDetokenizer
from libs.engine.loader import load_model
from libs.engine.model_runner import ModelRunner
from libs.engine.outputs import EngineStats, FinishReason, RemoteAllocation, TokenOutput
from libs.engine.pacing import Decoding, Objectives, Waiting, prefill_allowance
from libs.engine.request import Request, RequestStatus
from libs.engine.sampler import Sampler
from libs.engine.sampling import SamplingParams, token_logprob
from libs.engine.scheduler import Scheduler, StepPlan
from libs.engine.step_clock import CpuShare, StepClock, ema
from libs.engine.structured import GrammarCompiler, GrammarError, GrammarMasks, MaskJob
from libs.kvtransfer.allocator import NoFreeBlocks
from libs.kvtransfer.layout import KVLayout
from libs.kvtransfer.pool import KVPool

__all__ = ["LLMEngine", "NoFreeBlocks"]

log = logging.getLogger(__name__)

_EMA = 0.2
_GATHER_SHARE = 0.05  # gather_wait_s: the most of the expected prefill time spent waiting for more prompts
# The largest free run costs O(blocks) (~0.1 ms at 60k); stats() runs after every step.
_SEGMENT_REFRESH_S = 0.1


class LLMEngine:
    """The synchronous engine core; drive it from one thread (see :class:`AsyncEngine`).

    Args:
        config: the engine's configuration.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.device_type == "cuda" and torch.device(config.device).index is not None:
            # Per thread: the thread that builds the engine also captures its graphs.
            torch.cuda.set_device(torch.device(config.device))
        dtype = KVLayout(config.dtype, 1, 1, 1, 1).torch_dtype
        loaded = load_model(config.model, dtype, config.device, config.seed)
        self.model_config = loaded.config
        self._tokenizer = loaded.tokenizer
        self._model_name = config.model
        mc = loaded.config
        self._layout = KVLayout(config.dtype, mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim)
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self._pool = KVPool.allocate(self._layout, num_blocks, device=config.device, shared=config.shared_pool)
        limits = [mc.max_position_embeddings, num_blocks * config.block_size]
        if config.max_model_len is not None:
            limits.append(config.max_model_len)
        self._max_model_len = min(limits)
        self.runner = ModelRunner(mc, loaded.state_dict, self._pool.tensor, self._max_model_len)
        if self._pool.device.type == "cpu":
            from libs.engine.kernels import cpu as cpu_kernels

            # Built (or found in the cache) now, not inside the first request's step.
            log.info("native CPU kernels: %s", "on" if cpu_kernels.native() is not None else "off (torch paths)")
        if self._pool.device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs()
        if config.warms_up:
            self._warm_up()
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        eos = set(mc.eos_token_ids)
        if getattr(self._tokenizer, "eos_token_id", None) is not None:
            eos.add(self._tokenizer.eos_token_id)
        self._eos = sorted(eos)
        self._sampler = Sampler(mc.vocab_size, self._pool.device)
        self.grammars = GrammarCompiler(self._tokenizer, mc.vocab_size, self._eos)
        self._masks = GrammarMasks(self.grammars)
        self._mask_job: MaskJob | None = None
        self._requests: dict[str, Request] = {}
        self._remote: dict[str, list[int]] = {}  # allocate_remote'd, not committed: prompt ids
        self._pending: list[TokenOutput] = []
        self._seed_gen = torch.Generator().manual_seed(config.seed)
        self._prefill_clock = StepClock(self._pool.device, _EMA)
        self._decode_step_s = 0.0
        # On CPU: how much of its threads' time the steps got (node processes sharing cores).
        self._cpu_share = CpuShare(torch.get_num_threads()) if self._pool.device.type == "cpu" else None
        self._largest_segment, self._largest_segment_at = 0, -_SEGMENT_REFRESH_S
        self.last_step_ran = False  # whether the last step computed anything (a chunk counts)

    def _capture_decode_graphs(self) -> None:
        """Replace the eager decode forward by CUDA graphs, one per batch-size bucket."""
        from libs.engine.cuda_graphs import CudaGraphRunner

        graphs = CudaGraphRunner(
            self.runner.decode_forward,
            max_num_seqs=self.config.max_num_seqs,
            max_blocks_per_seq=-(-self._max_model_len // self.config.block_size),
            device=self._pool.device,
        )
        graphs.capture()
        self.runner.decode_fn = graphs
        log.info("captured %d decode graphs in %.1fs", len(graphs.buckets), graphs.capture_seconds)

    def _warm_up(self) -> None:
        """Run the prefill shapes a step can take once, before any request and any block is used.

        On CUDA the first forward of a new shape pays for loading its kernels (lazy module
        loading), picking GEMM algorithms, and growing the caching allocator to the peak
        activation size (``benchmarks/gpu/first_requests.py`` times it; on a fresh H200
        the first 4.7k-token prompt took 1.44 s without this and 0.17 s with it). Three
        forwards: the step's whole token budget from position 0, half of it over the
        other half as cached context (the masked path of chunked prefill and prefix
        hits), and a batch of two short chunks, each followed by the logits of its last
        positions. They write into the pool's first blocks, which the block manager
        does not know yet: nothing of it can be read back as a prefix hit.
        """
        bs = self.config.block_size
        budget = min(self.config.max_num_batched_tokens, self._max_model_len - 1, self._pool.num_blocks * bs)
        if budget < 2:
            return
        t0 = time.perf_counter()
        vocab = self.model_config.vocab_size
        ids = [(7 + 31 * i) % vocab for i in range(budget)]
        blocks = list(range(-(-budget // bs)))
        half = budget // 2
        short = max(1, min(17, half // 2))
        for chunks in (
            [(ids, 0, blocks)],
            [(ids[half:], half, blocks)],
            [(ids[:short], 0, blocks), (ids[:3], 0, blocks)],
        ):
            torch.argmax(self.runner.logits(self.runner.prefill(chunks)), dim=-1).tolist()
        log.info("warmed up prefill (%d-token budget) in %.2fs", budget, time.perf_counter() - t0)

    # ------------------------------------------------------------ properties

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self._tokenizer

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def pool(self) -> KVPool:
        return self._pool

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    def has_work(self) -> bool:
        """Whether ``step`` has anything to do (queued requests or outputs to hand back)."""
        return bool(self._pending) or self.scheduler.has_work()

    # --------------------------------------------------------------- requests

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prefill_only: bool = False,
        num_prior_output_tokens: int = 0, objectives: Objectives | None = None,
    ) -> None:
        """Queue a request; its outputs come from :meth:`step`.

        Args:
            request_id: unique among live requests (ValueError otherwise).
            prompt_token_ids: the prompt.
            params: sampling and stop parameters.
            prefill_only: stop after the first token and hold the prompt's blocks until
                :meth:`release` (call it in every case, also when that output is final).
            num_prior_output_tokens: the prompt's last tokens that are this request's own
                earlier output (a recompute or retry): seeds, penalties and the grammar
                continue after them.
            objectives: the request's TTFT and TPOT objectives: with both, prompts are
                paced against the decodes' objectives (:mod:`libs.engine.pacing`).

        A request whose parameters do not fit the model (a ``logit_bias`` id out of the
        vocabulary, a structured-output spec that does not compile) finishes at once with
        ``error``.
        """
        if request_id in self._requests or request_id in self._remote:
            raise ValueError(f"request {request_id!r} already exists")
        req = self._new_request(request_id, prompt_token_ids, params, prefill_only, num_prior_output_tokens)
        _set_objectives(req, objectives)
        problem = self._check_fits(len(prompt_token_ids)) or self._prepare_sampling(req)
        if problem:
            self._pending.append(self._final(req, FinishReason.ERROR, error=problem))
            return
        self._requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks (held and remote-allocated ones too).

        Returns:
            True if the request existed. A queued or running request also yields a final
            ``abort`` output from the next :meth:`step`.
        """
        if request_id in self._remote:
            self.release(request_id)
            return True
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        was_active = req.status in (RequestStatus.WAITING, RequestStatus.RUNNING)
        self._sampler.forget(request_id)
        self.scheduler.remove(req)
        self.blocks.free(request_id)
        if was_active:
            self._pending.append(self._final(req, FinishReason.ABORT))
        req.status = RequestStatus.FINISHED
        return True

    def fail_active(self) -> list[str]:
        """After a failed step: drop every queued or running request (blocks freed, no outputs).

        Held and remote-allocated requests keep their blocks (a transfer may be using them).

        Returns:
            The ids dropped, for the caller to fail.
        """
        self._pending = []
        self._mask_job = None
        active = [r for r in self._requests.values() if r.status in (RequestStatus.WAITING, RequestStatus.RUNNING)]
        for req in active:
            self._sampler.forget(req.request_id)
            self.scheduler.remove(req)
            self.blocks.free(req.request_id)
            req.status = RequestStatus.FINISHED
            del self._requests[req.request_id]
        return [r.request_id for r in active]

    def held_block_ids(self, request_id: str) -> list[int]:
        """The prompt's blocks of a finished ``prefill_only`` request, in token order."""
        req = self._requests.get(request_id)
        if req is None or req.status is not RequestStatus.HELD:
            raise KeyError(f"request {request_id!r} holds no blocks (not a finished prefill_only request)")
        return self.blocks.block_ids(request_id)

    def segments(self, request_id: str) -> list[tuple[int, int]]:
        """The request's blocks as ``(start, length)`` runs."""
        return self.blocks.segments(request_id)

    def allocate_remote(self, request_id: str, prompt_token_ids: list[int]) -> RemoteAllocation:
        """Set aside blocks for a prompt whose KV a prefill node will send.

        Returns:
            All the prompt's block ids and ``num_cached_tokens`` already present (prefix
            hits); blocks from ``num_cached_tokens // block_size`` on are for the transfer.

        Raises:
            ValueError: the id is in use, or the prompt can never fit.
            NoFreeBlocks: not enough free blocks now (try later).
        """
        if request_id in self._requests or request_id in self._remote:
            raise ValueError(f"request {request_id!r} already exists")
        problem = self._check_fits(len(prompt_token_ids))
        if problem:
            raise ValueError(problem)
        n = len(prompt_token_ids)
        cached = self.blocks.allocate(request_id, prompt_token_ids, n, max_cached_blocks=n // self._layout.block_size)
        self._remote[request_id] = list(prompt_token_ids)
        return RemoteAllocation(block_ids=self.blocks.block_ids(request_id), num_cached_tokens=cached)

    def commit_remote(
        self, request_id: str, prompt_token_ids: list[int], first_token_id: int, params: SamplingParams,
        num_prior_output_tokens: int = 0, objectives: Objectives | None = None,
    ) -> None:
        """The prompt's KV has landed in the blocks of :meth:`allocate_remote`: decode from here.

        The first token (sampled by the prefill node) is not output again; the following
        tokens come from :meth:`step`. Full prompt blocks join the prefix cache. The
        penalties count the first token (and ``num_prior_output_tokens``, as in
        :meth:`add_request`) as output, the grammar is replayed over it, and the seeds go
        on from the next index, so the output continues exactly as on one node.
        ``objectives`` (its TPOT objective) as in :meth:`add_request`.
        """
        prompt = self._remote.get(request_id)
        if prompt is None:
            raise KeyError(f"request {request_id!r} has no remote allocation")
        if list(prompt_token_ids) != prompt:
            raise ValueError(f"request {request_id!r}: prompt differs from the one allocated")
        del self._remote[request_id]
        req = self._new_request(request_id, prompt, params, False, num_prior_output_tokens)
        _set_objectives(req, objectives)
        req.num_computed_tokens = len(prompt)
        req.num_cached_tokens = len(prompt)
        self.blocks.register_computed(request_id, prompt, len(prompt))
        self._requests[request_id] = req
        problem = self._prepare_sampling(req)
        if problem:
            self._finish(req, FinishReason.ERROR)
            self._pending.append(self._final(req, FinishReason.ERROR, error=problem))
            return
        req.token_ids.append(first_token_id)
        reason = self._advance_grammar(req, first_token_id) or self._check_stop(req, first_token_id)
        req.detok.mark_emitted()
        if reason is not None:
            self._finish(req, reason)
            out = self._final(req, reason)
            self._pending.append(out)
            return
        self.scheduler.add_running(req)

    def release(self, request_id: str) -> None:
        """Free the blocks of a held (prefill_only) or remote-allocated request."""
        if self._remote.pop(request_id, None) is not None:
            self.blocks.free(request_id)
            return
        req = self._requests.get(request_id)
        if req is not None and req.status is RequestStatus.HELD:
            del self._requests[request_id]
            self.blocks.free(request_id)
            req.status = RequestStatus.FINISHED

    # ------------------------------------------------------------------- step

    def step(self) -> list[TokenOutput]:
        """Run one scheduling iteration; returns the outputs of every request that advanced."""
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule(self.step_budget())
        self.last_step_ran = bool(plan.prefills or plan.decodes)
        self._mask_job = self._start_masks(plan)
        for req, reason in plan.failed:
            self._requests.pop(req.request_id, None)
            self._sampler.forget(req.request_id)
            outputs.append(self._final(req, FinishReason.ERROR, error=reason))
        mark = self._cpu_share.start() if self._cpu_share is not None and self.last_step_ran else None
        if plan.prefills and plan.decodes and self.runner.device.type == "cpu":
            outputs.extend(self._run_mixed(plan))
        else:
            if plan.prefills:
                outputs.extend(self._run_prefills(plan))
            if plan.decodes:
                outputs.extend(self._run_decodes(plan))
        if mark is not None:
            self._cpu_share.stop(mark)
        return outputs

    def step_budget(self) -> int:
        """This step's token budget: decodes plus the prefill tokens the measured prefill
        rate computes in what ``target_step_s`` leaves after the decodes.

        With no decode running the step stalls no stream, and prompts that will decode
        here take the whole ``max_num_batched_tokens``: a wave of prompts prefills in one
        step and decodes together after, instead of each prompt's prefill slowing the
        decodes of the ones before it. Prefill-only prompts (a prefill node) keep the
        target: one at a time, each is handed off sooner.

        While sequences decode, prompts under a TTFT objective get no more than the
        decodes' TPOT objectives leave them (:meth:`prefill_slack_s`), down to none: the
        step then only decodes, and the prompts spend their own slack instead.
        """
        cfg = self.config
        cap = cfg.max_num_batched_tokens
        decodes = self.scheduler.num_decoding
        if decodes == 0 and (cfg.target_step_s <= 0 or self._prompts_decode_here()):
            return cap
        rate = self._prefill_clock.rate
        if cfg.target_step_s <= 0:
            tokens = cap
        elif rate <= 0:
            return decodes + min(cfg.min_step_tokens, cap)
        else:
            prefill_s = max(0.0, cfg.target_step_s - (self._decode_step_s if decodes else 0.0))
            tokens = max(min(cfg.min_step_tokens, cap), int(prefill_s * rate))
        if decodes and rate > 0:
            slack = self.prefill_slack_s()
            if slack < math.inf:
                tokens = min(tokens, int(slack * rate))
        return min(cap, decodes + tokens)

    def prefill_slack_s(self) -> float:
        """The prefill time the next step may take before a decoding sequence would miss
        its TPOT objective (:func:`libs.engine.pacing.prefill_allowance`); unbounded when no
        decoding sequence has one, when a queued prompt has no TTFT objective, or when
        one would miss it by waiting a step more."""
        s, step, rate = self.scheduler, self._decode_step_s, self._prefill_clock.rate
        if step <= 0 or rate <= 0:
            return math.inf
        prompts = [r for r in s.running if r.num_uncomputed > 1] + list(s.waiting)
        if not prompts or any(r.ttft_deadline <= 0 for r in prompts):
            return math.inf
        now = time.perf_counter()
        decoding = []
        for r in s.running:
            if r.tpot_slo_s <= 0 or r.num_uncomputed != 1:
                continue
            left = max(0, r.params.max_tokens - r.num_output_tokens)
            if r.decode_limit <= 0:
                r.decode_limit = now + r.tpot_slo_s * left
            decoding.append(Decoding(r.decode_limit, left))
        if not decoding:
            return math.inf
        waiting = (Waiting(r.ttft_deadline, r.ttft_slo_s, r.num_uncomputed / rate) for r in prompts)
        return prefill_allowance(now, decoding, waiting, step)

    def gather_wait_s(self) -> float:
        """How long the first step after an idle spell should wait for more prompts.

        Prompts of a burst reach the engine milliseconds apart; waiting that long lets
        them prefill in one step (see :meth:`step_budget`). At most ``prefill_gather_s``
        and 5% of the measured time to prefill what waits; 0 while anything decodes, when
        a waiting prompt is prefill-only, or before the prefill rate is measured.
        """
        cfg, s = self.config, self.scheduler
        rate = self._prefill_clock.rate
        if cfg.prefill_gather_s <= 0 or rate <= 0 or not s.waiting or s.num_running:
            return 0.0
        if not self._prompts_decode_here():
            return 0.0
        return min(cfg.prefill_gather_s, _GATHER_SHARE * s.num_prefill_tokens_left() / rate)

    def _prompts_decode_here(self) -> bool:
        s = self.scheduler
        return not any(r.prefill_only for r in s.waiting) and not any(
            r.prefill_only for r in s.running if r.num_uncomputed > 1)

    def _run_prefills(self, plan: StepPlan) -> list[TokenOutput]:
        mark = self._prefill_clock.start()
        hidden = self.runner.prefill(self._prefill_chunks(plan))
        done_rows, done = self._prefilled(plan)
        outputs = self._sample(done, self.runner.logits(hidden[done_rows])) if done else []
        self._prefill_clock.stop(mark, sum(n for _, n in plan.prefills))
        return outputs

    def _run_decodes(self, plan: StepPlan) -> list[TokenOutput]:
        t0 = time.perf_counter()
        logits = self.runner.decode(self._decode_seqs(plan))
        self._decoded(plan)
        outputs = self._sample(plan.decodes, logits)
        self._decode_step_s = ema(self._decode_step_s, time.perf_counter() - t0, _EMA)
        return outputs

    def _run_mixed(self, plan: StepPlan) -> list[TokenOutput]:
        """Prefill chunks and decodes in one forward (CPU). The prefill clock is charged the
        step less a decode step's measured time, where that is the larger part
        (:meth:`StepClock.add_mixed`), so the rate the step budget uses stays the prefill's
        own; the decode step's average is left to decode-only steps."""
        t0 = time.perf_counter()
        hidden = self.runner.mixed(self._prefill_chunks(plan), self._decode_seqs(plan))
        done_rows, done = self._prefilled(plan)
        self._decoded(plan)
        n = len(plan.prefills)
        rows = hidden[done_rows + list(range(n, n + len(plan.decodes)))]
        reqs = done + list(plan.decodes)
        outputs = self._sample(reqs, self.runner.logits(rows))
        self._prefill_clock.add_mixed(time.perf_counter() - t0, self._decode_step_s, sum(k for _, k in plan.prefills))
        return outputs

    def _prefill_chunks(self, plan: StepPlan) -> list[tuple[list[int], int, list[int]]]:
        t0 = time.perf_counter()
        chunks = []
        for req, n in plan.prefills:
            if req.prefill_started_at is None:
                req.prefill_started_at = t0
            start = req.num_computed_tokens
            chunks.append((req.token_ids[start : start + n], start, self.blocks.block_ids(req.request_id)))
        return chunks

    def _prefilled(self, plan: StepPlan) -> tuple[list[int], list[Request]]:
        """Advance the prefilled requests; -> the rows and requests whose prompt is complete (they sample)."""
        done_rows, done = [], []
        for i, (req, n) in enumerate(plan.prefills):
            req.num_computed_tokens += n
            self.blocks.register_computed(req.request_id, req.token_ids, req.num_computed_tokens)
            if req.num_uncomputed == 0:
                done_rows.append(i)
                done.append(req)
        return done_rows, done

    def _decode_seqs(self, plan: StepPlan) -> list[tuple[int, int, list[int]]]:
        return [(r.token_ids[-1], len(r.token_ids) - 1, self.blocks.block_ids(r.request_id)) for r in plan.decodes]

    def _decoded(self, plan: StepPlan) -> None:
        for req in plan.decodes:
            req.num_computed_tokens += 1
            self.blocks.register_computed(req.request_id, req.token_ids, req.num_computed_tokens)

    def _start_masks(self, plan: StepPlan) -> MaskJob | None:
        """Start filling the grammar bitmasks of this step's sampling requests (during the forward)."""
        sampling = list(plan.decodes) + [r for r, n in plan.prefills if r.num_computed_tokens + n == len(r.token_ids)]
        matchers = {r.request_id: r.matcher for r in sampling if r.matcher is not None}
        return self._masks.start(matchers) if matchers else None

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[TokenOutput]:
        tokens = self._sampler.sample(reqs, logits, self._mask_job, self._banned)
        outputs = []
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            lp = None
            if req.params.logprobs is not None:
                lp = [token_logprob(logits[i], token, req.params.logprobs)]
            outputs.append(self._append_token(req, token, lp))
        return outputs

    def _append_token(self, req: Request, token: int, logprobs) -> TokenOutput:  # type: ignore[no-untyped-def]
        req.token_ids.append(token)
        reason = self._advance_grammar(req, token) or self._check_stop(req, token)
        if reason is not None:
            self._finish(req, reason)
        out = self._output(req, [token], reason, logprobs)
        if req.num_output_tokens == 1 and req.prefill_started_at is not None:
            out.prefill_s = time.perf_counter() - req.prefill_started_at
        if reason is None and req.prefill_only:
            self._sampler.forget(req.request_id)
            out.finished, out.prefilled = True, True
            out.text += req.detok.take_delta(final=True)
            self.scheduler.remove(req)
            req.status = RequestStatus.HELD
        return out

    def _check_stop(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if (token in self._eos and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        req.detok.add_token(token)
        if req.detok.stopped:
            return FinishReason.STOP
        if req.matcher is not None and req.matcher.is_stopped():
            return FinishReason.STOP  # the grammar is complete: nothing else may follow
        if req.num_output_tokens >= p.max_tokens or len(req.token_ids) >= self._max_model_len:
            return FinishReason.LENGTH
        return None

    def _advance_grammar(self, req: Request, token: int) -> FinishReason | None:
        """Feed an accepted token to the request's grammar; ERROR if the grammar refuses it."""
        if req.matcher is None or req.matcher.consume_token(token):
            return None
        req.detok.add_token(token)
        return FinishReason.ERROR

    def _prepare_sampling(self, req: Request) -> str | None:
        """Check the request's sampling parameters against the model; build its grammar matcher
        (replayed over the output it already has). Returns why it cannot run, or None."""
        p, vocab = req.params, self.model_config.vocab_size
        if not 0 <= req.num_prior_output_tokens < max(1, len(req.prompt_token_ids)):
            return f"num_prior_output_tokens {req.num_prior_output_tokens} out of range"
        if p.logit_bias and not all(0 <= t < vocab for t in p.logit_bias):
            return f"logit_bias token ids must be in [0, {vocab})"
        if p.structured is None:
            return None
        try:
            req.matcher = self.grammars.matcher(p.structured)
        except GrammarError as exc:
            return str(exc)
        prior = req.token_ids[req.num_original_prompt_tokens :]
        if prior and not req.matcher.consume_tokens(prior):
            return "the output so far does not match the structured output spec"
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self._sampler.forget(req.request_id)
        self.scheduler.remove(req)
        if req.prefill_only:
            req.status = RequestStatus.HELD  # blocks stay until release()
            return
        self._requests.pop(req.request_id, None)
        self.blocks.free(req.request_id)
        req.status = RequestStatus.FINISHED

    def _banned(self, req: Request) -> list[int]:
        if req.num_output_tokens >= req.params.min_tokens:
            return []
        return ([] if req.params.ignore_eos else list(self._eos)) + list(req.params.stop_token_ids)

    # ---------------------------------------------------------------- helpers

    def _new_request(self, request_id: str, prompt: list[int], params: SamplingParams, prefill_only: bool,
                     num_prior_output_tokens: int = 0) -> Request:
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))
        gen = torch.Generator(device=self._pool.device).manual_seed(seed)
        detok = IncrementalDetokenizer(self._tokenizer, list(prompt), list(params.stop))
        return Request(request_id, list(prompt), params, gen, detok, prefill_only=prefill_only, seed=seed,
                       num_prior_output_tokens=num_prior_output_tokens)

    def _check_fits(self, num_prompt_tokens: int) -> str | None:
        if num_prompt_tokens == 0:
            return "empty prompt"
        if num_prompt_tokens >= self._max_model_len:
            return (f"prompt of {num_prompt_tokens} tokens does not fit max_model_len {self._max_model_len} "
                    f"(pool of {self._pool.num_blocks} blocks of {self._layout.block_size})")
        return None

    def _output(self, req: Request, tokens: list[int], reason: FinishReason | None, logprobs=None) -> TokenOutput:  # type: ignore[no-untyped-def]
        return TokenOutput(
            request_id=req.request_id, token_ids=tokens, text=req.detok.take_delta(final=reason is not None),
            logprobs=logprobs, finished=reason is not None, finish_reason=reason.value if reason else None,
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
        )

    def _final(self, req: Request, reason: FinishReason, error: str | None = None) -> TokenOutput:
        out = self._output(req, [], reason)
        out.error = error
        return out

    def _auto_num_blocks(self) -> int:
        cfg = self.config
        if cfg.device_type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
            budget = int(free * cfg.gpu_memory_fraction)
        else:
            budget = cfg.cpu_kv_bytes
        return max(1, budget // self._layout.block_bytes)

    def stats(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        now = time.monotonic()
        if now - self._largest_segment_at >= _SEGMENT_REFRESH_S:
            self._largest_segment, self._largest_segment_at = b.largest_free_segment, now
        largest = min(self._largest_segment, b.num_free_blocks)  # never more than is free now
        pass_tokens, pass_s = self._prefill_clock.step
        return EngineStats(
            num_waiting=s.num_waiting, num_running=s.num_running,
            num_held=sum(r.status is RequestStatus.HELD for r in self._requests.values()),
            num_remote_pending=len(self._remote), waiting_prefill_tokens=s.num_prefill_tokens_left(),
            num_running_decode=s.num_decoding, free_blocks=b.num_free_blocks, total_blocks=b.num_total_blocks,
            largest_free_segment=largest, fragmentation=b.fragmentation(largest),
            prefix_cache_queries=b.num_query_tokens, prefix_cache_hits=b.num_hit_tokens,
            prefix_cache_hit_rate=b.num_hit_tokens / b.num_query_tokens if b.num_query_tokens else 0.0,
            prefill_tokens_per_s=self._prefill_clock.rate, decode_step_time_s=self._decode_step_s,
            num_preemptions=s.num_preemptions, prefill_pass_tokens=pass_tokens, prefill_pass_s=pass_s,
            max_pass_tokens=self.config.max_num_batched_tokens,
            cpu_threads=self._cpu_share.threads if self._cpu_share is not None else 0,
            cpu_share=self._cpu_share.share if self._cpu_share is not None else 0.0,
        )


def _set_objectives(req: Request, objectives: Objectives | None) -> None:
    """Give ``req`` the deadlines its objectives set, from now (less what it waited before it came)."""
    if objectives is None:
        return
    if objectives.ttft_slo_s > 0:
        req.ttft_slo_s = objectives.ttft_slo_s
        req.ttft_deadline = time.perf_counter() + objectives.ttft_slo_s - max(0.0, objectives.waited_s)
    req.tpot_slo_s = max(0.0, objectives.tpot_slo_s)

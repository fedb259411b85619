"""AsyncEngine: the LLMEngine on its own thread, driven from asyncio.

One background thread is the only one that touches the engine. Callers' commands go
through a lock-protected list, run between steps; the thread sleeps on a condition
when there is nothing to do. Outputs reach asyncio per request through
``loop.call_soon_threadsafe`` into one queue per request.

Nothing a caller needs to stay alive waits for the engine thread: :meth:`stats` and
:meth:`prefix_hashes` return snapshots the thread refreshes after every iteration, and
:attr:`busy_s` says how long the current step has run, so a node reports its load on
time however long a step takes.

If a step raises, every request the engine knew about is failed with
:class:`EngineError` (and aborted, freeing its blocks) and the error is logged; the
thread keeps serving. Cancelling a ``generate``/``decode_remote`` iterator or a
``prefill`` call aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch

from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.engine.outputs import EngineStats, PrefillResult, RemoteAllocation, TokenOutput
from libs.engine.pacing import Objectives
from libs.engine.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_RETRY_S = 0.005  # a step that could not schedule anything (blocks held elsewhere) retries after this
_HASH_REFRESH_S = 0.1  # the prefix-hash snapshot is rebuilt at most this often


class EngineError(RuntimeError):
    """The engine failed while running a request."""


class AsyncEngine:
    """asyncio front of :class:`LLMEngine`; implements :class:`libs.engine.protocol.Engine`.

    Args:
        config: builds the engine in :meth:`start`, on the engine thread.
        engine: or an engine already built (then ``config`` is ignored).
        prefix_hash_sample: how many recent prefix-cache hashes :meth:`prefix_hashes` keeps.
        step_delay_s: test-only fault injection: every step also sleeps this long (a node
            whose steps outlast the scheduler's node timeout must still report on time).
    """

    def __init__(
        self, config: EngineConfig | None = None, engine: LLMEngine | None = None, prefix_hash_sample: int = 256,
        step_delay_s: float = 0.0,
    ) -> None:
        if config is None and engine is None:
            raise ValueError("AsyncEngine needs a config or an engine")
        self._config = config
        self.engine: LLMEngine | None = engine
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue[TokenOutput | BaseException]] = {}
        self._stats: EngineStats | None = None
        self._held: dict[str, list[int]] = {}  # prefilled request -> its held blocks, set by the engine thread
        self._hash_limit = prefix_hash_sample
        self._hashes: list[int] = []
        self._hashes_at = -_HASH_REFRESH_S
        self._step_started: float | None = None  # monotonic start of the running step, None between steps
        self._step_delay_s = step_delay_s

    # ------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Start the engine thread; it builds the engine (if needed) before serving.

        The engine is built on the thread that steps it, so one thread runs all of its
        OpenMP work. libgomp keeps a worker team per thread that starts parallel work, and
        once it manages more threads than there are cores it stops spinning between
        parallel regions: a model loaded on one thread and stepped on another made every
        CPU decode step about 30% slower (two cores, SmolLM2, batch 1: 32 ms against 25 ms).
        """
        loop = self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if not ready.done():
                ready.set_result(None) if exc is None else ready.set_exception(exc)

        def main() -> None:
            try:
                if self.engine is None:
                    assert self._config is not None
                    device = torch.device(self._config.device)
                    if device.type == "cuda" and device.index is not None:
                        torch.cuda.set_device(device)  # graphs are captured on this thread's device
                    self.engine = LLMEngine(self._config)
                self._stats = self.engine.stats()
            except BaseException as exc:  # handed to start()'s caller
                loop.call_soon_threadsafe(settle, exc)
                return
            loop.call_soon_threadsafe(settle, None)
            self._run()

        self._thread = threading.Thread(target=main, name="flowkv-engine", daemon=True)
        self._thread.start()
        try:
            await ready
        except BaseException:
            if ready.done() and not ready.cancelled():  # the build failed: its thread is ending
                await asyncio.to_thread(self._thread.join)
                self._thread = None
            raise

    async def stop(self) -> None:
        """Stop the thread; open streams fail with :class:`EngineError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for queue in self._streams.values():
            queue.put_nowait(EngineError("engine stopped"))

    # ------------------------------------------------------------- properties

    @property
    def tokenizer(self) -> Any:
        return self._engine.tokenizer

    @property
    def layout(self):  # type: ignore[no-untyped-def]
        return self._engine.layout

    @property
    def pool(self):  # type: ignore[no-untyped-def]
        return self._engine.pool

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def eos_token_ids(self) -> list[int]:
        return self._engine.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return int(self._engine.model_config.vocab_size)

    def stats(self) -> EngineStats:
        """The latest snapshot (refreshed by the engine thread after every iteration)."""
        assert self._stats is not None, "start() first"
        return self._stats

    def prefix_hashes(self) -> list[int]:
        """The most recently cached prefix-block hashes (a snapshot, at most 0.1 s old between steps)."""
        return self._hashes

    @property
    def busy_s(self) -> float:
        """How long the engine's current step has been running (0 between steps)."""
        started = self._step_started
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    @property
    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("AsyncEngine not started")
        return self.engine

    # ---------------------------------------------------------------- requests

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
        num_prior_output_tokens: int = 0, objectives: Objectives | None = None,
    ) -> AsyncIterator[TokenOutput]:
        """Run a request here from prompt to finish; yields its outputs (the last has ``finished``).

        ``num_prior_output_tokens``: the prompt's last tokens that are the request's own
        earlier output; ``objectives``: its TTFT and TPOT objectives, which the engine paces
        prompts by (see :meth:`LLMEngine.add_request`).
        """
        queue = self._open(request_id)
        try:
            await self._call(lambda e: e.add_request(request_id, list(prompt_token_ids), params,
                                                     num_prior_output_tokens=num_prior_output_tokens,
                                                     objectives=objectives))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        async for out in self._drain(request_id, queue):
            yield out

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                      num_prior_output_tokens: int = 0, objectives: Objectives | None = None) -> PrefillResult:
        """Prefill a prompt and sample its first token; the prompt's blocks stay held.

        Returns once the KV is complete in the pool (device synchronised). Call
        :meth:`release` afterwards in every case.
        """
        queue = self._open(request_id)
        try:
            await self._call(lambda e: e.add_request(request_id, list(prompt_token_ids), params, prefill_only=True,
                                                     num_prior_output_tokens=num_prior_output_tokens,
                                                     objectives=objectives))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        final: TokenOutput | None = None
        async for out in self._drain(request_id, queue):
            final = out
        assert final is not None
        block_ids = self._held.pop(request_id, None)
        if block_ids is None:  # it ended at its first token (or failed): nothing was handed over
            failed = final.error or final.finish_reason == "abort"
            block_ids = [] if failed else await self._call(lambda e: _held_synced(e, request_id))
        return PrefillResult(final, block_ids)

    async def allocate_remote(self, request_id: str, prompt_token_ids: list[int], *, first_token_id: int = -1,
                              params: SamplingParams | None = None) -> RemoteAllocation:
        """Blocks for a prompt whose KV will be sent here (see :meth:`LLMEngine.allocate_remote`).

        ``first_token_id`` and ``params`` are not needed yet: the request starts in
        :meth:`decode_remote`.
        """
        return await self._call(lambda e: e.allocate_remote(request_id, list(prompt_token_ids)))

    async def decode_remote(
        self, request_id: str, prompt_token_ids: list[int], first_token_id: int, params: SamplingParams, *,
        num_prior_output_tokens: int = 0, objectives: Objectives | None = None,
    ) -> AsyncIterator[TokenOutput]:
        """Commit a landed hand-off and yield the tokens after the first."""
        queue = self._open(request_id)
        try:
            await self._call(lambda e: e.commit_remote(request_id, list(prompt_token_ids), first_token_id, params,
                                                       num_prior_output_tokens=num_prior_output_tokens,
                                                       objectives=objectives))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        async for out in self._drain(request_id, queue):
            yield out

    async def release(self, request_id: str) -> None:
        self._held.pop(request_id, None)
        await self._call(lambda e: e.release(request_id))

    async def abort(self, request_id: str) -> bool:
        self._held.pop(request_id, None)
        return await self._call(lambda e: e.abort(request_id))

    async def run(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps (for inspection and tests)."""
        return await self._call(fn)

    # ---------------------------------------------------------------- plumbing

    def _open(self, request_id: str) -> asyncio.Queue[TokenOutput | BaseException]:
        if self._thread is None:
            raise RuntimeError("AsyncEngine not started")
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r} already streaming")
        queue: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        return queue

    async def _drain(self, request_id: str, queue: asyncio.Queue[TokenOutput | BaseException]) -> AsyncIterator[TokenOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda e: e.abort(request_id))

    def _submit(self, fn: Callable[[LLMEngine], Any]) -> None:
        with self._cond:
            self._commands.append(lambda: fn(self._engine))
            self._cond.notify()

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                fut.set_result(value) if ok else fut.set_exception(value)

        def command() -> None:
            try:
                result = fn(self._engine)
                self._stats = self._engine.stats()
            except BaseException as exc:  # handed to the caller
                loop.call_soon_threadsafe(settle, False, exc)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("AsyncEngine not running")
        with self._cond:
            self._commands.append(command)
            self._cond.notify()
        return await fut

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for rid in request_ids:
            queue = self._streams.get(rid)
            if queue is not None:
                queue.put_nowait(EngineError(f"request {rid} failed in the engine: {exc!r}"))

    def _run(self) -> None:
        engine, loop = self._engine, self._loop
        assert loop is not None
        # The current CUDA device is per thread, and Triton launches on it: without this a
        # node on cuda:1 launched its kernels against cuda:0 (seen on 2xH100).
        if engine.pool.device.type == "cuda":
            torch.cuda.set_device(engine.pool.device)
        idle_wait: float | None = None
        while True:
            idle = not engine.has_work()
            if not self._run_commands(idle_wait is not None or idle, idle_wait):
                return
            if idle and not self._gather(engine):
                return
            idle_wait = None
            if engine.has_work():
                self._step_started = time.monotonic()
                try:
                    idle_wait = self._step(engine, loop)
                finally:
                    self._step_started = None
            self._refresh(engine)

    def _run_commands(self, wait: bool, timeout: float | None) -> bool:
        """Run the queued commands, first waiting up to ``timeout`` (None: until one comes)
        for one if ``wait`` and there is none; -> False if the engine is stopping."""
        with self._cond:
            if wait and not self._commands and not self._stopping:
                self._cond.wait(timeout=timeout)
            commands, self._commands = self._commands, []
            if self._stopping:
                return False
        for command in commands:
            command()
        return True

    def _gather(self, engine: LLMEngine) -> bool:
        """After an idle spell, run the commands that arrive within the engine's gather
        wait (prompts of the same burst); -> False if the engine is stopping."""
        wait = engine.gather_wait_s()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if not self._run_commands(True, left):
                return False
        return True

    def _refresh(self, engine: LLMEngine) -> None:
        """Snapshots for the event loop (engine thread only)."""
        self._stats = engine.stats()
        now = time.monotonic()
        if self._hash_limit > 0 and now - self._hashes_at >= _HASH_REFRESH_S:
            self._hashes, self._hashes_at = engine.blocks.recent_prefix_hashes(self._hash_limit), now

    def _step(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> float | None:
        if self._step_delay_s > 0:
            time.sleep(self._step_delay_s)
        try:
            outputs = engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing its requests")
            victims = engine.fail_active()
            loop.call_soon_threadsafe(self._fail, victims, exc)
            return None
        if outputs:
            prefilled = [o.request_id for o in outputs if o.prefilled]
            if prefilled:
                # Hand the held blocks over with the first token (no second round trip to
                # this thread), once the device has finished writing them.
                if engine.pool.device.type == "cuda":
                    torch.cuda.synchronize(engine.pool.device)
                for rid in prefilled:
                    self._held[rid] = engine.held_block_ids(rid)
            loop.call_soon_threadsafe(self._deliver, outputs)
            return None
        # A prefill chunk that did not finish its prompt has no output but made progress:
        # step again at once (waiting here cost 5 ms per chunk of a long prompt).
        return None if engine.last_step_ran else _IDLE_RETRY_S


def _held_synced(engine: LLMEngine, request_id: str) -> list[int]:
    if engine.pool.device.type == "cuda":
        torch.cuda.synchronize(engine.pool.device)
    return engine.held_block_ids(request_id)

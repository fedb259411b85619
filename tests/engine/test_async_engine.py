"""AsyncEngine: streams, prefill hand-off, cancellation, failures."""

from __future__ import annotations

import asyncio
import threading

import pytest

from libs.engine import async_engine
from libs.engine.async_engine import AsyncEngine, EngineError
from libs.engine.config import EngineConfig
from libs.engine.sampling import SamplingParams
from tests.engine.conftest import make_engine

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


async def test_generate_prefill_and_decode_remote() -> None:
    p, d = AsyncEngine(engine=make_engine(num_blocks=32)), AsyncEngine(engine=make_engine(num_blocks=32))
    await p.start()
    await d.start()
    try:
        prompt = list(range(100, 111))
        ref = [t async for o in p.generate("g", prompt, PARAMS) for t in o.token_ids]
        assert len(ref) == 6
        res = await p.prefill("x", prompt, PARAMS)
        assert res.output.prefilled and res.output.token_ids == ref[:1] and len(res.block_ids) == 3
        alloc = await d.allocate_remote("x", prompt)
        for s, t in zip(res.block_ids, alloc.block_ids):
            d.pool.tensor[t].copy_(p.pool.tensor[s])
        await p.release("x")
        rest = [t async for o in d.decode_remote("x", prompt, ref[0], PARAMS) for t in o.token_ids]
        assert [ref[0], *rest] == ref
        assert (await p.run(lambda e: e.stats().free_blocks)) == 32
        assert (await d.run(lambda e: e.stats().free_blocks)) == 32
    finally:
        await p.stop()
        await d.stop()


async def test_cancelling_a_stream_aborts_and_frees() -> None:
    ae = AsyncEngine(engine=make_engine(num_blocks=32))
    await ae.start()
    try:
        gen = ae.generate("c", list(range(3, 20)), SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
        first = await gen.__anext__()
        assert first.token_ids
        await gen.aclose()
        for _ in range(100):
            if (await ae.run(lambda e: e.stats().free_blocks)) == 32:
                break
            await asyncio.sleep(0.01)
        assert (await ae.run(lambda e: (e.stats().free_blocks, e.stats().num_running))) == (32, 0)
    finally:
        await ae.stop()


async def test_step_failure_fails_requests_loudly() -> None:
    engine = make_engine(num_blocks=32)
    ae = AsyncEngine(engine=engine)
    await ae.start()
    try:
        real = engine.runner.prefill

        def boom(*a, **k):  # type: ignore[no-untyped-def]
            raise RuntimeError("device lost")

        engine.runner.prefill = boom  # type: ignore[method-assign]
        with pytest.raises(EngineError, match="device lost"):
            async for _ in ae.generate("f", [5, 6, 7], PARAMS):
                pass
        engine.runner.prefill = real  # type: ignore[method-assign]
        toks = [t async for o in ae.generate("ok", [5, 6, 7], PARAMS) for t in o.token_ids]
        assert len(toks) == 6
        with pytest.raises(ValueError):
            await ae.allocate_remote("bad", list(range(500)))
    finally:
        await ae.stop()


async def test_prompts_arriving_together_at_an_idle_engine_prefill_in_one_step() -> None:
    engine = make_engine(num_blocks=64, target_step_s=1e-9, min_step_tokens=4, prefill_gather_s=1.0)
    ae = AsyncEngine(engine=engine)
    await ae.start()
    try:
        [o async for o in ae.generate("warm", list(range(3, 20)), PARAMS)]  # measures the prefill rate
        plans: list[int] = []
        schedule = engine.scheduler.schedule

        def recording(budget=None):  # type: ignore[no-untyped-def]
            plan = schedule(budget)
            if plan.prefills:
                plans.append(len(plan.prefills))
            return plan

        engine.scheduler.schedule = recording  # type: ignore[method-assign]
        # The first prompt's 20 tokens at 1 token/s: 5% of its expected prefill is 1 s, the
        # cap, so the wait ends 1 s after the first arrival whatever the machine's load.
        await ae.run(lambda e: setattr(e._prefill_clock, "_rate", 1.0))

        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.02 * i)  # arrivals 20 ms apart
            return [t async for o in ae.generate(f"r{i}", list(range(30 + i, 50 + i)), PARAMS) for t in o.token_ids]

        outs = await asyncio.gather(*(one(i) for i in range(3)))
        assert all(len(o) == 6 for o in outs)
        assert plans[0] == 3, plans  # without the wait the first step would hold one prompt
    finally:
        await ae.stop()


async def test_the_engine_is_built_on_the_thread_that_steps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread runs all of the engine's OpenMP work: built elsewhere, a CPU model's
    steps ran on a second libgomp team and lost about 30% (see AsyncEngine.start)."""
    built_on: list[int] = []
    real = async_engine.LLMEngine

    def build(config: EngineConfig) -> async_engine.LLMEngine:
        built_on.append(threading.get_ident())
        return real(config)

    monkeypatch.setattr(async_engine, "LLMEngine", build)
    ae = AsyncEngine(EngineConfig(model="tiny", num_blocks=32, block_size=4))
    await ae.start()
    try:
        assert built_on == [await ae.run(lambda e: threading.get_ident())]
        assert built_on[0] != threading.get_ident()
        out = [t async for o in ae.generate("t", list(range(3, 12)), PARAMS) for t in o.token_ids]
        assert len(out) == 6
    finally:
        await ae.stop()


async def test_a_failed_build_fails_start() -> None:
    ae = AsyncEngine(EngineConfig(model="no-such-model-preset", num_blocks=32))
    with pytest.raises(Exception):
        await ae.start()
    with pytest.raises(RuntimeError, match="not"):  # at once: no command waits on a thread that is gone
        await asyncio.wait_for(ae.run(lambda e: None), 10)

"""Correctness of the engine's CUDA path on a GPU; prints PASS/FAIL lines, exits 1 on any FAIL.

    python benchmarks/gpu/engine_check.py [--skip-8b]

1. Triton paged decode attention vs the torch reference (bf16 and fp32, GQA, fragmented
   block tables, contexts up to 8192, NaN-poisoned outputs).
2. Graph replay equals eager: a decode step built from ``write_kv`` + the kernel, and the
   engine's own decode forward under :class:`CudaGraphRunner`.
3. Engine bf16 on the GPU vs transformers on the GPU with the same weights (random
   ``tiny`` and ``llama-3.1-8b`` presets): greedy tokens and last-position logits.
4. The prefill rate the engine reports for a prompt prefilled in 8 chunks, against its
   synchronised wall time (within 0.8-1.25x).
5. Prefill attention of a chunk over cached context (lower-right causal, flash) against a
   float32 reference with an explicit mask, GQA 32/8 heads, bf16; and its time per call
   against the boolean-mask SDPA it replaced.
6. A burst of prompts on an idle engine: one prefill step for all of them, the same tokens
   as one prompt at a time, and a gather wait under a millisecond once the prefill rate is
   measured (waiting for arrivals is for slow devices).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.gpu._engine_gpu import hf_twin, install_graphs, timed_ms  # noqa: E402
from libs.engine.cuda_graphs import CudaGraphRunner  # noqa: E402
from libs.engine.kernels import paged_decode_attention, paged_decode_attention_ref, write_kv  # noqa: E402

DEV = torch.device("cuda")
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def guarded(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - one broken check must not hide the others
        report(name, False, traceback.format_exc(limit=6))


def _case(lens: list[int], hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype, seed: int):  # type: ignore[no-untyped-def]
    gen = torch.Generator(device=DEV).manual_seed(seed)
    max_blocks = -(-max(lens) // bs) + 2
    n = len(lens) * max_blocks + 3
    pool = torch.randn(n, 2, 2, bs, hkv, d, generator=gen, device=DEV).to(dtype)
    tables = torch.randperm(n, generator=gen, device=DEV)[: len(lens) * max_blocks].view(len(lens), max_blocks).int()
    q = torch.randn(len(lens), hq, d, generator=gen, device=DEV).to(dtype)
    return q, pool, tables, torch.tensor(lens, dtype=torch.int32, device=DEV)


def check_kernel() -> None:
    cases = [  # lens, Hq, Hkv, D, block_size, dtype, tolerance
        ([1, 17, 8192], 32, 8, 128, 16, torch.bfloat16, 1e-2),
        ([8192], 32, 8, 128, 16, torch.bfloat16, 1e-2),
        ([513] * 8 + [0, 4000], 32, 8, 128, 16, torch.bfloat16, 1e-2),
        (list(range(1, 4097, 64)), 32, 8, 128, 16, torch.bfloat16, 1e-2),
        ([300, 77, 1], 9, 3, 64, 16, torch.bfloat16, 1e-2),
        ([300, 77, 1, 2048], 4, 2, 16, 4, torch.float16, 1e-2),
        ([1000, 5, 64, 65], 32, 8, 128, 32, torch.float32, 1e-3),
    ]
    for i, (lens, hq, hkv, d, bs, dtype, tol) in enumerate(cases):
        q, pool, tables, ctx = _case(lens, hq, hkv, d, bs, dtype, seed=i)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, pool, 1, tables, ctx, d**-0.5, out=out)
        want = paged_decode_attention_ref(q, pool, 1, tables, ctx, d**-0.5)
        err = ((out.float() - want.float()).norm() / want.float().norm()).item()
        ok = not torch.isnan(out).any().item() and err < tol
        report(f"kernel B={len(lens)} max_ctx={max(lens)} H={hq}/{hkv} D={d} bs={bs} {dtype}", ok, f"rel err {err:.2e}")


def check_graph_kernel_step() -> None:
    """write_kv + attention of a 2-layer fake decode under the graph runner vs eager."""
    hq, hkv, d, bs, n_blocks, m = 32, 8, 128, 16, 1100, 64
    pool = torch.zeros(n_blocks, 2, 2, bs, hkv, d, dtype=torch.bfloat16, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(5)
    w = torch.randn(16, hq * d, generator=gen, device=DEV).to(torch.bfloat16)

    def fn(ids, positions, tables, lens, slots):  # type: ignore[no-untyped-def]
        x = w[ids % 16].view(-1, hq, d)
        for layer in range(2):
            k = (x[:, :hkv] * (layer + 1)).contiguous()
            write_kv(pool, layer, k, k * 0.5, slots)
            x = paged_decode_attention(x, pool, layer, tables, lens, d**-0.5) + x
        return x.float().flatten(1)

    graphs = CudaGraphRunner(fn, max_num_seqs=16, max_blocks_per_seq=m, device=DEV, scratch_block=n_blocks - 1)
    graphs.capture()
    ok, worst = True, 0.0
    for step, batch in enumerate((3, 1, 16, 9)):
        perm = torch.randperm(n_blocks - 1, generator=gen, device=DEV)[: batch * m].view(batch, m).int()
        lens = torch.randint(1, m * bs - 8, (batch,), generator=gen, device=DEV).int() + step
        ids = torch.randint(0, 1000, (batch,), generator=gen, device=DEV)
        pos = (lens - 1).long()
        slots = perm.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs
        snapshot = pool.clone()
        got = graphs(ids, pos, perm, lens, slots).clone()
        after_graph = pool.clone()
        pool.copy_(snapshot)
        want = fn(ids, pos, perm, lens, slots)
        ok &= torch.equal(after_graph, pool)
        # A padded bucket may pick another split count than the eager batch: equal up to fp32 rounding.
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    report("graph replay == eager (write_kv + paged attention, buckets 1-16)", ok and worst < 1e-2,
           f"KV writes equal: {ok}; max rel diff {worst:.2e}")


def check_engine(preset: str, prompt_len: int, new_tokens: int) -> None:
    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=preset, device=str(DEV), dtype="bfloat16", num_blocks=512,
                                    max_model_len=prompt_len + new_tokens + 16, max_num_seqs=8, seed=0,
                                    enforce_eager=True))
    hf = hf_twin(engine)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, engine.model_config.vocab_size, (n,), generator=gen).tolist()
               for n in (prompt_len, prompt_len // 2 + 3, 5)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for mode in ("eager", "graphs"):
        if mode == "graphs":
            install_graphs(engine, 8, use_graphs=DEV.type == "cuda")
        for i, p in enumerate(prompts):
            engine.add_request(f"{mode}-{i}", p, params)
        tokens: dict[str, list[int]] = {f"{mode}-{i}": [] for i in range(len(prompts))}
        while engine.has_work():
            for o in engine.step():
                tokens[o.request_id].extend(o.token_ids)
        for i, p in enumerate(prompts):
            seq = p + tokens[f"{mode}-{i}"]
            with torch.inference_mode():
                logits = hf(input_ids=torch.tensor([seq], device=DEV)).logits[0].float()
            hf_next = logits[len(p) - 1 :].argmax(-1).tolist()  # HF's choice after each engine token
            agree = sum(a == b for a, b in zip(hf_next, tokens[f"{mode}-{i}"]))
            first_ok = hf_next[0] == tokens[f"{mode}-{i}"][0]
            report(f"engine {preset} {mode} prompt {len(p)}: first token equals HF", first_ok,
                   f"{agree}/{new_tokens} teacher-forced tokens agree")
    # Last-position logits of the prefill, engine vs HF.
    p = prompts[0]
    with torch.inference_mode():
        nb = -(-len(p) // engine.runner.block_size)
        ours = engine.runner.logits(engine.runner.prefill([(p, 0, list(range(100, 100 + nb)))]))[0].float()
        ref = hf(input_ids=torch.tensor([p], device=DEV)).logits[0, -1].float()
    rel = ((ours - ref).norm() / ref.norm()).item()
    report(f"engine {preset} prefill logits vs HF (bf16)", rel < 3e-2, f"rel err {rel:.2e}")
    del engine, hf
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def check_prefill_rate(preset: str, prompt_len: int, chunk: int) -> None:
    """The prefill tokens/s the engine reports (what the scheduler places by) against the
    prompt's tokens over its synchronised wall time, for a prompt prefilled in many chunks:
    a chunk that samples nothing returns before its kernels have run."""
    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=preset, device=str(DEV), dtype="bfloat16", num_blocks=-(-prompt_len // 16) + 8,
                                    max_model_len=prompt_len + 8, max_num_seqs=2, max_num_batched_tokens=chunk,
                                    seed=0, enforce_eager=True))
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    walls = []
    for i in range(2):  # the first prompt warms the kernels up; the second is timed
        prompt = torch.randint(3, engine.model_config.vocab_size, (prompt_len,), generator=gen).tolist()
        torch.cuda.synchronize(DEV)
        t0 = time.perf_counter()
        engine.add_request(f"rate-{i}", prompt, params)
        while engine.has_work():
            engine.step()
        torch.cuda.synchronize(DEV)
        walls.append(time.perf_counter() - t0)
    wall_rate = prompt_len / walls[-1]
    reported = engine.stats().prefill_tokens_per_s
    ratio = reported / wall_rate
    report(f"engine {preset} reported prefill rate vs wall ({prompt_len} tokens in chunks of {chunk})",
           0.8 < ratio < 1.25, f"reported {reported:,.0f} tok/s, wall {wall_rate:,.0f} tok/s, ratio {ratio:.2f}")
    del engine
    torch.cuda.empty_cache()


def check_burst(preset: str) -> None:
    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.sampling import SamplingParams

    def engine() -> LLMEngine:
        return LLMEngine(EngineConfig(model=preset, device=str(DEV), dtype="float32", num_blocks=512, max_num_seqs=16,
                                      seed=0, enforce_eager=True))

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (300, 180, 77, 240, 12, 150)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = engine()
    ref = []
    for i, p in enumerate(prompts):
        alone.add_request(f"a{i}", p, params)
        out: list[int] = []
        while alone.has_work():
            out += [t for o in alone.step() for t in o.token_ids]
        ref.append(out)
    alone.add_request("w", prompts[0], params)
    wait_s = alone.gather_wait_s()
    report(f"engine {preset} gather wait with the measured rate", 0.0 <= wait_s < 1e-3,
           f"{wait_s * 1e3:.3f} ms at {alone.stats().prefill_tokens_per_s:,.0f} tok/s")
    del alone
    burst = engine()
    for i, p in enumerate(prompts):
        burst.add_request(f"b{i}", p, params)
    plan_sizes: list[int] = []
    schedule = burst.scheduler.schedule

    def recording(budget=None):  # type: ignore[no-untyped-def]
        plan = schedule(budget)
        if plan.prefills:
            plan_sizes.append(len(plan.prefills))
        return plan

    burst.scheduler.schedule = recording  # type: ignore[method-assign]
    got: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompts))}
    while burst.has_work():
        for o in burst.step():
            got[o.request_id] += o.token_ids
    report(f"engine {preset} burst of {len(prompts)} prompts prefills in one step", plan_sizes[:1] == [len(prompts)],
           f"prefill steps {plan_sizes}")
    same = all(got[f"b{i}"] == ref[i] for i in range(len(prompts)))
    report(f"engine {preset} burst tokens equal one prompt at a time", same)
    del burst
    torch.cuda.empty_cache()


def check_context_attention() -> None:
    from libs.engine.attention import PrefillMetadata, PrefillSeq, prefill_attention

    bs, hq, hkv, d = 16, 32, 8, 128
    gen = torch.Generator(device=DEV).manual_seed(5)
    for q_len, context in ((1808, 8192), (4096, 4096), (17, 4983), (1, 300)):
        total = context + q_len
        nb = -(-total // bs)
        pool = torch.randn(nb + 7, 2, 2, bs, hkv, d, generator=gen, device=DEV).to(torch.bfloat16)
        block_ids = torch.randperm(nb + 7, generator=gen, device=DEV)[:nb]
        q = torch.randn(q_len, hq, d, generator=gen, device=DEV).to(torch.bfloat16)
        meta = PrefillMetadata(slot_mapping=torch.empty(0, device=DEV), seqs=[PrefillSeq(0, q_len, context, block_ids)])
        got = prefill_attention(q, q[:, :hkv], q[:, :hkv], pool, 1, meta, d**-0.5)  # k/v of the chunk are in the pool
        blocks = pool[:, 1].index_select(0, block_ids)
        k = blocks[:, 0].flatten(0, 1)[:total].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        v = blocks[:, 1].flatten(0, 1)[:total].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        mask = torch.arange(total, device=DEV)[None, :] <= torch.arange(context, total, device=DEV)[:, None]
        scores = (q.float().transpose(0, 1) @ k.transpose(1, 2)) * d**-0.5
        want = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(0, 1)
        err = ((got.float() - want).norm() / want.norm()).item()

        def old() -> torch.Tensor:  # the boolean-mask SDPA of commit 67f203f
            kk = blocks[:, 0].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)
            vv = blocks[:, 1].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)
            m = torch.arange(total, device=DEV)[None, :] <= torch.arange(context, total, device=DEV)[:, None]
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), kk, vv, attn_mask=m, scale=d**-0.5, enable_gqa=True)

        new_ms = timed_ms(lambda: prefill_attention(q, q[:, :hkv], q[:, :hkv], pool, 1, meta, d**-0.5), DEV, 20)
        old_ms = timed_ms(old, DEV, 20)
        report(f"context attention q={q_len} over {context} (GQA {hq}/{hkv}, bf16)", err < 1e-2,
               f"rel err {err:.2e}; {new_ms:.3f} ms a call, boolean-mask SDPA {old_ms:.3f} ms ({old_ms / new_ms:.1f}x)")


CHECKS = ("kernel", "graph", "engine", "context")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma list of {', '.join(CHECKS)}")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    if "kernel" in only:
        guarded("kernel", check_kernel)
    if "graph" in only:
        guarded("graph kernel step", check_graph_kernel_step)
    if "context" in only:
        guarded("context attention", check_context_attention)
    if "engine" in only:
        guarded("engine tiny", lambda: check_engine("tiny", 200, 12))
        guarded("burst tiny", lambda: check_burst("tiny"))
        if not args.skip_8b:
            guarded("engine llama-3.1-8b", lambda: check_engine("llama-3.1-8b", 600, 8))
            guarded("prefill rate llama-3.1-8b", lambda: check_prefill_rate("llama-3.1-8b", 8192, 1024))
    print(f"{'FAIL' if FAILED else 'PASS'} overall ({len(FAILED)} failed)")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU engine's hot spots one at a time, each against its alternative in the same run.

    python benchmarks/cpu_kernels.py --threads 2            # SmolLM2-135M's shapes
    python benchmarks/cpu_kernels.py --threads 1 --out-json kernels.json

1. decode attention over a 30-layer paged pool (random block tables, 300-token contexts,
   16-token blocks, 3 kv heads of 64, 9 query heads): the native kernel against the torch
   path the engine takes without a C compiler, float32 and bfloat16, 1, 16 and 64 sequences;
2. 1, 2, 4, 8, 16 and 32 rows (a decode step of that many sequences) through the model's
   linear layers (30 x qkv, o, gate_up, down, and the tied LM head), float32 and bfloat16:
   the native small-batch kernel (up to 8 rows) and the weight's panels of 16 columns
   (float32; bfloat16 with AVX512-BF16), each against the faster of MKL's GEMM on the plain
   weights and oneDNN's on the packed ones, and those two against each other (the engine
   times these ways at load and keeps the fastest for each row count);
3. a step of 16 decodes and one 256-token prefill chunk (random SmolLM2-shaped weights):
   one mixed forward against the prefill forward followed by the decode forward.

Each figure is the fastest of ``--repeats`` passes. Prints one table and, with
``--out-json``, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def attention(repeats: int) -> list[dict]:  # type: ignore[type-arg]
    from libs.engine.attention import decode_attention_torch
    from libs.engine.kernels import cpu

    layers, bs, kv_heads, dim, heads, ctx = 30, 16, 3, 64, 9, 300
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for seqs in (1, 16, 64):
            per_seq = -(-ctx // bs)
            pool = torch.randn(seqs * per_seq + 8, layers, 2, bs, kv_heads, dim).to(dtype)
            tables = torch.randperm(pool.shape[0])[: seqs * per_seq].view(seqs, per_seq).to(torch.int32)
            lens = torch.full((seqs,), ctx, dtype=torch.int32)
            q = torch.randn(seqs, heads, dim).to(dtype)

            def native() -> None:
                for layer in range(layers):
                    cpu.paged_decode_attention(q, pool, layer, tables, lens, 0.125)

            def torch_path() -> None:
                for layer in range(layers):
                    decode_attention_torch(q, pool, layer, tables, lens, 0.125)

            rows.append({"what": f"decode attention, {seqs} x {ctx} tokens, {str(dtype)[6:]}",
                         "ms": best_of(native, repeats), "baseline": "torch path",
                         "baseline_ms": best_of(torch_path, repeats)})
    return rows


def small_batch_linear(repeats: int) -> list[dict]:  # type: ignore[type-arg]
    from libs.engine.kernels import cpu

    shapes = [(1728, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        weights = [(torch.randn(o, i) * 0.02).to(dtype) for o, i in shapes]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        panels = [cpu.pack_panels(w) for w in weights] if cpu.panels_usable(dtype) else []
        for rows in (1, 2, 4, 8, 16, 32):
            x = {n: torch.randn(rows, n).to(dtype) for n in (576, 1536)}

            def plain() -> None:
                for w in weights:
                    F.linear(x[w.shape[1]], w)

            def onednn() -> None:
                for w, p in zip(weights, packed):
                    torch.ops.mkldnn._linear_pointwise(x[w.shape[1]], p, None, "none", [], "")

            def native() -> None:
                for w in weights:
                    cpu.linear(x[w.shape[1]], w)

            base = {"MKL, plain weights": best_of(plain, repeats), "oneDNN, packed": best_of(onednn, repeats)}
            best = min(base, key=lambda k: base[k])
            def panelled() -> None:
                for w, p in zip(weights, panels):
                    cpu.linear_panels(x[w.shape[1]], p, w.shape[0])

            if panels and all(p is not None for p in panels):
                rows_out.append({"what": f"{rows} {str(dtype)[6:]} row(s), the 121 linear layers, panels",
                                 "ms": best_of(panelled, repeats), "baseline": best, "baseline_ms": base[best]})
            if cpu.linear_usable() and rows <= 8:
                rows_out.append({"what": f"{rows} {str(dtype)[6:]} row(s), the 121 linear layers, native",
                                 "ms": best_of(native, repeats), "baseline": best, "baseline_ms": base[best]})
            other = next(k for k in base if k != best)
            rows_out.append({"what": f"{rows} {str(dtype)[6:]} row(s), the 121 linear layers, {best}",
                             "ms": base[best], "baseline": other, "baseline_ms": base[other]})
    return rows_out


def mixed_step(repeats: int) -> list[dict]:  # type: ignore[type-arg]
    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model="smollm2-shape", device="cpu", dtype="float32", num_blocks=1024,
                                    max_num_batched_tokens=4096, target_step_s=0.0))
    rng = random.Random(0)
    for i in range(16):
        engine.add_request(f"d{i}", [rng.randrange(100, 40000) for _ in range(256)],
                           SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    prompt = [rng.randrange(100, 40000) for _ in range(256)]
    engine.blocks.allocate("chunk", prompt, len(prompt), 0)
    chunks = [(prompt, 0, engine.blocks.block_ids("chunk"))]
    seqs = [(r.token_ids[-1], len(r.token_ids) - 1, engine.blocks.block_ids(r.request_id))
            for r in engine.scheduler.running]
    runner = engine.runner

    def separate() -> None:
        runner.logits(runner.prefill(chunks))
        runner.decode(seqs)

    def mixed() -> None:
        runner.logits(runner.mixed(chunks, seqs))

    return [{"what": "16 decodes + a 256-token chunk, float32", "ms": best_of(mixed, repeats),
             "baseline": "prefill forward, then decode forward", "baseline_ms": best_of(separate, repeats)}]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = attention(args.repeats) + small_batch_linear(args.repeats) + mixed_step(args.repeats)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"| {'what':<48} | {'ms':>8} | {'baseline':<38} | {'ms':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 40}|{'-' * 10}|{'-' * 10}|")
    for r in rows:
        print(f"| {r['what']:<48} | {r['ms']:8.2f} | {r['baseline']:<38} | {r['baseline_ms']:8.2f} | "
              f"{r['baseline_ms'] / r['ms']:7.2f}x |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

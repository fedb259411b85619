"""Batch-1 decode speed on CPU: our engine vs transformers ``generate`` on the same SmolLM2 weights.

    python benchmarks/engine_cpu_bench.py                     # SmolLM2-135M float32, 2 threads
    python benchmarks/engine_cpu_bench.py --prompt 64 --new 64 --runs 5 --out cpu.json

Both sides load the same converted SmolLM2 directory (``libs.engine.loader.smollm2_dir``)
in float32 and decode greedily from the same random 64-token prompt. A run is timed end
to end (prompt in -> last token out, tokenizer-side work included for the engine:
``LLMEngine.step`` detokenizes incrementally); decode tokens/s is
``(new - 1) / (T(new) - T(1))``, the same formula on both sides, so the prefill and the
first token fall out. Medians over ``--runs`` runs. Both produce the same tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fused", action="store_true", help="engine without its fused kernel path")
    p.add_argument("--out", default=None, help="write the JSON results here")
    return p.parse_args(argv)


def engine_run(engine: Any, prompt: list[int], new: int, rid: str) -> tuple[float, list[int]]:
    """Seconds from add_request to the last token, and the tokens."""
    from libs.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    tokens: list[int] = []
    while engine.has_work():
        for o in engine.step():
            tokens.extend(o.token_ids)
    return time.perf_counter() - t0, tokens


def hf_run(hf: Any, prompt: list[int], new: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - t0, out[0, len(prompt):].tolist()


def measure(run: Any, new: int, runs: int) -> dict[str, Any]:
    """Median end-to-end seconds for 1 and ``new`` tokens; decode tokens/s from their difference."""
    run(new)  # warm-up (allocator, first-call paths)
    t1 = statistics.median(run(1)[0] for _ in range(runs))
    tn_runs = [run(new) for _ in range(runs)]
    tn = statistics.median(t for t, _ in tn_runs)
    return {"t_first_s": t1, "t_all_s": tn, "decode_tok_s": (new - 1) / (tn - t1), "e2e_tok_s": new / tn,
            "tokens": tn_runs[-1][1]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.no_fused:
        os.environ["FLOWKV_FUSED_KERNELS"] = "0"
    from transformers import AutoModelForCausalLM

    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.loader import smollm2_dir

    path = smollm2_dir()
    engine = LLMEngine(EngineConfig(model="smollm2", device="cpu", dtype="float32", num_blocks=64,
                                    max_num_seqs=4, enable_prefix_caching=False, seed=0))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, engine.model_config.vocab_size, (args.prompt,), generator=gen).tolist()
    counter = iter(range(1 << 30))
    ours = measure(lambda n: engine_run(engine, prompt, n, f"r{next(counter)}"), args.new, args.runs)
    theirs = measure(lambda n: hf_run(hf, prompt, n), args.new, args.runs)
    res = {
        "model": "smollm2-135m float32", "threads": args.threads, "prompt": args.prompt, "new": args.new,
        "runs": args.runs, "fused": not args.no_fused, "same_tokens": ours.pop("tokens") == theirs.pop("tokens"),
        "engine": ours, "hf": theirs, "decode_ratio_engine_over_hf": ours["decode_tok_s"] / theirs["decode_tok_s"],
        "e2e_ratio_engine_over_hf": ours["e2e_tok_s"] / theirs["e2e_tok_s"],
    }
    print(f"SmolLM2-135M fp32, {args.threads} threads, prompt {args.prompt}, {args.new} new, median of {args.runs}")
    print("| side | decode tok/s | end-to-end tok/s | T(1) s | T(new) s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for side in ("engine", "hf"):
        r = res[side]
        print(f"| {side} | {r['decode_tok_s']:.1f} | {r['e2e_tok_s']:.1f} | {r['t_first_s']:.3f} | {r['t_all_s']:.3f} |")
    print(f"decode engine/HF {res['decode_ratio_engine_over_hf']:.2f}x; end-to-end {res['e2e_ratio_engine_over_hf']:.2f}x; "
          f"same tokens: {res['same_tokens']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

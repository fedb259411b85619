"""Engine step times on CPU: prefill of 256 and 1,024 tokens, decode steps of 1, 4, 16 and 64 sequences.

    python benchmarks/engine_cpu_steps.py --threads 2 --dtype float32
    python benchmarks/engine_cpu_steps.py --model smollm2-shape   # same shapes, random weights

One ``LLMEngine`` (no services), greedy, ``ignore_eos``, prompts of random token ids.
Prefill: the fastest of 3 runs of one prompt. Decode: the median step of a batch of that
many 256-token prompts (the first 5 decode steps left out). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--label", default="")
    args = p.parse_args(argv)

    import torch

    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", dtype=args.dtype, num_blocks=2048,
                                    max_num_batched_tokens=4096, target_step_s=0.0))
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    res: dict[str, float] = {}
    for n in (256, 1024):
        times = []
        for r in range(3):
            engine.add_request(f"p{n}-{r}", prompt(n), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            t0 = time.perf_counter()
            while engine.has_work():
                engine.step()
            times.append(time.perf_counter() - t0)
        res[f"prefill{n}_ms"] = round(min(times) * 1e3, 1)
    for batch in (1, 4, 16, 64):
        for i in range(batch):
            engine.add_request(f"d{batch}-{i}", prompt(256), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        steps = []
        while engine.has_work():
            t0 = time.perf_counter()
            outs = engine.step()
            steps.append((time.perf_counter() - t0, len(outs)))
        decode = [dt for dt, n in steps if n == batch][5:]
        res[f"decode_bs{batch}_ms"] = round(statistics.median(decode) * 1e3, 2)
    print(json.dumps({"label": args.label, "model": args.model, "dtype": args.dtype, "threads": args.threads, **res}))


if __name__ == "__main__":
    main()

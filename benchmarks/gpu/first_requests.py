"""Time to first token of the first requests a freshly started engine serves, warm-up on and off.

    python benchmarks/gpu/first_requests.py --out first_requests.json          # on a GPU
    python benchmarks/gpu/first_requests.py --device cpu --model tiny --prompts 40,300,90

Each run is a fresh process (fresh CUDA context, its own empty Triton cache; only the
first process of a fresh machine also finds the CUDA libraries cold on disk, so run this
first on a freshly started machine to see that case), built as a node builds its engine (Llama-3.1-8B shapes,
random bf16 weights, 8,192 batched tokens, CUDA graphs), alternately with
``EngineConfig.warmup`` off and on. It then prefills the same prompts one at a time
(``prefill_only``, as on a prefill node; no prefix caching, so no prompt helps another)
and records each one's wall time from ``add_request`` to its first token, and the
engine's start-up time. The first prompts show what the first requests pay; the last,
a repeat of the first prompt's length, what a warm engine takes for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--prompts", default="4716,5826,1000,10000,300,3000,4716", help="prompt lengths, in order")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--num-blocks", type=int, default=16000)
    p.add_argument("--runs", default="off,on,off,on", help="warm-up setting of each fresh process, in order")
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """One fresh engine: start-up time and per-prompt time to first token (ms)."""
    import torch

    from benchmarks.gpu._engine_gpu import node_like_engine, prefill_steps_ms

    t0 = time.perf_counter()
    engine = node_like_engine(args.model, args.device, warmup=args.child == "on", num_blocks=args.num_blocks,
                              max_num_batched_tokens=args.max_num_batched_tokens)
    startup_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    ttft_ms = []
    for i, n in enumerate(int(x) for x in args.prompts.split(",")):
        prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
        ttft_ms.append(sum(prefill_steps_ms(engine, f"r{i}", prompt)))
    return {"warmup": args.child, "startup_s": startup_s, "ttft_ms": ttft_ms}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    lengths = [int(x) for x in args.prompts.split(",")]
    runs = []
    for setting in args.runs.split(","):
        with tempfile.TemporaryDirectory(prefix="triton-") as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", setting, "--device", args.device,
                   "--model", args.model, "--prompts", args.prompts, "--num-blocks", str(args.num_blocks),
                   "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"warm-up {setting:3}: start-up {run['startup_s']:6.1f} s; TTFT ms "
              + " ".join(f"{n}:{ms:.0f}" for n, ms in zip(lengths, run["ttft_ms"])), flush=True)
    result = {"device": args.device, "model": args.model, "prompts": lengths, "runs": runs}
    if args.device.startswith("cuda"):
        import torch

        result["card"] = torch.cuda.get_device_name(0)
    print("| warm-up | start-up s | " + " | ".join(f"{n} tok" for n in lengths) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in lengths) + " |")
    for run in runs:
        print(f"| {run['warmup']} | {run['startup_s']:.1f} | " + " | ".join(f"{ms:.0f}" for ms in run["ttft_ms"]) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

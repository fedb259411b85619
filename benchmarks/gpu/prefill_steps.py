"""Where a fresh engine's first prefills spend their time: per-step wall time, and a cProfile
of chosen requests (host-side time per function, synchronisations included).

    python benchmarks/gpu/prefill_steps.py                      # Llama-3.1-8B shapes on cuda
    python benchmarks/gpu/prefill_steps.py --profile 10000,12000 --top 18

Builds the engine as a node does (random bf16 weights, 8,192 batched tokens, decode graphs,
its prefill warm-up), then prefills the prompts one at a time (``prefill_only``) and prints
each one's steps. A prompt longer than the step budget runs in chunks, the later ones over
cached context. Run it first on a freshly started machine to see its first-use costs.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--prompts", default="4716,10000,10000,12000,9000", help="prompt lengths, in order")
    p.add_argument("--profile", default="10000,12000", help="profile the first prompt of each of these lengths")
    p.add_argument("--top", type=int, default=18, help="functions listed per profile")
    args = p.parse_args(argv)

    import torch

    from benchmarks.gpu._engine_gpu import node_like_engine, prefill_steps_ms

    t0 = time.perf_counter()
    engine = node_like_engine(args.model, args.device)
    print(f"start-up {time.perf_counter() - t0:.1f} s", flush=True)
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    to_profile = {int(x) for x in args.profile.split(",") if x}
    for i, n in enumerate(int(x) for x in args.prompts.split(",")):
        prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
        prof = cProfile.Profile() if n in to_profile else None
        to_profile.discard(n)
        if prof:
            prof.enable()
        steps = prefill_steps_ms(engine, f"r{i}", prompt)
        if prof:
            prof.disable()
        print(f"{n} tokens: {sum(steps):.1f} ms, steps ms {[round(x, 1) for x in steps]}", flush=True)
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vLLM's step times on CPU, the counterpart of ``engine_cpu_steps.py`` for our engine.

    .venv-vllm-node/bin/python benchmarks/vllm_cpu_steps.py --threads-bind 0-1

Offline ``vllm.LLM`` on SmolLM2 (the directory our loader converts the GGUF into), float32,
random token-id prompts of 256 tokens, greedy, ``ignore_eos``. Prefill: the fastest of 5
one-prompt runs of ``max_tokens=1``. Decode at batch B: the same B prompts to 33 and to 97
tokens, with prefix caching off so both prefill alike; the difference over 64 is the decode
step (the best of 3 pairs). Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (cores of vLLM's OpenMP threads)")
    p.add_argument("--kv-cache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--batches", default="1,16")
    args = p.parse_args()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.threads_bind
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = args.kv_cache_gib

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from libs.engine.loader import smollm2_dir

    llm = LLM(model=smollm2_dir(), dtype="float32", max_model_len=2048, max_num_seqs=64, enable_prefix_caching=False)
    rng = random.Random(0)

    def prompts(n: int) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(256)]) for _ in range(n)]

    def run(batch: list[TokensPrompt], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t0

    for _ in range(2):
        run(prompts(1), 1)
    best = min(run(prompts(1), 1) for _ in range(5))
    print(f"prefill 256: {best * 1e3:.1f} ms = {256 / best:.0f} tok/s")
    for b in (int(x) for x in args.batches.split(",")):
        # The same prompts to 33 and to 97 tokens (no prefix caching: the same prefill
        # each time): the difference is 64 decode steps. Best of 3 pairs.
        batch = prompts(b)
        step = min((run(batch, 97) - run(batch, 33)) / 64 for _ in range(3))
        print(f"decode bs{b}: {step * 1e3:.1f} ms a step")


if __name__ == "__main__":
    main()

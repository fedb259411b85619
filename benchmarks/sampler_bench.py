"""What penalties, biases and structured output cost per engine step.

Runs a batch of decoding requests on one engine (the ``tiny`` preset by default) under
each configuration and reports the mean wall time per step, plus, for structured output,
the time the worker thread spent filling grammar bitmasks (it overlaps the forward pass,
so it adds to the step only where it runs longer than the forward).

    python -m benchmarks.sampler_bench [--model tiny] [--batch 8] [--steps 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from libs.engine.config import EngineConfig
from libs.engine.engine import LLMEngine
from libs.engine.sampling import SamplingParams
from libs.protocol.messages import StructuredOutput

_SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "tags"],
})


def _configs(steps: int) -> dict[str, SamplingParams]:
    base = dict(max_tokens=steps + 1, ignore_eos=True)
    return {
        "greedy": SamplingParams(temperature=0.0, **base),
        "greedy+penalties+bias": SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5,
                                                repetition_penalty=1.2, logit_bias={5: 2.0, 7: -2.0}, **base),
        "sampled": SamplingParams(temperature=0.8, top_p=0.95, seed=1, **base),
        "sampled+min_p+penalties": SamplingParams(temperature=0.8, top_p=0.95, seed=1, min_p=0.05,
                                                  frequency_penalty=0.5, **base),
        # An open-ended schema (unbounded strings and arrays) so no request ends early.
        "json_schema": SamplingParams(temperature=0.0, structured=StructuredOutput(json_schema=_SCHEMA), **base),
    }


def run(engine: LLMEngine, params: SamplingParams, batch: int, steps: int) -> dict[str, float]:
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request(f"r{i}", [(37 * i + 11 * j) % vocab for j in range(32)], params)
    while engine.scheduler.num_decoding < batch:  # prefill all first: time decode steps only
        engine.step()
    engine._masks.fill_seconds = 0.0
    times = []
    for _ in range(steps):
        if engine.scheduler.num_decoding < batch:
            break
        t0 = time.perf_counter()
        engine.step()
        if engine.pool.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    for i in range(batch):
        engine.abort(f"r{i}")
    while engine.has_work():
        engine.step()
    n = max(1, len(times))
    return {"step_ms": 1e3 * sum(times) / n, "mask_fill_ms": 1e3 * engine._masks.fill_seconds / n, "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, num_blocks=512, block_size=16))
    configs = _configs(args.steps)
    run(engine, configs["greedy"], args.batch, 4)  # warm-up
    engine.grammars.matcher(configs["json_schema"].structured)  # tokenizer conversion and compile, once
    print(f"model {args.model}, batch {args.batch}, device {args.device}, vocab {engine.model_config.vocab_size}")
    print(f"{'configuration':<26} {'ms/step':>9} {'mask fill ms/step':>18}")
    for name, params in configs.items():
        r = run(engine, params, args.batch, args.steps)
        print(f"{name:<26} {r['step_ms']:>9.2f} {r['mask_fill_ms']:>18.2f}")


if __name__ == "__main__":
    main()

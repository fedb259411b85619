"""One engine, no services, fed the closed loop a serving benchmark makes: how it schedules.

    python benchmarks/engine_closed_loop.py --concurrency 16 --num-requests 48
    python benchmarks/engine_closed_loop.py --target-step-s 0.6 --steps-out steps.jsonl

``--concurrency`` requests are in flight at once; when one finishes, the next is added
before the following step (a client that sends its next request at once). Prompts are
random token ids (``--input-len``), greedy, ``ignore_eos``, ``--output-len`` tokens each.
Prints output tok/s, TTFT and TPOT (the serving benchmark's definitions) and a summary of
the steps: how many ran prefill, decode or both, their mean time and token counts. Tells
what the engine's schedule costs apart from the serving path around it.
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
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--target-step-s", type=float, default=None, help="engine default if unset")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine default if unset")
    p.add_argument("--chunk-slack", type=float, default=None, help="engine default if unset")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="")
    p.add_argument("--steps-out", default=None, help="write one JSON line per step here")
    args = p.parse_args(argv)

    import torch

    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.sampling import SamplingParams
    from libs.loadgen.metrics import stats

    torch.set_num_threads(args.threads)
    kw = {k: v for k, v in (("target_step_s", args.target_step_s),
                            ("max_num_batched_tokens", args.max_num_batched_tokens),
                            ("chunk_slack", args.chunk_slack)) if v is not None}
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", dtype=args.dtype, **kw))
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    # Warm-up: measures the prefill rate and the decode step the step budget uses.
    for i in range(2):
        engine.add_request(f"w{i}", [rng.randrange(100, 40000) for _ in range(args.input_len)], params)
    while engine.has_work():
        engine.step()

    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    ntok: dict[str, int] = {}
    next_id = 0

    def send() -> None:
        nonlocal next_id
        rid = f"r{next_id}"
        next_id += 1
        sent[rid] = time.perf_counter()
        engine.add_request(rid, [rng.randrange(100, 40000) for _ in range(args.input_len)], params)

    steps = []
    t_start = time.perf_counter()
    for _ in range(min(args.concurrency, args.num_requests)):
        send()
    while engine.has_work():
        plan_prefill = engine.scheduler.num_prefill_tokens_left()
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        decoded = sum(1 for o in outs if o.request_id in first)
        for o in outs:
            if o.token_ids and o.request_id not in first:
                first[o.request_id] = t1
            ntok[o.request_id] = o.num_output_tokens
        prefilled = plan_prefill - engine.scheduler.num_prefill_tokens_left()
        steps.append({"t": round(t0 - t_start, 4), "dur_ms": round((t1 - t0) * 1e3, 2),
                      "decodes": decoded, "prefill_tokens": max(0, prefilled)})
        for o in outs:
            if o.finished:
                done[o.request_id] = t1
                if next_id < args.num_requests:
                    send()
    elapsed = time.perf_counter() - t_start

    ttft = [first[r] - sent[r] for r in done]
    tpot = [(done[r] - first[r]) / (ntok[r] - 1) for r in done if ntok[r] > 1]
    kinds = {"prefill": [], "decode": [], "mixed": []}
    for s in steps:
        k = "mixed" if s["prefill_tokens"] and s["decodes"] else "prefill" if s["prefill_tokens"] else "decode"
        kinds[k].append(s)
    res = {
        "label": args.label, "concurrency": args.concurrency, "requests": len(done),
        "target_step_s": engine.config.target_step_s, "chunk_slack": engine.config.chunk_slack,
        "max_step_ms": max(s["dur_ms"] for s in steps if s["decodes"]), "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(sum(ntok[r] for r in done) / elapsed, 1),
        "ttft_p50_ms": round(stats(ttft)["p50"] * 1e3, 1),
        "tpot_p50_ms": round(stats(tpot)["p50"] * 1e3, 1), "tpot_p99_ms": round(stats(tpot)["p99"] * 1e3, 1),
        "steps": {k: {"n": len(v), "mean_ms": round(statistics.mean(s["dur_ms"] for s in v), 1) if v else 0,
                      "mean_prefill_tokens": round(statistics.mean(s["prefill_tokens"] for s in v), 1) if v else 0,
                      "mean_decodes": round(statistics.mean(s["decodes"] for s in v), 1) if v else 0,
                      "total_s": round(sum(s["dur_ms"] for s in v) / 1e3, 2)}
                  for k, v in kinds.items()},
    }
    print(json.dumps(res))
    if args.steps_out:
        with open(args.steps_out, "w") as f:
            for s in steps:
                f.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()

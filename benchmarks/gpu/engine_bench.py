"""Engine speed on one GPU against transformers and the weight-read floor.

    python benchmarks/gpu/engine_bench.py --device cuda --preset llama-3.1-8b --out engine_bench.json
    python benchmarks/gpu/engine_bench.py --device cpu --preset tiny          # smoke test

Random bf16 weights of the preset's shapes (fixed seed). Decode steps are driven through
the engine's ``ModelRunner.decode`` (host-side input building included) with CUDA graphs
installed, on sequences whose KV already sits in the pool (its values do not change the
time); prefill through ``ModelRunner.prefill``; one row runs the whole ``LLMEngine.step``
loop (scheduling and sampling included). Transformers runs the same shapes with the same
weight tensors: decode steps against a filled ``DynamicCache``, prefill with
``logits_to_keep=1``. The floor is the weight bytes one decode step reads over the
measured device copy rate.

The main rows run the model's fused path (fused QKV and gate/up GEMMs, Triton add +
RMSNorm, rotary and SiLU * up). Before them, the same engine runs the unfused path
(``ModelRunner.set_fused_kernels(False)``: separate GEMMs, plain torch ops; graphs
captured for it, then dropped) at the first context, so the table "fused vs unfused"
compares both in one run on one device (``--no-unfused`` skips it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.gpu._engine_gpu import (  # noqa: E402
    copy_bandwidth, hf_twin, install_graphs, timed_ms, weight_bytes_per_decode_step,
)

DEFAULTS = {  # preset -> (contexts, prefill tokens)
    "llama-3.1-8b": ([512, 8192], 8192),
    "tiny": ([64, 256], 256),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(DEFAULTS))
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--contexts", default=None, help="comma list; default by preset")
    p.add_argument("--prefill-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused-path comparison")
    p.add_argument("--reserve-gib", type=float, default=8.0, help="GPU memory kept free of the KV pool")
    p.add_argument("--out", default=None, help="write the JSON results here")
    return p.parse_args(argv)


def build_engine(args: argparse.Namespace, contexts: list[int], batches: list[int]) -> tuple[Any, list[str]]:
    from libs.engine.config import EngineConfig
    from libs.engine.engine import LLMEngine
    from libs.engine.loader import load_model
    from libs.kvtransfer.layout import KVLayout

    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    notes: list[str] = []
    max_len = max(contexts + [args.prefill_tokens]) + args.steps + 8
    loaded = load_model(args.preset, KVLayout(dtype, 1, 1, 1, 1).torch_dtype, args.device, 0)
    mc = loaded.config
    layout = KVLayout(dtype, mc.num_layers, args.block_size, mc.num_kv_heads, mc.head_dim)
    want = max(b * math.ceil(max_len / args.block_size) for b in batches) + 8
    if args.device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(args.device))
        fits = int((free - args.reserve_gib * 2**30) // layout.block_bytes)
        if fits < want:
            notes.append(f"KV pool limited to {fits} blocks ({fits * layout.block_bytes / 2**30:.1f} GiB) of {want} wanted")
        num_blocks = max(16, min(want, fits))
    else:
        num_blocks = want
    cfg = EngineConfig(
        model=args.preset, device=args.device, dtype=dtype, block_size=args.block_size, num_blocks=num_blocks,
        max_num_seqs=max(batches), max_num_batched_tokens=max(args.prefill_tokens, 2048),
        max_model_len=max_len, enable_prefix_caching=False, seed=0, enforce_eager=True,
    )
    return LLMEngine(cfg), notes


def engine_decode(engine: Any, batch: int, context: int, steps: int) -> float | None:
    """ms per ``ModelRunner.decode`` step of ``batch`` sequences at ``context`` tokens of KV."""
    bs = engine.runner.block_size
    per_seq = math.ceil((context + steps + 4) / bs)
    if batch * per_seq > engine.pool.num_blocks:
        return None
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    pos = [context]

    def step() -> None:
        engine.runner.decode([(7 + i, pos[0], tables[i]) for i in range(batch)])
        pos[0] += 1

    return timed_ms(step, engine.runner.device, iters=steps, warmup=2)


def unfused_decode(engine: Any, args: argparse.Namespace, context: int, batches: list[int], cuda: bool) -> list[dict[str, Any]]:
    """Decode ms/step of the unfused path (eager and graphs) for batches 1 and 32 at ``context``."""
    runner = engine.runner
    sizes = [b for b in (1, 32) if b in batches]
    runner.set_fused_kernels(False)
    graphs = None
    try:
        eager = {b: engine_decode(engine, b, context, args.steps) for b in sizes}
        graphs = install_graphs(engine, max(batches), use_graphs=cuda)
        rows = [{"batch": b, "context": context, "step_ms": engine_decode(engine, b, context, args.steps),
                 "eager_step_ms": eager[b], "prefill_ms": None} for b in sizes]
        if rows:
            rows[0]["prefill_ms"] = engine_prefill(engine, args.prefill_tokens)
    finally:
        runner.decode_fn = runner.decode_forward
        runner.set_fused_kernels(True)
        del graphs  # the unfused graphs and their memory pool
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def engine_prefill(engine: Any, tokens: int) -> float | None:
    bs = engine.runner.block_size
    nb = math.ceil(tokens / bs)
    if nb > engine.pool.num_blocks:
        return None
    ids = torch.randint(3, engine.model_config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    chunk = [(ids, 0, list(range(nb)))]
    return timed_ms(lambda: engine.runner.logits(engine.runner.prefill(chunk)), engine.runner.device, iters=3, warmup=1)


def engine_step_loop(engine: Any, batch: int, context: int, steps: int) -> float | None:
    """ms per decode ``LLMEngine.step`` (scheduler + sampling included) of ``batch`` requests."""
    from libs.engine.sampling import SamplingParams

    if batch * math.ceil((context + steps + 8) / engine.runner.block_size) > engine.pool.num_blocks:
        return None
    gen = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(3, engine.model_config.vocab_size, (context,), generator=gen).tolist()
        engine.add_request(f"bench-{i}", prompt, params)
    started: set[str] = set()
    while len(started) < batch and engine.has_work():  # prefill phase: until each has its first token
        started.update(o.request_id for o in engine.step() if o.token_ids)
    ms = timed_ms(engine.step, engine.runner.device, iters=steps, warmup=1)
    for i in range(batch):
        engine.abort(f"bench-{i}")
    return ms


def hf_decode(hf: Any, device: torch.device, batch: int, context: int, steps: int) -> float | None:
    """ms per transformers decode step against a DynamicCache holding ``context`` tokens."""
    from transformers import DynamicCache

    cfg = hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = hf.model.embed_tokens.weight.dtype
    cache_bytes = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * (context + steps + 4) * head_dim * 2
    if device.type == "cuda" and cache_bytes * 1.15 + (2 << 30) > torch.cuda.mem_get_info(device)[0]:
        return None
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        kv = torch.zeros(batch, cfg.num_key_value_heads, context, head_dim, dtype=dtype, device=device)
        cache.update(kv, kv.clone(), layer)
    ids = torch.full((batch, 1), 7, dtype=torch.long, device=device)
    pos = [context]

    def step() -> None:
        position_ids = torch.full((batch, 1), pos[0], dtype=torch.long, device=device)
        hf(input_ids=ids, past_key_values=cache, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        pos[0] += 1

    with torch.inference_mode():
        ms = timed_ms(step, device, iters=max(3, steps // 2), warmup=2)
    del cache
    return ms


def hf_prefill(hf: Any, device: torch.device, tokens: int) -> float:
    ids = torch.randint(3, hf.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        return timed_ms(lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1), device, iters=3, warmup=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else DEFAULTS[args.preset][0]
    args.prefill_tokens = args.prefill_tokens or DEFAULTS[args.preset][1]
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "preset": args.preset,
                           "block_size": args.block_size, "notes": []}
    engine, notes = build_engine(args, contexts, batches)
    res["notes"] += notes
    res["kv_pool_blocks"] = engine.pool.num_blocks
    bw = copy_bandwidth(device)
    wbytes = weight_bytes_per_decode_step(engine)
    res.update(copy_bandwidth_GBps=bw / 1e9, weight_bytes=wbytes, floor_ms=wbytes / bw * 1e3)

    if not args.no_unfused:
        res["unfused"] = unfused_decode(engine, args, contexts[0], batches, cuda)
    engine.runner.set_fused_kernels(True)  # whatever FLOWKV_FUSED_KERNELS says
    res["fused_kernels"] = engine.runner.fused_kernels
    eager = {b: engine_decode(engine, b, contexts[0], args.steps) for b in (1, 32) if b in batches}
    graphs = install_graphs(engine, max(batches), use_graphs=cuda)
    res["graph_capture_s"] = graphs.capture_seconds
    decode = []
    for ctx in contexts:
        for b in batches:
            ms = engine_decode(engine, b, ctx, args.steps)
            if ms is None:
                res["notes"].append(f"engine decode batch {b} x {ctx} tokens skipped: KV does not fit the pool")
            decode.append({"batch": b, "context": ctx, "step_ms": ms, "eager_step_ms": eager.get(b) if ctx == contexts[0] else None})
    res["engine_decode"] = decode
    res["engine_prefill_ms"] = engine_prefill(engine, args.prefill_tokens)
    b32 = 32 if 32 in batches else max(batches)
    res["engine_step_loop"] = {"batch": b32, "context": contexts[0],
                               "step_ms": engine_step_loop(engine, b32, contexts[0], args.steps)}

    if not args.no_hf:
        hf = hf_twin(engine)
        del graphs
        engine.runner.decode_fn = engine.runner.decode_forward
        engine._pool = None  # free the KV pool for transformers' cache; weights stay shared
        engine.runner.pool = None
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        hf_rows = []
        for ctx in contexts:
            for b in batches:
                ms = hf_decode(hf, device, b, ctx, args.steps)
                if ms is None:
                    res["notes"].append(f"HF decode batch {b} x {ctx} tokens skipped: cache does not fit")
                hf_rows.append({"batch": b, "context": ctx, "step_ms": ms})
        res["hf_decode"] = hf_rows
        res["hf_prefill_ms"] = hf_prefill(hf, device, args.prefill_tokens)
    res["ratios"] = ratios(res, b32)
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _lookup(rows: list[dict[str, Any]], batch: int, ctx: int) -> float | None:
    return next((r["step_ms"] for r in rows if r["batch"] == batch and r["context"] == ctx), None)


def ratios(res: dict[str, Any], b32: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ctx0 = res["engine_decode"][0]["context"]
    b1 = _lookup(res["engine_decode"], 1, ctx0)
    if b1:
        out["engine_b1_over_floor"] = b1 / res["floor_ms"]
    for row in res.get("hf_decode", []):
        eng = _lookup(res["engine_decode"], row["batch"], row["context"])
        if row["batch"] == b32 and eng and row["step_ms"]:
            out[f"engine_vs_hf_throughput_b{b32}_ctx{row['context']}"] = row["step_ms"] / eng
    for row in res.get("unfused", []):
        fused = _lookup(res["engine_decode"], row["batch"], row["context"])
        if fused and row["step_ms"]:
            out[f"fused_speedup_b{row['batch']}_ctx{row['context']}"] = row["step_ms"] / fused
    if res.get("engine_prefill_ms") and res.get("hf_prefill_ms"):
        out["prefill_engine_over_hf"] = res["engine_prefill_ms"] / res["hf_prefill_ms"]
    return out


def _fmt(v: float | None) -> str:
    return "skipped" if v is None else f"{v:.2f}"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"## engine bench: {res['preset']} on {res['device']}", "",
             f"copy rate {res['copy_bandwidth_GBps']:.0f} GB/s (read+write); weights read per step "
             f"{res['weight_bytes'] / 1e9:.2f} GB; floor {res['floor_ms']:.2f} ms; graph capture {res['graph_capture_s']:.1f} s", "",
             "| batch | context | engine ms/step | engine tok/s | eager ms/step | HF ms/step | HF tok/s | engine/floor |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["engine_decode"]:
        hf = _lookup(res.get("hf_decode", []), r["batch"], r["context"])
        tps = r["batch"] * 1e3 / r["step_ms"] if r["step_ms"] else None
        hf_tps = r["batch"] * 1e3 / hf if hf else None
        floor = r["step_ms"] / res["floor_ms"] if r["step_ms"] else None
        lines.append(f"| {r['batch']} | {r['context']} | {_fmt(r['step_ms'])} | {_fmt(tps)} | {_fmt(r['eager_step_ms'])} "
                     f"| {_fmt(hf)} | {_fmt(hf_tps)} | {_fmt(floor)} |")
    loop = res["engine_step_loop"]
    lines += ["", f"LLMEngine.step decode, batch {loop['batch']} x {loop['context']}: {_fmt(loop['step_ms'])} ms/step",
              f"prefill of one sequence: engine {_fmt(res['engine_prefill_ms'])} ms, HF {_fmt(res.get('hf_prefill_ms'))} ms",
              "", "ratios: " + json.dumps({k: round(v, 3) for k, v in res["ratios"].items()})]
    lines += _unfused_markdown(res)
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


def _unfused_markdown(res: dict[str, Any]) -> list[str]:
    rows = res.get("unfused")
    if not rows:
        return []
    lines = ["", "### fused vs unfused layer path (same engine, same run)", "",
             "| batch | context | unfused ms/step | fused ms/step | speedup | unfused eager | fused eager | fused/floor |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        fused = next((x for x in res["engine_decode"] if x["batch"] == r["batch"] and x["context"] == r["context"]), {})
        f_ms = fused.get("step_ms")
        speed = r["step_ms"] / f_ms if f_ms and r["step_ms"] else None
        lines.append(f"| {r['batch']} | {r['context']} | {_fmt(r['step_ms'])} | {_fmt(f_ms)} | {_fmt(speed)} "
                     f"| {_fmt(r['eager_step_ms'])} | {_fmt(fused.get('eager_step_ms'))} "
                     f"| {_fmt(f_ms / res['floor_ms'] if f_ms else None)} |")
    lines.append(f"prefill of one sequence, unfused: {_fmt(rows[0]['prefill_ms'])} ms "
                 f"(fused: {_fmt(res['engine_prefill_ms'])} ms)")
    return lines


if __name__ == "__main__":
    sys.exit(main())

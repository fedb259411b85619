"""Helpers shared by the engine benchmarks and GPU checks: graphs, HF twin, timing, node-like engines."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Mean wall time of ``fn`` in ms over ``iters`` calls, synchronising the device around them."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def install_graphs(engine: Any, max_num_seqs: int, use_graphs: bool = True) -> Any:
    """Capture decode graphs for ``engine.runner`` and make them its ``decode_fn``.

    The engine captures its own graphs unless built with ``enforce_eager=True``; the
    benchmarks build it eager so they can time both modes on the same engine.

    Args:
        engine: an ``LLMEngine``.
        max_num_seqs: largest batch to capture.
        use_graphs: False installs the padding runner without graphs (CPU).

    Returns:
        The :class:`libs.engine.cuda_graphs.CudaGraphRunner`.
    """
    from libs.engine.cuda_graphs import CudaGraphRunner

    runner = engine.runner
    graphs = CudaGraphRunner(
        runner.decode_forward,
        max_num_seqs=max_num_seqs,
        max_blocks_per_seq=math.ceil(engine.max_model_len / runner.block_size),
        device=runner.device,
        use_graphs=use_graphs,
    )
    graphs.capture()
    runner.decode_fn = graphs
    return graphs


def hf_twin(engine: Any) -> Any:
    """A transformers ``LlamaForCausalLM`` that shares the engine's weight tensors (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = engine.model_config
    config = LlamaConfig(**mc.to_hf_dict())
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    sd = engine.runner.model.hf_state_dict()  # q/k/v, gate/up as views of the fused weights
    if mc.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=False, assign=True)
    # Rotary tables are buffers, not weights: rebuild them off the meta device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(engine.runner.device)
    still_meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"HF twin has tensors left on meta: {still_meta[:5]}")
    return hf.eval()


def weight_bytes_per_decode_step(engine: Any) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table
    (only B rows of it are gathered), unless the LM head shares it."""
    model = engine.runner.model
    seen: set[int] = set()
    total = 0
    embed = model.model.embed_tokens.weight
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is embed and not engine.model_config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s counting read and write (2 x bytes per copy)."""
    if device.type != "cuda":
        nbytes = 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, iters=10, warmup=2)
    del src, dst
    return 2 * nbytes / (ms / 1e3)


def node_like_engine(model: str, device: str, warmup: bool | None = None, num_blocks: int = 16000,
                     max_num_batched_tokens: int = 8192) -> Any:
    """An ``LLMEngine`` built as a prefill node builds one (bf16, decode graphs on CUDA, seed
    0), but without prefix caching, so that no prompt helps another; ``warmup`` as
    ``EngineConfig.warmup``."""
    from libs.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(
        model=model, device=device, dtype="bfloat16", num_blocks=num_blocks,
        max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False, warmup=warmup, seed=0,
    ))


def prefill_steps_ms(engine: Any, request_id: str, prompt: list[int]) -> list[float]:
    """Prefill ``prompt`` alone (``prefill_only``, greedy, as on a prefill node) until its first
    token, then release its blocks. Returns each step's wall time in ms, the device
    synchronised after every step; the first includes ``add_request``, so the sum is the
    time to the first token."""
    from libs.engine import SamplingParams

    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                       prefill_only=True)
    steps: list[float] = []
    done = False
    while not done:
        outs = engine.step()
        sync(engine.pool.device)
        now = time.perf_counter()
        steps.append((now - start) * 1e3)
        start = now
        done = any(o.request_id == request_id and o.token_ids for o in outs)
    engine.release(request_id)
    return steps

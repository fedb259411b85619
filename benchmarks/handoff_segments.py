"""Segments per KV hand-off under load, on CPU: a 1P1D pair's block managers driven by a trace.

No model and no GPU: the prefill and decode nodes are two real
:class:`~libs.engine.block_manager.BlockManager` s (prefix caching on) called in the order
the engine and the role handlers call them, with the times of a simple cost model:

- P: a request's prompt blocks are allocated when its prefill starts (one prefill at a
  time, ``prefill_tps`` tokens/s, FIFO), registered in the prefix cache when it ends,
  freed (``engine.release``) once the hand-off is done;
- D: ``allocate_remote`` (prompt blocks, prefix hits reused) when P's prefill ends, then
  ``register_computed`` of the prompt, then one decode step every ``step_s`` for every
  running request (``append_slots`` one token at a time, full blocks registered) until
  its output length; then ``free`` (the full blocks stay cached and evictable).

Each hand-off is planned with the real :func:`~libs.kvtransfer.align.align` over P's
blocks and D's blocks past D's prefix hit, and counted with
:func:`~libs.kvtransfer.align.num_calls` in merged mode, as ``KVAgent`` does. The
default trace replays the runs of the 2 x H100 stack benchmark in order on one pair
(gov_report mix at 2 then 4 req/s, 10k-token prompts at 1.5, 1k at 8) with the prompts
and arrival times of :mod:`libs.loadgen`. ``--shared-fraction`` starts that share of the
prompts with one of a few shared documents, to see what the policy does to prefix hits.

    python benchmarks/handoff_segments.py                      # this tree
    python benchmarks/handoff_segments.py --before HEAD~1      # also the given revision's libs/, side by side
    python benchmarks/handoff_segments.py --shared-fraction 0.5 --before HEAD~1
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if "--src" in sys.argv:  # import libs/ from another checkout (used by --before)
    sys.path.insert(0, sys.argv[sys.argv.index("--src") + 1])
else:
    sys.path.insert(0, str(_ROOT))

from libs.engine.block_manager import BlockManager  # noqa: E402
from libs.kvtransfer.align import align, num_calls  # noqa: E402
from libs.kvtransfer.allocator import NoFreeBlocks, ids_to_runs  # noqa: E402
from libs.kvtransfer.base import TransferMode  # noqa: E402
from libs.kvtransfer.layout import KVLayout  # noqa: E402
from libs.loadgen.arrivals import intervals  # noqa: E402
from libs.loadgen.workloads import WorkloadOptions, make_workload  # noqa: E402

LLAMA8B = KVLayout("bfloat16", num_layers=32, block_size=16, num_kv_heads=8, head_dim=128)


@dataclass(frozen=True)
class Run:
    """One load run: ``num_requests`` of a :mod:`libs.loadgen` workload at ``rate`` req/s."""

    workload: str
    rate: float
    num_requests: int
    length_scale: float = 1.0
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.workload}@{self.rate:g}"


# The 2 x H100 stack benchmark's 1P1D runs (15 s each, in this order; gov_report at
# length scale 0.513: 5.8k-token prompts, ~250-token outputs; 1k and 10k: 256 out).
H100_TRACE = (
    Run("gov_report", 2.0, 30, 0.513, seed=1),
    Run("gov_report", 4.0, 60, 0.513, seed=2),
    Run("10k", 1.5, 22, seed=3),
    Run("1k", 8.0, 120, seed=4),
)
H100_NUM_BLOCKS = 23_000


@dataclass(frozen=True)
class Timing:
    """The cost model: P's prefill rate, D's decode step, the hand-off's duration."""

    prefill_tps: float = 15_000.0
    step_s: float = 0.009
    handoff_s: float = 0.012


@dataclass
class Handoff:
    run: str
    prompt_blocks: int
    cached_blocks: int  # D's prefix hit: not moved
    p_segments: int  # P's runs of the whole prompt
    d_segments: int  # D's runs of the blocks moved
    calls: int  # merged copy ops after bidirectional alignment


@dataclass
class SimResult:
    handoffs: list[Handoff]
    prefill: BlockManager
    decode: BlockManager
    alloc_s: dict[str, list[float]]  # seconds per prompt allocation, "P" and "D"


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    output_len: int
    run: str
    tokens: list[int] = field(default_factory=list)  # D's token ids (prompt + outputs so far)
    num_computed: int = 0


def _shared_docs(scale: float) -> list[list[int]]:
    """Eight shared documents, 3,000 to 6,500 tokens times ``scale``."""
    docs = []
    for d in range(8):
        rng = random.Random(d)
        docs.append([rng.randrange(1000, 30000) for _ in range(max(1, round((3000 + 500 * d) * scale)))])
    return docs


def _requests(run: Run, index: int, shared_fraction: float, docs: list[list[int]]) -> list[tuple[float, _Req]]:
    specs = make_workload(run.workload, run.num_requests, run.seed, WorkloadOptions(length_scale=run.length_scale))
    times = itertools.accumulate(intervals(len(specs), run.rate, 1.0, run.seed))
    rng = random.Random(run.seed)
    out = []
    for t, spec in zip(times, specs):
        prompt = list(spec.prompt_token_ids)
        if rng.random() < shared_fraction:  # a shared document (the first ones most often), then a third of its own
            prompt = docs[min(int(rng.expovariate(0.5)), len(docs) - 1)] + prompt[: len(prompt) // 3]
        out.append((t, _Req(f"{index}.{spec.index}", prompt, spec.output_len, run.name)))
    return out


def simulate(trace: tuple[Run, ...] | list[Run], num_blocks: int, block_size: int = 16, timing: Timing = Timing(),
             layout: KVLayout = LLAMA8B, shared_fraction: float = 0.0, doc_scale: float = 1.0) -> SimResult:
    """Drive a P and a D block manager through ``trace`` (runs one after another, each drained).

    Args:
        shared_fraction: share of prompts that start with one of :func:`_shared_docs` (``doc_scale``).

    Returns:
        One record per hand-off, in hand-off order (refused reservations are skipped), and the
        two block managers as the trace left them.
    """
    res = SimResult([], BlockManager(num_blocks, block_size, enable_prefix_caching=True),
                    BlockManager(num_blocks, block_size, enable_prefix_caching=True), {"P": [], "D": []})
    rng = random.Random(0)
    docs = _shared_docs(doc_scale) if shared_fraction else []
    for index, run in enumerate(trace):
        _simulate_run(res, _requests(run, index, shared_fraction, docs), timing, layout, rng)
    return res


def _simulate_run(res: SimResult, arrivals: list[tuple[float, _Req]], timing: Timing, layout: KVLayout,
                  rng: random.Random) -> None:
    p_bm, d_bm, records = res.prefill, res.decode, res.handoffs
    seq = itertools.count()
    events: list[tuple[float, int, str, _Req | None]] = [(t, next(seq), "arrive", r) for t, r in arrivals]
    heapq.heapify(events)
    queue: list[_Req] = []
    p_busy = False
    running: list[_Req] = []
    stepping = False
    bs = p_bm.block_size

    def start_prefill(now: float) -> None:
        nonlocal p_busy
        req = queue.pop(0)
        n = len(req.prompt)
        t0 = time.perf_counter()
        p_bm.allocate(req.rid, req.prompt, n, (n - 1) // bs)  # the engine scheduler's _admit
        res.alloc_s["P"].append(time.perf_counter() - t0)
        p_busy = True
        heapq.heappush(events, (now + n / timing.prefill_tps, next(seq), "prefilled", req))

    while events:
        now, _, kind, req = heapq.heappop(events)
        if kind == "arrive":
            assert req is not None
            queue.append(req)
        elif kind == "prefilled":
            assert req is not None
            n = len(req.prompt)
            p_bm.register_computed(req.rid, req.prompt, n)
            p_busy = False
            src = p_bm.block_ids(req.rid)
            t0 = time.perf_counter()
            try:
                cached = d_bm.allocate(req.rid, req.prompt, n, n // bs)  # engine.allocate_remote
            except NoFreeBlocks:
                p_bm.free(req.rid)
                continue
            res.alloc_s["D"].append(time.perf_counter() - t0)
            dst = d_bm.block_ids(req.rid)
            k = cached // bs
            ops = align(src[k:], dst[k:])
            records.append(Handoff(req.run, len(src), k, len(ids_to_runs(src)), len(ids_to_runs(dst[k:])),
                                   num_calls(ops, layout, TransferMode.MERGED)))
            heapq.heappush(events, (now + timing.handoff_s, next(seq), "landed", req))
        elif kind == "landed":
            assert req is not None
            p_bm.free(req.rid)  # engine.release on P
            d_bm.register_computed(req.rid, req.prompt, len(req.prompt))  # engine.commit_remote
            req.tokens = req.prompt + [rng.randrange(1000, 30000)]
            req.num_computed = len(req.prompt)
            if req.output_len <= 1:
                d_bm.free(req.rid)
            else:
                running.append(req)
                if not stepping:
                    stepping = True
                    heapq.heappush(events, (now + timing.step_s, next(seq), "step", None))
        elif kind == "step":
            for r in list(running):
                if not d_bm.append_slots(r.rid, len(r.tokens)):
                    raise RuntimeError("decode pool full: the trace does not fit this pool")
                r.num_computed += 1
                d_bm.register_computed(r.rid, r.tokens, r.num_computed)
                r.tokens.append(rng.randrange(1000, 30000))
                if len(r.tokens) - len(r.prompt) >= r.output_len:
                    running.remove(r)
                    d_bm.free(r.rid)
            stepping = bool(running)
            if stepping:
                heapq.heappush(events, (now + timing.step_s, next(seq), "step", None))
        if not p_busy and queue:
            start_prefill(now)


def summarize(res: SimResult) -> dict[str, dict[str, object]]:
    """Per run (and ``all``): hand-offs, mean P/D segments and calls, the calls histogram;
    ``nodes``: per side, prefix-hit share, blocks evicted, free (uncached) blocks at the end
    and prompt allocation time."""
    out: dict[str, dict[str, object]] = {}
    groups: dict[str, list[Handoff]] = {}
    for r in res.handoffs:
        groups.setdefault(r.run, []).append(r)
    groups["all"] = list(res.handoffs)
    for name, rs in groups.items():
        calls = [r.calls for r in rs]
        out[name] = {
            "handoffs": len(rs),
            "prompt_blocks": round(statistics.fmean(r.prompt_blocks for r in rs), 1),
            "p_segments": round(statistics.fmean(r.p_segments for r in rs), 2),
            "d_segments": round(statistics.fmean(r.d_segments for r in rs), 2),
            "calls": round(statistics.fmean(calls), 2),
            "calls_max": max(calls),
            "calls_hist": {str(k): v for k, v in sorted(Counter(calls).items())},
        }
    nodes: dict[str, object] = {}
    for side, bm in (("P", res.prefill), ("D", res.decode)):
        times = res.alloc_s[side]
        nodes[side] = {
            "hit_share": round(bm.num_hit_tokens / max(bm.num_query_tokens, 1), 4),
            "evicted_blocks": getattr(bm, "num_evicted_blocks", None),  # absent before the fix
            "free_uncached_blocks": bm.num_free_blocks - bm.num_evictable_blocks,
            "alloc_us_mean": round(1e6 * statistics.fmean(times), 1),
            "alloc_us_max": round(1e6 * max(times), 1),
        }
    out["nodes"] = nodes
    return out


def _table(label: str, summary: dict[str, dict[str, object]]) -> str:
    head = f"{'run':<16} {'hand-offs':>9} {'blocks':>7} {'P segs':>7} {'D segs':>7} {'calls':>7} {'max':>5}"
    lines = [label, head + "  calls: hand-offs"]
    for name, s in summary.items():
        if name == "nodes":
            continue
        hist = " ".join(f"{c}:{n}" for c, n in s["calls_hist"].items())  # type: ignore[attr-defined]
        lines.append(f"{name:<16} {s['handoffs']:>9} {s['prompt_blocks']:>7} {s['p_segments']:>7} "
                     f"{s['d_segments']:>7} {s['calls']:>7} {s['calls_max']:>5}  {hist}")
    for side, n in summary["nodes"].items():  # type: ignore[union-attr]
        lines.append(f"{side}: prefix hits {n['hit_share']:.1%}, evicted {n['evicted_blocks']}, free uncached at end "
                     f"{n['free_uncached_blocks']}, prompt allocation {n['alloc_us_mean']} us mean / {n['alloc_us_max']} max")
    return "\n".join(lines)


def _before(rev: str, args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Run this script against ``rev``'s libs/ in a subprocess; its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(_ROOT), "archive", rev, "libs"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        cmd = [sys.executable, __file__, "--src", tmp, "--json", "--num-blocks", str(args.num_blocks),
               "--scale", str(args.scale), "--shared-fraction", str(args.shared_fraction)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tmp})
        return json.loads(out.stdout)


def scaled_trace(scale: float) -> tuple[Run, ...]:
    """:data:`H100_TRACE` with every prompt and output length times ``scale`` (for a pool as much smaller)."""
    return tuple(Run(r.workload, r.rate, r.num_requests, r.length_scale * scale, r.seed) for r in H100_TRACE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-blocks", type=int, default=H100_NUM_BLOCKS, help="blocks per node's pool")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every length (use with a smaller pool)")
    ap.add_argument("--shared-fraction", type=float, default=0.0,
                    help="share of prompts that start with one of 8 shared documents (prefix hits)")
    ap.add_argument("--before", metavar="REV", help="also run REV's libs/ (git revision) and print both")
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    trace = H100_TRACE if args.scale == 1.0 else scaled_trace(args.scale)
    summary = summarize(simulate(trace, args.num_blocks, shared_fraction=args.shared_fraction, doc_scale=args.scale))
    if args.json:
        print(json.dumps(summary))
        return
    print(f"pool {args.num_blocks} blocks per node, block size 16, length scale {args.scale:g}, "
          f"shared-document prompts {args.shared_fraction:g}, {Timing()}")
    if args.before:
        print(_table(f"before ({args.before}):", _before(args.before, args)))
        print()
    print(_table("this tree:", summary))


if __name__ == "__main__":
    main()

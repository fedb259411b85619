"""KV hand-off latency: merged vs layer-wise vs block-wise, fresh vs fragmented pools.

Llama-3.1-8B shapes (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks). P runs
in this process (GPU0), D in a spawned process (GPU1), as in production. Each case times
``agent.send`` (P returns once the bytes are in D's pool) and compares it with the floor:
one copy of the same bytes GPU0 -> GPU1 in one call.

    python benchmarks/gpu/kv_transfer_bench.py --out bench-results/kv_transfer.json
    python benchmarks/gpu/kv_transfer_bench.py --device cpu --tokens 64,256 --out /tmp/kv.json  # smoke

Keep ``NCCL_NVLS_ENABLE=0`` set on machines without NVLink multicast (``benchmarks/gpu/env.sh`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgspec  # noqa: E402
import torch  # noqa: E402

from libs.kvtransfer.agent import KVAgent  # noqa: E402
from libs.kvtransfer.align import align  # noqa: E402
from libs.kvtransfer.allocator import SegmentAllocator  # noqa: E402
from libs.kvtransfer.base import TransferMode  # noqa: E402
from libs.kvtransfer.layout import KVLayout  # noqa: E402
from libs.kvtransfer.peer import PeerProcess  # noqa: E402
from libs.kvtransfer.pool import KVPool  # noqa: E402

LLAMA8B = KVLayout("bfloat16", num_layers=32, block_size=16, num_kv_heads=8, head_dim=128)


def churned(num_blocks: int, n: int, seed: int) -> list[int]:
    """A request's ids from an allocator fragmented by random allocate/free churn."""
    rng = random.Random(seed)
    a = SegmentAllocator(num_blocks)
    live: list[list[int]] = []
    while a.num_free_blocks:  # fill with requests of 1..32 blocks, then let a random half finish
        live.append(a.allocate(min(rng.randint(1, 32), a.num_free_blocks)))
    rng.shuffle(live)
    while not a.can_allocate(n) or a.num_free_blocks < num_blocks // 2:
        a.free(live.pop())
    return a.allocate(n)


def floor_ms(layout: KVLayout, nbytes: int, src_dev: str, dst_dev: str, iters: int) -> float:
    """One copy of ``nbytes`` from ``src_dev`` to ``dst_dev`` in one call (median ms)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_dev)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev)
    times = []
    for _ in range(iters + 1):
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.synchronize(dst.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


async def run(args: argparse.Namespace) -> list[dict]:
    cuda = args.device == "cuda"
    p_dev, d_dev = ("cuda:0", "cuda:1") if cuda else ("cpu", "cpu")
    transports = args.transports.split(",") if args.transports else (["cuda_ipc", "nccl"] if cuda else ["shm", "tcp"])
    tokens = [int(t) for t in args.tokens.split(",")]
    layout = LLAMA8B
    max_blocks = layout.num_blocks_for(max(tokens))
    num_blocks = args.num_blocks or 3 * max_blocks
    if cuda:
        torch.cuda.set_device(0)
    pool = KVPool.allocate(layout, num_blocks, device=p_dev, shared=not cuda)
    pool.tensor.view(-1).view(torch.uint8).random_(0, 256)
    # The floor is measured once per size, before any peer process runs: measured later, a
    # busy NCCL proxy thread of the peer inflated it (seen on H100s, 2026-11-27).
    floors = {
        n_tok: floor_ms(layout, layout.num_blocks_for(n_tok) * layout.block_bytes, p_dev, d_dev, args.iters)
        for n_tok in tokens
    }
    rows = []
    for transport in transports:
        # "nccl" is for different hosts: give D another host id so choose_transport agrees.
        d_host = "bench-other-host" if transport == "nccl" else None
        peer_proc = PeerProcess(msgspec.json.encode(layout), num_blocks, d_dev, host_id=d_host,
                                force=transport, shared=not cuda)
        agent = KVAgent(pool, "P", rendezvous=peer_proc.rendezvous, force_transport=transport)
        await agent.start()
        try:
            peer = await peer_proc.info()
            me = msgspec.msgpack.encode(agent.info())
            for n_tok in tokens:
                n = layout.num_blocks_for(n_tok)
                floor = floors[n_tok]
                for pool_state in ("fresh", "fragmented"):
                    if pool_state == "fresh":
                        src, dst = list(range(n)), list(range(num_blocks - n, num_blocks))
                    else:
                        src, dst = churned(num_blocks, n, 1), churned(num_blocks, n, 2)
                    for mode in TransferMode:
                        row = await time_case(agent, peer_proc, peer, me, src, dst, mode, args, transport)
                        row.update(tokens=n_tok, pool=pool_state, floor_ms=floor,
                                   ratio_to_floor=row["median_ms"] / floor,
                                   gb_s=row["bytes"] / row["median_ms"] / 1e6)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            await agent.close()
            await peer_proc.stop()
    return rows


async def time_case(agent: KVAgent, peer_proc: PeerProcess, peer, me: bytes, src: list[int], dst: list[int],
                    mode: TransferMode, args: argparse.Namespace, transport: str) -> dict:
    iters = args.iters if mode != TransferMode.BLOCKWISE else max(2, args.iters // 2)
    times, stats = [], None
    for i in range(iters + 1):  # the first one warms up (maps, communicator)
        tid = f"{mode.value}-{len(src)}-{time.monotonic_ns()}-{i}"
        r = await peer_proc.call(op="expect", tid=tid, peer=me, dst=dst, src=src, mode=mode.value, timeout=120.0)
        assert r["ok"], r
        stats = await agent.send(tid, peer, src, dst, mode=mode, timeout=120.0)
        r = await peer_proc.call(op="await", tid=tid, complete=agent.transports[transport].one_sided)
        assert r["ok"], r
        if i:
            times.append(stats.duration_s * 1e3)
    assert stats is not None
    return {"transport": transport, "mode": mode.value, "median_ms": statistics.median(times),
            "calls": stats.calls, "segments": stats.segments, "bytes": stats.bytes,
            "ops_check": len(align(src, dst))}


def markdown(rows: list[dict]) -> str:
    lines = ["| transport | tokens | pool | mode | median ms | calls | segments | GB/s | floor ms | x floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['transport']} | {r['tokens']} | {r['pool']} | {r['mode']} | {r['median_ms']:.3f} | "
                     f"{r['calls']} | {r['segments']} | {r['gb_s']:.1f} | {r['floor_ms']:.3f} | "
                     f"{r['ratio_to_floor']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokens", default="500,1000,4000,8000,10000")
    ap.add_argument("--transports", default="", help="comma list; default cuda_ipc,nccl (cuda) or shm,tcp (cpu)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--num-blocks", type=int, default=0, help="pool size; default 3x the largest request")
    ap.add_argument("--out", default="bench-results/kv_transfer.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rows = asyncio.run(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"layout": msgspec.to_builtins(LLAMA8B), "device": args.device, "rows": rows,
                               "wall_s": time.perf_counter() - t0}, indent=1))
    print(markdown(rows))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()

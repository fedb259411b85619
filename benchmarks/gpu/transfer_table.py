"""KV transfer per request at the paper's prompt lengths: block-wise (vLLM-disagg) against
FlowKV's merged transfer (and layer-wise), P and D in two processes on one GPU or two.

The design note's table (Llama-3.1-8B, 1P1D, A100 NVLink, seconds of KV transfer per
request): vLLM-disagg against FlowKV at 500 to 10,000 prompt tokens. This runs the same
shapes (32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks) through ``KVAgent.send``
(P returns once the bytes are in D's pool) on fresh pools, i.e. a hand-off whose blocks are
contiguous on both sides, as in the paper's 1P1D runs.

    python3 benchmarks/gpu/transfer_table.py --devices cuda:0,cuda:0 --out $OUT/transfer.json   # one GPU
    python3 benchmarks/gpu/transfer_table.py --devices cuda:0,cuda:1 --out $OUT/transfer.json   # two GPUs
    python3 benchmarks/gpu/transfer_table.py --devices cpu,cpu --tokens 64,256 --out /tmp/t.json  # CPU smoke

NCCL refuses two ranks on one device, so with one GPU only ``cuda_ipc`` runs (a copy
within the device); with two, ``cuda_ipc`` (peer copy) and ``nccl`` (the between-hosts path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import msgspec  # noqa: E402
import torch  # noqa: E402

from kv_transfer_bench import LLAMA8B, floor_ms, time_case  # noqa: E402
from libs.kvtransfer.agent import KVAgent  # noqa: E402
from libs.kvtransfer.base import TransferMode  # noqa: E402
from libs.kvtransfer.peer import PeerProcess  # noqa: E402
from libs.kvtransfer.pool import KVPool  # noqa: E402

# The design note's table: tokens -> (vLLM-disagg s, FlowKV s) per request, A100 NVLink.
PAPER = {500: (0.1179, 0.0044), 1000: (0.2314, 0.0075), 4000: (0.6670, 0.0236), 8000: (1.3382, 0.0447),
         10000: (1.7373, 0.0555)}


async def run(args: argparse.Namespace) -> list[dict]:
    p_dev, d_dev = args.devices.split(",")
    cuda = p_dev.startswith("cuda")
    transports = args.transports.split(",") if args.transports else (
        (["cuda_ipc"] if p_dev == d_dev else ["cuda_ipc", "nccl"]) if cuda else ["shm", "tcp"])
    tokens = [int(t) for t in args.tokens.split(",")]
    layout = LLAMA8B
    n_max = layout.num_blocks_for(max(tokens))
    num_blocks = 2 * n_max
    if cuda:
        torch.cuda.set_device(torch.device(p_dev))
    pool = KVPool.allocate(layout, num_blocks, device=p_dev, shared=not cuda)
    pool.tensor.view(-1).view(torch.uint8).random_(0, 256)
    floors = {n: floor_ms(layout, layout.num_blocks_for(n) * layout.block_bytes, p_dev, d_dev, args.iters)
              for n in tokens}
    rows = []
    for transport in transports:
        d_host = "bench-other-host" if transport == "nccl" else None  # nccl is chosen between hosts
        peer_proc = PeerProcess(msgspec.json.encode(layout), num_blocks, d_dev, host_id=d_host, force=transport,
                                shared=not cuda)
        agent = KVAgent(pool, "P", rendezvous=peer_proc.rendezvous, force_transport=transport)
        await agent.start()
        try:
            peer = await peer_proc.info()
            me = msgspec.msgpack.encode(agent.info())
            for n_tok in tokens:
                n = layout.num_blocks_for(n_tok)
                src, dst = list(range(n)), list(range(num_blocks - n, num_blocks))  # fresh: one segment each
                for mode in TransferMode:
                    row = await time_case(agent, peer_proc, peer, me, src, dst, mode, args, transport)
                    row.update(tokens=n_tok, floor_ms=floors[n_tok], devices=args.devices)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            await agent.close()
            await peer_proc.stop()
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per (transport, tokens): each mode's ms and calls, the ratios, the paper's figures."""
    out = ["| transport | tokens | MiB | floor ms | merged ms (calls) | layerwise ms (calls) | blockwise ms (calls) "
           "| blockwise / merged | reduction | paper vLLM-disagg ms | paper FlowKV ms | paper reduction |",
           "|" + " --- |" * 12]
    keys = list(dict.fromkeys((r["transport"], r["tokens"]) for r in rows))
    for transport, tokens in keys:
        by = {r["mode"]: r for r in rows if (r["transport"], r["tokens"]) == (transport, tokens)}
        if not {"merged", "blockwise"} <= set(by):
            continue
        m, b = by["merged"], by["blockwise"]
        lw = by.get("layerwise")
        paper = PAPER.get(tokens)
        paper_cols = (f"{paper[0] * 1e3:.1f} | {paper[1] * 1e3:.1f} | {1 - paper[1] / paper[0]:.1%}" if paper
                      else "- | - | -")
        out.append(f"| {transport} | {tokens} | {m['bytes'] / 2**20:.0f} | {m['floor_ms']:.2f} | "
                   f"{m['median_ms']:.2f} ({m['calls']}) | "
                   + (f"{lw['median_ms']:.2f} ({lw['calls']}) | " if lw else "- | ")
                   + f"{b['median_ms']:.1f} ({b['calls']}) | {b['median_ms'] / m['median_ms']:.1f}x | "
                   f"{1 - m['median_ms'] / b['median_ms']:.1%} | {paper_cols} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cuda:0,cuda:0", help="P's device,D's device (cuda:0,cuda:0 = one GPU)")
    ap.add_argument("--tokens", default=",".join(str(t) for t in PAPER))
    ap.add_argument("--transports", default="", help="comma list; default: cuda_ipc (+ nccl on two GPUs); shm,tcp on CPU")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="bench-results/transfer_table.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rows = asyncio.run(run(args))
    table = markdown(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"layout": msgspec.to_builtins(LLAMA8B), "devices": args.devices, "rows": rows,
                               "table": table, "wall_s": time.perf_counter() - t0}, indent=1))
    print(table)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()

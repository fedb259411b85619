"""GPU check of the vLLM connector's CUDA path, without vLLM: export, attach, hand-off.

Two worker processes stand in for two vLLM workers (a prefill's and a decode's): each
allocates its KV cache inside the connector's allocation context
(:class:`libs.vllm_engine.kv_export.KVCacheExport`) as vLLM's ``allocate_kv_cache`` does
(one ``torch.zeros(n, dtype=int8, device="cuda:0")``, viewed layer-major per layer) and
describes it (CUDA IPC handle and offset). This process plays the prefill node: it maps
P's cache (``KVPool.attach_cuda_ipc``), and its ``cuda_ipc`` transport copies the blocks
of a request into the decode worker's cache, each mode, on fragmented block ids. The
decode worker reads the bytes back through its own (vLLM's) views. Also checked: the
node's ``cuda_ipc`` transport advertises the worker's handle (mapped memory cannot be
exported again). Prints one PASS/FAIL line per case, exits non-zero on any failure.

    NCCL_NVLS_ENABLE=0 python benchmarks/gpu/vllm_export_check.py
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

LAYERS, BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 4, 96, 2, 16, 64
SRC = [5, 6, 7, 8, 20, 21, 40, 41, 42, 43, 44, 60]
DST = [70, 71, 10, 11, 12, 13, 14, 15, 30, 31, 50, 90]


def worker(conn, dtype_name: str) -> None:  # type: ignore[no-untyped-def]
    """A stand-in for vLLM's worker: allocate, view, describe, then answer reads."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from libs.vllm_engine.kv_export import KVCacheExport

    torch.cuda.set_device(0)
    dtype = getattr(torch, dtype_name)
    page = HEADS * BLOCK_SIZE * 2 * HEAD_DIM * dtype.itemsize
    export = KVCacheExport()
    # A freed 64 MiB segment, then 2 MiB of it taken: the cache lands inside a cudaMalloc
    # allocation at an offset, as it can in vLLM, so the offset must travel with the handle.
    spare = torch.empty(64 << 20, dtype=torch.int8, device="cuda:0")
    del spare
    keep = torch.empty(2 << 20, dtype=torch.int8, device="cuda:0")  # noqa: F841
    with export.allocation():
        torch.zeros(4096, device="cuda:0")  # not int8: not the cache
        buf = torch.zeros(LAYERS * BLOCKS * page, dtype=torch.int8, device="cuda:0")
    views = [buf.view(LAYERS, BLOCKS * page)[i].view(dtype).view(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
             for i in range(LAYERS)]
    conn.send(export.describe({f"layers.{i}": v for i, v in enumerate(views)}))
    while True:
        msg = conn.recv()
        if msg[0] == "fill":
            gen = torch.Generator(device="cuda:0").manual_seed(msg[1])
            for v in views:
                v.copy_(torch.randn(v.shape, generator=gen, device="cuda:0").to(dtype))
            torch.cuda.synchronize()
            conn.send(True)
        elif msg[0] == "read":  # blocks msg[1] of every layer, through vLLM's views, as bytes
            torch.cuda.synchronize()
            conn.send([v[msg[1]].contiguous().view(torch.uint8).cpu().numpy().tobytes() for v in views])
        else:
            export.close()
            conn.send(True)
            return


async def check(dtype_name: str) -> list[tuple[str, bool, str]]:
    from libs.kvtransfer.align import align
    from libs.kvtransfer.base import AgentInfo, TransferMode
    from libs.kvtransfer.transports.cuda_ipc import CudaIpcTransport
    from libs.vllm_engine.kv_export import attach, layout_of

    ctx = mp.get_context("spawn")
    ends = {}
    procs = []
    for name in ("P", "D"):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(theirs, dtype_name), daemon=True)
        proc.start()
        ends[name], procs = mine, [*procs, proc]
    results: list[tuple[str, bool, str]] = []
    pool = transport = None
    try:
        info_p, info_d = ends["P"].recv(), ends["D"].recv()
        results.append((f"export {dtype_name}", info_d["cuda_ipc_offset"] > 0 and len(info_d["cuda_ipc_handle"]) == 64,
                        f"offset {info_d['cuda_ipc_offset']}, handle {len(info_d['cuda_ipc_handle'])} bytes"))
        torch.cuda.set_device(0)
        pool = attach(info_p)
        transport = CudaIpcTransport(pool, "P")
        fields = transport.info_fields()
        results.append((f"re-export {dtype_name}", fields["cuda_ipc_handle"] == info_p["cuda_ipc_handle"]
                        and fields["cuda_ipc_offset"] == info_p["cuda_ipc_offset"], "the node advertises the worker's handle"))
        peer = AgentInfo(node_id="D", host_id="h", device="cuda:0", layout=layout_of(info_d), num_blocks=BLOCKS,
                         cuda_ipc_handle=info_d["cuda_ipc_handle"], cuda_ipc_offset=info_d["cuda_ipc_offset"])
        for seed, mode in enumerate(TransferMode):
            name = f"P node -> D worker {dtype_name} {mode.value}"
            try:
                ends["P"].send(("fill", seed))
                ends["P"].recv()
                # what the P node sees through its mapping equals what the P worker wrote
                ends["P"].send(("read", SRC))
                want = ends["P"].recv()
                mapped = [pool.tensor[layer, SRC].contiguous().view(torch.uint8).cpu().numpy().tobytes()
                          for layer in range(LAYERS)]
                ops = align(SRC, DST)
                await transport.send(name, peer, ops, mode)
                ends["D"].send(("read", DST))
                got = ends["D"].recv()
                ok = got == want and mapped == want
                results.append((name, ok, f"{len(ops)} ops" if ok else
                                f"bytes differ (mapping {'ok' if mapped == want else 'wrong'})"))
            except Exception as exc:
                results.append((name, False, f"{type(exc).__name__}: {exc}"))
                traceback.print_exc()
    except Exception as exc:
        results.append((f"setup {dtype_name}", False, f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
    finally:
        if transport is not None:
            await transport.close()
        if pool is not None:
            pool.close()
        for end in ends.values():
            try:
                end.send(("stop",))
                end.recv()
            except Exception:
                pass
        for proc in procs:
            proc.join(timeout=30)
    return results


async def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    failed = False
    for dtype_name in ("bfloat16", "float32"):
        for name, ok, detail in await check(dtype_name):
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
            failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

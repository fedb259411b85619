"""GPU correctness check of the KV transports between two real processes.

Cases: ``cuda_ipc`` on one GPU (cuda:0 -> cuda:0), ``cuda_ipc`` across GPUs
(cuda:0 -> cuda:1), ``nccl`` across GPUs (D given another host id, as between hosts);
each in merged, layer-wise and block-wise mode, on fragmented block ids, bf16 and fp32.
Prints one PASS/FAIL line per case and exits non-zero on any failure.

    NCCL_NVLS_ENABLE=0 python benchmarks/gpu/kvtransfer_check.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgspec  # noqa: E402
import torch  # noqa: E402

from libs.kvtransfer.agent import KVAgent  # noqa: E402
from libs.kvtransfer.align import align  # noqa: E402
from libs.kvtransfer.base import TransferMode  # noqa: E402
from libs.kvtransfer.layout import KVLayout  # noqa: E402
from libs.kvtransfer.peer import PeerProcess  # noqa: E402
from libs.kvtransfer.pool import KVPool  # noqa: E402

NUM_BLOCKS = 96
SRC = [5, 6, 7, 8, 20, 21, 40, 41, 42, 43, 44, 60]
DST = [70, 71, 10, 11, 12, 13, 14, 15, 30, 31, 50, 90]


async def check(transport: str, d_dev: str, dtype: str) -> list[tuple[str, bool, str]]:
    layout = KVLayout(dtype, num_layers=4, block_size=16, num_kv_heads=2, head_dim=64)
    torch.cuda.set_device(0)
    pool = KVPool.allocate(layout, NUM_BLOCKS, device="cuda:0")
    pool.tensor.copy_(torch.randn(pool.tensor.shape, device="cuda:0").to(pool.tensor.dtype))
    torch.cuda.synchronize()
    d_host = "other-host" if transport == "nccl" else None
    proc = PeerProcess(msgspec.json.encode(layout), NUM_BLOCKS, d_dev, host_id=d_host, force=transport)
    agent = KVAgent(pool, "P", rendezvous=proc.rendezvous, force_transport=transport)
    results = []
    try:
        await agent.start()
        peer = await proc.info()
        me = msgspec.msgpack.encode(agent.info())
        want = pool.tensor[SRC].contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
        for mode in TransferMode:
            name = f"{transport} cuda:0->{d_dev} {dtype} {mode.value}"
            try:
                tid = f"{name}"
                r = await proc.call(op="expect", tid=tid, peer=me, dst=DST, src=SRC, mode=mode.value, timeout=60.0)
                assert r["ok"], r
                stats = await asyncio.wait_for(agent.send(tid, peer, SRC, DST, mode=mode, timeout=60.0), 90)
                r = await proc.call(op="await", tid=tid, complete=agent.transports[transport].one_sided)
                assert r["ok"], r
                got = (await proc.call(op="read", ids=DST))["data"]
                ok = got == want
                detail = f"calls={stats.calls} segments={stats.segments} ({len(align(SRC, DST))} ops) bytes={stats.bytes}"
                results.append((name, ok, detail if ok else "bytes differ; " + detail))
            except Exception as exc:
                results.append((name, False, f"{type(exc).__name__}: {exc}"))
                traceback.print_exc()
            # fresh random data per mode: a mode that moved nothing cannot pass on stale bytes
            pool.tensor.copy_(torch.randn(pool.tensor.shape, device="cuda:0").to(pool.tensor.dtype))
            torch.cuda.synchronize()
            want = pool.tensor[SRC].contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
    except Exception as exc:
        results.append((f"{transport} cuda:0->{d_dev} {dtype} setup", False, f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
    finally:
        await agent.close()
        await proc.stop()
    return results


async def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    cases = [("cuda_ipc", "cuda:0", "bfloat16")]
    if torch.cuda.device_count() >= 2:
        cases += [("cuda_ipc", "cuda:1", "bfloat16"), ("cuda_ipc", "cuda:1", "float32"),
                  ("nccl", "cuda:1", "bfloat16"), ("nccl", "cuda:1", "float32")]
    else:
        print("FAIL only one GPU: the two-GPU cases did not run")
    failed = torch.cuda.device_count() < 2
    for transport, d_dev, dtype in cases:
        for name, ok, detail in await check(transport, d_dev, dtype):
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
            failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

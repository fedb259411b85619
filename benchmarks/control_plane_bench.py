"""Control-plane overhead: gateway arrival -> first token, minus the engine's own prefill.

What it shows: the time FlowKV's control plane adds to a request's first token on
loopback (HTTP parsing, placement by the scheduler over NATS, the submit and its ack,
the node's event loop and its engine thread, the token's trip back over NATS, the
gateway's stream router), with the model's compute taken out. The gateway measures it
per request as ``ttft_s - prefill_s``, where ``prefill_s`` is the engine's time from the
start of the step that first scheduled the prompt to the first token sampled
(``TokenChunk.prefill_s``), and returns it with ``flowkv_timing: true``.

Run (one line each):

1. start a nats-server (ours, so the baseline below uses the same server);
2. for each shape, disaggregated (1 prefill + 1 decode) then colocated (1 hybrid node):
   ``flowkv up --model tiny --nats-url ...`` as a subprocess, wait for /ready, send
   ``--warmup`` requests, then ``--requests`` sequential short requests (``--prompt-len``
   random ids, ``max_tokens=2``, ``ignore_eos``), collect the gateway's timings, stop it;
3. the NATS baseline: a tight loop of request/reply with a 2,000-token msgpack payload on
   the same server (responder in this process);
4. print p50/p90/p99 of control_plane_s, ttft_s and prefill_s per shape; ``--out-json``.

    .venv/bin/python benchmarks/control_plane_bench.py --requests 200 --out-json /tmp/cp.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.cli.launch import start_cluster, stop_cluster  # noqa: E402
from services.common.natsserver import NatsServer, free_port  # noqa: E402

SHAPES = {"disaggregated": [], "colocated": ["--colocated", "1"]}


def pct(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1000.0
    return {"p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
            "p99_ms": float(np.percentile(arr, 99)), "mean_ms": float(arr.mean())}


def launch(nats_url: str, port: int, extra: list[str], model: str) -> subprocess.Popen[bytes]:
    up_args = ["--model", model, "--nats-url", nats_url, "--log-level", "warning", *extra]
    return start_cluster(up_args, port=port, num_nodes=1 if extra else 2, env={"OMP_NUM_THREADS": "1"})


async def sequential(url: str, model: str, n: int, prompt_len: int, seed: int) -> list[dict[str, Any]]:
    """``n`` requests one after the other; returns each one's gateway timings and client latency."""
    rng = np.random.default_rng(seed)
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            body = {"model": model, "prompt": rng.integers(1000, 30000, size=prompt_len).tolist(), "max_tokens": 2,
                    "ignore_eos": True, "temperature": 0.0, "flowkv_timing": True}
            t0 = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as resp:
                doc = await resp.json()
            if resp.status != 200:
                raise SystemExit(f"request failed: {resp.status} {doc}")
            timing = dict(doc["flowkv"])
            timing["client_e2e_s"] = time.perf_counter() - t0
            out.append(timing)
    return out


async def nats_baseline(nats_url: str, n: int, num_tokens: int = 2000) -> dict[str, float]:
    """Request/reply round trips with a ``num_tokens``-id msgpack payload, one at a time."""
    payload = msgspec.msgpack.encode({"prompt_token_ids": list(range(20000, 20000 + num_tokens))})
    server_nc, client_nc = await nats.connect(nats_url), await nats.connect(nats_url)

    async def echo(msg) -> None:  # type: ignore[no-untyped-def]
        await msg.respond(b"ok")

    await server_nc.subscribe("bench.echo", cb=echo)
    await server_nc.flush()
    for _ in range(50):
        await client_nc.request("bench.echo", payload, timeout=5)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client_nc.request("bench.echo", payload, timeout=5)
        times.append(time.perf_counter() - t0)
    await client_nc.drain()
    await server_nc.drain()
    return {"payload_bytes": len(payload), "n": n, **pct(times)}


def run_shape(name: str, nats_url: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = launch(nats_url, port, SHAPES[name], args.model)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(sequential(url, args.model, args.warmup, args.prompt_len, seed=1))
        rows = asyncio.run(sequential(url, args.model, args.requests, args.prompt_len, seed=2))
    finally:
        stop_cluster(proc)
    return {
        "control_plane": pct([r["control_plane_s"] for r in rows]),
        "ttft": pct([r["ttft_s"] for r in rows]),
        "prefill": pct([r["prefill_s"] for r in rows]),
        "client_e2e": pct([r["client_e2e_s"] for r in rows]),
        "requests": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--nats-requests", type=int, default=2000)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out-json", default="")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "args": vars(args), "shapes": {},
    }
    with NatsServer() as server:
        for name in args.shapes:
            result["shapes"][name] = run_shape(name, server.url, args)
        result["nats_request_reply"] = asyncio.run(nats_baseline(server.url, args.nats_requests))
    print(f"control-plane overhead (gateway arrival -> first token - engine prefill), {args.requests} sequential "
          f"requests, {args.prompt_len}-token prompts, max_tokens 2, model {args.model}")
    print(f"{'shape':<15}{'metric':<15}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for name, shape in result["shapes"].items():
        for metric in ("control_plane", "ttft", "prefill", "client_e2e"):
            s = shape[metric]
            print(f"{name:<15}{metric:<15}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['mean_ms']:>9.2f}")
    b = result["nats_request_reply"]
    print(f"NATS request/reply, {b['payload_bytes']}-byte payload (2,000 token ids), {b['n']} sequential: "
          f"p50 {b['p50_ms']:.3f} ms, p90 {b['p90_ms']:.3f} ms, p99 {b['p99_ms']:.3f} ms, mean {b['mean_ms']:.3f} ms")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

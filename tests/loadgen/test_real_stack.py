"""`flowkv bench --launch` against the real stack: `flowkv up` (NATS, scheduler, gateway,
a prefill and a decode node, tiny preset) as subprocesses, 5 requests, all served exactly."""

from __future__ import annotations

import json
import socket

from services.cli import main as cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_launches_a_cluster_and_every_request_succeeds(tmp_path, capsys) -> None:
    out = tmp_path / "run.json"
    argv = ["bench", "--launch", "--launch-args", "--model tiny --log-level warning", "--base-url",
            f"http://127.0.0.1:{free_port()}", "--model", "tiny", "--workload", "fixed", "--num-requests", "5",
            "--input-len", "24", "--output-len", "4", "--request-rate", "20", "--server-timing", "--no-progress",
            "--out-json", str(out), "--launch-timeout", "240"]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    reqs = doc["requests"]
    assert [(r["status"], r["error"], r["prompt_tokens"], r["output_tokens"]) for r in reqs] == [(200, "", 24, 4)] * 5
    assert all(0 < r["ttft"] <= r["e2e"] for r in reqs)
    # The engine's prefill time came back with the first token, through P's chunk and the gateway.
    assert all(r["server_timing"]["prefill_s"] > 0 for r in reqs)
    assert all(r["server_timing"]["control_plane_s"] is not None for r in reqs)

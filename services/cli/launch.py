"""Start ``flowkv up`` as a child process and wait until it serves.

Used by ``flowkv bench --launch`` and by the benchmarks that compare clusters, so every
one of them starts, waits for and stops a cluster the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from services.cli import up
from services.cli.up import is_ready

ROOT = Path(__file__).resolve().parents[2]


def num_nodes_of(up_args: list[str]) -> int:
    """How many nodes ``flowkv up *up_args`` starts (flags and ``FLOWKV_UP_*`` as up reads them)."""
    parser = argparse.ArgumentParser(add_help=False)
    up.add_arguments(parser)
    known, _ = parser.parse_known_args(up_args)
    return up.build_config(known).num_nodes


def start_cluster(
    up_args: list[str],
    *,
    port: int,
    num_nodes: int | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    output: int | IO[bytes] | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Run ``flowkv up --port PORT *up_args`` and return once /ready lists ``num_nodes`` nodes.

    Args:
        up_args: further ``flowkv up`` flags.
        port: the gateway's port.
        num_nodes: nodes the cluster must report before it counts as ready (default: all
            that ``up_args`` start; a cluster with only some of them can answer 429).
        timeout: seconds to wait; the cluster is stopped and SystemExit raised after.
        env: extra environment for the cluster's processes.
        output: where the cluster's output goes (default: discarded).
    """
    if num_nodes is None:
        num_nodes = num_nodes_of(up_args)
    cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(port), *up_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=output, stderr=output)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"`flowkv up {' '.join(up_args)}` exited with {proc.returncode}")
        if is_ready(f"http://127.0.0.1:{port}/ready", num_nodes):
            return proc
        time.sleep(0.5)
    stop_cluster(proc)
    raise SystemExit(f"the cluster was not ready within {timeout:.0f}s")


def stop_cluster(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Stop a cluster the way Ctrl-C does (in order), killing it if that takes too long."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

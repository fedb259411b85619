"""A real FlowKV cluster for the observability tests: nats-server, the scheduler, a prefill
and a decode node (tiny model) and the gateway, each its own process, every one writing
its spans to one JSON-lines file (``OTEL_TRACES_EXPORTER=file``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.common.natsserver import free_port

ROOT = Path(__file__).resolve().parents[2]
NUM_BLOCKS = 64
BLOCK_SIZE = 16
NODES = {"p0": "prefill", "d0": "decode"}


@dataclass
class Cluster:
    nats_url: str
    trace_file: Path
    log_dir: Path
    gateway_port: int = field(default_factory=free_port)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OTEL_TRACES_EXPORTER="file", FLOWKV_TRACE_FILE=str(self.trace_file), FLOWKV_NATS_URL=self.nats_url,
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("OTEL_SERVICE_NAME", None)
        return env

    def _spawn(self, name: str, module: str, *args: str) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        self.procs[name] = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=self._env(),
                                            stdout=log, stderr=subprocess.STDOUT)

    def start(self, timeout: float = 120.0) -> None:
        self.metrics_ports = {name: free_port() for name in ("scheduler", *NODES)}
        self._spawn("scheduler", "services.scheduler", "--metrics-port", str(self.metrics_ports["scheduler"]),
                    "--log-level", "warning")
        for node_id, role in NODES.items():
            self._spawn(node_id, "services.node", "--node-id", node_id, "--role", role, "--model", "tiny",
                        "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE), "--report-interval-s", "0.1",
                        "--metrics-port", str(self.metrics_ports[node_id]), "--log-level", "warning")
        self._spawn("gateway", "services.gateway", "--port", str(self.gateway_port), "--model", "tiny",
                    "--log-level", "warning")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            try:
                body = json.loads(http_get(self.url + "/ready"))
                if sorted(body.get("nodes", [])) == sorted(NODES):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the cluster did not become ready:\n" + "\n".join(self.log(n) for n in self.procs))

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for name in ("gateway", *NODES, "scheduler"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def metrics_url(self, name: str) -> str:
        if name == "gateway":
            return self.url + "/metrics"
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def scrape(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of one service's ``/metrics``: {(name, sorted labels): value}."""
        out = {}
        for family in text_string_to_metric_families(http_get(self.metrics_url(name)).decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def complete(self, prompt: list[int], max_tokens: int, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """A non-streamed ``/v1/completions`` of token ids (greedy, ``ignore_eos``)."""
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def spans(self) -> list[dict[str, Any]]:
        if not self.trace_file.exists():
            return []
        return [json.loads(line) for line in self.trace_file.read_text().splitlines() if line.strip()]


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def sample(metrics: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled counter appears on first use)."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is truthy; returns its last value (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def prompt_of(k: int, length: int = 40) -> list[int]:
    """A prompt of ``length`` token ids unique to ``k`` (no prefix shared between two k)."""
    return [(1000 + 7919 * k + 31 * i) % 40000 + 100 for i in range(length)]

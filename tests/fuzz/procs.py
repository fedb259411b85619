"""Real FlowKV processes for the fuzz, garbage and netns tests: nats-server, scheduler,
gateway and nodes, each a child process with its log in a file.

``prefix`` runs a child under another command (``["ip", "netns", "exec", "ns1"]``), so the
same helper starts a cluster spread over network namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.common.natsserver import find_binary

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    """Children started in order and stopped in reverse (SIGTERM, then SIGKILL)."""

    log_dir: Path
    nats_url: str = ""
    children: dict[str, Child] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        out = open(log_path, "ab")
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
        proc = subprocess.Popen([*(prefix or []), *argv], env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        out.close()
        child = Child(name, proc, log_path)
        self.children[name] = child
        return child

    def start_nats(self, host: str, port: int, prefix: list[str] | None = None) -> Child:
        conf = self.log_dir / "nats.conf"
        conf.write_text(f"listen: {host}:{port}\nmax_payload: 8MB\n")
        self.nats_url = f"nats://{host}:{port}"
        return self.spawn("nats", [find_binary(), "-c", str(conf)], prefix=prefix)

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"FLOWKV_NATS_URL": self.nats_url, **(extra or {})}

    def start_scheduler(self, *args: str, prefix: list[str] | None = None) -> Child:
        argv = [sys.executable, "-m", "services.scheduler", "--log-level", "warning", *args]
        return self.spawn("scheduler", argv, self._env(None), prefix)

    def start_gateway(self, port: int, *args: str, host: str = "127.0.0.1", prefix: list[str] | None = None,
                      name: str = "gateway") -> Child:
        argv = [sys.executable, "-m", "services.gateway", "--host", host, "--port", str(port), "--model", "tiny",
                "--log-level", "warning", *args]
        return self.spawn(name, argv, self._env(None), prefix)

    def start_node(self, node_id: str, role: str, *args: str, prefix: list[str] | None = None) -> Child:
        argv = [sys.executable, "-m", "services.node", "--node-id", node_id, "--role", role, "--model", "tiny",
                "--device", "cpu", "--block-size", "4", "--num-blocks", "256", "--log-level", "warning", *args]
        return self.spawn(node_id, argv, self._env({"FLOWKV_NODE_REPORT_INTERVAL_S": "0.1"}), prefix)

    def dead(self) -> list[str]:
        return [name for name, c in self.children.items() if not c.alive()]

    def wait_ready(self, base_url: str, node_ids: set[str], timeout: float = 180.0) -> None:
        """Wait until the gateway's /ready lists every node in ``node_ids``; raise with logs if a child dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.dead():
                raise RuntimeError(f"children died: {self.dead()}\n{self.tails()}")
            try:
                with urllib.request.urlopen(base_url + "/ready", timeout=2) as resp:
                    if node_ids <= set(json.loads(resp.read()).get("nodes", [])):
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{base_url} not ready with {sorted(node_ids)} after {timeout}s\n{self.tails()}")

    def tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {n}\n" + "\n".join(c.log().splitlines()[-lines:]) for n, c in self.children.items())

    def stop(self, timeout: float = 10.0) -> None:
        for child in reversed(list(self.children.values())):
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()


def scrape(url: str, name: str, labels: str = "") -> float:
    """Sum of the samples of metric ``name`` on a Prometheus ``/metrics`` page whose labels
    contain ``labels`` (e.g. ``transport="tcp"``); 0 if there is none."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        metric, _, rest = line.partition("{") if "{" in line.split(" ")[0] else (line.split(" ")[0], "", line)
        if metric == name and labels in rest.rsplit("}", 1)[0]:
            total += float(line.rsplit(" ", 1)[1])
    return total

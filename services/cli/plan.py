"""What ``flowkv up`` starts: one :class:`ChildSpec` per process, in start order.

Kept apart from the process handling so the command lines and environments can be
checked without starting anything.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli.supervisor import child_env
from services.common.natsserver import find_binary, free_port, port_is_free, wait_for_port

if TYPE_CHECKING:
    from services.cli.up import UpConfig

# Stop order is the reverse: gateway first, NATS last.
STAGE_NATS, STAGE_SCHEDULER, STAGE_NODES, STAGE_GATEWAY = range(4)


@dataclass
class ChildSpec:
    """One process to start: its name (log prefix), command line, environment and stage."""

    name: str
    argv: list[str]
    env: dict[str, str]
    stage: int
    before_start: Callable[[], None] | None = None
    after_start: Callable[[], None] | None = None


@dataclass
class ClusterPlan:
    children: list[ChildSpec]
    nats_url: str
    files: list[Path] = field(default_factory=list)  # removed by cleanup()
    metrics_urls: dict[str, str] = field(default_factory=dict)  # child name -> its /metrics URL

    def cleanup(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)

    def child(self, name: str) -> ChildSpec:
        return next(c for c in self.children if c.name == name)


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def _nats_conf(host: str, port: int, token: str) -> Path:
    """A 0600 nats-server config file: the token lives here, not on a command line."""
    fd, path = tempfile.mkstemp(prefix="flowkv-up-nats-", suffix=".conf")
    with os.fdopen(fd, "w") as f:
        f.write(f"listen: {host}:{port}\nmax_payload: 8MB\n")
        if token:
            escaped = token.replace("\\", "\\\\").replace('"', '\\"')
            f.write(f'authorization {{ token: "{escaped}" }}\n')
    os.chmod(path, 0o600)
    return Path(path)


def node_devices(device: str, num_nodes: int) -> list[str]:
    """The device of each node: ``cuda`` spreads the nodes round-robin over the visible GPUs."""
    if device != "cuda":
        return [device] * num_nodes
    import torch  # only here: importing torch costs seconds

    count = torch.cuda.device_count()
    if count == 0:
        raise SystemExit("flowkv up: --device cuda but no GPU is visible")
    return [f"cuda:{i % count}" for i in range(num_nodes)]


def node_roles(cfg: UpConfig) -> list[tuple[str, str]]:
    """``(node_id, role)`` of every node, prefill nodes first."""
    if cfg.colocated:
        return [(f"hybrid-{i}", "hybrid") for i in range(cfg.colocated)]
    return [(f"prefill-{i}", "prefill") for i in range(cfg.prefill_nodes)] + [
        (f"decode-{i}", "decode") for i in range(cfg.decode_nodes)
    ]


def plan_cluster(cfg: UpConfig, base_env: dict[str, str] | None = None) -> ClusterPlan:
    """Every child of ``flowkv up`` for ``cfg``, in start order.

    Args:
        cfg: the validated ``flowkv up`` configuration.
        base_env: environment the children inherit (default: this process's).

    Returns:
        The plan; call ``cleanup()`` once the children are gone.
    """
    base = dict(os.environ if base_env is None else base_env)
    children: list[ChildSpec] = []
    files: list[Path] = []
    if cfg.nats_url:
        nats_url = cfg.nats_url
    else:
        host, port = "127.0.0.1", cfg.nats_port or free_port()
        conf = _nats_conf(host, port, cfg.nats_token)
        files.append(conf)
        nats_url = f"nats://{host}:{port}"
        children.append(
            ChildSpec("nats", [find_binary(), "-c", str(conf)], child_env(base), STAGE_NATS,
                      after_start=lambda: wait_for_port(host, port, 10.0))
        )
    shared = {"FLOWKV_NATS_URL": nats_url}
    if cfg.nats_token:
        shared["FLOWKV_NATS_TOKEN"] = cfg.nats_token
    common = ["--log-level", cfg.log_level]

    metrics_port = iter(range(cfg.first_metrics_port, cfg.first_metrics_port + 1 + cfg.num_nodes))
    metrics_urls: dict[str, str] = {}

    def metrics_args(name: str) -> list[str]:
        port = next(metrics_port)
        if not cfg.metrics_port and not port_is_free(port, "0.0.0.0"):
            # Derived from the gateway's port, not asked for: another process may hold it
            # (a node that cannot bind its /metrics port, on 0.0.0.0, dies at start). Take a free one.
            port = free_port("0.0.0.0")
        metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        return ["--metrics-port", str(port)]

    sched_args = [*common, *metrics_args("scheduler"), *(["--policy", cfg.policy] if cfg.policy else [])]
    children.append(ChildSpec("scheduler", _module("services.scheduler", *sched_args), child_env(base, **shared), STAGE_SCHEDULER))

    roles = node_roles(cfg)
    devices = node_devices(cfg.device, len(roles))
    node_env = dict(shared)
    if "OMP_NUM_THREADS" not in base and cfg.device == "cpu":
        # Nodes on one CPU share its cores; more threads than cores each only thrash.
        node_env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // len(roles)))
    for (node_id, role), device in zip(roles, devices):
        argv = ["--node-id", node_id, "--role", role, "--model", cfg.model, "--device", device, *common,
                *metrics_args(node_id)]
        if cfg.dtype:
            argv += ["--dtype", cfg.dtype]
        children.append(ChildSpec(node_id, _module("services.node", *argv), child_env(base, **node_env), STAGE_NODES))

    gw_env = dict(shared)
    if cfg.api_key:
        gw_env["FLOWKV_GATEWAY_API_KEYS"] = cfg.api_key
    gw_args = ["--host", cfg.host, "--port", str(cfg.port), "--model", cfg.model, *common]
    children.append(ChildSpec("gateway", _module("services.gateway", *gw_args), child_env(base, **gw_env), STAGE_GATEWAY))
    return ClusterPlan(children, nats_url, files, metrics_urls)

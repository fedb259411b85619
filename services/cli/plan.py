"""What ``flowkv up`` starts: one :class:`ChildSpec` per process, in start order.

Kept apart from the process handling so the command lines and environments can be
checked without starting anything.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli.supervisor import child_env
from services.common.natsserver import (ephemeral_low, find_binary, free_port, listen_port, port_is_free, server_conf,
                                        wait_for_port)

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
    dirs: list[Path] = field(default_factory=list)  # removed by cleanup() (JetStream stores)

    def cleanup(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)

    def child(self, name: str) -> ChildSpec:
        return next(c for c in self.children if c.name == name)


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def _nats_conf(host: str, port: int, token: str, store_dir: Path, name: str = "", cluster_port: int = 0,
               routes: list[str] | None = None) -> Path:
    """A 0600 nats-server config file (JetStream on, in ``store_dir``; with ``cluster_port``,
    one server of a routed cluster): the token lives here, not on a command line."""
    fd, path = tempfile.mkstemp(prefix="flowkv-up-nats-", suffix=".conf")
    with os.fdopen(fd, "w") as f:
        f.write(server_conf(host, port, token, store_dir=str(store_dir), name=name, cluster_port=cluster_port,
                            routes=routes))
    os.chmod(path, 0o600)
    return Path(path)


def _nats_children(cfg: UpConfig, base: dict[str, str], files: list[Path], dirs: list[Path]) -> tuple[list[ChildSpec], str]:
    """The embedded broker: one nats-server, or ``nats_cluster`` routed ones; and the URL
    list every service is given (a client reconnects to any server of it)."""
    host, size = "127.0.0.1", max(1, cfg.nats_cluster)
    ports = [cfg.nats_port or free_port()] if size == 1 else [(cfg.nats_port + i if cfg.nats_port else free_port()) for i in range(size)]
    cluster_ports = [free_port() for _ in range(size)] if size > 1 else [0]
    routes = [f"nats-route://{host}:{p}" for p in cluster_ports] if size > 1 else None
    children = []
    for i, (port, cport) in enumerate(zip(ports, cluster_ports)):
        store = Path(tempfile.mkdtemp(prefix="flowkv-up-js-"))
        dirs.append(store)
        name = "nats" if size == 1 else f"nats-{i}"
        conf = _nats_conf(host, port, cfg.nats_token, store, name if size > 1 else "", cport, routes)
        files.append(conf)
        children.append(ChildSpec(name, [find_binary(), "-c", str(conf)], child_env(base), STAGE_NATS,
                                  after_start=lambda port=port: wait_for_port(host, port, 10.0)))
    return children, ",".join(f"nats://{host}:{p}" for p in ports)


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


def vllm_core_lists(num_nodes: int) -> list[str]:
    """Each vLLM node's cores (``VLLM_CPU_OMP_THREADS_BIND``): this process's cores split evenly,
    at least one each (nodes share cores round-robin when there are more nodes than cores)."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // max(1, num_nodes))
    lists = []
    for i in range(num_nodes):
        start = (i * per) % len(cores)
        lists.append(",".join(str(c) for c in cores[start:start + per]))
    return lists


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
    dirs: list[Path] = []
    if cfg.nats_url:
        nats_url = cfg.nats_url
    else:
        nats, nats_url = _nats_children(cfg, base, files, dirs)
        children += nats
    shared = {"FLOWKV_NATS_URL": nats_url}
    if cfg.nats_token:
        shared["FLOWKV_NATS_TOKEN"] = cfg.nats_token
    common = ["--log-level", cfg.log_level]

    metrics_port = iter(range(cfg.first_metrics_port, cfg.first_metrics_port + cfg.schedulers + cfg.num_nodes))
    metrics_urls: dict[str, str] = {}
    taken: set[int] = set()
    ephemeral = ephemeral_low()

    def metrics_args(name: str) -> list[str]:
        port = next(metrics_port)
        if not cfg.metrics_port and (port >= ephemeral or port in taken or not port_is_free(port, "0.0.0.0")):
            # Derived from the gateway's port, not asked for: another process may hold it
            # (a node that cannot bind its /metrics port, on 0.0.0.0, dies at start), or, in
            # the ephemeral range, an outgoing connection may take it before the node, seconds
            # later, binds it. Take a free one below that range (not one given out already).
            port = listen_port("0.0.0.0")
            while port in taken:
                port = listen_port("0.0.0.0")
        taken.add(port)
        metrics_urls[name] = f"http://{cfg.local_host}:{port}/metrics"
        return ["--metrics-port", str(port), "--metrics-host", cfg.host]

    for i in range(cfg.schedulers):
        name = "scheduler" if cfg.schedulers == 1 else f"scheduler-{i}"
        sched_args = [*common, *metrics_args(name), *(["--policy", cfg.policy] if cfg.policy else [])]
        if cfg.schedulers > 1:
            sched_args += ["--scheduler-id", name]
        if cfg.nats_cluster > 1:  # the lease survives the loss of any one server
            sched_args += ["--lease-replicas", str(min(3, cfg.nats_cluster))]
        children.append(ChildSpec(name, _module("services.scheduler", *sched_args), child_env(base, **shared), STAGE_SCHEDULER))

    roles = node_roles(cfg)
    devices = node_devices(cfg.device, len(roles))
    node_env = dict(shared)
    if "OMP_NUM_THREADS" not in base and cfg.device == "cpu":
        # Nodes on one CPU share its cores; more threads than cores each only thrash.
        node_env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // len(roles)))
    vllm_cores = vllm_core_lists(len(roles)) if cfg.engine == "vllm" and "VLLM_CPU_OMP_THREADS_BIND" not in base else []
    for i, ((node_id, role), device) in enumerate(zip(roles, devices)):
        argv = ["--node-id", node_id, "--role", role, "--model", cfg.model, "--device", device, *common,
                *metrics_args(node_id)]
        if cfg.dtype:
            argv += ["--dtype", cfg.dtype]
        env = dict(node_env)
        if cfg.engine == "vllm":
            # vLLM's CPU attention wants blocks of a multiple of 32 tokens.
            argv += ["--engine", "vllm", "--block-size", "32"]
            if vllm_cores:
                # vLLM binds its compute threads to cores; left to itself every engine takes the same ones.
                env["VLLM_CPU_OMP_THREADS_BIND"] = vllm_cores[i]
                env["OMP_NUM_THREADS"] = str(len(vllm_cores[i].split(",")))
        children.append(ChildSpec(node_id, _module("services.node", *argv), child_env(base, **env), STAGE_NODES))

    gw_env = dict(shared)
    if cfg.api_key:
        gw_env["FLOWKV_GATEWAY_API_KEYS"] = cfg.api_key
    gw_args = ["--host", cfg.host, "--port", str(cfg.port), "--model", cfg.model, *common]
    children.append(ChildSpec("gateway", _module("services.gateway", *gw_args), child_env(base, **gw_env), STAGE_GATEWAY))
    return ClusterPlan(children, nats_url, files, metrics_urls, dirs)

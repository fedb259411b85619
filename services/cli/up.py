"""``flowkv up``: a whole FlowKV cluster on this machine, one process per service.

Life of ``flowkv up``:

1. start an embedded nats-server (unless ``--nats-url`` names one), with the token in a
   0600 config file, never on a command line;
2. start the scheduler, then the nodes (``--prefill-nodes``/``--decode-nodes``, or
   ``--colocated`` hybrid nodes), then the gateway; NATS credentials and the API key reach
   them through the environment only;
3. wait until the gateway's ``/ready`` answers 200, print the URL and a curl line;
4. stream every child's log lines with its name as prefix;
5. on SIGINT/SIGTERM stop the gateway, the nodes, the scheduler and NATS, in that order;
   if a child dies on its own, stop the rest and exit 1 naming it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from services.cli.plan import ChildSpec, plan_cluster
from services.cli.supervisor import LogSink, Supervisor
from services.common import config
from services.common.nats import redact

ENV_PREFIX = "FLOWKV_UP"

EXIT_CHILD_DIED = 1
EXIT_NOT_READY = 2


@dataclass
class UpConfig:
    """What ``flowkv up`` runs (flags ``--*``, env ``FLOWKV_UP_*``)."""

    model: str = field(default="smollm2", metadata={"help": "model every node serves (smollm2, tiny, a directory or a .gguf)"})
    engine: str = field(default="flowkv", metadata={"help": "every node's engine: flowkv or vllm (vLLM's v1 engine with FlowKV's KV connector; needs the vllm extra; CPU only)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda (nodes spread over the GPUs) or cuda:N"})
    dtype: str = field(default="", metadata={"help": "weights and KV dtype (default: the engine's for the device)"})
    host: str = field(default="127.0.0.1", metadata={"help": "gateway listen address"})
    port: int = field(default=8000, metadata={"help": "gateway HTTP port"})
    api_key: str = field(default="", metadata={"help": "require this Bearer API key (empty: no auth)", "secret": True})
    policy: str = field(default="", metadata={"help": "scheduler placement policy (default: the scheduler's)"})
    prefill_nodes: int = field(default=1, metadata={"help": "prefill nodes to run"})
    decode_nodes: int = field(default=1, metadata={"help": "decode nodes to run"})
    colocated: int = field(default=0, metadata={"help": "run K hybrid nodes instead of prefill/decode (with --policy colocated: the colocated baseline; with flowkv: the roles it starts from)"})
    schedulers: int = field(default=1, metadata={"help": "scheduler replicas (one leads, elected through the broker; the others take over within about 2 s)"})
    metrics_port: int = field(default=0, metadata={"help": "first /metrics port: the schedulers', then one per node in order (0: gateway port + 1, one taken or in the kernel's ephemeral range replaced by a free one below that range); they bind the gateway's host"})
    nats_url: str = field(default="", metadata={"help": "use this NATS server instead of starting one"})
    nats_token: str = field(default="", metadata={"help": "NATS auth token (the embedded server requires it)", "secret": True})
    nats_port: int = field(default=0, metadata={"help": "port of the embedded NATS server, the first of the cluster's (0: free ports)"})
    nats_cluster: int = field(default=0, metadata={"help": "start this many routed nats-servers (3 survives the loss of any one) instead of one"})
    ready_timeout_s: float = field(default=300.0, metadata={"help": "give up if /ready is not 200 by then"})
    stop_timeout_s: float = field(default=20.0, metadata={"help": "per stage, wait this long before SIGKILL"})
    log_level: str = field(default="info", metadata={"help": "log level of every service"})

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.engine not in ("flowkv", "vllm"):
            raise ValueError(f"engine must be flowkv or vllm, got {self.engine!r}")
        if self.engine == "vllm" and self.device != "cpu":
            raise ValueError("flowkv up runs the vllm engine on cpu only: vLLM's CUDA build has not been run with "
                             "FlowKV's KV connector yet (docs/vllm.md); `flowkv node --engine vllm` starts one node")
        if self.colocated < 0 or self.prefill_nodes < 0 or self.decode_nodes < 0:
            raise ValueError("node counts must be >= 0")
        if self.colocated == 0 and (self.prefill_nodes < 1 or self.decode_nodes < 1):
            raise ValueError("a disaggregated cluster needs at least one prefill and one decode node (or use --colocated K)")
        if not 1 <= self.schedulers <= 9:
            raise ValueError(f"schedulers must be in 1..9, got {self.schedulers}")
        if self.nats_cluster < 0 or self.nats_cluster == 2 or self.nats_cluster > 7:
            raise ValueError(f"nats_cluster must be 0 (one server), 1, or 3..7 (a cluster needs a majority to survive a loss), got {self.nats_cluster}")
        last = self.first_metrics_port + self.schedulers + self.num_nodes - 1
        if not 0 <= self.metrics_port < 65536 or last >= 65536:
            raise ValueError(f"metrics ports {self.first_metrics_port}..{last} are out of range")
        if not 0 <= self.nats_port < 65536:
            raise ValueError(f"nats_port must be in 0..65535, got {self.nats_port}")
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("ready_timeout_s and stop_timeout_s must be positive")

    @property
    def num_nodes(self) -> int:
        return self.colocated or self.prefill_nodes + self.decode_nodes

    @property
    def first_metrics_port(self) -> int:
        return self.metrics_port or self.port + 1

    @property
    def local_host(self) -> str:
        """Where this machine reaches what binds ``host``."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def local_url(self) -> str:
        return f"http://{self.local_host}:{self.port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, UpConfig, ENV_PREFIX)


def build_config(args: argparse.Namespace | None = None, **overrides: object) -> UpConfig:
    """The :class:`UpConfig` from flags, then ``FLOWKV_UP_*``, then defaults."""
    try:
        return config.build(UpConfig, ENV_PREFIX, args, **overrides)
    except ValueError as exc:
        raise SystemExit(f"flowkv up: {exc}") from None


def is_ready(url: str, num_nodes: int) -> bool:
    """True when ``url`` (the gateway's /ready) answers 200 and, if it lists nodes, lists them all."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status != 200:
                return False
            body = resp.read()
    except (urllib.error.URLError, OSError):
        return False
    try:
        nodes = json.loads(body).get("nodes")
    except (ValueError, AttributeError):
        return True
    # The gateway is ready with one live node; `flowkv up` waits for all it started.
    return not isinstance(nodes, list) or len(nodes) >= num_nodes


def wait_ready(url: str, num_nodes: int, sup: Supervisor, stop: threading.Event, timeout: float) -> bool:
    """Poll ``url`` until it is ready; False if a child dies, a signal arrives or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop.is_set() or sup.first_dead() is not None:
            return False
        if is_ready(url, num_nodes):
            return True
        stop.wait(0.5)
    return False


def banner(cfg: UpConfig, nats_url: str = "", metrics_urls: dict[str, str] | None = None) -> str:
    """What to print once the cluster serves: the URL and a curl line to try."""
    shape = f"{cfg.colocated} colocated node(s)" if cfg.colocated else f"{cfg.prefill_nodes} prefill + {cfg.decode_nodes} decode"
    auth = " -H \"Authorization: Bearer $FLOWKV_UP_API_KEY\"" if cfg.api_key else ""
    body = (
        '{"model": "%s", "messages": [{"role": "user", "content": "What is the capital of France?"}], '
        '"max_tokens": 32}' % cfg.model
    )
    return (
        f"FlowKV is ready at {cfg.local_url} (model {cfg.model} on {cfg.device}, {shape}). Ctrl-C stops it.\n"
        f"  curl {cfg.local_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
        + (f"\n  cluster view: flowkv status --nats-url {redact(nats_url)}" if nats_url else "")
        + f"\n  dashboard: {cfg.local_url}/dashboard" + ("#key=$FLOWKV_UP_API_KEY" if cfg.api_key else "")
        + f"\n  metrics: gateway {cfg.local_url}/metrics"
        + "".join(f", {name} {url}" for name, url in (metrics_urls or {}).items())
    )


def start_cluster(sup: Supervisor, specs: list[ChildSpec]) -> None:
    for spec in specs:
        if spec.before_start is not None:
            spec.before_start()
        sup.start(spec.name, spec.argv, spec.env, spec.stage)
        if spec.after_start is not None:
            spec.after_start()


def serve(cfg: UpConfig, out=sys.stdout) -> int:
    """Run the cluster until a signal or a child's death; returns the exit status."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    sink = LogSink(out)
    sup = Supervisor(sink)
    cluster = plan_cluster(cfg)
    try:
        start_cluster(sup, cluster.children)
        if not wait_ready(cfg.local_url + "/ready", cfg.num_nodes, sup, stop, cfg.ready_timeout_s):
            return _failed(sup, sink, stop, cfg)
        sink.line("flowkv", banner(cfg, cluster.nats_url, cluster.metrics_urls))
        while not stop.wait(0.25):
            dead = sup.first_dead()
            if dead is not None:
                sink.line("flowkv", f"{dead.name} exited with status {dead.returncode()}; stopping the rest")
                return EXIT_CHILD_DIED
        sink.line("flowkv", "stopping (gateway, nodes, scheduler, nats)")
        return 0
    finally:
        sup.stop_all(cfg.stop_timeout_s)
        cluster.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _failed(sup: Supervisor, sink: LogSink, stop: threading.Event, cfg: UpConfig) -> int:
    dead = sup.first_dead()
    if dead is not None:
        sink.line("flowkv", f"{dead.name} exited with status {dead.returncode()} before the cluster was ready")
        return EXIT_CHILD_DIED
    if stop.is_set():
        sink.line("flowkv", "stopped before the cluster was ready")
        return 0
    sink.line("flowkv", f"{cfg.local_url}/ready did not answer 200 within {cfg.ready_timeout_s:.0f}s")
    return EXIT_NOT_READY


def run(args: argparse.Namespace) -> int:
    return serve(build_config(args))

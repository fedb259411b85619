"""A real FlowKV cluster for failure tests: nats-server, scheduler, gateway and nodes as processes.

Every service is the real one (``python -m services.<name>``) with the ``tiny`` model on
CPU, on free loopback ports; the broker is the real ``nats-server``. The helpers kill
things for real (SIGKILL), read each node's free/total KV blocks from its latest
``LoadReport`` (through the scheduler's ``ClusterState``), and tear everything down
without leaving a process or a shared-memory segment behind.

Life of a test::

    with Cluster(tmp_path, prefill=1, decode=2) as c:   # starts all, waits for /ready
        await c.complete(...)                           # HTTP to the gateway
        c.kill_node("decode-0")                         # SIGKILL, the node's pid only
        await c.wait_no_leak()                          # every live node: free == total
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats

from libs.protocol import messages
from libs.protocol.messages import ClusterQuery, ClusterState, EventKind, LoadReport, SchedEvent
from libs.protocol.subjects import sched_cluster, sched_events
from services.common.natsserver import NatsCluster, NatsServer, free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
BLOCK_SIZE = 16
NUM_BLOCKS = 128
# Generous: a loaded 2-core machine may take tens of seconds to import torch five times.
START_TIMEOUT_S = 180.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Service:
    """One child process and its log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL of its whole session (the resource tracker included)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of its session
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@dataclass
class Cluster:
    """A whole cluster on this machine. Use as a context manager (sync), call helpers from async tests.

    Args:
        workdir: where the logs go (a pytest ``tmp_path``).
        prefill: number of prefill nodes (``prefill-0``, ...).
        decode: number of decode nodes (``decode-0``, ...).
        nats_token / nats_user / nats_password: broker credentials (given to services by env only).
        gateway_args / scheduler_args / node_args: extra flags for those services.
        node_env: extra environment of every node.
        node_env_of: extra environment of single nodes (node id -> variables), on top of
            ``node_env`` (a fault injected in one node only); read at each (re)start.
        schedulers: scheduler replicas (``scheduler``, or ``scheduler-0``, ``scheduler-1``, ...).
        nats_cluster: with 3 (or more), that many routed nats-servers instead of one
            (``kill_nats(i)`` / ``restart_nats(i)``); every service is given every URL.
    """

    workdir: Path
    prefill: int = 1
    decode: int = 1
    nats_token: str = ""
    nats_user: str = ""
    nats_password: str = ""
    api_key: str = ""
    gateway_args: list[str] = field(default_factory=list)
    scheduler_args: list[str] = field(default_factory=list)
    node_args: list[str] = field(default_factory=list)
    node_env: dict[str, str] = field(default_factory=dict)
    node_env_of: dict[str, dict[str, str]] = field(default_factory=dict)
    schedulers: int = 1
    nats_cluster: int = 0
    nats: NatsServer | NatsCluster | None = None
    services: dict[str, Service] = field(default_factory=dict)
    gateway_port: int = 0

    # ---------------------------------------------------------------- start / stop

    @property
    def node_ids(self) -> list[str]:
        return [f"prefill-{i}" for i in range(self.prefill)] + [f"decode-{i}" for i in range(self.decode)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def scheduler_names(self) -> list[str]:
        return ["scheduler"] if self.schedulers == 1 else [f"scheduler-{i}" for i in range(self.schedulers)]

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWKV_")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        assert self.nats is not None
        env["FLOWKV_NATS_URL"] = self.nats.url
        if self.nats_token:
            env["FLOWKV_NATS_TOKEN"] = self.nats_token
        if self.nats_user:
            env["FLOWKV_NATS_USER"], env["FLOWKV_NATS_PASSWORD"] = self.nats_user, self.nats_password
        return env

    def start_broker(self, port: int | None = None) -> None:
        if self.nats_cluster > 1:
            self.nats = NatsCluster(self.nats_cluster, token=self.nats_token, log_dir=str(self.workdir)).start()
            return
        self.nats = NatsServer(port=port, token=self.nats_token, user=self.nats_user, password=self.nats_password,
                               log_file=str(self.workdir / "nats.log")).start()

    def _spawn(self, name: str, module: str, args: list[str], extra_env: dict[str, str] | None = None) -> Service:
        env = self.base_env() | (extra_env or {})
        svc = Service(name, [sys.executable, "-m", module, *args], env, self.workdir / f"{name}.log").start()
        self.services[name] = svc
        return svc

    def start_node(self, node_id: str) -> Service:
        role = node_id.split("-")[0]
        args = ["--node-id", node_id, "--role", role, "--model", MODEL, "--device", "cpu",
                "--block-size", str(BLOCK_SIZE), "--num-blocks", str(NUM_BLOCKS), "--report-interval-s", "0.2",
                "--drain-timeout-s", "3", *self.node_args]
        return self._spawn(node_id, "services.node", args, self.node_env | self.node_env_of.get(node_id, {}))

    def start(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_broker()
        for name in self.scheduler_names:
            self.start_scheduler(name)
        for nid in self.node_ids:
            self.start_node(nid)
        self.gateway_port = free_port()
        gw_env = {"FLOWKV_GATEWAY_API_KEYS": self.api_key} if self.api_key else {}
        self._spawn("gateway", "services.gateway", [
            "--port", str(self.gateway_port), "--model", MODEL, "--stall-timeout-s", "4", "--max-retries", "3",
            "--submit-timeout-s", "3", "--place-timeout-s", "3", "--shutdown-timeout-s", "2", *self.gateway_args,
        ], gw_env)
        self.wait_ready(set(self.node_ids))
        return self

    def wait_ready(self, nodes: set[str], timeout: float = START_TIMEOUT_S) -> None:
        """Block until the gateway's /ready lists ``nodes`` (a dead service fails at once)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            dead = [s.name for s in self.services.values()
                    if not s.alive() and s.name in nodes | {*self.scheduler_names, "gateway"}]
            assert not dead, f"{dead} died during start:\n" + "\n".join(self.services[d].log()[-3000:] for d in dead)
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as resp:
                    if nodes <= set(json.loads(resp.read()).get("nodes", [])):
                        return
            assert time.monotonic() < deadline, f"cluster not ready after {timeout}s"
            time.sleep(0.3)

    def start_scheduler(self, name: str) -> Service:
        args = ["--node-timeout-s", "1.5", "--scheduler-id", name, *self.scheduler_args]
        if self.nats_cluster > 1:
            args += ["--lease-replicas", str(min(3, self.nats_cluster))]
        return self._spawn(name, "services.scheduler", args)

    def stop(self) -> None:
        """Stop every service (gateway, nodes, schedulers), then the broker; remove leftover shm."""
        order = ["gateway", *[n for n in self.services if n != "gateway" and not n.startswith("scheduler")],
                 *[n for n in self.services if n.startswith("scheduler")]]
        for name in order:
            if name in self.services:
                self.services[name].stop()
        if self.nats is not None:
            self.nats.stop()
        pids = {s.pid for s in self.services.values() if s.proc is not None}
        for seg in Path("/dev/shm").glob("flowkv-*"):  # pools of SIGKILLed nodes
            with contextlib.suppress(ValueError, IndexError, OSError):
                if int(seg.name.split("-")[1]) in pids:
                    seg.unlink()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ failures

    def kill_node(self, node_id: str) -> None:
        """SIGKILL one node process (only its pid: its resource tracker then frees its shm)."""
        svc = self.services[node_id]
        assert svc.proc is not None
        svc.proc.kill()
        svc.proc.wait(10)

    def kill_service(self, name: str) -> None:
        """SIGKILL one service process (a scheduler replica, say)."""
        svc = self.services[name]
        assert svc.proc is not None
        svc.proc.kill()
        svc.proc.wait(10)

    def kill_nats(self, i: int) -> None:
        """SIGKILL server ``i`` of the NATS cluster."""
        assert isinstance(self.nats, NatsCluster)
        self.nats.servers[i].kill()

    def restart_nats(self, i: int) -> None:
        """Start server ``i`` of the NATS cluster again, on its ports."""
        assert isinstance(self.nats, NatsCluster)
        self.nats.restart(i)

    def nats_healthy(self) -> bool:
        """Whether every running server of the NATS cluster answers ``/healthz`` ok: with
        JetStream, each holds current replicas of every stream it serves. An operator
        restarting one server of three waits for this before touching the next: a second
        server lost while the first still catches up leaves a bucket without a quorum."""
        assert isinstance(self.nats, NatsCluster)
        return all(server.healthy() for server in self.nats.servers if server.proc is not None)

    async def leader(self) -> str:
        """The id of the scheduler replica that answers (the leader)."""
        return (await self.cluster_state(brief=True)).leader

    def kill_broker(self) -> int:
        """SIGKILL nats-server; returns its port (to restart it on the same one)."""
        assert isinstance(self.nats, NatsServer)
        port = self.nats.port
        self.nats.kill()
        self.nats.stop()  # removes its config file
        return port

    # ------------------------------------------------------------------ reading

    async def nats_connect(self) -> Any:
        assert self.nats is not None
        opts: dict[str, Any] = dict(servers=self.nats.url.split(","), connect_timeout=2, max_reconnect_attempts=0,
                                    allow_reconnect=False)
        if self.nats_token:
            opts["token"] = self.nats_token
        if self.nats_user:
            opts["user"], opts["password"] = self.nats_user, self.nats_password
        return await nats.connect(**opts)

    async def watch_node_downs(self) -> tuple[Any, list[SchedEvent]]:
        """A connection subscribed to the scheduler's events, and the list the NODE_DOWNs it
        receives from now on are appended to (the caller closes the connection)."""
        nc = await self.nats_connect()
        downs: list[SchedEvent] = []

        async def on_event(msg: Any) -> None:
            ev = messages.decode(msg.data)
            if isinstance(ev, SchedEvent) and ev.kind is EventKind.NODE_DOWN:
                downs.append(ev)

        await nc.subscribe(sched_events(), cb=on_event)
        await nc.flush()
        return nc, downs

    async def cluster_state(self, brief: bool = False) -> ClusterState:
        nc = await self.nats_connect()
        try:
            reply = await nc.request(sched_cluster(), messages.encode(ClusterQuery(brief=brief)), timeout=3)
        finally:
            await nc.close()
        state = messages.decode(reply.data)
        assert isinstance(state, ClusterState)
        return state

    async def reports(self) -> dict[str, LoadReport]:
        return {r.node_id: r for r in (await self.cluster_state()).nodes}

    async def wait_no_leak(self, nodes: list[str] | None = None, timeout: float = 60.0) -> dict[str, tuple[int, int]]:
        """Poll until each live node (or each of ``nodes``) reports free == total blocks, idle.

        Returns:
            ``{node_id: (free_blocks, total_blocks)}`` as last seen.
        """
        want = nodes if nodes is not None else [n for n in self.node_ids if self.services[n].alive()]
        seen: dict[str, tuple[int, int]] = {}

        async def clean() -> bool:
            reports = await self.reports()
            for n in want:
                r = reports.get(n)
                if r is None:
                    return False
                seen[n] = (r.free_blocks, r.total_blocks)
                if r.free_blocks != r.total_blocks or r.num_running or r.num_waiting or r.num_held:
                    return False
            return True

        await poll(clean, timeout, lambda: f"blocks not all free: {seen}")
        return seen

    # ---------------------------------------------------------------------- HTTP

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def complete(self, session: aiohttp.ClientSession, body: dict[str, Any],
                       timeout: float = 120.0) -> tuple[int, dict[str, Any], dict[str, str]]:
        """POST /v1/completions (not streamed); returns (status, json body, headers)."""
        async with session.post(self.url + "/v1/completions", json={"model": MODEL, **body}, headers=self.headers(),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.json(content_type=None), dict(resp.headers)

    async def stream(self, session: aiohttp.ClientSession, body: dict[str, Any],
                     on_event: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                     timeout: float = 120.0) -> tuple[int, list[dict[str, Any]]]:
        """POST a streamed /v1/completions; returns (status, SSE events); ``on_event`` sees each one."""
        events: list[dict[str, Any]] = []
        async with session.post(self.url + "/v1/completions", json={"model": MODEL, **body, "stream": True},
                                headers=self.headers(), timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return resp.status, [await resp.json(content_type=None)]
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[5:])
                events.append(ev)
                if on_event is not None:
                    await on_event(ev)
        return 200, events


async def poll(cond: Callable[[], Awaitable[bool]], timeout: float, what: Callable[[], str] | str = "condition") -> float:
    """Await ``cond()`` until true; returns the seconds it took. Transient errors count as false.

    The deadline only bounds a hung test: callers assert the condition, not the time.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        with contextlib.suppress(Exception):
            if await cond():
                return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"{what() if callable(what) else what} (after {timeout}s)")
        await asyncio.sleep(0.1)


def tokens_of(events: list[dict[str, Any]]) -> list[str]:
    """The token strings of a streamed completion requested with ``logprobs: 0``."""
    out: list[str] = []
    for ev in events:
        for choice in ev.get("choices", []):
            lp = choice.get("logprobs") or {}
            out += lp.get("tokens", [])
    return out

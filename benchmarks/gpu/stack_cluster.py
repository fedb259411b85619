"""Clusters for the full-stack benchmark: ``flowkv up`` subprocesses, and a NATS tap on one.

A :class:`Cluster` is one ``flowkv up`` (embedded NATS on a free port, scheduler, nodes,
gateway) whose output is appended to the shared log. A :class:`Tap` listens on that
cluster's NATS for what the benchmark measures without touching the services:

- ``flowkv.v1.node.*.kv_alloc`` and ``...kv_done``: P asks D for blocks once its prefill
  is done, and tells D the KV has landed (with the transfer's own stats): the interval
  between the two is the hand-off, per request;
- ``flowkv.v1.sched.events``: the scheduler's events (role flips).

Both messages are requests that D answers; a plain subscriber gets a copy and answers
nothing, so the hand-off is not slowed beyond NATS's fan-out.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nats

from libs.protocol import messages
from libs.protocol.messages import EventKind, KVAllocRequest, KVDone, LoadReport, SchedEvent
from libs.protocol.subjects import PREFIX, node_load, sched_events
from services.cli.up import is_ready
from services.common.messaging import ask_cluster
from services.common.natsserver import listen_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_report import Handoff, NodeSample  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # flowkv up runs in its own session (a Ctrl-C reaches only us, and we stop it in order);
    # if we are killed instead, SIGTERM still reaches it and it stops its children.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Shape:
    """What one ``flowkv up`` runs: node counts, device, policy."""

    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    device: str = "cpu"
    policy: str = ""

    @property
    def num_nodes(self) -> int:
        return self.colocated or self.prefill + self.decode

    def up_args(self) -> list[str]:
        args = ["--colocated", str(self.colocated)] if self.colocated else [
            "--prefill-nodes", str(self.prefill), "--decode-nodes", str(self.decode)]
        args += ["--device", self.device]
        return args + (["--policy", self.policy] if self.policy else [])


@dataclass
class Cluster:
    """One ``flowkv up`` process and its ports; ``start()``, ``wait_ready()``, ``stop()``."""

    name: str
    shape: Shape
    model: str
    dtype: str
    env: dict[str, str]
    log: IO[str]
    port: int = field(default_factory=listen_port)
    nats_port: int = field(default_factory=listen_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "services.cli", "up", "--model", self.model, "--port", str(self.port),
               "--nats-port", str(self.nats_port), "--log-level", "warning", "--ready-timeout-s", "600",
               *self.shape.up_args()]
        return cmd + (["--dtype", self.dtype] if self.dtype else [])

    def start(self) -> None:
        self.log.write(f"\n===== {self.name}: {' '.join(self.command()[1:])}\n")
        self.log.flush()
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env={**os.environ, **self.env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: flowkv up exited with {self.proc.returncode} (see the log)")
        return is_ready(self.url + "/ready", self.shape.num_nodes)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT (flowkv up then stops its children in order), SIGKILL the group past ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_all_ready(clusters: list[Cluster], timeout: float) -> float:
    """Wait until every cluster's gateway lists all its nodes; returns the seconds it took."""
    t0 = time.monotonic()
    pending = list(clusters)
    while pending:
        pending = [c for c in pending if not c.ready()]
        if not pending:
            break
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{[c.name for c in pending]} not ready after {timeout:.0f}s")
        time.sleep(0.5)
    return time.monotonic() - t0


class Tap:
    """Copies of the hand-off messages and the scheduler's events of one cluster's NATS."""

    def __init__(self) -> None:
        self.nc: Any = None
        self._alloc: dict[str, tuple[float, int, str, str]] = {}  # transfer id -> (seen at, prompt tokens, P, D)
        self.handoffs: list[Handoff] = []
        self.samples: list[NodeSample] = []
        self.events: list[tuple[float, SchedEvent]] = []  # (perf_counter at arrival, event)

    async def start(self, nats_url: str) -> None:
        self.nc = await nats.connect(nats_url, name="stack-bench-tap")
        await self.nc.subscribe(f"{PREFIX}.node.*.kv_alloc", cb=self._on_alloc)
        await self.nc.subscribe(f"{PREFIX}.node.*.kv_done", cb=self._on_done)
        await self.nc.subscribe(sched_events(), cb=self._on_event)
        await self.nc.subscribe(node_load(), cb=self._on_load)
        await self.nc.flush()

    async def _on_alloc(self, msg: Any) -> None:
        m = messages.decode(msg.data)
        if isinstance(m, KVAllocRequest):
            decode_node = msg.subject.split(".")[-2]  # flowkv.v1.node.<id>.kv_alloc
            self._alloc[m.transfer_id] = (time.perf_counter(), len(m.prompt_token_ids), m.prefill_node, decode_node)

    async def _on_done(self, msg: Any) -> None:
        now = time.perf_counter()
        m = messages.decode(msg.data)
        if not isinstance(m, KVDone):
            return
        seen, tokens, p, d = self._alloc.pop(m.transfer_id, (now, 0, "", ""))
        st = m.stats
        self.handoffs.append(Handoff(
            t=now, request_id=m.request_id, prompt_tokens=tokens, handoff_s=now - seen,
            transfer_s=st.duration_s if st else 0.0, bytes=st.bytes if st else 0, calls=st.calls if st else 0,
            segments=st.segments if st else 0, transport=st.transport if st else "none", ok=m.ok,
            prefill_node=p, decode_node=d))

    async def _on_load(self, msg: Any) -> None:
        try:
            m = messages.decode(msg.data)
        except Exception:  # a report this tap cannot read says nothing about the run
            return
        if isinstance(m, LoadReport):
            self.samples.append(NodeSample(time.perf_counter(), m.node_id, m.role.value, m.waiting_prefill_tokens,
                                           m.prefill_tokens_per_s, m.num_running, m.decode_step_s))

    def samples_between(self, t0: float, t1: float) -> list[NodeSample]:
        return [s for s in self.samples if t0 <= s.t <= t1]

    async def _on_event(self, msg: Any) -> None:
        m = messages.decode(msg.data)
        if isinstance(m, SchedEvent):
            self.events.append((time.perf_counter(), m))

    def handoffs_between(self, t0: float, t1: float) -> list[Handoff]:
        return [h for h in self.handoffs if t0 <= h.t <= t1]

    def flips_between(self, t0: float, t1: float) -> list[tuple[float, SchedEvent]]:
        return [(t, e) for t, e in self.events if t0 <= t <= t1 and e.kind is EventKind.ROLE_FLIP]

    async def roles(self) -> dict[str, str]:
        """node id -> role, as the scheduler sees them now."""
        return {n.node_id: n.role.value for n in (await ask_cluster(self.nc, 5.0)).nodes}

    async def wait_roles(self, prefill: int, timeout: float) -> dict[str, str]:
        """Wait until a fixed split has pinned its roles (``prefill`` prefill nodes, the rest
        decode, no flip in flight), so no flip happens once timing starts."""
        deadline = time.monotonic() + timeout
        roles = await self.roles()
        while time.monotonic() < deadline:
            values = list(roles.values())
            if values.count("prefill") == prefill and values.count("decode") == len(values) - prefill:
                break
            await asyncio.sleep(0.5)
            roles = await self.roles()
        await asyncio.sleep(0.5)  # the nodes' own READY reports after the flip
        return roles

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.drain()

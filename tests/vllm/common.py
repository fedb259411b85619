"""What the vLLM test modules share: a cluster of vLLM nodes, the references, trace spans."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.kvtransfer.pool import sweep_stale_segments
from tests.reliability.cluster import REPO, Cluster, Service, poll

BLOCK_SIZE = 32  # vLLM's CPU attention wants a multiple of 32

TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "Translate to French: I like green apples.",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Write a haiku about autumn leaves.",
    "import numpy as np\nx = np.arange(10)\n",
    "My favourite book is",
    "The quick brown fox",
    "In 1969, astronauts",
    "A list of fruits: apple, banana,",
    "Dear Sir or Madam, I am writing to",
    "SELECT name FROM users WHERE",
    "The mitochondria is",
    "Rain is falling on the roof, and the children",
    "Explain gravity to a five year old. " * 4,
    "Here is a long story about a dragon who loved books. " * 9,
    "<html><body><h1>",
]


def tokenize(model_dir: str, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t)["input_ids"] for t in texts]


def node_args(model: str, num_blocks: int, max_model_len: int) -> list[str]:
    """A small vLLM node: eager (no compile), a fixed pool (no memory profiling), few sequences."""
    return ["--engine", "vllm", "--model", model, "--block-size", str(BLOCK_SIZE), "--num-blocks", str(num_blocks),
            "--max-model-len", str(max_model_len), "--vllm-enforce-eager", "true", "--max-num-seqs", "8"]


def run_vllm_alone(workdir: Path, model: str, prompts: list[list[int]], max_tokens: int,
                   max_model_len: int) -> dict[str, Any]:
    """vLLM serving alone (no FlowKV, no connector), greedy, in its own process group."""
    spec, out = workdir / "alone-in.json", workdir / "alone-out.json"
    spec.write_text(json.dumps({"model": model, "prompts": prompts, "max_tokens": max_tokens,
                                "max_model_len": max_model_len}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(workdir / "alone.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.vllm.references", str(spec), str(out)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert proc.wait(600) == 0, (workdir / "alone.log").read_text()[-3000:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # vLLM's engine children
    return json.loads(out.read_text())


FLOWKV_BLOCK_SIZE = 16
FLOWKV_NUM_BLOCKS = 128


@dataclass
class MixedCluster(Cluster):
    """A cluster whose vLLM nodes (``prefill-*``, ``decode-*``) have nodes of FlowKV's own
    engine beside them (``flowkv_nodes``: node id -> role), all of ``flowkv_model``, started
    with the others and counted among ``node_ids`` (ready, leak checks)."""

    flowkv_model: str = "tiny"
    flowkv_nodes: dict[str, str] = field(default_factory=dict)

    @property
    def node_ids(self) -> list[str]:
        return super().node_ids + list(self.flowkv_nodes)

    def start_node(self, node_id: str) -> Service:
        if node_id not in self.flowkv_nodes:
            return super().start_node(node_id)
        args = ["--node-id", node_id, "--role", self.flowkv_nodes[node_id], "--engine", "flowkv",
                "--model", self.flowkv_model, "--device", "cpu", "--block-size", str(FLOWKV_BLOCK_SIZE),
                "--num-blocks", str(FLOWKV_NUM_BLOCKS), "--report-interval-s", "0.2", "--drain-timeout-s", "3"]
        return self._spawn(node_id, "services.node", args)


@contextlib.contextmanager
def vllm_cluster(workdir: Path, model: str, prefill: int, decode: int, num_blocks: int,
                 max_model_len: int, node_env: dict[str, str] | None = None,
                 flowkv_model: str = "", flowkv_nodes: dict[str, str] | None = None,
                 node_env_of: dict[str, dict[str, str]] | None = None, extra_node_args: list[str] | None = None,
                 extra_gateway_args: list[str] | None = None,
                 scheduler_args: list[str] | None = None) -> Iterator[Cluster]:
    """A cluster of vLLM nodes (tracing to ``traces.jsonl``); afterwards no segment of its nodes is left.

    With ``flowkv_model``, ``flowkv_nodes`` (node id -> role) of FlowKV's own engine serve
    that model beside the vLLM nodes, under the same scheduler and gateway (which serves
    both models). The scheduler then places by least load: the ``flowkv`` policy's role
    controller sizes prefill and decode over every node, whatever its model.
    ``node_env_of`` adds variables to single nodes (a fault in one node);
    ``extra_node_args``, ``extra_gateway_args`` and ``scheduler_args`` add flags (later
    flags win).
    """
    common: dict[str, Any] = dict(
        prefill=prefill, decode=decode, node_args=node_args(model, num_blocks, max_model_len) + (extra_node_args or []),
        # One compute thread per engine, left to the OS: vLLM's default binds every
        # engine of the host to the same cores.
        node_env={"OTEL_TRACES_EXPORTER": "file", "FLOWKV_TRACE_FILE": str(workdir / "traces.jsonl"),
                  "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", **(node_env or {})},
        node_env_of=dict(node_env_of or {}),
        gateway_args=["--model", f"{model},{flowkv_model}" if flowkv_model else model, "--stall-timeout-s", "30",
                      "--queue-timeout-s", "120", *(extra_gateway_args or [])])
    if flowkv_model:
        c: Cluster = MixedCluster(workdir, **common, scheduler_args=["--policy", "least_loaded"],
                                  flowkv_model=flowkv_model, flowkv_nodes=dict(flowkv_nodes or {}))
    else:
        c = Cluster(workdir, **common, scheduler_args=list(scheduler_args or []))
    with c:
        yield c
    sweep_stale_segments()  # the segments of vLLM workers that died with a SIGKILLed node
    pids = {s.pid for s in c.services.values() if s.proc is not None}
    assert not [p for p in Path("/dev/shm").glob("flowkv-*") if _pid_of(p) in pids]


def _pid_of(seg: Path) -> int:
    try:
        return int(seg.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def handoffs(c: Cluster) -> list[dict[str, Any]]:
    """The ``kv.transfer`` spans that moved KV, in the order they ended."""
    path = c.workdir / "traces.jsonl"
    spans = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [s["attributes"] for s in sorted(spans, key=lambda s: s["end_ns"])
            if s["name"] == "kv.transfer" and s["attributes"].get("flowkv.kv.calls", 0) > 0]


async def wait_handed_off(c: Cluster, request_ids: list[str], timeout: float = 30.0) -> None:
    """Wait until each of ``request_ids`` has a ``kv.transfer`` span that moved KV.

    P ends that span once D acknowledged ``KVDone``; D may stream the whole completion to
    the client before P hears the ack, so a span can land after its response. A request
    that never gets one was computed in one place: the failure says what the nodes logged
    of it (no reservation, a refused hand-off, a failed transfer)."""
    def missing() -> list[str]:
        moved = {a.get("flowkv.request_id") for a in handoffs(c)}
        return [rid for rid in request_ids if rid not in moved]

    async def all_moved() -> bool:
        return not missing()

    def why() -> str:
        lines = [f"{rid} on {name}: {line}" for rid in missing() for name, svc in c.services.items()
                 if name != "gateway" for line in svc.log().splitlines() if rid in line]
        return f"not handed off: {missing()}\n" + "\n".join(lines)

    await poll(all_moved, timeout, why)


def check_calls_per_hand_off(spans: list[dict[str, Any]], num_layers: int) -> None:
    """Every hand-off: one copy call per layer per aligned segment of block ids; a fresh one
    (the first, between empty pools, of a prompt of several blocks: see
    :func:`longest_first`) is a single segment: one call per layer for all its blocks."""
    assert spans
    for attrs in spans:
        assert attrs["flowkv.kv.transport"] == "shm"
        assert 1 <= attrs["flowkv.kv.segments"] <= attrs["flowkv.kv.blocks"]
        assert attrs["flowkv.kv.calls"] == num_layers * attrs["flowkv.kv.segments"], attrs
    first = spans[0]
    assert first["flowkv.kv.blocks"] >= 3, first  # unmerged, that is a call per block per layer
    assert first["flowkv.kv.segments"] == 1 and first["flowkv.kv.calls"] == num_layers, first


def longest_first(prompts: list[list[int]]) -> list[int]:
    """Indexes of ``prompts``, the longest first: sent in this order to a fresh cluster, the
    first hand-off moves several blocks between empty pools (one segment when merged)."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def placed_decode_node(c: Cluster, completion_id: str) -> str:
    """The decode node the gateway placed a completion on (from its log)."""
    return placement(c, completion_id)[1]


def placement(c: Cluster, completion_id: str) -> tuple[str, str]:
    """The (prefill, decode) nodes the gateway placed a completion on (from its log)."""
    m = re.search(rf"\[{re.escape(completion_id)}\][^\n]*placed on prefill=(\S+) decode=(\S+)",
                  c.services["gateway"].log())
    assert m, f"{completion_id} was not placed"
    return m.group(1), m.group(2)


async def openai_stream(c: Cluster, model: str, prompt: list[int], max_tokens: int) -> tuple[str, str | None]:
    """Stream a greedy completion through the official ``openai`` client; (text, finish reason)."""
    import openai

    client = openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True)
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish
    finally:
        await client.close()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a vLLM node's engine core and its workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def alive(pids: list[int]) -> list[int]:
    """The ``pids`` still running (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
        except OSError:
            pass
    return out

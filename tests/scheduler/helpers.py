"""Hand-made load states for the scheduler tests."""

from __future__ import annotations

import asyncio

from libs.protocol import subjects
from libs.protocol.messages import KVLink, LoadReport, NodeState, Role, SchedEvent, encode
from libs.scheduler.role_controller import RoleChange, RoleController

_seq: dict[str, int] = {}


def report(node_id: str, role: Role = Role.PREFILL, *, state: NodeState = NodeState.READY, waiting_tokens: int = 0,
           running: int = 0, free_blocks: int = 1000, total_blocks: int = 1000, rate: float = 10000.0,
           step_s: float = 0.02, cached: list[int] | None = None, held: int = 0, max_num_seqs: int = 64,
           host: str = "h1", device: str = "cuda:0", device_name: str = "gpu", model: str = "m", started_at: float = 1.0,
           links: list[KVLink] | None = None, transports: list[str] | None = None) -> LoadReport:
    """A LoadReport with a fresh seq each call (block size 16, 1 MB blocks)."""
    _seq[node_id] = _seq.get(node_id, 0) + 1
    return LoadReport(
        node_id=node_id, role=role, state=state, seq=_seq[node_id], started_at=started_at, model=model,
        device=device, device_name=device_name, device_memory_bytes=80 << 30, max_model_len=32768, block_size=16,
        kv_block_bytes=1_000_000, total_blocks=total_blocks, free_blocks=free_blocks, largest_free_segment=free_blocks,
        num_waiting=1 if waiting_tokens else 0, waiting_prefill_tokens=waiting_tokens, num_running=running,
        num_held=held, prefill_tokens_per_s=rate, decode_step_s=step_s, cached_prefix_hashes=cached or [],
        kv_transports=["cuda_ipc"] if transports is None else transports, host_id=host, max_num_seqs=max_num_seqs,
        kv_links=links or [],
    )


async def until(pred, timeout: float = 10.0) -> None:
    """Poll until ``pred()`` holds (a wait, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.02)


async def announce(client, registry, *reports: LoadReport, timeout: float = 10.0) -> None:
    """Publish ``reports`` on ``node_load()`` until ``registry`` holds every node.

    Sent again every 0.2 s (a repeat has the same seq, so the registry ignores it): on a
    nats-server just started, a message published within milliseconds of another
    connection's SUB and flush was missed about once in twenty in our runs, so a test that
    publishes once and then waits can hang where the nodes' periodic reports would not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(r.node_id in registry for r in reports):
        if loop.time() > deadline:
            raise AssertionError(f"nodes never registered: {[r.node_id for r in reports if r.node_id not in registry]}")
        for r in reports:
            await client.publish(subjects.node_load(), encode(r))
        await asyncio.sleep(0.2)


def one_step(ctl: RoleController) -> tuple[RoleChange | None, list[SchedEvent]]:
    """``ctl.step()`` where at most one flip may start: (that flip or None, the events)."""
    changes, events = ctl.step()
    assert len(changes) <= 1, [(c.node_id, c.new_role) for c in changes]
    return (changes[0] if changes else None), events


def first_flip(ctl: RoleController) -> tuple[RoleChange | None, list[SchedEvent]]:
    """``ctl.step()``: (the first flip it starts or None, the events)."""
    changes, events = ctl.step()
    return (changes[0] if changes else None), events

"""The node's load report: engine stats, role and state, device facts, prefix-cache sample."""

from __future__ import annotations

import os
from dataclasses import dataclass

from libs.engine.protocol import Engine
from libs.protocol.messages import LoadReport, NodeState, Role
from services.node_common.metrics import TransferTotals


@dataclass(frozen=True)
class DeviceInfo:
    device: str
    device_name: str
    device_memory_bytes: int


def device_info(device: str) -> DeviceInfo:
    """Name and memory of the node's device (``cpu``: the host's RAM)."""
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo(f"cuda:{index}", props.name, int(props.total_memory))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return DeviceInfo("cpu", "cpu", int(memory))


def build_report(
    *, node_id: str, role: Role, state: NodeState, seq: int, started_at: float, engine: Engine,
    device: DeviceInfo, hashes: list[int], transports: list[str], host_id: str, max_num_seqs: int,
    transfers: TransferTotals,
) -> LoadReport:
    """One ``LoadReport`` from the engine's latest stats snapshot.

    Args:
        engine: the node's engine (started).
        hashes: a sample of prefix-cache hashes (``AsyncEngine.prefix_hashes``).
    """
    stats = engine.stats()
    layout = engine.layout
    return LoadReport(
        node_id=node_id, role=role, state=state, seq=seq, started_at=started_at, model=engine.model_name,
        device=device.device, device_name=device.device_name, device_memory_bytes=device.device_memory_bytes,
        max_model_len=engine.max_model_len, block_size=layout.block_size, kv_block_bytes=layout.block_bytes,
        total_blocks=stats.total_blocks, free_blocks=stats.free_blocks,
        largest_free_segment=stats.largest_free_segment, num_waiting=stats.num_waiting,
        waiting_prefill_tokens=stats.waiting_prefill_tokens, num_running=stats.num_running_decode,
        num_held=stats.num_held + stats.num_remote_pending, prefill_tokens_per_s=stats.prefill_tokens_per_s,
        decode_step_s=stats.decode_step_time_s, cached_prefix_hashes=hashes, kv_transports=transports,
        host_id=host_id, max_num_seqs=max_num_seqs, prefill_pass_tokens=stats.prefill_pass_tokens,
        prefill_pass_s=stats.prefill_pass_s, max_pass_tokens=stats.max_pass_tokens,
        kv_sent_transfers=transfers.sent_transfers, kv_sent_bytes=transfers.sent_bytes,
        kv_sent_calls=transfers.sent_calls, kv_sent_seconds=transfers.sent_seconds,
        kv_received_transfers=transfers.received_transfers, kv_received_bytes=transfers.received_bytes,
        kv_links=transfers.links.snapshot(), step_age_s=engine.busy_s, cpu_threads=stats.cpu_threads,
        cpu_set=_cpu_set() if stats.cpu_threads > 0 else [], cpu_share=stats.cpu_share,
    )


def _cpu_set() -> list[int]:
    """The cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: every core the host has
        return list(range(os.cpu_count() or 1))

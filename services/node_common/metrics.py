"""The node's Prometheus metrics (``flowkv_node_*``), served on ``--metrics-port`` when set.

Counters move where the work happens (handlers); the gauges are set from each load
report, so a scrape shows what the scheduler last saw.
"""

from __future__ import annotations

import dataclasses

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from libs.protocol.messages import LoadReport, Role, TransferReport
from services.node_common.kv_links import KVLinkTable

REQUESTS = Counter(
    "flowkv_node_requests_total",
    "Requests a node handled, by phase (prefill, decode, colocated) and outcome",
    ["phase", "outcome"],
)
TRANSFER_BYTES = Counter("flowkv_node_kv_transfer_bytes_total", "KV bytes sent, by transport", ["transport"])
TRANSFER_CALLS = Counter("flowkv_node_kv_transfer_calls_total", "KV transfer calls issued, by transport", ["transport"])
TRANSFERS = Counter("flowkv_node_kv_transfers_total", "KV hand-offs sent (one per request), by transport", ["transport"])
TRANSFER_SECONDS = Histogram(
    "flowkv_node_kv_transfer_seconds",
    "Duration of one KV hand-off on the sender, by transport",
    ["transport"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
RECEIVED_BYTES = Counter("flowkv_node_kv_received_bytes_total", "KV bytes received, by transport", ["transport"])
RECEIVED = Counter("flowkv_node_kv_received_total", "KV hand-offs received (one per request), by transport", ["transport"])
HANDOFF_MOVES = Counter("flowkv_node_handoff_moves_total",
                        "Hand-offs moved to another decode node after the placed one refused the reservation")
RECOMPUTES = Counter("flowkv_node_recomputes_total", "Requests decoded by recomputing their prompt", ["reason"])
LEASES_EXPIRED = Counter("flowkv_node_leases_expired_total", "KV reservations released because KVDone never came")
ROLE_FLIPS = Counter("flowkv_node_role_flips_total", "Role switches", ["old", "new"])
REFUSED = Counter("flowkv_node_refused_total", "Work refused (wrong role, draining, no blocks)", ["verb", "code"])

KV_BLOCKS_TOTAL = Gauge("flowkv_node_kv_blocks_total", "KV blocks in the pool")
KV_BLOCKS_FREE = Gauge("flowkv_node_kv_blocks_free", "KV blocks free")
KV_BLOCKS_USED = Gauge("flowkv_node_kv_blocks_used", "KV blocks in use (running, held, cached-and-pinned or reserved)")
KV_LARGEST_FREE = Gauge(
    "flowkv_node_kv_largest_free_segment_blocks", "Longest run of contiguous blocks free or held only by the prefix cache"
)
KV_FRAGMENTATION = Gauge(
    "flowkv_node_kv_fragmentation_ratio",
    "1 - largest free segment / free blocks (0: all free blocks contiguous; 0 when none is free)",
)
WAITING_REQUESTS = Gauge("flowkv_node_waiting_requests", "Requests queued for prefill")
WAITING_TOKENS = Gauge("flowkv_node_waiting_prefill_tokens", "Prompt tokens queued for prefill")
RUNNING_SEQS = Gauge("flowkv_node_running_seqs", "Sequences in the decode batch")
HELD_REQUESTS = Gauge("flowkv_node_held_requests", "Prefilled requests waiting for their hand-off, and reservations")
ROLE = Gauge("flowkv_node_role", "1 for the node's current role, 0 for the others", ["role"])


def fragmentation(free_blocks: int, largest_free_segment: int) -> float:
    """How scattered the free blocks are: 0 when they form one run (or there are none)."""
    if free_blocks <= 0:
        return 0.0
    return 1.0 - largest_free_segment / free_blocks


def observe_report(report: LoadReport) -> None:
    """Set the gauges from the node's latest load report."""
    KV_BLOCKS_TOTAL.set(report.total_blocks)
    KV_BLOCKS_FREE.set(report.free_blocks)
    KV_BLOCKS_USED.set(report.total_blocks - report.free_blocks)
    KV_LARGEST_FREE.set(report.largest_free_segment)
    KV_FRAGMENTATION.set(fragmentation(report.free_blocks, report.largest_free_segment))
    WAITING_REQUESTS.set(report.num_waiting)
    WAITING_TOKENS.set(report.waiting_prefill_tokens)
    RUNNING_SEQS.set(report.num_running)
    HELD_REQUESTS.set(report.num_held)
    for role in Role:
        ROLE.labels(role.value).set(1 if role is report.role else 0)


@dataclasses.dataclass
class TransferTotals:
    """One node's hand-offs since it started, for its load reports.

    The Prometheus counters above are per process; these are per node, which differs
    when several nodes share a process (the tests).
    """

    sent_transfers: int = 0
    sent_bytes: int = 0
    sent_calls: int = 0
    sent_seconds: float = 0.0
    received_transfers: int = 0
    received_bytes: int = 0
    links: KVLinkTable = dataclasses.field(default_factory=KVLinkTable)  # sent, by decode peer


def record_send(stats: TransferReport, totals: TransferTotals, peer: str) -> None:
    """Count one finished hand-off to the decode node ``peer`` on the sender."""
    totals.links.record(peer, stats.bytes, stats.duration_s)
    totals.sent_transfers += 1
    totals.sent_bytes += stats.bytes
    totals.sent_calls += stats.calls
    totals.sent_seconds += stats.duration_s
    TRANSFERS.labels(stats.transport).inc()
    TRANSFER_BYTES.labels(stats.transport).inc(stats.bytes)
    TRANSFER_CALLS.labels(stats.transport).inc(stats.calls)
    TRANSFER_SECONDS.labels(stats.transport).observe(stats.duration_s)


def record_receive(stats: TransferReport, totals: TransferTotals) -> None:
    """Count one hand-off that landed on the receiver."""
    totals.received_transfers += 1
    totals.received_bytes += stats.bytes
    RECEIVED.labels(stats.transport).inc()
    RECEIVED_BYTES.labels(stats.transport).inc(stats.bytes)


def transfer_attributes(stats: TransferReport | None) -> dict[str, Any]:
    """Span attributes of one transfer (zeros when nothing moved: D had every block cached)."""
    if stats is None:
        return {"flowkv.kv.bytes": 0, "flowkv.kv.calls": 0, "flowkv.kv.segments": 0}
    return {"flowkv.kv.transport": stats.transport, "flowkv.kv.mode": stats.mode, "flowkv.kv.bytes": stats.bytes,
            "flowkv.kv.calls": stats.calls, "flowkv.kv.segments": stats.segments,
            "flowkv.kv.duration_s": stats.duration_s}


async def serve_metrics(port: int, host: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    """Serve ``/metrics`` and ``/health``; returns the runner (``await runner.cleanup()`` to stop)."""
    from services.common.metrics_server import serve_metrics as serve

    return await serve(port, host)

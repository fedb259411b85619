"""The cluster view behind ``/dashboard``: ``GET /v1/cluster`` answers with the scheduler's
``ClusterState`` plus the recent events this gateway saw on ``sched_events()`` (its
:class:`~services.gateway.events.EventLog`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client

from libs.protocol.messages import ClusterState, LoadReport, SchedEvent
from services.common.messaging import ask_cluster
from services.gateway.errors import ApiError
from services.gateway.events import EventLog
from services.gateway.state import STATE

_PAGE = Path(__file__).with_name("dashboard.html")
_DROPPED_FIELDS = ("cached_prefix_hashes", "type")  # large or useless to a person


def node_view(report: LoadReport) -> dict[str, Any]:
    """One node as the dashboard shows it: the report's fields and the figures derived from them."""
    out = msgspec.to_builtins(report)
    for name in _DROPPED_FIELDS:
        out.pop(name, None)
    used = report.total_blocks - report.free_blocks
    out["used_blocks"] = used
    out["kv_usage"] = used / report.total_blocks if report.total_blocks else 0.0
    out["fragmentation"] = 1.0 - report.largest_free_segment / report.free_blocks if report.free_blocks else 0.0
    return out


def cluster_view(state: ClusterState, log: EventLog, limit: int = 50) -> dict[str, Any]:
    """The JSON body of ``/v1/cluster``.

    Args:
        state: the scheduler's answer to a ``ClusterQuery``.
        log: this gateway's event log.
        limit: most events returned (newest first).

    Returns:
        ``{"ts", "policy", "nodes": [...], "events": [...]}``; ``events`` merges the
        scheduler's history (node and role events) with the placements this gateway saw.
    """
    seen: dict[tuple[Any, ...], SchedEvent] = {}
    for ev in [*state.events, *log.events]:
        seen[(ev.kind, ev.ts, ev.node_id, ev.request_id, ev.detail)] = ev
    events = sorted(seen.values(), key=lambda e: e.ts, reverse=True)[:limit]
    return {
        "ts": time.time(),
        "policy": state.policy,
        "nodes": [node_view(n) for n in sorted(state.nodes, key=lambda n: n.node_id)],
        "events": [{k: v for k, v in msgspec.to_builtins(e).items() if k != "type"} for e in events],
    }


async def query_cluster(nc: Client, log: EventLog, timeout: float) -> dict[str, Any]:
    """Ask the scheduler for its ``ClusterState`` and build the view (ApiError 503 if it does not answer)."""
    try:
        reply = await ask_cluster(nc, timeout)
    except TypeError as exc:
        raise ApiError(502, str(exc), type="server_error", code="bad_gateway") from None
    except Exception as exc:  # timeout, no responders, closed connection
        raise ApiError(503, f"the scheduler did not answer ({type(exc).__name__})", type="server_error",
                       code="scheduler_unavailable", retry_after_s=1.0) from None
    return cluster_view(reply, log)


async def dashboard_page(request: web.Request) -> web.Response:
    """``GET /dashboard``: the static page (no data in it; it polls ``/v1/cluster``)."""
    return web.Response(text=_PAGE.read_text(), content_type="text/html", headers={"Cache-Control": "no-cache"})


async def cluster_state(request: web.Request) -> web.Response:
    """``GET /v1/cluster``: the JSON the dashboard polls (see :func:`cluster_view`)."""
    st = request.app[STATE]
    if st.nc is None:
        raise ApiError(503, "the gateway is not connected yet", type="server_error", code="not_ready")
    return web.json_response(await query_cluster(st.nc, st.events, st.config.cluster_timeout_s))

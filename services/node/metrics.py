"""The node's Prometheus counters, in one place (served on ``--metrics-port`` when set)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "flowkv_node_requests_total",
    "Requests a node handled, by phase (prefill, decode, colocated) and outcome",
    ["phase", "outcome"],
)
TRANSFER_BYTES = Counter("flowkv_node_kv_transfer_bytes_total", "KV bytes sent, by transport", ["transport"])
TRANSFER_CALLS = Counter("flowkv_node_kv_transfer_calls_total", "KV transfer calls issued, by transport", ["transport"])
TRANSFER_SECONDS = Histogram(
    "flowkv_node_kv_transfer_seconds",
    "Duration of one KV hand-off on the sender, by transport",
    ["transport"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
RECOMPUTES = Counter("flowkv_node_recomputes_total", "Requests decoded by recomputing their prompt", ["reason"])
LEASES_EXPIRED = Counter("flowkv_node_leases_expired_total", "KV reservations released because KVDone never came")
ROLE_FLIPS = Counter("flowkv_node_role_flips_total", "Role switches", ["old", "new"])
REFUSED = Counter("flowkv_node_refused_total", "Work refused (wrong role, draining, no blocks)", ["verb", "code"])


async def serve_metrics(port: int, host: str = "0.0.0.0"):  # type: ignore[no-untyped-def]
    """Serve ``/metrics`` with aiohttp; returns the runner (``await runner.cleanup()`` to stop)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

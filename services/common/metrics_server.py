"""A small aiohttp server for a service's ``/metrics`` (Prometheus text) and ``/health``.

The gateway serves these on its own API port; the scheduler and the nodes have no HTTP
API, so they start this on ``--metrics-port``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)


async def serve_metrics(port: int, host: str = "127.0.0.1", before_scrape: Callable[[], None] | None = None) -> web.AppRunner:
    """Serve ``/metrics`` and ``/health`` on ``host:port`` until the runner is cleaned up.

    Args:
        port: TCP port (must be free).
        host: listen address.
        before_scrape: called before each scrape, to refresh gauges read from live state.

    Returns:
        The started runner; ``await runner.cleanup()`` stops it.
    """

    async def metrics(_: web.Request) -> web.Response:
        if before_scrape is not None:
            try:
                before_scrape()
            except Exception:  # a stale gauge beats a failed scrape
                log.exception("refreshing gauges before a scrape failed")
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

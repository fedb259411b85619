"""``python -m services.gateway``: run the OpenAI-compatible gateway until SIGINT/SIGTERM.

Shutdown: stop accepting connections, let open streams finish within
``--shutdown-timeout-s``, then unsubscribe and drain the NATS connection.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.common import lifecycle
from services.common.lifecycle import install_signal_handlers
from services.common.logs import setup_logging
from services.common.nats import NatsAuthError, parse_service_args
from services.common.nats import NatsConfig
from services.common.tracing import setup_tracing, shutdown_tracing
from services.gateway.app import create_app, make_runner
from services.gateway.config import ENV_PREFIX, GatewayConfig

log = logging.getLogger("services.gateway")


def parse_args(argv: list[str] | None = None) -> tuple[GatewayConfig, NatsConfig]:
    """Both configs from flags, then ``FLOWKV_GATEWAY_*`` / ``FLOWKV_NATS_*``, then defaults."""
    return parse_service_args(GatewayConfig, ENV_PREFIX, "python -m services.gateway", "FlowKV OpenAI-compatible gateway", argv)


async def serve(config: GatewayConfig, nats_config: NatsConfig) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    app = create_app(config, nats_config)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info("listening on http://%s:%d (NATS %s)", config.host, config.port, nats_config.redacted_url())
    try:
        await stop.wait()
    finally:
        log.info("shutting down: finishing open streams (up to %gs)", config.shutdown_timeout_s)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    config, nats_config = parse_args(argv)
    setup_logging("gateway", config.log_level, config.json_logs)
    setup_tracing("flowkv-gateway", config.gateway_id)
    try:
        lifecycle.run(serve(config, nats_config))
    except NatsAuthError as exc:  # a clear line, not a traceback: retrying cannot help
        raise SystemExit(f"error: {exc}") from None
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()

"""``python -m services.gateway``: run the OpenAI-compatible gateway until SIGINT/SIGTERM.

Shutdown: stop accepting connections, let open streams finish within
``--shutdown-timeout-s``, then unsubscribe and drain the NATS connection. The gateway runs
no background task of its own: its work runs in request handlers and NATS subscriptions,
which the aiohttp runner's clean-up ends.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import AsyncExitStack

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


async def serve(config: GatewayConfig, nats_config: NatsConfig) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    async with AsyncExitStack() as stack:
        runner = make_runner(create_app(config, nats_config))
        await runner.setup()  # connects to NATS and subscribes (the app's on_startup)
        stack.push_async_callback(_shut_down, runner, config.shutdown_timeout_s)
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        log.info("listening on http://%s:%d (NATS %s)", config.host, config.port, nats_config.redacted_url())
        await stop.wait()
    return 0


async def _shut_down(runner: web.AppRunner, timeout_s: float) -> None:
    """Refuse new requests, let open streams finish (bounded), unsubscribe, drain NATS."""
    log.info("shutting down: finishing open streams (up to %gs)", timeout_s)
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    config, nats_config = parse_args(argv)
    setup_logging("gateway", config.log_level, config.json_logs)
    setup_tracing("flowkv-gateway", config.gateway_id)
    try:
        return lifecycle.run(serve(config, nats_config))
    except NatsAuthError as exc:  # a clear line, not a traceback: retrying cannot help
        raise SystemExit(f"error: {exc}") from None
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())

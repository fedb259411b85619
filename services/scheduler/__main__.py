"""``python -m services.scheduler``: run the scheduler until SIGTERM/SIGINT.

Flags and ``FLOWKV_SCHEDULER_*`` variables come from :class:`SchedulerConfig`; the broker
from ``--nats-url``/``FLOWKV_NATS_URL`` and the other ``--nats-*``/``FLOWKV_NATS_*``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import AsyncExitStack

from services.common import lifecycle
from services.common.lifecycle import install_signal_handlers, wait_for_stop
from services.common.logs import setup_logging
from services.common.metrics_server import serve_metrics
from services.common.nats import NatsAuthError, parse_service_args
from services.common.nats import NatsConfig, connect
from services.common.tracing import setup_tracing, shutdown_tracing
from services.scheduler.config import ENV_PREFIX, SchedulerConfig
from services.scheduler.service import SchedulerService

log = logging.getLogger("services.scheduler")


def parse_args(argv: list[str] | None = None) -> tuple[SchedulerConfig, NatsConfig]:
    """Both configs from flags, then ``FLOWKV_SCHEDULER_*`` / ``FLOWKV_NATS_*``, then defaults."""
    return parse_service_args(SchedulerConfig, ENV_PREFIX, "flowkv scheduler", "FlowKV scheduler: placement and roles", argv)


async def serve(config: SchedulerConfig, nats_config: NatsConfig) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    async with AsyncExitStack() as stack:
        nc = await connect(nats_config, "flowkv-scheduler")
        stack.push_async_callback(nc.drain)
        service = SchedulerService(config, nc)
        await service.start()
        stack.push_async_callback(service.close)
        if config.metrics_port:
            runner = await serve_metrics(config.metrics_port, config.metrics_host, before_scrape=service.refresh_metrics)
            stack.push_async_callback(runner.cleanup)
            log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)
        await wait_for_stop(stop, service.tasks)
        failed = service.tasks.failed.is_set()
        log.info("scheduler stopping (%s)", "a background task failed" if failed else "signal")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    config, nats_config = parse_args(argv)
    setup_logging("scheduler", config.log_level, config.json_logs)
    setup_tracing("flowkv-scheduler")
    try:
        return lifecycle.run(serve(config, nats_config))
    except NatsAuthError as exc:  # a clear line, not a traceback: retrying cannot help
        raise SystemExit(f"error: {exc}") from None
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())

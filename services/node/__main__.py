"""``python -m services.node --node-id p0 --role prefill --model smollm2 --device cpu --nats-url ...``

Every flag also reads ``FLOWKV_NODE_<FIELD>`` (NATS: ``FLOWKV_NATS_<FIELD>``). SIGINT or
SIGTERM: NodeBye, drain in-flight requests (bounded), stop the engine, close the agent,
``nc.drain()``. A critical background task that fails (the load reports, a role flip) stops
the node the same way, with exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from contextlib import AsyncExitStack
from typing import Any

from services.common import lifecycle
from services.common.lifecycle import install_signal_handlers, wait_for_stop
from services.common.logs import setup_logging
from services.common.nats import NatsAuthError, parse_service_args
from services.common.nats import NatsConfig, connect
from services.common.tracing import setup_tracing, shutdown_tracing
from services.node_common.config import ENV_PREFIX, NodeConfig

log = logging.getLogger("services.node")


def parse(argv: list[str] | None = None) -> tuple[NodeConfig, NatsConfig]:
    """Both configs from flags, then ``FLOWKV_NODE_*`` / ``FLOWKV_NATS_*``, then defaults."""
    return parse_service_args(NodeConfig, ENV_PREFIX, "python -m services.node", "A FlowKV node", argv)


async def serve(config: NodeConfig, nats_config: NatsConfig) -> int:
    from services.node_common import metrics
    from services.node.node import Node

    stop = asyncio.Event()
    install_signal_handlers(stop)
    async with AsyncExitStack() as stack:
        nc = await connect(nats_config, f"flowkv-node-{config.node_id}")
        stack.push_async_callback(_drain, nc)
        # /metrics first: a port that cannot be bound ends the process before the node
        # has announced itself (a node that joins and then dies looks ready for a moment).
        if config.metrics_port:
            runner = await metrics.serve_metrics(config.metrics_port, config.metrics_host)
            stack.push_async_callback(runner.cleanup)
        node = Node(config)
        await node.start(nc)

        async def stop_node() -> None:
            await node.stop("a background task failed" if node.tasks.failed.is_set() else "signal")

        stack.push_async_callback(stop_node)
        print(f"node {config.node_id} ready", flush=True)  # tests and `flowkv up` wait for this line
        await wait_for_stop(stop, node.tasks)
        failed = node.tasks.failed.is_set()
    return 1 if failed else 0


async def _drain(nc: Any) -> None:
    with contextlib.suppress(Exception):  # the broker may be gone already: nothing left to flush
        await nc.drain()


def main(argv: list[str] | None = None) -> int:
    config, nats_config = parse(argv)
    setup_logging(f"node-{config.node_id}", config.log_level, config.json_logs)
    setup_tracing("flowkv-node", config.node_id)
    if config.device == "cpu":
        import torch

        # `flowkv up` divides the cores among its nodes through OMP_NUM_THREADS.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))
    try:
        return lifecycle.run(serve(config, nats_config))
    except NatsAuthError as exc:  # a clear line, not a traceback: retrying cannot help
        raise SystemExit(f"error: {exc}") from None
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())

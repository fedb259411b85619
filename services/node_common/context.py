"""What both role handlers share: the NATS client, the engine, the KV agent, the config."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from nats.aio.client import Client

from libs.engine.protocol import Engine
from libs.kvtransfer.agent import KVAgent
from services.common.lifecycle import Changes, TaskGroup
from services.node_common.config import NodeConfig
from services.node_common.metrics import TransferTotals

_MAX_CANCELLED = 4096  # cancelled request ids remembered (a message may trail its Cancel)


@dataclass
class NodeContext:
    """The node's shared parts, handed to its handlers.

    Args:
        nc: the NATS connection.
        engine: the node's engine (FlowKV's own or vLLM's, see :mod:`libs.engine.protocol`).
        agent: the node's started ``KVAgent``.
        config: the node's configuration.
        tasks: the node's background tasks; the handlers run each request as one.
        work_finished: notified whenever a request leaves a handler (drains and role
            flips wait on it).
    """

    nc: Client
    engine: Engine
    agent: KVAgent
    config: NodeConfig
    transfers: TransferTotals = field(default_factory=TransferTotals)
    tasks: TaskGroup = field(default_factory=lambda: TaskGroup("node"))
    work_finished: Changes = field(default_factory=Changes)
    _cancelled: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def block_size(self) -> int:
        return self.engine.layout.block_size

    def mark_cancelled(self, request_id: str) -> None:
        """Remember a cancel so a KVAllocRequest or SubmitRequest arriving after it is refused."""
        self._cancelled[request_id] = None
        self._cancelled.move_to_end(request_id)
        while len(self._cancelled) > _MAX_CANCELLED:
            self._cancelled.popitem(last=False)

    def was_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

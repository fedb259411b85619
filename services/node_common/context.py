"""What both role handlers share: the NATS client, the engine, the KV agent, the config."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client

from libs.kvtransfer.agent import KVAgent
from services.node_common.config import NodeConfig
from services.node_common.metrics import TransferTotals

_MAX_CANCELLED = 4096  # cancelled request ids remembered (a message may trail its Cancel)


async def resolve(value: Any) -> Any:
    """``await`` engine calls that are coroutines; pass plain return values through."""
    return await value if inspect.isawaitable(value) else value


@dataclass
class NodeContext:
    """The node's shared parts, handed to its handlers.

    Args:
        nc: the NATS connection.
        engine: the node's ``AsyncEngine``.
        agent: the node's started ``KVAgent``.
        config: the node's configuration.
    """

    nc: Client
    engine: Any
    agent: KVAgent
    config: NodeConfig
    transfers: TransferTotals = field(default_factory=TransferTotals)
    _cancelled: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def block_size(self) -> int:
        return int(self.engine.layout.block_size)

    def mark_cancelled(self, request_id: str) -> None:
        """Remember a cancel so a KVAllocRequest or SubmitRequest arriving after it is refused."""
        self._cancelled[request_id] = None
        self._cancelled.move_to_end(request_id)
        while len(self._cancelled) > _MAX_CANCELLED:
            self._cancelled.popitem(last=False)

    def was_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

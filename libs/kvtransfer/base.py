"""What every transport shares: transfer states, modes, stats, errors and the base class.

A transfer's life cycle (one per request hand-off, on each side):

1. PENDING      ``send``/``expect`` registered it; layouts checked, ops aligned.
2. TRANSFERRING the transport is moving bytes.
3. DONE         P: the bytes are in D's pool. D: the bytes have landed (the transport saw
                them all, or, for one-sided transports, the control plane said so).
4. FAILED       timeout, peer lost, abort, mismatch; ``reason`` says which.

Blocks in flight belong to the transfer: P must not free its source blocks until ``send``
returned or raised; D must not expose its destination blocks to decode until its future is
DONE, and frees them if it FAILED.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import msgspec

from libs.kvtransfer.layout import KVLayout

if TYPE_CHECKING:
    from libs.kvtransfer.align import CopyOp
    from libs.kvtransfer.pool import KVPool


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class TransferMode(str, enum.Enum):
    """How a plan is issued (a node's ``kv_transfer_granularity``); see :mod:`libs.kvtransfer.align`.

    ``merged``: FlowKV, one call per aligned segment. ``layerwise``: one call per layer per
    segment (the paper's layer-wise transfer). ``blockwise``: one call per block per layer
    per K/V (the vLLM-disagg baseline). Every transport issues the same pieces, so only
    the number and size of its calls differ; the bytes that land are the same.
    """

    MERGED = "merged"
    LAYERWISE = "layerwise"
    BLOCKWISE = "blockwise"

    @classmethod
    def parse(cls, value: str) -> TransferMode:
        """The mode named ``value``; ValueError naming the known ones otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown KV transfer granularity {value!r}; one of "
                             f"{', '.join(m.value for m in cls)}") from None


class TransferError(Exception):
    """A transfer ended FAILED; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AgentInfo(msgspec.Struct, frozen=True):
    """What a peer needs to reach a node's pool; travels over NATS (msgspec)."""

    node_id: str
    host_id: str
    device: str
    layout: KVLayout
    num_blocks: int
    tcp_host: str = ""
    tcp_port: int = 0
    gpu_uuid: str | None = None
    shm_name: str | None = None
    cuda_ipc_handle: bytes | None = None
    cuda_ipc_offset: int = 0
    nccl_available: bool = False
    # How this node issues the KV it sends (a TransferMode value). A receiver plans its
    # side of a hand-off with the sender's, so two nodes set differently still agree.
    transfer_mode: str = TransferMode.MERGED.value

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


class Transport(ABC):
    """One way of moving bytes between two pools; one instance per agent.

    Args:
        pool: the local pool.
        node_id: the local node's id (for messages).
    """

    name: ClassVar[str]
    one_sided: ClassVar[bool] = False  # True: D learns of completion from the control plane

    def __init__(self, pool: KVPool, node_id: str) -> None:
        self.pool = pool
        self.node_id = node_id

    async def start(self) -> None:
        """Open listeners or resources; called once by ``KVAgent.start``."""

    def info_fields(self) -> dict[str, object]:
        """Fields this transport contributes to the local :class:`AgentInfo`."""
        return {}

    @abstractmethod
    async def send(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        """Move the bytes of ``ops`` into the peer's pool; return once they are there."""

    async def receive(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        """D side of a two-sided transport: return once every byte of ``ops`` landed."""
        raise NotImplementedError(f"{self.name} is one-sided; D waits for complete()")

    def abort(self, transfer_id: str, reason: str) -> None:
        """Drop any transport state of a failed transfer (best effort)."""

    async def close(self) -> None:
        """Release listeners, mappings and communicators."""

"""``KVAgent``: one per node; owns the transports and every transfer's state machine.

A hand-off, seen from both sides (the control messages travel over NATS, not here):

1. P and D exchange :class:`AgentInfo` (``agent.info()``) when they first meet.
2. D reserves blocks and calls ``fut = agent.expect(tid, p_info, dst_ids, src_ids)``.
3. P calls ``await agent.send(tid, d_info, src_ids, dst_ids)``; it returns once the bytes
   are in D's pool, then P tells D "done" over the control plane.
4. D: for ``tcp``/``nccl`` ``fut`` resolves when the transport saw every byte; for the
   one-sided ``shm``/``cuda_ipc`` when the control plane calls ``agent.complete(tid)``.
5. Either side may ``agent.abort(tid, reason)``; timeouts fail the transfer on each side.

P must not free its source blocks before ``send`` returned or raised; D must not expose
its destination blocks before ``fut`` is DONE, and frees them when it raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence

from libs.kvtransfer.align import CopyOp, align, num_blocks_of, num_calls
from libs.kvtransfer.base import (
    AgentInfo,
    Transport,
    TransferError,
    TransferMode,
    TransferState,
)
from libs.kvtransfer.layout import LayoutMismatch
from libs.kvtransfer.pool import KVPool
from libs.protocol.messages import TransferReport

log = logging.getLogger(__name__)

Rendezvous = Callable[[str, bytes], Awaitable[bytes]]
TRANSPORTS = ("cuda_ipc", "nccl", "shm", "tcp")
_MAX_RECORDS = 4096  # finished transfers kept for stats() lookups


def host_id() -> str:
    """Hostname plus boot id: equal for two processes of one host, different across hosts."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"


def choose_transport(local: AgentInfo, peer: AgentInfo, force: str | None = None) -> str:
    """The transport two agents use; symmetric, so both sides pick the same one.

    Same host and both CUDA -> ``cuda_ipc``; same host, both CPU, both pools shared ->
    ``shm``; both CUDA on different hosts, both with NCCL -> ``nccl``; else ``tcp``.

    Args:
        force: a transport name to use regardless (``FLOWKV_KV_TRANSPORT`` sets it for agents).
    """
    if force:
        if force not in TRANSPORTS:
            raise ValueError(f"unknown transport {force!r}; known: {TRANSPORTS}")
        return force
    same_host = local.host_id == peer.host_id
    if same_host and local.is_cuda and peer.is_cuda and local.cuda_ipc_handle and peer.cuda_ipc_handle:
        return "cuda_ipc"
    if same_host and not local.is_cuda and not peer.is_cuda and local.shm_name and peer.shm_name:
        return "shm"
    if not same_host and local.is_cuda and peer.is_cuda and local.nccl_available and peer.nccl_available:
        return "nccl"
    return "tcp"


class _Record:
    __slots__ = ("state", "reason", "stats", "role", "completed")

    def __init__(self, role: str) -> None:
        self.role = role
        self.state = TransferState.PENDING
        self.reason = ""
        self.stats: TransferReport | None = None
        self.completed: asyncio.Future[None] | None = None


class KVAgent:
    """The node's end of every KV hand-off.

    Args:
        pool: the node's KV pool (shared CPU pool for ``shm``, CUDA pool for ``cuda_ipc``/``nccl``).
        node_id: this node's id.
        rendezvous: ``rendezvous(peer_node_id, payload) -> reply`` (NATS request/reply to the
            peer's ``handle_rendezvous``); needed for ``nccl``.
        host_id: override the detected host id (tests).
        tcp_host: address the TCP server listens on and advertises.
        tcp_port: its port (0: any free one).
        enable: transports to enable (default: every one the pool supports).
        force_transport: always use this transport (default ``$FLOWKV_KV_TRANSPORT``).
    """

    def __init__(
        self,
        pool: KVPool,
        node_id: str,
        rendezvous: Rendezvous | None = None,
        host_id: str | None = None,
        tcp_host: str = "127.0.0.1",
        tcp_port: int = 0,
        enable: Iterable[str] | None = None,
        force_transport: str | None = None,
    ) -> None:
        self.pool = pool
        self.node_id = node_id
        self.host_id = host_id or globals()["host_id"]()
        self.force_transport = force_transport or os.environ.get("FLOWKV_KV_TRANSPORT") or None
        self._rendezvous = rendezvous
        self._tcp_addr = (tcp_host, tcp_port)
        self._enable = set(enable) if enable is not None else None
        self.transports: dict[str, Transport] = {}
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._info: AgentInfo | None = None

    # -------------------------------------------------------------- life cycle

    def _wanted(self, name: str) -> bool:
        return self._enable is None or name in self._enable

    async def start(self) -> None:
        """Start the transports (the TCP server, the CUDA IPC export, NCCL readiness)."""
        from libs.kvtransfer.transports.tcp import TcpTransport

        if self._wanted("tcp"):
            self.transports["tcp"] = TcpTransport(self.pool, self.node_id, *self._tcp_addr)
        if self._wanted("shm") and self.pool.shm_name is not None:
            from libs.kvtransfer.transports.shm import ShmTransport

            self.transports["shm"] = ShmTransport(self.pool, self.node_id)
        if self.pool.device.type == "cuda":
            if self._wanted("cuda_ipc"):
                from libs.kvtransfer.transports.cuda_ipc import CudaIpcTransport

                self.transports["cuda_ipc"] = CudaIpcTransport(self.pool, self.node_id)
            if self._wanted("nccl") and self._rendezvous is not None:
                from libs.kvtransfer.transports.nccl import NcclTransport, nccl_available

                if nccl_available():
                    self.transports["nccl"] = NcclTransport(self.pool, self.node_id, self._rendezvous)
        for transport in self.transports.values():
            await transport.start()

    async def close(self) -> None:
        """Fail transfers in flight and release every transport."""
        for tid, rec in list(self._records.items()):
            if rec.state in (TransferState.PENDING, TransferState.TRANSFERRING):
                self.abort(tid, f"{self.node_id} closed")
        for transport in self.transports.values():
            await transport.close()

    def info(self) -> AgentInfo:
        """What a peer needs to reach this node's pool (built once, after ``start``)."""
        if self._info is None:
            device = str(self.pool.device)
            if device == "cuda":
                device = f"cuda:{self.pool.device.index or 0}"
            fields: dict[str, object] = {}
            for transport in self.transports.values():
                fields.update(transport.info_fields())
            fields["nccl_available"] = "nccl" in self.transports
            self._info = AgentInfo(
                node_id=self.node_id, host_id=self.host_id, device=device, layout=self.pool.layout,
                num_blocks=self.pool.num_blocks, **fields,  # type: ignore[arg-type]
            )
        return self._info

    def check_peer(self, peer: AgentInfo) -> None:
        """Raise :class:`LayoutMismatch` naming both nodes unless the peer's blocks equal ours."""
        self.pool.layout.check_compatible(peer.layout, local=self.node_id, peer=peer.node_id)

    def transport_for(self, peer: AgentInfo) -> Transport:
        name = choose_transport(self.info(), peer, self.force_transport)
        transport = self.transports.get(name)
        if transport is None:
            raise TransferError(f"transport {name} is not enabled on {self.node_id}")
        return transport

    # --------------------------------------------------------------- transfers

    def state(self, transfer_id: str) -> TransferState | None:
        rec = self._records.get(transfer_id)
        return rec.state if rec else None

    def reason(self, transfer_id: str) -> str:
        rec = self._records.get(transfer_id)
        return rec.reason if rec else ""

    def stats(self, transfer_id: str) -> TransferReport | None:
        """The counters of a finished transfer (kept for the last few thousand)."""
        rec = self._records.get(transfer_id)
        return rec.stats if rec else None

    def _new_record(self, transfer_id: str, role: str) -> _Record:
        old = self._records.get(transfer_id)
        if old is not None and old.state in (TransferState.PENDING, TransferState.TRANSFERRING):
            raise TransferError(f"transfer {transfer_id} is already in flight on {self.node_id}")
        rec = _Record(role)
        self._records[transfer_id] = rec
        self._records.move_to_end(transfer_id)
        while len(self._records) > _MAX_RECORDS:
            oldest, orec = next(iter(self._records.items()))
            if orec.state in (TransferState.PENDING, TransferState.TRANSFERRING):
                break
            del self._records[oldest]
        return rec

    def _plan(self, peer: AgentInfo, src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[CopyOp]:
        try:
            self.check_peer(peer)
            return align(src_ids, dst_ids)
        except (LayoutMismatch, ValueError) as exc:
            raise TransferError(str(exc)) from exc

    def _finish(self, rec: _Record, transport: str, mode: TransferMode, ops: list[CopyOp], t0: float) -> TransferReport:
        rec.stats = TransferReport(
            transport=transport, mode=mode.value, calls=num_calls(ops, self.pool.layout, mode),
            bytes=num_blocks_of(ops) * self.pool.layout.block_bytes, segments=len(ops),
            duration_s=time.perf_counter() - t0,
        )
        rec.state = TransferState.DONE
        return rec.stats

    def _fail(self, rec: _Record, reason: str) -> TransferError:
        if rec.state != TransferState.FAILED:
            rec.state, rec.reason = TransferState.FAILED, reason
        return TransferError(rec.reason)

    async def send(
        self,
        transfer_id: str,
        peer: AgentInfo,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        mode: TransferMode = TransferMode.MERGED,
        timeout: float = 30.0,
    ) -> TransferReport:
        """P side: move the request's KV into the peer's blocks.

        Returns:
            The transfer's stats, once the bytes are in the peer's pool.

        Raises:
            TransferError: layout mismatch, bad ids, timeout, peer lost or abort (FAILED).
        """
        rec = self._new_record(transfer_id, "send")
        t0 = time.perf_counter()
        try:
            ops = self._plan(peer, src_block_ids, dst_block_ids)
            transport = self.transport_for(peer)
            rec.state = TransferState.TRANSFERRING
            await asyncio.wait_for(transport.send(transfer_id, peer, ops, mode), timeout)
        except asyncio.TimeoutError:
            raise self._fail(rec, f"send {transfer_id} to {peer.node_id} timed out after {timeout}s") from None
        except TransferError as exc:
            raise self._fail(rec, exc.reason) from exc
        except asyncio.CancelledError:
            self._fail(rec, "cancelled")
            raise
        except Exception as exc:  # a transport bug must still end the state machine
            log.exception("send %s failed", transfer_id)
            raise self._fail(rec, f"{type(exc).__name__}: {exc}") from exc
        if rec.state == TransferState.FAILED:  # aborted while the last bytes were moving
            raise TransferError(rec.reason)
        return self._finish(rec, transport.name, mode, ops, t0)

    def expect(
        self,
        transfer_id: str,
        peer: AgentInfo,
        dst_block_ids: Sequence[int],
        src_block_ids: Sequence[int],
        mode: TransferMode = TransferMode.MERGED,
        timeout: float = 30.0,
    ) -> asyncio.Future[TransferReport]:
        """D side: a future that resolves with the stats once the bytes have landed.

        The future raises :class:`TransferError` on timeout, abort or a lost peer. Call it
        from the event loop, before telling P where to write.
        """
        rec = self._new_record(transfer_id, "expect")
        return asyncio.ensure_future(self._expect(transfer_id, rec, peer, dst_block_ids, src_block_ids, mode, timeout))

    async def _expect(self, transfer_id: str, rec: _Record, peer: AgentInfo, dst_ids: Sequence[int],
                      src_ids: Sequence[int], mode: TransferMode, timeout: float) -> TransferReport:
        t0 = time.perf_counter()
        rec.completed = asyncio.get_running_loop().create_future()
        try:
            ops = self._plan(peer, src_ids, dst_ids)
            transport = self.transport_for(peer)
            rec.state = TransferState.TRANSFERRING
            if transport.one_sided:
                await asyncio.wait_for(asyncio.shield(rec.completed), timeout)
            else:
                receive = asyncio.ensure_future(transport.receive(transfer_id, peer, ops, mode))
                await self._await_receive(rec, receive, timeout)
                receive.result()
        except asyncio.TimeoutError:
            self._abort_transports(transfer_id, "timed out")
            raise self._fail(rec, f"expect {transfer_id} from {peer.node_id} timed out after {timeout}s") from None
        except TransferError as exc:
            raise self._fail(rec, exc.reason) from exc
        if rec.state == TransferState.FAILED:
            raise TransferError(rec.reason)
        return self._finish(rec, transport.name, mode, ops, t0)

    async def _await_receive(self, rec: _Record, receive: asyncio.Future[None], timeout: float) -> None:
        """Wait for a two-sided receive; ``complete()`` does not end it early, ``abort()`` does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert rec.completed is not None
        while not receive.done() and rec.state != TransferState.FAILED:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            watch = {receive} if rec.completed.done() else {receive, rec.completed}
            await asyncio.wait(watch, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if not receive.done():
            receive.cancel()
            if rec.state == TransferState.FAILED:
                raise TransferError(rec.reason)
            raise asyncio.TimeoutError

    def complete(self, transfer_id: str) -> None:
        """D side: the sender said the bytes are in (one-sided transports resolve here)."""
        rec = self._records.get(transfer_id)
        if rec is None or rec.completed is None:
            raise KeyError(f"{self.node_id} expects no transfer {transfer_id}")
        if not rec.completed.done():
            rec.completed.set_result(None)

    def abort(self, transfer_id: str, reason: str) -> None:
        """Fail a transfer in flight on this side (its ``send``/future raises ``reason``)."""
        rec = self._records.get(transfer_id)
        if rec is None or rec.state in (TransferState.DONE, TransferState.FAILED):
            return
        self._fail(rec, reason)
        if rec.completed is not None and not rec.completed.done():
            rec.completed.set_exception(TransferError(reason))
            rec.completed.exception()  # the record carries the reason; no "never retrieved" log
        self._abort_transports(transfer_id, reason)

    def _abort_transports(self, transfer_id: str, reason: str) -> None:
        for transport in self.transports.values():
            transport.abort(transfer_id, reason)

    # --------------------------------------------------------------- rendezvous

    def handle_rendezvous(self, payload: bytes) -> bytes:
        """Answer a peer's NCCL rendezvous request (wire it to a NATS reply handler)."""
        transport = self.transports.get("nccl")
        if transport is None:
            from libs.kvtransfer.transports.nccl import rendezvous_refusal

            return rendezvous_refusal(f"{self.node_id} has no NCCL transport")
        return transport.handle_rendezvous(payload)  # type: ignore[attr-defined]

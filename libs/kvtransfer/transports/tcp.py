"""``tcp``: any two pools, over one TCP connection per transfer (also the host-staging path).

Wire format (no pickle; msgpack via msgspec for the small frames):

1. P -> D  ``b"FKV1"`` + u32 length + :class:`TcpHeader` (transfer id, sender, layout,
   mode, ops, total bytes).
2. P -> D  the bytes of every piece of ``expand(ops, layout, mode)``, in order, rows packed.
3. D -> P  u32 length + :class:`TcpAck` after the last byte was written into D's pool.

D checks the header against the transfer it expects (same layout, same ops, same mode)
and writes the bytes straight into its pool's blocks (a CUDA pool is filled through a
pinned host buffer). ``send`` returns only after the ack, so the bytes have landed. A lost
connection or a timeout fails the transfer on both sides with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence

import msgspec
import numpy as np
import torch

from libs.kvtransfer.align import CopyOp, Piece, check_bounds, expand, host_copy_, piece_view
from libs.kvtransfer.base import AgentInfo, Transport, TransferError, TransferMode
from libs.kvtransfer.layout import KVLayout
from libs.kvtransfer.pool import KVPool

MAGIC = b"FKV1"
_LEN = struct.Struct("!I")
CHUNK_BYTES = 4 << 20  # bounds the staging memory and keeps the loop responsive
REGISTER_WAIT_S = 10.0  # how long a header may wait for D's expect() to register


class TcpHeader(msgspec.Struct, frozen=True):
    transfer_id: str
    sender: str
    layout: KVLayout
    mode: str
    ops: list[CopyOp]
    nbytes: int


class TcpAck(msgspec.Struct, frozen=True):
    ok: bool
    reason: str = ""


def encode_header(header: TcpHeader) -> bytes:
    payload = msgspec.msgpack.encode(header)
    return MAGIC + _LEN.pack(len(payload)) + payload


async def read_header(reader: asyncio.StreamReader) -> TcpHeader:
    magic = await reader.readexactly(4)
    if magic != MAGIC:
        raise TransferError(f"bad frame magic {magic!r}")
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return msgspec.msgpack.decode(await reader.readexactly(length), type=TcpHeader)


def _encode_ack(ack: TcpAck) -> bytes:
    payload = msgspec.msgpack.encode(ack)
    return _LEN.pack(len(payload)) + payload


async def _read_ack(reader: asyncio.StreamReader) -> TcpAck:
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return msgspec.msgpack.decode(await reader.readexactly(length), type=TcpAck)


def _row_batches(p: Piece) -> list[Piece]:
    """Split a piece into sub-pieces of at most ~CHUNK_BYTES (whole rows for strided pieces)."""
    if p.height == 1:
        return [
            Piece(p.src_offset + o, p.dst_offset + o, min(CHUNK_BYTES, p.width - o))
            for o in range(0, p.width, CHUNK_BYTES)
        ]
    rows = max(1, CHUNK_BYTES // p.width)
    return [
        Piece(p.src_offset + r * p.pitch, p.dst_offset + r * p.pitch, p.width, min(rows, p.height - r), p.pitch)
        for r in range(0, p.height, rows)
    ]


class _Expectation:
    def __init__(self, peer: str, ops: list[CopyOp], mode: TransferMode) -> None:
        self.peer = peer
        self.ops = ops
        self.mode = mode
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class TcpTransport(Transport):
    """Runs the receiving server; sends by connecting to the peer's server.

    Args:
        pool: the local pool.
        node_id: the local node id.
        host: address to listen on (and to advertise).
        port: port to listen on; 0 picks a free one.
    """

    name = "tcp"

    def __init__(self, pool: KVPool, node_id: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(pool, node_id)
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._expected: dict[str, _Expectation] = {}
        self._registered = asyncio.Condition()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=CHUNK_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    def info_fields(self) -> dict[str, object]:
        return {"tcp_host": self.host, "tcp_port": self.port}

    # ------------------------------------------------------------------ sender

    async def send(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        check_bounds(ops, self.pool.num_blocks, peer.num_blocks)
        pieces = expand(ops, self.pool.layout, mode, src_blocks=self.pool.num_blocks)
        header = TcpHeader(transfer_id, self.node_id, self.pool.layout, mode.value, list(ops),
                           sum(p.nbytes for p in pieces))
        try:
            reader, writer = await asyncio.open_connection(peer.tcp_host, peer.tcp_port, limit=CHUNK_BYTES)
        except OSError as exc:
            raise TransferError(f"cannot reach {peer.node_id} at {peer.tcp_host}:{peer.tcp_port}: {exc}") from exc
        try:
            writer.write(encode_header(header))
            try:
                await self._write_pieces(writer, pieces)
            except (ConnectionError, OSError) as exc:
                # D may have refused the header and closed; its ack carries the reason.
                ack = await asyncio.wait_for(_read_ack(reader), 1.0)
                raise TransferError(ack.reason or f"connection to {peer.node_id} lost: {exc}") from exc
            ack = await _read_ack(reader)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
            raise TransferError(f"connection to {peer.node_id} lost before its ack: {exc!r}") from exc
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if not ack.ok:
            raise TransferError(f"{peer.node_id} refused transfer {transfer_id}: {ack.reason}")

    async def _write_pieces(self, writer: asyncio.StreamWriter, pieces: list[Piece]) -> None:
        src = self.pool.byte_view()
        for piece in pieces:
            for sub in _row_batches(piece):
                view = piece_view(src, sub.src_offset, sub.width, sub.height, sub.pitch)
                if view.is_cuda:
                    data = view.cpu().contiguous().numpy()
                else:  # numpy packs the rows on this thread (see host_copy_)
                    data = np.ascontiguousarray(view.numpy())
                writer.write(memoryview(data).cast("B"))
                await writer.drain()

    # ---------------------------------------------------------------- receiver

    async def receive(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        check_bounds(ops, peer.num_blocks, self.pool.num_blocks)
        exp = _Expectation(peer.node_id, list(ops), mode)
        self._expected[transfer_id] = exp
        async with self._registered:
            self._registered.notify_all()
        try:
            await exp.done
        finally:
            self._expected.pop(transfer_id, None)
            if not exp.done.done():
                exp.done.cancel()

    def abort(self, transfer_id: str, reason: str) -> None:
        exp = self._expected.pop(transfer_id, None)
        if exp is not None and not exp.done.done():
            exp.done.set_exception(TransferError(reason))

    async def _wait_registered(self, transfer_id: str) -> _Expectation | None:
        async def registered() -> _Expectation:
            async with self._registered:
                await self._registered.wait_for(lambda: transfer_id in self._expected)
            return self._expected[transfer_id]

        try:
            return await asyncio.wait_for(registered(), REGISTER_WAIT_S)
        except asyncio.TimeoutError:
            return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        exp: _Expectation | None = None
        try:
            header = await read_header(reader)
            exp = await self._wait_registered(header.transfer_id)
            reason = self._check_header(header, exp)
            if reason:
                writer.write(_encode_ack(TcpAck(False, reason)))
                await writer.drain()
                if exp is not None and not exp.done.done():
                    exp.done.set_exception(TransferError(reason))
                return
            assert exp is not None
            await self._read_pieces(reader, exp)
            if exp.done.done():  # aborted or timed out on this side while reading
                writer.write(_encode_ack(TcpAck(False, f"{self.node_id} gave up on {header.transfer_id}")))
                return
            writer.write(_encode_ack(TcpAck(True)))
            await writer.drain()
            exp.done.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, TransferError, msgspec.DecodeError) as exc:
            if exp is not None and not exp.done.done():
                exp.done.set_exception(TransferError(f"connection from {exp.peer} lost mid-transfer: {exc!r}"))
        finally:
            self._handlers.discard(task)
            writer.close()

    def _check_header(self, header: TcpHeader, exp: _Expectation | None) -> str:
        if exp is None:
            return f"{self.node_id} does not expect transfer {header.transfer_id}"
        if header.layout != self.pool.layout:
            try:
                self.pool.layout.check_compatible(header.layout, local=self.node_id, peer=header.sender)
            except ValueError as exc:
                return str(exc)
        if header.mode != exp.mode.value or header.ops != exp.ops:
            return f"transfer {header.transfer_id}: {header.sender}'s plan differs from {self.node_id}'s"
        return ""

    async def _read_pieces(self, reader: asyncio.StreamReader, exp: _Expectation) -> int:
        dst = self.pool.byte_view()
        staging = None
        if dst.is_cuda:
            staging = torch.empty(CHUNK_BYTES + 1, dtype=torch.uint8, pin_memory=True)
        received = 0
        for piece in expand(exp.ops, self.pool.layout, exp.mode, dst_blocks=self.pool.num_blocks):
            for sub in _row_batches(piece):
                data = await reader.readexactly(sub.nbytes)
                if exp.done.done():
                    return received
                # bytearray: torch wants a writable buffer; one memcpy next to a socket read.
                rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(sub.height, sub.width)
                target = piece_view(dst, sub.dst_offset, sub.width, sub.height, sub.pitch)
                if staging is not None:
                    stage = staging[: sub.nbytes].view(sub.height, sub.width)
                    stage.copy_(rows)
                    target.copy_(stage, non_blocking=True)
                    torch.cuda.current_stream(dst.device).synchronize()
                else:
                    host_copy_(target, rows)
                received += sub.nbytes
        return received

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for exp in self._expected.values():
            if not exp.done.done():
                exp.done.set_exception(TransferError(f"{self.node_id} closed"))
        self._expected.clear()

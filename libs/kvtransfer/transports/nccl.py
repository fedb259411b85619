"""``nccl``: CUDA pools on different hosts, through pairwise 2-rank NCCL communicators.

Per P–D pair, created lazily on the first send: the sender makes a unique id, sends it
through the ``rendezvous`` callback (NATS request/reply to the peer's
``KVAgent.handle_rendezvous``) and both ranks initialise (sender rank 0, receiver rank 1).
Nothing here enables NVLink multicast; hosts without it need ``NCCL_NVLS_ENABLE=0``
(``benchmarks/gpu/env.sh`` sets it).

Messages on a pair's communicator, in order (one sender lock per pair keeps them whole):

1. an 8-byte header length, then the msgpack header (transfer id, mode, ops, bytes);
2. the pieces of the plan as one grouped send/recv (``groupStart``/``groupEnd``); a
   layer-wise strided piece is packed into a contiguous buffer first (NCCL sends spans).

The receiver's loop per pair reads each header, waits for the matching ``expect`` and
posts the recvs straight into its pool. A peer that dies leaves NCCL waiting: the
timeouts fail the transfer, ``abort`` aborts the communicator and the pair is rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from libs.kvtransfer.align import CopyOp, Piece, check_bounds, expand, piece_view
from libs.kvtransfer.base import AgentInfo, Transport, TransferError, TransferMode

_GROUP = 1024  # ops per NCCL group; bounds NCCL's per-group bookkeeping
_LEN = struct.Struct("<Q")
EXPECT_WAIT_S = 30.0


class _Hello(msgspec.Struct, frozen=True):
    sender: str
    uid: list[int]


class _Reply(msgspec.Struct, frozen=True):
    ok: bool
    reason: str = ""


class _Header(msgspec.Struct, frozen=True):
    transfer_id: str
    mode: str
    ops: list[CopyOp]
    nbytes: int


def nccl_available() -> bool:
    try:
        from cupy.cuda import nccl  # noqa: F401
    except Exception:
        return False
    return True


def rendezvous_refusal(reason: str) -> bytes:
    return msgspec.msgpack.encode(_Reply(False, reason))


class _Pair:
    def __init__(self) -> None:
        self.comm: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.lock = asyncio.Lock()
        self.loop_task: asyncio.Task[None] | None = None


class NcclTransport(Transport):
    name = "nccl"

    def __init__(self, pool: Any, node_id: str, rendezvous: Any) -> None:
        super().__init__(pool, node_id)
        from cupy.cuda import nccl

        self._nccl = nccl
        self._rendezvous = rendezvous
        self.device = pool.device.index if pool.device.index is not None else 0
        self._stream = torch.cuda.Stream(self.device)
        self._pairs: dict[str, _Pair] = {}
        self._expected: dict[str, tuple[list[CopyOp], TransferMode, asyncio.Future[None]]] = {}
        self._expected_from: dict[str, str] = {}  # transfer id -> sending node
        self._registered = asyncio.Condition()

    def _init_comm(self, uid: list[int], rank: int) -> Any:
        # cupy >= 13 takes the unique id as bytes; older releases took a tuple of ints.
        with torch.cuda.device(self.device):
            try:
                return self._nccl.NcclCommunicator(2, bytes(x & 0xFF for x in uid), rank)
            except TypeError:
                return self._nccl.NcclCommunicator(2, tuple(uid), rank)

    # ------------------------------------------------------------- rendezvous

    async def _pair_for(self, peer: AgentInfo) -> Any:
        pair = self._pairs.get(peer.node_id)
        if pair is None:
            pair = self._pairs[peer.node_id] = _Pair()
            try:
                uid = list(self._nccl.get_unique_id())
                reply = msgspec.msgpack.decode(
                    await self._rendezvous(peer.node_id, msgspec.msgpack.encode(_Hello(self.node_id, uid))), type=_Reply)
                if not reply.ok:
                    raise TransferError(f"{peer.node_id} refused NCCL rendezvous: {reply.reason}")
                pair.comm.set_result(await asyncio.to_thread(self._init_comm, uid, 0))
            except Exception as exc:
                self._pairs.pop(peer.node_id, None)
                err = exc if isinstance(exc, TransferError) else TransferError(
                    f"NCCL setup with {peer.node_id} failed: {exc!r}")
                pair.comm.set_exception(err)
                pair.comm.exception()
                raise err from exc
        return await asyncio.shield(pair.comm)

    def handle_rendezvous(self, payload: bytes) -> bytes:
        """Rank 1: start joining the communicator in the background and say yes at once."""
        hello = msgspec.msgpack.decode(payload, type=_Hello)
        old = self._pairs.pop(hello.sender, None)
        if old is not None and old.loop_task is not None:
            old.loop_task.cancel()
        pair = self._pairs[hello.sender] = _Pair()
        pair.loop_task = asyncio.ensure_future(self._receive_loop(hello, pair))
        return msgspec.msgpack.encode(_Reply(True))

    # ---------------------------------------------------------------- sending

    def _run(self, comm: Any, fn: Any) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            fn(comm, self._stream.cuda_stream)
            self._stream.synchronize()

    def _grouped(self, comm: Any, stream: int, bufs: Sequence[tuple[int, int]], send: bool) -> None:
        for i in range(0, len(bufs), _GROUP):
            self._nccl.groupStart()
            for ptr, nbytes in bufs[i : i + _GROUP]:
                if send:
                    comm.send(ptr, nbytes, self._nccl.NCCL_UINT8, 1 - comm.rank_id(), stream)
                else:
                    comm.recv(ptr, nbytes, self._nccl.NCCL_UINT8, 1 - comm.rank_id(), stream)
            self._nccl.groupEnd()

    def _send_all(self, comm: Any, stream: int, header: bytes, pieces: list[Piece]) -> None:
        head = torch.frombuffer(bytearray(_LEN.pack(len(header)) + header), dtype=torch.uint8).cuda(self.device)
        self._grouped(comm, stream, [(head.data_ptr(), 8)], True)
        self._grouped(comm, stream, [(head.data_ptr() + 8, len(header))], True)
        src = self.pool.byte_view()
        keep = []  # packed strided pieces must outlive the grouped send
        bufs = []
        for p in pieces:
            view = piece_view(src, p.src_offset, p.width, p.height, p.pitch)
            if p.height > 1:
                view = view.contiguous()
                keep.append(view)
            bufs.append((view.data_ptr(), p.nbytes))
        self._grouped(comm, stream, bufs, True)
        del keep

    async def send(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        check_bounds(ops, self.pool.num_blocks, peer.num_blocks)
        comm = await self._pair_for(peer)
        pieces = expand(ops, self.pool.layout, mode, src_blocks=self.pool.num_blocks)
        header = msgspec.msgpack.encode(_Header(transfer_id, mode.value, list(ops), sum(p.nbytes for p in pieces)))
        async with self._pairs[peer.node_id].lock:
            await asyncio.to_thread(self._run, comm, lambda c, s: self._send_all(c, s, header, pieces))

    # -------------------------------------------------------------- receiving

    async def receive(self, transfer_id: str, peer: AgentInfo, ops: Sequence[CopyOp], mode: TransferMode) -> None:
        check_bounds(ops, peer.num_blocks, self.pool.num_blocks)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._expected[transfer_id] = (list(ops), mode, done)
        self._expected_from[transfer_id] = peer.node_id
        async with self._registered:
            self._registered.notify_all()
        try:
            await done
        finally:
            self._expected.pop(transfer_id, None)
            self._expected_from.pop(transfer_id, None)

    def _recv_small(self, comm: Any, nbytes: int) -> bytes:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._run(comm, lambda c, s: self._grouped(c, s, [(buf.data_ptr(), nbytes)], False))
        return buf.cpu().numpy().tobytes()

    def _recv_pieces(self, comm: Any, pieces: list[Piece] | None, nbytes: int) -> None:
        dst = self.pool.byte_view()
        if pieces is None:  # nobody expects it: drain to keep the stream in step
            sink = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._run(comm, lambda c, s: self._grouped(c, s, [(sink.data_ptr(), nbytes)], False))
            return
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        bufs = []
        for p in pieces:
            view = piece_view(dst, p.dst_offset, p.width, p.height, p.pitch)
            if p.height > 1:
                tmp = torch.empty(p.height, p.width, dtype=torch.uint8, device=self.device)
                staged.append((view, tmp))
                view = tmp
            bufs.append((view.data_ptr(), p.nbytes))

        def work(c: Any, s: int) -> None:
            self._grouped(c, s, bufs, False)
            for view, tmp in staged:
                view.copy_(tmp)

        self._run(comm, work)

    async def _receive_loop(self, hello: _Hello, pair: _Pair) -> None:
        try:
            comm = await asyncio.to_thread(self._init_comm, hello.uid, 1)
            pair.comm.set_result(comm)
            while True:
                # Post the next header receive only while a transfer from this peer is
                # expected: an idle posted receive keeps an NCCL kernel spinning on the
                # GPU (taking SMs from decode), and on the H100s a process with one
                # outstanding stopped answering other CUDA work (2026-11-27).
                async with self._registered:
                    await self._registered.wait_for(lambda: hello.sender in self._expected_from.values())
                (length,) = _LEN.unpack(await asyncio.to_thread(self._recv_small, comm, 8))
                header = msgspec.msgpack.decode(await asyncio.to_thread(self._recv_small, comm, length), type=_Header)
                exp = await self._wait_expected(header.transfer_id)
                ok = exp is not None and exp[0] == header.ops and exp[1].value == header.mode
                pieces = (expand(exp[0], self.pool.layout, exp[1], dst_blocks=self.pool.num_blocks)
                          if ok and exp is not None else None)
                await asyncio.to_thread(self._recv_pieces, comm, pieces, header.nbytes)
                # Forget the expectation before resolving it: the loop's next wait must
                # not see it and post a receive for a transfer that already landed.
                self._expected_from.pop(header.transfer_id, None)
                if exp is not None and not exp[2].done():
                    if ok:
                        exp[2].set_result(None)
                    else:
                        exp[2].set_exception(TransferError(f"{hello.sender}'s plan for {header.transfer_id} differs"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for _, _, fut in self._expected.values():
                if not fut.done():
                    fut.set_exception(TransferError(f"NCCL link to {hello.sender} failed: {exc!r}"))

    async def _wait_expected(self, transfer_id: str) -> tuple[list[CopyOp], TransferMode, asyncio.Future[None]] | None:
        async def registered() -> None:
            async with self._registered:
                await self._registered.wait_for(lambda: transfer_id in self._expected)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(registered(), EXPECT_WAIT_S)
        return self._expected.get(transfer_id)

    def abort(self, transfer_id: str, reason: str) -> None:
        exp = self._expected.pop(transfer_id, None)
        self._expected_from.pop(transfer_id, None)
        if exp is not None and not exp[2].done():
            exp[2].set_exception(TransferError(reason))

    async def close(self) -> None:
        for pair in self._pairs.values():
            if pair.loop_task is not None:
                pair.loop_task.cancel()
            if pair.comm.done() and not pair.comm.exception():
                with contextlib.suppress(Exception):
                    pair.comm.result().abort()
        self._pairs.clear()

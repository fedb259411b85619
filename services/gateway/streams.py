"""StreamRouter: the gateway's one token subscription, demultiplexed per request.

Life of a chunk:
1. a node publishes a ``TokenChunk`` on ``stream(gateway_id)``;
2. the router finds the open :class:`RequestStream` by ``request_id`` (unknown ids are dropped:
   a request that already ended, or an earlier attempt of a retried one);
3. the stream drops chunks from nodes not serving the current attempt (a ``handoff_to``
   notice from one of them adds the decode node the hand-off moved to), then orders the
   rest by ``index``: tokens it already delivered are dropped, chunks from the future wait
   in a bounded buffer until the gap before them is filled;
4. the ordered tokens (and the end, or a node error) go to the request's queue, which the
   dispatcher reads.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs.protocol import subjects
from libs.protocol.messages import ErrorCode, TokenChunk, TokenLogprob
from services.common.messaging import subscribe

log = logging.getLogger(__name__)

MAX_PENDING_CHUNKS = 1024  # out-of-order chunks held per request before we call it a failure


@dataclass
class Delivery:
    """Tokens in order, continuing exactly where the previous delivery stopped."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error_code: ErrorCode | None = None  # a node reported the request failed
    error: str = ""
    node_id: str = ""
    prefill_s: float = 0.0  # the engine's prefill time, on the delivery of the first token (TokenChunk.prefill_s)
    queued_s: float = 0.0  # on an attempt's first delivery: its wait in the scheduler's queue (Placement.queued_s)


@dataclass
class RequestStream:
    """One attempt of one request: orders its chunks and queues :class:`Delivery` items.

    Args:
        request_id: the wire id of this attempt.
        node_ids: nodes serving this attempt; chunks from others are ignored. A chunk with
            ``handoff_to`` from one of them adds that node (the hand-off moved there).
        next_index: index of the first output token this attempt must deliver.
    """

    request_id: str
    node_ids: frozenset[str]
    next_index: int = 0
    queue: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    moved_to: str = ""  # the decode node a refused hand-off moved to (``TokenChunk.handoff_to``)
    _pending: dict[int, TokenChunk] = field(default_factory=dict)
    _done: bool = False

    def push(self, chunk: TokenChunk) -> None:
        """Take one chunk off the wire (any order, duplicates allowed)."""
        if self._done or (self.node_ids and chunk.node_id not in self.node_ids):
            return
        if chunk.handoff_to:
            self.node_ids = self.node_ids | {chunk.handoff_to}
            self.moved_to = chunk.handoff_to
            return
        if chunk.code is not None:
            self._finish(Delivery([], error_code=chunk.code, error=chunk.error or chunk.code.value, node_id=chunk.node_id))
            return
        if chunk.index > self.next_index:
            if len(self._pending) >= MAX_PENDING_CHUNKS:
                self._finish(Delivery([], error_code=ErrorCode.INTERNAL, error="too many out-of-order chunks", node_id=chunk.node_id))
                return
            self._pending.setdefault(chunk.index, chunk)
            return
        self._deliver(chunk)
        while not self._done and self._pending:
            ready = [i for i in self._pending if i <= self.next_index]
            if not ready:
                break
            for i in sorted(ready):
                c = self._pending.pop(i)
                if not self._done:
                    self._deliver(c)

    def _deliver(self, chunk: TokenChunk) -> None:
        skip = self.next_index - chunk.index  # tokens of this chunk we already delivered
        new_ids = chunk.token_ids[skip:]
        if not new_ids and not chunk.finished:
            return
        if not new_ids and chunk.finished and skip > len(chunk.token_ids):
            return  # a finish marker positioned before the end we reached: stale
        logprobs = chunk.logprobs[skip:] if chunk.logprobs is not None else None
        self.next_index += len(new_ids)
        item = Delivery(
            new_ids, logprobs, chunk.finished, chunk.finish_reason, chunk.num_prompt_tokens, chunk.num_cached_tokens,
            node_id=chunk.node_id, prefill_s=chunk.prefill_s,
        )
        if chunk.finished:
            self._finish(item)
        else:
            self.queue.put_nowait(item)

    def _finish(self, item: Delivery) -> None:
        self._done = True
        self._pending.clear()
        self.queue.put_nowait(item)

    def fail(self, code: ErrorCode, error: str, node_id: str = "") -> None:
        """End this attempt from outside: ``node_id`` (if given) went down, the failure is laid on it."""
        if not self._done:
            self._finish(Delivery([], error_code=code, error=error, node_id=node_id))


class StreamRouter:
    """Owns the subscription to ``stream(gateway_id)`` and the open request streams."""

    def __init__(self, gateway_id: str) -> None:
        self.subject = subjects.stream(gateway_id)
        self._streams: dict[str, RequestStream] = {}
        self._sub: Subscription | None = None

    async def start(self, nc: Client) -> None:
        self._sub = await subscribe(nc, self.subject, self._on_chunk, (TokenChunk,))

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def open(self, request_id: str, node_ids: set[str], next_index: int) -> RequestStream:
        """Start receiving the chunks of ``request_id`` (before submitting it, so none is missed)."""
        stream = RequestStream(request_id, frozenset(node_ids), next_index)
        self._streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def fail_node(self, node_id: str, reason: str) -> int:
        """Fail every open stream served by ``node_id``; returns how many."""
        hit = [s for s in self._streams.values() if node_id in s.node_ids]
        for s in hit:
            s.fail(ErrorCode.NODE_FAILED, reason, node_id)  # blamed, whichever phase the attempt is in
        return len(hit)

    @property
    def num_open(self) -> int:
        return len(self._streams)

    async def _on_chunk(self, chunk: TokenChunk, msg: Msg) -> None:
        stream = self._streams.get(chunk.request_id)
        if stream is not None:
            stream.push(chunk)

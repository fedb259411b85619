"""The scheduler's wait queue: a request that no node can take now waits here for capacity.

A ``PlaceRequest`` with ``queue_timeout_s > 0`` that the policy answers ``OVERLOADED``
(no ready prefill node, no decode node with room for its KV, every prefill backlog past
``max_ttft_s``) is held instead of rejected, and placed when a load report, an expired
in-flight reservation or a role flip makes room. Waiting is first come, first served: the
head is tried first and the rest wait behind it, and a request that arrives while others
wait goes to the back without being tried, so a stream of small requests cannot starve a
large one. A request leaves with a ``Rejected`` once its own deadline passes (the smaller
of what it asked and ``max_wait_s``), when the nodes of its model are all gone
(``NO_NODES``), or silently when its requester cancels it.

Pure and clock-driven, like the policies: the service owns the replies (``handle``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libs.protocol.messages import ErrorCode, Placement, PlaceRequest, Rejected


@dataclass
class Waiting:
    """One held request: what the service needs to answer it, and why it waits."""

    req: PlaceRequest
    handle: Any
    since: float
    deadline: float
    last: Rejected  # the policy's latest answer, the reason given if it times out


class WaitQueue:
    """Requests waiting for a node with room, oldest first.

    Args:
        limit: most requests held at once; past it, a request is rejected at once.
        max_wait_s: cap on the wait a request may ask for (0: no request waits).
    """

    def __init__(self, limit: int, max_wait_s: float) -> None:
        self.limit = limit
        self.max_wait_s = max_wait_s
        self._waiting: OrderedDict[str, Waiting] = OrderedDict()
        self._earliest = math.inf  # no deadline passes before this (drain runs on every report)

    def __len__(self) -> int:
        return len(self._waiting)

    def wants(self, req: PlaceRequest) -> bool:
        """Whether ``req`` may wait. A decode re-placement (``prefill_node`` set) never does:
        its prompt's KV sits on a prefill node, which asks again itself."""
        return req.queue_timeout_s > 0 and self.max_wait_s > 0 and self.limit > 0 and not req.prefill_node

    def add(self, req: PlaceRequest, handle: Any, last: Rejected, now: float) -> bool:
        """Hold ``req`` at the back; False (and nothing held) when the queue is full."""
        if req.request_id in self._waiting:  # a resend of one still waiting: keep its place
            self._waiting[req.request_id].handle = handle
            return True
        if len(self._waiting) >= self.limit:
            return False
        wait = min(req.queue_timeout_s, self.max_wait_s)
        self._waiting[req.request_id] = Waiting(req, handle, now, now + wait, last)
        self._earliest = min(self._earliest, now + wait)
        return True

    def take_all(self) -> list[Waiting]:
        """Empty the queue, oldest first (the scheduler is stopping: it answers each)."""
        out = list(self._waiting.values())
        self._waiting.clear()
        self._earliest = math.inf
        return out

    def cancel(self, request_id: str) -> Waiting | None:
        """Drop a request whose requester gave up; it gets no answer."""
        return self._waiting.pop(request_id, None)

    def drain(self, place: Callable[[PlaceRequest], Placement | Rejected],
              now: float) -> list[tuple[Waiting, Placement | Rejected]]:
        """Answer what can be answered now, in order: every request past its deadline
        (``OVERLOADED`` with the last reason it was given), then from the head on, each
        that ``place`` places or finally rejects, up to the first it answers ``OVERLOADED``."""
        out: list[tuple[Waiting, Placement | Rejected]] = []
        if now >= self._earliest:
            for rid in [rid for rid, w in self._waiting.items() if w.deadline <= now]:
                w = self._waiting.pop(rid)
                out.append((w, Rejected(request_id=rid, code=ErrorCode.OVERLOADED, retry_after_s=w.last.retry_after_s,
                                        reason=f"{w.last.reason} (waited {now - w.since:.1f}s for capacity)")))
            self._earliest = min((w.deadline for w in self._waiting.values()), default=math.inf)
        while self._waiting:
            w = next(iter(self._waiting.values()))
            answer = place(w.req)
            if isinstance(answer, Rejected) and answer.code is ErrorCode.OVERLOADED:
                w.last = answer
                break
            del self._waiting[w.req.request_id]
            out.append((w, answer))
        return out

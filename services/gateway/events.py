"""The scheduler events this gateway saw, for ``/v1/cluster`` (see :mod:`services.gateway.cluster`).

The scheduler keeps no placements in its event history (too many), so the gateway keeps
its own bounded log of every event it receives, placements included. It is the gateway's
one subscription to ``sched_events()``: the dispatcher listens through it
(:meth:`EventLog.listen`) for ``node_down``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs.protocol import subjects
from libs.protocol.messages import SchedEvent
from services.common.messaging import subscribe


class EventLog:
    """The last ``maxlen`` scheduler events, newest last.

    Args:
        maxlen: how many events to keep.
    """

    def __init__(self, maxlen: int = 200) -> None:
        self.events: deque[SchedEvent] = deque(maxlen=maxlen)
        self._sub: Subscription | None = None
        self._listeners: list[Callable[[SchedEvent], Awaitable[None]]] = []

    def listen(self, listener: Callable[[SchedEvent], Awaitable[None]]) -> None:
        """Call ``listener`` with every event received from now on."""
        self._listeners.append(listener)

    async def start(self, nc: Client) -> None:
        self._sub = await subscribe(nc, subjects.sched_events(), self._on_event, (SchedEvent,))

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_event(self, event: SchedEvent, msg: Msg) -> None:
        self.events.append(event)
        for listener in self._listeners:
            await listener(event)

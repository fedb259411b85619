"""Subscriptions that decode FlowKV messages and drop (and count) anything else."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from libs.protocol import messages, subjects
from services.common.tracing import inject_headers

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024

DROPPED = Counter(
    "flowkv_messages_dropped_total",
    "NATS messages dropped because they were malformed, oversized or of the wrong kind",
    ["subject", "reason"],
)

Handler = Callable[[Any, Msg], Awaitable[None]]


def _subject_label(subject: str) -> str:
    # Bound label cardinality: node ids and gateway ids are folded away.
    parts = subject.split(".")
    if len(parts) >= 4 and parts[2] in ("node", "stream") and parts[3] not in ("load", "bye"):
        parts[3] = "*"
    return ".".join(parts)


async def subscribe(
    nc: Client,
    subject: str,
    handler: Handler,
    accept: tuple[type, ...],
    queue: str = "",
) -> Subscription:
    """Subscribe ``handler(message, msg)`` to ``subject`` for messages of the types in ``accept``.

    Garbage, oversized payloads and messages of other kinds are dropped and counted in
    ``flowkv_messages_dropped_total``; an exception in the handler is logged, never
    propagated into the NATS client.
    """

    async def on_msg(msg: Msg) -> None:
        if len(msg.data) > MAX_MESSAGE_BYTES:
            DROPPED.labels(_subject_label(msg.subject), "oversized").inc()
            return
        try:
            message = messages.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            DROPPED.labels(_subject_label(msg.subject), "malformed").inc()
            return
        if not isinstance(message, accept):
            DROPPED.labels(_subject_label(msg.subject), "unexpected").inc()
            return
        try:
            await handler(message, msg)
        except Exception:
            log.exception("handler for %s failed on %s", msg.subject, type(message).__name__)

    return await nc.subscribe(subject, queue=queue, cb=on_msg)


async def request(nc: Client, subject: str, message: messages.Message, timeout: float) -> Any:
    """Request/reply with a FlowKV message; returns the decoded reply.

    The current trace context goes along in the ``traceparent`` header, so the handler's
    spans join the caller's trace.
    """
    reply = await nc.request(subject, messages.encode(message), timeout=timeout, headers=inject_headers() or None)
    return messages.decode(reply.data)


async def ask_cluster(nc: Client, timeout: float, brief: bool = False) -> messages.ClusterState:
    """The scheduler's :class:`~libs.protocol.messages.ClusterState` (``sched.cluster``).

    Args:
        brief: without nodes and events (a liveness probe; counts only).

    Raises:
        TimeoutError, NoRespondersError, ...: as :func:`request` (no scheduler answered).
        TypeError: the reply is not a ClusterState.
    """
    reply = await request(nc, subjects.sched_cluster(), messages.ClusterQuery(brief=brief), timeout)
    if not isinstance(reply, messages.ClusterState):
        raise TypeError(f"the scheduler answered {type(reply).__name__}, not ClusterState")
    return reply


async def respond(msg: Msg, message: messages.Message) -> None:
    if msg.reply:
        await msg.respond(messages.encode(message))

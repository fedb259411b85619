"""Every NATS subject FlowKV uses, built in one place under a versioned prefix.

Never write a subject as a string literal elsewhere: call these functions. The
subjects and the messages on them are documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import re
from enum import Enum

PREFIX = "flowkv.v1"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class NodeVerb(str, Enum):
    """Request/reply verbs addressed to one node: ``flowkv.v1.node.<node_id>.<verb>``."""

    SUBMIT = "submit"  # gateway -> node: start a request (prefill, or whole generation)
    KV_ALLOC = "kv_alloc"  # prefill node -> decode node: reserve blocks for a hand-off
    KV_DONE = "kv_done"  # prefill node -> decode node: the KV has landed, decode now
    ROLE = "role"  # scheduler -> node: switch role
    NCCL = "nccl"  # node -> node: NCCL unique-id rendezvous


def check_token(value: str, what: str = "id") -> str:
    """Return ``value`` if it is safe as one subject token, else raise ValueError."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must match {_TOKEN.pattern} to be used in a NATS subject")
    return value


def node(node_id: str, verb: NodeVerb) -> str:
    """A node's request/reply subject for ``verb``."""
    return f"{PREFIX}.node.{check_token(node_id, 'node id')}.{verb.value}"


def node_load() -> str:
    """Load reports and heartbeats, published by every node a few times a second."""
    return f"{PREFIX}.node.load"


def node_bye() -> str:
    """Published by a node as it leaves (deregistration)."""
    return f"{PREFIX}.node.bye"


def sched_place() -> str:
    """Gateway -> scheduler request/reply: place a request on a (prefill, decode) pair."""
    return f"{PREFIX}.sched.place"


def sched_cluster() -> str:
    """Request/reply: the scheduler's view of the cluster (nodes, recent events)."""
    return f"{PREFIX}.sched.cluster"


def sched_events() -> str:
    """Published by the scheduler: placements, role flips, nodes joining and leaving."""
    return f"{PREFIX}.sched.events"


def sched_lease_bucket() -> str:
    """JetStream KV bucket (TTL'd) whose ``leader`` key is the scheduler replicas' lease."""
    return f"{PREFIX}.sched.lease".replace(".", "_")


def sched_state_bucket() -> str:
    """JetStream KV bucket whose ``state`` key the scheduler leader writes by compare-and-set."""
    return f"{PREFIX}.sched.state".replace(".", "_")


def request_cancel() -> str:
    """Broadcast: a request is cancelled; every node holding it aborts it and frees its blocks."""
    return f"{PREFIX}.req.cancel"


def stream(gateway_id: str) -> str:
    """Where nodes send a gateway the tokens of its requests."""
    return f"{PREFIX}.stream.{check_token(gateway_id, 'gateway id')}"


def all_subjects_of(node_id: str) -> list[str]:
    """Every subject a node subscribes to (for documentation and fuzz tests)."""
    return [node(node_id, verb) for verb in NodeVerb] + [request_cancel()]

"""The garbage the NATS fuzz test publishes: random bytes, truncated and mistyped
messages, and well-formed messages with absurd values, per subject.

Everything is built from a seeded ``random.Random``, so a failing run replays exactly.
"""

from __future__ import annotations

import math
import random

import msgspec

from libs.kvtransfer.base import AgentInfo
from libs.kvtransfer.layout import KVLayout
from libs.protocol import messages as m
from libs.protocol import subjects

HUGE_PROMPT = 200_000  # tokens: far beyond any model length or pool


def sampling() -> m.SamplingParams:
    return m.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def load_report(node_id: str, **absurd: object) -> m.LoadReport:
    fields: dict[str, object] = dict(
        node_id=node_id, role=m.Role.HYBRID, state=m.NodeState.READY, seq=1, started_at=1.0, model="tiny",
        device="cpu", device_name="cpu", device_memory_bytes=0, max_model_len=2048, block_size=4,
        kv_block_bytes=1024, total_blocks=256, free_blocks=256, largest_free_segment=256, num_waiting=0,
        waiting_prefill_tokens=0, num_running=0, num_held=0, prefill_tokens_per_s=1000.0, decode_step_s=0.01,
    )
    fields.update(absurd)
    return m.LoadReport(**fields)  # type: ignore[arg-type]


# The tiny preset's block with the test nodes' block size (tests/fuzz/procs.py).
TINY_LAYOUT = KVLayout(dtype="float32", num_layers=2, block_size=4, num_kv_heads=2, head_dim=16)


def fake_agent_info(node_id: str, layout: KVLayout = TINY_LAYOUT) -> bytes:
    """A peer that looks real but is not there: another host, a closed TCP port on loopback."""
    info = AgentInfo(node_id=node_id, host_id="ghost-host", device="cpu", layout=layout, num_blocks=256,
                     tcp_host="127.0.0.1", tcp_port=9)
    return msgspec.msgpack.encode(info)


def random_blobs(rng: random.Random) -> list[bytes]:
    return [b"", b"\x00", b"\xff" * 7, bytes(rng.getrandbits(8) for _ in range(64)),
            bytes(rng.getrandbits(8) for _ in range(4096)), b"\x81\xa4type\xa6submit", b'{"type": "submit"}']


def truncated(message: m.Message, rng: random.Random) -> list[bytes]:
    data = m.encode(message)
    return [data[: rng.randrange(1, len(data))] for _ in range(3)]


def absurd_messages(target: str, gateway_id: str) -> dict[str, list[m.Message]]:
    """Well-formed messages with absurd values, keyed by the verb (or subject kind) they go to."""
    reply = subjects.stream(gateway_id)
    huge = list(range(HUGE_PROMPT))
    return {
        "submit": [
            m.SubmitRequest(request_id="g-neg", prompt_token_ids=[-5, -1], sampling=sampling(),
                            decode_node=target, reply_subject=reply),
            m.SubmitRequest(request_id="g-vocab", prompt_token_ids=[10**9, 49152], sampling=sampling(),
                            decode_node=target, reply_subject=reply),
            m.SubmitRequest(request_id="g-huge", prompt_token_ids=huge, sampling=sampling(), decode_node=target,
                            reply_subject=reply),
            m.SubmitRequest(request_id="g-ghost", prompt_token_ids=[5, 6, 7], sampling=sampling(),
                            decode_node="ghost-node", reply_subject=reply),
            m.SubmitRequest(request_id="g-baddec", prompt_token_ids=[5, 6, 7], sampling=sampling(),
                            decode_node="not a.token", reply_subject=reply),
            m.SubmitRequest(request_id="g-reply", prompt_token_ids=[5, 6, 7], sampling=sampling(),
                            decode_node=target, reply_subject="flowkv.v1.>"),
            m.SubmitRequest(request_id="g-offset", prompt_token_ids=[5, 6, 7], sampling=sampling(),
                            decode_node=target, reply_subject=reply, output_offset=-7,
                            num_original_prompt_tokens=10**12),
        ],
        "kv_alloc": [
            m.KVAllocRequest(request_id="a-negblocks", transfer_id="t1", prefill_node="ghost-node",
                             prompt_token_ids=[5] * 16, sampling=sampling(), reply_subject=reply,
                             sender_info=fake_agent_info("ghost-node"), src_block_ids=[-1, -2, -3, -4]),
            m.KVAllocRequest(request_id="a-huge", transfer_id="t2", prefill_node="ghost-node",
                             prompt_token_ids=huge, sampling=sampling(), reply_subject=reply,
                             sender_info=fake_agent_info("ghost-node"), src_block_ids=list(range(HUGE_PROMPT // 4))),
            m.KVAllocRequest(request_id="a-info", transfer_id="t3", prefill_node="ghost-node",
                             prompt_token_ids=[5] * 16, sampling=sampling(), reply_subject=reply,
                             sender_info=b"\x00garbage", src_block_ids=[0, 1, 2, 3]),
            m.KVAllocRequest(request_id="a-mismatch", transfer_id="t4", prefill_node="ghost-node",
                             prompt_token_ids=[5] * 16, sampling=sampling(), reply_subject=reply,
                             sender_info=fake_agent_info("ghost-node"), src_block_ids=[0]),
            m.KVAllocRequest(request_id="a-layout", transfer_id="t6", prefill_node="ghost-node",
                             prompt_token_ids=[5] * 16, sampling=sampling(), reply_subject=reply,
                             sender_info=fake_agent_info("ghost-node", KVLayout("float32", 30, 16, 3, 64)),
                             src_block_ids=[0]),
            m.KVAllocRequest(request_id="a-vocab", transfer_id="t5", prefill_node="ghost-node",
                             prompt_token_ids=[-3] * 16, sampling=sampling(), reply_subject=reply,
                             sender_info=fake_agent_info("ghost-node"), src_block_ids=[10**9, 1, 2, 3]),
        ],
        "kv_done": [
            m.KVDone(request_id="unknown", transfer_id="unknown", ok=True, first_token_id=7),
            m.KVDone(request_id="unknown", transfer_id="unknown", ok=False, first_token_id=-10**9, error="x" * 10_000),
        ],
        "role": [m.SetRole(node_id="someone-else", role=m.Role.PREFILL, reason="garbage")],
        "nccl": [m.NcclRendezvous(from_node="ghost-node", payload=b"\x00" * 300)],
        "cancel": [m.Cancel(request_id="never-existed"), m.Cancel(request_id="x" * 10_000)],
        "load": [
            load_report("ghost-node", seq=2),
            load_report("not a.token", seq=3),
            load_report("absurd-node", free_blocks=-10**9, total_blocks=-1, num_running=-5, max_model_len=-1,
                        prefill_tokens_per_s=math.nan, decode_step_s=math.inf, block_size=0, seq=-1),
        ],
        "bye": [m.NodeBye(node_id="ghost-node"), m.NodeBye(node_id="x" * 5000)],
        "place": [
            m.PlaceRequest(request_id="p-neg", model="tiny", num_prompt_tokens=-100, max_tokens=-5),
            m.PlaceRequest(request_id="p-huge", model="tiny", num_prompt_tokens=10**15, max_tokens=10**15,
                           prefix_hashes=list(range(10_000)), exclude_nodes=["x"] * 1000),
            m.PlaceRequest(request_id="p-model", model="no-such-model", num_prompt_tokens=8, max_tokens=8),
        ],
        "tokens": [
            m.TokenChunk(request_id="unknown", node_id="ghost-node", index=0, token_ids=[1, 2, 3]),
            m.TokenChunk(request_id="unknown", node_id="ghost-node", index=-10**9, token_ids=[-1] * 1000,
                         finished=True, finish_reason="length"),
        ],
        "events": [m.SchedEvent(kind=m.EventKind.NODE_DOWN, ts=math.nan, node_id="ghost-node"),
                   m.SchedEvent(kind=m.EventKind.NODE_DOWN, ts=0.0, node_id="x" * 5000)],
    }


def wrong_type_messages() -> list[m.Message]:
    """One valid message of every kind: each lands on subjects that expect another kind."""
    return [
        load_report("ghost-node"), m.NodeBye(node_id="ghost-node"),
        m.PlaceRequest(request_id="w", model="tiny", num_prompt_tokens=4, max_tokens=4),
        m.Placement(request_id="w", prefill_node="ghost-node", decode_node="ghost-node"),
        m.Rejected(request_id="w", code=m.ErrorCode.INTERNAL, reason="w"),
        m.Ack(request_id="w"), m.Cancel(request_id="w-cancel"),
        m.KVAllocReply(request_id="w", transfer_id="w", ok=True),
        m.KVDone(request_id="w", transfer_id="w", ok=True),
        m.TokenChunk(request_id="w", node_id="ghost-node", index=0, token_ids=[1]),
        m.SetRole(node_id="ghost-node", role=m.Role.DECODE),
        m.NcclRendezvous(from_node="ghost-node", payload=b""), m.NcclRendezvousReply(payload=b""),
        m.SchedEvent(kind=m.EventKind.NODE_UP, ts=0.0), m.ClusterQuery(),
        m.ClusterState(policy="x", nodes=[], events=[]),
    ]

"""Every message FlowKV sends over NATS: msgspec Structs, no logic.

Encoding is MessagePack (``msgspec.msgpack``). Every message carries its kind in the
``type`` field (a tagged union), so a subscriber decodes a subject's messages with one
decoder (:data:`DECODER`) and rejects anything else. Unknown fields are ignored, so
newer peers can add optional fields without breaking older ones. The subjects are built
in :mod:`libs.protocol.subjects`; both are documented in ``docs/protocol.md``.
"""

from __future__ import annotations

from enum import Enum

import msgspec


class Role(str, Enum):
    """What a node does. ``hybrid`` runs both handlers (colocated serving)."""

    PREFILL = "prefill"
    DECODE = "decode"
    HYBRID = "hybrid"


class NodeState(str, Enum):
    READY = "ready"
    DRAINING = "draining"  # finishing its requests before a role switch or shutdown
    STOPPING = "stopping"


class ErrorCode(str, Enum):
    """Why a request or a step failed; the gateway maps these to HTTP statuses."""

    OVERLOADED = "overloaded"  # 429
    NO_NODES = "no_nodes"  # 503
    INVALID = "invalid"  # 400
    NODE_FAILED = "node_failed"  # 502 after retries are exhausted
    TRANSFER_FAILED = "transfer_failed"
    CANCELLED = "cancelled"
    INTERNAL = "internal"  # 500


class Message(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every wire message."""


class StructuredOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A constraint on the output's shape, enforced token by token in the sampler.

    Exactly one field is set. The engine compiles it into a grammar (json schema, regex,
    choice) and masks every token that would leave the grammar.

    Args:
        json_schema: a JSON Schema, as JSON text; the output is one JSON value valid against it.
        json_object: the output is one JSON object (any keys).
        regex: the output matches this regular expression in full.
        choice: the output is exactly one of these strings.
        grammar: a context-free grammar (Lark/EBNF text as the grammar library reads it).
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = sum(
            (
                self.json_schema is not None,
                self.json_object,
                self.regex is not None,
                self.choice is not None,
                self.grammar is not None,
            )
        )
        if given != 1:
            raise ValueError(f"exactly one structured-output constraint must be set, got {given}")
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to pick a request's tokens and when to stop.

    Invalid values fail decoding (``msgspec.ValidationError``): they are protocol errors.

    Args:
        max_tokens: most tokens to generate.
        temperature: 0 is greedy.
        top_p: nucleus mass kept (1 = off).
        top_k: most likely tokens kept (0 = off).
        seed: seeds the request's own generator (None: drawn from the engine's seed).
        stop: strings that end the output; the text is cut before the stop string.
        stop_token_ids: token ids that end the output (besides EOS).
        ignore_eos: keep going past EOS.
        logprobs: return this many top logprobs per sampled token (0: only the sampled one).
        min_tokens: EOS and stop tokens are masked until this many tokens exist.
        min_p: tokens below ``min_p`` times the top token's probability are dropped (0 = off).
        presence_penalty: subtracted from the logit of every token already generated.
        frequency_penalty: subtracted once per earlier occurrence in the output.
        repetition_penalty: divides positive (multiplies negative) logits of every token seen
            in the prompt or output (1 = off), as Hugging Face and vLLM define it.
        logit_bias: added to the logits of these token ids before sampling.
        structured: a constraint on the output's shape (:class:`StructuredOutput`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def penalized(self) -> bool:
        """Whether any penalty reads the token history (logit_bias does not)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TokenLogprob(msgspec.Struct, array_like=True, omit_defaults=True):
    """Log-probability of one sampled token and the top-n alternatives (raw model logits)."""

    token_id: int
    logprob: float
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


# ---------------------------------------------------------------- nodes -> scheduler


class KVLink(msgspec.Struct, kw_only=True):
    """What this node's KV hand-offs to one decode node took, measured on the sender.

    A transfer of ``n`` bytes is predicted to take ``latency_s + n / bandwidth_bytes_per_s``.
    """

    peer: str  # the decode node's id
    bandwidth_bytes_per_s: float  # moving figure, recent transfers weigh most
    latency_s: float  # fixed cost per transfer; 0 until transfers of different sizes tell it apart
    transfers: int  # hand-offs to this peer since the node started


class LoadReport(Message, tag="load"):
    """A node's heartbeat and load, on ``node_load()`` a few times a second."""

    node_id: str
    role: Role
    state: NodeState
    seq: int  # increases with every report of this node process
    started_at: float  # unix seconds: tells a restarted node from the old one
    model: str
    device: str  # "cpu", "cuda:0"
    device_name: str  # "cpu", "NVIDIA H100 80GB HBM3"
    device_memory_bytes: int
    max_model_len: int
    block_size: int
    kv_block_bytes: int
    total_blocks: int
    free_blocks: int
    largest_free_segment: int
    num_waiting: int  # requests queued for prefill
    waiting_prefill_tokens: int
    num_running: int  # decoding sequences
    num_held: int  # prefilled requests waiting for their hand-off
    prefill_tokens_per_s: float  # measured, EMA; 0 before the first prefill
    decode_step_s: float  # measured, EMA; 0 before the first step
    cached_prefix_hashes: list[int] = []  # a bounded sample of prefix-cache block hashes
    kv_transports: list[str] = []
    host_id: str = ""
    # Hand-offs since the node process started (the dashboard shows them; a rate comes
    # from two reports).
    kv_sent_transfers: int = 0
    kv_sent_bytes: int = 0
    kv_sent_calls: int = 0
    kv_sent_seconds: float = 0.0
    kv_received_transfers: int = 0
    kv_received_bytes: int = 0
    max_num_seqs: int = 0  # the engine's decode batch cap; 0 = not reported (scheduler assumes a default)
    # Prompt tokens and seconds per prefill pass, each averaged (EMA) over the passes of
    # prefill_tokens_per_s: passes of several sizes tell the scheduler a pass's fixed cost
    # from its cost per token (0: not reported).
    prefill_pass_tokens: float = 0.0
    prefill_pass_s: float = 0.0
    max_pass_tokens: int = 0  # the most prompt tokens one pass may take (the token budget); 0: not reported
    kv_links: list[KVLink] = []  # per decode peer, the most recently used (at most 64)
    # How long the engine's current step has run (0 between steps). Reports go out on
    # time whatever the engine does: a long step is a busy node, a growing one a stuck engine.
    step_age_s: float = 0.0
    # CPU engines: the threads the engine computes with, the cores the node process may run
    # on, and the share of its threads' time its steps got (below 1 when node processes
    # on one host need more threads than it has cores). 0 / []: not a CPU engine, or not
    # known (vLLM nodes); the scheduler then assumes the node has its cores to itself.
    cpu_threads: int = 0
    cpu_set: list[int] = []
    cpu_share: float = 0.0


class NodeBye(Message, tag="bye"):
    node_id: str
    reason: str = ""


# ---------------------------------------------------------------- gateway <-> scheduler


class PlaceRequest(Message, tag="place"):
    request_id: str
    model: str
    num_prompt_tokens: int
    max_tokens: int
    prefix_hashes: list[int] = []  # chained hashes of the prompt's full blocks
    exclude_nodes: list[str] = []  # nodes that just failed this request
    # Set by a prefill node whose decode node refused the hand-off (it flipped role, or is
    # full): the prompt is prefilled there already, so only a decode node is chosen.
    prefill_node: str = ""
    # How long the scheduler may hold the request for a node with room before it answers
    # OVERLOADED (0: answer at once); the scheduler caps it (libs/scheduler/wait_queue.py).
    queue_timeout_s: float = 0.0
    # The request's own service-level objectives (0: the deployment's, the scheduler's
    # ttft_slo_s / tpot_slo_s): the flowkv policy counts it as goodput only within them.
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0


class Placement(Message, tag="placement"):
    request_id: str
    prefill_node: str
    decode_node: str  # equal to prefill_node when one node does both
    predicted_ttft_s: float = 0.0
    queued_s: float = 0.0  # time the request waited in the scheduler's queue
    # The objectives the request is held to: its own, else the deployment's (0: none).
    # The gateway passes them on in SubmitRequest; nodes pace prompts by them.
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0


class Rejected(Message, tag="rejected"):
    request_id: str
    code: ErrorCode
    reason: str
    retry_after_s: float = 0.0


# ---------------------------------------------------------------- gateway -> nodes


class SubmitRequest(Message, tag="submit"):
    """Start a request on its prefill node (which hands off to ``decode_node``).

    When ``decode_node`` is the receiving node itself, it prefills and decodes locally.
    ``output_offset`` is the number of output tokens the client already has: on a
    retry after a node failure the prompt holds the original prompt plus those tokens,
    and the node numbers its tokens from there.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    decode_node: str
    reply_subject: str
    output_offset: int = 0
    num_original_prompt_tokens: int = 0
    # The request's objectives (Placement's) and how long it had waited before this message
    # (gateway and scheduler queues, earlier attempts): the node's engine paces prompts by
    # them (0: none).
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0
    waited_s: float = 0.0


class Ack(Message, tag="ack"):
    request_id: str
    ok: bool = True
    code: ErrorCode | None = None
    error: str = ""


class Cancel(Message, tag="cancel"):
    request_id: str
    reason: str = ""


# ---------------------------------------------------------------- prefill -> decode


class KVAllocRequest(Message, tag="kv_alloc"):
    """Reserve blocks on the decode node for a request about to be handed off.

    ``sender_info`` is the prefill node's ``libs.kvtransfer.AgentInfo`` in MessagePack.
    """

    request_id: str
    transfer_id: str
    prefill_node: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_subject: str
    sender_info: bytes
    output_offset: int = 0
    num_original_prompt_tokens: int = 0
    # P's blocks of the prompt, in token order: D needs them to plan the same copy ops as P
    # (KVAgent.expect) before P sends, so P asks for the reservation once its prefill is done.
    src_block_ids: list[int] = []
    # The first token P sampled (-1: not sent). KVDone repeats it; an engine that starts the
    # request when it reserves the blocks (vLLM's) needs it here.
    first_token_id: int = -1
    tpot_slo_s: float = 0.0  # the request's TPOT objective (SubmitRequest's): D paces its own prompts by it


class KVAllocReply(Message, tag="kv_alloc_reply"):
    request_id: str
    transfer_id: str
    ok: bool
    dst_block_ids: list[int] = []
    num_cached_tokens: int = 0  # the decode node's prefix-cache hit: these blocks do not move
    receiver_info: bytes = b""
    transport: str = ""
    code: ErrorCode | None = None
    error: str = ""


class TransferReport(msgspec.Struct, kw_only=True):
    """Counters of one finished KV transfer, as seen by one side: what ``KVAgent`` returns
    for a send or a receive, and what ``KVDone.stats`` carries to the decode node."""

    transport: str
    mode: str
    calls: int
    bytes: int
    segments: int
    duration_s: float


class KVDone(Message, tag="kv_done"):
    """The prefill node finished (or failed) writing the KV into the reserved blocks."""

    request_id: str
    transfer_id: str
    ok: bool
    first_token_id: int = -1
    stats: TransferReport | None = None
    error: str = ""


# ---------------------------------------------------------------- nodes -> gateway


class TokenChunk(Message, tag="tokens"):
    """New output tokens of one request, on the gateway's ``stream()`` subject.

    ``index`` is the position of ``token_ids[0]`` among the request's output tokens, so
    the gateway can order chunks from the prefill and decode nodes and drop duplicates.
    """

    request_id: str
    node_id: str
    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    code: ErrorCode | None = None
    error: str = ""
    prefill_s: float = 0.0
    # From the prefill node, without tokens: the hand-off moved to this decode node (the
    # placed one refused it); its chunks belong to the request from now on.
    handoff_to: str = ""


# ---------------------------------------------------------------- scheduler -> nodes


class SetRole(Message, tag="set_role"):
    node_id: str
    role: Role
    reason: str = ""
    # The sending scheduler leader's epoch (0: unfenced). A node refuses a SetRole whose
    # epoch is below the highest it has seen: a deposed leader cannot start a flip.
    epoch: int = 0


class NcclRendezvous(Message, tag="nccl"):
    from_node: str
    payload: bytes


class NcclRendezvousReply(Message, tag="nccl_reply"):
    payload: bytes


# ---------------------------------------------------------------- scheduler -> anyone


class EventKind(str, Enum):
    NODE_UP = "node_up"
    NODE_DOWN = "node_down"
    PLACEMENT = "placement"
    ROLE_FLIP = "role_flip"
    REJECTED = "rejected"
    LEADER = "leader"


class SchedEvent(Message, tag="event"):
    kind: EventKind
    ts: float
    node_id: str = ""
    request_id: str = ""
    detail: str = ""
    prefill_node: str = ""
    decode_node: str = ""
    old_role: Role | None = None
    new_role: Role | None = None
    epoch: int = 0  # the publishing leader's epoch (``leader``: the new one's)


class ClusterQuery(Message, tag="cluster_query"):
    # Only the policy and num_waiting, no nodes or events: a liveness probe (the gateway
    # sends one while a placement waits in the scheduler's queue).
    brief: bool = False


class ClusterState(Message, tag="cluster"):
    policy: str
    nodes: list[LoadReport]
    events: list[SchedEvent]
    num_waiting: int = 0  # requests held in the scheduler's queue for capacity
    leader: str = ""  # the answering scheduler leader's id
    epoch: int = 0  # its epoch


# ---------------------------------------------------------------- scheduler replicas (JetStream KV)


class LeaderLease(Message, tag="leader_lease"):
    """The value of the ``leader`` key in the lease bucket: who leads the schedulers."""

    scheduler_id: str
    since: float  # unix seconds the holder took the lease


class RoleFlip(msgspec.Struct, kw_only=True):
    """A role flip the leader has asked for and not yet seen done (in :class:`LeaderState`)."""

    node_id: str
    old_role: Role
    new_role: Role
    reason: str = ""
    requested_at: float = 0.0  # unix seconds; the flip's ``flip_timeout_s`` runs from here


class LeaderState(Message, tag="leader_state"):
    """The value of the ``state`` key in the state bucket, written only by compare-and-set:
    the current leader's epoch and the role flips it has in flight (several only when
    each goes into hybrid)."""

    scheduler_id: str
    epoch: int
    flips: list[RoleFlip] = []


AnyMessage = (
    LoadReport
    | NodeBye
    | PlaceRequest
    | Placement
    | Rejected
    | SubmitRequest
    | Ack
    | Cancel
    | KVAllocRequest
    | KVAllocReply
    | KVDone
    | TokenChunk
    | SetRole
    | NcclRendezvous
    | NcclRendezvousReply
    | SchedEvent
    | ClusterQuery
    | ClusterState
    | LeaderLease
    | LeaderState
)

ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    return ENCODER.encode(message)


def decode(data: bytes) -> AnyMessage:
    """Decode one message; raises ``msgspec.DecodeError`` (or ValidationError) on garbage."""
    return DECODER.decode(data)

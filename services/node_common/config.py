"""NodeConfig: one dataclass for the node process; every field a flag and an env variable.

``--report-interval-s`` or ``FLOWKV_NODE_REPORT_INTERVAL_S`` sets ``report_interval_s``
(see :mod:`services.common.config`). The NATS settings are separate (``NatsConfig``,
``--nats-*`` / ``FLOWKV_NATS_*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.protocol.messages import Role
from libs.protocol.subjects import check_token

ENV_PREFIX = "FLOWKV_NODE"
# libs.kvtransfer.base.TransferMode's values (not imported here: that module pulls in torch).
KV_TRANSFER_GRANULARITIES = ("merged", "layerwise", "blockwise")


@dataclass
class NodeConfig:
    """Configuration of one node process (one engine, one KV agent, one role at a time)."""

    node_id: str = field(default="node0", metadata={"help": "this node's id (a NATS subject token)"})
    role: str = field(default="hybrid", metadata={"help": "prefill, decode or hybrid"})
    model: str = field(default="smollm2", metadata={"help": "engine model: smollm2, tiny, a HF dir or a .gguf"})
    engine: str = field(default="flowkv", metadata={
        "help": "the node's engine: flowkv (FlowKV's own) or vllm (vLLM's v1 engine with FlowKV's KV connector; "
                "needs the vllm extra, a HF dir or smollm2 as model, a block size that is a multiple of 32 on CPU)"})
    vllm_enforce_eager: bool = field(default=False, metadata={
        "help": "vllm engine: run the model eagerly (no torch.compile); with --num-blocks vLLM also skips its "
                "warm-up pass and starts in seconds on CPU"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "weights and KV dtype"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_blocks: int | None = field(default=None, metadata={"help": "KV blocks in the pool (default: sized by the engine)"})
    max_num_seqs: int = field(default=64, metadata={"help": "most requests running at once"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one engine step"})
    target_step_s: float = field(default=0.25, metadata={
        "help": "engine step time the token budget aims at, from the measured prefill rate (0: a fixed budget); "
                "on CPU a step may run to twice it to finish a prompt rather than split it"})
    prefill_gather_s: float = field(default=0.02, metadata={
        "help": "when prompts reach an idle engine, the most it waits for others arriving with them so that they "
                "prefill in one step (at most 5 percent of their measured prefill time; 0: off)"})
    max_model_len: int | None = field(default=None, metadata={"help": "longest sequence (default: the model's)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse cached prompt prefixes"})
    seed: int = field(default=0, metadata={"help": "engine seed (preset weights, unseeded sampling)"})
    kv_host: str = field(default="127.0.0.1", metadata={"help": "address of the KV TCP server (listen and advertise)"})
    kv_port: int = field(default=0, metadata={"help": "port of the KV TCP server (0: any free one)"})
    kv_transport: str = field(default="", metadata={"help": "force one KV transport (shm, tcp, cuda_ipc, nccl)"})
    kv_transfer_granularity: str = field(default="merged", metadata={
        "help": "calls per KV hand-off this node sends: merged (one per aligned segment, FlowKV), layerwise "
                "(one per layer per segment) or blockwise (one per block, layer and K/V: the vLLM-disagg "
                "baseline); the receiving node follows the sender's"})
    report_interval_s: float = field(default=0.25, metadata={"help": "seconds between load reports"})
    lease_s: float = field(default=30.0, metadata={"help": "a KV reservation without KVDone is released after this"})
    kv_alloc_timeout_s: float = field(default=5.0, metadata={"help": "how long P waits for D's KVAllocReply"})
    transfer_timeout_s: float = field(default=30.0, metadata={"help": "timeout of one KV transfer"})
    drain_timeout_s: float = field(default=30.0, metadata={"help": "how long shutdown waits for in-flight requests"})
    role_drain_timeout_s: float = field(default=60.0, metadata={"help": "how long a role flip waits for old-role work"})
    prefix_hash_sample: int = field(default=256, metadata={"help": "most prefix-cache hashes in one load report"})
    metrics_port: int = field(default=0, metadata={"help": "serve Prometheus /metrics on this port (0: off)"})
    log_level: str = field(default="info", metadata={"help": "log level"})
    json_logs: bool = field(default=False, metadata={"help": "log JSON lines"})

    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address the /metrics endpoint binds"})
    def __post_init__(self) -> None:
        check_token(self.node_id, "node id")
        try:
            Role(self.role)
        except ValueError:
            raise ValueError(f"role must be one of {[r.value for r in Role]}, got {self.role!r}") from None
        for name in ("report_interval_s", "lease_s", "kv_alloc_timeout_s", "transfer_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.engine not in ("flowkv", "vllm"):
            raise ValueError(f"engine must be flowkv or vllm, got {self.engine!r}")
        if self.kv_transfer_granularity not in KV_TRANSFER_GRANULARITIES:
            raise ValueError(f"kv_transfer_granularity must be one of {list(KV_TRANSFER_GRANULARITIES)}, "
                             f"got {self.kv_transfer_granularity!r}")
        if self.target_step_s < 0:
            raise ValueError(f"target_step_s must be >= 0, got {self.target_step_s}")
        for name in ("prefill_gather_s", "drain_timeout_s", "role_drain_timeout_s", "prefix_hash_sample", "metrics_port",
                     "kv_port"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def role_enum(self) -> Role:
        return Role(self.role)

    @property
    def shared_pool(self) -> bool:
        """CPU nodes put their pool in shared memory so ``shm`` works between nodes of one host."""
        return self.device.split(":")[0] == "cpu"

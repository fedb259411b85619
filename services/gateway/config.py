"""GatewayConfig: every knob of the HTTP front door (flags ``--*``, env ``FLOWKV_GATEWAY_*``)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from libs.protocol.subjects import check_token

ENV_PREFIX = "FLOWKV_GATEWAY"


@dataclass
class GatewayConfig:
    """Configuration of one gateway process.

    ``api_keys`` is secret: it never shows in ``repr`` or logs. ``gateway_id`` names the
    gateway's token stream subject, so it must be subject-safe; empty picks a random one.

    One gateway serves several models side by side (``model="tiny,/models/qwen3"``): each
    request goes to the nodes of the model it names, tokenized by that model's tokenizer.
    ``served_model_name`` then lists one client-facing name per model (empty entries, or a
    list left empty, keep the model's own name); the names must differ.
    """

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    gateway_id: str = field(default="", metadata={"help": "id of this gateway on NATS (default: gw-<random>)"})
    model: str = field(default="smollm2", metadata={
        "help": "model(s) served, comma-separated, each as its nodes' --model names it (the gateway loads each one's tokenizer)"})
    served_model_name: str = field(default="", metadata={
        "help": "name clients send for each model of --model, comma-separated in the same order (default: the model's own)"})
    max_model_len: int = field(default=0, metadata={"help": "longest prompt + output in tokens, for every model (0: each model's own)"})
    api_keys: list[str] = field(
        default_factory=list, repr=False, metadata={"help": "accepted Bearer API keys, comma-separated (empty: no auth)", "secret": True}
    )
    # Above what a cluster runs plus what the scheduler's queue holds (1024): 256 made the
    # gateway, not the GPUs, the limit (1K prompts at 32 req/s on one H200: 32 of 480 429s;
    # 8 nodes of 64 sequences run 512). About 20 KB of gateway memory a request.
    max_concurrent_requests: int = field(default=4096, metadata={"help": "requests in flight before 429"})
    max_queued_tokens: int = field(default=8_000_000, metadata={"help": "prompt tokens in flight before 429 (about 36 bytes each)"})
    max_body_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest request body (413 above)"})
    retry_after_s: float = field(default=1.0, metadata={"help": "Retry-After sent with the gateway's own 429s"})
    place_timeout_s: float = field(default=2.0, metadata={"help": "wait for the scheduler's placement"})
    queue_timeout_s: float = field(
        default=30.0, metadata={"help": "how long a request may wait in the scheduler's queue for a node with room before 429 (0: no wait)"}
    )
    scheduler_failover_s: float = field(
        default=10.0, metadata={"help": "when no scheduler answers a placement, re-send it to the next leader for this long before 503 (0: 503 at once)"}
    )
    submit_timeout_s: float = field(default=5.0, metadata={"help": "wait for a node to acknowledge a submit"})
    stall_timeout_s: float = field(default=30.0, metadata={"help": "no token for this long: the request is re-placed"})
    max_retries: int = field(default=2, metadata={"help": "re-placements after node failures before giving up"})
    exclusion_wait_s: float = field(
        default=5.0, metadata={"help": "a re-placement that only the failed nodes could take asks again for this long "
                                       "(the scheduler may not have seen them die yet) before it places on any node"}
    )
    cluster_timeout_s: float = field(default=1.0, metadata={"help": "wait for the scheduler in /ready"})
    shutdown_timeout_s: float = field(default=30.0, metadata={"help": "on shutdown, finish open streams within this bound"})
    log_level: str = field(default="info", metadata={"help": "log level"})
    json_logs: bool = field(default=False, metadata={"help": "log JSON lines"})

    def __post_init__(self) -> None:
        if not self.gateway_id:
            self.gateway_id = f"gw-{secrets.token_hex(4)}"
        check_token(self.gateway_id, "gateway id")
        models = [m.strip() for m in self.model.split(",")]
        if not models or not all(models):
            raise ValueError(f"model: expected one model or a comma-separated list without empty entries, got {self.model!r}")
        names = [n.strip() for n in self.served_model_name.split(",")] if self.served_model_name.strip() else []
        if names and len(names) != len(models):
            raise ValueError(f"served_model_name names {len(names)} models, model lists {len(models)}")
        names = [n or m for n, m in zip(names, models)] if names else list(models)
        if len(set(models)) != len(models) or len(set(names)) != len(names):
            raise ValueError(f"the served models must differ: model={self.model!r}, served_model_name={','.join(names)!r}")
        self.model, self.served_model_name = ",".join(models), ",".join(names)
        self.api_keys = [k.strip() for k in self.api_keys if k.strip()]
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("max_concurrent_requests", "max_queued_tokens", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("place_timeout_s", "submit_timeout_s", "stall_timeout_s", "cluster_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.scheduler_failover_s < 0 or self.exclusion_wait_s < 0:
            raise ValueError("scheduler_failover_s and exclusion_wait_s must be >= 0")
        if self.max_retries < 0 or self.max_model_len < 0 or self.shutdown_timeout_s < 0 or self.queue_timeout_s < 0:
            raise ValueError("max_retries, max_model_len, shutdown_timeout_s and queue_timeout_s must be >= 0")

    @property
    def served_models(self) -> list[tuple[str, str]]:
        """``(served name, model)`` of every model, in the order given: the first is the one
        ``/tokenize`` and ``/detokenize`` use when a request names none."""
        return list(zip(self.served_model_name.split(","), self.model.split(",")))

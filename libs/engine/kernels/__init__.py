"""GPU kernels of the engine: paged decode attention, KV writes, and the fused layer ops
(residual add + RMSNorm, rotary, SiLU * up).

Every function has a CPU path (torch) so the engine runs anywhere; on CUDA the Triton
kernels are used and are safe to capture in CUDA graphs.
"""

from __future__ import annotations

from libs.engine.kernels.fused import (
    add_rms_norm,
    add_rms_norm_ref,
    rotary_,
    rotary_ref,
    silu_mul,
    silu_mul_ref,
    triton_usable,
)
from libs.engine.kernels.kv_write import write_kv, write_kv_ref
from libs.engine.kernels.paged_attention import (
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)

__all__ = [
    "add_rms_norm",
    "add_rms_norm_ref",
    "choose_num_splits",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "rotary_",
    "rotary_ref",
    "silu_mul",
    "silu_mul_ref",
    "triton_usable",
    "write_kv",
    "write_kv_ref",
]

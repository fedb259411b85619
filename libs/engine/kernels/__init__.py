"""GPU kernels of the engine: paged decode attention over the block-major pool and KV writes.

Every function has a CPU path (torch) so the engine runs anywhere; on CUDA the Triton
kernels are used and are safe to capture in CUDA graphs.
"""

from __future__ import annotations

from libs.engine.kernels.kv_write import write_kv, write_kv_ref
from libs.engine.kernels.paged_attention import (
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)

__all__ = [
    "choose_num_splits",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "write_kv",
    "write_kv_ref",
]

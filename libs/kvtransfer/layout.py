"""What one KV block is, shared by the engine's pool and every transport.

FlowKV keeps a node's whole KV cache in one tensor of shape

    [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

(block-major), so that one block holds its tokens' K and V for every layer in one
contiguous span, and ``n`` blocks with consecutive ids are one contiguous span of
``n * block_bytes`` bytes. The per-layer layout of vLLM
(``[2, num_blocks, block_size, num_kv_heads, head_dim]`` per layer) needs
``2 * num_layers`` pieces for the same block.

A pool may instead be *layer-major* (``order="layer"``): shape
``[num_layers, num_blocks, <one layer's page of a block>]``, the layout vLLM allocates its
KV cache in (all layers in one buffer, layer ``l`` of block ``b`` at
``(l * num_blocks + b) * page_bytes``; a page holds K and V of ``block_size`` tokens in
the engine's own order). There ``n`` blocks with consecutive ids are one contiguous span
per layer, so a hand-off takes one call per layer per aligned segment
(:func:`libs.kvtransfer.align.expand`).

Prefill and decode nodes exchange their layouts when they first meet; any
difference fails the hand-off at once (:meth:`KVLayout.check_compatible`).
"""

from __future__ import annotations

import msgspec
import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; supported: {sorted(_DTYPES)}")


class LayoutMismatch(ValueError):
    """Prefill and decode pools disagree on what a block is."""


class KVLayout(msgspec.Struct, frozen=True):
    """The shape and type of one KV block, identical on both sides of a hand-off."""

    dtype: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    # "block": FlowKV's block-major pool; "layer": layer-major (vLLM's), see the module docstring.
    order: str = "block"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; supported: {sorted(_DTYPES)}")
        if self.order not in ("block", "layer"):
            raise ValueError(f"KVLayout.order must be 'block' or 'layer', got {self.order!r}")
        for field in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"KVLayout.{field} must be positive, got {getattr(self, field)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.tensor([], dtype=self.torch_dtype).element_size()

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: (layers, K/V, block_size, kv_heads, head_dim)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def token_bytes_per_layer_kv(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one (layer, K or V) slice of one block: the unit of the block-wise baseline."""
        return self.block_size * self.token_bytes_per_layer_kv

    @property
    def block_bytes(self) -> int:
        """Bytes of one whole block (all layers, K and V)."""
        return self.num_layers * 2 * self.chunk_bytes

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def layer_major(self) -> bool:
        return self.order == "layer"

    @property
    def page_bytes(self) -> int:
        """Bytes of one block in one layer (K and V): the unit a layer-major pool is cut in."""
        return 2 * self.chunk_bytes

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        if self.layer_major:
            return (self.num_layers, num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)
        return (num_blocks, *self.block_shape)

    def pool_num_blocks(self, shape: tuple[int, ...]) -> int:
        """Blocks in a pool tensor of this shape."""
        return int(shape[1] if self.layer_major else shape[0])

    def check_compatible(self, other: KVLayout, *, local: str, peer: str) -> None:
        """Raise :class:`LayoutMismatch` naming both sides unless ``other`` equals this layout.

        Args:
            other: the peer's layout.
            local: a name for this side (node id), used in the message.
            peer: a name for the other side.
        """
        if self == other:
            return
        diffs = [
            f"{f}: {local}={getattr(self, f)!r} {peer}={getattr(other, f)!r}"
            for f in self.__struct_fields__
            if getattr(self, f) != getattr(other, f)
        ]
        raise LayoutMismatch(f"KV layouts of {local} and {peer} differ ({'; '.join(diffs)})")

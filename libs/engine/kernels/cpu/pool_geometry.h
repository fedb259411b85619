/* Where a layer's K and V lie in the block-major KV pool, shared by the attention kernels.
 * Pool: [num_blocks, layers, 2, block_size, kv_heads, head_dim]; the same fields, in the
 * same order, as PoolGeometry in __init__.py. */
#ifndef FLOWKV_POOL_GEOMETRY_H
#define FLOWKV_POOL_GEOMETRY_H

#include <stdint.h>

typedef struct {
    int64_t block_stride;  /* elements between consecutive blocks */
    int64_t layer_offset;  /* elements from a block's start to this layer's K */
    int64_t v_offset;      /* elements from K to V within a block's layer */
    int block_size, kv_heads, head_dim;
} pool_geometry;

#endif

/* Paged decode attention on the CPU, reading the block-major KV pool in place.
 *
 * Pool: [num_blocks, layers, 2, block_size, kv_heads, head_dim], float32 or bfloat16.
 * One query token per sequence; sequence b attends to its first context_lens[b] tokens,
 * token t living in block block_tables[b][t / block_size] at offset t % block_size.
 *
 * Work is split over (sequence, kv head) pairs with OpenMP (the process's one OpenMP
 * runtime: torch's, whose thread count torch.set_num_threads sets). For each pair the
 * query heads of its group are scored against each key as the key is read, so every
 * key and value row is read once for the whole group: the floor of a decode step's
 * attention is reading the context's KV bytes once, and this does not copy them.
 * Softmax in float32 with the running maximum subtracted, as torch does.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 32
#define MAX_HEAD_DIM 256

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef struct {
    int64_t block_stride;  /* elements between consecutive blocks */
    int64_t layer_offset;  /* elements from a block's start to this layer's K */
    int64_t v_offset;      /* elements from K to V within a block's layer */
    int block_size, kv_heads, head_dim;
} pool_geometry;

#define DEFINE_KERNEL(NAME, KV_T, LOAD)                                                            \
int NAME(const float *q, const KV_T *pool, pool_geometry g, const int32_t *block_tables,          \
         int64_t max_blocks, const int32_t *context_lens, int num_seqs, int num_heads,            \
         float scale, float *out) {                                                                \
    const int group = num_heads / g.kv_heads, D = g.head_dim, bs = g.block_size;                   \
    if (group > MAX_GROUP || D > MAX_HEAD_DIM || num_heads % g.kv_heads) return -1;                \
    int failed = 0;                                                                                \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                                   \
    for (int b = 0; b < num_seqs; ++b) {                                                           \
        for (int h = 0; h < g.kv_heads; ++h) {                                                     \
            const int len = context_lens[b];                                                       \
            const float *qh = q + ((int64_t)b * num_heads + (int64_t)h * group) * D;               \
            float *oh = out + ((int64_t)b * num_heads + (int64_t)h * group) * D;                   \
            if (len <= 0) { memset(oh, 0, sizeof(float) * group * D); continue; }                  \
            float *scores = (float *)malloc(sizeof(float) * (size_t)group * len);                  \
            if (!scores) { failed = 1; continue; }                                                 \
            float qs[MAX_GROUP * MAX_HEAD_DIM];                                                    \
            for (int i = 0; i < group * D; ++i) qs[i] = qh[i] * scale;                             \
            float maxs[MAX_GROUP];                                                                 \
            for (int j = 0; j < group; ++j) maxs[j] = -FLT_MAX;  /* built with -ffast-math: no infinities */                                   \
            const int32_t *table = block_tables + (int64_t)b * max_blocks;                         \
            for (int t = 0; t < len; ++t) {                                                        \
                const KV_T *k = pool + (int64_t)table[t / bs] * g.block_stride + g.layer_offset    \
                              + ((int64_t)(t % bs) * g.kv_heads + h) * D;                          \
                float kf[MAX_HEAD_DIM];                                                            \
                _Pragma("omp simd") for (int d = 0; d < D; ++d) kf[d] = LOAD(k[d]);                                  \
                for (int j = 0; j < group; ++j) {                                                  \
                    const float *qj = qs + j * D;                                                  \
                    float acc = 0.f;                                                               \
                    _Pragma("omp simd reduction(+:acc)")                                           \
                    for (int d = 0; d < D; ++d) acc += qj[d] * kf[d];                              \
                    scores[(int64_t)j * len + t] = acc;                                            \
                    if (acc > maxs[j]) maxs[j] = acc;                                              \
                }                                                                                  \
            }                                                                                      \
            float inv[MAX_GROUP];                                                                  \
            for (int j = 0; j < group; ++j) {                                                      \
                float *s = scores + (int64_t)j * len, m = maxs[j], sum = 0.f;                      \
                _Pragma("omp simd reduction(+:sum)")                                               \
                for (int t = 0; t < len; ++t) { s[t] = expf(s[t] - m); sum += s[t]; }              \
                inv[j] = 1.f / sum;                                                                \
            }                                                                                      \
            float acc[MAX_GROUP * MAX_HEAD_DIM];                                                   \
            memset(acc, 0, sizeof(float) * group * D);                                             \
            for (int t = 0; t < len; ++t) {                                                        \
                const KV_T *v = pool + (int64_t)table[t / bs] * g.block_stride + g.layer_offset    \
                              + g.v_offset + ((int64_t)(t % bs) * g.kv_heads + h) * D;             \
                float vf[MAX_HEAD_DIM];                                                            \
                _Pragma("omp simd") for (int d = 0; d < D; ++d) vf[d] = LOAD(v[d]);                                  \
                for (int j = 0; j < group; ++j) {                                                  \
                    const float p = scores[(int64_t)j * len + t];                                  \
                    float *aj = acc + j * D;                                                       \
                    _Pragma("omp simd")                                                            \
                    for (int d = 0; d < D; ++d) aj[d] += p * vf[d];                                \
                }                                                                                  \
            }                                                                                      \
            for (int j = 0; j < group; ++j)                                                        \
                for (int d = 0; d < D; ++d) oh[j * D + d] = acc[j * D + d] * inv[j];               \
            free(scores);                                                                          \
        }                                                                                          \
    }                                                                                              \
    return failed ? -2 : 0;                                                                        \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)

DEFINE_KERNEL(flowkv_paged_decode_f32, float, LOAD_F32)
DEFINE_KERNEL(flowkv_paged_decode_bf16, uint16_t, LOAD_BF16)

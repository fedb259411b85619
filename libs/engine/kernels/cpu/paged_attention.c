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
 *
 * With AVX-512 and a head_dim of 64 or 128 an item goes through its context once, sixteen
 * keys at a time, with an online softmax (see DEFINE_VEC_ITEM); items are whole sequences
 * (every kv head) when there are at least two sequences a thread. On a 2-core AMD EPYC
 * (Zen 4), SmolLM2 shapes (3 kv heads of 64, 16-token blocks), 16 sequences of 280 tokens
 * from memory: 21 ms a step's 30 layers on one thread, 12 ms on two, against 28 and 15 ms
 * for the two-pass kernel before it (keys, then values, a head at a time).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "bf16.h"
#include "pool_geometry.h"

#define MAX_GROUP 32
#define MAX_HEAD_DIM 256
/* Query heads of a group whose accumulators the value loop keeps in registers at once. */
#define MAX_GROUP_VEC 4
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif


#define DEFINE_KERNEL(NAME, KV_T, LOAD, VEC_ITEM)                                                  \
int NAME(const float *q, const KV_T *pool, pool_geometry g, const int32_t *block_tables,          \
         int64_t max_blocks, const int32_t *context_lens, int num_seqs, int num_heads,            \
         float scale, float *out) {                                                                \
    const int group = num_heads / g.kv_heads, D = g.head_dim, bs = g.block_size;                   \
    if (group > MAX_GROUP || D > MAX_HEAD_DIM || num_heads % g.kv_heads) return -1;                \
    int failed = 0;                                                                                \
    if (HAVE_VEC_ITEM && VEC_HEAD_DIM(D)) {                                                        \
        /* A sequence's kv heads in one item when there are enough sequences to go round the  \
         * threads; one item a kv head otherwise. */                                            \
        const int whole = num_seqs >= 2 * omp_get_max_threads();                                   \
        const int split = whole ? 1 : g.kv_heads, nh = g.kv_heads / split;                         \
        _Pragma("omp parallel for schedule(dynamic, 1)")                                           \
        for (int it = 0; it < num_seqs * split; ++it) {                                            \
            const int b = it / split, h0 = (it % split) * nh, len = context_lens[b];               \
            const float *qh = q + ((int64_t)b * num_heads + (int64_t)h0 * group) * D;              \
            float *oh = out + ((int64_t)b * num_heads + (int64_t)h0 * group) * D;                  \
            if (len <= 0) { memset(oh, 0, sizeof(float) * nh * group * D); continue; }             \
            if (VEC_ITEM(qh, pool, &g, block_tables + (int64_t)b * max_blocks, len, h0, nh, group, \
                         scale, oh)) failed = 1;                                                   \
        }                                                                                          \
        return failed ? -2 : 0;                                                                    \
    }                                                                                              \
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

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_VEC_ITEM 1

/* Sixteen vectors in, one out: lane i is the sum of v[i]'s sixteen lanes (a transpose-and-add
 * tree: 45 shuffles and adds for sixteen dot products, against about eight a product when each
 * is reduced on its own). */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; ++k)  /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int m = 0; m < 4; ++m) {  /* per 128-bit lane: the four vectors 4m..4m+3, partly summed */
        const __m512d a = _mm512_castps_pd(t[2 * m]), c = _mm512_castps_pd(t[2 * m + 1]);
        u[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, c)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, c)));
    }
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

/* Kv heads [h0, h0 + nh) of one sequence with AVX-512, head_dim 16 * NV, in one pass over
 * the context sixteen keys at a time (online softmax, as flash-decoding does). A token's
 * rows of every kv head of the item are read together, in the order they lie in the pool
 * (a block's K is [block_size, kv_heads, head_dim], its V right after), so a block is one
 * contiguous read, and the next tile's rows are prefetched while this one is computed
 * (a sequence's blocks lie anywhere in the pool). Each key row is scored for its query
 * group in vector registers and the sixteen dot products of a head reduced at once by
 * sum16; the running maximum rescales the head's accumulator when it grows; each value row
 * is added to the group's accumulators with broadcast FMAs. Returns nonzero on failure. */
#define DEFINE_VEC_ITEM(NAME, KV_T, LOAD16, NV)                                                   \
static int NAME(const float *qh, const KV_T *pool, const pool_geometry *g, const int32_t *table,  \
                int len, int h0, int nh, int group, float scale, float *oh) {                    \
    const int bs = g->block_size, D = 16 * (NV), H = nh * group;                                   \
    const int64_t row = (int64_t)g->kv_heads * D;                                                  \
    const int span = nh * D * (int)sizeof(KV_T);                                                   \
    /* per query head: q (D), accumulator (D), the tile's products (16 x 16), probabilities   \
     * (16), running max and sum (16 each, for alignment) */                                 \
    const size_t per_head = (size_t)(2 * D + 256 + 16 + 32);                                       \
    float *mem = (float *)aligned_alloc(64, sizeof(float) * per_head * (size_t)H);                 \
    if (!mem) return 1;                                                                            \
    float *qs = mem, *acc = qs + (size_t)H * D, *prod = acc + (size_t)H * D;                       \
    float *probs = prod + (size_t)H * 256, *mx = probs + (size_t)H * 16, *sum = mx + (size_t)H * 16; \
    for (int hd = 0; hd < H; ++hd) {                                                               \
        for (int d = 0; d < D; ++d) { qs[hd * D + d] = qh[hd * D + d] * scale; acc[hd * D + d] = 0.f; } \
        mx[hd] = -FLT_MAX;  /* built with -ffast-math: no infinities */                            \
        sum[hd] = 0.f;                                                                             \
    }                                                                                              \
    const KV_T *base = pool + g->layer_offset + (int64_t)h0 * D;                                   \
    for (int t = 0; t < len && t < 2 * 16; ++t) {  /* the first two tiles, ahead */               \
        const char *r = (const char *)(base + (int64_t)table[t / bs] * g->block_stride + (int64_t)(t % bs) * row); \
        for (int c = 0; c < span; c += 64) {                                                       \
            _mm_prefetch(r + c, PREFETCH_HINT);                                                    \
            _mm_prefetch(r + g->v_offset * (int64_t)sizeof(KV_T) + c, PREFETCH_HINT);               \
        }                                                                                          \
    }                                                                                              \
    for (int t0 = 0; t0 < len; t0 += 16) {                                                         \
        const int n = len - t0 < 16 ? len - t0 : 16;                                               \
        const KV_T *rows[16];                                                                      \
        for (int i = 0; i < n; ++i) {                                                              \
            const int t = t0 + i, ta = t + 2 * 16;                                                 \
            rows[i] = base + (int64_t)table[t / bs] * g->block_stride + (int64_t)(t % bs) * row;   \
            if (ta < len) {  /* two tiles ahead, a row at a time: the misses spread over the tile */ \
                const char *r = (const char *)(base + (int64_t)table[ta / bs] * g->block_stride    \
                                               + (int64_t)(ta % bs) * row);                        \
                for (int c = 0; c < span; c += 64) {                                               \
                    _mm_prefetch(r + c, PREFETCH_HINT);                                            \
                    _mm_prefetch(r + g->v_offset * (int64_t)sizeof(KV_T) + c, PREFETCH_HINT);       \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < n; ++i) {                                                              \
            for (int hh = 0; hh < nh; ++hh) {                                                      \
                __m512 kv[NV];                                                                     \
                for (int c = 0; c < (NV); ++c) kv[c] = LOAD16(rows[i] + hh * D + 16 * c);         \
                for (int j = 0; j < group; ++j) {                                                  \
                    const float *qj = qs + (hh * group + j) * D;                                   \
                    __m512 a = _mm512_mul_ps(_mm512_load_ps(qj), kv[0]);                           \
                    for (int c = 1; c < (NV); ++c) a = _mm512_fmadd_ps(_mm512_load_ps(qj + 16 * c), kv[c], a); \
                    _mm512_store_ps(prod + (hh * group + j) * 256 + 16 * i, a);                    \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        const __mmask16 m = (__mmask16)((1u << n) - 1u);                                           \
        for (int hd = 0; hd < H; ++hd) {                                                           \
            float *ph = prod + hd * 256;                                                           \
            for (int i = n; i < 16; ++i) _mm512_store_ps(ph + 16 * i, _mm512_setzero_ps());        \
            const __m512 s = sum16((const __m512 *)ph);                                            \
            const float tile_max = _mm512_mask_reduce_max_ps(m, s);                                \
            const float new_max = tile_max > mx[hd] ? tile_max : mx[hd];                           \
            float e[16];                                                                           \
            _mm512_storeu_ps(e, _mm512_sub_ps(s, _mm512_set1_ps(new_max)));                        \
            _Pragma("omp simd")                                                                    \
            for (int i = 0; i < 16; ++i) e[i] = expf(e[i]);                                        \
            const __m512 p = _mm512_maskz_loadu_ps(m, e);                                          \
            _mm512_store_ps(probs + hd * 16, p);                                                   \
            if (new_max > mx[hd]) {  /* rescale what was summed under the old maximum */           \
                if (t0 > 0) {                                                                      \
                    const float alpha = expf(mx[hd] - new_max);                                    \
                    sum[hd] *= alpha;                                                              \
                    const __m512 av = _mm512_set1_ps(alpha);                                       \
                    for (int c = 0; c < (NV); ++c)                                                 \
                        _mm512_store_ps(acc + hd * D + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc + hd * D + 16 * c), av)); \
                }                                                                                  \
                mx[hd] = new_max;                                                                  \
            }                                                                                      \
            sum[hd] += _mm512_reduce_add_ps(p);                                                    \
        }                                                                                          \
        for (int hh = 0; hh < nh; ++hh) {                                                          \
            __m512 av[MAX_GROUP_VEC][NV];                                                          \
            const int gq = group < MAX_GROUP_VEC ? group : MAX_GROUP_VEC;                          \
            for (int j0 = 0; j0 < group; j0 += gq) {                                               \
                const int gn = group - j0 < gq ? group - j0 : gq;                                  \
                for (int j = 0; j < gn; ++j)                                                       \
                    for (int c = 0; c < (NV); ++c) av[j][c] = _mm512_load_ps(acc + (hh * group + j0 + j) * D + 16 * c); \
                for (int i = 0; i < n; ++i) {                                                      \
                    __m512 vv[NV];                                                                 \
                    for (int c = 0; c < (NV); ++c) vv[c] = LOAD16(rows[i] + g->v_offset + hh * D + 16 * c); \
                    for (int j = 0; j < gn; ++j) {                                                 \
                        const __m512 pb = _mm512_set1_ps(probs[(hh * group + j0 + j) * 16 + i]);   \
                        for (int c = 0; c < (NV); ++c) av[j][c] = _mm512_fmadd_ps(pb, vv[c], av[j][c]); \
                    }                                                                              \
                }                                                                                  \
                for (int j = 0; j < gn; ++j)                                                       \
                    for (int c = 0; c < (NV); ++c) _mm512_store_ps(acc + (hh * group + j0 + j) * D + 16 * c, av[j][c]); \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    for (int hd = 0; hd < H; ++hd) {                                                               \
        const __m512 iv = _mm512_set1_ps(1.f / sum[hd]);                                           \
        for (int c = 0; c < (NV); ++c)                                                             \
            _mm512_storeu_ps(oh + hd * D + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc + hd * D + 16 * c), iv)); \
    }                                                                                              \
    free(mem);                                                                                     \
    return 0;                                                                                      \
}

DEFINE_VEC_ITEM(vec_item_f32_d64, float, load16_f32, 4)
DEFINE_VEC_ITEM(vec_item_f32_d128, float, load16_f32, 8)
DEFINE_VEC_ITEM(vec_item_bf16_d64, uint16_t, load16_bf16, 4)
DEFINE_VEC_ITEM(vec_item_bf16_d128, uint16_t, load16_bf16, 8)
#define VEC_HEAD_DIM(D) ((D) == 64 || (D) == 128)
#define vec_item_f32(q, p, g, t, l, h0, nh, gr, sc, o) \
    ((g)->head_dim == 64 ? vec_item_f32_d64(q, p, g, t, l, h0, nh, gr, sc, o) : vec_item_f32_d128(q, p, g, t, l, h0, nh, gr, sc, o))
#define vec_item_bf16(q, p, g, t, l, h0, nh, gr, sc, o) \
    ((g)->head_dim == 64 ? vec_item_bf16_d64(q, p, g, t, l, h0, nh, gr, sc, o) : vec_item_bf16_d128(q, p, g, t, l, h0, nh, gr, sc, o))
#else
#define HAVE_VEC_ITEM 0
#define VEC_HEAD_DIM(D) 0
#define vec_item_f32(...) 0
#define vec_item_bf16(...) 0
#endif

DEFINE_KERNEL(flowkv_paged_decode_f32, float, LOAD_F32, vec_item_f32)
DEFINE_KERNEL(flowkv_paged_decode_bf16, uint16_t, LOAD_BF16, vec_item_bf16)

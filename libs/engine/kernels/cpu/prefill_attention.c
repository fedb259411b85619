/* Causal prefill attention on the CPU, reading the block-major KV pool in place.
 *
 * Pool: [num_blocks, layers, 2, block_size, kv_heads, head_dim], float32 or bfloat16 (then
 * q and out are bfloat16 too; a key tile is widened to float32 once for the whole group,
 * the math is float32 and each output rounded once). A batch of
 * prompt chunks: chunk s has q_len[s] query tokens (rows q_start[s] .. of q and out,
 * [T, num_heads, head_dim] with token stride sq / so) at positions ctx_start[s] + i, and
 * query i attends to the keys at positions 0 .. ctx_start[s] + i (causal, aligned to the
 * lower right: the chunk's own keys, already written to the pool, and any cached before
 * it), token t living in block block_tables[s][t / block_size] at offset t % block_size.
 *
 * Work items are (chunk, kv head, tile of 16 query tokens), spread over torch's OpenMP
 * team (dynamic: the causal tiles differ in length). An item keeps, for each query head
 * of the kv head's group, its 16 queries transposed ([head_dim][16], scaled), so that
 * every quantity of a row is one lane of a vector: the scores of a key are a vector over
 * the 16 queries (head_dim FMAs, the key's element broadcast), the running maximum and
 * sum of the online softmax (flash attention's) are vectors, so no horizontal reduction
 * is needed, and the output is accumulated transposed ([head_dim][16]) by FMAs with the
 * value's elements broadcast. Keys go 16 at a time; a key tile is read once for the whole
 * group. Softmax in float32 with the running maximum subtracted, as torch does.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "bf16.h"
#include "pool_geometry.h"


#define PF_MAX_GROUP 16
#define PF_MAX_HEAD_DIM 256

#if defined(__AVX512F__)
#include <immintrin.h>

int flowkv_prefill_available(void) { return 1; }

/* exp of 16 lanes (libmvec's vector expf: the loop vectorises under -ffast-math). */
static inline __m512 exp16(__m512 x) {
    float e[16] __attribute__((aligned(64)));
    _mm512_store_ps(e, x);
    _Pragma("omp simd")
    for (int i = 0; i < 16; ++i) e[i] = expf(e[i]);
    return _mm512_load_ps(e);
}

/* Rows of a key tile as float32: float32 rows are read where they lie; bfloat16 rows are
 * widened into buf ([16][D]) first. */
static inline const float *row_f32(const float *src, int D, float *buf) { (void)D; (void)buf; return src; }
static inline const float *row_bf16(const uint16_t *src, int D, float *buf) {
    for (int d = 0; d < D; d += 16) _mm512_store_ps(buf + d, load16_bf16(src + d));
    return buf;
}

/* One item: query tokens [i0, i0 + n) of a chunk (n <= 16), kv head h. */
#define DEFINE_PREFILL_ITEM(NAME, T, GET, PUT, ROW)                                                 \
static void NAME(const T *q, int64_t sq, const T *pool, const pool_geometry *g,                     \
                 const int32_t *table, int ctx_start, int i0, int n, int h, int group,              \
                 float scale, T *out, int64_t so, float *mem) {                                     \
    const int D = g->head_dim, bs = g->block_size;                                                  \
    const int64_t krow = (int64_t)g->kv_heads * D;                                                  \
    float *qt = mem;                              /* [group][D][16] */                              \
    float *ot = qt + (size_t)group * D * 16;      /* [group][D][16] */                              \
    float *st = ot + (size_t)group * D * 16;      /* [16 keys][16]: scores, then probabilities */   \
    float *kbuf = st + 256, *vbuf = kbuf + 16 * (size_t)D;  /* [16][D] each: a widened tile */      \
    __m512 mx[PF_MAX_GROUP], sum[PF_MAX_GROUP];                                                     \
    for (int j = 0; j < group; ++j) {                                                               \
        const T *qh = q + (int64_t)(h * group + j) * D;                                             \
        float *qj = qt + (size_t)j * D * 16;                                                        \
        for (int d = 0; d < D; ++d)                                                                 \
            for (int r = 0; r < 16; ++r) qj[d * 16 + r] = r < n ? GET(qh + (int64_t)(i0 + r) * sq + d) * scale : 0.f; \
        memset(ot + (size_t)j * D * 16, 0, sizeof(float) * D * 16);                                 \
        mx[j] = _mm512_set1_ps(-FLT_MAX);  /* built with -ffast-math: no infinities */              \
        sum[j] = _mm512_setzero_ps();                                                               \
    }                                                                                               \
    /* query r sits at position ctx_start + i0 + r */                                               \
    const __m512i qpos = _mm512_add_epi32(_mm512_set1_epi32(ctx_start + i0),                        \
                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)); \
    const int last = ctx_start + i0 + n;  /* keys [0, last) are seen by some query of the tile */   \
    const T *base = pool + g->layer_offset + (int64_t)h * D;                                        \
    for (int t0 = 0; t0 < last; t0 += 16) {                                                         \
        const int nk = last - t0 < 16 ? last - t0 : 16;                                             \
        /* always 16 keys, so that the loops over them unroll into registers; the keys past         \
         * the context (c >= nk) repeat the first and are masked for every query */                 \
        const float *krows[16], *vrows[16];                                                         \
        for (int c = 0; c < 16; ++c) {                                                              \
            const int t = t0 + (c < nk ? c : 0);                                                    \
            const T *kr = base + (int64_t)table[t / bs] * g->block_stride + (int64_t)(t % bs) * krow; \
            krows[c] = ROW(kr, D, kbuf + (size_t)c * D);                                            \
            vrows[c] = ROW(kr + g->v_offset, D, vbuf + (size_t)c * D);                              \
        }                                                                                           \
        /* a key at position t0 + c is seen by the queries at positions >= it */                    \
        const int masked = nk < 16 || t0 + 15 > ctx_start + i0;                                     \
        for (int j = 0; j < group; ++j) {                                                           \
            const float *qj = qt + (size_t)j * D * 16;                                              \
            __m512 s[16];                                                                           \
            for (int c = 0; c < 16; ++c) s[c] = _mm512_setzero_ps();                                \
            for (int d = 0; d < D; ++d) {                                                           \
                const __m512 qv = _mm512_load_ps(qj + d * 16);                                      \
                for (int c = 0; c < 16; ++c) s[c] = _mm512_fmadd_ps(qv, _mm512_set1_ps(krows[c][d]), s[c]); \
            }                                                                                       \
            __m512 tile_max = _mm512_set1_ps(-FLT_MAX);                                             \
            for (int c = 0; c < 16; ++c) {                                                          \
                if (masked) {                                                                       \
                    const __mmask16 seen = c < nk ? _mm512_cmpge_epi32_mask(qpos, _mm512_set1_epi32(t0 + c)) : 0; \
                    s[c] = _mm512_mask_blend_ps(seen, _mm512_set1_ps(-FLT_MAX), s[c]);              \
                }                                                                                   \
                tile_max = _mm512_max_ps(tile_max, s[c]);                                           \
            }                                                                                       \
            const __m512 new_max = _mm512_max_ps(mx[j], tile_max);                                  \
            const __m512 alpha = exp16(_mm512_sub_ps(mx[j], new_max));                              \
            mx[j] = new_max;                                                                        \
            __m512 psum = _mm512_setzero_ps();                                                      \
            for (int c = 0; c < 16; ++c) {                                                          \
                /* a masked score is -FLT_MAX: its exp is 0 as long as the row saw one key */       \
                const __m512 p = exp16(_mm512_sub_ps(s[c], new_max));                               \
                psum = _mm512_add_ps(psum, p);                                                      \
                _mm512_store_ps(st + c * 16, p);                                                    \
            }                                                                                       \
            sum[j] = _mm512_fmadd_ps(sum[j], alpha, psum);                                          \
            float *oj = ot + (size_t)j * D * 16;                                                    \
            for (int d0 = 0; d0 < D; d0 += 16) {                                                    \
                __m512 acc[16];                                                                     \
                for (int dd = 0; dd < 16; ++dd) acc[dd] = _mm512_mul_ps(_mm512_load_ps(oj + (d0 + dd) * 16), alpha); \
                for (int c = 0; c < 16; ++c) {                                                      \
                    const __m512 p = _mm512_load_ps(st + c * 16);                                   \
                    const float *vr = vrows[c] + d0;                                                \
                    for (int dd = 0; dd < 16; ++dd) acc[dd] = _mm512_fmadd_ps(p, _mm512_set1_ps(vr[dd]), acc[dd]); \
                }                                                                                   \
                for (int dd = 0; dd < 16; ++dd) _mm512_store_ps(oj + (d0 + dd) * 16, acc[dd]);      \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int j = 0; j < group; ++j) {                                                               \
        float inv[16] __attribute__((aligned(64)));                                                 \
        _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), sum[j]));                           \
        const float *oj = ot + (size_t)j * D * 16;                                                  \
        T *oh = out + (int64_t)(h * group + j) * D;                                                 \
        for (int r = 0; r < n; ++r)                                                                 \
            for (int d = 0; d < D; ++d) PUT(oh + (int64_t)(i0 + r) * so + d, oj[d * 16 + r] * inv[r]); \
    }                                                                                               \
}

DEFINE_PREFILL_ITEM(prefill_item_f32, float, get_f32, put_f32, row_f32)
DEFINE_PREFILL_ITEM(prefill_item_bf16, uint16_t, get_bf16, put_bf16, row_bf16)

/* Returns 0, -1 for shapes it does not take (the caller keeps torch), -2 out of memory. */
#define DEFINE_PREFILL(NAME, T, ITEM)                                                               \
int NAME(const T *q, int64_t sq, const T *pool, pool_geometry g,                                    \
         const int32_t *block_tables, int64_t max_blocks, const int32_t *q_start,                   \
         const int32_t *q_len, const int32_t *ctx_start, int num_chunks, int num_heads,             \
         float scale, T *out, int64_t so) {                                                         \
    const int group = num_heads / g.kv_heads, D = g.head_dim;                                       \
    if (num_heads % g.kv_heads || group > PF_MAX_GROUP || D % 16 || D > PF_MAX_HEAD_DIM) return -1; \
    int64_t items = 0;                                                                              \
    for (int s = 0; s < num_chunks; ++s) items += (int64_t)g.kv_heads * ((q_len[s] + 15) / 16);     \
    int failed = 0;                                                                                 \
    const size_t per_item = (size_t)(2 * group * D * 16 + 256 + 32 * D);                            \
    _Pragma("omp parallel")                                                                         \
    {                                                                                               \
        float *mem = (float *)aligned_alloc(64, sizeof(float) * per_item);                          \
        if (!mem) {                                                                                 \
            _Pragma("omp atomic write")                                                             \
            failed = 1;                                                                             \
        }                                                                                           \
        /* longest tiles first: the last query tiles of a chunk see the most keys */                \
        _Pragma("omp for schedule(dynamic, 1)")                                                     \
        for (int64_t it = 0; it < items; ++it) {                                                    \
            if (!mem) continue;                                                                     \
            int64_t rest = it;                                                                      \
            int s = 0;                                                                              \
            for (; s < num_chunks; ++s) {                                                           \
                const int64_t here = (int64_t)g.kv_heads * ((q_len[s] + 15) / 16);                  \
                if (rest < here) break;                                                             \
                rest -= here;                                                                       \
            }                                                                                       \
            const int tiles = (q_len[s] + 15) / 16;                                                 \
            const int tile = tiles - 1 - (int)(rest / g.kv_heads), h = (int)(rest % g.kv_heads);    \
            const int i0 = tile * 16, n = q_len[s] - i0 < 16 ? q_len[s] - i0 : 16;                  \
            ITEM(q + (int64_t)q_start[s] * sq, sq, pool, &g, block_tables + (int64_t)s * max_blocks, \
                         ctx_start[s], i0, n, h, group, scale, out + (int64_t)q_start[s] * so, so, mem); \
        }                                                                                           \
        free(mem);                                                                                  \
    }                                                                                               \
    return failed ? -2 : 0;                                                                         \
}

DEFINE_PREFILL(flowkv_paged_prefill_f32, float, prefill_item_f32)
DEFINE_PREFILL(flowkv_paged_prefill_bf16, uint16_t, prefill_item_bf16)

#else  /* no AVX-512: the caller keeps torch's SDPA */

int flowkv_prefill_available(void) { return 0; }

int flowkv_paged_prefill_f32(const float *q, int64_t sq, const float *pool, pool_geometry g,
                             const int32_t *block_tables, int64_t max_blocks, const int32_t *q_start,
                             const int32_t *q_len, const int32_t *ctx_start, int num_chunks, int num_heads,
                             float scale, float *out, int64_t so) {
    (void)q; (void)sq; (void)pool; (void)g; (void)block_tables; (void)max_blocks; (void)q_start;
    (void)q_len; (void)ctx_start; (void)num_chunks; (void)num_heads; (void)scale; (void)out; (void)so;
    return -1;
}

int flowkv_paged_prefill_bf16(const uint16_t *q, int64_t sq, const uint16_t *pool, pool_geometry g,
                              const int32_t *block_tables, int64_t max_blocks, const int32_t *q_start,
                              const int32_t *q_len, const int32_t *ctx_start, int num_chunks, int num_heads,
                              float scale, uint16_t *out, int64_t so) {
    (void)q; (void)sq; (void)pool; (void)g; (void)block_tables; (void)max_blocks; (void)q_start;
    (void)q_len; (void)ctx_start; (void)num_chunks; (void)num_heads; (void)scale; (void)out; (void)so;
    return -1;
}

#endif

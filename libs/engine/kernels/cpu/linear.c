/* Linear layers of a few rows (a decode step of a small batch) on the CPU, streaming the weight once.
 *
 *   flowkv_linear_f32:  out[m][n] = sum_k x[m][k] * w[n][k] (+ bias[n]), w row-major [N, K]
 *   flowkv_linear_bf16: the same on bfloat16 x, w, bias and out, products summed in float32
 *                       and rounded to bf16 once at the end (as oneDNN's bf16 GEMM does)
 *
 * With a few rows a linear layer is bound by reading its weight, which does not fit the
 * caches: a decode step reads every weight of the model once. Here each thread streams a
 * contiguous band of the weight's rows, NR rows side by side, and keeps the NR x MR dot
 * products of those rows with up to MR input rows in vector registers (MR x NR of 1 x 8,
 * 2 x 8, 4 x 4, 8 x 2: at most 16 accumulators), so a weight byte is loaded once for every
 * input row and the inputs come from L1. More than 8 rows are taken 8 at a time (a pass
 * over the weight each): the caller keeps oneDNN's blocked GEMM for those.
 *
 * Float32 has a second form for up to a few dozen rows, on a copy of the weight packed once
 * at load into panels of 16 output columns (flowkv_pack_panels_f32: [ceil(N/16)][K][16]):
 *
 *   flowkv_linear_panels_f32: out = x @ w.T (+ bias) from the panels
 *
 * Each thread walks its share of the panels, one contiguous stream; for every k it loads
 * the panel's 16 weights once and adds them, times each input row's x[m][k] (broadcast
 * from a transposed copy of up to 16 rows), into 16 output rows kept in registers. A weight
 * byte is read from memory once for 16 rows, and the sum over k is one FMA chain an output
 * in k order. More than 16 rows go in groups of 16 over the same panel, read again from
 * the cache. On a 2-core AMD EPYC (Zen 4), SmolLM2's 121 layers with 16 rows took 24-27 ms
 * against oneDNN's packed GEMM's 33-41 ms, and one row 20-23 against 26-33 ms (2 threads).
 *
 * The band kernels sum over k in 16-lane partial sums reduced at the end, the panels in
 * plain k order: both orders differ from MKL's or oneDNN's, so results agree with theirs to
 * float32 rounding, not bit for bit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>

int flowkv_linear_available(void) { return 1; }

static inline __m512 load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 maskload_f32(__mmask16 m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 maskload_bf16(__mmask16 m, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}


/* Rows [n0, n1) of the output for MR input rows (of which the first `rows` are real; the
 * others repeat row 0 and are not stored). */
#define DEFINE_BAND(NAME, T, LOAD, MASKLOAD, GET, PUT, NR, MR)                                      \
static void NAME(const T *x, int64_t sx, int rows, const T *w, int64_t K, const T *bias, T *out,   \
                 int64_t so, int64_t n0, int64_t n1) {                                              \
    const int64_t kv = K & ~(int64_t)15;                                                            \
    const __mmask16 tail = (__mmask16)((1u << (K - kv)) - 1u);                                      \
    const T *xr[MR];                                                                                \
    for (int m = 0; m < (MR); ++m) xr[m] = x + (m < rows ? m : 0) * sx;                             \
    for (int64_t n = n0; n < n1; n += (NR)) {                                                       \
        const int nr = n1 - n < (NR) ? (int)(n1 - n) : (NR);                                        \
        const T *wr[NR];                                                                            \
        for (int r = 0; r < (NR); ++r) wr[r] = w + (n + (r < nr ? r : 0)) * K;                      \
        __m512 acc[NR][MR];                                                                         \
        for (int r = 0; r < (NR); ++r)                                                              \
            for (int m = 0; m < (MR); ++m) acc[r][m] = _mm512_setzero_ps();                         \
        /* the next group's rows, a line of each per 16 columns: they arrive while these are summed */ \
        const char *ahead = (const char *)(w + (n + (NR) < n1 ? n + (NR) : n) * K);                 \
        const int64_t row_bytes = K * (int64_t)sizeof(T);                                           \
        for (int64_t k = 0; k < kv; k += 16) {                                                      \
            for (int r = 0; r < (NR); ++r)                                                          \
                _mm_prefetch(ahead + r * row_bytes + k * (int64_t)sizeof(T), _MM_HINT_T0);          \
            __m512 xv[MR];                                                                          \
            for (int m = 0; m < (MR); ++m) xv[m] = LOAD(xr[m] + k);                                 \
            for (int r = 0; r < (NR); ++r) {                                                        \
                const __m512 wv = LOAD(wr[r] + k);                                                  \
                for (int m = 0; m < (MR); ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);   \
            }                                                                                       \
        }                                                                                           \
        if (tail) {                                                                                 \
            __m512 xv[MR];                                                                          \
            for (int m = 0; m < (MR); ++m) xv[m] = MASKLOAD(tail, xr[m] + kv);                      \
            for (int r = 0; r < (NR); ++r) {                                                        \
                const __m512 wv = MASKLOAD(tail, wr[r] + kv);                                       \
                for (int m = 0; m < (MR); ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);   \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < nr; ++r)                                                                \
            for (int m = 0; m < rows && m < (MR); ++m)                                              \
                PUT(out + m * so + n + r, _mm512_reduce_add_ps(acc[r][m]) + (bias ? GET(bias + n + r) : 0.f)); \
    }                                                                                               \
}

DEFINE_BAND(band_f32_1, float, load_f32, maskload_f32, get_f32, put_f32, 8, 1)
DEFINE_BAND(band_f32_2, float, load_f32, maskload_f32, get_f32, put_f32, 8, 2)
DEFINE_BAND(band_f32_4, float, load_f32, maskload_f32, get_f32, put_f32, 4, 4)
DEFINE_BAND(band_f32_8, float, load_f32, maskload_f32, get_f32, put_f32, 2, 8)
DEFINE_BAND(band_bf16_1, uint16_t, load16_bf16, maskload_bf16, get_bf16, put_bf16, 8, 1)
DEFINE_BAND(band_bf16_2, uint16_t, load16_bf16, maskload_bf16, get_bf16, put_bf16, 8, 2)
DEFINE_BAND(band_bf16_4, uint16_t, load16_bf16, maskload_bf16, get_bf16, put_bf16, 4, 4)
DEFINE_BAND(band_bf16_8, uint16_t, load16_bf16, maskload_bf16, get_bf16, put_bf16, 2, 8)

/* The threads split the output rows into bands of whole 8-row groups. */
#define DEFINE_LINEAR(NAME, T, SUFFIX)                                                              \
int NAME(const T *x, int64_t sx, int64_t rows, const T *w, int64_t n_out, int64_t k_in, const T *bias, \
         T *out, int64_t so) {                                                                      \
    _Pragma("omp parallel")                                                                         \
    {                                                                                               \
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();                             \
        const int64_t band = ((n_out + nt - 1) / nt + 7) & ~(int64_t)7;                             \
        const int64_t n0 = t * band, n1 = n0 + band < n_out ? n0 + band : n_out;                    \
        for (int64_t m0 = 0; m0 < rows && n0 < n1; m0 += 8) {                                       \
            const int mm = rows - m0 < 8 ? (int)(rows - m0) : 8;                                    \
            const T *xm = x + m0 * sx;                                                              \
            T *om = out + m0 * so;                                                                  \
            if (mm == 1) band_##SUFFIX##_1(xm, sx, mm, w, k_in, bias, om, so, n0, n1);              \
            else if (mm == 2) band_##SUFFIX##_2(xm, sx, mm, w, k_in, bias, om, so, n0, n1);         \
            else if (mm <= 4) band_##SUFFIX##_4(xm, sx, mm, w, k_in, bias, om, so, n0, n1);         \
            else band_##SUFFIX##_8(xm, sx, mm, w, k_in, bias, om, so, n0, n1);                      \
        }                                                                                           \
    }                                                                                               \
    return 0;                                                                                       \
}

DEFINE_LINEAR(flowkv_linear_f32, float, f32)
DEFINE_LINEAR(flowkv_linear_bf16, uint16_t, bf16)

/* Panels of 16 output columns: p[(n / 16) * K * 16 + k * 16 + n % 16] = w[n][k], the last
 * panel padded with zeros. */
void flowkv_pack_panels_f32(const float *w, int64_t n_out, int64_t k_in, float *p) {
    const int64_t np = (n_out + 15) / 16;
    _Pragma("omp parallel for schedule(static)")
    for (int64_t pn = 0; pn < np; ++pn)
        for (int64_t k = 0; k < k_in; ++k)
            for (int j = 0; j < 16; ++j) {
                const int64_t n = pn * 16 + j;
                p[(pn * k_in + k) * 16 + j] = n < n_out ? w[n * k_in + k] : 0.f;
            }
}

/* How far ahead in a panel (k steps of 64 bytes) its weights are prefetched: 4 KB. */
#define PANEL_PREFETCH 64

/* One panel (columns [n0, n0 + 16), fewer at the end) for MR rows of xt ([K][16], row m at
 * lane m), into out rows [0, MR). */
#define DEFINE_PANEL(MR)                                                                            \
static void panel_##MR(const float *xt, const float *pp, int64_t K, const float *bias, float *out,  \
                       int64_t so, int64_t n0, int64_t n_out) {                                     \
    const __mmask16 mk = n_out - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_out - n0)) - 1u); \
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();            \
    __m512 acc[MR];                                                                                 \
    for (int m = 0; m < (MR); ++m) acc[m] = b;                                                      \
    for (int64_t k = 0; k < K; ++k) {                                                               \
        _mm_prefetch((const char *)(pp + (k + PANEL_PREFETCH) * 16), _MM_HINT_T0);                  \
        const __m512 wv = _mm512_load_ps(pp + k * 16);                                              \
        for (int m = 0; m < (MR); ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(xt[k * 16 + m]), wv, acc[m]); \
    }                                                                                               \
    for (int m = 0; m < (MR); ++m) _mm512_mask_storeu_ps(out + m * so + n0, mk, acc[m]);           \
}
DEFINE_PANEL(1) DEFINE_PANEL(2) DEFINE_PANEL(3) DEFINE_PANEL(4) DEFINE_PANEL(5) DEFINE_PANEL(6)
DEFINE_PANEL(7) DEFINE_PANEL(8) DEFINE_PANEL(9) DEFINE_PANEL(10) DEFINE_PANEL(11) DEFINE_PANEL(12)
DEFINE_PANEL(13) DEFINE_PANEL(14) DEFINE_PANEL(15) DEFINE_PANEL(16)

typedef void (*panel_fn)(const float *, const float *, int64_t, const float *, float *, int64_t, int64_t, int64_t);
static const panel_fn PANELS[17] = {
    0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6, panel_7, panel_8,
    panel_9, panel_10, panel_11, panel_12, panel_13, panel_14, panel_15, panel_16,
};

/* out [rows, n_out] (row stride so) = x [rows, k_in] (row stride sx) @ w.T + bias, w given
 * as its panels. Returns nonzero when out of memory. */
int flowkv_linear_panels_f32(const float *x, int64_t sx, int64_t rows, const float *p, int64_t n_out,
                             int64_t k_in, const float *bias, float *out, int64_t so) {
    const int64_t groups = (rows + 15) / 16, np = (n_out + 15) / 16;
    float *xt = (float *)aligned_alloc(64, sizeof(float) * 16 * (size_t)k_in * (size_t)groups);
    if (!xt) return 1;
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t k = 0; k < k_in; ++k)
            for (int m = 0; m < 16; ++m) {
                const int64_t r = g * 16 + m;
                xt[(g * k_in + k) * 16 + m] = r < rows ? x[r * sx + k] : 0.f;
            }
    _Pragma("omp parallel for schedule(static)")
    for (int64_t pn = 0; pn < np; ++pn)
        for (int64_t g = 0; g < groups; ++g) {
            const int mr = rows - g * 16 < 16 ? (int)(rows - g * 16) : 16;
            PANELS[mr](xt + g * k_in * 16, p + pn * k_in * 16, k_in, bias, out + g * 16 * so, so, pn * 16, n_out);
        }
    free(xt);
    return 0;
}

#if defined(__AVX512BF16__)
int flowkv_panels_bf16_available(void) { return 1; }

/* Bfloat16 panels hold pairs of k side by side, as the CPU's bf16 dot product (vdpbf16ps)
 * takes them: p[((n / 16) * ceil(K / 2) + k / 2) * 32 + (n % 16) * 2 + k % 2] = w[n][k],
 * zeros past K and N. For each pair the 16 rows' (x[m][k], x[m][k + 1]) are broadcast and
 * multiplied into the 16 columns, summed in float32 (as oneDNN's bf16 GEMM does); the
 * results are rounded to bf16 once, to nearest even. */
void flowkv_pack_panels_bf16(const uint16_t *w, int64_t n_out, int64_t k_in, uint16_t *p) {
    const int64_t np = (n_out + 15) / 16, kp = (k_in + 1) / 2;
    _Pragma("omp parallel for schedule(static)")
    for (int64_t pn = 0; pn < np; ++pn)
        for (int64_t k = 0; k < 2 * kp; ++k)
            for (int j = 0; j < 16; ++j) {
                const int64_t n = pn * 16 + j;
                p[((pn * kp + k / 2) * 16 + j) * 2 + k % 2] = n < n_out && k < k_in ? w[n * k_in + k] : 0;
            }
}

#define DEFINE_PANEL_BF16(MR)                                                                       \
static void panel_bf16_##MR(const uint32_t *xt, const uint16_t *pp, int64_t KP, const uint16_t *bias, \
                            uint16_t *out, int64_t so, int64_t n0, int64_t n_out) {                 \
    const __mmask16 mk = n_out - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_out - n0)) - 1u); \
    const __m512 b = bias ? maskload_bf16(mk, bias + n0) : _mm512_setzero_ps();                     \
    __m512 acc[MR];                                                                                 \
    for (int m = 0; m < (MR); ++m) acc[m] = b;                                                      \
    for (int64_t k = 0; k < KP; ++k) {                                                              \
        _mm_prefetch((const char *)(pp + (k + PANEL_PREFETCH) * 32), _MM_HINT_T0);                  \
        const __m512bh wv = (__m512bh)_mm512_load_si512((const void *)(pp + k * 32));               \
        for (int m = 0; m < (MR); ++m)                                                              \
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32((int)xt[k * 16 + m]), wv); \
    }                                                                                               \
    for (int m = 0; m < (MR); ++m)                                                                  \
        _mm256_mask_storeu_epi16(out + m * so + n0, mk, (__m256i)_mm512_cvtneps_pbh(acc[m]));       \
}
DEFINE_PANEL_BF16(1) DEFINE_PANEL_BF16(2) DEFINE_PANEL_BF16(3) DEFINE_PANEL_BF16(4) DEFINE_PANEL_BF16(5)
DEFINE_PANEL_BF16(6) DEFINE_PANEL_BF16(7) DEFINE_PANEL_BF16(8) DEFINE_PANEL_BF16(9) DEFINE_PANEL_BF16(10)
DEFINE_PANEL_BF16(11) DEFINE_PANEL_BF16(12) DEFINE_PANEL_BF16(13) DEFINE_PANEL_BF16(14) DEFINE_PANEL_BF16(15)
DEFINE_PANEL_BF16(16)

typedef void (*panel_bf16_fn)(const uint32_t *, const uint16_t *, int64_t, const uint16_t *, uint16_t *, int64_t,
                              int64_t, int64_t);
static const panel_bf16_fn PANELS_BF16[17] = {
    0, panel_bf16_1, panel_bf16_2, panel_bf16_3, panel_bf16_4, panel_bf16_5, panel_bf16_6, panel_bf16_7,
    panel_bf16_8, panel_bf16_9, panel_bf16_10, panel_bf16_11, panel_bf16_12, panel_bf16_13, panel_bf16_14,
    panel_bf16_15, panel_bf16_16,
};

int flowkv_linear_panels_bf16(const uint16_t *x, int64_t sx, int64_t rows, const uint16_t *p, int64_t n_out,
                              int64_t k_in, const uint16_t *bias, uint16_t *out, int64_t so) {
    const int64_t groups = (rows + 15) / 16, np = (n_out + 15) / 16, kp = (k_in + 1) / 2;
    uint32_t *xt = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * 16 * (size_t)kp * (size_t)groups);
    if (!xt) return 1;
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t k = 0; k < kp; ++k)
            for (int m = 0; m < 16; ++m) {
                const int64_t r = g * 16 + m;
                const uint32_t lo = r < rows ? x[r * sx + 2 * k] : 0;
                const uint32_t hi = r < rows && 2 * k + 1 < k_in ? x[r * sx + 2 * k + 1] : 0;
                xt[(g * kp + k) * 16 + m] = lo | (hi << 16);
            }
    _Pragma("omp parallel for schedule(static)")
    for (int64_t pn = 0; pn < np; ++pn)
        for (int64_t g = 0; g < groups; ++g) {
            const int mr = rows - g * 16 < 16 ? (int)(rows - g * 16) : 16;
            PANELS_BF16[mr](xt + g * kp * 16, p + pn * kp * 32, kp, bias, out + g * 16 * so, so, pn * 16, n_out);
        }
    free(xt);
    return 0;
}
#endif  /* __AVX512BF16__ */

#else  /* no AVX-512: the caller keeps torch's linear */

int flowkv_linear_available(void) { return 0; }

int flowkv_linear_f32(const float *x, int64_t sx, int64_t rows, const float *w, int64_t n_out, int64_t k_in,
                      const float *bias, float *out, int64_t so) {
    (void)x; (void)sx; (void)rows; (void)w; (void)n_out; (void)k_in; (void)bias; (void)out; (void)so;
    return -1;
}
int flowkv_linear_bf16(const uint16_t *x, int64_t sx, int64_t rows, const uint16_t *w, int64_t n_out,
                       int64_t k_in, const uint16_t *bias, uint16_t *out, int64_t so) {
    (void)x; (void)sx; (void)rows; (void)w; (void)n_out; (void)k_in; (void)bias; (void)out; (void)so;
    return -1;
}
void flowkv_pack_panels_f32(const float *w, int64_t n_out, int64_t k_in, float *p) {
    (void)w; (void)n_out; (void)k_in; (void)p;
}
int flowkv_linear_panels_f32(const float *x, int64_t sx, int64_t rows, const float *p, int64_t n_out,
                             int64_t k_in, const float *bias, float *out, int64_t so) {
    (void)x; (void)sx; (void)rows; (void)p; (void)n_out; (void)k_in; (void)bias; (void)out; (void)so;
    return -1;
}

#endif

/* Without the CPU's bf16 dot product, bfloat16 keeps oneDNN and the band kernel. */
#if !(defined(__AVX512F__) && defined(__AVX512BF16__))
int flowkv_panels_bf16_available(void) { return 0; }
void flowkv_pack_panels_bf16(const uint16_t *w, int64_t n_out, int64_t k_in, uint16_t *p) {
    (void)w; (void)n_out; (void)k_in; (void)p;
}
int flowkv_linear_panels_bf16(const uint16_t *x, int64_t sx, int64_t rows, const uint16_t *p, int64_t n_out,
                              int64_t k_in, const uint16_t *bias, uint16_t *out, int64_t so) {
    (void)x; (void)sx; (void)rows; (void)p; (void)n_out; (void)k_in; (void)bias; (void)out; (void)so;
    return -1;
}
#endif

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
 * The sum over k runs in 16-lane partial sums reduced at the end, a different order from
 * MKL's or oneDNN's: results agree with theirs to float32 rounding, not bit for bit.
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>

int flowkv_linear_available(void) { return 1; }

static inline __m512 load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 maskload_f32(__mmask16 m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 maskload_bf16(__mmask16 m, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* nearest, ties to even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float get_f32(const float *p) { return *p; }
static inline void put_f32(float *p, float v) { *p = v; }
static inline float get_bf16(const uint16_t *p) { return bf16_to_f32(*p); }
static inline void put_bf16(uint16_t *p, float v) { *p = f32_to_bf16(v); }

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
DEFINE_BAND(band_bf16_1, uint16_t, load_bf16, maskload_bf16, get_bf16, put_bf16, 8, 1)
DEFINE_BAND(band_bf16_2, uint16_t, load_bf16, maskload_bf16, get_bf16, put_bf16, 8, 2)
DEFINE_BAND(band_bf16_4, uint16_t, load_bf16, maskload_bf16, get_bf16, put_bf16, 4, 4)
DEFINE_BAND(band_bf16_8, uint16_t, load_bf16, maskload_bf16, get_bf16, put_bf16, 2, 8)

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

#endif

/* The element-wise ops of a decoder layer on the CPU, float32 and bfloat16, one call each instead of
 * the five to eight torch ops (and their temporaries) that spell them out.
 *
 *   flowkv_add_rms_norm_f32: r = x + residual (stored into residual), out = w * rmsnorm(r)
 *   flowkv_rotary_f32:       rotate-half rotary of q and k in place, cos/sin tables [P, D]
 *   flowkv_silu_mul_f32:     out = silu(gate) * up of gate_up [T, 2I] (gate first)
 *
 * Rows are split over OpenMP threads only when there are enough of them to pay for the
 * wake-up (a decode step's handful of rows runs on the calling thread).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define PARALLEL_MIN_ELEMS (1 << 15)

void flowkv_add_rms_norm_f32(const float *x, int64_t stride_x, float *residual, int64_t stride_res,
                             const float *weight, float *out, int64_t stride_out, int64_t rows,
                             int64_t cols, float eps, int has_residual) {
    #pragma omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMS)
    for (int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * stride_x;
        float *ri = residual + i * stride_res, *oi = out + i * stride_out;
        float ss = 0.f;
        if (has_residual) {
            #pragma omp simd reduction(+:ss)
            for (int64_t j = 0; j < cols; ++j) { float r = xi[j] + ri[j]; ri[j] = r; ss += r * r; }
        } else {
            #pragma omp simd reduction(+:ss)
            for (int64_t j = 0; j < cols; ++j) { float r = xi[j]; ri[j] = r; ss += r * r; }
        }
        const float inv = 1.f / sqrtf(ss / (float)cols + eps);
        #pragma omp simd
        for (int64_t j = 0; j < cols; ++j) oi[j] = weight[j] * (ri[j] * inv);
    }
}

static inline void rotate_heads(float *x, int64_t stride_t, int heads, int dim, const float *c, const float *s,
                                int64_t t) {
    const int half = dim / 2;
    for (int h = 0; h < heads; ++h) {
        float *xh = x + t * stride_t + (int64_t)h * dim;
        #pragma omp simd
        for (int j = 0; j < half; ++j) {
            const float a = xh[j], b = xh[j + half];
            xh[j] = a * c[j] - b * s[j];
            xh[j + half] = b * c[j + half] + a * s[j + half];
        }
    }
}

void flowkv_rotary_f32(float *q, int64_t q_stride_t, int q_heads, float *k, int64_t k_stride_t, int k_heads,
                       int dim, const int64_t *positions, int64_t tokens, const float *cos_table,
                       const float *sin_table) {
    #pragma omp parallel for schedule(static) if (tokens * (q_heads + k_heads) * dim >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos_table + positions[t] * dim, *s = sin_table + positions[t] * dim;
        rotate_heads(q, q_stride_t, q_heads, dim, c, s, t);
        rotate_heads(k, k_stride_t, k_heads, dim, c, s, t);
    }
}

void flowkv_silu_mul_f32(const float *gate_up, int64_t stride_in, float *out, int64_t stride_out, int64_t rows,
                         int64_t inter) {
    #pragma omp parallel for schedule(static) if (rows * inter >= PARALLEL_MIN_ELEMS)
    for (int64_t i = 0; i < rows; ++i) {
        const float *g = gate_up + i * stride_in, *u = g + inter;
        float *o = out + i * stride_out;
        #pragma omp simd
        for (int64_t j = 0; j < inter; ++j) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
    }
}

/* bfloat16 versions: the same ops on bf16 tensors, computed in float32 and rounded to
 * bf16 (nearest, ties to even) exactly where the torch reference rounds, so the results
 * equal the reference's bit for bit. */


static inline float bf16_rt(float f) { return bf16_to_f32(f32_to_bf16(f)); }

void flowkv_add_rms_norm_bf16(const uint16_t *x, int64_t stride_x, uint16_t *residual, int64_t stride_res,
                              const uint16_t *weight, uint16_t *out, int64_t stride_out, int64_t rows,
                              int64_t cols, float eps, int has_residual) {
    #pragma omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMS)
    for (int64_t i = 0; i < rows; ++i) {
        const uint16_t *xi = x + i * stride_x;
        uint16_t *ri = residual + i * stride_res, *oi = out + i * stride_out;
        float ss = 0.f;
        for (int64_t j = 0; j < cols; ++j) {
            const float r = has_residual ? bf16_rt(bf16_to_f32(xi[j]) + bf16_to_f32(ri[j])) : bf16_to_f32(xi[j]);
            ri[j] = f32_to_bf16(r);
            ss += r * r;
        }
        const float inv = 1.f / sqrtf(ss / (float)cols + eps);
        for (int64_t j = 0; j < cols; ++j)
            oi[j] = f32_to_bf16(bf16_to_f32(weight[j]) * bf16_rt(bf16_to_f32(ri[j]) * inv));
    }
}

static inline void rotate_heads_bf16(uint16_t *x, int64_t stride_t, int heads, int dim, const float *c,
                                     const float *s, int64_t t) {
    const int half = dim / 2;
    for (int h = 0; h < heads; ++h) {
        uint16_t *xh = x + t * stride_t + (int64_t)h * dim;
        for (int j = 0; j < half; ++j) {
            const float a = bf16_to_f32(xh[j]), b = bf16_to_f32(xh[j + half]);
            /* torch: q * cos + rotate_half(q) * sin, each product and the sum rounded */
            xh[j] = f32_to_bf16(bf16_rt(a * bf16_rt(c[j])) + bf16_rt(-b * bf16_rt(s[j])));
            xh[j + half] = f32_to_bf16(bf16_rt(b * bf16_rt(c[j + half])) + bf16_rt(a * bf16_rt(s[j + half])));
        }
    }
}

void flowkv_rotary_bf16(uint16_t *q, int64_t q_stride_t, int q_heads, uint16_t *k, int64_t k_stride_t,
                        int k_heads, int dim, const int64_t *positions, int64_t tokens, const float *cos_table,
                        const float *sin_table) {
    #pragma omp parallel for schedule(static) if (tokens * (q_heads + k_heads) * dim >= PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos_table + positions[t] * dim, *s = sin_table + positions[t] * dim;
        rotate_heads_bf16(q, q_stride_t, q_heads, dim, c, s, t);
        rotate_heads_bf16(k, k_stride_t, k_heads, dim, c, s, t);
    }
}

void flowkv_silu_mul_bf16(const uint16_t *gate_up, int64_t stride_in, uint16_t *out, int64_t stride_out,
                          int64_t rows, int64_t inter) {
    #pragma omp parallel for schedule(static) if (rows * inter >= PARALLEL_MIN_ELEMS)
    for (int64_t i = 0; i < rows; ++i) {
        const uint16_t *g = gate_up + i * stride_in, *u = g + inter;
        uint16_t *o = out + i * stride_out;
        for (int64_t j = 0; j < inter; ++j) {
            const float gj = bf16_to_f32(g[j]);
            o[j] = f32_to_bf16(bf16_rt(gj / (1.f + expf(-gj))) * bf16_to_f32(u[j]));
        }
    }
}

/* K and V rows of new tokens into the pool by slot (block * block_size + offset); a token's
 * kv heads are one row of `row_bytes` in both the source and the pool. Slots < 0 are skipped.
 * One call a layer instead of torch's two advanced-index scatters. */
void flowkv_write_kv(const char *k, int64_t k_stride, const char *v, int64_t v_stride, char *pool,
                     int64_t block_stride, int64_t layer_offset, int64_t v_offset, int64_t block_size,
                     int64_t token_stride, int64_t row_bytes, const int64_t *slots, int64_t tokens) {
    #pragma omp parallel for schedule(static) if (tokens * row_bytes >= 4 * PARALLEL_MIN_ELEMS)
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        char *dst = pool + (s / block_size) * block_stride + layer_offset + (s % block_size) * token_stride;
        memcpy(dst, k + t * k_stride, (size_t)row_bytes);
        memcpy(dst + v_offset, v + t * v_stride, (size_t)row_bytes);
    }
}

/* bfloat16 <-> float32, shared by the CPU kernels: widening is exact (the bf16 bits are the
 * float's top half); narrowing rounds to nearest, ties to even, as torch does, and keeps a
 * NaN a (quiet) NaN. */
#ifndef FLOWKV_BF16_H
#define FLOWKV_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One element read as, or written from, a float32: what the kernels' dtype-generic macros take. */
static inline float get_f32(const float *p) { return *p; }
static inline void put_f32(float *p, float v) { *p = v; }
static inline float get_bf16(const uint16_t *p) { return bf16_to_f32(*p); }
static inline void put_bf16(uint16_t *p, float v) { *p = f32_to_bf16(v); }

#if defined(__AVX512F__)
#include <immintrin.h>

/* Sixteen bf16 values widened to float32 lanes. */
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

#endif

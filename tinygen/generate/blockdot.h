/* What blockdot.c shares with layerstep.c: the vector instructions both use where the CPU has
   them, a matrix in blocks as stored, and its product. */

#ifndef TINYGEN_BLOCKDOT_H
#define TINYGEN_BLOCKDOT_H

#include <stdint.h>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD 1

/* The sum of a vector's 8 floats. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* A weight matrix W (N, K) as blockquant.BlockLinear holds it. kind 4: q4 codes; 5: q5 codes;
   8: int8 codes in blocks of `block` (16 or 32). lows and bias may be NULL. */
typedef struct {
    int kind, block, N, K;
    const void *codes;
    const uint16_t *scales, *lows;  /* float16 bits */
    const float *bias;
} Matrix;

/* y (M, N) = x (M, K) W^T (+ bias). Returns 0, or -1 when memory ran out (y is then unwritten). */
int matmul(const Matrix *w, const float *x, int M, float *y, int threads);

/* y = x / sqrt(mean(x^2) + eps) * w over each of x's M rows of K (y may be x). */
void rms_norm(const float *x, const float *w, float eps, int M, int K, float *y);

#endif

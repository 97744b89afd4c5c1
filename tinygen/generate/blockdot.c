/* Matrix products on weights in blocks as a quantized file stores them, for decoding on a CPU;
   generate/native.py compiles this file once per machine (with layerstep.c, which shares matmul
   through blockdot.h), and generate/blockquant.BlockLinear calls it.

   Each weight is code * scale + low over a block of inputs. Activations are rounded to int8 per
   32 inputs (one scale each), as llama.cpp does for its CPU products, so that a block's dot product
   is a sum of byte products (AVX2's maddubs, 32 multiply-adds an instruction; AVX-512 VNNI's
   dpbusd, 64 with their sums) taken once, and the block's float scale is applied once per 32
   weights rather than once per weight. The lows need only the sum of each block's inputs.

   Three weight forms:
     q4: 4-bit codes 0..15, 16 bytes per block of 32 (byte j: input j in its low nibble, input
         j + 16 in its high one, ggml's order), a float16 scale and low per block;
     q5: 5-bit codes 0..31, 20 bytes per block of 32: q4's 16 bytes of low nibbles, then the
         fifth bits (bit j of the 4 bytes, little-endian, for input j), a scale and low per block;
     i8: int8 codes, a float16 scale (and a low, or none) per block of 16 or 32.
   y (M, N) = x (M, K) W^T, W (N, K), K a multiple of 32. Rows of W are shared among threads; each
   row is read once for every 4 rows of x, from the cache. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blockdot.h"


#define TILE 4 /* rows of x per pass over a row of W */

/* The forms, as the functions below take them: I8_16 has two scales per 32 inputs. */
enum { Q4, I8, I8_16, Q5 };

static inline size_t block_bytes(int form) { return form == Q4 ? 16 : form == Q5 ? 20 : 32; }

int blockdot_simd(void) {
#ifdef SIMD
    return 1;
#else
    return 0;
#endif
}

static float half_to_float(uint16_t h) {
#ifdef SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    union { uint32_t u; float f; } v;
    if (exp == 0) {  /* zero or subnormal: man * 2^-24 */
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    v.u = sign | (exp == 31 ? 0x7F800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    return v.f;
#endif
}

/* x's rows as int8 codes per 32 inputs with their scales, and the sums of each 16 and 32 of the
   rounded inputs. The lows multiply those sums, not the exact ones: a weight's rounding error is
   then (scale * code + low) times the input's, as in llama.cpp, where the exact sums would leave
   the codes' uncentred part, up to 15 scales, against it. */
typedef struct {
    int8_t *q;
    float *d, *sums, *sums32;  /* sums: per 16 inputs; sums32: per 32 */
} Acts;

static int quantize_acts(const float *x, int M, int K, Acts *a) {
    int nb = K / 32;
    a->q = malloc((size_t)M * K);
    a->d = malloc(sizeof(float) * (size_t)M * nb);
    a->sums = malloc(sizeof(float) * (size_t)M * nb * 2);
    a->sums32 = malloc(sizeof(float) * (size_t)M * nb);
    if (!a->q || !a->d || !a->sums || !a->sums32) return -1;
    for (size_t i = 0; i < (size_t)M * nb; i++) {
        const float *xb = x + i * 32;
        int8_t *q = a->q + i * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int s0 = 0, s1 = 0;
        for (int j = 0; j < 32; j++) q[j] = (int8_t)lrintf(xb[j] * inv);
        for (int j = 0; j < 16; j++) s0 += q[j];
        for (int j = 16; j < 32; j++) s1 += q[j];
        a->d[i] = d;
        a->sums[2 * i] = d * s0;
        a->sums[2 * i + 1] = d * s1;
        a->sums32[i] = d * (s0 + s1);
    }
    return 0;
}

static void free_acts(Acts *a) {
    free(a->q);
    free(a->d);
    free(a->sums);
    free(a->sums32);
}

#ifdef SIMD
/* Sum over k of lows[k] * sums[k] (float16 lows, float sums), 8 a step. */
static float low_dot(const uint16_t *lo, const float *sums, int n) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= n; k += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(lo + k))), _mm256_loadu_ps(sums + k), acc);
    float r = hsum(acc);
    for (; k < n; k++) r += half_to_float(lo[k]) * sums[k];
    return r;
}

/* A block of 4-bit codes as 32 bytes in input order. */
static inline __m256i q4_codes(const uint8_t *w) {
    __m128i v = _mm_loadu_si128((const __m128i *)w);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

/* 32 bits (bit j of 4 little-endian bytes) as 32 bytes, 0xFF where the bit is set (llama.cpp's
   bytes_from_bits_32). */
static inline __m256i bits_32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), _mm256_set_epi64x(
        0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* A block's 32 codes as bytes in input order (signed for the int8 forms). */
static inline __m256i block_codes(const uint8_t *w, int form) {
    if (form == Q4) return q4_codes(w);
    if (form == Q5) return _mm256_or_si256(q4_codes(w), _mm256_and_si256(bits_32(w + 16), _mm256_set1_epi8(0x10)));
    return _mm256_loadu_si256((const __m256i *)w);
}

/* The 8 int32 partial sums of a block's byte products: unsigned codes u against signed x. VNNI
   sums each four byte products in one instruction, where AVX2 takes two and a constant. */
static inline __m256 block_dot(__m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x));
#elif defined(__AVXVNNI__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}

/* The same for any form: maddubs takes one unsigned operand, so a signed code goes in as |code|
   against x carrying the code's sign. */
static inline __m256 form_dot(__m256i c, __m256i x, int form) {
    if (form == I8 || form == I8_16) return block_dot(_mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c));
    return block_dot(c, x);
}

/* A block's scale for each partial sum: inputs 0..15 land in lanes 0..3, 16..31 in lanes 4..7, so
   a block of 16 puts its two scales in the two halves. */
static inline __m256 block_scales(const uint16_t *sc, int b, int form) {
    if (form != I8_16) return _mm256_set1_ps(half_to_float(sc[b]));
    uint32_t pair;
    memcpy(&pair, sc + 2 * b, 4);
    __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128((int)pair));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
#endif


#ifndef SIMD
/* Code j of a block in any form. */
static int code_at(const uint8_t *w, int j, int form) {
    if (form == I8 || form == I8_16) return ((const int8_t *)w)[j];
    int u = (w[j % 16] >> (4 * (j / 16))) & 15;
    if (form == Q5) u |= ((w[16 + j / 8] >> (j % 8)) & 1) << 4;
    return u;
}
#endif

/* Row n of W against rows m0 .. m0 + tm of x, without the lows: a prefill's product, each block
   of W unpacked once for TILE rows of x. */
static void row_dot(const uint8_t *w, const uint16_t *sc, int nb, int form, const Acts *a, int m0, int tm, float *out) {
#ifdef SIMD
    __m256 acc[TILE];
    for (int t = 0; t < TILE; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i codes = block_codes(w + b * block_bytes(form), form);
        __m256 scale = block_scales(sc, b, form);
        for (int t = 0; t < tm; t++) {
            size_t i = (size_t)(m0 + t) * nb + b;
            __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + i * 32));
            acc[t] = _mm256_fmadd_ps(form_dot(codes, x, form), _mm256_mul_ps(scale, _mm256_set1_ps(a->d[i])), acc[t]);
        }
    }
    for (int t = 0; t < tm; t++) out[t] = hsum(acc[t]);
#else
    for (int t = 0; t < tm; t++) {
        float sum = 0.f;
        for (int b = 0; b < nb; b++) {
            size_t i = (size_t)(m0 + t) * nb + b;
            const int8_t *x = a->q + i * 32;
            for (int h = 0; h < 2; h++) {
                int dot = 0;
                for (int j = 16 * h; j < 16 * h + 16; j++) dot += code_at(w + b * block_bytes(form), j, form) * x[j];
                sum += half_to_float(sc[form == I8_16 ? 2 * b + h : b]) * a->d[i] * dot;
            }
        }
        out[t] = sum;
    }
#endif
}

#ifndef SIMD
static float low_dot(const uint16_t *lo, const float *sums, int n) {
    float r = 0.f;
    for (int k = 0; k < n; k++) r += half_to_float(lo[k]) * sums[k];
    return r;
}
#endif

/* The lows' part of row n against row m of x: each low times the sum of its block's inputs. */
static float row_lows(const uint16_t *lo, int nb, int form, const Acts *a, int m) {
    if (form == I8_16) return low_dot(lo, a->sums + (size_t)m * nb * 2, 2 * nb);
    return low_dot(lo, a->sums32 + (size_t)m * nb, nb);
}


#ifdef SIMD
/* Row n of W against x's one row, without the lows: a decode step's product. Called with `form`
   a constant, so that each form gets a loop of its own, with no branch inside. */
static inline float decode_row(const uint8_t *w, const uint16_t *sc, int nb, int form, const Acts *a) {
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + (size_t)b * 32));
        __m256 dot = form_dot(block_codes(w + b * block_bytes(form), form), x, form);
        acc = _mm256_fmadd_ps(dot, _mm256_mul_ps(block_scales(sc, b, form), _mm256_set1_ps(a->d[b])), acc);
    }
    return hsum(acc);
}
#endif

#if defined(SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define WIDE 1
/* decode_row for q4 and i8 codes with AVX-512: two blocks a register, so that each instruction
   does twice the work, and each block's float scale (the weights' times the activations') made
   sixteen at a time rather than one by one. */
static inline float decode_row_wide(const uint8_t *w, const uint16_t *sc, int nb, int form, const Acts *a) {
    float both[nb + 16];  /* each block's weight scale times its activations' */
    for (int b = 0; b < nb; b += 16) {
        if (b + 16 <= nb) {
            __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b)));
            _mm512_storeu_ps(both + b, _mm512_mul_ps(f, _mm512_loadu_ps(a->d + b)));
        } else {
            for (int j = b; j < nb; j++) both[j] = half_to_float(sc[j]) * a->d[j];
        }
    }
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512i x = _mm512_loadu_si512(a->q + (size_t)b * 32), u;
        if (form == Q4) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + (size_t)b * 16)), m = _mm256_set1_epi8(0x0F);
            __m512i lohi = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                              _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
            u = _mm512_shuffle_i64x2(lohi, lohi, _MM_SHUFFLE(3, 1, 2, 0));  /* each block's lows, then highs */
        } else {
            __m512i c = _mm512_loadu_si512(w + (size_t)b * 32);
            u = _mm512_abs_epi8(c);
            x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(c), _mm512_setzero_si512(), x);  /* x with c's sign */
        }
        __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x));
        __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(both[b]), _mm256_set1_ps(both[b + 1]), 1);
        if (b & 2) acc1 = _mm512_fmadd_ps(dot, scale, acc1);
        else acc0 = _mm512_fmadd_ps(dot, scale, acc0);
    }
    float r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for (; b < nb; b++) {  /* an odd last block */
        __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + (size_t)b * 32));
        r += hsum(form_dot(block_codes(w + b * block_bytes(form), form), x, form)) * both[b];
    }
    return r;
}
#endif

int matmul(const Matrix *w, const float *x, int M, float *y, int threads) {
    Acts a;
    int form = w->kind == 4 ? Q4 : w->kind == 5 ? Q5 : w->block == 16 ? I8_16 : I8;
    int N = w->N, K = w->K, nb = K / 32, nbw = form == I8_16 ? 2 * nb : nb;
    const uint16_t *scales = w->scales, *lows = w->lows;
    const float *bias = w->bias;
    if (quantize_acts(x, M, K, &a)) {
        free_acts(&a);
        return -1;
    }
    size_t row_bytes = (size_t)nb * block_bytes(form);
#ifdef SIMD
    if (M == 1) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int n = 0; n < N; n++) {
            const uint8_t *wr = (const uint8_t *)w->codes + (size_t)n * row_bytes;
            const uint16_t *sc = scales + (size_t)n * nbw;
#ifdef WIDE
            float dot = form == Q4 ? decode_row_wide(wr, sc, nb, Q4, &a) : form == Q5 ? decode_row(wr, sc, nb, Q5, &a)
                      : form == I8 ? decode_row_wide(wr, sc, nb, I8, &a) : decode_row(wr, sc, nb, I8_16, &a);
#else
            float dot = form == Q4 ? decode_row(wr, sc, nb, Q4, &a) : form == Q5 ? decode_row(wr, sc, nb, Q5, &a)
                      : form == I8 ? decode_row(wr, sc, nb, I8, &a) : decode_row(wr, sc, nb, I8_16, &a);
#endif
            y[n] = dot + (lows ? row_lows(lows + (size_t)n * nbw, nb, form, &a, 0) : 0.f) + (bias ? bias[n] : 0.f);
        }
        free_acts(&a);
        return 0;
    }
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        float out[TILE];
        const uint8_t *wr = (const uint8_t *)w->codes + (size_t)n * row_bytes;
        for (int m0 = 0; m0 < M; m0 += TILE) {
            int tm = M - m0 < TILE ? M - m0 : TILE;
            row_dot(wr, scales + (size_t)n * nbw, nb, form, &a, m0, tm, out);
            for (int t = 0; t < tm; t++)
                y[(size_t)(m0 + t) * N + n] = out[t] + (lows ? row_lows(lows + (size_t)n * nbw, nb, form, &a, m0 + t) : 0.f)
                                            + (bias ? bias[n] : 0.f);
        }
    }
    free_acts(&a);
    return 0;
}

/* matmul for ctypes, without the struct: block_matmul_at's call. */
int block_matmul(int kind, const void *codes, const uint16_t *scales, const uint16_t *lows, int block,
                 int N, int K, const float *x, int M, float *y, int threads) {
    Matrix w = {kind, block, N, K, codes, scales, lows, NULL};
    return matmul(&w, x, M, y, threads);
}

/* A decode step's norms: one call each instead of the handful of tensor operations torch's CPU
   RMSNorm runs. */
void rms_norm(const float *x, const float *w, float eps, int M, int K, float *y) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        float *yr = y + (size_t)m * K;
        double ss = 0.0;
        for (int k = 0; k < K; k++) ss += (double)xr[k] * xr[k];
        float inv = (float)(1.0 / sqrt(ss / K + eps));
        for (int k = 0; k < K; k++) yr[k] = xr[k] * inv * w[k];
    }
}

/* One decoder layer of a batch-1 decode step in one call, on blockdot.c's products: generate/
   nativeblock.NativeBlock calls it in place of the twenty-odd tensor operations of core/model.Block,
   each of which costs a decode step more to dispatch than to compute at this size.

   The layer is pre-norm, with a gated MLP, as the rope family has it (Llama, SmolLM2, Qwen, Gemma 3):
     a = attention(norm1(x)),  x += post1 ? post1(a) : a,
     m = down(act(gate) * up)(norm2(x)),  x += post2 ? post2(m) : m.
   Attention: q, k and v heads from one product (with its bias, if any), each query and key head
   normed by q_norm and k_norm where given, then rotated (rotary's half-split pairs), k and v stored
   in the cache at the token's slot, and each query head attends over the slots read, its key/value
   head shared by n_head / n_kv_head query heads.

   The cache of a layer is (n_kv_head, slots, head_dim): a global layer's slot s holds position s; a
   sliding layer's ring holds position p at p % slots (core/kvcache.py). A step at position
   kv_len - 1 writes its slot and reads min(kv_len, slots) slots, every one of them visible. */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blockdot.h"

typedef struct {
    Matrix qkv, out, up, down;  /* up: the gate's rows, then the up projection's */
    const float *norm1, *norm2;  /* before attention, before the MLP */
    const float *post1, *post2;  /* after them (Gemma 3), or NULL */
    const float *q_norm, *k_norm;  /* per head (Qwen 3, Gemma 3), or NULL */
    int n_head, n_kv_head, head_dim, hidden, gelu;  /* gelu: GeGLU's tanh GELU, else SiLU */
    float eps, scale;  /* every norm's epsilon; the attention scores' factor */
} Layer;

static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float r = 0.f;
#ifdef SIMD
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    r = hsum(acc);
#endif
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* y += a * x */
static void axpy(float *y, float a, const float *x, int n) {
    int i = 0;
#ifdef SIMD
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* A head's pairs (h[i], h[i + D/2]) rotated: h[i] cos[i] + h[(i + D/2) % D] sin[i], with sin
   signed as core/rotary.rotary_angles makes it (negative on the first half). */
static void rotate(float *h, const float *cos, const float *sin, int D) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float a = h[i], b = h[i + half];
        h[i] = a * cos[i] + b * sin[i];
        h[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Each query head of q (n_head, D) over `read` slots of its key/value head: y (n_head, D). */
static void attend(const Layer *L, const float *q, const float *kc, const float *vc, int slots, int read,
                   float *scores, float *y, int threads) {
    int H = L->n_head, D = L->head_dim, per = H / L->n_kv_head;
    /* Threads only where the heads' work outweighs waking them: a short context's step is quicker alone. */
    #pragma omp parallel for num_threads(threads) schedule(static) if ((long)read * H * D > 1L << 16)
    for (int h = 0; h < H; h++) {
        const float *qh = q + (size_t)h * D, *kh = kc + (size_t)(h / per) * slots * D, *vh = vc + (size_t)(h / per) * slots * D;
        float *s = scores + (size_t)h * read, *yh = y + (size_t)h * D, top = -INFINITY, sum = 0.f;
        for (int j = 0; j < read; j++) {
            s[j] = dot(qh, kh + (size_t)j * D, D) * L->scale;
            top = fmaxf(top, s[j]);
        }
        for (int j = 0; j < read; j++) sum += s[j] = expf(s[j] - top);
        memset(yh, 0, sizeof(float) * D);
        for (int j = 0; j < read; j++) axpy(yh, s[j] / sum, vh + (size_t)j * D, D);
    }
}

/* h (2 * hidden): gate, then up; h[0 .. hidden) becomes act(gate) * up. */
static void gate(float *h, int hidden, int gelu) {
    const float *up = h + hidden;
    if (gelu) {
        for (int i = 0; i < hidden; i++) {
            float g = h[i];
            h[i] = 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * up[i];
        }
    } else {
        for (int i = 0; i < hidden; i++) h[i] = h[i] / (1.f + expf(-h[i])) * up[i];
    }
}

/* out (C) = the layer applied to x (C), the token at position kv_len - 1 (out may be x). cos, sin
   (head_dim): the position's rotary angles. kc, vc: this layer's cache, `slots` long. Returns 0,
   or -1 when memory ran out (the step is then lost). */
int layer_step(const Layer *L, const float *x, float *out, const float *cos, const float *sin, float *kc, float *vc,
               int slots, int kv_len, int threads) {
    int C = L->qkv.K, H = L->n_head, G = L->n_kv_head, D = L->head_dim;
    int slot = (kv_len - 1) % slots, read = kv_len < slots ? kv_len : slots;
    float *buf = malloc(sizeof(float) * ((size_t)C + L->qkv.N + (size_t)H * D + 2 * (size_t)L->hidden + (size_t)H * read));
    if (!buf) return -1;
    float *xn = buf, *qkv = xn + C, *y = qkv + L->qkv.N, *h = y + (size_t)H * D, *scores = h + 2 * (size_t)L->hidden;
    rms_norm(x, L->norm1, L->eps, 1, C, xn);
    if (matmul(&L->qkv, xn, 1, qkv, threads)) goto oom;
    if (L->q_norm) {
        rms_norm(qkv, L->q_norm, L->eps, H, D, qkv);
        rms_norm(qkv + (size_t)H * D, L->k_norm, L->eps, G, D, qkv + (size_t)H * D);
    }
    for (int i = 0; i < H + G; i++) rotate(qkv + (size_t)i * D, cos, sin, D);
    for (int g = 0; g < G; g++) {
        memcpy(kc + ((size_t)g * slots + slot) * D, qkv + (size_t)(H + g) * D, sizeof(float) * D);
        memcpy(vc + ((size_t)g * slots + slot) * D, qkv + (size_t)(H + G + g) * D, sizeof(float) * D);
    }
    attend(L, qkv, kc, vc, slots, read, scores, y, threads);
    float *a = xn;  /* the normed input is spent: its room takes each sublayer's output */
    if (matmul(&L->out, y, 1, a, threads)) goto oom;
    if (L->post1) rms_norm(a, L->post1, L->eps, 1, C, a);
    for (int i = 0; i < C; i++) out[i] = x[i] + a[i];
    rms_norm(out, L->norm2, L->eps, 1, C, xn);
    if (matmul(&L->up, xn, 1, h, threads)) goto oom;
    gate(h, L->hidden, L->gelu);
    if (matmul(&L->down, h, 1, a, threads)) goto oom;
    if (L->post2) rms_norm(a, L->post2, L->eps, 1, C, a);
    for (int i = 0; i < C; i++) out[i] += a[i];
    free(buf);
    return 0;
oom:
    free(buf);
    return -1;
}

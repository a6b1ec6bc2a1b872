/*
 * Kernel families. Every kernel has a scalar `<name>_ref`, a `<name>_simd128` when built with -msimd128, and a public
 * `<name>` that picks the SIMD one when available. Output pointer first; shapes in the comment above each.
 */
#ifndef RL_KERNELS_H
#define RL_KERNELS_H

#include <stdint.h>

#define RL_DECL(ret, name, args) \
  ret name##_ref args;           \
  ret name##_simd128 args;       \
  ret name args;

/* ---- matmul.c: y[t, n] = sum_k w[n, k] * x[t, k];  x [T, K], w [N, K], y [T, N] ----
   packed = 1: w is in the 4-row interleaved layout (pack_rows_f32 / pack_rows_q8 below), else row-major. */
RL_DECL(void, matmul_f32, (float *y, const float *x, const float *w, int T, int N, int K, int packed))
/* int8 weights with per-row scale ws[N]; activations as int16 xq [T, K] with per-row scale xs[T].
   packed = 1: w is in the 4-row interleaved layout of pack_rows_q8 (K % 16 == 0), else row-major. */
RL_DECL(void, matmul_q8, (float *y, const int16_t *xq, const float *xs, const int8_t *w, const float *ws,
                          int T, int N, int K, int packed))
/* y[i] += a * x[i], n elements */
RL_DECL(void, axpy_f32, (float *y, float a, const float *x, int n))

/* ---- quant.c ---- */
/* q[n] = round(x / s), s = max|x| / 127 (returned); a zero row gives s = 0 and q = 0 */
RL_DECL(float, quantize_row_q8, (int8_t *q, const float *x, int n))
/* q[n] = round(x / s), s = max|x| / RL_ACT_Q_MAX (returned) */
RL_DECL(float, quantize_row_act16, (int16_t *q, const float *x, int n))
/* x[n] = q * s */
RL_DECL(void, dequantize_row_q8, (float *x, const int8_t *q, float s, int n))
/* Packed int8 layout: rows in groups of 4; within a group, 16-byte chunks of the 4 rows alternate
   (chunk c of row j at group_base + 64c + 16j), so a 4-row matvec reads memory strictly sequentially.
   Rows past the last full group stay row-major. Offset of element (r, k) in a packed [N, K] matrix: */
static inline long q8_packed_index(int r, int k, int N, int K) {
  int full = N & ~3;
  if (r >= full) return (long)r * K + k;
  return (long)(r & ~3) * K + (long)(k >> 4) * 64 + (r & 3) * 16 + (k & 15);
}
/* dst = src [N, K] (row-major int8) rearranged into the packed layout; K % 16 == 0 */
void pack_rows_q8(int8_t *dst, const int8_t *src, int N, int K);
/* The f32 packed layout: the same with 4-float (16-byte) chunks, K % 4 == 0. */
static inline long f32_packed_index(int r, int k, int N, int K) {
  int full = N & ~3;
  if (r >= full) return (long)r * K + k;
  return (long)(r & ~3) * K + (long)(k >> 2) * 16 + (r & 3) * 4 + (k & 3);
}
void pack_rows_f32(float *dst, const float *src, int N, int K);
#define RL_ACT_Q_MAX 8191.0f /* 14-bit activations keep int32 lanes of i32x4.dot_i16x8 far from overflow */
#define RL_I8_BLOCK 4096     /* int32 partial sums are flushed to float every this many products per row */

/* ---- norm.c ---- */
/* y[n] = w * x * rsqrt(mean(x^2) + eps) */
RL_DECL(void, rmsnorm_f32, (float *y, const float *x, const float *w, int n, float eps))
/* y[n] = w * groupnorm(x) * sigmoid(gate): RMSNorm over each of `groups` contiguous groups of n/groups */
RL_DECL(void, group_rmsnorm_gate_f32, (float *y, const float *x, const float *gate, const float *w, int n,
                                       int groups, float eps))
/* a[n] = silu(a) * b */
RL_DECL(void, silu_mul_f32, (float *a, const float *b, int n))

/* ---- attention.c ---- */
/* NeoX rotate-half RoPE on the first r dims of every head: x [heads, d], cos/sin [r/2] */
RL_DECL(void, rope_neox_f32, (float *x, const float *cos_t, const float *sin_t, int heads, int d, int r))
/* o [H, d] = causal GQA softmax attention of q [H, d] (pre-scaled) over kc/vc [n, Hkv, d]; scores [n] scratch */
RL_DECL(void, attention_f32, (float *o, const float *q, const float *kc, const float *vc, float *scores, int n,
                              int H, int Hkv, int d))

/* ---- lightning.c (one head; S [d, d] fp32 holds S[k][v]) ---- */
/* S = gamma*S + k^T v; o[d] = q S */
RL_DECL(void, lightning_step_f32, (float *o, float *S, const float *q, const float *k, const float *v,
                                   float gamma, int d))
/* T tokens at once in blocks of RL_LIGHTNING_BLOCK: o rows of stride ldo, q/k/v rows of stride ld, S updated in
   place. tmp [RL_LIGHTNING_TMP] scratch. Same result as T calls of lightning_step (up to rounding). */
RL_DECL(void, lightning_chunk_f32, (float *o, int ldo, float *S, const float *q, const float *k, const float *v,
                                    int ld, int T, float gamma, int d, float *tmp))
#define RL_LIGHTNING_BLOCK 32
#define RL_LIGHTNING_TMP (RL_LIGHTNING_BLOCK * RL_LIGHTNING_BLOCK + RL_LIGHTNING_BLOCK + 1)

/* ---- moe.c ---- */
/* Group-limited top-k on sigmoid scores: fills idx[topk], w[topk]; sel [E] scratch. Ties pick the lower index. */
void router_select(int32_t *idx, float *w, const float *logits, const float *bias, float *sel, int E, int n_group,
                   int topk_group, int topk, int norm, float scale);

#endif

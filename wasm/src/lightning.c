/*
 * Lightning attention (linear attention with a fixed per-head decay gamma), one head at a time.
 * Recurrent definition:  S_t = gamma * S_{t-1} + k_t^T v_t,   o_t = q_t S_t   (q pre-scaled by d^-1/2).
 * Chunked form over a block of n tokens with incoming state S:
 *   o_i = gamma^(i+1) q_i S + sum_{j<=i} gamma^(i-j) (q_i . k_j) v_j
 *   S'  = gamma^n S + sum_j gamma^(n-1-j) k_j^T v_j
 */
#include <math.h>

#include "kernels.h"

#ifdef __wasm_simd128__
#include <wasm_simd128.h>
#endif

void lightning_step_f32_ref(float *o, float *S, const float *q, const float *k, const float *v, float gamma, int d) {
  for (int j = 0; j < d; j++) o[j] = 0.0f;
  for (int i = 0; i < d; i++) {
    float *row = S + (long)i * d;
    for (int j = 0; j < d; j++) {
      row[j] = gamma * row[j] + k[i] * v[j];
      o[j] += q[i] * row[j];
    }
  }
}

/* gamma^p for p = 0..n, from double so long blocks do not accumulate rounding */
static void decay_powers(float *pw, float gamma, int n) {
  double lg = log((double)gamma);
  for (int p = 0; p <= n; p++) pw[p] = (float)exp(lg * p);
}

void lightning_chunk_f32_ref(float *o, int ldo, float *S, const float *q, const float *k, const float *v, int ld,
                             int T, float gamma, int d, float *tmp) {
  float *A = tmp, *pw = tmp + RL_LIGHTNING_BLOCK * RL_LIGHTNING_BLOCK;
  for (int t0 = 0; t0 < T; t0 += RL_LIGHTNING_BLOCK) {
    int n = T - t0 < RL_LIGHTNING_BLOCK ? T - t0 : RL_LIGHTNING_BLOCK;
    decay_powers(pw, gamma, n);
    /* inter-block: o_i = gamma^(i+1) q_i S */
    for (int i = 0; i < n; i++) {
      const float *qi = q + (long)(t0 + i) * ld;
      float *oi = o + (long)(t0 + i) * ldo;
      for (int c = 0; c < d; c++) oi[c] = 0.0f;
      for (int r = 0; r < d; r++) {
        float a = qi[r] * pw[i + 1];
        for (int c = 0; c < d; c++) oi[c] += a * S[(long)r * d + c];
      }
    }
    /* intra-block: decayed causal q k^T, then times v */
    for (int i = 0; i < n; i++)
      for (int j = 0; j <= i; j++) {
        const float *qi = q + (long)(t0 + i) * ld, *kj = k + (long)(t0 + j) * ld;
        float s = 0.0f;
        for (int c = 0; c < d; c++) s += qi[c] * kj[c];
        A[i * RL_LIGHTNING_BLOCK + j] = s * pw[i - j];
      }
    for (int i = 0; i < n; i++) {
      float *oi = o + (long)(t0 + i) * ldo;
      for (int j = 0; j <= i; j++) {
        const float *vj = v + (long)(t0 + j) * ld;
        float a = A[i * RL_LIGHTNING_BLOCK + j];
        for (int c = 0; c < d; c++) oi[c] += a * vj[c];
      }
    }
    /* state: S = gamma^n S + sum_j gamma^(n-1-j) k_j^T v_j */
    for (int r = 0; r < d; r++) {
      float *row = S + (long)r * d;
      for (int c = 0; c < d; c++) row[c] *= pw[n];
      for (int j = 0; j < n; j++) {
        float a = k[(long)(t0 + j) * ld + r] * pw[n - 1 - j];
        const float *vj = v + (long)(t0 + j) * ld;
        for (int c = 0; c < d; c++) row[c] += a * vj[c];
      }
    }
  }
}

#ifdef __wasm_simd128__
void lightning_step_f32_simd128(float *o, float *S, const float *q, const float *k, const float *v, float gamma,
                                int d) {
  v128_t gv = wasm_f32x4_splat(gamma);
  int j = 0;
  for (; j + 4 <= d; j += 4) wasm_v128_store(o + j, wasm_f32x4_splat(0));
  for (; j < d; j++) o[j] = 0.0f;
  for (int i = 0; i < d; i++) {
    float *row = S + (long)i * d;
    v128_t kv = wasm_f32x4_splat(k[i]), qv = wasm_f32x4_splat(q[i]);
    int c = 0;
    for (; c + 4 <= d; c += 4) {
      v128_t s = wasm_f32x4_add(wasm_f32x4_mul(gv, wasm_v128_load(row + c)), wasm_f32x4_mul(kv, wasm_v128_load(v + c)));
      wasm_v128_store(row + c, s);
      wasm_v128_store(o + c, wasm_f32x4_add(wasm_v128_load(o + c), wasm_f32x4_mul(qv, s)));
    }
    for (; c < d; c++) {
      row[c] = gamma * row[c] + k[i] * v[c];
      o[c] += q[i] * row[c];
    }
  }
}

static float dot_simd(const float *a, const float *b, int n) {
  v128_t acc = wasm_f32x4_splat(0);
  int i = 0;
  for (; i + 4 <= n; i += 4) acc = wasm_f32x4_add(acc, wasm_f32x4_mul(wasm_v128_load(a + i), wasm_v128_load(b + i)));
  float s = wasm_f32x4_extract_lane(acc, 0) + wasm_f32x4_extract_lane(acc, 1) + wasm_f32x4_extract_lane(acc, 2) +
            wasm_f32x4_extract_lane(acc, 3);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

void lightning_chunk_f32_simd128(float *o, int ldo, float *S, const float *q, const float *k, const float *v,
                                 int ld, int T, float gamma, int d, float *tmp) {
  float *A = tmp, *pw = tmp + RL_LIGHTNING_BLOCK * RL_LIGHTNING_BLOCK;
  for (int t0 = 0; t0 < T; t0 += RL_LIGHTNING_BLOCK) {
    int n = T - t0 < RL_LIGHTNING_BLOCK ? T - t0 : RL_LIGHTNING_BLOCK;
    decay_powers(pw, gamma, n);
    for (int i = 0; i < n; i++) {
      const float *qi = q + (long)(t0 + i) * ld;
      float *oi = o + (long)(t0 + i) * ldo;
      for (int c = 0; c < d; c++) oi[c] = 0.0f;
      for (int r = 0; r < d; r++) axpy_f32_simd128(oi, qi[r] * pw[i + 1], S + (long)r * d, d);
    }
    for (int i = 0; i < n; i++)
      for (int j = 0; j <= i; j++)
        A[i * RL_LIGHTNING_BLOCK + j] = dot_simd(q + (long)(t0 + i) * ld, k + (long)(t0 + j) * ld, d) * pw[i - j];
    for (int i = 0; i < n; i++) {
      float *oi = o + (long)(t0 + i) * ldo;
      for (int j = 0; j <= i; j++) axpy_f32_simd128(oi, A[i * RL_LIGHTNING_BLOCK + j], v + (long)(t0 + j) * ld, d);
    }
    v128_t dn = wasm_f32x4_splat(pw[n]);
    for (int r = 0; r < d; r++) {
      float *row = S + (long)r * d;
      int c = 0;
      for (; c + 4 <= d; c += 4) wasm_v128_store(row + c, wasm_f32x4_mul(wasm_v128_load(row + c), dn));
      for (; c < d; c++) row[c] *= pw[n];
      for (int j = 0; j < n; j++) axpy_f32_simd128(row, k[(long)(t0 + j) * ld + r] * pw[n - 1 - j], v + (long)(t0 + j) * ld, d);
    }
  }
}

void lightning_step_f32(float *o, float *S, const float *q, const float *k, const float *v, float gamma, int d) {
  lightning_step_f32_simd128(o, S, q, k, v, gamma, d);
}
void lightning_chunk_f32(float *o, int ldo, float *S, const float *q, const float *k, const float *v, int ld, int T,
                         float gamma, int d, float *tmp) {
  lightning_chunk_f32_simd128(o, ldo, S, q, k, v, ld, T, gamma, d, tmp);
}
#else
void lightning_step_f32(float *o, float *S, const float *q, const float *k, const float *v, float gamma, int d) {
  lightning_step_f32_ref(o, S, q, k, v, gamma, d);
}
void lightning_chunk_f32(float *o, int ldo, float *S, const float *q, const float *k, const float *v, int ld, int T,
                         float gamma, int d, float *tmp) {
  lightning_chunk_f32_ref(o, ldo, S, q, k, v, ld, T, gamma, d, tmp);
}
#endif

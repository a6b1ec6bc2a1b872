/* Matrix products: f32 and int8-weight x int16-activation, plus axpy. */
#include "kernels.h"

#ifdef __wasm_simd128__
#include <wasm_simd128.h>
#endif

/* ========================= f32 ========================= */

/* Sequential sum over k; for packed rows the 4-float chunks of a row sit 16 floats apart. */
void matmul_f32_ref(float *y, const float *x, const float *w, int T, int N, int K, int packed) {
  int full = N & ~3;
  for (int t = 0; t < T; t++)
    for (int n = 0; n < N; n++) {
      const float *xr = x + (long)t * K;
      float acc = 0.0f;
      if (packed && n < full) {
        const float *wr = w + f32_packed_index(n, 0, N, K);
        for (int k = 0; k < K; k += 4)
          for (int i = 0; i < 4; i++) acc += wr[(long)(k >> 2) * 16 + i] * xr[k + i];
      } else {
        const float *wr = w + (long)n * K;
        for (int k = 0; k < K; k++) acc += wr[k] * xr[k];
      }
      y[(long)t * N + n] = acc;
    }
}

#ifdef __wasm_simd128__
static inline float hsum_f32x4(v128_t v) {
  return wasm_f32x4_extract_lane(v, 0) + wasm_f32x4_extract_lane(v, 1) + wasm_f32x4_extract_lane(v, 2) +
         wasm_f32x4_extract_lane(v, 3);
}

/* 4 weight rows x 1 token: the activation vector is loaded once per 4 rows (decode). Packed rows are one
   sequential stream (chunk c of row j at 16c + 4j). */
static void matvec4_f32(float *y, const float *x, const float *w, int K, int packed) {
  if (packed) {
    v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    const float *p = w;
    for (int k = 0; k < K; k += 4, p += 16) {
      v128_t xv = wasm_v128_load(x + k);
      a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(p), xv));
      a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(p + 4), xv));
      a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wasm_v128_load(p + 8), xv));
      a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wasm_v128_load(p + 12), xv));
    }
    y[0] = hsum_f32x4(a0); y[1] = hsum_f32x4(a1); y[2] = hsum_f32x4(a2); y[3] = hsum_f32x4(a3);
    return;
  }
  const float *w0 = w, *w1 = w + K, *w2 = w + 2L * K, *w3 = w + 3L * K;
  v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
  int k = 0;
  for (; k + 4 <= K; k += 4) {
    v128_t xv = wasm_v128_load(x + k);
    a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wasm_v128_load(w0 + k), xv));
    a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wasm_v128_load(w1 + k), xv));
    a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wasm_v128_load(w2 + k), xv));
    a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wasm_v128_load(w3 + k), xv));
  }
  float s0 = hsum_f32x4(a0), s1 = hsum_f32x4(a1), s2 = hsum_f32x4(a2), s3 = hsum_f32x4(a3);
  for (; k < K; k++) { s0 += w0[k] * x[k]; s1 += w1[k] * x[k]; s2 += w2[k] * x[k]; s3 += w3[k] * x[k]; }
  y[0] = s0; y[1] = s1; y[2] = s2; y[3] = s3;
}

/* 1 weight row x 4 tokens: the weight row is loaded once per 4 tokens (prefill). `step` = floats between the
   row's 4-float chunks (4 row-major, 16 packed). */
static void matrow_tok4_f32(float *y, int N, const float *x, const float *wr, int K, int step) {
  const float *x0 = x, *x1 = x + K, *x2 = x + 2L * K, *x3 = x + 3L * K;
  v128_t a0 = wasm_f32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
  int k = 0;
  for (; k + 4 <= K; k += 4) {
    v128_t wv = wasm_v128_load(wr + (long)(k >> 2) * step);
    a0 = wasm_f32x4_add(a0, wasm_f32x4_mul(wv, wasm_v128_load(x0 + k)));
    a1 = wasm_f32x4_add(a1, wasm_f32x4_mul(wv, wasm_v128_load(x1 + k)));
    a2 = wasm_f32x4_add(a2, wasm_f32x4_mul(wv, wasm_v128_load(x2 + k)));
    a3 = wasm_f32x4_add(a3, wasm_f32x4_mul(wv, wasm_v128_load(x3 + k)));
  }
  float s0 = hsum_f32x4(a0), s1 = hsum_f32x4(a1), s2 = hsum_f32x4(a2), s3 = hsum_f32x4(a3);
  for (; k < K; k++) { s0 += wr[k] * x0[k]; s1 += wr[k] * x1[k]; s2 += wr[k] * x2[k]; s3 += wr[k] * x3[k]; }
  y[0] = s0; y[N] = s1; y[2L * N] = s2; y[3L * N] = s3;
}

static float dot_f32_simd(const float *a, const float *b, int K) {
  v128_t acc = wasm_f32x4_splat(0);
  int k = 0;
  for (; k + 4 <= K; k += 4) acc = wasm_f32x4_add(acc, wasm_f32x4_mul(wasm_v128_load(a + k), wasm_v128_load(b + k)));
  float s = hsum_f32x4(acc);
  for (; k < K; k++) s += a[k] * b[k];
  return s;
}

void matmul_f32_simd128(float *y, const float *x, const float *w, int T, int N, int K, int packed) {
  int full = N & ~3;
  int t = 0;
  for (; t + 4 <= T; t += 4)
    for (int n = 0; n < N; n++) {
      int pk = packed && n < full;
      const float *wr = pk ? w + f32_packed_index(n, 0, N, K) : w + (long)n * K;
      matrow_tok4_f32(y + (long)t * N + n, N, x + (long)t * K, wr, K, pk ? 16 : 4);
    }
  for (; t < T; t++) {
    const float *xr = x + (long)t * K;
    float *yr = y + (long)t * N;
    int n = 0;
    for (; n + 4 <= N; n += 4) matvec4_f32(yr + n, xr, w + (long)n * K, K, packed);
    for (; n < N; n++) yr[n] = dot_f32_simd(w + (long)n * K, xr, K);
  }
}
#endif

/* ========================= int8 weights x int16 activations ========================= */

/* Exact integer dot, accumulated in int32 per RL_I8_BLOCK products and flushed to float. */
static float dot_q8_ref(const int8_t *w, const int16_t *x, int K) {
  float total = 0.0f;
  for (int k0 = 0; k0 < K; k0 += RL_I8_BLOCK) {
    int k1 = k0 + RL_I8_BLOCK < K ? k0 + RL_I8_BLOCK : K;
    int32_t acc = 0;
    for (int k = k0; k < k1; k++) acc += (int32_t)w[k] * (int32_t)x[k];
    total += (float)acc;
  }
  return total;
}

/* The same exact integer dot over a row of the packed layout (K % 16 == 0): its 16-byte chunks sit 64 apart. */
static float dot_q8_packed_ref(const int8_t *w, int r, int N, const int16_t *x, int K) {
  if (r >= (N & ~3)) return dot_q8_ref(w + (long)r * K, x, K);
  const int8_t *row = w + q8_packed_index(r, 0, N, K);
  float total = 0.0f;
  for (int k0 = 0; k0 < K; k0 += RL_I8_BLOCK) {
    int k1 = k0 + RL_I8_BLOCK < K ? k0 + RL_I8_BLOCK : K;
    int32_t acc = 0;
    for (int k = k0; k < k1; k += 16) {
      const int8_t *c = row + (long)(k >> 4) * 64;
      for (int i = 0; i < 16; i++) acc += (int32_t)c[i] * (int32_t)x[k + i];
    }
    total += (float)acc;
  }
  return total;
}

void matmul_q8_ref(float *y, const int16_t *xq, const float *xs, const int8_t *w, const float *ws, int T, int N,
                   int K, int packed) {
  for (int t = 0; t < T; t++)
    for (int n = 0; n < N; n++) {
      float d = packed ? dot_q8_packed_ref(w, n, N, xq + (long)t * K, K) : dot_q8_ref(w + (long)n * K, xq + (long)t * K, K);
      y[(long)t * N + n] = d * ws[n] * xs[t];
    }
}

#ifdef __wasm_simd128__
static inline int32_t hsum_i32x4(v128_t v) {
  return wasm_i32x4_extract_lane(v, 0) + wasm_i32x4_extract_lane(v, 1) + wasm_i32x4_extract_lane(v, 2) +
         wasm_i32x4_extract_lane(v, 3);
}

/* 16 int8 weights sign-extended by two widening loads (one instruction each on x86/arm, unlike
   extend_high), each half a pairwise i32 dot with 8 int16 activations. */
#define Q8_STEP(acc, wp, xlo, xhi)                                                           \
  do {                                                                                       \
    acc = wasm_i32x4_add(acc, wasm_i32x4_dot_i16x8(wasm_i16x8_load8x8(wp), xlo));            \
    acc = wasm_i32x4_add(acc, wasm_i32x4_dot_i16x8(wasm_i16x8_load8x8((wp) + 8), xhi));      \
  } while (0)

/* 4 rows x 1 token. Block size keeps every int32 lane below 2^31 (see RL_ACT_Q_MAX). Row-major rows start K
   apart and advance 16 bytes per chunk; packed rows start 16 apart and advance 64 (so w_j + k*step/16). */
static void matvec4_q8(float *out4, const int16_t *x, const int8_t *w, int K, int packed) {
  if (packed) {
    float s[4] = {0, 0, 0, 0};
    for (int k0 = 0; k0 < K; k0 += RL_I8_BLOCK) {
      int k1 = k0 + RL_I8_BLOCK < K ? k0 + RL_I8_BLOCK : K;
      v128_t a0 = wasm_i32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
      const int8_t *p = w + (long)k0 * 4;
      for (int k = k0; k < k1; k += 16, p += 64) {
        v128_t xlo = wasm_v128_load(x + k), xhi = wasm_v128_load(x + k + 8);
        Q8_STEP(a0, p, xlo, xhi);
        Q8_STEP(a1, p + 16, xlo, xhi);
        Q8_STEP(a2, p + 32, xlo, xhi);
        Q8_STEP(a3, p + 48, xlo, xhi);
      }
      s[0] += (float)hsum_i32x4(a0); s[1] += (float)hsum_i32x4(a1);
      s[2] += (float)hsum_i32x4(a2); s[3] += (float)hsum_i32x4(a3);
    }
    out4[0] = s[0]; out4[1] = s[1]; out4[2] = s[2]; out4[3] = s[3];
    return;
  }
  const int8_t *w0 = w, *w1 = w + K, *w2 = w + 2L * K, *w3 = w + 3L * K;
  float s[4] = {0, 0, 0, 0};
  int k0 = 0;
  for (; k0 < K; k0 += RL_I8_BLOCK) {
    int k1 = k0 + RL_I8_BLOCK < K ? k0 + RL_I8_BLOCK : K;
    v128_t a0 = wasm_i32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    int k = k0;
    for (; k + 16 <= k1; k += 16) {
      v128_t xlo = wasm_v128_load(x + k), xhi = wasm_v128_load(x + k + 8);
      Q8_STEP(a0, w0 + k, xlo, xhi);
      Q8_STEP(a1, w1 + k, xlo, xhi);
      Q8_STEP(a2, w2 + k, xlo, xhi);
      Q8_STEP(a3, w3 + k, xlo, xhi);
    }
    int32_t r0 = hsum_i32x4(a0), r1 = hsum_i32x4(a1), r2 = hsum_i32x4(a2), r3 = hsum_i32x4(a3);
    for (; k < k1; k++) { r0 += w0[k] * x[k]; r1 += w1[k] * x[k]; r2 += w2[k] * x[k]; r3 += w3[k] * x[k]; }
    s[0] += (float)r0; s[1] += (float)r1; s[2] += (float)r2; s[3] += (float)r3;
  }
  out4[0] = s[0]; out4[1] = s[1]; out4[2] = s[2]; out4[3] = s[3];
}

/* 1 row x 4 tokens: the widened weights are reused by 4 tokens. `step` = bytes between 16-byte chunks of the
   row (16 row-major, 64 packed). */
static void matrow_tok4_q8(float *out4, const int16_t *x, const int8_t *wr, int K, int step) {
  const int16_t *x0 = x, *x1 = x + K, *x2 = x + 2L * K, *x3 = x + 3L * K;
  float s[4] = {0, 0, 0, 0};
  for (int k0 = 0; k0 < K; k0 += RL_I8_BLOCK) {
    int k1 = k0 + RL_I8_BLOCK < K ? k0 + RL_I8_BLOCK : K;
    v128_t a0 = wasm_i32x4_splat(0), a1 = a0, a2 = a0, a3 = a0;
    int k = k0;
    for (; k + 16 <= k1; k += 16) {
      const int8_t *p = wr + (long)(k >> 4) * step;
      v128_t wl = wasm_i16x8_load8x8(p), wh = wasm_i16x8_load8x8(p + 8);
      a0 = wasm_i32x4_add(a0, wasm_i32x4_dot_i16x8(wl, wasm_v128_load(x0 + k)));
      a0 = wasm_i32x4_add(a0, wasm_i32x4_dot_i16x8(wh, wasm_v128_load(x0 + k + 8)));
      a1 = wasm_i32x4_add(a1, wasm_i32x4_dot_i16x8(wl, wasm_v128_load(x1 + k)));
      a1 = wasm_i32x4_add(a1, wasm_i32x4_dot_i16x8(wh, wasm_v128_load(x1 + k + 8)));
      a2 = wasm_i32x4_add(a2, wasm_i32x4_dot_i16x8(wl, wasm_v128_load(x2 + k)));
      a2 = wasm_i32x4_add(a2, wasm_i32x4_dot_i16x8(wh, wasm_v128_load(x2 + k + 8)));
      a3 = wasm_i32x4_add(a3, wasm_i32x4_dot_i16x8(wl, wasm_v128_load(x3 + k)));
      a3 = wasm_i32x4_add(a3, wasm_i32x4_dot_i16x8(wh, wasm_v128_load(x3 + k + 8)));
    }
    int32_t r0 = hsum_i32x4(a0), r1 = hsum_i32x4(a1), r2 = hsum_i32x4(a2), r3 = hsum_i32x4(a3);
    for (; k < k1; k++) { r0 += wr[k] * x0[k]; r1 += wr[k] * x1[k]; r2 += wr[k] * x2[k]; r3 += wr[k] * x3[k]; }
    s[0] += (float)r0; s[1] += (float)r1; s[2] += (float)r2; s[3] += (float)r3;
  }
  out4[0] = s[0]; out4[1] = s[1]; out4[2] = s[2]; out4[3] = s[3];
}

/* start of row n's data: row-major n*K; packed: its group's base + 16 * (n mod 4), tail rows row-major */
static inline const int8_t *q8_row(const int8_t *w, int n, int N, int K, int packed) {
  return packed && n < (N & ~3) ? w + (long)(n & ~3) * K + (n & 3) * 16 : w + (long)n * K;
}

void matmul_q8_simd128(float *y, const int16_t *xq, const float *xs, const int8_t *w, const float *ws, int T, int N,
                       int K, int packed) {
  float r[4];
  int full = N & ~3;
  int t = 0;
  for (; t + 4 <= T; t += 4)
    for (int n = 0; n < N; n++) {
      int step = packed && n < full ? 64 : 16;
      matrow_tok4_q8(r, xq + (long)t * K, q8_row(w, n, N, K, packed), K, step);
      for (int j = 0; j < 4; j++) y[(long)(t + j) * N + n] = r[j] * ws[n] * xs[t + j];
    }
  for (; t < T; t++) {
    const int16_t *xr = xq + (long)t * K;
    float *yr = y + (long)t * N;
    int n = 0;
    for (; n + 4 <= N; n += 4) {
      matvec4_q8(r, xr, packed ? w + (long)n * K : w + (long)n * K, K, packed);
      for (int j = 0; j < 4; j++) yr[n + j] = r[j] * ws[n + j] * xs[t];
    }
    for (; n < N; n++) yr[n] = dot_q8_ref(w + (long)n * K, xr, K) * ws[n] * xs[t];
  }
}
#endif

/* ========================= axpy ========================= */

void axpy_f32_ref(float *y, float a, const float *x, int n) {
  for (int i = 0; i < n; i++) y[i] += a * x[i];
}

#ifdef __wasm_simd128__
void axpy_f32_simd128(float *y, float a, const float *x, int n) {
  v128_t av = wasm_f32x4_splat(a);
  int i = 0;
  for (; i + 4 <= n; i += 4)
    wasm_v128_store(y + i, wasm_f32x4_add(wasm_v128_load(y + i), wasm_f32x4_mul(av, wasm_v128_load(x + i))));
  for (; i < n; i++) y[i] += a * x[i];
}
#endif

/* ========================= public names ========================= */

#ifdef __wasm_simd128__
void matmul_f32(float *y, const float *x, const float *w, int T, int N, int K, int packed) {
  matmul_f32_simd128(y, x, w, T, N, K, packed);
}
void matmul_q8(float *y, const int16_t *xq, const float *xs, const int8_t *w, const float *ws, int T, int N, int K,
               int packed) {
  matmul_q8_simd128(y, xq, xs, w, ws, T, N, K, packed);
}
void axpy_f32(float *y, float a, const float *x, int n) { axpy_f32_simd128(y, a, x, n); }
#else
void matmul_f32(float *y, const float *x, const float *w, int T, int N, int K, int packed) {
  matmul_f32_ref(y, x, w, T, N, K, packed);
}
void matmul_q8(float *y, const int16_t *xq, const float *xs, const int8_t *w, const float *ws, int T, int N, int K,
               int packed) {
  matmul_q8_ref(y, xq, xs, w, ws, T, N, K, packed);
}
void axpy_f32(float *y, float a, const float *x, int n) { axpy_f32_ref(y, a, x, n); }
#endif

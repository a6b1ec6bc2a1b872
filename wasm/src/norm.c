/* RMSNorm, group RMSNorm with sigmoid gate, SiLU-and-multiply. */
#include <math.h>

#include "kernels.h"

#ifdef __wasm_simd128__
#include <wasm_simd128.h>
#endif

static inline float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

void rmsnorm_f32_ref(float *y, const float *x, const float *w, int n, float eps) {
  float ss = 0.0f;
  for (int i = 0; i < n; i++) ss += x[i] * x[i];
  float r = 1.0f / sqrtf(ss / (float)n + eps);
  for (int i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

void group_rmsnorm_gate_f32_ref(float *y, const float *x, const float *gate, const float *w, int n, int groups,
                                float eps) {
  int gs = n / groups;
  for (int g = 0; g < groups; g++) {
    const float *xg = x + g * gs;
    float ss = 0.0f;
    for (int i = 0; i < gs; i++) ss += xg[i] * xg[i];
    float r = 1.0f / sqrtf(ss / (float)gs + eps);
    for (int i = 0; i < gs; i++) y[g * gs + i] = w[g * gs + i] * (xg[i] * r) * sigmoidf(gate[g * gs + i]);
  }
}

void silu_mul_f32_ref(float *a, const float *b, int n) {
  for (int i = 0; i < n; i++) a[i] = a[i] * sigmoidf(a[i]) * b[i];
}

#ifdef __wasm_simd128__
static float sumsq_simd(const float *x, int n) {
  v128_t acc = wasm_f32x4_splat(0);
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    v128_t v = wasm_v128_load(x + i);
    acc = wasm_f32x4_add(acc, wasm_f32x4_mul(v, v));
  }
  float s = wasm_f32x4_extract_lane(acc, 0) + wasm_f32x4_extract_lane(acc, 1) + wasm_f32x4_extract_lane(acc, 2) +
            wasm_f32x4_extract_lane(acc, 3);
  for (; i < n; i++) s += x[i] * x[i];
  return s;
}

void rmsnorm_f32_simd128(float *y, const float *x, const float *w, int n, float eps) {
  float r = 1.0f / sqrtf(sumsq_simd(x, n) / (float)n + eps);
  v128_t rv = wasm_f32x4_splat(r);
  int i = 0;
  for (; i + 4 <= n; i += 4)
    wasm_v128_store(y + i, wasm_f32x4_mul(wasm_v128_load(w + i), wasm_f32x4_mul(wasm_v128_load(x + i), rv)));
  for (; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* The gate's exp stays scalar (no SIMD exp in wasm); the norm part is vectorised. */
void group_rmsnorm_gate_f32_simd128(float *y, const float *x, const float *gate, const float *w, int n, int groups,
                                    float eps) {
  int gs = n / groups;
  for (int g = 0; g < groups; g++) {
    const float *xg = x + g * gs;
    float r = 1.0f / sqrtf(sumsq_simd(xg, gs) / (float)gs + eps);
    for (int i = 0; i < gs; i++) y[g * gs + i] = w[g * gs + i] * (xg[i] * r) * sigmoidf(gate[g * gs + i]);
  }
}

/* exp dominates and has no SIMD instruction; the scalar loop is the fast path too. */
void silu_mul_f32_simd128(float *a, const float *b, int n) { silu_mul_f32_ref(a, b, n); }

void rmsnorm_f32(float *y, const float *x, const float *w, int n, float eps) { rmsnorm_f32_simd128(y, x, w, n, eps); }
void group_rmsnorm_gate_f32(float *y, const float *x, const float *gate, const float *w, int n, int groups,
                            float eps) {
  group_rmsnorm_gate_f32_simd128(y, x, gate, w, n, groups, eps);
}
void silu_mul_f32(float *a, const float *b, int n) { silu_mul_f32_simd128(a, b, n); }
#else
void rmsnorm_f32(float *y, const float *x, const float *w, int n, float eps) { rmsnorm_f32_ref(y, x, w, n, eps); }
void group_rmsnorm_gate_f32(float *y, const float *x, const float *gate, const float *w, int n, int groups,
                            float eps) {
  group_rmsnorm_gate_f32_ref(y, x, gate, w, n, groups, eps);
}
void silu_mul_f32(float *a, const float *b, int n) { silu_mul_f32_ref(a, b, n); }
#endif

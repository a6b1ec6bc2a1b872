/* Quantisation: int8 weight rows (symmetric, per output channel) and int16 activation rows (per token). */
#include <math.h>

#include "kernels.h"

#ifdef __wasm_simd128__
#include <wasm_simd128.h>
#endif

static float absmax_ref(const float *x, int n) {
  float m = 0.0f;
  for (int i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
  return m;
}

/* round half away from zero, like lrintf would not guarantee across modes */
static inline int round_away(float v) { return (int)(v < 0 ? v - 0.5f : v + 0.5f); }

float quantize_row_q8_ref(int8_t *q, const float *x, int n) {
  float m = absmax_ref(x, n);
  float s = m / 127.0f, inv = m > 0 ? 127.0f / m : 0.0f;
  for (int i = 0; i < n; i++) {
    int v = round_away(x[i] * inv);
    q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
  }
  return s;
}

float quantize_row_act16_ref(int16_t *q, const float *x, int n) {
  float m = absmax_ref(x, n);
  float s = m / RL_ACT_Q_MAX, inv = m > 0 ? RL_ACT_Q_MAX / m : 0.0f;
  for (int i = 0; i < n; i++) {
    int v = round_away(x[i] * inv);
    q[i] = (int16_t)(v > 8191 ? 8191 : v < -8191 ? -8191 : v);
  }
  return s;
}

void pack_rows_q8(int8_t *dst, const int8_t *src, int N, int K) {
  for (int r = 0; r < N; r++)
    for (int k = 0; k < K; k++) dst[q8_packed_index(r, k, N, K)] = src[(long)r * K + k];
}

void pack_rows_f32(float *dst, const float *src, int N, int K) {
  for (int r = 0; r < N; r++)
    for (int k = 0; k < K; k++) dst[f32_packed_index(r, k, N, K)] = src[(long)r * K + k];
}

void dequantize_row_q8_ref(float *x, const int8_t *q, float s, int n) {
  for (int i = 0; i < n; i++) x[i] = (float)q[i] * s;
}

#ifdef __wasm_simd128__
static float absmax_simd(const float *x, int n) {
  v128_t m = wasm_f32x4_splat(0);
  int i = 0;
  for (; i + 4 <= n; i += 4) m = wasm_f32x4_max(m, wasm_f32x4_abs(wasm_v128_load(x + i)));
  float r = fmaxf(fmaxf(wasm_f32x4_extract_lane(m, 0), wasm_f32x4_extract_lane(m, 1)),
                  fmaxf(wasm_f32x4_extract_lane(m, 2), wasm_f32x4_extract_lane(m, 3)));
  for (; i < n; i++) r = fmaxf(r, fabsf(x[i]));
  return r;
}

/* round half away from zero in 4 lanes: trunc(v + copysign(0.5, v)) */
static inline v128_t round_away4(v128_t v) {
  v128_t half = wasm_v128_or(wasm_v128_and(v, wasm_i32x4_splat((int32_t)0x80000000)), wasm_f32x4_splat(0.5f));
  return wasm_i32x4_trunc_sat_f32x4(wasm_f32x4_add(v, half));
}

float quantize_row_act16_simd128(int16_t *q, const float *x, int n) {
  float m = absmax_simd(x, n);
  float s = m / RL_ACT_Q_MAX, inv = m > 0 ? RL_ACT_Q_MAX / m : 0.0f;
  v128_t iv = wasm_f32x4_splat(inv);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    v128_t a = round_away4(wasm_f32x4_mul(wasm_v128_load(x + i), iv));
    v128_t b = round_away4(wasm_f32x4_mul(wasm_v128_load(x + i + 4), iv));
    wasm_v128_store(q + i, wasm_i16x8_narrow_i32x4(a, b)); /* |v| <= 8191 after scaling: no saturation */
  }
  for (; i < n; i++) {
    int v = round_away(x[i] * inv);
    q[i] = (int16_t)(v > 8191 ? 8191 : v < -8191 ? -8191 : v);
  }
  return s;
}

/* Weight quantisation runs once at load; the scalar loop is fast enough, so the SIMD name reuses it. */
float quantize_row_q8_simd128(int8_t *q, const float *x, int n) { return quantize_row_q8_ref(q, x, n); }

void dequantize_row_q8_simd128(float *x, const int8_t *q, float s, int n) {
  v128_t sv = wasm_f32x4_splat(s);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    v128_t w16 = wasm_i16x8_extend_low_i8x16(wasm_v128_load64_zero(q + i));
    wasm_v128_store(x + i, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_extend_low_i16x8(w16)), sv));
    wasm_v128_store(x + i + 4, wasm_f32x4_mul(wasm_f32x4_convert_i32x4(wasm_i32x4_extend_high_i16x8(w16)), sv));
  }
  for (; i < n; i++) x[i] = (float)q[i] * s;
}

float quantize_row_q8(int8_t *q, const float *x, int n) { return quantize_row_q8_simd128(q, x, n); }
float quantize_row_act16(int16_t *q, const float *x, int n) { return quantize_row_act16_simd128(q, x, n); }
void dequantize_row_q8(float *x, const int8_t *q, float s, int n) { dequantize_row_q8_simd128(x, q, s, n); }
#else
float quantize_row_q8(int8_t *q, const float *x, int n) { return quantize_row_q8_ref(q, x, n); }
float quantize_row_act16(int16_t *q, const float *x, int n) { return quantize_row_act16_ref(q, x, n); }
void dequantize_row_q8(float *x, const int8_t *q, float s, int n) { dequantize_row_q8_ref(x, q, s, n); }
#endif

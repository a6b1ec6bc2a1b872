/* Partial NeoX RoPE and causal GQA softmax attention over a KV cache. */
#include <math.h>

#include "kernels.h"

#ifdef __wasm_simd128__
#include <wasm_simd128.h>
#endif

void rope_neox_f32_ref(float *x, const float *cos_t, const float *sin_t, int heads, int d, int r) {
  int half = r / 2;
  for (int h = 0; h < heads; h++) {
    float *u = x + h * d;
    for (int i = 0; i < half; i++) {
      float a = u[i], b = u[i + half];
      u[i] = a * cos_t[i] - b * sin_t[i];        /* rotate_half puts -u[i+half] at i */
      u[i + half] = b * cos_t[i] + a * sin_t[i]; /* and u[i] at i+half */
    }
  }
}

void attention_f32_ref(float *o, const float *q, const float *kc, const float *vc, float *scores, int n, int H,
                       int Hkv, int d) {
  int rep = H / Hkv;
  for (int h = 0; h < H; h++) {
    int kvh = h / rep;
    const float *qh = q + h * d;
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) {
      const float *kj = kc + ((long)j * Hkv + kvh) * d;
      float s = 0.0f;
      for (int i = 0; i < d; i++) s += qh[i] * kj[i];
      scores[j] = s;
      mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
    for (int j = 0; j < n; j++) { scores[j] = expf(scores[j] - mx); sum += scores[j]; }
    float inv = 1.0f / sum;
    float *oh = o + h * d;
    for (int i = 0; i < d; i++) oh[i] = 0.0f;
    for (int j = 0; j < n; j++) {
      const float *vj = vc + ((long)j * Hkv + kvh) * d;
      float p = scores[j] * inv;
      for (int i = 0; i < d; i++) oh[i] += p * vj[i];
    }
  }
}

#ifdef __wasm_simd128__
void rope_neox_f32_simd128(float *x, const float *cos_t, const float *sin_t, int heads, int d, int r) {
  int half = r / 2;
  for (int h = 0; h < heads; h++) {
    float *u = x + h * d;
    int i = 0;
    for (; i + 4 <= half; i += 4) {
      v128_t a = wasm_v128_load(u + i), b = wasm_v128_load(u + i + half);
      v128_t c = wasm_v128_load(cos_t + i), s = wasm_v128_load(sin_t + i);
      wasm_v128_store(u + i, wasm_f32x4_sub(wasm_f32x4_mul(a, c), wasm_f32x4_mul(b, s)));
      wasm_v128_store(u + i + half, wasm_f32x4_add(wasm_f32x4_mul(b, c), wasm_f32x4_mul(a, s)));
    }
    for (; i < half; i++) {
      float a = u[i], b = u[i + half];
      u[i] = a * cos_t[i] - b * sin_t[i];
      u[i + half] = b * cos_t[i] + a * sin_t[i];
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

void attention_f32_simd128(float *o, const float *q, const float *kc, const float *vc, float *scores, int n, int H,
                           int Hkv, int d) {
  int rep = H / Hkv;
  for (int h = 0; h < H; h++) {
    int kvh = h / rep;
    const float *qh = q + h * d;
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) {
      float s = dot_simd(qh, kc + ((long)j * Hkv + kvh) * d, d);
      scores[j] = s;
      mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
    for (int j = 0; j < n; j++) { scores[j] = expf(scores[j] - mx); sum += scores[j]; }
    float inv = 1.0f / sum;
    float *oh = o + h * d;
    for (int i = 0; i < d; i++) oh[i] = 0.0f;
    for (int j = 0; j < n; j++) axpy_f32_simd128(oh, scores[j] * inv, vc + ((long)j * Hkv + kvh) * d, d);
  }
}

void rope_neox_f32(float *x, const float *cos_t, const float *sin_t, int heads, int d, int r) {
  rope_neox_f32_simd128(x, cos_t, sin_t, heads, d, r);
}
void attention_f32(float *o, const float *q, const float *kc, const float *vc, float *scores, int n, int H, int Hkv,
                   int d) {
  attention_f32_simd128(o, q, kc, vc, scores, n, H, Hkv, d);
}
#else
void rope_neox_f32(float *x, const float *cos_t, const float *sin_t, int heads, int d, int r) {
  rope_neox_f32_ref(x, cos_t, sin_t, heads, d, r);
}
void attention_f32(float *o, const float *q, const float *kc, const float *vc, float *scores, int n, int H, int Hkv,
                   int d) {
  attention_f32_ref(o, q, kc, vc, scores, n, H, Hkv, d);
}
#endif

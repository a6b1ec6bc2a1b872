/*
 * Kernel tests. With -msimd128 (run by node): every `_simd128` kernel against its `_ref` twin at lengths 1..64 and odd
 * sizes. In every build: algorithm checks (chunked vs recurrent lightning, router rules, quantisation bounds, slopes,
 * layer schedule, a whole random model prefilled at once vs token by token). Prints ok/FAILED; exit code 1 on failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "kernels.h"

/* named tolerances (relative to the magnitude of the reference result) */
#define TOL_SUM 2e-5f       /* f32 reductions whose order differs (SIMD lanes vs sequential) */
#define TOL_CHUNK 2e-4f     /* chunked vs recurrent lightning: different association of many decays */
#define TOL_MODEL 2e-3f     /* whole-model prefill vs token-by-token: chunked lightning + reordered sums, 8 layers */

static int failures = 0, checks = 0;
static unsigned rng = 12345;
static float frand(void) {
  rng = rng * 1664525u + 1013904223u;
  return (float)((rng >> 8) & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f;
}
static void fill(float *x, int n) { for (int i = 0; i < n; i++) x[i] = frand(); }

/* max|a-b| <= tol * max(1, max|b|) */
static int close_rel(const float *a, const float *b, int n, float tol) {
  float mx = 1.0f, err = 0.0f;
  for (int i = 0; i < n; i++) {
    mx = fmaxf(mx, fabsf(b[i]));
    float e = fabsf(a[i] - b[i]);
    if (!(e <= err)) err = e; /* also catches NaN */
  }
  return err <= tol * mx;
}
static void report(const char *name, int ok) {
  checks++;
  if (!ok) { failures++; printf("FAILED %s\n", name); }
}

static const int odd_sizes[] = {65, 67, 100, 127, 129, 255, 257, 1023};
#define N_ODD (int)(sizeof odd_sizes / sizeof odd_sizes[0])
__attribute__((unused)) static int size_at(int i) { return i < 64 ? i + 1 : odd_sizes[i - 64]; }
#define N_SIZES (64 + N_ODD)

#ifdef __wasm_simd128__
static void test_simd_vs_ref(void) {
  enum { MAXN = 1100 };
  float *a = malloc(sizeof(float) * 9 * 5000), *b = malloc(sizeof(float) * 9 * 5000);
  float *w = malloc(sizeof(float) * 40 * 5000), *y1 = malloc(sizeof(float) * 9 * 17), *y2 = malloc(sizeof(float) * 9 * 17);
  int8_t *wq = malloc(17 * 5000), *wp = malloc(17 * 5000);
  int16_t *xq = malloc(sizeof(int16_t) * 9 * 5000), *xq2 = malloc(sizeof(int16_t) * 5000);
  float ws[17], xs[9];
  char name[96];
  int ok;

  /* matmul_f32 / matmul_q8: T x N x K with K over 1..64 and odd sizes (plus one past the int8 flush block) */
  int Ts[] = {1, 2, 3, 4, 5, 7, 9}, Ns[] = {1, 3, 4, 5, 8, 17};
  for (int ti = 0; ti < 7; ti++)
    for (int ni = 0; ni < 6; ni++)
      for (int ki = 0; ki <= N_SIZES; ki++) {
        int T = Ts[ti], N = Ns[ni], K = ki == N_SIZES ? 4096 + 16 : size_at(ki); /* past one int8 flush block */
        fill(a, T * K); fill(w, N * K);
        matmul_f32_ref(y1, a, w, T, N, K, 0);
        matmul_f32_simd128(y2, a, w, T, N, K, 0);
        ok = close_rel(y2, y1, T * N, TOL_SUM * sqrtf((float)K));
        snprintf(name, sizeof name, "matmul_f32 T=%d N=%d K=%d", T, N, K);
        report(name, ok);
        if (K % 4 == 0) {
          float *wpf = w + 20 * 5000; /* after the row-major copy (N*K <= 17*4112) */
          pack_rows_f32(wpf, w, N, K);
          matmul_f32_ref(y2, a, wpf, T, N, K, 1);
          snprintf(name, sizeof name, "matmul_f32 packed ref T=%d N=%d K=%d", T, N, K);
          report(name, memcmp(y1, y2, sizeof(float) * T * N) == 0); /* same sequential sums */
          matmul_f32_simd128(y2, a, wpf, T, N, K, 1);
          snprintf(name, sizeof name, "matmul_f32 packed simd128 T=%d N=%d K=%d", T, N, K);
          report(name, close_rel(y2, y1, T * N, TOL_SUM * sqrtf((float)K)));
        }
        for (int n = 0; n < N; n++) ws[n] = quantize_row_q8_ref(wq + (long)n * K, w + (long)n * K, K);
        for (int t = 0; t < T; t++) xs[t] = quantize_row_act16_ref(xq + (long)t * K, a + (long)t * K, K);
        matmul_q8_ref(y1, xq, xs, wq, ws, T, N, K, 0);
        matmul_q8_simd128(y2, xq, xs, wq, ws, T, N, K, 0);
        snprintf(name, sizeof name, "matmul_q8 T=%d N=%d K=%d", T, N, K);
        report(name, memcmp(y1, y2, sizeof(float) * T * N) == 0); /* integer sums in the same blocks: exact */
        if (K % 16 == 0) {
          /* packed layout: the same products, so the same result as the row-major reference */
          pack_rows_q8(wp, wq, N, K);
          matmul_q8_ref(y2, xq, xs, wp, ws, T, N, K, 1);
          snprintf(name, sizeof name, "matmul_q8 packed ref T=%d N=%d K=%d", T, N, K);
          report(name, memcmp(y1, y2, sizeof(float) * T * N) == 0);
          matmul_q8_simd128(y2, xq, xs, wp, ws, T, N, K, 1);
          snprintf(name, sizeof name, "matmul_q8 packed simd128 T=%d N=%d K=%d", T, N, K);
          report(name, memcmp(y1, y2, sizeof(float) * T * N) == 0);
        }
      }

  for (int si = 0; si < N_SIZES; si++) {
    int n = size_at(si);
    /* quantisation: exact */
    fill(a, n);
    a[n / 2] *= 3.0f;
    float s1 = quantize_row_act16_ref(xq, a, n), s2 = quantize_row_act16_simd128(xq2, a, n);
    snprintf(name, sizeof name, "quantize_row_act16 n=%d", n);
    report(name, s1 == s2 && memcmp(xq, xq2, sizeof(int16_t) * n) == 0);
    quantize_row_q8_ref(wq, a, n);
    dequantize_row_q8_ref(y1, wq, 0.37f, n > 17 * 9 ? 17 * 9 : n);
    dequantize_row_q8_simd128(y2, wq, 0.37f, n > 17 * 9 ? 17 * 9 : n);
    snprintf(name, sizeof name, "dequantize_row_q8 n=%d", n);
    report(name, memcmp(y1, y2, sizeof(float) * (n > 17 * 9 ? 17 * 9 : n)) == 0);
    /* axpy */
    fill(b, n); memcpy(w, b, sizeof(float) * n);
    axpy_f32_ref(b, 0.7f, a, n);
    axpy_f32_simd128(w, 0.7f, a, n);
    snprintf(name, sizeof name, "axpy_f32 n=%d", n);
    report(name, close_rel(w, b, n, 1e-6f));
    /* rmsnorm */
    float *nw = w + 2 * MAXN, *o1 = b + 2 * MAXN, *o2 = b + 4 * MAXN;
    fill(nw, n);
    rmsnorm_f32_ref(o1, a, nw, n, 1e-6f);
    rmsnorm_f32_simd128(o2, a, nw, n, 1e-6f);
    snprintf(name, sizeof name, "rmsnorm_f32 n=%d", n);
    report(name, close_rel(o2, o1, n, TOL_SUM));
    /* group rmsnorm + gate, for every group count dividing n (up to 4) */
    for (int g = 1; g <= 4; g++) {
      if (n % g) continue;
      float *gate = w + 4 * MAXN;
      fill(gate, n);
      group_rmsnorm_gate_f32_ref(o1, a, gate, nw, n, g, 1e-6f);
      group_rmsnorm_gate_f32_simd128(o2, a, gate, nw, n, g, 1e-6f);
      snprintf(name, sizeof name, "group_rmsnorm_gate_f32 n=%d groups=%d", n, g);
      report(name, close_rel(o2, o1, n, TOL_SUM));
    }
    /* silu_mul */
    memcpy(o1, a, sizeof(float) * n); memcpy(o2, a, sizeof(float) * n);
    silu_mul_f32_ref(o1, nw, n);
    silu_mul_f32_simd128(o2, nw, n);
    snprintf(name, sizeof name, "silu_mul_f32 n=%d", n);
    report(name, close_rel(o2, o1, n, 1e-6f));
  }

  /* rope and lightning and attention on head dims 1..64 (+odd), even rotary dims */
  for (int d = 1; d <= 64 + 3; d++) {
    int r = (d / 2) * 2, heads = 3;
    float cs[64], sn[64];
    for (int i = 0; i < r / 2; i++) { cs[i] = cosf(0.3f * i); sn[i] = sinf(0.3f * i); }
    fill(a, heads * d); memcpy(b, a, sizeof(float) * heads * d);
    rope_neox_f32_ref(a, cs, sn, heads, d, r);
    rope_neox_f32_simd128(b, cs, sn, heads, d, r);
    snprintf(name, sizeof name, "rope_neox_f32 d=%d r=%d", d, r);
    report(name, close_rel(b, a, heads * d, 1e-6f));

    float *S1 = w, *S2 = w + d * d, *q = a, *k = a + 40 * d, *v = a + 80 * d, *o1 = b, *o2 = b + 40 * d;
    float tmp[RL_LIGHTNING_TMP];
    fill(S1, d * d); memcpy(S2, S1, sizeof(float) * d * d);
    fill(q, 3 * d); fill(k, 3 * d); fill(v, 3 * d);
    lightning_step_f32_ref(o1, S1, q, k, v, 0.9f, d);
    lightning_step_f32_simd128(o2, S2, q, k, v, 0.9f, d);
    snprintf(name, sizeof name, "lightning_step_f32 d=%d", d);
    report(name, close_rel(o2, o1, d, TOL_SUM) && close_rel(S2, S1, d * d, TOL_SUM));
    int T = 37; /* crosses a block boundary */
    fill(q, T * d); fill(k, T * d); fill(v, T * d);
    lightning_chunk_f32_ref(o1, d, S1, q, k, v, d, T, 0.95f, d, tmp);
    lightning_chunk_f32_simd128(o2, d, S2, q, k, v, d, T, 0.95f, d, tmp);
    snprintf(name, sizeof name, "lightning_chunk_f32 d=%d T=%d", d, T);
    report(name, close_rel(o2, o1, T * d, TOL_SUM * 10) && close_rel(S2, S1, d * d, TOL_SUM * 10));

    int n = 23, H = 4, Hkv = 2;
    float *kc = w + 2 * 64 * 64, *vc = kc + n * Hkv * d, sc[64];
    fill(kc, n * Hkv * d); fill(vc, n * Hkv * d); fill(q, H * d);
    attention_f32_ref(o1, q, kc, vc, sc, n, H, Hkv, d);
    attention_f32_simd128(o2, q, kc, vc, sc, n, H, Hkv, d);
    snprintf(name, sizeof name, "attention_f32 d=%d", d);
    report(name, close_rel(o2, o1, H * d, TOL_SUM));
  }
  free(a); free(b); free(w); free(y1); free(y2); free(wq); free(wp); free(xq); free(xq2);
}
#endif

/* ---- algorithm checks (any build) ---- */

static void test_lightning_chunk_vs_recurrent(void) {
  int d = 16, Ts[] = {1, 5, 31, 32, 33, 64, 70};
  float *q = malloc(sizeof(float) * 70 * d), *k = malloc(sizeof(float) * 70 * d), *v = malloc(sizeof(float) * 70 * d);
  float *o1 = malloc(sizeof(float) * 70 * d), *o2 = malloc(sizeof(float) * 70 * d), S1[256], S2[256];
  float tmp[RL_LIGHTNING_TMP];
  for (int init = 0; init < 2; init++)
    for (int ti = 0; ti < 7; ti++) {
      int T = Ts[ti];
      fill(q, T * d); fill(k, T * d); fill(v, T * d);
      if (init) fill(S1, d * d); else memset(S1, 0, sizeof S1);
      memcpy(S2, S1, sizeof S1);
      for (int t = 0; t < T; t++) lightning_step_f32_ref(o1 + t * d, S1, q + t * d, k + t * d, v + t * d, 0.97f, d);
      lightning_chunk_f32(o2, d, S2, q, k, v, d, T, 0.97f, d, tmp);
      char name[80];
      snprintf(name, sizeof name, "lightning chunk==recurrent T=%d init_state=%d", T, init);
      report(name, close_rel(o2, o1, T * d, TOL_CHUNK) && close_rel(S2, S1, d * d, TOL_CHUNK));
    }
  free(q); free(k); free(v); free(o1); free(o2);
}

static void test_router(void) {
  /* 8 experts, 4 groups of 2, keep 2 groups, top-3. Biased scores chosen so group 3 wins only through the bias and
     groups 1 and 2 tie (group 1, the lower index, is kept). */
  float logits[8] = {-2, -2, 1, 0, 1, 0, 0.5f, 0.5f};
  float bias[8] = {0, 0, 0, 0, 0, 0, 1.0f, 1.0f};
  float sel[8], w[3];
  int32_t idx[3];
  router_select(idx, w, logits, bias, sel, 8, 4, 2, 3, 1, 2.5f);
  /* group scores: g0 small, g1 = g2 = s(1)+s(0), g3 = 2*(s(.5)+1) -> keep g3, g1. Top-3 of {2,3,6,7}: 6, 7 (tie ->
     6 first), then 2. */
  int ok = idx[0] == 6 && idx[1] == 7 && idx[2] == 2;
  float p6 = 1.0f / (1.0f + expf(-0.5f)), p2 = 1.0f / (1.0f + expf(-1.0f));
  float tot = 2 * p6 + p2;
  ok = ok && fabsf(w[0] - 2.5f * p6 / tot) < 1e-6f && fabsf(w[2] - 2.5f * p2 / tot) < 1e-6f;
  report("router group-limited top-k, ties to lower index, unbiased weights", ok);
  /* no normalisation: weights are sigmoid * scale */
  router_select(idx, w, logits, bias, sel, 8, 4, 2, 3, 0, 2.5f);
  report("router norm_topk_prob=false", fabsf(w[2] - 2.5f * p2) < 1e-6f);
}

static void test_quant_bounds(void) {
  float x[300], y[300];
  int8_t q[300];
  int16_t q16[300];
  fill(x, 300);
  float s = quantize_row_q8(q, x, 300);
  dequantize_row_q8(y, q, s, 300);
  int ok = 1;
  for (int i = 0; i < 300; i++) ok &= fabsf(y[i] - x[i]) <= 0.5f * s * 1.0001f;
  report("quantize_row_q8 error <= scale/2", ok);
  float s16 = quantize_row_act16(q16, x, 300);
  ok = 1;
  for (int i = 0; i < 300; i++) ok &= fabsf(q16[i] * s16 - x[i]) <= 0.5f * s16 * 1.0001f;
  report("quantize_row_act16 error <= scale/2", ok);
  memset(x, 0, sizeof x);
  report("quantize_row_q8 zero row", quantize_row_q8(q, x, 300) == 0.0f && q[7] == 0);
}

static void test_schedule_and_slopes(void) {
  rl_config c = {0};
  c.n_layers = 8; c.layer_group_size = 4;
  int ok = 1;
  for (int l = 0; l < 8; l++) ok &= rl_is_softmax_layer(&c, l) == (l == 3 || l == 7);
  c.n_layers = 6;
  for (int l = 0; l < 6; l++) ok &= rl_is_softmax_layer(&c, l) == (l >= 3);
  report("layer schedule (modulo and tail rule)", ok);
  double s[6];
  rl_alibi_slopes(s, 4);
  ok = fabs(s[0] - 0.25) < 1e-12 && fabs(s[3] - 0.00390625) < 1e-12;
  rl_alibi_slopes(s, 6);
  double want6[6] = {0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125};
  for (int i = 0; i < 6; i++) ok &= fabs(s[i] - want6[i]) < 1e-12;
  report("alibi slopes (power of two and 6 heads)", ok);
  c.n_layers = 8; c.slope_rule_hf = 0;
  ok = fabs(rl_layer_factor(&c, 0) - 1.00001) < 1e-12 && fabs(rl_layer_factor(&c, 1) - (1 - 1.0 / 7 + 1e-5)) < 1e-12;
  c.slope_rule_hf = 1;
  ok &= fabs(rl_layer_factor(&c, 0) - (1 + 1.0 / 7 + 1e-5)) < 1e-12;
  report("layer factor sglang and hf rules", ok);
}

/* the tiny config of the architecture doc, random weights */
static rl_config tiny_config(int quant) {
  rl_config c = {0};
  c.vocab = 512; c.dim = 256; c.n_layers = 8; c.layer_group_size = 4; c.n_heads = 4; c.n_kv_heads = 2;
  c.head_dim = 64; c.rot_dim = 32; c.group_norm_size = 2; c.inter = 512; c.first_dense = 1; c.n_experts = 16;
  c.topk = 2; c.n_group = 4; c.topk_group = 2; c.moe_inter = 64; c.shared_inter = 64; c.norm_topk_prob = 1;
  c.use_qk_norm = 1; c.quant = quant; c.max_chunk = 48; c.max_context = 128; c.rope_theta = 1e6f; c.rms_eps = 1e-6f;
  c.routed_scale = 2.5f;
  return c;
}

static void test_model_prefill_vs_decode(int quant) {
  rl_config c = tiny_config(quant);
  rl_model *m = rl_create(&c);
  if (!m) { report("rl_create tiny", 0); return; }
  rl_fill_random(m, 7);
  int T = 40;
  int32_t tok[40];
  for (int t = 0; t < T; t++) tok[t] = (t * 37 + 11) % c.vocab;
  rl_session *a = rl_session_create(m, 64), *b = rl_session_create(m, 64);
  float *la = malloc(sizeof(float) * c.vocab * T), *lb = malloc(sizeof(float) * c.vocab * T);
  int ok = rl_forward_tokens(m, a, tok, T) == RL_OK;
  for (int t = 0; t < T; t++) { rl_logits_row(m, t, la + t * c.vocab); }
  for (int t = 0; t < T; t++) {
    ok &= rl_forward_tokens(m, b, tok + t, 1) == RL_OK;
    rl_logits_row(m, 0, lb + t * c.vocab);
  }
  for (int t = 0; t < T; t++) ok &= close_rel(la + t * c.vocab, lb + t * c.vocab, c.vocab, TOL_MODEL);
  size_t sbytes = sizeof(float) * m->n_linear * c.n_heads * c.head_dim * c.head_dim;
  ok &= close_rel(a->lin_state, b->lin_state, (int)(sbytes / sizeof(float)), TOL_MODEL);
  char name[80];
  snprintf(name, sizeof name, "model prefill(40) == 40 decode steps (%s)", quant ? "int8" : "f32");
  report(name, ok);
  /* limits */
  report("forward rejects a token outside the vocabulary", rl_forward_tokens(m, a, (int32_t[]){c.vocab}, 1) == RL_E_RANGE);
  report("forward rejects more tokens than max_chunk", rl_forward_tokens(m, a, tok, c.max_chunk + 1) == RL_E_CHUNK);
  int32_t many[48] = {0};
  report("forward rejects overflowing the session", rl_forward_tokens(m, a, many, 48) == RL_E_CONTEXT);
  rl_session_free(a); rl_session_free(b);
  free(la); free(lb);
  rl_destroy(m);
}

int main(void) {
#ifdef __wasm_simd128__
  test_simd_vs_ref();
#endif
  test_lightning_chunk_vs_recurrent();
  test_router();
  test_quant_bounds();
  test_schedule_and_slopes();
  test_model_prefill_vs_decode(RL_QUANT_F32);
  test_model_prefill_vs_decode(RL_QUANT_INT8);
  printf("%s: %d checks, %d failed\n", failures ? "FAILED" : "ok", checks, failures);
  return failures ? 1 : 0;
}

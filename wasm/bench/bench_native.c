/*
 * Native baseline for bench/edge_engine.mjs: the same C, same random weights (rl_fill_random), same procedure.
 * Usage: bench_native <24 config ints> <rope_theta> <rms_eps> <routed_scale> <seed> <prompt_len> <decode_len> <reps>
 * Prints one JSON line: {"prefill_tps": ..., "decode_tps": ...} (best of reps).
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "api.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int argmax(const float *x, int n) {
  int b = 0;
  for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
  return b;
}

int main(int argc, char **argv) {
  if (argc != RL_CONFIG_INTS + 1 + 3 + 4) {
    fprintf(stderr, "usage: bench_native <%d config ints> theta eps scale seed prompt_len decode_len reps\n", RL_CONFIG_INTS);
    return 2;
  }
  rl_config c;
  int32_t *ints = (int32_t *)&c;
  for (int i = 0; i < RL_CONFIG_INTS; i++) ints[i] = atoi(argv[1 + i]);
  int a = 1 + RL_CONFIG_INTS;
  c.rope_theta = (float)atof(argv[a]);
  c.rms_eps = (float)atof(argv[a + 1]);
  c.routed_scale = (float)atof(argv[a + 2]);
  unsigned seed = (unsigned)atoi(argv[a + 3]);
  int P = atoi(argv[a + 4]), N = atoi(argv[a + 5]), reps = atoi(argv[a + 6]);
  rl_model *m = rl_create(&c);
  if (!m) { fprintf(stderr, "rl_create: %s\n", rl_error_message()); return 1; }
  rl_fill_random(m, seed);
  int32_t *prompt = malloc(sizeof(int32_t) * P);
  for (int i = 0; i < P; i++) prompt[i] = (int32_t)((i * 7919u + 13u) % (unsigned)c.vocab);
  double best_p = 1e30, best_d = 1e30;
  for (int r = 0; r < reps; r++) {
    rl_session *s = rl_session_create(m, P + N);
    double t0 = now_s();
    int last = 0;
    for (int i = 0; i < P; i += c.max_chunk) {
      int n = P - i < c.max_chunk ? P - i : c.max_chunk;
      if (rl_forward(m, s, prompt + i, n)) { fprintf(stderr, "%s\n", rl_error_message()); return 1; }
      last = n - 1;
    }
    int tok = argmax(rl_logits(m, last), c.vocab);
    double t1 = now_s();
    for (int j = 0; j < N; j++) {
      rl_forward(m, s, &tok, 1);
      tok = argmax(rl_logits(m, 0), c.vocab);
    }
    double t2 = now_s();
    if (t1 - t0 < best_p) best_p = t1 - t0;
    if (t2 - t1 < best_d) best_d = t2 - t1;
    rl_session_free(s);
  }
  printf("{\"prefill_tps\": %.3f, \"decode_tps\": %.3f}\n", P / best_p, N / best_d);
  free(prompt);
  rl_destroy(m);
  return 0;
}

/*
 * MoE router: sigmoid scores, expert bias for selection only, group-limited top-k.
 * Scalar only, by choice: it touches E (<= 256 in the released models) values per token next to the E x D router
 * matvec (which is SIMD, matmul.c), and its selection loops are branchy. Checked by the router tests in
 * wasm/tests/test_kernels.c and end to end by the golden vectors.
 */
#include <math.h>

#include "kernels.h"

static inline float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

/* Index of the largest value among allowed entries; strict '>' keeps the lower index on ties. */
static int argmax_allowed(const float *v, const unsigned char *allowed, int n) {
  int best = -1;
  for (int i = 0; i < n; i++)
    if (allowed[i] && (best < 0 || v[i] > v[best])) best = i;
  return best;
}

void router_select(int32_t *idx, float *w, const float *logits, const float *bias, float *sel, int E, int n_group,
                   int topk_group, int topk, int norm, float scale) {
  enum { MAX_GROUPS = 256, MAX_EXPERTS = 1024 };
  float gscore[MAX_GROUPS];
  unsigned char gallow[MAX_GROUPS], eallow[MAX_EXPERTS];
  int gs = E / n_group;
  for (int e = 0; e < E; e++) sel[e] = sigmoidf(logits[e]) + (bias ? bias[e] : 0.0f);
  /* group score = sum of the two largest biased scores in the group */
  for (int g = 0; g < n_group; g++) {
    const float *s = sel + g * gs;
    int b1 = 0;
    for (int i = 1; i < gs; i++) if (s[i] > s[b1]) b1 = i;
    float sum = s[b1];
    if (gs > 1) {
      int b2 = -1;
      for (int i = 0; i < gs; i++) if (i != b1 && (b2 < 0 || s[i] > s[b2])) b2 = i;
      sum += s[b2];
    }
    gscore[g] = sum;
    gallow[g] = 1;
  }
  /* keep topk_group groups */
  unsigned char keep[MAX_GROUPS] = {0};
  for (int r = 0; r < topk_group; r++) {
    int g = argmax_allowed(gscore, gallow, n_group);
    keep[g] = 1;
    gallow[g] = 0;
  }
  for (int e = 0; e < E; e++) eallow[e] = keep[e / gs];
  /* top-k experts of the kept groups, by biased score; weights from the unbiased sigmoid */
  float total = 0.0f;
  for (int r = 0; r < topk; r++) {
    int e = argmax_allowed(sel, eallow, E);
    eallow[e] = 0;
    idx[r] = e;
    w[r] = sigmoidf(logits[e]);
    total += w[r];
  }
  for (int r = 0; r < topk; r++) w[r] = (norm ? w[r] / (total + 1e-20f) : w[r]) * scale;
}

/*
 * The whole Ring-linear forward pass for T tokens of one session, top to bottom:
 *   x = embed(tokens); per layer: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)); hidden = RMSNorm(x).
 * Logits are computed per row on request (rl_logits_row), so prefill pays the lm_head only for rows it needs.
 * No allocation here: every buffer comes from the model's scratch or the session.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "model.h"

/* ======================= schedule and decay ======================= */

int rl_is_softmax_layer(const rl_config *c, int l) {
  int G = c->layer_group_size;
  return (l + 1) % G == 0 || l >= (c->n_layers / G) * G;
}

double rl_layer_factor(const rl_config *c, int l) {
  int L = c->n_layers;
  if (L <= 1) return 1.0 + 1e-5;
  double off = c->slope_rule_hf ? (double)(l - 1) : (double)l;
  return 1.0 - off / (double)(L - 1) + 1e-5;
}

/* ALiBi slopes: 2^(-8(h+1)/n) for a power of two n; otherwise slopes(c) ++ slopes(2c)[0::2][:n-c], c = 2^floor(log2 n). */
void rl_alibi_slopes(double *out, int n) {
  int c = 1;
  while (c * 2 <= n) c *= 2;
  double start = pow(2.0, -8.0 / c);
  for (int h = 0; h < c; h++) out[h] = pow(start, h + 1);
  if (c == n) return;
  double start2 = pow(2.0, -8.0 / (2 * c));
  for (int i = 0; i < n - c; i++) out[c + i] = pow(start2, 2 * i + 1); /* even indices 0,2,4.. of slopes(2c) */
}

/* ======================= helpers ======================= */

/* y [T, rows] = x [T, cols] W^T, in f32 or through int16-quantised activations for int8 weights */
static void mat_apply(rl_model *m, float *y, const float *x, const rl_mat *w, int T) {
  if (w->f) {
    matmul_f32(y, x, w->f, T, w->rows, w->cols, w->packed);
    return;
  }
  int K = w->cols;
  for (int t = 0; t < T; t++) m->s.xs[t] = quantize_row_act16(m->s.xq + (long)t * K, x + (long)t * K, K);
  matmul_q8(y, m->s.xq, m->s.xs, w->q, w->scale, T, w->rows, K, w->packed);
}

static void add_rows(float *x, const float *y, long n) {
  for (long i = 0; i < n; i++) x[i] += y[i];
}

static void rope_tables(rl_model *m, int pos0, int T) {
  const rl_config *c = &m->cfg;
  int half = c->rot_dim / 2;
  for (int t = 0; t < T; t++)
    for (int i = 0; i < half; i++) {
      double inv_freq = pow((double)c->rope_theta, -2.0 * i / (double)c->rot_dim);
      double ang = (double)(pos0 + t) * inv_freq;
      m->s.rope_cos[t * half + i] = (float)cos(ang);
      m->s.rope_sin[t * half + i] = (float)sin(ang);
    }
}

/* QK-norm, partial RoPE and the d^-1/2 scale of q, for nq query heads and nk key heads of one token */
static void prep_qk(rl_model *m, const rl_layer *L, float *q, float *k, int nq, int nk, int t) {
  const rl_config *c = &m->cfg;
  int d = c->head_dim, half = c->rot_dim / 2;
  if (c->use_qk_norm) {
    for (int h = 0; h < nq; h++) rmsnorm_f32(q + h * d, q + h * d, L->q_norm, d, c->rms_eps);
    for (int h = 0; h < nk; h++) rmsnorm_f32(k + h * d, k + h * d, L->k_norm, d, c->rms_eps);
  }
  if (c->rot_dim > 0) {
    rope_neox_f32(q, m->s.rope_cos + t * half, m->s.rope_sin + t * half, nq, d, c->rot_dim);
    rope_neox_f32(k, m->s.rope_cos + t * half, m->s.rope_sin + t * half, nk, d, c->rot_dim);
  }
  float sc = 1.0f / sqrtf((float)d);
  for (int i = 0; i < nq * d; i++) q[i] *= sc;
}

/* ======================= attention blocks ======================= */

static void linear_attention(rl_model *m, rl_session *s, const rl_layer *L, int T) {
  const rl_config *c = &m->cfg;
  int H = c->n_heads, d = c->head_dim, Hd = H * d, W = 3 * Hd;
  float *qkv = m->s.qkv;
  mat_apply(m, qkv, m->s.h, &L->qkv, T);
  if (c->linear_silu)
    for (long i = 0; i < (long)T * W; i++) qkv[i] = qkv[i] / (1.0f + expf(-qkv[i]));
  for (int t = 0; t < T; t++) prep_qk(m, L, qkv + (long)t * W, qkv + (long)t * W + Hd, H, H, t);
  float *S0 = s->lin_state + (long)L->slot * H * d * d;
  for (int h = 0; h < H; h++) {
    float *S = S0 + (long)h * d * d;
    const float *q = qkv + h * d, *k = qkv + Hd + h * d, *v = qkv + 2 * Hd + h * d;
    if (T == 1)
      lightning_step_f32(m->s.o + h * d, S, q, k, v, L->gamma[h], d);
    else
      lightning_chunk_f32(m->s.o + h * d, Hd, S, q, k, v, W, T, L->gamma[h], d, m->s.kv_tmp);
  }
  mat_apply(m, m->s.g, m->s.h, &L->g_proj, T);
  for (int t = 0; t < T; t++)
    group_rmsnorm_gate_f32(m->s.o + (long)t * Hd, m->s.o + (long)t * Hd, m->s.g + (long)t * Hd, L->g_norm, Hd,
                           c->group_norm_size, c->rms_eps);
  mat_apply(m, m->s.attn_out, m->s.o, &L->dense, T);
}

static void softmax_attention(rl_model *m, rl_session *s, const rl_layer *L, int T) {
  const rl_config *c = &m->cfg;
  int H = c->n_heads, Hkv = c->n_kv_heads, d = c->head_dim, Hd = H * d, W = (H + 2 * Hkv) * d;
  float *qkv = m->s.qkv;
  mat_apply(m, qkv, m->s.h, &L->qkv, T);
  long layer_off = (long)L->slot * s->capacity * Hkv * d;
  for (int t = 0; t < T; t++) {
    float *row = qkv + (long)t * W;
    prep_qk(m, L, row, row + Hd, H, Hkv, t);
    long at = layer_off + (long)(s->pos + t) * Hkv * d;
    memcpy(s->k_cache + at, row + Hd, sizeof(float) * Hkv * d);
    memcpy(s->v_cache + at, row + Hd + Hkv * d, sizeof(float) * Hkv * d);
  }
  for (int t = 0; t < T; t++)
    attention_f32(m->s.o + (long)t * Hd, qkv + (long)t * W, s->k_cache + layer_off, s->v_cache + layer_off,
                  m->s.scores, s->pos + t + 1, H, Hkv, d);
  mat_apply(m, m->s.attn_out, m->s.o, &L->dense, T);
}

/* ======================= feed-forward blocks ======================= */

static void swiglu(rl_model *m, float *out, const float *x, const rl_mat *gate, const rl_mat *up, const rl_mat *down,
                   int T) {
  mat_apply(m, m->s.up_a, x, gate, T);
  mat_apply(m, m->s.up_b, x, up, T);
  silu_mul_f32(m->s.up_a, m->s.up_b, T * gate->rows);
  mat_apply(m, out, m->s.up_a, down, T);
}

static void moe(rl_model *m, const rl_layer *L, int T) {
  const rl_config *c = &m->cfg;
  int D = c->dim;
  if (c->shared_inter > 0)
    swiglu(m, m->s.ffn_out, m->s.h, &L->sh_gate, &L->sh_up, &L->sh_down, T);
  else
    memset(m->s.ffn_out, 0, sizeof(float) * T * D);
  for (int t = 0; t < T; t++) {
    const float *h = m->s.h + (long)t * D;
    matmul_f32(m->s.router_logits, h, L->router.f, 1, c->n_experts, D, L->router.packed);
    router_select(m->s.top_idx, m->s.top_w, m->s.router_logits, L->expert_bias, m->s.router_sel, c->n_experts,
                  c->n_group, c->topk_group, c->topk, c->norm_topk_prob, c->routed_scale);
    for (int r = 0; r < c->topk; r++) {
      int e = m->s.top_idx[r];
      swiglu(m, m->s.e_out, h, &L->exp_gate[e], &L->exp_up[e], &L->exp_down[e], 1);
      axpy_f32(m->s.ffn_out + (long)t * D, m->s.top_w[r], m->s.e_out, D);
    }
  }
}

/* ======================= the model ======================= */

int rl_forward_tokens(rl_model *m, rl_session *s, const int32_t *tokens, int T) {
  const rl_config *c = &m->cfg;
  int D = c->dim;
  if (T < 1 || T > c->max_chunk) return RL_E_CHUNK;
  if (s->pos + T > s->capacity) return RL_E_CONTEXT;
  for (int t = 0; t < T; t++)
    if (tokens[t] < 0 || tokens[t] >= c->vocab) return RL_E_RANGE;

  /* ---- embedding ---- */
  for (int t = 0; t < T; t++) {
    long r = (long)tokens[t] * D;
    if (m->embed.f)
      memcpy(m->s.x + (long)t * D, m->embed.f + r, sizeof(float) * D);
    else
      dequantize_row_q8(m->s.x + (long)t * D, m->embed.q + r, m->embed.scale[tokens[t]], D);
  }
  rope_tables(m, s->pos, T);

  /* ---- decoder layers ---- */
  for (int l = 0; l < c->n_layers; l++) {
    const rl_layer *L = &m->layers[l];
    for (int t = 0; t < T; t++) rmsnorm_f32(m->s.h + (long)t * D, m->s.x + (long)t * D, L->in_norm, D, c->rms_eps);
    if (L->is_softmax)
      softmax_attention(m, s, L, T);
    else
      linear_attention(m, s, L, T);
    add_rows(m->s.x, m->s.attn_out, (long)T * D);

    for (int t = 0; t < T; t++) rmsnorm_f32(m->s.h + (long)t * D, m->s.x + (long)t * D, L->post_norm, D, c->rms_eps);
    if (l < c->first_dense || c->n_experts == 0)
      swiglu(m, m->s.ffn_out, m->s.h, &L->mlp_gate, &L->mlp_up, &L->mlp_down, T);
    else
      moe(m, L, T);
    add_rows(m->s.x, m->s.ffn_out, (long)T * D);
  }

  /* ---- final norm ---- */
  for (int t = 0; t < T; t++) rmsnorm_f32(m->s.hidden + (long)t * D, m->s.x + (long)t * D, m->final_norm, D, c->rms_eps);
  m->last_t = T;
  s->pos += T;
  return RL_OK;
}

void rl_logits_row(rl_model *m, int row, float *out) {
  mat_apply(m, out, m->s.hidden + (long)row * m->cfg.dim, &m->lm_head, 1);
}

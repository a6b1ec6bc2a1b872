/*
 * The only exported symbols: create/destroy a model from a config, describe and load its tensors, create/free
 * sessions, run a forward call, read logits. All allocation of a model happens in rl_create (one weight arena, one
 * scratch arena); a session is one arena. Errors return a code and leave a message in rl_error_message().
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "kernels.h"

#ifdef __EMSCRIPTEN__
#include <emscripten.h>
#define RL_API EMSCRIPTEN_KEEPALIVE
#else
#define RL_API
#endif

/* The packed layouts serve the SIMD128 4-row matvecs; native builds (the benchmark baseline, where the compiler
   vectorises the row-major reference best) keep rows contiguous. Same products either way. */
#ifdef __wasm_simd128__
#define RL_PACK 1
#else
#define RL_PACK 0
#endif

static char err_msg[256];
static int fail(int code, const char *msg) {
  snprintf(err_msg, sizeof err_msg, "%s", msg);
  return code;
}

RL_API const char *rl_error_message(void) { return err_msg; }
RL_API void *rl_malloc(size_t n) { return malloc(n); }
RL_API void rl_free(void *p) { free(p); }

/* ======================= layout ======================= */

/* A bump cursor: with base == NULL it only measures, otherwise it hands out 16-byte aligned pieces. */
typedef struct { char *base; size_t off; } cursor;
static void *take(cursor *c, size_t bytes) {
  c->off = (c->off + 15) & ~(size_t)15;
  void *p = c->base ? c->base + c->off : NULL;
  c->off += bytes;
  return p;
}
static void take_mat(cursor *c, rl_mat *w, int rows, int cols, int int8) {
  w->rows = rows;
  w->cols = cols;
  w->f = NULL; w->q = NULL; w->scale = NULL;
  w->packed = RL_PACK && rows >= 4 && (int8 ? cols % 16 == 0 : cols % 4 == 0);
  if (int8) {
    w->q = take(c, (size_t)rows * cols);
    w->scale = take(c, sizeof(float) * rows);
  } else {
    w->f = take(c, sizeof(float) * (size_t)rows * cols);
  }
}

static int is_moe_layer(const rl_config *c, int l) { return l >= c->first_dense && c->n_experts > 0; }

static void layout_weights(rl_model *m, cursor *cur) {
  const rl_config *c = &m->cfg;
  int D = c->dim, H = c->n_heads, Hkv = c->n_kv_heads, d = c->head_dim, q8 = c->quant == RL_QUANT_INT8;
  rl_layer scratch_layer;
  take_mat(cur, &m->embed, c->vocab, D, q8);
  m->embed.packed = 0; /* looked up by row, never multiplied */
  m->final_norm = take(cur, sizeof(float) * D);
  take_mat(cur, &m->lm_head, c->vocab, D, q8);
  rl_layer *layers = take(cur, sizeof(rl_layer) * c->n_layers);
  if (cur->base) m->layers = layers;
  int lin = 0, sm = 0;
  for (int l = 0; l < c->n_layers; l++) {
    rl_layer *L = cur->base ? &layers[l] : &scratch_layer;
    memset(L, 0, sizeof *L);
    L->is_softmax = rl_is_softmax_layer(c, l);
    L->slot = L->is_softmax ? sm++ : lin++;
    L->in_norm = take(cur, sizeof(float) * D);
    L->post_norm = take(cur, sizeof(float) * D);
    take_mat(cur, &L->qkv, L->is_softmax ? (H + 2 * Hkv) * d : 3 * H * d, D, q8);
    L->q_norm = take(cur, sizeof(float) * d);
    L->k_norm = take(cur, sizeof(float) * d);
    if (!L->is_softmax) {
      take_mat(cur, &L->g_proj, H * d, D, q8);
      L->g_norm = take(cur, sizeof(float) * H * d);
      L->gamma = take(cur, sizeof(float) * H);
    }
    take_mat(cur, &L->dense, D, H * d, q8);
    if (!is_moe_layer(c, l)) {
      take_mat(cur, &L->mlp_gate, c->inter, D, q8);
      take_mat(cur, &L->mlp_up, c->inter, D, q8);
      take_mat(cur, &L->mlp_down, D, c->inter, q8);
    } else {
      int E = c->n_experts;
      take_mat(cur, &L->router, E, D, 0);
      L->expert_bias = take(cur, sizeof(float) * E);
      L->exp_gate = take(cur, sizeof(rl_mat) * E);
      L->exp_up = take(cur, sizeof(rl_mat) * E);
      L->exp_down = take(cur, sizeof(rl_mat) * E);
      rl_mat dummy;
      for (int e = 0; e < E; e++) {
        take_mat(cur, cur->base ? &L->exp_gate[e] : &dummy, c->moe_inter, D, q8);
        take_mat(cur, cur->base ? &L->exp_up[e] : &dummy, c->moe_inter, D, q8);
        take_mat(cur, cur->base ? &L->exp_down[e] : &dummy, D, c->moe_inter, q8);
      }
      if (c->shared_inter > 0) {
        take_mat(cur, &L->sh_gate, c->shared_inter, D, q8);
        take_mat(cur, &L->sh_up, c->shared_inter, D, q8);
        take_mat(cur, &L->sh_down, D, c->shared_inter, q8);
      }
    }
  }
  m->n_linear = lin;
  m->n_softmax = sm;
}

static int imax(int a, int b) { return a > b ? a : b; }

static void layout_scratch(rl_model *m, cursor *cur) {
  const rl_config *c = &m->cfg;
  int T = c->max_chunk, D = c->dim, H = c->n_heads, Hkv = c->n_kv_heads, d = c->head_dim;
  int Hd = H * d, W = imax(3 * Hd, (H + 2 * Hkv) * d);
  int I = imax(imax(c->inter, c->shared_inter), c->moe_inter);
  int K = imax(imax(D, Hd), I);
  int E = imax(c->n_experts, 1), half = imax(c->rot_dim / 2, 1);
  rl_scratch *s = &m->s;
  s->x = take(cur, sizeof(float) * T * D);
  s->h = take(cur, sizeof(float) * T * D);
  s->attn_out = take(cur, sizeof(float) * T * D);
  s->ffn_out = take(cur, sizeof(float) * T * D);
  s->qkv = take(cur, sizeof(float) * (size_t)T * W);
  s->o = take(cur, sizeof(float) * (size_t)T * Hd);
  s->g = take(cur, sizeof(float) * (size_t)T * Hd);
  s->up_a = take(cur, sizeof(float) * (size_t)T * I);
  s->up_b = take(cur, sizeof(float) * (size_t)T * I);
  s->e_out = take(cur, sizeof(float) * D);
  s->router_logits = take(cur, sizeof(float) * E);
  s->router_sel = take(cur, sizeof(float) * E);
  s->top_idx = take(cur, sizeof(int32_t) * imax(c->topk, 1));
  s->top_w = take(cur, sizeof(float) * imax(c->topk, 1));
  s->scores = take(cur, sizeof(float) * c->max_context);
  s->rope_cos = take(cur, sizeof(float) * T * half);
  s->rope_sin = take(cur, sizeof(float) * T * half);
  s->xq = take(cur, sizeof(int16_t) * (size_t)T * K);
  s->xs = take(cur, sizeof(float) * T);
  s->kv_tmp = take(cur, sizeof(float) * RL_LIGHTNING_TMP);
  s->hidden = take(cur, sizeof(float) * T * D);
  s->logits = take(cur, sizeof(float) * c->vocab);
}

static int check_config(const rl_config *c) {
#define REQ(cond, msg) if (!(cond)) return fail(RL_E_CONFIG, "config: " msg)
  REQ(c->vocab > 0 && c->dim > 0 && c->n_layers > 0, "vocab_size, hidden_size, num_hidden_layers must be > 0");
  REQ(c->layer_group_size > 0, "layer_group_size must be > 0");
  REQ(c->n_heads > 0 && c->n_kv_heads > 0 && c->n_heads % c->n_kv_heads == 0,
      "num_attention_heads must be a multiple of num_key_value_heads");
  REQ(c->head_dim > 0, "head_dim must be > 0");
  REQ(c->rot_dim >= 0 && c->rot_dim <= c->head_dim && c->rot_dim % 2 == 0, "rotary dim must be even and <= head_dim");
  REQ(c->group_norm_size > 0 && (c->n_heads * c->head_dim) % c->group_norm_size == 0,
      "group_norm_size must divide num_attention_heads*head_dim");
  REQ(c->first_dense >= 0, "first_k_dense_replace must be >= 0");
  REQ(c->first_dense == 0 || c->inter > 0 || c->n_experts == 0, "intermediate_size must be > 0");
  if (c->n_experts > 0) {
    REQ(c->n_experts <= 1024, "num_experts must be <= 1024");
    REQ(c->n_group > 0 && c->n_group <= 256 && c->n_experts % c->n_group == 0, "n_group must divide num_experts");
    REQ(c->topk_group > 0 && c->topk_group <= c->n_group, "topk_group must be in 1..n_group");
    REQ(c->topk > 0 && c->topk <= c->topk_group * (c->n_experts / c->n_group),
        "num_experts_per_tok must fit in the kept groups");
    REQ(c->moe_inter > 0, "moe_intermediate_size must be > 0");
  }
  REQ(c->quant == RL_QUANT_F32 || c->quant == RL_QUANT_INT8, "quant must be f32 or int8");
  REQ(c->max_chunk > 0 && c->max_context > 0, "max_chunk and max_context must be > 0");
  return RL_OK;
#undef REQ
}

static void set_decay(rl_model *m) {
  const rl_config *c = &m->cfg;
  double slopes[1024];
  int H = c->n_heads < 1024 ? c->n_heads : 1024;
  rl_alibi_slopes(slopes, H);
  for (int l = 0; l < c->n_layers; l++) {
    rl_layer *L = &m->layers[l];
    if (L->is_softmax) continue;
    double f = rl_layer_factor(c, l);
    for (int h = 0; h < H; h++) L->gamma[h] = (float)exp(-slopes[h] * f);
  }
}

RL_API void rl_destroy(rl_model *m) {
  if (!m) return;
  free(m->weight_arena);
  free(m->scratch_arena);
  free(m);
}

RL_API rl_model *rl_create(const rl_config *cfg) {
  if (check_config(cfg) != RL_OK) return NULL;
  if (cfg->n_heads > 1024) { fail(RL_E_CONFIG, "config: num_attention_heads must be <= 1024"); return NULL; }
  rl_model *m = calloc(1, sizeof *m);
  if (!m) { fail(RL_E_ALLOC, "out of memory (model)"); return NULL; }
  m->cfg = *cfg;
  cursor wc = {NULL, 0}, sc = {NULL, 0};
  layout_weights(m, &wc);
  layout_scratch(m, &sc);
  m->weight_bytes = wc.off + 16;
  m->scratch_bytes = sc.off + 16;
  m->weight_arena = calloc(1, m->weight_bytes);
  m->scratch_arena = calloc(1, m->scratch_bytes);
  if (!m->weight_arena || !m->scratch_arena) {
    rl_destroy(m);
    fail(RL_E_ALLOC, "out of memory (weights or scratch)");
    return NULL;
  }
  wc = (cursor){m->weight_arena, 0};
  sc = (cursor){m->scratch_arena, 0};
  layout_weights(m, &wc);
  layout_scratch(m, &sc);
  set_decay(m);
  return m;
}

RL_API size_t rl_model_bytes(const rl_model *m) { return m->weight_bytes + m->scratch_bytes + sizeof *m; }
RL_API int rl_n_linear(const rl_model *m) { return m->n_linear; }
RL_API int rl_n_softmax(const rl_model *m) { return m->n_softmax; }
RL_API float rl_layer_gamma(const rl_model *m, int layer, int head) {
  const rl_layer *L = &m->layers[layer];
  return L->gamma ? L->gamma[head] : 0.0f;
}

/* ======================= tensors ======================= */

/* Resolve (kind, layer, expert) to a matrix or vector; returns NULL if the model has no such tensor. */
static void *tensor_target(rl_model *m, int kind, int layer, int expert, int *rows, int *cols, rl_mat **mat) {
  const rl_config *c = &m->cfg;
  *mat = NULL;
  int D = c->dim, d = c->head_dim;
  if (kind == RL_T_EMBED) { *mat = &m->embed; }
  else if (kind == RL_T_LM_HEAD) { *mat = &m->lm_head; }
  else if (kind == RL_T_FINAL_NORM) { *rows = 1; *cols = D; return m->final_norm; }
  else {
    if (layer < 0 || layer >= c->n_layers) return NULL;
    rl_layer *L = &m->layers[layer];
    int moe = is_moe_layer(c, layer);
    switch (kind) {
      case RL_T_IN_NORM: *rows = 1; *cols = D; return L->in_norm;
      case RL_T_POST_NORM: *rows = 1; *cols = D; return L->post_norm;
      case RL_T_QKV: *mat = &L->qkv; break;
      case RL_T_Q_NORM: if (!c->use_qk_norm) return NULL; *rows = 1; *cols = d; return L->q_norm;
      case RL_T_K_NORM: if (!c->use_qk_norm) return NULL; *rows = 1; *cols = d; return L->k_norm;
      case RL_T_G_PROJ: if (L->is_softmax) return NULL; *mat = &L->g_proj; break;
      case RL_T_G_NORM: if (L->is_softmax) return NULL; *rows = 1; *cols = c->n_heads * d; return L->g_norm;
      case RL_T_DENSE: *mat = &L->dense; break;
      case RL_T_MLP_GATE: if (moe) return NULL; *mat = &L->mlp_gate; break;
      case RL_T_MLP_UP: if (moe) return NULL; *mat = &L->mlp_up; break;
      case RL_T_MLP_DOWN: if (moe) return NULL; *mat = &L->mlp_down; break;
      case RL_T_ROUTER: if (!moe) return NULL; *mat = &L->router; break;
      case RL_T_EXPERT_BIAS: if (!moe) return NULL; *rows = 1; *cols = c->n_experts; return L->expert_bias;
      case RL_T_EXP_GATE: case RL_T_EXP_UP: case RL_T_EXP_DOWN:
        if (!moe || expert < 0 || expert >= c->n_experts) return NULL;
        *mat = kind == RL_T_EXP_GATE ? &L->exp_gate[expert] : kind == RL_T_EXP_UP ? &L->exp_up[expert] : &L->exp_down[expert];
        break;
      case RL_T_SH_GATE: case RL_T_SH_UP: case RL_T_SH_DOWN:
        if (!moe || c->shared_inter <= 0) return NULL;
        *mat = kind == RL_T_SH_GATE ? &L->sh_gate : kind == RL_T_SH_UP ? &L->sh_up : &L->sh_down;
        break;
      default: return NULL;
    }
  }
  *rows = (*mat)->rows;
  *cols = (*mat)->cols;
  return *mat;
}

/* Shape of a tensor: out[0] = rows (1 for vectors), out[1] = cols, out[2] = 1 if stored int8. Returns 0 if absent. */
RL_API int rl_tensor_shape(rl_model *m, int kind, int layer, int expert, int32_t *out) {
  int rows = 0, cols = 0;
  rl_mat *mat;
  if (!tensor_target(m, kind, layer, expert, &rows, &cols, &mat)) return 0;
  out[0] = rows;
  out[1] = cols;
  out[2] = mat && mat->q ? 1 : 0;
  return 1;
}

/* Copy (f32) or quantise (int8) rows [row0, row0+nrows) of a tensor from f32 src [nrows, cols]. */
RL_API int rl_load_rows(rl_model *m, int kind, int layer, int expert, int row0, int nrows, const float *src) {
  int rows = 0, cols = 0;
  rl_mat *mat;
  void *dst = tensor_target(m, kind, layer, expert, &rows, &cols, &mat);
  if (!dst) return fail(RL_E_TENSOR, "no such tensor in this config");
  if (row0 < 0 || nrows < 0 || row0 + nrows > rows) return fail(RL_E_TENSOR, "row range outside the tensor");
  if (!mat) {
    memcpy((float *)dst + (size_t)row0 * cols, src, sizeof(float) * (size_t)nrows * cols);
    return RL_OK;
  }
  /* int8 rows are quantised into scratch (idle while loading) and then placed in the matrix's layout */
  int8_t *tmp = (int8_t *)m->s.xq;
  for (int r = 0; r < nrows; r++) {
    int row = row0 + r;
    size_t at = (size_t)row * cols;
    if (mat->f && !mat->packed) {
      memcpy(mat->f + at, src + (size_t)r * cols, sizeof(float) * cols);
    } else if (mat->f) {
      for (int k = 0; k < cols; k += 4)
        memcpy(mat->f + f32_packed_index(row, k, rows, cols), src + (size_t)r * cols + k, 4 * sizeof(float));
    } else if (!mat->packed) {
      mat->scale[row] = quantize_row_q8(mat->q + at, src + (size_t)r * cols, cols);
    } else {
      mat->scale[row] = quantize_row_q8(tmp, src + (size_t)r * cols, cols);
      for (int k = 0; k < cols; k += 16) memcpy(mat->q + q8_packed_index(row, k, rows, cols), tmp + k, 16);
    }
  }
  return RL_OK;
}

/* Deterministic pseudo-random weights (benchmarks): matrices U(-1/sqrt(cols), 1/sqrt(cols)), norms 1 +- 0.1. */
static uint32_t xorshift32(uint32_t *s) {
  uint32_t x = *s;
  x ^= x << 13; x ^= x >> 17; x ^= x << 5;
  return *s = x;
}
static float urand(uint32_t *s) { return (float)(xorshift32(s) >> 8) / 16777216.0f * 2.0f - 1.0f; }

RL_API int rl_fill_random(rl_model *m, uint32_t seed) {
  const rl_config *c = &m->cfg;
  uint32_t st = seed ? seed : 1;
  int maxcols = imax(imax(c->dim, c->n_heads * c->head_dim), imax(imax(c->inter, c->shared_inter), c->moe_inter));
  maxcols = imax(maxcols, c->n_experts);
  float *row = malloc(sizeof(float) * maxcols);
  if (!row) return fail(RL_E_ALLOC, "out of memory (random fill)");
  for (int kind = 0; kind < RL_T_COUNT; kind++)
    for (int l = -1; l < c->n_layers; l++)
      for (int e = -1; e < imax(c->n_experts, 0); e++) {
        int global = kind == RL_T_EMBED || kind == RL_T_LM_HEAD || kind == RL_T_FINAL_NORM;
        int per_expert = kind == RL_T_EXP_GATE || kind == RL_T_EXP_UP || kind == RL_T_EXP_DOWN;
        if ((global && (l != -1 || e != -1)) || (!global && l < 0) || (!per_expert && e != -1) || (per_expert && e < 0))
          continue;
        int32_t shp[3];
        if (!rl_tensor_shape(m, kind, l, e, shp)) continue;
        int is_vec = shp[0] == 1 && (kind == RL_T_FINAL_NORM || kind == RL_T_IN_NORM || kind == RL_T_POST_NORM ||
                                      kind == RL_T_Q_NORM || kind == RL_T_K_NORM || kind == RL_T_G_NORM);
        float amp = kind == RL_T_EXPERT_BIAS ? 0.01f : kind == RL_T_EMBED ? 1.0f : 1.0f / sqrtf((float)shp[1]);
        for (int r = 0; r < shp[0]; r++) {
          for (int i = 0; i < shp[1]; i++) row[i] = is_vec ? 1.0f + 0.1f * urand(&st) : amp * urand(&st);
          rl_load_rows(m, kind, l, e, r, 1, row);
        }
      }
  free(row);
  return RL_OK;
}

/* ======================= sessions ======================= */

RL_API size_t rl_session_bytes(const rl_model *m, int capacity) {
  const rl_config *c = &m->cfg;
  size_t lin = (size_t)m->n_linear * c->n_heads * c->head_dim * c->head_dim;
  size_t kv = 2 * (size_t)m->n_softmax * capacity * c->n_kv_heads * c->head_dim;
  return sizeof(float) * (lin + kv) + sizeof(rl_session) + 64;
}

RL_API rl_session *rl_session_create(rl_model *m, int capacity) {
  if (capacity < 1 || capacity > m->cfg.max_context) {
    fail(RL_E_CONTEXT, "session capacity outside 1..max_context");
    return NULL;
  }
  const rl_config *c = &m->cfg;
  size_t lin = (size_t)m->n_linear * c->n_heads * c->head_dim * c->head_dim;
  size_t kv = (size_t)m->n_softmax * capacity * c->n_kv_heads * c->head_dim;
  rl_session *s = calloc(1, sizeof *s);
  if (s) {
    s->bytes = sizeof(float) * (lin + 2 * kv) + 32;
    s->arena = calloc(1, s->bytes);
  }
  if (!s || !s->arena) {
    free(s);
    fail(RL_E_ALLOC, "out of memory (session)");
    return NULL;
  }
  s->capacity = capacity;
  s->lin_state = s->arena;
  s->k_cache = s->lin_state + lin;
  s->v_cache = s->k_cache + kv;
  return s;
}

RL_API void rl_session_free(rl_session *s) {
  if (!s) return;
  free(s->arena);
  free(s);
}

RL_API int rl_session_pos(const rl_session *s) { return s->pos; }
/* [H, d, d] state of the j-th linear layer (in layer order) */
RL_API float *rl_session_state(rl_session *s, const rl_model *m, int j) {
  return s->lin_state + (size_t)j * m->cfg.n_heads * m->cfg.head_dim * m->cfg.head_dim;
}

/* ======================= forward ======================= */

RL_API int rl_forward(rl_model *m, rl_session *s, const int32_t *tokens, int T) {
  int rc = rl_forward_tokens(m, s, tokens, T);
  if (rc == RL_E_CHUNK) return fail(rc, "forward: token count outside 1..max_chunk");
  if (rc == RL_E_CONTEXT) return fail(rc, "forward: session capacity exceeded");
  if (rc == RL_E_RANGE) return fail(rc, "forward: token id outside the vocabulary");
  return rc;
}

/* Logits [V] of row `row` of the last forward call; the pointer stays valid until the next call. */
RL_API float *rl_logits(rl_model *m, int row) {
  if (row < 0 || row >= m->last_t) {
    fail(RL_E_RANGE, "logits: row outside the last forward call");
    return NULL;
  }
  rl_logits_row(m, row, m->s.logits);
  return m->s.logits;
}

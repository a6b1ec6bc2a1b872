/*
 * Ring-linear (bailing_moe_linear) forward pass: configuration, weights, per-request session.
 * Shapes use: V vocab, D hidden, H heads, Hkv softmax KV heads, d head_dim, r rotary dim, I dense intermediate,
 * E experts, Ie expert intermediate, Is shared intermediate, T tokens in one forward call (<= max_chunk).
 * Matrices are row-major [rows, cols] and multiply as y = W x (HF nn.Linear layout).
 */
#ifndef RL_MODEL_H
#define RL_MODEL_H

#include <stddef.h>
#include <stdint.h>

/* ---- configuration (from config.json; filled by the caller, checked by rl_create) ---- */

typedef struct {
  int32_t vocab;            /* V */
  int32_t dim;              /* D */
  int32_t n_layers;         /* L */
  int32_t layer_group_size; /* G: layer l is softmax iff (l+1)%G==0 or l >= (L/G)*G */
  int32_t n_heads;          /* H (linear layers use H K/V heads too) */
  int32_t n_kv_heads;       /* Hkv of the softmax layers */
  int32_t head_dim;         /* d */
  int32_t rot_dim;          /* r, even, <= d */
  int32_t group_norm_size;  /* groups of the linear-layer output RMSNorm, divides H*d */
  int32_t inter;            /* I, dense SwiGLU of layers < first_dense */
  int32_t first_dense;      /* first_k_dense_replace */
  int32_t n_experts;        /* E */
  int32_t topk;             /* num_experts_per_tok */
  int32_t n_group;          /* expert groups, divides E */
  int32_t topk_group;       /* groups kept */
  int32_t moe_inter;        /* Ie */
  int32_t shared_inter;     /* Is = num_shared_experts * moe_shared_expert_intermediate_size (0 = none) */
  int32_t norm_topk_prob;   /* 1: normalise the selected weights */
  int32_t use_qk_norm;      /* 1: RMSNorm q and k per head */
  int32_t linear_silu;      /* 1: SiLU on q/k/v of linear layers */
  int32_t slope_rule_hf;    /* 0: factor 1 - l/(L-1) (sglang); 1: 1 - (l-1)/(L-1) (hf) */
  int32_t quant;            /* RL_QUANT_F32 or RL_QUANT_INT8 for the big matrices */
  int32_t max_chunk;        /* most tokens per rl_forward call (activation scratch rows) */
  int32_t max_context;      /* most positions a session may hold (attention score scratch) */
  float rope_theta;
  float rms_eps;
  float routed_scale;       /* routed_scaling_factor */
} rl_config;

#define RL_QUANT_F32 0
#define RL_QUANT_INT8 1
#define RL_CONFIG_INTS 24 /* int32 fields before the floats, for callers that fill the struct as an array */

/* ---- weights ---- */

/* A matrix [rows, cols]: f32 data, or int8 data with one f32 scale per row (w ~= q * scale[row]). */
typedef struct {
  int32_t rows, cols;
  float *f;       /* [rows, cols] when f32 */
  int8_t *q;      /* [rows, cols] when int8 */
  float *scale;   /* [rows] when int8 */
  int32_t packed; /* int8 only: 1 = 4-row interleaved layout (kernels.h, q8_packed_index) for streaming matvecs */
} rl_mat;

typedef struct {
  float *in_norm, *post_norm; /* [D] */
  rl_mat qkv;                 /* linear: [3*H*d, D]; softmax: [(H+2*Hkv)*d, D] */
  float *q_norm, *k_norm;     /* [d] */
  rl_mat g_proj;              /* linear only: [H*d, D] output gate */
  float *g_norm;              /* linear only: [H*d] group RMSNorm weight */
  rl_mat dense;               /* [D, H*d] output projection */
  rl_mat mlp_gate, mlp_up;    /* dense layers: [I, D] */
  rl_mat mlp_down;            /* dense layers: [D, I] */
  rl_mat router;              /* MoE layers: [E, D], always f32 (router_dtype fp32) */
  float *expert_bias;         /* MoE layers: [E], selection only */
  rl_mat *exp_gate, *exp_up;  /* MoE layers: E x [Ie, D] */
  rl_mat *exp_down;           /* MoE layers: E x [D, Ie] */
  rl_mat sh_gate, sh_up;      /* MoE layers with a shared expert: [Is, D] */
  rl_mat sh_down;             /* [D, Is] */
  int32_t is_softmax;
  int32_t slot;               /* index among linear layers (state) or softmax layers (KV cache) */
  float *gamma;               /* linear only: [H] per-head decay exp(-slope*factor) */
} rl_layer;

/* Tensor kinds, as the loader addresses them (rl_tensor_info / rl_load_rows). */
enum {
  RL_T_EMBED, RL_T_FINAL_NORM, RL_T_LM_HEAD, RL_T_IN_NORM, RL_T_POST_NORM, RL_T_QKV, RL_T_Q_NORM, RL_T_K_NORM,
  RL_T_G_PROJ, RL_T_G_NORM, RL_T_DENSE, RL_T_MLP_GATE, RL_T_MLP_UP, RL_T_MLP_DOWN, RL_T_ROUTER, RL_T_EXPERT_BIAS,
  RL_T_EXP_GATE, RL_T_EXP_UP, RL_T_EXP_DOWN, RL_T_SH_GATE, RL_T_SH_UP, RL_T_SH_DOWN, RL_T_COUNT
};

/* Activation scratch for one forward call of up to max_chunk tokens (shared by all sessions). */
typedef struct {
  float *x, *h, *attn_out, *ffn_out; /* [T, D] residual stream, normed input, block outputs */
  float *qkv;                        /* [T, max(3*H*d, (H+2*Hkv)*d)] */
  float *o, *g;                      /* [T, H*d] attention output, gate */
  float *up_a, *up_b;                /* [T, max(I, Is, Ie)] SwiGLU gate/up */
  float *e_out;                      /* [D] one expert's output */
  float *router_logits, *router_sel; /* [E] */
  int32_t *top_idx;                  /* [topk] */
  float *top_w;                      /* [topk] */
  float *scores;                     /* [max_context] softmax-attention scores */
  float *rope_cos, *rope_sin;        /* [T, r/2] */
  int16_t *xq;                       /* [T, max K] int8 path: activations quantised to int16 */
  float *xs;                         /* [T] their per-row scales */
  float *kv_tmp;                     /* [T, d] lightning chunk scratch */
  float *hidden;                     /* [T, D] final-normed hidden of the last rl_forward */
  float *logits;                     /* [V] */
} rl_scratch;

typedef struct {
  rl_config cfg;
  int32_t n_linear, n_softmax;
  rl_mat embed;                      /* [V, D] */
  float *final_norm;                 /* [D] */
  rl_mat lm_head;                    /* [V, D] untied */
  rl_layer *layers;                  /* [L] */
  void *weight_arena; size_t weight_bytes;
  void *scratch_arena; size_t scratch_bytes;
  rl_scratch s;
  int32_t last_t;                    /* rows in s.hidden */
} rl_model;

/* Per-request state: fp32 linear-attention states and the softmax layers' KV cache. */
typedef struct {
  int32_t capacity;                  /* positions the KV cache holds */
  int32_t pos;                       /* tokens consumed so far */
  float *lin_state;                  /* [n_linear, H, d, d] S[h][k][v] */
  float *k_cache, *v_cache;          /* [n_softmax, capacity, Hkv, d] */
  void *arena; size_t bytes;
} rl_session;

/* ---- errors ---- */
enum {
  RL_OK = 0, RL_E_CONFIG = 1, RL_E_ALLOC = 2, RL_E_TENSOR = 3, RL_E_RANGE = 4, RL_E_CONTEXT = 5, RL_E_CHUNK = 6
};

/* forward.c */
int rl_is_softmax_layer(const rl_config *c, int l);
double rl_layer_factor(const rl_config *c, int l);
void rl_alibi_slopes(double *out, int n);
int rl_forward_tokens(rl_model *m, rl_session *s, const int32_t *tokens, int T);
void rl_logits_row(rl_model *m, int row, float *out);

#endif

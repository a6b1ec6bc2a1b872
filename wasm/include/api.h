/* The exported API (api.c): what the TypeScript engine, the tests and the native benchmark call. */
#ifndef RL_API_H
#define RL_API_H

#include "model.h"

const char *rl_error_message(void);
void *rl_malloc(size_t n);
void rl_free(void *p);
rl_model *rl_create(const rl_config *cfg);         /* NULL on error (see rl_error_message) */
void rl_destroy(rl_model *m);
size_t rl_model_bytes(const rl_model *m);
int rl_n_linear(const rl_model *m);
int rl_n_softmax(const rl_model *m);
float rl_layer_gamma(const rl_model *m, int layer, int head);
int rl_tensor_shape(rl_model *m, int kind, int layer, int expert, int32_t *out); /* out: rows, cols, is_int8 */
int rl_load_rows(rl_model *m, int kind, int layer, int expert, int row0, int nrows, const float *src);
int rl_fill_random(rl_model *m, uint32_t seed);
size_t rl_session_bytes(const rl_model *m, int capacity);
rl_session *rl_session_create(rl_model *m, int capacity);
void rl_session_free(rl_session *s);
int rl_session_pos(const rl_session *s);
float *rl_session_state(rl_session *s, const rl_model *m, int j);
int rl_forward(rl_model *m, rl_session *s, const int32_t *tokens, int T);
float *rl_logits(rl_model *m, int row);

#endif

/* A model session's fixed attention description: shapes, dtype, KV block size and features.
 *
 * att_model_cfg_t is what a client asks for (0 / empty = default / none, as in the wire
 * contract); att_model_create validates it and resolves every default, so code downstream reads
 * one explicit value per field. An att_model_t is immutable after creation and may be read from
 * any thread. */
#ifndef AT_ATTENTION_ATT_MODEL_H
#define AT_ATTENTION_ATT_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "attention/att_dtype.h"
#include "common/at_err.h"

#define ATT_MAX_HEAD_DIM 256u
#define ATT_MIN_BLOCK_SIZE 8u
#define ATT_MAX_BLOCK_SIZE 256u
#define ATT_DEFAULT_BLOCK_SIZE 16u
/* Positions are kept below 2^31 so that i - j and window arithmetic fit in int32 everywhere. */
#define ATT_MAX_POSITION 0x7fffffffu

typedef struct att_model_cfg {
    uint32_t num_layers;
    uint32_t num_query_heads;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    att_dtype_t dtype;
    uint32_t block_size;               /* tokens per KV block; 0 = 16 */
    float scale;                       /* 0 = 1/sqrt(head_dim) */
    uint32_t sliding_window;           /* tokens; 0 = none; applies to every layer */
    const uint32_t *layer_sliding_window; /* borrowed for the call; [n_layer_sliding_window] */
    uint32_t n_layer_sliding_window;   /* 0, or num_layers (then it replaces sliding_window) */
    float logits_soft_cap;             /* 0 = none */
    const float *alibi_slopes;         /* borrowed for the call; [n_alibi_slopes] */
    uint32_t n_alibi_slopes;           /* 0, or num_query_heads */
    const float *sinks;                /* borrowed for the call; [n_sinks] */
    uint32_t n_sinks;                  /* 0, or num_query_heads */
} att_model_cfg_t;

typedef struct att_model {
    uint32_t num_layers;
    uint32_t num_query_heads;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    uint32_t group;          /* query heads per KV head: num_query_heads / num_kv_heads */
    att_dtype_t dtype;
    uint32_t block_size;     /* tokens */
    float scale;
    float soft_cap;          /* 0 = none */
    uint32_t *window;        /* owned; [num_layers]; 0 = no window at that layer */
    float *alibi;            /* owned; [num_query_heads], or NULL */
    float *sinks;            /* owned; [num_query_heads], or NULL */
} att_model_t;

/* Validates cfg and builds the resolved model. On failure returns the AT_ERR_MODEL_* code of the
 * first bad field, fills diag (may be NULL) with field, expected and got, and leaves *out
 * untouched. On success *out is owned by the caller (att_model_destroy). */
at_err_t att_model_create(const att_model_cfg_t *cfg, at_diag_t *diag, att_model_t **out);

/* Frees *m (NULL allowed) and sets *m to NULL. */
void att_model_destroy(att_model_t **m);

/* True when a and b describe the same model (used to make session creation idempotent). */
bool att_model_equal(const att_model_t *a, const att_model_t *b);

/* Bytes of one tensor row of n_heads heads: n_heads * head_dim * element size. */
static inline uint64_t att_model_row_bytes(const att_model_t *m, uint32_t n_heads) {
    return (uint64_t)n_heads * m->head_dim * att_dtype_bytes(m->dtype);
}

#endif

/* Model validation and default resolution. Pure except for allocation; any thread. */
#include "attention/att_model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int is_pow2(uint32_t x) { return x != 0 && (x & (x - 1)) == 0; }

static at_err_t check_cfg(const att_model_cfg_t *c, at_diag_t *d) {
    if (c->num_layers < 1)
        return at_diag_set(d, AT_ERR_MODEL_LAYERS, "num_layers: expected >= 1, got %u",
                           c->num_layers);
    if (c->num_query_heads < 1 || c->num_kv_heads < 1)
        return at_diag_set(d, AT_ERR_MODEL_HEADS,
                           "num_query_heads and num_kv_heads: expected >= 1, got %u and %u",
                           c->num_query_heads, c->num_kv_heads);
    if (c->num_query_heads % c->num_kv_heads != 0)
        return at_diag_set(d, AT_ERR_MODEL_GQA,
                           "num_query_heads: expected a multiple of num_kv_heads %u, got %u",
                           c->num_kv_heads, c->num_query_heads);
    if (c->head_dim == 0 || c->head_dim % 8 != 0 || c->head_dim > ATT_MAX_HEAD_DIM)
        return at_diag_set(d, AT_ERR_MODEL_HEAD_DIM,
                           "head_dim: expected a multiple of 8 from 8 to %u, got %u",
                           ATT_MAX_HEAD_DIM, c->head_dim);
    if (att_dtype_bytes(c->dtype) == 0)
        return at_diag_set(d, AT_ERR_MODEL_DTYPE, "dtype: expected F32, F16 or BF16, got %d",
                           (int)c->dtype);
    if (c->block_size != 0 && (!is_pow2(c->block_size) || c->block_size < ATT_MIN_BLOCK_SIZE ||
                               c->block_size > ATT_MAX_BLOCK_SIZE))
        return at_diag_set(d, AT_ERR_MODEL_BLOCK_SIZE,
                           "block_size: expected a power of two from %u to %u, got %u",
                           ATT_MIN_BLOCK_SIZE, ATT_MAX_BLOCK_SIZE, c->block_size);
    if (!isfinite(c->scale) || c->scale < 0.0f)
        return at_diag_set(d, AT_ERR_MODEL_SCALE, "scale: expected finite and >= 0, got %g",
                           (double)c->scale);
    if (c->n_layer_sliding_window != 0 &&
        (c->n_layer_sliding_window != c->num_layers || c->layer_sliding_window == NULL))
        return at_diag_set(d, AT_ERR_MODEL_WINDOW,
                           "layer_sliding_window: expected 0 or %u entries, got %u",
                           c->num_layers, c->n_layer_sliding_window);
    if (!isfinite(c->logits_soft_cap) || c->logits_soft_cap < 0.0f)
        return at_diag_set(d, AT_ERR_MODEL_SOFT_CAP,
                           "logits_soft_cap: expected finite and >= 0, got %g",
                           (double)c->logits_soft_cap);
    if (c->n_alibi_slopes != 0 &&
        (c->n_alibi_slopes != c->num_query_heads || c->alibi_slopes == NULL))
        return at_diag_set(d, AT_ERR_MODEL_ALIBI, "alibi_slopes: expected 0 or %u entries, got %u",
                           c->num_query_heads, c->n_alibi_slopes);
    for (uint32_t h = 0; h < c->n_alibi_slopes; h++)
        if (!isfinite(c->alibi_slopes[h]))
            return at_diag_set(d, AT_ERR_MODEL_ALIBI, "alibi_slopes[%u]: expected finite, got %g",
                               h, (double)c->alibi_slopes[h]);
    if (c->n_sinks != 0 && (c->n_sinks != c->num_query_heads || c->sinks == NULL))
        return at_diag_set(d, AT_ERR_MODEL_SINKS, "sinks: expected 0 or %u entries, got %u",
                           c->num_query_heads, c->n_sinks);
    for (uint32_t h = 0; h < c->n_sinks; h++)
        if (!isfinite(c->sinks[h]))
            return at_diag_set(d, AT_ERR_MODEL_SINKS, "sinks[%u]: expected finite, got %g", h,
                               (double)c->sinks[h]);
    return AT_OK;
}

static float *dup_floats(const float *src, uint32_t n) {
    float *p = malloc((size_t)n * sizeof *p);
    if (p != NULL)
        memcpy(p, src, (size_t)n * sizeof *p);
    return p;
}

at_err_t att_model_create(const att_model_cfg_t *cfg, at_diag_t *diag, att_model_t **out) {
    at_err_t e = check_cfg(cfg, diag);
    if (e != AT_OK)
        return e;
    att_model_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return AT_ERR_NOMEM;
    m->num_layers = cfg->num_layers;
    m->num_query_heads = cfg->num_query_heads;
    m->num_kv_heads = cfg->num_kv_heads;
    m->head_dim = cfg->head_dim;
    m->group = cfg->num_query_heads / cfg->num_kv_heads;
    m->dtype = cfg->dtype;
    m->block_size = cfg->block_size != 0 ? cfg->block_size : ATT_DEFAULT_BLOCK_SIZE;
    m->scale = cfg->scale != 0.0f ? cfg->scale : (float)(1.0 / sqrt((double)cfg->head_dim));
    m->soft_cap = cfg->logits_soft_cap;
    m->window = malloc((size_t)cfg->num_layers * sizeof *m->window);
    if (m->window == NULL)
        goto out_free;
    for (uint32_t l = 0; l < cfg->num_layers; l++)
        m->window[l] = cfg->n_layer_sliding_window != 0 ? cfg->layer_sliding_window[l]
                                                        : cfg->sliding_window;
    if (cfg->n_alibi_slopes != 0 &&
        (m->alibi = dup_floats(cfg->alibi_slopes, cfg->n_alibi_slopes)) == NULL)
        goto out_free;
    if (cfg->n_sinks != 0 && (m->sinks = dup_floats(cfg->sinks, cfg->n_sinks)) == NULL)
        goto out_free;
    *out = m;
    return AT_OK;
out_free:
    att_model_destroy(&m);
    return AT_ERR_NOMEM;
}

void att_model_destroy(att_model_t **m) {
    if (m == NULL || *m == NULL)
        return;
    free((*m)->window);
    free((*m)->alibi);
    free((*m)->sinks);
    free(*m);
    *m = NULL;
}

static int same_floats(const float *a, const float *b, uint32_t n) {
    if ((a == NULL) != (b == NULL))
        return 0;
    return a == NULL || memcmp(a, b, (size_t)n * sizeof *a) == 0;
}

bool att_model_equal(const att_model_t *a, const att_model_t *b) {
    return a->num_layers == b->num_layers && a->num_query_heads == b->num_query_heads &&
           a->num_kv_heads == b->num_kv_heads && a->head_dim == b->head_dim &&
           a->dtype == b->dtype && a->block_size == b->block_size && a->scale == b->scale &&
           a->soft_cap == b->soft_cap &&
           memcmp(a->window, b->window, (size_t)a->num_layers * sizeof *a->window) == 0 &&
           same_floats(a->alibi, b->alibi, a->num_query_heads) &&
           same_floats(a->sinks, b->sinks, a->num_query_heads);
}

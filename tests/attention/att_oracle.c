/* The tests' double-precision attention reference; see att_oracle.h. Plain loops on purpose. */
#include "tests/attention/att_oracle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tests/attention/att_ref_dtype.h"

typedef struct hist {
    double *k;    /* [cap, Hkv, D] */
    double *v;    /* [cap, Hkv, D] */
    uint32_t len; /* tokens */
    uint32_t cap; /* tokens */
} hist_t;

typedef struct oseq {
    uint64_t id;
    hist_t *layers; /* [num_layers] */
} oseq_t;

struct att_oracle {
    uint32_t num_layers;
    uint32_t hq;
    uint32_t hkv;
    uint32_t d;
    att_dtype_t dtype;
    double scale;
    double cap;      /* 0 = no soft cap */
    uint32_t *window; /* [num_layers]; 0 = none */
    double *alibi;   /* [hq] or NULL */
    double *sinks;   /* [hq] or NULL */
    oseq_t *seqs;    /* [num_seqs] */
    uint32_t num_seqs;
};

double att_oracle_decode(att_dtype_t t, const void *p, size_t i) {
    switch (t) {
    case ATT_DTYPE_F16: return ref_f16_decode(((const uint16_t *)p)[i]);
    case ATT_DTYPE_BF16: return ref_bf16_decode(((const uint16_t *)p)[i]);
    default: return ref_f32_decode((const char *)p + 4 * i);
    }
}

att_oracle_t *att_oracle_create(const att_model_cfg_t *cfg) {
    att_oracle_t *o = calloc(1, sizeof *o);
    if (o == NULL)
        return NULL;
    o->num_layers = cfg->num_layers;
    o->hq = cfg->num_query_heads;
    o->hkv = cfg->num_kv_heads;
    o->d = cfg->head_dim;
    o->dtype = cfg->dtype;
    o->scale = cfg->scale != 0.0f ? (double)cfg->scale : 1.0 / sqrt((double)cfg->head_dim);
    o->cap = (double)cfg->logits_soft_cap;
    o->window = calloc(o->num_layers, sizeof *o->window);
    if (o->window == NULL)
        goto out_free;
    for (uint32_t l = 0; l < o->num_layers; l++)
        o->window[l] = cfg->n_layer_sliding_window != 0 ? cfg->layer_sliding_window[l]
                                                        : cfg->sliding_window;
    if (cfg->n_alibi_slopes != 0) {
        o->alibi = calloc(o->hq, sizeof *o->alibi);
        if (o->alibi == NULL)
            goto out_free;
        for (uint32_t h = 0; h < o->hq; h++)
            o->alibi[h] = (double)cfg->alibi_slopes[h];
    }
    if (cfg->n_sinks != 0) {
        o->sinks = calloc(o->hq, sizeof *o->sinks);
        if (o->sinks == NULL)
            goto out_free;
        for (uint32_t h = 0; h < o->hq; h++)
            o->sinks[h] = (double)cfg->sinks[h];
    }
    return o;
out_free:
    att_oracle_destroy(&o);
    return NULL;
}

static void seq_free(const att_oracle_t *o, oseq_t *s) {
    for (uint32_t l = 0; l < o->num_layers; l++) {
        free(s->layers[l].k);
        free(s->layers[l].v);
    }
    free(s->layers);
}

void att_oracle_destroy(att_oracle_t **po) {
    if (po == NULL || *po == NULL)
        return;
    att_oracle_t *o = *po;
    for (uint32_t i = 0; i < o->num_seqs; i++)
        seq_free(o, &o->seqs[i]);
    free(o->seqs);
    free(o->window);
    free(o->alibi);
    free(o->sinks);
    free(o);
    *po = NULL;
}

static oseq_t *seq_find(const att_oracle_t *o, uint64_t id) {
    for (uint32_t i = 0; i < o->num_seqs; i++)
        if (o->seqs[i].id == id)
            return &o->seqs[i];
    return NULL;
}

static oseq_t *seq_get(att_oracle_t *o, uint64_t id) {
    oseq_t *s = seq_find(o, id);
    if (s != NULL)
        return s;
    oseq_t *grown = realloc(o->seqs, (o->num_seqs + 1) * sizeof *grown);
    if (grown == NULL)
        return NULL;
    o->seqs = grown;
    s = &o->seqs[o->num_seqs];
    s->id = id;
    s->layers = calloc(o->num_layers, sizeof *s->layers);
    if (s->layers == NULL)
        return NULL;
    o->num_seqs++;
    return s;
}

static int hist_reserve(const att_oracle_t *o, hist_t *h, uint32_t tokens) {
    if (tokens <= h->cap)
        return 0;
    uint32_t cap = h->cap * 2 > tokens ? h->cap * 2 : tokens;
    size_t row = (size_t)o->hkv * o->d;
    double *k = realloc(h->k, (size_t)cap * row * sizeof *k);
    if (k == NULL)
        return -1;
    h->k = k;
    double *v = realloc(h->v, (size_t)cap * row * sizeof *v);
    if (v == NULL)
        return -1;
    h->v = v;
    h->cap = cap;
    return 0;
}

/* out[D] for the query q[D] of head h at position i, over history hs (which holds i + 1 keys
 * or more). */
static void attend_one(const att_oracle_t *o, const hist_t *hs, uint32_t layer, uint32_t i,
                       uint32_t h, const double *q, double *out, double *s) {
    const uint32_t d = o->d;
    const uint32_t kvh = h / (o->hq / o->hkv);
    const uint32_t w = o->window[layer];
    const uint32_t first = (w != 0 && i + 1 > w) ? i + 1 - w : 0; /* smallest j with i - j < w */
    double m = -INFINITY;
    for (uint32_t j = first; j <= i; j++) {
        const double *k = hs->k + ((size_t)j * o->hkv + kvh) * d;
        double dot = 0.0;
        for (uint32_t x = 0; x < d; x++)
            dot += q[x] * k[x];
        double sj = o->scale * dot;
        if (o->cap > 0.0)
            sj = o->cap * tanh(sj / o->cap);
        if (o->alibi != NULL)
            sj += o->alibi[h] * ((double)j - (double)i);
        s[j] = sj;
        if (sj > m)
            m = sj;
    }
    if (o->sinks != NULL && o->sinks[h] > m)
        m = o->sinks[h];
    double den = o->sinks != NULL ? exp(o->sinks[h] - m) : 0.0;
    for (uint32_t x = 0; x < d; x++)
        out[x] = 0.0;
    for (uint32_t j = first; j <= i; j++) {
        const double *v = hs->v + ((size_t)j * o->hkv + kvh) * d;
        double p = exp(s[j] - m);
        den += p;
        for (uint32_t x = 0; x < d; x++)
            out[x] += p * v[x];
    }
    for (uint32_t x = 0; x < d; x++)
        out[x] /= den;
}

at_err_t att_oracle_run(att_oracle_t *o, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                        const void *q, const void *k, const void *v, double *out) {
    for (uint32_t c = 0; c < n; c++) {
        const oseq_t *s = seq_find(o, chunks[c].seq_id);
        uint32_t len = s != NULL ? s->layers[layer].len : 0;
        if (chunks[c].start_pos > len)
            return AT_ERR_KV_PAST_END;
    }
    const size_t kv_row = (size_t)o->hkv * o->d;
    const size_t q_row = (size_t)o->hq * o->d;
    size_t tok = 0;
    for (uint32_t c = 0; c < n; c++) {
        const att_chunk_t *ch = &chunks[c];
        oseq_t *s = seq_get(o, ch->seq_id);
        if (s == NULL)
            return AT_ERR_NOMEM;
        hist_t *hs = &s->layers[layer];
        hs->len = ch->start_pos; /* rollback or retry: cut to start_pos */
        if (hist_reserve(o, hs, ch->start_pos + ch->num_tokens) != 0)
            return AT_ERR_NOMEM;
        for (uint32_t t = 0; t < ch->num_tokens; t++)
            for (size_t x = 0; x < kv_row; x++) {
                hs->k[(size_t)(ch->start_pos + t) * kv_row + x] =
                    att_oracle_decode(o->dtype, k, (tok + t) * kv_row + x);
                hs->v[(size_t)(ch->start_pos + t) * kv_row + x] =
                    att_oracle_decode(o->dtype, v, (tok + t) * kv_row + x);
            }
        hs->len = ch->start_pos + ch->num_tokens;
        if (q != NULL) {
            double *qd = malloc(o->d * sizeof *qd);
            double *sc = malloc((size_t)hs->len * sizeof *sc);
            if (qd == NULL || sc == NULL) {
                free(qd);
                free(sc);
                return AT_ERR_NOMEM;
            }
            for (uint32_t t = 0; t < ch->num_tokens; t++)
                for (uint32_t h = 0; h < o->hq; h++) {
                    size_t base = (tok + t) * q_row + (size_t)h * o->d;
                    for (uint32_t x = 0; x < o->d; x++)
                        qd[x] = att_oracle_decode(o->dtype, q, base + x);
                    attend_one(o, hs, layer, ch->start_pos + t, h, qd, out + base, sc);
                }
            free(qd);
            free(sc);
        }
        tok += ch->num_tokens;
    }
    return AT_OK;
}

int att_oracle_release(att_oracle_t *o, uint64_t seq_id) {
    oseq_t *s = seq_find(o, seq_id);
    if (s == NULL)
        return 0;
    seq_free(o, s);
    *s = o->seqs[o->num_seqs - 1];
    o->num_seqs--;
    return 1;
}

int64_t att_oracle_seq_len(const att_oracle_t *o, uint64_t seq_id, uint32_t layer) {
    const oseq_t *s = seq_find(o, seq_id);
    return s != NULL ? (int64_t)s->layers[layer].len : -1;
}

uint32_t att_oracle_seq_max_len(const att_oracle_t *o, uint64_t seq_id) {
    const oseq_t *s = seq_find(o, seq_id);
    uint32_t m = 0;
    for (uint32_t l = 0; s != NULL && l < o->num_layers; l++)
        if (s->layers[l].len > m)
            m = s->layers[l].len;
    return m;
}

uint32_t att_oracle_num_seqs(const att_oracle_t *o) { return o->num_seqs; }

static const double *row(const att_oracle_t *o, uint64_t seq_id, uint32_t layer, uint32_t pos,
                         int want_v) {
    const oseq_t *s = seq_find(o, seq_id);
    if (s == NULL || pos >= s->layers[layer].len)
        return NULL;
    const hist_t *hs = &s->layers[layer];
    return (want_v ? hs->v : hs->k) + (size_t)pos * o->hkv * o->d;
}

const double *att_oracle_k_row(const att_oracle_t *o, uint64_t seq_id, uint32_t layer,
                               uint32_t pos) {
    return row(o, seq_id, layer, pos, 0);
}

const double *att_oracle_v_row(const att_oracle_t *o, uint64_t seq_id, uint32_t layer,
                               uint32_t pos) {
    return row(o, seq_id, layer, pos, 1);
}

/* The attention test rig; see att_rig.h. */
#include "tests/attention/att_rig.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void att_rig_tolerance(att_dtype_t t, double *abs_tol, double *rel_tol) {
    switch (t) {
    case ATT_DTYPE_F16:
        *abs_tol = ATT_RIG_TOL_F16_ABS;
        *rel_tol = ATT_RIG_TOL_F16_REL;
        break;
    case ATT_DTYPE_BF16:
        *abs_tol = ATT_RIG_TOL_BF16_ABS;
        *rel_tol = ATT_RIG_TOL_BF16_REL;
        break;
    default:
        *abs_tol = ATT_RIG_TOL_F32_ABS;
        *rel_tol = ATT_RIG_TOL_F32_REL;
        break;
    }
}

void att_rig_spec_init(att_rig_spec_t *s, att_dtype_t dtype, uint32_t layers, uint32_t hq,
                       uint32_t hkv, uint32_t d, uint32_t block_size) {
    memset(s, 0, sizeof *s);
    s->cfg.num_layers = layers;
    s->cfg.num_query_heads = hq;
    s->cfg.num_kv_heads = hkv;
    s->cfg.head_dim = d;
    s->cfg.dtype = dtype;
    s->cfg.block_size = block_size;
}

static uint32_t random_window(tu_rng_t *r) {
    static const uint32_t choices[] = {1, 2, 3, 5, 8, 16, 17, 31, 64, 100, 1000};
    return choices[tu_rng_below(r, (uint32_t)(sizeof choices / sizeof choices[0]))];
}

void att_rig_spec_draw(att_rig_spec_t *s, att_dtype_t dtype, uint32_t hq, uint32_t hkv,
                       uint32_t d, uint32_t block_size, tu_rng_t *r) {
    const uint32_t layers = tu_rng_range(r, 1, 2);
    unsigned feats = 0;
    for (unsigned bit = ATT_RIG_F_WINDOW; bit <= ATT_RIG_F_SCALE; bit <<= 1)
        if (tu_rng_chance(r, 1, 2))
            feats |= bit;
    att_rig_spec_init(s, dtype, layers, hq, hkv, d, block_size);
    att_rig_spec_features(s, feats, r);
}

void att_rig_spec_features(att_rig_spec_t *s, unsigned feats, tu_rng_t *r) {
    att_model_cfg_t *c = &s->cfg;
    if (feats & ATT_RIG_F_WINDOW)
        c->sliding_window = random_window(r);
    if (feats & ATT_RIG_F_LAYER_WINDOW) {
        for (uint32_t l = 0; l < c->num_layers; l++)
            s->windows[l] = (l % 2 == 0 && tu_rng_chance(r, 1, 2)) ? 0 : random_window(r);
        c->layer_sliding_window = s->windows;
        c->n_layer_sliding_window = c->num_layers;
    }
    if (feats & ATT_RIG_F_SOFT_CAP)
        c->logits_soft_cap = tu_rng_float(r, 1.0f, 8.0f);
    if (feats & ATT_RIG_F_ALIBI) {
        int standard = tu_rng_chance(r, 1, 2);
        for (uint32_t h = 0; h < c->num_query_heads; h++)
            s->alibi[h] = standard ? (float)pow(2.0, -8.0 * (h + 1) / c->num_query_heads)
                                   : tu_rng_float(r, -0.05f, 0.3f);
        c->alibi_slopes = s->alibi;
        c->n_alibi_slopes = c->num_query_heads;
    }
    if (feats & ATT_RIG_F_SINKS) {
        for (uint32_t h = 0; h < c->num_query_heads; h++)
            s->sinks[h] = tu_rng_float(r, -3.0f, 3.0f);
        c->sinks = s->sinks;
        c->n_sinks = c->num_query_heads;
    }
    if (feats & ATT_RIG_F_SCALE)
        c->scale = (float)(tu_rng_float(r, 0.5f, 2.0f) / sqrt((double)c->head_dim));
}

const char *att_rig_spec_str(const att_rig_spec_t *s, char *buf, size_t n) {
    const att_model_cfg_t *c = &s->cfg;
    int k = snprintf(buf, n, "%s L%u Hq%u/Hkv%u D%u B%u", att_dtype_name(c->dtype),
                     c->num_layers, c->num_query_heads, c->num_kv_heads, c->head_dim,
                     c->block_size);
    if (k > 0 && (size_t)k < n && c->sliding_window)
        k += snprintf(buf + k, n - (size_t)k, " window=%u", c->sliding_window);
    if (k > 0 && (size_t)k < n && c->n_layer_sliding_window) {
        k += snprintf(buf + k, n - (size_t)k, " layer_windows=");
        for (uint32_t l = 0; l < c->n_layer_sliding_window && k > 0 && (size_t)k < n; l++)
            k += snprintf(buf + k, n - (size_t)k, "%s%u", l ? "," : "", c->layer_sliding_window[l]);
    }
    if (k > 0 && (size_t)k < n && c->logits_soft_cap != 0.0f)
        k += snprintf(buf + k, n - (size_t)k, " cap=%.3g", (double)c->logits_soft_cap);
    if (k > 0 && (size_t)k < n && c->n_alibi_slopes)
        k += snprintf(buf + k, n - (size_t)k, " alibi(h0=%.3g)", (double)c->alibi_slopes[0]);
    if (k > 0 && (size_t)k < n && c->n_sinks)
        k += snprintf(buf + k, n - (size_t)k, " sinks(h0=%.3g)", (double)c->sinks[0]);
    if (k > 0 && (size_t)k < n && c->scale != 0.0f)
        snprintf(buf + k, n - (size_t)k, " scale=%.4g", (double)c->scale);
    return buf;
}

void att_rig_note_id(att_rig_t *r, uint64_t id) {
    for (uint32_t i = 0; i < r->num_ids; i++)
        if (r->ids[i] == id)
            return;
    TU_CHECK(r->num_ids < ATT_RIG_MAX_SEQS, "rig: too many sequence ids");
    r->ids[r->num_ids++] = id;
}

void att_rig_init(att_rig_t *r, const att_model_cfg_t *cfg, uint64_t kv_capacity_tokens,
                  const att_cpu_cfg_t *bes, uint32_t num_bes, uint64_t seed) {
    att_rig_init_with(r, cfg, kv_capacity_tokens, bes, num_bes, NULL, 0, seed);
}

void att_rig_init_with(att_rig_t *r, const att_model_cfg_t *cfg, uint64_t kv_capacity_tokens,
                       const att_cpu_cfg_t *bes, uint32_t num_bes, att_backend_t *const *extra,
                       uint32_t num_extra, uint64_t seed) {
    memset(r, 0, sizeof *r);
    TU_CHECK(num_bes + num_extra >= 1 && num_bes + num_extra <= ATT_RIG_MAX_CTX,
             "rig: %u backends", num_bes + num_extra);
    TU_CHECK(cfg->num_layers <= ATT_RIG_MAX_LAYERS && cfg->num_query_heads <= ATT_RIG_MAX_HEADS,
             "rig: model too large for the rig");
    r->cfg = *cfg;
    if (cfg->n_layer_sliding_window != 0) {
        memcpy(r->windows, cfg->layer_sliding_window,
               cfg->n_layer_sliding_window * sizeof r->windows[0]);
        r->cfg.layer_sliding_window = r->windows;
    }
    if (cfg->n_alibi_slopes != 0) {
        memcpy(r->alibi, cfg->alibi_slopes, cfg->n_alibi_slopes * sizeof r->alibi[0]);
        r->cfg.alibi_slopes = r->alibi;
    }
    if (cfg->n_sinks != 0) {
        memcpy(r->sinks, cfg->sinks, cfg->n_sinks * sizeof r->sinks[0]);
        r->cfg.sinks = r->sinks;
    }
    r->kv_capacity_tokens = kv_capacity_tokens;
    r->block_size = cfg->block_size != 0 ? cfg->block_size : 16u;
    tu_rng_seed(&r->rng, seed);
    att_rig_tolerance(cfg->dtype, &r->tol_abs, &r->tol_rel);
    for (uint32_t b = 0; b < num_bes; b++) {
        if (!att_cpu_isa_supported(bes[b].isa)) {
            static int said; /* once per program: the CPU does not change */
            if (!said++)
                printf("note: this CPU cannot run the %s kernels; their cases are skipped\n",
                       att_cpu_isa_name(bes[b].isa));
            continue;
        }
        uint32_t i = r->num_ctx;
        at_diag_t diag = {{0}};
        r->be_cfg[i] = bes[b];
        at_err_t e = att_cpu_create(&bes[b], &r->be[i]);
        TU_CHECK(e == AT_OK, "att_cpu_create: %s", at_err_name(e));
        e = att_ctx_create(r->be[i], &r->cfg, kv_capacity_tokens, &diag, &r->ctx[i]);
        TU_CHECK(e == AT_OK, "att_ctx_create: %s (%s)", at_err_name(e), diag.msg);
        r->num_ctx++;
        const att_model_t *m = att_ctx_model(r->ctx[i]);
        TU_CHECK(m != NULL && m->block_size == r->block_size, "att_ctx_model block size");
    }
    for (uint32_t b = 0; b < num_extra; b++) {
        uint32_t i = r->num_ctx;
        at_diag_t diag = {{0}};
        r->be[i] = extra[b];
        r->be_borrowed[i] = 1;
        at_err_t e = att_ctx_create(r->be[i], &r->cfg, kv_capacity_tokens, &diag, &r->ctx[i]);
        TU_CHECK(e == AT_OK, "att_ctx_create on %s: %s (%s)", extra[b]->ops->name,
                 at_err_name(e), diag.msg);
        r->num_ctx++;
    }
    r->oracle = att_oracle_create(&r->cfg);
    TU_CHECK(r->oracle != NULL, "att_oracle_create");
}

void att_rig_fini(att_rig_t *r) {
    for (uint32_t i = 0; i < r->num_ctx; i++) {
        att_ctx_destroy(&r->ctx[i]);
        TU_CHECK(r->ctx[i] == NULL, "att_ctx_destroy must clear the pointer");
        if (!r->be_borrowed[i])
            att_backend_destroy(&r->be[i]);
        r->be[i] = NULL;
    }
    att_oracle_destroy(&r->oracle);
    r->num_ctx = 0;
}

uint32_t att_rig_tokens(const att_chunk_t *chunks, uint32_t n) {
    uint32_t t = 0;
    for (uint32_t i = 0; i < n; i++)
        t += chunks[i].num_tokens;
    return t;
}

static void *random_tensor(att_rig_t *r, size_t count, float range) {
    att_dtype_t dt = r->cfg.dtype;
    void *p = tu_xmalloc(count * att_dtype_bytes(dt));
    for (size_t i = 0; i < count; i++)
        att_store(dt, p, i, tu_rng_float(&r->rng, -range, range));
    return p;
}

void *att_rig_random_q(att_rig_t *r, uint32_t t) {
    return random_tensor(r, (size_t)t * r->cfg.num_query_heads * r->cfg.head_dim,
                         ATT_RIG_QK_RANGE);
}

void *att_rig_random_kv(att_rig_t *r, uint32_t t, float range) {
    return random_tensor(r, (size_t)t * r->cfg.num_kv_heads * r->cfg.head_dim, range);
}

static size_t q_bytes(const att_rig_t *r, uint32_t t) {
    return (size_t)t * r->cfg.num_query_heads * r->cfg.head_dim * att_dtype_bytes(r->cfg.dtype);
}

static size_t kv_bytes(const att_rig_t *r, uint32_t t) {
    return (size_t)t * r->cfg.num_kv_heads * r->cfg.head_dim * att_dtype_bytes(r->cfg.dtype);
}

att_call_t att_rig_call(const att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                        const void *q, const void *k, const void *v, void *out) {
    uint32_t t = att_rig_tokens(chunks, n);
    att_call_t c = {
        .layer = layer,
        .chunks = chunks,
        .num_chunks = n,
        .q = q,
        .q_bytes = q != NULL ? q_bytes(r, t) : 0,
        .k = k,
        .k_bytes = kv_bytes(r, t),
        .v = v,
        .v_bytes = kv_bytes(r, t),
        .out = out,
        .out_bytes = out != NULL ? q_bytes(r, t) : 0,
    };
    return c;
}

static const char *ctx_label(const att_rig_t *r, uint32_t i, char *buf, size_t n) {
    if (r->be_borrowed[i]) {
        snprintf(buf, n, "ctx %u (%s backend)", i, r->be[i]->ops->name);
        return buf;
    }
    snprintf(buf, n, "ctx %u (%s, %u threads, tile_rows %u)", i, att_cpu_isa(r->be[i]),
             r->be_cfg[i].num_threads, r->be_cfg[i].tile_rows);
    return buf;
}

void att_rig_compare(const att_rig_t *r, uint32_t ctx_index, uint32_t layer,
                     const att_chunk_t *chunks, uint32_t n, const void *out, const double *ref) {
    const uint32_t hq = r->cfg.num_query_heads, d = r->cfg.head_dim;
    uint32_t bad = 0, worst_c = 0, worst_t = 0, worst_h = 0, worst_x = 0;
    double worst_excess = -1.0, worst_got = 0.0, worst_ref = 0.0;
    size_t tok = 0;
    for (uint32_t c = 0; c < n; c++) {
        for (uint32_t t = 0; t < chunks[c].num_tokens; t++, tok++)
            for (uint32_t h = 0; h < hq; h++)
                for (uint32_t x = 0; x < d; x++) {
                    size_t i = (tok * hq + h) * d + x;
                    double got = att_oracle_decode(r->cfg.dtype, out, i);
                    double want = ref[i];
                    double tol = r->tol_abs + r->tol_rel * fabs(want);
                    double err = fabs(got - want);
                    if (!(err <= tol)) { /* also catches NaN */
                        double excess = isnan(err) ? INFINITY : err / tol;
                        bad++;
                        if (excess > worst_excess) {
                            worst_excess = excess;
                            worst_c = c;
                            worst_t = t;
                            worst_h = h;
                            worst_x = x;
                            worst_got = got;
                            worst_ref = want;
                        }
                    }
                }
    }
    if (bad != 0) {
        char lb[96];
        TU_CHECK(bad == 0,
                 "%s layer %u: %u elements out of tolerance (abs %g + rel %g); worst: chunk %u "
                 "(seq 0x%" PRIx64 ", start_pos %u, n %u) token %u (position %u) head %u dim %u:"
                 " got %.9g, oracle %.9g (%.3gx the tolerance)",
                 ctx_label(r, ctx_index, lb, sizeof lb), layer, bad, r->tol_abs, r->tol_rel,
                 worst_c, chunks[worst_c].seq_id, chunks[worst_c].start_pos,
                 chunks[worst_c].num_tokens, worst_t, chunks[worst_c].start_pos + worst_t,
                 worst_h, worst_x, worst_got, worst_ref, worst_excess);
    }
}

void att_rig_attend_with(att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                         const void *q, const void *k, const void *v, void **out_each) {
    const uint32_t t = att_rig_tokens(chunks, n);
    const size_t ob = q_bytes(r, t);
    for (uint32_t c = 0; c < n; c++)
        att_rig_note_id(r, chunks[c].seq_id);
    double *ref = tu_xcalloc((size_t)t * r->cfg.num_query_heads * r->cfg.head_dim, sizeof *ref);
    at_err_t e = att_oracle_run(r->oracle, layer, chunks, n, q, k, v, ref);
    TU_CHECK(e == AT_OK, "oracle rejected a call the test meant to be valid: %s", at_err_name(e));
    for (uint32_t i = 0; i < r->num_ctx; i++) {
        char lb[96];
        at_diag_t diag = {{0}};
        void *out = tu_xmalloc(ob);
        memset(out, 0xff, ob); /* NaN in every dtype: an element never written shows up */
        att_call_t call = att_rig_call(r, layer, chunks, n, q, k, v, out);
        e = att_ctx_attend(r->ctx[i], &call, &diag);
        TU_CHECK(e == AT_OK, "%s: att_ctx_attend layer %u, %u chunks: %s (%s)",
                 ctx_label(r, i, lb, sizeof lb), layer, n, at_err_name(e), diag.msg);
        att_rig_compare(r, i, layer, chunks, n, out, ref);
        if (out_each != NULL)
            out_each[i] = out;
        else
            free(out);
    }
    free(ref);
    att_rig_check_cache(r);
}

void att_rig_attend(att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n) {
    uint32_t t = att_rig_tokens(chunks, n);
    void *q = att_rig_random_q(r, t);
    void *k = att_rig_random_kv(r, t, ATT_RIG_QK_RANGE);
    void *v = att_rig_random_kv(r, t, ATT_RIG_V_RANGE);
    att_rig_attend_with(r, layer, chunks, n, q, k, v, NULL);
    free(q);
    free(k);
    free(v);
}

void att_rig_attend_layers(att_rig_t *r, const att_chunk_t *chunks, uint32_t n) {
    for (uint32_t l = 0; l < r->cfg.num_layers; l++)
        att_rig_attend(r, l, chunks, n);
}

void att_rig_append(att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n) {
    uint32_t t = att_rig_tokens(chunks, n);
    void *k = att_rig_random_kv(r, t, ATT_RIG_QK_RANGE);
    void *v = att_rig_random_kv(r, t, ATT_RIG_V_RANGE);
    for (uint32_t c = 0; c < n; c++)
        att_rig_note_id(r, chunks[c].seq_id);
    at_err_t e = att_oracle_run(r->oracle, layer, chunks, n, NULL, k, v, NULL);
    TU_CHECK(e == AT_OK, "oracle rejected an append the test meant to be valid: %s",
             at_err_name(e));
    for (uint32_t i = 0; i < r->num_ctx; i++) {
        at_diag_t diag = {{0}};
        att_call_t call = att_rig_call(r, layer, chunks, n, NULL, k, v, NULL);
        e = att_ctx_append(r->ctx[i], &call, &diag);
        TU_CHECK(e == AT_OK, "ctx %u: att_ctx_append layer %u: %s (%s)", i, layer,
                 at_err_name(e), diag.msg);
    }
    free(k);
    free(v);
    att_rig_check_cache(r);
}

void att_rig_release(att_rig_t *r, const uint64_t *ids, uint32_t n, uint32_t expect_released) {
    for (uint32_t i = 0; i < n; i++)
        att_oracle_release(r->oracle, ids[i]);
    for (uint32_t i = 0; i < r->num_ctx; i++) {
        uint32_t released = 0xdeadu;
        att_ctx_release(r->ctx[i], ids, n, &released);
        TU_CHECK(released == expect_released, "ctx %u: att_ctx_release released %u, want %u", i,
                 released, expect_released);
    }
    att_rig_check_cache(r);
}

void att_rig_check_cache(att_rig_t *r) {
    const uint32_t layers = r->cfg.num_layers, bs = r->block_size;
    const size_t row = (size_t)r->cfg.num_kv_heads * r->cfg.head_dim;
    uint64_t want_used = 0;
    for (uint32_t s = 0; s < r->num_ids; s++) {
        uint32_t m = att_oracle_seq_max_len(r->oracle, r->ids[s]);
        want_used += (uint64_t)((m + bs - 1) / bs) * bs;
    }
    const uint64_t want_cap = (r->kv_capacity_tokens + bs - 1) / bs * bs;
    for (uint32_t i = 0; i < r->num_ctx; i++) {
        att_ctx_info_t info;
        memset(&info, 0xab, sizeof info);
        att_ctx_get_info(r->ctx[i], &info);
        TU_CHECK(info.kv_capacity_tokens == want_cap, "ctx %u: capacity %" PRIu64 ", want %" PRIu64,
                 i, info.kv_capacity_tokens, want_cap);
        TU_CHECK(info.num_sequences == att_oracle_num_seqs(r->oracle),
                 "ctx %u: num_sequences %u, want %u", i, info.num_sequences,
                 att_oracle_num_seqs(r->oracle));
        TU_CHECK(info.kv_used_tokens == want_used,
                 "ctx %u: kv_used_tokens %" PRIu64 ", want %" PRIu64
                 " (sum of ceil(max length / %u) blocks)",
                 i, info.kv_used_tokens, want_used, bs);
        for (uint32_t s = 0; s < r->num_ids; s++) {
            const uint64_t id = r->ids[s];
            for (uint32_t l = 0; l < layers; l++) {
                int64_t want = att_oracle_seq_len(r->oracle, id, l);
                uint32_t len = 0xdeadbeefu;
                at_err_t e = att_ctx_seq_len(r->ctx[i], id, l, &len);
                if (want < 0) {
                    TU_CHECK(e == AT_ERR_KV_NO_SEQ,
                             "ctx %u: seq 0x%" PRIx64 " layer %u: seq_len gave %s, want KV_NO_SEQ",
                             i, id, l, at_err_name(e));
                    continue;
                }
                TU_CHECK(e == AT_OK && len == (uint32_t)want,
                         "ctx %u: seq 0x%" PRIx64 " layer %u: seq_len %s %u, want %" PRId64, i, id,
                         l, at_err_name(e), len, want);
                if (len == 0)
                    continue;
                size_t nb = (size_t)len * row * att_dtype_bytes(r->cfg.dtype);
                void *kb = tu_xmalloc(nb), *vb = tu_xmalloc(nb);
                e = att_ctx_read_kv(r->ctx[i], id, l, 0, len, kb, vb);
                TU_CHECK(e == AT_OK, "ctx %u: read_kv seq 0x%" PRIx64 " layer %u: %s", i, id, l,
                         at_err_name(e));
                for (uint32_t p = 0; p < len; p++) {
                    const double *ok = att_oracle_k_row(r->oracle, id, l, p);
                    const double *ov = att_oracle_v_row(r->oracle, id, l, p);
                    for (size_t x = 0; x < row; x++) {
                        double gk = att_oracle_decode(r->cfg.dtype, kb, (size_t)p * row + x);
                        double gv = att_oracle_decode(r->cfg.dtype, vb, (size_t)p * row + x);
                        if (gk != ok[x] || gv != ov[x])
                            TU_CHECK(gk == ok[x] && gv == ov[x],
                                     "ctx %u: cached kv of seq 0x%" PRIx64
                                     " layer %u position %u element %zu: k %.9g v %.9g, "
                                     "written k %.9g v %.9g",
                                     i, id, l, p, x, gk, gv, ok[x], ov[x]);
                    }
                }
                free(kb);
                free(vb);
                /* One row past the end is out of range. */
                void *one = tu_xmalloc(row * att_dtype_bytes(r->cfg.dtype));
                void *two = tu_xmalloc(row * att_dtype_bytes(r->cfg.dtype));
                e = att_ctx_read_kv(r->ctx[i], id, l, len, 1, one, two);
                TU_CHECK(e == AT_ERR_KV_PAST_END,
                         "ctx %u: read_kv past the end of seq 0x%" PRIx64 " layer %u: %s", i,
                         id, l, at_err_name(e));
                free(one);
                free(two);
            }
        }
    }
}

typedef struct snap_seq {
    at_err_t err[ATT_RIG_MAX_LAYERS];
    uint32_t len[ATT_RIG_MAX_LAYERS];
    void *k[ATT_RIG_MAX_LAYERS];
    void *v[ATT_RIG_MAX_LAYERS];
} snap_seq_t;

struct att_rig_snap {
    att_ctx_info_t info;
    uint32_t num_ids;
    uint64_t ids[ATT_RIG_MAX_SEQS];
    snap_seq_t seqs[ATT_RIG_MAX_SEQS];
};

static size_t rows_bytes(const att_rig_t *r, uint32_t n) {
    return (size_t)n * r->cfg.num_kv_heads * r->cfg.head_dim * att_dtype_bytes(r->cfg.dtype);
}

att_rig_snap_t *att_rig_snapshot(const att_rig_t *r, uint32_t ctx_index) {
    att_rig_snap_t *s = tu_xcalloc(1, sizeof *s);
    const att_ctx_t *ctx = r->ctx[ctx_index];
    att_ctx_get_info(ctx, &s->info);
    s->num_ids = r->num_ids;
    memcpy(s->ids, r->ids, sizeof s->ids);
    for (uint32_t i = 0; i < r->num_ids; i++)
        for (uint32_t l = 0; l < r->cfg.num_layers; l++) {
            snap_seq_t *q = &s->seqs[i];
            q->err[l] = att_ctx_seq_len(ctx, r->ids[i], l, &q->len[l]);
            if (q->err[l] != AT_OK || q->len[l] == 0)
                continue;
            q->k[l] = tu_xmalloc(rows_bytes(r, q->len[l]));
            q->v[l] = tu_xmalloc(rows_bytes(r, q->len[l]));
            at_err_t e = att_ctx_read_kv(ctx, r->ids[i], l, 0, q->len[l], q->k[l], q->v[l]);
            TU_CHECK(e == AT_OK, "snapshot read_kv: %s", at_err_name(e));
        }
    return s;
}

void att_rig_snapshot_check(const att_rig_t *r, uint32_t ctx_index, const att_rig_snap_t *s,
                            const char *what) {
    const att_ctx_t *ctx = r->ctx[ctx_index];
    att_ctx_info_t info;
    att_ctx_get_info(ctx, &info);
    TU_CHECK(info.kv_capacity_tokens == s->info.kv_capacity_tokens &&
                 info.kv_used_tokens == s->info.kv_used_tokens &&
                 info.num_sequences == s->info.num_sequences,
             "%s: ctx %u info changed: used %" PRIu64 " -> %" PRIu64 ", sequences %u -> %u", what,
             ctx_index, s->info.kv_used_tokens, info.kv_used_tokens, s->info.num_sequences,
             info.num_sequences);
    for (uint32_t i = 0; i < s->num_ids; i++)
        for (uint32_t l = 0; l < r->cfg.num_layers; l++) {
            const snap_seq_t *q = &s->seqs[i];
            uint32_t len = 0;
            at_err_t e = att_ctx_seq_len(ctx, s->ids[i], l, &len);
            TU_CHECK(e == q->err[l] && (e != AT_OK || len == q->len[l]),
                     "%s: ctx %u seq 0x%" PRIx64 " layer %u: seq_len %s %u, before %s %u", what,
                     ctx_index, s->ids[i], l, at_err_name(e), len, at_err_name(q->err[l]),
                     q->len[l]);
            if (q->k[l] == NULL)
                continue;
            size_t nb = rows_bytes(r, q->len[l]);
            void *k = tu_xmalloc(nb), *v = tu_xmalloc(nb);
            e = att_ctx_read_kv(ctx, s->ids[i], l, 0, q->len[l], k, v);
            TU_CHECK(e == AT_OK, "%s: read_kv: %s", what, at_err_name(e));
            TU_CHECK(memcmp(k, q->k[l], nb) == 0 && memcmp(v, q->v[l], nb) == 0,
                     "%s: ctx %u seq 0x%" PRIx64 " layer %u: cached k/v bytes changed", what,
                     ctx_index, s->ids[i], l);
            free(k);
            free(v);
        }
}

void att_rig_snapshot_free(att_rig_snap_t **ps) {
    if (ps == NULL || *ps == NULL)
        return;
    att_rig_snap_t *s = *ps;
    for (uint32_t i = 0; i < s->num_ids; i++)
        for (uint32_t l = 0; l < ATT_RIG_MAX_LAYERS; l++) {
            free(s->seqs[i].k[l]);
            free(s->seqs[i].v[l]);
        }
    free(s);
    *ps = NULL;
}

/* The attention operation of one model session (see att_ctx.h).
 *
 * Order of a call: validate the call (nothing depends on the cache), begin the kvc transaction
 * (positions and capacity; nothing changed on failure), run the backend, then commit; a backend
 * failure aborts the transaction so lengths and block tables are as before.
 * Thread: none of its own; one caller at a time. */
#include "attention/att_ctx.h"

#include <stdlib.h>
#include <string.h>

#include "cache/kvc.h"

struct att_ctx {
    att_backend_t *be;         /* borrowed: outlives the context */
    att_model_t *model;        /* owned */
    kvc_t *kvc;                /* owned */
    att_kv_t *kv;              /* owned, on be */
    uint32_t num_blocks;
    att_batch_chunk_t *chunks; /* [cap_chunks] per-run scratch */
    att_chunk_t *spans;        /* [cap_chunks] per-run scratch: the spans of merged calls */
    uint32_t cap_chunks;
    uint64_t runs;             /* backend runs that succeeded */
};

at_err_t att_ctx_create(att_backend_t *be, const att_model_cfg_t *cfg, uint64_t kv_capacity_tokens,
                        at_diag_t *diag, att_ctx_t **out) {
    att_model_t *model = NULL;
    at_err_t e = att_model_create(cfg, diag, &model);
    if (e != AT_OK)
        return e;
    uint64_t blocks = kv_capacity_tokens / model->block_size +
                      (kv_capacity_tokens % model->block_size != 0); /* no overflow near 2^64 */
    if (kv_capacity_tokens == 0 || blocks > UINT32_MAX - 1) {
        e = at_diag_set(diag, AT_ERR_KV_CAPACITY,
                        "kv_capacity_tokens: expected 1 to %llu, got %llu",
                        (unsigned long long)(UINT32_MAX - 1) * model->block_size,
                        (unsigned long long)kv_capacity_tokens);
        goto out_model;
    }
    att_ctx_t *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) {
        e = AT_ERR_NOMEM;
        goto out_model;
    }
    ctx->be = be;
    ctx->model = model;
    ctx->num_blocks = (uint32_t)blocks;
    kvc_cfg_t kc = {model->num_layers, model->block_size, ctx->num_blocks};
    if ((e = kvc_create(&kc, &ctx->kvc)) != AT_OK)
        goto out_ctx;
    at_diag_t bd = {{0}};
    if ((e = be->ops->kv_create(be, model, ctx->num_blocks, &ctx->kv, &bd)) != AT_OK) {
        if (bd.msg[0] != '\0')
            at_diag_set(diag, e, "%s: %s", be->ops->name, bd.msg);
        else
            at_diag_set(diag, e, "kv storage of %u blocks could not be allocated on %s",
                        ctx->num_blocks, be->ops->name);
        goto out_ctx;
    }
    *out = ctx;
    return AT_OK;
out_ctx:
    att_ctx_destroy(&ctx);
    return e;
out_model:
    att_model_destroy(&model);
    return e;
}

void att_ctx_destroy(att_ctx_t **ctxp) {
    if (ctxp == NULL || *ctxp == NULL)
        return;
    att_ctx_t *ctx = *ctxp;
    if (ctx->kv != NULL)
        ctx->be->ops->kv_destroy(ctx->be, &ctx->kv);
    kvc_destroy(&ctx->kvc);
    att_model_destroy(&ctx->model);
    free(ctx->chunks);
    free(ctx->spans);
    free(ctx);
    *ctxp = NULL;
}

const att_model_t *att_ctx_model(const att_ctx_t *ctx) { return ctx->model; }

/* Grows the per-call scratch to n chunks. */
static at_err_t reserve_chunks(att_ctx_t *ctx, uint32_t n) {
    if (n <= ctx->cap_chunks)
        return AT_OK;
    att_batch_chunk_t *p = realloc(ctx->chunks, (size_t)n * sizeof *p);
    if (p == NULL)
        return AT_ERR_NOMEM;
    ctx->chunks = p;
    att_chunk_t *sp = realloc(ctx->spans, (size_t)n * sizeof *sp);
    if (sp == NULL)
        return AT_ERR_NOMEM; /* chunks keeps its larger size; cap_chunks still bounds both */
    ctx->spans = sp;
    ctx->cap_chunks = n;
    return AT_OK;
}

/* Fills batch chunks [first, first + call->num_chunks) from a call whose spans are entries
 * [first, ...) of the begun kvc transaction. *offset counts rows in batch order. */
static void add_chunks(att_ctx_t *ctx, const att_call_t *call, int attend, uint32_t first,
                       uint32_t *offset) {
    const att_model_t *m = ctx->model;
    size_t es = att_dtype_bytes(m->dtype);
    size_t q_row = (size_t)m->num_query_heads * m->head_dim * es;
    size_t kv_row = (size_t)m->num_kv_heads * m->head_dim * es;
    uint32_t rows = 0; /* rows of this call before chunk i */
    for (uint32_t i = 0; i < call->num_chunks; i++) {
        att_batch_chunk_t *bc = &ctx->chunks[first + i];
        bc->token_offset = *offset;
        bc->start_pos = call->chunks[i].start_pos;
        bc->num_tokens = call->chunks[i].num_tokens;
        bc->blocks = kvc_append_table(ctx->kvc, first + i, &bc->num_blocks);
        kvc_append_ident(ctx->kvc, first + i, &bc->table_slot, &bc->table_stamp);
        bc->q = attend ? (const uint8_t *)call->q + rows * q_row : NULL;
        bc->out = attend ? (uint8_t *)call->out + rows * q_row : NULL;
        bc->k = (const uint8_t *)call->k + rows * kv_row;
        bc->v = (const uint8_t *)call->v + rows * kv_row;
        rows += bc->num_tokens;
        *offset += bc->num_tokens;
    }
}

/* Runs the begun transaction's batch and commits it, or aborts it when the backend fails. */
static at_err_t run_batch(att_ctx_t *ctx, uint32_t layer, uint32_t num_chunks, uint32_t tokens,
                          int attend, at_diag_t *diag) {
    att_batch_t batch = {
        .layer = layer,
        .num_chunks = num_chunks,
        .total_tokens = tokens,
        .attend = attend,
        .chunks = ctx->chunks,
    };
    at_err_t e = ctx->be->ops->run(ctx->be, ctx->kv, &batch);
    if (e != AT_OK) {
        kvc_append_abort(ctx->kvc);
        return at_diag_set(diag, e, "%s backend failed: %s", ctx->be->ops->name, at_err_str(e));
    }
    kvc_append_commit(ctx->kvc);
    ctx->runs++;
    return AT_OK;
}

static at_err_t run_call(att_ctx_t *ctx, const att_call_t *call, int attend, at_diag_t *diag) {
    uint32_t tokens = 0;
    at_err_t e = att_call_validate(ctx->model, call, attend, diag, &tokens);
    if (e != AT_OK)
        return e;
    if ((e = reserve_chunks(ctx, call->num_chunks)) != AT_OK)
        return e;
    if ((e = kvc_append_begin(ctx->kvc, call->layer, call->chunks, call->num_chunks, diag)) != AT_OK)
        return e;
    uint32_t offset = 0;
    add_chunks(ctx, call, attend, 0, &offset);
    return run_batch(ctx, call->layer, call->num_chunks, tokens, attend, diag);
}

at_err_t att_ctx_attend(att_ctx_t *ctx, const att_call_t *call, at_diag_t *diag) {
    return run_call(ctx, call, 1, diag);
}

at_err_t att_ctx_append(att_ctx_t *ctx, const att_call_t *call, at_diag_t *diag) {
    return run_call(ctx, call, 0, diag);
}

/* True when a seq_id of the valid calls appears in two of them (each call alone has none twice). */
static int seqs_repeat(const att_call_t *calls, const at_err_t *errs, uint32_t n) {
    for (uint32_t a = 0; a < n; a++)
        for (uint32_t b = a + 1; errs[a] == AT_OK && b < n; b++)
            for (uint32_t i = 0; errs[b] == AT_OK && i < calls[a].num_chunks; i++)
                for (uint32_t j = 0; j < calls[b].num_chunks; j++)
                    if (calls[a].chunks[i].seq_id == calls[b].chunks[j].seq_id)
                        return 1;
    return 0;
}

void att_ctx_run_many(att_ctx_t *ctx, const att_call_t *calls, uint32_t n, int attend,
                      at_err_t *errs, at_diag_t *diags) {
    uint32_t valid = 0, chunks = 0, tokens = 0;
    int one_layer = 1;
    for (uint32_t c = 0; c < n; c++) {
        uint32_t t = 0;
        errs[c] = att_call_validate(ctx->model, &calls[c], attend, &diags[c], &t);
        if (errs[c] != AT_OK)
            continue;
        if (valid > 0 && calls[c].layer != calls[0].layer)
            one_layer = 0;
        valid++;
        chunks += calls[c].num_chunks; /* validated: each call's chunks and tokens fit in 32 bits */
        tokens += t;
    }
    if (valid == 0)
        return;
    /* One run needs one layer, distinct sequences and room for all; otherwise the calls run one
     * at a time, in order, which gives each its own answer (a position or capacity error of one
     * call must not fail the others). */
    int merge = valid > 1 && one_layer && chunks <= UINT32_MAX / 2 && tokens <= UINT32_MAX / 2 &&
                !seqs_repeat(calls, errs, n) && reserve_chunks(ctx, chunks) == AT_OK;
    uint32_t layer = 0, k = 0;
    if (merge) {
        for (uint32_t c = 0; c < n; c++) {
            if (errs[c] != AT_OK)
                continue;
            layer = calls[c].layer;
            for (uint32_t i = 0; i < calls[c].num_chunks; i++)
                ctx->spans[k++] = calls[c].chunks[i];
        }
        merge = kvc_append_begin(ctx->kvc, layer, ctx->spans, chunks, NULL) == AT_OK;
    }
    if (!merge) {
        for (uint32_t c = 0; c < n; c++)
            if (errs[c] == AT_OK)
                errs[c] = run_call(ctx, &calls[c], attend, &diags[c]);
        return;
    }
    uint32_t first = 0, offset = 0;
    for (uint32_t c = 0; c < n; c++) {
        if (errs[c] != AT_OK)
            continue;
        add_chunks(ctx, &calls[c], attend, first, &offset);
        first += calls[c].num_chunks;
    }
    at_diag_t d = {{0}};
    at_err_t e = run_batch(ctx, layer, chunks, tokens, attend, &d);
    for (uint32_t c = 0; c < n; c++)
        if (errs[c] == AT_OK && e != AT_OK) {
            errs[c] = e;
            diags[c] = d;
        }
}

void att_ctx_release(att_ctx_t *ctx, const uint64_t *seq_ids, uint32_t n, uint32_t *released) {
    kvc_release(ctx->kvc, seq_ids, n, released);
}

at_err_t att_ctx_set_tuning(att_ctx_t *ctx, const tun_cfg_t *cfg) {
    if (ctx->be->ops->set_tuning == NULL)
        return AT_ERR_UNSUPPORTED;
    return ctx->be->ops->set_tuning(ctx->be, ctx->kv, cfg);
}

void att_ctx_get_info(const att_ctx_t *ctx, att_ctx_info_t *out) {
    kvc_stats_t st;
    kvc_get_stats(ctx->kvc, &st);
    out->kv_capacity_tokens = (uint64_t)st.num_blocks * ctx->model->block_size;
    out->kv_used_tokens = (uint64_t)st.used_blocks * ctx->model->block_size;
    out->num_sequences = st.num_sequences;
    out->backend_runs = ctx->runs;
    memset(&out->kv_stats, 0, sizeof out->kv_stats);
    if (ctx->be->ops->kv_stats != NULL)
        ctx->be->ops->kv_stats(ctx->be, ctx->kv, &out->kv_stats);
}

at_err_t att_ctx_seq_len(const att_ctx_t *ctx, uint64_t seq_id, uint32_t layer, uint32_t *len) {
    if (layer >= ctx->model->num_layers)
        return AT_ERR_CALL_LAYER;
    return kvc_seq_len(ctx->kvc, seq_id, layer, len);
}

at_err_t att_ctx_read_kv(const att_ctx_t *ctx, uint64_t seq_id, uint32_t layer, uint32_t pos,
                         uint32_t n, void *k_out, void *v_out) {
    uint32_t len = 0, num_blocks = 0;
    at_err_t e = att_ctx_seq_len(ctx, seq_id, layer, &len);
    if (e != AT_OK)
        return e;
    if ((uint64_t)pos + n > len)
        return AT_ERR_KV_PAST_END;
    const uint32_t *table = kvc_seq_table(ctx->kvc, seq_id, &num_blocks);
    return ctx->be->ops->read_kv(ctx->be, ctx->kv, layer, table, pos, n, k_out, v_out);
}

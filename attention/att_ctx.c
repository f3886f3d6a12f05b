/* The attention operation of one model session (see att_ctx.h).
 *
 * Order of a call: validate the call (nothing depends on the cache), begin the kvc transaction
 * (positions and capacity; nothing changed on failure), run the backend, then commit; a backend
 * failure aborts the transaction so lengths and block tables are as before.
 * Thread: none of its own; one caller at a time. */
#include "attention/att_ctx.h"

#include <stdlib.h>

#include "cache/kvc.h"

struct att_ctx {
    att_backend_t *be;         /* borrowed: outlives the context */
    att_model_t *model;        /* owned */
    kvc_t *kvc;                /* owned */
    att_kv_t *kv;              /* owned, on be */
    uint32_t num_blocks;
    att_batch_chunk_t *chunks; /* [cap_chunks] per-call scratch */
    uint32_t cap_chunks;
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
    if ((e = be->ops->kv_create(be, model, ctx->num_blocks, &ctx->kv)) != AT_OK) {
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
    free(ctx);
    *ctxp = NULL;
}

const att_model_t *att_ctx_model(const att_ctx_t *ctx) { return ctx->model; }

static at_err_t run_call(att_ctx_t *ctx, const att_call_t *call, int with_q_out, at_diag_t *diag) {
    uint32_t tokens = 0;
    at_err_t e = att_call_validate(ctx->model, call, with_q_out, diag, &tokens);
    if (e != AT_OK)
        return e;
    if (call->num_chunks > ctx->cap_chunks) {
        att_batch_chunk_t *p = realloc(ctx->chunks, (size_t)call->num_chunks * sizeof *p);
        if (p == NULL)
            return AT_ERR_NOMEM;
        ctx->chunks = p;
        ctx->cap_chunks = call->num_chunks;
    }
    if ((e = kvc_append_begin(ctx->kvc, call->layer, call->chunks, call->num_chunks, diag)) != AT_OK)
        return e;
    uint32_t offset = 0;
    for (uint32_t i = 0; i < call->num_chunks; i++) {
        att_batch_chunk_t *bc = &ctx->chunks[i];
        bc->token_offset = offset;
        bc->start_pos = call->chunks[i].start_pos;
        bc->num_tokens = call->chunks[i].num_tokens;
        bc->blocks = kvc_append_table(ctx->kvc, i, &bc->num_blocks);
        offset += bc->num_tokens;
    }
    att_batch_t batch = {
        .layer = call->layer,
        .num_chunks = call->num_chunks,
        .total_tokens = tokens,
        .chunks = ctx->chunks,
        .q = with_q_out ? call->q : NULL,
        .k = call->k,
        .v = call->v,
        .out = with_q_out ? call->out : NULL,
    };
    e = ctx->be->ops->run(ctx->be, ctx->kv, &batch);
    if (e != AT_OK) {
        kvc_append_abort(ctx->kvc);
        return at_diag_set(diag, e, "%s backend failed: %s", ctx->be->ops->name, at_err_str(e));
    }
    kvc_append_commit(ctx->kvc);
    return AT_OK;
}

at_err_t att_ctx_attend(att_ctx_t *ctx, const att_call_t *call, at_diag_t *diag) {
    return run_call(ctx, call, 1, diag);
}

at_err_t att_ctx_append(att_ctx_t *ctx, const att_call_t *call, at_diag_t *diag) {
    return run_call(ctx, call, 0, diag);
}

void att_ctx_release(att_ctx_t *ctx, const uint64_t *seq_ids, uint32_t n, uint32_t *released) {
    kvc_release(ctx->kvc, seq_ids, n, released);
}

void att_ctx_get_info(const att_ctx_t *ctx, att_ctx_info_t *out) {
    kvc_stats_t st;
    kvc_get_stats(ctx->kvc, &st);
    out->kv_capacity_tokens = (uint64_t)st.num_blocks * ctx->model->block_size;
    out->kv_used_tokens = (uint64_t)st.used_blocks * ctx->model->block_size;
    out->num_sequences = st.num_sequences;
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

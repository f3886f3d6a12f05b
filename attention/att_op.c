/* Call validation: everything that does not depend on the cache's state. Any thread. */
#include "attention/att_op.h"

#include <stdlib.h>

/* Above this many chunks, duplicates are found by sorting a copy instead of comparing pairs. */
#define PAIRWISE_MAX 64u

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static at_err_t find_duplicate(const att_call_t *c, at_diag_t *d) {
    if (c->num_chunks <= PAIRWISE_MAX) {
        for (uint32_t i = 1; i < c->num_chunks; i++)
            for (uint32_t j = 0; j < i; j++)
                if (c->chunks[i].seq_id == c->chunks[j].seq_id)
                    return at_diag_set(d, AT_ERR_CALL_DUP_SEQ,
                                       "chunks[%u].seq_id: %llu already appears in chunks[%u]", i,
                                       (unsigned long long)c->chunks[i].seq_id, j);
        return AT_OK;
    }
    uint64_t *ids = malloc((size_t)c->num_chunks * sizeof *ids);
    if (ids == NULL)
        return AT_ERR_NOMEM;
    for (uint32_t i = 0; i < c->num_chunks; i++)
        ids[i] = c->chunks[i].seq_id;
    qsort(ids, c->num_chunks, sizeof *ids, cmp_u64);
    at_err_t e = AT_OK;
    for (uint32_t i = 1; i < c->num_chunks && e == AT_OK; i++)
        if (ids[i] == ids[i - 1])
            e = at_diag_set(d, AT_ERR_CALL_DUP_SEQ, "chunks: seq_id %llu appears more than once",
                            (unsigned long long)ids[i]);
    free(ids);
    return e;
}

static at_err_t check_bytes(at_diag_t *d, at_err_t code, const char *name, size_t got,
                            uint64_t tokens, uint64_t row_bytes, uint32_t heads, uint32_t dim) {
    uint64_t want = tokens * row_bytes;
    if (got == want)
        return AT_OK;
    return at_diag_set(d, code, "%s: expected %llu bytes ([%llu tokens, %u heads, %u dims]), got %zu",
                       name, (unsigned long long)want, (unsigned long long)tokens, heads, dim, got);
}

at_err_t att_call_validate(const att_model_t *m, const att_call_t *c, int with_q_out,
                           at_diag_t *diag, uint32_t *total_tokens) {
    if (c->layer >= m->num_layers)
        return at_diag_set(diag, AT_ERR_CALL_LAYER, "layer: expected < %u, got %u", m->num_layers,
                           c->layer);
    if (c->num_chunks == 0 || c->chunks == NULL)
        return at_diag_set(diag, AT_ERR_CALL_NO_CHUNKS, "chunks: expected at least one, got 0");
    uint64_t tokens = 0;
    for (uint32_t i = 0; i < c->num_chunks; i++) {
        const att_chunk_t *ch = &c->chunks[i];
        if (ch->num_tokens == 0)
            return at_diag_set(diag, AT_ERR_CALL_EMPTY_CHUNK,
                               "chunks[%u].num_tokens: expected >= 1, got 0", i);
        if ((uint64_t)ch->start_pos + ch->num_tokens > ATT_MAX_POSITION)
            return at_diag_set(diag, AT_ERR_CALL_POSITION,
                               "chunks[%u]: start_pos %u + num_tokens %u exceeds %u", i,
                               ch->start_pos, ch->num_tokens, ATT_MAX_POSITION);
        tokens += ch->num_tokens;
    }
    if (tokens > ATT_MAX_POSITION)
        return at_diag_set(diag, AT_ERR_CALL_POSITION, "chunks: %llu tokens in all exceeds %u",
                           (unsigned long long)tokens, ATT_MAX_POSITION);
    at_err_t e = find_duplicate(c, diag);
    if (e != AT_OK)
        return e;
    uint64_t q_row = att_model_row_bytes(m, m->num_query_heads);
    uint64_t kv_row = att_model_row_bytes(m, m->num_kv_heads);
    if (with_q_out && c->q == NULL)
        return at_diag_set(diag, AT_ERR_CALL_Q_BYTES, "q: missing");
    if (with_q_out && (e = check_bytes(diag, AT_ERR_CALL_Q_BYTES, "q", c->q_bytes, tokens, q_row,
                                       m->num_query_heads, m->head_dim)) != AT_OK)
        return e;
    if (c->k == NULL)
        return at_diag_set(diag, AT_ERR_CALL_K_BYTES, "k: missing");
    if ((e = check_bytes(diag, AT_ERR_CALL_K_BYTES, "k", c->k_bytes, tokens, kv_row,
                         m->num_kv_heads, m->head_dim)) != AT_OK)
        return e;
    if (c->v == NULL)
        return at_diag_set(diag, AT_ERR_CALL_V_BYTES, "v: missing");
    if ((e = check_bytes(diag, AT_ERR_CALL_V_BYTES, "v", c->v_bytes, tokens, kv_row,
                         m->num_kv_heads, m->head_dim)) != AT_OK)
        return e;
    if (with_q_out && c->out == NULL)
        return at_diag_set(diag, AT_ERR_CALL_OUT_BYTES, "out: missing");
    if (with_q_out && (e = check_bytes(diag, AT_ERR_CALL_OUT_BYTES, "out", c->out_bytes, tokens,
                                       q_row, m->num_query_heads, m->head_dim)) != AT_OK)
        return e;
    if (total_tokens != NULL)
        *total_tokens = (uint32_t)tokens;
    return AT_OK;
}

/* The attention operation of one model session: its model, its paged KV cache (kvc bookkeeping
 * plus the backend's storage) and the backend it runs on.
 *
 * A call either completes or changes nothing: every check (shapes, byte lengths, positions, a
 * seq_id twice, capacity) happens before the first write.
 * Thread: not thread-safe; the owner runs one session's calls one at a time, in arrival order. */
#ifndef AT_ATTENTION_ATT_CTX_H
#define AT_ATTENTION_ATT_CTX_H

#include <stdint.h>

#include "attention/att_backend.h"
#include "attention/att_model.h"
#include "attention/att_op.h"
#include "common/at_err.h"

typedef struct att_ctx att_ctx_t;

typedef struct att_ctx_info {
    uint64_t kv_capacity_tokens; /* whole blocks: num_blocks * block_size */
    uint64_t kv_used_tokens;     /* blocks in use * block_size */
    uint32_t num_sequences;
    uint64_t backend_runs;       /* backend runs that succeeded; merged calls share one */
    att_kv_stats_t kv_stats;     /* launch cache and compile figures (zeros on the CPU) */
} att_ctx_info_t;

/* Validates cfg (AT_ERR_MODEL_*), rounds kv_capacity_tokens up to whole blocks (AT_ERR_KV_CAPACITY
 * if 0 or too many blocks), allocates the KV storage on be (AT_ERR_NOMEM, AT_ERR_DEVICE). be is
 * borrowed and must outlive the context. diag may be NULL. On success *out is the caller's. */
at_err_t att_ctx_create(att_backend_t *be, const att_model_cfg_t *cfg, uint64_t kv_capacity_tokens,
                        at_diag_t *diag, att_ctx_t **out);

/* Frees *ctx and its KV storage (NULL allowed), sets *ctx to NULL. */
void att_ctx_destroy(att_ctx_t **ctx);

/* The session's resolved model; borrowed for the context's lifetime. */
const att_model_t *att_ctx_model(const att_ctx_t *ctx);

/* Runs one call (see att_op.h). Errors: the AT_ERR_CALL_* codes, AT_ERR_KV_PAST_END,
 * AT_ERR_KV_FULL, AT_ERR_NOMEM, AT_ERR_DEVICE; on any error the cache is as before the call and
 * out is unspecified. diag (may be NULL) gets the detail. */
at_err_t att_ctx_attend(att_ctx_t *ctx, const att_call_t *call, at_diag_t *diag);

/* Like att_ctx_attend, but only writes k and v (q and out are ignored): importing a prefix's KV,
 * or filling a cache for a benchmark. */
at_err_t att_ctx_append(att_ctx_t *ctx, const att_call_t *call, at_diag_t *diag);

/* Runs n calls (attend = 1: as att_ctx_attend; 0: as att_ctx_append), each answered in errs[i]
 * and diags[i] exactly as if the calls had run one at a time in order, but as one backend run
 * when they can share it: every valid call on the same layer, no seq_id in two calls, and room
 * for all. Otherwise the valid calls run one at a time. A backend failure of a shared run fails
 * each of its calls with the cache as before. Used by dynamic batching: calls of one session
 * that queued up together. calls, errs and diags are [n]; diags may not be NULL. */
void att_ctx_run_many(att_ctx_t *ctx, const att_call_t *calls, uint32_t n, int attend,
                      at_err_t *errs, at_diag_t *diags);

/* Frees the named sequences in every layer; unknown ids are skipped. *released may be NULL. */
void att_ctx_release(att_ctx_t *ctx, const uint64_t *seq_ids, uint32_t n, uint32_t *released);

void att_ctx_get_info(const att_ctx_t *ctx, att_ctx_info_t *out);

/* Runs the context's later calls with cfg, a config of its backend's tuning space (NULL: the
 * backend's heuristic). AT_ERR_UNSUPPORTED when the backend has no knobs, AT_ERR_CONFIG when cfg
 * does not fit the model. */
at_err_t att_ctx_set_tuning(att_ctx_t *ctx, const tun_cfg_t *cfg);

/* Length of a sequence at layer: AT_ERR_KV_NO_SEQ if it is not cached, AT_ERR_CALL_LAYER. */
at_err_t att_ctx_seq_len(const att_ctx_t *ctx, uint64_t seq_id, uint32_t layer, uint32_t *len);

/* Copies n cached k and v rows of a sequence at layer from position pos, each [n, Hkv, D] in the
 * model's dtype. AT_ERR_KV_NO_SEQ, AT_ERR_CALL_LAYER, AT_ERR_KV_PAST_END (pos + n beyond the
 * length). */
at_err_t att_ctx_read_kv(const att_ctx_t *ctx, uint64_t seq_id, uint32_t layer, uint32_t pos,
                         uint32_t n, void *k_out, void *v_out);

#endif

/* One attention call: a layer, a list of chunks, and the q/k/v/out tensors.
 *
 * For each chunk (seq_id, start_pos, n): the sequence's cache at that layer is cut to start_pos
 * tokens, the n new keys/values are written at start_pos..start_pos+n-1, and each new query at
 * position i attends causally to cached keys j <= i (and i - j < window). Tensors are row-major,
 * little-endian, in the model's dtype, tokens in chunk order:
 * q and out [T, Hq, D], k and v [T, Hkv, D], T = sum of n. */
#ifndef AT_ATTENTION_ATT_OP_H
#define AT_ATTENTION_ATT_OP_H

#include <stddef.h>
#include <stdint.h>

#include "attention/att_model.h"
#include "cache/kvc.h"
#include "common/at_err.h"

/* A chunk is exactly a span of one sequence's positions in the KV cache. */
typedef kvc_span_t att_chunk_t;

typedef struct att_call {
    uint32_t layer;
    const att_chunk_t *chunks; /* borrowed for the call; [num_chunks] */
    uint32_t num_chunks;
    const void *q;             /* borrowed for the call; [T, Hq, D]; may be NULL for append-only */
    size_t q_bytes;
    const void *k;             /* borrowed for the call; [T, Hkv, D] */
    size_t k_bytes;
    const void *v;             /* borrowed for the call; [T, Hkv, D] */
    size_t v_bytes;
    void *out;                 /* borrowed for the call; [T, Hq, D]; may be NULL for append-only */
    size_t out_bytes;
} att_call_t;

/* Checks everything about a call that does not depend on the cache's state: layer range, chunk
 * list, duplicate seq_ids, position overflow and every tensor's byte length. with_q_out = 0 skips
 * the q and out checks (append-only). Returns the AT_ERR_CALL_* code of the first problem and fills
 * diag (may be NULL), or AT_OK. On success *total_tokens (may be NULL) holds T. Changes nothing;
 * any thread. Uses no heap memory unless num_chunks is large (then AT_ERR_NOMEM is possible). */
at_err_t att_call_validate(const att_model_t *m, const att_call_t *c, int with_q_out,
                           at_diag_t *diag, uint32_t *total_tokens);

#endif

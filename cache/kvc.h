/* Paged KV cache bookkeeping of one model session: the block pool, one block table per sequence
 * shared by all layers, and per-layer lengths.
 *
 * kvc owns no KV bytes: it hands out block numbers into storage that a backend owns (host memory
 * for the CPU backend, device memory for GPU backends). A sequence holds
 * ceil(max over layers of its length / block_size) blocks.
 *
 * An append is a transaction: kvc_append_begin checks every span and reserves blocks, and either
 * fails having changed nothing, or succeeds and must be followed by exactly one
 * kvc_append_commit (lengths updated, blocks no longer needed returned) or kvc_append_abort
 * (everything as before begin). Thread: not thread-safe; the owner serializes calls. */
#ifndef AT_CACHE_KVC_H
#define AT_CACHE_KVC_H

#include <stdint.h>

#include "common/at_err.h"

typedef struct kvc kvc_t;

typedef struct kvc_span {
    uint64_t seq_id;
    uint32_t start_pos; /* tokens kept before the new ones; at most the current length */
    uint32_t num_tokens;
} kvc_span_t;

typedef struct kvc_cfg {
    uint32_t num_layers;
    uint32_t block_size; /* tokens per block */
    uint32_t num_blocks; /* pool size */
} kvc_cfg_t;

typedef struct kvc_stats {
    uint32_t num_blocks;
    uint32_t used_blocks;
    uint32_t num_sequences;
} kvc_stats_t;

/* AT_ERR_NOMEM or AT_ERR_INTERNAL (a zero field); on success *out is the caller's (kvc_destroy). */
at_err_t kvc_create(const kvc_cfg_t *cfg, kvc_t **out);
/* Frees *c (NULL allowed), sets *c to NULL. */
void kvc_destroy(kvc_t **c);

/* Begins an append of n spans at layer. Errors, with nothing changed: AT_ERR_KV_PAST_END (a
 * start_pos beyond the sequence's length at that layer; unknown sequences have length 0),
 * AT_ERR_KV_FULL (not enough free blocks for all spans together), AT_ERR_NOMEM. diag may be
 * NULL. spans are borrowed until commit or abort; seq_ids must be distinct (the caller checked). */
at_err_t kvc_append_begin(kvc_t *c, uint32_t layer, const kvc_span_t *spans, uint32_t n,
                          at_diag_t *diag);

/* Between begin and commit/abort: span i's block table, covering at least start_pos+num_tokens
 * tokens. Borrowed until commit or abort. *num_blocks receives its length. */
const uint32_t *kvc_append_table(const kvc_t *c, uint32_t i, uint32_t *num_blocks);

/* Between begin and commit/abort: the identity of span i's block table, for a consumer that keeps
 * a copy of it (a GPU backend's device-resident tables). *slot: the sequence's index among the
 * cached ones (below their count; it changes only when another sequence is released). *stamp:
 * never 0, unique in c's lifetime, renewed whenever an entry of the table changes other than by
 * appending (a new sequence, a shorter table). A copy made under (slot, stamp) stays a prefix of
 * the table as long as a later call reports the same pair. */
void kvc_append_ident(const kvc_t *c, uint32_t i, uint32_t *slot, uint64_t *stamp);

/* Makes the begun append permanent: each span's layer length becomes start_pos + num_tokens. */
void kvc_append_commit(kvc_t *c);

/* Undoes the begun append: new sequences and new blocks are gone, lengths as before. */
void kvc_append_abort(kvc_t *c);

/* Frees the sequences among ids (in every layer); unknown ids and repeats are skipped.
 * *released (may be NULL) counts the sequences freed. */
void kvc_release(kvc_t *c, const uint64_t *ids, uint32_t n, uint32_t *released);

/* Length at layer of sequence id: AT_ERR_KV_NO_SEQ when the sequence is not cached. */
at_err_t kvc_seq_len(const kvc_t *c, uint64_t id, uint32_t layer, uint32_t *len);

/* The block table of a cached sequence, or NULL. Borrowed until the next change to c. */
const uint32_t *kvc_seq_table(const kvc_t *c, uint64_t id, uint32_t *num_blocks);

void kvc_get_stats(const kvc_t *c, kvc_stats_t *out);

#endif

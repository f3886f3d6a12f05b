/* A slow double-precision reference of the attention op (attention/att_op.h), written for the
 * tests and meant to be obviously correct rather than fast.
 *
 * It keeps its own history of k and v per (sequence, layer), as the dtype's values decoded
 * exactly to double, and applies the op's semantics literally: for each chunk, cut the history
 * to start_pos, append the chunk's rows, then for each new query at position i and each query
 * head h (reading KV head h / (Hq / Hkv)) take every cached j <= i with i - j < window:
 *   s = scale * (q . k);  s = cap * tanh(s / cap) with a soft cap;  s += slope_h * (j - i) with
 *   ALiBi;  out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink_h)) (the sink term only with
 * sinks). All arithmetic in double with libm's exp and tanh.
 *
 * Thread: one thread per oracle. */
#ifndef AT_TESTS_ATTENTION_ATT_ORACLE_H
#define AT_TESTS_ATTENTION_ATT_ORACLE_H

#include <stddef.h>
#include <stdint.h>

#include "attention/att_model.h"
#include "attention/att_op.h"
#include "common/at_err.h"

typedef struct att_oracle att_oracle_t;

/* Builds an oracle for a valid cfg (the caller checked it), resolving defaults itself: scale 0
 * means 1/sqrt(head_dim) (in double), layer_sliding_window replaces sliding_window when given.
 * Copies cfg's arrays. Returns NULL when out of memory. */
att_oracle_t *att_oracle_create(const att_model_cfg_t *cfg);

/* Frees *o (NULL allowed) and sets *o to NULL. */
void att_oracle_destroy(att_oracle_t **o);

/* Applies one call with chunks[n] at layer. q, k, v are in the model's dtype and layout
 * (att_op.h). q == NULL means append only (out is then not written). out: [T, Hq, D] doubles.
 * Returns AT_ERR_KV_PAST_END, having changed nothing, when a start_pos is beyond its sequence's
 * length at that layer; AT_ERR_NOMEM; otherwise AT_OK. The other call checks are the caller's. */
at_err_t att_oracle_run(att_oracle_t *o, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                        const void *q, const void *k, const void *v, double *out);

/* Forgets a sequence in every layer; unknown ids are ignored. Returns 1 if it was known. */
int att_oracle_release(att_oracle_t *o, uint64_t seq_id);

/* Length of a sequence at layer, or -1 when the sequence is not known. */
int64_t att_oracle_seq_len(const att_oracle_t *o, uint64_t seq_id, uint32_t layer);

/* Largest length over all layers; 0 for an unknown sequence. */
uint32_t att_oracle_seq_max_len(const att_oracle_t *o, uint64_t seq_id);

uint32_t att_oracle_num_seqs(const att_oracle_t *o);

/* The cached k or v row [Hkv, D] of a sequence at layer and pos (pos < length), or NULL. Borrowed
 * until the next run or release. */
const double *att_oracle_k_row(const att_oracle_t *o, uint64_t seq_id, uint32_t layer,
                               uint32_t pos);
const double *att_oracle_v_row(const att_oracle_t *o, uint64_t seq_id, uint32_t layer,
                               uint32_t pos);

/* Element i of a tensor of dtype t, decoded exactly (tests/attention/att_ref_dtype.h). */
double att_oracle_decode(att_dtype_t t, const void *p, size_t i);

#endif

/* The calls attnd-bench makes: packed AttendRequests for each workload, the Append requests that
 * fill a session's cache first, and the KV capacity that takes.
 *
 * Each caller of a session has a slot of sequences of its own, so that concurrent calls are
 * independent steps, as several engines' would be (and the server may batch them): slot s holds
 * the decode sequences s*(batch+1) .. s*(batch+1)+batch-1 and the prefill sequence
 * s*(batch+1)+batch. Every call writes at start_pos = ctx, so the server cuts each sequence back
 * to ctx and appends again: repeated calls are identical, and the cache stays at ctx + the
 * call's tokens. */
#ifndef AT_BENCH_AB_WORK_H
#define AT_BENCH_AB_WORK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bench/ab_opts.h"
#include "bench/ab_preset.h"

/* Bytes owned by whoever holds the struct: ab_buf_fini. */
typedef struct ab_buf {
    uint8_t *p;
    size_t n;   /* bytes in use */
    size_t cap; /* bytes allocated at p (ab_work_append reuses them) */
} ab_buf_t;

void ab_buf_fini(ab_buf_t *b);

/* The workload's shape: the same for every session. */
typedef struct ab_shape {
    uint32_t ctx;   /* tokens cached per sequence before each call */
    uint32_t batch; /* decode sequences per call */
    uint32_t chunk; /* prefill tokens per call */
} ab_shape_t;

/* New tokens (query rows) in one call of w. */
uint32_t ab_work_tokens(ab_workload_t w, const ab_shape_t *s);

/* The work one call asks for: the sum over its new tokens of the keys each attends to
 * (causal, windows ignored), i.e. about tokens x context. Tenants' shares are counted in it. */
double ab_work_cost(ab_workload_t w, const ab_shape_t *s);

/* The first sequence id of slot. */
uint64_t ab_work_slot_first(const ab_shape_t *s, uint32_t slot);

/* Response payload bytes of one successful call of w on model m (the out tensor). */
size_t ab_work_out_bytes(const ab_model_t *m, ab_workload_t w, const ab_shape_t *s);

/* The KV capacity (tokens) a session with slots caller slots needs for their decode and/or
 * prefill sequences, with one spare block per sequence. */
uint64_t ab_work_capacity_tokens(const ab_model_t *m, const ab_shape_t *s, uint32_t slots,
                                 bool decode, bool prefill);

/* Packs one call of w for slot of session on layer: random q, k, v in the model's dtype (seeded
 * by layer, so every session gets the same payload). Returns 0 and *out, or -1 (out of
 * memory). */
int ab_work_request(const ab_model_t *m, ab_workload_t w, const ab_shape_t *s, const char *session,
                    uint32_t slot, uint32_t layer, ab_buf_t *out);

/* Random values for the k and v of Appends of up to max_tokens tokens of model m: made once and
 * sent by every Append of a fill (their values do not matter to a benchmark; making 16 MB of
 * them for each Append made the fill client-bound). Returns 0 and *out, or -1 (out of memory). */
int ab_work_fill_payload(const ab_model_t *m, size_t max_tokens, ab_buf_t *out);

/* Packs into *out (its storage reused, grown when needed) an Append of tokens [pos, pos + n)
 * for the sequences [first, first + count) of session on layer, no q, with k and v both taken
 * from payload (ab_work_fill_payload for at least count * n tokens). Returns 0, or -1 (out of
 * memory). */
int ab_work_append(const ab_model_t *m, const char *session, uint32_t layer, uint64_t first,
                   uint32_t count, uint32_t pos, uint32_t n, const ab_buf_t *payload,
                   ab_buf_t *out);

#endif

/* Requests of attnd-bench's workloads (see ab_work.h).
 *
 * Thread model: no shared state; the main thread builds every request before the callers start,
 * and the callers only read them. */
#include "bench/ab_work.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

void ab_buf_fini(ab_buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Packs rq into *out, reusing its storage when it is large enough. */
static int pack_into(const Attnd__V1__AttendRequest *rq, ab_buf_t *out) {
    size_t n = protobuf_c_message_get_packed_size(&rq->base);
    if (out->cap < n + 1) {
        uint8_t *p = realloc(out->p, n + 1);
        if (p == NULL)
            return -1;
        out->p = p;
        out->cap = n + 1;
    }
    out->n = protobuf_c_message_pack(&rq->base, out->p);
    return 0;
}

uint32_t ab_work_tokens(ab_workload_t w, const ab_shape_t *s) {
    switch (w) {
    case AB_DECODE: return s->batch;
    case AB_PREFILL: return s->chunk;
    case AB_MIXED: return s->batch + s->chunk;
    }
    return 0;
}

double ab_work_cost(ab_workload_t w, const ab_shape_t *s) {
    double decode = (double)s->batch * ((double)s->ctx + 1);
    double prefill = (double)s->chunk * s->ctx + (double)s->chunk * ((double)s->chunk + 1) / 2;
    switch (w) {
    case AB_DECODE: return decode;
    case AB_PREFILL: return prefill;
    case AB_MIXED: return decode + prefill;
    }
    return 0;
}

uint64_t ab_work_slot_first(const ab_shape_t *s, uint32_t slot) {
    return (uint64_t)slot * ((uint64_t)s->batch + 1);
}

size_t ab_work_out_bytes(const ab_model_t *m, ab_workload_t w, const ab_shape_t *s) {
    return (size_t)ab_work_tokens(w, s) * m->cfg.num_query_heads * m->cfg.head_dim *
           ab_model_elem_bytes(m);
}

uint64_t ab_work_capacity_tokens(const ab_model_t *m, const ab_shape_t *s, uint32_t slots,
                                 bool decode, bool prefill) {
    uint64_t bs = m->cfg.block_size != 0 ? m->cfg.block_size : 16;
    uint64_t per_decode = ((uint64_t)s->ctx + 1 + bs - 1) / bs + 1;
    uint64_t per_prefill = ((uint64_t)s->ctx + s->chunk + bs - 1) / bs + 1;
    uint64_t blocks = (decode ? per_decode * s->batch : 0) + (prefill ? per_prefill : 0);
    return blocks * bs * slots;
}

/* Random values in [-1, 1) as the dtype's bits: a sign, an exponent for [0.25, 1), a random
 * mantissa. */
static void fill_random(uint8_t *p, size_t n_elems, size_t elem_bytes, int dtype, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n_elems; i++) {
        x = x * 1664525u + 1013904223u;
        uint32_t sign = x >> 31, e = (x >> 30) & 1u;
        if (elem_bytes == 4) {
            uint32_t f = (sign << 31) | ((125u + e) << 23) | (x & 0x7fffffu);
            memcpy(p + i * 4, &f, 4);
        } else {
            uint16_t h = dtype == ATTND__V1__DTYPE__F16
                             ? (uint16_t)((sign << 15) | ((13u + e) << 10) | ((x >> 8) & 0x3ffu))
                             : (uint16_t)((sign << 15) | ((125u + e) << 7) | ((x >> 16) & 0x7fu));
            memcpy(p + i * 2, &h, 2);
        }
    }
}

/* Packs into *out an AttendRequest of session's chunks (borrowed) on layer with q, k and v
 * (borrowed; q may be empty). Returns 0, or -1 (out of memory). */
static int pack_request(const char *session, uint32_t layer, Attnd__V1__SequenceChunk *chunks,
                        size_t n_chunks, ProtobufCBinaryData q, ProtobufCBinaryData k,
                        ProtobufCBinaryData v, ab_buf_t *out) {
    Attnd__V1__SequenceChunk **ptrs = calloc(n_chunks, sizeof *ptrs);
    if (ptrs == NULL)
        return -1;
    for (size_t i = 0; i < n_chunks; i++)
        ptrs[i] = &chunks[i];
    Attnd__V1__AttendRequest rq = ATTND__V1__ATTEND_REQUEST__INIT;
    rq.session = (char *)session;
    rq.layer = layer;
    rq.n_chunks = n_chunks;
    rq.chunks = ptrs;
    rq.q = q;
    rq.k = k;
    rq.v = v;
    int rc = pack_into(&rq, out);
    free(ptrs);
    return rc;
}

int ab_work_request(const ab_model_t *m, ab_workload_t w, const ab_shape_t *s, const char *session,
                    uint32_t slot, uint32_t layer, ab_buf_t *out) {
    size_t n = w == AB_PREFILL ? 1 : s->batch + (w == AB_MIXED ? 1 : 0);
    size_t tokens = ab_work_tokens(w, s), eb = ab_model_elem_bytes(m);
    size_t q_elems = tokens * m->cfg.num_query_heads * m->cfg.head_dim;
    size_t kv_elems = tokens * m->cfg.num_kv_heads * m->cfg.head_dim;
    Attnd__V1__SequenceChunk *chunks = calloc(n, sizeof *chunks);
    uint8_t *q = malloc(q_elems * eb + 1), *k = malloc(kv_elems * eb + 1);
    uint8_t *v = malloc(kv_elems * eb + 1);
    int rc = -1;
    if (chunks != NULL && q != NULL && k != NULL && v != NULL) {
        for (size_t i = 0; i < n; i++) {
            attnd__v1__sequence_chunk__init(&chunks[i]);
            bool prefill = w == AB_PREFILL || (w == AB_MIXED && i == n - 1);
            chunks[i].seq_id = ab_work_slot_first(s, slot) + (prefill ? s->batch : i);
            chunks[i].start_pos = s->ctx;
            chunks[i].num_tokens = prefill ? s->chunk : 1;
        }
        /* seeded by layer: every session gets the same payload */
        fill_random(q, q_elems, eb, m->cfg.dtype, layer * 3 + 1);
        fill_random(k, kv_elems, eb, m->cfg.dtype, layer * 3 + 2);
        fill_random(v, kv_elems, eb, m->cfg.dtype, layer * 3 + 3);
        rc = pack_request(session, layer, chunks, n, (ProtobufCBinaryData){q_elems * eb, q},
                          (ProtobufCBinaryData){kv_elems * eb, k},
                          (ProtobufCBinaryData){kv_elems * eb, v}, out);
    }
    free(chunks);
    free(q);
    free(k);
    free(v);
    return rc;
}

int ab_work_fill_payload(const ab_model_t *m, size_t max_tokens, ab_buf_t *out) {
    size_t elems = max_tokens * m->cfg.num_kv_heads * m->cfg.head_dim;
    ab_buf_fini(out);
    out->p = malloc(elems * ab_model_elem_bytes(m) + 1);
    if (out->p == NULL)
        return -1;
    out->n = out->cap = elems * ab_model_elem_bytes(m);
    fill_random(out->p, elems, ab_model_elem_bytes(m), m->cfg.dtype, 7);
    return 0;
}

int ab_work_append(const ab_model_t *m, const char *session, uint32_t layer, uint64_t first,
                   uint32_t count, uint32_t pos, uint32_t n, const ab_buf_t *payload,
                   ab_buf_t *out) {
    size_t kv_bytes = (size_t)count * n * m->cfg.num_kv_heads * m->cfg.head_dim *
                      ab_model_elem_bytes(m);
    assert(kv_bytes <= payload->n);
    Attnd__V1__SequenceChunk *chunks = calloc(count, sizeof *chunks);
    if (chunks == NULL)
        return -1;
    for (uint32_t i = 0; i < count; i++) {
        attnd__v1__sequence_chunk__init(&chunks[i]);
        chunks[i].seq_id = first + i;
        chunks[i].start_pos = pos;
        chunks[i].num_tokens = n;
    }
    ProtobufCBinaryData kv = {kv_bytes, payload->p};
    int rc = pack_request(session, layer, chunks, count, (ProtobufCBinaryData){0, NULL}, kv, kv,
                          out);
    free(chunks);
    return rc;
}

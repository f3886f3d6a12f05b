/* Tests of service/svc_wire: AttendRequest parsing over segmented payloads (round trips through
 * protobuf-c's packer, hand-encoded unknown fields, duplicates and defaults, malformed input,
 * every truncation point, random mutations checked against protobuf-c's unpack) and the
 * length-delimited header against protobuf-c's packing of AttendResponse.
 *
 * Every segment is copied into its own allocation of exactly its size, so under ASan a read past
 * any segment (not only past the payload) fails the test. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnd/v1/attention.pb-c.h"
#include "service/svc_wire.h"

static uint64_t g_seed;

#define MAX_CHUNKS 64u

/* ---- a byte builder for hand-encoded messages ---- */

typedef struct buf {
    uint8_t *p;
    size_t n;
    size_t cap;
} buf_t;

static void b_bytes(buf_t *b, const void *p, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap != 0 ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        assert_non_null(q);
        b->p = q;
        b->cap = cap;
    }
    if (n != 0)
        memcpy(b->p + b->n, p, n);
    b->n += n;
}

/* v as a varint of at least min_bytes bytes (protobuf accepts zero-padded varints). */
static void b_varint_pad(buf_t *b, uint64_t v, unsigned min_bytes) {
    uint8_t tmp[10];
    unsigned n = 0;
    do {
        tmp[n++] = (uint8_t)(v & 0x7fu);
        v >>= 7;
    } while (v != 0);
    while (n < min_bytes && n < 10)
        tmp[n++] = 0;
    for (unsigned i = 0; i + 1 < n; i++)
        tmp[i] |= 0x80u;
    b_bytes(b, tmp, n);
}

static void b_varint(buf_t *b, uint64_t v) { b_varint_pad(b, v, 1); }

static void b_tag(buf_t *b, uint32_t num, unsigned wt) { b_varint(b, ((uint64_t)num << 3) | wt); }

static void b_len_field(buf_t *b, uint32_t num, const void *p, size_t n) {
    b_tag(b, num, 2);
    b_varint(b, n);
    b_bytes(b, p, n);
}

static void b_free(buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ---- segments: exact-size copies ---- */

typedef struct segs {
    svc_seg_t *v;
    uint32_t n;
    uint32_t cap;
} segs_t;

static void segs_add(segs_t *s, const uint8_t *p, size_t n, int null_if_empty) {
    if (s->n == s->cap) {
        s->cap = s->cap != 0 ? 2 * s->cap : 16;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        assert_non_null(s->v);
    }
    uint8_t *q = NULL;
    if (n != 0 || !null_if_empty) {
        q = malloc(n); /* malloc(0) too: under ASan any read from it is reported */
        assert_true(n == 0 || q != NULL);
        if (n != 0)
            memcpy(q, p, n);
    }
    s->v[s->n++] = (svc_seg_t){q, n};
}

static void segs_free(segs_t *s) {
    for (uint32_t i = 0; i < s->n; i++)
        free((void *)s->v[i].p);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int cmp_size(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* Splits data[0..len) into random segments: sometimes all tiny (0 to 3 bytes), otherwise up to
 * ~40 random cuts with 1-byte segments and empty segments sprinkled in. */
static void split(tu_rng_t *g, const uint8_t *data, size_t len, segs_t *s) {
    s->n = 0;
    if (data == NULL) /* an empty buffer never allocated: no arithmetic on NULL */
        data = (const uint8_t *)"";
    int nul = tu_rng_chance(g, 1, 2);
    if (len <= 4096 && tu_rng_chance(g, 1, 4)) {
        size_t pos = 0;
        while (pos < len) {
            size_t n = tu_rng_below(g, 4);
            if (n > len - pos)
                n = len - pos;
            segs_add(s, data + pos, n, nul);
            pos += n;
        }
        return;
    }
    size_t cuts[48];
    uint32_t nc = 0;
    uint32_t random_cuts = tu_rng_below(g, 33);
    for (uint32_t i = 0; i < random_cuts; i++)
        cuts[nc++] = len == 0 ? 0 : (size_t)(tu_rng_next(g) % (len + 1));
    for (uint32_t i = 0, ones = tu_rng_below(g, 4); i < ones && len > 1; i++) {
        size_t at = (size_t)(tu_rng_next(g) % (len - 1));
        cuts[nc++] = at;
        cuts[nc++] = at + 1;
    }
    if (tu_rng_chance(g, 1, 3))
        cuts[nc++] = 0;
    if (tu_rng_chance(g, 1, 3))
        cuts[nc++] = len;
    qsort(cuts, nc, sizeof cuts[0], cmp_size);
    size_t prev = 0;
    for (uint32_t i = 0; i < nc; i++) {
        segs_add(s, data + prev, cuts[i] - prev, nul);
        prev = cuts[i];
    }
    segs_add(s, data + prev, len - prev, nul);
}

static const char *hex(const uint8_t *p, size_t n) {
    static char out[3 * 96 + 8];
    size_t o = 0;
    for (size_t i = 0; i < n && i < 96; i++)
        o += (size_t)snprintf(out + o, sizeof out - o, "%02x ", p[i]);
    if (n > 96)
        snprintf(out + o, sizeof out - o, "...");
    return out;
}

/* ---- what a message should parse to ---- */

typedef struct expect {
    uint8_t session[160];
    size_t session_len;
    uint32_t layer;
    kvc_span_t chunks[MAX_CHUNKS];
    uint32_t num_chunks;
    svc_loc_t q, k, v; /* into the flat message */
} expect_t;

static void check_loc(const segs_t *s, const uint8_t *flat, svc_loc_t got, svc_loc_t want,
                      const char *name) {
    TU_CHECK(got.len == want.len, "%s: len %" PRIu64 ", want %" PRIu64, name, got.len, want.len);
    if (want.len == 0)
        return;
    TU_CHECK(got.off == want.off, "%s: off %" PRIu64 ", want %" PRIu64, name, got.off, want.off);
    uint8_t *tmp = tu_xmalloc((size_t)got.len);
    svc_wire_copy(s->v, s->n, got, tmp);
    TU_CHECK(memcmp(tmp, flat + want.off, (size_t)want.len) == 0, "%s: copied bytes differ", name);
    free(tmp);
}

static void check_req(const svc_attend_req_t *r, const expect_t *x, const segs_t *s,
                      const uint8_t *flat) {
    TU_CHECK(strlen(r->session) == x->session_len &&
                 memcmp(r->session, x->session, x->session_len) == 0,
             "session '%s', want %zu bytes '%.*s'", r->session, x->session_len, (int)x->session_len,
             (const char *)x->session);
    TU_CHECK(r->layer == x->layer, "layer %u, want %u", r->layer, x->layer);
    TU_CHECK(r->num_chunks == x->num_chunks, "num_chunks %u, want %u", r->num_chunks,
             x->num_chunks);
    TU_CHECK(r->num_chunks <= r->cap_chunks, "num_chunks %u over cap %u", r->num_chunks,
             r->cap_chunks);
    for (uint32_t i = 0; i < x->num_chunks; i++) {
        const kvc_span_t *a = &r->chunks[i], *b = &x->chunks[i];
        TU_CHECK(a->seq_id == b->seq_id && a->start_pos == b->start_pos &&
                     a->num_tokens == b->num_tokens,
                 "chunk %u: {%" PRIu64 ", %u, %u}, want {%" PRIu64 ", %u, %u}", i, a->seq_id,
                 a->start_pos, a->num_tokens, b->seq_id, b->start_pos, b->num_tokens);
    }
    check_loc(s, flat, r->q, x->q, "q");
    check_loc(s, flat, r->k, x->k, "k");
    check_loc(s, flat, r->v, x->v, "v");
}

static void check_empty(const svc_attend_req_t *r) {
    TU_CHECK(r->session[0] == '\0' && r->layer == 0 && r->num_chunks == 0 && r->q.len == 0 &&
                 r->k.len == 0 && r->v.len == 0,
             "request not empty after an error");
}

/* protobuf-c's unpack of the flat bytes agrees with r. Returns 0 when protobuf-c rejects them. */
static int pbc_agrees(const uint8_t *flat, size_t len, const svc_attend_req_t *r, const segs_t *s) {
    Attnd__V1__AttendRequest *m = attnd__v1__attend_request__unpack(NULL, len, flat);
    if (m == NULL)
        return 0;
    TU_CHECK(strcmp(m->session, r->session) == 0, "session '%s', protobuf-c '%s'", r->session,
             m->session);
    TU_CHECK(m->layer == r->layer, "layer %u, protobuf-c %u", r->layer, m->layer);
    TU_CHECK(m->n_chunks == r->num_chunks, "num_chunks %u, protobuf-c %zu", r->num_chunks,
             m->n_chunks);
    for (uint32_t i = 0; i < r->num_chunks; i++)
        TU_CHECK(m->chunks[i]->seq_id == r->chunks[i].seq_id &&
                     m->chunks[i]->start_pos == r->chunks[i].start_pos &&
                     m->chunks[i]->num_tokens == r->chunks[i].num_tokens,
                 "chunk %u differs from protobuf-c's", i);
    const ProtobufCBinaryData *pb[3] = {&m->q, &m->k, &m->v};
    const svc_loc_t *loc[3] = {&r->q, &r->k, &r->v};
    for (int j = 0; j < 3; j++) {
        TU_CHECK(pb[j]->len == loc[j]->len, "bytes field %d: len %" PRIu64 ", protobuf-c %zu",
                 4 + j, loc[j]->len, pb[j]->len);
        if (pb[j]->len != 0) {
            uint8_t *tmp = tu_xmalloc(pb[j]->len);
            svc_wire_copy(s->v, s->n, *loc[j], tmp);
            TU_CHECK(memcmp(tmp, pb[j]->data, pb[j]->len) == 0,
                     "bytes field %d differs from protobuf-c's", 4 + j);
            free(tmp);
        }
    }
    attnd__v1__attend_request__free_unpacked(m, NULL);
    return 1;
}

/* ---- random values ---- */

/* Random with a random bit width, so that every varint length shows up. */
static uint64_t rand_width(tu_rng_t *g, unsigned max_bits) {
    unsigned bits = tu_rng_below(g, max_bits + 1);
    if (bits == 0)
        return 0;
    uint64_t v = tu_rng_next(g);
    return bits == 64 ? v : v & ((1ull << bits) - 1);
}

static const char name_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/-";

static void rand_name(tu_rng_t *g, char *out, size_t len) {
    for (size_t i = 0; i < len; i++)
        out[i] = name_chars[tu_rng_below(g, sizeof name_chars - 1)];
    out[len] = '\0';
}

static void rand_fill(tu_rng_t *g, uint8_t *p, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = tu_rng_next(g);
        memcpy(p + i, &v, 8);
    }
    uint64_t v = tu_rng_next(g);
    for (; i < n; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

/* ---- random hand-encoded messages: any order, duplicates, unknown fields, padded varints ---- */

static uint32_t unknown_field_number(tu_rng_t *g) {
    static const uint32_t far[] = {7, 15, 16, 100, 2047, 2048, 262143, (1u << 29) - 1};
    return tu_rng_chance(g, 1, 2) ? tu_rng_range(g, 7, 40) : far[tu_rng_below(g, 8)];
}

static void gen_unknown(tu_rng_t *g, buf_t *b, uint32_t num) {
    static const unsigned wts[] = {0, 1, 2, 5};
    unsigned wt = wts[tu_rng_below(g, 4)];
    uint8_t junk[24];
    rand_fill(g, junk, sizeof junk);
    b_tag(b, num, wt);
    switch (wt) {
    case 0: b_varint_pad(b, rand_width(g, 64), tu_rng_range(g, 1, 10)); break;
    case 1: b_bytes(b, junk, 8); break;
    case 2: {
        size_t n = tu_rng_below(g, sizeof junk + 1);
        b_varint(b, n);
        b_bytes(b, junk, n);
        break;
    }
    default: b_bytes(b, junk, 4); break;
    }
}

/* A padded varint stays within protobuf-c's limits: values up to 10 bytes. */
static void gen_value(tu_rng_t *g, buf_t *b, uint64_t v) {
    b_varint_pad(b, v, tu_rng_chance(g, 1, 8) ? tu_rng_range(g, 1, 10) : 1);
}

static void gen_chunk(tu_rng_t *g, buf_t *b, kvc_span_t *s) {
    buf_t c = {0};
    memset(s, 0, sizeof *s);
    for (uint32_t i = 0, n = tu_rng_below(g, 7); i < n; i++) {
        uint32_t kind = tu_rng_below(g, 5);
        if (kind == 0) {
            s->seq_id = rand_width(g, 64);
            b_tag(&c, 1, 0);
            gen_value(g, &c, s->seq_id);
        } else if (kind == 1 || kind == 2) {
            uint64_t v = rand_width(g, tu_rng_chance(g, 1, 6) ? 64 : 32);
            b_tag(&c, kind + 1, 0);
            gen_value(g, &c, v);
            if (kind == 1)
                s->start_pos = (uint32_t)v;
            else
                s->num_tokens = (uint32_t)v;
        } else if (kind == 3) {
            gen_unknown(g, &c, tu_rng_range(g, 4, 40));
        } else {
            s->num_tokens = (uint32_t)rand_width(g, 32);
            b_tag(&c, 3, 0);
            gen_value(g, &c, s->num_tokens);
        }
    }
    b_len_field(b, 3, c.p, c.n);
    b_free(&c);
}

/* Appends a random valid AttendRequest to b (which starts empty) and fills x. bounds[0..*nb)
 * are the offsets where a top-level field ends (0 first), chunks_at[i] the chunks before
 * bounds[i]. */
static void gen_msg(tu_rng_t *g, buf_t *b, expect_t *x, size_t *bounds, uint32_t *chunks_at,
                    uint32_t *nb, uint32_t max_fields) {
    memset(x, 0, sizeof *x);
    b->n = 0;
    *nb = 0;
    bounds[(*nb)] = 0;
    chunks_at[(*nb)++] = 0;
    for (uint32_t f = 0, nf = tu_rng_below(g, max_fields + 1); f < nf; f++) {
        uint32_t kind = tu_rng_below(g, 7);
        if (kind == 0) {
            char name[SVC_SESSION_NAME_MAX + 1];
            size_t len = tu_rng_chance(g, 1, 10) ? SVC_SESSION_NAME_MAX : tu_rng_below(g, 24);
            rand_name(g, name, len);
            b_len_field(b, 1, name, len);
            memcpy(x->session, name, len);
            x->session_len = len;
        } else if (kind == 1) {
            uint64_t v = rand_width(g, tu_rng_chance(g, 1, 6) ? 64 : 32);
            b_tag(b, 2, 0);
            gen_value(g, b, v);
            x->layer = (uint32_t)v;
        } else if (kind == 2 || kind == 3) {
            if (x->num_chunks == MAX_CHUNKS)
                continue;
            gen_chunk(g, b, &x->chunks[x->num_chunks++]);
        } else if (kind == 4 || kind == 5) {
            uint8_t data[80];
            size_t n = tu_rng_chance(g, 1, 4) ? 0 : tu_rng_below(g, sizeof data + 1);
            uint32_t num = tu_rng_range(g, 4, 6);
            rand_fill(g, data, n);
            b_len_field(b, num, data, n);
            svc_loc_t *l = num == 4 ? &x->q : num == 5 ? &x->k : &x->v;
            *l = (svc_loc_t){b->n - n, n};
        } else {
            gen_unknown(g, b, unknown_field_number(g));
        }
        bounds[*nb] = b->n;
        chunks_at[(*nb)++] = x->num_chunks;
    }
}

/* ---- round trips through protobuf-c's packer ---- */

static size_t rand_tensor_bytes(tu_rng_t *g, int big) {
    if (big)
        return tu_rng_range(g, 2u << 20, 6u << 20);
    switch (tu_rng_below(g, 4)) {
    case 0: return 0;
    case 1: return tu_rng_range(g, 1, 200);
    case 2: return tu_rng_range(g, 200, 70000);
    default:
        return tu_rng_chance(g, 1, 4) ? tu_rng_range(g, 1u << 20, 5u << 20)
                                      : tu_rng_range(g, 1, 4096);
    }
}

static void round_trip_once(tu_rng_t *g, uint32_t iter, svc_attend_req_t *r) {
    Attnd__V1__AttendRequest m = ATTND__V1__ATTEND_REQUEST__INIT;
    Attnd__V1__SequenceChunk chunk_v[50], *chunk_p[50];
    char name[SVC_SESSION_NAME_MAX + 1];
    size_t name_len = tu_rng_chance(g, 1, 8)   ? 0
                      : tu_rng_chance(g, 1, 8) ? SVC_SESSION_NAME_MAX
                                               : tu_rng_range(g, 1, SVC_SESSION_NAME_MAX);
    rand_name(g, name, name_len);
    m.session = name;
    m.layer = (uint32_t)rand_width(g, 32);
    m.n_chunks = iter == 1 ? 0 : iter == 2 ? 50 : tu_rng_below(g, 51);
    for (size_t i = 0; i < m.n_chunks; i++) {
        attnd__v1__sequence_chunk__init(&chunk_v[i]);
        chunk_v[i].seq_id = rand_width(g, 64);
        chunk_v[i].start_pos = (uint32_t)rand_width(g, 32);
        chunk_v[i].num_tokens = (uint32_t)rand_width(g, 32);
        chunk_p[i] = &chunk_v[i];
    }
    m.chunks = chunk_p;
    ProtobufCBinaryData *t[3] = {&m.q, &m.k, &m.v};
    for (int j = 0; j < 3; j++) {
        size_t n = iter == 1 ? 0 : rand_tensor_bytes(g, iter == 0 && j == 0);
        t[j]->len = n;
        t[j]->data = n != 0 ? tu_xmalloc(n) : NULL;
        rand_fill(g, t[j]->data, n);
    }
    size_t len = attnd__v1__attend_request__get_packed_size(&m);
    uint8_t *flat = tu_xmalloc(len);
    TU_CHECK(attnd__v1__attend_request__pack(&m, flat) == len, "pack size");
    segs_t s = {0};
    split(g, flat, len, &s);
    tu_where_set("seed %" PRIu64 ", round trip %u: %zu bytes in %u segments, %zu chunks, q/k/v "
                 "%zu/%zu/%zu bytes",
                 g_seed, iter, len, s.n, m.n_chunks, m.q.len, m.k.len, m.v.len);

    at_diag_t diag = {{0}};
    at_err_t e = svc_wire_parse_attend(s.v, s.n, r, &diag);
    TU_CHECK(e == AT_OK, "parse: %s (%s)", at_err_name(e), diag.msg);
    TU_CHECK(strcmp(r->session, name) == 0, "session '%s', want '%s'", r->session, name);
    TU_CHECK(r->layer == m.layer, "layer %u, want %u", r->layer, m.layer);
    TU_CHECK(r->num_chunks == m.n_chunks, "num_chunks %u, want %zu", r->num_chunks, m.n_chunks);
    for (uint32_t i = 0; i < r->num_chunks; i++)
        TU_CHECK(r->chunks[i].seq_id == chunk_v[i].seq_id &&
                     r->chunks[i].start_pos == chunk_v[i].start_pos &&
                     r->chunks[i].num_tokens == chunk_v[i].num_tokens,
                 "chunk %u differs", i);
    const svc_loc_t *loc[3] = {&r->q, &r->k, &r->v};
    for (int j = 0; j < 3; j++) {
        TU_CHECK(loc[j]->len == t[j]->len, "field %d: len %" PRIu64 ", want %zu", 4 + j,
                 loc[j]->len, t[j]->len);
        if (t[j]->len == 0)
            continue;
        uint8_t *out = tu_xmalloc(t[j]->len);
        svc_wire_copy(s.v, s.n, *loc[j], out);
        TU_CHECK(memcmp(out, t[j]->data, t[j]->len) == 0, "field %d: copied bytes differ", 4 + j);
        free(out);
    }
    segs_free(&s);
    free(flat);
    for (int j = 0; j < 3; j++)
        free(t[j]->data);
}

static void test_svc_wire_round_trips_protobuf_c_messages(void **state) {
    (void)state;
    tu_rng_t g;
    tu_rng_seed(&g, tu_sub_seed(g_seed, 1));
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    for (uint32_t iter = 0; iter < 40; iter++)
        round_trip_once(&g, iter, &r);
    svc_attend_req_fini(&r);
    TU_CHECK(r.chunks == NULL && r.cap_chunks == 0, "fini leaves the request zeroed");
    tu_where_set("seed %" PRIu64, g_seed);
}

/* Random hand-encoded messages (any order, duplicates, unknown fields, padded varints) parse to
 * what they say, and protobuf-c reads them the same way. */
static void test_svc_wire_parses_random_hand_encoded_messages(void **state) {
    (void)state;
    tu_rng_t g;
    tu_rng_seed(&g, tu_sub_seed(g_seed, 2));
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    buf_t b = {0};
    expect_t x;
    size_t bounds[64];
    uint32_t chunks_at[64], nb;
    for (uint32_t iter = 0; iter < 2000; iter++) {
        gen_msg(&g, &b, &x, bounds, chunks_at, &nb, 40);
        segs_t s = {0};
        split(&g, b.p, b.n, &s);
        tu_where_set("seed %" PRIu64 ", hand-encoded %u: %s", g_seed, iter, hex(b.p, b.n));
        at_diag_t diag = {{0}};
        at_err_t e = svc_wire_parse_attend(s.v, s.n, &r, &diag);
        TU_CHECK(e == AT_OK, "parse: %s (%s)", at_err_name(e), diag.msg);
        check_req(&r, &x, &s, b.p);
        TU_CHECK(pbc_agrees(b.p, b.n, &r, &s), "protobuf-c rejects a valid message");
        segs_free(&s);
    }
    b_free(&b);
    svc_attend_req_fini(&r);
    tu_where_set("seed %" PRIu64, g_seed);
}

/* ---- hand-encoded cases ---- */

/* Parses b over one segment and over 1-byte segments; both must give want. */
static void parse_both_ways(const buf_t *b, svc_attend_req_t *r, at_err_t want, at_diag_t *diag) {
    for (int way = 0; way < 2; way++) {
        segs_t s = {0};
        if (way == 0) {
            segs_add(&s, b->p, b->n, 1);
        } else {
            for (size_t i = 0; i < b->n; i++)
                segs_add(&s, b->p + i, 1, 1);
        }
        memset(diag, 0, sizeof *diag);
        at_err_t e = svc_wire_parse_attend(s.v, s.n, r, diag);
        TU_CHECK(e == want, "%s: %s, want %s (%s) for %s",
                 way == 0 ? "one segment" : "1-byte segments", at_err_name(e), at_err_name(want),
                 diag->msg, hex(b->p, b->n));
        if (e != AT_OK)
            check_empty(r);
        segs_free(&s);
    }
}

static void test_svc_wire_skips_unknown_fields_of_every_wire_type(void **state) {
    (void)state;
    buf_t b = {0}, c = {0};
    const uint8_t q[5] = {1, 2, 3, 4, 5};
    const uint8_t junk[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    const uint8_t tags_inside[4] = {0x0b, 0x0c, 0x0f, 0x00}; /* groups, bad wire type, field 0 */
    b_tag(&b, 7, 0);
    b_varint(&b, UINT64_MAX);
    b_len_field(&b, 1, "tenant-a/s1", 11);
    b_tag(&b, 8, 1);
    b_bytes(&b, junk, 8);
    b_tag(&b, 2, 0);
    b_varint(&b, 31);
    b_len_field(&b, 100, tags_inside, sizeof tags_inside); /* skipped, not parsed */
    /* a chunk with unknown fields of every wire type between its own */
    b_tag(&c, 9, 5);
    b_bytes(&c, junk, 4);
    b_tag(&c, 1, 0);
    b_varint(&c, 0x123456789abcull);
    b_tag(&c, 10, 2);
    b_varint(&c, 4);
    b_bytes(&c, tags_inside, 4);
    b_tag(&c, 2, 0);
    b_varint(&c, 17);
    b_tag(&c, 11, 1);
    b_bytes(&c, junk, 8);
    b_tag(&c, 3, 0);
    b_varint(&c, 5);
    b_tag(&c, (1u << 29) - 1, 0);
    b_varint(&c, 1);
    b_len_field(&b, 3, c.p, c.n);
    b_tag(&b, (1u << 29) - 1, 5);
    b_bytes(&b, junk, 4);
    b_len_field(&b, 4, q, sizeof q);
    size_t q_off = b.n - sizeof q;
    b_tag(&b, 2047, 2);
    b_varint(&b, 0);

    svc_attend_req_t r;
    svc_attend_req_init(&r);
    at_diag_t diag;
    parse_both_ways(&b, &r, AT_OK, &diag);
    assert_string_equal(r.session, "tenant-a/s1");
    assert_int_equal(r.layer, 31);
    assert_int_equal(r.num_chunks, 1);
    assert_true(r.chunks[0].seq_id == 0x123456789abcull);
    assert_int_equal(r.chunks[0].start_pos, 17);
    assert_int_equal(r.chunks[0].num_tokens, 5);
    assert_int_equal(r.q.off, q_off);
    assert_int_equal(r.q.len, sizeof q);
    assert_int_equal(r.k.len, 0);
    assert_int_equal(r.v.len, 0);
    segs_t s = {0};
    segs_add(&s, b.p, b.n, 1);
    TU_CHECK(pbc_agrees(b.p, b.n, &r, &s), "protobuf-c rejects it");
    segs_free(&s);
    svc_attend_req_fini(&r);
    b_free(&b);
    b_free(&c);
}

static void test_svc_wire_last_duplicate_wins(void **state) {
    (void)state;
    char long_name[SVC_SESSION_NAME_MAX + 2];
    memset(long_name, 'x', sizeof long_name);
    buf_t b = {0}, c = {0};
    b_len_field(&b, 1, long_name, SVC_SESSION_NAME_MAX + 1); /* too long, but overridden */
    b_len_field(&b, 1, "first", 5);
    b_tag(&b, 2, 0);
    b_varint(&b, 1);
    b_len_field(&b, 4, "aaaa", 4);
    b_len_field(&b, 1, "second", 6);
    b_tag(&b, 2, 0);
    b_varint(&b, 7);
    b_len_field(&b, 4, "bb", 2);
    b_len_field(&b, 5, "k1", 2);
    b_len_field(&b, 5, "", 0); /* an empty one wins too */
    b_tag(&c, 1, 0);
    b_varint(&c, 10);
    b_tag(&c, 3, 0);
    b_varint(&c, 4);
    b_tag(&c, 1, 0);
    b_varint(&c, 11);
    b_len_field(&b, 3, c.p, c.n);
    b_len_field(&b, 3, c.p, 2); /* a second chunk: seq_id 10 only */

    svc_attend_req_t r;
    svc_attend_req_init(&r);
    at_diag_t diag;
    parse_both_ways(&b, &r, AT_OK, &diag);
    assert_string_equal(r.session, "second");
    assert_int_equal(r.layer, 7);
    assert_int_equal(r.q.len, 2);
    assert_int_equal(r.k.len, 0);
    assert_int_equal(r.num_chunks, 2);
    assert_true(r.chunks[0].seq_id == 11 && r.chunks[0].num_tokens == 4);
    assert_true(r.chunks[1].seq_id == 10 && r.chunks[1].num_tokens == 0);
    uint8_t got[2];
    segs_t s = {0};
    segs_add(&s, b.p, b.n, 1);
    svc_wire_copy(s.v, s.n, r.q, got);
    assert_memory_equal(got, "bb", 2);
    TU_CHECK(pbc_agrees(b.p, b.n, &r, &s), "protobuf-c rejects it");
    segs_free(&s);

    /* a valid name, then one that is too long: the long one is the session */
    b_len_field(&b, 1, long_name, SVC_SESSION_NAME_MAX + 1);
    parse_both_ways(&b, &r, AT_ERR_SESSION_NAME, &diag);
    TU_CHECK(strstr(diag.msg, "129 bytes") != NULL, "diag: %s", diag.msg);
    svc_attend_req_fini(&r);
    b_free(&b);
    b_free(&c);
}

static void test_svc_wire_absent_fields_are_proto3_defaults(void **state) {
    (void)state;
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    memset(r.session, 'z', 8); /* the parse must overwrite everything */
    r.layer = 99;
    at_err_t e = svc_wire_parse_attend(NULL, 0, &r, NULL);
    assert_int_equal(e, AT_OK);
    check_empty(&r);

    /* only empty segments */
    svc_seg_t empty[3] = {{NULL, 0}, {(const uint8_t *)"", 0}, {NULL, 0}};
    assert_int_equal(svc_wire_parse_attend(empty, 3, &r, NULL), AT_OK);
    check_empty(&r);

    /* empty chunk, explicit zeros, empty bytes fields */
    buf_t b = {0};
    b_len_field(&b, 3, NULL, 0);
    b_tag(&b, 2, 0);
    b_varint(&b, 0);
    b_len_field(&b, 1, NULL, 0);
    b_len_field(&b, 6, NULL, 0);
    at_diag_t diag;
    parse_both_ways(&b, &r, AT_OK, &diag);
    assert_int_equal(r.num_chunks, 1);
    assert_true(r.chunks[0].seq_id == 0 && r.chunks[0].start_pos == 0 &&
                r.chunks[0].num_tokens == 0);
    assert_string_equal(r.session, "");
    assert_int_equal(r.layer, 0);
    assert_int_equal(r.v.len, 0);
    svc_attend_req_fini(&r);
    b_free(&b);
}

static void test_svc_wire_uint32_fields_take_the_low_32_bits(void **state) {
    (void)state;
    buf_t b = {0}, c = {0};
    b_tag(&b, 2, 0);
    b_varint(&b, 0xffffffff00000005ull); /* 10 bytes */
    b_tag(&c, 1, 0);
    b_varint(&c, UINT64_MAX);
    b_tag(&c, 2, 0);
    b_varint(&c, (1ull << 32) + 9);
    b_tag(&c, 3, 0);
    /* a 10th byte with bits past 64: dropped, as protobuf does */
    const uint8_t ten[10] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
    b_bytes(&c, ten, sizeof ten);
    b_len_field(&b, 3, c.p, c.n);
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    at_diag_t diag;
    parse_both_ways(&b, &r, AT_OK, &diag);
    assert_int_equal(r.layer, 5);
    assert_int_equal(r.num_chunks, 1);
    assert_true(r.chunks[0].seq_id == UINT64_MAX);
    assert_int_equal(r.chunks[0].start_pos, 9);
    assert_true(r.chunks[0].num_tokens == UINT32_MAX);
    segs_t s = {0};
    segs_add(&s, b.p, b.n, 1);
    TU_CHECK(pbc_agrees(b.p, b.n, &r, &s), "protobuf-c rejects it");
    segs_free(&s);
    svc_attend_req_fini(&r);
    b_free(&b);
    b_free(&c);
}

typedef struct bad_case {
    const char *what;
    uint8_t bytes[40];
    size_t n;
    at_err_t want;
    const char *diag_has; /* NULL: not checked */
} bad_case_t;

static void test_svc_wire_rejects_malformed_input(void **state) {
    (void)state;
    static const bad_case_t cases[] = {
        {"group start", {0x3b}, 1, AT_ERR_WIRE_MALFORMED, "byte 0: field 7 is a group"},
        {"group end", {0x10, 0x01, 0x3c}, 3, AT_ERR_WIRE_MALFORMED, "byte 2"},
        {"wire type 6", {0x3e, 0x00}, 2, AT_ERR_WIRE_MALFORMED, "invalid wire type 6"},
        {"wire type 7", {0x3f, 0x00}, 2, AT_ERR_WIRE_MALFORMED, "invalid wire type 7"},
        {"field number 0", {0x02, 0x00}, 2, AT_ERR_WIRE_MALFORMED, "field number 0"},
        {"field number 0, varint", {0x00, 0x00}, 2, AT_ERR_WIRE_MALFORMED, "field number 0"},
        {"field number 0, padded tag",
         {0x80, 0x00, 0x00},
         3,
         AT_ERR_WIRE_MALFORMED,
         "field number 0"},
        {"tag over 32 bits",
         {0x80, 0x80, 0x80, 0x80, 0x10, 0x00},
         6,
         AT_ERR_WIRE_MALFORMED,
         "tag 0x100000000 is over 32 bits"},
        {"6-byte tag",
         {0x88, 0x80, 0x80, 0x80, 0x80, 0x00, 0x01},
         7,
         AT_ERR_WIRE_MALFORMED,
         "tag: varint longer than 5 bytes"},
        {"11-byte varint",
         {0x10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01},
         12,
         AT_ERR_WIRE_MALFORMED,
         "byte 1: layer: varint longer than 10 bytes"},
        {"11-byte tag",
         {0x90, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00},
         11,
         AT_ERR_WIRE_MALFORMED,
         "tag: varint longer than 5 bytes"},
        {"truncated tag", {0x90}, 1, AT_ERR_WIRE_MALFORMED, "tag: varint runs past the end"},
        {"truncated varint", {0x10, 0x80}, 2, AT_ERR_WIRE_MALFORMED, "layer: varint runs past"},
        {"tag without value", {0x10}, 1, AT_ERR_WIRE_MALFORMED, NULL},
        {"length past the end",
         {0x22, 0x05, 'a', 'b'},
         4,
         AT_ERR_WIRE_MALFORMED,
         "byte 1: field 4: length 5 runs past the end (2 bytes left)"},
        {"huge length",
         {0x22, 0xff, 0xff, 0xff, 0xff, 0x0f, 'a'},
         7,
         AT_ERR_WIRE_MALFORMED,
         "length 4294967295 runs past"},
        {"6-byte length",
         {0x22, 0x81, 0x80, 0x80, 0x80, 0x80, 0x00, 'a'},
         8,
         AT_ERR_WIRE_MALFORMED,
         "byte 1: length: varint longer than 5 bytes"},
        {"truncated length", {0x0a}, 1, AT_ERR_WIRE_MALFORMED, "length: varint runs past"},
        {"truncated fixed64",
         {0x41, 1, 2, 3, 4, 5, 6, 7},
         8,
         AT_ERR_WIRE_MALFORMED,
         "8-byte value"},
        {"truncated fixed32", {0x45, 1, 2, 3}, 4, AT_ERR_WIRE_MALFORMED, "4-byte value"},
        /* a chunk of 4 bytes holding an unknown field of 5: the bytes exist in the payload (the
         * q field after it) but not in the chunk */
        {"sub-message field past its parent",
         {0x1a, 0x04, 0x22, 0x05, 'a', 'b', 0x22, 0x05, 1, 2, 3, 4, 5},
         13,
         AT_ERR_WIRE_MALFORMED,
         "chunks[0] at byte 3: field 4: length 5 runs past the end (2 bytes left)"},
        {"sub-message varint cut by its end",
         {0x1a, 0x02, 0x08, 0x80, 0x01},
         5,
         AT_ERR_WIRE_MALFORMED,
         "chunks[0] at byte 3: seq_id: varint runs past"},
        {"sub-message past the payload",
         {0x1a, 0x03, 0x08, 0x01},
         4,
         AT_ERR_WIRE_MALFORMED,
         "byte 1: field 3: length 3"},
        {"group in a chunk", {0x1a, 0x01, 0x0b}, 3, AT_ERR_WIRE_MALFORMED, "chunks[0] at byte 2"},
        {"second chunk bad", {0x1a, 0x00, 0x1a, 0x01, 0x07}, 5, AT_ERR_WIRE_MALFORMED, "chunks[1]"},
        {"layer as bytes",
         {0x12, 0x00},
         2,
         AT_ERR_WIRE_MALFORMED,
         "field 2 (layer) has wire type 2, expected 0"},
        {"q as varint", {0x20, 0x01}, 2, AT_ERR_WIRE_MALFORMED, "field 4 (q) has wire type 0"},
        {"session as fixed32", {0x0d, 0, 0, 0, 0}, 5, AT_ERR_WIRE_MALFORMED, "(session)"},
        {"chunks as varint", {0x18, 0x01}, 2, AT_ERR_WIRE_MALFORMED, "(chunks)"},
        {"seq_id as fixed64",
         {0x1a, 0x09, 0x09, 1, 2, 3, 4, 5, 6, 7, 8},
         11,
         AT_ERR_WIRE_MALFORMED,
         "(seq_id) has wire type 1"},
        {"session with a NUL",
         {0x0a, 0x03, 'a', 0x00, 'b'},
         5,
         AT_ERR_SESSION_NAME,
         "NUL byte at index 1"},
    };
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const bad_case_t *c = &cases[i];
        tu_where_set("case '%s'", c->what);
        buf_t b = {0};
        /* A filled request first: an error must leave it empty. */
        b_len_field(&b, 3, "\x08\x01", 2);
        b_len_field(&b, 1, "s", 1);
        at_diag_t diag;
        parse_both_ways(&b, &r, AT_OK, &diag);
        b.n = 0;
        b_bytes(&b, c->bytes, c->n);
        parse_both_ways(&b, &r, c->want, &diag);
        if (c->diag_has != NULL)
            TU_CHECK(strstr(diag.msg, c->diag_has) != NULL, "diag '%s' lacks '%s'", diag.msg,
                     c->diag_has);
        /* without a diag */
        svc_seg_t seg = {b.p, b.n};
        TU_CHECK(svc_wire_parse_attend(&seg, 1, &r, NULL) == c->want, "NULL diag");
        b_free(&b);
    }

    /* session lengths: 128 is fine, 129 is not */
    char name[SVC_SESSION_NAME_MAX + 1];
    memset(name, 'n', sizeof name);
    for (size_t len = SVC_SESSION_NAME_MAX; len <= SVC_SESSION_NAME_MAX + 1; len++) {
        tu_where_set("session of %zu bytes", len);
        buf_t b = {0};
        b_len_field(&b, 1, name, len);
        at_diag_t diag;
        parse_both_ways(&b, &r, len <= SVC_SESSION_NAME_MAX ? AT_OK : AT_ERR_SESSION_NAME, &diag);
        if (len <= SVC_SESSION_NAME_MAX)
            assert_int_equal(strlen(r.session), len);
        b_free(&b);
    }
    svc_attend_req_fini(&r);
    tu_where_set("seed %" PRIu64, g_seed);
}

/* A request parsed into an r that held 50 chunks keeps the capacity and nothing else. */
static void test_svc_wire_reuse_keeps_capacity_only(void **state) {
    (void)state;
    buf_t b = {0};
    for (uint32_t i = 0; i < 50; i++)
        b_len_field(&b, 3, "\x08\x07", 2);
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    svc_seg_t seg = {b.p, b.n};
    assert_int_equal(svc_wire_parse_attend(&seg, 1, &r, NULL), AT_OK);
    assert_int_equal(r.num_chunks, 50);
    uint32_t cap = r.cap_chunks;
    assert_true(cap >= 50);
    b.n = 0;
    b_tag(&b, 2, 0);
    b_varint(&b, 3);
    seg = (svc_seg_t){b.p, b.n};
    assert_int_equal(svc_wire_parse_attend(&seg, 1, &r, NULL), AT_OK);
    assert_int_equal(r.num_chunks, 0);
    assert_int_equal(r.layer, 3);
    assert_int_equal(r.cap_chunks, cap);
    svc_attend_req_fini(&r);
    b_free(&b);
}

/* Every prefix of a valid message parses when it ends at a top-level field boundary (to what
 * the fields before it say) and is WIRE_MALFORMED otherwise. */
static void test_svc_wire_every_truncation_parses_or_is_malformed(void **state) {
    (void)state;
    tu_rng_t g;
    tu_rng_seed(&g, tu_sub_seed(g_seed, 3));
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    buf_t b = {0};
    expect_t x;
    size_t bounds[64];
    uint32_t chunks_at[64], nb;
    uint32_t ok = 0, bad = 0;
    for (uint32_t iter = 0; iter < 40; iter++) {
        gen_msg(&g, &b, &x, bounds, chunks_at, &nb, 24);
        for (size_t len = 0, next = 0; len <= b.n; len++) {
            while (next < nb && bounds[next] < len)
                next++;
            int at_boundary = next < nb && bounds[next] == len;
            segs_t s = {0};
            split(&g, b.p, len, &s);
            tu_where_set("seed %" PRIu64 ", message %u cut at %zu of %zu: %s", g_seed, iter, len,
                         b.n, hex(b.p, b.n));
            at_diag_t diag = {{0}};
            at_err_t e = svc_wire_parse_attend(s.v, s.n, &r, &diag);
            if (at_boundary) {
                TU_CHECK(e == AT_OK, "%s (%s) at a field boundary", at_err_name(e), diag.msg);
                TU_CHECK(r.num_chunks == chunks_at[next], "num_chunks %u, want %u", r.num_chunks,
                         chunks_at[next]);
                ok++;
            } else {
                TU_CHECK(e == AT_ERR_WIRE_MALFORMED, "%s inside a field", at_err_name(e));
                check_empty(&r);
                bad++;
            }
            segs_free(&s);
        }
    }
    print_message("truncations: %u at field boundaries, %u inside fields\n", ok, bad);
    b_free(&b);
    svc_attend_req_fini(&r);
    tu_where_set("seed %" PRIu64, g_seed);
}

/* ---- random mutations ---- */

static void mutate(tu_rng_t *g, buf_t *b) {
    static const uint8_t interesting[] = {0x00, 0x01, 0x7f, 0x80, 0xff, 0x08, 0x0a, 0x12,
                                          0x1a, 0x22, 0x0b, 0x0c, 0x0e, 0x0f, 0x3b, 0x45};
    size_t pos = b->n == 0 ? 0 : (size_t)(tu_rng_next(g) % b->n);
    switch (tu_rng_below(g, 7)) {
    case 0:
        if (b->n != 0)
            b->p[pos] ^= (uint8_t)(1u << tu_rng_below(g, 8));
        break;
    case 1:
        if (b->n != 0)
            b->p[pos] =
                tu_rng_chance(g, 1, 2) ? interesting[tu_rng_below(g, 16)] : (uint8_t)tu_rng_next(g);
        break;
    case 2: { /* insert 1..4 bytes */
        uint8_t ins[4];
        size_t n = tu_rng_range(g, 1, 4);
        for (size_t i = 0; i < n; i++)
            ins[i] =
                tu_rng_chance(g, 1, 2) ? interesting[tu_rng_below(g, 16)] : (uint8_t)tu_rng_next(g);
        size_t at = b->n == 0 ? 0 : (size_t)(tu_rng_next(g) % (b->n + 1));
        size_t tail = b->n - at;
        b_bytes(b, ins, n); /* grows; then shift the tail */
        memmove(b->p + at + n, b->p + at, tail);
        memcpy(b->p + at, ins, n);
        break;
    }
    case 3: { /* delete 1..4 bytes */
        size_t n = tu_rng_range(g, 1, 4);
        if (pos + n > b->n)
            n = b->n - pos;
        if (n != 0)
            memmove(b->p + pos, b->p + pos + n, b->n - pos - n);
        b->n -= n;
        break;
    }
    case 4: /* truncate */ b->n = pos; break;
    case 5: /* a large varint over a few bytes */
        for (size_t i = pos, n = tu_rng_range(g, 1, 11); i < b->n && n > 0; i++, n--)
            b->p[i] = 0xff;
        break;
    default: { /* duplicate a range at the end */
        size_t n = tu_rng_below(g, 16);
        if (pos + n > b->n)
            n = b->n - pos;
        uint8_t tmp[16];
        if (n != 0)
            memcpy(tmp, b->p + pos, n);
        b_bytes(b, tmp, n);
        break;
    }
    }
}

static void test_svc_wire_random_mutations_never_crash(void **state) {
    (void)state;
    tu_rng_t g;
    tu_rng_seed(&g, tu_sub_seed(g_seed, 4));
    svc_attend_req_t r;
    svc_attend_req_init(&r);
    buf_t b = {0};
    expect_t x;
    size_t bounds[64];
    uint32_t chunks_at[64], nb;
    uint32_t n_ok = 0, n_malformed = 0, n_name = 0, n_lax = 0;
    for (uint32_t iter = 0; iter < 20000; iter++) {
        gen_msg(&g, &b, &x, bounds, chunks_at, &nb, 12);
        for (uint32_t m = 0, nm = tu_rng_range(&g, 1, 4); m < nm; m++)
            mutate(&g, &b);
        segs_t s = {0};
        split(&g, b.p, b.n, &s);
        tu_where_set("seed %" PRIu64 ", mutation %u: %s", g_seed, iter, hex(b.p, b.n));
        at_diag_t diag = {{0}};
        at_err_t e = svc_wire_parse_attend(s.v, s.n, &r, &diag);
        TU_CHECK(e == AT_OK || e == AT_ERR_WIRE_MALFORMED || e == AT_ERR_SESSION_NAME,
                 "unexpected %s (%s)", at_err_name(e), diag.msg);
        int pbc_ok;
        if (e == AT_OK) {
            n_ok++;
            TU_CHECK(strlen(r.session) <= SVC_SESSION_NAME_MAX, "session too long");
            const svc_loc_t *loc[3] = {&r.q, &r.k, &r.v};
            for (int j = 0; j < 3; j++)
                TU_CHECK(loc[j]->len <= b.n && loc[j]->off <= b.n - loc[j]->len,
                         "field %d at %" PRIu64 "+%" PRIu64 " outside %zu bytes", 4 + j,
                         loc[j]->off, loc[j]->len, b.n);
            pbc_ok = pbc_agrees(b.p, b.n, &r, &s); /* compares every field when it accepts */
        } else {
            check_empty(&r);
            n_malformed += e == AT_ERR_WIRE_MALFORMED;
            n_name += e == AT_ERR_SESSION_NAME;
            Attnd__V1__AttendRequest *m = attnd__v1__attend_request__unpack(NULL, b.n, b.p);
            pbc_ok = m != NULL; /* SESSION_NAME is no wire error: protobuf-c should accept */
            attnd__v1__attend_request__free_unpacked(m, NULL);
        }
        if (pbc_ok != (e != AT_ERR_WIRE_MALFORMED)) {
            /* protobuf-c is laxer on two field-number errors that Google's protobuf rejects
             * too: it checks only a tag's first byte for field number 0 (so a padded "80 00"
             * gets through) and drops the bits past 32 of a 5-byte tag. Nothing else may
             * differ. */
            TU_CHECK(e == AT_ERR_WIRE_MALFORMED && pbc_ok &&
                         (strstr(diag.msg, "field number 0") != NULL ||
                          strstr(diag.msg, "is over 32 bits") != NULL),
                     "protobuf-c %s, we say %s (%s): %s", pbc_ok ? "accepts" : "rejects",
                     at_err_name(e), diag.msg, hex(b.p, b.n));
            n_lax++;
        }
        segs_free(&s);
    }
    print_message("mutations: %u OK, %u WIRE_MALFORMED, %u SESSION_NAME; protobuf-c accepted %u "
                  "of ours malformed (field number 0 or over 32 bits)\n",
                  n_ok, n_malformed, n_name, n_lax);
    TU_CHECK(n_ok > 1000 && n_malformed > 1000, "the mutations missed an outcome");
    b_free(&b);
    svc_attend_req_fini(&r);
    tu_where_set("seed %" PRIu64, g_seed);
}

/* ---- svc_wire_len_header against protobuf-c's AttendResponse ---- */

/* A ProtobufCBuffer that keeps every byte except the payload's (which it never reads). */
typedef struct rec {
    ProtobufCBuffer base;
    const uint8_t *payload;
    uint8_t head[32];
    size_t head_n;
    uint64_t payload_n;
} rec_t;

static void rec_append(ProtobufCBuffer *pb, size_t len, const uint8_t *data) {
    rec_t *r = (rec_t *)pb;
    if (data == r->payload) {
        r->payload_n += len;
        return;
    }
    TU_CHECK(r->payload_n == 0 && r->head_n + len <= sizeof r->head, "unexpected append");
    memcpy(r->head + r->head_n, data, len);
    r->head_n += len;
}

static void test_svc_wire_len_header_matches_protobuf_c(void **state) {
    (void)state;
    static const uint64_t lens[] = {0,     1,       127,       128,        16383,
                                    16384, 2097152, 268435456, 4294967295, 4294967296};
    static uint8_t dummy[1];
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        uint64_t len = lens[i];
        tu_where_set("len %" PRIu64, len);
        uint8_t hdr[16];
        size_t n = svc_wire_len_header(1, len, hdr);
        Attnd__V1__AttendResponse m = ATTND__V1__ATTEND_RESPONSE__INIT;
        m.out.len = (size_t)len;
        m.out.data = dummy;
        rec_t rec = {{rec_append}, dummy, {0}, 0, 0};
        size_t packed = attnd__v1__attend_response__pack_to_buffer(&m, &rec.base);
        if (len == 0) {
            /* proto3 packers omit an empty field; the explicit "0a 00" means the same */
            TU_CHECK(packed == 0 && n == 2 && hdr[0] == 0x0a && hdr[1] == 0x00, "header %s",
                     hex(hdr, n));
        } else if (len > UINT32_MAX) {
            /* protobuf-c 1.4 writes lengths as uint32 (this one would come out as 0): compare
             * with the varint by hand */
            static const uint8_t want[] = {0x0a, 0x80, 0x80, 0x80, 0x80, 0x10};
            TU_CHECK(n == sizeof want && memcmp(hdr, want, n) == 0, "header %s", hex(hdr, n));
        } else {
            TU_CHECK(rec.payload_n == len && packed == n + len, "packed %zu", packed);
            TU_CHECK(rec.head_n == n && memcmp(rec.head, hdr, n) == 0, "header %s, protobuf-c's %s",
                     hex(hdr, n), hex(rec.head, rec.head_n));
        }
        /* header + payload decodes to the payload, by protobuf-c and as a q field by us */
        if (len <= 2097152) {
            uint8_t *msg = tu_xmalloc(n + (size_t)len);
            memcpy(msg, hdr, n);
            for (size_t j = 0; j < len; j++)
                msg[n + j] = (uint8_t)(j * 7u);
            Attnd__V1__AttendResponse *u =
                attnd__v1__attend_response__unpack(NULL, n + (size_t)len, msg);
            TU_CHECK(u != NULL && u->out.len == len &&
                         (len == 0 || memcmp(u->out.data, msg + n, (size_t)len) == 0),
                     "protobuf-c does not read it back");
            attnd__v1__attend_response__free_unpacked(u, NULL);
            uint8_t qh[16];
            size_t qn = svc_wire_len_header(4, len, qh);
            TU_CHECK(qn == n && qh[0] == 0x22 && memcmp(qh + 1, hdr + 1, n - 1) == 0,
                     "field 4 header %s", hex(qh, qn));
            memcpy(msg, qh, qn);
            svc_attend_req_t r;
            svc_attend_req_init(&r);
            svc_seg_t seg[2] = {{msg, n}, {msg + n, (size_t)len}};
            TU_CHECK(svc_wire_parse_attend(seg, 2, &r, NULL) == AT_OK && r.q.off == n &&
                         r.q.len == len,
                     "we do not read it back");
            svc_attend_req_fini(&r);
            free(msg);
        }
    }
    /* the largest field number takes a 5-byte tag */
    uint8_t hdr[16];
    size_t n = svc_wire_len_header((1u << 29) - 1, UINT64_MAX, hdr);
    static const uint8_t want[] = {0xfa, 0xff, 0xff, 0xff, 0x0f, 0xff, 0xff, 0xff,
                                   0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    TU_CHECK(n == sizeof want && memcmp(hdr, want, n) == 0, "header %s", hex(hdr, n));
    tu_where_set("seed %" PRIu64, g_seed);
}

int main(void) {
    g_seed = tu_base_seed("test_svc_wire");
    tu_where_set("seed %" PRIu64, g_seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svc_wire_round_trips_protobuf_c_messages),
        cmocka_unit_test(test_svc_wire_parses_random_hand_encoded_messages),
        cmocka_unit_test(test_svc_wire_skips_unknown_fields_of_every_wire_type),
        cmocka_unit_test(test_svc_wire_last_duplicate_wins),
        cmocka_unit_test(test_svc_wire_absent_fields_are_proto3_defaults),
        cmocka_unit_test(test_svc_wire_uint32_fields_take_the_low_32_bits),
        cmocka_unit_test(test_svc_wire_rejects_malformed_input),
        cmocka_unit_test(test_svc_wire_reuse_keeps_capacity_only),
        cmocka_unit_test(test_svc_wire_every_truncation_parses_or_is_malformed),
        cmocka_unit_test(test_svc_wire_random_mutations_never_crash),
        cmocka_unit_test(test_svc_wire_len_header_matches_protobuf_c),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

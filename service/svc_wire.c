/* Hand-written AttendRequest parser and length-delimited field header (see svc_wire.h).
 *
 * The parser reads the payload through a cursor over the segments, and every read is bounded by
 * the end of the message being parsed (the payload, or one chunk inside it), so no input can
 * make it read outside the segments or outside a sub-message. It allocates only the chunks
 * array and copies only the session name; bytes fields are recorded as locations.
 *
 * Thread: any; no shared state, no locks. */
#include "service/svc_wire.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/at_base.h"

enum {
    WT_VARINT = 0,
    WT_I64 = 1,
    WT_LEN = 2,
    WT_SGROUP = 3,
    WT_EGROUP = 4,
    WT_I32 = 5,
};

#define VARINT_MAX_BYTES 10u
/* Tags and length prefixes: 5 bytes at most, as protobuf-c and Google's C++ protobuf read them. */
#define SHORT_VARINT_MAX_BYTES 5u
#define FIELD_NUMBER_MAX ((1u << 29) - 1u)
#define CHUNKS_FIRST_CAP 8u

/* A read position in the payload: off bytes from its start, which is byte `at` of segment i
 * (at may equal that segment's size; reads move on to the next non-empty segment). */
typedef struct cur {
    const svc_seg_t *segs;
    uint32_t nseg;
    uint32_t i;
    size_t at;
    uint64_t off;
} cur_t;

/* The message being parsed, for diagnostics: the request itself, or its chunk number `chunk`. */
typedef struct where {
    int in_chunk;
    uint32_t chunk;
} where_t;

static const char *const req_fields[] = {NULL, "session", "layer", "chunks", "q", "k", "v"};
static const char *const chunk_fields[] = {NULL, "seq_id", "start_pos", "num_tokens"};

static const char *field_name(const where_t *w, uint32_t num) {
    if (w->in_chunk)
        return num < AT_ARRAY_LEN(chunk_fields) ? chunk_fields[num] : NULL;
    return num < AT_ARRAY_LEN(req_fields) ? req_fields[num] : NULL;
}

static at_err_t bad(at_diag_t *d, const where_t *w, uint64_t off, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* AT_ERR_WIRE_MALFORMED, with "AttendRequest[.chunks[i]] at byte N: <detail>" in d. */
static at_err_t bad(at_diag_t *d, const where_t *w, uint64_t off, const char *fmt, ...) {
    if (d == NULL)
        return AT_ERR_WIRE_MALFORMED;
    char detail[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    if (w->in_chunk)
        return at_diag_set(d, AT_ERR_WIRE_MALFORMED,
                           "AttendRequest.chunks[%u] at byte %" PRIu64 ": %s", w->chunk, off,
                           detail);
    return at_diag_set(d, AT_ERR_WIRE_MALFORMED, "AttendRequest at byte %" PRIu64 ": %s", off,
                       detail);
}

/* ---- the cursor: each read fails cleanly at `end` ---- */

static int read_byte(cur_t *c, uint64_t end, uint8_t *b) {
    if (c->off >= end)
        return 0;
    while (c->i < c->nseg && c->at == c->segs[c->i].n) {
        c->i++;
        c->at = 0;
    }
    if (c->i == c->nseg) /* unreachable while end <= the payload's size; kept as a fence */
        return 0;
    *b = c->segs[c->i].p[c->at++];
    c->off++;
    return 1;
}

static int skip(cur_t *c, uint64_t end, uint64_t n) {
    if (n > end - c->off)
        return 0;
    c->off += n;
    while (n > 0) {
        if (c->i == c->nseg) /* unreachable, as in read_byte */
            return 0;
        size_t left = c->segs[c->i].n - c->at;
        if (n < left) {
            c->at += (size_t)n;
            return 1;
        }
        n -= left;
        c->i++;
        c->at = 0;
    }
    return 1;
}

typedef enum rd {
    RD_OK,
    RD_TRUNCATED,
    RD_TOO_LONG,
} rd_t;

static rd_t read_varint(cur_t *c, uint64_t end, unsigned max_bytes, uint64_t *v) {
    uint64_t x = 0;
    for (unsigned n = 0; n < max_bytes; n++) {
        uint8_t b;
        if (!read_byte(c, end, &b))
            return RD_TRUNCATED;
        /* Bits past 64 in a 10th byte are dropped, as protobuf does. */
        x |= (uint64_t)(b & 0x7fu) << (7u * n);
        if ((b & 0x80u) == 0) {
            *v = x;
            return RD_OK;
        }
    }
    return RD_TOO_LONG;
}

/* ---- fields ---- */

/* A varint of at most max_bytes bytes; `what` names it in the diagnostic. */
static at_err_t varint_or_bad(cur_t *c, uint64_t end, const where_t *w, const char *what,
                              unsigned max_bytes, uint64_t *v, at_diag_t *d) {
    uint64_t at = c->off;
    rd_t rd = read_varint(c, end, max_bytes, v);
    if (rd == RD_TRUNCATED)
        return bad(d, w, at, "%s: varint runs past the end", what);
    if (rd == RD_TOO_LONG)
        return bad(d, w, at, "%s: varint longer than %u bytes", what, max_bytes);
    return AT_OK;
}

static at_err_t value_or_bad(cur_t *c, uint64_t end, const where_t *w, const char *what,
                             uint64_t *v, at_diag_t *d) {
    return varint_or_bad(c, end, w, what, VARINT_MAX_BYTES, v, d);
}

/* Reads a tag; only wire types 0, 1, 2 and 5 and field numbers from 1 get through. */
static at_err_t read_tag(cur_t *c, uint64_t end, const where_t *w, uint32_t *num, uint32_t *wt,
                         at_diag_t *d) {
    uint64_t at = c->off;
    uint64_t tag;
    at_err_t e = varint_or_bad(c, end, w, "tag", SHORT_VARINT_MAX_BYTES, &tag, d);
    if (e != AT_OK)
        return e;
    if (tag > UINT32_MAX)
        return bad(d, w, at, "tag 0x%" PRIx64 " is over 32 bits", tag);
    *num = (uint32_t)(tag >> 3);
    *wt = (uint32_t)(tag & 7u);
    if (*num == 0)
        return bad(d, w, at, "field number 0");
    if (*wt == WT_SGROUP || *wt == WT_EGROUP)
        return bad(d, w, at, "field %u is a group (wire type %u), not supported", *num, *wt);
    if (*wt != WT_VARINT && *wt != WT_I64 && *wt != WT_LEN && *wt != WT_I32)
        return bad(d, w, at, "field %u has invalid wire type %u", *num, *wt);
    return AT_OK;
}

/* A known field must come with its declared wire type, as protobuf-c requires. */
static at_err_t check_wt(const where_t *w, uint64_t at, uint32_t num, uint32_t wt, uint32_t want,
                         at_diag_t *d) {
    if (wt == want)
        return AT_OK;
    return bad(d, w, at, "field %u (%s) has wire type %u, expected %u", num, field_name(w, num), wt,
               want);
}

/* Reads a length prefix that must fit before end; *loc is where the content lies. Leaves the
 * cursor at the content's first byte. */
static at_err_t read_len(cur_t *c, uint64_t end, const where_t *w, uint32_t num, svc_loc_t *loc,
                         at_diag_t *d) {
    uint64_t at = c->off;
    uint64_t len;
    at_err_t e = varint_or_bad(c, end, w, "length", SHORT_VARINT_MAX_BYTES, &len, d);
    if (e != AT_OK)
        return e;
    if (len > end - c->off)
        return bad(d, w, at,
                   "field %u: length %" PRIu64 " runs past the end (%" PRIu64 " bytes left)", num,
                   len, end - c->off);
    loc->off = c->off;
    loc->len = len;
    return AT_OK;
}

static at_err_t read_bytes(cur_t *c, uint64_t end, const where_t *w, uint32_t num, svc_loc_t *loc,
                           at_diag_t *d) {
    at_err_t e = read_len(c, end, w, num, loc, d);
    if (e != AT_OK)
        return e;
    if (!skip(c, end, loc->len)) /* unreachable: read_len checked that it fits */
        return bad(d, w, loc->off, "field %u: content runs past the end", num);
    return AT_OK;
}

static at_err_t skip_unknown(cur_t *c, uint64_t end, const where_t *w, uint32_t num, uint32_t wt,
                             at_diag_t *d) {
    uint64_t at = c->off;
    uint64_t v = 0;
    svc_loc_t loc = {0, 0};
    switch (wt) {
    case WT_VARINT: return value_or_bad(c, end, w, "unknown field", &v, d);
    case WT_LEN: return read_bytes(c, end, w, num, &loc, d);
    case WT_I64:
        if (!skip(c, end, 8))
            return bad(d, w, at, "field %u: 8-byte value runs past the end", num);
        return AT_OK;
    case WT_I32:
        if (!skip(c, end, 4))
            return bad(d, w, at, "field %u: 4-byte value runs past the end", num);
        return AT_OK;
    default: AT_ASSERT(0 && "read_tag lets only 0, 1, 2, 5 through"); return AT_ERR_INTERNAL;
    }
}

/* Parses one SequenceChunk whose content runs from the cursor to end. */
static at_err_t parse_chunk(cur_t *c, uint64_t end, uint32_t idx, kvc_span_t *s, at_diag_t *d) {
    const where_t w = {1, idx};
    memset(s, 0, sizeof *s);
    while (c->off < end) {
        uint64_t at = c->off;
        uint32_t num, wt;
        uint64_t v = 0;
        at_err_t e = read_tag(c, end, &w, &num, &wt, d);
        if (e != AT_OK)
            return e;
        if (num >= 1 && num <= 3) {
            e = check_wt(&w, at, num, wt, WT_VARINT, d);
            if (e == AT_OK)
                e = value_or_bad(c, end, &w, chunk_fields[num], &v, d);
            if (e != AT_OK)
                return e;
            if (num == 1)
                s->seq_id = v;
            else if (num == 2)
                s->start_pos = (uint32_t)v; /* low 32 bits, as protobuf does */
            else
                s->num_tokens = (uint32_t)v;
        } else {
            e = skip_unknown(c, end, &w, num, wt, d);
            if (e != AT_OK)
                return e;
        }
    }
    return AT_OK;
}

/* A new entry at the end of r->chunks, growing the array by doubling. */
static at_err_t push_chunk(svc_attend_req_t *r, kvc_span_t **out, at_diag_t *d) {
    if (r->num_chunks == r->cap_chunks) {
        uint64_t cap = r->cap_chunks == 0 ? CHUNKS_FIRST_CAP : 2ull * r->cap_chunks;
        if (cap > UINT32_MAX)
            cap = UINT32_MAX;
        kvc_span_t *p = NULL;
        if (cap > r->cap_chunks)
            p = realloc(r->chunks, (size_t)cap * sizeof *p);
        if (p == NULL)
            return at_diag_set(d, AT_ERR_NOMEM,
                               "AttendRequest.chunks: cannot grow to %" PRIu64 " entries", cap);
        r->chunks = p;
        r->cap_chunks = (uint32_t)cap;
    }
    *out = &r->chunks[r->num_chunks++];
    return AT_OK;
}

static at_err_t parse_chunk_field(cur_t *c, uint64_t end, svc_attend_req_t *r, at_diag_t *d) {
    const where_t w = {0, 0};
    svc_loc_t loc = {0, 0};
    at_err_t e = read_len(c, end, &w, 3, &loc, d);
    if (e != AT_OK)
        return e;
    kvc_span_t *s = NULL;
    e = push_chunk(r, &s, d);
    if (e != AT_OK)
        return e;
    e = parse_chunk(c, loc.off + loc.len, r->num_chunks - 1, s, d);
    AT_ASSERT(e != AT_OK || c->off == loc.off + loc.len);
    return e;
}

/* Empty, as after init, keeping the chunks allocation for the next parse. */
static void reset(svc_attend_req_t *r) {
    kvc_span_t *chunks = r->chunks;
    uint32_t cap = r->cap_chunks;
    memset(r, 0, sizeof *r);
    r->chunks = chunks;
    r->cap_chunks = cap;
}

void svc_attend_req_init(svc_attend_req_t *r) { memset(r, 0, sizeof *r); }

void svc_attend_req_fini(svc_attend_req_t *r) {
    free(r->chunks);
    memset(r, 0, sizeof *r);
}

/* The last session given: at most SVC_SESSION_NAME_MAX bytes and no NUL, copied into r. */
static at_err_t take_session(const svc_seg_t *segs, uint32_t nseg, svc_loc_t loc,
                             svc_attend_req_t *r, at_diag_t *d) {
    if (loc.len > SVC_SESSION_NAME_MAX)
        return at_diag_set(d, AT_ERR_SESSION_NAME,
                           "session at byte %" PRIu64 ": %" PRIu64 " bytes, expected at most %u",
                           loc.off, loc.len, SVC_SESSION_NAME_MAX);
    svc_wire_copy(segs, nseg, loc, r->session);
    r->session[loc.len] = '\0';
    const char *nul = memchr(r->session, '\0', (size_t)loc.len);
    if (nul != NULL)
        return at_diag_set(d, AT_ERR_SESSION_NAME,
                           "session at byte %" PRIu64 ": NUL byte at index %td", loc.off,
                           nul - r->session);
    return AT_OK;
}

/* q, k or v for field 4, 5 or 6. */
static svc_loc_t *bytes_field(svc_attend_req_t *r, uint32_t num) {
    return num == 4 ? &r->q : num == 5 ? &r->k : &r->v;
}

at_err_t svc_wire_parse_attend(const svc_seg_t *segs, uint32_t nseg, svc_attend_req_t *r,
                               at_diag_t *diag) {
    const where_t w = {0, 0};
    uint64_t total = 0;
    for (uint32_t i = 0; i < nseg; i++)
        total += segs[i].n;
    cur_t c = {segs, nseg, 0, 0, 0};
    svc_loc_t session = {0, 0};
    at_err_t e = AT_OK;
    reset(r);
    while (c.off < total) {
        uint64_t at = c.off;
        uint32_t num, wt;
        uint64_t v = 0;
        e = read_tag(&c, total, &w, &num, &wt, diag);
        if (e != AT_OK)
            goto out_reset;
        switch (num) {
        case 1:
            e = check_wt(&w, at, num, wt, WT_LEN, diag);
            if (e == AT_OK)
                e = read_bytes(&c, total, &w, num, &session, diag);
            break;
        case 2:
            e = check_wt(&w, at, num, wt, WT_VARINT, diag);
            if (e == AT_OK)
                e = value_or_bad(&c, total, &w, "layer", &v, diag);
            if (e == AT_OK)
                r->layer = (uint32_t)v; /* low 32 bits, as protobuf does */
            break;
        case 3:
            e = check_wt(&w, at, num, wt, WT_LEN, diag);
            if (e == AT_OK)
                e = parse_chunk_field(&c, total, r, diag);
            break;
        case 4:
        case 5:
        case 6:
            e = check_wt(&w, at, num, wt, WT_LEN, diag);
            if (e == AT_OK)
                e = read_bytes(&c, total, &w, num, bytes_field(r, num), diag);
            break;
        default: e = skip_unknown(&c, total, &w, num, wt, diag); break;
        }
        if (e != AT_OK)
            goto out_reset;
    }
    e = take_session(segs, nseg, session, r, diag);
    if (e != AT_OK)
        goto out_reset;
    return AT_OK;

out_reset:
    reset(r);
    return e;
}

void svc_wire_copy(const svc_seg_t *segs, uint32_t nseg, svc_loc_t loc, void *dst) {
    uint8_t *o = dst;
    uint64_t skip_bytes = loc.off;
    uint64_t left = loc.len;
    for (uint32_t i = 0; i < nseg && left > 0; i++) {
        size_t n = segs[i].n;
        if (skip_bytes >= n) {
            skip_bytes -= n;
            continue;
        }
        uint64_t take = n - skip_bytes;
        if (take > left)
            take = left;
        memcpy(o, segs[i].p + skip_bytes, (size_t)take);
        o += take;
        left -= take;
        skip_bytes = 0;
    }
    AT_ASSERT(left == 0 && "loc lies outside the segments");
}

static size_t put_varint(uint8_t *out, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80u) {
        out[n++] = (uint8_t)(v | 0x80u);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

size_t svc_wire_len_header(uint32_t field_number, uint64_t len, uint8_t out[16]) {
    AT_ASSERT(field_number >= 1 && field_number <= FIELD_NUMBER_MAX);
    size_t n = put_varint(out, ((uint64_t)field_number << 3) | WT_LEN);
    return n + put_varint(out + n, len);
}

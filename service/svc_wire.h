/* Hand-written protobuf wire code for attnd.v1.AttendRequest and AttendResponse's header.
 *
 * Attend requests carry q, k and v as bytes fields of megabytes. protobuf-c's unpack would
 * flatten the received payload and copy each bytes field again, so Attend requests are parsed
 * here instead, in one pass over the payload's segments (gRPC slices) as received: the pass
 * records the small fields and WHERE each bytes field lies; the caller checks the lengths,
 * allocates the destination and copies each bytes field once, straight from the segments, with
 * svc_wire_copy. Every other message uses protobuf-c.
 *
 * Wire rules are protobuf's, as protobuf-c (which decodes attnd's other messages) applies them:
 * fields in any order; a non-repeated field given twice: the last one wins; repeated chunks are
 * appended in order; unknown fields of wire types 0, 1, 2 and 5 are skipped; a known field with
 * the wrong wire type, a group (wire type 3, 4), wire types 6 and 7, field number 0, a tag over
 * 32 bits, a tag or length prefix over 5 bytes (the limit protobuf-c and Google's C++ protobuf
 * read them with), a value varint over 10 bytes and anything truncated are
 * AT_ERR_WIRE_MALFORMED.
 *
 * Thread: any; no shared state. */
#ifndef AT_SERVICE_SVC_WIRE_H
#define AT_SERVICE_SVC_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "cache/kvc.h"
#include "common/at_err.h"

/* Longest session name in bytes, without the terminating NUL. */
#define SVC_SESSION_NAME_MAX 128u

/* One contiguous piece of a received payload (a gRPC slice), borrowed from the caller for the
 * duration of each call. p may be NULL when n is 0. */
typedef struct svc_seg {
    const uint8_t *p;
    size_t n; /* bytes */
} svc_seg_t;

/* Where a bytes field's content lies in the payload. */
typedef struct svc_loc {
    uint64_t off; /* bytes from the start of the payload (segment 0, byte 0) */
    uint64_t len; /* bytes; 0 when the field is absent or empty */
} svc_loc_t;

/* A parsed AttendRequest. Caller-owned storage: svc_attend_req_init before the first parse,
 * svc_attend_req_fini after the last. One value may be parsed into many times (an AttendStream):
 * each parse replaces every field and keeps the chunks array's capacity. */
typedef struct svc_attend_req {
    char session[SVC_SESSION_NAME_MAX + 1]; /* NUL-terminated copy; "" when absent */
    uint32_t layer;
    kvc_span_t *chunks;  /* owned; [num_chunks] valid of [cap_chunks] allocated */
    uint32_t num_chunks; /* chunks in wire order */
    uint32_t cap_chunks; /* allocated entries */
    svc_loc_t q, k, v;   /* len 0 when absent */
} svc_attend_req_t;

/* Makes *r empty, with no allocations. Any thread. */
void svc_attend_req_init(svc_attend_req_t *r);
/* Frees r's chunks and zeroes *r (as init). Any thread. */
void svc_attend_req_fini(svc_attend_req_t *r);

/* Parses an attnd.v1.AttendRequest spread over segs[0..nseg) (its bytes, in order, are the
 * segments' bytes one after the other; empty segments are allowed). r must have been
 * initialized (svc_attend_req_init or an earlier parse).
 *
 * AT_OK: *r holds the request; q, k and v locate their bytes in the segments (for
 * svc_wire_copy). A uint32 field takes the low 32 bits of its varint, as protobuf does.
 * Errors, each with diag (may be NULL) naming the field and the byte offset:
 *   AT_ERR_WIRE_MALFORMED  not a valid encoding (see the top of this file); reads never go past
 *                          the segments, whatever the input
 *   AT_ERR_SESSION_NAME    the session (the last one given) is over SVC_SESSION_NAME_MAX bytes or
 *                          holds a NUL byte (which the NUL-terminated copy could not show);
 *                          checking its characters is the caller's job
 *   AT_ERR_NOMEM           the chunks array could not grow
 * On error *r is empty (as after init) except that it may keep its chunks allocation, which fini
 * frees. Borrows segs for the call only. Thread: any. */
at_err_t svc_wire_parse_attend(const svc_seg_t *segs, uint32_t nseg, svc_attend_req_t *r,
                               at_diag_t *diag);

/* Copies the loc.len bytes that loc locates in the segments into dst (room for loc.len bytes;
 * may be NULL when loc.len is 0). loc must come from a successful parse of these same segments
 * (asserted in debug builds). Thread: any. */
void svc_wire_copy(const svc_seg_t *segs, uint32_t nseg, svc_loc_t loc, void *dst);

/* Writes the tag (field_number, wire type 2) and the varint length that precede a
 * length-delimited field of len bytes into out, and returns how many bytes it wrote (2 to 15).
 * Used to send AttendResponse{out} as a small header slice followed by the out bytes themselves,
 * uncopied. field_number must be 1 .. 2^29-1 (asserted). For len 0 it still writes the field
 * ("0a 00" for field 1), which decoders read as an empty field. Pure; any thread. */
size_t svc_wire_len_header(uint32_t field_number, uint64_t len, uint8_t out[16]);

#endif

/* A small client library on gRPC's C core, shared by attnd's benchmarks and end-to-end tests:
 * channels, unary calls and one-at-a-time exchanges on a bidirectional stream.
 *
 * Every call waits for its own completion on a pluck completion queue the caller owns, so a
 * thread that owns a queue can use these functions without any other coordination. Thread: any,
 * one thread at a time per queue and per stream. */
#ifndef AT_BENCH_BENCH_CLIENT_H
#define AT_BENCH_BENCH_CLIENT_H

#include <grpc/grpc.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The largest message either way on a channel from bench_channel_create. */
#define BENCH_MAX_MESSAGE_BYTES (256 << 20)

/* An insecure channel to target ("HOST:PORT") that sends and receives messages up to
 * BENCH_MAX_MESSAGE_BYTES. Needs grpc_init(). Never NULL: gRPC returns a channel whose calls fail
 * when the target is bad. The caller owns it: grpc_channel_destroy. */
grpc_channel *bench_channel_create(const char *target);

/* A queue for the functions below (grpc_completion_queue_create_for_pluck). */
grpc_completion_queue *bench_cq_create(void);

/* Shuts the queue down, drains it and destroys it; sets *cq to NULL. Accepts NULL and *cq NULL. */
void bench_cq_destroy(grpc_completion_queue **cq);

/* How to make a call. The strings are borrowed for the call (or, for a stream, its life). */
typedef struct bench_call_cfg {
    const char *method;  /* "/attnd.v1.Attention/Attend" */
    const char *token;   /* NULL or "": no authorization metadata; else "authorization: Bearer
                          * <token>" is sent with the call */
    int64_t timeout_ms;  /* deadline from the start of the call; 0 = none */
    int64_t exchange_timeout_ms; /* streams: the longest wait for one response; 0 = none. When
                                  * it passes the stream is cancelled and the exchange reads
                                  * DEADLINE_EXCEEDED */
    bool keep_body;      /* copy the response payload into body (else only its length) */
} bench_call_cfg_t;

/* The end of a call. */
typedef struct bench_reply {
    grpc_status_code status;
    char details[512];  /* the status message, truncated */
    uint8_t *body;      /* owned: the response payload when keep_body, else NULL; free with
                         * bench_reply_fini */
    size_t body_bytes;  /* the response payload's length, kept or not; 0 when none */
} bench_reply_t;

/* Frees r->body and zeroes r. */
void bench_reply_fini(bench_reply_t *r);

/* One unary call with req (borrowed until return) as its request, waited for on cq.
 * Returns 0 when the call ran to a status (in r, which may be an error from the server or from
 * gRPC, e.g. UNAVAILABLE when the server cannot be reached); -1 when it could not be started
 * (reason in r->details; r->status is GRPC_STATUS_UNKNOWN). r is overwritten either way and must
 * be passed to bench_reply_fini when keep_body. */
int bench_call_unary(grpc_channel *ch, grpc_completion_queue *cq, const bench_call_cfg_t *cfg,
                     const void *req, size_t req_bytes, bench_reply_t *r);

/* A bidirectional stream used one request at a time: send a request, wait for its response. */
typedef struct bench_stream bench_stream_t;

/* Opens a stream for cfg->method (cfg->timeout_ms bounds the whole stream; 0 = none). cq is
 * borrowed for the stream's life. Nothing is sent until the first exchange. Returns 0 and *out
 * (owned by the caller: bench_stream_close), or -1 when the call could not be created (reason on
 * stderr). */
int bench_stream_open(grpc_channel *ch, grpc_completion_queue *cq, const bench_call_cfg_t *cfg,
                      bench_stream_t **out);

/* Sends req (borrowed until return) and waits for its response. Returns 0 with r->status OK and
 * r->body_bytes set, or 0 with the stream's final status in r when the stream ended instead (the
 * stream is then over: see bench_stream_ended), or -1 on a local failure (reason in r->details).
 * Must not be called on a stream that has ended. */
int bench_stream_exchange(bench_stream_t *s, const void *req, size_t req_bytes, bench_reply_t *r);

/* True once the stream has its final status. */
bool bench_stream_ended(const bench_stream_t *s);

/* Half-closes the stream if it is still open, waits for its final status (10 s, then cancels it)
 * and frees it; the final status goes into r when r is not NULL. Sets *s to NULL; accepts NULL
 * and *s NULL. */
void bench_stream_close(bench_stream_t **s, bench_reply_t *r);

/* The name of a gRPC status ("OK", "UNAVAILABLE", ...), or "UNKNOWN_STATUS" for a value outside
 * the table. Static storage. */
const char *bench_status_name(int status);

#endif

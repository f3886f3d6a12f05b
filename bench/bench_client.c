/* Client calls on gRPC's C core for the benchmarks and the end-to-end tests (see bench_client.h).
 *
 * Thread model: no state of its own; a call or stream is used by the one thread that owns its
 * pluck queue, and each function returns only after every batch it started has completed (a
 * stream's status batch stays armed between calls and is collected by close). */
#include "bench/bench_client.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

grpc_channel *bench_channel_create(const char *target) {
    grpc_arg args[2] = {
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
         .value.integer = BENCH_MAX_MESSAGE_BYTES},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH,
         .value.integer = BENCH_MAX_MESSAGE_BYTES},
    };
    grpc_channel_args ca = {.num_args = 2, .args = args};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(target, creds, &ca);
    grpc_channel_credentials_release(creds);
    return ch;
}

grpc_completion_queue *bench_cq_create(void) {
    return grpc_completion_queue_create_for_pluck(NULL);
}

void bench_cq_destroy(grpc_completion_queue **cq) {
    if (cq == NULL || *cq == NULL)
        return;
    grpc_completion_queue_shutdown(*cq);
    while (grpc_completion_queue_pluck(*cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(*cq);
    *cq = NULL;
}

void bench_reply_fini(bench_reply_t *r) {
    free(r->body);
    memset(r, 0, sizeof *r);
}

static gpr_timespec deadline_after(int64_t timeout_ms) {
    if (timeout_ms <= 0)
        return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
}

/* Fills *md with the authorization header for token; returns how many entries (0 or 1). The
 * value slice is the caller's to unref (auth_metadata_fini). */
static size_t auth_metadata(const char *token, grpc_metadata *md) {
    memset(md, 0, sizeof *md);
    if (token == NULL || token[0] == '\0')
        return 0;
    static const char prefix[] = "Bearer ";
    size_t n = strlen(token);
    md->key = grpc_slice_from_static_string("authorization");
    md->value = grpc_slice_malloc(sizeof prefix - 1 + n);
    memcpy(GRPC_SLICE_START_PTR(md->value), prefix, sizeof prefix - 1);
    memcpy(GRPC_SLICE_START_PTR(md->value) + sizeof prefix - 1, token, n);
    return 1;
}

static void auth_metadata_fini(grpc_metadata *md, size_t n) {
    if (n > 0)
        grpc_slice_unref(md->value);
}

static void copy_details(bench_reply_t *r, grpc_slice details) {
    snprintf(r->details, sizeof r->details, "%.*s", (int)GRPC_SLICE_LENGTH(details),
             (const char *)GRPC_SLICE_START_PTR(details));
}

/* Takes the received message's length, and its bytes when keep; -1 when they cannot be kept. */
static int take_body(grpc_byte_buffer *recv, bool keep, bench_reply_t *r) {
    r->body_bytes = grpc_byte_buffer_length(recv);
    if (!keep)
        return 0;
    r->body = malloc(r->body_bytes + 1);
    if (r->body == NULL) {
        snprintf(r->details, sizeof r->details, "client: out of memory for a %zu-byte response",
                 r->body_bytes);
        return -1;
    }
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, recv)) {
        snprintf(r->details, sizeof r->details, "client: cannot read the response");
        return -1;
    }
    grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
    memcpy(r->body, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all));
    grpc_slice_unref(all);
    grpc_byte_buffer_reader_destroy(&rd);
    return 0;
}

int bench_call_unary(grpc_channel *ch, grpc_completion_queue *cq, const bench_call_cfg_t *cfg,
                     const void *req, size_t req_bytes, bench_reply_t *r) {
    memset(r, 0, sizeof *r);
    r->status = GRPC_STATUS_UNKNOWN;
    grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                               grpc_slice_from_static_string(cfg->method), NULL,
                                               deadline_after(cfg->timeout_ms), NULL);
    if (call == NULL) {
        snprintf(r->details, sizeof r->details, "client: cannot create a call to %s",
                 cfg->method);
        return -1;
    }
    grpc_metadata md;
    size_t n_md = auth_metadata(cfg->token, &md);
    /* the request is not copied: it outlives the call, which ends before we return */
    grpc_slice body = grpc_slice_from_static_buffer(req, req_bytes);
    grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&body, 1);
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_byte_buffer *recv = NULL;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = &md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    int rc = -1;
    grpc_call_error ce = grpc_call_start_batch(call, ops, 6, ops, NULL);
    if (ce != GRPC_CALL_OK) {
        snprintf(r->details, sizeof r->details, "client: grpc_call_start_batch: error %d",
                 (int)ce);
    } else {
        /* RECV_STATUS_ON_CLIENT always completes (at the deadline at the latest) */
        grpc_completion_queue_pluck(cq, ops, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        r->status = status;
        copy_details(r, details);
        rc = recv != NULL ? take_body(recv, cfg->keep_body, r) : 0;
    }
    if (recv != NULL)
        grpc_byte_buffer_destroy(recv);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_byte_buffer_destroy(send);
    auth_metadata_fini(&md, n_md);
    grpc_call_unref(call);
    return rc;
}

struct bench_stream {
    grpc_call *call;               /* owned */
    grpc_completion_queue *cq;     /* borrowed for the stream's life */
    bool keep_body;
    int64_t exchange_timeout_ms;   /* 0 = none */
    grpc_metadata md;              /* the authorization header, when n_md is 1 */
    size_t n_md;
    bool started;                  /* initial metadata has gone out */
    bool ended;                    /* the status below is final */
    grpc_metadata_array init_md;
    grpc_metadata_array trail_md;
    grpc_status_code status;       /* written by the status batch, armed at open */
    grpc_slice details;
    char status_tag;               /* addresses used as batch tags */
    char io_tag;
    char close_tag;
};

int bench_stream_open(grpc_channel *ch, grpc_completion_queue *cq, const bench_call_cfg_t *cfg,
                      bench_stream_t **out) {
    bench_stream_t *s = calloc(1, sizeof *s);
    if (s == NULL) {
        fprintf(stderr, "bench_client: out of memory for a stream\n");
        return -1;
    }
    s->cq = cq;
    s->keep_body = cfg->keep_body;
    s->exchange_timeout_ms = cfg->exchange_timeout_ms;
    s->call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                       grpc_slice_from_static_string(cfg->method), NULL,
                                       deadline_after(cfg->timeout_ms), NULL);
    if (s->call == NULL) {
        fprintf(stderr, "bench_client: cannot create a call to %s\n", cfg->method);
        free(s);
        return -1;
    }
    s->n_md = auth_metadata(cfg->token, &s->md);
    grpc_metadata_array_init(&s->init_md);
    grpc_metadata_array_init(&s->trail_md);
    s->status = GRPC_STATUS_UNKNOWN;
    s->details = grpc_empty_slice();
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op.data.recv_status_on_client.trailing_metadata = &s->trail_md;
    op.data.recv_status_on_client.status = &s->status;
    op.data.recv_status_on_client.status_details = &s->details;
    grpc_call_error ce = grpc_call_start_batch(s->call, &op, 1, &s->status_tag, NULL);
    if (ce != GRPC_CALL_OK) {
        fprintf(stderr, "bench_client: grpc_call_start_batch: error %d\n", (int)ce);
        grpc_metadata_array_destroy(&s->init_md);
        grpc_metadata_array_destroy(&s->trail_md);
        auth_metadata_fini(&s->md, s->n_md);
        grpc_call_unref(s->call);
        free(s);
        return -1;
    }
    *out = s;
    return 0;
}

/* Waits for the stream's status: 10 s, then the stream is cancelled (and the status is then
 * CANCELLED unless the server's came first). */
static void wait_status(bench_stream_t *s) {
    gpr_timespec limit = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                      gpr_time_from_seconds(10, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_pluck(s->cq, &s->status_tag, limit, NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
        grpc_call_cancel(s->call, NULL);
        grpc_completion_queue_pluck(s->cq, &s->status_tag, gpr_inf_future(GPR_CLOCK_REALTIME),
                                    NULL);
    }
    s->ended = true;
}

static void reply_from_status(const bench_stream_t *s, bench_reply_t *r) {
    r->status = s->status;
    copy_details(r, s->details);
}

int bench_stream_exchange(bench_stream_t *s, const void *req, size_t req_bytes, bench_reply_t *r) {
    memset(r, 0, sizeof *r);
    r->status = GRPC_STATUS_UNKNOWN;
    grpc_slice body = grpc_slice_from_static_buffer(req, req_bytes);
    grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&body, 1);
    grpc_byte_buffer *recv = NULL;
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!s->started) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = s->n_md;
        ops[n].data.send_initial_metadata.metadata = &s->md;
        n++;
        ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[n].data.recv_initial_metadata.recv_initial_metadata = &s->init_md;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = send;
    n++;
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = &recv;
    n++;
    int rc = 0;
    grpc_call_error ce = grpc_call_start_batch(s->call, ops, n, &s->io_tag, NULL);
    if (ce != GRPC_CALL_OK) {
        snprintf(r->details, sizeof r->details, "client: grpc_call_start_batch: error %d",
                 (int)ce);
        rc = -1;
    } else {
        s->started = true;
        grpc_event ev = grpc_completion_queue_pluck(s->cq, &s->io_tag,
                                                    deadline_after(s->exchange_timeout_ms), NULL);
        bool timed_out = ev.type == GRPC_QUEUE_TIMEOUT;
        if (timed_out) { /* cancelling completes the batch, as a failure */
            grpc_call_cancel(s->call, NULL);
            ev = grpc_completion_queue_pluck(s->cq, &s->io_tag,
                                             gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        }
        if (ev.success && recv != NULL && !timed_out) {
            r->status = GRPC_STATUS_OK;
            rc = take_body(recv, s->keep_body, r);
        } else if (timed_out) {
            wait_status(s);
            r->status = GRPC_STATUS_DEADLINE_EXCEEDED;
            snprintf(r->details, sizeof r->details, "client: no response within %lld ms",
                     (long long)s->exchange_timeout_ms);
        } else { /* no response: the stream is over, and its status says why */
            wait_status(s);
            reply_from_status(s, r);
        }
    }
    if (recv != NULL)
        grpc_byte_buffer_destroy(recv);
    grpc_byte_buffer_destroy(send);
    return rc;
}

bool bench_stream_ended(const bench_stream_t *s) {
    return s->ended;
}

void bench_stream_close(bench_stream_t **sp, bench_reply_t *r) {
    if (sp == NULL || *sp == NULL)
        return;
    bench_stream_t *s = *sp;
    if (!s->ended) {
        bool closed = false;
        if (s->started) {
            grpc_op op;
            memset(&op, 0, sizeof op);
            op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
            if (grpc_call_start_batch(s->call, &op, 1, &s->close_tag, NULL) == GRPC_CALL_OK) {
                grpc_completion_queue_pluck(s->cq, &s->close_tag,
                                            gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
                closed = true;
            }
        }
        if (!closed) /* nothing was sent, or the half-close could not start: end it here */
            grpc_call_cancel(s->call, NULL);
        wait_status(s);
    }
    if (r != NULL) {
        memset(r, 0, sizeof *r);
        reply_from_status(s, r);
    }
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->init_md);
    grpc_metadata_array_destroy(&s->trail_md);
    auth_metadata_fini(&s->md, s->n_md);
    grpc_call_unref(s->call);
    free(s);
    *sp = NULL;
}

const char *bench_status_name(int status) {
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    if (status < 0 || (size_t)status >= sizeof names / sizeof names[0])
        return "UNKNOWN_STATUS";
    return names[status];
}

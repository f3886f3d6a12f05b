/* A device's worker (see svc_worker.h).
 *
 * Thread model: one thread (its own), blocking on its socket; no locks. Sessions are kept in a
 * small array searched linearly: a device holds tens of sessions, and a lookup is nothing next to
 * an attention call. A job is checked against its deadline just before it runs. */
#include "service/svc_worker.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "common/at_log.h"
#include "service/svc_arena.h"
#include "service/svc_msg.h"

typedef struct wsession {
    uint64_t id;
    att_ctx_t *ctx;          /* owned; NULL on the null device */
    uint64_t capacity_tokens; /* the null device's: whole blocks */
} wsession_t;

typedef struct worker {
    void *sock;
    bool null_device;   /* everything but the attention work, to measure the service's overhead */
    att_backend_t *be;  /* owned */
    svc_arena_t *arena; /* owned (attached) */
    wsession_t *sessions;
    uint32_t num_sessions;
    uint32_t cap_sessions;
    void *items;        /* frame 2 of the current request, owned */
    size_t items_len;
} worker_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static wsession_t *find_session(worker_t *w, uint64_t id) {
    for (uint32_t i = 0; i < w->num_sessions; i++)
        if (w->sessions[i].id == id)
            return &w->sessions[i];
    return NULL;
}

static void fill_info(const att_ctx_t *ctx, svc_rep_t *rep) {
    att_ctx_info_t info;
    att_ctx_get_info(ctx, &info);
    rep->kv_capacity_tokens = info.kv_capacity_tokens;
    rep->kv_used_tokens = info.kv_used_tokens;
    rep->num_sequences = info.num_sequences;
}

/* The region [off, off + len) of the arena, or NULL when it does not lie inside it. */
static void *region(worker_t *w, uint64_t off, uint64_t len) {
    uint64_t size = svc_arena_size(w->arena);
    if (off > size || len > size - off)
        return NULL;
    return svc_arena_base(w->arena) + off;
}

static at_err_t do_create(worker_t *w, const svc_req_t *rq, svc_rep_t *rep, at_diag_t *d) {
    if (find_session(w, rq->session_id) != NULL)
        return at_diag_set(d, AT_ERR_INTERNAL, "session %llu exists on this worker",
                           (unsigned long long)rq->session_id);
    size_t want = (size_t)rq->n_windows * sizeof(uint32_t) +
                  ((size_t)rq->n_alibi + rq->n_sinks) * sizeof(float);
    if (w->items_len != want)
        return at_diag_set(d, AT_ERR_INTERNAL, "create: %zu bytes of arrays, expected %zu",
                           w->items_len, want);
    const uint8_t *p = w->items;
    att_model_cfg_t cfg = {
        .num_layers = rq->num_layers,
        .num_query_heads = rq->num_query_heads,
        .num_kv_heads = rq->num_kv_heads,
        .head_dim = rq->head_dim,
        .dtype = (att_dtype_t)rq->dtype,
        .block_size = rq->block_size,
        .scale = rq->scale,
        .sliding_window = rq->sliding_window,
        .layer_sliding_window = (const uint32_t *)p,
        .n_layer_sliding_window = rq->n_windows,
        .logits_soft_cap = rq->soft_cap,
        .alibi_slopes = (const float *)(p + (size_t)rq->n_windows * sizeof(uint32_t)),
        .n_alibi_slopes = rq->n_alibi,
        .sinks = (const float *)(p + (size_t)rq->n_windows * sizeof(uint32_t) +
                                 (size_t)rq->n_alibi * sizeof(float)),
        .n_sinks = rq->n_sinks,
    };
    if (w->num_sessions == w->cap_sessions) {
        uint32_t cap = w->cap_sessions ? 2 * w->cap_sessions : 8;
        wsession_t *s = realloc(w->sessions, cap * sizeof *s);
        if (s == NULL)
            return AT_ERR_NOMEM;
        w->sessions = s;
        w->cap_sessions = cap;
    }
    if (w->null_device) {
        att_model_t *m = NULL;
        at_err_t e = att_model_create(&cfg, d, &m);
        if (e != AT_OK)
            return e;
        uint64_t blocks = rq->kv_capacity_tokens / m->block_size +
                          (rq->kv_capacity_tokens % m->block_size != 0);
        rep->kv_capacity_tokens = blocks * m->block_size;
        att_model_destroy(&m);
        w->sessions[w->num_sessions++] = (wsession_t){rq->session_id, NULL, rep->kv_capacity_tokens};
        return AT_OK;
    }
    att_ctx_t *ctx = NULL;
    at_err_t e = att_ctx_create(w->be, &cfg, rq->kv_capacity_tokens, d, &ctx);
    if (e != AT_OK)
        return e;
    w->sessions[w->num_sessions++] = (wsession_t){rq->session_id, ctx, 0};
    fill_info(ctx, rep);
    return AT_OK;
}

static at_err_t do_close(worker_t *w, const svc_req_t *rq) {
    wsession_t *s = find_session(w, rq->session_id);
    if (s == NULL)
        return AT_ERR_SESSION_NOT_FOUND;
    att_ctx_destroy(&s->ctx); /* NULL on the null device */
    *s = w->sessions[--w->num_sessions];
    return AT_OK;
}

static at_err_t do_attend(worker_t *w, const svc_req_t *rq, svc_rep_t *rep, at_diag_t *d) {
    wsession_t *s = find_session(w, rq->session_id);
    if (s == NULL)
        return AT_ERR_SESSION_NOT_FOUND;
    if (s->ctx == NULL) { /* the null device: the call got here; that is all it measures */
        rep->kv_capacity_tokens = s->capacity_tokens;
        return AT_OK;
    }
    if (w->items_len != (size_t)rq->num_items * sizeof(att_chunk_t))
        return at_diag_set(d, AT_ERR_INTERNAL, "attend: chunk frame of %zu bytes", w->items_len);
    att_call_t call = {
        .layer = rq->layer,
        .chunks = w->items,
        .num_chunks = rq->num_items,
        .q = region(w, rq->q_off, rq->q_len),
        .q_bytes = rq->q_len,
        .k = region(w, rq->k_off, rq->k_len),
        .k_bytes = rq->k_len,
        .v = region(w, rq->v_off, rq->v_len),
        .v_bytes = rq->v_len,
        .out = region(w, rq->out_off, rq->out_len),
        .out_bytes = rq->out_len,
    };
    if (call.q == NULL || call.k == NULL || call.v == NULL || call.out == NULL)
        return at_diag_set(d, AT_ERR_INTERNAL, "attend: a tensor region lies outside the arena");
    at_err_t e = rq->op == SVC_OP_APPEND ? att_ctx_append(s->ctx, &call, d)
                                         : att_ctx_attend(s->ctx, &call, d);
    fill_info(s->ctx, rep);
    return e;
}

static at_err_t do_release(worker_t *w, const svc_req_t *rq, svc_rep_t *rep, at_diag_t *d) {
    wsession_t *s = find_session(w, rq->session_id);
    if (s == NULL)
        return AT_ERR_SESSION_NOT_FOUND;
    if (w->items_len != (size_t)rq->num_items * sizeof(uint64_t))
        return at_diag_set(d, AT_ERR_INTERNAL, "release: id frame of %zu bytes", w->items_len);
    if (s->ctx == NULL)
        return AT_OK;
    att_ctx_release(s->ctx, w->items, rq->num_items, &rep->released);
    fill_info(s->ctx, rep);
    return AT_OK;
}

static int send_rep(worker_t *w, const svc_rep_t *rep) {
    return zmq_send(w->sock, rep, sizeof *rep, 0) == (int)sizeof *rep ? 0 : -1;
}

/* Receives one request: the header, then the optional items frame into w->items. */
static at_err_t recv_req(worker_t *w, svc_req_t *rq) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, w->sock, 0) < 0) {
        zmq_msg_close(&m);
        return AT_ERR_IO;
    }
    at_err_t e = AT_OK;
    if (zmq_msg_size(&m) != sizeof *rq)
        e = AT_ERR_INTERNAL;
    else
        memcpy(rq, zmq_msg_data(&m), sizeof *rq);
    int more = zmq_msg_more(&m);
    zmq_msg_close(&m);
    free(w->items);
    w->items = NULL;
    w->items_len = 0;
    if (more) {
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->sock, 0) < 0) {
            zmq_msg_close(&m);
            return AT_ERR_IO;
        }
        w->items_len = zmq_msg_size(&m);
        w->items = malloc(w->items_len ? w->items_len : 1);
        if (w->items == NULL)
            e = AT_ERR_NOMEM;
        else
            memcpy(w->items, zmq_msg_data(&m), w->items_len);
        zmq_msg_close(&m);
    }
    if (e == AT_OK && rq->magic != SVC_MSG_MAGIC)
        e = AT_ERR_INTERNAL;
    return e;
}

static void worker_fini(worker_t *w) {
    for (uint32_t i = 0; i < w->num_sessions; i++)
        att_ctx_destroy(&w->sessions[i].ctx);
    free(w->sessions);
    free(w->items);
    att_backend_destroy(&w->be);
    svc_arena_destroy(&w->arena);
    if (w->sock != NULL)
        zmq_close(w->sock);
}

at_err_t svc_worker_run(const svc_worker_cfg_t *cfg, void *zctx) {
    worker_t w = {0};
    at_diag_t d = {{0}};
    svc_rep_t ready = {.magic = SVC_MSG_MAGIC, .err = AT_OK};
    at_err_t e = AT_OK;
    int linger = 0;
    w.sock = zmq_socket(zctx, ZMQ_PAIR);
    if (w.sock == NULL || zmq_setsockopt(w.sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_connect(w.sock, cfg->endpoint) != 0) {
        at_log(AT_LOG_ERROR, "worker", "%s: cannot connect to %s: %s", cfg->device,
               cfg->endpoint, zmq_strerror(zmq_errno()));
        worker_fini(&w);
        return AT_ERR_IO;
    }
    /* Everything that can fail at start-up is reported in READY, so the pool never waits on a
     * worker that is not coming. */
    att_cpu_cfg_t cc = {.num_threads = cfg->cpu_threads};
    w.null_device = strcmp(cfg->device, "null") == 0;
    if (w.null_device)
        e = svc_arena_attach(cfg->arena_name, cfg->arena_bytes, &d, &w.arena);
    else if (strcmp(cfg->device, "cpu") != 0)
        e = at_diag_set(&d, AT_ERR_DEVICE_UNKNOWN, "device %s has no backend in this build",
                        cfg->device);
    else if ((e = att_cpu_create(&cc, &w.be)) != AT_OK)
        at_diag_set(&d, e, "CPU backend: %s", at_err_str(e));
    else
        e = svc_arena_attach(cfg->arena_name, cfg->arena_bytes, &d, &w.arena);
    ready.err = e;
    memcpy(ready.diag, d.msg, sizeof ready.diag);
    if (send_rep(&w, &ready) != 0 || e != AT_OK) {
        worker_fini(&w);
        return e != AT_OK ? e : AT_ERR_IO;
    }
    at_log(AT_LOG_INFO, "worker", "%s: ready (%s)", cfg->device,
           w.null_device ? "no attention work: measures the service alone" : att_cpu_isa(w.be));
    for (;;) {
        svc_req_t rq;
        svc_rep_t rep = {.magic = SVC_MSG_MAGIC};
        d.msg[0] = '\0';
        e = recv_req(&w, &rq);
        if (e == AT_ERR_IO)
            break; /* the socket is gone: the server is stopping */
        rep.job_id = rq.job_id;
        bool tensor_op = rq.op == SVC_OP_ATTEND || rq.op == SVC_OP_APPEND;
        if (e == AT_OK && rq.deadline_ns != 0 && tensor_op && now_ns() > rq.deadline_ns)
            e = AT_ERR_DEADLINE;
        else if (e == AT_OK) {
            switch (rq.op) {
            case SVC_OP_CREATE: e = do_create(&w, &rq, &rep, &d); break;
            case SVC_OP_CLOSE: e = do_close(&w, &rq); break;
            case SVC_OP_ATTEND:
            case SVC_OP_APPEND: e = do_attend(&w, &rq, &rep, &d); break;
            case SVC_OP_RELEASE: e = do_release(&w, &rq, &rep, &d); break;
            case SVC_OP_STOP: e = AT_OK; break;
            default: e = at_diag_set(&d, AT_ERR_INTERNAL, "unknown op %u", rq.op); break;
            }
        }
        rep.err = e;
        memcpy(rep.diag, d.msg, sizeof rep.diag);
        rep.diag[sizeof rep.diag - 1] = '\0';
        if (send_rep(&w, &rep) != 0 || rq.op == SVC_OP_STOP)
            break;
    }
    at_log(AT_LOG_INFO, "worker", "%s: stopped with %u sessions open", cfg->device,
           w.num_sessions);
    worker_fini(&w);
    return AT_OK;
}

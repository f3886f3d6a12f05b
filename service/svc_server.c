/* attnd's gRPC server (see svc_server.h).
 *
 * Thread model: cq_threads completion-queue threads, one per queue; each keeps a few
 * request_registered_call outstanding per method on its queue and runs the quick handlers itself.
 * Work for a device goes to its pool as a job; the job's reply arrives on the pool's dispatcher
 * thread, which finishes the call. A call's batches are started under its `mu`, since the queue
 * thread and a dispatcher may both start one. Calls are refcounted: one reference per outstanding
 * batch and one for the handler until it has replied.
 *
 * A unary call: NEW (request and deadline arrive) -> RECV_CLOSE_ON_SERVER started at once, so a
 * client that goes away marks the call cancelled (its job, if still queued, is dropped) -> the
 * handler replies once: SEND_INITIAL_METADATA, SEND_MESSAGE on success, SEND_STATUS_FROM_SERVER.
 *
 * Tenants: with a tenants file, an auth metadata processor (on gRPC's threads, before the call
 * reaches a queue thread and before its body is read) answers a call to any method but
 * grpc.health UNAUTHENTICATED when its `authorization: Bearer` token is missing or opens no
 * tenant; health calls always pass (probes carry no token). The processor cannot hand the tenant
 * to the call: the auth context it may write to is the connection's, shared by every call on it.
 * So the queue thread authenticates the call's own metadata again (a hash and a compare) before
 * it parses the body, answering the same way (a reload may have removed the token meanwhile).
 * A call holds a reference to its tenant, and one of the tenant's in-flight slots until it is
 * answered; the tenant's counters get it then (a stream counts as one call, with the tokens and
 * times of all its requests).
 *
 * Copies of tensor bytes (CPU path): q, k and v are copied once, from gRPC's received slices
 * into the device's shared-memory arena (svc_wire); out is written by the worker into the arena
 * and sent from there without a copy (a slice over the arena region, freed when gRPC is done). */
#include "service/svc_server.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention/att_op.h"
#include "attnd/v1/attention.pb-c.h"
#include "common/at_base.h"
#include "common/at_log.h"
#include "grpc/health/v1/health.pb-c.h"
#include "service/svc_status.h"
#include "service/svc_wire.h"
#include "tenancy/ten_session.h"
#include "tenancy/ten_tenant.h"

#define CALLS_PER_METHOD 4 /* request_registered_call outstanding per method and queue */
#define MAX_SEGS 64        /* payload slices gathered before falling back to one flat copy */
#define HEALTH_PREFIX "/grpc.health.v1.Health/"
#define AUTH_MISSING_HINT "send 'authorization: Bearer <token>'"

typedef enum method {
    M_CREATE,
    M_GET,
    M_LIST,
    M_CLOSE,
    M_ATTEND,
    M_STREAM,
    M_RELEASE,
    M_APPEND,
    M_STATS,
    M_HEALTH_CHECK,
    M_HEALTH_WATCH,
    M_COUNT,
    M_UNKNOWN = M_COUNT, /* anything not registered: answered UNIMPLEMENTED */
} method_t;

static const char *const method_paths[M_COUNT] = {
    "/attnd.v1.Attention/CreateSession", "/attnd.v1.Attention/GetSession",
    "/attnd.v1.Attention/ListSessions",  "/attnd.v1.Attention/CloseSession",
    "/attnd.v1.Attention/Attend",        "/attnd.v1.Attention/AttendStream",
    "/attnd.v1.Attention/Release",       "/attnd.v1.Attention/Append",
    "/attnd.v1.Attention/GetStats",
    "/grpc.health.v1.Health/Check",      "/grpc.health.v1.Health/Watch",
};

typedef enum tag_kind { T_NEW, T_CLOSE, T_SENT, T_RECV, T_SEND, T_META } tag_kind_t;

typedef struct call call_t;
typedef struct tag {
    call_t *c;
    tag_kind_t kind;
} tag_t;

typedef struct region {
    svc_arena_t *arena; /* borrowed: the pool's */
    uint64_t off;
} region_t;

struct call {
    struct svc_server *srv;
    method_t method;
    uint32_t cq_index;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
    grpc_call_details details; /* M_UNKNOWN only */
    tag_t t_new, t_close, t_sent;
    int cancelled;             /* written by RECV_CLOSE_ON_SERVER */
    atomic_int refs;
    pthread_mutex_t mu;        /* serializes grpc_call_start_batch on this call */
    bool replied;              /* guarded by mu */
    grpc_slice status_details;
    grpc_byte_buffer *response;
    /* the job of a call that needs its device */
    svc_job_t job;
    ten_session_t *session;    /* a reference, or NULL */
    svc_pool_t *pool;          /* borrowed */
    void *items;               /* owned: frame 2 of the job */
    struct areq *ar;           /* M_ATTEND: the request */
    /* M_STREAM, all guarded by mu */
    tag_t t_recv, t_send, t_meta;
    grpc_byte_buffer *recv_bb; /* RECV_MESSAGE's target */
    struct areq *fifo_head;    /* requests in arrival order; responses leave from the head */
    struct areq *fifo_tail;
    bool half_closed;          /* the client sent its last request */
    bool send_busy;            /* a SEND_MESSAGE is in flight */
    bool finished;             /* the final status has been started */
    /* the caller */
    ten_tenant_t *tenant;      /* a reference once authenticated, or NULL (health, unknown) */
    bool holds_slot;           /* one of the tenant's inflight_calls is this call's */
    uint64_t tokens, work;     /* for the tenant's counters: what succeeded (guarded by mu) */
    int64_t queue_ns, device_ns;
    /* M_HEALTH_WATCH: guarded by mu */
    bool watch_known;          /* the service name asked about is ours */
    svc_pool_t *watch_pool;    /* the device watched; NULL: the whole server */
    int watch_sent;            /* the serving status last sent */
    call_t *watch_next;        /* the server's watcher list; guarded by the server's watch_mu */
};

/* One Attend request: of a unary call, or one message of a stream. */
typedef struct areq {
    call_t *c;                 /* the call it belongs to (holds a reference while queued) */
    grpc_byte_buffer *payload; /* owned: the request's bytes */
    svc_attend_req_t attend;   /* parsed (owns the chunk array the job sends) */
    ten_session_t *session;    /* a reference, or NULL */
    svc_pool_t *pool;          /* borrowed */
    uint64_t q_off, k_off, v_off, out_off;
    int regions;               /* how many of q, k, v, out are allocated (in that order) */
    svc_job_t job;
    bool done;                 /* stream: the result below is final */
    at_err_t err;
    at_diag_t diag;
    grpc_byte_buffer *resp;    /* owned: AttendResponse when err is OK */
    struct areq *next;         /* stream FIFO */
} areq_t;

static void areq_free(areq_t *a);

struct svc_server {
    grpc_server *server;
    grpc_completion_queue **cqs;
    pthread_t *threads;
    uint32_t num_cqs;
    void *methods[M_COUNT];
    int port;
    atomic_bool draining;
    svc_pool_t **pools;        /* owned array of borrowed pools */
    ten_tenants_t *tenants;    /* borrowed, or own_tenants */
    ten_tenants_t *own_tenants; /* owned: the open table when the config gave none */
    uint32_t num_pools;
    ten_registry_t *registry;  /* owned */
    tag_t shutdown_tag;
    pthread_mutex_t watch_mu;  /* never held with a call's mu */
    call_t *watchers;          /* guarded by watch_mu: Health Watch calls (each a reference) */
    pthread_mutex_t shut_mu;
    pthread_cond_t shut_cv;
    bool shut_done;            /* guarded by shut_mu */
};

/* ---- helpers ------------------------------------------------------------------------------- */


/* grpc_call_start_batch with the happens-before edge to the completion thread that TSan cannot
 * see through gRPC (see AT_TSAN_RELEASE). */
static grpc_call_error start_batch(call_t *c, const grpc_op *ops, size_t n, tag_t *tag) {
    AT_TSAN_RELEASE(tag);
    return grpc_call_start_batch(c->call, ops, n, tag, NULL);
}
static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The call's deadline on CLOCK_MONOTONIC (what the worker compares with); 0 when it has none. */
static int64_t deadline_mono_ns(const call_t *c) {
    gpr_timespec dl = gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(dl, gpr_inf_future(GPR_CLOCK_MONOTONIC)) >= 0)
        return 0;
    gpr_timespec left = gpr_time_sub(dl, gpr_now(GPR_CLOCK_MONOTONIC));
    return mono_ns() + (int64_t)left.tv_sec * 1000000000 + left.tv_nsec;
}

static void call_unref(call_t *c) {
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1)
        return;
    areq_free(c->ar);
    while (c->fifo_head != NULL) {
        areq_t *a = c->fifo_head;
        c->fifo_head = a->next;
        areq_free(a);
    }
    if (c->recv_bb != NULL)
        grpc_byte_buffer_destroy(c->recv_bb);
    ten_session_unref(&c->session);
    if (c->holds_slot)
        ten_tenant_release_call(c->tenant);
    ten_tenant_unref(&c->tenant);
    free(c->items);
    if (c->payload != NULL)
        grpc_byte_buffer_destroy(c->payload);
    if (c->response != NULL)
        grpc_byte_buffer_destroy(c->response);
    grpc_slice_unref(c->status_details);
    grpc_metadata_array_destroy(&c->md);
    if (c->method == M_UNKNOWN)
        grpc_call_details_destroy(&c->details);
    if (c->call != NULL)
        grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Counts the call's answer in its tenant's counters and gives its in-flight slot back (before
 * the status leaves, so a client that heard it may call again at once); under c->mu. */
static void record(call_t *c, at_err_t e) {
    if (c->tenant == NULL)
        return;
    ten_tenant_record_call(c->tenant, (uint32_t)svc_status_of(e), c->tokens, c->work,
                           (uint64_t)c->queue_ns, (uint64_t)c->device_ns);
    if (c->holds_slot) {
        ten_tenant_release_call(c->tenant);
        c->holds_slot = false;
    }
}

/* Adds a finished job's times (and, when it succeeded, its tokens and work) to the call's. */
static void account(call_t *c, const svc_job_t *job, at_err_t e) {
    pthread_mutex_lock(&c->mu);
    c->queue_ns += job->queue_ns;
    c->device_ns += job->device_ns;
    if (e == AT_OK && (job->req.op == SVC_OP_ATTEND || job->req.op == SVC_OP_APPEND)) {
        c->tokens += job->tokens;
        c->work += job->cost;
    }
    pthread_mutex_unlock(&c->mu);
}

/* Sends the call's one answer: status e (with diag's detail), and resp (owned) when e is OK.
 * Any thread; the handler's reference is dropped. */
static void reply(call_t *c, at_err_t e, const at_diag_t *diag, grpc_byte_buffer *resp) {
    char msg[512];
    if (e == AT_OK)
        snprintf(msg, sizeof msg, "OK");
    else if (diag != NULL && diag->msg[0] != '\0')
        snprintf(msg, sizeof msg, "%s: %s", at_err_str(e), diag->msg);
    else
        snprintf(msg, sizeof msg, "%s", at_err_str(e));
    if (e != AT_OK && resp != NULL) {
        grpc_byte_buffer_destroy(resp);
        resp = NULL;
    }
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    n++;
    if (resp != NULL) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = resp;
        n++;
    }
    pthread_mutex_lock(&c->mu);
    record(c, e);
    c->replied = true;
    c->response = resp;
    c->status_details = grpc_slice_from_copied_string(msg);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = svc_status_of(e);
    ops[n].data.send_status_from_server.status_details = &c->status_details;
    n++;
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    grpc_call_error ce = start_batch(c, ops, n, &c->t_sent);
    pthread_mutex_unlock(&c->mu);
    if (ce != GRPC_CALL_OK) {
        at_log(AT_LOG_ERROR, "server", "start_batch (reply) failed: %d", (int)ce);
        call_unref(c); /* the batch's reference: it will never complete */
    }
    if (e != AT_OK)
        at_log(AT_LOG_DEBUG, "server", "%s -> %s: %s",
               c->method < M_COUNT ? method_paths[c->method] : "unknown", at_err_name(e), msg);
    call_unref(c);
}

/* The payload as one flat buffer (the caller frees it), for the small messages protobuf-c
 * unpacks. NULL when there is none. */
static uint8_t *payload_flat(call_t *c, size_t *len) {
    *len = 0;
    if (c->payload == NULL)
        return NULL;
    grpc_byte_buffer_reader rd;
    if (!grpc_byte_buffer_reader_init(&rd, c->payload))
        return NULL;
    grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    *len = GRPC_SLICE_LENGTH(all);
    uint8_t *p = malloc(*len ? *len : 1);
    if (p != NULL)
        memcpy(p, GRPC_SLICE_START_PTR(all), *len);
    grpc_slice_unref(all);
    return p;
}

static ProtobufCMessage *unpack(call_t *c, const ProtobufCMessageDescriptor *desc) {
    size_t len;
    uint8_t *buf = payload_flat(c, &len);
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, len, buf != NULL ? buf : (uint8_t *)"");
    free(buf);
    return m;
}

static grpc_byte_buffer *pack(const ProtobufCMessage *m) {
    size_t len = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(len);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

static svc_pool_t *pool_for(struct svc_server *s, const char *device, at_diag_t *d,
                            at_err_t *e) {
    if (device == NULL || device[0] == '\0')
        return s->pools[0];
    for (uint32_t i = 0; i < s->num_pools; i++)
        if (strcmp(svc_pool_device(s->pools[i]), device) == 0)
            return s->pools[i];
    *e = at_diag_set(d, AT_ERR_DEVICE_UNKNOWN, "device: no device '%s' on this server", device);
    return NULL;
}

/* True when the worker that held s's KV cache died since s was created (see svc_pool.h). */
static bool session_lost(const ten_session_t *s) {
    return svc_pool_epoch(ten_session_device_handle(s), ten_session_worker(s)) !=
           ten_session_worker_epoch(s);
}

/* SessionInfo of s; strings and arrays point into s (valid while the caller holds s) and into
 * *fig (the caller's storage for the session's figures). */
static void session_info(ten_session_t *s, Attnd__V1__SessionInfo *info,
                         Attnd__V1__ModelConfig *mc, ten_session_figures_t *fig_out) {
    const att_model_t *m = ten_session_model(s);
    ten_session_figures_t *fig = fig_out;
    ten_session_get_figures(s, fig);
    attnd__v1__model_config__init(mc);
    mc->name = (char *)ten_session_model_name(s);
    mc->num_layers = m->num_layers;
    mc->num_query_heads = m->num_query_heads;
    mc->num_kv_heads = m->num_kv_heads;
    mc->head_dim = m->head_dim;
    mc->dtype = (Attnd__V1__DType)m->dtype;
    mc->block_size = m->block_size;
    mc->scale = m->scale;
    mc->sliding_window = ten_session_sliding_window(s);
    if (ten_session_layer_windows_given(s)) {
        mc->n_layer_sliding_window = m->num_layers;
        mc->layer_sliding_window = m->window;
    }
    mc->logits_soft_cap = m->soft_cap;
    if (m->alibi != NULL) {
        mc->n_alibi_slopes = m->num_query_heads;
        mc->alibi_slopes = m->alibi;
    }
    if (m->sinks != NULL) {
        mc->n_sinks = m->num_query_heads;
        mc->sinks = m->sinks;
    }
    attnd__v1__session_info__init(info);
    info->session = (char *)ten_session_name(s);
    info->model = mc;
    info->device = (char *)ten_session_device(s);
    info->kv_capacity_tokens = fig->kv_capacity_tokens;
    info->kv_used_tokens = fig->kv_used_tokens;
    info->num_sequences = fig->num_sequences;
    info->attend_calls = fig->calls;
    info->backend_runs = fig->backend_runs;
    info->lost = session_lost(s);
    info->tuning_config = fig->tuning_config;
    info->tuning_source = (Attnd__V1__TuningSource)fig->tuning_source;
    info->tuning_runs = fig->tuning_runs;
    info->tuning_jobs_pending = fig->tuning_jobs_pending;
}

static grpc_byte_buffer *pack_session_info(ten_session_t *s) {
    Attnd__V1__SessionInfo info;
    Attnd__V1__ModelConfig mc;
    ten_session_figures_t fig;
    session_info(s, &info, &mc, &fig);
    return pack(&info.base);
}

static void figures_from(const svc_rep_t *rep, ten_session_figures_t *fig) {
    fig->kv_capacity_tokens = rep->kv_capacity_tokens;
    fig->kv_used_tokens = rep->kv_used_tokens;
    fig->num_sequences = rep->num_sequences;
    fig->calls = rep->calls;
    fig->backend_runs = rep->backend_runs;
    fig->tuning_source = rep->tuning_source;
    fig->tuning_jobs_pending = rep->tuning_jobs_pending;
    fig->tuning_runs = rep->tuning_runs;
    snprintf(fig->tuning_config, sizeof fig->tuning_config, "%s", rep->tuning_config);
}

static void diag_from(const svc_rep_t *rep, at_diag_t *d) {
    snprintf(d->msg, sizeof d->msg, "%s", rep->diag);
}

/* Queues c's job on its pool; on refusal answers the call. */
static void set_flow(svc_job_t *job, ten_tenant_t *t) {
    job->flow = ten_tenant_id(t);
    job->weight = ten_tenant_weight(t);
}

static void submit(call_t *c) {
    c->job.arg = c;
    set_flow(&c->job, c->tenant);
    atomic_init(&c->job.cancelled, 0);
    at_err_t e = svc_pool_submit(c->pool, &c->job);
    if (e != AT_OK) {
        if (c->method == M_CREATE) {
            ten_registry_end_create(c->srv->registry, c->session, false, NULL);
            svc_pool_unpin(c->pool, c->job.worker);
        }
        reply(c, e, NULL, NULL);
    }
}

/* ---- CreateSession ------------------------------------------------------------------------- */

static uint64_t sat_mul(uint64_t a, uint64_t b) {
    return b != 0 && a > UINT64_MAX / b ? UINT64_MAX : a * b;
}

/* The KV-cache bytes a session of model m with this capacity holds on its device: whole blocks,
 * k and v, every layer. */
static uint64_t kv_bytes_of(const att_model_t *m, uint64_t capacity_tokens) {
    uint64_t blocks = capacity_tokens / m->block_size + (capacity_tokens % m->block_size != 0);
    uint64_t row = att_model_row_bytes(m, m->num_kv_heads);
    return sat_mul(sat_mul(sat_mul(blocks, m->block_size), row), 2ull * m->num_layers);
}

static void create_done(svc_job_t *job, const svc_rep_t *rep) {
    call_t *c = job->arg;
    account(c, job, rep->err);
    ten_session_figures_t fig;
    figures_from(rep, &fig);
    ten_session_set_worker_epoch(c->session, job->epoch); /* before others can see it */
    ten_registry_end_create(c->srv->registry, c->session, rep->err == AT_OK, &fig);
    if (rep->err != AT_OK)
        svc_pool_unpin(c->pool, job->worker);
    at_diag_t d;
    diag_from(rep, &d);
    if (rep->err == AT_OK)
        at_log(AT_LOG_INFO, "server", "session %s created on %s worker %u (%llu tokens of KV)",
               ten_session_name(c->session), ten_session_device(c->session), job->worker,
               (unsigned long long)fig.kv_capacity_tokens);
    reply(c, rep->err, &d, rep->err == AT_OK ? pack_session_info(c->session) : NULL);
}

static void handle_create(call_t *c) {
    at_diag_t d = {{0}};
    at_err_t e = AT_OK;
    Attnd__V1__CreateSessionRequest *rq =
        (Attnd__V1__CreateSessionRequest *)unpack(c, &attnd__v1__create_session_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    const Attnd__V1__ModelConfig *mc = rq->model;
    att_model_t *model = NULL;
    svc_pool_t *pool = NULL;
    if (!ten_session_name_valid(rq->session, strlen(rq->session)))
        e = at_diag_set(&d, AT_ERR_SESSION_NAME, "session: got '%.64s'", rq->session);
    else if (mc == NULL)
        e = at_diag_set(&d, AT_ERR_MODEL_LAYERS, "model: missing");
    else if (rq->kv_capacity_tokens == 0)
        e = at_diag_set(&d, AT_ERR_KV_CAPACITY, "kv_capacity_tokens: expected >= 1, got 0");
    else if ((pool = pool_for(c->srv, rq->device, &d, &e)) != NULL) {
        att_model_cfg_t cfg = {
            .num_layers = mc->num_layers,
            .num_query_heads = mc->num_query_heads,
            .num_kv_heads = mc->num_kv_heads,
            .head_dim = mc->head_dim,
            .dtype = (att_dtype_t)mc->dtype,
            .block_size = mc->block_size,
            .scale = mc->scale,
            .sliding_window = mc->sliding_window,
            .layer_sliding_window = mc->layer_sliding_window,
            .n_layer_sliding_window = (uint32_t)mc->n_layer_sliding_window,
            .logits_soft_cap = mc->logits_soft_cap,
            .alibi_slopes = mc->alibi_slopes,
            .n_alibi_slopes = (uint32_t)mc->n_alibi_slopes,
            .sinks = mc->sinks,
            .n_sinks = (uint32_t)mc->n_sinks,
        };
        e = att_model_create(&cfg, &d, &model);
    }
    if (e != AT_OK) {
        attnd__v1__create_session_request__free_unpacked(rq, NULL);
        reply(c, e, &d, NULL);
        return;
    }
    /* the worker receives the resolved model, so both ends agree on every default */
    const att_model_t *m = model;
    size_t wbytes = (size_t)m->num_layers * sizeof(uint32_t);
    size_t abytes = m->alibi ? (size_t)m->num_query_heads * sizeof(float) : 0;
    size_t sbytes = m->sinks ? (size_t)m->num_query_heads * sizeof(float) : 0;
    c->items = malloc(wbytes + abytes + sbytes);
    if (c->items == NULL) {
        att_model_destroy(&model);
        attnd__v1__create_session_request__free_unpacked(rq, NULL);
        reply(c, AT_ERR_NOMEM, NULL, NULL);
        return;
    }
    memcpy(c->items, m->window, wbytes);
    if (abytes)
        memcpy((uint8_t *)c->items + wbytes, m->alibi, abytes);
    if (sbytes)
        memcpy((uint8_t *)c->items + wbytes + abytes, m->sinks, sbytes);
    c->job.req = (svc_req_t){
        .op = SVC_OP_CREATE,
        .kv_capacity_tokens = rq->kv_capacity_tokens,
        .num_layers = m->num_layers,
        .num_query_heads = m->num_query_heads,
        .num_kv_heads = m->num_kv_heads,
        .head_dim = m->head_dim,
        .dtype = (uint32_t)m->dtype,
        .block_size = m->block_size,
        .scale = m->scale,
        .soft_cap = m->soft_cap,
        .n_windows = m->num_layers,
        .n_alibi = m->alibi ? m->num_query_heads : 0,
        .n_sinks = m->sinks ? m->num_query_heads : 0,
    };
    c->job.items = c->items;
    c->job.items_len = wbytes + abytes + sbytes;
    c->job.done = create_done;
    ten_session_spec_t spec = {
        .name = rq->session,
        .model_name = mc->name,
        .layer_windows_given = mc->n_layer_sliding_window != 0,
        .sliding_window = mc->sliding_window,
        .kv_capacity_tokens = rq->kv_capacity_tokens,
        .device = svc_pool_device(pool),
        .device_handle = pool,
        .worker = svc_pool_pin(pool),
        .tenant = c->tenant,
        .kv_bytes = kv_bytes_of(m, rq->kv_capacity_tokens),
    };
    bool existing = false;
    e = ten_registry_begin_create(c->srv->registry, &spec, &model, &c->session, &existing, &d);
    if (e != AT_OK || existing)
        svc_pool_unpin(pool, spec.worker);
    if (e == AT_ERR_SESSION_EXISTS)
        at_diag_set(&d, e, "session '%s' exists with another config", spec.name);
    else if (e == AT_ERR_OVERLOADED)
        at_diag_set(&d, e, "session is being created by another call; retry");
    attnd__v1__create_session_request__free_unpacked(rq, NULL); /* spec points into it */
    if (e != AT_OK) {
        reply(c, e, &d, NULL);
        return;
    }
    if (existing && session_lost(c->session)) {
        reply(c, at_diag_set(&d, AT_ERR_SESSION_LOST, "close session '%s', then create it",
                             ten_session_name(c->session)), &d, NULL);
        return;
    }
    if (existing) {
        reply(c, AT_OK, NULL, pack_session_info(c->session));
        return;
    }
    c->pool = pool;
    c->job.req.session_id = ten_session_id(c->session);
    c->job.worker = spec.worker;
    submit(c);
}

/* ---- GetSession, ListSessions -------------------------------------------------------------- */

static void handle_get(call_t *c) {
    Attnd__V1__GetSessionRequest *rq =
        (Attnd__V1__GetSessionRequest *)unpack(c, &attnd__v1__get_session_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    at_err_t e = ten_registry_get(c->srv->registry, c->tenant, rq->session, &c->session);
    attnd__v1__get_session_request__free_unpacked(rq, NULL);
    reply(c, e, NULL, e == AT_OK ? pack_session_info(c->session) : NULL);
}

static void handle_list(call_t *c) {
    Attnd__V1__ListSessionsRequest *rq =
        (Attnd__V1__ListSessionsRequest *)unpack(c, &attnd__v1__list_sessions_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    attnd__v1__list_sessions_request__free_unpacked(rq, NULL);
    ten_session_t **all = NULL;
    size_t n = 0;
    at_err_t e = ten_registry_list(c->srv->registry, c->tenant, &all, &n);
    if (e != AT_OK) {
        reply(c, e, NULL, NULL);
        return;
    }
    Attnd__V1__SessionInfo *infos = calloc(n ? n : 1, sizeof *infos);
    Attnd__V1__ModelConfig *mcs = calloc(n ? n : 1, sizeof *mcs);
    Attnd__V1__SessionInfo **ptrs = calloc(n ? n : 1, sizeof *ptrs);
    ten_session_figures_t *figs = calloc(n ? n : 1, sizeof *figs);
    grpc_byte_buffer *bb = NULL;
    if (infos != NULL && mcs != NULL && ptrs != NULL && figs != NULL) {
        for (size_t i = 0; i < n; i++) {
            session_info(all[i], &infos[i], &mcs[i], &figs[i]);
            ptrs[i] = &infos[i];
        }
        Attnd__V1__ListSessionsResponse resp = ATTND__V1__LIST_SESSIONS_RESPONSE__INIT;
        resp.n_sessions = n;
        resp.sessions = ptrs;
        bb = pack(&resp.base);
    }
    for (size_t i = 0; i < n; i++)
        ten_session_unref(&all[i]);
    free(all);
    free(infos);
    free(mcs);
    free(ptrs);
    free(figs);
    reply(c, bb != NULL ? AT_OK : AT_ERR_NOMEM, NULL, bb);
}

/* ---- CloseSession, Release ----------------------------------------------------------------- */

static void close_done(svc_job_t *job, const svc_rep_t *rep) {
    call_t *c = job->arg;
    /* a session whose worker died meanwhile is gone as surely as a closed one */
    at_err_t e = rep->err == AT_ERR_SESSION_LOST || rep->err == AT_ERR_WORKER_LOST ? AT_OK
                                                                                    : rep->err;
    account(c, job, e);
    /* the name is gone either way: its quota is free before the caller hears back */
    ten_session_release_quota(c->session);
    at_diag_t d;
    diag_from(rep, &d);
    Attnd__V1__CloseSessionResponse resp = ATTND__V1__CLOSE_SESSION_RESPONSE__INIT;
    if (e == AT_OK)
        at_log(AT_LOG_INFO, "server", "session %s closed", ten_session_name(c->session));
    /* the name is gone either way: the session no longer counts on its worker */
    svc_pool_unpin(c->pool, job->worker);
    reply(c, e, &d, e == AT_OK ? pack(&resp.base) : NULL);
}

static void handle_close(call_t *c) {
    Attnd__V1__CloseSessionRequest *rq =
        (Attnd__V1__CloseSessionRequest *)unpack(c, &attnd__v1__close_session_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    at_err_t e = ten_registry_remove(c->srv->registry, c->tenant, rq->session, &c->session);
    attnd__v1__close_session_request__free_unpacked(rq, NULL);
    if (e != AT_OK) {
        reply(c, e, NULL, NULL);
        return;
    }
    c->pool = ten_session_device_handle(c->session);
    c->job.req = (svc_req_t){.op = SVC_OP_CLOSE, .session_id = ten_session_id(c->session)};
    c->job.worker = ten_session_worker(c->session);
    c->job.epoch = ten_session_worker_epoch(c->session);
    c->job.done = close_done;
    if (session_lost(c->session)) { /* nothing left on the device to free */
        svc_rep_t rep = {.magic = SVC_MSG_MAGIC, .err = AT_ERR_SESSION_LOST};
        c->job.arg = c;
        close_done(&c->job, &rep);
        return;
    }
    submit(c);
}

static void release_done(svc_job_t *job, const svc_rep_t *rep) {
    call_t *c = job->arg;
    account(c, job, rep->err);
    at_diag_t d;
    diag_from(rep, &d);
    Attnd__V1__ReleaseResponse resp = ATTND__V1__RELEASE_RESPONSE__INIT;
    if (rep->err == AT_OK) {
        ten_session_figures_t fig;
        figures_from(rep, &fig);
        ten_session_set_figures(c->session, &fig);
        resp.released = rep->released;
    }
    reply(c, rep->err, &d, rep->err == AT_OK ? pack(&resp.base) : NULL);
}

static void handle_release(call_t *c) {
    Attnd__V1__ReleaseRequest *rq =
        (Attnd__V1__ReleaseRequest *)unpack(c, &attnd__v1__release_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    at_err_t e = ten_registry_get(c->srv->registry, c->tenant, rq->session, &c->session);
    if (e == AT_OK && session_lost(c->session))
        e = AT_ERR_SESSION_LOST;
    size_t n = rq->n_seq_ids;
    if (e == AT_OK && n > UINT32_MAX)
        e = AT_ERR_WIRE_MALFORMED;
    if (e == AT_OK && (c->items = malloc(n ? n * sizeof(uint64_t) : 1)) == NULL)
        e = AT_ERR_NOMEM;
    if (e != AT_OK) {
        attnd__v1__release_request__free_unpacked(rq, NULL);
        reply(c, e, NULL, NULL);
        return;
    }
    if (n)
        memcpy(c->items, rq->seq_ids, n * sizeof(uint64_t));
    attnd__v1__release_request__free_unpacked(rq, NULL);
    c->pool = ten_session_device_handle(c->session);
    c->job.req = (svc_req_t){
        .op = SVC_OP_RELEASE, .session_id = ten_session_id(c->session), .num_items = (uint32_t)n};
    c->job.items = n ? c->items : NULL;
    c->job.items_len = n * sizeof(uint64_t);
    c->job.worker = ten_session_worker(c->session);
    c->job.epoch = ten_session_worker_epoch(c->session);
    c->job.done = release_done;
    submit(c);
}

/* ---- Attend ------------------------------------------------------------------------------ */

typedef struct out_slice {
    svc_arena_t *arena;
    uint64_t off;
} out_slice_t;

static void out_slice_free(void *p) {
    out_slice_t *o = p;
    svc_arena_free(o->arena, o->off);
    free(o);
}

static areq_t *areq_new(call_t *c, grpc_byte_buffer **payload) {
    areq_t *a = calloc(1, sizeof *a);
    if (a == NULL)
        return NULL;
    a->c = c;
    a->payload = *payload;
    *payload = NULL;
    svc_attend_req_init(&a->attend);
    a->job.arg = a;
    atomic_init(&a->job.cancelled, 0);
    return a;
}

static void areq_free(areq_t *a) {
    if (a == NULL)
        return;
    svc_arena_t *arena = a->pool != NULL ? svc_pool_arena(a->pool) : NULL;
    uint64_t offs[4] = {a->q_off, a->k_off, a->v_off, a->out_off};
    for (int i = 0; i < a->regions; i++)
        svc_arena_free(arena, offs[i]);
    ten_session_unref(&a->session);
    svc_attend_req_fini(&a->attend);
    if (a->payload != NULL)
        grpc_byte_buffer_destroy(a->payload);
    if (a->resp != NULL)
        grpc_byte_buffer_destroy(a->resp);
    free(a);
}

/* Gathers the payload's slices as segments (borrowed from the payload, which outlives their use).
 * Returns how many, or 0 when compressed or there are more than MAX_SEGS. */
static uint32_t payload_segs(grpc_byte_buffer *bb, svc_seg_t *segs) {
    if (bb == NULL || bb->type != GRPC_BB_RAW || bb->data.raw.compression != GRPC_COMPRESS_NONE)
        return 0;
    grpc_slice_buffer *sb = &bb->data.raw.slice_buffer;
    if (sb->count > MAX_SEGS)
        return 0;
    for (size_t i = 0; i < sb->count; i++)
        segs[i] = (svc_seg_t){GRPC_SLICE_START_PTR(sb->slices[i]), GRPC_SLICE_LENGTH(sb->slices[i])};
    return (uint32_t)sb->count;
}

/* Parses, checks, and stages the request in its device's arena (the one copy of q, k and v),
 * leaving a job ready to submit. On error nothing is queued; a->diag says why. */
static at_err_t areq_prepare(struct svc_server *srv, areq_t *a, int64_t deadline_ns,
                             bool append) {
    at_diag_t *d = &a->diag;
    svc_seg_t segs[MAX_SEGS];
    uint32_t nseg = payload_segs(a->payload, segs);
    grpc_slice flat = grpc_empty_slice();
    if (nseg == 0 && a->payload != NULL) { /* compressed, or very fragmented: flatten first */
        grpc_byte_buffer_reader rd;
        if (grpc_byte_buffer_reader_init(&rd, a->payload)) {
            flat = grpc_byte_buffer_reader_readall(&rd);
            grpc_byte_buffer_reader_destroy(&rd);
        }
    }
    if (nseg == 0) {
        segs[0] = (svc_seg_t){GRPC_SLICE_START_PTR(flat), GRPC_SLICE_LENGTH(flat)};
        nseg = 1;
    }
    at_err_t e = svc_wire_parse_attend(segs, nseg, &a->attend, d);
    if (e == AT_OK)
        e = ten_registry_get(srv->registry, a->c->tenant, a->attend.session, &a->session);
    if (e == AT_OK && session_lost(a->session))
        e = at_diag_set(d, AT_ERR_SESSION_LOST, "its device worker stopped");
    static const uint8_t marker = 0;
    uint64_t out_len = 0;
    if (e == AT_OK) {
        const att_model_t *m = ten_session_model(a->session);
        att_call_t call = {
            .layer = a->attend.layer,
            .chunks = a->attend.chunks,
            .num_chunks = a->attend.num_chunks,
            .q = a->attend.q.len ? &marker : NULL,
            .q_bytes = a->attend.q.len,
            .k = a->attend.k.len ? &marker : NULL,
            .k_bytes = a->attend.k.len,
            .v = a->attend.v.len ? &marker : NULL,
            .v_bytes = a->attend.v.len,
            .out = (void *)&marker,
            .out_bytes = a->attend.q.len, /* out has q's shape */
        };
        uint32_t tokens = 0;
        e = att_call_validate(m, &call, append ? 0 : 1, d, &tokens);
        out_len = append ? 0 : (uint64_t)tokens * att_model_row_bytes(m, m->num_query_heads);
        if (append)
            a->attend.q.len = 0; /* ignored: not staged */
    }
    if (e == AT_OK) {
        a->pool = ten_session_device_handle(a->session);
        svc_arena_t *arena = svc_pool_arena(a->pool);
        uint64_t *offs[4] = {&a->q_off, &a->k_off, &a->v_off, &a->out_off};
        uint64_t lens[4] = {a->attend.q.len, a->attend.k.len, a->attend.v.len, out_len};
        uint64_t need = 0;
        for (int i = 0; i < 4; i++)
            need += lens[i] + 64; /* the arena's alignment per region, at most */
        if (need > svc_arena_size(arena))
            e = at_diag_set(d, AT_ERR_MSG_TOO_LARGE,
                            "the call's tensors need %llu bytes of shared memory, the device has "
                            "%llu (--arena-mib)",
                            (unsigned long long)need, (unsigned long long)svc_arena_size(arena));
        for (int i = 0; i < 4 && e == AT_OK; i++)
            if ((e = svc_arena_alloc(arena, lens[i], offs[i])) == AT_OK)
                a->regions = i + 1;
        if (e == AT_OK) {
            uint8_t *base = svc_arena_base(arena);
            svc_wire_copy(segs, nseg, a->attend.q, base + a->q_off);
            svc_wire_copy(segs, nseg, a->attend.k, base + a->k_off);
            svc_wire_copy(segs, nseg, a->attend.v, base + a->v_off);
            a->job.req = (svc_req_t){
                .op = append ? SVC_OP_APPEND : SVC_OP_ATTEND,
                .session_id = ten_session_id(a->session),
                .deadline_ns = deadline_ns,
                .layer = a->attend.layer,
                .num_items = a->attend.num_chunks,
                .q_off = a->q_off, .k_off = a->k_off, .v_off = a->v_off, .out_off = a->out_off,
                .q_len = lens[0], .k_len = lens[1], .v_len = lens[2], .out_len = lens[3],
            };
            a->job.items = a->attend.chunks;
            a->job.items_len = (size_t)a->attend.num_chunks * sizeof(att_chunk_t);
            a->job.worker = ten_session_worker(a->session);
            a->job.epoch = ten_session_worker_epoch(a->session);
            set_flow(&a->job, a->c->tenant);
        }
    }
    grpc_slice_unref(flat);
    /* the request's bytes are in the arena now (or not needed): let gRPC's buffers go */
    if (a->payload != NULL) {
        grpc_byte_buffer_destroy(a->payload);
        a->payload = NULL;
    }
    return e;
}

/* Records the worker's answer in a: figures, error, and on success the response, sent straight
 * from the out region (a small header slice, then the region; the region is freed when gRPC
 * releases the slice). */
static void areq_result(areq_t *a, const svc_rep_t *rep) {
    diag_from(rep, &a->diag);
    a->err = rep->err;
    if (rep->err == AT_OK || rep->err == AT_ERR_KV_FULL || rep->err == AT_ERR_KV_PAST_END) {
        ten_session_figures_t fig;
        figures_from(rep, &fig);
        ten_session_set_figures(a->session, &fig);
    }
    if (rep->err != AT_OK)
        return;
    svc_arena_t *arena = svc_pool_arena(a->pool);
    uint64_t len = a->job.req.out_len;
    uint8_t hdr[16];
    size_t hn = svc_wire_len_header(1, len, hdr);
    out_slice_t *os = malloc(sizeof *os);
    if (os == NULL) {
        a->err = AT_ERR_NOMEM;
        return;
    }
    *os = (out_slice_t){arena, a->out_off};
    grpc_slice parts[2] = {
        grpc_slice_from_copied_buffer((const char *)hdr, hn),
        grpc_slice_new_with_user_data(svc_arena_base(arena) + a->out_off, len, out_slice_free, os),
    };
    a->regions = 3; /* the out region belongs to the slice now */
    a->resp = grpc_raw_byte_buffer_create(parts, 2);
    grpc_slice_unref(parts[0]);
    grpc_slice_unref(parts[1]);
}

static void attend_done(svc_job_t *job, const svc_rep_t *rep) {
    areq_t *a = job->arg;
    call_t *c = a->c;
    account(c, job, rep->err);
    areq_result(a, rep);
    grpc_byte_buffer *resp = a->resp;
    a->resp = NULL;
    reply(c, a->err, &a->diag, resp);
}

static void append_done(svc_job_t *job, const svc_rep_t *rep) {
    areq_t *a = job->arg;
    account(a->c, job, rep->err);
    areq_result(a, rep);
    if (a->resp != NULL) { /* an append answers with an empty message, not with out */
        grpc_byte_buffer_destroy(a->resp);
        a->resp = NULL;
    }
    Attnd__V1__AppendResponse resp = ATTND__V1__APPEND_RESPONSE__INIT;
    reply(a->c, a->err, &a->diag, a->err == AT_OK ? pack(&resp.base) : NULL);
}

/* Attend and Append. */
static void handle_attend(call_t *c) {
    areq_t *a = areq_new(c, &c->payload);
    if (a == NULL) {
        reply(c, AT_ERR_NOMEM, NULL, NULL);
        return;
    }
    c->ar = a;
    at_err_t e = areq_prepare(c->srv, a, deadline_mono_ns(c), c->method == M_APPEND);
    if (e != AT_OK) {
        reply(c, e, &a->diag, NULL);
        return;
    }
    a->job.done = c->method == M_APPEND ? append_done : attend_done;
    e = svc_pool_submit(a->pool, &a->job);
    if (e != AT_OK)
        reply(c, e, NULL, NULL);
}

/* ---- AttendStream --------------------------------------------------------------------------- */
/* One response per request, in request order; requests are read ahead and run as they come (one
 * session's in arrival order). A request that fails ends the stream with its status after every
 * earlier response has been sent; later requests are cancelled (not run, or their results not
 * sent). Everything below runs under the call's mu. */

static void stream_status(call_t *c, at_err_t e, const at_diag_t *diag) {
    char msg[512];
    if (e == AT_OK)
        snprintf(msg, sizeof msg, "OK");
    else
        snprintf(msg, sizeof msg, "%s%s%s", at_err_str(e), diag && diag->msg[0] ? ": " : "",
                 diag && diag->msg[0] ? diag->msg : "");
    c->finished = true;
    record(c, e);
    grpc_slice_unref(c->status_details);
    c->status_details = grpc_slice_from_copied_string(msg);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    op.data.send_status_from_server.status = svc_status_of(e);
    op.data.send_status_from_server.status_details = &c->status_details;
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    if (start_batch(c, &op, 1, &c->t_sent) != GRPC_CALL_OK)
        atomic_fetch_sub_explicit(&c->refs, 1, memory_order_relaxed);
    for (areq_t *a = c->fifo_head; a != NULL; a = a->next) /* nothing after this is sent */
        atomic_store_explicit(&a->job.cancelled, 1, memory_order_release);
}

static void stream_recv(call_t *c) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    if (start_batch(c, &op, 1, &c->t_recv) != GRPC_CALL_OK) {
        atomic_fetch_sub_explicit(&c->refs, 1, memory_order_relaxed);
        c->half_closed = true;
    }
}

/* Sends what is ready at the head of the queue, or the final status. */
static void stream_flush(call_t *c) {
    if (c->finished || c->send_busy)
        return;
    areq_t *a = c->fifo_head;
    if (a != NULL && a->done) {
        if (a->err != AT_OK) {
            stream_status(c, a->err, &a->diag);
            return;
        }
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_SEND_MESSAGE;
        op.data.send_message.send_message = a->resp;
        c->send_busy = true;
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
        if (start_batch(c, &op, 1, &c->t_send) != GRPC_CALL_OK) {
            atomic_fetch_sub_explicit(&c->refs, 1, memory_order_relaxed);
            c->send_busy = false;
            stream_status(c, AT_ERR_INTERNAL, NULL);
        }
        return;
    }
    if (a == NULL && c->half_closed)
        stream_status(c, AT_OK, NULL);
}

static void stream_push(call_t *c, areq_t *a) {
    a->next = NULL;
    if (c->fifo_tail != NULL)
        c->fifo_tail->next = a;
    else
        c->fifo_head = a;
    c->fifo_tail = a;
}

static void stream_job_done(svc_job_t *job, const svc_rep_t *rep) {
    areq_t *a = job->arg;
    call_t *c = a->c;
    account(c, job, rep->err);
    areq_result(a, rep);
    pthread_mutex_lock(&c->mu);
    a->done = true;
    stream_flush(c);
    pthread_mutex_unlock(&c->mu);
    call_unref(c); /* the queued request's */
}

static void on_stream_recv(call_t *c, bool ok) {
    pthread_mutex_lock(&c->mu);
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    if (!ok || bb == NULL || c->finished) {
        if (bb != NULL)
            grpc_byte_buffer_destroy(bb);
        c->half_closed = true;
        stream_flush(c);
        pthread_mutex_unlock(&c->mu);
        return;
    }
    areq_t *a = areq_new(c, &bb);
    at_err_t e = a == NULL ? AT_ERR_NOMEM : areq_prepare(c->srv, a, deadline_mono_ns(c), false);
    if (a == NULL) {
        grpc_byte_buffer_destroy(bb);
        stream_status(c, e, NULL);
    } else if (e != AT_OK) {
        /* its error is this request's answer, in order: no more reading */
        a->done = true;
        a->err = e;
        stream_push(c, a);
        c->half_closed = true;
        stream_flush(c);
    } else {
        a->job.done = stream_job_done;
        stream_push(c, a);
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed); /* the queued request's */
        e = svc_pool_submit(a->pool, &a->job);
        if (e != AT_OK) {
            atomic_fetch_sub_explicit(&c->refs, 1, memory_order_relaxed);
            a->done = true;
            a->err = e;
            c->half_closed = true;
            stream_flush(c);
        } else {
            stream_recv(c);
        }
    }
    pthread_mutex_unlock(&c->mu);
}

static void on_stream_sent(call_t *c, bool ok) {
    pthread_mutex_lock(&c->mu);
    areq_t *a = c->fifo_head;
    c->fifo_head = a->next;
    if (c->fifo_head == NULL)
        c->fifo_tail = NULL;
    c->send_busy = false;
    if (!ok && !c->finished) /* the client is gone */
        stream_status(c, AT_ERR_CANCELLED, NULL);
    stream_flush(c);
    pthread_mutex_unlock(&c->mu);
    areq_free(a);
}

static void handle_stream(call_t *c) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_INITIAL_METADATA;
    pthread_mutex_lock(&c->mu);
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    if (start_batch(c, &op, 1, &c->t_meta) != GRPC_CALL_OK)
        atomic_fetch_sub_explicit(&c->refs, 1, memory_order_relaxed);
    else
        c->send_busy = true; /* one send op at a time: messages wait for the metadata */
    stream_recv(c);
    pthread_mutex_unlock(&c->mu);
    call_unref(c); /* the handler's; the batches hold the call from here */
}

/* ---- GetStats ------------------------------------------------------------------------------ */

static void handle_stats(call_t *c) {
    Attnd__V1__GetStatsRequest *rq =
        (Attnd__V1__GetStatsRequest *)unpack(c, &attnd__v1__get_stats_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    attnd__v1__get_stats_request__free_unpacked(rq, NULL);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(c->tenant, &st);
    Attnd__V1__StatusCount counts[TEN_STATUS_COUNT];
    Attnd__V1__StatusCount *count_ptrs[TEN_STATUS_COUNT];
    size_t n = 0;
    for (uint32_t code = 0; code < TEN_STATUS_COUNT; code++) {
        if (st.by_status[code] == 0)
            continue;
        attnd__v1__status_count__init(&counts[n]);
        counts[n].status = (char *)svc_status_name((grpc_status_code)code);
        counts[n].calls = st.by_status[code];
        count_ptrs[n] = &counts[n];
        n++;
    }
    Attnd__V1__TenantStats ts = ATTND__V1__TENANT_STATS__INIT;
    ts.tenant = (char *)ten_tenant_name(c->tenant);
    ts.weight = ten_tenant_weight(c->tenant);
    ts.calls = st.calls;
    ts.n_by_status = n;
    ts.by_status = count_ptrs;
    ts.tokens = st.tokens;
    ts.work = st.work;
    ts.queue_ns = st.queue_ns;
    ts.device_ns = st.device_ns;
    ts.sessions = st.sessions;
    ts.kv_bytes = st.kv_bytes;
    ts.inflight_calls = st.inflight_calls;
    Attnd__V1__TenantStats *one[1] = {&ts};
    Attnd__V1__GetStatsResponse resp = ATTND__V1__GET_STATS_RESPONSE__INIT;
    resp.n_tenants = 1;
    resp.tenants = one;
    reply(c, AT_OK, NULL, pack(&resp.base));
}

/* ---- Health -------------------------------------------------------------------------------- */

/* Health service names: "" and "attnd.v1.Attention", the server, SERVING while any device has
 * a worker up; "attnd.device.<device>" (attnd.device.cuda:0), that device, SERVING while one of
 * its workers is up (NOT_SERVING while its only worker restarts). Everything is NOT_SERVING once
 * the server drains. */
#define DEVICE_SERVICE_PREFIX "attnd.device."

/* True when name is one of ours; *pool is the device it names, or NULL for the server. */
static bool health_service(struct svc_server *s, const char *name, svc_pool_t **pool) {
    const size_t plen = sizeof DEVICE_SERVICE_PREFIX - 1;
    *pool = NULL;
    if (name[0] == '\0' || strcmp(name, "attnd.v1.Attention") == 0)
        return true;
    if (strncmp(name, DEVICE_SERVICE_PREFIX, plen) != 0)
        return false;
    for (uint32_t i = 0; i < s->num_pools; i++)
        if (strcmp(svc_pool_device(s->pools[i]), name + plen) == 0) {
            *pool = s->pools[i];
            return true;
        }
    return false;
}

static int serving_status(struct svc_server *s, svc_pool_t *pool) {
    bool up = pool != NULL && svc_pool_serving(pool);
    for (uint32_t i = 0; pool == NULL && i < s->num_pools && !up; i++)
        up = svc_pool_serving(s->pools[i]);
    return up && !atomic_load(&s->draining)
               ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
               : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static void handle_health_check(call_t *c) {
    Grpc__Health__V1__HealthCheckRequest *rq = (Grpc__Health__V1__HealthCheckRequest *)unpack(
        c, &grpc__health__v1__health_check_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    svc_pool_t *pool = NULL;
    bool known = health_service(c->srv, rq->service, &pool);
    grpc__health__v1__health_check_request__free_unpacked(rq, NULL);
    if (!known) {
        /* the health protocol answers an unknown service name with NOT_FOUND */
        reply(c, AT_ERR_HEALTH_SERVICE, NULL, NULL);
        return;
    }
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = serving_status(c->srv, pool);
    reply(c, AT_OK, NULL, pack(&resp.base));
}

/* Health Watch: the current status at once, then a message on each change: a device's worker
 * going down or coming up (the pools tell watch_devices), and NOT_SERVING when the server
 * drains; the stream then ends with UNAVAILABLE so watchers do not hold the shutdown. An unknown service name is answered SERVICE_UNKNOWN on the stream,
 * not with an error, as the health protocol says. Calls in the watcher list are finished by
 * svc_server_drain; a watcher that leaves is taken out on its T_CLOSE. */

static int watch_status(const call_t *c) {
    if (!c->watch_known)
        return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
    return serving_status(c->srv, c->watch_pool);
}

/* Sends the status when it changed, or ends the stream once the server drains; under c->mu. */
static void watch_flush(call_t *c) {
    if (c->finished || c->send_busy)
        return;
    int want = watch_status(c);
    if (want == c->watch_sent) {
        if (atomic_load(&c->srv->draining))
            stream_status(c, AT_ERR_SHUTTING_DOWN, NULL);
        return;
    }
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = want;
    if (c->response != NULL)
        grpc_byte_buffer_destroy(c->response);
    c->response = pack(&resp.base);
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (c->watch_sent < 0)
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = c->response;
    c->send_busy = true;
    c->watch_sent = want;
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    if (c->response == NULL || start_batch(c, ops, n, &c->t_send) !=
                                   GRPC_CALL_OK) {
        atomic_fetch_sub_explicit(&c->refs, 1, memory_order_relaxed);
        c->send_busy = false;
        stream_status(c, AT_ERR_INTERNAL, NULL);
    }
}

static void on_watch_sent(call_t *c, bool ok) {
    pthread_mutex_lock(&c->mu);
    c->send_busy = false;
    if (!ok && !c->finished) /* the client is gone */
        stream_status(c, AT_ERR_CANCELLED, NULL);
    watch_flush(c);
    pthread_mutex_unlock(&c->mu);
}

/* Takes c out of the watcher list, dropping the list's reference; nothing when it is not there. */
static void watch_remove(call_t *c) {
    struct svc_server *s = c->srv;
    bool found = false;
    pthread_mutex_lock(&s->watch_mu);
    for (call_t **link = &s->watchers; *link != NULL; link = &(*link)->watch_next)
        if (*link == c) {
            *link = c->watch_next;
            found = true;
            break;
        }
    pthread_mutex_unlock(&s->watch_mu);
    if (found)
        call_unref(c);
}

static void handle_health_watch(call_t *c) {
    struct svc_server *s = c->srv;
    Grpc__Health__V1__HealthCheckRequest *rq = (Grpc__Health__V1__HealthCheckRequest *)unpack(
        c, &grpc__health__v1__health_check_request__descriptor);
    if (rq == NULL) {
        reply(c, AT_ERR_WIRE_MALFORMED, NULL, NULL);
        return;
    }
    svc_pool_t *pool = NULL;
    bool known = health_service(s, rq->service, &pool);
    grpc__health__v1__health_check_request__free_unpacked(rq, NULL);
    /* Listed before the first send, unless draining began: drain then never sees this call, and
     * watch_flush ends it after its one NOT_SERVING message. */
    pthread_mutex_lock(&s->watch_mu);
    if (!atomic_load(&s->draining)) {
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed); /* the list's */
        c->watch_next = s->watchers;
        s->watchers = c;
    }
    pthread_mutex_unlock(&s->watch_mu);
    pthread_mutex_lock(&c->mu);
    c->watch_known = known;
    c->watch_pool = pool;
    c->watch_sent = -1;
    watch_flush(c);
    pthread_mutex_unlock(&c->mu);
    call_unref(c); /* the handler's; the batches and the list hold the call from here */
}

/* A device's worker went down or came up: every watcher sends its status if it changed. On a
 * pool's dispatcher thread, under the pool's listener lock only. */
static void watch_devices(void *arg) {
    struct svc_server *s = arg;
    pthread_mutex_lock(&s->watch_mu);
    size_t n = 0;
    for (call_t *c = s->watchers; c != NULL; c = c->watch_next)
        n++;
    call_t **list = malloc((n ? n : 1) * sizeof *list);
    n = 0;
    for (call_t *c = s->watchers; c != NULL && list != NULL; c = c->watch_next) {
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
        list[n++] = c;
    }
    pthread_mutex_unlock(&s->watch_mu);
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&list[i]->mu);
        watch_flush(list[i]);
        pthread_mutex_unlock(&list[i]->mu);
        call_unref(list[i]);
    }
    free(list);
}

/* Tells every watcher that the server is going; under no lock. */
static void watch_drain(struct svc_server *s) {
    pthread_mutex_lock(&s->watch_mu);
    call_t *list = s->watchers;
    s->watchers = NULL;
    pthread_mutex_unlock(&s->watch_mu);
    while (list != NULL) {
        call_t *c = list;
        list = c->watch_next;
        pthread_mutex_lock(&c->mu);
        watch_flush(c);
        pthread_mutex_unlock(&c->mu);
        call_unref(c); /* the list's */
    }
}

/* ---- authentication ------------------------------------------------------------------------ */

static bool slice_is(grpc_slice sl, const char *text) {
    size_t n = strlen(text);
    return GRPC_SLICE_LENGTH(sl) == n && memcmp(GRPC_SLICE_START_PTR(sl), text, n) == 0;
}

/* The `authorization` entry of md[0..n), or NULL. */
static const grpc_metadata *find_authorization(const grpc_metadata *md, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (slice_is(md[i].key, "authorization"))
            return &md[i];
    return NULL;
}

/* True when md[0..n) holds a :path of the health service. */
static bool is_health_call(const grpc_metadata *md, size_t n) {
    const size_t plen = sizeof HEALTH_PREFIX - 1;
    for (size_t i = 0; i < n; i++)
        if (slice_is(md[i].key, ":path"))
            return GRPC_SLICE_LENGTH(md[i].value) > plen &&
                   memcmp(GRPC_SLICE_START_PTR(md[i].value), HEALTH_PREFIX, plen) == 0;
    return false;
}

/* gRPC's auth metadata processor: runs on a gRPC thread for every call, before the call is
 * handed to a queue thread and before its body is read (see the top). */
static void auth_process(void *state, grpc_auth_context *ctx, const grpc_metadata *md,
                         size_t num_md, grpc_process_auth_metadata_done_cb cb, void *user_data) {
    struct svc_server *s = state;
    (void)ctx;
    if (is_health_call(md, num_md)) {
        cb(user_data, NULL, 0, NULL, 0, GRPC_STATUS_OK, NULL);
        return;
    }
    const grpc_metadata *authz = find_authorization(md, num_md);
    ten_tenant_t *t = NULL;
    at_diag_t d = {{0}};
    at_err_t e = ten_tenants_authenticate(
        s->tenants, authz ? (const char *)GRPC_SLICE_START_PTR(authz->value) : NULL,
        authz ? GRPC_SLICE_LENGTH(authz->value) : 0, &t, &d);
    if (e == AT_ERR_AUTH_MISSING)
        at_diag_set(&d, e, AUTH_MISSING_HINT);
    if (e != AT_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s%s%s", at_err_str(e), d.msg[0] ? ": " : "", d.msg);
        at_log(AT_LOG_DEBUG, "server", "call refused: %s", msg);
        cb(user_data, NULL, 0, NULL, 0, svc_status_of(e), msg);
        return;
    }
    ten_tenant_unref(&t);
    cb(user_data, NULL, 0, NULL, 0, GRPC_STATUS_OK, NULL);
}

/* ---- the completion-queue loop -------------------------------------------------------------- */

static void arm(struct svc_server *s, method_t method, uint32_t cq_index) {
    if (atomic_load(&s->draining))
        return;
    call_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        at_log(AT_LOG_ERROR, "server", "out of memory arming a call");
        return;
    }
    c->srv = s;
    c->method = method;
    c->cq_index = cq_index;
    c->t_new = (tag_t){c, T_NEW};
    c->t_close = (tag_t){c, T_CLOSE};
    c->t_sent = (tag_t){c, T_SENT};
    c->status_details = grpc_empty_slice();
    atomic_init(&c->refs, 1); /* the NEW tag's */
    pthread_mutex_init(&c->mu, NULL);
    grpc_metadata_array_init(&c->md);
    c->t_recv = (tag_t){c, T_RECV};
    c->t_send = (tag_t){c, T_SEND};
    c->t_meta = (tag_t){c, T_META};
    grpc_completion_queue *cq = s->cqs[cq_index];
    grpc_call_error ce;
    AT_TSAN_RELEASE(&c->t_new);
    if (method == M_UNKNOWN) {
        grpc_call_details_init(&c->details);
        ce = grpc_server_request_call(s->server, &c->call, &c->details, &c->md, cq, cq, &c->t_new);
    } else {
        /* a streaming method reads its messages itself: it must not ask for a payload */
        ce = grpc_server_request_registered_call(s->server, s->methods[method], &c->call,
                                                 &c->deadline, &c->md,
                                                 method == M_STREAM ? NULL : &c->payload, cq, cq,
                                                 &c->t_new);
    }
    if (ce != GRPC_CALL_OK) {
        at_log(AT_LOG_ERROR, "server", "request_call failed: %d", (int)ce);
        call_unref(c);
    }
}

/* The call's tenant (from its own metadata; the open tenant without a tenants file) and one of
 * its in-flight slots, before the body is parsed. On failure the call is answered and false
 * returned. */
static bool admit_call(call_t *c) {
    at_diag_t d = {{0}};
    const grpc_metadata *authz = find_authorization(c->md.metadata, c->md.count);
    at_err_t e = ten_tenants_authenticate(
        c->srv->tenants, authz ? (const char *)GRPC_SLICE_START_PTR(authz->value) : NULL,
        authz ? GRPC_SLICE_LENGTH(authz->value) : 0, &c->tenant, &d);
    if (e == AT_ERR_AUTH_MISSING)
        at_diag_set(&d, e, AUTH_MISSING_HINT);
    if (e == AT_OK && (e = ten_tenant_reserve_call(c->tenant, &d)) == AT_OK)
        c->holds_slot = true;
    if (e != AT_OK) {
        reply(c, e, &d, NULL);
        return false;
    }
    return true;
}

static void on_new(call_t *c) {
    struct svc_server *s = c->srv;
    arm(s, c->method, c->cq_index);
    /* learn about cancellation while the call waits for its device */
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    atomic_fetch_add_explicit(&c->refs, 2, memory_order_relaxed); /* the batch's, the handler's */
    pthread_mutex_lock(&c->mu);
    grpc_call_error ce = start_batch(c, &op, 1, &c->t_close);
    pthread_mutex_unlock(&c->mu);
    call_unref(c); /* the NEW tag's */
    if (ce != GRPC_CALL_OK) {
        call_unref(c);
        call_unref(c);
        return;
    }
    bool open_method = c->method == M_HEALTH_CHECK || c->method == M_HEALTH_WATCH ||
                       c->method == M_UNKNOWN;
    if (!open_method && !admit_call(c))
        return;
    switch (c->method) {
    case M_CREATE: handle_create(c); break;
    case M_GET: handle_get(c); break;
    case M_LIST: handle_list(c); break;
    case M_CLOSE: handle_close(c); break;
    case M_ATTEND:
    case M_APPEND: handle_attend(c); break;
    case M_STREAM: handle_stream(c); break;
    case M_RELEASE: handle_release(c); break;
    case M_STATS: handle_stats(c); break;
    case M_HEALTH_CHECK: handle_health_check(c); break;
    case M_HEALTH_WATCH: handle_health_watch(c); break;
    default: {
        at_diag_t d;
        at_diag_set(&d, AT_ERR_UNSUPPORTED, "no method %.*s",
                    (int)GRPC_SLICE_LENGTH(c->details.method),
                    (const char *)GRPC_SLICE_START_PTR(c->details.method));
        reply(c, AT_ERR_UNSUPPORTED, &d, NULL);
        break;
    }
    }
}

typedef struct cq_arg {
    struct svc_server *s;
    uint32_t i;
} cq_arg_t;

static void *cq_main(void *arg) {
    cq_arg_t a = *(cq_arg_t *)arg;
    free(arg);
    struct svc_server *s = a.s;
    uint32_t i = a.i;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cqs[i], gpr_inf_future(GPR_CLOCK_REALTIME),
                                                   NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        tag_t *t = ev.tag;
        AT_TSAN_ACQUIRE(t);
        if (t == &s->shutdown_tag) {
            pthread_mutex_lock(&s->shut_mu);
            s->shut_done = true;
            pthread_cond_broadcast(&s->shut_cv);
            pthread_mutex_unlock(&s->shut_mu);
            continue;
        }
        call_t *c = t->c;
        switch (t->kind) {
        case T_NEW:
            if (!ev.success) /* the server is shutting down */
                call_unref(c);
            else
                on_new(c);
            break;
        case T_CLOSE:
            if (c->method == M_HEALTH_WATCH) {
                pthread_mutex_lock(&c->mu);
                c->finished = true; /* the call is over: nothing more to send */
                pthread_mutex_unlock(&c->mu);
                watch_remove(c);
            }
            if (c->cancelled) {
                pthread_mutex_lock(&c->mu);
                atomic_store_explicit(&c->job.cancelled, 1, memory_order_release);
                if (c->ar != NULL)
                    atomic_store_explicit(&c->ar->job.cancelled, 1, memory_order_release);
                for (areq_t *q = c->fifo_head; q != NULL; q = q->next)
                    atomic_store_explicit(&q->job.cancelled, 1, memory_order_release);
                pthread_mutex_unlock(&c->mu);
            }
            call_unref(c);
            break;
        case T_SENT: call_unref(c); break;
        case T_RECV:
            on_stream_recv(c, ev.success);
            call_unref(c);
            break;
        case T_META:
            pthread_mutex_lock(&c->mu);
            c->send_busy = false;
            stream_flush(c);
            pthread_mutex_unlock(&c->mu);
            call_unref(c);
            break;
        case T_SEND:
            if (c->method == M_HEALTH_WATCH)
                on_watch_sent(c, ev.success);
            else
                on_stream_sent(c, ev.success);
            call_unref(c);
            break;
        }
    }
    return NULL;
}

at_err_t svc_server_create(const svc_server_cfg_t *cfg, at_diag_t *diag, svc_server_t **out) {
    if (cfg->num_pools == 0)
        return at_diag_set(diag, AT_ERR_CONFIG, "no devices");
    struct svc_server *s = calloc(1, sizeof *s);
    if (s == NULL)
        return AT_ERR_NOMEM;
    s->pools = malloc(cfg->num_pools * sizeof *s->pools);
    if (s->pools == NULL) {
        free(s);
        return AT_ERR_NOMEM;
    }
    memcpy(s->pools, cfg->pools, cfg->num_pools * sizeof *s->pools);
    s->tenants = cfg->tenants;
    s->num_pools = cfg->num_pools;
    s->num_cqs = cfg->cq_threads != 0 ? cfg->cq_threads : 2;
    atomic_init(&s->draining, false);
    pthread_mutex_init(&s->watch_mu, NULL);
    pthread_mutex_init(&s->shut_mu, NULL);
    pthread_cond_init(&s->shut_cv, NULL);
    s->shutdown_tag = (tag_t){NULL, T_SENT};
    at_err_t e = ten_registry_create(&s->registry);
    if (e == AT_OK && s->tenants == NULL && (e = ten_tenants_create_open(&s->own_tenants)) == AT_OK)
        s->tenants = s->own_tenants;
    if (e != AT_OK) {
        ten_registry_destroy(&s->registry);
        free(s->pools);
        free(s);
        return e;
    }
    grpc_init();
    int max_msg = cfg->max_message_bytes != 0 && cfg->max_message_bytes < INT32_MAX
                      ? (int)cfg->max_message_bytes
                      : 256 << 20;
    int max_streams = cfg->max_streams != 0 ? (int)cfg->max_streams : 1024;
    grpc_arg args[4] = {
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = max_msg},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = max_msg},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_CONCURRENT_STREAMS, .value.integer = max_streams},
        {.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_METADATA_SIZE, .value.integer = 16 << 10},
    };
    grpc_channel_args ch = {.num_args = 4, .args = args};
    s->server = grpc_server_create(&ch, NULL);
    for (int m = 0; m < M_COUNT; m++) {
        grpc_server_register_method_payload_handling ph =
            m == M_STREAM ? GRPC_SRM_PAYLOAD_NONE : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER;
        s->methods[m] = grpc_server_register_method(s->server, method_paths[m], NULL, ph, 0);
    }
    s->cqs = calloc(s->num_cqs, sizeof *s->cqs);
    s->threads = calloc(s->num_cqs, sizeof *s->threads);
    if (s->cqs == NULL || s->threads == NULL) {
        e = AT_ERR_NOMEM;
        goto out_free;
    }
    for (uint32_t i = 0; i < s->num_cqs; i++) {
        s->cqs[i] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(s->server, s->cqs[i], NULL);
    }
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    if (!ten_tenants_is_open(s->tenants)) {
        grpc_auth_metadata_processor proc = {.process = auth_process, .destroy = NULL, .state = s};
        grpc_server_credentials_set_auth_metadata_processor(creds, proc);
    }
    s->port = grpc_server_add_http2_port(s->server, cfg->listen, creds);
    grpc_server_credentials_release(creds);
    if (s->port == 0) {
        e = at_diag_set(diag, AT_ERR_CONFIG, "cannot listen on %s (bad address, or in use)",
                        cfg->listen);
        goto out_free;
    }
    /* Threads first: if one cannot start, nothing has been promised to a client yet. */
    uint32_t started = 0;
    for (; started < s->num_cqs; started++) {
        cq_arg_t *a = malloc(sizeof *a);
        if (a != NULL)
            *a = (cq_arg_t){s, started};
        if (a == NULL || pthread_create(&s->threads[started], NULL, cq_main, a) != 0) {
            free(a);
            e = at_diag_set(diag, AT_ERR_IO, "cannot start completion-queue thread %u", started);
            break;
        }
    }
    if (started < s->num_cqs) {
        for (uint32_t i = 0; i < s->num_cqs; i++)
            grpc_completion_queue_shutdown(s->cqs[i]);
        for (uint32_t i = 0; i < started; i++)
            pthread_join(s->threads[i], NULL);
        for (uint32_t i = started; i < s->num_cqs; i++)
            while (grpc_completion_queue_next(s->cqs[i], gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
                       .type != GRPC_QUEUE_SHUTDOWN) {
            }
        grpc_server_destroy(s->server);
        for (uint32_t i = 0; i < s->num_cqs; i++)
            grpc_completion_queue_destroy(s->cqs[i]);
        goto out_mem;
    }
    grpc_server_start(s->server);
    for (uint32_t i = 0; i < s->num_cqs; i++)
        for (int m = 0; m <= M_UNKNOWN; m++)
            for (int k = 0; k < (m == M_UNKNOWN ? 1 : CALLS_PER_METHOD); k++)
                arm(s, (method_t)m, i);
    *out = s;
    for (uint32_t i = 0; i < s->num_pools; i++)
        svc_pool_set_listener(s->pools[i], watch_devices, s);
    return AT_OK;
out_free:
    if (s->cqs != NULL)
        for (uint32_t i = 0; i < s->num_cqs; i++)
            if (s->cqs[i] != NULL) {
                grpc_completion_queue_shutdown(s->cqs[i]);
                while (grpc_completion_queue_next(s->cqs[i], gpr_inf_future(GPR_CLOCK_REALTIME),
                                                  NULL).type != GRPC_QUEUE_SHUTDOWN) {
                }
            }
    grpc_server_destroy(s->server);
    for (uint32_t i = 0; s->cqs != NULL && i < s->num_cqs; i++)
        if (s->cqs[i] != NULL)
            grpc_completion_queue_destroy(s->cqs[i]);
out_mem:
    free(s->pools);
    free(s->cqs);
    free(s->threads);
    ten_registry_destroy(&s->registry);
    ten_tenants_destroy(&s->own_tenants);
    pthread_mutex_destroy(&s->watch_mu);
    pthread_mutex_destroy(&s->shut_mu);
    pthread_cond_destroy(&s->shut_cv);
    free(s);
    grpc_shutdown();
    return e;
}

int svc_server_port(const svc_server_t *s) { return s->port; }

static bool wait_shutdown(struct svc_server *s, uint32_t ms) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (long)(ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&s->shut_mu);
    while (!s->shut_done)
        if (pthread_cond_timedwait(&s->shut_cv, &s->shut_mu, &until) != 0)
            break;
    bool done = s->shut_done;
    pthread_mutex_unlock(&s->shut_mu);
    return done;
}

void svc_server_drain(svc_server_t *s, uint32_t grace_ms) {
    if (atomic_exchange(&s->draining, true))
        return;
    at_log(AT_LOG_INFO, "server", "draining: no new calls; %u ms for in-flight ones", grace_ms);
    /* no pool calls back once this returns: pools may be destroyed from here on */
    for (uint32_t i = 0; i < s->num_pools; i++)
        svc_pool_set_listener(s->pools[i], NULL, NULL);
    watch_drain(s);
    grpc_server_shutdown_and_notify(s->server, s->cqs[0], &s->shutdown_tag);
    if (!wait_shutdown(s, grace_ms)) {
        at_log(AT_LOG_WARN, "server", "grace period over: cancelling the calls left");
        grpc_server_cancel_all_calls(s->server);
    }
}

void svc_server_destroy(svc_server_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    struct svc_server *s = *sp;
    svc_server_drain(s, 0);
    while (!wait_shutdown(s, 1000))
        at_log(AT_LOG_INFO, "server", "waiting for calls to end");
    for (uint32_t i = 0; i < s->num_cqs; i++)
        grpc_completion_queue_shutdown(s->cqs[i]);
    for (uint32_t i = 0; i < s->num_cqs; i++)
        pthread_join(s->threads[i], NULL);
    grpc_server_destroy(s->server);
    for (uint32_t i = 0; i < s->num_cqs; i++)
        grpc_completion_queue_destroy(s->cqs[i]);
    free(s->cqs);
    free(s->threads);
    ten_registry_destroy(&s->registry);
    ten_tenants_destroy(&s->own_tenants);
    pthread_mutex_destroy(&s->watch_mu);
    pthread_mutex_destroy(&s->shut_mu);
    pthread_cond_destroy(&s->shut_cv);
    free(s->pools);
    free(s);
    grpc_shutdown();
    *sp = NULL;
}

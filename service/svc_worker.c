/* A device's worker (see svc_worker.h).
 *
 * Thread model: one thread (its own), blocking on its socket; no locks. Sessions are kept in a
 * small array searched linearly: a device holds tens of sessions, and a lookup is nothing next to
 * an attention call. A job is checked against its deadline just before it runs. As a process
 * (svc_worker_main) the same loop runs on the process's main thread.
 * Tuning (att_tune.h) runs on this thread too, one step at a time and only while no request is
 * waiting on the socket, so a call is never queued behind a whole tuning job. */
#include "service/svc_worker.h"

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "attention/att_cpu.h"
#ifdef AT_HAVE_CUDA
#include "attention/att_cuda.h"
#include "attention/att_cudrv.h"
#endif
#ifdef AT_HAVE_HIP
#include "attention/att_hip.h"
#endif
#include "attention/att_ctx.h"
#include "attention/att_gpu_open.h"
#include "attention/att_tune.h"
#include "common/at_log.h"
#include "service/svc_arena.h"
#include "service/svc_msg.h"

typedef struct wsession {
    uint64_t id;
    att_ctx_t *ctx;          /* owned; NULL on the null device */
    att_tuner_t *tuner;      /* owned; NULL on the null device */
    uint64_t capacity_tokens; /* the null device's: whole blocks */
    uint64_t calls;          /* ATTEND and APPEND requests that succeeded */
    uint64_t null_runs;      /* the null device's stand-in for backend runs */
} wsession_t;

/* One received request and its items frame. */
typedef struct slot {
    svc_req_t rq;
    void *items;             /* owned; frame 2, or NULL */
    size_t items_len;
} slot_t;

typedef struct worker {
    void *sock;
    bool null_device;   /* everything but the attention work, to measure the service's overhead */
    att_backend_t *be;  /* owned */
    svc_arena_t *arena; /* owned (attached) */
    wsession_t *sessions;
    uint32_t num_sessions;
    uint32_t cap_sessions;
    slot_t slots[SVC_BATCH_MAX]; /* the current request, or batch of requests */
    uint64_t fault_at;  /* the test fault switch: fail on this tensor request (1-based); 0 = off */
    uint64_t tensor_reqs; /* ATTEND and APPEND requests received */
    att_tune_cfg_t tune;     /* the sessions' tuning policy; tune.dir points into tuning_dir */
    char tuning_dir[480];
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

static void fill_info(const wsession_t *s, svc_rep_t *rep) {
    rep->calls = s->calls;
    if (s->ctx == NULL) {
        rep->kv_capacity_tokens = s->capacity_tokens;
        rep->backend_runs = s->null_runs;
        return;
    }
    att_ctx_info_t info;
    att_ctx_get_info(s->ctx, &info);
    rep->kv_capacity_tokens = info.kv_capacity_tokens;
    rep->kv_used_tokens = info.kv_used_tokens;
    rep->num_sequences = info.num_sequences;
    rep->backend_runs = info.backend_runs;
    att_tuner_info_t ti;
    att_tuner_get_info(s->tuner, &ti);
    rep->tuning_source = ti.source;
    rep->tuning_runs = ti.tuning_runs;
    rep->tuning_jobs_pending = ti.jobs_pending;
    snprintf(rep->tuning_config, sizeof rep->tuning_config, "%s", ti.config);
}

/* The region [off, off + len) of the arena, or NULL when it does not lie inside it. */
static void *region(worker_t *w, uint64_t off, uint64_t len) {
    uint64_t size = svc_arena_size(w->arena);
    if (off > size || len > size - off)
        return NULL;
    return svc_arena_base(w->arena) + off;
}

static at_err_t do_create(worker_t *w, const slot_t *sl, svc_rep_t *rep, at_diag_t *d) {
    const svc_req_t *rq = &sl->rq;
    if (find_session(w, rq->session_id) != NULL)
        return at_diag_set(d, AT_ERR_INTERNAL, "session %llu exists on this worker",
                           (unsigned long long)rq->session_id);
    size_t want = (size_t)rq->n_windows * sizeof(uint32_t) +
                  ((size_t)rq->n_alibi + rq->n_sinks) * sizeof(float);
    if (sl->items_len != want)
        return at_diag_set(d, AT_ERR_INTERNAL, "create: %zu bytes of arrays, expected %zu",
                           sl->items_len, want);
    const uint8_t *p = sl->items;
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
        w->sessions[w->num_sessions++] =
            (wsession_t){.id = rq->session_id, .capacity_tokens = rep->kv_capacity_tokens};
        return AT_OK;
    }
    att_ctx_t *ctx = NULL;
    att_tuner_t *tuner = NULL;
    at_err_t e = att_ctx_create(w->be, &cfg, rq->kv_capacity_tokens, d, &ctx);
    /* restores the store's records for this model before its first call */
    if (e == AT_OK && (e = att_tuner_create(w->be, att_ctx_model(ctx), &w->tune, d, &tuner)) !=
                          AT_OK)
        att_ctx_destroy(&ctx);
    if (e != AT_OK)
        return e;
    w->sessions[w->num_sessions++] = (wsession_t){.id = rq->session_id, .ctx = ctx,
                                                  .tuner = tuner};
    fill_info(&w->sessions[w->num_sessions - 1], rep);
    return AT_OK;
}

static at_err_t do_close(worker_t *w, const svc_req_t *rq) {
    wsession_t *s = find_session(w, rq->session_id);
    if (s == NULL)
        return AT_ERR_SESSION_NOT_FOUND;
    att_ctx_destroy(&s->ctx); /* NULL on the null device */
    att_tuner_destroy(&s->tuner);
    *s = w->sessions[--w->num_sessions];
    return AT_OK;
}

/* The call a request describes, its tensors in the arena. */
static at_err_t make_call(worker_t *w, const slot_t *sl, att_call_t *call, at_diag_t *d) {
    const svc_req_t *rq = &sl->rq;
    if (sl->items_len != (size_t)rq->num_items * sizeof(att_chunk_t))
        return at_diag_set(d, AT_ERR_INTERNAL, "attend: chunk frame of %zu bytes", sl->items_len);
    *call = (att_call_t){
        .layer = rq->layer,
        .chunks = sl->items,
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
    if (call->q == NULL || call->k == NULL || call->v == NULL || call->out == NULL)
        return at_diag_set(d, AT_ERR_INTERNAL, "attend: a tensor region lies outside the arena");
    return AT_OK;
}

/* Whether request i of a batch led by `first` may run on session s (NULL: not on this worker). */
static at_err_t admit(const wsession_t *s, const svc_req_t *first, const svc_req_t *rq,
                      int64_t now, at_diag_t *d) {
    if (s == NULL || rq->session_id != first->session_id)
        return AT_ERR_SESSION_NOT_FOUND;
    if (rq->op != first->op || rq->layer != first->layer)
        return at_diag_set(d, AT_ERR_INTERNAL, "a batch mixes operations or layers");
    if (rq->deadline_ns != 0 && now > rq->deadline_ns)
        return AT_ERR_DEADLINE;
    return AT_OK;
}

/* Runs the n ATTEND (or APPEND) requests in w->slots, which the pool batched: one session, one op.
 * Each gets its own answer in reps[i] and diags[i]; those that can share a backend run do.
 * Requests whose arrival failed (arrived[i]) are answered with that error and not run. */
static void do_attend(worker_t *w, uint32_t n, const at_err_t *arrived, svc_rep_t *reps,
                      at_diag_t *diags) {
    const svc_req_t *first = &w->slots[0].rq;
    wsession_t *s = find_session(w, first->session_id);
    att_call_t calls[SVC_BATCH_MAX];
    at_err_t errs[SVC_BATCH_MAX];
    at_diag_t cd[SVC_BATCH_MAX];
    uint32_t idx[SVC_BATCH_MAX], m = 0; /* calls[j] is request idx[j] */
    int64_t now = now_ns();
    for (uint32_t i = 0; i < n; i++) {
        at_err_t e = arrived[i];
        if (e == AT_OK)
            e = admit(s, first, &w->slots[i].rq, now, &diags[i]);
        /* the null device stops here: the call got this far, which is all it measures */
        if (e == AT_OK && s->ctx != NULL && (e = make_call(w, &w->slots[i], &calls[m],
                                                           &diags[i])) == AT_OK)
            idx[m++] = i;
        else if (e == AT_OK)
            s->calls++;
        reps[i].err = e;
    }
    if (s == NULL)
        return;
    if (s->ctx == NULL) {
        s->null_runs++;
    } else if (m > 0) {
        memset(cd, 0, m * sizeof cd[0]);
        att_tuner_pick(s->tuner, s->ctx, calls, m);
        att_ctx_run_many(s->ctx, calls, m, first->op == SVC_OP_ATTEND, errs, cd);
        for (uint32_t j = 0; j < m; j++) {
            reps[idx[j]].err = errs[j];
            diags[idx[j]] = cd[j];
            s->calls += errs[j] == AT_OK;
        }
    }
    for (uint32_t i = 0; i < n; i++)
        fill_info(s, &reps[i]);
}

static at_err_t do_release(worker_t *w, const slot_t *sl, svc_rep_t *rep, at_diag_t *d) {
    const svc_req_t *rq = &sl->rq;
    wsession_t *s = find_session(w, rq->session_id);
    if (s == NULL)
        return AT_ERR_SESSION_NOT_FOUND;
    if (sl->items_len != (size_t)rq->num_items * sizeof(uint64_t))
        return at_diag_set(d, AT_ERR_INTERNAL, "release: id frame of %zu bytes", sl->items_len);
    if (s->ctx != NULL)
        att_ctx_release(s->ctx, sl->items, rq->num_items, &rep->released);
    fill_info(s, rep);
    return AT_OK;
}

static int send_rep(worker_t *w, const svc_rep_t *rep) {
    return zmq_send(w->sock, rep, sizeof *rep, 0) == (int)sizeof *rep ? 0 : -1;
}

/* Receives one request into sl: the header, then the optional items frame. AT_ERR_IO when the
 * socket is gone. */
static at_err_t recv_req(worker_t *w, slot_t *sl) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, w->sock, 0) < 0) {
        zmq_msg_close(&m);
        return AT_ERR_IO;
    }
    at_err_t e = AT_OK;
    if (zmq_msg_size(&m) != sizeof sl->rq)
        e = AT_ERR_INTERNAL;
    else
        memcpy(&sl->rq, zmq_msg_data(&m), sizeof sl->rq);
    int more = zmq_msg_more(&m);
    zmq_msg_close(&m);
    free(sl->items);
    sl->items = NULL;
    sl->items_len = 0;
    if (more) {
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->sock, 0) < 0) {
            zmq_msg_close(&m);
            return AT_ERR_IO;
        }
        sl->items_len = zmq_msg_size(&m);
        sl->items = malloc(sl->items_len ? sl->items_len : 1);
        if (sl->items == NULL)
            e = AT_ERR_NOMEM;
        else
            memcpy(sl->items, zmq_msg_data(&m), sl->items_len);
        zmq_msg_close(&m);
    }
    if (e == AT_OK && sl->rq.magic != SVC_MSG_MAGIC)
        e = AT_ERR_INTERNAL;
    return e;
}

/* Receives the rest of a batch begun by slot 0; *n counts the requests received. A request that
 * does not belong (the pool's bug) is answered INTERNAL through errs. A STOP instead of the rest
 * means the pool gave up on the batch (it answered those calls itself) and is stopping: *stop is
 * set and the STOP is in slot *n. */
static at_err_t recv_batch(worker_t *w, uint32_t *n, at_err_t *errs, bool *stop) {
    const svc_req_t *first = &w->slots[0].rq;
    uint32_t size = first->batch_size;
    *n = 1;
    if (size <= 1)
        return AT_OK;
    if (size > SVC_BATCH_MAX || first->batch_index != 0) {
        errs[0] = AT_ERR_INTERNAL;
        return AT_OK;
    }
    for (uint32_t i = 1; i < size; i++) {
        at_err_t e = recv_req(w, &w->slots[i]);
        if (e == AT_ERR_IO)
            return e;
        const svc_req_t *rq = &w->slots[i].rq;
        if (e == AT_OK && rq->op == SVC_OP_STOP) {
            *stop = true;
            return AT_OK;
        }
        if (e == AT_OK && (rq->batch_size != size || rq->batch_index != i))
            e = AT_ERR_INTERNAL;
        errs[i] = e;
        (*n)++;
    }
    return AT_OK;
}

static void worker_fini(worker_t *w) {
    for (uint32_t i = 0; i < w->num_sessions; i++) {
        att_ctx_destroy(&w->sessions[i].ctx);
        att_tuner_destroy(&w->sessions[i].tuner);
    }
    free(w->sessions);
    for (uint32_t i = 0; i < SVC_BATCH_MAX; i++)
        free(w->slots[i].items);
    att_backend_destroy(&w->be);
    svc_arena_destroy(&w->arena);
    if (w->sock != NULL)
        zmq_close(w->sock);
}

/* A GPU device "cuda:N" or "hip:N": its backend, the arena, and the arena registered with the
 * driver so tensors move between it and the GPU by DMA with no staging copy. */
static at_err_t gpu_backend(const svc_worker_cfg_t *cfg, worker_t *w, at_diag_t *d) {
    at_err_t e = att_gpu_open(cfg->device, 0, d, &w->be);
    if (e != AT_OK)
        return e;
    if ((e = svc_arena_attach(cfg->arena_name, cfg->arena_bytes, d, &w->arena)) != AT_OK)
        return e;
    e = w->be->ops->register_host(w->be, svc_arena_base(w->arena), svc_arena_size(w->arena));
    if (e != AT_OK)
        return at_diag_set(d, e, "%s: cannot register the tensor arena for DMA", cfg->device);
    return AT_OK;
}

/* Tuning runs only while no request waits: one step (a fill or one timed run of one config) of
 * the first session with a pending job, then the socket is looked at again, so a call that
 * arrives during tuning waits for at most the step in progress. True when a step ran. */
static bool tune_while_idle(worker_t *w) {
    wsession_t *s = NULL;
    for (uint32_t i = 0; i < w->num_sessions && s == NULL; i++)
        if (w->sessions[i].tuner != NULL && att_tuner_pending(w->sessions[i].tuner))
            s = &w->sessions[i];
    if (s == NULL)
        return false;
    zmq_pollitem_t pi = {.socket = w->sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&pi, 1, 0) != 0)
        return false; /* a request waits (or the socket failed: recv reports it) */
    if (!att_tuner_step(s->tuner))
        (void)zmq_poll(&pi, 1, 2); /* kernels compiling elsewhere: wait for a request, briefly */
    return true;
}

/* The tuning policy the server put in the environment (svc_serve.c). */
static void tuning_from_env(worker_t *w) {
    const char *dir = getenv("ATTND_TUNING_DIR"), *mode = getenv("ATTND_TUNING");
    snprintf(w->tuning_dir, sizeof w->tuning_dir, "%s", dir != NULL ? dir : "");
    int m = mode != NULL ? tun_mode_parse(mode) : -1;
    w->tune = (att_tune_cfg_t){.mode = m >= 0 ? (tun_mode_t)m : TUN_MODE_OFF,
                               .dir = w->tuning_dir};
}

static const char *backend_desc(const att_backend_t *be) {
#ifdef AT_HAVE_CUDA
    if (strcmp(be->ops->name, "cuda") == 0)
        return att_cuda_describe(be);
#endif
#ifdef AT_HAVE_HIP
    if (strcmp(be->ops->name, "hip") == 0)
        return att_hip_describe(be);
#endif
    return be->ops->name;
}

/* The request number at which the test fault switch fires for this device, or 0. */
static uint64_t fault_setting(const svc_worker_cfg_t *cfg) {
    const char *v = getenv(SVC_WORKER_FAULT_ENV);
    const char *colon = v != NULL ? strrchr(v, ':') : NULL;
    if (!cfg->process || colon == NULL || (size_t)(colon - v) != strlen(cfg->device) ||
        strncmp(v, cfg->device, strlen(cfg->device)) != 0)
        return 0;
    char *end = NULL;
    unsigned long long n = strtoull(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0')
        return 0;
    at_log(AT_LOG_WARN, "worker", "%s: test fault switch set: request %llu fails", cfg->device, n);
    return n;
}

#ifdef AT_HAVE_CUDA
/* A kernel that stores through a null pointer: CUDA_ERROR_ILLEGAL_ADDRESS, sticky. */
static const char fault_ptx[] = ".version 7.0\n.target sm_75\n.address_size 64\n"
                                ".visible .entry attnd_test_fault()\n{\n"
                                "  .reg .b64 %rd<2>;\n  .reg .b32 %r<2>;\n"
                                "  mov.u64 %rd1, 0;\n  mov.u32 %r1, 1;\n"
                                "  st.global.u32 [%rd1], %r1;\n  ret;\n}\n";

/* Faults the device's primary context, the one the backend runs in, so the request that comes
 * next meets the fault through the backend's own error path. */
static void cuda_fault(const char *device) {
    const att_cudrv_t *drv = NULL;
    at_diag_t d = {{0}};
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    if (att_cudrv_cuda(&drv, &d) != AT_OK || drv->cuDeviceGet(&dev, atoi(device + 5)) != 0 ||
        drv->cuDevicePrimaryCtxRetain(&ctx, dev) != 0 || drv->cuCtxSetCurrent(ctx) != 0 ||
        drv->cuModuleLoadData(&mod, fault_ptx) != 0 ||
        drv->cuModuleGetFunction(&fn, mod, "attnd_test_fault") != 0 ||
        drv->cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL) != 0) {
        at_log(AT_LOG_ERROR, "worker", "%s: test fault: cannot launch the faulting kernel",
               device);
        return;
    }
    CUresult r = drv->cuCtxSynchronize();
    at_log(AT_LOG_WARN, "worker", "%s: test fault: kernel ended with %s", device,
           att_cudrv_err_name(drv, r));
}
#endif

/* The test fault switch fires: a CPU or HIP worker aborts (no core file), a CUDA one faults its
 * GPU. */
static void test_fault(const svc_worker_cfg_t *cfg) {
#ifdef AT_HAVE_CUDA
    if (strncmp(cfg->device, "cuda:", 5) == 0) {
        cuda_fault(cfg->device);
        return;
    }
#endif
    at_log(AT_LOG_WARN, "worker", "%s: test fault: aborting", cfg->device);
    struct rlimit no_core = {0, 0};
    (void)setrlimit(RLIMIT_CORE, &no_core);
    abort();
}

/* True when the worker's GPU is unusable after a fault. */
static bool device_lost(const worker_t *w) {
#ifdef AT_HAVE_CUDA
    if (w->be != NULL && strcmp(w->be->ops->name, "cuda") == 0 && att_cuda_lost(w->be))
        return true;
#endif
#ifdef AT_HAVE_HIP
    if (w->be != NULL && strcmp(w->be->ops->name, "hip") == 0 && att_hip_lost(w->be))
        return true;
#endif
    (void)w;
    return false;
}

/* A worker process whose device faulted ends: nothing its context ran can be trusted, so it
 * sends no more replies; the server answers every call in flight and starts a new worker. */
static at_err_t exit_lost(worker_t *w, const char *device) {
    at_log(AT_LOG_ERROR, "worker", "%s: the device faulted; the worker exits", device);
    worker_fini(w);
    return AT_ERR_DEVICE;
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
    tuning_from_env(&w);
    if (w.null_device)
        e = svc_arena_attach(cfg->arena_name, cfg->arena_bytes, &d, &w.arena);
    else if (strncmp(cfg->device, "cuda:", 5) == 0 || strncmp(cfg->device, "hip:", 4) == 0)
        e = gpu_backend(cfg, &w, &d);
    else if (strcmp(cfg->device, "cpu") != 0)
        e = at_diag_set(&d, AT_ERR_DEVICE_UNKNOWN, "device %s has no backend in this build",
                        cfg->device);
    else if ((e = att_cpu_create(&cc, &w.be)) != AT_OK)
        at_diag_set(&d, e, "CPU backend: %s", at_err_str(e));
    else
        e = svc_arena_attach(cfg->arena_name, cfg->arena_bytes, &d, &w.arena);
    w.fault_at = fault_setting(cfg);
    ready.err = e;
    memcpy(ready.diag, d.msg, sizeof ready.diag);
    if (send_rep(&w, &ready) != 0 || e != AT_OK) {
        worker_fini(&w);
        return e != AT_OK ? e : AT_ERR_IO;
    }
    at_log(AT_LOG_INFO, "worker", "%s: ready (%s)", cfg->device,
           w.null_device                       ? "no attention work: measures the service alone"
           : strcmp(w.be->ops->name, "cpu") == 0 ? att_cpu_isa(w.be)
                                                 : backend_desc(w.be));
    for (;;) {
        svc_rep_t reps[SVC_BATCH_MAX];
        at_diag_t diags[SVC_BATCH_MAX];
        at_err_t errs[SVC_BATCH_MAX] = {AT_OK};
        uint32_t n = 1;
        if (cfg->process && device_lost(&w)) /* a fault outside a call: a tuning step, say */
            return exit_lost(&w, cfg->device);
        if (tune_while_idle(&w))
            continue;
        errs[0] = recv_req(&w, &w.slots[0]);
        if (errs[0] == AT_ERR_IO)
            break; /* the socket is gone: the server is stopping */
        const svc_req_t *rq = &w.slots[0].rq;
        bool tensor_op = rq->op == SVC_OP_ATTEND || rq->op == SVC_OP_APPEND, cut = false;
        if (errs[0] == AT_OK && tensor_op && recv_batch(&w, &n, errs, &cut) != AT_OK)
            break;
        if (cut) {
            svc_rep_t ack = {.magic = SVC_MSG_MAGIC, .job_id = w.slots[n].rq.job_id};
            (void)send_rep(&w, &ack);
            break;
        }
        for (uint32_t i = 0; i < n; i++) {
            reps[i] = (svc_rep_t){.magic = SVC_MSG_MAGIC, .job_id = w.slots[i].rq.job_id};
            diags[i].msg[0] = '\0';
        }
        if (errs[0] != AT_OK) {
            reps[0].err = errs[0];
        } else if (tensor_op) {
            w.tensor_reqs += n;
            if (w.fault_at != 0 && w.tensor_reqs >= w.fault_at) {
                w.fault_at = 0;
                test_fault(cfg);
            }
            do_attend(&w, n, errs, reps, diags);
            if (cfg->process && device_lost(&w))
                return exit_lost(&w, cfg->device); /* no replies: see exit_lost */
        } else {
            switch (rq->op) {
            case SVC_OP_CREATE: e = do_create(&w, &w.slots[0], &reps[0], &diags[0]); break;
            case SVC_OP_CLOSE: e = do_close(&w, rq); break;
            case SVC_OP_RELEASE: e = do_release(&w, &w.slots[0], &reps[0], &diags[0]); break;
            case SVC_OP_STOP: e = AT_OK; break;
            default: e = at_diag_set(&diags[0], AT_ERR_INTERNAL, "unknown op %u", rq->op); break;
            }
            reps[0].err = e;
        }
        bool stop = rq->op == SVC_OP_STOP, sent = true;
        for (uint32_t i = 0; i < n && sent; i++) {
            memcpy(reps[i].diag, diags[i].msg, sizeof reps[i].diag);
            reps[i].diag[sizeof reps[i].diag - 1] = '\0';
            sent = send_rep(&w, &reps[i]) == 0;
        }
        if (!sent || stop)
            break;
    }
    at_log(AT_LOG_INFO, "worker", "%s: stopped with %u sessions open", cfg->device,
           w.num_sessions);
    worker_fini(&w);
    return AT_OK;
}

/* Parses `attnd worker` arguments into cfg (pointing into argv) and the parent's pid. */
static int worker_args(int argc, char **argv, svc_worker_cfg_t *cfg, long *parent) {
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        char *end = NULL;
        errno = 0;
        unsigned long long n = strtoull(v, &end, 10);
        bool num = errno == 0 && end != v && *end == '\0';
        if (strcmp(k, "--endpoint") == 0)
            cfg->endpoint = v;
        else if (strcmp(k, "--device") == 0)
            cfg->device = v;
        else if (strcmp(k, "--arena") == 0)
            cfg->arena_name = v;
        else if (strcmp(k, "--cpu-threads") == 0 && num && n <= 1024)
            cfg->cpu_threads = (uint32_t)n;
        else if (strcmp(k, "--arena-bytes") == 0 && num)
            cfg->arena_bytes = n;
        else if (strcmp(k, "--parent") == 0 && num)
            *parent = (long)n;
        else
            return -1;
    }
    return argc % 2 == 1 && cfg->endpoint != NULL && cfg->device != NULL &&
                   cfg->arena_name != NULL && cfg->arena_bytes != 0 && *parent > 0
               ? 0
               : -1;
}

int svc_worker_main(int argc, char **argv) {
    svc_worker_cfg_t cfg = {.process = true};
    long parent = 0;
    if (worker_args(argc, argv, &cfg, &parent) != 0) {
        fprintf(stderr, "attnd worker: started by attnd serve only (--endpoint ipc://PATH "
                        "--device D --cpu-threads N --arena NAME --arena-bytes B --parent PID)\n");
        return 2;
    }
    /* The server's death ends the worker: nobody else would ever stop it. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != (pid_t)parent)
        return 1;
    void *zctx = zmq_ctx_new();
    if (zctx == NULL)
        return 1;
    at_err_t e = svc_worker_run(&cfg, zctx);
    zmq_ctx_term(zctx);
    return e == AT_OK ? 0 : e == AT_ERR_DEVICE ? SVC_WORKER_EXIT_DEVICE_LOST : 1;
}

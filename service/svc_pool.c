/* A device's pool, server side (see svc_pool.h).
 *
 * Thread model: submitters push onto `queue` under `mu` and wake the dispatcher through an
 * eventfd; the dispatcher thread alone owns the ZeroMQ sockets (one per worker), moves queued jobs
 * into batches in their worker's scheduler, sends them and matches each worker's in-order replies
 * against that worker's `inflight` list. A timerfd wakes it when a batch's queueing delay runs
 * out. Each worker thread owns the other end of its socket. Lock order: only `mu` (the pins are
 * atomics); it is never held across a send, a receive or a done callback. */
#include "service/svc_pool.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "cache/kvc.h"
#include "common/at_log.h"
#include "service/svc_worker.h"

/* Batches handed to a worker at once: one running and one staged hides the round trip; the rest
 * wait in the scheduler, where a cancelled job is still dropped rather than run, where jobs that
 * queue up behind a busy worker can be merged, and where tenants take turns. */
#define MAX_INFLIGHT 2
/* Cost units per turn and unit of weight: about one decode step of a few sequences at a few
 * thousand tokens of context; dearer jobs take several turns of credit (see ten_sched.h). */
#define SCHED_QUANTUM (1u << 16)

typedef struct lane {
    svc_pool_t *p;
    uint32_t index;
    char endpoint[96];
    void *sock;               /* dispatcher thread only */
    svc_worker_cfg_t wcfg;    /* for the worker thread */
    pthread_t thread;
    bool started;             /* the worker thread exists (owner's thread) */
    at_err_t worker_err;      /* the worker thread's result */
    atomic_uint sessions;     /* sessions pinned; relaxed: only a load-balancing hint */
    /* dispatcher only */
    ten_sched_t *sched;       /* batches waiting for this worker */
    svc_job_t *open;          /* batches (first jobs) still in sched that may take more jobs */
    svc_job_t *staged;        /* a batch popped from sched, waiting out its queueing delay */
    svc_job_t *inflight_head; /* sent, reply pending, in send order */
    svc_job_t *inflight_tail;
    uint32_t inflight;        /* batches sent and not fully answered */
    bool worker_ok;           /* false once the worker broke the protocol */
    int64_t last_reply_ns;
} lane_t;

struct svc_pool {
    char device[32];
    void *zctx;               /* borrowed */
    svc_arena_t *arena;       /* owned; shared by the workers */
    lane_t lanes[SVC_WORKERS_MAX];
    uint32_t num_lanes;
    pthread_t dispatcher;
    int wake_fd;              /* eventfd: submit -> dispatcher */
    int timer_fd;             /* timerfd: a staged batch's queueing delay ran out */
    uint32_t max_queue;
    uint64_t batch_tokens;    /* 0 = no batching */
    int64_t batch_delay_ns;
    pthread_mutex_t mu;
    svc_job_t *queue_head;    /* guarded by mu */
    svc_job_t *queue_tail;    /* guarded by mu */
    uint32_t waiting;         /* guarded by mu: submitted, not yet sent or dropped */
    bool stopping;            /* guarded by mu */
    bool joined;              /* the owner's thread: svc_pool_stop joined the threads */
    uint64_t next_job_id;     /* dispatcher only */
    uint32_t gone;            /* dispatcher only: jobs sent or dropped since `waiting` last
                               * went down */
};

static void *worker_main(void *arg) {
    lane_t *l = arg;
    l->worker_err = svc_worker_run(&l->wcfg, l->p->zctx);
    return NULL;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static svc_job_t *job_of_item(ten_sched_item_t *it) {
    return (svc_job_t *)(void *)((char *)it - offsetof(svc_job_t, item));
}

static bool tensor_op(const svc_job_t *job) {
    return job->req.op == SVC_OP_ATTEND || job->req.op == SVC_OP_APPEND;
}

static void finish(svc_pool_t *p, svc_job_t *job, at_err_t e, const char *why) {
    svc_rep_t rep = {.magic = SVC_MSG_MAGIC, .err = e, .job_id = job->req.job_id};
    snprintf(rep.diag, sizeof rep.diag, "%s", why);
    p->gone += job->sent_ns == 0; /* sent jobs were counted when they were sent */
    job->done(job, &rep);
}

static void fail_inflight(lane_t *l, const char *why) {
    while (l->inflight_head != NULL) {
        svc_job_t *job = l->inflight_head;
        l->inflight_head = job->next;
        finish(l->p, job, AT_ERR_WORKER_LOST, why);
    }
    l->inflight_tail = NULL;
    l->inflight = 0;
}

static int send_job(lane_t *l, svc_job_t *job) {
    svc_pool_t *p = l->p;
    job->req.magic = SVC_MSG_MAGIC;
    job->req.job_id = ++p->next_job_id;
    int more = job->items != NULL ? ZMQ_SNDMORE : 0;
    if (zmq_send(l->sock, &job->req, sizeof job->req, more) != (int)sizeof job->req)
        return -1;
    if (more && zmq_send(l->sock, job->items, job->items_len, 0) != (int)job->items_len)
        return -1;
    job->sent_ns = now_ns();
    job->queue_ns = job->sent_ns - job->queued_ns;
    p->gone++;
    job->next = NULL;
    if (l->inflight_tail != NULL)
        l->inflight_tail->next = job;
    else
        l->inflight_head = job;
    l->inflight_tail = job;
    return 0;
}

/* Sends the batch led by b, dropping its cancelled jobs first. A failed send leaves the worker
 * waiting for the rest of a batch it will never get, so the worker counts as lost. */
static void send_batch(lane_t *l, svc_job_t *b) {
    svc_pool_t *p = l->p;
    svc_job_t *batch[SVC_BATCH_MAX];
    uint32_t n = 0;
    for (svc_job_t *j = b, *next; j != NULL; j = next) {
        next = j->next;
        if (!l->worker_ok)
            finish(p, j, AT_ERR_WORKER_LOST, "the device worker is not answering");
        else if (atomic_load_explicit(&j->cancelled, memory_order_acquire))
            finish(p, j, AT_ERR_CANCELLED, "cancelled before it ran");
        else
            batch[n++] = j;
    }
    for (uint32_t i = 0; i < n; i++) {
        batch[i]->req.batch_size = n;
        batch[i]->req.batch_index = i;
        if (send_job(l, batch[i]) != 0) {
            l->worker_ok = false;
            for (uint32_t j = i; j < n; j++)
                finish(p, batch[j], AT_ERR_WORKER_LOST, "the device worker is not answering");
            fail_inflight(l, "the device worker is not answering");
            return;
        }
    }
    if (n > 0)
        l->inflight++;
}

/* True when job j shares a sequence with the batch led by b. Items are the jobs' chunks. */
static bool shares_sequence(const svc_job_t *b, const svc_job_t *j) {
    const kvc_span_t *y = j->items;
    for (const svc_job_t *m = b; m != NULL; m = m->next) {
        const kvc_span_t *x = m->items;
        for (uint32_t u = 0; u < m->req.num_items; u++)
            for (uint32_t v = 0; v < j->req.num_items; v++)
                if (x[u].seq_id == y[v].seq_id)
                    return true;
    }
    return false;
}

/* The batch of session sid that may still take jobs, unlinked from the open list when unlink. */
static svc_job_t *open_find(lane_t *l, uint64_t sid, bool unlink) {
    for (svc_job_t **link = &l->open; *link != NULL; link = &(*link)->open_next)
        if ((*link)->req.session_id == sid) {
            svc_job_t *b = *link;
            if (unlink) {
                *link = b->open_next;
                b->open_next = NULL;
            }
            return b;
        }
    return NULL;
}

static bool can_join(const svc_pool_t *p, const svc_job_t *b, const svc_job_t *j) {
    return j->req.op == b->req.op && j->req.layer == b->req.layer &&
           b->batch_tokens + j->tokens <= p->batch_tokens && b->batch_n < SVC_BATCH_MAX &&
           !shares_sequence(b, j);
}

/* Puts a job taken from the submit queue into its worker's scheduler: into the open batch of its
 * session when it can join it, else as a new batch (closing the session's older one). */
static void admit(svc_pool_t *p, svc_job_t *j) {
    lane_t *l = &p->lanes[j->worker < p->num_lanes ? j->worker : 0];
    bool batchable = p->batch_tokens != 0 && tensor_op(j);
    svc_job_t *b = open_find(l, j->req.session_id, false);
    j->next = NULL; /* it was the submit queue's link */
    if (b != NULL && batchable && can_join(p, b, j)) {
        b->batch_tail->next = j;
        b->batch_tail = j;
        b->batch_n++;
        b->batch_tokens += j->tokens;
        /* read by the scheduler at its next pop; a batch already staged keeps its charge */
        b->item.cost = b->item.cost > UINT64_MAX - j->cost ? UINT64_MAX : b->item.cost + j->cost;
        return;
    }
    if (b != NULL)
        open_find(l, j->req.session_id, true); /* nothing may join it past j */
    j->batch_tail = j;
    j->batch_n = 1;
    j->batch_tokens = j->tokens;
    j->item.cost = j->cost;
    if (ten_sched_push(l->sched, j->flow, j->weight, &j->item) != AT_OK) {
        finish(p, j, AT_ERR_NOMEM, "no memory to queue the call");
        return;
    }
    if (batchable) {
        j->open_next = l->open;
        l->open = j;
    }
}

/* Sends batches while the worker has room. A batch under its budget whose first job has waited
 * less than the queueing delay is staged until the delay runs out (*wake_at says when), unless
 * the pool is stopping or its session has a later batch (then it can grow no more). */
static void pump(lane_t *l, bool stopping, int64_t *wake_at) {
    svc_pool_t *p = l->p;
    while (l->inflight < MAX_INFLIGHT || !l->worker_ok) {
        svc_job_t *b = l->staged;
        if (b == NULL) {
            ten_sched_item_t *it = ten_sched_pop(l->sched);
            if (it == NULL)
                return;
            b = job_of_item(it);
        }
        l->staged = NULL;
        bool open = open_find(l, b->req.session_id, false) == b;
        int64_t until = b->queued_ns + p->batch_delay_ns;
        if (open && p->batch_delay_ns > 0 && !stopping && l->worker_ok &&
            b->batch_tokens < p->batch_tokens && b->batch_n < SVC_BATCH_MAX && now_ns() < until) {
            l->staged = b;
            if (*wake_at == 0 || until < *wake_at)
                *wake_at = until;
            return;
        }
        if (open)
            open_find(l, b->req.session_id, true);
        send_batch(l, b);
    }
}

/* Arms the timer for an absolute CLOCK_MONOTONIC time; 0 disarms it. */
static void arm_timer(svc_pool_t *p, int64_t at_ns) {
    struct itimerspec its = {{0, 0}, {at_ns / 1000000000, at_ns % 1000000000}};
    (void)timerfd_settime(p->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void on_reply(lane_t *l) {
    svc_pool_t *p = l->p;
    svc_rep_t rep;
    int got = zmq_recv(l->sock, &rep, sizeof rep, 0);
    svc_job_t *job = l->inflight_head;
    if (got != (int)sizeof rep || job == NULL || rep.job_id != job->req.job_id) {
        at_log(AT_LOG_ERROR, "pool", "%s worker %u: reply out of order or malformed", p->device,
               l->index);
        l->worker_ok = false;
        fail_inflight(l, "the worker answered out of order");
        return;
    }
    l->inflight_head = job->next;
    if (l->inflight_head == NULL)
        l->inflight_tail = NULL;
    if (job->req.batch_index + 1 >= job->req.batch_size) /* a batch's last reply */
        l->inflight--;
    int64_t now = now_ns();
    int64_t began = job->sent_ns > l->last_reply_ns ? job->sent_ns : l->last_reply_ns;
    job->device_ns = now - began;
    l->last_reply_ns = now;
    job->done(job, &rep);
}

static bool lane_idle(const lane_t *l) {
    return l->inflight_head == NULL && l->staged == NULL && ten_sched_len(l->sched) == 0;
}

static void *dispatcher_main(void *arg) {
    svc_pool_t *p = arg;
    zmq_pollitem_t items[SVC_WORKERS_MAX + 2];
    uint32_t nl = p->num_lanes;
    for (;;) {
        for (uint32_t i = 0; i < nl; i++)
            items[i] = (zmq_pollitem_t){.socket = p->lanes[i].sock, .events = ZMQ_POLLIN};
        items[nl] = (zmq_pollitem_t){.fd = p->wake_fd, .events = ZMQ_POLLIN};
        items[nl + 1] = (zmq_pollitem_t){.fd = p->timer_fd, .events = ZMQ_POLLIN};
        if (zmq_poll(items, (int)nl + 2, -1) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            break;
        }
        uint64_t n;
        if (items[nl].revents & ZMQ_POLLIN)
            (void)!read(p->wake_fd, &n, sizeof n);
        if (items[nl + 1].revents & ZMQ_POLLIN)
            (void)!read(p->timer_fd, &n, sizeof n);
        for (uint32_t i = 0; i < nl; i++)
            if (items[i].revents & ZMQ_POLLIN)
                on_reply(&p->lanes[i]);
        pthread_mutex_lock(&p->mu);
        svc_job_t *list = p->queue_head;
        p->queue_head = p->queue_tail = NULL;
        bool stopping = p->stopping;
        pthread_mutex_unlock(&p->mu);
        for (svc_job_t *j = list, *next; j != NULL; j = next) { /* in arrival order */
            next = j->next;
            admit(p, j);
        }
        int64_t wake_at = 0;
        bool idle = true;
        for (uint32_t i = 0; i < nl; i++) {
            pump(&p->lanes[i], stopping, &wake_at);
            idle = idle && lane_idle(&p->lanes[i]);
        }
        arm_timer(p, wake_at);
        if (p->gone > 0) {
            pthread_mutex_lock(&p->mu);
            p->waiting -= p->gone;
            pthread_mutex_unlock(&p->mu);
            p->gone = 0;
        }
        if (stopping && idle)
            break;
    }
    /* Stop the workers: each answers STOP after every earlier job. */
    for (uint32_t i = 0; i < nl; i++) {
        lane_t *l = &p->lanes[i];
        svc_req_t stop = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_STOP, .job_id = ++p->next_job_id};
        svc_rep_t rep;
        if (l->worker_ok && zmq_send(l->sock, &stop, sizeof stop, 0) == (int)sizeof stop)
            (void)zmq_recv(l->sock, &rep, sizeof rep, 0);
    }
    return NULL;
}

/* Tokens and the cost estimate of a job (see svc_pool.h). */
static void job_measure(svc_job_t *job) {
    job->tokens = 0;
    job->cost = 1;
    if (!tensor_op(job) || job->items_len != (size_t)job->req.num_items * sizeof(kvc_span_t))
        return;
    uint64_t cost = 0;
    for (uint32_t i = 0; i < job->req.num_items; i++) {
        const kvc_span_t *c = &((const kvc_span_t *)job->items)[i];
        job->tokens += c->num_tokens;
        cost += (uint64_t)c->num_tokens * ((uint64_t)c->start_pos + c->num_tokens);
    }
    job->cost = cost != 0 ? cost : 1;
}

at_err_t svc_pool_submit(svc_pool_t *p, svc_job_t *job) {
    job->queued_ns = now_ns();
    job->sent_ns = 0;
    job->queue_ns = 0;
    job->device_ns = 0;
    job->open_next = NULL;
    job_measure(job);
    pthread_mutex_lock(&p->mu);
    at_err_t e = AT_OK;
    if (p->stopping)
        e = AT_ERR_SHUTTING_DOWN;
    else if (p->waiting >= p->max_queue)
        e = AT_ERR_OVERLOADED;
    else {
        job->next = NULL;
        if (p->queue_tail != NULL)
            p->queue_tail->next = job;
        else
            p->queue_head = job;
        p->queue_tail = job;
        p->waiting++;
    }
    pthread_mutex_unlock(&p->mu);
    if (e == AT_OK) {
        uint64_t one = 1;
        (void)!write(p->wake_fd, &one, sizeof one);
    }
    return e;
}

uint32_t svc_pool_pin(svc_pool_t *p) {
    uint32_t best = 0;
    unsigned fewest = atomic_load_explicit(&p->lanes[0].sessions, memory_order_relaxed);
    for (uint32_t i = 1; i < p->num_lanes; i++) {
        unsigned n = atomic_load_explicit(&p->lanes[i].sessions, memory_order_relaxed);
        if (n < fewest) {
            fewest = n;
            best = i;
        }
    }
    atomic_fetch_add_explicit(&p->lanes[best].sessions, 1, memory_order_relaxed);
    return best;
}

void svc_pool_unpin(svc_pool_t *p, uint32_t worker) {
    if (worker < p->num_lanes)
        atomic_fetch_sub_explicit(&p->lanes[worker].sessions, 1, memory_order_relaxed);
}

uint32_t svc_pool_workers(const svc_pool_t *p) { return p->num_lanes; }

/* Stops the workers that started (each answers STOP) and joins them; before the dispatcher runs. */
static void stop_workers(svc_pool_t *p) {
    for (uint32_t i = 0; i < p->num_lanes; i++) {
        lane_t *l = &p->lanes[i];
        if (!l->started)
            continue;
        svc_req_t stop = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_STOP};
        svc_rep_t rep;
        if (l->worker_ok && zmq_send(l->sock, &stop, sizeof stop, 0) == (int)sizeof stop)
            (void)zmq_recv(l->sock, &rep, sizeof rep, 0);
        pthread_join(l->thread, NULL);
        l->started = false;
    }
}

static void pool_free(svc_pool_t *p) {
    for (uint32_t i = 0; i < p->num_lanes; i++) {
        if (p->lanes[i].sock != NULL)
            zmq_close(p->lanes[i].sock);
        ten_sched_destroy(&p->lanes[i].sched);
    }
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    if (p->timer_fd >= 0)
        close(p->timer_fd);
    svc_arena_destroy(&p->arena);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* Binds worker i's socket, starts its thread and waits for its READY. */
static at_err_t lane_start(svc_pool_t *p, const svc_pool_cfg_t *cfg, uint32_t i,
                           uint32_t threads, at_diag_t *diag) {
    lane_t *l = &p->lanes[i];
    l->p = p;
    l->index = i;
    l->worker_ok = true;
    atomic_init(&l->sessions, 0);
    snprintf(l->endpoint, sizeof l->endpoint, "inproc://attnd-%s-%u-%u", cfg->device, cfg->index,
             i);
    at_err_t e = ten_sched_create(SCHED_QUANTUM, &l->sched);
    if (e != AT_OK)
        return e;
    int linger = 0;
    l->sock = zmq_socket(p->zctx, ZMQ_PAIR);
    if (l->sock == NULL || zmq_setsockopt(l->sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_bind(l->sock, l->endpoint) != 0)
        return at_diag_set(diag, AT_ERR_IO, "pool %s: %s", l->endpoint,
                           zmq_strerror(zmq_errno()));
    l->wcfg = (svc_worker_cfg_t){
        .endpoint = l->endpoint,
        .device = p->device,
        .cpu_threads = threads,
        .arena_name = svc_arena_name(p->arena),
        .arena_bytes = svc_arena_size(p->arena),
    };
    if (pthread_create(&l->thread, NULL, worker_main, l) != 0)
        return at_diag_set(diag, AT_ERR_IO, "pool %s: cannot start worker %u", p->device, i);
    /* The worker's first message says whether it could start. */
    svc_rep_t ready = {.err = AT_ERR_IO};
    if (zmq_recv(l->sock, &ready, sizeof ready, 0) != (int)sizeof ready || ready.err != AT_OK) {
        e = ready.err != AT_OK ? (at_err_t)ready.err : AT_ERR_IO;
        at_diag_set(diag, e, "%s worker %u: %s", p->device, i, ready.diag);
        pthread_join(l->thread, NULL);
        return e;
    }
    l->started = true;
    return AT_OK;
}

at_err_t svc_pool_create(const svc_pool_cfg_t *cfg, void *zctx, at_diag_t *diag,
                         svc_pool_t **out) {
    uint32_t workers = cfg->workers != 0 ? cfg->workers : 1;
    if (workers > SVC_WORKERS_MAX)
        return at_diag_set(diag, AT_ERR_CONFIG, "workers: expected 1 to %u, got %u",
                           SVC_WORKERS_MAX, workers);
    uint32_t threads = cfg->cpu_threads;
    if (threads == 0) {
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        threads = online > 0 ? (uint32_t)online : 1;
    }
    /* every worker runs its share of the device's threads, at least one */
    threads = threads / workers != 0 ? threads / workers : 1;
    svc_pool_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return AT_ERR_NOMEM;
    p->wake_fd = -1;
    p->timer_fd = -1;
    pthread_mutex_init(&p->mu, NULL);
    p->zctx = zctx;
    p->max_queue = cfg->max_queue != 0 ? cfg->max_queue : 1024;
    p->batch_tokens = cfg->batch_tokens;
    p->batch_delay_ns = (int64_t)cfg->batch_delay_us * 1000;
    p->num_lanes = workers;
    snprintf(p->device, sizeof p->device, "%s", cfg->device);
    char tag[48];
    snprintf(tag, sizeof tag, "%s%u", cfg->device, cfg->index);
    at_err_t e = svc_arena_create(tag, cfg->arena_bytes, diag, &p->arena);
    if (e != AT_OK)
        goto out_free;
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (p->wake_fd < 0 || p->timer_fd < 0) {
        e = at_diag_set(diag, AT_ERR_IO, "pool %s: eventfd or timerfd failed", p->device);
        goto out_free;
    }
    for (uint32_t i = 0; i < workers && e == AT_OK; i++)
        e = lane_start(p, cfg, i, threads, diag);
    if (e != AT_OK)
        goto out_stop;
    if (pthread_create(&p->dispatcher, NULL, dispatcher_main, p) != 0) {
        e = at_diag_set(diag, AT_ERR_IO, "pool %s: cannot start the dispatcher", p->device);
        goto out_stop;
    }
    *out = p;
    return AT_OK;
out_stop:
    stop_workers(p);
out_free:
    pool_free(p);
    return e;
}

void svc_pool_stop(svc_pool_t *p) {
    if (p == NULL || p->joined)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_mutex_unlock(&p->mu);
    uint64_t one = 1;
    (void)!write(p->wake_fd, &one, sizeof one);
    pthread_join(p->dispatcher, NULL);
    for (uint32_t i = 0; i < p->num_lanes; i++)
        pthread_join(p->lanes[i].thread, NULL);
    p->joined = true;
}

void svc_pool_destroy(svc_pool_t **pp) {
    if (pp == NULL || *pp == NULL)
        return;
    svc_pool_stop(*pp);
    pool_free(*pp);
    *pp = NULL;
}

svc_arena_t *svc_pool_arena(svc_pool_t *p) { return p->arena; }

const char *svc_pool_device(const svc_pool_t *p) { return p->device; }

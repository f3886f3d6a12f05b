/* A device's pool, server side (see svc_pool.h).
 *
 * Thread model: submitters push onto `queue` under `mu` and wake the dispatcher through an
 * eventfd; the dispatcher thread alone owns the ZeroMQ socket, sends jobs in queue order and
 * matches the worker's in-order replies against `inflight`. The worker thread owns the other end.
 * Lock order: only `mu`; it is never held across a send, a receive or a done callback. */
#include "service/svc_pool.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <zmq.h>

#include "common/at_log.h"
#include "service/svc_worker.h"

/* Jobs handed to the worker at once: one running and one staged hides the round trip; the rest
 * wait here, where a cancelled job is still dropped rather than run. */
#define MAX_INFLIGHT 2

struct svc_pool {
    char device[32];
    char endpoint[96];
    void *zctx;               /* borrowed */
    void *sock;               /* dispatcher thread only */
    svc_arena_t *arena;       /* owned */
    svc_worker_cfg_t wcfg;    /* for the worker thread */
    pthread_t worker;
    pthread_t dispatcher;
    int wake_fd;              /* eventfd: submit -> dispatcher */
    uint32_t max_queue;
    pthread_mutex_t mu;
    svc_job_t *queue_head;    /* guarded by mu */
    svc_job_t *queue_tail;    /* guarded by mu */
    uint32_t queued;          /* guarded by mu */
    bool stopping;            /* guarded by mu */
    svc_job_t *inflight_head; /* dispatcher only: sent, reply pending, in send order */
    svc_job_t *inflight_tail;
    uint32_t inflight;        /* dispatcher only */
    svc_job_t *held_head;     /* dispatcher only: taken from the queue, not yet sent */
    svc_job_t *held_tail;
    uint64_t next_job_id;     /* dispatcher only */
    at_err_t worker_err;      /* the worker thread's result */
};

static void *worker_main(void *arg) {
    svc_pool_t *p = arg;
    p->worker_err = svc_worker_run(&p->wcfg, p->zctx);
    return NULL;
}

static void finish(svc_job_t *job, at_err_t e, const char *why) {
    svc_rep_t rep = {.magic = SVC_MSG_MAGIC, .err = e, .job_id = job->req.job_id};
    snprintf(rep.diag, sizeof rep.diag, "%s", why);
    job->done(job, &rep);
}

static int send_job(svc_pool_t *p, svc_job_t *job) {
    job->req.magic = SVC_MSG_MAGIC;
    job->req.job_id = ++p->next_job_id;
    int more = job->items != NULL ? ZMQ_SNDMORE : 0;
    if (zmq_send(p->sock, &job->req, sizeof job->req, more) != (int)sizeof job->req)
        return -1;
    if (more && zmq_send(p->sock, job->items, job->items_len, 0) != (int)job->items_len)
        return -1;
    job->next = NULL;
    if (p->inflight_tail != NULL)
        p->inflight_tail->next = job;
    else
        p->inflight_head = job;
    p->inflight_tail = job;
    p->inflight++;
    return 0;
}

/* Takes every queued job; under mu. */
static svc_job_t *take_queue(svc_pool_t *p) {
    svc_job_t *list = p->queue_head;
    p->queue_head = p->queue_tail = NULL;
    p->queued = 0;
    return list;
}

static void fail_inflight(svc_pool_t *p, const char *why) {
    while (p->inflight_head != NULL) {
        svc_job_t *job = p->inflight_head;
        p->inflight_head = job->next;
        finish(job, AT_ERR_WORKER_LOST, why);
    }
    p->inflight_tail = NULL;
    p->inflight = 0;
}

static void *dispatcher_main(void *arg) {
    svc_pool_t *p = arg;
    bool worker_ok = true;
    for (;;) {
        zmq_pollitem_t items[2] = {
            {.socket = p->sock, .events = ZMQ_POLLIN},
            {.fd = p->wake_fd, .events = ZMQ_POLLIN},
        };
        if (zmq_poll(items, 2, -1) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            break;
        }
        if (items[1].revents & ZMQ_POLLIN) {
            uint64_t n;
            (void)!read(p->wake_fd, &n, sizeof n);
        }
        if (items[0].revents & ZMQ_POLLIN) {
            svc_rep_t rep;
            int got = zmq_recv(p->sock, &rep, sizeof rep, 0);
            svc_job_t *job = p->inflight_head;
            if (got != (int)sizeof rep || job == NULL || rep.job_id != job->req.job_id) {
                at_log(AT_LOG_ERROR, "pool", "%s: reply out of order or malformed", p->device);
                worker_ok = false;
                fail_inflight(p, "the worker answered out of order");
            } else {
                p->inflight_head = job->next;
                if (p->inflight_head == NULL)
                    p->inflight_tail = NULL;
                p->inflight--;
                job->done(job, &rep);
            }
        }
        pthread_mutex_lock(&p->mu);
        svc_job_t *list = take_queue(p);
        bool stopping = p->stopping;
        pthread_mutex_unlock(&p->mu);
        if (list != NULL) { /* keep arrival order: append to what is held back */
            if (p->held_tail != NULL)
                p->held_tail->next = list;
            else
                p->held_head = list;
            for (p->held_tail = list; p->held_tail->next != NULL; p->held_tail = p->held_tail->next) {
            }
        }
        while (p->held_head != NULL && p->inflight < MAX_INFLIGHT) {
            svc_job_t *job = p->held_head;
            p->held_head = job->next;
            if (p->held_head == NULL)
                p->held_tail = NULL;
            if (atomic_load_explicit(&job->cancelled, memory_order_acquire))
                finish(job, AT_ERR_CANCELLED, "cancelled before it ran");
            else if (!worker_ok || send_job(p, job) != 0)
                finish(job, AT_ERR_WORKER_LOST, "the device worker is not answering");
        }
        if (stopping && p->inflight_head == NULL && p->held_head == NULL)
            break;
    }
    /* Stop the worker: it answers STOP after every earlier job. */
    svc_req_t stop = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_STOP, .job_id = ++p->next_job_id};
    svc_rep_t rep;
    if (worker_ok && zmq_send(p->sock, &stop, sizeof stop, 0) == (int)sizeof stop)
        (void)zmq_recv(p->sock, &rep, sizeof rep, 0);
    return NULL;
}

at_err_t svc_pool_submit(svc_pool_t *p, svc_job_t *job) {
    pthread_mutex_lock(&p->mu);
    at_err_t e = AT_OK;
    if (p->stopping)
        e = AT_ERR_SHUTTING_DOWN;
    else if (p->queued >= p->max_queue)
        e = AT_ERR_OVERLOADED;
    else {
        job->next = NULL;
        if (p->queue_tail != NULL)
            p->queue_tail->next = job;
        else
            p->queue_head = job;
        p->queue_tail = job;
        p->queued++;
    }
    pthread_mutex_unlock(&p->mu);
    if (e == AT_OK) {
        uint64_t one = 1;
        (void)!write(p->wake_fd, &one, sizeof one);
    }
    return e;
}

static void pool_free(svc_pool_t *p) {
    if (p->sock != NULL)
        zmq_close(p->sock);
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    svc_arena_destroy(&p->arena);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

at_err_t svc_pool_create(const svc_pool_cfg_t *cfg, void *zctx, at_diag_t *diag,
                         svc_pool_t **out) {
    svc_pool_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return AT_ERR_NOMEM;
    p->wake_fd = -1;
    pthread_mutex_init(&p->mu, NULL);
    p->zctx = zctx;
    p->max_queue = cfg->max_queue != 0 ? cfg->max_queue : 1024;
    snprintf(p->device, sizeof p->device, "%s", cfg->device);
    snprintf(p->endpoint, sizeof p->endpoint, "inproc://attnd-%s-%u", cfg->device, cfg->index);
    char tag[48];
    snprintf(tag, sizeof tag, "%s%u", cfg->device, cfg->index);
    at_err_t e = svc_arena_create(tag, cfg->arena_bytes, diag, &p->arena);
    if (e != AT_OK)
        goto out_free;
    int linger = 0;
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->sock = zmq_socket(zctx, ZMQ_PAIR);
    if (p->wake_fd < 0 || p->sock == NULL ||
        zmq_setsockopt(p->sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_bind(p->sock, p->endpoint) != 0) {
        e = at_diag_set(diag, AT_ERR_IO, "pool %s: %s", p->endpoint, zmq_strerror(zmq_errno()));
        goto out_free;
    }
    p->wcfg = (svc_worker_cfg_t){
        .endpoint = p->endpoint,
        .device = p->device,
        .cpu_threads = cfg->cpu_threads,
        .arena_name = svc_arena_name(p->arena),
        .arena_bytes = svc_arena_size(p->arena),
    };
    if (pthread_create(&p->worker, NULL, worker_main, p) != 0) {
        e = at_diag_set(diag, AT_ERR_IO, "pool %s: cannot start the worker thread", p->device);
        goto out_free;
    }
    /* The worker's first message says whether it could start. */
    svc_rep_t ready;
    if (zmq_recv(p->sock, &ready, sizeof ready, 0) != (int)sizeof ready || ready.err != AT_OK) {
        e = ready.err != AT_OK ? (at_err_t)ready.err : AT_ERR_IO;
        at_diag_set(diag, e, "%s worker: %s", p->device, ready.diag);
        pthread_join(p->worker, NULL);
        goto out_free;
    }
    if (pthread_create(&p->dispatcher, NULL, dispatcher_main, p) != 0) {
        svc_req_t stop = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_STOP};
        zmq_send(p->sock, &stop, sizeof stop, 0);
        pthread_join(p->worker, NULL);
        e = at_diag_set(diag, AT_ERR_IO, "pool %s: cannot start the dispatcher", p->device);
        goto out_free;
    }
    *out = p;
    return AT_OK;
out_free:
    pool_free(p);
    return e;
}

void svc_pool_destroy(svc_pool_t **pp) {
    if (pp == NULL || *pp == NULL)
        return;
    svc_pool_t *p = *pp;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_mutex_unlock(&p->mu);
    uint64_t one = 1;
    (void)!write(p->wake_fd, &one, sizeof one);
    pthread_join(p->dispatcher, NULL);
    pthread_join(p->worker, NULL);
    pool_free(p);
    *pp = NULL;
}

svc_arena_t *svc_pool_arena(svc_pool_t *p) { return p->arena; }

const char *svc_pool_device(const svc_pool_t *p) { return p->device; }

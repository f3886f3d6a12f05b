/* A device's pool, server side (see svc_pool.h).
 *
 * Thread model: submitters push onto `queue` under `mu` and wake the dispatcher through an
 * eventfd; the dispatcher thread alone owns the ZeroMQ socket, moves queued jobs to its `held`
 * list, sends them (batched where it can) and matches the worker's in-order replies against
 * `inflight`. A timerfd wakes it when a batch's queueing delay runs out. The worker thread owns
 * the other end. Lock order: only `mu`; it is never held across a send, a receive or a done
 * callback. */
#include "service/svc_pool.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
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

/* Batches handed to the worker at once: one running and one staged hides the round trip; the
 * rest wait here, where a cancelled job is still dropped rather than run and where jobs that
 * queue up behind a busy worker can be merged. */
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
    int timer_fd;             /* timerfd: a held batch's queueing delay ran out */
    uint32_t max_queue;
    uint64_t batch_tokens;    /* 0 = no batching */
    int64_t batch_delay_ns;
    pthread_mutex_t mu;
    svc_job_t *queue_head;    /* guarded by mu */
    svc_job_t *queue_tail;    /* guarded by mu */
    uint32_t queued;          /* guarded by mu */
    bool stopping;            /* guarded by mu */
    bool joined;              /* the owner's thread: svc_pool_stop joined the threads */
    svc_job_t *inflight_head; /* dispatcher only: sent, reply pending, in send order */
    svc_job_t *inflight_tail;
    uint32_t inflight;        /* dispatcher only: batches sent and not fully answered */
    bool worker_ok;           /* dispatcher only: false once the worker broke the protocol */
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

/* Takes every queued job; under mu. */
static svc_job_t *take_queue(svc_pool_t *p) {
    svc_job_t *list = p->queue_head;
    p->queue_head = p->queue_tail = NULL;
    p->queued = 0;
    return list;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void finish(svc_job_t *job, at_err_t e, const char *why) {
    svc_rep_t rep = {.magic = SVC_MSG_MAGIC, .err = e, .job_id = job->req.job_id};
    snprintf(rep.diag, sizeof rep.diag, "%s", why);
    job->done(job, &rep);
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
    return 0;
}

/* Sends batch[0..n) as one batch. A failed send leaves the worker waiting for the rest of a batch
 * it will never get, so the worker counts as lost. */
static void send_batch(svc_pool_t *p, svc_job_t **batch, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        batch[i]->req.batch_size = n;
        batch[i]->req.batch_index = i;
        if (!p->worker_ok || send_job(p, batch[i]) != 0) {
            p->worker_ok = false;
            for (uint32_t j = i; j < n; j++)
                finish(batch[j], AT_ERR_WORKER_LOST, "the device worker is not answering");
            fail_inflight(p, "the device worker is not answering");
            return;
        }
    }
    p->inflight++;
}

static bool tensor_op(const svc_job_t *job) {
    return job->req.op == SVC_OP_ATTEND || job->req.op == SVC_OP_APPEND;
}

/* True when job j shares a sequence with one of batch[0..n). Items are the jobs' chunks. */
static bool shares_sequence(svc_job_t *const *batch, uint32_t n, const svc_job_t *j) {
    const kvc_span_t *b = j->items;
    for (uint32_t i = 0; i < n; i++) {
        const kvc_span_t *a = batch[i]->items;
        for (uint32_t x = 0; x < batch[i]->req.num_items; x++)
            for (uint32_t y = 0; y < j->req.num_items; y++)
                if (a[x].seq_id == b[y].seq_id)
                    return true;
    }
    return false;
}

/* Collects, behind the held list's head, the jobs that can join its batch: same session, op and
 * layer, distinct sequences, within the token budget. Jobs of other sessions are stepped over;
 * the first job of the session that cannot join ends the search, so nothing overtakes it.
 * batch[0] is the head; links[i] is the pointer that holds batch[i] in the list. *blocked says
 * whether such a job ended it (waiting longer cannot grow the batch then). */
static uint32_t gather(svc_pool_t *p, svc_job_t **batch, svc_job_t ***links, uint64_t *tokens,
                       bool *blocked) {
    svc_job_t *head = p->held_head;
    uint32_t n = 1;
    batch[0] = head;
    links[0] = &p->held_head;
    *tokens = head->tokens;
    *blocked = false;
    for (svc_job_t **link = &head->next; *link != NULL && n < SVC_BATCH_MAX;
         link = &(*link)->next) {
        svc_job_t *j = *link;
        if (j->req.session_id != head->req.session_id ||
            atomic_load_explicit(&j->cancelled, memory_order_acquire))
            continue; /* a cancelled job is dropped when its turn comes */
        if (j->req.op != head->req.op || j->req.layer != head->req.layer ||
            *tokens + j->tokens > p->batch_tokens || shares_sequence(batch, n, j)) {
            *blocked = true;
            break;
        }
        links[n] = link;
        batch[n++] = j;
        *tokens += j->tokens;
    }
    return n;
}

/* Takes batch[0..n) out of the held list. Last first: each link is then still valid. */
static void unlink_batch(svc_pool_t *p, svc_job_t **batch, svc_job_t ***links, uint32_t n) {
    for (uint32_t i = n; i-- > 0;)
        *links[i] = batch[i]->next;
    p->held_tail = NULL;
    for (svc_job_t *j = p->held_head; j != NULL; j = j->next)
        p->held_tail = j;
}

/* Arms the timer for an absolute CLOCK_MONOTONIC time; 0 disarms it. */
static void arm_timer(svc_pool_t *p, int64_t at_ns) {
    struct itimerspec its = {{0, 0}, {at_ns / 1000000000, at_ns % 1000000000}};
    (void)timerfd_settime(p->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* Sends held jobs while the worker has room. A batch under its budget whose first job has waited
 * less than the queueing delay stays at the head until the delay runs out (the timer is armed),
 * unless the pool is stopping or a queued job of its session can never join it. */
static void pump(svc_pool_t *p, bool stopping) {
    svc_job_t *batch[SVC_BATCH_MAX];
    svc_job_t **links[SVC_BATCH_MAX];
    arm_timer(p, 0);
    while (p->held_head != NULL && p->inflight < MAX_INFLIGHT) {
        svc_job_t *head = p->held_head;
        if (atomic_load_explicit(&head->cancelled, memory_order_acquire) || !p->worker_ok) {
            p->held_head = head->next;
            if (p->held_head == NULL)
                p->held_tail = NULL;
            if (p->worker_ok)
                finish(head, AT_ERR_CANCELLED, "cancelled before it ran");
            else
                finish(head, AT_ERR_WORKER_LOST, "the device worker is not answering");
            continue;
        }
        uint32_t n = 1;
        uint64_t tokens = head->tokens;
        batch[0] = head;
        links[0] = &p->held_head;
        if (p->batch_tokens != 0 && tensor_op(head)) {
            bool blocked;
            n = gather(p, batch, links, &tokens, &blocked);
            int64_t until = head->queued_ns + p->batch_delay_ns;
            if (p->batch_delay_ns > 0 && !stopping && !blocked && tokens < p->batch_tokens &&
                n < SVC_BATCH_MAX && now_ns() < until) {
                arm_timer(p, until);
                return;
            }
        }
        unlink_batch(p, batch, links, n);
        send_batch(p, batch, n);
    }
}

static void *dispatcher_main(void *arg) {
    svc_pool_t *p = arg;
    for (;;) {
        zmq_pollitem_t items[3] = {
            {.socket = p->sock, .events = ZMQ_POLLIN},
            {.fd = p->wake_fd, .events = ZMQ_POLLIN},
            {.fd = p->timer_fd, .events = ZMQ_POLLIN},
        };
        if (zmq_poll(items, 3, -1) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            break;
        }
        uint64_t n;
        if (items[1].revents & ZMQ_POLLIN)
            (void)!read(p->wake_fd, &n, sizeof n);
        if (items[2].revents & ZMQ_POLLIN)
            (void)!read(p->timer_fd, &n, sizeof n);
        if (items[0].revents & ZMQ_POLLIN) {
            svc_rep_t rep;
            int got = zmq_recv(p->sock, &rep, sizeof rep, 0);
            svc_job_t *job = p->inflight_head;
            if (got != (int)sizeof rep || job == NULL || rep.job_id != job->req.job_id) {
                at_log(AT_LOG_ERROR, "pool", "%s: reply out of order or malformed", p->device);
                p->worker_ok = false;
                fail_inflight(p, "the worker answered out of order");
            } else {
                p->inflight_head = job->next;
                if (p->inflight_head == NULL)
                    p->inflight_tail = NULL;
                if (job->req.batch_index + 1 >= job->req.batch_size) /* a batch's last reply */
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
        pump(p, stopping);
        if (stopping && p->inflight_head == NULL && p->held_head == NULL)
            break;
    }
    /* Stop the worker: it answers STOP after every earlier job. */
    svc_req_t stop = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_STOP, .job_id = ++p->next_job_id};
    svc_rep_t rep;
    if (p->worker_ok && zmq_send(p->sock, &stop, sizeof stop, 0) == (int)sizeof stop)
        (void)zmq_recv(p->sock, &rep, sizeof rep, 0);
    return NULL;
}

at_err_t svc_pool_submit(svc_pool_t *p, svc_job_t *job) {
    job->queued_ns = now_ns();
    job->tokens = 0;
    if (tensor_op(job) && job->items_len == (size_t)job->req.num_items * sizeof(kvc_span_t))
        for (uint32_t i = 0; i < job->req.num_items; i++)
            job->tokens += ((const kvc_span_t *)job->items)[i].num_tokens;
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
    if (p->timer_fd >= 0)
        close(p->timer_fd);
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
    p->timer_fd = -1;
    p->worker_ok = true;
    pthread_mutex_init(&p->mu, NULL);
    p->zctx = zctx;
    p->max_queue = cfg->max_queue != 0 ? cfg->max_queue : 1024;
    p->batch_tokens = cfg->batch_tokens;
    p->batch_delay_ns = (int64_t)cfg->batch_delay_us * 1000;
    snprintf(p->device, sizeof p->device, "%s", cfg->device);
    snprintf(p->endpoint, sizeof p->endpoint, "inproc://attnd-%s-%u", cfg->device, cfg->index);
    char tag[48];
    snprintf(tag, sizeof tag, "%s%u", cfg->device, cfg->index);
    at_err_t e = svc_arena_create(tag, cfg->arena_bytes, diag, &p->arena);
    if (e != AT_OK)
        goto out_free;
    int linger = 0;
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    p->sock = zmq_socket(zctx, ZMQ_PAIR);
    if (p->wake_fd < 0 || p->timer_fd < 0 || p->sock == NULL ||
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

void svc_pool_stop(svc_pool_t *p) {
    if (p == NULL || p->joined)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_mutex_unlock(&p->mu);
    uint64_t one = 1;
    (void)!write(p->wake_fd, &one, sizeof one);
    pthread_join(p->dispatcher, NULL);
    pthread_join(p->worker, NULL);
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

/* A device's pool, server side (see svc_pool.h).
 *
 * Thread model: submitters push onto `queue` under `mu` and wake the dispatcher through an
 * eventfd; the dispatcher thread alone owns the ZeroMQ sockets (one per worker), moves queued jobs
 * into batches in their worker's scheduler, sends them and matches each worker's in-order replies
 * against that worker's `inflight` list. A timerfd wakes it when a batch's queueing delay runs
 * out, a worker's restart is due or its start timed out. Each worker thread owns the other end
 * of its socket. Locks: `mu` (the pins, states and epochs are atomics) is never held across a
 * send, a receive or a done callback; `lmu` is held only around the state listener.
 *
 * Worker processes: the dispatcher watches each one through a pidfd (readable when the process
 * ends; it then reaps exactly that pid with waitpid, so no SIGCHLD handler and no other child of
 * the server is touched). This sees every death at once, however it happened (a fault, the OOM
 * killer, kill -9), where a heartbeat would see only a silence and a socket monitor only a
 * disconnect. A hung worker is not detected. Without pidfd_open (Linux < 5.3) the dispatcher
 * polls waitpid(pid, WNOHANG) every 100 ms instead. Each start binds a fresh ipc:// path
 * (w<worker>.<generation>), so nothing queued for a dead worker can reach its successor. */
#include "service/svc_pool.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
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
#define RESTART_MAX_NS 30000000000LL /* longest delay before a worker process is started again */
#define STABLE_NS 30000000000LL      /* a worker up this long starts the count of deaths again */
#define STOP_WAIT_MS 10000           /* stopping: a worker's answer to STOP, then its exit */
#define NO_PIDFD_POLL_MS 100

extern char **environ;

typedef enum lane_state { LANE_UP, LANE_STARTING, LANE_DOWN } lane_state_t;

/* Cost units per turn and unit of weight: about one decode step of a few sequences at a few
 * thousand tokens of context; dearer jobs take several turns of credit (see ten_sched.h). */
#define SCHED_QUANTUM (1u << 16)

typedef struct lane {
    svc_pool_t *p;
    uint32_t index;
    char endpoint[160];
    void *sock;               /* dispatcher thread only (the owner's before it starts) */
    svc_worker_cfg_t wcfg;    /* for the worker thread */
    pthread_t thread;
    bool started;             /* the worker thread exists (owner's thread) */
    bool process;             /* a worker process, not a thread */
    atomic_int pid;           /* the worker process; 0 when none */
    int pidfd;                /* dispatcher only: the process's pidfd, or -1 */
    uint32_t generation;      /* dispatcher only: process starts attempted */
    atomic_int state;         /* lane_state_t; thread lanes are always UP */
    _Atomic uint64_t epoch;   /* bumped when a worker process dies */
    int64_t deadline_ns;      /* dispatcher only: STARTING: start timeout; DOWN: restart time */
    uint32_t deaths;          /* dispatcher only: deaths in a row, without a stable run */
    int64_t up_since_ns;
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
    char dir[96];             /* worker processes: the private directory of their sockets */
    int64_t restart_ns;
    int64_t start_timeout_ns;
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
    pthread_mutex_t lmu;      /* held while the listener runs, so clearing it waits for it */
    svc_pool_state_fn listener; /* guarded by lmu */
    void *listener_arg;       /* guarded by lmu */
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
    /* never blocks: a live worker drains its socket, and a dead one must not stall the pool */
    int more = job->items != NULL ? ZMQ_SNDMORE : 0;
    if (zmq_send(l->sock, &job->req, sizeof job->req, more | ZMQ_DONTWAIT) != (int)sizeof job->req)
        return -1;
    if (more && zmq_send(l->sock, job->items, job->items_len, ZMQ_DONTWAIT) != (int)job->items_len)
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

static bool lane_up(const lane_t *l) {
    return l->worker_ok && atomic_load_explicit(&l->state, memory_order_relaxed) == LANE_UP;
}

/* Stops a worker process that broke the protocol or cannot be fed; its death does the rest.
 * Its sessions are lost from here on, not only once the death is reaped: a call that comes in
 * between must read FAILED_PRECONDITION, as it will after the reap (on_death bumps again). */
static void lane_kill(lane_t *l) {
    l->worker_ok = false;
    atomic_fetch_add_explicit(&l->epoch, 1, memory_order_relaxed);
    int pid = atomic_load_explicit(&l->pid, memory_order_relaxed);
    if (pid > 0)
        kill(pid, SIGKILL);
}

/* Sends the batch led by b, dropping its cancelled jobs first. Jobs of a session whose worker
 * died since it was created are answered SESSION_LOST; while the worker is down, the rest are
 * answered WORKER_LOST. A failed send leaves the worker waiting for the rest of a batch it will
 * never get, so the worker counts as lost. */
static void send_batch(lane_t *l, svc_job_t *b) {
    svc_pool_t *p = l->p;
    svc_job_t *batch[SVC_BATCH_MAX];
    uint32_t n = 0;
    uint64_t epoch = atomic_load_explicit(&l->epoch, memory_order_relaxed);
    for (svc_job_t *j = b, *next; j != NULL; j = next) {
        next = j->next;
        if (j->req.op == SVC_OP_CREATE)
            j->epoch = epoch;
        if (j->epoch != epoch)
            finish(p, j, AT_ERR_SESSION_LOST, "its device worker stopped, and its KV cache with it");
        else if (!lane_up(l))
            finish(p, j, AT_ERR_WORKER_LOST, "the device worker is restarting");
        else if (j->req.op != SVC_OP_CLOSE &&
                 atomic_load_explicit(&j->cancelled, memory_order_acquire))
            /* a close runs even for a caller that left: its name and quota are already free */
            finish(p, j, AT_ERR_CANCELLED, "cancelled before it ran");
        else
            batch[n++] = j;
    }
    for (uint32_t i = 0; i < n; i++) {
        batch[i]->req.batch_size = n;
        batch[i]->req.batch_index = i;
        if (send_job(l, batch[i]) != 0) {
            lane_kill(l);
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
    while (l->inflight < MAX_INFLIGHT || !lane_up(l)) {
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
        if (open && p->batch_delay_ns > 0 && !stopping && lane_up(l) &&
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

static void on_ready(lane_t *l);

static void on_reply(lane_t *l) {
    svc_pool_t *p = l->p;
    if (atomic_load_explicit(&l->state, memory_order_relaxed) == LANE_STARTING) {
        on_ready(l);
        return;
    }
    svc_rep_t rep;
    int got = zmq_recv(l->sock, &rep, sizeof rep, ZMQ_DONTWAIT);
    if (got < 0 && zmq_errno() == EAGAIN)
        return;
    svc_job_t *job = l->inflight_head;
    if (got != (int)sizeof rep || job == NULL || rep.job_id != job->req.job_id) {
        at_log(AT_LOG_ERROR, "pool", "%s worker %u: reply out of order or malformed", p->device,
               l->index);
        lane_kill(l);
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

/* ---- worker processes ------------------------------------------------------------------- */

static void notify(svc_pool_t *p) {
    pthread_mutex_lock(&p->lmu);
    if (p->listener != NULL)
        p->listener(p->listener_arg);
    pthread_mutex_unlock(&p->lmu);
}

static void describe_exit(int status, char *buf, size_t n) {
    if (WIFSIGNALED(status))
        snprintf(buf, n, "killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else if (WIFEXITED(status) && WEXITSTATUS(status) == SVC_WORKER_EXIT_DEVICE_LOST)
        snprintf(buf, n, "exit status %d: the device faulted", WEXITSTATUS(status));
    else
        snprintf(buf, n, "exit status %d", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

/* A new PAIR socket of the lane (replacing its old one), bound at l->endpoint. */
static at_err_t bind_socket(lane_t *l, at_diag_t *diag) {
    if (l->sock != NULL)
        zmq_close(l->sock);
    int linger = 0;
    l->sock = zmq_socket(l->p->zctx, ZMQ_PAIR);
    if (l->sock == NULL || zmq_setsockopt(l->sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_bind(l->sock, l->endpoint) != 0)
        return at_diag_set(diag, AT_ERR_IO, "pool %s: %s", l->endpoint,
                           zmq_strerror(zmq_errno()));
    return AT_OK;
}

/* Binds a fresh ipc:// socket for the lane's next process and spawns `exe worker ...` on it. The
 * test fault switch reaches a worker's first process only. */
static at_err_t spawn_worker(lane_t *l, at_diag_t *diag) {
    svc_pool_t *p = l->p;
    /* every attempt takes a new generation, so a retry after a failed start never binds the
     * endpoint a half-started attempt may still hold */
    const uint32_t gen = l->generation++;
    snprintf(l->endpoint, sizeof l->endpoint, "ipc://%s/w%u.%u", p->dir, l->index, gen);
    at_err_t e = bind_socket(l, diag);
    if (e != AT_OK)
        return e;
    char threads[16], bytes[24], parent[24];
    snprintf(threads, sizeof threads, "%u", l->wcfg.cpu_threads);
    snprintf(bytes, sizeof bytes, "%llu", (unsigned long long)l->wcfg.arena_bytes);
    snprintf(parent, sizeof parent, "%ld", (long)getpid());
    char *argv[] = {"attnd", "worker", "--endpoint", l->endpoint, "--device",
                    (char *)l->wcfg.device, "--cpu-threads", threads, "--arena",
                    (char *)l->wcfg.arena_name, "--arena-bytes", bytes, "--parent", parent, NULL};
    size_t nenv = 0;
    while (environ[nenv] != NULL)
        nenv++;
    char **envp = calloc(nenv + 1, sizeof *envp);
    if (envp == NULL)
        return AT_ERR_NOMEM;
    size_t k = 0, flen = strlen(SVC_WORKER_FAULT_ENV);
    for (size_t i = 0; i < nenv; i++)
        if (gen == 0 || strncmp(environ[i], SVC_WORKER_FAULT_ENV, flen) != 0 ||
            environ[i][flen] != '=')
            envp[k++] = environ[i];
    /* the server blocks its stop signals in every thread; the worker starts with none blocked */
    posix_spawnattr_t attr;
    sigset_t none, dfl;
    sigemptyset(&none);
    sigemptyset(&dfl);
    sigaddset(&dfl, SIGPIPE);
    posix_spawnattr_init(&attr);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &dfl);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid = 0;
    int rc = posix_spawn(&pid, "/proc/self/exe", NULL, &attr, argv, envp);
    posix_spawnattr_destroy(&attr);
    free(envp);
    if (rc != 0)
        return at_diag_set(diag, AT_ERR_IO, "%s worker %u: cannot start a process: %s",
                           p->device, l->index, strerror(rc));
    atomic_store_explicit(&l->pid, pid, memory_order_relaxed);
    l->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    l->worker_ok = true;
    l->deadline_ns = now_ns() + p->start_timeout_ns;
    atomic_store_explicit(&l->state, LANE_STARTING, memory_order_relaxed);
    at_log(AT_LOG_INFO, "pool", "%s worker %u: process %d starting on %s", p->device, l->index,
           (int)pid, l->endpoint);
    return AT_OK;
}

/* The worker's death was reaped: every job sent to it is answered, its sessions are lost (the
 * epoch moves on), and its restart is scheduled. */
static void on_death(lane_t *l, int status) {
    svc_pool_t *p = l->p;
    char how[96], why[192];
    describe_exit(status, how, sizeof how);
    int64_t now = now_ns();
    if (atomic_load_explicit(&l->state, memory_order_relaxed) == LANE_UP &&
        now - l->up_since_ns >= STABLE_NS)
        l->deaths = 0;
    l->deaths++;
    int64_t delay = p->restart_ns;
    for (uint32_t i = 1; i < l->deaths && delay < RESTART_MAX_NS; i++)
        delay *= 2;
    delay = delay < RESTART_MAX_NS ? delay : RESTART_MAX_NS;
    at_log(AT_LOG_ERROR, "pool", "%s worker %u (pid %d) died: %s; its sessions are lost; "
           "%u death%s in a row, restart in %lld ms", p->device, l->index,
           atomic_load_explicit(&l->pid, memory_order_relaxed), how, l->deaths,
           l->deaths == 1 ? "" : "s", (long long)(delay / 1000000));
    snprintf(why, sizeof why, "the %s worker died (%s)", p->device, how);
    atomic_store_explicit(&l->pid, 0, memory_order_relaxed);
    if (l->pidfd >= 0)
        close(l->pidfd);
    l->pidfd = -1;
    atomic_fetch_add_explicit(&l->epoch, 1, memory_order_relaxed);
    atomic_store_explicit(&l->state, LANE_DOWN, memory_order_relaxed);
    l->deadline_ns = now + delay;
    l->worker_ok = false;
    zmq_close(l->sock);
    l->sock = NULL;
    fail_inflight(l, why);
    notify(p);
}

/* Reaps the lane's process if it ended. */
static void reap(lane_t *l) {
    int pid = atomic_load_explicit(&l->pid, memory_order_relaxed), status = 0;
    if (pid > 0 && waitpid(pid, &status, WNOHANG) == pid)
        on_death(l, status);
}

/* The first message of a starting worker process: READY, or why it could not start. */
static void on_ready(lane_t *l) {
    svc_pool_t *p = l->p;
    svc_rep_t rep;
    int got = zmq_recv(l->sock, &rep, sizeof rep, ZMQ_DONTWAIT);
    if (got < 0 && zmq_errno() == EAGAIN)
        return;
    if (got != (int)sizeof rep || rep.err != AT_OK) {
        rep.diag[sizeof rep.diag - 1] = '\0';
        at_log(AT_LOG_ERROR, "pool", "%s worker %u could not start: %s", p->device, l->index,
               got == (int)sizeof rep ? rep.diag : "a malformed READY");
        lane_kill(l);
        return;
    }
    l->up_since_ns = now_ns();
    atomic_store_explicit(&l->state, LANE_UP, memory_order_relaxed);
    at_log(AT_LOG_INFO, "pool", "%s worker %u (pid %d) is up", p->device, l->index,
           atomic_load_explicit(&l->pid, memory_order_relaxed));
    notify(p);
}

/* Restarts that are due and starts that took too long; *wake_at gets the next deadline. */
static void lane_timers(lane_t *l, bool stopping, int64_t *wake_at) {
    int st = atomic_load_explicit(&l->state, memory_order_relaxed);
    if (!l->process || st == LANE_UP)
        return;
    int64_t now = now_ns();
    if (st == LANE_DOWN && !stopping && now >= l->deadline_ns) {
        at_diag_t d = {{0}};
        if (spawn_worker(l, &d) != AT_OK) {
            at_log(AT_LOG_ERROR, "pool", "%s", d.msg);
            l->deaths++;
            l->deadline_ns = now + RESTART_MAX_NS;
        }
    } else if (st == LANE_STARTING && now >= l->deadline_ns && l->worker_ok) {
        at_log(AT_LOG_ERROR, "pool", "%s worker %u: no READY in time; killing it", l->p->device,
               l->index);
        lane_kill(l);
    }
    st = atomic_load_explicit(&l->state, memory_order_relaxed);
    bool arm = (st == LANE_DOWN && !stopping) || (st == LANE_STARTING && l->worker_ok);
    if (arm && (*wake_at == 0 || l->deadline_ns < *wake_at))
        *wake_at = l->deadline_ns;
}

/* Waits up to ms for the lane's process to end and reaps it; SIGKILL after that. */
static void reap_wait(lane_t *l, int ms) {
    int pid = atomic_load_explicit(&l->pid, memory_order_relaxed), status = 0;
    if (pid <= 0)
        return;
    for (int waited = 0; waited < ms && waitpid(pid, &status, WNOHANG) == 0; waited += 10) {
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    if (waitpid(pid, &status, WNOHANG) == 0) {
        kill(pid, SIGKILL);
        (void)waitpid(pid, &status, 0);
    }
    atomic_store_explicit(&l->pid, 0, memory_order_relaxed);
    if (l->pidfd >= 0)
        close(l->pidfd);
    l->pidfd = -1;
}

/* Stops an up worker (it answers STOP after every earlier job), then joins its thread or reaps
 * its process. Never blocks on a worker that died meanwhile. A worker thread the pool gave up on
 * (lane_kill) is still running and may wait for the rest of a batch: it gets the STOP too, and
 * answers it in place of that rest. */
static void lane_stop(lane_t *l, uint64_t job_id) {
    svc_req_t stop = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_STOP, .job_id = job_id};
    svc_rep_t rep;
    int pid = atomic_load_explicit(&l->pid, memory_order_relaxed);
    const bool running = lane_up(l) || (!l->process && l->started);
    /* a thread drains its socket until it stops, so only a process's send must not block */
    const int flags = l->process ? ZMQ_DONTWAIT : 0;
    if (running && zmq_send(l->sock, &stop, sizeof stop, flags) == (int)sizeof stop) {
        zmq_pollitem_t it = {.socket = l->sock, .events = ZMQ_POLLIN};
        /* a thread answers for sure; a process may be gone */
        if (!l->process || zmq_poll(&it, 1, STOP_WAIT_MS) == 1)
            (void)zmq_recv(l->sock, &rep, sizeof rep, 0);
    } else if (pid > 0) {
        kill(pid, SIGKILL); /* starting, or broken: nothing of it is worth waiting for */
    }
    if (l->process)
        reap_wait(l, STOP_WAIT_MS);
    else if (l->started)
        pthread_join(l->thread, NULL);
    l->started = false;
}

/* ---- the dispatcher --------------------------------------------------------------------- */

static void *dispatcher_main(void *arg) {
    svc_pool_t *p = arg;
    zmq_pollitem_t items[2 * SVC_WORKERS_MAX + 2];
    lane_t *owner[2 * SVC_WORKERS_MAX];
    uint32_t nl = p->num_lanes;
    for (;;) {
        int n = 0;
        bool no_pidfd = false;
        for (uint32_t i = 0; i < nl; i++) {
            lane_t *l = &p->lanes[i];
            if (l->sock != NULL) {
                owner[n] = l;
                items[n++] = (zmq_pollitem_t){.socket = l->sock, .events = ZMQ_POLLIN};
            }
            if (l->pidfd >= 0) {
                owner[n] = l;
                items[n++] = (zmq_pollitem_t){.fd = l->pidfd, .events = ZMQ_POLLIN};
            }
            no_pidfd = no_pidfd || (l->process && l->pidfd < 0 &&
                                    atomic_load_explicit(&l->pid, memory_order_relaxed) > 0);
        }
        items[n] = (zmq_pollitem_t){.fd = p->wake_fd, .events = ZMQ_POLLIN};
        items[n + 1] = (zmq_pollitem_t){.fd = p->timer_fd, .events = ZMQ_POLLIN};
        if (zmq_poll(items, n + 2, no_pidfd ? NO_PIDFD_POLL_MS : -1) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            break;
        }
        uint64_t v;
        if (items[n].revents & ZMQ_POLLIN)
            (void)!read(p->wake_fd, &v, sizeof v);
        if (items[n + 1].revents & ZMQ_POLLIN)
            (void)!read(p->timer_fd, &v, sizeof v);
        for (int i = 0; i < n; i++) {
            if (!(items[i].revents & ZMQ_POLLIN))
                continue;
            if (items[i].socket == NULL)
                reap(owner[i]);
            else if (owner[i]->sock == items[i].socket) /* not closed by a death just now */
                on_reply(owner[i]);
        }
        for (uint32_t i = 0; i < nl && no_pidfd; i++)
            reap(&p->lanes[i]);
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
            lane_timers(&p->lanes[i], stopping, &wake_at);
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
    for (uint32_t i = 0; i < nl; i++)
        lane_stop(&p->lanes[i], ++p->next_job_id);
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
    else if (p->waiting >= p->max_queue && job->req.op != SVC_OP_CLOSE)
        e = AT_ERR_OVERLOADED; /* a close is never refused: it frees what the queue holds up */
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

/* A worker that is up comes before one that is not, then fewer sessions first. */
uint32_t svc_pool_pin(svc_pool_t *p) {
    uint32_t best = 0;
    uint64_t fewest = UINT64_MAX;
    for (uint32_t i = 0; i < p->num_lanes; i++) {
        bool up = atomic_load_explicit(&p->lanes[i].state, memory_order_relaxed) == LANE_UP;
        uint64_t n = atomic_load_explicit(&p->lanes[i].sessions, memory_order_relaxed) +
                     (up ? 0 : 1ull << 32);
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

uint64_t svc_pool_epoch(svc_pool_t *p, uint32_t worker) {
    return worker < p->num_lanes
               ? atomic_load_explicit(&p->lanes[worker].epoch, memory_order_relaxed)
               : 0;
}

bool svc_pool_serving(svc_pool_t *p) {
    for (uint32_t i = 0; i < p->num_lanes; i++)
        if (atomic_load_explicit(&p->lanes[i].state, memory_order_relaxed) == LANE_UP)
            return true;
    return false;
}

int svc_pool_worker_pid(svc_pool_t *p, uint32_t worker) {
    return worker < p->num_lanes
               ? atomic_load_explicit(&p->lanes[worker].pid, memory_order_relaxed)
               : 0;
}

void svc_pool_set_listener(svc_pool_t *p, svc_pool_state_fn fn, void *arg) {
    pthread_mutex_lock(&p->lmu);
    p->listener = fn;
    p->listener_arg = arg;
    pthread_mutex_unlock(&p->lmu);
}

/* Stops the workers that started; before the dispatcher runs. */
static void stop_workers(svc_pool_t *p) {
    for (uint32_t i = 0; i < p->num_lanes; i++)
        lane_stop(&p->lanes[i], 0);
}

static void pool_free(svc_pool_t *p) {
    for (uint32_t i = 0; i < p->num_lanes; i++) {
        if (p->lanes[i].sock != NULL)
            zmq_close(p->lanes[i].sock);
        if (p->lanes[i].pidfd >= 0)
            close(p->lanes[i].pidfd);
        ten_sched_destroy(&p->lanes[i].sched);
    }
    /* ZeroMQ unlinks each socket's path as it closes it, in its own thread: try a few times */
    for (int i = 0; i < 50 && p->dir[0] != '\0' && rmdir(p->dir) != 0 && errno == ENOTEMPTY; i++) {
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    if (p->timer_fd >= 0)
        close(p->timer_fd);
    svc_arena_destroy(&p->arena);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->lmu);
    free(p);
}

/* Starts worker i's process and waits (on the owner's thread) for its READY or its end. */
static at_err_t process_start(lane_t *l, at_diag_t *diag) {
    svc_pool_t *p = l->p;
    at_err_t e = spawn_worker(l, diag);
    if (e != AT_OK)
        return e;
    for (;;) {
        int64_t left = (l->deadline_ns - now_ns()) / 1000000;
        zmq_pollitem_t it[2] = {{.socket = l->sock, .events = ZMQ_POLLIN},
                                {.fd = l->pidfd, .events = ZMQ_POLLIN}};
        int n = zmq_poll(it, l->pidfd >= 0 ? 2 : 1, left > 0 ? (long)left : 0);
        if (n < 0 && zmq_errno() == EINTR)
            continue;
        svc_rep_t ready = {.err = AT_ERR_IO};
        if (n > 0 && (it[0].revents & ZMQ_POLLIN) &&
            zmq_recv(l->sock, &ready, sizeof ready, 0) == (int)sizeof ready && ready.err == AT_OK) {
            l->up_since_ns = now_ns();
            atomic_store_explicit(&l->state, LANE_UP, memory_order_relaxed);
            return AT_OK;
        }
        if (n > 0 && !(it[0].revents & ZMQ_POLLIN)) /* it ended before saying anything */
            at_diag_set(diag, AT_ERR_IO, "%s worker %u: the process ended at start (see its log)",
                        p->device, l->index);
        else if (n > 0)
            at_diag_set(diag, ready.err != AT_OK ? (at_err_t)ready.err : AT_ERR_IO,
                        "%s worker %u: %s", p->device, l->index, ready.diag);
        else
            at_diag_set(diag, AT_ERR_IO, "%s worker %u: no READY within the start timeout",
                        p->device, l->index);
        reap_wait(l, 0);
        return ready.err != AT_OK ? (at_err_t)ready.err : AT_ERR_IO;
    }
}

/* Starts worker i, a process or a thread behind inproc://, and waits for its READY. */
static at_err_t lane_start(svc_pool_t *p, const svc_pool_cfg_t *cfg, uint32_t i,
                           uint32_t threads, bool process, at_diag_t *diag) {
    lane_t *l = &p->lanes[i];
    l->p = p;
    l->index = i;
    l->worker_ok = true;
    l->pidfd = -1;
    l->process = process;
    atomic_init(&l->sessions, 0);
    atomic_init(&l->pid, 0);
    atomic_init(&l->epoch, 0);
    atomic_init(&l->state, process ? LANE_STARTING : LANE_UP);
    at_err_t e = ten_sched_create(SCHED_QUANTUM, &l->sched);
    if (e != AT_OK)
        return e;
    l->wcfg = (svc_worker_cfg_t){
        .endpoint = l->endpoint,
        .device = p->device,
        .cpu_threads = threads,
        .arena_name = svc_arena_name(p->arena),
        .arena_bytes = svc_arena_size(p->arena),
    };
    if (process)
        return process_start(l, diag);
    snprintf(l->endpoint, sizeof l->endpoint, "inproc://attnd-%s-%u-%u", cfg->device, cfg->index,
             i);
    if ((e = bind_socket(l, diag)) != AT_OK)
        return e;
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

/* A directory only this user can enter, for the worker processes' sockets:
 * $XDG_RUNTIME_DIR/attnd-<pid>-XXXXXX, else /tmp/attnd-<pid>-XXXXXX (mkdtemp: mode 0700). */
static at_err_t private_dir(svc_pool_t *p, at_diag_t *diag) {
    const char *base = getenv("XDG_RUNTIME_DIR");
    struct stat st;
    if (base == NULL || base[0] != '/' || stat(base, &st) != 0 || !S_ISDIR(st.st_mode) ||
        strlen(base) > 48)
        base = "/tmp";
    snprintf(p->dir, sizeof p->dir, "%s/attnd-%ld-XXXXXX", base, (long)getpid());
    if (mkdtemp(p->dir) == NULL) {
        at_err_t e = at_diag_set(diag, AT_ERR_IO, "%s: cannot make a directory for the worker "
                                 "sockets: %s", p->dir, strerror(errno));
        p->dir[0] = '\0';
        return e;
    }
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
    for (uint32_t i = 0; i < SVC_WORKERS_MAX; i++)
        p->lanes[i].pidfd = -1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->lmu, NULL);
    p->zctx = zctx;
    p->max_queue = cfg->max_queue != 0 ? cfg->max_queue : 1024;
    p->batch_tokens = cfg->batch_tokens;
    p->batch_delay_ns = (int64_t)cfg->batch_delay_us * 1000;
    p->num_lanes = workers;
    p->restart_ns = (int64_t)(cfg->restart_ms != 0 ? cfg->restart_ms : 100) * 1000000;
    p->start_timeout_ns =
        (int64_t)(cfg->start_timeout_ms != 0 ? cfg->start_timeout_ms : 60000) * 1000000;
    snprintf(p->device, sizeof p->device, "%s", cfg->device);
    bool process = cfg->worker_mode == SVC_WORKER_PROCESS ||
                   (cfg->worker_mode == SVC_WORKER_AUTO && (strncmp(cfg->device, "cuda:", 5) == 0 ||
                                                            strncmp(cfg->device, "hip:", 4) == 0));
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
    if (process && (e = private_dir(p, diag)) != AT_OK)
        goto out_free;
    for (uint32_t i = 0; i < workers && e == AT_OK; i++)
        e = lane_start(p, cfg, i, threads, process, diag);
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
    pthread_join(p->dispatcher, NULL); /* it stopped the workers */
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

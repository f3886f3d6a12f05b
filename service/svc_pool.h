/* A device's pool, server side: the device's shared-memory arena, its workers, and a dispatcher
 * thread that forwards queued jobs to the workers over ZeroMQ and hands each reply back to the
 * job's owner.
 *
 * Worker processes: a worker is a thread of the server (inproc://) or a process of its own
 * (`attnd worker`, spawned from /proc/self/exe, fed over ipc:// through a socket in a private
 * 0700 directory, mapping the same arena by name). GPU devices use processes by default, the
 * CPU threads. A worker process that dies (pidfd) fails its in-flight jobs with
 * AT_ERR_WORKER_LOST; every session pinned to it is lost (its epoch moved on: jobs of the older
 * epoch still queued are answered AT_ERR_SESSION_LOST, and so are later ones), and the pool
 * starts a new process after a delay that doubles with each death in a row (from restart_ms up
 * to 30 s; a worker that stayed up 30 s starts the count again).
 *
 * Workers: `workers` per device, each with its own socket and backend (the CPU's threads are
 * split evenly between them). A session is pinned to one worker when it is created
 * (svc_pool_pin: the worker with the fewest sessions), and every job of the session goes there,
 * so one session's calls run in arrival order.
 *
 * Fair share: each worker has its own weighted deficit round robin (tenancy/ten_sched) over the
 * jobs waiting for it. A job's flow is its tenant, its weight the tenant's weight, and its cost
 * an estimate of its attention work: the sum over its chunks of num_tokens x (start_pos +
 * num_tokens) (1 for a job without chunks). While tenants have jobs waiting, each gets the
 * worker's served cost in proportion to its weight; within one tenant, jobs leave in arrival
 * order.
 *
 * Dynamic batching: an ATTEND (or APPEND) job joins the latest batch of its session that is still
 * waiting when the op and layer match, its sequences are new to the batch and the token budget
 * allows; otherwise it starts a new batch (and the older one takes nobody else, so no job
 * overtakes one of its own session). A batch is sent as one unit (the worker runs it as one
 * backend call). With a maximum queueing delay set, a batch under its budget that comes up may
 * wait that long after its first job arrived for more jobs (the jobs behind it on that worker
 * wait with it); without one, only jobs already waiting (because the worker was busy) are
 * merged, so batching adds no delay.
 *
 * Thread: svc_pool_submit, svc_pool_pin and svc_pool_unpin from any thread; done callbacks run
 * on the dispatcher thread and must not block. */
#ifndef AT_SERVICE_SVC_POOL_H
#define AT_SERVICE_SVC_POOL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/at_err.h"
#include "service/svc_arena.h"
#include "service/svc_msg.h"
#include "tenancy/ten_sched.h"

#define SVC_WORKERS_MAX 64u /* workers per device */

typedef struct svc_pool svc_pool_t;
typedef struct svc_job svc_job_t;

/* Called once per job on the dispatcher thread, with the worker's reply (or one the pool made:
 * CANCELLED for a job cancelled before it was sent, SHUTTING_DOWN, WORKER_LOST for a job sent
 * to or meant for a worker that died, SESSION_LOST for a job of a session created on a worker
 * that died since). The job belongs to the callee again from here on. */
typedef void (*svc_job_done_fn)(svc_job_t *job, const svc_rep_t *rep);

struct svc_job {
    svc_req_t req;           /* op, session_id, layer, regions...; job_id is set by the pool */
    const void *items;       /* borrowed until done: frame 2 of the request, or NULL */
    size_t items_len;
    svc_job_done_fn done;
    void *arg;               /* the owner's */
    atomic_int cancelled;    /* set by the owner (any thread); a job not yet sent is dropped */
    uint32_t worker;         /* the owner's: the session's worker (svc_pool_pin) */
    uint64_t epoch;          /* the owner's: svc_pool_epoch of the session's worker when the
                              * session was created (a CREATE job: the pool's, set when sent) */
    uint64_t flow;           /* the owner's: fair-share flow, the tenant's ten_tenant_id */
    uint32_t weight;         /* the owner's: the tenant's weight */
    /* set by the pool before done is called */
    uint64_t cost;           /* the cost estimate it was scheduled with (see the top) */
    int64_t queue_ns;        /* time from submit to the worker (0 when never sent) */
    int64_t device_ns;       /* time the worker spent on it (a batch's run counts for its first
                              * job; the others get what is left after the previous reply) */
    /* the pool's */
    svc_job_t *next;         /* submit queue; then the job's batch, in order */
    int64_t queued_ns;       /* CLOCK_MONOTONIC at submit */
    int64_t sent_ns;
    uint64_t tokens;         /* tokens of an ATTEND or APPEND job's chunks */
    ten_sched_item_t item;   /* a batch's first job: the batch in its worker's scheduler */
    svc_job_t *batch_tail;   /* a batch's first job: its last job */
    uint32_t batch_n;        /* a batch's first job: jobs in it */
    uint64_t batch_tokens;   /* a batch's first job: their tokens */
    svc_job_t *open_next;    /* a batch that may still grow: its worker's list */
};

typedef enum svc_worker_mode {
    SVC_WORKER_AUTO = 0, /* a process for "cuda:N" and "hip:N", a thread otherwise */
    SVC_WORKER_THREAD,
    SVC_WORKER_PROCESS,
} svc_worker_mode_t;

/* Called on the dispatcher thread when a worker of the pool went down or came up (see
 * svc_pool_serving); must not block. */
typedef void (*svc_pool_state_fn)(void *arg);

typedef struct svc_pool_cfg {
    const char *device;      /* borrowed; "cpu" */
    uint32_t index;          /* distinguishes endpoints and arena names */
    uint32_t cpu_threads;    /* all workers together; 0 = one per online CPU */
    uint32_t workers;        /* workers of the device, 1..SVC_WORKERS_MAX; 0 = 1 */
    uint64_t arena_bytes;    /* shared memory for tensors in flight */
    uint32_t max_queue;      /* jobs waiting for the worker before submit says OVERLOADED */
    uint32_t batch_tokens;   /* dynamic batching: most tokens in one batch; 0 = no batching */
    uint32_t batch_delay_us; /* most time a batch under its budget waits for more jobs; 0 = none */
    svc_worker_mode_t worker_mode;
    uint32_t restart_ms;       /* worker processes: first restart delay; 0 = 100 */
    uint32_t start_timeout_ms; /* worker processes: READY within this; 0 = 60000 */
} svc_pool_cfg_t;

/* Creates the arena, starts the workers and the dispatcher, and returns once every worker said it
 * is ready (or one failed: its error and diag). zctx is a ZeroMQ context (borrowed, outlives the
 * pool). Worker processes are started from this thread first, and die when it ends
 * (PR_SET_PDEATHSIG): call it from a thread that outlives the pool. A program that creates pools
 * with worker processes must run svc_worker_main for `PROGRAM worker ...`. */
at_err_t svc_pool_create(const svc_pool_cfg_t *cfg, void *zctx, at_diag_t *diag,
                         svc_pool_t **out);

/* Stops taking jobs, runs every job already submitted (or answers it CANCELLED, as its owner
 * marked it), then stops the worker and the dispatcher. The arena stays: calls that were answered
 * may still hold regions of it until the server lets them go. Idempotent; NULL allowed. Thread:
 * the owner's. */
void svc_pool_stop(svc_pool_t *p);

/* svc_pool_stop, then frees everything, the arena included: every region must be free by then
 * (the server that used the pool is destroyed). NULL allowed; sets *p to NULL. */
void svc_pool_destroy(svc_pool_t **p);

/* Queues job (ownership passes to the pool until job->done); job->worker must come from
 * svc_pool_pin. Errors, job untouched and done not called: AT_ERR_OVERLOADED (max_queue jobs
 * submitted and not yet sent to a worker), AT_ERR_SHUTTING_DOWN. */
at_err_t svc_pool_submit(svc_pool_t *p, svc_job_t *job);

/* The worker with the fewest pinned sessions, for a new session: it now counts one more. */
uint32_t svc_pool_pin(svc_pool_t *p);
/* Undoes one svc_pool_pin of worker (the session was closed, or never created). */
void svc_pool_unpin(svc_pool_t *p, uint32_t worker);
uint32_t svc_pool_workers(const svc_pool_t *p);

/* The worker's incarnation: it moves on each time the worker process dies, which loses the
 * sessions created before. Any thread. */
uint64_t svc_pool_epoch(svc_pool_t *p, uint32_t worker);
/* True while at least one worker of the device is up (it can take new sessions). Any thread. */
bool svc_pool_serving(svc_pool_t *p);
/* The worker's process id; 0 for a worker thread or while none runs. Any thread. */
int svc_pool_worker_pid(svc_pool_t *p, uint32_t worker);
/* Sets the function told of worker state changes (NULL: none). Any thread. */
void svc_pool_set_listener(svc_pool_t *p, svc_pool_state_fn fn, void *arg);

/* The arena tensors of this device's jobs go in; borrowed for the pool's lifetime. */
svc_arena_t *svc_pool_arena(svc_pool_t *p);
const char *svc_pool_device(const svc_pool_t *p);

#endif

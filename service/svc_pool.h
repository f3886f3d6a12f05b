/* A device's pool, server side: the device's shared-memory arena, its worker (a thread here; a
 * process for GPUs), and a dispatcher thread that forwards queued jobs to the worker over ZeroMQ
 * and hands each reply back to the job's owner.
 *
 * The calls of one session run in arrival order. Jobs of different sessions may overtake each
 * other: dynamic batching takes ATTEND (or APPEND) jobs of one session and layer over distinct
 * sequences out of the queue, up to a token budget, and hands them to the worker as one batch,
 * which it runs as one backend call. A job is never moved ahead of an earlier job of its own
 * session that it could not join. With a maximum queueing delay set, a batch that is still under
 * its budget may wait that long after its first job arrived for more jobs to join (the jobs
 * queued behind it wait with it); without one,
 * only jobs already waiting (because the worker was busy) are merged, so batching adds no delay.
 * Thread: svc_pool_submit from any thread; done callbacks run on the dispatcher thread and must
 * not block. */
#ifndef AT_SERVICE_SVC_POOL_H
#define AT_SERVICE_SVC_POOL_H

#include <stdatomic.h>
#include <stdint.h>

#include "common/at_err.h"
#include "service/svc_arena.h"
#include "service/svc_msg.h"

typedef struct svc_pool svc_pool_t;
typedef struct svc_job svc_job_t;

/* Called once per job on the dispatcher thread, with the worker's reply (or one the pool made:
 * CANCELLED for a job cancelled before it was sent, SHUTTING_DOWN, WORKER_LOST). The job belongs
 * to the callee again from here on. */
typedef void (*svc_job_done_fn)(svc_job_t *job, const svc_rep_t *rep);

struct svc_job {
    svc_req_t req;           /* op, session_id, layer, regions...; job_id is set by the pool */
    const void *items;       /* borrowed until done: frame 2 of the request, or NULL */
    size_t items_len;
    svc_job_done_fn done;
    void *arg;               /* the owner's */
    atomic_int cancelled;    /* set by the owner (any thread); a job not yet sent is dropped */
    svc_job_t *next;         /* the pool's */
    int64_t queued_ns;       /* the pool's: CLOCK_MONOTONIC at submit */
    uint64_t tokens;         /* the pool's: tokens of an ATTEND or APPEND job's chunks */
};

typedef struct svc_pool_cfg {
    const char *device;      /* borrowed; "cpu" */
    uint32_t index;          /* distinguishes endpoints and arena names */
    uint32_t cpu_threads;    /* 0 = one per online CPU */
    uint64_t arena_bytes;    /* shared memory for tensors in flight */
    uint32_t max_queue;      /* jobs waiting for the worker before submit says OVERLOADED */
    uint32_t batch_tokens;   /* dynamic batching: most tokens in one batch; 0 = no batching */
    uint32_t batch_delay_us; /* most time a batch under its budget waits for more jobs; 0 = none */
} svc_pool_cfg_t;

/* Creates the arena, starts the worker and the dispatcher, and returns once the worker said it is
 * ready (or failed: its error and diag). zctx is a ZeroMQ context (borrowed, outlives the pool). */
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

/* Queues job (ownership passes to the pool until job->done). Errors, job untouched and done not
 * called: AT_ERR_OVERLOADED (queue full), AT_ERR_SHUTTING_DOWN. */
at_err_t svc_pool_submit(svc_pool_t *p, svc_job_t *job);

/* The arena tensors of this device's jobs go in; borrowed for the pool's lifetime. */
svc_arena_t *svc_pool_arena(svc_pool_t *p);
const char *svc_pool_device(const svc_pool_t *p);

#endif

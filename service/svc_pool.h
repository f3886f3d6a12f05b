/* A device's pool, server side: the device's shared-memory arena, its worker (a thread here; a
 * process for GPUs), and a dispatcher thread that forwards queued jobs to the worker over ZeroMQ
 * and hands each reply back to the job's owner.
 *
 * Jobs reach the worker in submission order and the worker runs them in that order, so the calls
 * of one session run in arrival order. Thread: svc_pool_submit from any thread; done callbacks run
 * on the dispatcher thread and must not block. */
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
};

typedef struct svc_pool_cfg {
    const char *device;      /* borrowed; "cpu" */
    uint32_t index;          /* distinguishes endpoints and arena names */
    uint32_t cpu_threads;    /* 0 = one per online CPU */
    uint64_t arena_bytes;    /* shared memory for tensors in flight */
    uint32_t max_queue;      /* jobs waiting for the worker before submit says OVERLOADED */
} svc_pool_cfg_t;

/* Creates the arena, starts the worker and the dispatcher, and returns once the worker said it is
 * ready (or failed: its error and diag). zctx is a ZeroMQ context (borrowed, outlives the pool). */
at_err_t svc_pool_create(const svc_pool_cfg_t *cfg, void *zctx, at_diag_t *diag,
                         svc_pool_t **out);

/* Runs every job already submitted, stops the worker and frees everything. NULL allowed. */
void svc_pool_destroy(svc_pool_t **p);

/* Queues job (ownership passes to the pool until job->done). Errors, job untouched and done not
 * called: AT_ERR_OVERLOADED (queue full), AT_ERR_SHUTTING_DOWN. */
at_err_t svc_pool_submit(svc_pool_t *p, svc_job_t *job);

/* The arena tensors of this device's jobs go in; borrowed for the pool's lifetime. */
svc_arena_t *svc_pool_arena(svc_pool_t *p);
const char *svc_pool_device(const svc_pool_t *p);

#endif

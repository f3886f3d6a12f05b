/* A device's worker: owns the device's backend and every session's att_ctx on it, and runs jobs
 * from one socket in arrival order (so one session's calls run in the order they came).
 * The same code runs as a thread of the server (inproc://) or, for GPUs, as a process of its own
 * (ipc://). */
#ifndef AT_SERVICE_SVC_WORKER_H
#define AT_SERVICE_SVC_WORKER_H

#include <stdint.h>

#include "common/at_err.h"

typedef struct svc_worker_cfg {
    const char *endpoint;   /* borrowed; the pool's PAIR socket to connect to */
    const char *device;     /* borrowed; "cpu" (GPU devices come with their backends) */
    uint32_t cpu_threads;   /* CPU backend threads; 0 = one per online CPU */
    const char *arena_name; /* borrowed; the shared-memory arena to attach */
    uint64_t arena_bytes;
} svc_worker_cfg_t;

/* Connects, sends READY, serves jobs until STOP; returns the error that ended it (AT_OK after
 * STOP). zctx is a ZeroMQ context (borrowed). Thread: its own (a worker thread or process). */
at_err_t svc_worker_run(const svc_worker_cfg_t *cfg, void *zctx);

#endif

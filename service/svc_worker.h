/* A device's worker: owns the device's backend and every session's att_ctx on it, and runs jobs
 * from one socket in arrival order (so one session's calls run in the order they came).
 * The same code runs as a thread of the server (inproc://) or, for GPUs, as a process of its own
 * (ipc://). */
#ifndef AT_SERVICE_SVC_WORKER_H
#define AT_SERVICE_SVC_WORKER_H

#include <stdbool.h>
#include <stdint.h>

#include "common/at_err.h"

typedef struct svc_worker_cfg {
    const char *endpoint;   /* borrowed; the pool's PAIR socket to connect to */
    const char *device;     /* borrowed; "cpu", "null", "cuda:N" or "hip:N" */
    uint32_t cpu_threads;   /* CPU backend threads; 0 = one per online CPU */
    const char *arena_name; /* borrowed; the shared-memory arena to attach */
    uint64_t arena_bytes;
    bool process;           /* a worker process (attnd worker), not a thread of the server */
} svc_worker_cfg_t;

/* Exit status of a worker process whose GPU faulted: its context is unusable, so the process
 * ends and the server starts a fresh one. */
#define SVC_WORKER_EXIT_DEVICE_LOST 3

/* Test-only fault switch, off unless set: ATTND_TEST_FAULT=DEVICE:N in a worker process's
 * environment makes the worker of DEVICE fail on its Nth ATTEND or APPEND request: a CPU (or
 * null) worker aborts, a CUDA worker launches a kernel that writes through a null pointer, so
 * the request's own run meets the sticky fault and the process exits with
 * SVC_WORKER_EXIT_DEVICE_LOST. The pool passes it to a worker's first start only. */
#define SVC_WORKER_FAULT_ENV "ATTND_TEST_FAULT"

/* Connects, sends READY, serves jobs until STOP; returns the error that ended it (AT_OK after
 * STOP). zctx is a ZeroMQ context (borrowed). Thread: its own (a worker thread or process). */
at_err_t svc_worker_run(const svc_worker_cfg_t *cfg, void *zctx);

/* `attnd worker`, the entry of a worker process that a pool spawns (never run by hand):
 * --endpoint ipc://PATH --device D --cpu-threads N --arena NAME --arena-bytes B --parent PID.
 * It dies with its parent (PR_SET_PDEATHSIG). Exit status: 0 after STOP, 1 when it could not
 * start or lost its socket, 2 for bad arguments, SVC_WORKER_EXIT_DEVICE_LOST. A test program
 * that creates pools with worker processes calls this from its main for argv[1] == "worker". */
int svc_worker_main(int argc, char **argv);

#endif

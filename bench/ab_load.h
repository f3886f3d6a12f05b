/* Runs one measured phase: caller threads send their calls (unary Attend or on an AttendStream),
 * closed loop or on a schedule, while the main thread shows progress; every call becomes a
 * record for the report. */
#ifndef AT_BENCH_AB_LOAD_H
#define AT_BENCH_AB_LOAD_H

#include <grpc/grpc.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bench/ab_work.h"

/* A record's status when the call could not even be started on the client. */
#define AB_STATUS_CLIENT (-1)

/* One measured call. */
typedef struct ab_rec {
    double t_s;          /* when it was due (open loop) or sent (closed loop), from the start */
    double lat_s;        /* from t_s to its status */
    uint32_t req_bytes;
    uint32_t resp_bytes; /* 0 unless it succeeded */
    int16_t status;      /* gRPC status, or AB_STATUS_CLIENT */
    uint16_t tenant;     /* the caller's tenant index */
} ab_rec_t;

/* What one caller does; everything it points to is borrowed until ab_load_run returns. */
typedef struct ab_caller_spec {
    uint16_t tenant;        /* copied into its records */
    const char *token;      /* "" = no authorization metadata */
    const ab_buf_t *reqs;   /* [n_reqs] packed AttendRequests, sent in turn */
    uint32_t n_reqs;
    double interval_s;      /* open loop: time between its scheduled calls; 0 = closed loop */
    double offset_s;        /* open loop: its first call's time after the start */
    uint64_t calls;         /* its measured calls; 0 = until the duration is over */
} ab_caller_spec_t;

typedef struct ab_load_cfg {
    grpc_channel *ch;       /* borrowed */
    bool streams;           /* AttendStream instead of unary Attend */
    uint32_t timeout_ms;    /* each unary call's deadline */
    double duration_s;      /* for callers whose calls is 0 */
    uint32_t warmup;        /* unmeasured closed-loop calls per caller first */
    const char *label;      /* names the phase on the progress line */
} ab_load_cfg_t;

/* What a phase measured. */
typedef struct ab_run {
    ab_rec_t *recs;         /* owned: [n_recs], the callers' records one after another */
    size_t n_recs;
    double start_s;         /* the measured part's start (ab_now_s clock) */
    double wall_s;          /* from the start to the last call's end */
    uint64_t unsent;        /* open loop: calls due that were never sent because the callers
                             * were still behind the schedule at twice the duration */
    bool interrupted;       /* SIGINT or SIGTERM cut it short */
} ab_run_t;

/* Runs the warmup and then the measured calls of n callers; shows progress on stderr once a
 * second. Returns 0 and *out (ab_run_fini), or -1 when a thread or memory could not be had, or a
 * stream could not be created (message on stderr). Calls that fail are records, not failures.
 * Thread: main; it starts and joins the callers. */
int ab_load_run(const ab_load_cfg_t *cfg, const ab_caller_spec_t *callers, uint32_t n,
                ab_run_t *out);

/* Frees the records and zeroes *r. */
void ab_run_fini(ab_run_t *r);

#endif

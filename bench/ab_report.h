/* attnd-bench's report: statistics of each phase's records, in total and per tenant, printed as
 * a table and written as JSON. */
#ifndef AT_BENCH_AB_REPORT_H
#define AT_BENCH_AB_REPORT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "bench/ab_load.h"
#include "bench/ab_opts.h"
#include "bench/ab_preset.h"

/* Slots of ab_stats_t.by_status: AB_STATUS_CLIENT (-1) and gRPC's 0..16. */
#define AB_STATUS_SLOTS 18

typedef struct ab_stats {
    uint64_t calls;                       /* measured calls that ended */
    uint64_t ok;
    uint64_t by_status[AB_STATUS_SLOTS];  /* [status + 1]; an unknown status counts as UNKNOWN */
    double work;                          /* ab_work_cost of the successful calls */
    double calls_per_s;                   /* successful calls / the phase's wall time */
    double tokens_per_s;                  /* their new tokens likewise */
    double mb_per_s;                      /* request + response payload of every call, 10^6 B */
    double p50_s, p90_s, p99_s, p999_s, max_s, mean_s; /* of successful calls; 0 when none */
} ab_stats_t;

/* Statistics of run's records of tenant (-1: all), each call carrying tokens_per_call new
 * tokens and cost_per_call work. Returns 0, or -1 when out of memory (message on stderr). */
int ab_stats_compute(const ab_run_t *run, int tenant, uint32_t tokens_per_call,
                     double cost_per_call, ab_stats_t *out);

/* The name of a record's status ("CLIENT_ERROR" for AB_STATUS_CLIENT). Static storage. */
const char *ab_status_name(int status);

/* One workload phase, run on one device or on the device and then on null. */
typedef struct ab_phase {
    ab_workload_t workload;
    uint32_t tokens_per_call;
    double cost_per_call;   /* ab_work_cost */
    const char *devices[2]; /* borrowed */
    ab_run_t runs[2];       /* owned by whoever owns the ab_phase_t: ab_run_fini each */
    uint32_t n_runs;        /* 1, or 2 with --compare-null: runs[1] is on null */
} ab_phase_t;

/* Everything the report says; all borrowed. */
typedef struct ab_report {
    const ab_opts_t *opts;
    const ab_model_t *models;
    uint32_t n_models;
    const char *target;
    bool spawned;             /* attnd-bench started the server */
    double load_before;       /* this host's 1-minute load average before the run started (a
                               * busy host skews every figure); < 0 = unknown */
    long cpus;                /* online CPUs of this host */
    const ab_phase_t *phases;
    uint32_t n_phases;        /* phases that ran (fewer when interrupted) */
} ab_report_t;

/* The report as text on f. Returns 0, or -1 when out of memory. Thread: main. */
int ab_report_print(const ab_report_t *r, FILE *f);

/* The report as JSON in path. Returns 0, or -1 after a message. Thread: main. */
int ab_report_write_json(const ab_report_t *r, const char *path);

#endif

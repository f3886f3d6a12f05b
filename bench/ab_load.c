/* One phase of attnd-bench: caller threads and their records (see ab_load.h).
 *
 * Thread model: the main thread starts one thread per caller, shows progress from the shared
 * counters, and joins them. Each caller owns its completion queue, its stream and its records;
 * the only state callers share is the live_t counters (atomics, relaxed: they feed the progress
 * line, which may lag by a call; the records are read only after pthread_join). The open-loop
 * schedule follows CLOCK_MONOTONIC.
 *
 * Open loop: caller i of a tenant sends its k-th call at start + offset_i + k * interval, or at
 * once when it is late because its previous call took longer than the interval; latency counts
 * from the due time, so the wait behind a slow call is part of it (no coordinated omission).
 * Each caller has one call in flight, so at most n calls are in flight in all. */
#include "bench/ab_load.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/ab_term.h"
#include "bench/bench_client.h"

/* Successful calls' latencies for the progress line: log2 buckets of microseconds, 16 a
 * doubling (4.4% wide), up to 2^32 us. The report uses the exact records instead. */
#define HIST_PER_OCTAVE 16
#define HIST_BUCKETS (32 * HIST_PER_OCTAVE)

typedef struct live {
    atomic_uint_fast64_t calls;              /* measured calls done */
    atomic_uint_fast64_t errors;             /* of those, not OK */
    atomic_uint_fast64_t hist[HIST_BUCKETS]; /* of the OK ones, by latency */
    atomic_uint running;                     /* callers not yet finished */
    atomic_bool stop;                        /* the main thread asks every caller to stop */
} live_t;

typedef struct caller {
    const ab_caller_spec_t *spec; /* borrowed from ab_load_run's caller */
    const ab_load_cfg_t *cfg;     /* borrowed likewise */
    live_t *live;                 /* borrowed from the runner */
    grpc_completion_queue *cq;    /* owned by the runner; used by this caller's thread only */
    bench_stream_t *stream;       /* owned; opened on first use, closed by the runner */
    bool measure;                 /* false: warmup, nothing recorded */
    double start_s;
    ab_rec_t *recs;               /* owned until the runner copies them: [n], room for cap */
    size_t n;
    size_t cap;
    uint64_t unsent;
    double last_end_s;            /* when its last measured call ended */
    bool failed;                  /* a stream could not be created or memory ran out */
    char why[600];                /* for failed, or the first client-side call error */
} caller_t;

static bool stopping(const caller_t *c) {
    return ab_term_interrupted() || atomic_load_explicit(&c->live->stop, memory_order_relaxed);
}

/* Sleeps until t (ab_now_s clock) in steps of at most 100 ms, so that a stop is seen. */
static void sleep_until(const caller_t *c, double t) {
    for (;;) {
        double now = ab_now_s();
        if (now >= t || stopping(c))
            return;
        double until = t - now > 0.1 ? now + 0.1 : t;
        struct timespec ts = {.tv_sec = (time_t)until,
                              .tv_nsec = (long)((until - floor(until)) * 1e9)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    }
}

/* One call; its status and response size. Returns -1 only when the caller must stop. */
static int call_once(caller_t *c, const ab_buf_t *req, int *status, size_t *resp_bytes) {
    bench_reply_t r;
    int rc;
    if (c->cfg->streams) {
        if (c->stream == NULL) {
            bench_call_cfg_t sc = {.method = "/attnd.v1.Attention/AttendStream",
                                   .token = c->spec->token,
                                   .exchange_timeout_ms = c->cfg->timeout_ms};
            if (bench_stream_open(c->cfg->ch, c->cq, &sc, &c->stream) != 0) {
                snprintf(c->why, sizeof c->why, "cannot create an AttendStream call");
                c->failed = true;
                return -1;
            }
        }
        rc = bench_stream_exchange(c->stream, req->p, req->n, &r);
        if (bench_stream_ended(c->stream)) /* the next call opens a new one */
            bench_stream_close(&c->stream, NULL);
    } else {
        bench_call_cfg_t uc = {.method = "/attnd.v1.Attention/Attend", .token = c->spec->token,
                               .timeout_ms = c->cfg->timeout_ms};
        rc = bench_call_unary(c->cfg->ch, c->cq, &uc, req->p, req->n, &r);
    }
    if (rc != 0 && c->why[0] == '\0')
        snprintf(c->why, sizeof c->why, "%s", r.details);
    *status = rc == 0 ? (int)r.status : AB_STATUS_CLIENT;
    *resp_bytes = *status == GRPC_STATUS_OK ? r.body_bytes : 0;
    bench_reply_fini(&r);
    return 0;
}

static void count_live(live_t *live, int status, double lat_s) {
    atomic_fetch_add_explicit(&live->calls, 1, memory_order_relaxed);
    if (status != GRPC_STATUS_OK) {
        atomic_fetch_add_explicit(&live->errors, 1, memory_order_relaxed);
        return;
    }
    double us = lat_s * 1e6;
    int b = us <= 1 ? 0 : (int)(log2(us) * HIST_PER_OCTAVE);
    b = b >= HIST_BUCKETS ? HIST_BUCKETS - 1 : b;
    atomic_fetch_add_explicit(&live->hist[b], 1, memory_order_relaxed);
}

static int record(caller_t *c, double due_s, double end_s, size_t req_bytes, int status,
                  size_t resp_bytes) {
    if (c->n == c->cap) {
        size_t cap = c->cap != 0 ? c->cap * 2 : 1024;
        ab_rec_t *p = realloc(c->recs, cap * sizeof *p);
        if (p == NULL) {
            snprintf(c->why, sizeof c->why, "out of memory for %zu call records", cap);
            c->failed = true;
            return -1;
        }
        c->recs = p;
        c->cap = cap;
    }
    c->recs[c->n++] = (ab_rec_t){.t_s = due_s - c->start_s, .lat_s = end_s - due_s,
                                 .req_bytes = (uint32_t)req_bytes,
                                 .resp_bytes = (uint32_t)resp_bytes,
                                 .status = (int16_t)status, .tenant = c->spec->tenant};
    c->last_end_s = end_s;
    count_live(c->live, status, end_s - due_s);
    return 0;
}

static void *caller_main(void *arg) {
    caller_t *c = arg;
    const ab_caller_spec_t *sp = c->spec;
    bool open_loop = c->measure && sp->interval_s > 0;
    bool by_duration = c->measure && sp->calls == 0;
    uint64_t limit = c->measure ? sp->calls : c->cfg->warmup;
    double end_s = c->start_s + c->cfg->duration_s;
    for (uint64_t k = 0; !stopping(c) && (by_duration || k < limit); k++) {
        double due = open_loop ? c->start_s + sp->offset_s + (double)k * sp->interval_s
                               : ab_now_s();
        if (by_duration && due >= end_s)
            break;
        if (by_duration && open_loop && ab_now_s() >= end_s + c->cfg->duration_s) {
            /* far behind the schedule: what is still due is not sent */
            c->unsent = (uint64_t)ceil((end_s - due) / sp->interval_s);
            break;
        }
        if (open_loop)
            sleep_until(c, due);
        if (stopping(c))
            break;
        const ab_buf_t *req = &sp->reqs[k % sp->n_reqs];
        int status;
        size_t resp_bytes;
        if (call_once(c, req, &status, &resp_bytes) != 0)
            break;
        if (c->measure && record(c, due, ab_now_s(), req->n, status, resp_bytes) != 0)
            break;
    }
    /* release: the main thread reads this caller's fields after join, not after this store;
     * the count only ends its progress loop */
    atomic_fetch_sub_explicit(&c->live->running, 1, memory_order_release);
    return NULL;
}

/* The p-quantile of the live histogram, in ms; 0 when it is empty. */
static double live_quantile_ms(live_t *live, double p) {
    uint64_t counts[HIST_BUCKETS], total = 0;
    for (int b = 0; b < HIST_BUCKETS; b++) {
        counts[b] = atomic_load_explicit(&live->hist[b], memory_order_relaxed);
        total += counts[b];
    }
    if (total == 0)
        return 0;
    uint64_t want = (uint64_t)ceil(p * (double)total), seen = 0;
    for (int b = 0; b < HIST_BUCKETS; b++) {
        seen += counts[b];
        if (seen >= want && counts[b] > 0)
            return exp2(((double)b + 0.5) / HIST_PER_OCTAVE) * 1e-3;
    }
    return exp2((HIST_BUCKETS - 0.5) / HIST_PER_OCTAVE) * 1e-3;
}

/* The line as of now, or as of end_s when it is not 0 (the last call's end, for the final line:
 * the time until the main thread noticed is not the callers'). */
static void show_progress(ab_progress_t *pg, const ab_load_cfg_t *cfg, live_t *live,
                          double start_s, double end_s, uint64_t planned) {
    double t = (end_s != 0 ? end_s : ab_now_s()) - start_s;
    uint64_t calls = atomic_load_explicit(&live->calls, memory_order_relaxed);
    uint64_t errors = atomic_load_explicit(&live->errors, memory_order_relaxed);
    char of[64] = "";
    if (planned != 0)
        snprintf(of, sizeof of, "/%llu", (unsigned long long)planned);
    else
        snprintf(of, sizeof of, " (%.0f of %.0f s)", t, cfg->duration_s);
    ab_progress_show(pg, "%s: calls %llu%s  errors %llu  %.1f calls/s  p50 %.3f ms  p99 %.3f ms",
                     cfg->label, (unsigned long long)calls, of, (unsigned long long)errors,
                     t > 0 ? (double)calls / t : 0.0, live_quantile_ms(live, 0.50),
                     live_quantile_ms(live, 0.99));
}

/* Runs every caller once (warmup or measured) and waits for all of them; progress while
 * measuring. Returns 0, or -1 when a thread could not be started or a caller failed. */
static int run_callers(const ab_load_cfg_t *cfg, caller_t *cs, pthread_t *tids, uint32_t n,
                       live_t *live, bool measure, double *start_s) {
    uint64_t planned = 0;
    for (uint32_t i = 0; i < n; i++)
        planned += cs[i].spec->calls;
    *start_s = ab_now_s();
    atomic_store_explicit(&live->running, n, memory_order_relaxed);
    uint32_t started = 0;
    int rc = 0;
    for (; started < n; started++) {
        cs[started].measure = measure;
        cs[started].start_s = *start_s;
        if (pthread_create(&tids[started], NULL, caller_main, &cs[started]) != 0) {
            fprintf(stderr, "attnd-bench: cannot start caller thread %u of %u\n", started + 1, n);
            atomic_store_explicit(&live->stop, true, memory_order_relaxed);
            atomic_fetch_sub_explicit(&live->running, n - started, memory_order_relaxed);
            rc = -1;
            break;
        }
    }
    ab_progress_t pg;
    ab_progress_init(&pg);
    while (measure && atomic_load_explicit(&live->running, memory_order_acquire) > 0) {
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        if (ab_progress_due(&pg))
            show_progress(&pg, cfg, live, *start_s, 0, planned);
    }
    double end_s = 0;
    for (uint32_t i = 0; i < started; i++) {
        pthread_join(tids[i], NULL);
        end_s = cs[i].last_end_s > end_s ? cs[i].last_end_s : end_s;
    }
    if (measure)
        show_progress(&pg, cfg, live, *start_s, end_s, planned);
    ab_progress_end(&pg);
    for (uint32_t i = 0; i < started; i++)
        if (cs[i].failed) {
            fprintf(stderr, "attnd-bench: caller %u: %s\n", i, cs[i].why);
            rc = -1;
        }
    return rc;
}

int ab_load_run(const ab_load_cfg_t *cfg, const ab_caller_spec_t *specs, uint32_t n,
                ab_run_t *out) {
    memset(out, 0, sizeof *out);
    live_t *live = malloc(sizeof *live);
    caller_t *cs = calloc(n, sizeof *cs);
    pthread_t *tids = calloc(n, sizeof *tids);
    int rc = -1;
    if (live == NULL || cs == NULL || tids == NULL) {
        fprintf(stderr, "attnd-bench: out of memory for %u callers\n", n);
        goto out;
    }
    atomic_init(&live->calls, 0);
    atomic_init(&live->errors, 0);
    for (int b = 0; b < HIST_BUCKETS; b++)
        atomic_init(&live->hist[b], 0);
    atomic_init(&live->running, 0);
    atomic_init(&live->stop, false);
    for (uint32_t i = 0; i < n; i++) {
        cs[i].spec = &specs[i];
        cs[i].cfg = cfg;
        cs[i].live = live;
        cs[i].cq = bench_cq_create();
    }
    double start_s;
    if (cfg->warmup > 0 && run_callers(cfg, cs, tids, n, live, false, &start_s) != 0)
        goto out;
    if (run_callers(cfg, cs, tids, n, live, true, &start_s) != 0)
        goto out;
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += cs[i].n;
    out->recs = malloc((total + 1) * sizeof *out->recs);
    if (out->recs == NULL) {
        fprintf(stderr, "attnd-bench: out of memory for %zu call records\n", total);
        goto out;
    }
    out->start_s = start_s;
    for (uint32_t i = 0; i < n; i++) {
        memcpy(out->recs + out->n_recs, cs[i].recs, cs[i].n * sizeof *cs[i].recs);
        out->n_recs += cs[i].n;
        out->unsent += cs[i].unsent;
        if (cs[i].n > 0 && cs[i].last_end_s - start_s > out->wall_s)
            out->wall_s = cs[i].last_end_s - start_s;
        if (cs[i].why[0] != '\0')
            fprintf(stderr, "attnd-bench: caller %u: a call failed in the client: %s\n", i,
                    cs[i].why);
    }
    out->interrupted = ab_term_interrupted();
    rc = 0;
out:
    for (uint32_t i = 0; cs != NULL && i < n; i++) {
        bench_stream_close(&cs[i].stream, NULL);
        bench_cq_destroy(&cs[i].cq);
        free(cs[i].recs);
    }
    free(cs);
    free(tids);
    free(live);
    return rc;
}

void ab_run_fini(ab_run_t *r) {
    free(r->recs);
    memset(r, 0, sizeof *r);
}

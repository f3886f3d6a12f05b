/* Tuning a backend's kernel for one model session (issue 6): the bridge between tuning/ (spaces,
 * keys, store, search) and a backend.
 *
 * att_bench_t times one batch shape on copies: a one-layer copy of the model with its own KV
 * storage on the same backend, filled with random rows, and its own q/k/v/out. Nothing of a
 * session is read or written, so tuning can never change a session's cache or outputs.
 *
 * att_tuner_t is a session's run-time policy. Created with the session (it restores the store's
 * records for the device and model shape before the first call), it picks the config of every
 * batch from its bucket: a record (stored, or tuned by this process), else the heuristic. In mode
 * on, a bucket without a record queues a tuning job on the batch's real shape; the owner runs the
 * job one step at a time (att_tuner_step: one fill or one timing) only when it has nothing else
 * to do, and the winner is adopted for later calls and saved to the store. Frozen mode never
 * queues a job; off uses only the heuristic.
 *
 * Thread: a tuner belongs to its session's owner (the worker thread); not thread-safe. */
#ifndef AT_ATTENTION_ATT_TUNE_H
#define AT_ATTENTION_ATT_TUNE_H

#include <stdbool.h>
#include <stdint.h>

#include "attention/att_backend.h"
#include "attention/att_ctx.h"
#include "attention/att_model.h"
#include "tuning/tun.h"
#include "tuning/tun_search.h"
#include "tuning/tun_store.h"

/* ---- timing one batch shape on copies ---- */

typedef struct att_bench att_bench_t;

/* One chunk of a batch shape: new tokens after start_pos cached ones. */
typedef struct att_bench_chunk {
    uint32_t start_pos;
    uint32_t num_tokens;
} att_bench_chunk_t;

/* A bench for chunks [n] of model m at a layer with sliding window `window` (0 = none) on be.
 * AT_ERR_NOMEM when its copies would take more than max_bytes (0 = 4 GiB) or cannot be
 * allocated, the model's and kv_create's errors. On success *out is the caller's. */
at_err_t att_bench_create(att_backend_t *be, const att_model_t *m, uint32_t window,
                          const att_bench_chunk_t *chunks, uint32_t n, uint64_t max_bytes,
                          at_diag_t *diag, att_bench_t **out);
void att_bench_destroy(att_bench_t **b);

/* Writes the next sequence's context into the copy's cache; *more says whether any is left.
 * Every fill must be done before att_bench_time. */
at_err_t att_bench_fill_step(att_bench_t *b, bool *more);

/* Runs the batch once with cfg (a config of the backend's space; NULL = the heuristic) and
 * returns its time: the device's (kernels only) where the backend can time its runs
 * (kv_timing), else wall time. AT_ERR_CONFIG when the backend refuses cfg, AT_ERR_NOT_READY
 * while its kernels are compiling. */
at_err_t att_bench_time(att_bench_t *b, const tun_cfg_t *cfg, uint64_t *ns);

/* One step of search s on b: times the search's next config (first asking the backend to
 * prepare the configs of a stage not seen yet; *stage_seen, 0 at first, tracks that) and
 * reports it. AT_ERR_NOT_READY: the config's kernels are still compiling (nothing reported;
 * call again later); a refused config is reported as failed and is AT_OK; else run errors. */
at_err_t att_bench_search_step(att_bench_t *b, tun_search_t *s, uint32_t *stage_seen);

/* The model shape of m as a tuning key. */
void att_tune_shape(const att_model_t *m, tun_shape_t *s);

/* The tuning device and kernel hash of be; AT_ERR_UNSUPPORTED when be has no knobs. */
at_err_t att_tune_device(const att_backend_t *be, tun_device_t *d, const char **kernel_hash);

/* The bucket of a batch of calls. */
tun_bucket_t att_tune_bucket(const att_call_t *calls, uint32_t n);

/* ---- a session's policy ---- */

typedef struct att_tune_cfg {
    tun_mode_t mode;
    const char *dir;        /* borrowed for the call; the tuning directory; NULL or "": records
                             * live in this tuner only */
    uint32_t reps;          /* timed runs per config; 0 = 3 */
    uint64_t max_bytes;     /* a tuning job's copies at most; 0 = 4 GiB */
} att_tune_cfg_t;

typedef struct att_tuner att_tuner_t;

typedef struct att_tuner_info {
    tun_source_t source;    /* of the last batch's config; NONE before the first, or no knobs */
    char config[TUN_CFG_TEXT_MAX];       /* that config as text ("" when none) */
    uint64_t tuning_runs;   /* tuning steps run (fills and timings) by this tuner */
    uint64_t jobs_done;     /* tuning jobs completed (a record adopted) */
    uint32_t jobs_pending;
} att_tuner_info_t;

/* A tuner for a session of model m (borrowed; outlives the tuner) on be. Restores the store's
 * records (mode frozen or on) and has the backend prepare their configs' kernels
 * (prepare_tuning, waiting), so the session's first call compiles nothing; a damaged store is logged and set aside, never an error. Errors:
 * AT_ERR_NOMEM, AT_ERR_IO (the directory cannot be created; diag says why). A backend without
 * knobs gets a tuner that does nothing. On success *out is the caller's. */
at_err_t att_tuner_create(att_backend_t *be, const att_model_t *m, const att_tune_cfg_t *cfg,
                          at_diag_t *diag, att_tuner_t **out);
void att_tuner_destroy(att_tuner_t **t);

/* Chooses the config of the batch calls[n] and sets it on ctx (the session's context); in mode
 * on, a bucket without a record queues a tuning job on this batch's shape. Never does I/O or
 * tuning work itself. */
void att_tuner_pick(att_tuner_t *t, att_ctx_t *ctx, const att_call_t *calls, uint32_t n);

bool att_tuner_pending(const att_tuner_t *t);

/* Runs one step of the oldest job: the first re-reads the store (another session or process
 * may have tuned the bucket meanwhile), then fills, then one timing per step; the last adopts
 * the winner and saves the store. A job that cannot run (too large, a backend error) is
 * dropped with a log line and its bucket keeps the heuristic. Returns false when nothing ran:
 * no job, or the next config's kernels are still compiling on the backend's threads (the
 * caller waits on its own work a little before the next step). Never blocks for a compile. */
bool att_tuner_step(att_tuner_t *t);

void att_tuner_get_info(const att_tuner_t *t, att_tuner_info_t *out);

#endif

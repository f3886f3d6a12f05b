/* Tuning a backend's kernel per session (see att_tune.h).
 *
 * Thread model: a bench and a tuner belong to one thread (the session's worker); the backend is
 * shared and its run() serializes runs of different KV storages itself. */
#include "attention/att_tune.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention/att_cpu.h"
#ifdef AT_HAVE_CUDA
#include "attention/att_cuda.h"
#endif
#ifdef AT_HAVE_HIP
#include "attention/att_hip.h"
#endif
#include "common/at_log.h"
#include "tuning/tun_search.h"

#define DEFAULT_MAX_BYTES (4ull << 30)
#define MAX_JOBS 16u         /* buckets waiting to be tuned, per session */
#define MAX_JOB_CHUNKS 4096u /* a batch shape keeps at most this many chunks */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- bench ---- */

struct att_bench {
    att_backend_t *be;        /* borrowed */
    att_model_t *model;       /* owned: one layer, the tuned layer's window */
    att_kv_t *kv;             /* owned, on be */
    att_batch_chunk_t *chunks; /* owned; [n] */
    uint32_t *blocks;         /* owned; every chunk's table, consecutive */
    uint8_t *q, *k, *v, *out; /* owned; the batch's tensors */
    uint8_t *fill;            /* owned; k and v rows of the longest context */
    att_batch_t batch;
    uint32_t n;
    uint32_t filled;          /* chunks whose context is written */
};

static void random_rows(att_dtype_t t, void *p, size_t elems, uint64_t seed) {
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < elems; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        att_store(t, p, i, (float)((double)(x >> 40) / (double)(1ull << 23) - 1.0));
    }
}

void att_bench_destroy(att_bench_t **bp) {
    if (bp == NULL || *bp == NULL)
        return;
    att_bench_t *b = *bp;
    if (b->kv != NULL)
        b->be->ops->kv_destroy(b->be, &b->kv);
    att_model_destroy(&b->model);
    free(b->chunks);
    free(b->blocks);
    free(b->q);
    free(b->k);
    free(b->v);
    free(b->out);
    free(b->fill);
    free(b);
    *bp = NULL;
}

/* A one-layer copy of m whose only layer has window `window`. */
static at_err_t model_copy(const att_model_t *m, uint32_t window, at_diag_t *diag,
                           att_model_t **out) {
    att_model_cfg_t cfg = {
        .num_layers = 1,
        .num_query_heads = m->num_query_heads,
        .num_kv_heads = m->num_kv_heads,
        .head_dim = m->head_dim,
        .dtype = m->dtype,
        .block_size = m->block_size,
        .scale = m->scale,
        .sliding_window = window,
        .logits_soft_cap = m->soft_cap,
        .alibi_slopes = m->alibi,
        .n_alibi_slopes = m->alibi != NULL ? m->num_query_heads : 0,
        .sinks = m->sinks,
        .n_sinks = m->sinks != NULL ? m->num_query_heads : 0,
    };
    return att_model_create(&cfg, diag, out);
}

at_err_t att_bench_create(att_backend_t *be, const att_model_t *m, uint32_t window,
                          const att_bench_chunk_t *chunks, uint32_t n, uint64_t max_bytes,
                          at_diag_t *diag, att_bench_t **out) {
    if (n == 0)
        return at_diag_set(diag, AT_ERR_CALL_NO_CHUNKS, "a batch shape needs a chunk");
    const uint64_t bs = m->block_size, es = att_dtype_bytes(m->dtype);
    uint64_t blocks = 0, tokens = 0, longest_ctx = 0;
    for (uint32_t c = 0; c < n; c++) {
        uint64_t ctx = (uint64_t)chunks[c].start_pos + chunks[c].num_tokens;
        if (chunks[c].num_tokens == 0 || ctx > ATT_MAX_POSITION)
            return at_diag_set(diag, AT_ERR_CALL_POSITION, "chunk %u: bad shape", c);
        blocks += (ctx + bs - 1) / bs;
        tokens += chunks[c].num_tokens;
        longest_ctx = chunks[c].start_pos > longest_ctx ? chunks[c].start_pos : longest_ctx;
    }
    const uint64_t kv_row = (uint64_t)m->num_kv_heads * m->head_dim * es;
    const uint64_t q_row = (uint64_t)m->num_query_heads * m->head_dim * es;
    const uint64_t bytes = blocks * bs * kv_row * 2 + tokens * (2 * q_row + 2 * kv_row) +
                           longest_ctx * kv_row * 2;
    if (bytes > (max_bytes != 0 ? max_bytes : DEFAULT_MAX_BYTES) || blocks > UINT32_MAX)
        return at_diag_set(diag, AT_ERR_NOMEM, "a copy of this batch shape takes %llu MiB",
                           (unsigned long long)(bytes >> 20));
    att_bench_t *b = calloc(1, sizeof *b);
    if (b == NULL)
        return AT_ERR_NOMEM;
    b->be = be;
    b->n = n;
    at_err_t e = model_copy(m, window, diag, &b->model);
    if (e == AT_OK)
        e = be->ops->kv_create(be, b->model, (uint32_t)blocks, &b->kv, diag);
    b->chunks = calloc(n, sizeof *b->chunks);
    b->blocks = malloc(blocks * sizeof *b->blocks);
    b->q = malloc(tokens * q_row);
    b->out = malloc(tokens * q_row);
    b->k = malloc(tokens * kv_row);
    b->v = malloc(tokens * kv_row);
    b->fill = malloc(longest_ctx * kv_row * 2 + 1);
    if (e == AT_OK && (!b->chunks || !b->blocks || !b->q || !b->out || !b->k || !b->v || !b->fill))
        e = AT_ERR_NOMEM;
    if (e != AT_OK) {
        att_bench_destroy(&b);
        return e;
    }
    for (uint64_t i = 0; i < blocks; i++)
        b->blocks[i] = (uint32_t)i;
    const uint64_t hd = (uint64_t)m->head_dim;
    random_rows(m->dtype, b->q, tokens * m->num_query_heads * hd, 1);
    random_rows(m->dtype, b->k, tokens * m->num_kv_heads * hd, 2);
    random_rows(m->dtype, b->v, tokens * m->num_kv_heads * hd, 3);
    random_rows(m->dtype, b->fill, longest_ctx * m->num_kv_heads * hd * 2, 4);
    uint64_t next_block = 0, row = 0;
    for (uint32_t c = 0; c < n; c++) {
        uint64_t ctx = (uint64_t)chunks[c].start_pos + chunks[c].num_tokens;
        b->chunks[c] = (att_batch_chunk_t){
            .token_offset = (uint32_t)row,
            .start_pos = chunks[c].start_pos,
            .num_tokens = chunks[c].num_tokens,
            .num_blocks = (uint32_t)((ctx + bs - 1) / bs),
            .blocks = b->blocks + next_block,
            .q = b->q + row * q_row,
            .k = b->k + row * kv_row,
            .v = b->v + row * kv_row,
            .out = b->out + row * q_row,
        };
        next_block += b->chunks[c].num_blocks;
        row += chunks[c].num_tokens;
    }
    b->batch = (att_batch_t){.layer = 0, .num_chunks = n, .total_tokens = (uint32_t)tokens,
                             .attend = 1, .chunks = b->chunks};
    if (be->ops->kv_timing != NULL)
        be->ops->kv_timing(be, b->kv, true);
    *out = b;
    return AT_OK;
}

at_err_t att_bench_fill_step(att_bench_t *b, bool *more) {
    while (b->filled < b->n && b->chunks[b->filled].start_pos == 0)
        b->filled++;
    if (b->filled < b->n) {
        const att_batch_chunk_t *c = &b->chunks[b->filled];
        const size_t half = (size_t)c->start_pos * att_model_row_bytes(b->model,
                                                                        b->model->num_kv_heads);
        att_batch_chunk_t ctx = {.start_pos = 0, .num_tokens = c->start_pos,
                                 .num_blocks = c->num_blocks, .blocks = c->blocks,
                                 .k = b->fill, .v = b->fill + half};
        att_batch_t fill = {.layer = 0, .num_chunks = 1, .total_tokens = c->start_pos,
                            .attend = 0, .chunks = &ctx};
        at_err_t e = b->be->ops->run(b->be, b->kv, &fill);
        if (e != AT_OK)
            return e;
        b->filled++;
    }
    while (b->filled < b->n && b->chunks[b->filled].start_pos == 0)
        b->filled++;
    *more = b->filled < b->n;
    return AT_OK;
}

at_err_t att_bench_time(att_bench_t *b, const tun_cfg_t *cfg, uint64_t *ns) {
    at_err_t e = b->be->ops->set_tuning != NULL ? b->be->ops->set_tuning(b->be, b->kv, cfg)
                                                : AT_OK;
    if (e != AT_OK)
        return e;
    int64_t t0 = now_ns();
    e = b->be->ops->run(b->be, b->kv, &b->batch);
    *ns = (uint64_t)(now_ns() - t0);
    if (e == AT_OK && b->be->ops->kv_timing != NULL && b->be->ops->kv_stats != NULL) {
        att_kv_stats_t st; /* the device's own time: kernels only, no host copies */
        b->be->ops->kv_stats(b->be, b->kv, &st);
        *ns = st.last_device_ns != 0 ? st.last_device_ns : *ns;
    }
    return e;
}

at_err_t att_bench_search_step(att_bench_t *b, tun_search_t *s, uint32_t *stage_seen) {
    uint32_t stage, n;
    const tun_cfg_t *cfgs;
    if (!tun_search_stage(s, &stage, &cfgs, &n))
        return AT_OK;
    att_backend_t *be = b->be;
    if (stage + 1 != *stage_seen && be->ops->prepare_tuning != NULL) {
        (void)be->ops->prepare_tuning(be, b->model, cfgs, n, false);
        *stage_seen = stage + 1;
    }
    tun_cfg_t cfg;
    bool warmup;
    uint64_t ns = 0;
    if (!tun_search_next(s, &cfg, &warmup))
        return AT_OK;
    at_err_t e = att_bench_time(b, &cfg, &ns);
    if (e == AT_ERR_NOT_READY)
        return e; /* the same config again later */
    tun_search_report(s, e == AT_OK ? ns : UINT64_MAX);
    return e == AT_ERR_CONFIG ? AT_OK : e; /* a refused config is skipped, not fatal */
}

/* ---- keys ---- */

void att_tune_shape(const att_model_t *m, tun_shape_t *s) {
    uint32_t features = 0;
    for (uint32_t l = 0; l < m->num_layers; l++)
        features |= m->window[l] != 0 ? TUN_FEAT_WINDOW : 0;
    features |= m->soft_cap > 0.0f ? TUN_FEAT_SOFT_CAP : 0;
    features |= m->alibi != NULL ? TUN_FEAT_ALIBI : 0;
    features |= m->sinks != NULL ? TUN_FEAT_SINKS : 0;
    *s = (tun_shape_t){.head_dim = m->head_dim, .num_query_heads = m->num_query_heads,
                       .num_kv_heads = m->num_kv_heads, .group = m->group,
                       .dtype = (uint32_t)m->dtype, .block_size = m->block_size,
                       .features = features};
}

at_err_t att_tune_device(const att_backend_t *be, tun_device_t *d, const char **kernel_hash) {
    if (be->ops->tuning_space == NULL)
        return AT_ERR_UNSUPPORTED;
    if (strcmp(be->ops->name, "cpu") == 0) {
        tun_device_cpu(att_cpu_isa(be), att_cpu_threads(be), d);
        *kernel_hash = att_cpu_kernel_hash();
        return AT_OK;
    }
#ifdef AT_HAVE_CUDA
    if (strcmp(be->ops->name, "cuda") == 0) {
        att_cuda_tune_device(be, d, kernel_hash);
        return AT_OK;
    }
#endif
#ifdef AT_HAVE_HIP
    if (strcmp(be->ops->name, "hip") == 0) {
        att_hip_tune_device(be, d, kernel_hash);
        return AT_OK;
    }
#endif
    return AT_ERR_UNSUPPORTED;
}

tun_bucket_t att_tune_bucket(const att_call_t *calls, uint32_t n) {
    uint64_t tokens = 0, seqs = 0, max_q = 0, max_ctx = 0;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t c = 0; c < calls[i].num_chunks; c++) {
            const att_chunk_t *ch = &calls[i].chunks[c];
            uint64_t ctx = (uint64_t)ch->start_pos + ch->num_tokens;
            tokens += ch->num_tokens;
            seqs++;
            max_q = ch->num_tokens > max_q ? ch->num_tokens : max_q;
            max_ctx = ctx > max_ctx ? ctx : max_ctx;
        }
    return tun_bucket_of(tokens, seqs, max_q, max_ctx);
}

/* ---- a session's policy ---- */

typedef struct choice {
    tun_bucket_t bucket;
    tun_cfg_t cfg;
    tun_source_t source;
} choice_t;

typedef struct job {
    tun_bucket_t bucket;
    uint32_t window;
    att_bench_chunk_t *chunks; /* owned; [n] */
    uint32_t n;
    att_bench_t *bench;        /* owned; NULL until the first step */
    tun_search_t *search;      /* owned */
    bool filling;
    uint32_t stage_seen;       /* 1 + the search stage whose configs were prepared */
    int64_t started_ns;
    int64_t waiting_since_ns;  /* 0, or when the current config's kernels were first not ready */
} job_t;

/* How long a job waits for one config's kernels before it is dropped: a compile takes seconds;
 * one that never finishes (no compile thread could start) must not keep the job forever. */
#define JOB_COMPILE_WAIT_NS (300LL * 1000000000LL)

struct att_tuner {
    att_backend_t *be;         /* borrowed */
    const att_model_t *m;      /* borrowed */
    const tun_space_t *space;  /* NULL: the backend has no knobs */
    tun_mode_t mode;
    uint32_t reps;
    uint64_t max_bytes;
    tun_device_t dev;
    tun_shape_t shape;
    tun_store_t *store;        /* owned */
    bool persist;              /* the store has a directory to save to */
    choice_t *choices;         /* owned; [n_choices]: every bucket seen */
    uint32_t n_choices, cap_choices;
    job_t jobs[MAX_JOBS];      /* FIFO: jobs[0] runs first */
    uint32_t n_jobs;
    tun_cfg_t applied;         /* set on the session's context; n == 0: nothing yet */
    tun_source_t last_source;
    uint64_t runs, jobs_done;
};

static void prepare_stored(att_tuner_t *t);

at_err_t att_tuner_create(att_backend_t *be, const att_model_t *m, const att_tune_cfg_t *cfg,
                          at_diag_t *diag, att_tuner_t **out) {
    att_tuner_t *t = calloc(1, sizeof *t);
    if (t == NULL)
        return AT_ERR_NOMEM;
    t->be = be;
    t->m = m;
    t->mode = cfg->mode;
    t->reps = cfg->reps;
    t->max_bytes = cfg->max_bytes;
    att_tune_shape(m, &t->shape);
    const char *hash = NULL;
    if (att_tune_device(be, &t->dev, &hash) != AT_OK) {
        *out = t; /* no knobs: a tuner that does nothing */
        return AT_OK;
    }
    t->space = be->ops->tuning_space;
    t->persist = cfg->dir != NULL && cfg->dir[0] != '\0';
    /* without a directory the store still keeps this session's records, in memory */
    at_err_t e = tun_store_open(t->persist ? cfg->dir : "/tmp", t->space, &t->dev, hash,
                                &t->shape, diag, &t->store);
    if (e == AT_OK && t->persist && t->mode != TUN_MODE_OFF)
        e = tun_store_load(t->store, NULL);
    if (e != AT_OK) {
        att_tuner_destroy(&t);
        return e;
    }
    prepare_stored(t);
    *out = t;
    return AT_OK;
}

/* The stored configs' kernels are compiled (or read from the compile cache) now, while the
 * session is created, so that no call of it waits for a compile. */
static void prepare_stored(att_tuner_t *t) {
    const size_t n = tun_store_count(t->store);
    if (t->be->ops->prepare_tuning == NULL || t->mode == TUN_MODE_OFF || n == 0)
        return;
    tun_cfg_t *cfgs = malloc(n * sizeof *cfgs);
    if (cfgs == NULL)
        return; /* the first calls then find them missing and keep the heuristic meanwhile */
    for (size_t i = 0; i < n; i++)
        cfgs[i] = tun_store_at(t->store, i)->best;
    if (t->be->ops->prepare_tuning(t->be, t->m, cfgs, (uint32_t)n, true) != AT_OK)
        at_log(AT_LOG_WARN, "tuning", "a stored config's kernels do not compile");
    free(cfgs);
}

static void job_fini(job_t *j) {
    att_bench_destroy(&j->bench);
    tun_search_destroy(&j->search);
    free(j->chunks);
    memset(j, 0, sizeof *j);
}

void att_tuner_destroy(att_tuner_t **tp) {
    if (tp == NULL || *tp == NULL)
        return;
    att_tuner_t *t = *tp;
    for (uint32_t i = 0; i < t->n_jobs; i++)
        job_fini(&t->jobs[i]);
    tun_store_destroy(&t->store);
    free(t->choices);
    free(t);
    *tp = NULL;
}

static choice_t *find_choice(att_tuner_t *t, const tun_bucket_t *b) {
    for (uint32_t i = 0; i < t->n_choices; i++)
        if (tun_bucket_equal(&t->choices[i].bucket, b))
            return &t->choices[i];
    return NULL;
}

/* Records the choice of bucket b (adds or replaces); NULL when out of memory. */
static choice_t *set_choice(att_tuner_t *t, const tun_bucket_t *b, const tun_cfg_t *cfg,
                            tun_source_t source) {
    choice_t *c = find_choice(t, b);
    if (c == NULL) {
        if (t->n_choices == t->cap_choices) {
            uint32_t cap = t->cap_choices ? 2 * t->cap_choices : 8;
            choice_t *p = realloc(t->choices, cap * sizeof *p);
            if (p == NULL)
                return NULL;
            t->choices = p;
            t->cap_choices = cap;
        }
        c = &t->choices[t->n_choices++];
    }
    *c = (choice_t){.bucket = *b, .cfg = *cfg, .source = source};
    return c;
}

/* Queues a job on the shape of calls[n]; nothing when the queue is full or memory is short (the
 * bucket keeps the heuristic, and a later process may tune it). */
static void queue_job(att_tuner_t *t, const tun_bucket_t *b, const att_call_t *calls,
                      uint32_t n) {
    if (t->n_jobs == MAX_JOBS)
        return;
    uint32_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += calls[i].num_chunks;
    total = total < MAX_JOB_CHUNKS ? total : MAX_JOB_CHUNKS;
    job_t *j = &t->jobs[t->n_jobs];
    *j = (job_t){.bucket = *b, .window = t->m->window[calls[0].layer]};
    if ((j->chunks = malloc((total ? total : 1) * sizeof *j->chunks)) == NULL)
        return;
    for (uint32_t i = 0; i < n && j->n < total; i++)
        for (uint32_t c = 0; c < calls[i].num_chunks && j->n < total; c++)
            j->chunks[j->n++] = (att_bench_chunk_t){calls[i].chunks[c].start_pos,
                                                    calls[i].chunks[c].num_tokens};
    t->n_jobs++;
}

void att_tuner_pick(att_tuner_t *t, att_ctx_t *ctx, const att_call_t *calls, uint32_t n) {
    if (t->space == NULL || n == 0)
        return;
    const tun_bucket_t b = att_tune_bucket(calls, n);
    const choice_t *c = find_choice(t, &b);
    tun_cfg_t cfg;
    tun_source_t source;
    if (c != NULL) {
        cfg = c->cfg;
        source = c->source;
    } else {
        const tun_record_t *r = t->mode != TUN_MODE_OFF ? tun_store_find(t->store, &b) : NULL;
        if (r != NULL) {
            cfg = r->best;
            source = TUN_SOURCE_STORED;
        } else {
            t->space->heuristic(&t->shape, &t->dev, &b, &cfg);
            source = TUN_SOURCE_HEURISTIC;
            if (t->mode == TUN_MODE_ON)
                queue_job(t, &b, calls, n);
        }
        set_choice(t, &b, &cfg, source);
    }
    if (t->applied.n == 0 || !tun_cfg_equal(&t->applied, &cfg)) {
        /* a stored config the backend refuses (it should not: the store checks every config)
         * leaves the previous one in place */
        at_err_t e = att_ctx_set_tuning(ctx, &cfg);
        if (e == AT_ERR_NOT_READY && source != TUN_SOURCE_HEURISTIC) {
            /* its kernels are being compiled (a stored config whose compile at the session's
             * creation failed, or one another process tuned since): the heuristic's are always
             * loadable, so use them until then */
            t->space->heuristic(&t->shape, &t->dev, &b, &cfg);
            source = TUN_SOURCE_HEURISTIC;
            e = tun_cfg_equal(&t->applied, &cfg) ? AT_OK : att_ctx_set_tuning(ctx, &cfg);
        }
        if (e != AT_OK) {
            at_log(AT_LOG_WARN, "tuning", "the backend refused a config (%s); keeping the last",
                   at_err_str(e));
            return;
        }
        t->applied = cfg;
    }
    t->last_source = source;
}

bool att_tuner_pending(const att_tuner_t *t) { return t->n_jobs > 0; }

static void drop_job(att_tuner_t *t) {
    job_fini(&t->jobs[0]);
    memmove(&t->jobs[0], &t->jobs[1], (t->n_jobs - 1) * sizeof t->jobs[0]);
    t->n_jobs--;
    memset(&t->jobs[t->n_jobs], 0, sizeof t->jobs[0]);
}

/* The first step of a job: has someone tuned the bucket meanwhile? Else set up its copies. */
static bool job_start(att_tuner_t *t, job_t *j) {
    j->started_ns = now_ns();
    if (t->persist && tun_store_load(t->store, NULL) == AT_OK) {
        const tun_record_t *r = tun_store_find(t->store, &j->bucket);
        if (r != NULL) {
            set_choice(t, &j->bucket, &r->best, TUN_SOURCE_STORED);
            return false;
        }
    }
    at_diag_t d = {{0}};
    at_err_t e = att_bench_create(t->be, t->m, j->window, j->chunks, j->n, t->max_bytes, &d,
                                  &j->bench);
    if (e == AT_OK)
        e = tun_search_create(t->space, &t->shape, &t->dev, &j->bucket, t->reps, &j->search);
    if (e != AT_OK) {
        at_log(AT_LOG_WARN, "tuning", "cannot tune a batch shape: %s%s%s", at_err_str(e),
               d.msg[0] ? ": " : "", d.msg);
        return false;
    }
    j->filling = true;
    return true;
}

/* The last step: the winner becomes the bucket's config and the store's record. */
static void job_finish(att_tuner_t *t, job_t *j) {
    tun_record_t r;
    if (tun_search_result(j->search, &r) != AT_OK) {
        at_log(AT_LOG_WARN, "tuning", "no config of the space ran; the heuristic stays");
        return;
    }
    r.tuning_ns = (uint64_t)(now_ns() - j->started_ns);
    r.updated_s = (int64_t)time(NULL);
    set_choice(t, &j->bucket, &r.best, TUN_SOURCE_TUNED);
    t->jobs_done++;
    if (tun_store_put(t->store, &r) == AT_OK && t->persist)
        (void)tun_store_save(t->store); /* logged there; the choice stands either way */
}

bool att_tuner_step(att_tuner_t *t) {
    if (t->n_jobs == 0)
        return false;
    job_t *j = &t->jobs[0];
    if (j->bench == NULL) {
        t->runs++;
        if (!job_start(t, j))
            drop_job(t);
        return true;
    }
    at_err_t e = AT_OK;
    if (j->filling) {
        bool more = false;
        t->runs++;
        e = att_bench_fill_step(j->bench, &more);
        j->filling = more && e == AT_OK;
    } else {
        e = att_bench_search_step(j->bench, j->search, &j->stage_seen);
        if (e == AT_ERR_NOT_READY) { /* kernels still compiling off this thread */
            const int64_t now = now_ns();
            if (j->waiting_since_ns == 0)
                j->waiting_since_ns = now;
            if (now - j->waiting_since_ns < JOB_COMPILE_WAIT_NS)
                return false;
            at_log(AT_LOG_WARN, "tuning", "a config's kernels did not compile in %lld s; the "
                   "tuning job is dropped and the heuristic stays",
                   (long long)(JOB_COMPILE_WAIT_NS / 1000000000LL));
            drop_job(t);
            return true;
        }
        j->waiting_since_ns = 0;
        t->runs++;
        tun_cfg_t cfg;
        bool warmup;
        if (e == AT_OK && !tun_search_next(j->search, &cfg, &warmup)) {
            job_finish(t, j);
            drop_job(t);
            return true;
        }
    }
    if (e != AT_OK) {
        at_log(AT_LOG_WARN, "tuning", "a tuning run failed (%s); the heuristic stays",
               at_err_str(e));
        drop_job(t);
    }
    return true;
}

void att_tuner_get_info(const att_tuner_t *t, att_tuner_info_t *out) {
    memset(out, 0, sizeof *out);
    out->source = t->last_source;
    if (t->space != NULL && t->applied.n != 0)
        tun_cfg_format(t->space, &t->applied, out->config, sizeof out->config);
    out->tuning_runs = t->runs;
    out->jobs_done = t->jobs_done;
    out->jobs_pending = t->n_jobs;
}

/* The CPU backend (see att_cpu.h).
 *
 * Thread model: a pool of num_threads - 1 threads plus the caller of run(). run() takes run_mu,
 * so runs of different sessions take turns, each using every thread; inside a run, threads claim
 * work items with an atomic counter, longest items first. pool_mu and its conditions only hand a
 * run to the pool threads and collect them at its end.
 * KV storage of a session: one anonymous mapping, [num_layers][k|v][num_blocks][Hkv][block][D],
 * so that one (block, KV head) is block_size * D contiguous elements, read once per query group. */
#include "attention/att_cpu.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "attention/att_cpu_int.h"
#include "common/at_base.h"

#define DEFAULT_TILE_ROWS 64u
#define DEFAULT_ITEMS_PER_THREAD 4u
#define MAX_THREADS 1024u
#define MAX_TILE_ROWS 4096u
#define MAX_ITEMS_PER_THREAD 256u

struct att_kv {
    const att_model_t *m; /* borrowed: outlives the storage */
    uint32_t num_blocks;
    uint8_t *base;        /* owned mapping of map_bytes */
    size_t map_bytes;
    size_t layer_half_bytes; /* keys (or values) of one layer */
    /* the session's tuning (set_tuning; the backend's defaults until then) */
    uint32_t tile_rows;        /* query rows per work item */
    uint32_t key_tile;         /* keys per inner tile */
    uint32_t items_per_thread; /* heads are split until a run has this many items per thread */
};

typedef struct thread_slot {
    pthread_t tid;
    att_cpu_scratch_t sc;
    size_t sc_rows; /* rows the scratch holds */
    size_t sc_dim;  /* head_dim the scratch holds */
} thread_slot_t;

typedef struct cpu_backend {
    att_backend_t base;
    uint32_t num_threads;
    uint32_t tile_rows;
    att_cpu_kern_fn kern;
    att_cpu_isa_t isa;
    thread_slot_t *slots;      /* [num_threads]; slot 0 is the caller of run() */
    pthread_mutex_t run_mu;    /* one run at a time */
    att_cpu_item_t *items;     /* guarded by run_mu; [cap_items] */
    size_t cap_items;
    /* hand-off to pool threads */
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_start;
    pthread_cond_t pool_done;
    uint64_t generation;       /* guarded by pool_mu; bumped per dispatched run */
    uint32_t busy;             /* guarded by pool_mu; pool threads still in this run */
    bool stopping;             /* guarded by pool_mu */
    const att_cpu_job_t *job;  /* guarded by pool_mu; valid while busy > 0 */
    size_t num_items;
    atomic_size_t next_item;   /* relaxed: only hands out indices; the job is published by pool_mu */
} cpu_backend_t;

static void scratch_free(att_cpu_scratch_t *sc) {
    free(sc->q);
    free(sc->o);
    free(sc->m);
    free(sc->l);
    free(sc->s);
    memset(sc, 0, sizeof *sc);
}

static at_err_t scratch_reserve(thread_slot_t *t, size_t rows, size_t dim) {
    if (rows <= t->sc_rows && dim <= t->sc_dim)
        return AT_OK;
    rows = rows > t->sc_rows ? rows : t->sc_rows;
    dim = dim > t->sc_dim ? dim : t->sc_dim;
    att_cpu_scratch_t sc = {
        .q = malloc(rows * dim * sizeof(float)),
        .o = malloc(rows * dim * sizeof(float)),
        .m = malloc(rows * sizeof(float)),
        .l = malloc(rows * sizeof(float)),
        .s = malloc(4 * ATT_CPU_KEY_TILE * sizeof(float)),
    };
    if (!sc.q || !sc.o || !sc.m || !sc.l || !sc.s) {
        scratch_free(&sc);
        return AT_ERR_NOMEM;
    }
    scratch_free(&t->sc);
    t->sc = sc;
    t->sc_rows = rows;
    t->sc_dim = dim;
    return AT_OK;
}

static void work(cpu_backend_t *be, thread_slot_t *slot) {
    for (;;) {
        size_t i = atomic_fetch_add_explicit(&be->next_item, 1, memory_order_relaxed);
        if (i >= be->num_items)
            return;
        be->kern(be->job, &be->items[i], &slot->sc);
    }
}

typedef struct pool_arg {
    cpu_backend_t *be;
    uint32_t index;
} pool_arg_t;

static void *pool_thread(void *p) {
    pool_arg_t a = *(pool_arg_t *)p;
    free(p);
    cpu_backend_t *be = a.be;
    uint64_t seen = 0;
    pthread_mutex_lock(&be->pool_mu);
    for (;;) {
        while (!be->stopping && be->generation == seen)
            pthread_cond_wait(&be->pool_start, &be->pool_mu);
        if (be->stopping)
            break;
        seen = be->generation;
        pthread_mutex_unlock(&be->pool_mu);
        work(be, &be->slots[a.index]);
        pthread_mutex_lock(&be->pool_mu);
        if (--be->busy == 0)
            pthread_cond_signal(&be->pool_done);
    }
    pthread_mutex_unlock(&be->pool_mu);
    return NULL;
}

/* Runs every item on every thread; returns when all are done. Requires run_mu. */
static void dispatch(cpu_backend_t *be, const att_cpu_job_t *job, size_t n) {
    atomic_store_explicit(&be->next_item, 0, memory_order_relaxed);
    pthread_mutex_lock(&be->pool_mu);
    be->job = job;
    be->num_items = n;
    be->busy = be->num_threads - 1;
    be->generation++;
    pthread_cond_broadcast(&be->pool_start);
    pthread_mutex_unlock(&be->pool_mu);
    work(be, &be->slots[0]);
    pthread_mutex_lock(&be->pool_mu);
    while (be->busy > 0)
        pthread_cond_wait(&be->pool_done, &be->pool_mu);
    be->job = NULL;
    pthread_mutex_unlock(&be->pool_mu);
}

static int cmp_cost_desc(const void *a, const void *b) {
    uint64_t x = ((const att_cpu_item_t *)a)->cost, y = ((const att_cpu_item_t *)b)->cost;
    return (x < y) - (x > y);
}

static size_t count_items(const att_batch_t *b, uint32_t tokens_per_item, uint32_t heads,
                          uint32_t heads_per_item) {
    size_t n = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++)
        n += ((size_t)b->chunks[c].num_tokens + tokens_per_item - 1) / tokens_per_item;
    return n * ((heads + heads_per_item - 1) / heads_per_item);
}

/* Splits the batch into items; AT_ERR_NOMEM changes nothing. Requires run_mu.
 * Rows per item (tokens x query heads) aim at the session's tile_rows: a decode token's item
 * spans several KV heads, a prefill item one head and tile_rows / group tokens. Heads are split
 * further while there are fewer than items_per_thread items per thread. */
static at_err_t plan_items(cpu_backend_t *be, const att_kv_t *kv, const att_batch_t *b,
                           uint32_t window, size_t *n_out, size_t *max_rows) {
    const att_model_t *m = kv->m;
    uint32_t tokens_per_item = kv->tile_rows / m->group;
    if (tokens_per_item == 0)
        tokens_per_item = 1;
    uint32_t longest = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++)
        longest = b->chunks[c].num_tokens > longest ? b->chunks[c].num_tokens : longest;
    uint32_t tokens_used = longest < tokens_per_item ? longest : tokens_per_item;
    uint32_t heads_per_item = kv->tile_rows / (m->group * tokens_used);
    heads_per_item = heads_per_item < 1 ? 1
                     : heads_per_item > m->num_kv_heads ? m->num_kv_heads
                                                        : heads_per_item;
    while (heads_per_item > 1 &&
           count_items(b, tokens_per_item, m->num_kv_heads, heads_per_item) <
               (size_t)kv->items_per_thread * be->num_threads)
        heads_per_item = (heads_per_item + 1) / 2;
    size_t n = count_items(b, tokens_per_item, m->num_kv_heads, heads_per_item);
    if (n > be->cap_items) {
        att_cpu_item_t *p = realloc(be->items, n * sizeof *p);
        if (p == NULL)
            return AT_ERR_NOMEM;
        be->items = p;
        be->cap_items = n;
    }
    size_t k = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        for (uint32_t q0 = 0; q0 < ch->num_tokens; q0 += tokens_per_item) {
            uint32_t cnt = ch->num_tokens - q0 < tokens_per_item ? ch->num_tokens - q0
                                                                  : tokens_per_item;
            uint64_t last = (uint64_t)ch->start_pos + q0 + cnt;
            uint64_t keys = window != 0 && last > window + (uint64_t)cnt ? window + cnt : last;
            for (uint32_t h = 0; h < m->num_kv_heads; h += heads_per_item) {
                uint32_t nh = m->num_kv_heads - h < heads_per_item ? m->num_kv_heads - h
                                                                    : heads_per_item;
                be->items[k++] = (att_cpu_item_t){c, h, nh, q0, cnt, keys * cnt * m->group * nh};
            }
        }
    }
    qsort(be->items, n, sizeof *be->items, cmp_cost_desc);
    *n_out = n;
    *max_rows = (size_t)tokens_per_item * m->group * heads_per_item;
    return AT_OK;
}

static uint8_t *kv_row(att_kv_t *kv, uint32_t layer, int is_v, const uint32_t *blocks,
                       uint32_t pos, uint32_t head) {
    const att_model_t *m = kv->m;
    size_t es = att_dtype_bytes(m->dtype);
    size_t head_bytes = (size_t)m->block_size * m->head_dim * es;
    uint8_t *half = kv->base + (2 * (size_t)layer + (size_t)is_v) * kv->layer_half_bytes;
    return half + (size_t)blocks[pos / m->block_size] * head_bytes * m->num_kv_heads +
           (size_t)head * head_bytes + (size_t)(pos % m->block_size) * m->head_dim * es;
}

static void write_kv(att_kv_t *kv, const att_batch_t *b) {
    const att_model_t *m = kv->m;
    size_t row = (size_t)m->head_dim * att_dtype_bytes(m->dtype);
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        for (uint32_t t = 0; t < ch->num_tokens; t++) {
            size_t src = (size_t)t * m->num_kv_heads * row;
            for (uint32_t h = 0; h < m->num_kv_heads; h++) {
                uint32_t pos = ch->start_pos + t;
                memcpy(kv_row(kv, b->layer, 0, ch->blocks, pos, h),
                       (const uint8_t *)ch->k + src + h * row, row);
                memcpy(kv_row(kv, b->layer, 1, ch->blocks, pos, h),
                       (const uint8_t *)ch->v + src + h * row, row);
            }
        }
    }
}

static at_err_t cpu_run(att_backend_t *base, att_kv_t *kv, const att_batch_t *b) {
    cpu_backend_t *be = (cpu_backend_t *)base;
    const att_model_t *m = kv->m;
    at_err_t e = AT_OK;
    pthread_mutex_lock(&be->run_mu);
    size_t n = 0, rows = 0;
    uint32_t window = m->window[b->layer];
    if (b->attend) {
        if ((e = plan_items(be, kv, b, window, &n, &rows)) != AT_OK)
            goto out_unlock;
        for (uint32_t t = 0; t < be->num_threads; t++)
            if ((e = scratch_reserve(&be->slots[t], rows, m->head_dim)) != AT_OK)
                goto out_unlock;
    }
    write_kv(kv, b);
    if (b->attend) {
        att_cpu_job_t job = {
            .m = m,
            .b = b,
            .k_layer = kv->base + 2 * (size_t)b->layer * kv->layer_half_bytes,
            .v_layer = kv->base + (2 * (size_t)b->layer + 1) * kv->layer_half_bytes,
            .window = window,
            .key_tile = kv->key_tile,
        };
        dispatch(be, &job, n);
    }
out_unlock:
    pthread_mutex_unlock(&be->run_mu);
    return e;
}

/* The backend's defaults: what the tuner calls the heuristic (tun_space_cpu). */
static void default_tuning(const cpu_backend_t *be, att_kv_t *kv) {
    kv->tile_rows = be->tile_rows;
    kv->key_tile = ATT_CPU_KEY_TILE;
    kv->items_per_thread = DEFAULT_ITEMS_PER_THREAD;
}

static at_err_t cpu_set_tuning(att_backend_t *base, att_kv_t *kv, const tun_cfg_t *cfg) {
    if (cfg == NULL) {
        default_tuning((cpu_backend_t *)base, kv);
        return AT_OK;
    }
    const uint32_t rows = cfg->v[TUN_CPU_TILE_ROWS], key_tile = cfg->v[TUN_CPU_KEY_TILE];
    const uint32_t items = cfg->v[TUN_CPU_ITEMS_PER_THREAD], bs = kv->m->block_size;
    /* a key tile must stay inside one block: block sizes are powers of two, so it divides them */
    if (cfg->n != tun_space_cpu.n_params || rows < 1 || rows > MAX_TILE_ROWS || key_tile < 1 ||
        key_tile > ATT_CPU_KEY_TILE || (key_tile < bs && bs % key_tile != 0) || items < 1 ||
        items > MAX_ITEMS_PER_THREAD)
        return AT_ERR_CONFIG;
    kv->tile_rows = rows;
    kv->key_tile = key_tile;
    kv->items_per_thread = items;
    return AT_OK;
}

static at_err_t cpu_kv_create(att_backend_t *base, const att_model_t *m, uint32_t num_blocks,
                              att_kv_t **out, at_diag_t *diag) {
    (void)diag; /* the one failure, AT_ERR_NOMEM, says it all */
    att_kv_t *kv = calloc(1, sizeof *kv);
    if (kv == NULL)
        return AT_ERR_NOMEM;
    kv->m = m;
    default_tuning((cpu_backend_t *)base, kv);
    kv->num_blocks = num_blocks;
    kv->layer_half_bytes = (size_t)num_blocks * m->num_kv_heads * m->block_size * m->head_dim *
                           att_dtype_bytes(m->dtype);
    kv->map_bytes = kv->layer_half_bytes * 2 * m->num_layers;
    /* a private anonymous mapping: zeroed, page-aligned, committed only as blocks are used */
    void *p = mmap(NULL, kv->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        free(kv);
        return AT_ERR_NOMEM;
    }
    /* A decode step reads a few KiB per (block, head) from all over the pool: with 4 KiB pages
     * nearly every tile misses the TLB. Huge pages where the kernel allows them (advice only;
     * failure changes nothing). */
    (void)madvise(p, kv->map_bytes, MADV_HUGEPAGE);
    kv->base = p;
    *out = kv;
    return AT_OK;
}

static void cpu_kv_destroy(att_backend_t *base, att_kv_t **kvp) {
    (void)base;
    if (kvp == NULL || *kvp == NULL)
        return;
    munmap((*kvp)->base, (*kvp)->map_bytes);
    free(*kvp);
    *kvp = NULL;
}

static at_err_t cpu_read_kv(att_backend_t *base, att_kv_t *kv, uint32_t layer,
                            const uint32_t *blocks, uint32_t pos, uint32_t n, void *k_out,
                            void *v_out) {
    (void)base;
    const att_model_t *m = kv->m;
    size_t row = (size_t)m->head_dim * att_dtype_bytes(m->dtype);
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t h = 0; h < m->num_kv_heads; h++) {
            size_t dst = ((size_t)t * m->num_kv_heads + h) * row;
            memcpy((uint8_t *)k_out + dst, kv_row(kv, layer, 0, blocks, pos + t, h), row);
            memcpy((uint8_t *)v_out + dst, kv_row(kv, layer, 1, blocks, pos + t, h), row);
        }
    return AT_OK;
}

static void stop_pool(cpu_backend_t *be, uint32_t started) {
    pthread_mutex_lock(&be->pool_mu);
    be->stopping = true;
    pthread_cond_broadcast(&be->pool_start);
    pthread_mutex_unlock(&be->pool_mu);
    for (uint32_t t = 1; t < started; t++)
        pthread_join(be->slots[t].tid, NULL);
}

static void cpu_destroy(att_backend_t *base) {
    cpu_backend_t *be = (cpu_backend_t *)base;
    stop_pool(be, be->num_threads);
    for (uint32_t t = 0; t < be->num_threads; t++)
        scratch_free(&be->slots[t].sc);
    free(be->slots);
    free(be->items);
    pthread_mutex_destroy(&be->run_mu);
    pthread_mutex_destroy(&be->pool_mu);
    pthread_cond_destroy(&be->pool_start);
    pthread_cond_destroy(&be->pool_done);
    free(be);
}

static const att_backend_ops_t cpu_ops = {
    .name = "cpu",
    .kv_create = cpu_kv_create,
    .kv_destroy = cpu_kv_destroy,
    .run = cpu_run,
    .read_kv = cpu_read_kv,
    .destroy = cpu_destroy,
    .tuning_space = &tun_space_cpu,
    .set_tuning = cpu_set_tuning,
};

/* The best kernel build this CPU runs.
 * clang 14 knows neither "x86-64-v3" nor "f16c" as feature names; every CPU with AVX2, FMA and
 * BMI2 has the rest of x86-64-v3 (F16C, MOVBE, LZCNT). */
static att_cpu_isa_t best_isa(void) {
#if defined(ATT_CPU_HAVE_X86V3)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") ||
        !__builtin_cpu_supports("bmi2"))
        return ATT_CPU_ISA_PORTABLE;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl"))
        return ATT_CPU_ISA_X86V4;
    return ATT_CPU_ISA_X86V3;
#else
    return ATT_CPU_ISA_PORTABLE;
#endif
}

bool att_cpu_isa_supported(att_cpu_isa_t isa) {
    /* the builds are ordered: a CPU that runs one runs every lower one */
    return isa >= ATT_CPU_ISA_BEST && isa <= best_isa();
}

const char *att_cpu_isa_name(att_cpu_isa_t isa) {
    switch (isa) {
    case ATT_CPU_ISA_BEST: return "best";
    case ATT_CPU_ISA_PORTABLE: return "portable";
    case ATT_CPU_ISA_X86V3: return "x86-64-v3";
    case ATT_CPU_ISA_X86V4: return "x86-64-v4";
    default: return "unknown";
    }
}

static att_cpu_kern_fn kernel_for(att_cpu_isa_t isa) {
    switch (isa) {
#if defined(ATT_CPU_HAVE_X86V3)
    case ATT_CPU_ISA_X86V4: return att_cpu__kern_x86v4;
    case ATT_CPU_ISA_X86V3: return att_cpu__kern_x86v3;
#endif
    default: return att_cpu__kern_portable;
    }
}

at_err_t att_cpu_create(const att_cpu_cfg_t *cfg, att_backend_t **out) {
    uint32_t threads = cfg->num_threads;
    if (threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (uint32_t)n : 1;
    }
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (!att_cpu_isa_supported(cfg->isa))
        return AT_ERR_UNSUPPORTED;
    att_cpu_isa_t be_isa = cfg->isa == ATT_CPU_ISA_BEST ? best_isa() : cfg->isa;
    cpu_backend_t *be = calloc(1, sizeof *be);
    if (be == NULL)
        return AT_ERR_NOMEM;
    be->base.ops = &cpu_ops;
    be->num_threads = threads;
    be->tile_rows = cfg->tile_rows != 0 ? cfg->tile_rows : DEFAULT_TILE_ROWS;
    be->isa = be_isa;
    be->kern = kernel_for(be_isa);
    be->slots = calloc(threads, sizeof *be->slots);
    if (be->slots == NULL) {
        free(be);
        return AT_ERR_NOMEM;
    }
    pthread_mutex_init(&be->run_mu, NULL);
    pthread_mutex_init(&be->pool_mu, NULL);
    pthread_cond_init(&be->pool_start, NULL);
    pthread_cond_init(&be->pool_done, NULL);
    for (uint32_t t = 1; t < threads; t++) {
        pool_arg_t *a = malloc(sizeof *a);
        if (a != NULL)
            *a = (pool_arg_t){be, t};
        if (a == NULL || pthread_create(&be->slots[t].tid, NULL, pool_thread, a) != 0) {
            free(a);
            be->num_threads = t;
            cpu_destroy(&be->base);
            return AT_ERR_INTERNAL;
        }
    }
    *out = &be->base;
    return AT_OK;
}

const char *att_cpu_isa(const att_backend_t *base) {
    return att_cpu_isa_name(((const cpu_backend_t *)base)->isa);
}

uint32_t att_cpu_threads(const att_backend_t *base) {
    return ((const cpu_backend_t *)base)->num_threads;
}

const char *att_cpu_kernel_hash(void) { return ATT_CPU_KERNEL_HASH; }

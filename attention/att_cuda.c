/* The CUDA backend (see att_cuda.h).
 *
 * Thread model: the backend's fields are set at creation and read-only afterwards, except `lost`
 * (atomic: set once by whichever thread sees a sticky fault; relaxed is enough, since it only
 * makes later calls fail early and carries no data) and the registered host regions (reg_mu).
 * A session's att_kv_t is used by one thread at a time (att_ctx's caller). Every entry point
 * makes the primary context current on its thread first.
 *
 * A run, on the session's stream: one upload of the metadata (chunks, block table, items,
 * merges), one upload per tensor (from pinned staging, or straight from registered memory), the
 * attention launches (each tile kind with its merge when split; with both kinds, the wide ones on
 * the session's side stream, forked and joined by events), one download of out; then the stream
 * is synchronized and out copied into place. Tiles and thresholds come from the session's plan:
 * att_cuda_plan_default at creation, then whatever set_tuning chose (the tuner calls it before
 * every batch, so it is cheap: a session keeps up to MOD_SLOTS loaded modules, one per tile kind
 * and config, and a switch to a loaded one only changes two slot numbers and the thresholds).
 *
 * Compiles never run on a call's path. set_tuning takes images only from the compile cache
 * (att_jit_lookup: memory, else disk) and answers AT_ERR_NOT_READY otherwise, after queueing the
 * compile; prepare_tuning queues candidates (or, with wait, compiles on the caller's thread: a
 * session's creation). The queue is served by the backend's compile threads (comp_mu guards it;
 * started on first use, joined by destroy); they only call att_jit_image, which is thread-safe. */
#include "attention/att_cuda.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention/att_cudrv.h"
#include "attention/att_kparams.h"
#include "attention/att_tune.h"
#include "cache/lc.h"
#include "common/at_base.h"
#include "common/at_log.h"

#define MAX_REGIONS 16u
#define MOD_SLOTS 8u      /* loaded tile modules per session (both kinds) */
#define COMPILE_QUEUE 256u /* queued compiles; more are dropped (set_tuning queues them again) */
#define MAX_COMPILERS 32u

enum { K_ATTEND = 1, K_MERGE = 2, K_KV_WRITE = 3 };

typedef struct region {
    uintptr_t begin;
    uintptr_t end;
} region_t;

typedef struct cuda_backend {
    att_backend_t base;
    const att_cudrv_t *drv;
    CUdevice dev;
    CUcontext ctx; /* the device's primary context, retained */
    int ordinal;
    uint32_t num_sms;
    uint32_t smem_optin; /* dynamic shared memory a block may opt into, bytes */
    char arch[16];
    char name[128];
    char desc[192];
    bool timing;
    bool has_plan;
    att_cuda_plan_t plan; /* overrides of att_cuda_cfg_t.plan (has_plan) */
    att_jit_t *jit; /* owned */
    atomic_int lost;
    uint32_t n_compilers; /* compile threads to start on first use */
    pthread_mutex_t comp_mu;
    pthread_cond_t comp_cv;
    att_jit_opts_t queue[COMPILE_QUEUE] AT_GUARDED_BY(comp_mu); /* FIFO ring */
    uint32_t q_head AT_GUARDED_BY(comp_mu), q_len AT_GUARDED_BY(comp_mu);
    pthread_t compilers[MAX_COMPILERS] AT_GUARDED_BY(comp_mu);
    uint32_t n_started AT_GUARDED_BY(comp_mu);
    bool comp_stop AT_GUARDED_BY(comp_mu);
    pthread_mutex_t reg_mu;
    region_t regions[MAX_REGIONS] AT_GUARDED_BY(reg_mu);
    uint32_t num_regions AT_GUARDED_BY(reg_mu);
} cuda_backend_t;

/* A tile before splitting. */
typedef struct tile {
    uint32_t chunk;
    uint32_t row_begin;
    uint32_t kind;
    uint32_t kb, ke; /* keys any row of the tile needs */
} tile_t;

/* A loaded module: one tile kind compiled with one tile. */
typedef struct modslot {
    CUmodule mod;          /* NULL: the slot is free */
    uint32_t kind;
    att_tile_t tile;
    CUfunction f_attend, f_merge, f_kv_write;
    uint32_t info[ATT_KINFO_COUNT];
    uint64_t used;         /* the session's switch count when last chosen: least recent goes */
} modslot_t;

struct att_kv {
    cuda_backend_t *be;
    const att_model_t *m;  /* borrowed: outlives the storage */
    uint32_t num_blocks;
    size_t layer_half_bytes;
    CUdeviceptr pool_d;    /* [num_layers][k|v][num_blocks][Hkv][BS][D] */
    CUdeviceptr consts_d;  /* [Hq] f32 ALiBi slopes, then [Hq] f32 sinks */
    att_cuda_plan_t plan;  /* tiles and split thresholds of the current config */
    CUstream stream;
    /* A mixed batch's wide tiles run on `side`, forked from and joined back into `stream`, so
     * they overlap the narrow (decode) tiles instead of following them. */
    CUstream side;
    CUevent ev_fork, ev_join;
    CUstream launch_stream; /* the stream launch_cb launches on */
    CUevent ev_begin, ev_end;
    modslot_t slots[MOD_SLOTS];
    uint32_t cur[ATT_TILE_KINDS]; /* the slot of each kind's current module; its index is the
                                   * tile byte of the launch-cache keys */
    uint64_t switches;
    bool timing;           /* record device time even when the backend's timing is off */
    lc_t *lc;              /* owned: this session's launch cache */
    uint64_t compiles;
    uint64_t last_host_ns, last_device_ns;
    /* per-call buffers, grown when a call needs more (never per call) */
    CUdeviceptr io_d;      /* [meta | q | k | v | out | parts] of the current call */
    size_t io_cap;
    uint8_t *stage_h;      /* pinned, [meta | q | k | v | out] */
    size_t stage_cap;
    tile_t *tiles;
    size_t cap_tiles;
    att_kitem_t *items;
    size_t cap_items;
    att_kmerge_t *merges;
    size_t cap_merges;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The one place a CUresult becomes an at_err_t: log file:line, the call and the driver's name
 * for the error; a sticky fault marks the backend lost. */
static at_err_t cu_check(cuda_backend_t *be, CUresult r, const char *call, const char *file,
                         int line) {
    if (r == CUDA_SUCCESS)
        return AT_OK;
    at_log(AT_LOG_ERROR, "cuda", "%s:%d: %s: %s", file, line, call,
           att_cudrv_err_name(be->drv, r));
    if (att_cudrv_err_sticky(r) && !atomic_exchange_explicit(&be->lost, 1, memory_order_relaxed))
        at_log(AT_LOG_ERROR, "cuda", "cuda:%d is lost after a device fault; its sessions fail "
                                     "until the process restarts",
               be->ordinal);
    return AT_ERR_DEVICE;
}

#define CU(call) cu_check(be, be->drv->call, #call, __FILE__, __LINE__)

static at_err_t enter(cuda_backend_t *be) {
    if (atomic_load_explicit(&be->lost, memory_order_relaxed))
        return AT_ERR_DEVICE;
    return CU(cuCtxSetCurrent(be->ctx));
}

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* Grows a host array to hold n elements of size sz. */
static at_err_t grow(void **p, size_t *cap, size_t n, size_t sz) {
    if (n <= *cap)
        return AT_OK;
    size_t c = *cap ? *cap : 64;
    while (c < n)
        c *= 2;
    void *q = realloc(*p, c * sz);
    if (q == NULL)
        return AT_ERR_NOMEM;
    *p = q;
    *cap = c;
    return AT_OK;
}

/* ---- launches ---- */

static at_err_t launch_cb(void *user, const lc_launch_t *l, uint32_t grid_x, void *params) {
    att_kv_t *kv = user;
    cuda_backend_t *be = kv->be;
    void *args[] = {params};
    return CU(cuLaunchKernel((CUfunction)l->fn, grid_x, 1, 1, l->block_x, 1, 1, l->smem_bytes,
                             kv->launch_stream, args, NULL));
}

/* The current module of a tile kind. */
static const modslot_t *cur_mod(const att_kv_t *kv, uint32_t kind) {
    return &kv->slots[kv->cur[kind]];
}

/* The prepared launch of (kernel, kind's current module, split): from the session's launch
 * cache, or built once from the module with the session's constants in its parameter template. */
static at_err_t prepared(att_kv_t *kv, uint32_t kernel, uint32_t kind, uint32_t split,
                         const lc_launch_t **out) {
    const modslot_t *ms = cur_mod(kv, kind);
    const uint32_t key = LC_KEY(kernel, kv->cur[kind], split);
    const lc_launch_t *l = lc_lookup(kv->lc, key);
    if (l != NULL) {
        *out = l;
        return AT_OK;
    }
    const att_model_t *m = kv->m;
    lc_launch_t n;
    memset(&n, 0, sizeof n);
    n.key = key;
    n.grid_per_unit = m->num_kv_heads;
    n.param_bytes = sizeof(att_kparams_t);
    switch (kernel) {
    case K_ATTEND:
        n.fn = ms->f_attend;
        n.block_x = ms->info[ATT_KINFO_THREADS];
        n.smem_bytes = ms->info[ATT_KINFO_SMEM_BYTES];
        break;
    case K_MERGE:
        n.fn = ms->f_merge;
        n.block_x = ms->info[ATT_KINFO_MERGE_THREADS];
        break;
    default:
        n.fn = ms->f_kv_write;
        n.block_x = ms->info[ATT_KINFO_KVW_THREADS];
        break;
    }
    att_kparams_t t;
    memset(&t, 0, sizeof t);
    t.scale = m->scale;
    t.soft_cap = m->soft_cap;
    t.alibi_d = m->alibi != NULL ? kv->consts_d : 0;
    t.sinks_d = m->sinks != NULL ? kv->consts_d + (uint64_t)m->num_query_heads * 4 : 0;
    t.num_blocks = kv->num_blocks;
    memcpy(n.params, &t, sizeof t);
    return lc_insert(kv->lc, &n, out);
}

/* ---- planning: the session's configuration, then each call's chunks -> tiles -> items ---- */

void att_cuda_plan_from_cfg(const tun_cfg_t *c, att_cuda_plan_t *out) {
    const uint32_t *v = c->v;
    memset(out, 0, sizeof *out);
    out->tile[ATT_TILE_WIDE] = (att_tile_t){.warps_m = v[TUN_CUDA_WIDE_WARPS_M],
                                            .warp_mt = v[TUN_CUDA_WIDE_WARP_MT],
                                            .warps_n = 1,
                                            .tile_k = v[TUN_CUDA_WIDE_TILE_K],
                                            .stages = v[TUN_CUDA_WIDE_STAGES]};
    out->tile[ATT_TILE_NARROW] = (att_tile_t){.warps_m = 1,
                                              .warp_mt = 1,
                                              .warps_n = v[TUN_CUDA_NARROW_WARPS_N],
                                              .tile_k = v[TUN_CUDA_NARROW_TILE_K],
                                              .stages = v[TUN_CUDA_NARROW_STAGES]};
    out->min_split_keys = v[TUN_CUDA_SPLIT_MIN_KEYS] != 0 ? v[TUN_CUDA_SPLIT_MIN_KEYS]
                                                          : ATT_CUDA_NEVER;
    out->max_splits = TUN_CUDA_MAX_SPLITS;
    out->blocks_per_sm = v[TUN_CUDA_BLOCKS_PER_SM];
    out->mixed_split_keys = v[TUN_CUDA_MIXED_SPLIT_KEYS] != 0 ? v[TUN_CUDA_MIXED_SPLIT_KEYS]
                                                              : ATT_CUDA_NEVER;
    out->mixed_order = v[TUN_CUDA_MIXED_ORDER];
}

void att_cuda_plan_default(const att_model_t *m, uint32_t smem_optin, att_cuda_plan_t *out) {
    tun_shape_t s;
    att_tune_shape(m, &s);
    const tun_device_t d = {.backend = "cuda", .smem_bytes = smem_optin};
    const tun_bucket_t any = {0};
    tun_cfg_t h;
    tun_space_cuda_unified.heuristic(&s, &d, &any, &h);
    att_cuda_plan_from_cfg(&h, out);
}

/* The session's plan: the default, with the backend's overrides. */
static void session_plan(const cuda_backend_t *be, const att_model_t *m, att_cuda_plan_t *out) {
    att_cuda_plan_default(m, be->smem_optin, out);
    if (!be->has_plan)
        return;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        if (be->plan.tile[k].warps_m != 0)
            out->tile[k] = be->plan.tile[k];
    if (be->plan.min_split_keys != 0)
        out->min_split_keys = be->plan.min_split_keys;
    if (be->plan.max_splits != 0)
        out->max_splits = be->plan.max_splits;
    if (be->plan.blocks_per_sm != 0)
        out->blocks_per_sm = be->plan.blocks_per_sm;
    if (be->plan.mixed_split_keys != 0)
        out->mixed_split_keys = be->plan.mixed_split_keys;
    if (be->plan.mixed_order != 0)
        out->mixed_order = be->plan.mixed_order;
}

static uint32_t window_lo(uint32_t pos, uint32_t window) {
    return (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

typedef struct plan {
    uint32_t num_items[ATT_TILE_KINDS];
    uint32_t num_merges[ATT_TILE_KINDS];
    uint32_t num_parts[ATT_TILE_KINDS];
    uint32_t total_items, total_merges;
} plan_t;

/* Parts of a tile's key range: up to `want` of at least min_split_keys each; a wide tile of a
 * mixed batch also into parts of about mixed_split_keys. */
static uint32_t tile_parts(const att_cuda_plan_t *p, const tile_t *t, uint32_t want, bool mixed) {
    const uint32_t keys = t->ke - t->kb;
    uint32_t parts = keys / p->min_split_keys;
    parts = parts < want ? parts : want;
    if (mixed && t->kind == ATT_TILE_WIDE && p->mixed_split_keys != ATT_CUDA_NEVER &&
        keys / p->mixed_split_keys > parts)
        parts = keys / p->mixed_split_keys;
    return parts < p->max_splits ? parts : p->max_splits;
}

static int cmp_item_keys_desc(const void *a, const void *b) {
    const att_kitem_t *x = a, *y = b;
    return (x->reserved[0] < y->reserved[0]) - (x->reserved[0] > y->reserved[0]);
}

/* Items of kind k are written as a run (wide first: kind order), longest first within a kind. */
static at_err_t plan_batch(att_kv_t *kv, const att_batch_t *b, plan_t *pl) {
    const att_model_t *m = kv->m;
    const uint32_t g = m->group, window = m->window[b->layer];
    uint32_t rows[ATT_TILE_KINDS], tile_k[ATT_TILE_KINDS];
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        rows[k] = cur_mod(kv, k)->info[ATT_KINFO_TILE_ROWS];
        tile_k[k] = cur_mod(kv, k)->info[ATT_KINFO_TILE_KEYS];
    }
    memset(pl, 0, sizeof *pl);
    size_t nt = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const uint32_t r = b->chunks[c].num_tokens * g;
        const uint32_t kind = r <= rows[ATT_TILE_NARROW] ? ATT_TILE_NARROW : ATT_TILE_WIDE;
        nt += (r + rows[kind] - 1) / rows[kind];
    }
    at_err_t e = grow((void **)&kv->tiles, &kv->cap_tiles, nt, sizeof *kv->tiles);
    if (e != AT_OK)
        return e;
    nt = 0;
    uint64_t longest = 0;
    uint32_t kinds_seen = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        const uint32_t r = ch->num_tokens * g;
        const uint32_t kind = r <= rows[ATT_TILE_NARROW] ? ATT_TILE_NARROW : ATT_TILE_WIDE;
        for (uint32_t rb = 0; rb < r; rb += rows[kind]) {
            const uint32_t re = rb + rows[kind] < r ? rb + rows[kind] : r;
            tile_t *t = &kv->tiles[nt++];
            t->chunk = c;
            t->row_begin = rb;
            t->kind = kind;
            t->kb = window_lo(ch->start_pos + rb / g, window);
            t->ke = ch->start_pos + (re - 1) / g + 1;
            kinds_seen |= 1u << kind;
            longest = t->ke - t->kb > longest ? t->ke - t->kb : longest;
        }
    }
    /* Split when the tiles cannot fill the GPU and some are long (flash-decoding). */
    const uint64_t blocks = (uint64_t)nt * m->num_kv_heads;
    const uint32_t min_keys = kv->plan.min_split_keys;
    const uint64_t target = (uint64_t)kv->be->num_sms * kv->plan.blocks_per_sm;
    uint32_t want = 1;
    if (blocks < target && longest >= 2 * (uint64_t)min_keys) {
        uint64_t w = (target + blocks - 1) / blocks;
        want = w > kv->plan.max_splits ? kv->plan.max_splits : (uint32_t)w;
    }
    const bool mixed = kinds_seen == (1u << ATT_TILE_WIDE | 1u << ATT_TILE_NARROW);
    size_t ni = 0, nm = 0;
    for (size_t i = 0; i < nt; i++) {
        const uint32_t parts = tile_parts(&kv->plan, &kv->tiles[i], want, mixed);
        ni += parts >= 2 ? parts : 1;
        nm += parts >= 2;
    }
    if ((e = grow((void **)&kv->items, &kv->cap_items, ni, sizeof *kv->items)) != AT_OK ||
        (e = grow((void **)&kv->merges, &kv->cap_merges, nm, sizeof *kv->merges)) != AT_OK)
        return e;
    ni = nm = 0;
    for (uint32_t kind = 0; kind < ATT_TILE_KINDS; kind++) {
        const size_t first_item = ni, first_merge = nm;
        for (size_t i = 0; i < nt; i++) {
            const tile_t *t = &kv->tiles[i];
            if (t->kind != kind)
                continue;
            const uint32_t keys = t->ke - t->kb, parts = tile_parts(&kv->plan, t, want, mixed);
            if (parts < 2) {
                kv->items[ni++] = (att_kitem_t){.chunk = t->chunk,
                                                .row_begin = t->row_begin,
                                                .key_begin = 0,
                                                .key_end = 0xffffffffu,
                                                .part = ATT_KPART_NONE,
                                                .flags = ATT_KITEM_WRITE_KV,
                                                .reserved = {keys, 0}};
                continue;
            }
            const uint32_t tk = tile_k[kind];
            const uint32_t start = t->kb - t->kb % tk;
            uint32_t span = (t->ke - start + parts - 1) / parts;
            span = (span + tk - 1) / tk * tk;
            const uint32_t part_begin = pl->num_parts[kind];
            uint32_t n_parts = 0;
            for (uint32_t kb = start; kb < t->ke; kb += span, n_parts++) {
                const uint32_t ke = t->ke - kb > span ? kb + span : t->ke;
                kv->items[ni++] = (att_kitem_t){.chunk = t->chunk,
                                                .row_begin = t->row_begin,
                                                .key_begin = kb,
                                                .key_end = ke,
                                                .part = part_begin + n_parts,
                                                .flags = n_parts == 0 ? ATT_KITEM_WRITE_KV : 0u,
                                                .reserved = {ke - kb, 0}};
            }
            pl->num_parts[kind] += n_parts;
            kv->merges[nm++] = (att_kmerge_t){t->chunk, t->row_begin, part_begin, n_parts};
        }
        pl->num_items[kind] = (uint32_t)(ni - first_item);
        pl->num_merges[kind] = (uint32_t)(nm - first_merge);
        qsort(kv->items + first_item, ni - first_item, sizeof *kv->items, cmp_item_keys_desc);
    }
    for (size_t i = 0; i < ni; i++)
        kv->items[i].reserved[0] = 0;
    pl->total_items = (uint32_t)ni;
    pl->total_merges = (uint32_t)nm;
    return AT_OK;
}

/* ---- buffers ---- */

static at_err_t ensure_io(att_kv_t *kv, size_t dev_bytes, size_t stage_bytes) {
    cuda_backend_t *be = kv->be;
    at_err_t e;
    if (dev_bytes > kv->io_cap) {
        size_t cap = align_up(dev_bytes + dev_bytes / 2, 1u << 20);
        if (kv->io_d != 0 && (e = CU(cuMemFree(kv->io_d))) != AT_OK)
            return e;
        kv->io_d = 0;
        kv->io_cap = 0;
        if ((e = CU(cuMemAlloc(&kv->io_d, cap))) != AT_OK)
            return e;
        kv->io_cap = cap;
    }
    if (stage_bytes > kv->stage_cap) {
        size_t cap = align_up(stage_bytes + stage_bytes / 2, 1u << 20);
        if (kv->stage_h != NULL && (e = CU(cuMemFreeHost(kv->stage_h))) != AT_OK)
            return e;
        kv->stage_h = NULL;
        kv->stage_cap = 0;
        void *p = NULL;
        if ((e = CU(cuMemHostAlloc(&p, cap, 0))) != AT_OK)
            return e;
        kv->stage_h = p;
        kv->stage_cap = cap;
    }
    return AT_OK;
}

static bool registered(cuda_backend_t *be, const void *p, size_t n) {
    const uintptr_t a = (uintptr_t)p;
    bool found = false;
    pthread_mutex_lock(&be->reg_mu);
    for (uint32_t i = 0; i < be->num_regions && !found; i++)
        found = a >= be->regions[i].begin && a + n <= be->regions[i].end;
    pthread_mutex_unlock(&be->reg_mu);
    return found;
}

/* Which tensor of a chunk: 0 q, 1 k, 2 v, 3 out. */
static const void *chunk_ptr(const att_batch_chunk_t *c, int which) {
    switch (which) {
    case 0: return c->q;
    case 1: return c->k;
    case 2: return c->v;
    default: return c->out;
    }
}

/* Moves one tensor of the batch between host and device region dev_off (row_bytes per token).
 * Runs of chunks whose host rows are adjacent become one copy. Registered memory is copied
 * directly; other runs go through the stage at stage_off (same offsets): gathered before the
 * upload, or scattered by finish_out once the stream is synchronized (*staged tells). */
static at_err_t move_tensor(att_kv_t *kv, const att_batch_t *b, int which, size_t row_bytes,
                            size_t dev_off, size_t stage_off, bool *staged) {
    cuda_backend_t *be = kv->be;
    const bool up = which != 3;
    *staged = false;
    for (uint32_t c = 0; c < b->num_chunks;) {
        const uint8_t *p = chunk_ptr(&b->chunks[c], which);
        size_t n = (size_t)b->chunks[c].num_tokens * row_bytes;
        const size_t off = (size_t)b->chunks[c].token_offset * row_bytes;
        uint32_t d = c + 1;
        while (d < b->num_chunks && (const uint8_t *)chunk_ptr(&b->chunks[d], which) == p + n &&
               (size_t)b->chunks[d].token_offset * row_bytes == off + n) {
            n += (size_t)b->chunks[d].num_tokens * row_bytes;
            d++;
        }
        const CUdeviceptr dev = kv->io_d + dev_off + off;
        uint8_t *st = kv->stage_h + stage_off + off;
        const bool direct = registered(be, p, n);
        at_err_t e;
        if (up) {
            if (!direct)
                memcpy(st, p, n);
            e = CU(cuMemcpyHtoDAsync(dev, direct ? p : st, n, kv->stream));
        } else {
            e = CU(cuMemcpyDtoHAsync(direct ? (void *)p : st, dev, n, kv->stream));
        }
        if (e != AT_OK)
            return e;
        *staged |= !direct;
        c = d;
    }
    return AT_OK;
}

/* Copies out's staged rows to each chunk's out (after the stream is synchronized). */
static void finish_out(att_kv_t *kv, const att_batch_t *b, size_t row_bytes, size_t stage_off) {
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        const size_t n = (size_t)ch->num_tokens * row_bytes;
        if (!registered(kv->be, ch->out, n))
            memcpy(ch->out, kv->stage_h + stage_off + (size_t)ch->token_offset * row_bytes, n);
    }
}

/* ---- run ---- */

static at_err_t launch_kind(att_kv_t *kv, const att_kparams_t *base, const plan_t *pl,
                            uint32_t kind, uint64_t items_d, uint64_t merges_d,
                            uint64_t part_o_d, uint64_t part_ml_d) {
    if (pl->num_items[kind] == 0)
        return AT_OK;
    const uint32_t split = pl->num_merges[kind] != 0;
    const lc_launch_t *l;
    at_err_t e = prepared(kv, K_ATTEND, kind, split, &l);
    if (e != AT_OK)
        return e;
    att_kparams_t p;
    memcpy(&p, l->params, sizeof p);
    p.q_d = base->q_d;
    p.k_d = base->k_d;
    p.v_d = base->v_d;
    p.out_d = base->out_d;
    p.k_cache_d = base->k_cache_d;
    p.v_cache_d = base->v_cache_d;
    p.chunks_d = base->chunks_d;
    p.block_table_d = base->block_table_d;
    p.window = base->window;
    p.num_chunks = base->num_chunks;
    p.items_d = items_d;
    p.num_items = pl->num_items[kind];
    p.merges_d = merges_d;
    p.num_merges = pl->num_merges[kind];
    p.part_o_d = part_o_d;
    p.part_ml_d = part_ml_d;
    if ((e = lc_launch(kv->lc, l, p.num_items, &p)) != AT_OK || !split)
        return e;
    if ((e = prepared(kv, K_MERGE, kind, 1, &l)) != AT_OK)
        return e;
    return lc_launch(kv->lc, l, p.num_merges, &p);
}

static at_err_t cuda_run(att_backend_t *base, att_kv_t *kv, const att_batch_t *b) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    const uint64_t t0 = now_ns();
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    const att_model_t *m = kv->m;
    const size_t es = att_dtype_bytes(m->dtype);
    const size_t q_row = (size_t)m->num_query_heads * m->head_dim * es;
    const size_t kv_row = (size_t)m->num_kv_heads * m->head_dim * es;
    const size_t T = b->total_tokens;

    plan_t pl;
    memset(&pl, 0, sizeof pl);
    if (b->attend && (e = plan_batch(kv, b, &pl)) != AT_OK)
        return e;
    size_t table_n = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++)
        table_n += b->chunks[c].num_blocks;

    /* One layout for the stage and the device buffer; parts only on the device. */
    const size_t o_chunks = 0;
    const size_t o_table = align_up(o_chunks + b->num_chunks * sizeof(att_kchunk_t), 16);
    const size_t o_items = align_up(o_table + table_n * sizeof(uint32_t), 16);
    const size_t o_merges = align_up(o_items + pl.total_items * sizeof(att_kitem_t), 16);
    const size_t meta_end = o_merges + pl.total_merges * sizeof(att_kmerge_t);
    const size_t o_q = align_up(meta_end, 256);
    const size_t o_k = align_up(o_q + (b->attend ? T * q_row : 0), 256);
    const size_t o_v = align_up(o_k + T * kv_row, 256);
    const size_t o_out = align_up(o_v + T * kv_row, 256);
    const size_t stage_end = o_out + (b->attend ? T * q_row : 0);
    size_t o_po[ATT_TILE_KINDS], o_pml[ATT_TILE_KINDS], end = align_up(stage_end, 256);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        const size_t rows =
            (size_t)pl.num_parts[k] * m->num_kv_heads * cur_mod(kv, k)->info[ATT_KINFO_TILE_ROWS];
        o_po[k] = end;
        o_pml[k] = align_up(o_po[k] + rows * m->head_dim * 4, 256);
        end = align_up(o_pml[k] + rows * 8, 256);
    }
    if ((e = ensure_io(kv, end, stage_end)) != AT_OK)
        return e;

    /* metadata */
    att_kchunk_t *kc = (att_kchunk_t *)(kv->stage_h + o_chunks);
    uint32_t *table = (uint32_t *)(kv->stage_h + o_table);
    uint32_t t_off = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        kc[c] = (att_kchunk_t){ch->token_offset, ch->start_pos, ch->num_tokens, t_off};
        memcpy(table + t_off, ch->blocks, ch->num_blocks * sizeof(uint32_t));
        t_off += ch->num_blocks;
    }
    memcpy(kv->stage_h + o_items, kv->items, pl.total_items * sizeof(att_kitem_t));
    memcpy(kv->stage_h + o_merges, kv->merges, pl.total_merges * sizeof(att_kmerge_t));
    if ((e = CU(cuMemcpyHtoDAsync(kv->io_d, kv->stage_h, meta_end, kv->stream))) != AT_OK)
        goto out_drain;
    bool staged;
    if ((b->attend && (e = move_tensor(kv, b, 0, q_row, o_q, o_q, &staged)) != AT_OK) ||
        (e = move_tensor(kv, b, 1, kv_row, o_k, o_k, &staged)) != AT_OK ||
        (e = move_tensor(kv, b, 2, kv_row, o_v, o_v, &staged)) != AT_OK)
        goto out_drain;

    if ((be->timing || kv->timing) && (e = CU(cuEventRecord(kv->ev_begin, kv->stream))) != AT_OK)
        goto out_drain;
    const CUdeviceptr layer_k = kv->pool_d + 2 * (uint64_t)b->layer * kv->layer_half_bytes;
    att_kparams_t p;
    memset(&p, 0, sizeof p);
    p.q_d = b->attend ? kv->io_d + o_q : 0;
    p.k_d = kv->io_d + o_k;
    p.v_d = kv->io_d + o_v;
    p.out_d = b->attend ? kv->io_d + o_out : 0;
    p.k_cache_d = layer_k;
    p.v_cache_d = layer_k + kv->layer_half_bytes;
    p.chunks_d = kv->io_d + o_chunks;
    p.block_table_d = kv->io_d + o_table;
    p.window = m->window[b->layer];
    p.num_chunks = b->num_chunks;
    kv->launch_stream = kv->stream;
    if (b->attend) {
        /* Both kinds: the wide tiles (bound by arithmetic) run on the side stream, concurrent
         * with the narrow ones (decode, bound by memory), in the plan's launch order; the side
         * stream is joined back before out is read. Items and merges are laid out wide first
         * (plan_batch's kind order). */
        const bool fork = pl.num_items[ATT_TILE_NARROW] != 0 && pl.num_items[ATT_TILE_WIDE] != 0;
        if (fork && ((e = CU(cuEventRecord(kv->ev_fork, kv->stream))) != AT_OK ||
                     (e = CU(cuStreamWaitEvent(kv->side, kv->ev_fork, 0))) != AT_OK))
            goto out_drain;
        const uint32_t first = kv->plan.mixed_order == ATT_CUDA_WIDE_FIRST ? ATT_TILE_WIDE
                                                                           : ATT_TILE_NARROW;
        for (uint32_t i = 0; i < ATT_TILE_KINDS; i++) {
            const uint32_t k = i == 0 ? first : 1u - first;
            const size_t before_items = k == ATT_TILE_WIDE ? 0 : pl.num_items[ATT_TILE_WIDE];
            const size_t before_merges = k == ATT_TILE_WIDE ? 0 : pl.num_merges[ATT_TILE_WIDE];
            kv->launch_stream = fork && k == ATT_TILE_WIDE ? kv->side : kv->stream;
            if ((e = launch_kind(kv, &p, &pl, k,
                                 kv->io_d + o_items + before_items * sizeof(att_kitem_t),
                                 kv->io_d + o_merges + before_merges * sizeof(att_kmerge_t),
                                 kv->io_d + o_po[k], kv->io_d + o_pml[k])) != AT_OK)
                goto out_drain;
        }
        kv->launch_stream = kv->stream;
        if (fork && ((e = CU(cuEventRecord(kv->ev_join, kv->side))) != AT_OK ||
                     (e = CU(cuStreamWaitEvent(kv->stream, kv->ev_join, 0))) != AT_OK))
            goto out_drain;
    } else {
        const lc_launch_t *l;
        if ((e = prepared(kv, K_KV_WRITE, ATT_TILE_WIDE, 0, &l)) != AT_OK)
            goto out_drain;
        att_kparams_t q;
        memcpy(&q, l->params, sizeof q);
        q.k_d = p.k_d;
        q.v_d = p.v_d;
        q.k_cache_d = p.k_cache_d;
        q.v_cache_d = p.v_cache_d;
        q.chunks_d = p.chunks_d;
        q.block_table_d = p.block_table_d;
        q.num_chunks = p.num_chunks;
        if ((e = lc_launch(kv->lc, l, b->num_chunks, &q)) != AT_OK)
            goto out_drain;
    }
    if ((be->timing || kv->timing) && (e = CU(cuEventRecord(kv->ev_end, kv->stream))) != AT_OK)
        goto out_drain;
    kv->last_host_ns = now_ns() - t0;
    bool out_staged = false;
    if (b->attend && (e = move_tensor(kv, b, 3, q_row, o_out, o_out, &out_staged)) != AT_OK)
        goto out_drain;
    if ((e = CU(cuStreamSynchronize(kv->stream))) != AT_OK)
        goto out_drain;
    if (out_staged)
        finish_out(kv, b, q_row, o_out);
    if (be->timing || kv->timing) {
        float ms = 0.0f;
        if ((e = CU(cuEventElapsedTime(&ms, kv->ev_begin, kv->ev_end))) != AT_OK)
            return e;
        kv->last_device_ns = (uint64_t)((double)ms * 1e6);
    }
    return AT_OK;
out_drain:
    /* Copies or kernels of this call may be queued ahead of the failed step: wait for them before
     * the caller reuses the stage, the io buffers or the arena regions they read and write. The
     * results are not checked: e already says why the call failed. */
    (void)be->drv->cuStreamSynchronize(kv->side);
    (void)be->drv->cuStreamSynchronize(kv->stream);
    return e;
}

/* ---- sessions ---- */

/* One kind's image: from the compile cache, or compiled. Runs on its own thread for the narrow
 * kind while the caller fetches the wide one, so a new model's two compiles overlap. */
typedef struct fetch {
    att_jit_t *jit;
    const char *arch;
    att_jit_opts_t opts;
    const void *img;
    size_t bytes;
    int compiled;
    at_err_t err;
    at_diag_t diag;
} fetch_t;

static void *fetch_run(void *arg) {
    fetch_t *f = arg;
    f->err = att_jit_image(f->jit, f->arch, f->opts.ptr, f->opts.n, &f->img, &f->bytes,
                           &f->compiled, &f->diag);
    return NULL;
}

static void fetch_init(fetch_t *f, const cuda_backend_t *be, const att_model_t *m,
                       const att_tile_t *tile) {
    memset(f, 0, sizeof *f);
    f->jit = be->jit;
    f->arch = be->arch;
    att_jit_model_opts(m, tile, &f->opts);
}

/* Loads image as slot `slot` (free) for a tile kind. */
static at_err_t load_slot(att_kv_t *kv, uint32_t slot, uint32_t kind, const att_tile_t *tile,
                          const void *img, at_diag_t *diag) {
    cuda_backend_t *be = kv->be;
    modslot_t ms = {.kind = kind, .tile = *tile};
    at_err_t e;
    if ((e = CU(cuModuleLoadData(&ms.mod, img))) != AT_OK)
        return at_diag_set(diag, e, "cuModuleLoadData failed");
    CUdeviceptr info_d;
    size_t info_n;
    if ((e = CU(cuModuleGetFunction(&ms.f_attend, ms.mod, "att_k_attend"))) != AT_OK ||
        (e = CU(cuModuleGetFunction(&ms.f_merge, ms.mod, "att_k_merge"))) != AT_OK ||
        (e = CU(cuModuleGetFunction(&ms.f_kv_write, ms.mod, "att_k_kv_write"))) != AT_OK ||
        (e = CU(cuModuleGetGlobal(&info_d, &info_n, ms.mod, "att_k_info"))) != AT_OK) {
        e = at_diag_set(diag, e, "kernel module lacks an entry point");
        goto out_unload;
    }
    if (info_n != sizeof ms.info) {
        e = at_diag_set(diag, AT_ERR_INTERNAL, "att_k_info has %zu bytes", info_n);
        goto out_unload;
    }
    if ((e = CU(cuMemcpyDtoH(ms.info, info_d, info_n))) != AT_OK)
        goto out_unload;
    const uint32_t smem = ms.info[ATT_KINFO_SMEM_BYTES];
    if (smem > be->smem_optin) {
        e = at_diag_set(diag, AT_ERR_UNSUPPORTED,
                        "head_dim %u needs %u bytes of shared memory per block; %s allows %u",
                        kv->m->head_dim, smem, be->arch, be->smem_optin);
        goto out_unload;
    }
    if (smem > 48u * 1024u &&
        (e = CU(cuFuncSetAttribute(ms.f_attend, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                   (int)smem))) != AT_OK)
        goto out_unload;
    ms.used = kv->switches;
    kv->slots[slot] = ms;
    return AT_OK;
out_unload:
    (void)CU(cuModuleUnload(ms.mod));
    return e;
}

/* ---- compile threads: tuning candidates, off every call's path ---- */

static void *compiler_run(void *arg) {
    cuda_backend_t *be = arg;
    pthread_mutex_lock(&be->comp_mu);
    for (;;) {
        while (!be->comp_stop && be->q_len == 0)
            pthread_cond_wait(&be->comp_cv, &be->comp_mu);
        if (be->comp_stop)
            break;
        att_jit_opts_t o = be->queue[be->q_head];
        be->q_head = (be->q_head + 1) % COMPILE_QUEUE;
        be->q_len--;
        pthread_mutex_unlock(&be->comp_mu);
        for (uint32_t i = 0; i < o.n; i++)
            o.ptr[i] = o.text[i];
        const void *img;
        size_t bytes;
        /* a failure is logged by att_jit and remembered there: set_tuning then refuses it */
        (void)att_jit_image(be->jit, be->arch, o.ptr, o.n, &img, &bytes, NULL, NULL);
        pthread_mutex_lock(&be->comp_mu);
    }
    pthread_mutex_unlock(&be->comp_mu);
    return NULL;
}

/* Queues a compile of o (unless it is queued already) and starts the compile threads on first
 * use. */
static void compile_later(cuda_backend_t *be, const att_jit_opts_t *o) {
    pthread_mutex_lock(&be->comp_mu);
    bool queued = false;
    for (uint32_t i = 0; i < be->q_len && !queued; i++)
        queued = memcmp(be->queue[(be->q_head + i) % COMPILE_QUEUE].text, o->text,
                        sizeof o->text) == 0;
    if (!queued && be->q_len < COMPILE_QUEUE) {
        be->queue[(be->q_head + be->q_len) % COMPILE_QUEUE] = *o;
        be->q_len++;
        pthread_cond_signal(&be->comp_cv);
    }
    while (be->n_started < be->n_compilers &&
           pthread_create(&be->compilers[be->n_started], NULL, compiler_run, be) == 0)
        be->n_started++;
    pthread_mutex_unlock(&be->comp_mu);
}

static void compilers_stop(cuda_backend_t *be) {
    pthread_mutex_lock(&be->comp_mu);
    be->comp_stop = true;
    pthread_cond_broadcast(&be->comp_cv);
    const uint32_t n = be->n_started;
    pthread_mutex_unlock(&be->comp_mu);
    for (uint32_t i = 0; i < n; i++)
        pthread_join(be->compilers[i], NULL);
}

/* The compile options of one tile kind of m, zeroed first so queued entries compare bytewise. */
static void tile_opts(const att_model_t *m, const att_tile_t *t, att_jit_opts_t *o) {
    memset(o, 0, sizeof *o);
    att_jit_model_opts(m, t, o);
}

/* ---- tuning ---- */

static void cuda_tun_device(const cuda_backend_t *be, tun_device_t *d) {
    memset(d, 0, sizeof *d);
    snprintf(d->backend, sizeof d->backend, "cuda");
    snprintf(d->name, sizeof d->name, "%s", be->name);
    snprintf(d->arch, sizeof d->arch, "%s", be->arch);
    snprintf(d->driver, sizeof d->driver, "%d.%d", be->drv->driver_version / 1000,
             be->drv->driver_version % 1000 / 10);
    char nvrtc[24];
    att_jit_nvrtc_version(nvrtc, sizeof nvrtc);
    snprintf(d->compiler, sizeof d->compiler, "nvrtc %s", nvrtc);
    d->threads = be->num_sms;
    d->smem_bytes = be->smem_optin;
}

void att_cuda_tune_device(const att_backend_t *base, tun_device_t *d, const char **kernel_hash) {
    cuda_tun_device((const cuda_backend_t *)base, d);
    *kernel_hash = att_jit_kernel_hash();
}

/* The slot of (kind, tile), or MOD_SLOTS. */
static uint32_t find_slot(const att_kv_t *kv, uint32_t kind, const att_tile_t *t) {
    for (uint32_t i = 0; i < MOD_SLOTS; i++)
        if (kv->slots[i].mod != NULL && kv->slots[i].kind == kind &&
            memcmp(&kv->slots[i].tile, t, sizeof *t) == 0)
            return i;
    return MOD_SLOTS;
}

/* A slot to load into: a free one, else the least recently chosen that is not current nor
 * `keep` (unloaded, and its prepared launches forgotten). */
static uint32_t free_slot(att_kv_t *kv, uint32_t keep) {
    uint32_t victim = MOD_SLOTS;
    for (uint32_t i = 0; i < MOD_SLOTS; i++) {
        if (kv->slots[i].mod == NULL)
            return i;
        if (i == kv->cur[ATT_TILE_WIDE] || i == kv->cur[ATT_TILE_NARROW] || i == keep)
            continue;
        if (victim == MOD_SLOTS || kv->slots[i].used < kv->slots[victim].used)
            victim = i;
    }
    cuda_backend_t *be = kv->be;
    (void)CU(cuModuleUnload(kv->slots[victim].mod)); /* no run is in flight (set_tuning) */
    memset(&kv->slots[victim], 0, sizeof kv->slots[victim]);
    lc_forget_tile(kv->lc, victim);
    return victim;
}

static at_err_t cuda_set_tuning(att_backend_t *base, att_kv_t *kv, const tun_cfg_t *cfg) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    att_cuda_plan_t plan;
    if (cfg == NULL) {
        session_plan(be, kv->m, &plan);
    } else {
        tun_shape_t s;
        tun_device_t d;
        att_tune_shape(kv->m, &s);
        cuda_tun_device(be, &d);
        if (!tun_cfg_valid(&tun_space_cuda_unified, cfg, &s, &d))
            return AT_ERR_CONFIG;
        att_cuda_plan_from_cfg(cfg, &plan);
    }
    /* Both kinds' images first, so a missing one leaves kv as it was; every missing one is
     * queued before answering NOT_READY, so both compile meanwhile. */
    uint32_t slot[ATT_TILE_KINDS];
    const void *img[ATT_TILE_KINDS] = {NULL, NULL};
    at_err_t missing = AT_OK;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        if ((slot[k] = find_slot(kv, k, &plan.tile[k])) != MOD_SLOTS)
            continue;
        att_jit_opts_t o;
        size_t bytes;
        tile_opts(kv->m, &plan.tile[k], &o);
        e = att_jit_lookup(be->jit, be->arch, o.ptr, o.n, &img[k], &bytes);
        if (e == AT_ERR_NOT_READY)
            compile_later(be, &o);
        if (e != AT_OK && missing != AT_ERR_CONFIG)
            missing = e == AT_ERR_UNSUPPORTED ? AT_ERR_CONFIG : e;
    }
    if (missing != AT_OK)
        return missing;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        if (img[k] == NULL)
            continue;
        /* keep the other kind's slot: loaded just now, or found loaded but not current (an
         * eviction of it would leave that kind's current slot holding this kind's module) */
        slot[k] = free_slot(kv, slot[1u - k]);
        if ((e = load_slot(kv, slot[k], k, &plan.tile[k], img[k], NULL)) != AT_OK)
            return e == AT_ERR_UNSUPPORTED ? AT_ERR_CONFIG : e;
    }
    kv->switches++;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        kv->cur[k] = slot[k];
        kv->slots[slot[k]].used = kv->switches;
    }
    kv->plan = plan;
    return AT_OK;
}

static at_err_t cuda_prepare_tuning(att_backend_t *base, const att_model_t *m,
                                    const tun_cfg_t *cfgs, uint32_t n, bool wait) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    at_err_t first = AT_OK;
    for (uint32_t i = 0; i < n; i++) {
        att_cuda_plan_t plan;
        att_cuda_plan_from_cfg(&cfgs[i], &plan);
        for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
            att_jit_opts_t o;
            const void *img;
            size_t bytes;
            tile_opts(m, &plan.tile[k], &o);
            if (!wait) {
                if (att_jit_lookup(be->jit, be->arch, o.ptr, o.n, &img, &bytes) ==
                    AT_ERR_NOT_READY)
                    compile_later(be, &o);
                continue;
            }
            at_diag_t d = {{0}};
            at_err_t e = att_jit_image(be->jit, be->arch, o.ptr, o.n, &img, &bytes, NULL, &d);
            first = first == AT_OK ? e : first;
        }
    }
    return first;
}

static void cuda_kv_timing(att_backend_t *base, att_kv_t *kv, bool on) {
    (void)base;
    kv->timing = on;
}

static void cuda_kv_destroy(att_backend_t *base, att_kv_t **kvp) {
    if (kvp == NULL || *kvp == NULL)
        return;
    cuda_backend_t *be = (cuda_backend_t *)base;
    att_kv_t *kv = *kvp;
    /* Teardown errors are logged by CU and otherwise ignored: there is nothing left to undo.
     * After a sticky fault every call would fail (and log) the same error; the driver frees the
     * context's resources with the context, so nothing is asked of it then. */
    if (!atomic_load_explicit(&be->lost, memory_order_relaxed) &&
        be->drv->cuCtxSetCurrent(be->ctx) == CUDA_SUCCESS) {
        if (kv->stream != NULL) {
            (void)CU(cuStreamSynchronize(kv->stream));
            (void)CU(cuStreamDestroy(kv->stream));
        }
        if (kv->side != NULL)
            (void)CU(cuStreamDestroy(kv->side));
        if (kv->ev_fork != NULL)
            (void)CU(cuEventDestroy(kv->ev_fork));
        if (kv->ev_join != NULL)
            (void)CU(cuEventDestroy(kv->ev_join));
        if (kv->ev_begin != NULL)
            (void)CU(cuEventDestroy(kv->ev_begin));
        if (kv->ev_end != NULL)
            (void)CU(cuEventDestroy(kv->ev_end));
        for (uint32_t i = 0; i < MOD_SLOTS; i++)
            if (kv->slots[i].mod != NULL)
                (void)CU(cuModuleUnload(kv->slots[i].mod));
        if (kv->pool_d != 0)
            (void)CU(cuMemFree(kv->pool_d));
        if (kv->consts_d != 0)
            (void)CU(cuMemFree(kv->consts_d));
        if (kv->io_d != 0)
            (void)CU(cuMemFree(kv->io_d));
        if (kv->stage_h != NULL)
            (void)CU(cuMemFreeHost(kv->stage_h));
    }
    lc_destroy(&kv->lc);
    free(kv->tiles);
    free(kv->items);
    free(kv->merges);
    free(kv);
    *kvp = NULL;
}

static at_err_t cuda_kv_create(att_backend_t *base, const att_model_t *m, uint32_t num_blocks,
                               att_kv_t **out, at_diag_t *diag) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return at_diag_set(diag, e, "cuda:%d is lost", be->ordinal);
    att_kv_t *kv = calloc(1, sizeof *kv);
    if (kv == NULL)
        return AT_ERR_NOMEM;
    kv->be = be;
    kv->m = m;
    kv->num_blocks = num_blocks;
    kv->layer_half_bytes =
        (size_t)num_blocks * m->num_kv_heads * m->block_size * m->head_dim * att_dtype_bytes(m->dtype);
    if ((e = lc_create(launch_cb, kv, &kv->lc)) != AT_OK)
        goto out_kv;
    session_plan(be, m, &kv->plan);
    fetch_t f[ATT_TILE_KINDS];
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        fetch_init(&f[k], be, m, &kv->plan.tile[k]);
    pthread_t tid;
    const bool threaded = pthread_create(&tid, NULL, fetch_run, &f[ATT_TILE_NARROW]) == 0;
    fetch_run(&f[ATT_TILE_WIDE]);
    if (threaded)
        pthread_join(tid, NULL);
    else
        fetch_run(&f[ATT_TILE_NARROW]);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        if (f[k].err != AT_OK) {
            e = f[k].err;
            if (diag != NULL)
                *diag = f[k].diag;
            goto out_kv;
        }
        if (f[k].compiled) {
            kv->compiles++;
            lc_note_compile(kv->lc);
        }
        kv->cur[k] = k;
        if ((e = load_slot(kv, k, k, &kv->plan.tile[k], f[k].img, diag)) != AT_OK)
            goto out_kv;
    }
    const size_t pool = kv->layer_half_bytes * 2 * m->num_layers;
    CUresult r = be->drv->cuMemAlloc(&kv->pool_d, pool);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) {
        e = at_diag_set(diag, AT_ERR_NOMEM, "KV pool of %zu MiB does not fit on cuda:%d",
                        pool >> 20, be->ordinal);
        goto out_kv;
    }
    if ((e = cu_check(be, r, "cuMemAlloc(pool)", __FILE__, __LINE__)) != AT_OK ||
        (e = CU(cuMemsetD8(kv->pool_d, 0, pool))) != AT_OK ||
        (e = CU(cuStreamCreate(&kv->stream, CU_STREAM_NON_BLOCKING))) != AT_OK ||
        (e = CU(cuStreamCreate(&kv->side, CU_STREAM_NON_BLOCKING))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_fork, CU_EVENT_DISABLE_TIMING))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_join, CU_EVENT_DISABLE_TIMING))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_begin, CU_EVENT_DEFAULT))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_end, CU_EVENT_DEFAULT))) != AT_OK)
        goto out_kv;
    if (m->alibi != NULL || m->sinks != NULL) {
        const size_t n = (size_t)m->num_query_heads * 4;
        float *h = calloc(2, n);
        if (h == NULL) {
            e = AT_ERR_NOMEM;
            goto out_kv;
        }
        if (m->alibi != NULL)
            memcpy(h, m->alibi, n);
        if (m->sinks != NULL)
            memcpy((uint8_t *)h + n, m->sinks, n);
        if ((e = CU(cuMemAlloc(&kv->consts_d, 2 * n))) == AT_OK)
            e = CU(cuMemcpyHtoD(kv->consts_d, h, 2 * n));
        free(h);
        if (e != AT_OK)
            goto out_kv;
    }
    *out = kv;
    return AT_OK;
out_kv:
    cuda_kv_destroy(base, &kv);
    return e;
}

static at_err_t cuda_read_kv(att_backend_t *base, att_kv_t *kv, uint32_t layer,
                             const uint32_t *blocks, uint32_t pos, uint32_t n, void *k_out,
                             void *v_out) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK || n == 0)
        return e;
    const att_model_t *m = kv->m;
    const uint32_t bs = m->block_size, b0 = pos / bs, b1 = (pos + n - 1) / bs;
    const size_t row = (size_t)m->head_dim * att_dtype_bytes(m->dtype);
    const size_t block_bytes = row * bs * m->num_kv_heads; /* one block of one half */
    const size_t nb = b1 - b0 + 1;
    if ((e = ensure_io(kv, 0, 2 * nb * block_bytes)) != AT_OK)
        return e;
    const CUdeviceptr kd = kv->pool_d + 2 * (uint64_t)layer * kv->layer_half_bytes;
    for (size_t i = 0; i < nb; i++) {
        const CUdeviceptr src = kd + (uint64_t)blocks[b0 + i] * block_bytes;
        if ((e = CU(cuMemcpyDtoHAsync(kv->stage_h + 2 * i * block_bytes, src, block_bytes,
                                      kv->stream))) != AT_OK ||
            (e = CU(cuMemcpyDtoHAsync(kv->stage_h + (2 * i + 1) * block_bytes,
                                      src + kv->layer_half_bytes, block_bytes, kv->stream))) !=
                AT_OK)
            return e;
    }
    if ((e = CU(cuStreamSynchronize(kv->stream))) != AT_OK)
        return e;
    for (uint32_t t = 0; t < n; t++) {
        const uint32_t p = pos + t, bi = p / bs - b0;
        for (uint32_t h = 0; h < m->num_kv_heads; h++) {
            const size_t src = ((size_t)h * bs + p % bs) * row;
            const size_t dst = ((size_t)t * m->num_kv_heads + h) * row;
            memcpy((uint8_t *)k_out + dst, kv->stage_h + 2 * bi * block_bytes + src, row);
            memcpy((uint8_t *)v_out + dst, kv->stage_h + (2 * bi + 1) * block_bytes + src, row);
        }
    }
    return AT_OK;
}

static void cuda_kv_stats(att_backend_t *base, const att_kv_t *kv, att_kv_stats_t *out) {
    (void)base;
    lc_stats_t s;
    lc_get_stats(kv->lc, &s);
    out->lc_hits = s.hits;
    out->lc_misses = s.misses;
    out->compiles = s.compiles;
    out->launches = s.launches;
    out->launch_host_ns = s.launch_host_ns;
    out->last_host_ns = kv->last_host_ns;
    out->last_device_ns = kv->last_device_ns;
}

static at_err_t cuda_register_host(att_backend_t *base, void *p, size_t bytes) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    pthread_mutex_lock(&be->reg_mu);
    if (be->num_regions == MAX_REGIONS)
        e = AT_ERR_INTERNAL;
    else if ((e = CU(cuMemHostRegister(p, bytes, CU_MEMHOSTREGISTER_PORTABLE))) == AT_OK)
        be->regions[be->num_regions++] = (region_t){(uintptr_t)p, (uintptr_t)p + bytes};
    pthread_mutex_unlock(&be->reg_mu);
    return e;
}

static void cuda_destroy(att_backend_t *base) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    compilers_stop(be);
    if (!atomic_load_explicit(&be->lost, memory_order_relaxed) &&
        be->drv->cuCtxSetCurrent(be->ctx) == CUDA_SUCCESS)
        for (uint32_t i = 0; i < be->num_regions; i++)
            (void)CU(cuMemHostUnregister((void *)be->regions[i].begin));
    (void)CU(cuDevicePrimaryCtxRelease(be->dev));
    att_jit_destroy(&be->jit);
    pthread_mutex_destroy(&be->reg_mu);
    pthread_mutex_destroy(&be->comp_mu);
    pthread_cond_destroy(&be->comp_cv);
    free(be);
}

static const att_backend_ops_t cuda_ops = {
    .name = "cuda",
    .kv_create = cuda_kv_create,
    .kv_destroy = cuda_kv_destroy,
    .run = cuda_run,
    .read_kv = cuda_read_kv,
    .destroy = cuda_destroy,
    .kv_stats = cuda_kv_stats,
    .register_host = cuda_register_host,
    .tuning_space = &tun_space_cuda_unified,
    .set_tuning = cuda_set_tuning,
    .prepare_tuning = cuda_prepare_tuning,
    .kv_timing = cuda_kv_timing,
};

int att_cuda_device_count(at_diag_t *diag) {
    const att_cudrv_t *drv;
    int n = 0;
    if (att_cudrv_cuda(&drv, diag) != AT_OK)
        return 0;
    if (drv->cuDeviceGetCount(&n) != CUDA_SUCCESS) {
        at_diag_set(diag, AT_ERR_DEVICE, "cuDeviceGetCount failed");
        return 0;
    }
    return n;
}

at_err_t att_cuda_create(const att_cuda_cfg_t *cfg, at_diag_t *diag, att_backend_t **out) {
    const att_cudrv_t *drv;
    at_err_t e = att_cudrv_cuda(&drv, diag);
    if (e != AT_OK)
        return e;
    int count = 0;
    if (drv->cuDeviceGetCount(&count) != CUDA_SUCCESS || cfg->device < 0 || cfg->device >= count)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED, "no device cuda:%d (the driver sees %d)",
                           cfg->device, count);
    cuda_backend_t *be = calloc(1, sizeof *be);
    if (be == NULL)
        return AT_ERR_NOMEM;
    be->base.ops = &cuda_ops;
    be->drv = drv;
    be->ordinal = cfg->device;
    be->timing = cfg->timing;
    if (cfg->plan != NULL) {
        be->has_plan = true;
        be->plan = *cfg->plan;
    }
    pthread_mutex_init(&be->reg_mu, NULL);
    pthread_mutex_init(&be->comp_mu, NULL);
    pthread_cond_init(&be->comp_cv, NULL);
    be->n_compilers = cfg->compile_threads == 0 ? 1
                      : cfg->compile_threads > MAX_COMPILERS ? MAX_COMPILERS
                                                             : cfg->compile_threads;
    int major = 0, minor = 0, sms = 0, optin = 0;
    char name[128] = "";
    if ((e = CU(cuDeviceGet(&be->dev, cfg->device))) != AT_OK ||
        (e = CU(cuDeviceGetName(name, (int)sizeof name, be->dev))) != AT_OK ||
        (e = CU(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                     be->dev))) != AT_OK ||
        (e = CU(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                     be->dev))) != AT_OK ||
        (e = CU(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, be->dev))) !=
            AT_OK ||
        (e = CU(cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                                     be->dev))) != AT_OK) {
        pthread_mutex_destroy(&be->reg_mu);
        pthread_mutex_destroy(&be->comp_mu);
        pthread_cond_destroy(&be->comp_cv);
        free(be);
        return at_diag_set(diag, e, "cuda:%d: cannot query the device", cfg->device);
    }
    if (major < 8) {
        pthread_mutex_destroy(&be->reg_mu);
        pthread_mutex_destroy(&be->comp_mu);
        pthread_cond_destroy(&be->comp_cv);
        free(be);
        return at_diag_set(diag, AT_ERR_UNSUPPORTED,
                           "cuda:%d is %s, compute capability %d.%d; the kernels need 8.0 or later",
                           cfg->device, name, major, minor);
    }
    if ((e = CU(cuDevicePrimaryCtxRetain(&be->ctx, be->dev))) != AT_OK) {
        pthread_mutex_destroy(&be->reg_mu);
        pthread_mutex_destroy(&be->comp_mu);
        pthread_cond_destroy(&be->comp_cv);
        free(be);
        return at_diag_set(diag, e, "cuda:%d: cannot retain its context", cfg->device);
    }
    be->num_sms = (uint32_t)sms;
    snprintf(be->name, sizeof be->name, "%s", name);
    be->smem_optin = (uint32_t)optin;
    snprintf(be->arch, sizeof be->arch, "sm_%d%d", major, minor);
    snprintf(be->desc, sizeof be->desc, "%s (%s, %d SMs, driver %d.%d)", name, be->arch, sms,
             drv->driver_version / 1000, drv->driver_version % 1000 / 10);
    char dir[512];
    if (cfg->kernel_cache_dir != NULL)
        snprintf(dir, sizeof dir, "%s", cfg->kernel_cache_dir);
    else
        att_jit_default_dir(dir, sizeof dir);
    if ((e = att_jit_create(dir, diag, &be->jit)) != AT_OK) {
        cuda_destroy(&be->base);
        return e;
    }
    *out = &be->base;
    return AT_OK;
}

const char *att_cuda_describe(const att_backend_t *be) {
    return ((const cuda_backend_t *)be)->desc;
}

const char *att_cuda_arch(const att_backend_t *be) { return ((const cuda_backend_t *)be)->arch; }

bool att_cuda_lost(const att_backend_t *base) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    return atomic_load_explicit(&be->lost, memory_order_relaxed) != 0;
}

void att_cuda_jit_stats(const att_backend_t *be, att_jit_stats_t *out) {
    att_jit_get_stats(((const cuda_backend_t *)be)->jit, out);
}

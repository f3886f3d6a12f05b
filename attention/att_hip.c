/* The HIP backend (see att_hip.h): att_cuda.c's design on the HIP runtime, function for
 * function, so a reader sees one design twice. What differs: device addresses are hipDeviceptr_t
 * (void *) at the runtime's edge and uint64_t inside, as the kernels take them; the device is
 * made current with hipSetDevice (HIP has no context to retain); the modules are built by hiprtc
 * with ATT_PORTABLE_MATH and the device's wave size (att_hip_model_opts); the plan's tiles suit
 * the portable FMA body (att_hip_plan_default).
 *
 * Thread model: the backend's fields are set at creation and read-only afterwards, except `lost`
 * (atomic: set once by whichever thread sees a sticky fault; relaxed is enough, since it only
 * makes later calls fail early and carries no data), the registered host regions and the
 * compile queue (each with its own mutex).
 * A session's att_kv_t is used by one thread at a time (att_ctx's caller). Every entry point
 * makes the device current on its thread first.
 *
 * A run, on the session's stream: one upload of the metadata (chunks, the table entries the
 * session's device-resident block tables lack, items, merges), one upload per tensor (from pinned
 * staging, or straight from registered memory), the attention launches (one per tile kind, whose
 * split tiles merge themselves; with both kinds, the wide ones on the session's side stream,
 * forked and joined by events), one download of out; then the stream is synchronized and out
 * copied into place. Tiles and thresholds come from the session's plan: att_hip_plan_default at
 * creation, then whatever set_tuning chose from tun_space_hip_unified.
 *
 * Tuning is att_cuda.c's: compiles never run on a call's path (set_tuning answers
 * AT_ERR_NOT_READY and queues them on the backend's compile threads), a session keeps up to
 * ATT_GPU_MOD_SLOTS loaded modules and its prepared launches are keyed by slot; the compile
 * queue and the slot table are att_gpu_tune.c's, the module loads and unloads are here. */
#include "attention/att_hip.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention/att_gpu_plan.h"
#include "attention/att_gpu_run.h"
#include "attention/att_gpu_tune.h"
#include "attention/att_hiprt.h"
#include "attention/att_kparams.h"
#include "attention/att_tune.h"
#include "cache/lc.h"
#include "common/at_base.h"
#include "common/at_log.h"

typedef struct hip_backend {
    att_backend_t base;
    const att_hiprt_t *rt; /* borrowed: the process-wide table (att_hiprt_hip), never freed */
    int ordinal;
    uint32_t num_sms;   /* compute units */
    uint32_t smem_max;  /* shared memory (LDS) a block may use, bytes */
    uint32_t wave;      /* threads per wave: 64 on CDNA */
    char arch[64];      /* the compile target: gcnArchName, "gfx90a:sramecc+:xnack-" */
    char arch_base[16]; /* the architecture alone, "gfx90a": tuning keys */
    char name[128];
    char desc[512];
    bool timing;
    bool has_plan;
    att_cuda_plan_t plan; /* overrides of att_hip_cfg_t.plan (has_plan) */
    att_jit_t *jit;       /* owned */
    atomic_int lost;
    att_gpu_cq_t cq;        /* tuning candidates' compiles; initialized once jit exists */
    att_gpu_regions_t regs; /* host memory registered for DMA */
} hip_backend_t;

struct att_kv {
    hip_backend_t *be;    /* borrowed: the backend outlives its sessions */
    const att_model_t *m; /* borrowed: outlives the storage */
    uint32_t num_blocks;
    size_t layer_half_bytes;
    uint64_t pool_d;      /* [num_layers][k|v][num_blocks][Hkv][BS][D] */
    uint64_t consts_d;    /* [Hq] f32 ALiBi slopes, then [Hq] f32 sinks */
    att_cuda_plan_t plan; /* tiles and split thresholds of the current config */
    hipStream_t stream;
    /* A mixed batch's wide tiles run on `side`, forked from and joined back into `stream`, so
     * they overlap the narrow (decode) tiles instead of following them. */
    hipStream_t side;
    hipEvent_t ev_fork, ev_join;
    hipStream_t cur; /* the stream launch_cb launches on */
    hipEvent_t ev_begin, ev_end;
    att_gpu_mods_t mods; /* the loaded tile modules, each kind's current one */
    bool timing;         /* record device time even when the backend's timing is off */
    lc_t *lc;            /* owned: this session's launch cache */
    uint64_t uploads; /* host-to-device copy calls (kv_stats) */
    uint64_t last_host_ns, last_device_ns;
    /* per-call buffers, grown when a call needs more (never per call) */
    uint64_t io_d; /* [meta | q | k | v | out | parts] of the current call */
    size_t io_cap;
    uint8_t *stage_h; /* pinned, [meta | q | k | v | out] */
    size_t stage_cap;
    uint64_t counters_d; /* [counters_cap] uint32 arrivals of split parts, zero between calls */
    size_t counters_cap;
    uint64_t tables_d;   /* [tables_cap] uint32: the sequences' block tables (att_gpu_tables_t) */
    uint32_t tables_cap;
    att_gpu_tables_t tables;
    att_gpu_work_t work;
};

/* The one place a hipError_t becomes an at_err_t: log file:line, the call and the runtime's name
 * for the error; a sticky fault marks the backend lost. */
static at_err_t hip_check(hip_backend_t *be, hipError_t r, const char *call, const char *file,
                          int line) {
    if (r == hipSuccess)
        return AT_OK;
    at_log(AT_LOG_ERROR, "hip", "%s:%d: %s: %s", file, line, call, att_hiprt_err_name(be->rt, r));
    if (att_hiprt_err_sticky(r) && !atomic_exchange_explicit(&be->lost, 1, memory_order_relaxed))
        at_log(AT_LOG_ERROR, "hip",
               "hip:%d is lost after a device fault; its sessions fail "
               "until the process restarts",
               be->ordinal);
    return AT_ERR_DEVICE;
}

#define HIP(call) hip_check(be, be->rt->call, #call, __FILE__, __LINE__)

/* A device address as the runtime takes it. */
static hipDeviceptr_t dptr(uint64_t a) { return (hipDeviceptr_t)(uintptr_t)a; }

static at_err_t enter(hip_backend_t *be) {
    if (atomic_load_explicit(&be->lost, memory_order_relaxed))
        return AT_ERR_DEVICE;
    return HIP(hipSetDevice(be->ordinal));
}

/* ---- launches ---- */

static at_err_t launch_cb(void *user, const lc_launch_t *l, uint32_t grid_x, void *params) {
    att_kv_t *kv = user;
    hip_backend_t *be = kv->be;
    void *args[] = {params};
    return HIP(hipModuleLaunchKernel((hipFunction_t)l->fn, grid_x, 1, 1, l->block_x, 1, 1,
                                     l->smem_bytes, kv->cur, args, NULL));
}

/* The prepared launch of (kernel, kind's current module, split) (att_gpu_tune.c). */
static at_err_t prepared(att_kv_t *kv, uint32_t kernel, uint32_t kind, uint32_t split,
                         const lc_launch_t **out) {
    return att_gpu_mods_prepared(&kv->mods, kv->m, kv->consts_d, kv->num_blocks, kernel, kind,
                                 split, out);
}

/* ---- planning: the session's configuration (each call's work: att_gpu_plan.c) ---- */

/* Keys per stage and stages: the tensor-core body's knobs, unused by the FMA body; fixed so one
 * (rows, waves) is one image. 64 is a multiple of every warps_n up to 16 (the kernel's
 * static_assert), and the split parts' boundaries are multiples of it. */
#define HIP_TILE_K 64u
#define HIP_STAGES 2u

void att_hip_plan_from_cfg(const tun_cfg_t *c, att_cuda_plan_t *out) {
    const uint32_t *v = c->v;
    memset(out, 0, sizeof *out);
    att_tile_t *w = &out->tile[ATT_TILE_WIDE];
    (void)tun_hip_tile(v[TUN_HIP_WIDE_ROWS], v[TUN_HIP_WIDE_WAVES], &w->warps_m, &w->warp_mt,
                       &w->warps_n); /* valid configs have a tile */
    w->tile_k = HIP_TILE_K;
    w->stages = HIP_STAGES;
    out->tile[ATT_TILE_NARROW] = (att_tile_t){.warps_m = 1,
                                              .warp_mt = 1,
                                              .warps_n = v[TUN_HIP_NARROW_WAVES],
                                              .tile_k = HIP_TILE_K,
                                              .stages = HIP_STAGES};
    att_gpu_plan_knobs(out, v[TUN_HIP_SPLIT_MIN_KEYS], v[TUN_HIP_BLOCKS_PER_SM],
                       v[TUN_HIP_MIXED_SPLIT_KEYS], v[TUN_HIP_MIXED_ORDER]);
}

void att_hip_plan_default(const att_model_t *m, att_cuda_plan_t *out) {
    tun_shape_t s;
    att_tune_shape(m, &s);
    const tun_device_t d = {.backend = "hip"};
    const tun_bucket_t any = {0};
    tun_cfg_t h;
    tun_space_hip_unified.heuristic(&s, &d, &any, &h);
    att_hip_plan_from_cfg(&h, out);
}

/* The session's plan: the default, with the backend's overrides. */
static void session_plan(const hip_backend_t *be, const att_model_t *m, att_cuda_plan_t *out) {
    att_hip_plan_default(m, out);
    if (be->has_plan)
        att_gpu_plan_override(out, &be->plan);
}

/* ---- buffers ---- */

static at_err_t ensure_io(att_kv_t *kv, size_t dev_bytes, size_t stage_bytes) {
    hip_backend_t *be = kv->be;
    at_err_t e;
    if (dev_bytes > kv->io_cap) {
        size_t cap = att_gpu_align_up(dev_bytes + dev_bytes / 2, 1u << 20);
        if (kv->io_d != 0 && (e = HIP(hipFree(dptr(kv->io_d)))) != AT_OK)
            return e;
        kv->io_d = 0;
        kv->io_cap = 0;
        void *d = NULL;
        if ((e = HIP(hipMalloc(&d, cap))) != AT_OK)
            return e;
        kv->io_d = (uintptr_t)d;
        kv->io_cap = cap;
    }
    if (stage_bytes > kv->stage_cap) {
        size_t cap = att_gpu_align_up(stage_bytes + stage_bytes / 2, 1u << 20);
        if (kv->stage_h != NULL && (e = HIP(hipHostFree(kv->stage_h))) != AT_OK)
            return e;
        kv->stage_h = NULL;
        kv->stage_cap = 0;
        void *p = NULL;
        if ((e = HIP(hipHostMalloc(&p, cap, hipHostMallocDefault))) != AT_OK)
            return e;
        kv->stage_h = p;
        kv->stage_cap = cap;
    }
    return AT_OK;
}

/* Room for n split arrival counters. New counters are zeroed before any later launch can run
 * (the kernels keep them zero from then on); the old ones were zero and are freed. */
static at_err_t ensure_counters(att_kv_t *kv, size_t n) {
    hip_backend_t *be = kv->be;
    if (n <= kv->counters_cap)
        return AT_OK;
    const size_t cap = n + n / 2 > 1024 ? n + n / 2 : 1024;
    at_err_t e;
    if (kv->counters_d != 0 && (e = HIP(hipFree(dptr(kv->counters_d)))) != AT_OK)
        return e;
    kv->counters_d = 0;
    kv->counters_cap = 0;
    void *d = NULL;
    if ((e = HIP(hipMalloc(&d, cap * 4))) != AT_OK)
        return e;
    kv->counters_d = (uintptr_t)d;
    if ((e = HIP(hipMemsetD8(dptr(kv->counters_d), 0, cap * 4))) != AT_OK ||
        (e = HIP(hipStreamSynchronize(NULL))) != AT_OK)
        return e;
    kv->counters_cap = cap;
    return AT_OK;
}

/* The session's att_gpu_arena_fn: a table arena of `entries` entries in place of the old one. */
static at_err_t replace_tables(void *user, uint32_t entries) {
    att_kv_t *kv = user;
    hip_backend_t *be = kv->be;
    at_err_t e;
    if (kv->tables_d != 0 && (e = HIP(hipFree(dptr(kv->tables_d)))) != AT_OK)
        return e;
    kv->tables_d = 0;
    void *d = NULL;
    if ((e = HIP(hipMalloc(&d, (size_t)entries * 4))) != AT_OK)
        return e;
    kv->tables_d = (uintptr_t)d;
    return AT_OK;
}

/* Moves one tensor of the batch between host and device region dev_off (row_bytes per token).
 * Runs of chunks whose host rows are adjacent become one copy. Registered memory is copied
 * directly; other runs go through the stage at stage_off (same offsets): gathered before the
 * upload, or scattered by att_gpu_finish_out once the stream is synchronized (*staged tells). */
static at_err_t move_tensor(att_kv_t *kv, const att_batch_t *b, int which, size_t row_bytes,
                            size_t dev_off, size_t stage_off, bool *staged) {
    hip_backend_t *be = kv->be;
    const bool up = which != 3;
    *staged = false;
    for (uint32_t c = 0; c < b->num_chunks;) {
        const uint8_t *p;
        size_t n, off;
        const uint32_t d = att_gpu_tensor_run(b, which, row_bytes, c, &p, &n, &off);
        const uint64_t dev = kv->io_d + dev_off + off;
        uint8_t *st = kv->stage_h + stage_off + off;
        const bool direct = att_gpu_regions_contain(&be->regs, p, n);
        at_err_t e;
        if (up) {
            if (!direct)
                memcpy(st, p, n);
            e = HIP(hipMemcpyHtoDAsync(dptr(dev), direct ? (void *)p : st, n, kv->stream));
            kv->uploads++;
        } else {
            e = HIP(hipMemcpyDtoHAsync(direct ? (void *)p : st, dptr(dev), n, kv->stream));
        }
        if (e != AT_OK)
            return e;
        *staged |= !direct;
        c = d;
    }
    return AT_OK;
}

/* ---- run ---- */

static at_err_t hip_run(att_backend_t *base, att_kv_t *kv, const att_batch_t *b) {
    hip_backend_t *be = (hip_backend_t *)base;
    const uint64_t t0 = att_gpu_now_ns();
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    const att_model_t *m = kv->m;
    const size_t es = att_dtype_bytes(m->dtype);
    const size_t q_row = (size_t)m->num_query_heads * m->head_dim * es;
    const size_t kv_row = (size_t)m->num_kv_heads * m->head_dim * es;

    att_gpu_counts_t pl;
    memset(&pl, 0, sizeof pl);
    uint32_t tile_rows[ATT_TILE_KINDS], tile_keys[ATT_TILE_KINDS], occ[ATT_TILE_KINDS];
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        tile_rows[k] = att_gpu_mods_cur(&kv->mods, k)->info[ATT_KINFO_TILE_ROWS];
        tile_keys[k] = att_gpu_mods_cur(&kv->mods, k)->info[ATT_KINFO_TILE_KEYS];
        occ[k] = att_gpu_mods_cur(&kv->mods, k)->occupancy;
    }
    /* NULL: HIP has no green contexts, so mixed_wide_sms is ignored and every kind has every CU */
    if (b->attend && (e = att_gpu_plan_batch(&kv->work, m, &kv->plan, tile_rows, tile_keys,
                                             be->num_sms, NULL, occ, b, &pl)) != AT_OK)
        return e;
    if ((e = att_gpu_tables_place(&kv->tables, b, m->block_size,
                                  att_gpu_tables_keep_tokens(m, b, tile_rows[ATT_TILE_NARROW]),
                                  &kv->tables_cap, replace_tables, kv)) != AT_OK)
        return e;
    att_gpu_layout_t lo;
    att_gpu_layout(m, b, &pl, tile_rows, kv->tables.new_entries, &lo);
    if ((e = ensure_io(kv, lo.end, lo.stage_end)) != AT_OK ||
        (e = ensure_counters(kv, (size_t)pl.total_merges * m->num_kv_heads)) != AT_OK)
        return e;
    att_gpu_fill_meta(kv->stage_h, &lo, b, &kv->tables, &kv->work, &pl);
    kv->uploads++;
    if ((e = HIP(hipMemcpyHtoDAsync(dptr(kv->io_d), kv->stage_h, lo.meta_end, kv->stream))) !=
        AT_OK)
        goto out_drain;
    bool staged;
    if ((b->attend && (e = move_tensor(kv, b, 0, q_row, lo.o_q, lo.o_q, &staged)) != AT_OK) ||
        (e = move_tensor(kv, b, 1, kv_row, lo.o_k, lo.o_k, &staged)) != AT_OK ||
        (e = move_tensor(kv, b, 2, kv_row, lo.o_v, lo.o_v, &staged)) != AT_OK)
        goto out_drain;

    if ((be->timing || kv->timing) && (e = HIP(hipEventRecord(kv->ev_begin, kv->stream))) != AT_OK)
        goto out_drain;
    att_kparams_t p;
    att_gpu_run_params(m, b, &lo, kv->io_d, kv->tables_d, kv->pool_d, kv->layer_half_bytes, &p);
    p.counters_d = kv->counters_d;
    kv->cur = kv->stream;
    if (b->attend) {
        /* Both kinds: the wide tiles (bound by arithmetic) run on the side stream, concurrent
         * with the narrow ones (decode, bound by memory), in the plan's launch order; the side
         * stream is joined back before out is read. */
        const bool fork = pl.num_items[ATT_TILE_NARROW] != 0 && pl.num_items[ATT_TILE_WIDE] != 0;
        if (fork && ((e = HIP(hipEventRecord(kv->ev_fork, kv->stream))) != AT_OK ||
                     (e = HIP(hipStreamWaitEvent(kv->side, kv->ev_fork, 0))) != AT_OK))
            goto out_drain;
        for (uint32_t i = 0; i < ATT_TILE_KINDS; i++) {
            const uint32_t k = att_gpu_launch_order(&kv->plan, i);
            kv->cur = fork && k == ATT_TILE_WIDE ? kv->side : kv->stream;
            if ((e = att_gpu_launch_kind(kv->lc, prepared, kv, &p, &pl, &lo, kv->io_d, k, 0, 0)) !=
                AT_OK)
                goto out_drain;
        }
        kv->cur = kv->stream;
        if (fork && ((e = HIP(hipEventRecord(kv->ev_join, kv->side))) != AT_OK ||
                     (e = HIP(hipStreamWaitEvent(kv->stream, kv->ev_join, 0))) != AT_OK))
            goto out_drain;
    } else {
        if ((e = att_gpu_launch_kv_write(kv->lc, prepared, kv, &p, b->num_chunks)) != AT_OK)
            goto out_drain;
    }
    att_gpu_tables_commit(&kv->tables, b);
    if ((be->timing || kv->timing) && (e = HIP(hipEventRecord(kv->ev_end, kv->stream))) != AT_OK)
        goto out_drain;
    kv->last_host_ns = att_gpu_now_ns() - t0;
    bool out_staged = false;
    if (b->attend && (e = move_tensor(kv, b, 3, q_row, lo.o_out, lo.o_out, &out_staged)) != AT_OK)
        goto out_drain;
    if ((e = HIP(hipStreamSynchronize(kv->stream))) != AT_OK)
        goto out_drain;
    if (out_staged)
        att_gpu_finish_out(b, q_row, kv->stage_h + lo.o_out, &be->regs);
    if (be->timing || kv->timing) {
        float ms = 0.0f;
        if ((e = HIP(hipEventElapsedTime(&ms, kv->ev_begin, kv->ev_end))) != AT_OK)
            return e;
        kv->last_device_ns = (uint64_t)((double)ms * 1e6);
    }
    return AT_OK;
out_drain:
    /* Copies or kernels of this call may be queued ahead of the failed step: wait for them before
     * the caller reuses the stage, the io buffers or the arena regions they read and write. The
     * results are not checked: e already says why the call failed. */
    (void)be->rt->hipStreamSynchronize(kv->side);
    (void)be->rt->hipStreamSynchronize(kv->stream);
    return e;
}

/* ---- sessions ---- */

/* A loaded module and the image it was loaded from, kept until the module is unloaded: ROCm's
 * runtime may refer to the caller's image after hipModuleLoadData instead of copying it (its
 * code object's host address, for debuggers and profilers), and att_jit's images are the
 * caller's to free. ms->mod points to one. */
typedef struct hip_mod {
    hipModule_t mod;
    void *image; /* owned */
} hip_mod_t;

/* Loads img as the module of ms->kind with ms->tile (the session's att_gpu_loader_t). */
static at_err_t load_mod(att_kv_t *kv, const void *img, size_t bytes, att_gpu_mod_t *ms,
                         at_diag_t *diag) {
    hip_backend_t *be = kv->be;
    hip_mod_t *hm = malloc(sizeof *hm);
    void *copy = malloc(bytes);
    if (hm == NULL || copy == NULL) {
        free(hm);
        free(copy);
        return AT_ERR_NOMEM;
    }
    memcpy(copy, img, bytes);
    hipModule_t mod;
    hipFunction_t f_attend, f_kv_write;
    at_err_t e;
    if ((e = HIP(hipModuleLoadData(&mod, copy))) != AT_OK) {
        free(hm);
        free(copy);
        return at_diag_set(diag, e, "hipModuleLoadData failed");
    }
    hipDeviceptr_t info_d;
    size_t info_n;
    if ((e = HIP(hipModuleGetFunction(&f_attend, mod, "att_k_attend"))) != AT_OK ||
        (e = HIP(hipModuleGetFunction(&f_kv_write, mod, "att_k_kv_write"))) != AT_OK ||
        (e = HIP(hipModuleGetGlobal(&info_d, &info_n, mod, "att_k_info"))) != AT_OK) {
        e = at_diag_set(diag, e, "kernel module lacks an entry point");
        goto out_unload;
    }
    if (info_n != sizeof ms->info) {
        e = at_diag_set(diag, AT_ERR_INTERNAL, "att_k_info has %zu bytes", info_n);
        goto out_unload;
    }
    if ((e = HIP(hipMemcpyDtoH(ms->info, info_d, info_n))) != AT_OK)
        goto out_unload;
    const uint32_t smem = ms->info[ATT_KINFO_SMEM_BYTES];
    if (smem > be->smem_max) {
        e = at_diag_set(diag, AT_ERR_UNSUPPORTED,
                        "head_dim %u needs %u bytes of shared memory per block; %s allows %u",
                        kv->m->head_dim, smem, be->arch, be->smem_max);
        goto out_unload;
    }
    int occ = 0;
    if ((e = HIP(hipModuleOccupancyMaxActiveBlocksPerMultiprocessor(
             &occ, f_attend, (int)ms->info[ATT_KINFO_THREADS], smem))) != AT_OK)
        goto out_unload;
    ms->occupancy = occ > 0 ? (uint32_t)occ : 1;
    *hm = (hip_mod_t){mod, copy};
    ms->mod = hm;
    ms->f_attend = f_attend;
    ms->f_kv_write = f_kv_write;
    return AT_OK;
out_unload:
    (void)HIP(hipModuleUnload(mod));
    free(hm);
    free(copy);
    return e;
}

static void unload_mod(att_kv_t *kv, void *mod) {
    hip_backend_t *be = kv->be;
    hip_mod_t *hm = mod;
    (void)HIP(hipModuleUnload(hm->mod));
    free(hm->image);
    free(hm);
}

/* A module of a device that is gone: the runtime is not asked to unload it. Its image goes too:
 * nothing runs on a device after a sticky fault, and every call to it fails. */
static void forget_mod(att_kv_t *kv, void *mod) {
    (void)kv;
    hip_mod_t *hm = mod;
    free(hm->image);
    free(hm);
}

static const att_gpu_loader_t hip_loader = {
    .load = load_mod, .unload = unload_mod, .forget = forget_mod};

/* hiprtc's options of a tile with the device's wave (the compile queue's att_gpu_opts_fn). */
static void hip_opts(const void *user, const att_model_t *m, const att_tile_t *t,
                     att_jit_opts_t *o) {
    const hip_backend_t *be = user;
    att_hip_model_opts(m, t, be->wave, o);
}

/* ---- tuning ---- */

static void hip_tun_device(const hip_backend_t *be, tun_device_t *d) {
    memset(d, 0, sizeof *d);
    snprintf(d->backend, sizeof d->backend, "hip");
    snprintf(d->name, sizeof d->name, "%s", be->name);
    snprintf(d->arch, sizeof d->arch, "%s", be->arch_base);
    const int v = be->rt->runtime_version;
    snprintf(d->driver, sizeof d->driver, "%d.%d.%d", v / 10000000, v / 100000 % 100,
             v % 100000);
    snprintf(d->compiler, sizeof d->compiler, "hiprtc %d.%d", be->rt->rtc_major,
             be->rt->rtc_minor);
    d->threads = be->num_sms;
    d->smem_bytes = be->smem_max;
}

void att_hip_tune_device(const att_backend_t *base, tun_device_t *d, const char **kernel_hash) {
    hip_tun_device((const hip_backend_t *)base, d);
    *kernel_hash = att_jit_kernel_hash();
}

static at_err_t hip_set_tuning(att_backend_t *base, att_kv_t *kv, const tun_cfg_t *cfg) {
    hip_backend_t *be = (hip_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    tun_device_t d;
    att_cuda_plan_t plan;
    hip_tun_device(be, &d);
    session_plan(be, kv->m, &plan);
    return att_gpu_set_tuning(&kv->mods, &be->cq, &tun_space_hip_unified, &d, kv->m, cfg,
                              att_hip_plan_from_cfg, &plan, &kv->plan);
}

static at_err_t hip_prepare_tuning(att_backend_t *base, const att_model_t *m,
                                   const tun_cfg_t *cfgs, uint32_t n, bool wait) {
    hip_backend_t *be = (hip_backend_t *)base;
    return att_gpu_cq_prepare(&be->cq, m, att_hip_plan_from_cfg, cfgs, n, wait);
}

static void hip_kv_timing(att_backend_t *base, att_kv_t *kv, bool on) {
    (void)base;
    kv->timing = on;
}

static void hip_kv_destroy(att_backend_t *base, att_kv_t **kvp) {
    if (kvp == NULL || *kvp == NULL)
        return;
    hip_backend_t *be = (hip_backend_t *)base;
    att_kv_t *kv = *kvp;
    /* Teardown errors are logged by HIP and otherwise ignored: there is nothing left to undo.
     * After a sticky fault every call would fail (and log) the same error; the runtime frees the
     * device's resources with the process, so nothing is asked of it then. */
    if (!atomic_load_explicit(&be->lost, memory_order_relaxed) &&
        be->rt->hipSetDevice(be->ordinal) == hipSuccess) {
        if (kv->stream != NULL) {
            (void)HIP(hipStreamSynchronize(kv->stream));
            (void)HIP(hipStreamDestroy(kv->stream));
        }
        if (kv->side != NULL)
            (void)HIP(hipStreamDestroy(kv->side));
        if (kv->ev_fork != NULL)
            (void)HIP(hipEventDestroy(kv->ev_fork));
        if (kv->ev_join != NULL)
            (void)HIP(hipEventDestroy(kv->ev_join));
        if (kv->ev_begin != NULL)
            (void)HIP(hipEventDestroy(kv->ev_begin));
        if (kv->ev_end != NULL)
            (void)HIP(hipEventDestroy(kv->ev_end));
        att_gpu_mods_fini(&kv->mods);
        if (kv->pool_d != 0)
            (void)HIP(hipFree(dptr(kv->pool_d)));
        if (kv->consts_d != 0)
            (void)HIP(hipFree(dptr(kv->consts_d)));
        if (kv->io_d != 0)
            (void)HIP(hipFree(dptr(kv->io_d)));
        if (kv->counters_d != 0)
            (void)HIP(hipFree(dptr(kv->counters_d)));
        if (kv->tables_d != 0)
            (void)HIP(hipFree(dptr(kv->tables_d)));
        if (kv->stage_h != NULL)
            (void)HIP(hipHostFree(kv->stage_h));
    } else {
        att_gpu_mods_forget(&kv->mods);
    }
    lc_destroy(&kv->lc);
    att_gpu_work_fini(&kv->work);
    att_gpu_tables_fini(&kv->tables);
    free(kv);
    *kvp = NULL;
}

static at_err_t hip_kv_create(att_backend_t *base, const att_model_t *m, uint32_t num_blocks,
                              att_kv_t **out, at_diag_t *diag) {
    hip_backend_t *be = (hip_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return at_diag_set(diag, e, "hip:%d is lost", be->ordinal);
    att_kv_t *kv = calloc(1, sizeof *kv);
    if (kv == NULL)
        return AT_ERR_NOMEM;
    kv->be = be;
    kv->m = m;
    kv->num_blocks = num_blocks;
    kv->layer_half_bytes = (size_t)num_blocks * m->num_kv_heads * m->block_size * m->head_dim *
                           att_dtype_bytes(m->dtype);
    if ((e = lc_create(launch_cb, kv, &kv->lc)) != AT_OK)
        goto out_kv;
    att_gpu_mods_init(&kv->mods, &hip_loader, kv, kv->lc);
    session_plan(be, m, &kv->plan);
    /* the two kinds' images: from the compile cache, or compiled (concurrently) */
    att_gpu_fetch_t f[ATT_TILE_KINDS];
    memset(f, 0, sizeof f);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        att_gpu_cq_opts(&be->cq, m, &kv->plan.tile[k], &f[k].opts);
    att_gpu_fetch_images(be->jit, be->arch, f);
    for (uint32_t k = 0; k < ATT_TILE_KINDS && e == AT_OK; k++)
        e = att_gpu_mods_load_first(&kv->mods, k, &kv->plan.tile[k], &f[k], diag);
    att_gpu_fetch_release(f);
    if (e != AT_OK)
        goto out_kv;
    const size_t pool = kv->layer_half_bytes * 2 * m->num_layers;
    void *pool_p = NULL;
    hipError_t r = be->rt->hipMalloc(&pool_p, pool);
    if (r == hipErrorOutOfMemory) {
        e = at_diag_set(diag, AT_ERR_NOMEM, "KV pool of %zu MiB does not fit on hip:%d", pool >> 20,
                        be->ordinal);
        goto out_kv;
    }
    kv->pool_d = (uintptr_t)pool_p;
    if ((e = hip_check(be, r, "hipMalloc(pool)", __FILE__, __LINE__)) != AT_OK ||
        (e = HIP(hipMemsetD8(dptr(kv->pool_d), 0, pool))) != AT_OK ||
        /* done before the session's (non-blocking) streams can run anything */
        (e = HIP(hipStreamSynchronize(NULL))) != AT_OK ||
        (e = HIP(hipStreamCreateWithFlags(&kv->stream, hipStreamNonBlocking))) != AT_OK ||
        (e = HIP(hipStreamCreateWithFlags(&kv->side, hipStreamNonBlocking))) != AT_OK ||
        (e = HIP(hipEventCreateWithFlags(&kv->ev_fork, hipEventDisableTiming))) != AT_OK ||
        (e = HIP(hipEventCreateWithFlags(&kv->ev_join, hipEventDisableTiming))) != AT_OK ||
        (e = HIP(hipEventCreateWithFlags(&kv->ev_begin, hipEventDefault))) != AT_OK ||
        (e = HIP(hipEventCreateWithFlags(&kv->ev_end, hipEventDefault))) != AT_OK)
        goto out_kv;
    if ((e = replace_tables(kv, att_gpu_tables_initial(num_blocks))) != AT_OK)
        goto out_kv;
    kv->tables_cap = att_gpu_tables_initial(num_blocks);
    float *consts_h;
    size_t consts_n;
    if ((e = att_gpu_consts(m, &consts_h, &consts_n)) != AT_OK)
        goto out_kv;
    if (consts_h != NULL) {
        void *c = NULL;
        if ((e = HIP(hipMalloc(&c, consts_n))) == AT_OK) {
            kv->consts_d = (uintptr_t)c;
            e = HIP(hipMemcpyHtoD(dptr(kv->consts_d), consts_h, consts_n));
        }
        free(consts_h);
        if (e != AT_OK)
            goto out_kv;
    }
    *out = kv;
    return AT_OK;
out_kv:
    hip_kv_destroy(base, &kv);
    return e;
}

static at_err_t hip_read_kv(att_backend_t *base, att_kv_t *kv, uint32_t layer,
                            const uint32_t *blocks, uint32_t pos, uint32_t n, void *k_out,
                            void *v_out) {
    hip_backend_t *be = (hip_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK || n == 0)
        return e;
    const att_model_t *m = kv->m;
    uint32_t b0;
    size_t block_bytes;
    const size_t nb = att_gpu_kv_blocks(m, pos, n, &b0, &block_bytes);
    if ((e = ensure_io(kv, 0, 2 * nb * block_bytes)) != AT_OK)
        return e;
    const uint64_t kd = kv->pool_d + 2 * (uint64_t)layer * kv->layer_half_bytes;
    for (size_t i = 0; i < nb; i++) {
        const uint64_t src = kd + (uint64_t)blocks[b0 + i] * block_bytes;
        if ((e = HIP(hipMemcpyDtoHAsync(kv->stage_h + 2 * i * block_bytes, dptr(src), block_bytes,
                                        kv->stream))) != AT_OK ||
            (e = HIP(hipMemcpyDtoHAsync(kv->stage_h + (2 * i + 1) * block_bytes,
                                        dptr(src + kv->layer_half_bytes), block_bytes,
                                        kv->stream))) != AT_OK)
            return e;
    }
    if ((e = HIP(hipStreamSynchronize(kv->stream))) != AT_OK)
        return e;
    att_gpu_scatter_kv(m, kv->stage_h, block_bytes, pos, n, k_out, v_out);
    return AT_OK;
}

static void hip_kv_stats(att_backend_t *base, const att_kv_t *kv, att_kv_stats_t *out) {
    (void)base;
    att_gpu_kv_stats(kv->lc, kv->uploads, kv->last_host_ns, kv->last_device_ns, out);
}

static at_err_t pin(void *user, void *p, size_t bytes) {
    hip_backend_t *be = user;
    return HIP(hipHostRegister(p, bytes, hipHostRegisterPortable));
}

static at_err_t hip_register_host(att_backend_t *base, void *p, size_t bytes) {
    hip_backend_t *be = (hip_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    return att_gpu_regions_add(&be->regs, p, bytes, pin, be);
}

static void hip_destroy(att_backend_t *base) {
    hip_backend_t *be = (hip_backend_t *)base;
    att_gpu_cq_fini(&be->cq);
    if (!atomic_load_explicit(&be->lost, memory_order_relaxed) &&
        be->rt->hipSetDevice(be->ordinal) == hipSuccess)
        for (uint32_t i = 0; i < be->regs.n; i++)
            (void)HIP(hipHostUnregister((void *)be->regs.begin[i]));
    att_jit_destroy(&be->jit);
    att_gpu_regions_fini(&be->regs);
    free(be);
}

static const att_backend_ops_t hip_ops = {
    .name = "hip",
    .kv_create = hip_kv_create,
    .kv_destroy = hip_kv_destroy,
    .run = hip_run,
    .read_kv = hip_read_kv,
    .destroy = hip_destroy,
    .kv_stats = hip_kv_stats,
    .register_host = hip_register_host,
    .tuning_space = &tun_space_hip_unified,
    .set_tuning = hip_set_tuning,
    .prepare_tuning = hip_prepare_tuning,
    .kv_timing = hip_kv_timing,
};

/* ---- hiprtc: the compiler of att_jit's image cache ---- */

static at_err_t hiprtc_compile(void *user, const char *arch, const char *const *opts,
                               uint32_t n_opts, void **image, size_t *bytes, at_diag_t *diag) {
    const att_hiprt_t *rt = user;
    const char *all[ATT_JIT_MAX_OPTS + 1];
    char arch_opt[96];
    if (n_opts > ATT_JIT_MAX_OPTS)
        return at_diag_set(diag, AT_ERR_INTERNAL, "too many compile options");
    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=%s", arch);
    all[0] = arch_opt;
    memcpy(all + 1, opts, n_opts * sizeof *opts);
    att_jit_source_t src;
    att_jit_kernel_source(&src);
    hiprtcProgram prog;
    hiprtcResult r = rt->hiprtcCreateProgram(&prog, src.text, src.name, (int)src.num_headers,
                                             src.headers, src.header_names);
    if (r != HIPRTC_SUCCESS)
        return at_diag_set(diag, AT_ERR_INTERNAL, "hiprtcCreateProgram: %s",
                           rt->hiprtcGetErrorString(r));
    at_err_t e = AT_OK;
    r = rt->hiprtcCompileProgram(prog, (int)n_opts + 1, all);
    if (r != HIPRTC_SUCCESS) {
        size_t log_n = 0;
        char *log = NULL;
        if (rt->hiprtcGetProgramLogSize(prog, &log_n) != HIPRTC_SUCCESS || log_n == 0 ||
            (log = malloc(log_n)) == NULL || rt->hiprtcGetProgramLog(prog, log) != HIPRTC_SUCCESS) {
            free(log);
            log = NULL;
        }
        e = att_jit_compile_failed("hiprtc", arch, log, rt->hiprtcGetErrorString(r), diag);
        free(log);
        goto out_destroy;
    }
    size_t n = 0;
    if (rt->hiprtcGetCodeSize(prog, &n) != HIPRTC_SUCCESS || n == 0) {
        e = at_diag_set(diag, AT_ERR_INTERNAL, "hiprtc made no code object for %s", arch);
        goto out_destroy;
    }
    char *img = malloc(n);
    if (img == NULL) {
        e = AT_ERR_NOMEM;
        goto out_destroy;
    }
    if (rt->hiprtcGetCode(prog, img) != HIPRTC_SUCCESS) {
        free(img);
        e = at_diag_set(diag, AT_ERR_INTERNAL, "hiprtcGetCode failed");
        goto out_destroy;
    }
    *image = img;
    *bytes = n;
out_destroy:
    rt->hiprtcDestroyProgram(&prog);
    return e;
}

at_err_t att_hip_jit_create(const char *cache_dir, at_diag_t *diag, att_jit_t **out) {
    const att_hiprt_t *rt;
    at_err_t e = att_hiprt_rtc(&rt, diag);
    if (e != AT_OK)
        return e;
    char name[48];
    snprintf(name, sizeof name, "hiprtc %d.%d runtime %d", rt->rtc_major, rt->rtc_minor,
             rt->runtime_version);
    const att_jit_compiler_t cc = {
        .name = name, .image_ext = "hsaco", .compile = hiprtc_compile, .user = (void *)rt};
    return att_jit_create_with(&cc, cache_dir, diag, out);
}

void att_hip_model_opts(const att_model_t *m, const att_tile_t *t, uint32_t wave,
                        att_jit_opts_t *o) {
    o->n = 0;
    o->arch[0] = '\0'; /* the device's: the portable body builds for every target */
    att_jit_opt_add(o, "-std=c++17", 0);
    att_jit_opt_add(o, "-DATT_PORTABLE_MATH=1", 0);
    att_jit_opt_add(o, "-DATT_WAVE=%u", wave);
    att_jit_model_defines(m, t, o);
}

/* ---- the device ---- */

int att_hip_device_count(at_diag_t *diag) {
    const att_hiprt_t *rt;
    int n = 0;
    if (att_hiprt_hip(&rt, diag) != AT_OK)
        return 0;
    hipError_t r = rt->hipGetDeviceCount(&n);
    if (r == hipErrorNoDevice)
        at_diag_set(diag, AT_ERR_UNSUPPORTED, "the HIP runtime sees no AMD GPU");
    else if (r != hipSuccess)
        at_diag_set(diag, AT_ERR_DEVICE, "hipGetDeviceCount: %s", att_hiprt_err_name(rt, r));
    return r == hipSuccess ? n : 0;
}

/* Frees a backend that att_hip_create could not finish (before its jit exists). */
static at_err_t create_failed(hip_backend_t *be, at_err_t e) {
    att_gpu_regions_fini(&be->regs);
    free(be);
    return e;
}

at_err_t att_hip_create(const att_hip_cfg_t *cfg, at_diag_t *diag, att_backend_t **out) {
    const att_hiprt_t *rt;
    at_err_t e = att_hiprt_hip(&rt, diag);
    if (e != AT_OK)
        return e;
    int count = 0;
    if (rt->hipGetDeviceCount(&count) != hipSuccess || cfg->device < 0 || cfg->device >= count)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED, "no device hip:%d (the runtime sees %d)",
                           cfg->device, count);
    hip_backend_t *be = calloc(1, sizeof *be);
    if (be == NULL)
        return AT_ERR_NOMEM;
    be->base.ops = &hip_ops;
    be->rt = rt;
    be->ordinal = cfg->device;
    be->timing = cfg->timing;
    if (cfg->plan != NULL) {
        be->has_plan = true;
        be->plan = *cfg->plan;
    }
    att_gpu_regions_init(&be->regs);
    int cus = 0, smem = 0, wave = 0;
    char name[128] = "";
    hipDeviceProp_t prop;
    memset(&prop, 0, sizeof prop);
    if ((e = HIP(hipSetDevice(cfg->device))) != AT_OK ||
        (e = HIP(hipDeviceGetName(name, (int)sizeof name, cfg->device))) != AT_OK ||
        (e = HIP(hipGetDeviceProperties(&prop, cfg->device))) != AT_OK ||
        (e = HIP(hipDeviceGetAttribute(&cus, hipDeviceAttributeMultiprocessorCount,
                                       cfg->device))) != AT_OK ||
        (e = HIP(hipDeviceGetAttribute(&smem, hipDeviceAttributeMaxSharedMemoryPerBlock,
                                       cfg->device))) != AT_OK ||
        (e = HIP(hipDeviceGetAttribute(&wave, hipDeviceAttributeWarpSize, cfg->device))) != AT_OK)
        return create_failed(be,
                             at_diag_set(diag, e, "hip:%d: cannot query the device", cfg->device));
    prop.gcnArchName[sizeof prop.gcnArchName - 1] = '\0';
    const size_t base_len = strcspn(prop.gcnArchName, ":");
    if (strncmp(prop.gcnArchName, "gfx", 3) != 0 || base_len >= sizeof be->arch_base ||
        strlen(prop.gcnArchName) >= sizeof be->arch || (wave != 32 && wave != 64))
        return create_failed(be, at_diag_set(diag, AT_ERR_UNSUPPORTED,
                                             "hip:%d is %s, architecture '%s', wave %d: not an "
                                             "AMD GPU the kernels know",
                                             cfg->device, name, prop.gcnArchName, wave));
    be->num_sms = (uint32_t)cus;
    be->smem_max = (uint32_t)smem;
    be->wave = (uint32_t)wave;
    memcpy(be->arch, prop.gcnArchName, strlen(prop.gcnArchName) + 1); /* length checked above */
    snprintf(be->name, sizeof be->name, "%s", name);
    memcpy(be->arch_base, prop.gcnArchName, base_len);
    be->arch_base[base_len] = '\0';
    snprintf(be->desc, sizeof be->desc, "%.127s (%s, %d CUs, wave %d, HIP runtime %d.%d, %.320s)",
             name, be->arch_base, cus, wave, rt->runtime_version / 10000000,
             rt->runtime_version / 100000 % 100, rt->lib);
    char dir[512];
    if (cfg->kernel_cache_dir != NULL)
        snprintf(dir, sizeof dir, "%s", cfg->kernel_cache_dir);
    else
        att_jit_default_dir(dir, sizeof dir);
    if ((e = att_hip_jit_create(dir, diag, &be->jit)) != AT_OK) {
        hip_destroy(&be->base);
        return e;
    }
    att_gpu_cq_init(&be->cq, be->jit, be->arch, hip_opts, be, cfg->compile_threads);
    *out = &be->base;
    return AT_OK;
}

const char *att_hip_describe(const att_backend_t *be) { return ((const hip_backend_t *)be)->desc; }

const char *att_hip_arch(const att_backend_t *be) { return ((const hip_backend_t *)be)->arch_base; }

bool att_hip_lost(const att_backend_t *base) {
    hip_backend_t *be = (hip_backend_t *)base;
    return atomic_load_explicit(&be->lost, memory_order_relaxed) != 0;
}

void att_hip_jit_stats(const att_backend_t *be, att_jit_stats_t *out) {
    att_jit_get_stats(((const hip_backend_t *)be)->jit, out);
}

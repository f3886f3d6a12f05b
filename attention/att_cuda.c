/* The CUDA backend (see att_cuda.h).
 *
 * Thread model: the backend's fields are set at creation and read-only afterwards, except `lost`
 * (atomic: set once by whichever thread sees a sticky fault; relaxed is enough, since it only
 * makes later calls fail early and carries no data), the registered host regions, the
 * compile queue (each with its own mutex) and the SM partitions (parts_mu: the cache of green
 * contexts, and the creation of sessions' streams in them; an entry never changes once made).
 * A green context is never made current (the driver lets one be current on one thread at a
 * time): sessions only launch into their own streams in it, with the primary context current.
 * A session's att_kv_t is used by one thread at a time (att_ctx's caller). Every entry point
 * makes the primary context current on its thread first.
 *
 * A run, on the session's stream: one upload of the metadata (chunks, the table entries the
 * session's device-resident block tables lack, items, merges), one upload per tensor run (from
 * pinned staging, or straight from registered memory) or one for q (if copied), k and v together
 * where they lie one after another in a registered region (att_gpu_qkv_span), the attention
 * launches (one per tile kind, whose split tiles merge themselves; with both kinds, the wide ones
 * on the session's side stream, forked and joined by events; or, when the plan asks for an SM
 * partition (mixed_wide_sms), each kind on the session's stream in its own green context, both
 * forked and joined), one download of out (if copied); then the stream is synchronized and out
 * copied into place where it was staged. An untimed run's kernels read q and write out in host
 * memory themselves where they can ("direct I/O" below): no copy of either. A run of one launch,
 * or a mixed one the plan partitions, that is not timed is instead launched from the device
 * (att_cudl.h: the copies and the launches are a job graph that the session's launcher starts
 * when the host writes the job into mapped memory; a partitioned mixed batch splits the SMs
 * inside its kernels, not by green contexts), unless its copies of the metadata and out pass
 * ATT_CUDL_MAX_COPY_BYTES. The SMs copy q, k and v too unless that makes them pass it: then the
 * copy engine does, and the job starts once they have landed.
 * Tiles and thresholds come from the session's plan: att_cuda_plan_default at creation, then
 * whatever set_tuning chose (the tuner calls it before every batch, so it is cheap: a session
 * keeps up to ATT_GPU_MOD_SLOTS loaded modules, one per tile kind and config, and a switch to a
 * loaded one only changes two slot numbers and the thresholds).
 *
 * Compiles never run on a call's path. set_tuning takes images only from the compile cache and
 * answers AT_ERR_NOT_READY otherwise, after queueing the compile; prepare_tuning queues
 * candidates (or, with wait, compiles on the caller's thread: a session's creation). The queue,
 * its compile threads (started on first use, joined by destroy) and the session's module slots
 * are att_gpu_tune.c's, shared with the HIP backend; the module loads and unloads are here. */
#include "attention/att_cuda.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention/att_cudl.h"
#include "attention/att_cudrv.h"
#include "attention/att_gpu_plan.h"
#include "attention/att_gpu_run.h"
#include "attention/att_gpu_tune.h"
#include "attention/att_kparams.h"
#include "attention/att_tune.h"
#include "cache/lc.h"
#include "common/at_base.h"
#include "common/at_log.h"

/* The SM partition of one mixed_wide_sms (after the driver's rounding): a green context for each
 * tile kind, over disjoint SMs. Made on first use, kept until the backend goes. */
#define CUDA_MAX_PARTS 4u
typedef struct cuda_part {
    uint32_t sms[ATT_TILE_KINDS]; /* SMs of each kind's green context; sms[ATT_TILE_WIDE] keys it */
    CUgreenCtx green[ATT_TILE_KINDS];
} cuda_part_t;

typedef struct cuda_backend {
    att_backend_t base;
    const att_cudrv_t *drv; /* borrowed: the process-wide table (att_cudrv_cuda), never freed */
    CUdevice dev;
    CUcontext ctx; /* the device's primary context, retained */
    int ordinal;
    uint32_t num_sms;
    uint32_t smem_optin; /* dynamic shared memory a block may opt into, bytes */
    char arch[16];
    char name[128];
    char desc[192];
    bool timing;
    bool direct_io; /* untimed calls' kernels read q and write out in host memory (io_prepare) */
    bool has_plan;
    att_cuda_plan_t plan; /* overrides of att_cuda_cfg_t.plan (has_plan) */
    att_jit_t *jit; /* owned */
    att_cudl_t *dl; /* owned: the device-launched calls' module; NULL: every call launches from
                       the host (att_cudl.h says when) */
    uint64_t dl_engine_bytes; /* att_cuda_cfg_t's */
    atomic_int lost;
    att_gpu_cq_t cq; /* tuning candidates' compiles; initialized once jit exists */
    att_gpu_regions_t regs; /* host memory registered for DMA */
    pthread_mutex_t parts_mu;
    /* green contexts are per device: sessions asking for the same partition share them */
    cuda_part_t parts[CUDA_MAX_PARTS] AT_GUARDED_BY(parts_mu);
    uint32_t num_parts AT_GUARDED_BY(parts_mu);
} cuda_backend_t;

struct att_kv {
    cuda_backend_t *be;    /* borrowed: the backend outlives its sessions */
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
    CUevent ev_fork, ev_join[ATT_TILE_KINDS]; /* a join per stream forked to, by tile kind */
    /* With an SM partition (plan.mixed_wide_sms): a mixed batch's kinds run instead on
     * part_stream[kind], a stream in that kind's green context, forked and joined the same way.
     * Made when the plan first asks for it (creation, set_tuning), never per call. */
    const cuda_part_t *part; /* borrowed from the backend's cache; NULL: none (or it failed) */
    uint32_t part_asked;     /* the mixed_wide_sms that part answers; 0: none asked yet */
    CUstream part_stream[ATT_TILE_KINDS];
    CUstream launch_stream; /* the stream launch_cb launches on */
    CUevent ev_begin, ev_end;
    att_gpu_mods_t mods;   /* the loaded tile modules, each kind's current one */
    bool timing;           /* record device time even when the backend's timing is off */
    lc_t *lc;              /* owned: this session's launch cache */
    att_cudl_sess_t *dl;   /* owned: its launcher and job graphs; NULL: host launches only */
    bool dl_recording;     /* launch_cb hands launches to dl (a device-launched call) */
    bool dl_failed;        /* dl's own step failed in launch_cb (not the launch cache's) */
    uint64_t device_calls; /* runs launched from the device (kv_stats) */
    uint64_t dl_starts;    /* dl's launcher_starts (kv_stats), kept when dl_off ends it */
    uint64_t uploads; /* host-to-device copy calls (kv_stats) */
    uint64_t last_host_ns, last_device_ns;
    /* per-call buffers, grown when a call needs more (never per call) */
    CUdeviceptr io_d;      /* [meta | q | k | v | out | parts] of the current call */
    size_t io_cap;
    uint8_t *stage_h;    /* pinned and mapped, [meta | q | k | v | out] */
    CUdeviceptr stage_d; /* stage_h's device address */
    size_t stage_cap;
    CUdeviceptr counters_d; /* [counters_cap] uint32 arrivals of split parts, then a persistent
                               grid's ATT_KUNIT_COUNTERS; zero between calls */
    size_t counters_cap;
    CUdeviceptr tables_d;  /* [tables_cap] uint32: the sequences' block tables (att_gpu_tables_t) */
    uint32_t tables_cap;
    att_gpu_tables_t tables;
    att_gpu_work_t work;
};

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

/* cu_check for att_cudl (its att_cudl_check_fn). */
static at_err_t dl_check(void *user, CUresult r, const char *call, const char *file, int line) {
    return cu_check(user, r, call, file, line);
}

static at_err_t enter(cuda_backend_t *be) {
    if (atomic_load_explicit(&be->lost, memory_order_relaxed))
        return AT_ERR_DEVICE;
    return CU(cuCtxSetCurrent(be->ctx));
}

/* ---- launches ---- */

static at_err_t launch_cb(void *user, const lc_launch_t *l, uint32_t grid_x, void *params) {
    att_kv_t *kv = user;
    cuda_backend_t *be = kv->be;
    if (kv->dl_recording) {
        const at_err_t e = att_cudl_launch(kv->dl, l, grid_x, params);
        kv->dl_failed = e != AT_OK;
        return e;
    }
    void *args[] = {params};
    return CU(cuLaunchKernel((CUfunction)l->fn, grid_x, 1, 1, l->block_x, 1, 1, l->smem_bytes,
                             kv->launch_stream, args, NULL));
}

/* The prepared launch of (kernel, kind's current module, split) (att_gpu_tune.c). */
static at_err_t prepared(att_kv_t *kv, uint32_t kernel, uint32_t kind, uint32_t split,
                         const lc_launch_t **out) {
    return att_gpu_mods_prepared(&kv->mods, kv->m, kv->consts_d, kv->num_blocks, kernel, kind,
                                 split, out);
}

/* ---- planning: the session's configuration (each call's work: att_gpu_plan.c) ---- */

void att_cuda_plan_from_cfg(const tun_cfg_t *c, att_cuda_plan_t *out) {
    const uint32_t *v = c->v;
    memset(out, 0, sizeof *out);
    out->tile[ATT_TILE_WIDE] = (att_tile_t){.warps_m = v[TUN_CUDA_WIDE_WARPS_M],
                                            .warp_mt = v[TUN_CUDA_WIDE_WARP_MT],
                                            .warps_n = 1,
                                            .tile_k = v[TUN_CUDA_WIDE_TILE_K],
                                            .stages = v[TUN_CUDA_WIDE_STAGES],
                                            .mma = v[TUN_CUDA_WIDE_MMA]};
    out->tile[ATT_TILE_NARROW] = (att_tile_t){.warps_m = 1,
                                              .warp_mt = 1,
                                              .warps_n = v[TUN_CUDA_NARROW_WARPS_N],
                                              .tile_k = v[TUN_CUDA_NARROW_TILE_K],
                                              .stages = v[TUN_CUDA_NARROW_STAGES]};
    att_gpu_plan_knobs(out, v[TUN_CUDA_SPLIT_MIN_KEYS], v[TUN_CUDA_BLOCKS_PER_SM],
                       v[TUN_CUDA_MIXED_SPLIT_KEYS], v[TUN_CUDA_MIXED_ORDER]);
}

void att_cuda_plan_default(const att_model_t *m, const char *arch, uint32_t smem_optin,
                           att_cuda_plan_t *out) {
    tun_shape_t s;
    att_tune_shape(m, &s);
    tun_device_t d = {.backend = "cuda", .smem_bytes = smem_optin};
    snprintf(d.arch, sizeof d.arch, "%s", arch);
    const tun_bucket_t any = {0};
    tun_cfg_t h;
    tun_space_cuda_unified.heuristic(&s, &d, &any, &h);
    att_cuda_plan_from_cfg(&h, out);
}

/* Sets plan's mixed-batch partition from the device: mixed_wide_sms 4/11 of the SMs in whole
 * groups of 8 (48 of the H200's 132, the best of 16..64 for the bench's mixed batch:
 * docs/BENCHMARKS.md) where that was measured, sm_90 with the wgmma wide tile and a driver with
 * green contexts; else 0. Then the backend's overrides, if any (ATT_CUDA_NEVER: 0), of it, of
 * mixed_part_always and of tail_unsplit: a tuning config carries none of them. */
static void plan_partition(const cuda_backend_t *be, att_cuda_plan_t *plan) {
    const uint32_t n = be->num_sms * 4 / 11 / 8 * 8;
    plan->mixed_wide_sms = be->drv->has_green && strcmp(be->arch, "sm_90") == 0 &&
                                   plan->tile[ATT_TILE_WIDE].mma != 0 && n >= 8
                               ? n
                               : 0;
    if (be->has_plan && be->plan.mixed_wide_sms != 0)
        plan->mixed_wide_sms = be->plan.mixed_wide_sms;
    if (plan->mixed_wide_sms == ATT_CUDA_NEVER)
        plan->mixed_wide_sms = 0;
    plan->mixed_part_always = be->has_plan && be->plan.mixed_part_always;
    plan->tail_unsplit = be->has_plan && be->plan.tail_unsplit;
}

/* The session's plan: the default, with the backend's overrides. */
static void session_plan(const cuda_backend_t *be, const att_model_t *m, att_cuda_plan_t *out) {
    att_cuda_plan_default(m, be->arch, be->smem_optin, out);
    if (be->has_plan)
        att_gpu_plan_override(out, &be->plan);
    plan_partition(be, out);
}

/* ---- buffers ---- */

static at_err_t ensure_io(att_kv_t *kv, size_t dev_bytes, size_t stage_bytes) {
    cuda_backend_t *be = kv->be;
    at_err_t e;
    if (kv->dl != NULL && (dev_bytes > kv->io_cap || stage_bytes > kv->stage_cap))
        att_cudl_sess_quiesce(kv->dl); /* frees wait for a polling launcher */
    if (dev_bytes > kv->io_cap) {
        size_t cap = att_gpu_align_up(dev_bytes + dev_bytes / 2, 1u << 20);
        if (kv->io_d != 0 && (e = CU(cuMemFree(kv->io_d))) != AT_OK)
            return e;
        kv->io_d = 0;
        kv->io_cap = 0;
        if ((e = CU(cuMemAlloc(&kv->io_d, cap))) != AT_OK)
            return e;
        kv->io_cap = cap;
    }
    if (stage_bytes > kv->stage_cap) {
        size_t cap = att_gpu_align_up(stage_bytes + stage_bytes / 2, 1u << 20);
        if (kv->stage_h != NULL && (e = CU(cuMemFreeHost(kv->stage_h))) != AT_OK)
            return e;
        kv->stage_h = NULL;
        kv->stage_cap = 0;
        void *p = NULL;
        CUdeviceptr d = 0;
        if ((e = CU(cuMemHostAlloc(&p, cap, CU_MEMHOSTALLOC_DEVICEMAP))) != AT_OK)
            return e;
        if ((e = CU(cuMemHostGetDevicePointer(&d, p, 0))) != AT_OK) {
            (void)CU(cuMemFreeHost(p));
            return e;
        }
        kv->stage_h = p;
        kv->stage_d = d;
        kv->stage_cap = cap;
    }
    return AT_OK;
}

/* Room for n split arrival counters. New counters are zeroed before any later launch can run
 * (the kernels keep them zero from then on); the old ones were zero and are freed. */
static at_err_t ensure_counters(att_kv_t *kv, size_t n) {
    cuda_backend_t *be = kv->be;
    if (n <= kv->counters_cap)
        return AT_OK;
    const size_t cap = n + n / 2 > 1024 ? n + n / 2 : 1024;
    at_err_t e;
    if (kv->dl != NULL)
        att_cudl_sess_quiesce(kv->dl); /* frees wait for a polling launcher */
    if (kv->counters_d != 0 && (e = CU(cuMemFree(kv->counters_d))) != AT_OK)
        return e;
    kv->counters_d = 0;
    kv->counters_cap = 0;
    if ((e = CU(cuMemAlloc(&kv->counters_d, cap * 4))) != AT_OK ||
        (e = CU(cuMemsetD8(kv->counters_d, 0, cap * 4))) != AT_OK ||
        (e = CU(cuStreamSynchronize(NULL))) != AT_OK)
        return e;
    kv->counters_cap = cap;
    return AT_OK;
}

/* The session's att_gpu_arena_fn: a table arena of `entries` entries in place of the old one. */
static at_err_t replace_tables(void *user, uint32_t entries) {
    att_kv_t *kv = user;
    cuda_backend_t *be = kv->be;
    at_err_t e;
    if (kv->dl != NULL)
        att_cudl_sess_quiesce(kv->dl); /* frees wait for a polling launcher */
    if (kv->tables_d != 0 && (e = CU(cuMemFree(kv->tables_d))) != AT_OK)
        return e;
    kv->tables_d = 0;
    return CU(cuMemAlloc(&kv->tables_d, (size_t)entries * 4));
}

/* Moves one tensor of the batch between host and device region dev_off (row_bytes per token).
 * Runs of chunks whose host rows are adjacent become one copy. Registered memory is copied
 * directly; other runs go through the stage at stage_off (same offsets): gathered before the
 * upload, or scattered by att_gpu_finish_out once the stream is synchronized (*staged tells). */
static at_err_t move_tensor(att_kv_t *kv, const att_batch_t *b, int which, size_t row_bytes,
                            size_t dev_off, size_t stage_off, bool *staged) {
    cuda_backend_t *be = kv->be;
    const bool up = which != 3;
    *staged = false;
    for (uint32_t c = 0; c < b->num_chunks;) {
        const uint8_t *p;
        size_t n, off;
        const uint32_t d = att_gpu_tensor_run(b, which, row_bytes, c, &p, &n, &off);
        const CUdeviceptr dev = kv->io_d + dev_off + off;
        uint8_t *st = kv->stage_h + stage_off + off;
        const bool direct = att_gpu_regions_contain(&be->regs, p, n);
        at_err_t e;
        if (up) {
            if (!direct)
                memcpy(st, p, n);
            e = CU(cuMemcpyHtoDAsync(dev, direct ? p : st, n, kv->stream));
            kv->uploads++;
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

/* ---- direct I/O ---- */

/* Where an attending call's q and out meet the kernels (att_gpu_io_way). Copied, a prefill's
 * call waits for all of q to come in before its kernels start and for all of out to go back
 * after them: on the H200 an 8 x 2048 Llama prefill moves 268 MB so, 5 ms beside its 0.9 ms of
 * kernels. Read and written by the kernels in host memory instead, over the link as their
 * blocks need them, the transfers overlap the work and each other (docs/BENCHMARKS.md). k and v
 * are still copied: a prefill's row tiles each read the chunk's new keys again, and a decode
 * item's two reads of its new row over the link (the KV write, the attention) cost it more
 * than a copy (docs/BENCHMARKS.md, the tenth session's run 4). Timed calls copy q and out too:
 * their device time is the kernels' alone. */
typedef struct io {
    att_gpu_io_t q;   /* q's way (att_gpu_io_way); ATT_GPU_IO_COPY when not attending */
    att_gpu_io_t out; /* out's way, likewise */
    uint64_t q_d;     /* [T, Hq, D] the kernels' address of q, unless copied */
    uint64_t out_d;   /* [T, Hq, D] the kernels' address of out, unless copied */
} io_t;

/* Chooses the ways of b's q and out and gathers a staged q into the stage. */
static void io_prepare(att_kv_t *kv, const att_batch_t *b, const att_gpu_layout_t *lo, size_t q_row,
                       io_t *io) {
    cuda_backend_t *be = kv->be;
    memset(io, 0, sizeof *io);
    if (!b->attend || !be->direct_io || be->timing || kv->timing)
        return;
    io->q = att_gpu_io_way(b, 0, q_row, &be->regs, kv->stage_d + lo->o_q, &io->q_d);
    io->out = att_gpu_io_way(b, 3, q_row, &be->regs, kv->stage_d + lo->o_out, &io->out_d);
    for (uint32_t c = 0; io->q == ATT_GPU_IO_STAGE && c < b->num_chunks;) {
        const uint8_t *p;
        size_t n, off;
        const uint32_t d = att_gpu_tensor_run(b, 0, q_row, c, &p, &n, &off);
        memcpy(kv->stage_h + lo->o_q + off, p, n);
        c = d;
    }
}

/* Points the kernels' parameters at the tensors not copied. */
static void io_params(const io_t *io, att_kparams_t *p) {
    if (io->q != ATT_GPU_IO_COPY)
        p->q_d = io->q_d;
    if (io->out != ATT_GPU_IO_COPY)
        p->out_d = io->out_d;
}

/* Uploads the call's inputs but a q the kernels read in host memory (io): q (if copied), k and
 * v in one copy where the host holds them together in registered memory (att_gpu_qkv_span, which
 * then places k and v in lo), else a copy per run of chunks. */
static at_err_t upload_inputs(att_kv_t *kv, const att_batch_t *b, const io_t *io,
                              att_gpu_layout_t *lo, size_t q_row, size_t kv_row) {
    cuda_backend_t *be = kv->be;
    const bool q_in = b->attend && io->q == ATT_GPU_IO_COPY;
    size_t n = 0;
    const uint8_t *span = att_gpu_qkv_span(b, !q_in, q_row, kv_row, &be->regs, lo, &n);
    if (span != NULL) {
        kv->uploads++;
        return CU(cuMemcpyHtoDAsync(kv->io_d + (q_in ? lo->o_q : lo->o_k), span, n, kv->stream));
    }
    bool staged;
    at_err_t e = AT_OK;
    if (q_in)
        e = move_tensor(kv, b, 0, q_row, lo->o_q, lo->o_q, &staged);
    if (e == AT_OK)
        e = move_tensor(kv, b, 1, kv_row, lo->o_k, lo->o_k, &staged);
    if (e == AT_OK)
        e = move_tensor(kv, b, 2, kv_row, lo->o_v, lo->o_v, &staged);
    return e;
}

/* ---- device-launched calls (att_cudl.h) ---- */

/* The copy ranges of one tensor's runs (which: 0..2 q, k, v in; 3 out) for a device-launched
 * call: registered runs straight from or to where they lie (the device uses their host address),
 * the others through the stage at the same offsets (gathered here on the way in, scattered by
 * att_gpu_finish_out on the way out: *staged). An input whose runs do not all find a range goes
 * through the stage as a whole, where its runs lie one after another and join into one range (a
 * batch merged from several calls has a run per call and tensor). False when a range is still
 * missing. */
static bool dl_tensor(att_kv_t *kv, const att_batch_t *b, int which, size_t row_bytes,
                      size_t dev_off, att_dl_copy_t *ranges, bool *staged) {
    cuda_backend_t *be = kv->be;
    const bool out = which == 3;
    const att_dl_copy_t before = *ranges;
    for (int pass = 0; pass < 2; pass++) {
        bool ok = true;
        for (uint32_t c = 0; c < b->num_chunks && ok;) {
            const uint8_t *p;
            size_t n, off;
            const uint32_t d = att_gpu_tensor_run(b, which, row_bytes, c, &p, &n, &off);
            const uint64_t dev = kv->io_d + dev_off + off;
            const bool direct = pass == 0 && att_gpu_regions_contain(&be->regs, p, n);
            const uint64_t host = direct ? (uint64_t)(uintptr_t)p : kv->stage_d + dev_off + off;
            if (!out && !direct)
                memcpy(kv->stage_h + dev_off + off, p, n);
            ok = att_cudl_range_add(ranges, out ? host : dev, out ? dev : host, n);
            *staged |= !direct;
            c = d;
        }
        if (ok)
            return true;
        *ranges = before;
        if (out) /* att_gpu_finish_out scatters only unregistered runs: no second pass */
            return false;
    }
    return false;
}

/* Whether the device should launch the call: one launch (one tile kind, or an append), or a
 * mixed batch the plan partitions (its narrow kind's persistent grid first, which leaves the wide
 * kind its SMs: att_cudl.h; the wgmma body has no persistent grid, and mixed batches on shared
 * SMs launch from the host), no timing events, and at most ATT_CUDL_MAX_COPY_BYTES for the SMs
 * to copy: the metadata, and out where io copies it. The inputs (k and v, and q where io copies
 * it) go by the copy engine instead of the SMs (*engine) when all of these together pass that
 * bound (a large prefill's k and v), or when they pass the backend's dl_engine_bytes: the SMs
 * copy 5-8% slower, which made an 8 x 2048 prefill's call 2-3% longer (docs/BENCHMARKS.md). */
static bool dl_suits(const att_kv_t *kv, const att_batch_t *b, const att_gpu_counts_t *pl,
                     const att_gpu_layout_t *lo, const io_t *io, size_t q_row, size_t kv_row,
                     bool *engine) {
    if (kv->dl == NULL || kv->be->timing || kv->timing || b->num_chunks == 0)
        return false;
    const uint64_t t = b->total_tokens;
    const uint64_t in = t * (2 * kv_row + (b->attend && io->q == ATT_GPU_IO_COPY ? q_row : 0));
    const uint64_t out = b->attend && io->out == ATT_GPU_IO_COPY ? t * q_row : 0;
    const uint64_t asked = kv->be->dl_engine_bytes;
    *engine = lo->meta_end + in + out > ATT_CUDL_MAX_COPY_BYTES || (asked != 0 && in > asked);
    if (lo->meta_end + out + (*engine ? 0 : in) > ATT_CUDL_MAX_COPY_BYTES)
        return false;
    const bool wide = pl->num_items[ATT_TILE_WIDE] != 0;
    const bool narrow = pl->num_items[ATT_TILE_NARROW] != 0;
    return !b->attend || wide != narrow ||
           (pl->partitioned && att_cudl_pairs(kv->dl) &&
            att_gpu_mods_cur(&kv->mods, ATT_TILE_NARROW)->tile.mma == 0);
}

/* After a device-launched call could not run (why): the session's calls launch from the host
 * from now on, its launcher ended and waited for first. */
static void dl_off(att_kv_t *kv, const char *why) {
    at_log(AT_LOG_WARN, "cuda",
           "cuda:%d: a session's device-launched call %s; its calls launch "
           "from the host from now on",
           kv->be->ordinal, why);
    kv->dl_starts += att_cudl_starts(kv->dl);
    att_cudl_sess_destroy(&kv->dl, false);
}

/* The call from the device, once its metadata is in the stage: the copy ranges, then the
 * launches (launch_cb hands them to the session's att_cudl), the submission and the wait; the
 * block tables are committed once the job has run. *taken false: the ranges did not fit, the
 * driver cannot make a graph of two launches (the session's mixed batches then launch from the
 * host), or att_cudl could not make or submit the job (all of the session's calls then launch
 * from the host); nothing was submitted and the host path runs the call. */
static at_err_t run_on_device(att_kv_t *kv, const att_batch_t *b, att_gpu_layout_t *lo,
                              const att_gpu_counts_t *pl, const io_t *io, size_t q_row,
                              size_t kv_row, bool engine, uint64_t t0, bool *taken) {
    cuda_backend_t *be = kv->be;
    *taken = false;
    att_cudl_begin(kv->dl);
    bool ok = att_cudl_range_add(att_cudl_copies(kv->dl, ATT_CUDL_WAY_IN), kv->io_d, kv->stage_d,
                                 lo->meta_end);
    att_dl_copy_t *in = att_cudl_copies(kv->dl, engine ? ATT_CUDL_WAY_ENGINE : ATT_CUDL_WAY_IN);
    const bool q_in = b->attend && io->q == ATT_GPU_IO_COPY;
    size_t n = 0;
    bool in_staged = false, out_staged = b->attend && io->out == ATT_GPU_IO_STAGE;
    const uint8_t *span = att_gpu_qkv_span(b, !q_in, q_row, kv_row, &be->regs, lo, &n);
    if (span != NULL)
        ok = ok && att_cudl_range_add(in, kv->io_d + (q_in ? lo->o_q : lo->o_k),
                                      (uint64_t)(uintptr_t)span, n);
    else
        ok = ok && (!q_in || dl_tensor(kv, b, 0, q_row, lo->o_q, in, &in_staged)) &&
             dl_tensor(kv, b, 1, kv_row, lo->o_k, in, &in_staged) &&
             dl_tensor(kv, b, 2, kv_row, lo->o_v, in, &in_staged);
    ok = ok && (!b->attend || io->out != ATT_GPU_IO_COPY ||
                dl_tensor(kv, b, 3, q_row, lo->o_out, att_cudl_copies(kv->dl, ATT_CUDL_WAY_OUT),
                          &out_staged));
    if (!ok)
        return AT_OK;
    att_kparams_t p;
    att_gpu_run_params(kv->m, b, lo, kv->io_d, kv->tables_d, kv->pool_d, kv->layer_half_bytes, &p);
    io_params(io, &p);
    p.counters_d = kv->counters_d;
    kv->dl_recording = true;
    kv->dl_failed = false;
    at_err_t e;
    const bool wide = pl->num_items[ATT_TILE_WIDE] != 0;
    const bool narrow = pl->num_items[ATT_TILE_NARROW] != 0;
    if (!b->attend) {
        e = att_gpu_launch_kv_write(kv->lc, prepared, kv, &p, b->num_chunks);
    } else if (wide && narrow) {
        /* the narrow kind's persistent grid on every SM, leaving the SMs with ids below
         * mixed_sms[wide] (the H200's run 0 to 131: docs/BENCHMARKS.md) to the wide grid */
        const uint32_t occ = att_gpu_mods_cur(&kv->mods, ATT_TILE_NARROW)->occupancy;
        e = att_gpu_launch_kind(kv->lc, prepared, kv, &p, pl, lo, kv->io_d, ATT_TILE_NARROW,
                                kv->part->sms[ATT_TILE_WIDE], be->num_sms * (occ != 0 ? occ : 1));
        if (e == AT_OK)
            e = att_gpu_launch_kind(kv->lc, prepared, kv, &p, pl, lo, kv->io_d, ATT_TILE_WIDE, 0,
                                    0);
    } else {
        e = att_gpu_launch_kind(kv->lc, prepared, kv, &p, pl, lo, kv->io_d,
                                wide ? ATT_TILE_WIDE : ATT_TILE_NARROW, 0, 0);
    }
    kv->dl_recording = false;
    if (e == AT_OK) {
        e = att_cudl_submit(kv->dl);
        if (e == AT_ERR_UNSUPPORTED) /* no graph of two launches: nothing was submitted */
            return atomic_load_explicit(&be->lost, memory_order_relaxed) ? AT_ERR_DEVICE : AT_OK;
        kv->dl_failed = e != AT_OK;
        kv->uploads += e == AT_OK && engine ? in->n : 0;
    }
    if (e != AT_OK) {
        if (!kv->dl_failed || atomic_load_explicit(&be->lost, memory_order_relaxed))
            return e;
        dl_off(kv, "could not be submitted");
        return AT_OK;
    }
    kv->last_host_ns = att_gpu_now_ns() - t0;
    if ((e = att_cudl_wait(kv->dl)) != AT_OK) {
        if (atomic_load_explicit(&be->lost, memory_order_relaxed))
            return e;
        /* its graph or the launcher could not be launched: the host path runs the call */
        dl_off(kv, "did not run");
        return AT_OK;
    }
    *taken = true;
    att_gpu_tables_commit(&kv->tables, b);
    kv->device_calls++;
    if (out_staged)
        att_gpu_finish_out(b, q_row, kv->stage_h + lo->o_out, &be->regs);
    return AT_OK;
}

/* ---- SM partitions (green contexts) for mixed batches ---- */

/* The partition whose wide part has about `want` SMs: the cached one of the same rounded size,
 * else two new green contexts (the driver's split of the device's SMs: its group of at least
 * `want` for the wide tiles, the remainder for the narrow ones). AT_ERR_UNSUPPORTED (diag says
 * why) when the driver has no green contexts, the split leaves no SMs for the narrow tiles or
 * the cache is full; AT_ERR_DEVICE when the driver refuses. */
static at_err_t part_get(cuda_backend_t *be, uint32_t want, const cuda_part_t **out,
                         at_diag_t *diag) AT_REQUIRES(be->parts_mu) {
    if (!be->drv->has_green)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED,
                           "the driver lacks green-context streams (CUDA 12.5 or newer has them)");
    CUdevResource all, split[ATT_TILE_KINDS];
    memset(&all, 0, sizeof all);
    memset(split, 0, sizeof split);
    unsigned int groups = 1;
    at_err_t e;
    if ((e = CU(cuDeviceGetDevResource(be->dev, &all, CU_DEV_RESOURCE_TYPE_SM))) != AT_OK)
        return at_diag_set(diag, e, "the driver lists no SMs");
    if (want < all.sm.smCount &&
        (e = CU(cuDevSmResourceSplitByCount(&split[ATT_TILE_WIDE], &groups, &all,
                                            &split[ATT_TILE_NARROW], 0, want))) != AT_OK)
        return at_diag_set(diag, e, "the driver cannot split %u SMs off", want);
    const uint32_t wide = split[ATT_TILE_WIDE].sm.smCount, rest = split[ATT_TILE_NARROW].sm.smCount;
    if (groups != 1 || wide == 0 || rest == 0)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED,
                           "%u SMs for the wide tiles leave none of %u for the narrow ones", want,
                           all.sm.smCount);
    for (uint32_t i = 0; i < be->num_parts; i++)
        if (be->parts[i].sms[ATT_TILE_WIDE] == wide) {
            *out = &be->parts[i];
            return AT_OK;
        }
    if (be->num_parts == CUDA_MAX_PARTS)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED, "%u partitions exist already",
                           CUDA_MAX_PARTS);
    cuda_part_t p;
    memset(&p, 0, sizeof p);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        CUdevResourceDesc desc;
        p.sms[k] = split[k].sm.smCount;
        if ((e = CU(cuDevResourceGenerateDesc(&desc, &split[k], 1))) != AT_OK ||
            (e = CU(cuGreenCtxCreate(&p.green[k], desc, be->dev, CU_GREEN_CTX_DEFAULT_STREAM))) !=
                AT_OK) {
            if (k != 0)
                (void)CU(cuGreenCtxDestroy(p.green[0]));
            return at_diag_set(diag, e, "cannot make a green context of %u SMs", p.sms[k]);
        }
    }
    at_log(AT_LOG_INFO, "cuda", "cuda:%d: mixed batches' wide tiles on %u SMs, narrow on %u",
           be->ordinal, p.sms[ATT_TILE_WIDE], p.sms[ATT_TILE_NARROW]);
    be->parts[be->num_parts] = p;
    *out = &be->parts[be->num_parts++];
    return AT_OK;
}

static void part_drop(att_kv_t *kv) {
    cuda_backend_t *be = kv->be;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        if (kv->part_stream[k] != NULL) {
            (void)CU(cuStreamDestroy(kv->part_stream[k]));
            kv->part_stream[k] = NULL;
        }
    kv->part = NULL;
}

/* Gives the session the streams of its plan's partition the first time the plan asks for it
 * (or for another size). A partition that cannot be had leaves the session on the side-stream
 * path, with a log line: a missing feature, never a failed call. No run is in flight (runs,
 * set_tuning and creation of one session are serialized). */
static void part_ensure(att_kv_t *kv) {
    cuda_backend_t *be = kv->be;
    const uint32_t want = kv->plan.mixed_wide_sms;
    if (want == 0 || want == kv->part_asked)
        return;
    part_drop(kv);
    kv->part_asked = want;
    at_diag_t diag = {{0}};
    const cuda_part_t *p = NULL;
    /* under the lock: a green context has no locking of its own, and two sessions' workers may
     * make streams in the same one at once */
    pthread_mutex_lock(&be->parts_mu);
    at_err_t e = part_get(be, want, &p, &diag);
    for (uint32_t k = 0; k < ATT_TILE_KINDS && e == AT_OK; k++)
        if ((e = CU(cuGreenCtxStreamCreate(&kv->part_stream[k], p->green[k],
                                           CU_STREAM_NON_BLOCKING, 0))) != AT_OK)
            at_diag_set(&diag, e, "cannot make a stream in a green context");
    pthread_mutex_unlock(&be->parts_mu);
    if (e != AT_OK) {
        at_log(AT_LOG_WARN, "cuda",
               "cuda:%d: no SM partition for mixed_wide_sms=%u (%s): the session runs mixed "
               "batches on every SM",
               be->ordinal, want, diag.msg);
        part_drop(kv);
        return;
    }
    kv->part = p;
}

/* ---- run ---- */

static at_err_t cuda_run(att_backend_t *base, att_kv_t *kv, const att_batch_t *b) {
    cuda_backend_t *be = (cuda_backend_t *)base;
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
    /* part_ensure ran for the current plan: part is its partition, or NULL when it failed */
    const cuda_part_t *part = kv->plan.mixed_wide_sms != 0 ? kv->part : NULL;
    if (b->attend && (e = att_gpu_plan_batch(&kv->work, m, &kv->plan, tile_rows, tile_keys,
                                             be->num_sms, part != NULL ? part->sms : NULL, occ,
                                             b, &pl)) != AT_OK)
        return e;
    if ((e = att_gpu_tables_place(&kv->tables, b, m->block_size,
                                  att_gpu_tables_keep_tokens(m, b, tile_rows[ATT_TILE_NARROW]),
                                  &kv->tables_cap, replace_tables, kv)) != AT_OK)
        return e;
    att_gpu_layout_t lo;
    att_gpu_layout(m, b, &pl, tile_rows, kv->tables.new_entries, &lo);
    if ((e = ensure_io(kv, lo.end, lo.stage_end)) != AT_OK ||
        (e = ensure_counters(kv, (size_t)pl.total_merges * m->num_kv_heads + ATT_KUNIT_COUNTERS)) !=
            AT_OK)
        return e;
    att_gpu_fill_meta(kv->stage_h, &lo, b, &kv->tables, &kv->work, &pl);
    io_t io;
    io_prepare(kv, b, &lo, q_row, &io);
    bool engine = false;
    if (dl_suits(kv, b, &pl, &lo, &io, q_row, kv_row, &engine)) {
        bool taken;
        if ((e = run_on_device(kv, b, &lo, &pl, &io, q_row, kv_row, engine, t0, &taken)) != AT_OK ||
            taken)
            return e;
    }
    kv->uploads++;
    if ((e = CU(cuMemcpyHtoDAsync(kv->io_d, kv->stage_h, lo.meta_end, kv->stream))) != AT_OK)
        goto out_drain;
    if ((e = upload_inputs(kv, b, &io, &lo, q_row, kv_row)) != AT_OK)
        goto out_drain;

    if ((be->timing || kv->timing) && (e = CU(cuEventRecord(kv->ev_begin, kv->stream))) != AT_OK)
        goto out_drain;
    att_kparams_t p;
    att_gpu_run_params(m, b, &lo, kv->io_d, kv->tables_d, kv->pool_d, kv->layer_half_bytes, &p);
    io_params(&io, &p);
    p.counters_d = kv->counters_d;
    kv->launch_stream = kv->stream;
    if (b->attend) {
        /* Both kinds: the wide tiles (bound by arithmetic) run on the side stream, concurrent
         * with the narrow ones (decode, bound by memory) on the session's, in the plan's launch
         * order; with a partition each kind runs in its own green context instead, so neither
         * takes the other's SMs. Every stream forked to is joined back before out is read. */
        const bool fork = pl.num_items[ATT_TILE_NARROW] != 0 && pl.num_items[ATT_TILE_WIDE] != 0;
        CUstream to[ATT_TILE_KINDS] = {kv->stream, kv->stream};
        if (fork) {
            to[ATT_TILE_WIDE] = pl.partitioned ? kv->part_stream[ATT_TILE_WIDE] : kv->side;
            to[ATT_TILE_NARROW] = pl.partitioned ? kv->part_stream[ATT_TILE_NARROW] : kv->stream;
            if ((e = CU(cuEventRecord(kv->ev_fork, kv->stream))) != AT_OK)
                goto out_drain;
        }
        for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
            if (to[k] != kv->stream && (e = CU(cuStreamWaitEvent(to[k], kv->ev_fork, 0))) != AT_OK)
                goto out_drain;
        for (uint32_t i = 0; i < ATT_TILE_KINDS; i++) {
            const uint32_t k = att_gpu_launch_order(&kv->plan, i);
            kv->launch_stream = to[k];
            if ((e = att_gpu_launch_kind(kv->lc, prepared, kv, &p, &pl, &lo, kv->io_d, k, 0, 0)) !=
                AT_OK)
                goto out_drain;
        }
        kv->launch_stream = kv->stream;
        for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
            if (to[k] != kv->stream &&
                ((e = CU(cuEventRecord(kv->ev_join[k], to[k]))) != AT_OK ||
                 (e = CU(cuStreamWaitEvent(kv->stream, kv->ev_join[k], 0))) != AT_OK))
                goto out_drain;
    } else {
        if ((e = att_gpu_launch_kv_write(kv->lc, prepared, kv, &p, b->num_chunks)) != AT_OK)
            goto out_drain;
    }
    att_gpu_tables_commit(&kv->tables, b);
    if ((be->timing || kv->timing) && (e = CU(cuEventRecord(kv->ev_end, kv->stream))) != AT_OK)
        goto out_drain;
    kv->last_host_ns = att_gpu_now_ns() - t0;
    bool out_staged = b->attend && io.out == ATT_GPU_IO_STAGE;
    if (b->attend && io.out == ATT_GPU_IO_COPY &&
        (e = move_tensor(kv, b, 3, q_row, lo.o_out, lo.o_out, &out_staged)) != AT_OK)
        goto out_drain;
    if ((e = CU(cuStreamSynchronize(kv->stream))) != AT_OK)
        goto out_drain;
    if (out_staged)
        att_gpu_finish_out(b, q_row, kv->stage_h + lo.o_out, &be->regs);
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
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        if (kv->part_stream[k] != NULL)
            (void)be->drv->cuStreamSynchronize(kv->part_stream[k]);
    (void)be->drv->cuStreamSynchronize(kv->side);
    (void)be->drv->cuStreamSynchronize(kv->stream);
    return e;
}

/* ---- sessions ---- */

/* Loads img as the module of ms->kind with ms->tile (the session's att_gpu_loader_t); the
 * driver copies what it needs from img (cuModuleLoadData), so bytes is not kept. */
static at_err_t load_mod(att_kv_t *kv, const void *img, size_t bytes, att_gpu_mod_t *ms,
                         at_diag_t *diag) {
    (void)bytes;
    cuda_backend_t *be = kv->be;
    CUmodule mod;
    CUfunction f_attend, f_kv_write;
    at_err_t e;
    if ((e = CU(cuModuleLoadData(&mod, img))) != AT_OK)
        return at_diag_set(diag, e, "cuModuleLoadData failed");
    CUdeviceptr info_d;
    size_t info_n;
    if ((e = CU(cuModuleGetFunction(&f_attend, mod, "att_k_attend"))) != AT_OK ||
        (e = CU(cuModuleGetFunction(&f_kv_write, mod, "att_k_kv_write"))) != AT_OK ||
        (e = CU(cuModuleGetGlobal(&info_d, &info_n, mod, "att_k_info"))) != AT_OK) {
        e = at_diag_set(diag, e, "kernel module lacks an entry point");
        goto out_unload;
    }
    if (info_n != sizeof ms->info) {
        e = at_diag_set(diag, AT_ERR_INTERNAL, "att_k_info has %zu bytes", info_n);
        goto out_unload;
    }
    if ((e = CU(cuMemcpyDtoH(ms->info, info_d, info_n))) != AT_OK)
        goto out_unload;
    const uint32_t smem = ms->info[ATT_KINFO_SMEM_BYTES];
    if (smem > be->smem_optin) {
        e = at_diag_set(diag, AT_ERR_UNSUPPORTED,
                        "head_dim %u needs %u bytes of shared memory per block; %s allows %u",
                        kv->m->head_dim, smem, be->arch, be->smem_optin);
        goto out_unload;
    }
    if (smem > 48u * 1024u &&
        (e = CU(cuFuncSetAttribute(f_attend, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                   (int)smem))) != AT_OK)
        goto out_unload;
    int occ = 0;
    if ((e = CU(cuOccupancyMaxActiveBlocksPerMultiprocessor(
             &occ, f_attend, (int)ms->info[ATT_KINFO_THREADS], smem))) != AT_OK)
        goto out_unload;
    ms->occupancy = occ > 0 ? (uint32_t)occ : 1;
    ms->mod = mod;
    ms->f_attend = f_attend;
    ms->f_kv_write = f_kv_write;
    return AT_OK;
out_unload:
    (void)CU(cuModuleUnload(mod));
    return e;
}

static void unload_mod(att_kv_t *kv, void *mod) {
    cuda_backend_t *be = kv->be;
    if (kv->dl != NULL) /* its job graphs hold the module's functions */
        att_cudl_sess_forget(kv->dl);
    (void)CU(cuModuleUnload((CUmodule)mod));
}

static const att_gpu_loader_t cuda_loader = {.load = load_mod, .unload = unload_mod};

/* NVRTC's options of a tile (the compile queue's att_gpu_opts_fn). */
static void cuda_opts(const void *user, const att_model_t *m, const att_tile_t *t,
                      att_jit_opts_t *o) {
    (void)user;
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

static at_err_t cuda_set_tuning(att_backend_t *base, att_kv_t *kv, const tun_cfg_t *cfg) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    tun_device_t d;
    att_cuda_plan_t plan;
    cuda_tun_device(be, &d);
    session_plan(be, kv->m, &plan);
    if ((e = att_gpu_set_tuning(&kv->mods, &be->cq, &tun_space_cuda_unified, &d, kv->m, cfg,
                                att_cuda_plan_from_cfg, &plan, &kv->plan)) != AT_OK)
        return e;
    plan_partition(be, &kv->plan); /* a config has none: the device's, as at creation */
    part_ensure(kv);
    return AT_OK;
}

static at_err_t cuda_prepare_tuning(att_backend_t *base, const att_model_t *m,
                                    const tun_cfg_t *cfgs, uint32_t n, bool wait) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    return att_gpu_cq_prepare(&be->cq, m, att_cuda_plan_from_cfg, cfgs, n, wait);
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
    const bool lost = atomic_load_explicit(&be->lost, memory_order_relaxed) ||
                      be->drv->cuCtxSetCurrent(be->ctx) != CUDA_SUCCESS;
    att_cudl_sess_destroy(&kv->dl, lost);
    /* Teardown errors are logged by CU and otherwise ignored: there is nothing left to undo.
     * After a sticky fault every call would fail (and log) the same error; the driver frees the
     * context's resources with the context, so nothing is asked of it then. */
    if (!lost) {
        if (kv->stream != NULL) {
            (void)CU(cuStreamSynchronize(kv->stream));
            (void)CU(cuStreamDestroy(kv->stream));
        }
        if (kv->side != NULL)
            (void)CU(cuStreamDestroy(kv->side));
        part_drop(kv);
        if (kv->ev_fork != NULL)
            (void)CU(cuEventDestroy(kv->ev_fork));
        for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
            if (kv->ev_join[k] != NULL)
                (void)CU(cuEventDestroy(kv->ev_join[k]));
        if (kv->ev_begin != NULL)
            (void)CU(cuEventDestroy(kv->ev_begin));
        if (kv->ev_end != NULL)
            (void)CU(cuEventDestroy(kv->ev_end));
        att_gpu_mods_fini(&kv->mods);
        if (kv->pool_d != 0)
            (void)CU(cuMemFree(kv->pool_d));
        if (kv->consts_d != 0)
            (void)CU(cuMemFree(kv->consts_d));
        if (kv->io_d != 0)
            (void)CU(cuMemFree(kv->io_d));
        if (kv->counters_d != 0)
            (void)CU(cuMemFree(kv->counters_d));
        if (kv->tables_d != 0)
            (void)CU(cuMemFree(kv->tables_d));
        if (kv->stage_h != NULL)
            (void)CU(cuMemFreeHost(kv->stage_h));
    }
    lc_destroy(&kv->lc);
    att_gpu_work_fini(&kv->work);
    att_gpu_tables_fini(&kv->tables);
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
    att_gpu_mods_init(&kv->mods, &cuda_loader, kv, kv->lc);
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
    CUresult r = be->drv->cuMemAlloc(&kv->pool_d, pool);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) {
        e = at_diag_set(diag, AT_ERR_NOMEM, "KV pool of %zu MiB does not fit on cuda:%d",
                        pool >> 20, be->ordinal);
        goto out_kv;
    }
    if ((e = cu_check(be, r, "cuMemAlloc(pool)", __FILE__, __LINE__)) != AT_OK ||
        (e = CU(cuMemsetD8(kv->pool_d, 0, pool))) != AT_OK ||
        /* done before the session's (non-blocking) streams can run anything */
        (e = CU(cuStreamSynchronize(NULL))) != AT_OK ||
        (e = CU(cuStreamCreate(&kv->stream, CU_STREAM_NON_BLOCKING))) != AT_OK ||
        (e = CU(cuStreamCreate(&kv->side, CU_STREAM_NON_BLOCKING))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_fork, CU_EVENT_DISABLE_TIMING))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_join[ATT_TILE_WIDE], CU_EVENT_DISABLE_TIMING))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_join[ATT_TILE_NARROW], CU_EVENT_DISABLE_TIMING))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_begin, CU_EVENT_DEFAULT))) != AT_OK ||
        (e = CU(cuEventCreate(&kv->ev_end, CU_EVENT_DEFAULT))) != AT_OK ||
        (e = replace_tables(kv, att_gpu_tables_initial(num_blocks))) != AT_OK)
        goto out_kv;
    kv->tables_cap = att_gpu_tables_initial(num_blocks);
    float *consts_h;
    size_t consts_n;
    if ((e = att_gpu_consts(m, &consts_h, &consts_n)) != AT_OK)
        goto out_kv;
    if (consts_h != NULL) {
        if ((e = CU(cuMemAlloc(&kv->consts_d, consts_n))) == AT_OK)
            e = CU(cuMemcpyHtoD(kv->consts_d, consts_h, consts_n));
        free(consts_h);
        if (e != AT_OK)
            goto out_kv;
    }
    part_ensure(kv);
    if (be->dl != NULL && (e = att_cudl_sess_create(be->dl, &kv->dl)) != AT_OK) {
        if (atomic_load_explicit(&be->lost, memory_order_relaxed))
            goto out_kv;
        at_log(AT_LOG_WARN, "cuda",
               "cuda:%d: a session's launcher failed (%s); its calls launch "
               "from the host",
               be->ordinal, at_err_name(e));
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
    uint32_t b0;
    size_t block_bytes;
    const size_t nb = att_gpu_kv_blocks(m, pos, n, &b0, &block_bytes);
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
    att_gpu_scatter_kv(m, kv->stage_h, block_bytes, pos, n, k_out, v_out);
    return AT_OK;
}

static void cuda_kv_stats(att_backend_t *base, const att_kv_t *kv, att_kv_stats_t *out) {
    (void)base;
    att_gpu_kv_stats(kv->lc, kv->uploads, kv->last_host_ns, kv->last_device_ns, out);
    out->device_calls = kv->device_calls;
    out->launcher_starts = kv->dl_starts + (kv->dl != NULL ? att_cudl_starts(kv->dl) : 0);
}

static at_err_t pin(void *user, void *p, size_t bytes) {
    cuda_backend_t *be = user;
    return CU(
        cuMemHostRegister(p, bytes, CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP));
}

static at_err_t cuda_register_host(att_backend_t *base, void *p, size_t bytes) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    at_err_t e = enter(be);
    if (e != AT_OK)
        return e;
    return att_gpu_regions_add(&be->regs, p, bytes, pin, be);
}

static void cuda_destroy(att_backend_t *base) {
    cuda_backend_t *be = (cuda_backend_t *)base;
    att_gpu_cq_fini(&be->cq);
    if (!atomic_load_explicit(&be->lost, memory_order_relaxed) &&
        be->drv->cuCtxSetCurrent(be->ctx) == CUDA_SUCCESS)
        for (uint32_t i = 0; i < be->regs.n; i++)
            (void)CU(cuMemHostUnregister((void *)be->regs.begin[i]));
    /* every session (and so every stream in these) is gone; each green context holds a
     * reference to the primary context, so they go first, even after a fault */
    pthread_mutex_lock(&be->parts_mu);
    for (uint32_t i = 0; i < be->num_parts; i++)
        for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
            (void)CU(cuGreenCtxDestroy(be->parts[i].green[k]));
    be->num_parts = 0;
    pthread_mutex_unlock(&be->parts_mu);
    pthread_mutex_destroy(&be->parts_mu);
    att_cudl_destroy(&be->dl, atomic_load_explicit(&be->lost, memory_order_relaxed));
    (void)CU(cuDevicePrimaryCtxRelease(be->dev));
    att_jit_destroy(&be->jit);
    att_gpu_regions_fini(&be->regs);
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
    be->dl_engine_bytes = cfg->dl_engine_bytes;
    if (cfg->plan != NULL) {
        be->has_plan = true;
        be->plan = *cfg->plan;
    }
    att_gpu_regions_init(&be->regs);
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
        att_gpu_regions_fini(&be->regs);
        free(be);
        return at_diag_set(diag, e, "cuda:%d: cannot query the device", cfg->device);
    }
    if (major < 8) {
        att_gpu_regions_fini(&be->regs);
        free(be);
        return at_diag_set(diag, AT_ERR_UNSUPPORTED,
                           "cuda:%d is %s, compute capability %d.%d; the kernels need 8.0 or later",
                           cfg->device, name, major, minor);
    }
    if ((e = CU(cuDevicePrimaryCtxRetain(&be->ctx, be->dev))) != AT_OK) {
        att_gpu_regions_fini(&be->regs);
        free(be);
        return at_diag_set(diag, e, "cuda:%d: cannot retain its context", cfg->device);
    }
    be->num_sms = (uint32_t)sms;
    snprintf(be->name, sizeof be->name, "%s", name);
    be->smem_optin = (uint32_t)optin;
    snprintf(be->arch, sizeof be->arch, "sm_%d%d", major, minor);
    snprintf(be->desc, sizeof be->desc, "%s (%s, %d SMs, driver %d.%d)", name, be->arch, sms,
             drv->driver_version / 1000, drv->driver_version % 1000 / 10);
    pthread_mutex_init(&be->parts_mu, NULL); /* from here on cuda_destroy undoes everything */
    char dir[512];
    if (cfg->kernel_cache_dir != NULL)
        snprintf(dir, sizeof dir, "%s", cfg->kernel_cache_dir);
    else
        att_jit_default_dir(dir, sizeof dir);
    if ((e = att_jit_create(dir, diag, &be->jit)) != AT_OK) {
        cuda_destroy(&be->base);
        return e;
    }
    att_gpu_cq_init(&be->cq, be->jit, be->arch, cuda_opts, be, cfg->compile_threads);
    const char *io = getenv("ATTND_CUDA_IO");
    int host_ptr = 0;
    if (cfg->staged_io || (io != NULL && strcmp(io, "staged") == 0))
        at_log(AT_LOG_INFO, "cuda", "cuda:%d: q and out are copied (as asked)", be->ordinal);
    else if (drv->cuDeviceGetAttribute(&host_ptr,
                                       CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
                                       be->dev) != CUDA_SUCCESS ||
             !host_ptr)
        at_log(AT_LOG_WARN, "cuda",
               "cuda:%d: q and out are copied: the device cannot use registered memory at its "
               "host address",
               be->ordinal);
    else
        be->direct_io = true;
    const char *launch = getenv("ATTND_CUDA_LAUNCH");
    if (cfg->host_launches || (launch != NULL && strcmp(launch, "host") == 0)) {
        at_log(AT_LOG_INFO, "cuda", "cuda:%d: calls launch from the host (as asked)", be->ordinal);
    } else {
        at_diag_t dd = {{0}};
        if ((e = enter(be)) != AT_OK)
            at_diag_set(&dd, e, "cannot make the device's context current");
        else
            e = att_cudl_create(drv, be->dev, be->arch, be->num_sms, dl_check, be, &dd, &be->dl);
        if (e == AT_OK)
            att_cudl_set_idle_ns(be->dl, cfg->dl_idle_ns);
        else
            at_log(AT_LOG_WARN, "cuda", "cuda:%d: calls launch from the host: %s", be->ordinal,
                   dd.msg);
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

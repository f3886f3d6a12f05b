/* Tuning support shared by the GPU backends (att_cuda.c, att_hip.c), without a driver call: the
 * compile queue that builds tuning candidates off every call's path, and a session's table of
 * loaded tile modules that a config switch picks from. Each backend keeps its runtime's calls
 * (a module's load and unload: att_gpu_loader_t) and its config space; what a switch does, which
 * slot a module goes to and which one is evicted is decided here, once for both.
 *
 * The rule both follow: set_tuning never compiles. It takes images from the compile cache only
 * (att_jit_lookup: memory, else disk) and answers AT_ERR_NOT_READY otherwise, after queueing
 * every missing compile; prepare_tuning queues candidates, or (wait) compiles them on the
 * caller's thread.
 *
 * Thread: an att_gpu_cq_t is shared by a backend's threads (its mutex guards the queue; its own
 * threads only call att_jit_image, which is thread-safe). An att_gpu_mods_t belongs to one
 * session, used by one thread at a time, never during a run of that session. */
#ifndef AT_ATTENTION_ATT_GPU_TUNE_H
#define AT_ATTENTION_ATT_GPU_TUNE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "attention/att_backend.h"
#include "attention/att_cuda.h"
#include "attention/att_gpu_run.h"
#include "attention/att_jit.h"
#include "attention/att_kparams.h"
#include "cache/lc.h"
#include "common/at_base.h"

/* Loaded tile modules per session (both kinds). */
#define ATT_GPU_MOD_SLOTS 8u
/* Queued compiles; more are dropped (set_tuning queues them again). */
#define ATT_GPU_COMPILE_QUEUE 256u
#define ATT_GPU_MAX_COMPILERS 32u

/* ---- the compile queue ---- */

/* A backend's compile options of tile t for model m (att_jit_model_opts for NVRTC,
 * att_hip_model_opts with the device's wave for hiprtc); user is the backend. */
typedef void (*att_gpu_opts_fn)(const void *user, const att_model_t *m, const att_tile_t *t,
                                att_jit_opts_t *o);

typedef struct att_gpu_cq {
    att_jit_t *jit;   /* borrowed: the backend's; NULL: never initialized */
    const char *arch; /* borrowed: the compile target */
    att_gpu_opts_fn opts; /* the backend's function, called with user */
    const void *user;   /* borrowed: opts' user */
    uint32_t n_threads; /* compile threads to start on first use */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    att_jit_opts_t queue[ATT_GPU_COMPILE_QUEUE] AT_GUARDED_BY(mu); /* FIFO ring */
    uint32_t head AT_GUARDED_BY(mu), len AT_GUARDED_BY(mu);
    pthread_t threads[ATT_GPU_MAX_COMPILERS] AT_GUARDED_BY(mu);
    uint32_t n_started AT_GUARDED_BY(mu);
    bool stop AT_GUARDED_BY(mu);
} att_gpu_cq_t;

/* Sets up q to compile with jit for arch (both outlive q) with opts; n_threads 0 is one, more
 * than ATT_GPU_MAX_COMPILERS is that many. Threads start on the first queued compile. */
void att_gpu_cq_init(att_gpu_cq_t *q, att_jit_t *jit, const char *arch, att_gpu_opts_fn opts,
                     const void *user, uint32_t n_threads);

/* Stops and joins q's threads (queued compiles are dropped). A zeroed q that was never
 * initialized is left alone. */
void att_gpu_cq_fini(att_gpu_cq_t *q);

/* The compile options of tile t for m, zeroed first so queued entries compare bytewise. */
void att_gpu_cq_opts(const att_gpu_cq_t *q, const att_model_t *m, const att_tile_t *t,
                     att_jit_opts_t *o);

/* prepare_tuning's work: the two tiles of every config of cfgs[n] (mapped by from_cfg) queued
 * when missing, or (wait) compiled now on this thread; returns the first compile error (wait
 * only). Any thread. */
at_err_t att_gpu_cq_prepare(att_gpu_cq_t *q, const att_model_t *m,
                            void (*from_cfg)(const tun_cfg_t *c, att_cuda_plan_t *out),
                            const tun_cfg_t *cfgs, uint32_t n, bool wait);

/* ---- a session's loaded modules ---- */

/* A loaded module: one tile kind compiled with one tile. Handles are the backend's (CUDA: the
 * CUmodule and CUfunctions; HIP: a record of the hipModule_t and its image, att_hip.c, and the
 * hipFunction_t: pointers in both). */
typedef struct att_gpu_mod {
    void *mod; /* owned by the slot table: made by ld->load, freed through ld->unload (eviction,
                * att_gpu_mods_fini) or ld->forget (att_gpu_mods_forget); NULL: the slot is free */
    uint32_t kind;
    att_tile_t tile;
    void *f_attend, *f_kv_write; /* mod's kernels: invalid once mod is unloaded */
    uint32_t info[ATT_KINFO_COUNT]; /* the module's att_k_info */
    uint32_t occupancy; /* blocks of f_attend one SM runs at once (the runtime's figure) */
    uint64_t used; /* the session's switch count when last chosen: least recent goes */
} att_gpu_mod_t;

/* A backend's module calls, for a session kv. */
typedef struct att_gpu_loader {
    /* Loads image img (bytes long; borrowed for the call: the backend keeps its own copy if
     * its runtime may read the image later) as out->kind with out->tile: sets out->mod, its
     * kernels and info. AT_ERR_UNSUPPORTED with diag when the module cannot run on the device;
     * on any error nothing stays loaded. */
    at_err_t (*load)(att_kv_t *kv, const void *img, size_t bytes, att_gpu_mod_t *out,
                     at_diag_t *diag);
    /* Unloads a module load made (no run of kv is in flight); errors are logged only. */
    void (*unload)(att_kv_t *kv, void *mod);
    /* The device is gone (a sticky fault): frees what the module's record holds on the host,
     * asking nothing of the runtime. NULL: the record is the runtime's handle alone. */
    void (*forget)(att_kv_t *kv, void *mod);
} att_gpu_loader_t;

typedef struct att_gpu_mods {
    const att_gpu_loader_t *ld; /* borrowed, static */
    att_kv_t *kv;               /* borrowed: the session these modules belong to */
    lc_t *lc;                   /* borrowed: its launch cache */
    att_gpu_mod_t slot[ATT_GPU_MOD_SLOTS];
    uint32_t cur[ATT_TILE_KINDS]; /* the slot of each kind's current module; its index is the
                                   * tile byte of the launch-cache keys */
    uint64_t switches;
} att_gpu_mods_t;

/* An empty table for session kv with launch cache lc. */
void att_gpu_mods_init(att_gpu_mods_t *s, const att_gpu_loader_t *ld, att_kv_t *kv, lc_t *lc);

/* Unloads every loaded module. A zeroed table has none. */
void att_gpu_mods_fini(att_gpu_mods_t *s);
/* As att_gpu_mods_fini on a device that is gone: the loader's forget, not its unload. */
void att_gpu_mods_forget(att_gpu_mods_t *s);

/* A new session's first module of kind, with tile t: f's image (att_gpu_fetch_images) loaded as
 * kind's current module (slot `kind`); a compile counts in the launch cache's figures. f's error
 * and diag when the fetch failed. */
at_err_t att_gpu_mods_load_first(att_gpu_mods_t *s, uint32_t kind, const att_tile_t *t,
                                 const att_gpu_fetch_t *f, at_diag_t *diag);

/* The current module of a tile kind. */
const att_gpu_mod_t *att_gpu_mods_cur(const att_gpu_mods_t *s, uint32_t kind);

/* set_tuning's switch to tiles[] (of model m): each kind's module found loaded, or loaded from
 * the compile cache into a free slot or the least recently chosen one (unloaded, and its
 * prepared launches forgotten). AT_ERR_NOT_READY, nothing changed, when an image is not compiled
 * (every missing one is queued on q first). AT_ERR_CONFIG when one does not compile or cannot
 * run on the device, and driver errors: the current modules stay current, but the other kind's
 * module may have been loaded, and a module evicted, on the way (each is found or loaded again
 * when asked for). */
at_err_t att_gpu_mods_switch(att_gpu_mods_t *s, att_gpu_cq_t *q, const att_model_t *m,
                             const att_tile_t tiles[ATT_TILE_KINDS]);

/* set_tuning's work for session s of model m: cfg (NULL: *plan, which holds the session's
 * default plan on entry) checked against space on device d and mapped by from_cfg into *plan,
 * then its tiles switched to (att_gpu_mods_switch) and *cur set to *plan. AT_ERR_CONFIG when cfg
 * is not a valid config there, then the switch's errors; *cur is unchanged on any error. */
at_err_t att_gpu_set_tuning(att_gpu_mods_t *s, att_gpu_cq_t *q, const tun_space_t *space,
                            const tun_device_t *d, const att_model_t *m, const tun_cfg_t *cfg,
                            void (*from_cfg)(const tun_cfg_t *c, att_cuda_plan_t *out),
                            att_cuda_plan_t *plan, att_cuda_plan_t *cur);

/* The prepared launch of (kernel, kind's current module, split): from the session's launch
 * cache, or built once from the module with the session's constants (model m, consts_d and
 * num_blocks as att_gpu_launch_init takes them). */
at_err_t att_gpu_mods_prepared(const att_gpu_mods_t *s, const att_model_t *m, uint64_t consts_d,
                               uint32_t num_blocks, uint32_t kernel, uint32_t kind, uint32_t split,
                               const lc_launch_t **out);

#endif

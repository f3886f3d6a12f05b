/* The HIP backend: attention on an AMD GPU (MI200/MI300 class) through the HIP runtime
 * (libamdhip64 loaded at run time, att_hiprt.h) with kernels compiled per model by hiprtc from the
 * CUDA backend's kernel source (attention/kernels/att_unified.cu through att_port.h). The same
 * design as att_cuda.h, function for function: a session owns its KV pool, streams, its loaded
 * modules (one per tile kind and config, up to 8: att_gpu_tune.h), launch cache (cache/lc.h) and
 * per-call buffers; the work is cut by the shared
 * planner (att_gpu_plan.h); every hipError_t is checked by one macro, and after a sticky fault the
 * backend is lost and later calls fail fast with AT_ERR_DEVICE.
 *
 * The kernels run the portable FMA body (ATT_PORTABLE_MATH) with the device's wave size; nothing
 * has run on AMD hardware yet (README). The test double tests/hipshim/ runs this backend on an
 * NVIDIA GPU (ATTND_HIP_LIB), which is how its host code is tested on real hardware.
 * Tuning: as the CUDA backend's (set_tuning never compiles; candidates compile on the backend's
 * threads), over tun_space_hip_unified (the FMA body's rows and waves, the split and mixed-batch
 * knobs), into the same tuning store: the device key names the architecture without its feature
 * flags ("gfx90a", att_hip_arch) and the device's name.
 *
 * Thread: a backend may be used from several threads (each entry makes the device current);
 * run() and read_kv() of one att_kv_t are serialized by the caller. */
#ifndef AT_ATTENTION_ATT_HIP_H
#define AT_ATTENTION_ATT_HIP_H

#include <stdbool.h>
#include <stdint.h>

#include "attention/att_backend.h"
#include "attention/att_cuda.h"
#include "attention/att_jit.h"
#include "common/at_err.h"

typedef struct att_hip_cfg {
    int device;                   /* ordinal: "hip:N" */
    const char *kernel_cache_dir; /* NULL: att_jit_default_dir(); "": memory only */
    bool timing;                  /* measure each run's device time (benches; costs two events) */
    /* NULL: att_hip_plan_default per model; else as att_cuda_cfg_t.plan (copied). */
    const att_cuda_plan_t *plan;
    /* Threads that compile tuning candidates in the background (0: one; `attnd tune` uses every
     * CPU). Started on first use. */
    uint32_t compile_threads;
} att_hip_cfg_t;

/* The plan for model m on an AMD GPU: the heuristic of tun_space_hip_unified (tuning/tun_space.c,
 * the one place its default tiles and thresholds are chosen) through att_hip_plan_from_cfg.
 * Pure; any thread. */
void att_hip_plan_default(const att_model_t *m, att_cuda_plan_t *out);

/* The plan of a config of tun_space_hip_unified (valid: tun_cfg_valid): the wide tile's
 * (rows, waves) as tun_hip_tile's knobs, the narrow tile's waves over 16 rows, keys per stage and
 * stages fixed (the FMA body ignores them). Pure; any thread. */
void att_hip_plan_from_cfg(const tun_cfg_t *cfg, att_cuda_plan_t *out);

/* The tuning key of the device (backend "hip", its name, the bare architecture, the HIP runtime
 * version, "hiprtc X.Y", CUs, LDS per block) and the hash of the embedded kernel source
 * (borrowed, static). Any thread. */
void att_hip_tune_device(const att_backend_t *be, tun_device_t *d, const char **kernel_hash);

/* hiprtc's options for model m with tile t on a device of `wave` threads per wave: language
 * level, ATT_PORTABLE_MATH=1, ATT_WAVE, then att_jit_model_defines. */
void att_hip_model_opts(const att_model_t *m, const att_tile_t *t, uint32_t wave,
                        att_jit_opts_t *o);

/* An image cache whose compiler is hiprtc (needs no GPU: the kernel compile test uses it);
 * AT_ERR_UNSUPPORTED with diag when the HIP library or hiprtc cannot be loaded. */
at_err_t att_hip_jit_create(const char *cache_dir, at_diag_t *diag, att_jit_t **out);

/* AT_ERR_UNSUPPORTED with diag when there is no HIP runtime, no AMD GPU or no such device;
 * AT_ERR_DEVICE when the device cannot be set up. On success *out is the caller's
 * (att_backend_destroy). */
at_err_t att_hip_create(const att_hip_cfg_t *cfg, at_diag_t *diag, att_backend_t **out);

/* Devices the runtime sees; 0 (and diag says why) without a runtime or GPU. Any thread. */
int att_hip_device_count(at_diag_t *diag);

/* "AMD Instinct MI250X (gfx90a, 110 CUs, wave 64, HIP runtime 5.2, libamdhip64.so.5)". */
const char *att_hip_describe(const att_backend_t *be);

/* The architecture without its feature flags: "gfx90a" (the tuning store's device key). */
const char *att_hip_arch(const att_backend_t *be);

/* True when the backend has seen a sticky fault; later calls fail with AT_ERR_DEVICE. */
bool att_hip_lost(const att_backend_t *be);

/* The backend's compile cache figures. */
void att_hip_jit_stats(const att_backend_t *be, att_jit_stats_t *out);

#endif

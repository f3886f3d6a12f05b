/* The CUDA backend: attention on an NVIDIA GPU through the Driver API (libcuda loaded at run
 * time) with kernels compiled per model by NVRTC (attention/att_jit.h).
 *
 * A session (att_kv_t) owns: its KV pool (one allocation at creation), a stream, its kernel
 * modules (one per tile kind, wide and narrow, and config: the plan's two at creation, up to 8
 * as set_tuning switches; compiled with the model's constants, or found in the image cache),
 * its launch cache (cache/lc.h) and its per-call buffers. A run uploads the call's
 * metadata and tensors, launches the attention (the KV write is fused into it; long contexts
 * over few sequences are split and merged), copies out back and returns when it is in host
 * memory; untimed runs' kernels read q and write out in host memory themselves where they can
 * (att_cuda.c, "direct I/O"). Every CUresult is checked (one macro: file:line and the driver's
 * error name in the log, AT_ERR_DEVICE to the caller); after a sticky fault (a kernel's illegal
 * address, say) the backend is marked lost and every later call fails fast with AT_ERR_DEVICE.
 *
 * Thread: a backend may be used from several threads (each entry makes the device's primary
 * context current); run() and read_kv() of one att_kv_t are serialized by the caller. */
#ifndef AT_ATTENTION_ATT_CUDA_H
#define AT_ATTENTION_ATT_CUDA_H

#include <stdbool.h>
#include <stdint.h>

#include "attention/att_backend.h"
#include "attention/att_jit.h"
#include "common/at_err.h"

/* How a session's work is cut: the tile configuration of each kind's module (compile-time knobs,
 * att_jit.h) and the split-KV (flash-decoding) thresholds of the per-call plan. This is the whole
 * configuration space a tuner searches, but for mixed_wide_sms (not tuned yet) and the test and
 * bench switches mixed_part_always and tail_unsplit. */
typedef struct att_cuda_plan {
    att_tile_t tile[ATT_TILE_KINDS];
    uint32_t min_split_keys; /* a tile's keys are split only into parts of at least this many */
    uint32_t max_splits;     /* parts per tile, at most */
    /* Blocks per SM that count as one wave when splits are chosen; ATT_CUDA_OCCUPANCY: as many
     * as the attend kernel's occupancy lets one SM run at once. */
    uint32_t blocks_per_sm;
    /* A batch with both kinds (decode tokens next to a prefill chunk): its wide tiles are split
     * into parts of about this many keys, so the chunk's work comes in blocks about as short
     * as the decode ones; ATT_CUDA_NEVER: not split for that reason. */
    uint32_t mixed_split_keys;
    uint32_t mixed_order;    /* ATT_CUDA_NARROW_FIRST or ATT_CUDA_WIDE_FIRST */
    /* A batch with both kinds: 0 runs both on every SM (the wide ones on a side stream); N > 0
     * runs the wide tiles in a green context of about N SMs (the driver rounds: on sm_90 a
     * multiple of 8, at least 8) and the narrow ones in one of the remaining SMs, so the
     * compute-bound chunk and the memory-bound decode share the GPU in space, not in turns,
     * when the batch's proportions suit it (att_gpu_plan_batch). Each kind's splits then count
     * its own partition's SMs. Not in the tuning space: the backend sets it from the device
     * (48 of an H200's 132 SMs with the wgmma wide tile; else 0) for the default and for tuned
     * configs alike. In overrides (att_cuda_cfg_t.plan) ATT_CUDA_NEVER means 0. The HIP backend
     * ignores it. */
    uint32_t mixed_wide_sms;
    /* Tests and benches: every batch with both kinds takes the partition, whatever its
     * proportions. */
    bool mixed_part_always;
    /* Benches: a kind's last, partial wave keeps its tiles whole (att_gpu_plan_batch). */
    bool tail_unsplit;
} att_cuda_plan_t;

#define ATT_CUDA_NEVER 0xffffffffu
#define ATT_CUDA_OCCUPANCY 0xfffffffeu
#define ATT_CUDA_NARROW_FIRST 1u
#define ATT_CUDA_WIDE_FIRST 2u

typedef struct att_cuda_cfg {
    int device;                   /* ordinal: "cuda:N" */
    const char *kernel_cache_dir; /* NULL: att_jit_default_dir(); "": memory only */
    bool timing;                  /* measure each run's device time (benches; costs two events) */
    /* NULL: att_cuda_plan_default per model. Else every session takes from it each tile whose
     * warps_m is not 0 and each split threshold or mixed knob that is not 0 (benches, tuning);
     * copied. */
    const att_cuda_plan_t *plan;
    /* Threads that compile tuning candidates in the background (0: one; a server's worker
     * leaves it so, `attnd tune` uses every CPU). Started on first use. */
    uint32_t compile_threads;
    /* Every call launches from the host, none from the device (attention/att_cudl.h): tests and
     * comparisons. The environment's ATTND_CUDA_LAUNCH=host asks the same of every backend. */
    bool host_launches;
    /* Every call's q and out are copied between host and device memory around the kernels, as
     * timed calls' always are (attention/att_cuda.c, "direct I/O"): tests and comparisons. The
     * environment's ATTND_CUDA_IO=staged asks the same of every backend. */
    bool staged_io;
    /* A device-launched call's inputs (q, k, v) of more bytes than this go by the copy engine
     * (attention/att_cudl.h), as they do anyway where its SMs would copy more than
     * ATT_CUDL_MAX_COPY_BYTES. 0: only then. Tests set it low to take that way with small calls. */
    uint64_t dl_engine_bytes;
    /* How long a session's device-side launcher polls without a job before it ends (ns; 0:
     * ATT_CUDL_IDLE_NS, 2 ms). Tests shorten it to see the launcher wait for a job whose inputs
     * are still on their way. */
    uint64_t dl_idle_ns;
} att_cuda_cfg_t;

/* The plan for model m on a device of architecture arch ("sm_90": the wgmma wide tile where the
 * model allows it) that allows smem_optin bytes of shared memory per block: the heuristic of the
 * tuning space (tuning/tun_space.c's cuda_heuristic, the one place default tiles and split
 * thresholds are chosen; figures in docs/BENCHMARKS.md) through att_cuda_plan_from_cfg. Pure;
 * any thread. */
void att_cuda_plan_default(const att_model_t *m, const char *arch, uint32_t smem_optin,
                           att_cuda_plan_t *out);

/* The plan of a config of tun_space_cuda_unified (valid: tun_cfg_valid). Pure; any thread. */
void att_cuda_plan_from_cfg(const tun_cfg_t *cfg, att_cuda_plan_t *out);

/* The tuning key of the device (name, sm_XY, driver and NVRTC versions, SMs, shared memory per
 * block) and the hash of the embedded kernel source (borrowed, static). Any thread. */
void att_cuda_tune_device(const att_backend_t *be, tun_device_t *d, const char **kernel_hash);

/* AT_ERR_UNSUPPORTED with diag when there is no driver, no such device or no NVRTC;
 * AT_ERR_DEVICE when the device cannot be set up. On success *out is the caller's
 * (att_backend_destroy). */
at_err_t att_cuda_create(const att_cuda_cfg_t *cfg, at_diag_t *diag, att_backend_t **out);

/* Devices the driver sees; 0 (and diag says why) without a driver. Any thread. */
int att_cuda_device_count(at_diag_t *diag);

/* "NVIDIA H200 (sm_90, 132 SMs, driver 13.0)". */
const char *att_cuda_describe(const att_backend_t *be);

/* "sm_90". */
const char *att_cuda_arch(const att_backend_t *be);

/* True when the backend has seen a sticky fault; later calls fail with AT_ERR_DEVICE. */
bool att_cuda_lost(const att_backend_t *be);

/* The backend's compile cache figures. */
void att_cuda_jit_stats(const att_backend_t *be, att_jit_stats_t *out);

#endif

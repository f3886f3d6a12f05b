/* The CUDA backend: attention on an NVIDIA GPU through the Driver API (libcuda loaded at run
 * time) with kernels compiled per model by NVRTC (attention/att_jit.h).
 *
 * A session (att_kv_t) owns: its KV pool (one allocation at creation), a stream, its two kernel
 * modules (tile kinds wide and narrow, compiled with the model's constants, or found in the
 * image cache), its launch cache (cache/lc.h) and its per-call buffers. A run uploads the call's
 * metadata and tensors, launches the attention (the KV write is fused into it; long contexts
 * over few sequences are split and merged), copies out back and returns when it is in host
 * memory. Every CUresult is checked (one macro: file:line and the driver's error name in the log,
 * AT_ERR_DEVICE to the caller); after a sticky fault (a kernel's illegal address, say) the
 * backend is marked lost and every later call fails fast with AT_ERR_DEVICE.
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

typedef struct att_cuda_cfg {
    int device;                   /* ordinal: "cuda:N" */
    const char *kernel_cache_dir; /* NULL: att_jit_default_dir(); "": memory only */
    bool timing;                  /* measure each run's device time (benches; costs two events) */
} att_cuda_cfg_t;

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

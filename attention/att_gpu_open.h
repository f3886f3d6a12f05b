/* Opening a GPU backend by its device name, as the server's workers and `attnd tune` take it.
 * Thread: any. */
#ifndef AT_ATTENTION_ATT_GPU_OPEN_H
#define AT_ATTENTION_ATT_GPU_OPEN_H

#include <stdint.h>

#include "attention/att_backend.h"
#include "common/at_err.h"

/* The backend of the GPU named "cuda:N" or "hip:N" (N from 0 to 1024), whose tuning candidates
 * compile on compile_threads threads (0: one), with the default kernel cache directory.
 * AT_ERR_DEVICE_UNKNOWN (diag says why) for any other name or a kind this build lacks; else
 * what att_cuda_create or att_hip_create returns. On success *out is the caller's
 * (att_backend_destroy). */
at_err_t att_gpu_open(const char *device, uint32_t compile_threads, at_diag_t *diag,
                      att_backend_t **out);

#endif

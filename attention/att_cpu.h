/* The CPU backend: attnd's embedded default and the reference every GPU backend is tested
 * against. A pool of threads splits each call into (sequence chunk, KV head, query tile) work
 * items; each runs online softmax over KV tiles (never a T x S score matrix). */
#ifndef AT_ATTENTION_ATT_CPU_H
#define AT_ATTENTION_ATT_CPU_H

#include <stdint.h>

#include "attention/att_backend.h"

typedef struct att_cpu_cfg {
    uint32_t num_threads;    /* 0 = one per online CPU */
    uint32_t tile_rows;      /* query rows (tokens x grouped heads) per work item; 0 = 64 */
    uint32_t force_portable; /* 1 = never use the x86-64-v3 kernels (tests compare both paths) */
} att_cpu_cfg_t;

/* AT_ERR_NOMEM, or AT_ERR_INTERNAL when threads cannot be started. On success *out is the
 * caller's (att_backend_destroy). Thread: any; runs of different sessions are serialized inside
 * the backend, each using every thread. */
at_err_t att_cpu_create(const att_cpu_cfg_t *cfg, att_backend_t **out);

/* Which kernel set a CPU backend runs: "x86-64-v3" or "portable". */
const char *att_cpu_isa(const att_backend_t *be);

#endif

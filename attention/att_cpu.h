/* The CPU backend: attnd's embedded default and the reference every GPU backend is tested
 * against. A pool of threads splits each call into (sequence chunk, KV head, query tile) work
 * items; each runs online softmax over KV tiles (never a T x S score matrix). */
#ifndef AT_ATTENTION_ATT_CPU_H
#define AT_ATTENTION_ATT_CPU_H

#include <stdbool.h>
#include <stdint.h>

#include "attention/att_backend.h"

/* Builds of the one kernel source; the backend runs the best one the CPU supports unless told. */
typedef enum att_cpu_isa {
    ATT_CPU_ISA_BEST = 0,
    ATT_CPU_ISA_PORTABLE = 1, /* whatever the compiler's default target is */
    ATT_CPU_ISA_X86V3 = 2,    /* x86-64-v3: AVX2, FMA, F16C */
    ATT_CPU_ISA_X86V4 = 3,    /* x86-64-v4: AVX-512 F/BW/CD/DQ/VL */
} att_cpu_isa_t;

typedef struct att_cpu_cfg {
    uint32_t num_threads; /* 0 = one per online CPU */
    uint32_t tile_rows;   /* query rows (tokens x grouped heads) per work item until a session
                           * is tuned; 0 = 64 */
    att_cpu_isa_t isa;    /* tests and benches pin a build; 0 = the best one */
} att_cpu_cfg_t;

/* AT_ERR_UNSUPPORTED when cfg->isa is not built in or this CPU lacks it, AT_ERR_NOMEM, or
 * AT_ERR_INTERNAL when threads cannot be started. On success *out is the caller's
 * (att_backend_destroy). Thread: any; runs of different sessions are serialized inside the
 * backend, each using every thread. */
at_err_t att_cpu_create(const att_cpu_cfg_t *cfg, att_backend_t **out);

/* True when att_cpu_create would accept isa on this machine. Any thread. */
bool att_cpu_isa_supported(att_cpu_isa_t isa);

/* "x86-64-v4", "x86-64-v3", "portable" or "best"; "unknown" outside the enum. */
const char *att_cpu_isa_name(att_cpu_isa_t isa);

/* Which kernel build a CPU backend runs (never "best"). */
const char *att_cpu_isa(const att_backend_t *be);

/* The threads of a CPU backend's runs, the caller's included. */
uint32_t att_cpu_threads(const att_backend_t *be);

/* SHA-256 (hex) of the CPU kernel's source files, fixed at build time: part of its tuning key.
 *
 * Tuning (ops->set_tuning, per session, config space tun_space_cpu): tile_rows (query rows per
 * work item, 1..4096; cfg->tile_rows until tuned), key_tile (keys per inner tile, 1..64, a
 * divisor of the block size or at least it; 64 until tuned) and items_per_thread (heads are
 * split until a run has that many items per thread, 1..256; 4 until tuned). */
const char *att_cpu_kernel_hash(void);

#endif

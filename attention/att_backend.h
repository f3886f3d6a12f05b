/* The backend interface: what a device (CPU, a CUDA GPU, a HIP GPU) implements.
 *
 * A backend owns a device and, per model session, that session's KV storage (att_kv_t). Above it,
 * att_ctx validates a call and asks kvc for block numbers; the backend only moves bytes and
 * computes. run() receives a fully checked batch, so it fails only for the device's own reasons
 * (AT_ERR_DEVICE, AT_ERR_NOMEM before any write).
 *
 * Made with GPUs and worker processes in mind: the batch carries plain values and host pointers
 * (tensors in memory the caller owns; in the worker process that is shared memory registered for
 * DMA), block tables as block numbers, never device pointers. A GPU backend uploads the tables,
 * enqueues the KV write and the attention on the session's stream and returns when the output is
 * in host memory. run() is synchronous: calls overlap on a device across its workers (each
 * session has its own stream; --workers-per-device, threads sharing one context), not within one
 * worker.
 *
 * Thread: a backend may be called from several threads; run() on one att_kv_t is serialized by
 * the caller (att_ctx). */
#ifndef AT_ATTENTION_ATT_BACKEND_H
#define AT_ATTENTION_ATT_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "attention/att_model.h"
#include "common/at_err.h"
#include "tuning/tun.h"

typedef struct att_backend att_backend_t;
typedef struct att_kv att_kv_t;

/* One chunk of a batch. Its rows live wherever the caller put them: a batch may merge several
 * calls whose tensors are separate buffers, so every chunk names its own rows. */
typedef struct att_batch_chunk {
    uint32_t token_offset;  /* rows of the chunks before this one, in batch order */
    uint32_t start_pos;     /* new keys go to start_pos..start_pos+num_tokens-1 */
    uint32_t num_tokens;
    uint32_t num_blocks;
    const uint32_t *blocks; /* borrowed for the run; [num_blocks] block numbers of the sequence */
    /* The table's identity (kvc_append_ident): a backend that keeps a copy of the table made
     * under the same (table_slot, table_stamp) may take it as a prefix of blocks. Stamp 0: no
     * identity (the backend takes the whole table from blocks). */
    uint32_t table_slot;
    uint64_t table_stamp;
    const void *q;          /* borrowed; [num_tokens, Hq, D]; NULL when the batch only appends */
    const void *k;          /* borrowed; [num_tokens, Hkv, D] */
    const void *v;          /* borrowed; [num_tokens, Hkv, D] */
    void *out;              /* borrowed; [num_tokens, Hq, D]; NULL when the batch only appends */
} att_batch_chunk_t;

typedef struct att_batch {
    uint32_t layer;
    uint32_t num_chunks;
    uint32_t total_tokens;
    int attend;                      /* 0: write k and v only (q and out are NULL) */
    const att_batch_chunk_t *chunks; /* borrowed for the run; [num_chunks] */
} att_batch_t;

/* A session's launch and compile figures (backends without a launch cache report zeros). */
typedef struct att_kv_stats {
    uint64_t lc_hits;         /* launch-cache lookups that found a prepared launch */
    uint64_t lc_misses;
    uint64_t compiles;        /* kernels compiled for this session (0 when all came from cache) */
    uint64_t launches;
    uint64_t launch_host_ns;  /* host time spent launching, summed */
    uint64_t uploads;         /* host-to-device copy calls, summed */
    uint64_t last_host_ns;    /* the last run: host time from entry to its last launch enqueued */
    uint64_t last_device_ns;  /* the last run's device time (kernels only), when timing is on */
    uint64_t device_calls;    /* runs launched from the device (CUDA: attention/att_cudl.h) */
    /* launches of the device-side launcher from the host (CUDA: the first, and those after its
     * idle spell, a quit or a failed relaunch of itself), a host cost of device-launched runs */
    uint64_t launcher_starts;
} att_kv_stats_t;

typedef struct att_backend_ops {
    const char *name; /* "cpu", "cuda", "hip" */
    /* KV storage of num_blocks blocks for model m (borrowed: m outlives the storage), and
     * whatever else the session needs on the device (a GPU: its compiled kernels).
     * AT_ERR_NOMEM when the device cannot hold it, AT_ERR_UNSUPPORTED when the backend has no
     * kernel for m, AT_ERR_DEVICE; diag (may be NULL) says why. */
    at_err_t (*kv_create)(att_backend_t *be, const att_model_t *m, uint32_t num_blocks,
                          att_kv_t **out, at_diag_t *diag);
    void (*kv_destroy)(att_backend_t *be, att_kv_t **kv);
    /* Writes the batch's k and v into its blocks, then (attend != 0) computes out. Returns when
     * out is complete. */
    at_err_t (*run)(att_backend_t *be, att_kv_t *kv, const att_batch_t *b);
    /* Copies n cached rows from position pos of one sequence (its block table) at layer into
     * k_out and v_out, each [n, Hkv, D] in the model's dtype. */
    at_err_t (*read_kv)(att_backend_t *be, att_kv_t *kv, uint32_t layer, const uint32_t *blocks,
                        uint32_t pos, uint32_t n, void *k_out, void *v_out);
    void (*destroy)(att_backend_t *be);
    /* Optional (NULL: nothing to report). */
    void (*kv_stats)(att_backend_t *be, const att_kv_t *kv, att_kv_stats_t *out);
    /* Optional (NULL: not needed). Makes [p, p + bytes) of host memory, which outlives the
     * backend, directly usable for device copies (a GPU pins it for DMA once): the service's
     * shared-memory arena, so tensors need no staging copy. AT_ERR_DEVICE when it cannot. */
    at_err_t (*register_host)(att_backend_t *be, void *p, size_t bytes);
    /* Optional (NULL: the backend has no knobs to tune). The config space of its kernel
     * (tuning/tun.h); tuning_space and set_tuning are both set or both NULL. */
    const tun_space_t *tuning_space;
    /* Runs kv's later calls with cfg, a config of tuning_space (NULL: the backend's heuristic).
     * AT_ERR_CONFIG, kv unchanged, when cfg does not fit the space or kv's model. Called by the
     * owner of kv, never during a run of kv. */
    at_err_t (*set_tuning)(att_backend_t *be, att_kv_t *kv, const tun_cfg_t *cfg);
    /* Backends that compile per config (a GPU) also answer set_tuning with AT_ERR_NOT_READY,
     * kv unchanged, while cfg's kernels are not compiled yet; they never compile inside
     * set_tuning, which runs on a call's path. */
    /* Optional (NULL: configs need no preparation; set only with set_tuning). Makes the kernels
     * of cfgs[n] (configs of tuning_space for model m, borrowed for the call) ready for
     * set_tuning: wait compiles the missing ones on the calling thread before returning (a
     * session's creation, for its stored configs: its first call then compiles nothing); else
     * they are queued for the backend's compile threads and the call returns at once (a tuning
     * job's next candidates). Returns the first compile error (wait only). Any thread. */
    at_err_t (*prepare_tuning)(att_backend_t *be, const att_model_t *m, const tun_cfg_t *cfgs,
                               uint32_t n, bool wait);
    /* Optional (NULL: the backend cannot time its runs). Records the device time of kv's runs
     * (att_kv_stats_t.last_device_ns) whether or not the backend times every session: tuning
     * copies are timed this way, without the host's copies. */
    void (*kv_timing)(att_backend_t *be, att_kv_t *kv, bool on);
} att_backend_ops_t;

/* Every backend struct starts with this. */
struct att_backend {
    const att_backend_ops_t *ops;
};

/* Frees *be (NULL allowed) and sets it to NULL. Every att_kv_t of it must be gone. */
static inline void att_backend_destroy(att_backend_t **be) {
    if (be != NULL && *be != NULL) {
        (*be)->ops->destroy(*be);
        *be = NULL;
    }
}

#endif

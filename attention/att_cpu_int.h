/* Private to attention/: what the CPU backend's pool hands to its kernels. */
#ifndef AT_ATTENTION_ATT_CPU_INT_H
#define AT_ATTENTION_ATT_CPU_INT_H

#include <stdint.h>

#include "attention/att_backend.h"
#include "attention/att_model.h"

/* Keys per inner tile at most (the scratch's row stride); a run's tile is the session's tuned
 * key tile, bounded by the block, so a tile's rows are contiguous in memory. */
#define ATT_CPU_KEY_TILE 64u

/* One work item: query tokens [q_begin, q_begin + q_count) of one chunk against KV heads
 * [kv_head, kv_head + num_heads), with all query heads of each head's group. Decode items take
 * many heads, so that a block's heads, adjacent in memory, are read as one stream; prefill items
 * take one head and many tokens, so that each converted key tile serves many rows. */
typedef struct att_cpu_item {
    uint32_t chunk;
    uint32_t kv_head;
    uint32_t num_heads;
    uint32_t q_begin;
    uint32_t q_count;
    uint64_t cost; /* rows x keys, to schedule the longest items first */
} att_cpu_item_t;

typedef struct att_cpu_job {
    const att_model_t *m;
    const att_batch_t *b;
    const uint8_t *k_layer; /* [num_blocks, Hkv, block_size, D] keys of the batch's layer */
    const uint8_t *v_layer; /* [num_blocks, Hkv, block_size, D] values of the batch's layer */
    uint32_t window;        /* the layer's sliding window; 0 = none */
    uint32_t key_tile;      /* keys per inner tile, at most ATT_CPU_KEY_TILE (tuning) */
} att_cpu_job_t;

/* Per-thread scratch, sized by att_cpu for the job's largest item. */
typedef struct att_cpu_scratch {
    float *q;  /* [rows, D] scaled queries */
    float *o;  /* [rows, D] unnormalized outputs */
    float *m;  /* [rows] running maxima */
    float *l;  /* [rows] running denominators */
    float *s;  /* [4, ATT_CPU_KEY_TILE] a row group's scores, then probabilities */
} att_cpu_scratch_t;

typedef void (*att_cpu_kern_fn)(const att_cpu_job_t *job, const att_cpu_item_t *it,
                                att_cpu_scratch_t *sc);

/* The same kernel built for several instruction sets (att_cpu_kern_impl.h). */
void att_cpu__kern_portable(const att_cpu_job_t *job, const att_cpu_item_t *it,
                            att_cpu_scratch_t *sc);
void att_cpu__kern_x86v3(const att_cpu_job_t *job, const att_cpu_item_t *it,
                         att_cpu_scratch_t *sc);
void att_cpu__kern_x86v4(const att_cpu_job_t *job, const att_cpu_item_t *it,
                         att_cpu_scratch_t *sc);

#endif

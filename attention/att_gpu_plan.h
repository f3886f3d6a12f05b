/* Work planning shared by the GPU backends (att_cuda.c, att_hip.c): a session's plan (tiles and
 * split thresholds) and, per call, the batch's chunks cut into tiles, split-KV items and merges.
 * Pure host code with no driver calls, so both backends cut the same batch the same way.
 *
 * Thread: the caller's; an att_gpu_work_t belongs to one session, used by one thread at a time. */
#ifndef AT_ATTENTION_ATT_GPU_PLAN_H
#define AT_ATTENTION_ATT_GPU_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "attention/att_backend.h"
#include "attention/att_cuda.h"
#include "attention/att_kparams.h"

/* A tile before splitting. */
typedef struct att_gpu_tile {
    uint32_t chunk;
    uint32_t row_begin;
    uint32_t kind;
    uint32_t kb, ke; /* keys any row of the tile needs */
    uint32_t parts;  /* the key range's parts (1: not split) */
} att_gpu_tile_t;

/* A session's per-call planning arrays, grown when a call needs more (never shrunk). Zero it to
 * start; att_gpu_work_fini frees it. */
typedef struct att_gpu_work {
    att_gpu_tile_t *tiles;
    size_t cap_tiles;
    /* [tiles or items, the more]: (key count << 32 | index) entries and their sort's buffer */
    uint64_t *order, *order_tmp;
    size_t cap_order, cap_order_tmp;
    att_kitem_t *items; /* [total_items]: wide kind first, longest first within a kind */
    size_t cap_items;
    att_kitem_t *scratch; /* [total_items]: items gathered in sorted order */
    size_t cap_scratch;
    att_kmerge_t *merges; /* [total_merges], in the same kind order */
    size_t cap_merges;
} att_gpu_work_t;

/* What att_gpu_plan_batch made, per tile kind. */
typedef struct att_gpu_counts {
    uint32_t num_items[ATT_TILE_KINDS];
    uint32_t num_merges[ATT_TILE_KINDS];
    uint32_t num_parts[ATT_TILE_KINDS];
    uint32_t tail_tiles[ATT_TILE_KINDS]; /* tiles split to fill the last wave (see below) */
    uint32_t total_items, total_merges;
    bool partitioned; /* the kinds run on the mixed_sms partition (see att_gpu_plan_batch) */
} att_gpu_counts_t;

/* The plan's fields that are not 0 in over replace those of out (tiles: where warps_m != 0). */
void att_gpu_plan_override(att_cuda_plan_t *out, const att_cuda_plan_t *over);

/* Sets out's split-KV and mixed-batch thresholds from a config's knobs (the same four in both GPU
 * spaces; a key count of 0 is ATT_CUDA_NEVER, blocks_per_sm 0 ATT_CUDA_OCCUPANCY) with at most
 * TUN_CUDA_MAX_SPLITS parts per tile. */
void att_gpu_plan_knobs(att_cuda_plan_t *out, uint32_t min_split_keys, uint32_t blocks_per_sm,
                        uint32_t mixed_split_keys, uint32_t mixed_order);

/* Cuts batch b of model m into work items (w->items) and merges (w->merges) with plan: rows and
 * tile_k are each kind's rows per tile and keys per stage (the module's att_k_info), occupancy
 * the blocks of its attend kernel one SM runs at once. A kind's blocks run on num_sms SMs, or,
 * when mixed_sms is not NULL and the batch has both kinds in proportions the partition suits
 * (pl->partitioned: the wide tiles' arithmetic on mixed_sms[wide] SMs takes about as long as
 * the narrow tiles' KV reads), on mixed_sms[kind] (the SM partition the backend then launches
 * each kind in; mixed_split_keys does not apply). A kind's long tiles are split when its blocks
 * would take few waves of those SMs (plan->blocks_per_sm per SM, or the occupancy), into the
 * part count whose waves finish first. A kind of more waves whose last wave would run at most
 * half full has its shortest tiles, those of that wave, split instead (unless
 * plan->tail_unsplit): into parts that fill the wave, so it streams at the rate of a full
 * one instead of a few blocks'. AT_ERR_NOMEM when an array cannot grow (w keeps what it
 * had). */
at_err_t att_gpu_plan_batch(att_gpu_work_t *w, const att_model_t *m, const att_cuda_plan_t *plan,
                            const uint32_t rows[ATT_TILE_KINDS],
                            const uint32_t tile_k[ATT_TILE_KINDS], uint32_t num_sms,
                            const uint32_t mixed_sms[ATT_TILE_KINDS],
                            const uint32_t occupancy[ATT_TILE_KINDS], const att_batch_t *b,
                            att_gpu_counts_t *pl);

void att_gpu_work_fini(att_gpu_work_t *w);

#endif

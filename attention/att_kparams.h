/* The parameter block of the unified attention kernels (attention/kernels/att_unified.cu), and
 * the per-call device arrays it names.
 *
 * Plain C that the host's C11 compiler, nvcc, NVRTC, hiprtc and hipcc all accept: fixed-width
 * fields only, device addresses as uint64_t, explicit padding, sizes checked below, so the host
 * can fill the struct and pass it to cuLaunchKernel (or hipModuleLaunchKernel) by value with the
 * same layout the device code reads.
 *
 * One launch covers a whole batch: chunks (decode tokens, prefill chunks, chunks over earlier
 * context) become work items, each a tile of ATT_TILE_ROWS query rows of one chunk against one
 * KV head (a unit: blockIdx.x = item * Hkv + kv_head, or taken in turn, see sm_split). A
 * tile's rows are token x query head within the KV head's group: row r of a chunk is token
 * r / group, query head kv_head * group + r % group, so the query heads that share a KV head
 * share each K/V tile read. An item may be limited to a key range (split-KV): it then writes a
 * partial result (unnormalized output, running max in log2 units, denominator) to slot `part`,
 * and the last of a row tile's parts to finish combines the tile's slots into out (no second
 * launch).
 *
 * Who fills what: the host (att_gpu_run.c) builds chunks, the table entries the
 * session's device-resident tables lack, items and merges, uploads them, patches the pointers
 * here and launches. The kernels only read these arrays; they write out, the parts, the new K/V
 * rows of the cache and the new table entries into the session's tables. */
#ifndef AT_ATTENTION_ATT_KPARAMS_H
#define AT_ATTENTION_ATT_KPARAMS_H

#if defined(__CUDACC_RTC__) || defined(__HIPCC_RTC__)
/* NVRTC and hiprtc have no C library headers; these match LP64. */
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#if defined(__cplusplus)
#define ATT_KSTATIC_ASSERT(c, m) static_assert(c, m)
#else
#define ATT_KSTATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

/* att_kitem_t.part when the item covers every key of its rows and writes out itself. */
#define ATT_KPART_NONE 0xffffffffu
/* att_kitem_t.flags: this item also copies its rows' new k and v into the cache. The host sets it
 * on exactly one split of each row tile, so that every new (token, KV head) row is written once. */
#define ATT_KITEM_WRITE_KV 1u

/* att_kchunk_t.flags: the chunk's table entries from `mirrored` on, which this call sends in
 * new_table_d, are to be kept in the session's table at table_offset + mirrored (written by the
 * launch's one block with ATT_KITEM_WRITE_KV, row_begin 0 and KV head 0, or att_k_kv_write's
 * KV head 0), so the next call sends none of them again. Set only on chunks of narrow tiles and
 * of append-only batches: the wgmma body does not keep tables. */
#define ATT_KCHUNK_KEEP_TABLE 1u

/* One chunk of the batch: a span of one sequence. Its block table (num_blocks entries) comes from
 * two places: entries below `mirrored` from the session's device-resident table at table_offset,
 * and the entries from S = min(mirrored, start_pos / BS) on from the call's new_table_d at
 * new_offset (entry S there), so the KV write (positions from start_pos on) reads one array and
 * readers of cached keys (positions below start_pos) another: the session's table when
 * mirrored is not 0 (it then covers them), else the call's (S is then 0). */
typedef struct att_kchunk {
    uint32_t token_offset; /* first row of q, k, v and out that belongs to this chunk */
    uint32_t start_pos;    /* position of the chunk's first token; keys below it are cached */
    uint32_t num_tokens;
    uint32_t table_offset; /* index of the sequence's first block number in block_table_d */
    uint32_t mirrored;     /* entries valid at table_offset when the launch starts */
    uint32_t new_offset;   /* index in new_table_d of entry min(mirrored, start_pos / BS) */
    uint32_t num_blocks;
    uint32_t flags;        /* ATT_KCHUNK_* */
} att_kchunk_t;

/* One tile of work, run for every KV head. Keys of the item are those of its rows' causal
 * windows that lie in [key_begin, key_end). */
typedef struct att_kitem {
    uint32_t chunk;     /* index into chunks_d */
    uint32_t row_begin; /* first row, in units of token * group + head in group, within the chunk */
    uint32_t key_begin; /* 0 when not split; a multiple of the tile's key count otherwise */
    uint32_t key_end;   /* 0xffffffff when not split */
    uint32_t part;      /* partial slot, or ATT_KPART_NONE */
    uint32_t flags;     /* ATT_KITEM_* */
    uint32_t merge;     /* split items: index of the row tile's att_kmerge_t in merges_d */
    uint32_t reserved;
} att_kitem_t;

/* One row tile that was split: parts [part_begin, part_begin + num_parts) are merged into out,
 * for every KV head, by the part that finishes last. */
typedef struct att_kmerge {
    uint32_t chunk;
    uint32_t row_begin;
    uint32_t part_begin;
    uint32_t num_parts;
} att_kmerge_t;

/* Passed by value to every entry point of att_unified.cu. Element types are the model's dtype
 * unless said otherwise; D = head_dim, BS = block_size. */
typedef struct att_kparams {
    uint64_t q_d;           /* [T, Hq, D] queries, tokens in chunk order; 0 for att_k_kv_write */
    uint64_t k_d;           /* [T, Hkv, D] the batch's new keys */
    uint64_t v_d;           /* [T, Hkv, D] the batch's new values */
    uint64_t out_d;         /* [T, Hq, D] */
    uint64_t k_cache_d;     /* [num_blocks, Hkv, BS, D] keys of the call's layer */
    uint64_t v_cache_d;     /* [num_blocks, Hkv, BS, D] values of the call's layer */
    uint64_t chunks_d;      /* [num_chunks] att_kchunk_t */
    uint64_t block_table_d; /* the session's device-resident block tables (uint32_t entries) */
    uint64_t new_table_d;   /* the call's table entries the session's tables lack (uint32_t) */
    uint64_t items_d;       /* [num_items] att_kitem_t, longest first */
    uint64_t merges_d;      /* [num_merges] att_kmerge_t; 0 when nothing is split */
    uint64_t part_o_d;      /* [num_parts, Hkv, ATT_TILE_ROWS, D] f32 unnormalized outputs */
    uint64_t part_ml_d;     /* [num_parts, Hkv, ATT_TILE_ROWS, 2] f32 (max in log2 units, sum) */
    uint64_t alibi_d;       /* [Hq] f32 slopes; 0 unless ATT_HAS_ALIBI */
    uint64_t sinks_d;       /* [Hq] f32 sink logits; 0 unless ATT_HAS_SINKS */
    uint64_t counters_d;    /* [num_merges, Hkv] uint32 arrivals of a split tile's parts: zero
                               between launches (the last arrival wraps its counter back to 0) */
    float scale;            /* applied to q . k */
    float soft_cap;         /* cap of cap * tanh(s / cap); read only with ATT_SOFT_CAP */
    uint32_t window;        /* the layer's sliding window in tokens; 0 = none */
    uint32_t num_chunks;
    uint32_t num_items;
    uint32_t num_merges;
    uint32_t num_blocks;    /* blocks in each cache pool */
    uint32_t sm_split;      /* 0: one unit a block (blockIdx.x = item * Hkv + KV head); else a
                               persistent grid (att_k_attend's narrow kind, non-wgmma bodies
                               only, a mixed batch launched from the device): its blocks on SMs
                               with ids below sm_split leave (all of them unless none is on the
                               others), the rest take units in turn, counted by the
                               ATT_KUNIT_COUNTERS words after the kind's merge counters */
} att_kparams_t;

/* The words a persistent grid counts its blocks and units with (att_kparams_t.sm_split). */
#define ATT_KUNIT_COUNTERS 4u

ATT_KSTATIC_ASSERT(sizeof(att_kchunk_t) == 32, "att_kchunk_t layout");
ATT_KSTATIC_ASSERT(sizeof(att_kitem_t) == 32, "att_kitem_t layout");
ATT_KSTATIC_ASSERT(sizeof(att_kmerge_t) == 16, "att_kmerge_t layout");
ATT_KSTATIC_ASSERT(sizeof(att_kparams_t) == 160, "att_kparams_t layout");

/* The module exports its tile configuration as `att_k_info` (a __constant__ uint32_t array),
 * read by the host with cuModuleGetGlobal, so the host plans with exactly the numbers the
 * kernel was built with. Indices: */
#define ATT_KINFO_TILE_ROWS 0   /* query rows per item */
#define ATT_KINFO_TILE_KEYS 1   /* keys per pipeline stage; split boundaries are multiples */
#define ATT_KINFO_THREADS 2     /* threads per block of att_k_attend */
#define ATT_KINFO_SMEM_BYTES 3  /* dynamic shared memory of att_k_attend */
#define ATT_KINFO_KVW_THREADS 5 /* threads per block of att_k_kv_write (4, 6, 7: unused, 0) */
#define ATT_KINFO_COUNT 8

#endif

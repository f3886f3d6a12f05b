/* What the GPU backends (att_cuda.c, att_hip.c) do alike without a driver call: the launch
 * templates of a session's launch cache, a run's kernel parameters and the per-call values
 * patched into them, the tile kinds' launch order, the buffer layout and metadata of a run, the
 * copy runs of a tensor, the registered host regions, a session's constants and statistics, the
 * blocks and rows read back from the cache, fetching a new session's two kernel images, and
 * where a session's device-resident block tables go in its table arena. Each backend keeps only
 * its runtime's calls, so the two read as one design (differences: only CUDA uploads q, k and
 * v, or k and v, in one copy where it can, att_gpu_qkv_span, and lets its kernels read q and
 * write out in host memory, att_gpu_io_way).
 *
 * Thread: the caller's. att_gpu_regions_t has its own mutex (any thread); everything else works
 * on one session's data, used by one thread at a time. */
#ifndef AT_ATTENTION_ATT_GPU_RUN_H
#define AT_ATTENTION_ATT_GPU_RUN_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "attention/att_backend.h"
#include "attention/att_gpu_plan.h"
#include "attention/att_jit.h"
#include "attention/att_kparams.h"
#include "cache/lc.h"
#include "common/at_base.h"

/* CLOCK_MONOTONIC in ns: a run's host time. */
static inline uint64_t att_gpu_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* x rounded up to a multiple of a. */
static inline size_t att_gpu_align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* The kernels of a module (the first part of a launch-cache key). */
enum { ATT_GPU_K_ATTEND = 1, ATT_GPU_K_KV_WRITE = 3 };

/* ---- a session's device-resident block tables ---- */

/* The session's copy of one sequence's table in its table arena (a device array of uint32_t the
 * backend owns): region [off, off + cap), whose first n entries hold the table of stamp. */
typedef struct att_gpu_seqtab {
    uint64_t stamp; /* 0: none */
    uint32_t off, cap, n;
    uint32_t reserved;
} att_gpu_seqtab_t;

/* Where one chunk of the placed call takes its table from (see att_kchunk_t). */
typedef struct att_gpu_chunktab {
    uint32_t off;      /* its region in the arena */
    uint32_t mirrored; /* entries taken from there by the readers of cached keys */
    uint32_t from;     /* the first entry the call sends: min(mirrored, start_pos / BS) */
    uint32_t flags;    /* ATT_KCHUNK_KEEP_TABLE when the launch keeps the sent ones */
} att_gpu_chunktab_t;

/* What a session knows of its table arena. Sequences are found by their kvc slot; a region is
 * handed out from the top of the arena and never reused until a call finds the arena full, which
 * forgets every copy (the call then sends whole tables once). So a decoding sequence's table
 * crosses to the device once, then one entry a call (the block its new token goes to), and
 * whole once more each time it outgrows its region, which doubles. A prefill chunk's crosses
 * each call (see att_gpu_tables_place). */
typedef struct att_gpu_tables {
    att_gpu_seqtab_t *seq;    /* owned; [cap_seq], by slot */
    uint32_t cap_seq;
    att_gpu_chunktab_t *call; /* owned; [cap_call], the placed call's chunks */
    uint32_t cap_call;
    uint32_t top;             /* arena entries handed out */
    size_t new_entries;       /* table entries the placed call sends */
} att_gpu_tables_t;

/* The entries of a new session's table arena for a pool of num_blocks blocks: room for every
 * sequence's table twice, so a full arena is rare. */
uint32_t att_gpu_tables_initial(uint32_t num_blocks);

void att_gpu_tables_fini(att_gpu_tables_t *t);

/* Forgets every copy: the arena was replaced (or the caller cannot tell what it holds). */
void att_gpu_tables_reset(att_gpu_tables_t *t);

/* A backend's replacement of its table arena (att_gpu_tables_place): frees the old one, which
 * no launch uses any more, and allocates one of `entries` uint32 entries. */
typedef at_err_t (*att_gpu_arena_fn)(void *user, uint32_t entries);

/* Chooses where each chunk of b (cache blocks of block_size tokens) takes its table from, in the
 * arena of *arena_cap entries, and counts the entries the call must send (new_entries). Only
 * chunks of at most keep_tokens tokens have the launch keep what they send (the callers' rule:
 * those on narrow tiles, whose body keeps them, or any chunk of an append-only batch, which
 * att_k_kv_write writes); the others send it again next time. When the call's tables do not fit
 * even an empty arena, the copies are forgotten, `replace` makes one twice their size (*arena_cap
 * is 0 until it succeeds, then that size) and every chunk is placed there. AT_ERR_NOMEM;
 * AT_ERR_INTERNAL when the tables would need more than UINT32_MAX entries; what replace
 * returns. */
at_err_t att_gpu_tables_place(att_gpu_tables_t *t, const att_batch_t *b, uint32_t block_size,
                              uint32_t keep_tokens, uint32_t *arena_cap, att_gpu_arena_fn replace,
                              void *user);

/* The keep_tokens of att_gpu_tables_place for batch b of model m whose narrow tiles have
 * narrow_rows rows: a narrow tile's tokens, or every chunk of an append-only batch. */
uint32_t att_gpu_tables_keep_tokens(const att_model_t *m, const att_batch_t *b,
                                    uint32_t narrow_rows);

/* Once the launches of the placed call b are queued: the copies of the chunks that keep what
 * they send now hold their whole tables. */
void att_gpu_tables_commit(att_gpu_tables_t *t, const att_batch_t *b);

/* ---- a run's buffers ---- */

/* Byte offsets of one call's data: the same in the pinned stage and the device buffer, except
 * the split parts, which only the device holds. */
typedef struct att_gpu_layout {
    size_t o_chunks, o_table, o_items, o_merges, meta_end; /* metadata: one upload */
    size_t o_q, o_k, o_v, o_out, stage_end;                /* tensors */
    size_t o_po[ATT_TILE_KINDS], o_pml[ATT_TILE_KINDS];    /* split parts per kind */
    size_t end;                                            /* device bytes */
} att_gpu_layout_t;

/* The layout of batch b of model m planned as pl, each kind's tiles having tile_rows rows, that
 * sends new_entries table entries. */
void att_gpu_layout(const att_model_t *m, const att_batch_t *b, const att_gpu_counts_t *pl,
                    const uint32_t tile_rows[ATT_TILE_KINDS], size_t new_entries,
                    att_gpu_layout_t *out);

/* Writes the metadata (chunks, the table entries placed as t says, w's items and merges) into
 * stage. */
void att_gpu_fill_meta(uint8_t *stage, const att_gpu_layout_t *lo, const att_batch_t *b,
                       const att_gpu_tables_t *t, const att_gpu_work_t *w,
                       const att_gpu_counts_t *pl);

/* The parameters every launch of batch b takes (the prepared launches' templates get them
 * patched in): its tensors and metadata in the device buffer io_d laid out as lo, the session's
 * table arena tables_d, its layer of the KV pool pool_d ([num_layers][k|v] halves of
 * layer_half_bytes) and the layer's window. */
void att_gpu_run_params(const att_model_t *m, const att_batch_t *b, const att_gpu_layout_t *lo,
                        uint64_t io_d, uint64_t tables_d, uint64_t pool_d,
                        size_t layer_half_bytes, att_kparams_t *out);

/* ---- launches ---- */

/* Fills n, the prepared launch under key of `kernel` (ATT_GPU_K_*) running fn, from its module's
 * att_k_info (info) and the session's constants: consts_d ([Hq] ALiBi slopes, then [Hq] sinks; 0
 * when the model has neither) and the pool's block count. */
void att_gpu_launch_init(lc_launch_t *n, uint32_t key, const att_model_t *m, uint32_t kernel,
                         const uint32_t info[ATT_KINFO_COUNT], void *fn, uint64_t consts_d,
                         uint32_t num_blocks);

/* A backend's lookup-or-prepare of a launch (its `prepared`). */
typedef at_err_t (*att_gpu_prepared_fn)(att_kv_t *kv, uint32_t kernel, uint32_t kind,
                                        uint32_t split, const lc_launch_t **out);

/* The tile kind launched i-th (0, 1) in a batch with both kinds: plan's mixed_order. */
uint32_t att_gpu_launch_order(const att_cuda_plan_t *plan, uint32_t i);

/* Launches kind's attention items of plan pl through lc, with the call's pointers and counts from
 * base (att_gpu_run_params, and the session's split arrival counters in counters_d, one per merge
 * and KV head) and the kind's arrays in the device buffer io_d laid out as lo: its part of the
 * call's items and merges, its split parts, its part of the counters. sm_split 0: a block a
 * unit (item and KV head); else a persistent grid of at least `blocks` blocks that leaves the SMs
 * with ids below sm_split (att_kparams_t.sm_split; the kind's ATT_KUNIT_COUNTERS unit counters
 * follow its merge counters). */
at_err_t att_gpu_launch_kind(lc_t *lc, att_gpu_prepared_fn prepared, att_kv_t *kv,
                             const att_kparams_t *base, const att_gpu_counts_t *pl,
                             const att_gpu_layout_t *lo, uint64_t io_d, uint32_t kind,
                             uint32_t sm_split, uint32_t blocks);

/* Launches the KV write of an append-only batch of num_chunks chunks through lc. */
at_err_t att_gpu_launch_kv_write(lc_t *lc, att_gpu_prepared_fn prepared, att_kv_t *kv,
                                 const att_kparams_t *base, uint32_t num_chunks);

/* ---- tensors ---- */

/* Which tensor of a chunk: 0 q, 1 k, 2 v, 3 out. */
const void *att_gpu_chunk_ptr(const att_batch_chunk_t *c, int which);

/* The run of chunks from chunk c whose rows of tensor `which` lie next to each other in host
 * memory and in the call's token order: its host address *p, *bytes and offset *off in the
 * call's tensor. Returns the chunk after the run. */
uint32_t att_gpu_tensor_run(const att_batch_t *b, int which, size_t row_bytes, uint32_t c,
                            const uint8_t **p, size_t *bytes, size_t *off);

/* Host memory registered with the device for DMA (register_host): at most 16 regions, for the
 * backend's lifetime. */
#define ATT_GPU_MAX_REGIONS 16u
typedef struct att_gpu_regions {
    pthread_mutex_t mu;
    uintptr_t begin[ATT_GPU_MAX_REGIONS] AT_GUARDED_BY(mu);
    uintptr_t end[ATT_GPU_MAX_REGIONS] AT_GUARDED_BY(mu);
    uint32_t n AT_GUARDED_BY(mu);
} att_gpu_regions_t;

void att_gpu_regions_init(att_gpu_regions_t *r);
void att_gpu_regions_fini(att_gpu_regions_t *r);

/* Registers [p, p + bytes) with pin (the runtime's call, run under the regions' lock) and adds it;
 * AT_ERR_INTERNAL when 16 are registered already, else what pin returned. Any thread. */
at_err_t att_gpu_regions_add(att_gpu_regions_t *r, void *p, size_t bytes,
                             at_err_t (*pin)(void *user, void *p, size_t bytes), void *user);

/* True when [p, p + n) lies inside one registered region. Any thread. */
bool att_gpu_regions_contain(att_gpu_regions_t *r, const void *p, size_t n);

/* One upload for a batch's q, k and v (from_k false: an attending batch's), or k and v
 * (from_k: where the kernels read q in host memory, or an append-only batch). When each of them
 * is one run of every chunk's rows (att_gpu_tensor_run), each lies after the one before in host
 * memory, all inside one registered region of r, and the distances from the first keep the
 * others 16-byte aligned and fit lo's room before o_out: moves lo->o_k and lo->o_v to the
 * first's distances from its own offset (lo->o_q, or lo->o_k) and returns the first's host
 * address, *bytes the span from its first byte to v's last, which can go in one copy to that
 * offset (the bytes between the tensors go too: nothing reads them). Else NULL, lo unchanged.
 * The server's arena allocates a call's tensors first fit, so they lie so whenever one free
 * range holds them (a batch merged from several calls never does); the benches place them so.
 * Each copy call saved is microseconds of host time (docs/BENCHMARKS.md). Any thread. */
const uint8_t *att_gpu_qkv_span(const att_batch_t *b, bool from_k, size_t q_row, size_t kv_row,
                                att_gpu_regions_t *r, att_gpu_layout_t *lo, size_t *bytes);

/* Where a kernel can find a call's tensor in host memory itself (att_cuda.c, "direct I/O"). */
typedef enum att_gpu_io {
    ATT_GPU_IO_COPY,  /* it cannot: registered in several runs (a batch merged from calls:
                         gathering them would cost the host a copy the DMA does now), or in part,
                         or its one run is not 16-byte aligned (the kernels' vector accesses) */
    ATT_GPU_IO_HOST,  /* where it lies: one run of every chunk's rows, from token 0, inside one
                         registered region */
    ATT_GPU_IO_STAGE, /* in the stage: no run of it lies inside one registered region (one across
                         two adjacent regions does not), so the host copies it into the stage (or
                         out of it, att_gpu_finish_out) either way */
} att_gpu_io_t;

/* The way of tensor `which` (att_gpu_tensor_run's) of b, whose rows are row_bytes, given the
 * registered regions r; *addr_d ([T, H, D] of the tensor), unless ATT_GPU_IO_COPY, the kernels'
 * address of it: its host address (the device must use registered memory there), or stage_d
 * (its place in the mapped stage). Any thread. */
att_gpu_io_t att_gpu_io_way(const att_batch_t *b, int which, size_t row_bytes, att_gpu_regions_t *r,
                            uint64_t stage_d, uint64_t *addr_d);

/* Copies out's staged rows (stage_out: the stage's out region) to each run of chunks
 * (att_gpu_tensor_run) that does not lie in one registered region: the runs the backends'
 * copies and att_gpu_io_way send through the stage, judged the same way, so a region must not
 * be added while a run that uses its memory is in flight (the server registers its arena when
 * its worker starts). */
void att_gpu_finish_out(const att_batch_t *b, size_t row_bytes, const uint8_t *stage_out,
                        att_gpu_regions_t *regs);

/* The blocks read_kv copies for rows pos..pos+n-1 (n > 0) of model m: the first one's index b0
 * in the session's block list, and the bytes of one block of one half (*block_bytes). Returns
 * their count. */
size_t att_gpu_kv_blocks(const att_model_t *m, uint32_t pos, uint32_t n, uint32_t *b0,
                         size_t *block_bytes);

/* read_kv's last step: stage holds blocks b0.. of the layer as [block][k|v][Hkv][BS][D] (each
 * half block_bytes); copies rows pos..pos+n-1 into k_out and v_out, each [n, Hkv, D]. */
void att_gpu_scatter_kv(const att_model_t *m, const uint8_t *stage, size_t block_bytes,
                        uint32_t pos, uint32_t n, void *k_out, void *v_out);

/* ---- a session ---- */

/* Model m's constants as a session's consts_d holds them: [Hq] f32 ALiBi slopes, then [Hq] f32
 * sinks (zeros for the one m lacks). *out NULL and *bytes 0 when m has neither; else *out is the
 * caller's to free. AT_ERR_NOMEM. */
at_err_t att_gpu_consts(const att_model_t *m, float **out, size_t *bytes);

/* A session's kv_stats: its launch cache lc's figures, its copy calls to the device and its
 * last run's times. */
void att_gpu_kv_stats(const lc_t *lc, uint64_t uploads, uint64_t last_host_ns,
                      uint64_t last_device_ns, att_kv_stats_t *out);

/* ---- a new session's images ---- */

/* One tile kind's image: the caller fills opts; att_gpu_fetch_images fills the rest. */
typedef struct att_gpu_fetch {
    att_jit_opts_t opts;
    void *img; /* malloc'd, the caller's: att_gpu_fetch_release */
    size_t bytes;
    int compiled; /* the compiler ran (not a cache hit) */
    at_err_t err;
    at_diag_t diag;
} att_gpu_fetch_t;

/* Both kinds' images for arch from jit, the narrow one on a thread of its own so a new model's
 * two compiles overlap. */
void att_gpu_fetch_images(att_jit_t *jit, const char *arch, att_gpu_fetch_t f[ATT_TILE_KINDS]);
/* Frees both kinds' images (loaded by then, or not wanted). */
void att_gpu_fetch_release(att_gpu_fetch_t f[ATT_TILE_KINDS]);

#endif

/* Tuning: which configuration of an attention kernel runs a batch fastest, measured, kept per
 * device and model shape, and restored.
 *
 * The pieces, each in its own file:
 * - tun_space.c: config spaces, per backend and kernel: the parameters that change its speed, the
 *   values each may take, a condition that removes combinations the kernel cannot run (shared
 *   memory, registers, head_dim, block size), and the heuristic used until a measurement exists.
 * - tun_key.c: the keys. A device (backend, name, architecture or ISA build, driver and compiler
 *   versions, threads), the kernel's source hash, a model shape (head_dim, heads, GQA group,
 *   dtype, block size, feature flags) and a bucket of the batch shape (log2 of tokens, sequences,
 *   longest query, longest context). A store file is named by everything but the bucket, so two
 *   models of different shapes never share a record while two sessions of one shape on one device
 *   do.
 * - tun_store.c: one JSON file per device and model shape, with a schema version and a SHA-256 of
 *   its payload, written atomically and merged under a lock (see tun_store.h).
 * - tun_search.c: a search over a space, one timing at a time, so its caller can run other work
 *   between timings: exhaustive, or staged (one group of parameters after another) for a space
 *   too large to time whole.
 *
 * This folder knows nothing of backends or models: callers describe both with the plain values
 * below (attention/att_tune.c does for the CPU backend). */
#ifndef AT_TUNING_TUN_H
#define AT_TUNING_TUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/at_err.h"

#define TUN_MAX_PARAMS 12u
#define TUN_MAX_VALUES 8u
#define TUN_SCHEMA_VERSION 1

/* One configuration: values of a space's parameters, in the space's order. */
typedef struct tun_cfg {
    uint32_t n;
    uint32_t v[TUN_MAX_PARAMS];
} tun_cfg_t;

typedef struct tun_device {
    char backend[16];      /* "cpu", "cuda", "hip" */
    char name[128];        /* CPU: /proc/cpuinfo "model name"; GPU: the device's name */
    char arch[32];         /* CPU: the kernel build ("x86-64-v3"); GPU: "sm_90", "gfx942" */
    char driver[32];       /* GPU driver version; "" on the CPU */
    char compiler[48];     /* the compiler of the kernels: NVRTC/hiprtc version, or the C compiler */
    uint32_t threads;      /* CPU: backend threads; GPU: multiprocessors */
    uint32_t smem_bytes;   /* GPU: shared memory a block may opt into; 0 on the CPU */
} tun_device_t;

/* Feature flags of a model shape: each changes the kernel's work per key. */
#define TUN_FEAT_WINDOW 1u
#define TUN_FEAT_SOFT_CAP 2u
#define TUN_FEAT_ALIBI 4u
#define TUN_FEAT_SINKS 8u

typedef struct tun_shape {
    uint32_t head_dim;
    uint32_t num_query_heads;
    uint32_t num_kv_heads;
    uint32_t group;        /* num_query_heads / num_kv_heads */
    uint32_t dtype;        /* att_dtype_t's values: 1 f32, 2 f16, 3 bf16 */
    uint32_t block_size;   /* tokens per KV block */
    uint32_t features;     /* TUN_FEAT_* */
} tun_shape_t;

/* A batch shape, rounded up to powers of two: each field is ceil(log2(x)) (0 for x <= 1). */
typedef struct tun_bucket {
    uint8_t tokens;        /* new tokens in the batch */
    uint8_t seqs;          /* chunks (sequences) */
    uint8_t max_q;         /* the longest chunk's new tokens */
    uint8_t max_ctx;       /* the longest chunk's context: start_pos + new tokens */
} tun_bucket_t;

/* Where the configuration a call ran with came from. */
typedef enum tun_source {
    TUN_SOURCE_NONE = 0,      /* no call yet, or the backend has no knobs */
    TUN_SOURCE_HEURISTIC = 1,
    TUN_SOURCE_STORED = 2,    /* a record of the store (this or an earlier process measured it) */
    TUN_SOURCE_TUNED = 3,     /* measured by a tuning run of this process */
} tun_source_t;

/* Run-time policy (`attnd serve --tuning`). */
typedef enum tun_mode {
    TUN_MODE_OFF = 0,         /* the heuristic only */
    TUN_MODE_FROZEN = 1,      /* stored records, else the heuristic; never tunes */
    TUN_MODE_ON = 2,          /* as frozen, and a key without a record is tuned when idle */
} tun_mode_t;

typedef struct tun_space tun_space_t;

/* A config space: parameters, their values, and which combinations are runnable. */
struct tun_space {
    const char *name;                         /* names the kernel and the space's version */
    uint32_t n_params;
    const char *params[TUN_MAX_PARAMS];
    uint32_t values[TUN_MAX_PARAMS][TUN_MAX_VALUES];
    uint32_t n_values[TUN_MAX_PARAMS];
    /* Whether c runs (and is not a duplicate of a smaller config) for shape s on device d. */
    bool (*valid)(const tun_cfg_t *c, const tun_shape_t *s, const tun_device_t *d);
    /* The configuration used until a measurement exists; always valid. */
    void (*heuristic)(const tun_shape_t *s, const tun_device_t *d, const tun_bucket_t *b,
                      tun_cfg_t *out);
    /* Optional (NULL: one stage of every parameter, an exhaustive search). The stages of a
     * search for bucket b: masks of parameters (bit p = parameter p), searched in order, each
     * over every valid combination of its parameters with the others fixed at the best so far;
     * parameters no stage names keep the heuristic's values. Returns the count (<= n_params). */
    uint32_t (*stages)(const tun_shape_t *s, const tun_bucket_t *b, uint32_t *masks);
};

/* ---- tun_space.c ---- */

/* The CPU backend (attention/att_cpu.c): work-item rows, key tile, items per thread. */
extern const tun_space_t tun_space_cpu;
enum { TUN_CPU_TILE_ROWS = 0, TUN_CPU_KEY_TILE = 1, TUN_CPU_ITEMS_PER_THREAD = 2 };

/* The CUDA unified kernel (attention/kernels/att_unified.cu) and its host plan
 * (attention/att_cuda.c, att_cuda_plan_from_cfg): the wide tile (prefill; warps_n 1), the narrow
 * tile (decode; 16 rows, warps_m 1), the split-KV rule and the mixed-batch knobs. Its heuristic
 * is the backend's default plan (att_cuda_plan_default derives from it). Searched in stages:
 * only the knobs a bucket's batches use (tun_space_cuda_unified.stages). */
extern const tun_space_t tun_space_cuda_unified;
enum {
    TUN_CUDA_WIDE_WARPS_M = 0,
    TUN_CUDA_WIDE_WARP_MT = 1,
    TUN_CUDA_WIDE_TILE_K = 2,
    TUN_CUDA_WIDE_STAGES = 3,
    TUN_CUDA_NARROW_WARPS_N = 4,
    TUN_CUDA_NARROW_TILE_K = 5,
    TUN_CUDA_NARROW_STAGES = 6,
    TUN_CUDA_SPLIT_MIN_KEYS = 7,   /* 0 = never split */
    TUN_CUDA_BLOCKS_PER_SM = 8,    /* a wave's blocks per SM; 0 = the kernel's occupancy */
    TUN_CUDA_MIXED_SPLIT_KEYS = 9, /* 0 = never split a mixed batch's wide tiles for balance */
    TUN_CUDA_MIXED_ORDER = 10,     /* 1 narrow tiles first, 2 wide tiles first */
    TUN_CUDA_WIDE_MMA = 11,        /* the wide tile's body: 0 mma.sync, 1 wgmma (sm_90 only) */
    TUN_CUDA_PARAMS = 12,
};
#define TUN_CUDA_MAX_SPLITS 32u    /* parts per tile at most (not searched) */

/* Dynamic shared memory, bytes, of one block of att_k_attend with this tile: the kernel's
 * kSmemBytes formula (attention/att_jit.c's att_jit_tile_smem is this); 0 for f32, whose path
 * uses none of the tile's shared memory. */
uint32_t tun_cuda_smem_bytes(uint32_t head_dim, uint32_t dtype, uint32_t warps_m,
                             uint32_t warp_mt, uint32_t warps_n, uint32_t tile_k,
                             uint32_t stages);

/* Whether one tile compiles for and loads on d (the kernel's static_asserts and the device's
 * shared memory), and is not a known spill (a register estimate). */
bool tun_cuda_tile_ok(const tun_shape_t *s, const tun_device_t *d, uint32_t warps_m,
                      uint32_t warp_mt, uint32_t warps_n, uint32_t tile_k, uint32_t stages);

/* The same two for the sm_90a wgmma body (ATT_WGMMA, attention/kernels/att_sm90.cuh): its
 * kSmemBytes (dynamic), and whether the tile is one it builds (f16/bf16, head_dim 64 or 128,
 * warps_m 4 or 8, warp_mt 1, tile_k 64 or 128, stages 2..4) without spilling on d, which must be
 * exactly sm_90 (wgmma is sm_90a's alone), within d's shared memory (dynamic and static). */
uint32_t tun_cuda_wgmma_smem_bytes(uint32_t head_dim, uint32_t warps_m, uint32_t tile_k,
                                   uint32_t stages);
bool tun_cuda_wgmma_ok(const tun_shape_t *s, const tun_device_t *d, uint32_t warps_m,
                       uint32_t warp_mt, uint32_t tile_k, uint32_t stages);

/* The unified kernel's portable FMA body (ATT_PORTABLE_MATH: every dtype on the HIP backend,
 * attention/att_hip.c, att_hip_plan_from_cfg): one wave per query row, no shared memory, so a tile
 * is only its rows and the waves that share them (keys per stage and pipeline stages are the
 * tensor-core body's). The wide tile's rows and waves, the narrow tile's waves (16 rows, as
 * CUDA's), then the split-KV rule and the mixed-batch knobs of tun_space_cuda_unified. Its
 * heuristic is the backend's default plan (att_hip_plan_default derives from it); staged like
 * the CUDA space. */
extern const tun_space_t tun_space_hip_unified;
enum {
    TUN_HIP_WIDE_ROWS = 0,
    TUN_HIP_WIDE_WAVES = 1,
    TUN_HIP_NARROW_WAVES = 2,
    TUN_HIP_SPLIT_MIN_KEYS = 3,   /* 0 = never split */
    TUN_HIP_BLOCKS_PER_SM = 4,    /* a wave's blocks per CU; 0 = the kernel's occupancy */
    TUN_HIP_MIXED_SPLIT_KEYS = 5, /* 0 = never split a mixed batch's wide tiles for balance */
    TUN_HIP_MIXED_ORDER = 6,      /* 1 narrow tiles first, 2 wide tiles first */
    TUN_HIP_PARAMS = 7,
};

/* The kernel's tile knobs (ATT_WARPS_M, ATT_WARP_MT, ATT_WARPS_N) of a portable-body tile of
 * `rows` query rows run by `waves` waves: warps_m m16 row tiles of warp_mt each make the rows,
 * warps_m * warps_n waves run them. One canonical choice per (rows, waves): the fewest row tiles
 * per wave. False when none exists (the rows are not 16 or 32 per warps_m, or the waves not a
 * multiple of warps_m). */
bool tun_hip_tile(uint32_t rows, uint32_t waves, uint32_t *warps_m, uint32_t *warp_mt,
                  uint32_t *warps_n);

/* Every valid configuration of space for s on d, the heuristic's (for bucket b) first. On success
 * *out (caller frees) holds *n >= 1 configs. AT_ERR_NOMEM. */
at_err_t tun_space_enumerate(const tun_space_t *space, const tun_shape_t *s, const tun_device_t *d,
                             const tun_bucket_t *b, tun_cfg_t **out, size_t *n);

/* As tun_space_enumerate, over the parameters in mask only (the others as in base, which comes
 * first and must be valid). */
at_err_t tun_space_enumerate_from(const tun_space_t *space, const tun_shape_t *s,
                                  const tun_device_t *d, const tun_cfg_t *base, uint32_t mask,
                                  tun_cfg_t **out, size_t *n);

/* True when c has the space's parameter count and only listed values, and is valid for s, d. */
bool tun_cfg_valid(const tun_space_t *space, const tun_cfg_t *c, const tun_shape_t *s,
                   const tun_device_t *d);

/* Room for any config as text: TUN_MAX_PARAMS of "name=value," with names under 20 chars. */
#define TUN_CFG_TEXT_MAX 384u

/* "tile_rows=64,key_tile=16,items_per_thread=4"; returns snprintf's count. */
int tun_cfg_format(const tun_space_t *space, const tun_cfg_t *c, char *buf, size_t n);

bool tun_cfg_equal(const tun_cfg_t *a, const tun_cfg_t *b);

/* ---- tun_key.c ---- */

/* The bucket of a batch shape. */
tun_bucket_t tun_bucket_of(uint64_t tokens, uint64_t seqs, uint64_t max_q, uint64_t max_ctx);

bool tun_bucket_equal(const tun_bucket_t *a, const tun_bucket_t *b);

/* "t2^6 s2^6 q2^0 c2^11" style text of a bucket; returns snprintf's count. */
int tun_bucket_format(const tun_bucket_t *b, char *buf, size_t n);

/* Fills d for a CPU backend: its model name (from /proc/cpuinfo; "unknown cpu" when absent),
 * the kernel build isa, threads and this build's C compiler. Any thread. */
void tun_device_cpu(const char *isa, uint32_t threads, tun_device_t *d);

/* Text forms of the keys, as they appear in store files: the device's fields joined by '|', the
 * shape as "d128 hq32 hkv8 g4 bf16 b16 f0". Return snprintf's count. */
int tun_device_key(const tun_device_t *d, char *buf, size_t n);
int tun_shape_key(const tun_shape_t *s, char *buf, size_t n);

/* "f32", "f16", "bf16", or "?". */
const char *tun_dtype_name(uint32_t dtype);

/* "off", "frozen", "on" and back; tun_mode_parse returns -1 for anything else. */
const char *tun_mode_name(tun_mode_t m);
int tun_mode_parse(const char *s);
/* "none", "heuristic", "stored", "tuned". */
const char *tun_source_name(tun_source_t s);

#endif

/* Config spaces (see tun.h): the CPU backend's, the CUDA unified kernel's and the HIP backend's
 * (the same kernel's portable FMA body).
 *
 * A condition removes what cannot run and what would only repeat a smaller config (a CPU key tile
 * above the block size behaves as the block size), so a search times each behaviour once.
 * Thread: any; the spaces are constant. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tuning/tun.h"

/* ---- CPU backend (attention/att_cpu.c) ---- */

static bool cpu_valid(const tun_cfg_t *c, const tun_shape_t *s, const tun_device_t *d) {
    (void)d;
    const uint32_t rows = c->v[TUN_CPU_TILE_ROWS], key_tile = c->v[TUN_CPU_KEY_TILE];
    /* a key tile stays inside one block (block sizes are powers of two, as are key tiles) */
    if (key_tile > s->block_size)
        return false;
    /* an item holds at least one token's whole group: fewer rows act as `group` rows */
    return rows >= s->group || rows == tun_space_cpu.values[TUN_CPU_TILE_ROWS][4];
}

/* What the backend did before tuning existed: 64-row items, 64-key tiles (bounded by the block),
 * at least 4 items per thread before heads are split further. */
static void cpu_heuristic(const tun_shape_t *s, const tun_device_t *d, const tun_bucket_t *b,
                          tun_cfg_t *out) {
    (void)d;
    (void)b;
    uint32_t rows = 64;
    while (rows < s->group && rows < 256)
        rows *= 2;
    *out = (tun_cfg_t){.n = 3};
    out->v[TUN_CPU_TILE_ROWS] = rows;
    out->v[TUN_CPU_KEY_TILE] = s->block_size < 64 ? s->block_size : 64;
    out->v[TUN_CPU_ITEMS_PER_THREAD] = 4;
}

const tun_space_t tun_space_cpu = {
    .name = "cpu/att_cpu_kern/1",
    .n_params = 3,
    .params = {"tile_rows", "key_tile", "items_per_thread"},
    .values = {{16, 32, 64, 128, 256}, {8, 16, 32, 64}, {1, 2, 4, 8, 16}},
    .n_values = {5, 4, 5},
    .valid = cpu_valid,
    .heuristic = cpu_heuristic,
};

/* ---- the GPU backends' split and mixed-batch knobs (same meaning in CUDA and HIP) ---- */

/* The defaults of both GPU spaces. Below 256 keys a part costs more to merge than its
 * parallelism gains. Waves are counted in blocks the kernel's occupancy runs at once (0): the
 * plan splits a batch of few waves into the part count whose waves finish first (H200,
 * 2026-11-30: the mixed batch's decode part alone, 504 blocks on 396 slots, took 0.179 ms
 * unsplit and 0.152 ms in 3 parts). Mixed batches (63 decode + a 512-token chunk): wide tiles
 * first (order 2) on the side stream, split into ~512-key parts, measured 0.251 ms against 0.258
 * narrow first and 0.263 unsplit (a spread of about 0.005 between identical runs). */
static void gpu_split_defaults(uint32_t *min_keys, uint32_t *blocks_per_sm,
                               uint32_t *mixed_split_keys, uint32_t *mixed_order) {
    *min_keys = 256;
    *blocks_per_sm = 0;
    *mixed_split_keys = 512;
    *mixed_order = 2;
}

/* ---- CUDA unified kernel (attention/kernels/att_unified.cu, attention/att_cuda.c) ---- */

uint32_t tun_cuda_smem_bytes(uint32_t head_dim, uint32_t dtype, uint32_t warps_m,
                             uint32_t warp_mt, uint32_t warps_n, uint32_t tile_k,
                             uint32_t stages) {
    if (dtype == 1)
        return 0;
    /* padded rows: a Q tile and a K and V ring; or, after the key loop, the epilogue's slabs */
    const uint32_t dp = (head_dim + 15) / 16 * 16, rows = 16 * warp_mt * warps_m;
    const uint32_t main_bytes = (rows + 2 * stages * tile_k) * (dp + 8) * 2;
    const uint32_t epi_bytes = warps_n * rows * (dp + 4 + 2) * 4;
    return main_bytes > epi_bytes ? main_bytes : epi_bytes;
}

/* f32 registers per thread a tile's accumulators and fragments take: outputs warp_mt * dp / 2,
 * scores warp_mt * keys-per-warp / 2, and Q (held in registers when dp * warp_mt <= 128)
 * warp_mt * dp / 4. Above this bound the compiler spills (255 is the hard limit; indexing,
 * pointers and the softmax state need the rest): the default tiles take at most 160, and
 * 128 dims with two m16 tiles and 64 keys (192) spilled measurably (att_cuda's plan). */
#define CUDA_MAX_TILE_REGS 160u

bool tun_cuda_tile_ok(const tun_shape_t *s, const tun_device_t *d, uint32_t wm, uint32_t mt,
                      uint32_t wn, uint32_t tile_k, uint32_t stages) {
    /* the kernel's static_asserts */
    const uint32_t warps = wm * wn;
    if (warps < 1 || warps > 16 || (mt != 1 && mt != 2) || wn == 0 || tile_k % wn != 0)
        return false;
    if (s->dtype == 1)
        return true;
    const uint32_t kw = tile_k / wn, dp = (s->head_dim + 15) / 16 * 16;
    if (kw % 16 != 0 || stages < 2 || stages > 4)
        return false;
    /* att_cuda refuses a module whose shared memory exceeds the device's opt-in limit */
    if (d->smem_bytes != 0 &&
        tun_cuda_smem_bytes(s->head_dim, s->dtype, wm, mt, wn, tile_k, stages) > d->smem_bytes)
        return false;
    const uint32_t regs = mt * (dp / 2 + kw / 2) + (dp * mt <= 128 ? mt * dp / 4 : 0);
    return regs <= CUDA_MAX_TILE_REGS;
}

uint32_t tun_cuda_wgmma_smem_bytes(uint32_t head_dim, uint32_t warps_m, uint32_t tile_k,
                                   uint32_t stages) {
    /* 1024 to align the swizzled tiles; Q, then a K and V ring, unpadded */
    return 1024u + (16u * warps_m + 2u * stages * tile_k) * head_dim * 2u;
}

bool tun_cuda_wgmma_ok(const tun_shape_t *s, const tun_device_t *d, uint32_t wm, uint32_t mt,
                       uint32_t tile_k, uint32_t stages) {
    if (strcmp(d->arch, "sm_90") != 0 || (s->dtype != 2 && s->dtype != 3) ||
        (s->head_dim != 64 && s->head_dim != 128))
        return false;
    /* with the producer warpgroup, three consumer warpgroups leave 128 registers a thread: they
     * spill but at 64 dims and 64 keys (nvcc -arch=sm_90a --resource-usage), and warps_m 12 is
     * not in the space; two at 128 dims and 128 keys fit only with the producer's registers
     * (setmaxnreg, att_sm90.cuh) */
    if ((wm != 4 && wm != 8) || mt != 1 || (tile_k != 64 && tile_k != 128) || stages < 2 ||
        stages > 4)
        return false;
    /* the block's static shared memory (its mbarriers, aligned like the dynamic block: 1024
     * bytes, nvcc --resource-usage) counts against the same per-block limit */
    return d->smem_bytes == 0 ||
           tun_cuda_wgmma_smem_bytes(s->head_dim, wm, tile_k, stages) + 1024u <= d->smem_bytes;
}

/* The backend's plan before any measurement (att_cuda_plan_default is this, mapped). Figures
 * from the H200 runs in docs/BENCHMARKS.md. */
static void cuda_heuristic(const tun_shape_t *s, const tun_device_t *d, const tun_bucket_t *b,
                           tun_cfg_t *out) {
    (void)b;
    *out = (tun_cfg_t){.n = TUN_CUDA_PARAMS};
    uint32_t *v = out->v;
    /* Decode: the group's rows padded to one m16 tile; four warps share the key stream. */
    v[TUN_CUDA_NARROW_WARPS_N] = 4;
    v[TUN_CUDA_NARROW_TILE_K] = 64;
    v[TUN_CUDA_NARROW_STAGES] = 2;
    /* Prefill: 128 rows as 4 warps x 2 m16 tiles (each K/V fragment read from shared memory
     * feeds two MMAs per warp; each K/V tile from L2 serves 128 rows), 3 stages. Above 64
     * dims, 32 keys per stage keep two tiles' scores and outputs in registers (64 keys spill
     * at 128 dims); above 128, one m16 tile per warp. Fewer stages, then fewer rows, until the
     * shared memory fits. */
    const uint32_t dp = (s->head_dim + 15) / 16 * 16;
    v[TUN_CUDA_WIDE_WARPS_M] = 4;
    v[TUN_CUDA_WIDE_WARP_MT] = dp <= 128 ? 2 : 1;
    v[TUN_CUDA_WIDE_TILE_K] = dp <= 64 ? 64 : 32;
    v[TUN_CUDA_WIDE_STAGES] = 3;
    const uint32_t limit = d->smem_bytes != 0 ? d->smem_bytes : UINT32_MAX;
#define WIDE_SMEM                                                                                \
    tun_cuda_smem_bytes(s->head_dim, s->dtype, v[TUN_CUDA_WIDE_WARPS_M],                         \
                        v[TUN_CUDA_WIDE_WARP_MT], 1, v[TUN_CUDA_WIDE_TILE_K],                    \
                        v[TUN_CUDA_WIDE_STAGES])
    if (WIDE_SMEM > limit)
        v[TUN_CUDA_WIDE_STAGES] = 2;
    if (WIDE_SMEM > limit)
        v[TUN_CUDA_WIDE_WARP_MT] = 1;
#undef WIDE_SMEM
    /* On sm_90 (f16/bf16, 64 or 128 dims) the wgmma body (att_sm90.cuh): two consumer
     * warpgroups of 64 rows, 128 keys a stage, 3 stages. H200, 2026-11-30, bench-gpu prefill
     * 8 x 2048: 304 TFLOP/s at D 128 against 231 for the mma.sync tile above and 274-290 for
     * the 64-key tiles; 185 at D 64 against 168. Fewer keys or stages where the shared memory
     * does not fit. */
    static const uint32_t wg_tiles[][2] = {{128, 3}, {64, 4}, {64, 3}, {64, 2}};
    for (size_t i = 0; i < sizeof wg_tiles / sizeof wg_tiles[0]; i++)
        if (tun_cuda_wgmma_ok(s, d, 8, 1, wg_tiles[i][0], wg_tiles[i][1])) {
            v[TUN_CUDA_WIDE_MMA] = 1;
            v[TUN_CUDA_WIDE_WARPS_M] = 8;
            v[TUN_CUDA_WIDE_WARP_MT] = 1;
            v[TUN_CUDA_WIDE_TILE_K] = wg_tiles[i][0];
            v[TUN_CUDA_WIDE_STAGES] = wg_tiles[i][1];
            break;
        }
    /* a narrow tile that does not fit (head_dim 256 on a small device): half the keys */
    if (tun_cuda_smem_bytes(s->head_dim, s->dtype, 1, 1, 4, 64, 2) > limit) {
        v[TUN_CUDA_NARROW_WARPS_N] = 2;
        v[TUN_CUDA_NARROW_TILE_K] = 32;
    }
    gpu_split_defaults(&v[TUN_CUDA_SPLIT_MIN_KEYS], &v[TUN_CUDA_BLOCKS_PER_SM],
                       &v[TUN_CUDA_MIXED_SPLIT_KEYS], &v[TUN_CUDA_MIXED_ORDER]);
}

static bool cuda_valid(const tun_cfg_t *c, const tun_shape_t *s, const tun_device_t *d) {
    const uint32_t *v = c->v;
    if (s->dtype == 1) {
        /* f32 runs one warp per row without the MMA pipeline: its tiles are not worth a
         * search, only the split knobs are */
        tun_cfg_t h;
        cuda_heuristic(s, d, NULL, &h);
        for (uint32_t p = TUN_CUDA_WIDE_WARPS_M; p <= TUN_CUDA_NARROW_STAGES; p++)
            if (v[p] != h.v[p])
                return false;
        if (v[TUN_CUDA_WIDE_MMA] != h.v[TUN_CUDA_WIDE_MMA])
            return false;
    }
    const bool wide_ok =
        v[TUN_CUDA_WIDE_MMA] == 1
            ? tun_cuda_wgmma_ok(s, d, v[TUN_CUDA_WIDE_WARPS_M], v[TUN_CUDA_WIDE_WARP_MT],
                                v[TUN_CUDA_WIDE_TILE_K], v[TUN_CUDA_WIDE_STAGES])
            : tun_cuda_tile_ok(s, d, v[TUN_CUDA_WIDE_WARPS_M], v[TUN_CUDA_WIDE_WARP_MT], 1,
                               v[TUN_CUDA_WIDE_TILE_K], v[TUN_CUDA_WIDE_STAGES]);
    if (!wide_ok ||
        !tun_cuda_tile_ok(s, d, 1, 1, v[TUN_CUDA_NARROW_WARPS_N], v[TUN_CUDA_NARROW_TILE_K],
                          v[TUN_CUDA_NARROW_STAGES]))
        return false;
    /* with splitting off, the blocks-per-SM target is never read */
    return v[TUN_CUDA_SPLIT_MIN_KEYS] != 0 || v[TUN_CUDA_BLOCKS_PER_SM] == 0;
}

#define CUDA_WIDE_MASK 0x80fu   /* wide_* */
#define CUDA_NARROW_MASK 0x070u /* narrow_* */
#define CUDA_SPLIT_MASK 0x180u  /* split_min_keys, blocks_per_sm */
#define CUDA_MIXED_MASK 0x600u  /* mixed_split_keys, mixed_order */

/* The parameter groups of a GPU space (masks of its parameters). */
typedef struct gpu_groups {
    uint32_t wide, narrow, split, mixed;
} gpu_groups_t;

/* What a bucket's batches use. A chunk runs on a narrow tile when its rows (tokens x group) fit
 * its 16; a bucket's max_q is rounded up, so "narrow only" is never claimed wrongly. Mixed:
 * several chunks whose tokens average far below the longest one (decode next to a prefill). */
static uint32_t gpu_stages(const gpu_groups_t *g, const tun_shape_t *s, const tun_bucket_t *b,
                           uint32_t *masks) {
    uint32_t n = 0;
    const bool narrow_only = ((uint64_t)1 << b->max_q) * s->group <= 16;
    const bool mixed = !narrow_only && b->seqs >= 1 && b->tokens + 1 < b->seqs + b->max_q;
    if (narrow_only || mixed)
        masks[n++] = g->narrow;
    if (!narrow_only)
        masks[n++] = g->wide;
    masks[n++] = g->split;
    if (mixed)
        masks[n++] = g->mixed;
    return n;
}

static uint32_t cuda_stages(const tun_shape_t *s, const tun_bucket_t *b, uint32_t *masks) {
    static const gpu_groups_t g = {CUDA_WIDE_MASK, CUDA_NARROW_MASK, CUDA_SPLIT_MASK,
                                   CUDA_MIXED_MASK};
    return gpu_stages(&g, s, b, masks);
}

const tun_space_t tun_space_cuda_unified = {
    .name = "cuda/att_unified/3",
    .n_params = TUN_CUDA_PARAMS,
    .params = {"wide_warps_m", "wide_warp_mt", "wide_tile_k", "wide_stages", "narrow_warps_n",
               "narrow_tile_k", "narrow_stages", "split_min_keys", "blocks_per_sm",
               "mixed_split_keys", "mixed_order", "wide_mma"},
    .values = {{2, 4, 8},
               {1, 2},
               {32, 64, 128},
               {2, 3, 4},
               {1, 2, 4, 8},
               {32, 64, 128},
               {2, 3, 4},
               {0, 128, 256, 512, 1024},
               {0, 1, 2, 4},
               {0, 256, 512, 1024},
               {1, 2},
               {0, 1}},
    .n_values = {3, 2, 3, 3, 4, 3, 3, 5, 4, 4, 2, 2},
    .valid = cuda_valid,
    .heuristic = cuda_heuristic,
    .stages = cuda_stages,
};

/* ---- HIP: the unified kernel's portable FMA body (attention/att_hip.c) ---- */

bool tun_hip_tile(uint32_t rows, uint32_t waves, uint32_t *warps_m, uint32_t *warp_mt,
                  uint32_t *warps_n) {
    /* the body runs row r on wave r % waves: only rows and waves change what it does */
    for (uint32_t mt = 1; mt <= 2; mt++) {
        const uint32_t wm = rows / (16 * mt);
        if (wm == 0 || wm * 16 * mt != rows || waves % wm != 0)
            continue;
        *warps_m = wm;
        *warp_mt = mt;
        *warps_n = waves / wm;
        return true;
    }
    return false;
}

/* The backend's plan before any measurement (att_hip_plan_default is this, mapped): a wave per
 * query row, so 4 waves cover a decode tile's group rows (4 for Llama-3 8B) and 8 a prefill
 * tile's 64 rows, each wave taking 8 of them; the split and mixed knobs are the CUDA
 * heuristic's. Nothing here is measured on AMD hardware (docs/BENCHMARKS.md). */
static void hip_heuristic(const tun_shape_t *s, const tun_device_t *d, const tun_bucket_t *b,
                          tun_cfg_t *out) {
    (void)s;
    (void)d;
    (void)b;
    *out = (tun_cfg_t){.n = TUN_HIP_PARAMS};
    uint32_t *v = out->v;
    v[TUN_HIP_WIDE_ROWS] = 64;
    v[TUN_HIP_WIDE_WAVES] = 8;
    v[TUN_HIP_NARROW_WAVES] = 4;
    gpu_split_defaults(&v[TUN_HIP_SPLIT_MIN_KEYS], &v[TUN_HIP_BLOCKS_PER_SM],
                       &v[TUN_HIP_MIXED_SPLIT_KEYS], &v[TUN_HIP_MIXED_ORDER]);
}

/* The kernel's static_asserts, for the portable body: 1 to 16 waves (16 waves of 64 lanes are
 * 1024 threads, the most a block may have, so the device's wave size never refuses a config;
 * it is part of the device key through the architecture and the name), tile_k (64, fixed) a
 * multiple of warps_n (at most 16), and rows of whole m16 tiles. No shared memory, and a
 * handful of registers per row (head_dim / wave of them), so neither bounds a tile. */
static bool hip_valid(const tun_cfg_t *c, const tun_shape_t *s, const tun_device_t *d) {
    (void)s;
    (void)d;
    const uint32_t *v = c->v;
    uint32_t wm, mt, wn;
    if (!tun_hip_tile(v[TUN_HIP_WIDE_ROWS], v[TUN_HIP_WIDE_WAVES], &wm, &mt, &wn))
        return false;
    /* with splitting off, the blocks-per-SM target is never read */
    return v[TUN_HIP_SPLIT_MIN_KEYS] != 0 || v[TUN_HIP_BLOCKS_PER_SM] == 0;
}

#define HIP_WIDE_MASK 0x03u   /* wide_* */
#define HIP_NARROW_MASK 0x04u /* narrow_waves */
#define HIP_SPLIT_MASK 0x18u  /* split_min_keys, blocks_per_sm */
#define HIP_MIXED_MASK 0x60u  /* mixed_split_keys, mixed_order */

static uint32_t hip_stages(const tun_shape_t *s, const tun_bucket_t *b, uint32_t *masks) {
    static const gpu_groups_t g = {HIP_WIDE_MASK, HIP_NARROW_MASK, HIP_SPLIT_MASK,
                                   HIP_MIXED_MASK};
    return gpu_stages(&g, s, b, masks);
}

const tun_space_t tun_space_hip_unified = {
    .name = "hip/att_unified_fma/1",
    .n_params = TUN_HIP_PARAMS,
    .params = {"wide_rows", "wide_waves", "narrow_waves", "split_min_keys", "blocks_per_sm",
               "mixed_split_keys", "mixed_order"},
    .values = {{16, 32, 64, 128},
               {1, 2, 4, 8, 16},
               {1, 2, 4, 8, 16},
               {0, 128, 256, 512, 1024},
               {0, 1, 2, 4},
               {0, 256, 512, 1024},
               {1, 2}},
    .n_values = {4, 5, 5, 5, 4, 4, 2},
    .valid = hip_valid,
    .heuristic = hip_heuristic,
    .stages = hip_stages,
};

/* ---- configurations ---- */

bool tun_cfg_equal(const tun_cfg_t *a, const tun_cfg_t *b) {
    if (a->n != b->n)
        return false;
    for (uint32_t i = 0; i < a->n; i++)
        if (a->v[i] != b->v[i])
            return false;
    return true;
}

bool tun_cfg_valid(const tun_space_t *space, const tun_cfg_t *c, const tun_shape_t *s,
                   const tun_device_t *d) {
    if (c->n != space->n_params)
        return false;
    for (uint32_t p = 0; p < c->n; p++) {
        bool listed = false;
        for (uint32_t k = 0; k < space->n_values[p]; k++)
            listed = listed || space->values[p][k] == c->v[p];
        if (!listed)
            return false;
    }
    return space->valid(c, s, d);
}

int tun_cfg_format(const tun_space_t *space, const tun_cfg_t *c, char *buf, size_t n) {
    int len = 0;
    if (n > 0)
        buf[0] = '\0';
    for (uint32_t p = 0; p < c->n && p < space->n_params; p++) {
        size_t at = (size_t)len < n ? (size_t)len : n;
        len += snprintf(buf + at, n - at, "%s%s=%u", p ? "," : "", space->params[p], c->v[p]);
    }
    return len;
}

at_err_t tun_space_enumerate_from(const tun_space_t *space, const tun_shape_t *s,
                                  const tun_device_t *d, const tun_cfg_t *base, uint32_t mask,
                                  tun_cfg_t **out, size_t *n) {
    size_t total = 1;
    for (uint32_t p = 0; p < space->n_params; p++)
        total *= (mask >> p & 1u) ? space->n_values[p] : 1u;
    tun_cfg_t *list = malloc((total + 1) * sizeof *list);
    if (list == NULL)
        return AT_ERR_NOMEM;
    list[0] = *base;
    size_t k = 1;
    uint32_t idx[TUN_MAX_PARAMS] = {0};
    for (size_t i = 0; i < total; i++) {
        tun_cfg_t c = *base;
        for (uint32_t p = 0; p < space->n_params; p++)
            if (mask >> p & 1u)
                c.v[p] = space->values[p][idx[p]];
        if (space->valid(&c, s, d) && !tun_cfg_equal(&c, &list[0]))
            list[k++] = c;
        /* the next index combination over the mask, the last parameter fastest */
        for (uint32_t p = space->n_params; p-- > 0;) {
            if (!(mask >> p & 1u))
                continue;
            if (++idx[p] < space->n_values[p])
                break;
            idx[p] = 0;
        }
    }
    *out = list;
    *n = k;
    return AT_OK;
}

at_err_t tun_space_enumerate(const tun_space_t *space, const tun_shape_t *s, const tun_device_t *d,
                             const tun_bucket_t *b, tun_cfg_t **out, size_t *n) {
    tun_cfg_t h;
    space->heuristic(s, d, b, &h);
    const uint32_t all = space->n_params >= 32 ? ~0u : (1u << space->n_params) - 1u;
    return tun_space_enumerate_from(space, s, d, &h, all, out, n);
}

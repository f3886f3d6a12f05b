/* Config spaces (see tun.h): the CPU backend's and the CUDA unified kernel's.
 *
 * A condition removes what cannot run and what would only repeat a smaller config (a CPU key tile
 * above the block size behaves as the block size), so a search times each behaviour once.
 * Thread: any; the spaces are constant. */
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

/* ---- CUDA unified kernel (attention/kernels/att_unified.cu, attention/att_cuda.c) ---- */

uint32_t tun_cuda_smem_bytes(uint32_t head_dim, uint32_t dtype, uint32_t warps_m,
                             uint32_t warps_n, uint32_t tile_k, uint32_t stages) {
    if (dtype == 1)
        return 0;
    /* the kernel's formula: padded rows, a Q tile, a K and V ring, or the epilogue's slabs */
    const uint32_t dp = (head_dim + 15) / 16 * 16, srow = dp + 8, rows = 16 * warps_m;
    const uint32_t main_bytes = rows * srow * 2 + stages * 2 * tile_k * srow * 2;
    const uint32_t epi_bytes = warps_n * rows * (dp + 4 + 2) * 4;
    return main_bytes > epi_bytes ? main_bytes : epi_bytes;
}

/* One tile of the kernel: its static_asserts, shared memory, and a register estimate. */
static bool cuda_tile_ok(const tun_shape_t *s, const tun_device_t *d, uint32_t wm, uint32_t wn,
                         uint32_t tile_k, uint32_t stages) {
    const uint32_t warps = wm * wn;
    if (warps < 1 || warps > 16 || tile_k % wn != 0)
        return false;
    if (s->dtype == 1) /* f32: one warp per row, no cp.async ring: stages change nothing */
        return stages == 2;
    const uint32_t kw = tile_k / wn, dp = (s->head_dim + 15) / 16 * 16;
    if (kw % 16 != 0)
        return false;
    if (d->smem_bytes != 0 &&
        tun_cuda_smem_bytes(s->head_dim, s->dtype, wm, wn, tile_k, stages) > d->smem_bytes)
        return false;
    /* f32 registers per thread: output accumulators dp/2, scores kw/2, Q held in registers up to
     * head_dim 128 (dp/4). Above ~192 the compiler spills (255 is the hard limit, and indexing,
     * pointers and softmax state need the rest): an estimate, checked against ptxas -v for the
     * default tiles. */
    const uint32_t regs = dp / 2 + kw / 2 + (dp <= 128 ? dp / 4 : 0);
    return regs <= 192;
}

static bool cuda_valid(const tun_cfg_t *c, const tun_shape_t *s, const tun_device_t *d) {
    if (!cuda_tile_ok(s, d, c->v[TUN_CUDA_WIDE_WARPS_M], c->v[TUN_CUDA_WIDE_WARPS_N],
                      c->v[TUN_CUDA_WIDE_TILE_K], c->v[TUN_CUDA_WIDE_STAGES]))
        return false;
    /* the narrow tile has 16 rows (one warp over rows) and exists for decode */
    if (!cuda_tile_ok(s, d, 1, c->v[TUN_CUDA_NARROW_WARPS_N], c->v[TUN_CUDA_NARROW_TILE_K],
                      c->v[TUN_CUDA_NARROW_STAGES]))
        return false;
    /* with splitting off, the blocks-per-SM target is never read */
    return c->v[TUN_CUDA_SPLIT_MIN_KEYS] != 0 || c->v[TUN_CUDA_BLOCKS_PER_SM] == 2;
}

/* att_jit_tile and att_cuda.c's plan as they are: wide 4x1 warps, 64 keys (32 above head_dim
 * 128), narrow 1x4 warps, 64 keys, 2 stages; split into parts of >= 256 keys aiming at 2 blocks
 * per SM. */
static void cuda_heuristic(const tun_shape_t *s, const tun_device_t *d, const tun_bucket_t *b,
                           tun_cfg_t *out) {
    (void)d;
    (void)b;
    *out = (tun_cfg_t){.n = 9};
    out->v[TUN_CUDA_WIDE_WARPS_M] = 4;
    out->v[TUN_CUDA_WIDE_WARPS_N] = 1;
    out->v[TUN_CUDA_WIDE_TILE_K] = s->head_dim > 128 ? 32 : 64;
    out->v[TUN_CUDA_WIDE_STAGES] = 2;
    out->v[TUN_CUDA_NARROW_WARPS_N] = 4;
    out->v[TUN_CUDA_NARROW_TILE_K] = 64;
    out->v[TUN_CUDA_NARROW_STAGES] = 2;
    out->v[TUN_CUDA_SPLIT_MIN_KEYS] = 256;
    out->v[TUN_CUDA_BLOCKS_PER_SM] = 2;
}

const tun_space_t tun_space_cuda_unified = {
    .name = "cuda/att_unified/1",
    .n_params = 9,
    .params = {"wide_warps_m", "wide_warps_n", "wide_tile_k", "wide_stages", "narrow_warps_n",
               "narrow_tile_k", "narrow_stages", "split_min_keys", "blocks_per_sm"},
    .values = {{1, 2, 4, 8},
               {1, 2, 4},
               {16, 32, 64, 128},
               {2, 3, 4},
               {1, 2, 4, 8},
               {16, 32, 64, 128},
               {2, 3, 4},
               {0, 128, 256, 512, 1024},
               {1, 2, 4}},
    .n_values = {4, 3, 4, 3, 4, 4, 3, 5, 3},
    .valid = cuda_valid,
    .heuristic = cuda_heuristic,
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

at_err_t tun_space_enumerate(const tun_space_t *space, const tun_shape_t *s, const tun_device_t *d,
                             const tun_bucket_t *b, tun_cfg_t **out, size_t *n) {
    size_t total = 1;
    for (uint32_t p = 0; p < space->n_params; p++)
        total *= space->n_values[p];
    tun_cfg_t *list = malloc((total + 1) * sizeof *list);
    if (list == NULL)
        return AT_ERR_NOMEM;
    space->heuristic(s, d, b, &list[0]);
    size_t k = 1;
    uint32_t idx[TUN_MAX_PARAMS] = {0};
    for (size_t i = 0; i < total; i++) {
        tun_cfg_t c = {.n = space->n_params};
        for (uint32_t p = 0; p < space->n_params; p++)
            c.v[p] = space->values[p][idx[p]];
        if (space->valid(&c, s, d) && !tun_cfg_equal(&c, &list[0]))
            list[k++] = c;
        /* the next index combination, the last parameter fastest */
        for (uint32_t p = space->n_params; p-- > 0;) {
            if (++idx[p] < space->n_values[p])
                break;
            idx[p] = 0;
        }
    }
    *out = list;
    *n = k;
    return AT_OK;
}

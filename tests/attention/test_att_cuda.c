/* The CUDA backend against the double-precision oracle, next to the CPU backend on the same
 * inputs: every dtype x GQA group x head_dim family of the attention-core tests with random
 * features, mixed batches (decode, prefill, chunks over earlier context in one call),
 * rollback/retry, split-KV (few long sequences: flash-decoding and split prefill tiles), append
 * only, merged calls with separate buffers, registered host memory, mixed batches on SM
 * partitions (green contexts; the fallback without them), a last wave's tiles split, three
 * models of different head dims, dtypes and groups interleaved on one GPU (each session's launch
 * cache), and the compile cache (memory, disk, a damaged file).
 * Without a GPU or driver every test skips with one line saying why. Label: gpu.
 *
 * Built twice: test_att_cuda (the CUDA backend on cuda:0) and, with ATT_TEST_HIP, test_att_hip:
 * the same cases through the HIP backend on hip:0 (an AMD GPU, or an NVIDIA one through the test
 * double tests/hipshim/ when ATTND_HIP_LIB names it). */
#include "tests/test_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tests/attention/att_rig.h"

#ifdef ATT_TEST_HIP
#include "attention/att_hip.h"
#define BE_NAME "HIP"
#define BE_PROGRAM "test_att_hip"
#define BE_PREFIX BE_PROGRAM "_"
#define BE_IMAGE_EXT "hsaco"
typedef att_hip_cfg_t be_cfg_t;
#define be_create att_hip_create
#define be_describe att_hip_describe
#define be_jit_stats att_hip_jit_stats
#else
#include "attention/att_cuda.h"
#include "attention/att_cudl.h"
#include "attention/att_cudrv.h"
#define BE_NAME "CUDA"
#define BE_PROGRAM "test_att_cuda"
#define BE_PREFIX BE_PROGRAM "_"
#define BE_IMAGE_EXT "cubin"
typedef att_cuda_cfg_t be_cfg_t;
#define be_create att_cuda_create
#define be_describe att_cuda_describe
#define be_jit_stats att_cuda_jit_stats
#endif

static uint64_t g_seed;
static att_backend_t *g_cuda;
static at_diag_t g_why;
static void *g_registered[3]; /* registered with g_cuda: freed after it */

static const att_cpu_cfg_t CPU_BE[] = {{.num_threads = 0}};

#define NEED_GPU()                                                                                 \
    do {                                                                                           \
        if (g_cuda == NULL) {                                                                      \
            printf("SKIP: no " BE_NAME " device (%s)\n", g_why.msg);                               \
            skip();                                                                                \
        }                                                                                          \
    } while (0)

static void rig_on_gpu(att_rig_t *rig, const att_rig_spec_t *spec, uint64_t cap, int with_cpu,
                       uint64_t seed) {
    att_rig_init_with(rig, &spec->cfg, cap, CPU_BE, with_cpu ? 1 : 0, &g_cuda, 1, seed);
}

/* ---- the coverage matrix ---- */

typedef struct mcase {
    att_dtype_t dtype;
    uint32_t hq, hkv, d, block, index;
    char name[64];
} mcase_t;

static void run_matrix_case(void **state) {
    NEED_GPU();
    const mcase_t *mc = *state;
    const uint64_t seed = tu_sub_seed(g_seed, 20000u + mc->index);
    tu_rng_t r;
    tu_rng_seed(&r, seed);
    att_rig_spec_t spec;
    att_rig_spec_draw(&spec, mc->dtype, mc->hq, mc->hkv, mc->d, mc->block, &r);
    char desc[256];
    tu_where_set("%s: ATTND_TEST_SEED=%" PRIu64 " case %u (seed %" PRIu64 "), %s", mc->name,
                 g_seed, mc->index, seed, att_rig_spec_str(&spec, desc, sizeof desc));
    print_message("case %u: %s\n", mc->index, desc);
    att_rig_t rig;
    rig_on_gpu(&rig, &spec, 4096, 1, tu_rng_next(&r));
    const uint64_t A = 1 + tu_rng_below(&r, 1000), B = A + 1, C = A + 2;
    const uint32_t pa = tu_rng_range(&r, 40, 200), pb = tu_rng_range(&r, 8, 40);
    const att_chunk_t s1[] = {{A, 0, pa}, {B, 0, pb}};
    att_rig_attend_layers(&rig, s1, 2);
    const uint32_t pc = tu_rng_range(&r, 10, 60), cb = tu_rng_range(&r, 10, 50);
    const att_chunk_t s2[] = {{A, pa, 1}, {C, 0, pc}, {B, pb, cb}};
    att_rig_attend_layers(&rig, s2, 3);
    const att_chunk_t s3[] = {{C, pc, 1}, {B, pb + cb, 1}, {A, pa + 1, 1}};
    att_rig_attend_layers(&rig, s3, 3);
    const uint32_t back = tu_rng_range(&r, 1, 5); /* a retry that rolls B back */
    const att_chunk_t s4[] = {{B, pb + cb + 1 - back, back + 1}, {A, pa + 2, 1}};
    att_rig_attend_layers(&rig, s4, 2);
    att_rig_fini(&rig);
}

/* ---- split-KV: few sequences with long contexts ---- */

static void split_case(att_dtype_t dt, uint32_t hq, uint32_t hkv, uint32_t d, uint32_t block,
                       unsigned feats, uint32_t index) {
    const uint64_t seed = tu_sub_seed(g_seed, 30000u + index);
    tu_rng_t r;
    tu_rng_seed(&r, seed);
    att_rig_spec_t spec;
    att_rig_spec_init(&spec, dt, 1, hq, hkv, d, block);
    att_rig_spec_features(&spec, feats, &r);
    if (feats & ATT_RIG_F_WINDOW)
        spec.cfg.sliding_window = 700; /* long enough that windowed tiles still split */
    char desc[256];
    tu_where_set("split: ATTND_TEST_SEED=%" PRIu64 " (seed %" PRIu64 "), %s", g_seed, seed,
                 att_rig_spec_str(&spec, desc, sizeof desc));
    print_message("split: %s\n", desc);
    att_rig_t rig;
    rig_on_gpu(&rig, &spec, 8192, 0, tu_rng_next(&r));
    /* prefill long prompts: wide tiles over long key ranges, too few to fill the GPU */
    const att_chunk_t p1[] = {{1, 0, 1500}, {2, 0, 900}};
    att_rig_attend(&rig, 0, p1, 2);
    /* a chunk over 1500 tokens of context plus two decode tokens */
    const att_chunk_t p2[] = {{1, 1500, 300}, {2, 900, 1}, {3, 0, 1}};
    att_rig_attend(&rig, 0, p2, 3);
    for (uint32_t s = 0; s < 3; s++) { /* decode: narrow tiles, split many ways */
        const att_chunk_t p3[] = {{1, 1800 + s, 1}, {2, 901 + s, 1}};
        att_rig_attend(&rig, 0, p3, 2);
    }
    const att_chunk_t p4[] = {{1, 1790, 4}}; /* rollback over a split range */
    att_rig_attend(&rig, 0, p4, 1);
    att_rig_fini(&rig);
}

static void test_att_cuda_split_kv(void **state) {
    (void)state;
    NEED_GPU();
    split_case(ATT_DTYPE_BF16, 8, 2, 128, 16, 0, 0);
    split_case(ATT_DTYPE_F16, 16, 2, 64, 32, ATT_RIG_F_WINDOW | ATT_RIG_F_SINKS, 1);
    split_case(ATT_DTYPE_BF16, 4, 4, 80, 16, ATT_RIG_F_ALIBI | ATT_RIG_F_SOFT_CAP, 2);
    split_case(ATT_DTYPE_F32, 6, 1, 64, 64, ATT_RIG_F_WINDOW | ATT_RIG_F_SINKS, 3);
    split_case(ATT_DTYPE_F16, 8, 1, 256, 16, ATT_RIG_F_ALL, 4);
}

#ifndef ATT_TEST_HIP
/* A CUDA backend of its own on cuda:0 whose sessions take plan's overrides (att_cuda_cfg_t). */
static att_backend_t *backend_with_plan(const att_cuda_plan_t *plan) {
    const att_cuda_cfg_t cc = {.device = 0, .kernel_cache_dir = "", .plan = plan};
    att_backend_t *be = NULL;
    at_diag_t diag = {{0}};
    TU_CHECK(att_cuda_create(&cc, &diag, &be) == AT_OK, "att_cuda_create: %s", diag.msg);
    return be;
}

/* Whether a CUDA backend launches calls from the device where it can (attention/att_cudl.h), or
 * why not (*why, for a SKIP line). */
static bool device_launches(const char **why) {
    const char *launch = getenv("ATTND_CUDA_LAUNCH");
    const att_cudrv_t *drv = NULL;
    if (launch != NULL && strcmp(launch, "host") == 0)
        *why = "ATTND_CUDA_LAUNCH=host";
    else if (access(att_cudl_devrt_path(), R_OK) != 0)
        *why = "no device runtime library where attnd looks (ATTND_CUDADEVRT)";
    else if (att_cudrv_cuda(&drv, NULL) != AT_OK || !drv->has_dl)
        *why = "the driver lacks device-updatable graphs (CUDA 12.4+)";
    else
        return true;
    return false;
}

/* Skips the test (with a line saying why) unless CUDA backends launch calls from the device. */
static void need_device_launches(void) {
    const char *why = NULL;
    if (!device_launches(&why)) {
        printf("SKIP: %s: every call launches from the host\n", why);
        skip();
    }
}

/* Whether a CUDA backend's kernels read q and write out in host memory where they can
 * (att_cuda.c, "direct I/O"): unless ATTND_CUDA_IO=staged, on a device that can use registered
 * memory at its host address. */
static bool direct_io(void) {
    const char *io = getenv("ATTND_CUDA_IO");
    const att_cudrv_t *drv = NULL;
    CUdevice dev = 0;
    int host_ptr = 0;
    return !(io != NULL && strcmp(io, "staged") == 0) && att_cudrv_cuda(&drv, NULL) == AT_OK &&
           drv->cuDeviceGet(&dev, 0) == CUDA_SUCCESS &&
           drv->cuDeviceGetAttribute(&host_ptr,
                                     CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
                                     dev) == CUDA_SUCCESS &&
           host_ptr != 0;
}

/* Whether a CUDA backend can split a mixed batch's SMs with green contexts (for its host path). */
static bool has_green(void) {
    const att_cudrv_t *drv = NULL;
    return att_cudrv_cuda(&drv, NULL) == AT_OK && drv->has_green;
}

/* Calls of the session that launched from the device so far. */
static uint64_t device_calls(att_ctx_t *ctx) {
    att_ctx_info_t info;
    att_ctx_get_info(ctx, &info);
    return info.kv_stats.device_calls;
}

static uint64_t uploads(att_ctx_t *ctx) {
    att_ctx_info_t info;
    att_ctx_get_info(ctx, &info);
    return info.kv_stats.uploads;
}

/* ---- both wide-tile bodies (CUDA) ---- */

/* Prefill, chunks over earlier context and split tiles on a backend of its own whose plan forces
 * the wide tile `wide`, against the CPU backend and the oracle. */
static void wide_body_case(const att_tile_t *wide, att_dtype_t dt, uint32_t hq, uint32_t hkv,
                           uint32_t d, uint32_t block, unsigned feats, uint32_t index) {
    att_cuda_plan_t plan;
    memset(&plan, 0, sizeof plan);
    plan.tile[ATT_TILE_WIDE] = *wide;
    att_backend_t *be = backend_with_plan(&plan);
    const uint64_t seed = tu_sub_seed(g_seed, 60000u + index);
    tu_rng_t r;
    tu_rng_seed(&r, seed);
    att_rig_spec_t spec;
    att_rig_spec_init(&spec, dt, 1, hq, hkv, d, block);
    att_rig_spec_features(&spec, feats, &r);
    if (feats & ATT_RIG_F_WINDOW)
        spec.cfg.sliding_window = 300;
    char desc[256];
    tu_where_set("wide tile %ux%ux%ux%ux%u mma %u: ATTND_TEST_SEED=%" PRIu64 " (seed %" PRIu64
                 "), %s",
                 wide->warps_m, wide->warp_mt, wide->warps_n, wide->tile_k, wide->stages,
                 wide->mma, g_seed, seed, att_rig_spec_str(&spec, desc, sizeof desc));
    print_message("wide tile %ux%ux%ux%ux%u mma %u: %s\n", wide->warps_m, wide->warp_mt,
                  wide->warps_n, wide->tile_k, wide->stages, wide->mma, desc);
    att_rig_t rig;
    att_rig_init_with(&rig, &spec.cfg, 8192, CPU_BE, 1, &be, 1, tu_rng_next(&r));
    /* prompts of several tiles (the last ones partial), split when too few fill the GPU */
    const att_chunk_t p1[] = {{1, 0, 1000}, {2, 0, 333}, {3, 0, 70}};
    att_rig_attend(&rig, 0, p1, 3);
    /* chunks over earlier context, next to a decode token */
    const att_chunk_t p2[] = {{1, 1000, 200}, {2, 333, 1}, {3, 70, 45}};
    att_rig_attend(&rig, 0, p2, 3);
    att_rig_fini(&rig);
    att_backend_destroy(&be);
}

/* The default plan takes the mma.sync wide tile, which the cases above run; this runs it alone
 * on any GPU, and on sm_90 the wgmma body's tiles (two warpgroups and one, 64 and 128 keys a
 * stage, 2 to 4 stages), every feature in at least one of them, and cache blocks smaller than,
 * as large as and larger than the rows one pass of its producer copies (8 keys at 128 dims, 16
 * at 64), since the producer reads each block's table entry once. */
static void test_att_cuda_wide_bodies(void **state) {
    (void)state;
    NEED_GPU();
    static const att_tile_t mma_sync = {4, 2, 1, 32, 3, 0};
    wide_body_case(&mma_sync, ATT_DTYPE_BF16, 8, 2, 128, 16, ATT_RIG_F_ALL, 0);
    wide_body_case(&mma_sync, ATT_DTYPE_F16, 16, 2, 64, 16, ATT_RIG_F_WINDOW | ATT_RIG_F_SINKS,
                   1);
    if (strcmp(att_cuda_arch(g_cuda), "sm_90") != 0) {
        printf("SKIP the wgmma tiles: %s is not sm_90\n", att_cuda_arch(g_cuda));
        return;
    }
    static const att_tile_t wg[] = {{8, 1, 1, 64, 3, 1}, {4, 1, 1, 128, 2, 1},
                                    {8, 1, 1, 128, 3, 1}, {4, 1, 1, 64, 4, 1}};
    wide_body_case(&wg[0], ATT_DTYPE_BF16, 8, 2, 128, 16, ATT_RIG_F_ALL, 2);
    wide_body_case(&wg[1], ATT_DTYPE_BF16, 32, 8, 128, 32, 0, 3);
    wide_body_case(&wg[2], ATT_DTYPE_F16, 16, 2, 64, 8, ATT_RIG_F_SOFT_CAP | ATT_RIG_F_ALIBI, 4);
    wide_body_case(&wg[3], ATT_DTYPE_F16, 6, 1, 128, 8, ATT_RIG_F_WINDOW | ATT_RIG_F_SINKS, 5);
    /* two warpgroups at 128 dims and 128 keys: the producer's registers shifted to them */
    wide_body_case(&wg[2], ATT_DTYPE_BF16, 32, 8, 128, 8, ATT_RIG_F_ALL, 6);
}

/* ---- a mixed batch on SM partitions (green contexts) ---- */

/* Decode tokens next to a prefill chunk over cached context, on a backend of its own whose plan
 * puts a mixed batch's wide tiles on about `wide_sms` SMs and its narrow ones on the rest,
 * against the CPU backend and the oracle. Where calls launch from the device, the three mixed
 * batches must (their SMs split inside the kernels: the narrow kind's persistent grid, its
 * splits merged there too); else they run in green contexts. A driver without green contexts
 * runs the same batches on every SM (logged), and must give the same answers. */
static void partition_case(uint32_t wide_sms, att_dtype_t dt, uint32_t hq, uint32_t hkv,
                           unsigned feats, uint32_t index) {
    att_cuda_plan_t plan;
    memset(&plan, 0, sizeof plan);
    plan.mixed_wide_sms = wide_sms;
    plan.mixed_part_always = true; /* these batches are far too small to suit one otherwise */
    att_backend_t *be = backend_with_plan(&plan);
    const uint64_t seed = tu_sub_seed(g_seed, 70000u + index);
    tu_rng_t r;
    tu_rng_seed(&r, seed);
    att_rig_spec_t spec;
    att_rig_spec_init(&spec, dt, 1, hq, hkv, 128, 16);
    att_rig_spec_features(&spec, feats, &r);
    char desc[256];
    tu_where_set("mixed_wide_sms %u: ATTND_TEST_SEED=%" PRIu64 " (seed %" PRIu64 "), %s",
                 wide_sms, g_seed, seed, att_rig_spec_str(&spec, desc, sizeof desc));
    print_message("mixed_wide_sms %u: %s\n", wide_sms, desc);
    att_rig_t rig;
    att_rig_init_with(&rig, &spec.cfg, 8192, CPU_BE, 1, &be, 1, tu_rng_next(&r));
    /* 12 sequences' prompts, and a long one for the chunk (one kind each: every SM) */
    enum { SEQS = 12 };
    att_chunk_t ch[SEQS + 1];
    for (uint32_t i = 0; i < SEQS; i++)
        ch[i] = (att_chunk_t){100 + i, 0, 150 + 29 * i};
    att_rig_attend(&rig, 0, ch, SEQS);
    const att_chunk_t pre[] = {{99, 0, 700}};
    att_rig_attend(&rig, 0, pre, 1);
    /* three steps of a decode token per sequence next to a chunk of the long one: split
     * narrow tiles and (split) wide tiles on their own partitions */
    uint32_t pos = 700;
    const uint64_t before = device_calls(rig.ctx[1]);
    for (uint32_t step = 0; step < 3; step++) {
        for (uint32_t i = 0; i < SEQS; i++)
            ch[i] = (att_chunk_t){100 + i, 150 + 29 * i + step, 1};
        const uint32_t n = step == 1 ? 45 : 300; /* a partial wide tile too */
        ch[SEQS] = (att_chunk_t){99, pos, n};
        pos += n;
        att_rig_attend(&rig, 0, ch, SEQS + 1);
    }
    const char *why = NULL;
    const uint64_t want = device_launches(&why) && has_green() ? 3 : 0;
    TU_CHECK(device_calls(rig.ctx[1]) - before == want,
             "%" PRIu64 " of the mixed batches launched from the device, not %" PRIu64,
             device_calls(rig.ctx[1]) - before, want);
    /* a decode-only batch after them: back on the session's stream */
    for (uint32_t i = 0; i < SEQS; i++)
        ch[i] = (att_chunk_t){100 + i, 150 + 29 * i + 3, 1};
    att_rig_attend(&rig, 0, ch, SEQS);
    att_rig_fini(&rig);
    att_backend_destroy(&be);
}

static void test_att_cuda_mixed_on_partitions(void **state) {
    (void)state;
    NEED_GPU();
    partition_case(32, ATT_DTYPE_BF16, 32, 8, 0, 0);
    partition_case(32, ATT_DTYPE_F16, 16, 2, ATT_RIG_F_WINDOW | ATT_RIG_F_SINKS, 1);
    partition_case(20, ATT_DTYPE_BF16, 8, 2, ATT_RIG_F_ALL, 2); /* rounded up by the driver */
    partition_case(32, ATT_DTYPE_F32, 8, 2, ATT_RIG_F_SOFT_CAP, 3); /* the FMA bodies */
}

/* ---- the last wave's tiles split (att_gpu_plan_batch) ---- */

/* Decode batches of a model of 8 KV heads (8 blocks per sequence) on a backend whose plan counts
 * one block per SM as a wave: 2 waves and up to 8 blocks more, so the shortest sequence's tile
 * (sequence 0's) is split into parts that fill the third wave, and merged; then 2 waves and
 * about 3/4 of one more, a last wave too full to split. Against the CPU backend and the oracle.
 * The backend does not report its plan: test_att_gpu_plan checks these choices. */
static void test_att_cuda_tail_split(void **state) {
    (void)state;
    NEED_GPU();
    att_cuda_plan_t plan;
    memset(&plan, 0, sizeof plan);
    plan.blocks_per_sm = 1;
    att_backend_t *be = backend_with_plan(&plan);
    tun_device_t dev;
    const char *hash = NULL;
    att_cuda_tune_device(be, &dev, &hash);
    const uint32_t first = 2 * dev.threads / 8 + 1, seqs = first + dev.threads / 12;
    if (seqs > ATT_RIG_MAX_SEQS) {
        printf("SKIP the tail split: %u SMs need %u sequences, the rig holds %u\n", dev.threads,
               seqs, ATT_RIG_MAX_SEQS);
        att_backend_destroy(&be);
        return;
    }
    const uint64_t seed = tu_sub_seed(g_seed, 80000u);
    tu_rng_t r;
    tu_rng_seed(&r, seed);
    att_rig_spec_t spec;
    att_rig_spec_init(&spec, ATT_DTYPE_BF16, 1, 16, 8, 128, 16);
    att_rig_spec_features(&spec, ATT_RIG_F_SINKS | ATT_RIG_F_SOFT_CAP, &r);
    char desc[256];
    tu_where_set("tail split on %u SMs: ATTND_TEST_SEED=%" PRIu64 " (seed %" PRIu64 "), %s",
                 dev.threads, g_seed, seed, att_rig_spec_str(&spec, desc, sizeof desc));
    print_message("tail split on %u SMs: %s\n", dev.threads, desc);
    att_rig_t rig;
    att_rig_init_with(&rig, &spec.cfg, (uint64_t)seqs * 1200, CPU_BE, 1, &be, 1,
                      tu_rng_next(&r));
    att_chunk_t ch[ATT_RIG_MAX_SEQS];
    for (uint32_t i = 0; i < seqs; i++) /* contexts from 1000 tokens: up to 3 parts */
        ch[i] = (att_chunk_t){i, 0, 1000 + i};
    att_rig_append(&rig, 0, ch, seqs);
    for (uint32_t step = 0; step < 2; step++) {
        const uint32_t n = step == 0 ? first : seqs;
        for (uint32_t i = 0; i < n; i++) /* the second step: the first's sequences one longer */
            ch[i] = (att_chunk_t){i, 1000 + i + (step == 1 && i < first), 1};
        att_rig_attend(&rig, 0, ch, n);
    }
    att_rig_fini(&rig);
    att_backend_destroy(&be);
}
#endif

/* ---- three models interleaved on one GPU ---- */

static void test_att_cuda_models_interleaved(void **state) {
    (void)state;
    NEED_GPU();
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 40000u));
    tu_where_set("interleaved: ATTND_TEST_SEED=%" PRIu64, g_seed);
    att_rig_spec_t sa, sb, sc;
    att_rig_spec_init(&sa, ATT_DTYPE_BF16, 2, 32, 8, 128, 16); /* Llama-3-8B-like, group 4 */
    att_rig_spec_init(&sb, ATT_DTYPE_F16, 2, 16, 2, 64, 32);   /* group 8 */
    att_rig_spec_init(&sc, ATT_DTYPE_F32, 1, 6, 1, 80, 16);    /* MQA */
    att_rig_spec_features(&sb, ATT_RIG_F_SOFT_CAP, &r);
    att_rig_t ra, rb, rc;
    rig_on_gpu(&ra, &sa, 2048, 0, tu_rng_next(&r));
    rig_on_gpu(&rb, &sb, 2048, 0, tu_rng_next(&r));
    rig_on_gpu(&rc, &sc, 2048, 0, tu_rng_next(&r));
    const att_chunk_t pre[] = {{7, 0, 37}, {8, 0, 5}};
    for (uint32_t l = 0; l < 2; l++) {
        att_rig_attend(&ra, l, pre, 2);
        att_rig_attend(&rb, l, pre, 2);
        if (l == 0)
            att_rig_attend(&rc, 0, pre, 2);
    }
    for (uint32_t s = 0; s < 6; s++) {
        const att_chunk_t dec[] = {{7, 37 + s, 1}, {8, 5 + s, 1}};
        att_rig_attend(&rc, 0, dec, 2);
        for (uint32_t l = 0; l < 2; l++) {
            att_rig_attend(&rb, l, dec, 2);
            att_rig_attend(&ra, l, dec, 2);
        }
    }
    att_ctx_info_t ia, ib, ic;
    att_ctx_get_info(ra.ctx[0], &ia);
    att_ctx_get_info(rb.ctx[0], &ib);
    att_ctx_get_info(rc.ctx[0], &ic);
    /* each session prepared its own launches once per key, then hit */
    TU_CHECK(ia.kv_stats.lc_misses <= 4 && ia.kv_stats.lc_hits >= 10,
             "model A: %" PRIu64 " misses, %" PRIu64 " hits", ia.kv_stats.lc_misses,
             ia.kv_stats.lc_hits);
    TU_CHECK(ib.kv_stats.lc_misses <= 4 && ib.kv_stats.lc_hits >= 10,
             "model B: %" PRIu64 " misses, %" PRIu64 " hits", ib.kv_stats.lc_misses,
             ib.kv_stats.lc_hits);
    TU_CHECK(ic.kv_stats.lc_misses <= 4 && ic.kv_stats.lc_hits >= 4,
             "model C: %" PRIu64 " misses, %" PRIu64 " hits", ic.kv_stats.lc_misses,
             ic.kv_stats.lc_hits);
    print_message("launch caches: A %" PRIu64 "/%" PRIu64 ", B %" PRIu64 "/%" PRIu64
                  ", C %" PRIu64 "/%" PRIu64 " hits/misses\n",
                  ia.kv_stats.lc_hits, ia.kv_stats.lc_misses, ib.kv_stats.lc_hits,
                  ib.kv_stats.lc_misses, ic.kv_stats.lc_hits, ic.kv_stats.lc_misses);
    att_rig_fini(&ra);
    att_rig_fini(&rb);
    att_rig_fini(&rc);
}

/* ---- append-only, then attention over what was appended ---- */

static void test_att_cuda_append_then_attend(void **state) {
    (void)state;
    NEED_GPU();
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 50000u));
    tu_where_set("append: ATTND_TEST_SEED=%" PRIu64, g_seed);
    att_rig_spec_t s;
    att_rig_spec_init(&s, ATT_DTYPE_F16, 2, 8, 2, 128, 8);
    att_rig_t rig;
    rig_on_gpu(&rig, &s, 2048, 1, tu_rng_next(&r));
    const att_chunk_t a[] = {{11, 0, 70}, {12, 0, 3}};
    att_rig_append(&rig, 0, a, 2);
    att_rig_append(&rig, 1, a, 2);
    const att_chunk_t b[] = {{11, 70, 1}, {12, 3, 20}};
    att_rig_attend_layers(&rig, b, 2);
    const att_chunk_t c[] = {{11, 30, 5}}; /* append over a rolled-back tail */
    att_rig_append(&rig, 0, c, 1);
    att_rig_fini(&rig);
}

/* ---- the session's device-resident block tables ---- */

/* Six sequences decode across many block boundaries (blocks of 8) while others are released
 * (the remaining ones change kvc slots), one rolls back (its table shrinks: a new stamp), one is
 * appended to without attention (the KV-write kernel keeps its new entries), and a released id
 * comes back as a new sequence: each call's output must still match the CPU backend's, so every
 * table entry the kernels read, kept from earlier calls or sent by this one, is right. */
static void test_att_cuda_tables_follow_the_cache(void **state) {
    (void)state;
    NEED_GPU();
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 45000u));
    tu_where_set("tables: ATTND_TEST_SEED=%" PRIu64, g_seed);
    att_rig_spec_t s;
    att_rig_spec_init(&s, ATT_DTYPE_BF16, 2, 16, 4, 128, 8);
    att_rig_t rig;
    rig_on_gpu(&rig, &s, 4096, 1, tu_rng_next(&r));
    uint32_t len[6];
    att_chunk_t c[6];
    for (uint32_t i = 0; i < 6; i++) {
        len[i] = 5 + 7 * i;
        c[i] = (att_chunk_t){100 + i, 0, len[i]};
    }
    att_rig_attend_layers(&rig, c, 6);
    for (uint32_t step = 0; step < 40; step++) {
        uint32_t n = 0;
        for (uint32_t i = 0; i < 6; i++) {
            if (len[i] == 0)
                continue; /* released */
            c[n++] = (att_chunk_t){100 + i, len[i], 1};
            len[i]++;
        }
        att_rig_attend_layers(&rig, c, n);
        if (step == 10) { /* the others move to lower slots */
            const uint64_t ids[] = {100, 102};
            att_rig_release(&rig, ids, 2, 2);
            len[0] = len[2] = 0;
        }
        if (step == 20) { /* B rolls back 20 tokens: fewer blocks, then new ones */
            len[1] -= 20;
            const att_chunk_t back[] = {{101, len[1], 3}};
            att_rig_attend_layers(&rig, back, 1);
            len[1] += 3;
        }
        if (step == 25) { /* append only, then attention over it */
            const att_chunk_t app[] = {{103, len[3], 17}};
            for (uint32_t l = 0; l < 2; l++)
                att_rig_append(&rig, l, app, 1);
            len[3] += 17;
        }
        if (step == 30) { /* a released id is a new sequence */
            const att_chunk_t fresh[] = {{100, 0, 30}};
            att_rig_attend_layers(&rig, fresh, 1);
            len[0] = 30;
        }
    }
    att_rig_fini(&rig);
}

/* ---- merged calls (separate buffers per chunk) and registered host memory ---- */

static void test_att_cuda_merged_calls_and_registered_memory(void **state) {
    (void)state;
    NEED_GPU();
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 60000u));
    tu_where_set("merged: ATTND_TEST_SEED=%" PRIu64, g_seed);
    att_rig_spec_t s;
    att_rig_spec_init(&s, ATT_DTYPE_BF16, 1, 8, 2, 64, 16);
    att_rig_t rig;
    rig_on_gpu(&rig, &s, 4096, 0, tu_rng_next(&r));
    const size_t q_row = 8 * 64 * 2, kv_row = 2 * 64 * 2;
    /* one registered region holds the second call's tensors; the others are plain heap */
    const size_t region = 1u << 20;
    uint8_t *reg = NULL;
    TU_CHECK(posix_memalign((void **)&reg, 4096, region) == 0, "posix_memalign");
    TU_CHECK(g_cuda->ops->register_host(g_cuda, reg, region) == AT_OK, "register_host");
    const att_chunk_t ch[3][1] = {{{21, 0, 33}}, {{22, 0, 1}}, {{23, 0, 17}}};
    void *q[3], *k[3], *v[3], *out[3];
    double *ref[3];
    att_call_t calls[3];
    for (int i = 0; i < 3; i++) {
        const uint32_t t = ch[i][0].num_tokens;
        q[i] = att_rig_random_q(&rig, t);
        k[i] = att_rig_random_kv(&rig, t, ATT_RIG_QK_RANGE);
        v[i] = att_rig_random_kv(&rig, t, ATT_RIG_V_RANGE);
        out[i] = tu_xmalloc(t * q_row);
        if (i == 1) { /* move call 1 into the registered region, out too */
            uint8_t *p = reg;
            memcpy(p, q[i], t * q_row);
            memcpy(p + 4096, k[i], t * kv_row);
            memcpy(p + 8192, v[i], t * kv_row);
            free(q[i]);
            free(k[i]);
            free(v[i]);
            free(out[i]);
            q[i] = p;
            k[i] = p + 4096;
            v[i] = p + 8192;
            out[i] = p + 12288;
        }
        memset(out[i], 0xff, t * q_row);
        ref[i] = tu_xcalloc((size_t)t * 8 * 64, sizeof(double));
        att_rig_note_id(&rig, ch[i][0].seq_id);
        TU_CHECK(att_oracle_run(rig.oracle, 0, ch[i], 1, q[i], k[i], v[i], ref[i]) == AT_OK,
                 "oracle");
        calls[i] = att_rig_call(&rig, 0, ch[i], 1, q[i], k[i], v[i], out[i]);
    }
    at_err_t errs[3];
    at_diag_t diags[3];
    att_ctx_run_many(rig.ctx[0], calls, 3, 1, errs, diags);
    for (int i = 0; i < 3; i++) {
        TU_CHECK(errs[i] == AT_OK, "call %d: %s (%s)", i, at_err_name(errs[i]), diags[i].msg);
        att_rig_compare(&rig, 0, 0, ch[i], 1, out[i], ref[i]);
        free(ref[i]);
        if (i != 1) {
            free(q[i]);
            free(k[i]);
            free(v[i]);
            free(out[i]);
        }
    }
    att_ctx_info_t info;
    att_ctx_get_info(rig.ctx[0], &info);
    TU_CHECK(info.backend_runs == 1, "the three calls ran as %" PRIu64 " runs", info.backend_runs);
    att_rig_check_cache(&rig);
    att_rig_fini(&rig);
    g_registered[0] = reg;
}

/* A call whose q, k, v and out lie one after another in registered memory, each rounded up to
 * 64 bytes as the server's arena places them: the CUDA backend reads q in place and uploads k
 * and v in one copy (att_gpu_qkv_span from k: two copy calls with the metadata; a backend with
 * staged_io spans q, k and v, q_and_out_in_host_memory), and its kernels find v at the host's
 * distance, which differs from the layout's own (k's bytes, an odd number of 128-byte rows, are
 * not a multiple of its 256-byte alignment); the HIP backend copies each tensor. Prefill
 * chunks, then decode steps next to a chunk over earlier context (both calls have narrow and
 * wide tiles on shared SMs: the default plan splits no SMs for batches this small, so CUDA
 * launches them from the host, with the two copy calls), then decode steps alone, a call of
 * one launch, which CUDA launches from the device where it can (no copy calls then: the span
 * is one copy range); each against the oracle. */
static void test_att_cuda_adjacent_tensors_in_registered_memory(void **state) {
    (void)state;
    NEED_GPU();
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 61000u));
    tu_where_set("adjacent: ATTND_TEST_SEED=%" PRIu64, g_seed);
    att_rig_spec_t s;
    att_rig_spec_init(&s, ATT_DTYPE_BF16, 1, 2, 1, 64, 16);
    att_rig_t rig;
    rig_on_gpu(&rig, &s, 4096, 0, tu_rng_next(&r));
    const size_t q_row = 2 * 64 * 2, kv_row = 1 * 64 * 2, region = 1u << 20;
    uint8_t *reg = NULL;
    TU_CHECK(posix_memalign((void **)&reg, 4096, region) == 0, "posix_memalign");
    TU_CHECK(g_cuda->ops->register_host(g_cuda, reg, region) == AT_OK, "register_host");
    g_registered[1] = reg;
    const att_chunk_t calls[3][3] = {{{31, 0, 37}, {32, 0, 5}, {33, 0, 21}},
                                     {{31, 37, 1}, {32, 5, 1}, {33, 21, 31}},
                                     {{31, 38, 1}, {32, 6, 1}, {33, 52, 1}}};
    for (int i = 0; i < 3; i++) {
        const uint32_t t = att_rig_tokens(calls[i], 3);
        const size_t qb = t * q_row, kb = t * kv_row;
        uint8_t *q = reg, *k = q + (qb + 63) / 64 * 64, *v = k + (kb + 63) / 64 * 64;
        uint8_t *out = v + (kb + 63) / 64 * 64;
        TU_CHECK(out + qb <= reg + region, "call %d does not fit the region", i);
        void *src[3] = {att_rig_random_q(&rig, t), att_rig_random_kv(&rig, t, ATT_RIG_QK_RANGE),
                        att_rig_random_kv(&rig, t, ATT_RIG_V_RANGE)};
        memcpy(q, src[0], qb);
        memcpy(k, src[1], kb);
        memcpy(v, src[2], kb);
        for (int j = 0; j < 3; j++)
            free(src[j]);
        memset(out, 0xff, qb);
        double *ref = tu_xcalloc((size_t)t * 2 * 64, sizeof(double));
        for (int c = 0; c < 3; c++)
            att_rig_note_id(&rig, calls[i][c].seq_id);
        TU_CHECK(att_oracle_run(rig.oracle, 0, calls[i], 3, q, k, v, ref) == AT_OK, "oracle");
        const att_call_t c = att_rig_call(&rig, 0, calls[i], 3, q, k, v, out);
        att_ctx_info_t before, after;
        att_ctx_get_info(rig.ctx[0], &before);
        at_diag_t d = {{0}};
        const at_err_t e = att_ctx_attend(rig.ctx[0], &c, &d);
        TU_CHECK(e == AT_OK, "call %d: %s (%s)", i, at_err_name(e), d.msg);
        att_ctx_get_info(rig.ctx[0], &after);
#ifndef ATT_TEST_HIP
        const char *why = NULL;
        const uint64_t from_device = i == 2 && device_launches(&why) ? 1 : 0;
        TU_CHECK(after.kv_stats.device_calls - before.kv_stats.device_calls == from_device,
                 "call %d: %" PRIu64 " calls launched from the device, not %" PRIu64, i,
                 after.kv_stats.device_calls - before.kv_stats.device_calls, from_device);
        const uint64_t want = from_device ? 0 : 2;
        TU_CHECK(after.kv_stats.uploads - before.kv_stats.uploads == want,
                 "call %d: %" PRIu64 " copy calls to the device, not %" PRIu64, i,
                 after.kv_stats.uploads - before.kv_stats.uploads, want);
#endif
        att_rig_compare(&rig, 0, 0, calls[i], 3, out, ref);
        free(ref);
    }
    att_rig_check_cache(&rig);
    att_rig_fini(&rig);
}

#ifndef ATT_TEST_HIP
/* ---- device-launched calls (attention/att_cudl.h) ---- */

/* The same calls on a backend that launches calls from the device (where the device runtime
 * library is, unless ATTND_CUDA_LAUNCH=host: then it skips) and on one that launches every call
 * from the host, both with plan: a prefill (wide tiles alone), decode steps (narrow alone), two
 * mixed batches (both kinds), an append. Each output must be the host-launched one's to the bit
 * and match the oracle; mixed_from_device says whether the mixed batches must launch from the
 * device (a partitioned plan: the narrow kind's persistent grid, then the wide kind's) or from
 * the host (shared SMs). With engine, every device-launched call's q, k and v go by the copy
 * engine (dl_engine_bytes 1: one copy call or more, the job released by a stream write), every
 * other step's from memory registered with the device-launching backend (k and v one copy from
 * their host address), the others' through its stage; else the SMs copy them (no copy call).
 * Then a pause longer than the launcher's idle spell, after which it has ended and the next call
 * must launch it again. */
static void device_launched_case(const att_cuda_plan_t *plan, uint32_t mixed_from_device,
                                 bool engine, uint32_t index) {
    enum { HQ = 8, HKV = 2, D = 128 }; /* bf16 */
    att_rig_spec_t s;
    att_rig_spec_init(&s, ATT_DTYPE_BF16, 1, HQ, HKV, D, 16);
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 62000u + index));
    tu_where_set("device-launched, case %u: ATTND_TEST_SEED=%" PRIu64, index, g_seed);
    const att_cuda_cfg_t dc = {
        .device = 0, .kernel_cache_dir = "", .plan = plan, .dl_engine_bytes = engine ? 1 : 0};
    const att_cuda_cfg_t hc = {
        .device = 0, .kernel_cache_dir = "", .plan = plan, .host_launches = true};
    att_backend_t *dev = NULL, *host = NULL;
    at_diag_t d = {{0}};
    TU_CHECK(att_cuda_create(&dc, &d, &dev) == AT_OK, "att_cuda_create: %s", d.msg);
    TU_CHECK(att_cuda_create(&hc, &d, &host) == AT_OK, "att_cuda_create: %s", d.msg);
    att_backend_t *const both[2] = {dev, host};
    const size_t region = 1u << 20;
    uint8_t *reg = NULL;
    if (engine) {
        TU_CHECK(posix_memalign((void **)&reg, 4096, region) == 0, "posix_memalign");
        TU_CHECK(dev->ops->register_host(dev, reg, region) == AT_OK, "register_host");
    }
    att_rig_t rig;
    att_rig_init_with(&rig, &s.cfg, 8192, CPU_BE, 0, both, 2, tu_rng_next(&r));
    const att_chunk_t prefill[] = {{1, 0, 300}, {2, 0, 17}};
    const att_chunk_t decode[] = {{1, 300, 1}, {2, 17, 1}};
    const att_chunk_t decode2[] = {{1, 301, 1}, {2, 18, 1}};
    const att_chunk_t mixed[] = {{1, 302, 1}, {2, 19, 40}};
    const att_chunk_t mixed2[] = {{1, 303, 1}, {2, 59, 200}};
    const struct {
        const att_chunk_t *c;
        uint32_t n, from_device;
    } steps[] = {{prefill, 2, 1},
                 {decode, 2, 1},
                 {decode2, 2, 1},
                 {mixed, 2, mixed_from_device},
                 {mixed2, 2, mixed_from_device}};
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        const uint32_t t = att_rig_tokens(steps[i].c, steps[i].n);
        void *q = att_rig_random_q(&rig, t), *k = att_rig_random_kv(&rig, t, ATT_RIG_QK_RANGE),
             *v = att_rig_random_kv(&rig, t, ATT_RIG_V_RANGE);
        const size_t qb = (size_t)t * HQ * D * 2, kb = (size_t)t * HKV * D * 2;
        const void *in[3] = {q, k, v};
        if (reg != NULL && i % 2 == 1) { /* q, k, v one after another, as the server's arena */
            uint8_t *rk = reg + (qb + 63) / 64 * 64, *rv = rk + (kb + 63) / 64 * 64;
            TU_CHECK(rv + kb <= reg + region, "step %zu does not fit the region", i);
            memcpy(reg, q, qb);
            memcpy(rk, k, kb);
            memcpy(rv, v, kb);
            in[0] = reg;
            in[1] = rk;
            in[2] = rv;
        }
        const uint64_t before[2] = {device_calls(rig.ctx[0]), device_calls(rig.ctx[1])};
        const uint64_t up = uploads(rig.ctx[0]);
        void *out[2] = {NULL, NULL};
        att_rig_attend_with(&rig, 0, steps[i].c, steps[i].n, in[0], in[1], in[2], out);
        TU_CHECK(device_calls(rig.ctx[0]) - before[0] == steps[i].from_device,
                 "step %zu: %" PRIu64 " calls launched from the device, not %u", i,
                 device_calls(rig.ctx[0]) - before[0], steps[i].from_device);
        if (steps[i].from_device)
            TU_CHECK((uploads(rig.ctx[0]) != up) == engine,
                     "step %zu: %" PRIu64 " copy calls from the device-launching backend", i,
                     uploads(rig.ctx[0]) - up);
        TU_CHECK(device_calls(rig.ctx[1]) == before[1],
                 "step %zu: the host-launch backend "
                 "launched from the device",
                 i);
        TU_CHECK(memcmp(out[0], out[1], qb) == 0,
                 "step %zu: device- and host-launched outputs differ", i);
        free(out[0]);
        free(out[1]);
        free(q);
        free(k);
        free(v);
    }
    const att_chunk_t append[] = {{1, 304, 7}};
    const uint64_t before = device_calls(rig.ctx[0]);
    const uint64_t up = uploads(rig.ctx[0]);
    att_rig_append(&rig, 0, append, 1);
    TU_CHECK(device_calls(rig.ctx[0]) - before == 1, "the append was not launched from the "
                                                     "device");
    TU_CHECK((uploads(rig.ctx[0]) != up) == engine, "the append made %" PRIu64 " copy calls",
             uploads(rig.ctx[0]) - up);
    /* past the launcher's idle spell (ATT_CUDL_IDLE_NS): it has ended; the call relaunches it */
    const struct timespec pause = {0, 3 * 1000 * 1000};
    nanosleep(&pause, NULL);
    const att_chunk_t after_pause[] = {{1, 311, 1}, {2, 259, 1}};
    const uint64_t before_pause = device_calls(rig.ctx[0]);
    att_rig_attend(&rig, 0, after_pause, 2);
    TU_CHECK(device_calls(rig.ctx[0]) - before_pause == 1,
             "the call after the pause was not launched from the device");
    att_rig_check_cache(&rig);
    att_rig_fini(&rig);
    att_backend_destroy(&dev);
    att_backend_destroy(&host);
    free(reg);
}

/* ---- q and out in host memory (att_cuda.c, "direct I/O") ---- */

/* Runs calls[0..n) on the rig's context ctx as one backend run (merged when n is 2), asserting
 * AT_OK and one run. */
static void io_run(att_rig_t *rig, uint32_t ctx, const att_call_t *calls, uint32_t n) {
    att_ctx_info_t before, after;
    att_ctx_get_info(rig->ctx[ctx], &before);
    at_err_t errs[2];
    at_diag_t diags[2];
    memset(diags, 0, sizeof diags);
    att_ctx_run_many(rig->ctx[ctx], calls, n, 1, errs, diags);
    for (uint32_t i = 0; i < n; i++)
        TU_CHECK(errs[i] == AT_OK, "context %u, call %u: %s (%s)", ctx, i, at_err_name(errs[i]),
                 diags[i].msg);
    att_ctx_get_info(rig->ctx[ctx], &after);
    TU_CHECK(after.backend_runs - before.backend_runs == 1, "context %u: %" PRIu64 " runs", ctx,
             after.backend_runs - before.backend_runs);
}

/* Calls whose q and out lie each way the backend tells apart, on the shared backend and on one
 * that copies them (staged_io): a prefill in registered memory, its tensors one after another as
 * the server's arena places them (q and out used where they lie; k and v in one copy); decode
 * steps there with out 8 bytes off 16-byte alignment (out copied back); a mixed batch on the
 * heap (q and out in the stage); two decode calls merged into one run, each in registered
 * memory (every tensor in two runs: copied); decode steps on the heap; then an append from
 * registered memory (k and v in one copy) and a decode over it. Every output must match the
 * oracle, and the copying backend's to the bit; registered out's neighbouring bytes must be
 * untouched; a call launched from the host must make the copy calls its ways imply (q copied
 * or not), one from the device none; the caches must end as the oracle's. */
static void test_att_cuda_q_and_out_in_host_memory(void **state) {
    (void)state;
    NEED_GPU();
    enum { HQ = 8, HKV = 2, D = 64, Q_ROW = HQ * D * 2, KV_ROW = HKV * D * 2, GUARD = 64 };
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 63000u));
    tu_where_set("q and out in host memory: ATTND_TEST_SEED=%" PRIu64, g_seed);
    const att_cuda_cfg_t sc = {.device = 0, .kernel_cache_dir = "", .staged_io = true};
    att_backend_t *staged = NULL;
    at_diag_t d = {{0}};
    TU_CHECK(att_cuda_create(&sc, &d, &staged) == AT_OK, "att_cuda_create: %s", d.msg);
    att_backend_t *const both[2] = {g_cuda, staged};
    /* a region for each backend: both use the device's primary context, where memory is
     * registered once */
    const bool direct = direct_io(); /* the shared backend's; the other copies */
    const size_t region = 1u << 20;
    uint8_t *reg[2] = {NULL, NULL};
    for (int x = 0; x < 2; x++) {
        TU_CHECK(posix_memalign((void **)&reg[x], 4096, region) == 0, "posix_memalign");
        TU_CHECK(both[x]->ops->register_host(both[x], reg[x], region) == AT_OK, "register_host");
    }
    g_registered[2] = reg[0];
    att_rig_spec_t s;
    att_rig_spec_init(&s, ATT_DTYPE_BF16, 1, HQ, HKV, D, 16);
    att_rig_t rig;
    att_rig_init_with(&rig, &s.cfg, 4096, CPU_BE, 0, both, 2, tu_rng_next(&r));
    const att_chunk_t steps[5][2] = {{{41, 0, 70}, {42, 0, 9}},
                                     {{41, 70, 1}, {42, 9, 1}},
                                     {{41, 71, 1}, {42, 10, 30}},
                                     {{41, 72, 1}, {42, 40, 1}},
                                     {{41, 73, 1}, {42, 41, 1}}};
    for (int i = 0; i < 5; i++) {
        const bool heap = i == 2 || i == 4;
        const uint32_t n = i == 3 ? 2 : 1;   /* calls: step 3's chunks are two merged calls */
        const uint32_t per = i == 3 ? 1 : 2; /* chunks per call */
        void *qs[2], *ks[2], *vs[2], *heap_out[2], *saved[2];
        double *ref[2];
        size_t qb[2], kb[2];
        for (uint32_t c = 0; c < n; c++) {
            const att_chunk_t *ch = &steps[i][c * per];
            const uint32_t t = att_rig_tokens(ch, per);
            qb[c] = (size_t)t * Q_ROW;
            kb[c] = (size_t)t * KV_ROW;
            qs[c] = att_rig_random_q(&rig, t);
            ks[c] = att_rig_random_kv(&rig, t, ATT_RIG_QK_RANGE);
            vs[c] = att_rig_random_kv(&rig, t, ATT_RIG_V_RANGE);
            heap_out[c] = tu_xmalloc(qb[c]);
            saved[c] = tu_xmalloc(qb[c]);
            ref[c] = tu_xcalloc((size_t)t * HQ * D, sizeof(double));
            for (uint32_t j = 0; j < per; j++)
                att_rig_note_id(&rig, ch[j].seq_id);
            TU_CHECK(att_oracle_run(rig.oracle, 0, ch, per, qs[c], ks[c], vs[c], ref[c]) == AT_OK,
                     "oracle");
        }
        for (uint32_t x = 0; x < 2; x++) {
            att_call_t calls[2];
            uint8_t *out[2];
            for (uint32_t c = 0; c < n; c++) {
                void *q = qs[c], *k = ks[c], *v = vs[c];
                out[c] = heap_out[c];
                if (!heap) { /* q, k, v and out one after another from c * 256 KiB on */
                    uint8_t *at = reg[x] + c * (256u << 10);
                    q = at;
                    k = at + (qb[c] + 63) / 64 * 64;
                    v = (uint8_t *)k + (kb[c] + 63) / 64 * 64;
                    out[c] = (uint8_t *)v + (kb[c] + 63) / 64 * 64 + GUARD + (i == 1 ? 8 : 0);
                    memcpy(q, qs[c], qb[c]);
                    memcpy(k, ks[c], kb[c]);
                    memcpy(v, vs[c], kb[c]);
                    memset(out[c] - GUARD, 0x5a, qb[c] + 2 * GUARD);
                }
                memset(out[c], 0xff, qb[c]);
                calls[c] = att_rig_call(&rig, 0, &steps[i][c * per], per, q, k, v, out[c]);
            }
            att_ctx_info_t before, after;
            att_ctx_get_info(rig.ctx[x], &before);
            io_run(&rig, x, calls, n);
            att_ctx_get_info(rig.ctx[x], &after);
            /* from the host: the metadata, then q (unless used in place), k and v, as one span
             * where they lie together, else a copy per tensor and run */
            const uint64_t want = after.kv_stats.device_calls != before.kv_stats.device_calls ? 0
                                  : i == 3                                                    ? 7
                                  : !heap                                                     ? 2
                                  : x == 0 && direct                                          ? 3
                                                                                              : 4;
            TU_CHECK(after.kv_stats.uploads - before.kv_stats.uploads == want,
                     "step %d, backend %u: %" PRIu64 " copy calls to the device, not %" PRIu64, i,
                     x, after.kv_stats.uploads - before.kv_stats.uploads, want);
            for (uint32_t c = 0; c < n; c++) {
                att_rig_compare(&rig, x, 0, &steps[i][c * per], per, out[c], ref[c]);
                for (size_t g = 0; !heap && g < GUARD; g++)
                    TU_CHECK(out[c][-1 - (ptrdiff_t)g] == 0x5a && out[c][qb[c] + g] == 0x5a,
                             "step %d, backend %u, call %u: a byte next to out was written", i, x,
                             c);
                if (x == 0)
                    memcpy(saved[c], out[c], qb[c]);
                else
                    TU_CHECK(memcmp(saved[c], out[c], qb[c]) == 0,
                             "step %d, call %u: the outputs differ from the copying backend's", i,
                             c);
            }
        }
        for (uint32_t c = 0; c < n; c++) {
            free(qs[c]);
            free(ks[c]);
            free(vs[c]);
            free(heap_out[c]);
            free(saved[c]);
            free(ref[c]);
        }
    }
    /* an append from registered memory: k and v one after another, one copy from the host */
    const att_chunk_t append[] = {{41, 74, 5}, {42, 42, 3}};
    const uint32_t at = att_rig_tokens(append, 2);
    const size_t akb = (size_t)at * KV_ROW;
    void *ak = att_rig_random_kv(&rig, at, ATT_RIG_QK_RANGE);
    void *av = att_rig_random_kv(&rig, at, ATT_RIG_V_RANGE);
    TU_CHECK(att_oracle_run(rig.oracle, 0, append, 2, NULL, ak, av, NULL) == AT_OK, "oracle");
    for (uint32_t x = 0; x < 2; x++) {
        uint8_t *k = reg[x] + (512u << 10), *v = k + (akb + 63) / 64 * 64;
        memcpy(k, ak, akb);
        memcpy(v, av, akb);
        const att_call_t call = att_rig_call(&rig, 0, append, 2, NULL, k, v, NULL);
        att_ctx_info_t before, after;
        att_ctx_get_info(rig.ctx[x], &before);
        at_diag_t ad = {{0}};
        const at_err_t e = att_ctx_append(rig.ctx[x], &call, &ad);
        TU_CHECK(e == AT_OK, "append, backend %u: %s (%s)", x, at_err_name(e), ad.msg);
        att_ctx_get_info(rig.ctx[x], &after);
        const uint64_t want = after.kv_stats.device_calls != before.kv_stats.device_calls ? 0 : 2;
        TU_CHECK(after.kv_stats.uploads - before.kv_stats.uploads == want,
                 "append, backend %u: %" PRIu64 " copy calls to the device, not %" PRIu64, x,
                 after.kv_stats.uploads - before.kv_stats.uploads, want);
    }
    free(ak);
    free(av);
    att_rig_check_cache(&rig);
    const att_chunk_t after[] = {{41, 79, 1}, {42, 45, 1}};
    att_rig_attend(&rig, 0, after, 2);
    att_rig_fini(&rig);
    att_backend_destroy(&staged);
    free(reg[1]);
}

/* Inputs past ATT_CUDL_MAX_COPY_BYTES go by the copy engine whatever dl_engine_bytes says: an
 * append of 40 MiB of k and v (a new sequence), then a decode over it, each launched from the
 * device and checked against the host-launched backend (to the bit) and the oracle. The copies
 * take long enough that a job started before they land would read stale k and v. The launcher's
 * idle spell is cut to 10 us, far below those copies: it must keep waiting for the announced
 * job, not end and be launched again by the waiting host (one launch from the host, the
 * submission's: the launcher was ended when the session's buffers grew for the 40 MiB). */
static void test_att_cuda_engine_copies_past_the_bound(void **state) {
    (void)state;
    NEED_GPU();
    need_device_launches();
    enum { HQ = 8, HKV = 2, D = 128, BIG = 40960 }; /* bf16: 1 KiB of k and v a token */
    att_rig_spec_t s;
    att_rig_spec_init(&s, ATT_DTYPE_BF16, 1, HQ, HKV, D, 16);
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 62100u));
    tu_where_set("engine copies past the bound: ATTND_TEST_SEED=%" PRIu64, g_seed);
    const att_cuda_cfg_t dc = {.device = 0, .kernel_cache_dir = "", .dl_idle_ns = 10000};
    const att_cuda_cfg_t hc = {.device = 0, .kernel_cache_dir = "", .host_launches = true};
    att_backend_t *dev = NULL, *host = NULL;
    at_diag_t d = {{0}};
    TU_CHECK(att_cuda_create(&dc, &d, &dev) == AT_OK, "att_cuda_create: %s", d.msg);
    TU_CHECK(att_cuda_create(&hc, &d, &host) == AT_OK, "att_cuda_create: %s", d.msg);
    att_backend_t *const both[2] = {dev, host};
    att_rig_t rig;
    att_rig_init_with(&rig, &s.cfg, BIG + 1024, CPU_BE, 0, both, 2, tu_rng_next(&r));
    const att_chunk_t small[] = {{1, 0, 40}}, big[] = {{2, 0, BIG}};
    const att_chunk_t decode[] = {{1, 40, 1}, {2, BIG, 1}};
    att_rig_attend(&rig, 0, small, 1);
    att_ctx_info_t before, after;
    att_ctx_get_info(rig.ctx[0], &before);
    att_rig_append(&rig, 0, big, 1);
    att_ctx_get_info(rig.ctx[0], &after);
    TU_CHECK(after.kv_stats.device_calls - before.kv_stats.device_calls == 1,
             "the 40 MiB append was not launched from the device");
    TU_CHECK(after.kv_stats.uploads != before.kv_stats.uploads,
             "the 40 MiB append made no copy call: the SMs copied it");
    TU_CHECK(after.kv_stats.launcher_starts - before.kv_stats.launcher_starts == 1,
             "the launcher was launched %" PRIu64 " times from the host during the append",
             after.kv_stats.launcher_starts - before.kv_stats.launcher_starts);
    const uint32_t t = att_rig_tokens(decode, 2);
    void *q = att_rig_random_q(&rig, t), *k = att_rig_random_kv(&rig, t, ATT_RIG_QK_RANGE),
         *v = att_rig_random_kv(&rig, t, ATT_RIG_V_RANGE);
    void *out[2] = {NULL, NULL};
    const uint64_t calls = device_calls(rig.ctx[0]);
    att_rig_attend_with(&rig, 0, decode, 2, q, k, v, out);
    TU_CHECK(device_calls(rig.ctx[0]) - calls == 1, "the decode was not launched from the device");
    TU_CHECK(memcmp(out[0], out[1], (size_t)t * HQ * D * 2) == 0,
             "device- and host-launched outputs differ");
    free(out[0]);
    free(out[1]);
    free(q);
    free(k);
    free(v);
    att_rig_check_cache(&rig);
    att_rig_fini(&rig);
    att_backend_destroy(&dev);
    att_backend_destroy(&host);
}

/* A plan without SM partitions (mixed batches share the SMs: from the host), then one that
 * splits every mixed batch's SMs (from the device, where the driver has green contexts for the
 * host's side to compare with); each with the SMs and with the copy engine carrying the inputs
 * of the calls launched from the device. */
static void test_att_cuda_device_launched_calls(void **state) {
    (void)state;
    NEED_GPU();
    need_device_launches();
    att_cuda_plan_t plan;
    memset(&plan, 0, sizeof plan);
    plan.mixed_wide_sms = ATT_CUDA_NEVER;
    device_launched_case(&plan, 0, false, 0);
    device_launched_case(&plan, 0, true, 2);
    if (!has_green()) {
        printf("SKIP the partitioned case: the driver has no green contexts for the host side\n");
        return;
    }
    plan.mixed_wide_sms = 32;
    plan.mixed_part_always = true; /* these batches are far too small to suit one otherwise */
    device_launched_case(&plan, 1, false, 1);
    device_launched_case(&plan, 1, true, 3);
}
#endif

/* ---- the compile cache: memory, disk, and a damaged file ---- */

static uint64_t session_compiles(att_backend_t *be, const att_model_cfg_t *cfg) {
    att_ctx_t *ctx = NULL;
    at_diag_t d = {{0}};
    at_err_t e = att_ctx_create(be, cfg, 64, &d, &ctx);
    TU_CHECK(e == AT_OK, "att_ctx_create: %s (%s)", at_err_name(e), d.msg);
    att_ctx_info_t info;
    att_ctx_get_info(ctx, &info);
    att_ctx_destroy(&ctx);
    return info.kv_stats.compiles;
}

static void test_att_cuda_compile_cache(void **state) {
    (void)state;
    NEED_GPU();
    char dir[] = "/tmp/attnd-kc-XXXXXX";
    TU_CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    att_model_cfg_t cfg = {.num_layers = 1, .num_query_heads = 12, .num_kv_heads = 3,
                           .head_dim = 40, .dtype = ATT_DTYPE_F16, .block_size = 32};
    be_cfg_t cc = {.device = 0, .kernel_cache_dir = dir};
    att_backend_t *be = NULL;
    at_diag_t d = {{0}};
    TU_CHECK(be_create(&cc, &d, &be) == AT_OK, "create: %s", d.msg);
    TU_CHECK(session_compiles(be, &cfg) == 2, "a new model compiles its two kernels");
    TU_CHECK(session_compiles(be, &cfg) == 0, "the same model again compiles nothing");
    att_backend_destroy(&be);
    /* a restart finds the images on disk */
    TU_CHECK(be_create(&cc, &d, &be) == AT_OK, "create: %s", d.msg);
    TU_CHECK(session_compiles(be, &cfg) == 0, "after a restart the disk cache serves both");
    att_jit_stats_t st;
    be_jit_stats(be, &st);
    TU_CHECK(st.disk_hits == 2 && st.compiles == 0, "disk hits %" PRIu64, st.disk_hits);
    att_backend_destroy(&be);
    /* damage one file: it is recompiled, not loaded */
    char cmd[256];
    snprintf(cmd, sizeof cmd,
             "f=$(ls %s/*." BE_IMAGE_EXT " | head -1); head -c 1000 \"$f\" > \"$f.x\" && "
             "mv \"$f.x\" \"$f\"",
             dir);
    TU_CHECK(system(cmd) == 0, "truncating a cache file");
    TU_CHECK(be_create(&cc, &d, &be) == AT_OK, "create: %s", d.msg);
    TU_CHECK(session_compiles(be, &cfg) == 1, "the damaged image is compiled again");
    be_jit_stats(be, &st);
    TU_CHECK(st.disk_rejects == 1 && st.disk_hits == 1, "rejects %" PRIu64, st.disk_rejects);
    att_backend_destroy(&be);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    TU_CHECK(system(cmd) == 0, "rm");
}

static int setup(void **state) {
    (void)state;
    be_cfg_t cc = {.device = 0, .kernel_cache_dir = ""};
    if (be_create(&cc, &g_why, &g_cuda) == AT_OK)
        printf("GPU: %s\n", be_describe(g_cuda));
    else
        printf("SKIP: every GPU test: %s\n", g_why.msg);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    att_backend_destroy(&g_cuda);
    for (size_t i = 0; i < sizeof g_registered / sizeof g_registered[0]; i++)
        free(g_registered[i]);
    return 0;
}

int main(void) {
    g_seed = tu_base_seed(BE_PROGRAM);
    static const att_dtype_t dtypes[] = {ATT_DTYPE_F32, ATT_DTYPE_F16, ATT_DTYPE_BF16};
    static const struct {
        const char *name;
        uint32_t hq, hkv;
    } groups[] = {{"g1", 4, 4}, {"g4", 8, 2}, {"g8", 16, 2}, {"mqa", 6, 1}};
    static const uint32_t dims[] = {64, 128, 256, 80, 24};
    static const uint32_t blocks[] = {16, 64, 8, 256};
    /* after the matrix's cases; the array is sized from this list */
    static const struct CMUnitTest extra[] = {
        cmocka_unit_test(test_att_cuda_split_kv),
#ifndef ATT_TEST_HIP
        cmocka_unit_test(test_att_cuda_wide_bodies),
        cmocka_unit_test(test_att_cuda_mixed_on_partitions),
        cmocka_unit_test(test_att_cuda_tail_split),
#endif
        cmocka_unit_test(test_att_cuda_models_interleaved),
        cmocka_unit_test(test_att_cuda_append_then_attend),
        cmocka_unit_test(test_att_cuda_tables_follow_the_cache),
        cmocka_unit_test(test_att_cuda_merged_calls_and_registered_memory),
        cmocka_unit_test(test_att_cuda_adjacent_tensors_in_registered_memory),
#ifndef ATT_TEST_HIP
        cmocka_unit_test(test_att_cuda_device_launched_calls),
        cmocka_unit_test(test_att_cuda_engine_copies_past_the_bound),
        cmocka_unit_test(test_att_cuda_q_and_out_in_host_memory),
#endif
        cmocka_unit_test(test_att_cuda_compile_cache),
    };
    enum { N = 3 * 4 * 5, EXTRA = sizeof extra / sizeof extra[0] };
    static mcase_t cases[N];
    static struct CMUnitTest tests[N + EXTRA];
    uint32_t n = 0;
    for (size_t a = 0; a < 3; a++)
        for (size_t g = 0; g < 4; g++)
            for (size_t d = 0; d < 5; d++, n++) {
                mcase_t *c = &cases[n];
                c->dtype = dtypes[a];
                c->hq = groups[g].hq;
                c->hkv = groups[g].hkv;
                c->d = dims[d];
                c->block = blocks[n % 4];
                c->index = n;
                snprintf(c->name, sizeof c->name, BE_PREFIX "%s_%s_d%u_b%u",
                         att_dtype_name(c->dtype), groups[g].name, c->d, c->block);
                tests[n] = (struct CMUnitTest){c->name, run_matrix_case, NULL, NULL, c};
            }
    for (size_t i = 0; i < EXTRA; i++)
        tests[n++] = extra[i];
    /* ATTND_TEST_FILTER=pattern (cmocka's * and ?) runs a subset: the sanitizer runs use it */
    const char *filter = getenv("ATTND_TEST_FILTER");
    if (filter != NULL && filter[0] != '\0')
        cmocka_set_test_filter(filter);
    return _cmocka_run_group_tests(BE_PROGRAM + 5, tests, n, setup, teardown);
}

/* Tuning on the CUDA backend, against the double-precision oracle (and the CPU backend where a
 * rig has one): set_tuning with configs of tun_space_cuda_unified (narrow tiles and split knobs
 * for decode, wide tiles for prefill, the mixed-batch knobs) computes what the heuristic
 * computes; one session switching configs call by call, over more tile modules than it keeps
 * loaded, stays correct and never compiles on the call path; a config whose kernels are not
 * compiled is refused with AT_ERR_NOT_READY and the session keeps running its previous one; a
 * frozen tuner restores a stored record before the first call, compiles nothing on the call
 * path and never tunes.
 * Without a GPU or driver every test skips with one line saying why. Label: gpu.
 *
 * Built twice: test_att_cuda_tune (the CUDA backend on cuda:0) and, with ATT_TEST_HIP,
 * test_att_hip_tune: the same cases through the HIP backend on hip:0 with configs of
 * tun_space_hip_unified (an AMD GPU, or an NVIDIA one through the test double tests/hipshim/ when
 * ATTND_HIP_LIB names it). */
#include "tests/test_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention/att_tune.h"
#include "tests/attention/att_rig.h"
#include "tuning/tun.h"
#include "tuning/tun_store.h"

#ifdef ATT_TEST_HIP
#include "attention/att_hip.h"
#define BE_NAME "HIP"
#define BE_PROGRAM "test_att_hip_tune"
#define SPACE (&tun_space_hip_unified)
#define N_KNOBS TUN_HIP_PARAMS
typedef att_hip_cfg_t be_cfg_t;
#define be_create att_hip_create
#define be_jit_stats att_hip_jit_stats
#else
#include "attention/att_cuda.h"
#define BE_NAME "CUDA"
#define BE_PROGRAM "test_att_cuda_tune"
#define SPACE (&tun_space_cuda_unified)
#define N_KNOBS TUN_CUDA_PARAMS
typedef att_cuda_cfg_t be_cfg_t;
#define be_create att_cuda_create
#define be_jit_stats att_cuda_jit_stats
#endif

static uint64_t g_seed;

static const att_cpu_cfg_t CPU_BE[] = {{.num_threads = 0}};

/* A GPU backend of its own (compile cache in memory only, so every test starts with nothing
 * compiled), or a skip. */
static att_backend_t *backend_or_skip(void) {
    be_cfg_t cc = {.device = 0, .kernel_cache_dir = ""};
    att_backend_t *be = NULL;
    at_diag_t why = {{0}};
    if (be_create(&cc, &why, &be) != AT_OK) {
        printf("SKIP: no " BE_NAME " device (%s)\n", why.msg);
        skip();
    }
    return be;
}

/* The rig of test `index` on be (and on the CPU when with_cpu), for the model of every test:
 * Llama-like, bf16, head_dim 128, GQA group 4, one layer. Returns the GPU's context. */
static att_ctx_t *rig_on(att_rig_t *rig, att_backend_t **be, int with_cpu, uint64_t index) {
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, index));
    att_rig_spec_t spec;
    att_rig_spec_init(&spec, ATT_DTYPE_BF16, 1, 8, 2, 128, 16);
    att_rig_init_with(rig, &spec.cfg, 8192, CPU_BE, with_cpu ? 1 : 0, be, 1, tu_rng_next(&r));
    return rig->ctx[with_cpu ? 1 : 0];
}

/* Checks the caches, then frees the rig and the backend. */
static void rig_done(att_rig_t *rig, att_backend_t **be) {
    att_rig_check_cache(rig);
    att_rig_fini(rig);
    att_backend_destroy(be);
}

/* Config values in the space's order. CUDA (TUN_CUDA_*): wide warps_m, warp_mt, tile_k, stages;
 * narrow warps_n, tile_k, stages; split_min_keys, blocks_per_sm; mixed_split_keys, mixed_order.
 * HIP (TUN_HIP_*): wide rows, waves; narrow waves; the same four split and mixed knobs. */
typedef uint32_t knobs_t[N_KNOBS];

/* The config of knobs for ctx's model on be; it must be valid there. */
static tun_cfg_t make_cfg(att_backend_t *be, const att_ctx_t *ctx, const knobs_t k) {
    tun_device_t d;
    const char *hash;
    tun_shape_t s;
    TU_CHECK(att_tune_device(be, &d, &hash) == AT_OK, "att_tune_device");
    att_tune_shape(att_ctx_model(ctx), &s);
    tun_cfg_t c = {.n = N_KNOBS};
    memcpy(c.v, k, sizeof c.v[0] * N_KNOBS);
    char text[TUN_CFG_TEXT_MAX];
    tun_cfg_format(SPACE, &c, text, sizeof text);
    TU_CHECK(be->ops->tuning_space == SPACE, "the backend's space is not " BE_NAME "'s");
    TU_CHECK(tun_cfg_valid(SPACE, &c, &s, &d), "%s is not valid on %s", text, d.name);
    return c;
}

/* Compiles the kernels of cfgs now (as a session's creation does for stored records). */
static void prepare_now(att_backend_t *be, const att_ctx_t *ctx, const tun_cfg_t *cfgs,
                        uint32_t n) {
    at_err_t e = be->ops->prepare_tuning(be, att_ctx_model(ctx), cfgs, n, true);
    TU_CHECK(e == AT_OK, "prepare_tuning: %s", at_err_name(e));
}

static void set_cfg(att_ctx_t *ctx, const tun_cfg_t *c) {
    at_err_t e = att_ctx_set_tuning(ctx, c);
    char text[TUN_CFG_TEXT_MAX];
    tun_cfg_format(SPACE, c, text, sizeof text);
    TU_CHECK(e == AT_OK, "set_tuning %s: %s", text, at_err_name(e));
}

static uint64_t jit_compiles(const att_backend_t *be) {
    att_jit_stats_t st;
    be_jit_stats(be, &st);
    return st.compiles;
}

/* ---- calls: one conversation of three sequences, in four phases ---- */

/* Phase p of the conversation of sequences base, base + 1, base + 2 (their ids): a prefill (wide
 * tiles), two decode steps (narrow tiles; contexts long enough to split), a mixed batch (decode
 * next to a new prompt: both kinds); after the last phase the sequences are released. */
static void phase(att_rig_t *rig, uint64_t base, uint32_t p) {
    const uint64_t A = base, B = base + 1, C = base + 2;
    switch (p) {
    case 0: {
        const att_chunk_t ch[] = {{A, 0, 300}, {B, 0, 90}};
        att_rig_attend(rig, 0, ch, 2);
        break;
    }
    case 1:
    case 2: {
        const att_chunk_t ch[] = {{A, 300 + p - 1, 1}, {B, 90 + p - 1, 1}};
        att_rig_attend(rig, 0, ch, 2);
        break;
    }
    default: {
        const att_chunk_t ch[] = {{A, 302, 1}, {C, 0, 40}, {B, 92, 1}};
        att_rig_attend(rig, 0, ch, 3);
        const uint64_t ids[] = {A, B, C};
        att_rig_release(rig, ids, 3, 3);
        break;
    }
    }
}

static void conversation(att_rig_t *rig, uint64_t base) {
    for (uint32_t p = 0; p < 4; p++)
        phase(rig, base, p);
}

/* ---- (a) configs of each kind compute what the heuristic computes ---- */

#ifdef ATT_TEST_HIP
static const knobs_t k_configs[] = {
    /* decode: narrow tiles of 2, 1 and 8 waves, splitting more, never, and less */
    {64, 8, 2, 128, 4, 512, 2},
    {64, 8, 1, 0, 0, 512, 2},
    {64, 8, 8, 512, 1, 512, 2},
    /* prefill: wide tiles of 32 rows on 4 waves and 128 rows on 16 (waves by occupancy) */
    {32, 4, 4, 256, 0, 512, 2},
    {128, 16, 4, 256, 2, 512, 2},
    /* mixed: narrow tiles first, wide tiles split in 256-key parts; and never split */
    {64, 8, 2, 256, 2, 256, 1},
    {128, 4, 16, 1024, 2, 0, 2},
};
#else
static const knobs_t k_configs[] = {
    /* decode: narrow tiles of 2, 1 and 8 warps, splitting more, never, and less */
    {4, 2, 32, 3, 2, 32, 3, 128, 4, 512, 2},
    {4, 2, 32, 3, 1, 128, 2, 0, 0, 512, 2},
    {4, 2, 32, 3, 8, 128, 2, 512, 1, 512, 2},
    /* prefill: wide tiles of 32 and 128 rows (waves by occupancy) */
    {2, 1, 64, 2, 4, 64, 2, 256, 0, 512, 2},
    {8, 1, 32, 4, 4, 64, 2, 256, 2, 512, 2},
    /* mixed: narrow tiles first, wide tiles split in 256-key parts; and never split */
    {4, 2, 32, 2, 2, 64, 4, 256, 2, 256, 1},
    {4, 1, 64, 3, 4, 64, 3, 1024, 2, 0, 2},
};
#endif
#define N_CONFIGS (sizeof k_configs / sizeof k_configs[0])

static void test_att_cuda_tune_configs_match_the_cpu(void **state) {
    (void)state;
    att_backend_t *be = backend_or_skip();
    att_rig_t rig;
    att_ctx_t *gpu = rig_on(&rig, &be, 1, 1);
    tun_cfg_t cfgs[N_CONFIGS];
    for (uint32_t i = 0; i < N_CONFIGS; i++)
        cfgs[i] = make_cfg(be, gpu, k_configs[i]);
    prepare_now(be, gpu, cfgs, N_CONFIGS);
    for (uint32_t i = 0; i < N_CONFIGS; i++) {
        char text[TUN_CFG_TEXT_MAX];
        tun_cfg_format(SPACE, &cfgs[i], text, sizeof text);
        tu_where_set("configs: ATTND_TEST_SEED=%" PRIu64 ", config %u: %s", g_seed, i, text);
        set_cfg(gpu, &cfgs[i]);
        conversation(&rig, 100 + 10 * i);
    }
    /* and back to the heuristic */
    tu_where_set("configs: ATTND_TEST_SEED=%" PRIu64 ", the heuristic again", g_seed);
    TU_CHECK(att_ctx_set_tuning(gpu, NULL) == AT_OK, "set_tuning(NULL)");
    conversation(&rig, 900);
    rig_done(&rig, &be);
}

/* ---- (b) one session switching configs call by call ---- */

#ifdef ATT_TEST_HIP
/* Tiles no other config of the session shares (the heuristic's are 64 rows on 8 waves and 4
 * waves): wide (rows, waves) and narrow (waves). */
static const uint32_t k_wide[6][2] = {{32, 4}, {128, 16}, {16, 2}, {64, 4}, {128, 8}, {32, 8}};
static const uint32_t k_narrow[4] = {2, 1, 8, 16};

/* (wide, narrow) of each call, 1-based: every tile, 20 module loads into the 8 slots (10 modules
 * besides the heuristic's two, most loaded again after their eviction). At the sixth and seventh
 * calls the config's narrow tile is loaded but not current and the least recently used when its
 * wide tile needs a slot: the narrow kind must keep it. (A simulation of the slot rule chose the
 * order; the narrow space has only 4 other tiles, so CUDA's order does not carry over.) */
static const uint32_t k_switches[][2] = {{3, 3}, {4, 1}, {5, 1}, {2, 4}, {6, 2}, {1, 3},
                                         {3, 1}, {5, 2}, {2, 2}, {4, 2}, {6, 1}, {3, 4},
                                         {1, 3}, {2, 4}, {4, 3}, {2, 2}};

/* The knobs of call i with split (split_min_keys, blocks_per_sm) and mixed (mixed_split_keys,
 * mixed_order). */
static void switch_knobs(uint32_t i, const uint32_t split[2], const uint32_t mixed[2], knobs_t k) {
    const uint32_t *w = k_wide[k_switches[i][0] - 1];
    const knobs_t c = {w[0],     w[1],     k_narrow[k_switches[i][1] - 1], split[0],
                       split[1], mixed[0], mixed[1]};
    memcpy(k, c, sizeof c);
}
#else
/* Tiles no other config of the session shares (the heuristic's are 4x2x1x32x3, or the wgmma
 * 8x1x1x128x3 on sm_90, and 1x1x4x64x2): wide (warps_m, warp_mt, tile_k, stages; all mma.sync,
 * which every GPU runs) and narrow (warps_n, tile_k, stages). */
static const uint32_t k_wide[6][4] = {{2, 1, 64, 2}, {8, 1, 32, 4}, {4, 2, 32, 2},
                                      {4, 1, 64, 3}, {8, 1, 64, 2}, {2, 2, 32, 3}};
static const uint32_t k_narrow[6][3] = {{2, 32, 3}, {1, 128, 2}, {8, 128, 2},
                                        {4, 64, 3}, {1, 64, 2},  {2, 64, 4}};

/* (wide, narrow) of each call, 1-based. The first six: the sixth config's narrow tile is loaded
 * but not current and the least recently used when its wide tile needs a slot (a session keeps 8
 * modules): the narrow kind must keep it. Then every pair (i, i), then back to the first ones,
 * whose modules were evicted meanwhile: 12 modules besides the heuristic's two. */
static const uint32_t k_switches[][2] = {{2, 6}, {6, 2}, {4, 5}, {1, 4}, {4, 1}, {2, 6},
                                         {1, 1}, {2, 2}, {3, 3}, {4, 4}, {5, 5}, {6, 6},
                                         {2, 6}, {6, 2}, {4, 5}, {1, 4}};

static void switch_knobs(uint32_t i, const uint32_t split[2], const uint32_t mixed[2], knobs_t k) {
    const uint32_t *w = k_wide[k_switches[i][0] - 1], *n = k_narrow[k_switches[i][1] - 1];
    const knobs_t c = {w[0], w[1], w[2],     w[3],     n[0],     n[1],
                       n[2], split[0], split[1], mixed[0], mixed[1]};
    memcpy(k, c, sizeof c);
}
#endif
#define N_SWITCHES (sizeof k_switches / sizeof k_switches[0])

static void test_att_cuda_tune_switching_configs_between_calls(void **state) {
    (void)state;
    att_backend_t *be = backend_or_skip();
    att_rig_t rig;
    att_ctx_t *gpu = rig_on(&rig, &be, 0, 2);
    static const uint32_t split[3][2] = {{128, 4}, {256, 0}, {0, 0}};
    static const uint32_t mixed[3][2] = {{256, 1}, {0, 2}, {512, 2}};
    tun_cfg_t cfgs[N_SWITCHES];
    for (uint32_t i = 0; i < N_SWITCHES; i++) {
        knobs_t k;
        switch_knobs(i, split[i % 3], mixed[i % 3], k);
        cfgs[i] = make_cfg(be, gpu, k);
    }
    prepare_now(be, gpu, cfgs, N_SWITCHES);
    att_jit_stats_t before, after;
    be_jit_stats(be, &before);
    for (uint32_t i = 0; i < N_SWITCHES; i++) {
        char text[TUN_CFG_TEXT_MAX];
        tun_cfg_format(SPACE, &cfgs[i], text, sizeof text);
        tu_where_set("switching: ATTND_TEST_SEED=%" PRIu64 ", call %u: %s", g_seed, i, text);
        set_cfg(gpu, &cfgs[i]);
        phase(&rig, 1000 + 10 * (i / 4), i % 4); /* sequences carry over between configs */
    }
    be_jit_stats(be, &after);
    TU_CHECK(after.compiles == before.compiles, "%" PRIu64 " compiles on the call path",
             after.compiles - before.compiles);
    /* each module load takes its image from the compile cache: 12 tiles (HIP: 10), loaded again
     * after their eviction */
    TU_CHECK(after.memory_hits - before.memory_hits > 12,
             "only %" PRIu64 " module loads: nothing was evicted and loaded again",
             after.memory_hits - before.memory_hits);
    rig_done(&rig, &be);
}

/* ---- (c) a config whose kernels are not compiled ---- */

static void test_att_cuda_tune_not_ready_keeps_the_last_config(void **state) {
    (void)state;
    att_backend_t *be = backend_or_skip();
    tu_where_set("not ready: ATTND_TEST_SEED=%" PRIu64, g_seed);
    att_rig_t rig;
    att_ctx_t *gpu = rig_on(&rig, &be, 1, 3);
#ifdef ATT_TEST_HIP
    const knobs_t kp = {32, 4, 2, 128, 4, 256, 1};
    const knobs_t kq = {128, 8, 8, 256, 2, 512, 2};
#else
    const knobs_t kp = {2, 1, 64, 2, 2, 32, 3, 128, 4, 256, 1};
    const knobs_t kq = {8, 1, 32, 3, 2, 64, 4, 256, 2, 512, 2};
#endif
    const tun_cfg_t p = make_cfg(be, gpu, kp), q = make_cfg(be, gpu, kq);
    prepare_now(be, gpu, &p, 1);
    set_cfg(gpu, &p);
    phase(&rig, 10, 0);
    const uint64_t compiles = jit_compiles(be);
    at_err_t e = att_ctx_set_tuning(gpu, &q);
    TU_CHECK(e == AT_ERR_NOT_READY, "set_tuning of an uncompiled config: %s", at_err_name(e));
    /* the session runs on with p (its calls match the oracle and the CPU) */
    phase(&rig, 10, 1);
    phase(&rig, 10, 2);
    /* set_tuning queued the compile for the backend's threads; waiting here compiles what they
     * have not yet */
    prepare_now(be, gpu, &q, 1);
    TU_CHECK(jit_compiles(be) > compiles, "q's kernels were never compiled");
    set_cfg(gpu, &q);
    phase(&rig, 10, 3);
    conversation(&rig, 20);
    rig_done(&rig, &be);
}

/* ---- (d) a frozen tuner restores a stored record and never tunes ---- */

static void test_att_cuda_tune_frozen_restores_and_never_tunes(void **state) {
    (void)state;
    att_backend_t *be = backend_or_skip();
    tu_where_set("frozen: ATTND_TEST_SEED=%" PRIu64, g_seed);
    char dir[] = "/tmp/attnd-tune-XXXXXX";
    TU_CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    att_rig_t rig;
    att_ctx_t *gpu = rig_on(&rig, &be, 1, 4);
    const att_model_t *m = att_ctx_model(gpu);

    /* the store holds a record for the session's first batch, a prefill */
#ifdef ATT_TEST_HIP
    const knobs_t ks = {32, 4, 2, 128, 4, 256, 1};
#else
    const knobs_t ks = {2, 1, 64, 2, 2, 32, 3, 128, 4, 256, 1};
#endif
    const tun_cfg_t stored = make_cfg(be, gpu, ks);
    const att_chunk_t prefill[] = {{1, 0, 300}, {2, 0, 90}};
    const att_call_t prefill_call = att_rig_call(&rig, 0, prefill, 2, NULL, NULL, NULL, NULL);
    {
        tun_device_t d;
        const char *hash;
        tun_shape_t s;
        TU_CHECK(att_tune_device(be, &d, &hash) == AT_OK, "att_tune_device");
        att_tune_shape(m, &s);
        tun_store_t *st = NULL;
        at_diag_t diag = {{0}};
        TU_CHECK(tun_store_open(dir, SPACE, &d, hash, &s, &diag, &st) == AT_OK,
                 "tun_store_open: %s", diag.msg);
        tun_record_t rec = {.bucket = att_tune_bucket(&prefill_call, 1),
                            .best = stored,
                            .best_ns = 10000,
                            .heuristic_ns = 12000,
                            .worst_ns = 20000,
                            .tried = 2,
                            .tuning_ns = 1000000,
                            .updated_s = (int64_t)time(NULL)};
        SPACE->heuristic(&s, &d, &rec.bucket, &rec.worst);
        TU_CHECK(tun_store_put(st, &rec) == AT_OK, "tun_store_put");
        TU_CHECK(tun_store_save(st) == AT_OK, "tun_store_save");
        tun_store_destroy(&st);
    }

    /* creating the tuner compiles the record's two tiles, before any call */
    const uint64_t c0 = jit_compiles(be);
    att_tune_cfg_t tc = {.mode = TUN_MODE_FROZEN, .dir = dir, .reps = 1};
    att_tuner_t *t = NULL;
    at_diag_t diag = {{0}};
    TU_CHECK(att_tuner_create(be, m, &tc, &diag, &t) == AT_OK, "att_tuner_create: %s",
             diag.msg);
    const uint64_t c1 = jit_compiles(be);
    TU_CHECK(c1 == c0 + 2, "the tuner's creation compiled %" PRIu64 " kernels, not 2", c1 - c0);

    /* the first call runs the record's config, and neither it nor the next (a decode, on the
     * heuristic) compiles anything */
    att_ctx_info_t ci0, ci1;
    att_ctx_get_info(gpu, &ci0);
    att_tuner_pick(t, gpu, &prefill_call, 1);
    att_tuner_info_t info;
    att_tuner_get_info(t, &info);
    TU_CHECK(info.source == TUN_SOURCE_STORED, "first call: source %d", (int)info.source);
    char text[TUN_CFG_TEXT_MAX];
    tun_cfg_format(SPACE, &stored, text, sizeof text);
    TU_CHECK(strcmp(info.config, text) == 0, "the first call ran %s, not the record's %s",
             info.config, text);
    att_rig_attend(&rig, 0, prefill, 2);
    const att_chunk_t decode[] = {{1, 300, 1}, {2, 90, 1}};
    const att_call_t decode_call = att_rig_call(&rig, 0, decode, 2, NULL, NULL, NULL, NULL);
    att_tuner_pick(t, gpu, &decode_call, 1);
    att_tuner_get_info(t, &info);
    TU_CHECK(info.source == TUN_SOURCE_HEURISTIC, "decode: source %d", (int)info.source);
    att_rig_attend(&rig, 0, decode, 2);
    att_ctx_get_info(gpu, &ci1);
    TU_CHECK(jit_compiles(be) == c1, "the calls compiled %" PRIu64 " kernels",
             jit_compiles(be) - c1);
    TU_CHECK(ci1.kv_stats.compiles == ci0.kv_stats.compiles, "the session compiled");

    /* many calls of many shapes, steps in between: frozen never queues nor runs a tuning step */
    for (uint32_t i = 0; i < 12; i++) {
        const uint64_t base = 100 + 10 * i;
        const att_chunk_t p0[] = {{base, 0, 20 + 30 * i}};
        const att_call_t call0 = att_rig_call(&rig, 0, p0, 1, NULL, NULL, NULL, NULL);
        att_tuner_pick(t, gpu, &call0, 1);
        att_rig_attend(&rig, 0, p0, 1);
        TU_CHECK(!att_tuner_step(t), "a frozen tuner ran a step");
        const att_chunk_t p1[] = {{base, 20 + 30 * i, 1}, {1, 301 + i, 1}, {2, 91 + i, 1}};
        const att_call_t call1 = att_rig_call(&rig, 0, p1, 3, NULL, NULL, NULL, NULL);
        att_tuner_pick(t, gpu, &call1, 1);
        att_rig_attend(&rig, 0, p1, 3);
        TU_CHECK(!att_tuner_pending(t) && !att_tuner_step(t), "a frozen tuner has a job");
        const uint64_t ids[] = {base};
        att_rig_release(&rig, ids, 1, 1);
    }
    att_tuner_get_info(t, &info);
    TU_CHECK(info.tuning_runs == 0 && info.jobs_done == 0 && info.jobs_pending == 0,
             "frozen: %" PRIu64 " tuning runs, %" PRIu64 " jobs done, %u pending",
             info.tuning_runs, info.jobs_done, info.jobs_pending);
    att_tuner_destroy(&t);
    rig_done(&rig, &be);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    TU_CHECK(system(cmd) == 0, "rm");
}

int main(void) {
    g_seed = tu_base_seed(BE_PROGRAM);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_cuda_tune_configs_match_the_cpu),
        cmocka_unit_test(test_att_cuda_tune_switching_configs_between_calls),
        cmocka_unit_test(test_att_cuda_tune_not_ready_keeps_the_last_config),
        cmocka_unit_test(test_att_cuda_tune_frozen_restores_and_never_tunes),
    };
    /* ATTND_TEST_FILTER=pattern (cmocka's * and ?) runs a subset */
    const char *filter = getenv("ATTND_TEST_FILTER");
    if (filter != NULL && filter[0] != '\0')
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}

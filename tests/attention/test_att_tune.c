/* Tuning the CPU backend per session (attention/att_tune.c, att_cpu's knobs): every config of the
 * space computes the same attention, the backend refuses configs that cannot run, a tuning job
 * never touches the session's cache, frozen and off modes never tune, a tuned record is restored
 * by the next process, and two model shapes keep separate records. Label: unit. */
#include "tests/test_util.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "attention/att_tune.h"

#define LEN 40u

typedef struct rig {
    att_backend_t *be;
    att_model_cfg_t mc;
    att_ctx_t *ctx;
    float *q, *k, *v, *out;
} rig_t;

static void rig_init(rig_t *r, uint32_t head_dim, uint32_t hq, uint32_t hkv) {
    memset(r, 0, sizeof *r);
    att_cpu_cfg_t bc = {.num_threads = 2};
    assert_int_equal(att_cpu_create(&bc, &r->be), AT_OK);
    r->mc = (att_model_cfg_t){.num_layers = 2, .num_query_heads = hq, .num_kv_heads = hkv,
                              .head_dim = head_dim, .dtype = ATT_DTYPE_F32, .block_size = 16};
    assert_int_equal(att_ctx_create(r->be, &r->mc, 1024, NULL, &r->ctx), AT_OK);
    r->q = calloc((size_t)LEN * hq * head_dim, sizeof(float));
    r->out = calloc((size_t)LEN * hq * head_dim, sizeof(float));
    r->k = calloc((size_t)LEN * hkv * head_dim, sizeof(float));
    r->v = calloc((size_t)LEN * hkv * head_dim, sizeof(float));
    tu_rng_t rng;
    tu_rng_seed(&rng, tu_sub_seed(tu_base_seed("test_att_tune"), head_dim));
    for (size_t i = 0; i < (size_t)LEN * hq * head_dim; i++)
        r->q[i] = tu_rng_float(&rng, -1, 1);
    for (size_t i = 0; i < (size_t)LEN * hkv * head_dim; i++) {
        r->k[i] = tu_rng_float(&rng, -1, 1);
        r->v[i] = tu_rng_float(&rng, -1, 1);
    }
}

static void rig_fini(rig_t *r) {
    att_ctx_destroy(&r->ctx);
    att_backend_destroy(&r->be);
    free(r->q);
    free(r->k);
    free(r->v);
    free(r->out);
}

/* A call of n tokens of sequence seq from position pos, its rows from row 0 of the rig's. */
static att_call_t make_call(rig_t *r, att_chunk_t *ch, uint64_t seq, uint32_t pos, uint32_t n) {
    *ch = (att_chunk_t){.seq_id = seq, .start_pos = pos, .num_tokens = n};
    const size_t hq = r->mc.num_query_heads, hkv = r->mc.num_kv_heads, d = r->mc.head_dim;
    return (att_call_t){.layer = 1, .chunks = ch, .num_chunks = 1, .q = r->q,
                        .q_bytes = n * hq * d * 4, .k = r->k, .k_bytes = n * hkv * d * 4,
                        .v = r->v, .v_bytes = n * hkv * d * 4, .out = r->out,
                        .out_bytes = n * hq * d * 4};
}

/* Every config of the CPU space computes the same prefill and decode as the heuristic. */
static void test_att_tune_every_cpu_config_computes_the_same(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 64, 8, 2);
    const att_model_t *m = att_ctx_model(r.ctx);
    tun_shape_t s;
    att_tune_shape(m, &s);
    tun_device_t d;
    const char *hash = NULL;
    assert_int_equal(att_tune_device(r.be, &d, &hash), AT_OK);
    assert_int_equal(strlen(hash), 64);
    tun_bucket_t b = tun_bucket_of(LEN, 1, LEN, LEN);
    tun_cfg_t *cfgs = NULL;
    size_t n = 0;
    assert_int_equal(tun_space_enumerate(&tun_space_cpu, &s, &d, &b, &cfgs, &n), AT_OK);
    assert_true(n > 20);
    const size_t rows = (size_t)LEN * 8 * 64;
    float *want = malloc(rows * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(att_ctx_set_tuning(r.ctx, &cfgs[i]), AT_OK);
        att_chunk_t ch;
        att_call_t c = make_call(&r, &ch, i, 0, LEN);
        assert_int_equal(att_ctx_attend(r.ctx, &c, NULL), AT_OK);
        if (i == 0)
            memcpy(want, r.out, rows * sizeof(float));
        for (size_t e = 0; e < rows; e++)
            assert_true(fabsf(r.out[e] - want[e]) <= 1e-5f + 1e-4f * fabsf(want[e]));
        uint64_t rel = i;
        att_ctx_release(r.ctx, &rel, 1, NULL);
    }
    free(want);
    free(cfgs);
    rig_fini(&r);
}

static void test_att_tune_cpu_refuses_configs_that_cannot_run(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 64, 8, 2);
    tun_cfg_t ok = {.n = 3, .v = {64, 16, 4}};
    assert_int_equal(att_ctx_set_tuning(r.ctx, &ok), AT_OK);
    const tun_cfg_t bad[] = {
        {.n = 3, .v = {0, 16, 4}},  {.n = 3, .v = {64, 12, 4}}, /* 12 does not divide 16 */
        {.n = 3, .v = {64, 128, 4}}, {.n = 3, .v = {64, 16, 0}}, {.n = 2, .v = {64, 16}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(att_ctx_set_tuning(r.ctx, &bad[i]), AT_ERR_CONFIG);
    assert_int_equal(att_ctx_set_tuning(r.ctx, NULL), AT_OK);
    rig_fini(&r);
}

static void make_dir(char *buf, size_t n) {
    snprintf(buf, n, "/tmp/attnd-tune-XXXXXX");
    assert_non_null(mkdtemp(buf));
}

static void rm_dir(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char p[1400];
    while (d != NULL && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    if (d != NULL)
        closedir(d);
    rmdir(dir);
}

static size_t count_json(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    size_t n = 0;
    while (d != NULL && (e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        n += len > 5 && strcmp(e->d_name + len - 5, ".json") == 0;
    }
    if (d != NULL)
        closedir(d);
    return n;
}

/* Runs the tuner's pending jobs to the end; returns the steps. */
static uint32_t drain(att_tuner_t *t) {
    uint32_t steps = 0;
    while (att_tuner_pending(t) && steps < 100000) {
        att_tuner_step(t);
        steps++;
    }
    assert_false(att_tuner_pending(t));
    return steps;
}

/* Mode on: a miss runs the heuristic and queues a job; the job runs on copies (the session's
 * cache is byte for byte what it was), the winner is adopted and saved; a restart restores it. */
static void test_att_tune_job_leaves_the_session_alone_and_is_restored(void **state) {
    (void)state;
    char dir[64];
    make_dir(dir, sizeof dir);
    rig_t r;
    rig_init(&r, 64, 8, 2);
    const att_model_t *m = att_ctx_model(r.ctx);
    att_tune_cfg_t tc = {.mode = TUN_MODE_ON, .dir = dir, .reps = 1};
    att_tuner_t *t = NULL;
    assert_int_equal(att_tuner_create(r.be, m, &tc, NULL, &t), AT_OK);
    att_chunk_t ch;
    att_call_t c = make_call(&r, &ch, 7, 0, LEN);
    att_tuner_pick(t, r.ctx, &c, 1);
    att_tuner_info_t info;
    att_tuner_get_info(t, &info);
    assert_int_equal(info.source, TUN_SOURCE_HEURISTIC);
    assert_string_equal(info.config, "tile_rows=64,key_tile=16,items_per_thread=4");
    assert_true(att_tuner_pending(t));
    assert_int_equal(att_ctx_attend(r.ctx, &c, NULL), AT_OK);
    /* the session's cache and lengths before tuning */
    const size_t kv_bytes = (size_t)LEN * 2 * 64 * 4;
    float *k0 = malloc(kv_bytes), *v0 = malloc(kv_bytes), *k1 = malloc(kv_bytes),
          *v1 = malloc(kv_bytes);
    assert_int_equal(att_ctx_read_kv(r.ctx, 7, 1, 0, LEN, k0, v0), AT_OK);
    att_ctx_info_t before, after;
    att_ctx_get_info(r.ctx, &before);
    uint32_t steps = drain(t);
    assert_true(steps > 10);
    assert_int_equal(att_ctx_read_kv(r.ctx, 7, 1, 0, LEN, k1, v1), AT_OK);
    assert_memory_equal(k0, k1, kv_bytes);
    assert_memory_equal(v0, v1, kv_bytes);
    att_ctx_get_info(r.ctx, &after);
    assert_int_equal(after.kv_used_tokens, before.kv_used_tokens);
    assert_int_equal(after.num_sequences, before.num_sequences);
    assert_int_equal(after.backend_runs, before.backend_runs);
    uint32_t len = 0;
    assert_int_equal(att_ctx_seq_len(r.ctx, 7, 0, &len), AT_OK);
    assert_int_equal(len, 0);
    assert_int_equal(att_ctx_seq_len(r.ctx, 7, 1, &len), AT_OK);
    assert_int_equal(len, LEN);
    /* the next call of that bucket runs the winner */
    att_call_t c2 = make_call(&r, &ch, 8, 0, LEN);
    att_tuner_pick(t, r.ctx, &c2, 1);
    att_tuner_get_info(t, &info);
    assert_int_equal(info.source, TUN_SOURCE_TUNED);
    assert_int_equal(info.jobs_done, 1);
    char tuned[TUN_CFG_TEXT_MAX];
    snprintf(tuned, sizeof tuned, "%s", info.config);
    assert_int_equal(count_json(dir), 1);
    att_tuner_destroy(&t);
    /* a restart, frozen: the stored config, no tuning */
    tc.mode = TUN_MODE_FROZEN;
    assert_int_equal(att_tuner_create(r.be, m, &tc, NULL, &t), AT_OK);
    att_tuner_pick(t, r.ctx, &c2, 1);
    att_tuner_get_info(t, &info);
    assert_int_equal(info.source, TUN_SOURCE_STORED);
    assert_string_equal(info.config, tuned);
    att_tuner_destroy(&t);
    free(k0);
    free(v0);
    free(k1);
    free(v1);
    rig_fini(&r);
    rm_dir(dir);
}

/* Frozen and off never queue a tuning run, whatever the calls. */
static void test_att_tune_frozen_and_off_never_tune(void **state) {
    (void)state;
    char dir[64];
    make_dir(dir, sizeof dir);
    rig_t r;
    rig_init(&r, 64, 8, 2);
    const tun_mode_t modes[] = {TUN_MODE_FROZEN, TUN_MODE_OFF};
    for (size_t i = 0; i < 2; i++) {
        att_tune_cfg_t tc = {.mode = modes[i], .dir = dir};
        att_tuner_t *t = NULL;
        assert_int_equal(att_tuner_create(r.be, att_ctx_model(r.ctx), &tc, NULL, &t), AT_OK);
        for (uint32_t n = 1; n <= LEN; n += 7) {
            att_chunk_t ch;
            att_call_t c = make_call(&r, &ch, 100 + n, 0, n);
            att_tuner_pick(t, r.ctx, &c, 1);
            assert_false(att_tuner_pending(t));
            att_tuner_step(t);
        }
        att_tuner_info_t info;
        att_tuner_get_info(t, &info);
        assert_int_equal(info.tuning_runs, 0);
        assert_int_equal(info.source, TUN_SOURCE_HEURISTIC);
        att_tuner_destroy(&t);
    }
    assert_int_equal(count_json(dir), 0);
    rig_fini(&r);
    rm_dir(dir);
}

/* Two model shapes in one directory: tuning one leaves the other on its heuristic. */
static void test_att_tune_two_models_keep_separate_records(void **state) {
    (void)state;
    char dir[64];
    make_dir(dir, sizeof dir);
    rig_t a, b;
    rig_init(&a, 64, 8, 2);
    rig_init(&b, 32, 4, 4);
    att_tune_cfg_t tc = {.mode = TUN_MODE_ON, .dir = dir, .reps = 1};
    att_tuner_t *ta = NULL, *tb = NULL;
    assert_int_equal(att_tuner_create(a.be, att_ctx_model(a.ctx), &tc, NULL, &ta), AT_OK);
    assert_int_equal(att_tuner_create(b.be, att_ctx_model(b.ctx), &tc, NULL, &tb), AT_OK);
    att_chunk_t ca, cb;
    att_call_t call_a = make_call(&a, &ca, 1, 0, 16), call_b = make_call(&b, &cb, 1, 0, 16);
    att_tuner_pick(ta, a.ctx, &call_a, 1);
    drain(ta);
    att_tuner_destroy(&ta);
    assert_int_equal(count_json(dir), 1);
    /* the same bucket on model b: no record of b's shape, so b queues its own job */
    att_tuner_pick(tb, b.ctx, &call_b, 1);
    att_tuner_info_t info;
    att_tuner_get_info(tb, &info);
    assert_int_equal(info.source, TUN_SOURCE_HEURISTIC);
    assert_true(att_tuner_pending(tb));
    drain(tb);
    assert_int_equal(count_json(dir), 2);
    att_tuner_destroy(&tb);
    rig_fini(&a);
    rig_fini(&b);
    rm_dir(dir);
}

/* A bench over decode chunks with context fills every context, then times any config. */
static void test_att_tune_bench_fills_then_times(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 64, 8, 2);
    const att_bench_chunk_t chunks[] = {{100, 1}, {0, 5}, {33, 1}};
    att_bench_t *b = NULL;
    assert_int_equal(att_bench_create(r.be, att_ctx_model(r.ctx), 0, chunks, 3, 0, NULL, &b),
                     AT_OK);
    bool more = true;
    uint32_t fills = 0;
    while (more) {
        assert_int_equal(att_bench_fill_step(b, &more), AT_OK);
        fills++;
    }
    assert_int_equal(fills, 2);
    uint64_t ns = 0;
    tun_cfg_t cfg = {.n = 3, .v = {16, 8, 1}};
    assert_int_equal(att_bench_time(b, &cfg, &ns), AT_OK);
    assert_true(ns > 0);
    att_bench_destroy(&b);
    /* a shape whose copies would exceed the limit is refused up front */
    const att_bench_chunk_t big[] = {{1u << 20, 1}};
    assert_int_equal(att_bench_create(r.be, att_ctx_model(r.ctx), 0, big, 1, 1 << 20, NULL, &b),
                     AT_ERR_NOMEM);
    assert_null(b);
    rig_fini(&r);
}

int main(void) {
    tu_base_seed("test_att_tune");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_tune_every_cpu_config_computes_the_same),
        cmocka_unit_test(test_att_tune_cpu_refuses_configs_that_cannot_run),
        cmocka_unit_test(test_att_tune_job_leaves_the_session_alone_and_is_restored),
        cmocka_unit_test(test_att_tune_frozen_and_off_never_tune),
        cmocka_unit_test(test_att_tune_two_models_keep_separate_records),
        cmocka_unit_test(test_att_tune_bench_fills_then_times),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

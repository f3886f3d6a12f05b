/* Tests of attention/att_model: every invalid field gives its own AT_ERR_MODEL_* code (and
 * KV_CAPACITY through att_ctx_create), defaults resolve, arrays are copied, att_model_equal. */
#include "tests/test_util.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "attention/att_model.h"

static const uint32_t two_windows[2] = {0, 5};
static const float eight_slopes[8] = {0.5f, 0.25f, 0.125f, 0.0625f, 0.03f, 0.01f, -0.02f, 0.0f};
static const float eight_sinks[8] = {0.0f, 1.0f, -1.0f, 2.5f, -3.0f, 0.5f, 4.0f, -0.25f};

/* A valid model: 2 layers, 8 query heads over 2 KV heads, head_dim 64, f16, all defaults. */
static att_model_cfg_t base_cfg(void) {
    att_model_cfg_t c = {
        .num_layers = 2,
        .num_query_heads = 8,
        .num_kv_heads = 2,
        .head_dim = 64,
        .dtype = ATT_DTYPE_F16,
    };
    return c;
}

static att_model_t *create_ok(const att_model_cfg_t *cfg) {
    att_model_t *m = NULL;
    at_diag_t diag = {{0}};
    at_err_t e = att_model_create(cfg, &diag, &m);
    if (e != AT_OK)
        fail_msg("att_model_create: %s (%s)", at_err_name(e), diag.msg);
    assert_non_null(m);
    return m;
}

/* cfg is rejected with exactly `want`, *out stays untouched, diag says something; the same
 * without a diag. */
static void expect_invalid_(const att_model_cfg_t *cfg, at_err_t want, const char *what,
                            int line) {
    att_model_t *sentinel = (att_model_t *)(uintptr_t)0x5a5a;
    att_model_t *m = sentinel;
    at_diag_t diag;
    memset(&diag, 0, sizeof diag);
    at_err_t e = att_model_create(cfg, &diag, &m);
    if (e != want)
        fail_msg("line %d, %s: att_model_create gave %s, want %s", line, what, at_err_name(e),
                 at_err_name(want));
    if (m != sentinel)
        fail_msg("line %d, %s: *out changed on failure", line, what);
    if (diag.msg[0] == '\0')
        fail_msg("line %d, %s: diag left empty", line, what);
    e = att_model_create(cfg, NULL, &m);
    if (e != want || m != sentinel)
        fail_msg("line %d, %s: with a NULL diag gave %s", line, what, at_err_name(e));
}
#define expect_invalid(cfg, want, what) expect_invalid_(cfg, want, what, __LINE__)

static void expect_valid(const att_model_cfg_t *cfg) {
    att_model_t *m = create_ok(cfg);
    att_model_destroy(&m);
    assert_null(m);
}

static void test_att_model_defaults_resolve(void **state) {
    (void)state;
    att_model_cfg_t c = base_cfg();
    att_model_t *m = create_ok(&c);
    assert_int_equal(m->num_layers, 2);
    assert_int_equal(m->num_query_heads, 8);
    assert_int_equal(m->num_kv_heads, 2);
    assert_int_equal(m->head_dim, 64);
    assert_int_equal(m->group, 4);
    assert_int_equal(m->dtype, ATT_DTYPE_F16);
    assert_int_equal(m->block_size, ATT_DEFAULT_BLOCK_SIZE);
    assert_int_equal(m->block_size, 16);
    assert_true(m->scale == 0.125f); /* 1/sqrt(64), exact */
    assert_true(m->soft_cap == 0.0f);
    assert_non_null(m->window);
    for (uint32_t l = 0; l < 2; l++)
        assert_int_equal(m->window[l], 0);
    assert_null(m->alibi);
    assert_null(m->sinks);
    att_model_destroy(&m);
    assert_null(m);
    att_model_destroy(&m); /* NULL pointee is fine */
    att_model_destroy(NULL);
}

static void test_att_model_default_scale_is_inverse_sqrt_head_dim(void **state) {
    (void)state;
    for (uint32_t d = 8; d <= 256; d += 8) {
        att_model_cfg_t c = base_cfg();
        c.head_dim = d;
        att_model_t *m = create_ok(&c);
        double want = 1.0 / sqrt((double)d);
        if (fabs((double)m->scale - want) > 2e-7 * want)
            fail_msg("head_dim %u: scale %.9g, want %.9g", d, (double)m->scale, want);
        assert_int_equal(att_model_row_bytes(m, 3), 3ull * d * 2);
        att_model_destroy(&m);
    }
}

static void test_att_model_keeps_explicit_values_and_copies_arrays(void **state) {
    (void)state;
    uint32_t windows[2] = {0, 5};
    float slopes[8], sinks[8];
    memcpy(slopes, eight_slopes, sizeof slopes);
    memcpy(sinks, eight_sinks, sizeof sinks);
    att_model_cfg_t c = base_cfg();
    c.dtype = ATT_DTYPE_BF16;
    c.block_size = 64;
    c.scale = 0.3f;
    c.sliding_window = 100; /* replaced by the per-layer list */
    c.layer_sliding_window = windows;
    c.n_layer_sliding_window = 2;
    c.logits_soft_cap = 30.0f;
    c.alibi_slopes = slopes;
    c.n_alibi_slopes = 8;
    c.sinks = sinks;
    c.n_sinks = 8;
    att_model_t *m = create_ok(&c);
    /* The cfg's arrays were only borrowed: scribbling on them changes nothing. */
    windows[1] = 77;
    slopes[0] = 9.0f;
    sinks[0] = 9.0f;
    assert_int_equal(m->dtype, ATT_DTYPE_BF16);
    assert_int_equal(m->block_size, 64);
    assert_true(m->scale == 0.3f);
    assert_true(m->soft_cap == 30.0f);
    assert_int_equal(m->window[0], 0);
    assert_int_equal(m->window[1], 5);
    assert_true(m->alibi != NULL && m->alibi != slopes);
    assert_true(m->sinks != NULL && m->sinks != sinks);
    for (uint32_t h = 0; h < 8; h++) {
        assert_true(m->alibi[h] == eight_slopes[h]);
        assert_true(m->sinks[h] == eight_sinks[h]);
    }
    att_model_destroy(&m);

    /* A single sliding_window applies to every layer. */
    c = base_cfg();
    c.num_layers = 3;
    c.sliding_window = 4096;
    m = create_ok(&c);
    for (uint32_t l = 0; l < 3; l++)
        assert_int_equal(m->window[l], 4096);
    att_model_destroy(&m);
}

static void test_att_model_accepts_the_boundaries(void **state) {
    (void)state;
    att_model_cfg_t c = base_cfg();
    const uint32_t dims[] = {8, 80, 128, 248, 256};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        c = base_cfg();
        c.head_dim = dims[i];
        expect_valid(&c);
    }
    for (uint32_t b = ATT_MIN_BLOCK_SIZE; b <= ATT_MAX_BLOCK_SIZE; b *= 2) {
        c = base_cfg();
        c.block_size = b;
        expect_valid(&c);
    }
    const att_dtype_t dts[] = {ATT_DTYPE_F32, ATT_DTYPE_F16, ATT_DTYPE_BF16};
    for (size_t i = 0; i < 3; i++) {
        c = base_cfg();
        c.dtype = dts[i];
        expect_valid(&c);
    }
    c = base_cfg(); /* MHA */
    c.num_kv_heads = 8;
    expect_valid(&c);
    c = base_cfg(); /* MQA */
    c.num_kv_heads = 1;
    expect_valid(&c);
    c = base_cfg();
    c.num_query_heads = 6; /* group 3 */
    c.num_kv_heads = 2;
    expect_valid(&c);
    c = base_cfg();
    c.num_layers = 1;
    c.sliding_window = UINT32_MAX;
    expect_valid(&c);
    c = base_cfg();
    c.scale = FLT_MAX;
    c.logits_soft_cap = FLT_MIN;
    expect_valid(&c);
    c = base_cfg(); /* negative slopes and sinks are finite, so allowed */
    c.alibi_slopes = eight_slopes;
    c.n_alibi_slopes = 8;
    c.sinks = eight_sinks;
    c.n_sinks = 8;
    expect_valid(&c);
}

static void test_att_model_rejects_each_bad_field_with_its_own_code(void **state) {
    (void)state;
    att_model_cfg_t c;

    c = base_cfg();
    c.num_layers = 0;
    expect_invalid(&c, AT_ERR_MODEL_LAYERS, "num_layers 0");

    c = base_cfg();
    c.num_query_heads = 0;
    expect_invalid(&c, AT_ERR_MODEL_HEADS, "num_query_heads 0");
    c = base_cfg();
    c.num_kv_heads = 0;
    expect_invalid(&c, AT_ERR_MODEL_HEADS, "num_kv_heads 0");
    c = base_cfg();
    c.num_query_heads = 0;
    c.num_kv_heads = 0;
    expect_invalid(&c, AT_ERR_MODEL_HEADS, "both head counts 0");

    const uint32_t gqa[][2] = {{6, 4}, {2, 4}, {7, 2}, {8, 3}, {1, 2}};
    for (size_t i = 0; i < sizeof gqa / sizeof gqa[0]; i++) {
        c = base_cfg();
        c.num_query_heads = gqa[i][0];
        c.num_kv_heads = gqa[i][1];
        expect_invalid(&c, AT_ERR_MODEL_GQA, "Hq not a multiple of Hkv");
    }

    const uint32_t dims[] = {0, 1, 4, 12, 62, 100, 257, 264, 512, 0xfffffff8u};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        c = base_cfg();
        c.head_dim = dims[i];
        expect_invalid(&c, AT_ERR_MODEL_HEAD_DIM, "bad head_dim");
    }

    const int dts[] = {ATT_DTYPE_UNSPECIFIED, 4, 99, -1};
    for (size_t i = 0; i < sizeof dts / sizeof dts[0]; i++) {
        c = base_cfg();
        c.dtype = (att_dtype_t)dts[i];
        expect_invalid(&c, AT_ERR_MODEL_DTYPE, "bad dtype");
    }

    const uint32_t blocks[] = {1, 2, 4, 12, 24, 100, 255, 512, 1024, 0x80000000u};
    for (size_t i = 0; i < sizeof blocks / sizeof blocks[0]; i++) {
        c = base_cfg();
        c.block_size = blocks[i];
        expect_invalid(&c, AT_ERR_MODEL_BLOCK_SIZE, "bad block_size");
    }

    const float bad_floats[] = {-1.0f, -FLT_MIN, NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof bad_floats / sizeof bad_floats[0]; i++) {
        c = base_cfg();
        c.scale = bad_floats[i];
        expect_invalid(&c, AT_ERR_MODEL_SCALE, "bad scale");
        c = base_cfg();
        c.logits_soft_cap = bad_floats[i];
        expect_invalid(&c, AT_ERR_MODEL_SOFT_CAP, "bad logits_soft_cap");
    }

    c = base_cfg();
    c.layer_sliding_window = two_windows;
    c.n_layer_sliding_window = 1; /* 2 layers */
    expect_invalid(&c, AT_ERR_MODEL_WINDOW, "one window for two layers");
    c.n_layer_sliding_window = 3;
    expect_invalid(&c, AT_ERR_MODEL_WINDOW, "three windows for two layers");
    c = base_cfg();
    c.layer_sliding_window = NULL;
    c.n_layer_sliding_window = 2;
    expect_invalid(&c, AT_ERR_MODEL_WINDOW, "window count without the array");

    /* ALiBi and sinks: a count other than num_query_heads, a missing array, a non-finite entry. */
    const uint32_t bad_counts[] = {1, 2, 7, 9, 16};
    for (size_t i = 0; i < sizeof bad_counts / sizeof bad_counts[0]; i++) {
        c = base_cfg();
        c.alibi_slopes = eight_slopes;
        c.n_alibi_slopes = bad_counts[i];
        expect_invalid(&c, AT_ERR_MODEL_ALIBI, "alibi count");
        c = base_cfg();
        c.sinks = eight_sinks;
        c.n_sinks = bad_counts[i];
        expect_invalid(&c, AT_ERR_MODEL_SINKS, "sinks count");
    }
    c = base_cfg();
    c.n_alibi_slopes = 8;
    expect_invalid(&c, AT_ERR_MODEL_ALIBI, "alibi count without the array");
    c = base_cfg();
    c.n_sinks = 8;
    expect_invalid(&c, AT_ERR_MODEL_SINKS, "sinks count without the array");
    const float non_finite[] = {NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < 3; i++)
        for (uint32_t at = 0; at < 8; at += 7) {
            float arr[8];
            memcpy(arr, eight_slopes, sizeof arr);
            arr[at] = non_finite[i];
            c = base_cfg();
            c.alibi_slopes = arr;
            c.n_alibi_slopes = 8;
            expect_invalid(&c, AT_ERR_MODEL_ALIBI, "non-finite slope");
            c = base_cfg();
            c.sinks = arr;
            c.n_sinks = 8;
            expect_invalid(&c, AT_ERR_MODEL_SINKS, "non-finite sink");
        }
}

static void test_att_ctx_create_rejects_bad_capacity_and_rounds_to_blocks(void **state) {
    (void)state;
    att_backend_t *be = NULL;
    att_cpu_cfg_t bc = {.num_threads = 1};
    assert_int_equal(att_cpu_create(&bc, &be), AT_OK);
    att_model_cfg_t c = base_cfg();
    att_ctx_t *sentinel = (att_ctx_t *)(uintptr_t)0x5a5a;
    const uint64_t bad[] = {0, UINT64_MAX, ((uint64_t)UINT32_MAX + 2u) * 16u,
                            UINT64_MAX - 15u};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        att_ctx_t *ctx = sentinel;
        at_diag_t diag = {{0}};
        at_err_t e = att_ctx_create(be, &c, bad[i], &diag, &ctx);
        if (e != AT_ERR_KV_CAPACITY)
            fail_msg("capacity %llu tokens: %s, want KV_CAPACITY", (unsigned long long)bad[i],
                     at_err_name(e));
        assert_ptr_equal(ctx, sentinel);
    }
    /* A bad model is reported as such, also through the context. */
    c.head_dim = 12;
    att_ctx_t *ctx = sentinel;
    assert_int_equal(att_ctx_create(be, &c, 1024, NULL, &ctx), AT_ERR_MODEL_HEAD_DIM);
    assert_ptr_equal(ctx, sentinel);
    c = base_cfg();
    c.block_size = 3;
    assert_int_equal(att_ctx_create(be, &c, 1024, NULL, &ctx), AT_ERR_MODEL_BLOCK_SIZE);

    /* Capacity is rounded up to whole blocks. */
    const struct {
        uint32_t block;
        uint64_t asked;
        uint64_t want;
    } rounding[] = {{0, 1, 16}, {0, 16, 16}, {0, 17, 32}, {64, 65, 128}, {8, 1000, 1000},
                    {256, 1, 256}};
    for (size_t i = 0; i < sizeof rounding / sizeof rounding[0]; i++) {
        c = base_cfg();
        c.block_size = rounding[i].block;
        ctx = NULL;
        at_err_t e = att_ctx_create(be, &c, rounding[i].asked, NULL, &ctx);
        if (e != AT_OK)
            fail_msg("capacity %llu: %s", (unsigned long long)rounding[i].asked, at_err_name(e));
        att_ctx_info_t info;
        att_ctx_get_info(ctx, &info);
        assert_int_equal(info.kv_capacity_tokens, rounding[i].want);
        assert_int_equal(info.kv_used_tokens, 0);
        assert_int_equal(info.num_sequences, 0);
        const att_model_t *m = att_ctx_model(ctx);
        assert_non_null(m);
        assert_int_equal(m->block_size, rounding[i].block ? rounding[i].block : 16);
        att_ctx_destroy(&ctx);
        assert_null(ctx);
    }
    att_ctx_destroy(&ctx);
    att_ctx_destroy(NULL);
    att_backend_destroy(&be);
    assert_null(be);
}

static int model_equal_cfg(const att_model_cfg_t *a, const att_model_cfg_t *b) {
    att_model_t *ma = create_ok(a), *mb = create_ok(b);
    int eq = att_model_equal(ma, mb);
    int rev = att_model_equal(mb, ma);
    att_model_destroy(&ma);
    att_model_destroy(&mb);
    if (eq != rev)
        fail_msg("att_model_equal is not symmetric");
    return eq;
}

static void test_att_model_equal_compares_resolved_models(void **state) {
    (void)state;
    float slopes[8], sinks[8];
    memcpy(slopes, eight_slopes, sizeof slopes);
    memcpy(sinks, eight_sinks, sizeof sinks);
    att_model_cfg_t a = base_cfg();
    a.alibi_slopes = slopes;
    a.n_alibi_slopes = 8;
    a.sinks = sinks;
    a.n_sinks = 8;
    a.logits_soft_cap = 20.0f;
    a.sliding_window = 7;

    att_model_t *m = create_ok(&a);
    assert_true(att_model_equal(m, m));
    att_model_destroy(&m);
    att_model_cfg_t b = a;
    assert_true(model_equal_cfg(&a, &b));

    /* Defaults against the values they resolve to. */
    b.block_size = 16;
    b.scale = 0.125f;
    uint32_t sevens[2] = {7, 7};
    b.layer_sliding_window = sevens;
    b.n_layer_sliding_window = 2;
    assert_true(model_equal_cfg(&a, &b));

    /* Each field on its own makes a difference. */
    float other[8];
    b = a;
    b.num_layers = 3;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.num_query_heads = 4;
    b.n_alibi_slopes = 0;
    b.n_sinks = 0;
    att_model_cfg_t a4 = a;
    a4.n_alibi_slopes = 0;
    a4.n_sinks = 0;
    assert_false(model_equal_cfg(&a4, &b));
    b = a;
    b.num_kv_heads = 4;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.head_dim = 128;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.dtype = ATT_DTYPE_BF16;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.block_size = 32;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.scale = 0.126f;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.sliding_window = 8;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    uint32_t mixed[2] = {7, 0};
    b.layer_sliding_window = mixed;
    b.n_layer_sliding_window = 2;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.logits_soft_cap = 0.0f;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.n_alibi_slopes = 0;
    b.alibi_slopes = NULL;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    memcpy(other, slopes, sizeof other);
    other[7] = 0.5f;
    b.alibi_slopes = other;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    b.n_sinks = 0;
    b.sinks = NULL;
    assert_false(model_equal_cfg(&a, &b));
    b = a;
    memcpy(other, sinks, sizeof other);
    other[3] = 0.0f;
    b.sinks = other;
    assert_false(model_equal_cfg(&a, &b));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_model_defaults_resolve),
        cmocka_unit_test(test_att_model_default_scale_is_inverse_sqrt_head_dim),
        cmocka_unit_test(test_att_model_keeps_explicit_values_and_copies_arrays),
        cmocka_unit_test(test_att_model_accepts_the_boundaries),
        cmocka_unit_test(test_att_model_rejects_each_bad_field_with_its_own_code),
        cmocka_unit_test(test_att_ctx_create_rejects_bad_capacity_and_rounds_to_blocks),
        cmocka_unit_test(test_att_model_equal_compares_resolved_models),
    };
    return cmocka_run_group_tests_name("att_model", tests, NULL, NULL);
}

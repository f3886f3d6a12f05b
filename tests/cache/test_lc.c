/* The per-session launch cache (cache/lc.c), with fake function handles: no GPU needed.
 * Shows why the cache must be scoped per model: a process-wide cache keyed the same way hands a
 * second model the first model's kernel and constants. Label: unit. */
#include "tests/test_util.h"

#include <string.h>

#include "cache/lc.h"

/* Stand-ins for compiled kernels: one per model, as NVRTC would build them. */
typedef struct fake_kernel {
    uint32_t head_dim;
    uint32_t dtype;
    uint32_t group;
} fake_kernel_t;

/* What a session's parameter template holds (a stand-in for att_kparams_t). */
typedef struct fake_params {
    uint32_t head_dim;
    uint32_t dtype;
    uint32_t group;
    uint32_t num_items; /* per call */
} fake_params_t;

typedef struct launch_log {
    uint32_t n;
    const void *fn[8];
    uint32_t grid[8];
    fake_params_t params[8];
} launch_log_t;

static at_err_t fake_launch(void *user, const lc_launch_t *l, uint32_t grid_x, void *params) {
    launch_log_t *log = user;
    assert_true(log->n < 8);
    log->fn[log->n] = l->fn;
    log->grid[log->n] = grid_x;
    memcpy(&log->params[log->n], params, sizeof(fake_params_t));
    log->n++;
    return AT_OK;
}

/* The prepared launch a session of model k would build on a miss. */
static lc_launch_t prepare(uint32_t key, const fake_kernel_t *k) {
    lc_launch_t l;
    memset(&l, 0, sizeof l);
    l.key = key;
    l.fn = (void *)k;
    l.block_x = 128;
    l.grid_per_unit = 8;
    l.param_bytes = sizeof(fake_params_t);
    fake_params_t p = {k->head_dim, k->dtype, k->group, 0};
    memcpy(l.params, &p, sizeof p);
    return l;
}

/* A call of the model behind cache lc: look up, prepare on a miss, patch, launch. Returns the
 * kernel that ran. */
static const void *call(lc_t *lc, const fake_kernel_t *own, uint32_t key, uint32_t items) {
    const lc_launch_t *l = lc_lookup(lc, key);
    if (l == NULL) {
        lc_launch_t n = prepare(key, own);
        assert_int_equal(lc_insert(lc, &n, &l), AT_OK);
    }
    fake_params_t p;
    memcpy(&p, l->params, sizeof p);
    p.num_items = items;
    assert_int_equal(lc_launch(lc, l, items, &p), AT_OK);
    return l->fn;
}

static const fake_kernel_t MODEL_A = {128, 3, 4}; /* bf16, head_dim 128, GQA group 4 */
static const fake_kernel_t MODEL_B = {64, 2, 8};  /* f16, head_dim 64, GQA group 8 */
#define KEY_DECODE LC_KEY(1, 1, 0)
#define KEY_PREFILL LC_KEY(1, 0, 0)

static void test_lc_miss_then_hit_and_counts(void **state) {
    (void)state;
    launch_log_t log = {0};
    lc_t *lc = NULL;
    assert_int_equal(lc_create(fake_launch, &log, &lc), AT_OK);
    assert_null(lc_lookup(lc, KEY_DECODE));
    assert_ptr_equal(call(lc, &MODEL_A, KEY_DECODE, 3), &MODEL_A);
    assert_ptr_equal(call(lc, &MODEL_A, KEY_DECODE, 5), &MODEL_A);
    assert_ptr_equal(call(lc, &MODEL_A, KEY_PREFILL, 7), &MODEL_A);
    lc_note_compile(lc);
    lc_stats_t s;
    lc_get_stats(lc, &s);
    assert_int_equal(s.hits, 1);   /* the second decode call */
    assert_int_equal(s.misses, 3); /* the bare lookup, the first decode and prefill calls */
    assert_int_equal(s.launches, 3);
    assert_int_equal(s.compiles, 1);
    /* the per-call value was patched into a copy; the grid follows the unit count */
    assert_int_equal(log.n, 3);
    assert_int_equal(log.params[1].num_items, 5);
    assert_int_equal(log.grid[1], 5 * 8);
    const lc_launch_t *l = lc_lookup(lc, KEY_DECODE);
    fake_params_t tpl;
    memcpy(&tpl, l->params, sizeof tpl);
    assert_int_equal(tpl.num_items, 0); /* the template itself is never patched */
    lc_destroy(&lc);
    assert_null(lc);
}

static void test_lc_sessions_are_isolated(void **state) {
    (void)state;
    launch_log_t log_a = {0}, log_b = {0};
    lc_t *a = NULL, *b = NULL;
    assert_int_equal(lc_create(fake_launch, &log_a, &a), AT_OK);
    assert_int_equal(lc_create(fake_launch, &log_b, &b), AT_OK);
    /* interleaved calls of two models, same keys */
    for (int i = 0; i < 4; i++) {
        assert_ptr_equal(call(a, &MODEL_A, KEY_DECODE, 1), &MODEL_A);
        assert_ptr_equal(call(b, &MODEL_B, KEY_DECODE, 1), &MODEL_B);
        assert_ptr_equal(call(b, &MODEL_B, KEY_PREFILL, 2), &MODEL_B);
        assert_ptr_equal(call(a, &MODEL_A, KEY_PREFILL, 2), &MODEL_A);
    }
    for (uint32_t i = 0; i < log_b.n; i++) {
        assert_int_equal(log_b.params[i].head_dim, 64);
        assert_int_equal(log_b.params[i].group, 8);
    }
    lc_stats_t sa, sb;
    lc_get_stats(a, &sa);
    lc_get_stats(b, &sb);
    assert_int_equal(sa.misses, 2);
    assert_int_equal(sb.misses, 2);
    assert_int_equal(sa.hits, 6);
    lc_destroy(&a);
    lc_destroy(&b);
}

/* The hazard the per-session scope exists for: one cache for the whole process, keyed only by
 * what varies within a model. Model B's first decode call finds model A's entry and launches
 * A's kernel with A's head_dim, dtype and group. */
static void test_lc_process_wide_cache_returns_wrong_kernel(void **state) {
    (void)state;
    launch_log_t log = {0};
    lc_t *shared = NULL;
    assert_int_equal(lc_create(fake_launch, &log, &shared), AT_OK);
    assert_ptr_equal(call(shared, &MODEL_A, KEY_DECODE, 1), &MODEL_A);
    const void *ran = call(shared, &MODEL_B, KEY_DECODE, 1);
    assert_ptr_equal(ran, &MODEL_A); /* wrong: model B needs its own kernel */
    assert_ptr_not_equal(ran, &MODEL_B);
    assert_int_equal(log.params[1].head_dim, 128); /* B's call ran with A's constants */
    assert_int_equal(log.params[1].dtype, 3);
    assert_int_equal(log.params[1].group, 4);
    lc_stats_t s;
    lc_get_stats(shared, &s);
    assert_int_equal(s.hits, 1); /* counted as a hit: nothing noticed */
    lc_destroy(&shared);
}

static void test_lc_insert_limits(void **state) {
    (void)state;
    launch_log_t log = {0};
    lc_t *lc = NULL;
    assert_int_equal(lc_create(fake_launch, &log, &lc), AT_OK);
    for (uint32_t k = 0; k < LC_MAX_ENTRIES; k++) {
        lc_launch_t l = prepare(LC_KEY(1, k, 0), &MODEL_A);
        assert_int_equal(lc_insert(lc, &l, NULL), AT_OK);
    }
    lc_launch_t extra = prepare(LC_KEY(2, 0, 0), &MODEL_A);
    assert_int_equal(lc_insert(lc, &extra, NULL), AT_ERR_INTERNAL);
    /* replacing an existing key still works when full */
    lc_launch_t again = prepare(LC_KEY(1, 0, 0), &MODEL_B);
    const lc_launch_t *got = NULL;
    assert_int_equal(lc_insert(lc, &again, &got), AT_OK);
    assert_ptr_equal(got->fn, &MODEL_B);
    lc_launch_t big = prepare(LC_KEY(1, 0, 0), &MODEL_A);
    big.param_bytes = LC_MAX_PARAM_BYTES + 1;
    assert_int_equal(lc_insert(lc, &big, NULL), AT_ERR_INTERNAL);
    lc_destroy(&lc);
    lc_destroy(&lc); /* NULL is fine */
}

/* A session that switches tile configs unloads a module and forgets its launches: the entries
 * of that tile byte go, the others stay where they were (handed-out pointers remain valid), and
 * the freed entries take new keys even when the cache had been full. */
static void test_lc_forget_tile(void **state) {
    (void)state;
    launch_log_t log = {0};
    lc_t *lc = NULL;
    assert_int_equal(lc_create(fake_launch, &log, &lc), AT_OK);
    /* 4 entries per tile: kernels 1 and 2, unsplit and split; tiles 0..9 fill the cache */
    assert_int_equal(LC_MAX_ENTRIES % 4, 0);
    const uint32_t tiles = LC_MAX_ENTRIES / 4;
    for (uint32_t t = 0; t < tiles; t++)
        for (uint32_t k = 1; k <= 2; k++)
            for (uint32_t split = 0; split <= 1; split++) {
                lc_launch_t l = prepare(LC_KEY(k, t, split), t == 2 ? &MODEL_B : &MODEL_A);
                assert_int_equal(lc_insert(lc, &l, NULL), AT_OK);
            }
    lc_launch_t extra = prepare(LC_KEY(1, tiles, 0), &MODEL_A);
    assert_int_equal(lc_insert(lc, &extra, NULL), AT_ERR_INTERNAL);
    const lc_launch_t *kept = lc_lookup(lc, LC_KEY(2, 3, 1));
    assert_non_null(kept);

    lc_forget_tile(lc, 2);
    lc_forget_tile(lc, 200); /* no entry has it: nothing changes */
    for (uint32_t k = 1; k <= 2; k++)
        for (uint32_t split = 0; split <= 1; split++)
            assert_null(lc_lookup(lc, LC_KEY(k, 2, split)));
    for (uint32_t t = 0; t < tiles; t++) {
        if (t == 2)
            continue;
        const lc_launch_t *l = lc_lookup(lc, LC_KEY(1, t, 0));
        assert_non_null(l);
        assert_ptr_equal(l->fn, &MODEL_A);
    }
    assert_ptr_equal(lc_lookup(lc, LC_KEY(2, 3, 1)), kept);

    /* the four freed entries take a new tile's launches; a fifth does not fit */
    for (uint32_t k = 1; k <= 2; k++)
        for (uint32_t split = 0; split <= 1; split++) {
            lc_launch_t l = prepare(LC_KEY(k, tiles, split), &MODEL_B);
            const lc_launch_t *got = NULL;
            assert_int_equal(lc_insert(lc, &l, &got), AT_OK);
            assert_int_equal(got->key, LC_KEY(k, tiles, split));
        }
    lc_launch_t fifth = prepare(LC_KEY(3, tiles, 0), &MODEL_A);
    assert_int_equal(lc_insert(lc, &fifth, NULL), AT_ERR_INTERNAL);
    /* a call on the new tile launches its own kernel; the old tile's key is still gone */
    assert_ptr_equal(call(lc, &MODEL_B, LC_KEY(1, tiles, 1), 2), &MODEL_B);
    assert_null(lc_lookup(lc, LC_KEY(1, 2, 0)));
    assert_ptr_equal(lc_lookup(lc, LC_KEY(2, 3, 1)), kept);

    /* forgetting the new tile, then the tile back: a miss, prepared again */
    lc_forget_tile(lc, tiles);
    assert_null(lc_lookup(lc, LC_KEY(1, tiles, 1)));
    assert_ptr_equal(call(lc, &MODEL_A, LC_KEY(1, 2, 0), 1), &MODEL_A);
    lc_destroy(&lc);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lc_miss_then_hit_and_counts),
        cmocka_unit_test(test_lc_sessions_are_isolated),
        cmocka_unit_test(test_lc_process_wide_cache_returns_wrong_kernel),
        cmocka_unit_test(test_lc_insert_limits),
        cmocka_unit_test(test_lc_forget_tile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

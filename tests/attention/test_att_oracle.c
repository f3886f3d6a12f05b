/* Checks of the tests' own oracle (att_oracle.c) against closed forms, so that a mismatch in
 * test_att_ctx points at the library, not at the reference. f32 inputs throughout. */
#include "tests/test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tests/attention/att_oracle.h"

#define D 8

static att_model_cfg_t cfg_of(uint32_t hq, uint32_t hkv) {
    att_model_cfg_t c = {.num_layers = 2, .num_query_heads = hq, .num_kv_heads = hkv,
                         .head_dim = D, .dtype = ATT_DTYPE_F32};
    return c;
}

/* With every key 0, every logit is 0 (times the scale, capped, ...): out is the plain mean of
 * the values in the window, or the sink-weighted version. */
static void test_att_oracle_zero_keys_average_the_window(void **state) {
    (void)state;
    const uint32_t windows[] = {0, 1, 3, 10};
    for (size_t w = 0; w < 4; w++)
        for (int with_sink = 0; with_sink < 2; with_sink++) {
            att_model_cfg_t c = cfg_of(1, 1);
            float sink = 0.7f;
            c.sliding_window = windows[w];
            c.logits_soft_cap = 5.0f;
            if (with_sink) {
                c.sinks = &sink;
                c.n_sinks = 1;
            }
            att_oracle_t *o = att_oracle_create(&c);
            assert_non_null(o);
            enum { T = 20 };
            float q[T * D], k[T * D], v[T * D];
            double out[T * D];
            for (int i = 0; i < T * D; i++) {
                q[i] = (float)((i * 37) % 11) - 5.0f;
                k[i] = 0.0f;
                v[i] = (float)((i * 13) % 7) - 3.0f;
            }
            const att_chunk_t ch = {9, 0, T};
            assert_int_equal(att_oracle_run(o, 1, &ch, 1, q, k, v, out), AT_OK);
            for (uint32_t i = 0; i < T; i++) {
                uint32_t lo = (windows[w] && i + 1 > windows[w]) ? i + 1 - windows[w] : 0;
                for (uint32_t x = 0; x < D; x++) {
                    double sum = 0;
                    for (uint32_t j = lo; j <= i; j++)
                        sum += v[j * D + x];
                    double den = (double)(i - lo + 1) + (with_sink ? exp((double)sink) : 0.0);
                    assert_true(fabs(out[i * D + x] - sum / den) < 1e-12);
                }
            }
            att_oracle_destroy(&o);
            assert_null(o);
        }
}

/* Two keys, known logits: softmax by hand with scale, soft cap and ALiBi. */
static void test_att_oracle_two_keys_by_hand(void **state) {
    (void)state;
    att_model_cfg_t c = cfg_of(2, 1);
    const float slopes[2] = {0.0f, 0.5f};
    c.scale = 0.5f;
    c.logits_soft_cap = 2.0f;
    c.alibi_slopes = slopes;
    c.n_alibi_slopes = 2;
    att_oracle_t *o = att_oracle_create(&c);
    float q[2 * 2 * D] = {0}, k[2 * D] = {0}, v[2 * D] = {0};
    double out[2 * 2 * D];
    k[0] = 1.0f;     /* key 0 = e0 */
    k[D + 0] = 3.0f; /* key 1 = 3 e0 */
    v[0] = 1.0f;     /* value 0 = e0, value 1 = e1 */
    v[D + 1] = 1.0f;
    /* token 1, head h: q = 2 e0 */
    q[(1 * 2 + 0) * D] = 2.0f;
    q[(1 * 2 + 1) * D] = 2.0f;
    const att_chunk_t ch = {1, 0, 2};
    assert_int_equal(att_oracle_run(o, 0, &ch, 1, q, k, v, out), AT_OK);
    for (uint32_t h = 0; h < 2; h++) {
        double s0 = 2.0 * tanh(0.5 * 2.0 * 1.0 / 2.0) + slopes[h] * (0.0 - 1.0);
        double s1 = 2.0 * tanh(0.5 * 2.0 * 3.0 / 2.0);
        double p0 = exp(s0) / (exp(s0) + exp(s1));
        const double *row = out + (1 * 2 + h) * D;
        assert_true(fabs(row[0] - p0) < 1e-12);
        assert_true(fabs(row[1] - (1.0 - p0)) < 1e-12);
        /* token 0 sees only key 0 */
        assert_true(fabs(out[h * D + 0] - 1.0) < 1e-12);
    }
    att_oracle_destroy(&o);
}

/* Query head h reads KV head h / group. */
static void test_att_oracle_maps_query_heads_to_kv_heads(void **state) {
    (void)state;
    att_model_cfg_t c = cfg_of(6, 2);
    att_oracle_t *o = att_oracle_create(&c);
    float q[6 * D], k[2 * D], v[2 * D];
    double out[6 * D];
    for (int i = 0; i < 6 * D; i++)
        q[i] = 0.25f * (float)(i % 5);
    for (int i = 0; i < 2 * D; i++) {
        k[i] = 1.0f;
        v[i] = i < D ? 1.0f : -1.0f;
    }
    const att_chunk_t ch = {3, 0, 1};
    assert_int_equal(att_oracle_run(o, 0, &ch, 1, q, k, v, out), AT_OK);
    for (uint32_t h = 0; h < 6; h++)
        for (uint32_t x = 0; x < D; x++)
            assert_true(out[h * D + x] == (h < 3 ? 1.0 : -1.0));
    att_oracle_destroy(&o);
}

/* A chunk cuts the history to its start_pos; unknown sequences start at 0; release forgets. */
static void test_att_oracle_rolls_back_and_releases(void **state) {
    (void)state;
    att_model_cfg_t c = cfg_of(1, 1);
    att_oracle_t *o = att_oracle_create(&c);
    float q[5 * D] = {0}, k[5 * D] = {0}, v[5 * D];
    double out[5 * D];
    for (int i = 0; i < 5 * D; i++)
        v[i] = 1.0f;
    const att_chunk_t a = {4, 0, 5};
    assert_int_equal(att_oracle_run(o, 0, &a, 1, q, k, v, out), AT_OK);
    assert_int_equal(att_oracle_seq_len(o, 4, 0), 5);
    assert_int_equal(att_oracle_seq_len(o, 4, 1), 0);
    assert_int_equal(att_oracle_seq_len(o, 5, 0), -1);
    for (int i = 0; i < 5 * D; i++)
        v[i] = 3.0f;
    const att_chunk_t back = {4, 2, 1}; /* keys 0, 1 hold 1, key 2 holds 3 */
    assert_int_equal(att_oracle_run(o, 0, &back, 1, q, k, v, out), AT_OK);
    assert_true(fabs(out[0] - 5.0 / 3.0) < 1e-12);
    assert_int_equal(att_oracle_seq_len(o, 4, 0), 3);
    assert_int_equal(att_oracle_seq_max_len(o, 4), 3);
    const att_chunk_t past = {4, 4, 1};
    assert_int_equal(att_oracle_run(o, 0, &past, 1, q, k, v, out), AT_ERR_KV_PAST_END);
    const att_chunk_t stranger = {8, 1, 1};
    assert_int_equal(att_oracle_run(o, 0, &stranger, 1, q, k, v, out), AT_ERR_KV_PAST_END);
    assert_int_equal(att_oracle_num_seqs(o), 1);
    assert_int_equal(att_oracle_release(o, 4), 1);
    assert_int_equal(att_oracle_release(o, 4), 0);
    assert_int_equal(att_oracle_seq_len(o, 4, 0), -1);
    assert_int_equal(att_oracle_num_seqs(o), 0);
    att_oracle_destroy(&o);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_oracle_zero_keys_average_the_window),
        cmocka_unit_test(test_att_oracle_two_keys_by_hand),
        cmocka_unit_test(test_att_oracle_maps_query_heads_to_kv_heads),
        cmocka_unit_test(test_att_oracle_rolls_back_and_releases),
    };
    return cmocka_run_group_tests_name("att_oracle", tests, NULL, NULL);
}

/* Tests of attention/att_op: att_call_validate, the state-independent checks of a call. */
#include "tests/test_util.h"

#include <stdlib.h>
#include <string.h>

#include "attention/att_model.h"
#include "attention/att_op.h"

/* 2 layers, Hq 4, Hkv 2, D 16, f16: a q/out row is 128 bytes, a k/v row 64. */
static att_model_t *g_model;
static const size_t QROW = 4 * 16 * 2, KVROW = 2 * 16 * 2;
static uint8_t g_buf[1 << 16]; /* stands in for every tensor; validate reads no element */

static int setup(void **state) {
    (void)state;
    att_model_cfg_t c = {.num_layers = 2, .num_query_heads = 4, .num_kv_heads = 2,
                         .head_dim = 16, .dtype = ATT_DTYPE_F16};
    return att_model_create(&c, NULL, &g_model) == AT_OK ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    att_model_destroy(&g_model);
    return 0;
}

static att_call_t call_for(const att_chunk_t *ch, uint32_t n, uint32_t tokens) {
    att_call_t c = {
        .layer = 1,
        .chunks = ch,
        .num_chunks = n,
        .q = g_buf,
        .q_bytes = tokens * QROW,
        .k = g_buf,
        .k_bytes = tokens * KVROW,
        .v = g_buf,
        .v_bytes = tokens * KVROW,
        .out = g_buf,
        .out_bytes = tokens * QROW,
    };
    return c;
}

static void expect_(const att_call_t *c, int with_q_out, at_err_t want, const char *what,
                    int line) {
    at_diag_t diag;
    memset(&diag, 0, sizeof diag);
    uint32_t t = 0;
    at_err_t e = att_call_validate(g_model, c, with_q_out, &diag, &t);
    if (e != want)
        fail_msg("line %d, %s: %s, want %s (%s)", line, what, at_err_name(e), at_err_name(want),
                 diag.msg);
    if (e != AT_OK && diag.msg[0] == '\0')
        fail_msg("line %d, %s: diag left empty", line, what);
    if (att_call_validate(g_model, c, with_q_out, NULL, NULL) != want)
        fail_msg("line %d, %s: different answer without diag", line, what);
}
#define expect(c, wq, want, what) expect_(c, wq, want, what, __LINE__)

static void test_att_call_validate_accepts_a_mixed_call(void **state) {
    (void)state;
    const att_chunk_t ch[3] = {{1, 0, 3}, {2, 40, 1}, {3, 7, 5}};
    att_call_t c = call_for(ch, 3, 9);
    uint32_t t = 0;
    assert_int_equal(att_call_validate(g_model, &c, 1, NULL, &t), AT_OK);
    assert_int_equal(t, 9);
    /* Positions are not checked against any cache here; the last allowed one is fine. */
    const att_chunk_t far[1] = {{4, 0x7ffffffeu, 1}};
    c = call_for(far, 1, 1);
    expect(&c, 1, AT_OK, "start_pos + n == ATT_MAX_POSITION");
}

static void test_att_call_validate_append_only_skips_q_and_out(void **state) {
    (void)state;
    const att_chunk_t ch[2] = {{1, 0, 3}, {2, 4, 2}};
    att_call_t c = call_for(ch, 2, 5);
    c.q = NULL;
    c.q_bytes = 0;
    c.out = NULL;
    c.out_bytes = 0;
    expect(&c, 0, AT_OK, "append-only, no q/out");
    c.q_bytes = 3;
    c.out_bytes = 12345;
    expect(&c, 0, AT_OK, "append-only ignores q/out byte lengths");
    c.k_bytes -= 1;
    expect(&c, 0, AT_ERR_CALL_K_BYTES, "append-only still checks k");
    c.k_bytes += 1;
    c.v_bytes += KVROW;
    expect(&c, 0, AT_ERR_CALL_V_BYTES, "append-only still checks v");
}

static void test_att_call_validate_rejects_each_problem_with_its_code(void **state) {
    (void)state;
    const att_chunk_t ok[2] = {{1, 10, 2}, {2, 0, 1}};
    att_call_t c;

    c = call_for(ok, 2, 3);
    c.layer = 2;
    expect(&c, 1, AT_ERR_CALL_LAYER, "layer == num_layers");
    c.layer = UINT32_MAX;
    expect(&c, 1, AT_ERR_CALL_LAYER, "layer UINT32_MAX");

    c = call_for(ok, 0, 0);
    expect(&c, 1, AT_ERR_CALL_NO_CHUNKS, "no chunks");
    c.chunks = NULL;
    expect(&c, 1, AT_ERR_CALL_NO_CHUNKS, "no chunks, NULL list");

    const att_chunk_t empty[2] = {{1, 10, 2}, {2, 0, 0}};
    c = call_for(empty, 2, 2);
    expect(&c, 1, AT_ERR_CALL_EMPTY_CHUNK, "a chunk of 0 tokens");
    const att_chunk_t empty1[1] = {{1, 0, 0}};
    c = call_for(empty1, 1, 0);
    expect(&c, 1, AT_ERR_CALL_EMPTY_CHUNK, "the only chunk empty");

    const att_chunk_t dup[3] = {{1, 10, 2}, {2, 0, 1}, {1, 12, 1}};
    c = call_for(dup, 3, 4);
    expect(&c, 1, AT_ERR_CALL_DUP_SEQ, "seq 1 twice");
    const att_chunk_t dup_same[2] = {{5, 0, 1}, {5, 0, 1}};
    c = call_for(dup_same, 2, 2);
    expect(&c, 1, AT_ERR_CALL_DUP_SEQ, "the same chunk twice");

    const att_chunk_t pos[][2] = {
        {{1, 0, 1}, {2, 0x7fffffffu, 2}},
        {{1, 0xffffffffu, 1}, {2, 0, 1}}, /* wraps to 0 in 32 bits */
        {{1, 0x80000000u, 1}, {2, 0, 1}},
        {{1, 0xfffffffeu, 2}, {2, 0, 1}}, /* wraps to exactly 0 */
    };
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++) {
        c = call_for(pos[i], 2, pos[i][0].num_tokens + pos[i][1].num_tokens);
        expect(&c, 1, AT_ERR_CALL_POSITION, "position beyond the limit");
    }

    const long deltas[] = {-1, 1, -(long)QROW, (long)QROW};
    const long kv_deltas[] = {-1, 1, -(long)KVROW, (long)KVROW};
    for (size_t i = 0; i < sizeof deltas / sizeof deltas[0]; i++) {
        c = call_for(ok, 2, 3);
        c.q_bytes = (size_t)((long)c.q_bytes + deltas[i]);
        expect(&c, 1, AT_ERR_CALL_Q_BYTES, "q bytes");
        c = call_for(ok, 2, 3);
        c.out_bytes = (size_t)((long)c.out_bytes + deltas[i]);
        expect(&c, 1, AT_ERR_CALL_OUT_BYTES, "out bytes");
        c = call_for(ok, 2, 3);
        c.k_bytes = (size_t)((long)c.k_bytes + kv_deltas[i]);
        expect(&c, 1, AT_ERR_CALL_K_BYTES, "k bytes");
        c = call_for(ok, 2, 3);
        c.v_bytes = (size_t)((long)c.v_bytes + kv_deltas[i]);
        expect(&c, 1, AT_ERR_CALL_V_BYTES, "v bytes");
    }
    c = call_for(ok, 2, 3);
    c.q_bytes = 0;
    expect(&c, 1, AT_ERR_CALL_Q_BYTES, "q bytes 0");
    c = call_for(ok, 2, 3);
    c.out_bytes = SIZE_MAX;
    expect(&c, 1, AT_ERR_CALL_OUT_BYTES, "out bytes SIZE_MAX");
}

/* A token count that wraps around 32 bits must not pass for a small one. */
static void test_att_call_validate_token_sum_does_not_wrap(void **state) {
    (void)state;
    const att_chunk_t ch[3] = {{1, 0, 0x7fffffffu}, {2, 0, 0x7fffffffu}, {3, 0, 3}};
    att_call_t c = call_for(ch, 3, 1); /* 2^32 + 1 tokens, == 1 modulo 2^32 */
    at_err_t e = att_call_validate(g_model, &c, 1, NULL, NULL);
    if (e == AT_OK)
        fail_msg("a call of 2^32 + 1 tokens passed with the byte lengths of 1 token");
}

/* Many chunks: the duplicate check works past any small fixed table. */
static void test_att_call_validate_finds_duplicates_among_many_chunks(void **state) {
    (void)state;
    enum { N = 3000 };
    att_chunk_t *ch = tu_xcalloc(N, sizeof *ch);
    for (uint32_t i = 0; i < N; i++)
        ch[i] = (att_chunk_t){.seq_id = 0x9e3779b97f4a7c15ull * (i + 1), .start_pos = i,
                              .num_tokens = 1};
    att_call_t c = call_for(ch, N, N);
    c.q_bytes = c.out_bytes = N * QROW;
    c.k_bytes = c.v_bytes = N * KVROW;
    uint8_t *big = tu_xmalloc(N * QROW);
    c.q = c.out = big;
    c.k = c.v = big;
    uint32_t t = 0;
    at_err_t e = att_call_validate(g_model, &c, 1, NULL, &t);
    assert_true(e == AT_OK || e == AT_ERR_NOMEM);
    if (e == AT_OK)
        assert_int_equal(t, N);
    ch[N - 1].seq_id = ch[N / 2].seq_id;
    e = att_call_validate(g_model, &c, 1, NULL, NULL);
    assert_true(e == AT_ERR_CALL_DUP_SEQ || e == AT_ERR_NOMEM);
    free(big);
    free(ch);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_call_validate_accepts_a_mixed_call),
        cmocka_unit_test(test_att_call_validate_append_only_skips_q_and_out),
        cmocka_unit_test(test_att_call_validate_rejects_each_problem_with_its_code),
        cmocka_unit_test(test_att_call_validate_token_sum_does_not_wrap),
        cmocka_unit_test(test_att_call_validate_finds_duplicates_among_many_chunks),
    };
    return cmocka_run_group_tests_name("att_op", tests, setup, teardown);
}

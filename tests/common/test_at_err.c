/* Tests of common/at_err: the error table's generated lookups and at_diag_set. */
#include "tests/test_util.h"

#include <limits.h>
#include <string.h>

#include "common/at_err.h"

/* The canonical gRPC status code names (grpc/status.h, google.rpc.Code). */
static const char *const grpc_statuses[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

static int is_grpc_status(const char *s) {
    for (size_t i = 0; i < sizeof grpc_statuses / sizeof grpc_statuses[0]; i++)
        if (strcmp(s, grpc_statuses[i]) == 0)
            return 1;
    return 0;
}

static void test_at_err_ok_is_zero(void **state) {
    (void)state;
    assert_int_equal(AT_OK, 0);
    assert_int_equal(AT_ERR_OK, 0);
    assert_string_equal(at_err_name(AT_OK), "OK");
    assert_string_equal(at_err_status_name(AT_OK), "OK");
}

static void test_at_err_every_code_has_name_message_and_status(void **state) {
    (void)state;
    for (int e = 0; e < (int)AT_ERR_COUNT_; e++) {
        const char *name = at_err_name((at_err_t)e);
        const char *msg = at_err_str((at_err_t)e);
        const char *status = at_err_status_name((at_err_t)e);
        assert_non_null(name);
        assert_non_null(msg);
        assert_non_null(status);
        assert_true(strlen(name) > 0);
        assert_true(strlen(msg) > 0);
        assert_string_not_equal(name, "UNKNOWN");
        assert_string_not_equal(msg, "unknown error");
        if (!is_grpc_status(status))
            fail_msg("code %d (%s) maps to '%s', not a gRPC status name", e, name, status);
        /* Only success maps to OK. */
        if ((e == AT_OK) != (strcmp(status, "OK") == 0))
            fail_msg("code %d (%s) maps to '%s'", e, name, status);
    }
}

static void test_at_err_names_are_unique(void **state) {
    (void)state;
    for (int a = 0; a < (int)AT_ERR_COUNT_; a++)
        for (int b = a + 1; b < (int)AT_ERR_COUNT_; b++)
            if (strcmp(at_err_name((at_err_t)a), at_err_name((at_err_t)b)) == 0)
                fail_msg("codes %d and %d share the name %s", a, b, at_err_name((at_err_t)a));
}

/* The generated functions agree with the table they were generated from, row by row. */
static void test_at_err_lookups_match_the_table(void **state) {
    (void)state;
    int rows = 0;
#define CHECK_ROW_(name, status, msg)                                                            \
    assert_string_equal(at_err_name(AT_ERR_##name), #name);                                      \
    assert_string_equal(at_err_str(AT_ERR_##name), msg);                                         \
    assert_string_equal(at_err_status_name(AT_ERR_##name), #status);                             \
    assert_int_equal(AT_ERR_##name, rows);                                                       \
    rows++;
    AT_ERR_TABLE(CHECK_ROW_)
#undef CHECK_ROW_
    assert_int_equal(rows, AT_ERR_COUNT_);
}

/* The mapping rules of STYLE.md section 3 for the codes the attention op returns. */
static void test_at_err_maps_codes_to_their_status_class(void **state) {
    (void)state;
    assert_string_equal(at_err_status_name(AT_ERR_NOMEM), "RESOURCE_EXHAUSTED");
    assert_string_equal(at_err_status_name(AT_ERR_KV_FULL), "RESOURCE_EXHAUSTED");
    assert_string_equal(at_err_status_name(AT_ERR_KV_NO_SEQ), "NOT_FOUND");
    assert_string_equal(at_err_status_name(AT_ERR_KV_PAST_END), "OUT_OF_RANGE");
    assert_string_equal(at_err_status_name(AT_ERR_UNSUPPORTED), "UNIMPLEMENTED");
    assert_string_equal(at_err_status_name(AT_ERR_DEVICE), "INTERNAL");
    assert_string_equal(at_err_status_name(AT_ERR_INTERNAL), "INTERNAL");
    const at_err_t invalid[] = {
        AT_ERR_MODEL_LAYERS,    AT_ERR_MODEL_HEADS,     AT_ERR_MODEL_GQA,
        AT_ERR_MODEL_HEAD_DIM,  AT_ERR_MODEL_DTYPE,     AT_ERR_MODEL_BLOCK_SIZE,
        AT_ERR_MODEL_SCALE,     AT_ERR_MODEL_WINDOW,    AT_ERR_MODEL_SOFT_CAP,
        AT_ERR_MODEL_ALIBI,     AT_ERR_MODEL_SINKS,     AT_ERR_KV_CAPACITY,
        AT_ERR_CALL_LAYER,      AT_ERR_CALL_NO_CHUNKS,  AT_ERR_CALL_EMPTY_CHUNK,
        AT_ERR_CALL_DUP_SEQ,    AT_ERR_CALL_POSITION,   AT_ERR_CALL_Q_BYTES,
        AT_ERR_CALL_K_BYTES,    AT_ERR_CALL_V_BYTES,    AT_ERR_CALL_OUT_BYTES,
    };
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++)
        assert_string_equal(at_err_status_name(invalid[i]), "INVALID_ARGUMENT");
}

static void test_at_err_unknown_values_map_to_internal(void **state) {
    (void)state;
    const int unknown[] = {(int)AT_ERR_COUNT_, (int)AT_ERR_COUNT_ + 1, 1000, INT_MAX, -1, INT_MIN};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        at_err_t e = (at_err_t)unknown[i];
        assert_string_equal(at_err_name(e), "UNKNOWN");
        assert_string_equal(at_err_str(e), "unknown error");
        assert_string_equal(at_err_status_name(e), "INTERNAL");
    }
}

static void test_at_diag_set_with_null_returns_the_code(void **state) {
    (void)state;
    assert_int_equal(at_diag_set(NULL, AT_ERR_KV_FULL, "need %u blocks", 3u), AT_ERR_KV_FULL);
    assert_int_equal(at_diag_set(NULL, AT_OK, "nothing"), AT_OK);
}

static void test_at_diag_set_formats_the_detail(void **state) {
    (void)state;
    at_diag_t d;
    memset(&d, 'x', sizeof d);
    assert_int_equal(at_diag_set(&d, AT_ERR_MODEL_HEAD_DIM, "head_dim: want %s, got %u",
                                 "a multiple of 8", 12u),
                     AT_ERR_MODEL_HEAD_DIM);
    assert_string_equal(d.msg, "head_dim: want a multiple of 8, got 12");
}

static void test_at_diag_set_truncates_long_details(void **state) {
    (void)state;
    char longer[1000];
    memset(longer, 'y', sizeof longer - 1);
    longer[sizeof longer - 1] = '\0';
    at_diag_t d;
    memset(&d, 'x', sizeof d);
    assert_int_equal(at_diag_set(&d, AT_ERR_INTERNAL, "%s", longer), AT_ERR_INTERNAL);
    assert_true(memchr(d.msg, '\0', sizeof d.msg) != NULL);
    assert_int_equal(strlen(d.msg), sizeof d.msg - 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_at_err_ok_is_zero),
        cmocka_unit_test(test_at_err_every_code_has_name_message_and_status),
        cmocka_unit_test(test_at_err_names_are_unique),
        cmocka_unit_test(test_at_err_lookups_match_the_table),
        cmocka_unit_test(test_at_err_maps_codes_to_their_status_class),
        cmocka_unit_test(test_at_err_unknown_values_map_to_internal),
        cmocka_unit_test(test_at_diag_set_with_null_returns_the_code),
        cmocka_unit_test(test_at_diag_set_formats_the_detail),
        cmocka_unit_test(test_at_diag_set_truncates_long_details),
    };
    return cmocka_run_group_tests_name("at_err", tests, NULL, NULL);
}

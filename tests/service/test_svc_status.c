/* service/svc_status.c: every code of the error table maps to the gRPC status its row names. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "service/svc_status.h"

static const struct {
    const char *name;
    grpc_status_code code;
} names[] = {
    {"OK", GRPC_STATUS_OK},
    {"CANCELLED", GRPC_STATUS_CANCELLED},
    {"INVALID_ARGUMENT", GRPC_STATUS_INVALID_ARGUMENT},
    {"DEADLINE_EXCEEDED", GRPC_STATUS_DEADLINE_EXCEEDED},
    {"NOT_FOUND", GRPC_STATUS_NOT_FOUND},
    {"ALREADY_EXISTS", GRPC_STATUS_ALREADY_EXISTS},
    {"PERMISSION_DENIED", GRPC_STATUS_PERMISSION_DENIED},
    {"RESOURCE_EXHAUSTED", GRPC_STATUS_RESOURCE_EXHAUSTED},
    {"FAILED_PRECONDITION", GRPC_STATUS_FAILED_PRECONDITION},
    {"OUT_OF_RANGE", GRPC_STATUS_OUT_OF_RANGE},
    {"UNIMPLEMENTED", GRPC_STATUS_UNIMPLEMENTED},
    {"INTERNAL", GRPC_STATUS_INTERNAL},
    {"UNAVAILABLE", GRPC_STATUS_UNAVAILABLE},
    {"UNAUTHENTICATED", GRPC_STATUS_UNAUTHENTICATED},
};

static void test_svc_status_maps_every_error(void **state) {
    (void)state;
    for (int e = 0; e < AT_ERR_COUNT_; e++) {
        const char *want = at_err_status_name((at_err_t)e);
        size_t i = 0;
        while (i < sizeof names / sizeof names[0] && strcmp(names[i].name, want) != 0)
            i++;
        if (i == sizeof names / sizeof names[0])
            fail_msg("%s: status column %s is not a gRPC status", at_err_name((at_err_t)e), want);
        if (svc_status_of((at_err_t)e) != names[i].code)
            fail_msg("%s maps to %d, its row says %s", at_err_name((at_err_t)e),
                     svc_status_of((at_err_t)e), want);
        assert_true(e == AT_OK || svc_status_of((at_err_t)e) != GRPC_STATUS_OK);
    }
}

static void test_svc_status_unknown_is_internal(void **state) {
    (void)state;
    assert_int_equal(svc_status_of(AT_ERR_COUNT_), GRPC_STATUS_INTERNAL);
    assert_int_equal(svc_status_of((at_err_t)-1), GRPC_STATUS_INTERNAL);
    assert_int_equal(svc_status_of((at_err_t)1000000), GRPC_STATUS_INTERNAL);
}

static void test_svc_status_name_spells_each_code_as_grpc_does(void **state) {
    (void)state;
    assert_string_equal(svc_status_name(GRPC_STATUS_OK), "OK");
    assert_string_equal(svc_status_name(GRPC_STATUS_NOT_FOUND), "NOT_FOUND");
    assert_string_equal(svc_status_name(GRPC_STATUS_RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
    assert_string_equal(svc_status_name(GRPC_STATUS_UNAVAILABLE), "UNAVAILABLE");
    assert_string_equal(svc_status_name(GRPC_STATUS_UNAUTHENTICATED), "UNAUTHENTICATED");
    assert_string_equal(svc_status_name((grpc_status_code)17), "UNKNOWN");
    /* every name of the error table's status column is spelled the same here */
    for (int e = 0; e < AT_ERR_COUNT_; e++)
        assert_string_equal(svc_status_name(svc_status_of((at_err_t)e)),
                            at_err_status_name((at_err_t)e));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svc_status_maps_every_error),
        cmocka_unit_test(test_svc_status_unknown_is_internal),
        cmocka_unit_test(test_svc_status_name_spells_each_code_as_grpc_does),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

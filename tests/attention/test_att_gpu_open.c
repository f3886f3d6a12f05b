/* att_gpu_open's device names, without a GPU: a name that is not "cuda:N" or "hip:N" (N from 0
 * to 1024) is refused with AT_ERR_DEVICE_UNKNOWN and a message saying what is expected, and
 * leaves *out alone; a kind the build lacks is refused the same way. Label: unit. */
#include "tests/test_util.h"

#include <string.h>

#include "attention/att_gpu_open.h"

static void test_att_gpu_open_refuses_bad_names(void **state) {
    (void)state;
    static const char *const bad[] = {"gpu:0",   "cuda:",  "cuda:x", "cuda:-1", "cuda:1025",
                                      "cuda:0x", "hip:",   "hip:1a", "CUDA:0",  ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        at_diag_t d = {{0}};
        att_backend_t *be = (att_backend_t *)(uintptr_t)0x1234;
        const at_err_t e = att_gpu_open(bad[i], 0, &d, &be);
        TU_CHECK(e == AT_ERR_DEVICE_UNKNOWN && strstr(d.msg, "expected") != NULL &&
                     be == (att_backend_t *)(uintptr_t)0x1234,
                 "\"%s\": %s, \"%s\"", bad[i], at_err_name(e), d.msg);
    }
}

/* device is refused as a kind the build lacks, by that kind's name (what). */
static void refused_as_lacking(const char *device, const char *what) {
    at_diag_t d = {{0}};
    att_backend_t *be = NULL;
    TU_CHECK(att_gpu_open(device, 0, &d, &be) == AT_ERR_DEVICE_UNKNOWN &&
                 strstr(d.msg, what) != NULL && be == NULL,
             "%s: \"%s\"", device, d.msg);
}

static void test_att_gpu_open_refuses_kinds_the_build_lacks(void **state) {
    (void)state;
    (void)refused_as_lacking; /* unused in a build with both */
#if defined(AT_HAVE_CUDA) && defined(AT_HAVE_HIP)
    print_message("this build has both GPU backends: nothing to refuse\n");
#endif
#ifndef AT_HAVE_CUDA
    refused_as_lacking("cuda:0", "built without CUDA");
#endif
#ifndef AT_HAVE_HIP
    refused_as_lacking("hip:0", "built without HIP");
#endif
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_gpu_open_refuses_bad_names),
        cmocka_unit_test(test_att_gpu_open_refuses_kinds_the_build_lacks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

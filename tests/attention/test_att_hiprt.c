/* The HIP backend's runtime table against Debian's libamdhip64: this program links the library
 * directly, so the build fails if any function attnd resolves at run time is missing from it or
 * has another type than the table's (a table initialized from the linked functions, -Werror);
 * then att_hiprt's dlopen must find the same library and the same functions. Without an AMD GPU
 * (CI), the backend must refuse to start with a message that says so. Label: unit. */
#include "tests/test_util.h"

#include <stdio.h>
#include <string.h>

#include "attention/att_hip.h"
#include "attention/att_hiprt.h"

#define LINKED_(f) .f = f,
static const att_hiprt_t k_linked = {ATT_HIPRT_FUNCS(LINKED_) ATT_HIPRTC_FUNCS(LINKED_)};

static void test_att_hiprt_loads_the_linked_functions(void **state) {
    (void)state;
    if (getenv("ATTND_HIP_LIB") != NULL) {
        printf("SKIP: ATTND_HIP_LIB names another library\n");
        skip();
    }
    const att_hiprt_t *rt = NULL;
    at_diag_t d = {{0}};
    TU_CHECK(att_hiprt_rtc(&rt, &d) == AT_OK, "att_hiprt_rtc: %s", d.msg);
#define SAME_(f) TU_CHECK(rt->f == k_linked.f, "%s: dlopen found another function", #f);
    ATT_HIPRT_FUNCS(SAME_)
    ATT_HIPRTC_FUNCS(SAME_)
    TU_CHECK(rt->runtime_version > 0, "runtime version %d", rt->runtime_version);
}

static void test_att_hip_without_a_gpu_says_so(void **state) {
    (void)state;
    int n = 0;
    if (getenv("ATTND_HIP_LIB") != NULL ||
        (k_linked.hipGetDeviceCount(&n) == hipSuccess && n > 0)) {
        printf("SKIP: this machine has a HIP device\n");
        skip();
    }
    at_diag_t d = {{0}};
    TU_CHECK(att_hip_device_count(&d) == 0, "devices without a GPU");
    TU_CHECK(d.msg[0] != '\0', "no reason given");
    att_backend_t *be = NULL;
    att_hip_cfg_t cfg = {.device = 0, .kernel_cache_dir = ""};
    at_diag_t d2 = {{0}};
    TU_CHECK(att_hip_create(&cfg, &d2, &be) == AT_ERR_UNSUPPORTED, "create without a GPU");
    TU_CHECK(be == NULL, "a backend without a GPU");
    TU_CHECK(strstr(d2.msg, "AMD GPU") != NULL || strstr(d2.msg, "hip:0") != NULL,
             "the message names the missing GPU: %s", d2.msg);
    printf("without a GPU: %s\n", d2.msg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_hiprt_loads_the_linked_functions),
        cmocka_unit_test(test_att_hip_without_a_gpu_says_so),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The kernels of device-launched calls (attention/kernels/att_launch.cu, attention/att_cudl.h)
 * compile with NVRTC for sm_80 and sm_90 with relocatable device code, and their PTX has the
 * two entry points, the device runtime's graph calls (the driver's linker resolves them from
 * libcudadevrt.a, which must be where attnd looks for it) and the read of the current graph.
 * NVRTC needs no GPU, so this runs in CI; without libnvrtc, or without the toolkit's device
 * runtime library, it skips with a line saying so. Label: unit. */
#include "tests/test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attention/att_cudl.h"

static void test_att_cudl_launcher_compiles(void **state) {
    (void)state;
    static const char *const archs[] = {"sm_80", "sm_90"};
    static const char *const wanted[] = {
        ".entry att_k_launcher",         ".entry att_k_copy", "cudaGraphKernelNodeSetParam",
        "cudaGraphKernelNodeSetGridDim", "cudaGraphLaunch",   "%current_graph_exec"};
    for (size_t a = 0; a < sizeof archs / sizeof archs[0]; a++) {
        char *ptx = NULL;
        size_t n = 0;
        at_diag_t d = {{0}};
        const at_err_t e = att_cudl_compile_ptx(archs[a], &ptx, &n, &d);
        if (e == AT_ERR_UNSUPPORTED && strstr(d.msg, "no NVRTC") != NULL) {
            printf("SKIP: %s\n", d.msg);
            skip();
        }
        TU_CHECK(e == AT_OK, "%s: %s (%s)", archs[a], at_err_name(e), d.msg);
        TU_CHECK(n > 0 && ptx[n - 1] == '\0', "%s: the PTX is not a string", archs[a]);
        for (size_t w = 0; w < sizeof wanted / sizeof wanted[0]; w++)
            TU_CHECK(strstr(ptx, wanted[w]) != NULL, "%s: the PTX lacks %s", archs[a], wanted[w]);
        free(ptx);
    }
}

static void test_att_cudl_device_runtime_is_found(void **state) {
    (void)state;
    const char *p = att_cudl_devrt_path();
    if (access(p, R_OK) != 0) {
        printf("SKIP: no device runtime library at %s (calls launch from the host there)\n", p);
        skip();
    }
    FILE *f = fopen(p, "rb");
    char magic[8] = {0};
    TU_CHECK(f != NULL && fread(magic, 1, sizeof magic, f) == sizeof magic, "cannot read %s", p);
    fclose(f);
    TU_CHECK(memcmp(magic, "!<arch>\n", 8) == 0, "%s is not an archive", p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_cudl_launcher_compiles),
        cmocka_unit_test(test_att_cudl_device_runtime_is_found),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

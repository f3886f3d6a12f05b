/* The kernels of device-launched calls (attention/kernels/att_launch.cu, attention/att_cudl.h)
 * compile with NVRTC for sm_80 and sm_90 with relocatable device code, and their PTX has the
 * two entry points, the device runtime's graph calls (the driver's linker resolves them from
 * libcudadevrt.a, which must be where attnd looks for it) and the read of the current graph.
 * NVRTC needs no GPU, so this runs in CI; without libnvrtc, or without the toolkit's device
 * runtime library, it skips with a line saying so. And the copy nodes' ranges and grids, which
 * need no GPU at all: adjacent ranges join, the last free range is used and no more, and the
 * grid follows the bytes within its bounds. Label: unit. */
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

static void test_att_cudl_ranges_join_and_fill(void **state) {
    (void)state;
    att_dl_copy_t c;
    memset(&c, 0, sizeof c);
    TU_CHECK(att_cudl_range_add(&c, 0x1000, 0x9000, 0), "0 bytes");
    TU_CHECK(c.n == 0, "0 bytes made a range");
    TU_CHECK(att_cudl_range_add(&c, 0x1000, 0x9000, 256), "first range");
    /* adjacent on both sides: joins */
    TU_CHECK(att_cudl_range_add(&c, 0x1100, 0x9100, 64), "adjacent range");
    TU_CHECK(c.n == 1 && c.bytes[0] == 320, "adjacent ranges did not join: n %u bytes %llu", c.n,
             (unsigned long long)c.bytes[0]);
    /* adjacent on one side only: a new range */
    TU_CHECK(att_cudl_range_add(&c, 0x1140, 0xa000, 16), "source elsewhere");
    TU_CHECK(att_cudl_range_add(&c, 0x5000, 0xa010, 16), "destination elsewhere");
    TU_CHECK(c.n == 3, "one-sided neighbours joined: n %u", c.n);
    for (uint64_t i = c.n; i < ATT_DL_MAX_SEGS; i++)
        TU_CHECK(att_cudl_range_add(&c, 0x100000 * (i + 1), 0x200000 * (i + 1), 32), "range %llu",
                 (unsigned long long)i);
    TU_CHECK(c.n == ATT_DL_MAX_SEGS, "n %u", c.n);
    att_dl_copy_t before = c;
    TU_CHECK(!att_cudl_range_add(&c, 0x7000000, 0x8000000, 32), "a range past the last fit");
    TU_CHECK(memcmp(&before, &c, sizeof c) == 0, "a refused range changed the ranges");
    /* the last range still grows when the next one is adjacent to it */
    const uint32_t k = ATT_DL_MAX_SEGS - 1;
    TU_CHECK(att_cudl_range_add(&c, c.dst_d[k] + c.bytes[k], c.src_d[k] + c.bytes[k], 32),
             "adjacent to the last range");
    TU_CHECK(c.n == ATT_DL_MAX_SEGS && c.bytes[k] == 64, "the last range did not grow");
}

static void test_att_cudl_copy_grid_follows_the_bytes(void **state) {
    (void)state;
    att_dl_copy_t c;
    memset(&c, 0, sizeof c);
    TU_CHECK(att_cudl_copy_grid(&c, 132) == 1, "no bytes: one block (it may report the job done)");
    TU_CHECK(att_cudl_range_add(&c, 0, 1u << 20, 16), "range");
    TU_CHECK(att_cudl_copy_grid(&c, 132) == 1, "16 bytes: one block");
    memset(&c, 0, sizeof c);
    const uint64_t per_block = 16ull * ATT_CUDL_COPY_THREADS;
    TU_CHECK(att_cudl_range_add(&c, 0, 1ull << 30, 10 * per_block), "range");
    TU_CHECK(att_cudl_copy_grid(&c, 132) == 10, "10 blocks' bytes: %u",
             att_cudl_copy_grid(&c, 132));
    TU_CHECK(att_cudl_range_add(&c, 1ull << 40, 1ull << 41, 1ull << 30), "range");
    TU_CHECK(att_cudl_copy_grid(&c, 132) == 4 * 132, "1 GiB: %u blocks, not 4 per SM",
             att_cudl_copy_grid(&c, 132));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_cudl_ranges_join_and_fill),
        cmocka_unit_test(test_att_cudl_copy_grid_follows_the_bytes),
        cmocka_unit_test(test_att_cudl_launcher_compiles),
        cmocka_unit_test(test_att_cudl_device_runtime_is_found),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

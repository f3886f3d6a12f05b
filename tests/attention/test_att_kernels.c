/* Every model variant family of the attention kernels compiles with NVRTC, for sm_80 and sm_90,
 * in both tile kinds of the default plan (att_cuda_plan_default, for sm_80's 163 KiB of shared
 * memory per block), and every tile of the candidate set below (what the bench sweeps and a
 * tuner may pick) for the Llama shape: head_dim {24, 64, 80, 128, 256} x dtype {f32, f16, bf16},
 * bf16 for every GQA group {1, 4, 8, MQA} (f32 and f16 at group 4: only the MMA instruction and the
 * conversions differ between f16 and bf16, and f32 ignores the group), every block size
 * from 8 to 256, and each feature flag (window, soft cap, ALiBi, sinks) alone and all together.
 * NVRTC needs no GPU, so this runs in CI; without libnvrtc it skips with a line saying so.
 * The compiles run on every CPU (att_jit is thread-safe); failures are collected and reported
 * from the test thread. Label: slow (a few minutes on 2 cores).
 *
 * ATTND_KERNEL_VARIANTS=few compiles only the default plan of the Llama shape in each dtype for
 * sm_90: the sanitizer builds set it, since NVRTC itself is not instrumented and the full set
 * there would only repeat the release build's compiles at a fraction of the speed.
 *
 * Built twice: with ATT_TEST_HIP it is test_att_hip_kernels, the same variants (tiles of
 * att_hip_plan_default and the same candidates) with the HIP backend's options
 * (att_hip_model_opts: ATT_PORTABLE_MATH, the wave size) for three targets: gfx90a by hiprtc in
 * this process (the runtime's own path, wave 64); gfx940 by hipcc (clang, offline: this
 * toolchain's hiprtc crashes on gfx940, and it knows no gfx942), wave 64; and sm_90 by NVRTC with
 * wave 32, which is what the HIP test double runs on an NVIDIA GPU. A target whose compiler is
 * missing skips with a line. `few` keeps all three targets. */
#include "tests/test_util.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "attention/att_cuda.h"
#include "attention/att_jit.h"
#include "attention/att_model.h"
#ifdef ATT_TEST_HIP
#include "attention/att_hip.h"
#endif

#define MAX_JOBS 1024

/* Where a variant is compiled: an architecture with a compiler (att_jit's, or hipcc when jit is
 * NULL) and the options of a backend. */
typedef struct target {
    const char *arch;
    att_jit_t *jit; /* NULL: hipcc */
    uint32_t wave;  /* 0: the CUDA backend's options, else the HIP backend's with this wave */
} target_t;

typedef struct job {
    att_model_t *m;
    att_tile_t tile;
    const target_t *target;
    at_err_t err;
    at_diag_t diag;
    char desc[128];
} job_t;

static job_t g_jobs[MAX_JOBS];
static uint32_t g_num_jobs;
static atomic_uint g_next;
static target_t g_targets[3];
static uint32_t g_num_targets;
static bool g_few; /* ATTND_KERNEL_VARIANTS=few */
#ifdef ATT_TEST_HIP
static char g_src_dir[64]; /* the embedded source, written out for hipcc */
#endif

/* Tiles besides the default plan's (warps_m, warp_mt, warps_n, tile_k, stages). */
static const att_tile_t k_candidates[] = {
    {4, 1, 1, 64, 2}, {4, 1, 1, 64, 3}, {8, 1, 1, 64, 2}, {4, 2, 1, 64, 3},
    {4, 2, 1, 32, 3}, {8, 2, 1, 32, 2}, {1, 1, 4, 64, 3}, {1, 1, 4, 64, 4},
};

static void add_model(att_dtype_t dt, uint32_t hq, uint32_t hkv, uint32_t d, uint32_t block,
                      unsigned feats, bool with_candidates) {
    static const float slopes[64] = {0.5f};
    static const float sinks[64] = {1.0f};
    uint32_t windows[2] = {0, 32};
    att_model_cfg_t c = {
        .num_layers = 2,
        .num_query_heads = hq,
        .num_kv_heads = hkv,
        .head_dim = d,
        .dtype = dt,
        .block_size = block,
    };
    if (feats & 1) {
        c.layer_sliding_window = windows;
        c.n_layer_sliding_window = 2;
    }
    if (feats & 2)
        c.logits_soft_cap = 30.0f;
    if (feats & 4) {
        c.alibi_slopes = slopes;
        c.n_alibi_slopes = hq;
    }
    if (feats & 8) {
        c.sinks = sinks;
        c.n_sinks = hq;
    }
    att_tile_t tiles[ATT_TILE_KINDS + 8];
    uint32_t nt = 0;
    {
        att_model_t *m;
        at_diag_t diag = {{0}};
        assert_int_equal(att_model_create(&c, &diag, &m), AT_OK);
        att_cuda_plan_t pl;
#ifdef ATT_TEST_HIP
        att_hip_plan_default(m, &pl);
#else
        att_cuda_plan_default(m, 163u * 1024u, &pl);
#endif
        for (int k = 0; k < ATT_TILE_KINDS; k++)
            tiles[nt++] = pl.tile[k];
        att_model_destroy(&m);
    }
    if (with_candidates)
        for (uint32_t i = 0; i < sizeof k_candidates / sizeof k_candidates[0]; i++)
            tiles[nt++] = k_candidates[i];
    for (uint32_t k = 0; k < nt; k++)
        for (uint32_t a = 0; a < g_num_targets; a++) {
            assert_true(g_num_jobs < MAX_JOBS);
            job_t *j = &g_jobs[g_num_jobs++];
            at_diag_t diag = {{0}};
            at_err_t e = att_model_create(&c, &diag, &j->m);
            assert_int_equal(e, AT_OK);
            j->tile = tiles[k];
            j->target = &g_targets[a];
            snprintf(j->desc, sizeof j->desc,
                     "%s Hq%u/Hkv%u D%u B%u feats %x tile %ux%ux%ux%ux%u %s", att_dtype_name(dt),
                     hq, hkv, d, block, feats, tiles[k].warps_m, tiles[k].warp_mt, tiles[k].warps_n,
                     tiles[k].tile_k, tiles[k].stages, g_targets[a].arch);
        }
}

#ifdef ATT_TEST_HIP
/* Writes the embedded kernel source and its headers under g_src_dir, as the source includes
 * them, so hipcc compiles exactly what hiprtc does. */
static void write_source(void) {
    snprintf(g_src_dir, sizeof g_src_dir, "/tmp/attnd-hipk-XXXXXX");
    assert_non_null(mkdtemp(g_src_dir));
    att_jit_source_t src;
    att_jit_kernel_source(&src);
    const char *names[3] = {src.name, src.header_names[0], src.header_names[1]};
    const char *texts[3] = {src.text, src.headers[0], src.headers[1]};
    char path[256];
    snprintf(path, sizeof path, "mkdir -p %s/attention/kernels", g_src_dir);
    assert_int_equal(system(path), 0);
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", g_src_dir, names[i]);
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        assert_int_equal(fputs(texts[i], f) >= 0, 1);
        assert_int_equal(fclose(f), 0);
    }
}

/* hipcc --genco for the job's target with the HIP backend's options. */
static at_err_t hipcc_compile(const job_t *j, const att_jit_opts_t *o, at_diag_t *diag) {
    char cmd[2048], out[128];
    snprintf(out, sizeof out, "%s/v%u.co", g_src_dir, (unsigned)(j - g_jobs));
    int k = snprintf(cmd, sizeof cmd, "%s --offload-arch=%s --genco -I%s -o %s", AT_HIPCC,
                     j->target->arch, g_src_dir, out);
    for (uint32_t i = 0; i < o->n && k > 0 && (size_t)k < sizeof cmd; i++)
        k += snprintf(cmd + k, sizeof cmd - (size_t)k, " %s", o->ptr[i]);
    if (k <= 0 || (size_t)k >= sizeof cmd - 64)
        return at_diag_set(diag, AT_ERR_INTERNAL, "hipcc command too long");
    snprintf(cmd + k, sizeof cmd - (size_t)k, " -x hip %s/att_unified.cu 2>&1", g_src_dir);
    FILE *p = popen(cmd, "r");
    if (p == NULL)
        return at_diag_set(diag, AT_ERR_INTERNAL, "cannot run hipcc");
    char line[256], first[256] = "";
    while (fgets(line, sizeof line, p) != NULL)
        if (first[0] == '\0' && strstr(line, "error") != NULL)
            snprintf(first, sizeof first, "%s", line);
    const int rc = pclose(p);
    struct stat st;
    if (rc != 0 || stat(out, &st) != 0 || st.st_size < 1024)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED, "hipcc failed (%d): %s", rc, first);
    unlink(out);
    return AT_OK;
}
#endif

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        uint32_t i = atomic_fetch_add_explicit(&g_next, 1, memory_order_relaxed);
        if (i >= g_num_jobs)
            return NULL;
        job_t *j = &g_jobs[i];
        att_jit_opts_t o;
#ifdef ATT_TEST_HIP
        att_hip_model_opts(j->m, &j->tile, j->target->wave, &o);
        if (j->target->jit == NULL) {
            j->err = hipcc_compile(j, &o, &j->diag);
            continue;
        }
#else
        att_jit_model_opts(j->m, &j->tile, &o);
#endif
        const void *img;
        size_t n;
        j->err =
            att_jit_image(j->target->jit, j->target->arch, o.ptr, o.n, &img, &n, NULL, &j->diag);
        if (j->err == AT_OK && n < 1024)
            j->err = AT_ERR_INTERNAL; /* an image that small cannot hold three kernels */
    }
}

/* Compiles every job on up to 8 threads, reports each failure, frees the models and the jit. */
static void run_jobs(void) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    uint32_t nthreads = ncpu > 1 ? (uint32_t)(ncpu > 8 ? 8 : ncpu) : 1;
    pthread_t tids[8];
    for (uint32_t t = 0; t < nthreads; t++)
        assert_int_equal(pthread_create(&tids[t], NULL, worker, NULL), 0);
    for (uint32_t t = 0; t < nthreads; t++)
        pthread_join(tids[t], NULL);

    uint32_t bad = 0;
    for (uint32_t i = 0; i < g_num_jobs; i++) {
        if (g_jobs[i].err != AT_OK) {
            printf("FAIL %s: %s %s\n", g_jobs[i].desc, at_err_name(g_jobs[i].err),
                   g_jobs[i].diag.msg);
            bad++;
        }
        att_model_destroy(&g_jobs[i].m);
    }
    printf("%u variants compiled\n", g_num_jobs);
    for (uint32_t t = 0; t < g_num_targets; t++) {
        if (g_targets[t].jit == NULL) {
            printf("  %s: hipcc\n", g_targets[t].arch);
            continue;
        }
        att_jit_stats_t st;
        att_jit_get_stats(g_targets[t].jit, &st);
        printf("  %s: %llu compiler runs, %.1f s of compile time\n", g_targets[t].arch,
               (unsigned long long)st.compiles, (double)st.compile_ns / 1e9);
        att_jit_destroy(&g_targets[t].jit);
    }
#ifdef ATT_TEST_HIP
    if (g_src_dir[0] != '\0') {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", g_src_dir);
        assert_int_equal(system(cmd), 0);
    }
#endif
    assert_int_equal(bad, 0);
}

/* The targets this build compiles for; skips when there is none. */
static void make_targets(void) {
    const char *few = getenv("ATTND_KERNEL_VARIANTS");
    g_few = few != NULL && strcmp(few, "few") == 0;
    at_diag_t diag = {{0}};
    att_jit_t *jit = NULL;
#ifdef ATT_TEST_HIP
    at_err_t e = att_hip_jit_create(NULL, &diag, &jit);
    if (e == AT_OK)
        g_targets[g_num_targets++] = (target_t){"gfx90a", jit, 64};
    else
        printf("SKIP gfx90a: no hiprtc (%s)\n", diag.msg);
#ifdef AT_HIPCC
    write_source();
    g_targets[g_num_targets++] = (target_t){"gfx940", NULL, 64};
#else
    printf("SKIP gfx940: no hipcc at build time\n");
#endif
#ifdef AT_HAVE_CUDA
    if ((e = att_jit_create(NULL, &diag, &jit)) == AT_OK)
        g_targets[g_num_targets++] = (target_t){"sm_90", jit, 32};
    else
        printf("SKIP sm_90 (the test double's path): no NVRTC (%s)\n", diag.msg);
#endif
#else
    static const char *const archs[] = {"sm_80", "sm_90"};
    for (int a = g_few ? 1 : 0; a < 2; a++) {
        if (att_jit_create(NULL, &diag, &jit) != AT_OK) {
            printf("SKIP: no NVRTC on this machine (%s)\n", diag.msg);
            break;
        }
        g_targets[g_num_targets++] = (target_t){archs[a], jit, 0};
    }
#endif
    if (g_num_targets == 0)
        skip();
}

static void test_att_kernels_compile_every_variant(void **state) {
    (void)state;
    make_targets();
    static const att_dtype_t dts[] = {ATT_DTYPE_F32, ATT_DTYPE_F16, ATT_DTYPE_BF16};
    if (g_few) {
        for (int a = 0; a < 3; a++)
            add_model(dts[a], 32, 8, 128, 16, 0, false);
        run_jobs();
        return;
    }
    static const uint32_t dims[] = {24, 64, 80, 128, 256};
    static const uint32_t groups[][2] = {{4, 4}, {8, 2}, {16, 2}, {6, 1}};
    for (int a = 0; a < 3; a++)
        for (int d = 0; d < 5; d++)
            for (int g = 0; g < 4; g++) {
                /* f32 does not depend on the group; f16 differs from bf16 only in two
                 * instructions, so one group covers it */
                if (dts[a] != ATT_DTYPE_BF16 && g != 1)
                    continue;
                add_model(dts[a], groups[g][0], groups[g][1], dims[d], 16, 0,
                          dts[a] == ATT_DTYPE_BF16 && g == 1 && dims[d] == 128);
            }
    for (uint32_t b = 8; b <= 256; b *= 2)
        if (b != 16)
            add_model(ATT_DTYPE_BF16, 32, 8, 128, b, 0, false);
    for (unsigned f = 1; f <= 8; f <<= 1) {
        add_model(ATT_DTYPE_F16, 8, 2, 128, 16, f, false);
        add_model(ATT_DTYPE_BF16, 16, 2, 64, 32, f, false);
    }
    add_model(ATT_DTYPE_F16, 8, 2, 128, 16, 15, false);
    add_model(ATT_DTYPE_BF16, 16, 2, 64, 32, 15, false);
    add_model(ATT_DTYPE_F32, 8, 2, 80, 16, 15, false);

    run_jobs();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_kernels_compile_every_variant),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Every model variant family of the attention kernels compiles with NVRTC, for sm_80 and sm_90,
 * in both tile kinds of the default plans (att_cuda_plan_default, for sm_80's 163 KiB of shared
 * memory per block, and for sm_90's 227 KiB: the sm_90a wgmma wide tile, compiled for sm_90a, for
 * f16/bf16 at head_dim 64 and 128, with every feature flag), and every tile of the candidate set
 * below (what the bench sweeps and a tuner may pick) for the Llama shape: head_dim
 * {24, 64, 80, 128, 256} x dtype {f32, f16, bf16}, bf16 for every GQA group {1, 4, 8, MQA} (f32
 * and f16 at group 4: only the MMA instruction and the conversions differ between f16 and bf16,
 * and f32 ignores the group), every block size
 * from 8 to 256, and each feature flag (window, soft cap, ALiBi, sinks) alone and all together.
 * Each image's att_k_info (read from the cubin's ELF, no GPU needed) must agree with the host's
 * figures: rows, keys and threads of the tile, and the shared memory of att_jit_tile_smem.
 *
 * The CUDA tuning space (tun_space_cuda_unified) for two model shapes on an sm_90 device with
 * 227 KiB of shared memory: every tile of the first stage of a decode search (and for the Llama
 * shape, of a prefill search) and of a deterministic sample of the space's configs, mapped as att_cuda maps them
 * (att_cuda_plan_from_cfg), compiles; tiles the space refuses for the kernel's static_asserts
 * do not compile; tiles it refuses for shared memory alone compile with more than the device
 * allows (register-estimate refusals are pruning, not correctness, and are not compiled).
 *
 * NVRTC needs no GPU, so this runs in CI; without libnvrtc it skips with a line saying so.
 * The compiles run on every CPU (att_jit is thread-safe); failures are collected and reported
 * from the test thread. Label: slow (a few minutes on 2 cores).
 *
 * ATTND_KERNEL_VARIANTS=few compiles only the default plan of the Llama shape in each dtype for
 * sm_90, and of the space a handful per shape: the sanitizer builds set it, since NVRTC itself
 * is not instrumented and the full set there would only repeat the release build's compiles at a
 * fraction of the speed.
 *
 * Built twice: with ATT_TEST_HIP it is test_att_hip_kernels, the same model variants (tiles of
 * att_hip_plan_default and the same candidates) with the HIP backend's options
 * (att_hip_model_opts: ATT_PORTABLE_MATH, the wave size) for three targets: gfx90a by hiprtc in
 * this process (the runtime's own path, wave 64); gfx940 by hipcc (clang, offline: this
 * toolchain's hiprtc crashes on gfx940, and it knows no gfx942), wave 64; and sm_90 by NVRTC with
 * wave 32, which is what the HIP test double runs on an NVIDIA GPU. A target whose compiler is
 * missing skips with a line. `few` keeps all three targets.
 *
 * And the HIP tuning space (tun_space_hip_unified): its heuristic is att_hip_plan_default (the
 * tiles the HIP suite runs by default) for a few shapes; every config of the first stage of a
 * decode and of a prefill search, mapped as att_hip maps them (att_hip_plan_from_cfg), compiles
 * by hiprtc for gfx90a and by NVRTC with wave 32, and its att_k_info has the config's rows and
 * waves. `few`: three configs of the decode stage. */
#include "tests/test_util.h"

#include <elf.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "attention/att_cuda.h"
#include "attention/att_jit.h"
#include "attention/att_kparams.h"
#include "attention/att_model.h"
#include "attention/att_tune.h"
#ifdef ATT_TEST_HIP
#include "attention/att_hip.h"
#endif
#include "tuning/tun.h"
#include "tuning/tun_search.h"

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
    bool must_fail;                 /* the kernel's static_asserts refuse the tile */
    at_err_t err;
    at_diag_t diag;
    uint32_t info[ATT_KINFO_COUNT]; /* the image's att_k_info */
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

/* Tiles besides the default plan's (warps_m, warp_mt, warps_n, tile_k, stages, mma); the
 * wgmma ones (mma 1) are compiled for the CUDA build's sm_90 target only (they build for sm_90a
 * alone, and not with the HIP backend's portable body). */
static const att_tile_t k_candidates[] = {
    {4, 1, 1, 64, 2, 0},  {4, 1, 1, 64, 3, 0},  {8, 1, 1, 64, 2, 0}, {4, 2, 1, 64, 3, 0},
    {4, 2, 1, 32, 3, 0},  {8, 2, 1, 32, 2, 0},  {1, 1, 4, 64, 3, 0}, {1, 1, 4, 64, 4, 0},
    {8, 1, 1, 64, 2, 1},  {8, 1, 1, 64, 4, 1},  {4, 1, 1, 64, 4, 1}, {4, 1, 1, 128, 3, 1},
    {8, 1, 1, 128, 2, 1},
};

/* Copies the initial value of the constant att_k_info out of a cubin (an ELF64 image: the
 * symbol's section holds it at the symbol's value). False when the image has no such symbol. */
static bool cubin_k_info(const uint8_t *img, size_t n, uint32_t info[ATT_KINFO_COUNT]) {
    Elf64_Ehdr eh;
    if (n < sizeof eh)
        return false;
    memcpy(&eh, img, sizeof eh);
    if (memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 ||
        eh.e_shentsize != sizeof(Elf64_Shdr) || eh.e_shoff + (uint64_t)eh.e_shnum * sizeof(Elf64_Shdr) > n)
        return false;
    Elf64_Shdr sh[256];
    if (eh.e_shnum > 256)
        return false;
    memcpy(sh, img + eh.e_shoff, eh.e_shnum * sizeof(Elf64_Shdr));
    for (uint32_t i = 0; i < eh.e_shnum; i++) {
        if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh.e_shnum ||
            sh[i].sh_offset + sh[i].sh_size > n)
            continue;
        const Elf64_Shdr *str = &sh[sh[i].sh_link];
        for (uint64_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); k++) {
            Elf64_Sym sym;
            memcpy(&sym, img + sh[i].sh_offset + k * sizeof sym, sizeof sym);
            if (sym.st_name >= str->sh_size || str->sh_offset + str->sh_size > n ||
                strncmp((const char *)img + str->sh_offset + sym.st_name, "att_k_info",
                        str->sh_size - sym.st_name) != 0)
                continue;
            if (sym.st_shndx == SHN_UNDEF || sym.st_shndx >= eh.e_shnum ||
                sh[sym.st_shndx].sh_type == SHT_NOBITS ||
                sym.st_size != ATT_KINFO_COUNT * sizeof(uint32_t))
                return false;
            const Elf64_Shdr *data = &sh[sym.st_shndx];
            const uint64_t off = data->sh_offset + sym.st_value - data->sh_addr;
            if (off + sym.st_size > n)
                return false;
            memcpy(info, img + off, sym.st_size);
            return true;
        }
    }
    return false;
}

/* Queues a compile of tile for model cfg c (a model of its own: jobs outlive the caller's). */
static void add_job(const att_model_cfg_t *c, const att_tile_t *tile, const target_t *target,
                    bool must_fail, const char *what) {
    assert_true(g_num_jobs < MAX_JOBS);
    job_t *j = &g_jobs[g_num_jobs++];
    memset(j, 0, sizeof *j);
    at_diag_t diag = {{0}};
    assert_int_equal(att_model_create(c, &diag, &j->m), AT_OK);
    j->tile = *tile;
    j->target = target;
    j->must_fail = must_fail;
    snprintf(j->desc, sizeof j->desc, "%s Hq%u/Hkv%u D%u B%u %s tile %ux%ux%ux%ux%u%s %s",
             att_dtype_name(c->dtype), c->num_query_heads, c->num_kv_heads, c->head_dim,
             c->block_size, what, tile->warps_m, tile->warp_mt, tile->warps_n, tile->tile_k,
             tile->stages, tile->mma == 1 ? " wgmma" : "", target->arch);
}

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
    enum { MAX_TILES = 2 * ATT_TILE_KINDS + sizeof k_candidates / sizeof k_candidates[0] };
    att_tile_t tiles[MAX_TILES];
    uint32_t nt = 0;
    {
        att_model_t *m;
        at_diag_t diag = {{0}};
        assert_int_equal(att_model_create(&c, &diag, &m), AT_OK);
        att_cuda_plan_t pl[2];
#ifdef ATT_TEST_HIP
        att_hip_plan_default(m, &pl[0]);
        pl[1] = pl[0];
#else
        /* sm_80's plan; sm_90's (an H200's shared memory) has the wgmma wide tile where the
         * model allows it */
        att_cuda_plan_default(m, "sm_80", 163u * 1024u, &pl[0]);
        att_cuda_plan_default(m, "sm_90", 227u * 1024u, &pl[1]);
#endif
        for (int p = 0; p < 2; p++)
            for (int k = 0; k < ATT_TILE_KINDS; k++) {
                bool dup = false;
                for (uint32_t i = 0; i < nt; i++)
                    dup = dup || memcmp(&tiles[i], &pl[p].tile[k], sizeof tiles[i]) == 0;
                if (!dup)
                    tiles[nt++] = pl[p].tile[k];
            }
        att_model_destroy(&m);
    }
    if (with_candidates)
        for (uint32_t i = 0; i < sizeof k_candidates / sizeof k_candidates[0]; i++)
            tiles[nt++] = k_candidates[i];
    char what[16];
    snprintf(what, sizeof what, "feats %x", feats);
    for (uint32_t k = 0; k < nt; k++)
        for (uint32_t a = 0; a < g_num_targets; a++)
            if (tiles[k].mma == 0 ||
                (g_targets[a].wave == 0 && strcmp(g_targets[a].arch, "sm_90") == 0))
                add_job(&c, &tiles[k], &g_targets[a], false, what);
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
        if (j->target->jit == NULL) { /* hipcc: its bundle is not checked for att_k_info */
            j->err = hipcc_compile(j, &o, &j->diag);
            continue;
        }
#else
        att_jit_model_opts(j->m, &j->tile, &o);
#endif
        void *img = NULL;
        size_t n;
        j->err = att_jit_image(j->target->jit, att_jit_opts_arch(&o, j->target->arch), o.ptr,
                               o.n, &img, &n, NULL, &j->diag);
        if (j->err == AT_OK && n < 1024)
            j->err = AT_ERR_INTERNAL; /* an image that small cannot hold three kernels */
        if (j->err == AT_OK && !cubin_k_info(img, n, j->info))
            j->err = at_diag_set(&j->diag, AT_ERR_INTERNAL, "no att_k_info in the image");
        free(img);
    }
}

/* The dynamic shared memory job j's kernel should ask for: the tensor-core body's
 * (att_jit_tile_smem); the portable FMA body of the HIP options uses none. */
static uint32_t job_smem(const job_t *j) {
    return j->target->wave != 0 ? 0 : att_jit_tile_smem(j->m, &j->tile);
}

/* Why job j's outcome is wrong, or NULL: a tile the kernel refuses must not compile; any other
 * must compile, and its att_k_info must agree with the host's figures for its tile (not checked
 * for hipcc's images). */
static const char *job_wrong(const job_t *j) {
    if (j->must_fail)
        return j->err == AT_ERR_UNSUPPORTED ? NULL : "compiled, but the kernel should refuse it";
    if (j->err != AT_OK)
        return at_err_name(j->err);
    if (j->target->jit == NULL)
        return NULL;
    const att_tile_t *t = &j->tile;
    const uint32_t wave = j->target->wave != 0 ? j->target->wave : 32;
    /* the wgmma body has a producer warpgroup besides the tile's warps */
    const uint32_t producer = t->mma == 1 ? 128 : 0;
    if (j->info[ATT_KINFO_TILE_ROWS] != 16 * t->warp_mt * t->warps_m ||
        j->info[ATT_KINFO_TILE_KEYS] != t->tile_k ||
        j->info[ATT_KINFO_THREADS] != wave * t->warps_m * t->warps_n + producer)
        return "att_k_info's rows, keys or threads differ from the tile's";
    if (j->info[ATT_KINFO_SMEM_BYTES] != job_smem(j))
        return "att_k_info's shared memory differs from the host's figure";
    return NULL;
}

/* Compiles every job on up to 8 threads, reports each wrong outcome, frees the models and the
 * jit, and empties the job list. */
static void run_jobs(void) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    uint32_t nthreads = ncpu > 1 ? (uint32_t)(ncpu > 8 ? 8 : ncpu) : 1;
    pthread_t tids[8];
    for (uint32_t t = 0; t < nthreads; t++)
        assert_int_equal(pthread_create(&tids[t], NULL, worker, NULL), 0);
    for (uint32_t t = 0; t < nthreads; t++)
        pthread_join(tids[t], NULL);

    uint32_t bad = 0, refused = 0;
    for (uint32_t i = 0; i < g_num_jobs; i++) {
        const char *why = job_wrong(&g_jobs[i]);
        if (why != NULL) {
            printf("FAIL %s: %s (%s: %s; smem %u, host %u)\n", g_jobs[i].desc, why,
                   at_err_name(g_jobs[i].err), g_jobs[i].diag.msg,
                   g_jobs[i].info[ATT_KINFO_SMEM_BYTES], job_smem(&g_jobs[i]));
            bad++;
        }
        refused += g_jobs[i].must_fail;
        att_model_destroy(&g_jobs[i].m);
    }
    printf("%u variants compiled, %u refused as they should be\n", g_num_jobs - refused, refused);
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
    g_num_targets = 0;
#ifdef ATT_TEST_HIP
    if (g_src_dir[0] != '\0') {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", g_src_dir);
        assert_int_equal(system(cmd), 0);
        g_src_dir[0] = '\0';
    }
#endif
    g_num_jobs = 0;
    atomic_store(&g_next, 0);
    assert_int_equal(bad, 0);
}

/* The targets this build compiles for (the CUDA build: sm_90 only, with sm_80 unless few, or
 * only_sm90); skips when there is none. */
static void targets_or_skip(bool only_sm90) {
    at_diag_t diag = {{0}};
    att_jit_t *jit = NULL;
    (void)only_sm90;
#ifdef ATT_TEST_HIP
    if (att_hip_jit_create(NULL, &diag, &jit) == AT_OK)
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
    if (att_jit_create(NULL, &diag, &jit) == AT_OK)
        g_targets[g_num_targets++] = (target_t){"sm_90", jit, 32};
    else
        printf("SKIP sm_90 (the test double's path): no NVRTC (%s)\n", diag.msg);
#endif
#else
    static const char *const archs[] = {"sm_80", "sm_90"};
    for (int a = g_few || only_sm90 ? 1 : 0; a < 2; a++) {
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
    targets_or_skip(false);
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

/* Tiles of one shape already queued: configs share most of their tiles. */
typedef struct tile_set {
    att_tile_t t[256];
    uint32_t n;
} tile_set_t;

/* Queues tile t of a space (unless seen already) for every target compiled in this process (the
 * CUDA build: sm_90 alone, targets_or_skip(true)). */
static void add_space_tile(const att_model_cfg_t *c, tile_set_t *seen, const att_tile_t *t,
                           bool must_fail, const char *what) {
    for (uint32_t i = 0; i < seen->n; i++)
        if (memcmp(&seen->t[i], t, sizeof *t) == 0)
            return;
    assert_true(seen->n < 256);
    seen->t[seen->n++] = *t;
    for (uint32_t a = 0; a < g_num_targets; a++)
        if (g_targets[a].jit != NULL)
            add_job(c, t, &g_targets[a], must_fail, what);
}

/* A backend's mapping of config cfg of its space to tiles, queued with add_space_tile. */
typedef void (*add_cfg_fn)(const att_model_cfg_t *c, tile_set_t *seen, const tun_shape_t *s,
                           const tun_device_t *d, const tun_cfg_t *cfg, const char *what);

/* The configs the first stage of a search of space for bucket b times (at most `limit`). */
static void add_first_stage(const tun_space_t *sp, add_cfg_fn add, const att_model_cfg_t *c,
                            tile_set_t *seen, const tun_shape_t *s, const tun_device_t *d,
                            const tun_bucket_t *b, uint32_t limit, const char *what) {
    tun_search_t *se = NULL;
    assert_int_equal(tun_search_create(sp, s, d, b, 1, &se), AT_OK);
    uint32_t stage = 99, n = 0;
    const tun_cfg_t *cfgs = NULL;
    assert_true(tun_search_stage(se, &stage, &cfgs, &n));
    assert_int_equal(stage, 0);
    TU_CHECK(n >= 4, "%s: the first stage times only %u configs", what, n);
    for (uint32_t i = 0; i < n && i < limit; i++)
        add(c, seen, s, d, &cfgs[i], what);
    tun_search_destroy(&se);
}

#ifndef ATT_TEST_HIP
/* ---- the CUDA tuning space ---- */

#define SPACE_SMEM (227u * 1024u) /* an H200's shared memory per block (opt-in) */
#define SPACE_SAMPLE 12u          /* configs sampled from a shape's whole space (few: 3) */


/* Both tiles of cfg, mapped as att_cuda maps a config. */
static void add_space_cfg(const att_model_cfg_t *c, tile_set_t *seen, const tun_shape_t *s,
                          const tun_device_t *d, const tun_cfg_t *cfg, const char *what) {
    char text[160];
    tun_cfg_format(&tun_space_cuda_unified, cfg, text, sizeof text);
    TU_CHECK(tun_cfg_valid(&tun_space_cuda_unified, cfg, s, d), "%s: %s is not valid", what,
             text);
    att_cuda_plan_t plan;
    att_cuda_plan_from_cfg(cfg, &plan);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        const att_tile_t *t = &plan.tile[k];
        const uint32_t smem =
            t->mma == 1 ? tun_cuda_wgmma_smem_bytes(s->head_dim, t->warps_m, t->tile_k, t->stages)
                        : tun_cuda_smem_bytes(s->head_dim, s->dtype, t->warps_m, t->warp_mt,
                                              t->warps_n, t->tile_k, t->stages);
        TU_CHECK(smem <= d->smem_bytes, "%s: %s takes more shared memory than the device has",
                 what, text);
        add_space_tile(c, seen, t, false, what);
    }
}

/* Tiles the kernel's static_asserts refuse (warps_m, warp_mt, warps_n, tile_k, stages); the
 * first two are narrow tiles the space can express. */
static const att_tile_t k_refused[] = {
    {1, 1, 4, 32, 2, 0}, /* 8 keys per warp: not whole k16 steps */
    {1, 1, 8, 64, 3, 0}, /* likewise */
    {1, 1, 3, 64, 2, 0}, /* tile_k not a multiple of warps_n */
    {4, 3, 1, 64, 2, 0}, /* warp_mt 3 */
    {8, 1, 4, 64, 2, 0}, /* 32 warps */
    {1, 1, 4, 64, 5, 0}, /* 5 stages */
};

/* Wide tiles the wgmma body refuses: the space refuses them too, and NVRTC does. */
static const att_tile_t k_wgmma_refused[] = {
    {8, 2, 1, 64, 3, 1}, /* two m16 tiles a warp */
    {8, 1, 1, 32, 3, 1}, /* 32 keys a stage */
    {2, 1, 1, 64, 2, 1}, /* half a warpgroup */
    {8, 1, 1, 64, 5, 1}, /* 5 stages */
};

/* The space's tiles for one shape: the first stage of a decode search (and of a prefill search
 * when with_prefill), a sample of the whole space, and tiles it refuses. */
static void add_space_shape(att_dtype_t dt, uint32_t hq, uint32_t hkv, uint32_t dim,
                            bool with_prefill, uint32_t *smem_refused) {
    const att_model_cfg_t c = {.num_layers = 1,
                               .num_query_heads = hq,
                               .num_kv_heads = hkv,
                               .head_dim = dim,
                               .dtype = dt,
                               .block_size = 16};
    att_model_t *m = NULL;
    at_diag_t diag = {{0}};
    assert_int_equal(att_model_create(&c, &diag, &m), AT_OK);
    tun_shape_t s;
    att_tune_shape(m, &s);
    att_model_destroy(&m);
    const tun_device_t d = {.backend = "cuda", .arch = "sm_90", .threads = 132,
                            .smem_bytes = SPACE_SMEM};
    const tun_device_t unlimited = {.backend = "cuda", .arch = "sm_90", .threads = 132};
    const tun_space_t *sp = &tun_space_cuda_unified;
    static tile_set_t seen;
    seen.n = 0;

    const tun_bucket_t decode = {.tokens = 6, .seqs = 6, .max_q = 0, .max_ctx = 12};
    const tun_bucket_t prefill = {.tokens = 11, .seqs = 1, .max_q = 11, .max_ctx = 11};
    const uint32_t limit = g_few ? 3 : UINT32_MAX;
    add_first_stage(&tun_space_cuda_unified, add_space_cfg, &c, &seen, &s, &d, &decode, limit,
                    "decode stage 0");
    if (with_prefill && !g_few)
        add_first_stage(&tun_space_cuda_unified, add_space_cfg, &c, &seen, &s, &d, &prefill,
                        limit, "prefill stage 0");
    tun_cfg_t *all = NULL;
    size_t n = 0;
    assert_int_equal(tun_space_enumerate(sp, &s, &d, &prefill, &all, &n), AT_OK);
    TU_CHECK(n > 100, "D%u: only %zu configs in the space", dim, n);
    const uint32_t sample = g_few ? 3 : SPACE_SAMPLE;
    for (uint32_t i = 0; i < sample; i++)
        add_space_cfg(&c, &seen, &s, &d, &all[(size_t)i * n / sample], "sampled");
    free(all);

    /* refused by the kernel's static_asserts: refused by the space too, and by NVRTC */
    tun_cfg_t h;
    sp->heuristic(&s, &d, &prefill, &h);
    const uint32_t n_refused = g_few ? 3 : (uint32_t)(sizeof k_refused / sizeof k_refused[0]);
    for (uint32_t i = 0; i < n_refused; i++) {
        const att_tile_t *t = &k_refused[i];
        TU_CHECK(!tun_cuda_tile_ok(&s, &unlimited, t->warps_m, t->warp_mt, t->warps_n,
                                   t->tile_k, t->stages),
                 "tile %ux%ux%ux%ux%u passes tun_cuda_tile_ok", t->warps_m, t->warp_mt,
                 t->warps_n, t->tile_k, t->stages);
        if (i < 2) {
            tun_cfg_t bad = h;
            bad.v[TUN_CUDA_NARROW_WARPS_N] = t->warps_n;
            bad.v[TUN_CUDA_NARROW_TILE_K] = t->tile_k;
            bad.v[TUN_CUDA_NARROW_STAGES] = t->stages;
            TU_CHECK(!tun_cfg_valid(sp, &bad, &s, &d), "the space takes narrow tile %u/%u",
                     t->warps_n, t->tile_k);
        }
        add_space_tile(&c, &seen, t, true, "refused");
    }
    for (uint32_t i = 0; i < (g_few ? 1u : sizeof k_wgmma_refused / sizeof k_wgmma_refused[0]);
         i++) {
        const att_tile_t *t = &k_wgmma_refused[i];
        TU_CHECK(!tun_cuda_wgmma_ok(&s, &unlimited, t->warps_m, t->warp_mt, t->tile_k,
                                    t->stages),
                 "wgmma tile %ux%ux%ux%ux%u passes tun_cuda_wgmma_ok", t->warps_m, t->warp_mt,
                 t->warps_n, t->tile_k, t->stages);
        add_space_tile(&c, &seen, t, true, "refused");
    }

    /* refused for shared memory alone (wide tiles of the space's values): they compile, and
     * run_jobs checks the kernel's own figure is the formula's, so above the device's too */
    uint32_t found = 0;
    for (uint32_t a = 0; a < sp->n_values[TUN_CUDA_WIDE_WARPS_M]; a++)
        for (uint32_t b = 0; b < sp->n_values[TUN_CUDA_WIDE_WARP_MT]; b++)
            for (uint32_t k = 0; k < sp->n_values[TUN_CUDA_WIDE_TILE_K]; k++)
                for (uint32_t st = 0; st < sp->n_values[TUN_CUDA_WIDE_STAGES]; st++) {
                    const att_tile_t t = {sp->values[TUN_CUDA_WIDE_WARPS_M][a],
                                          sp->values[TUN_CUDA_WIDE_WARP_MT][b], 1,
                                          sp->values[TUN_CUDA_WIDE_TILE_K][k],
                                          sp->values[TUN_CUDA_WIDE_STAGES][st], 0};
                    if (!tun_cuda_tile_ok(&s, &unlimited, t.warps_m, t.warp_mt, 1, t.tile_k,
                                          t.stages) ||
                        tun_cuda_tile_ok(&s, &d, t.warps_m, t.warp_mt, 1, t.tile_k, t.stages) ||
                        found == (g_few ? 1u : 4u))
                        continue;
                    tun_cfg_t big = h;
                    big.v[TUN_CUDA_WIDE_WARPS_M] = t.warps_m;
                    big.v[TUN_CUDA_WIDE_WARP_MT] = t.warp_mt;
                    big.v[TUN_CUDA_WIDE_TILE_K] = t.tile_k;
                    big.v[TUN_CUDA_WIDE_STAGES] = t.stages;
                    big.v[TUN_CUDA_WIDE_MMA] = 0;
                    TU_CHECK(!tun_cfg_valid(sp, &big, &s, &d), "the space takes a wide tile "
                             "beyond the device's shared memory");
                    TU_CHECK(tun_cuda_smem_bytes(s.head_dim, s.dtype, t.warps_m, t.warp_mt, 1,
                                                 t.tile_k, t.stages) > SPACE_SMEM,
                             "refused for shared memory, but the formula fits");
                    add_space_tile(&c, &seen, &t, false, "over smem");
                    found++;
                }
    *smem_refused += found;
}

static void test_att_kernels_tuning_space_tiles(void **state) {
    (void)state;
    targets_or_skip(true);
    tu_where_set("the CUDA tuning space");
    uint32_t smem_refused = 0;
    add_space_shape(ATT_DTYPE_BF16, 32, 8, 128, true, &smem_refused); /* Llama: group 4 */
    add_space_shape(ATT_DTYPE_F16, 8, 8, 64, false, &smem_refused);    /* group 1 */
    TU_CHECK(smem_refused >= 1, "no tile of either shape is refused for shared memory alone");
    run_jobs();
}
#else
/* ---- the HIP tuning space ---- */

/* A tiny model of cfg c's shape, as a tuning key. */
static void hip_shape(const att_model_cfg_t *c, tun_shape_t *s, att_cuda_plan_t *plan_default) {
    att_model_t *m = NULL;
    at_diag_t diag = {{0}};
    assert_int_equal(att_model_create(c, &diag, &m), AT_OK);
    att_tune_shape(m, s);
    att_hip_plan_default(m, plan_default);
    att_model_destroy(&m);
}

static void test_att_kernels_hip_space_heuristic_is_the_default(void **state) {
    (void)state;
    tu_where_set("the HIP space's heuristic");
    const tun_device_t d = {.backend = "hip", .arch = "gfx90a", .threads = 110,
                            .smem_bytes = 65536};
    static const uint32_t shapes[][3] = {{32, 8, 128}, {8, 8, 64}, {64, 8, 256}, {16, 2, 80}};
    static const tun_bucket_t buckets[] = {{6, 6, 0, 12}, {11, 1, 11, 11}, {10, 6, 9, 11}};
    for (uint32_t i = 0; i < 4; i++) {
        const att_model_cfg_t c = {.num_layers = 1,
                                   .num_query_heads = shapes[i][0],
                                   .num_kv_heads = shapes[i][1],
                                   .head_dim = shapes[i][2],
                                   .dtype = i == 1 ? ATT_DTYPE_F32 : ATT_DTYPE_BF16,
                                   .block_size = 16};
        tun_shape_t s;
        att_cuda_plan_t def;
        hip_shape(&c, &s, &def);
        /* the tiles the HIP suite has run by default: 16 rows on 4 waves, 64 rows on 8 */
        const att_tile_t narrow = {1, 1, 4, 64, 2, 0}, wide = {4, 1, 2, 64, 2, 0};
        TU_CHECK(memcmp(&def.tile[ATT_TILE_NARROW], &narrow, sizeof narrow) == 0 &&
                     memcmp(&def.tile[ATT_TILE_WIDE], &wide, sizeof wide) == 0,
                 "shape %u: the default tiles changed", i);
        TU_CHECK(def.min_split_keys == 256 && def.max_splits == TUN_CUDA_MAX_SPLITS &&
                     def.blocks_per_sm == ATT_CUDA_OCCUPANCY && def.mixed_split_keys == 512 &&
                     def.mixed_order == ATT_CUDA_WIDE_FIRST,
                 "shape %u: the default split knobs changed", i);
        for (uint32_t b = 0; b < 3; b++) {
            tun_cfg_t h;
            tun_space_hip_unified.heuristic(&s, &d, &buckets[b], &h);
            TU_CHECK(tun_cfg_valid(&tun_space_hip_unified, &h, &s, &d),
                     "shape %u: the heuristic is not a valid config", i);
            att_cuda_plan_t p;
            att_hip_plan_from_cfg(&h, &p);
            TU_CHECK(memcmp(&p, &def, sizeof p) == 0,
                     "shape %u, bucket %u: the heuristic's plan is not att_hip_plan_default", i,
                     b);
        }
    }
}

/* Both tiles of cfg, mapped as att_hip maps a config; they must have its rows and waves (run_jobs
 * checks each image's att_k_info against the tiles). */
static void add_hip_cfg(const att_model_cfg_t *c, tile_set_t *seen, const tun_shape_t *s,
                        const tun_device_t *d, const tun_cfg_t *cfg, const char *what) {
    char text[TUN_CFG_TEXT_MAX];
    tun_cfg_format(&tun_space_hip_unified, cfg, text, sizeof text);
    TU_CHECK(tun_cfg_valid(&tun_space_hip_unified, cfg, s, d), "%s: %s is not valid", what, text);
    att_cuda_plan_t plan;
    att_hip_plan_from_cfg(cfg, &plan);
    const att_tile_t *w = &plan.tile[ATT_TILE_WIDE], *nw = &plan.tile[ATT_TILE_NARROW];
    TU_CHECK(16 * w->warp_mt * w->warps_m == cfg->v[TUN_HIP_WIDE_ROWS] &&
                 w->warps_m * w->warps_n == cfg->v[TUN_HIP_WIDE_WAVES] &&
                 16 * nw->warp_mt * nw->warps_m == 16 &&
                 nw->warps_m * nw->warps_n == cfg->v[TUN_HIP_NARROW_WAVES],
             "%s: %s maps to other rows or waves", what, text);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        add_space_tile(c, seen, &plan.tile[k], false, what);
}

static void test_att_kernels_hip_space_tiles(void **state) {
    (void)state;
    targets_or_skip(false);
    tu_where_set("the HIP tuning space");
    const att_model_cfg_t c = {.num_layers = 1,
                               .num_query_heads = 32,
                               .num_kv_heads = 8,
                               .head_dim = 128,
                               .dtype = ATT_DTYPE_BF16,
                               .block_size = 16};
    tun_shape_t s;
    att_cuda_plan_t def;
    hip_shape(&c, &s, &def);
    const tun_device_t d = {.backend = "hip", .arch = "gfx90a", .threads = 110,
                            .smem_bytes = 65536};
    static tile_set_t seen;
    seen.n = 0;
    const tun_bucket_t decode = {.tokens = 6, .seqs = 6, .max_q = 0, .max_ctx = 12};
    const tun_bucket_t prefill = {.tokens = 11, .seqs = 1, .max_q = 11, .max_ctx = 11};
    add_first_stage(&tun_space_hip_unified, add_hip_cfg, &c, &seen, &s, &d, &decode,
                    g_few ? 3 : UINT32_MAX, "decode stage 0");
    if (!g_few)
        add_first_stage(&tun_space_hip_unified, add_hip_cfg, &c, &seen, &s, &d, &prefill,
                        UINT32_MAX, "prefill stage 0");
    run_jobs();
}
#endif

int main(void) {
    const char *few = getenv("ATTND_KERNEL_VARIANTS");
    g_few = few != NULL && strcmp(few, "few") == 0;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_kernels_compile_every_variant),
#ifdef ATT_TEST_HIP
        cmocka_unit_test(test_att_kernels_hip_space_heuristic_is_the_default),
        cmocka_unit_test(test_att_kernels_hip_space_tiles),
#else
        cmocka_unit_test(test_att_kernels_tuning_space_tiles),
#endif
    };
    /* ATTND_TEST_FILTER=pattern (cmocka's * and ?) runs a subset */
    const char *filter = getenv("ATTND_TEST_FILTER");
    if (filter != NULL && filter[0] != '\0')
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* `attnd bench-gpu`: the CUDA backend's attention against ceilings measured in the same run.
 *
 * Ceilings (own kernels, compiled here with NVRTC): read-only streaming bandwidth (16-byte loads,
 * a 4 GiB buffer, several times the L2) and device-to-device copy bandwidth (bytes read plus
 * bytes written), best of 5; the host time of a bare cuLaunchKernel of an empty kernel, back to
 * back (the driver's best case) and where a call launches (after an upload, on a synchronized
 * stream: what the attention launches are compared with). The bf16
 * matrix rate comes from torch (tools/gpu_torch_bench.py) and is passed in with --matmul-tflops.
 * Cases, through att_ctx on the CUDA backend (device time of a call's kernels from events, median
 * of the repeats): decode of 256 sequences at 1K and 8K context for the Llama-3.1-8B shape (Hq 32,
 * Hkv 8, D 128, block 16, bf16) and an 8-head D-64 model, each call a decode step (a token
 * appended to every sequence; the repeats' contexts centred on 1K or 8K); prefill 8 x 2048 causal
 * for both; a mixed batch of 63 decode sequences at 2K plus one 512-token chunk over 1536 tokens
 * of context, and its two parts alone (prefill and mixed calls roll their sequences back to the
 * same positions, so the shape stays).
 * Host time ("host us") is the call's launches through its launch cache; a call launched from the
 * device (attention/att_cudl.h: untimed calls of one launch or a partitioned mixed batch, as the
 * server makes them; column "from") has none, and its figure is the writing of the job record
 * and its number instead.
 * Thread: single-threaded. */
#include <inttypes.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention/att_ctx.h"
#include "attention/att_cuda.h"
#include "attention/att_cudrv.h"
#include "attention/att_kparams.h"
#include "bench/bench.h"

static const char k_ceiling_src[] =
    "extern \"C\" __global__ void empty(void) {}\n"
    "struct p160 { unsigned long long w[20]; };\n"
    "extern \"C\" __global__ void empty_p160(p160 p) { if (p.w[19] == 1) p.w[0] = 0; }\n"
    "extern \"C\" __global__ void read_only(const uint4 *p, unsigned long long n, uint4 *sink) {\n"
    "  uint4 acc = make_uint4(0, 0, 0, 0);\n"
    "  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;\n"
    "       i < n; i += (unsigned long long)gridDim.x * blockDim.x) {\n"
    "    uint4 v = __ldcs(p + i); acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w; }\n"
    "  if ((acc.x & acc.y & acc.z & acc.w) == 0x12345678u) sink[threadIdx.x] = acc;\n"
    "}\n"
    "extern \"C\" __global__ void spin(long long ns) {\n"
    "  long long t0; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t0));\n"
    "  for (long long t = t0; t - t0 < ns;) asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t));\n"
    "}\n"
    "extern \"C\" __global__ void copy(const uint4 *s, uint4 *d, unsigned long long n) {\n"
    "  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;\n"
    "       i < n; i += (unsigned long long)gridDim.x * blockDim.x) d[i] = __ldcs(s + i);\n"
    "}\n";

typedef struct gpu {
    const att_cudrv_t *drv;
    CUcontext ctx;
    CUdevice dev;
    CUmodule mod;
    CUfunction f_empty, f_empty_p160, f_read, f_copy, f_spin;
    int sms;
} gpu_t;

static int check(const gpu_t *g, CUresult r, const char *what) {
    if (r == CUDA_SUCCESS)
        return 0;
    fprintf(stderr, "bench-gpu: %s: %s\n", what, att_cudrv_err_name(g->drv, r));
    return -1;
}

#define CK(call) check(g, g->drv->call, #call)

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int gpu_init(gpu_t *g, const char *arch) {
    const att_nvrtc_t *nv;
    at_diag_t d = {{0}};
    if (att_cudrv_cuda(&g->drv, &d) != AT_OK || att_cudrv_nvrtc(&nv, &d) != AT_OK) {
        fprintf(stderr, "bench-gpu: %s\n", d.msg);
        return -1;
    }
    if (CK(cuDeviceGet(&g->dev, 0)) || CK(cuDevicePrimaryCtxRetain(&g->ctx, g->dev)) ||
        CK(cuCtxSetCurrent(g->ctx)) ||
        CK(cuDeviceGetAttribute(&g->sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, g->dev)))
        return -1;
    nvrtcProgram prog;
    char opt[48];
    snprintf(opt, sizeof opt, "--gpu-architecture=%s", arch);
    const char *opts[] = {opt};
    if (nv->nvrtcCreateProgram(&prog, k_ceiling_src, "ceil.cu", 0, NULL, NULL) != NVRTC_SUCCESS ||
        nv->nvrtcCompileProgram(prog, 1, opts) != NVRTC_SUCCESS) {
        fprintf(stderr, "bench-gpu: the ceiling kernels do not compile\n");
        return -1;
    }
    size_t n = 0;
    nv->nvrtcGetCUBINSize(prog, &n);
    void *img = malloc(n);
    nv->nvrtcGetCUBIN(prog, img);
    nv->nvrtcDestroyProgram(&prog);
    int rc = CK(cuModuleLoadData(&g->mod, img));
    free(img);
    if (rc || CK(cuModuleGetFunction(&g->f_empty, g->mod, "empty")) ||
        CK(cuModuleGetFunction(&g->f_empty_p160, g->mod, "empty_p160")) ||
        CK(cuModuleGetFunction(&g->f_read, g->mod, "read_only")) ||
        CK(cuModuleGetFunction(&g->f_copy, g->mod, "copy")) ||
        CK(cuModuleGetFunction(&g->f_spin, g->mod, "spin")))
        return -1;
    return 0;
}

typedef struct ceilings {
    double read_gbs;
    double copy_gbs;
    double empty_launch_ns;
    /* Median host time of one launch of an empty kernel with a 160-byte parameter block (the
     * attention kernels' att_kparams_t) on a non-blocking stream: back to back, after the stream
     * was synchronized, and where a call launches (after an upload from pinned memory as well). */
    double p160_b2b_ns, p160_synced_ns, call_launch_ns;
    double call_launch_smem_ns; /* the same with 80 KiB of dynamic shared memory, as a tile has */
    double call_launch_4_ns;    /* after the four uploads of a Llama decode call instead of one */
    double call_launch_4t_ns;   /* the same after writing 512 KiB on the host (a block table) */
    /* the four uploads' launch when the stream was synchronized after a kernel of 0.3 ms (a
     * Llama decode call at 1K) or 2 ms (at 8K), not an empty stream: the host waited that long */
    double call_launch_busy_ns[2];
} ceilings_t;

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median host time of a launch of the 160-byte empty kernel (ceilings_t), preceded by
 * `uploads` copies from pinned memory (1: a call's 16 KiB of metadata; 4: also the q, k and v of
 * the Llama decode case, 2 MiB, 512 KiB and 512 KiB), before them a host memcpy of `touch`
 * bytes into the pinned buffer (as a call writes its metadata into the stage), and before that
 * a kernel that keeps the GPU busy for busy_ns and a synchronize (as the previous call's), the
 * stream synchronized after each when `sync`. */
static int measure_launch(gpu_t *g, uint32_t uploads, bool sync, uint32_t smem, size_t touch,
                          long long busy_ns, double *ns) {
    enum { N = 1000 };
    static const size_t sizes[4] = {16 << 10, 2 << 20, 512 << 10, 512 << 10};
    const size_t total = sizes[0] + sizes[1] + sizes[2] + sizes[3];
    uint8_t *src = touch != 0 ? calloc(1, touch) : NULL;
    CUstream st = NULL;
    CUdeviceptr d = 0;
    void *h = NULL;
    double *t = calloc(N, sizeof *t);
    unsigned long long p[20] = {0};
    _Static_assert(sizeof p == sizeof(att_kparams_t), "the attention kernels' parameter block");
    void *args[] = {p};
    int rc = t == NULL || (touch != 0 && src == NULL) || touch > total ||
             CK(cuStreamCreate(&st, CU_STREAM_NON_BLOCKING)) || CK(cuMemAlloc(&d, total)) ||
             CK(cuMemHostAlloc(&h, total, 0));
    void *sargs[] = {&busy_ns};
    for (int i = -100; i < N && rc == 0; i++) {
        if (busy_ns != 0)
            rc = CK(cuLaunchKernel(g->f_spin, 1, 1, 1, 32, 1, 1, 0, st, sargs, NULL)) ||
                 CK(cuStreamSynchronize(st));
        if (touch != 0)
            memcpy(h, src, touch);
        size_t off = 0;
        for (uint32_t u = 0; u < uploads && rc == 0; off += sizes[u], u++)
            rc = CK(cuMemcpyHtoDAsync(d + off, (uint8_t *)h + off, sizes[u], st));
        const uint64_t t0 = now_ns();
        rc = rc || CK(cuLaunchKernel(g->f_empty_p160, 1, 1, 1, 32, 1, 1, smem, st, args, NULL));
        const uint64_t t1 = now_ns();
        rc = rc || (sync && CK(cuStreamSynchronize(st)));
        if (i >= 0)
            t[i] = (double)(t1 - t0);
    }
    rc = rc || CK(cuStreamSynchronize(st));
    if (rc == 0) {
        qsort(t, N, sizeof *t, cmp_double);
        *ns = t[N / 2];
    }
    if (h != NULL)
        CK(cuMemFreeHost(h));
    if (d != 0)
        CK(cuMemFree(d));
    if (st != NULL)
        CK(cuStreamDestroy(st));
    free(t);
    free(src);
    return rc ? -1 : 0;
}

static int measure_ceilings(gpu_t *g, ceilings_t *c) {
    const size_t bytes = (size_t)4 << 30;
    CUdeviceptr a = 0, b = 0, sink = 0;
    CUevent e0, e1;
    if (CK(cuCtxSetCurrent(g->ctx)) || CK(cuMemAlloc(&a, bytes)) || CK(cuMemAlloc(&b, bytes)) ||
        CK(cuMemAlloc(&sink, 1 << 16)) || CK(cuMemsetD8(a, 0x5a, bytes)) ||
        CK(cuEventCreate(&e0, CU_EVENT_DEFAULT)) || CK(cuEventCreate(&e1, CU_EVENT_DEFAULT)))
        return -1;
    unsigned long long n = bytes / 16;
    void *rargs[] = {&a, &n, &sink};
    void *cargs[] = {&a, &b, &n};
    const unsigned grid = (unsigned)g->sms * 8;
    c->read_gbs = c->copy_gbs = 0.0;
    for (int rep = 0; rep < 6; rep++) {
        float ms = 0.0f;
        if (CK(cuEventRecord(e0, NULL)) ||
            CK(cuLaunchKernel(g->f_read, grid, 1, 1, 512, 1, 1, 0, NULL, rargs, NULL)) ||
            CK(cuEventRecord(e1, NULL)) || CK(cuEventSynchronize(e1)) ||
            CK(cuEventElapsedTime(&ms, e0, e1)))
            return -1;
        if (rep > 0 && bytes / (ms * 1e6) > c->read_gbs)
            c->read_gbs = bytes / (ms * 1e6);
        if (CK(cuEventRecord(e0, NULL)) ||
            CK(cuLaunchKernel(g->f_copy, grid, 1, 1, 512, 1, 1, 0, NULL, cargs, NULL)) ||
            CK(cuEventRecord(e1, NULL)) || CK(cuEventSynchronize(e1)) ||
            CK(cuEventElapsedTime(&ms, e0, e1)))
            return -1;
        if (rep > 0 && 2.0 * bytes / (ms * 1e6) > c->copy_gbs)
            c->copy_gbs = 2.0 * bytes / (ms * 1e6);
    }
    /* host time of a bare launch: 20000 launches of an empty kernel, synchronized once */
    for (int i = 0; i < 100; i++)
        if (CK(cuLaunchKernel(g->f_empty, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL)))
            return -1;
    if (CK(cuCtxSynchronize()))
        return -1;
    const int launches = 20000;
    uint64_t t0 = now_ns();
    for (int i = 0; i < launches; i++)
        if (CK(cuLaunchKernel(g->f_empty, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL)))
            return -1;
    c->empty_launch_ns = (double)(now_ns() - t0) / launches;
    const int smem = 80 << 10;
    if (CK(cuCtxSynchronize()) || measure_launch(g, 0, false, 0, 0, 0, &c->p160_b2b_ns) ||
        measure_launch(g, 0, true, 0, 0, 0, &c->p160_synced_ns) ||
        measure_launch(g, 1, true, 0, 0, 0, &c->call_launch_ns) ||
        measure_launch(g, 4, true, 0, 0, 0, &c->call_launch_4_ns) ||
        measure_launch(g, 4, true, 0, 512 << 10, 0, &c->call_launch_4t_ns) ||
        measure_launch(g, 4, true, 0, 0, 300000, &c->call_launch_busy_ns[0]) ||
        measure_launch(g, 4, true, 0, 0, 2000000, &c->call_launch_busy_ns[1]) ||
        CK(cuFuncSetAttribute(g->f_empty_p160, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                              smem)) ||
        measure_launch(g, 1, true, (uint32_t)smem, 0, 0, &c->call_launch_smem_ns))
        return -1;
    CK(cuMemFree(a));
    CK(cuMemFree(b));
    CK(cuMemFree(sink));
    CK(cuEventDestroy(e0));
    CK(cuEventDestroy(e1));
    return 0;
}

/* ---- attention cases ---- */

typedef struct shape {
    const char *name;
    uint32_t hq, hkv, d;
} shape_t;

typedef struct result {
    char name[64];
    double device_ms;   /* median device time of a call's kernels */
    double call_ms;     /* median wall time of the whole call (uploads, kernels, download) */
    double kv_gb;       /* KV bytes the kernels must read */
    double tflop;       /* attention FLOPs (QK and PV, 2 per multiply-add), TFLOP */
    double host_us;     /* host time of the call's launches on a launch-cache hit, median */
    double host_mean_us;
    double enqueue_us;  /* host time from entry to the last launch (staging included), median */
    double host_p90_us; /* the 90th percentile of host_us's per-call times */
    uint64_t launches;  /* per call */
    double from_device; /* share of the calls launched from the device (attention/att_cudl.h) */
} result_t;

static uint8_t *g_pattern; /* random bytes, reused for every tensor */
#define PATTERN_BYTES (64u << 20)

static void pattern_init(void) {
    g_pattern = malloc(PATTERN_BYTES);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < PATTERN_BYTES; i += 2) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        /* bf16 with exponents near 1: |value| in [2^-3, 2) with a random sign and mantissa */
        uint16_t v = (uint16_t)(((x >> 16) & 0x807f) | ((0x7c + (x % 4)) << 7));
        memcpy(g_pattern + i, &v, 2);
    }
}

/* A tensor of n bytes: pattern bytes (n <= PATTERN_BYTES per use, wrapping at an offset). */
static void *tensor(size_t n, size_t salt) {
    uint8_t *p = malloc(n);
    for (size_t o = 0; o < n;) {
        size_t start = ((salt * 7919 + o) % (PATTERN_BYTES / 2)) & ~(size_t)1; /* whole elements */
        size_t len = n - o < PATTERN_BYTES / 2 ? n - o : PATTERN_BYTES / 2;
        memcpy(p + o, g_pattern + start, len);
        o += len;
    }
    return p;
}

/* Fills seqs sequences with ctx tokens each (append-only calls, a few at a time). */
static int fill_kv(att_ctx_t *ctx, const att_model_t *m, uint32_t seqs, uint32_t first_seq,
                   uint32_t ctx_tokens) {
    const size_t row = att_model_row_bytes(m, m->num_kv_heads);
    uint32_t per_call = (uint32_t)((256u << 20) / ((size_t)ctx_tokens * row));
    per_call = per_call < 1 ? 1 : per_call > seqs ? seqs : per_call;
    att_chunk_t *ch = calloc(per_call, sizeof *ch);
    void *k = tensor((size_t)per_call * ctx_tokens * row, 1);
    void *v = tensor((size_t)per_call * ctx_tokens * row, 2);
    int rc = 0;
    for (uint32_t s = 0; s < seqs && rc == 0; s += per_call) {
        uint32_t n = seqs - s < per_call ? seqs - s : per_call;
        for (uint32_t i = 0; i < n; i++)
            ch[i] = (att_chunk_t){first_seq + s + i, 0, ctx_tokens};
        att_call_t c = {.layer = 0, .chunks = ch, .num_chunks = n, .k = k,
                        .k_bytes = (size_t)n * ctx_tokens * row, .v = v,
                        .v_bytes = (size_t)n * ctx_tokens * row};
        at_diag_t d = {{0}};
        at_err_t e = att_ctx_append(ctx, &c, &d);
        if (e != AT_OK) {
            fprintf(stderr, "bench-gpu: fill: %s %s\n", at_err_name(e), d.msg);
            rc = -1;
        }
    }
    free(ch);
    free(k);
    free(v);
    return rc;
}

/* The calls' tensors: by default in one host region registered with the backend, as the
 * server's shared-memory arena is (copies go straight from it by DMA); with --plain-host, plain
 * malloc memory that a call stages through pinned buffers. */
#define ARENA_BYTES ((size_t)512 << 20)
static uint8_t *g_arena;
static size_t g_arena_used;

/* n bytes of a call's tensor (filled from the pattern when salt != 0); from the arena (freed by
 * the next arena_reset) or malloc (call_free). */
static void *call_buf(size_t n, size_t salt) {
    if (g_arena == NULL)
        return salt != 0 ? tensor(n, salt) : malloc(n);
    const size_t at = (g_arena_used + 255) / 256 * 256;
    if (at + n > ARENA_BYTES)
        return NULL;
    g_arena_used = at + n;
    uint8_t *p = g_arena + at;
    if (salt != 0) {
        void *t = tensor(n, salt);
        memcpy(p, t, n);
        free(t);
    }
    return p;
}

static void call_free(void *p) {
    if (g_arena == NULL)
        free(p);
}

/* Warm-up calls before the timed repeats of time_call. */
#define WARM_CALLS 3

/* Repeats one call and takes medians: the same chunks, each rewriting its positions, or with
 * `advance` each call one step further, as decode steps are (every chunk starts where its
 * previous call ended). */
static int time_call(att_ctx_t *ctx, const att_model_t *m, att_chunk_t *ch, uint32_t n, int reps,
                     bool advance, result_t *r) {
    uint32_t t = 0;
    for (uint32_t i = 0; i < n; i++)
        t += ch[i].num_tokens;
    const size_t qb = (size_t)t * att_model_row_bytes(m, m->num_query_heads);
    const size_t kb = (size_t)t * att_model_row_bytes(m, m->num_kv_heads);
    g_arena_used = 0;
    void *q = call_buf(qb, 3), *k = call_buf(kb, 4), *v = call_buf(kb, 5), *out = call_buf(qb, 0);
    if (q == NULL || k == NULL || v == NULL || out == NULL) {
        fprintf(stderr, "bench-gpu: %s: the tensors do not fit the arena\n", r->name);
        return -1;
    }
    att_call_t c = {.layer = 0, .chunks = ch, .num_chunks = n, .q = q, .q_bytes = qb, .k = k,
                    .k_bytes = kb, .v = v, .v_bytes = kb, .out = out, .out_bytes = qb};
    double *dev = calloc((size_t)reps, sizeof *dev), *wall = calloc((size_t)reps, sizeof *wall);
    double *host = calloc((size_t)reps, sizeof *host), *enq = calloc((size_t)reps, sizeof *enq);
    att_ctx_info_t i0, i1, before;
    att_ctx_get_info(ctx, &before);
    int rc = dev == NULL || wall == NULL || host == NULL || enq == NULL ? -1 : 0;
    for (int rep = -WARM_CALLS; rep < reps && rc == 0; rep++) {
        if (rep == 0)
            att_ctx_get_info(ctx, &i0);
        at_diag_t d = {{0}};
        uint64_t t0 = now_ns();
        at_err_t e = att_ctx_attend(ctx, &c, &d);
        uint64_t t1 = now_ns();
        if (e != AT_OK) {
            fprintf(stderr, "bench-gpu: %s: %s %s\n", r->name, at_err_name(e), d.msg);
            rc = -1;
            break;
        }
        if (rep >= 0) {
            att_ctx_info_t ii;
            att_ctx_get_info(ctx, &ii);
            dev[rep] = ii.kv_stats.last_device_ns / 1e6;
            wall[rep] = (t1 - t0) / 1e6;
            host[rep] = (double)(ii.kv_stats.launch_host_ns - before.kv_stats.launch_host_ns);
            enq[rep] = (double)ii.kv_stats.last_host_ns;
        }
        att_ctx_get_info(ctx, &before);
        for (uint32_t i = 0; i < n && advance; i++)
            ch[i].start_pos += ch[i].num_tokens;
    }
    if (rc == 0) {
        att_ctx_get_info(ctx, &i1);
        qsort(dev, (size_t)reps, sizeof *dev, cmp_double);
        qsort(wall, (size_t)reps, sizeof *wall, cmp_double);
        qsort(host, (size_t)reps, sizeof *host, cmp_double);
        qsort(enq, (size_t)reps, sizeof *enq, cmp_double);
        r->device_ms = dev[reps / 2];
        r->call_ms = wall[reps / 2];
        r->launches = (i1.kv_stats.launches - i0.kv_stats.launches) / (uint64_t)reps;
        r->from_device = (double)(i1.kv_stats.device_calls - i0.kv_stats.device_calls) / reps;
        r->host_us = host[reps / 2] / 1e3;
        r->host_p90_us = host[reps * 9 / 10] / 1e3;
        r->host_mean_us =
            (double)(i1.kv_stats.launch_host_ns - i0.kv_stats.launch_host_ns) / reps / 1e3;
        r->enqueue_us = enq[reps / 2] / 1e3;
    }
    free(dev);
    free(wall);
    free(host);
    free(enq);
    call_free(q);
    call_free(k);
    call_free(v);
    call_free(out);
    return rc;
}

static int session(att_backend_t *be, const shape_t *s, uint64_t capacity, att_ctx_t **ctx) {
    att_model_cfg_t cfg = {.num_layers = 1, .num_query_heads = s->hq, .num_kv_heads = s->hkv,
                           .head_dim = s->d, .dtype = ATT_DTYPE_BF16, .block_size = 16};
    at_diag_t d = {{0}};
    at_err_t e = att_ctx_create(be, &cfg, capacity, &d, ctx);
    if (e != AT_OK)
        fprintf(stderr, "bench-gpu: session %s: %s %s\n", s->name, at_err_name(e), d.msg);
    return e == AT_OK ? 0 : -1;
}

static double kv_row_bytes(const shape_t *s) { return 2.0 * s->hkv * s->d * 2; /* k + v */ }

static int bench_decode(att_backend_t *be, const shape_t *s, uint32_t seqs, uint32_t ctx_tokens,
                        result_t *r) {
    /* Each call is a decode step: it appends a token to every sequence, and its tables grow by
     * appending, as in a server. The timed calls' contexts are centred on ctx_tokens: they start
     * half their count below it, after the warm-up calls. */
    const int reps = 20;
    const uint32_t below = WARM_CALLS + reps / 2; /* the first call's position below ctx_tokens */
    if (ctx_tokens <= below) {
        fprintf(stderr, "bench-gpu: decode contexts start at %u tokens\n", below + 1);
        return -1;
    }
    /* the last call ends 10 tokens past ctx_tokens, in at most one more block */
    att_ctx_t *ctx = NULL;
    if (session(be, s, (uint64_t)seqs * (ctx_tokens + 32), &ctx) != 0)
        return -1;
    const uint32_t first = ctx_tokens - below;
    att_chunk_t *ch = calloc(seqs, sizeof *ch);
    int rc = fill_kv(ctx, att_ctx_model(ctx), seqs, 0, first);
    for (uint32_t i = 0; i < seqs; i++)
        ch[i] = (att_chunk_t){i, first, 1};
    if (ctx_tokens % 1024 == 0)
        snprintf(r->name, sizeof r->name, "decode %s %u x %uK", s->name, seqs, ctx_tokens / 1024);
    else
        snprintf(r->name, sizeof r->name, "decode %s %u x %u", s->name, seqs, ctx_tokens);
    r->kv_gb = (double)seqs * (ctx_tokens + 1) * kv_row_bytes(s) / 1e9;
    r->tflop = (double)seqs * s->hq * (ctx_tokens + 1) * s->d * 4 / 1e12;
    if (rc == 0)
        rc = time_call(ctx, att_ctx_model(ctx), ch, seqs, reps, true, r);
    free(ch);
    att_ctx_destroy(&ctx);
    return rc;
}

static int bench_prefill(att_backend_t *be, const shape_t *s, result_t *r) {
    const uint32_t seqs = 8, len = 2048;
    att_ctx_t *ctx = NULL;
    if (session(be, s, (uint64_t)seqs * len, &ctx) != 0)
        return -1;
    att_chunk_t ch[8];
    for (uint32_t i = 0; i < seqs; i++)
        ch[i] = (att_chunk_t){i, 0, len};
    snprintf(r->name, sizeof r->name, "prefill %s 8 x 2048", s->name);
    r->kv_gb = (double)seqs * len * kv_row_bytes(s) / 1e9;
    r->tflop = (double)seqs * s->hq * ((double)len * (len + 1) / 2) * s->d * 4 / 1e12;
    int rc = time_call(ctx, att_ctx_model(ctx), ch, seqs, 10, false, r);
    att_ctx_destroy(&ctx);
    return rc;
}

/* The mixed batch (part 0), or one of its parts alone: its 63 decode sequences (1) or its chunk
 * (2), to see how much of the parts' serial time the whole batch's overlap saves. */
static int bench_mixed(att_backend_t *be, const shape_t *s, int part, result_t *r) {
    static const char *const names[] = {"", " (decode part)", " (chunk part)"};
    att_ctx_t *ctx = NULL;
    if (session(be, s, 64 * (2048 + 16) + 2048, &ctx) != 0)
        return -1;
    int rc = fill_kv(ctx, att_ctx_model(ctx), 63, 0, 2048);
    if (rc == 0)
        rc = fill_kv(ctx, att_ctx_model(ctx), 1, 63, 1536);
    att_chunk_t ch[64];
    for (uint32_t i = 0; i < 63; i++)
        ch[i] = (att_chunk_t){i, 2048, 1};
    ch[63] = (att_chunk_t){63, 1536, 512};
    snprintf(r->name, sizeof r->name, "mixed %s 63 x 2K + 512 over 1536%s", s->name, names[part]);
    const double dec_gb = 63.0 * 2049 * kv_row_bytes(s) / 1e9;
    const double dec_tf = 63.0 * s->hq * 2049 * s->d * 4 / 1e12;
    const double chunk_gb = 2048.0 * kv_row_bytes(s) / 1e9;
    const double chunk_tf = 512.0 * s->hq * (1536 + 256.5) * s->d * 4 / 1e12;
    r->kv_gb = (part != 2 ? dec_gb : 0) + (part != 1 ? chunk_gb : 0);
    r->tflop = (part != 2 ? dec_tf : 0) + (part != 1 ? chunk_tf : 0);
    if (rc == 0)
        rc = time_call(ctx, att_ctx_model(ctx), part == 2 ? &ch[63] : ch,
                       part == 0 ? 64 : part == 1 ? 63 : 1, 20, false, r);
    att_ctx_destroy(&ctx);
    return rc;
}

/* "wide=4,2,1,32,3": a tile override (warps_m, warp_mt, warps_n, tile_k, stages) of one kind,
 * with an optional sixth field, the body: 0 mma.sync (the default), 1 wgmma (sm_90 only),
 * "wide=8,1,1,64,3,1". */
static int parse_tile(const char *s, att_cuda_plan_t *pl) {
    att_tile_t t = {0};
    uint32_t kind;
    if (strncmp(s, "wide=", 5) == 0)
        kind = ATT_TILE_WIDE;
    else if (strncmp(s, "narrow=", 7) == 0)
        kind = ATT_TILE_NARROW;
    else
        return -1;
    const int n = sscanf(strchr(s, '=') + 1, "%u,%u,%u,%u,%u,%u", &t.warps_m, &t.warp_mt,
                         &t.warps_n, &t.tile_k, &t.stages, &t.mma);
    if ((n != 5 && n != 6) || t.warps_m == 0 || t.mma > 1)
        return -1;
    pl->tile[kind] = t;
    return 0;
}

/* "mixed_split_keys=512", "mixed_order=wide", "mixed_wide_sms=32": one split threshold, the mixed
 * launch order or the mixed batch's SM partition. */
static int parse_plan(const char *s, att_cuda_plan_t *pl) {
    static const struct {
        const char *name;
        size_t off;
    } keys[] = {{"min_split_keys", offsetof(att_cuda_plan_t, min_split_keys)},
                {"max_splits", offsetof(att_cuda_plan_t, max_splits)},
                {"blocks_per_sm", offsetof(att_cuda_plan_t, blocks_per_sm)},
                {"mixed_split_keys", offsetof(att_cuda_plan_t, mixed_split_keys)}};
    const char *eq = strchr(s, '=');
    if (eq == NULL)
        return -1;
    if (strncmp(s, "mixed_order=", 12) == 0) {
        pl->mixed_order = strcmp(eq + 1, "wide") == 0     ? ATT_CUDA_WIDE_FIRST
                          : strcmp(eq + 1, "narrow") == 0 ? ATT_CUDA_NARROW_FIRST
                                                          : 0;
        return pl->mixed_order != 0 ? 0 : -1;
    }
    if (strcmp(s, "tail=whole") == 0) {
        pl->tail_unsplit = true;
        return 0;
    }
    if (strcmp(s, "mixed_part=always") == 0) {
        pl->mixed_part_always = true;
        return 0;
    }
    if (strncmp(s, "mixed_wide_sms=", 15) == 0) { /* a count of SMs, or off */
        char *end = NULL;
        const unsigned long v = strtoul(eq + 1, &end, 10);
        if (strcmp(eq + 1, "off") == 0)
            pl->mixed_wide_sms = ATT_CUDA_NEVER;
        else if (end == eq + 1 || *end != '\0' || v == 0 || v > 0xffffu)
            return -1;
        else
            pl->mixed_wide_sms = (uint32_t)v;
        return 0;
    }
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if ((size_t)(eq - s) == strlen(keys[i].name) && strncmp(s, keys[i].name, eq - s) == 0) {
            uint32_t v = strcmp(eq + 1, "never") == 0       ? ATT_CUDA_NEVER
                         : strcmp(eq + 1, "occupancy") == 0 ? ATT_CUDA_OCCUPANCY
                                                            : (uint32_t)strtoul(eq + 1, NULL, 10);
            if (v == 0)
                return -1;
            memcpy((uint8_t *)pl + keys[i].off, &v, sizeof v);
            return 0;
        }
    return -1;
}

/* A list option's values, "256" or "128,256,512": whole numbers from 1 to 1 << 20, at most
 * BENCH_LIST of them. */
#define BENCH_LIST 8
typedef struct count_list {
    uint32_t n, v[BENCH_LIST];
} count_list_t;

static bool count_list(const char *s, count_list_t *out) {
    out->n = 0;
    for (const char *p = s;; p++) {
        char *end = NULL;
        const unsigned long v = strtoul(p, &end, 10);
        if (end == p || v == 0 || v > (1ul << 20) || out->n == BENCH_LIST ||
            (*end != '\0' && *end != ','))
            return false;
        out->v[out->n++] = (uint32_t)v;
        if (*end == '\0')
            return true;
        p = end;
    }
}

static bool has_case(const char *cases, const char *name) {
    if (cases == NULL)
        return true;
    const size_t n = strlen(name);
    for (const char *p = strstr(cases, name); p != NULL; p = strstr(p + 1, name))
        if ((p == cases || p[-1] == ',') && (p[n] == '\0' || p[n] == ','))
            return true;
    return false;
}

int bench_gpu_main(int argc, char **argv) {
    const char *json_path = NULL, *cases = NULL;
    double matmul_tflops = 0.0;
    att_cuda_plan_t plan;
    memset(&plan, 0, sizeof plan);
    bool has_plan = false, plain_host = false, timing = true, engine_copies = false;
    const char *only_shape = NULL;
    count_list_t seqs = {1, {256}}, ctxs = {2, {1024, 8192}};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--shape") == 0 && i + 1 < argc)
            only_shape = argv[++i];
        else if ((strcmp(argv[i], "--seqs") == 0 || strcmp(argv[i], "--ctx") == 0) &&
                 i + 1 < argc && count_list(argv[i + 1], argv[i][2] == 's' ? &seqs : &ctxs))
            i++;
        else if (strcmp(argv[i], "--plain-host") == 0)
            plain_host = true;
        else if (strcmp(argv[i], "--no-timing") == 0)
            timing = false;
        else if (strcmp(argv[i], "--engine-copies") == 0)
            engine_copies = true;
        else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc)
            json_path = argv[++i];
        else if (strcmp(argv[i], "--matmul-tflops") == 0 && i + 1 < argc)
            matmul_tflops = atof(argv[++i]);
        else if (strcmp(argv[i], "--cases") == 0 && i + 1 < argc)
            cases = argv[++i];
        else if (strcmp(argv[i], "--tile") == 0 && i + 1 < argc && parse_tile(argv[++i], &plan) == 0)
            has_plan = true;
        else if (strcmp(argv[i], "--plan") == 0 && i + 1 < argc && parse_plan(argv[++i], &plan) == 0)
            has_plan = true;
        else {
            fprintf(stderr,
                    "usage: attnd bench-gpu [--json FILE] [--matmul-tflops X] [--cases LIST]\n"
                    "                       [--tile KIND=WM,MT,WN,TK,ST[,B]]... [--plan KEY=V]...\n"
                    "                       [--plain-host] [--no-timing] [--engine-copies]\n"
                    "                       [--shape NAME] [--seqs N] [--ctx N]\n"
                    "  --shape: only llama3-8b or h8-d64; --seqs, --ctx: the decode cases'\n"
                    "  sequences (default 256) and contexts (1024,8192), each a list of up to 8\n"
                    "  --no-timing: no events around a call's kernels (no device times; host\n"
                    "  times as in the server, which records none)\n"
                    "  --plain-host: the calls' tensors in plain memory, staged through pinned\n"
                    "  buffers (default: in one registered region, as the server's arena)\n"
                    "  --engine-copies: device-launched calls (with --no-timing) copy q, k and v\n"
                    "  by the copy engine whatever their size (default: past 32 MiB; else SMs)\n"
                    "  X: the bf16 matrix rate measured on this GPU "
                    "(tools/gpu_torch_bench.py prints it)\n"
                    "  LIST: some of decode,prefill,mixed,mixparts (the mixed batch's two parts\n"
                    "  alone; default all)\n"
                    "  B: the wide tile's body, 0 mma.sync (when left out), 1 wgmma (sm_90)\n"
                    "  KIND wide or narrow: the tile instead of the plan's (att_cuda.h): warps\n"
                    "  over rows, m16 tiles per warp, warps over keys, keys per stage, stages\n"
                    "  KEY: min_split_keys, max_splits, blocks_per_sm (a number or occupancy),\n"
                    "  mixed_split_keys (a number or never), mixed_order (narrow or wide),\n"
                    "  mixed_wide_sms (N: a mixed batch's wide tiles on a green context of about\n"
                    "  N SMs, its narrow ones on the rest, when its proportions suit; off: every\n"
                    "  SM for both; default: the device's, 48 on an H200), mixed_part=always\n"
                    "  (every mixed batch on the partition, whatever its proportions),\n"
                    "  tail=whole (a last wave at most half full keeps its tiles whole)\n");
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    static const shape_t shapes[] = {{"llama3-8b", 32, 8, 128}, {"h8-d64", 8, 8, 64}};
    if (only_shape != NULL && strcmp(only_shape, shapes[0].name) != 0 &&
        strcmp(only_shape, shapes[1].name) != 0) {
        fprintf(stderr, "bench-gpu: --shape is %s or %s, not %s\n", shapes[0].name,
                shapes[1].name, only_shape);
        return 2;
    }
    att_backend_t *be = NULL;
    at_diag_t d = {{0}};
    att_cuda_cfg_t cc = {.device = 0,
                         .kernel_cache_dir = NULL,
                         .timing = timing,
                         .plan = has_plan ? &plan : NULL,
                         .dl_engine_bytes = engine_copies ? 1 : 0};
    if (att_cuda_create(&cc, &d, &be) != AT_OK) {
        fprintf(stderr, "bench-gpu: %s\n", d.msg);
        return 1;
    }
    gpu_t g = {0};
    ceilings_t c = {0};
    if (gpu_init(&g, att_cuda_arch(be)) != 0 || measure_ceilings(&g, &c) != 0) {
        att_backend_destroy(&be);
        return 1;
    }
    printf("GPU: %s\n", att_cuda_describe(be));
    printf("ceilings: read-only %.0f GB/s, device copy %.0f GB/s (read + write), "
           "bare cuLaunchKernel %.2f us of host time (mean, back to back), bf16 matmul %.0f "
           "TFLOP/s (torch)\n"
           "bare launch with 160 bytes of parameters, median: %.2f us back to back, %.2f us on a "
           "synchronized stream, %.2f us after an upload too (a call's position), %.2f us "
           "there with 80 KiB of dynamic shared memory, %.2f us after a decode call's four "
           "uploads, %.2f us after those and a 512 KiB memcpy on the host; after the four "
           "uploads and a kernel of 0.3 ms / 2 ms the host waited for: %.2f / %.2f us\n",
           c.read_gbs, c.copy_gbs, c.empty_launch_ns / 1e3, matmul_tflops, c.p160_b2b_ns / 1e3,
           c.p160_synced_ns / 1e3, c.call_launch_ns / 1e3, c.call_launch_smem_ns / 1e3,
           c.call_launch_4_ns / 1e3, c.call_launch_4t_ns / 1e3, c.call_launch_busy_ns[0] / 1e3,
           c.call_launch_busy_ns[1] / 1e3);
    pattern_init();
    if (!plain_host) {
        /* registered memory must outlive the backend: freed after it */
        g_arena = aligned_alloc(4096, ARENA_BYTES);
        if (g_arena == NULL || be->ops->register_host(be, g_arena, ARENA_BYTES) != AT_OK) {
            fprintf(stderr, "bench-gpu: cannot register %zu MiB of host memory\n",
                    ARENA_BYTES >> 20);
            att_backend_destroy(&be);
            free(g_arena);
            return 1;
        }
    }
    printf("tensors: %s\n", plain_host ? "plain memory, staged through pinned buffers"
                                       : "one registered host region (as the server's arena)");
    result_t res[2 * BENCH_LIST * BENCH_LIST + 5];
    memset(res, 0, sizeof res);
    int n = 0, rc = 0;
    for (int s = 0; s < 2 && rc == 0; s++) {
        if (only_shape != NULL && strcmp(only_shape, shapes[s].name) != 0)
            continue;
        for (uint32_t a = 0; a < seqs.n && rc == 0 && has_case(cases, "decode"); a++)
            for (uint32_t x = 0; x < ctxs.n && rc == 0; x++)
                rc |= bench_decode(be, &shapes[s], seqs.v[a], ctxs.v[x], &res[n++]);
        if (has_case(cases, "prefill"))
            rc |= bench_prefill(be, &shapes[s], &res[n++]);
    }
    const bool llama = only_shape == NULL || strcmp(only_shape, shapes[0].name) == 0;
    if (rc == 0 && llama && has_case(cases, "mixed"))
        rc |= bench_mixed(be, &shapes[0], 0, &res[n++]);
    for (int part = 1; part <= 2 && rc == 0 && llama && has_case(cases, "mixparts"); part++)
        rc |= bench_mixed(be, &shapes[0], part, &res[n++]);
    printf("%-40s %9s %9s %10s %9s %9s %8s %8s %8s %8s %5s %4s\n", "case", "device ms", "call ms",
           "KV GB/s", "of read", "TFLOP/s", "host us", "p90 us", "mean us", "enq us", "launch",
           "from");
    FILE *js = json_path != NULL ? fopen(json_path, "w") : NULL;
    if (js != NULL)
        fprintf(js, "{\"gpu\": \"%s\", \"read_gbs\": %.1f, \"copy_gbs\": %.1f, "
                    "\"empty_launch_us\": %.3f, \"p160_b2b_us\": %.3f, "
                    "\"p160_synced_us\": %.3f, \"call_launch_us\": %.3f, "
                    "\"matmul_tflops\": %.1f, \"cases\": [",
                att_cuda_describe(be), c.read_gbs, c.copy_gbs, c.empty_launch_ns / 1e3,
                c.p160_b2b_ns / 1e3, c.p160_synced_ns / 1e3, c.call_launch_ns / 1e3,
                matmul_tflops);
    for (int i = 0; i < n; i++) {
        const result_t *r = &res[i];
        /* without timing (--no-timing) there are no device times, so no rates */
        const double gbs = r->device_ms > 0 ? r->kv_gb / (r->device_ms / 1e3) : 0.0;
        const double tfs = r->device_ms > 0 ? r->tflop / (r->device_ms / 1e3) : 0.0;
        printf("%-40s %9.3f %9.3f %10.0f %8.1f%% %9.1f %8.2f %8.2f %8.2f %8.1f %5" PRIu64 " %4s\n",
               r->name, r->device_ms, r->call_ms, gbs, 100.0 * gbs / c.read_gbs, tfs, r->host_us,
               r->host_p90_us, r->host_mean_us, r->enqueue_us, r->launches,
               r->from_device >= 1.0 ? "dev"
               : r->from_device > 0  ? "some"
                                     : "host");
        if (strncmp(r->name, "mixed", 5) == 0 && strstr(r->name, "part)") == NULL &&
            r->device_ms > 0) {
            const double floor_ms = fmax(r->kv_gb / c.read_gbs * 1e3,
                                         matmul_tflops > 0 ? r->tflop / matmul_tflops * 1e3 : 0);
            printf("  mixed: floor %.3f ms (KV at read-only bandwidth%s), %.2fx the floor\n",
                   floor_ms, matmul_tflops > 0 ? " or FLOPs at the matmul rate" : "",
                   r->device_ms / floor_ms);
        }
        if (js != NULL)
            fprintf(js,
                    "%s{\"case\": \"%s\", \"device_ms\": %.4f, \"call_ms\": %.4f, "
                    "\"kv_gb\": %.4f, \"tflop\": %.4f, \"host_us\": %.3f, "
                    "\"host_p90_us\": %.3f, \"host_mean_us\": %.3f, \"enqueue_us\": %.3f, "
                    "\"launches\": %" PRIu64 ", \"from_device\": %.2f}",
                    i ? ", " : "", r->name, r->device_ms, r->call_ms, r->kv_gb, r->tflop,
                    r->host_us, r->host_p90_us, r->host_mean_us, r->enqueue_us, r->launches,
                    r->from_device);
    }
    if (js != NULL) {
        fprintf(js, "]}\n");
        fclose(js);
    }
    free(g_pattern);
    att_backend_destroy(&be);
    free(g_arena);
    return rc == 0 ? 0 : 1;
}

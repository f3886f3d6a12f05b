/* The CPU attention benchmark behind `attnd bench`.
 *
 * For one model shape (one layer) it times the CPU backend's att_ctx_attend on
 *   - decode: S sequences x 1 new token at a fixed context C (every iteration writes position C
 *     again: start_pos = C cuts the cache back to C tokens, so the context never grows), and
 *   - prefill: one sequence, one chunk of N tokens from position 0,
 * and reports the median time per call, the K/V bytes the call must read per second, that rate as
 * a fraction of the machine's memory read bandwidth (measured first, in the same run, with the same
 * thread count), and FLOP/s. Cases whose memory would exceed a budget are skipped, not attempted.
 * Results go to stdout as a table or as one JSON document (--json); progress and errors go to
 * stderr.
 *
 * Threads: everything runs on the calling thread except the bandwidth probe, which starts one
 * reader per backend thread for each run and joins them before returning; the readers share a
 * read-only buffer and each writes only its own result slot. */

#include "bench/bench.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "attention/att_dtype.h"
#include "attention/att_model.h"
#include "attention/att_op.h"
#include "common/at_err.h"

#ifndef ATTND_VERSION
#define ATTND_VERSION "unknown"
#endif

#define MAX_LIST 16
#define MAX_CASES (MAX_LIST * MAX_LIST + MAX_LIST)
#define GIB_F 1073741824.0
#define MIB 1048576ull
#define FILL_CHUNK_TOKENS 2048u          /* tokens of one sequence per fill chunk */
#define FILL_CALL_TOKENS 16384u          /* tokens per fill call, over several sequences */
#define FILL_BUF_MAX_BYTES (64ull * MIB) /* cap on each of the fill's K and V buffers */
#define PROGRESS_EVERY_S 2.0
#define MAX_CTX_TOKENS (1u << 30)

typedef struct u32_list {
    uint32_t v[MAX_LIST];
    uint32_t n; /* 0 = not given: use the default */
} u32_list_t;

typedef struct opts {
    att_dtype_t dtype;
    uint32_t q_heads;
    uint32_t kv_heads;
    uint32_t head_dim;
    uint32_t block_size; /* tokens */
    uint32_t threads;    /* 0 until resolved to the online CPU count */
    uint32_t iters;      /* timed calls per case; 0 until resolved */
    uint32_t warmup;     /* untimed calls before them */
    uint32_t bw_mib;     /* bandwidth probe buffer, MiB; 0 until resolved */
    uint32_t bw_runs;    /* best of this many probe runs */
    int do_decode;
    int do_prefill;
    int json;
    int quick;
    att_cpu_isa_t isa;
    double max_mem_gib; /* 0 = half of physical memory */
    u32_list_t seqs;    /* decode sequence counts */
    u32_list_t ctxs;    /* decode contexts, tokens */
    u32_list_t chunks;  /* prefill chunk sizes, tokens */
} opts_t;

typedef struct result {
    const char *kind; /* "decode" or "prefill" */
    uint32_t seqs;
    uint32_t ctx_tokens; /* tokens cached before the call: decode C, prefill 0 */
    uint32_t new_tokens; /* per sequence: decode 1, prefill N */
    int skipped;
    uint64_t need_bytes; /* KV cache plus the bench's tensors */
    uint64_t kv_bytes;   /* the KV cache alone */
    double fill_s;
    double median_s;
    double min_s;
    double max_s;
    uint64_t kv_read_bytes; /* K and V bytes one call must read */
    uint64_t pairs;         /* (query, key) pairs attended per query head */
    double flop;            /* per call */
} result_t;

typedef struct machine {
    char cpu_model[128];
    uint32_t online_cpus;
    uint64_t phys_mem_bytes;
} machine_t;

/* ---- small helpers ---------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int fail(const char *what, at_err_t e, const at_diag_t *d) {
    int has_detail = d != NULL && d->msg[0] != '\0';
    fprintf(stderr, "attnd bench: %s failed: %s (%s)%s%s\n", what, at_err_name(e), at_err_str(e),
            has_detail ? ": " : "", has_detail ? d->msg : "");
    return -1;
}

static int fail_nomem(const char *what, uint64_t bytes) {
    fprintf(stderr, "attnd bench: %s: cannot allocate %.2f GiB\n", what, (double)bytes / GIB_F);
    return -1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* xorshift64*: deterministic, cheap; the values only need to be ordinary numbers. */
static uint64_t rng_next(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dull;
}

/* n elements of dtype t, uniform in [-1, 1); NULL when out of memory. */
static void *alloc_random(att_dtype_t t, size_t n, uint64_t seed) {
    void *p = malloc(n * att_dtype_bytes(t) + 1);
    if (p == NULL)
        return NULL;
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        float f = (float)((double)(rng_next(&s) >> 40) * 0x1p-23 - 1.0);
        att_store(t, p, i, f);
    }
    return p;
}

static void machine_probe(machine_t *m) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    long pages = sysconf(_SC_PHYS_PAGES);
    long page = sysconf(_SC_PAGESIZE);
    m->online_cpus = ncpu > 0 ? (uint32_t)ncpu : 1;
    m->phys_mem_bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    snprintf(m->cpu_model, sizeof m->cpu_model, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f == NULL)
        return;
    char line[256];
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "model name", 10) != 0)
            continue;
        const char *c = strchr(line, ':');
        if (c == NULL)
            break;
        c++;
        while (*c == ' ' || *c == '\t')
            c++;
        snprintf(m->cpu_model, sizeof m->cpu_model, "%s", c);
        m->cpu_model[strcspn(m->cpu_model, "\n")] = '\0';
        break;
    }
    fclose(f);
}

/* ---- memory read bandwidth ---------------------------------------------------------------- */

typedef struct bw_part {
    const uint64_t *p;
    size_t n;     /* words */
    uint64_t sum; /* written by the reader thread only */
} bw_part_t;

static volatile uint64_t bw_sink; /* keeps the sums, so the reads cannot be optimised away */

static void *bw_read(void *arg) {
    bw_part_t *part = arg;
    const uint64_t *p = part->p;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= part->n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    for (; i < part->n; i++)
        s0 += p[i];
    part->sum = s0 + s1 + s2 + s3;
    return NULL;
}

/* Best of runs x (threads readers over a bytes buffer), in bytes/s, into *best_bps. */
static int measure_bandwidth(uint32_t threads, uint64_t bytes, uint32_t runs, double *best_bps) {
    size_t words = (size_t)(bytes / sizeof(uint64_t));
    /* Same memory treatment as the CPU backend's KV storage (anonymous mapping, transparent huge
     * pages advised), so the ratio compares access patterns, not page sizes. */
    uint64_t *buf = mmap(NULL, words * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        buf = NULL;
    else
        (void)madvise(buf, words * sizeof(uint64_t), MADV_HUGEPAGE);
    bw_part_t *parts = calloc(threads, sizeof *parts);
    pthread_t *tids = calloc(threads, sizeof *tids);
    int rc = -1;
    if (buf == NULL || parts == NULL || tids == NULL) {
        fail_nomem("bandwidth buffer", bytes);
        goto out_free;
    }
    /* Fault every page in first, and make the words non-zero. */
    memset(buf, 1, words * sizeof(uint64_t));
    size_t per = words / threads;
    for (uint32_t t = 0; t < threads; t++) {
        parts[t].p = buf + (size_t)t * per;
        parts[t].n = t + 1 == threads ? words - (size_t)t * per : per;
    }
    double best = 0;
    for (uint32_t r = 0; r < runs; r++) {
        uint32_t started = 0;
        double t0 = now_s();
        for (; started < threads; started++) {
            int e = pthread_create(&tids[started], NULL, bw_read, &parts[started]);
            if (e != 0) {
                fprintf(stderr, "attnd bench: bandwidth: pthread_create: %s\n", strerror(e));
                break;
            }
        }
        for (uint32_t t = 0; t < started; t++)
            pthread_join(tids[t], NULL);
        double dt = now_s() - t0;
        if (started < threads)
            goto out_free;
        for (uint32_t t = 0; t < threads; t++)
            bw_sink += parts[t].sum;
        double bps = (double)(words * sizeof(uint64_t)) / dt;
        if (bps > best)
            best = bps;
    }
    *best_bps = best;
    rc = 0;
out_free:
    free(tids);
    free(parts);
    if (buf != NULL)
        munmap(buf, words * sizeof(uint64_t));
    return rc;
}

/* ---- cases -------------------------------------------------------------------------------- */

static uint64_t kv_row_bytes(const att_model_cfg_t *cfg) {
    return (uint64_t)cfg->num_kv_heads * cfg->head_dim * att_dtype_bytes(cfg->dtype);
}

static uint64_t q_row_bytes(const att_model_cfg_t *cfg) {
    return (uint64_t)cfg->num_query_heads * cfg->head_dim * att_dtype_bytes(cfg->dtype);
}

/* KV storage the context allocates for capacity_tokens (whole blocks, one layer, K and V). */
static uint64_t kv_cache_bytes(const att_model_cfg_t *cfg, uint64_t capacity_tokens) {
    return capacity_tokens * kv_row_bytes(cfg) * 2 * cfg->num_layers;
}

static uint64_t round_up_blocks(uint64_t tokens, uint32_t block_size) {
    return (tokens + block_size - 1) / block_size * block_size;
}

/* Tokens per fill call, so that each fill buffer (K or V) stays within FILL_BUF_MAX_BYTES. */
static uint32_t fill_call_tokens(const att_model_cfg_t *cfg) {
    uint64_t t = FILL_BUF_MAX_BYTES / kv_row_bytes(cfg);
    if (t > FILL_CALL_TOKENS)
        t = FILL_CALL_TOKENS;
    return t < 1 ? 1 : (uint32_t)t;
}

/* Warm-up calls, then o->iters timed calls of att_ctx_attend; times into r. */
static int time_calls(att_ctx_t *ctx, const att_call_t *call, const opts_t *o, result_t *r) {
    double *t = calloc(o->iters, sizeof *t);
    if (t == NULL)
        return fail_nomem("timings", o->iters * sizeof *t);
    at_diag_t diag = {{0}};
    for (uint32_t i = 0; i < o->warmup + o->iters; i++) {
        double t0 = now_s();
        at_err_t e = att_ctx_attend(ctx, call, &diag);
        double dt = now_s() - t0;
        if (e != AT_OK) {
            free(t);
            return fail("att_ctx_attend", e, &diag);
        }
        if (i >= o->warmup)
            t[i - o->warmup] = dt;
    }
    qsort(t, o->iters, sizeof *t, cmp_double);
    r->min_s = t[0];
    r->max_s = t[o->iters - 1];
    r->median_s = o->iters % 2 ? t[o->iters / 2] : (t[o->iters / 2 - 1] + t[o->iters / 2]) / 2;
    free(t);
    return 0;
}

/* Writes positions 0..ctx_tokens-1 of sequences 1..seqs with att_ctx_append: chunks of up to
 * FILL_CHUNK_TOKENS tokens, several sequences per call. chunks has room for seqs entries. */
static int fill_decode(att_ctx_t *ctx, const att_model_cfg_t *cfg, uint32_t seqs,
                       uint32_t ctx_tokens, att_chunk_t *chunks, double *fill_s) {
    uint32_t call_tokens = fill_call_tokens(cfg);
    uint32_t chunk = call_tokens < FILL_CHUNK_TOKENS ? call_tokens : FILL_CHUNK_TOKENS;
    uint64_t row = kv_row_bytes(cfg);
    size_t elems = (size_t)call_tokens * cfg->num_kv_heads * cfg->head_dim;
    uint64_t total = (uint64_t)seqs * ctx_tokens * row * 2, done = 0;
    void *k = alloc_random(cfg->dtype, elems, 11);
    void *v = alloc_random(cfg->dtype, elems, 12);
    int rc = -1;
    if (k == NULL || v == NULL) {
        fail_nomem("fill buffers", 2 * elems * att_dtype_bytes(cfg->dtype));
        goto out_free;
    }
    double t0 = now_s(), last = t0;
    int reported = 0;
    for (uint32_t pos = 0; pos < ctx_tokens; pos += chunk) {
        uint32_t n = ctx_tokens - pos < chunk ? ctx_tokens - pos : chunk;
        uint32_t per_call = call_tokens / n;
        for (uint32_t s0 = 0; s0 < seqs; s0 += per_call) {
            uint32_t g = seqs - s0 < per_call ? seqs - s0 : per_call;
            for (uint32_t i = 0; i < g; i++)
                chunks[i] = (att_chunk_t){
                    .seq_id = (uint64_t)s0 + i + 1, .start_pos = pos, .num_tokens = n};
            att_call_t call = {
                .layer = 0,
                .chunks = chunks,
                .num_chunks = g,
                .k = k,
                .k_bytes = (size_t)g * n * row,
                .v = v,
                .v_bytes = (size_t)g * n * row,
            };
            at_diag_t diag = {{0}};
            at_err_t e = att_ctx_append(ctx, &call, &diag);
            if (e != AT_OK) {
                fail("att_ctx_append (filling the cache)", e, &diag);
                goto out_free;
            }
            done += 2 * call.k_bytes;
            double t = now_s();
            if (t - last >= PROGRESS_EVERY_S) {
                fprintf(stderr, "  filling %u seqs x %u tokens: %.2f of %.2f GiB (%.0f%%)\n", seqs,
                        ctx_tokens, (double)done / GIB_F, (double)total / GIB_F,
                        100.0 * (double)done / (double)total);
                last = t;
                reported = 1;
            }
        }
    }
    *fill_s = now_s() - t0;
    if (reported)
        fprintf(stderr, "  filled in %.1f s (%.2f GB/s)\n", *fill_s, (double)total / *fill_s / 1e9);
    rc = 0;
out_free:
    free(v);
    free(k);
    return rc;
}

/* Fills r with the counts that follow from the shape; the timings come later. */
static void result_counts(result_t *r, const att_model_cfg_t *cfg) {
    uint64_t kv_tokens; /* distinct keys read per sequence */
    uint64_t pairs;     /* per sequence */
    if (strcmp(r->kind, "decode") == 0) {
        kv_tokens = (uint64_t)r->ctx_tokens + 1; /* the cached context plus the new token */
        pairs = kv_tokens;
    } else {
        uint64_t n = r->new_tokens; /* from position 0: query i sees keys 0..i */
        kv_tokens = n;
        pairs = n * (n + 1) / 2;
    }
    r->kv_read_bytes = (uint64_t)r->seqs * kv_tokens * kv_row_bytes(cfg) * 2;
    r->pairs = (uint64_t)r->seqs * pairs;
    r->flop = 4.0 * cfg->head_dim * cfg->num_query_heads * (double)r->pairs;
}

/* A layer-0 call of n_chunks chunks and tokens tokens in all over the given tensors. */
static att_call_t attend_call(const att_model_cfg_t *cfg, const att_chunk_t *chunks,
                              uint32_t n_chunks, uint32_t tokens, const void *q, const void *k,
                              const void *v, void *out) {
    return (att_call_t){
        .layer = 0,
        .chunks = chunks,
        .num_chunks = n_chunks,
        .q = q,
        .q_bytes = (size_t)tokens * q_row_bytes(cfg),
        .k = k,
        .k_bytes = (size_t)tokens * kv_row_bytes(cfg),
        .v = v,
        .v_bytes = (size_t)tokens * kv_row_bytes(cfg),
        .out = out,
        .out_bytes = (size_t)tokens * q_row_bytes(cfg),
    };
}

/* Decode: seqs sequences of ctx_tokens cached tokens, each call appends token ctx_tokens to every
 * sequence. Skips (r->skipped) when the memory needed exceeds budget_bytes. */
static int run_decode(att_backend_t *be, const att_model_cfg_t *cfg, const opts_t *o,
                      uint64_t budget_bytes, uint32_t seqs, uint32_t ctx_tokens, result_t *r) {
    *r = (result_t){.kind = "decode", .seqs = seqs, .ctx_tokens = ctx_tokens, .new_tokens = 1};
    result_counts(r, cfg);
    uint64_t capacity = (uint64_t)seqs * round_up_blocks((uint64_t)ctx_tokens + 1, cfg->block_size);
    uint64_t fill_buf = 2ull * fill_call_tokens(cfg) * kv_row_bytes(cfg);
    uint64_t tensors = (uint64_t)seqs * (2 * q_row_bytes(cfg) + 2 * kv_row_bytes(cfg));
    r->kv_bytes = kv_cache_bytes(cfg, capacity);
    r->need_bytes = r->kv_bytes + fill_buf + tensors;
    if (r->need_bytes > budget_bytes) {
        r->skipped = 1;
        return 0;
    }

    att_ctx_t *ctx = NULL;
    att_chunk_t *chunks = calloc(seqs, sizeof *chunks);
    void *q = alloc_random(cfg->dtype, (size_t)seqs * cfg->num_query_heads * cfg->head_dim, 21);
    void *k = alloc_random(cfg->dtype, (size_t)seqs * cfg->num_kv_heads * cfg->head_dim, 22);
    void *v = alloc_random(cfg->dtype, (size_t)seqs * cfg->num_kv_heads * cfg->head_dim, 23);
    void *out = malloc((size_t)seqs * q_row_bytes(cfg) + 1);
    int rc = -1;
    if (chunks == NULL || q == NULL || k == NULL || v == NULL || out == NULL) {
        fail_nomem("decode tensors", tensors);
        goto out_free;
    }
    at_diag_t diag = {{0}};
    at_err_t e = att_ctx_create(be, cfg, capacity, &diag, &ctx);
    if (e != AT_OK) {
        fail("att_ctx_create (decode KV cache)", e, &diag);
        goto out_free;
    }
    if (fill_decode(ctx, cfg, seqs, ctx_tokens, chunks, &r->fill_s) != 0)
        goto out_destroy;
    for (uint32_t i = 0; i < seqs; i++)
        chunks[i] =
            (att_chunk_t){.seq_id = (uint64_t)i + 1, .start_pos = ctx_tokens, .num_tokens = 1};
    att_call_t call = attend_call(cfg, chunks, seqs, seqs, q, k, v, out);
    if (time_calls(ctx, &call, o, r) != 0)
        goto out_destroy;
    rc = 0;
out_destroy:
    att_ctx_destroy(&ctx);
out_free:
    free(out);
    free(v);
    free(k);
    free(q);
    free(chunks);
    return rc;
}

/* Prefill: one sequence, one chunk of n tokens from position 0 (each call rewrites it). */
static int run_prefill(att_backend_t *be, const att_model_cfg_t *cfg, const opts_t *o,
                       uint64_t budget_bytes, uint32_t n, result_t *r) {
    *r = (result_t){.kind = "prefill", .seqs = 1, .ctx_tokens = 0, .new_tokens = n};
    result_counts(r, cfg);
    uint64_t capacity = round_up_blocks(n, cfg->block_size);
    uint64_t tensors = (uint64_t)n * (2 * q_row_bytes(cfg) + 2 * kv_row_bytes(cfg));
    r->kv_bytes = kv_cache_bytes(cfg, capacity);
    r->need_bytes = r->kv_bytes + tensors;
    if (r->need_bytes > budget_bytes) {
        r->skipped = 1;
        return 0;
    }

    att_ctx_t *ctx = NULL;
    void *q = alloc_random(cfg->dtype, (size_t)n * cfg->num_query_heads * cfg->head_dim, 31);
    void *k = alloc_random(cfg->dtype, (size_t)n * cfg->num_kv_heads * cfg->head_dim, 32);
    void *v = alloc_random(cfg->dtype, (size_t)n * cfg->num_kv_heads * cfg->head_dim, 33);
    void *out = malloc((size_t)n * q_row_bytes(cfg) + 1);
    int rc = -1;
    if (q == NULL || k == NULL || v == NULL || out == NULL) {
        fail_nomem("prefill tensors", tensors);
        goto out_free;
    }
    at_diag_t diag = {{0}};
    at_err_t e = att_ctx_create(be, cfg, capacity, &diag, &ctx);
    if (e != AT_OK) {
        fail("att_ctx_create (prefill KV cache)", e, &diag);
        goto out_free;
    }
    att_chunk_t chunk = {.seq_id = 1, .start_pos = 0, .num_tokens = n};
    att_call_t call = attend_call(cfg, &chunk, 1, n, q, k, v, out);
    if (time_calls(ctx, &call, o, r) != 0)
        goto out_destroy;
    rc = 0;
out_destroy:
    att_ctx_destroy(&ctx);
out_free:
    free(out);
    free(v);
    free(k);
    free(q);
    return rc;
}

/* ---- output ------------------------------------------------------------------------------- */

static void table_header(void) {
    printf("\n%-8s %5s %6s %5s %11s %10s %9s %6s %9s %11s %7s\n", "case", "seqs", "ctx", "new",
           "median ms", "min ms", "KV GB/s", "of bw", "GFLOP/s", "tokens/s", "fill s");
}

static void table_row(const result_t *r, double bw_bps, uint64_t budget) {
    printf("%-8s %5u %6u %5u ", r->kind, r->seqs, r->ctx_tokens, r->new_tokens);
    if (r->skipped) {
        printf("skipped: needs %.2f GiB (budget %.2f GiB, --max-mem-gib)\n",
               (double)r->need_bytes / GIB_F, (double)budget / GIB_F);
    } else {
        double kv_bps = (double)r->kv_read_bytes / r->median_s;
        double tokens = (double)r->seqs * r->new_tokens;
        printf("%11.3f %10.3f %9.2f %5.0f%% %9.2f %11.1f %7.1f\n", r->median_s * 1e3,
               r->min_s * 1e3, kv_bps / 1e9, 100.0 * kv_bps / bw_bps, r->flop / r->median_s / 1e9,
               tokens / r->median_s, r->fill_s);
    }
    fflush(stdout);
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void json_num(double x) {
    if (isfinite(x))
        printf("%.6g", x);
    else
        printf("null");
}

static void json_print(const machine_t *mc, const opts_t *o, const char *isa, uint64_t budget,
                       uint64_t bw_bytes, double bw_bps, const result_t *res, uint32_t n_res) {
    printf("{\n  \"bench\": \"cpu\",\n  \"attnd_version\": ");
    json_str(ATTND_VERSION);
    printf(",\n  \"machine\": {\"cpu_model\": ");
    json_str(mc->cpu_model);
    printf(", \"online_cpus\": %u, \"phys_mem_bytes\": %" PRIu64 "},\n", mc->online_cpus,
           mc->phys_mem_bytes);
    printf("  \"backend\": {\"name\": \"cpu\", \"isa\": ");
    json_str(isa);
    printf(", \"threads\": %u},\n", o->threads);
    printf("  \"model\": {\"dtype\": ");
    json_str(att_dtype_name(o->dtype));
    printf(", \"num_layers\": 1, \"num_query_heads\": %u, \"num_kv_heads\": %u, "
           "\"head_dim\": %u, \"block_size\": %u},\n",
           o->q_heads, o->kv_heads, o->head_dim, o->block_size);
    printf("  \"iters\": %u,\n  \"warmup\": %u,\n  \"mem_budget_bytes\": %" PRIu64 ",\n", o->iters,
           o->warmup, budget);
    printf("  \"memory_bandwidth\": {\"buffer_bytes\": %" PRIu64
           ", \"runs\": %u, \"threads\": %u, \"read_bytes_per_s\": ",
           bw_bytes, o->bw_runs, o->threads);
    json_num(bw_bps);
    printf("},\n  \"cases\": [");
    for (uint32_t i = 0; i < n_res; i++) {
        const result_t *r = &res[i];
        printf("%s\n    {\"kind\": \"%s\", \"seqs\": %u, \"ctx_tokens\": %u, \"new_tokens\": %u, ",
               i ? "," : "", r->kind, r->seqs, r->ctx_tokens, r->new_tokens);
        printf("\"status\": \"%s\", \"need_bytes\": %" PRIu64 ", \"kv_cache_bytes\": %" PRIu64,
               r->skipped ? "skipped" : "ok", r->need_bytes, r->kv_bytes);
        if (!r->skipped) {
            double kv_bps = (double)r->kv_read_bytes / r->median_s;
            printf(",\n     \"median_s\": ");
            json_num(r->median_s);
            printf(", \"min_s\": ");
            json_num(r->min_s);
            printf(", \"max_s\": ");
            json_num(r->max_s);
            printf(", \"fill_s\": ");
            json_num(r->fill_s);
            printf(",\n     \"kv_read_bytes\": %" PRIu64 ", \"kv_bytes_per_s\": ",
                   r->kv_read_bytes);
            json_num(kv_bps);
            printf(", \"kv_bw_ratio\": ");
            json_num(kv_bps / bw_bps);
            printf(",\n     \"pairs\": %" PRIu64 ", \"flop\": ", r->pairs);
            json_num(r->flop);
            printf(", \"flop_per_s\": ");
            json_num(r->flop / r->median_s);
            printf(", \"tokens_per_s\": ");
            json_num((double)r->seqs * r->new_tokens / r->median_s);
        }
        printf("}");
    }
    printf("\n  ]\n}\n");
}

/* ---- options ------------------------------------------------------------------------------ */

static void usage(FILE *f) {
    fprintf(f, "usage: attnd bench [options]\n"
               "\n"
               "Times the CPU attention backend (one layer) after measuring the machine's memory\n"
               "read bandwidth with the same thread count.\n"
               "  decode:  SEQS sequences x 1 new token at a context of CTX cached tokens\n"
               "  prefill: 1 sequence, one chunk of N tokens from position 0 (causal)\n"
               "\n"
               "model shape (default: Llama-3.1-8B attention):\n"
               "  --dtype f32|f16|bf16   element type (bf16)\n"
               "  --q-heads N            query heads (32)\n"
               "  --kv-heads N           KV heads (8)\n"
               "  --head-dim N           head size (128)\n"
               "  --block-size N         tokens per KV block (16)\n"
               "cases:\n"
               "  --cases decode|prefill|all   which cases to run (all)\n"
               "  --seqs LIST            decode sequence counts (64,256)\n"
               "  --ctx LIST             decode contexts in tokens (1024,8192,32768)\n"
               "  --chunks LIST          prefill chunk sizes in tokens (512,1024,2048,4096)\n"
               "  --max-mem-gib X        skip cases needing more memory (half of physical memory)\n"
               "run:\n"
               "  --threads N            backend and bandwidth threads (0 = one per online CPU)\n"
               "  --iters N              timed calls per case; the median is reported (5)\n"
               "  --warmup N             untimed calls before them (1)\n"
               "  --bw-mib N             bandwidth probe buffer in MiB (1024)\n"
               "  --isa NAME             kernel build: best, portable, x86-64-v3, x86-64-v4 (best)\n"
               "  --quick                short smoke run: 8 seqs x 1024, prefill 512, 2 iters,\n"
               "                         256 MiB probe (lists and counts given explicitly win)\n"
               "  --json                 print the results as one JSON document\n"
               "  -h, --help             print this help\n"
               "LIST is comma-separated, e.g. --ctx 1024,8192. KV GB/s counts the K and V bytes a\n"
               "call must read; FLOP counts 4 x head_dim x q_heads per (query, key) pair.\n");
}

static int parse_u32(const char *name, const char *s, uint32_t min, uint32_t max, uint32_t *out) {
    char *end = NULL;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || x < min || x > max) {
        fprintf(stderr, "attnd bench: %s: expected an integer from %u to %u, got '%s'\n", name, min,
                max, s);
        return -1;
    }
    *out = (uint32_t)x;
    return 0;
}

/* Comma-separated values, each parsed like parse_u32; empty items are an error. */
static int parse_list(const char *name, const char *s, uint32_t min, uint32_t max,
                      u32_list_t *out) {
    out->n = 0;
    for (;;) {
        char item[32];
        size_t len = strcspn(s, ",");
        if (len == 0 || len >= sizeof item) {
            fprintf(stderr, "attnd bench: %s: expected a list like 64,256, got an item '%.*s'\n",
                    name, (int)len, s);
            return -1;
        }
        if (out->n == MAX_LIST) {
            fprintf(stderr, "attnd bench: %s: at most %d values\n", name, MAX_LIST);
            return -1;
        }
        memcpy(item, s, len);
        item[len] = '\0';
        if (parse_u32(name, item, min, max, &out->v[out->n]) != 0)
            return -1;
        out->n++;
        if (s[len] == '\0')
            return 0;
        s += len + 1;
    }
}

/* If argv[*i] is `name` or `name=VALUE`, points *val at the value (taking the next argument in
 * the first form) and returns 1; 0 when it is another argument; -1 when the value is missing. */
static int opt_value(int argc, char **argv, int *i, const char *name, const char **val) {
    size_t len = strlen(name);
    const char *a = argv[*i];
    if (strncmp(a, name, len) != 0)
        return 0;
    if (a[len] == '=') {
        *val = a + len + 1;
        return 1;
    }
    if (a[len] != '\0')
        return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "attnd bench: %s needs a value\n", name);
        return -1;
    }
    *i += 1;
    *val = argv[*i];
    return 1;
}

static void list_default(u32_list_t *l, const uint32_t *v, uint32_t n) {
    if (l->n != 0)
        return;
    memcpy(l->v, v, n * sizeof *v);
    l->n = n;
}

/* 0: parsed; 1: help printed; -1: bad usage (message printed). */
static int parse_opts(int argc, char **argv, opts_t *o) {
    *o = (opts_t){.dtype = ATT_DTYPE_BF16,
                  .q_heads = 32,
                  .kv_heads = 8,
                  .head_dim = 128,
                  .block_size = 16,
                  .warmup = 1,
                  .do_decode = 1,
                  .do_prefill = 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        int m;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 1;
        } else if (strcmp(a, "--json") == 0) {
            o->json = 1;
        } else if (strcmp(a, "--quick") == 0) {
            o->quick = 1;
        } else if ((m = opt_value(argc, argv, &i, "--isa", &v)) != 0) {
            if (m < 0)
                return -1;
            att_cpu_isa_t k = ATT_CPU_ISA_BEST;
            while (k <= ATT_CPU_ISA_X86V4 && strcmp(v, att_cpu_isa_name(k)) != 0)
                k++;
            if (k > ATT_CPU_ISA_X86V4) {
                fprintf(stderr, "attnd bench: --isa: expected best, portable, x86-64-v3 or "
                                "x86-64-v4, got '%s'\n", v);
                return -1;
            }
            o->isa = k;
        } else if ((m = opt_value(argc, argv, &i, "--dtype", &v)) != 0) {
            if (m < 0)
                return -1;
            if (strcmp(v, "f32") == 0)
                o->dtype = ATT_DTYPE_F32;
            else if (strcmp(v, "f16") == 0)
                o->dtype = ATT_DTYPE_F16;
            else if (strcmp(v, "bf16") == 0)
                o->dtype = ATT_DTYPE_BF16;
            else {
                fprintf(stderr, "attnd bench: --dtype: expected f32, f16 or bf16, got '%s'\n", v);
                return -1;
            }
        } else if ((m = opt_value(argc, argv, &i, "--cases", &v)) != 0) {
            if (m < 0)
                return -1;
            o->do_decode = strcmp(v, "decode") == 0 || strcmp(v, "all") == 0;
            o->do_prefill = strcmp(v, "prefill") == 0 || strcmp(v, "all") == 0;
            if (!o->do_decode && !o->do_prefill) {
                fprintf(stderr, "attnd bench: --cases: expected decode, prefill or all, got '%s'\n",
                        v);
                return -1;
            }
        } else if ((m = opt_value(argc, argv, &i, "--max-mem-gib", &v)) != 0) {
            char *end = NULL;
            if (m < 0)
                return -1;
            o->max_mem_gib = strtod(v, &end);
            if (end == v || *end != '\0' || !(o->max_mem_gib > 0) || !isfinite(o->max_mem_gib)) {
                fprintf(stderr, "attnd bench: --max-mem-gib: expected a number > 0, got '%s'\n", v);
                return -1;
            }
        } else {
            /* The shape's real limits are checked by att_model_create; these only keep the
             * arithmetic in range. */
            const struct {
                const char *name;
                uint32_t *dst;
                uint32_t min, max;
            } nums[] = {
                {"--q-heads", &o->q_heads, 1, 4096},   {"--kv-heads", &o->kv_heads, 1, 4096},
                {"--head-dim", &o->head_dim, 1, 4096}, {"--block-size", &o->block_size, 1, 65536},
                {"--threads", &o->threads, 0, 1024},   {"--iters", &o->iters, 1, 1000000},
                {"--warmup", &o->warmup, 0, 1000000},  {"--bw-mib", &o->bw_mib, 16, 1u << 20},
            };
            const struct {
                const char *name;
                u32_list_t *dst;
                uint32_t min, max;
            } lists[] = {
                {"--seqs", &o->seqs, 1, 1u << 20},
                {"--ctx", &o->ctxs, 0, MAX_CTX_TOKENS},
                {"--chunks", &o->chunks, 1, MAX_CTX_TOKENS},
            };
            int found = 0;
            for (size_t j = 0; j < sizeof nums / sizeof nums[0] && !found; j++) {
                if ((m = opt_value(argc, argv, &i, nums[j].name, &v)) == 0)
                    continue;
                found = 1;
                if (m < 0 || parse_u32(nums[j].name, v, nums[j].min, nums[j].max, nums[j].dst) != 0)
                    return -1;
            }
            for (size_t j = 0; j < sizeof lists / sizeof lists[0] && !found; j++) {
                if ((m = opt_value(argc, argv, &i, lists[j].name, &v)) == 0)
                    continue;
                found = 1;
                if (m < 0 ||
                    parse_list(lists[j].name, v, lists[j].min, lists[j].max, lists[j].dst) != 0)
                    return -1;
            }
            if (!found) {
                fprintf(stderr, "attnd bench: unknown option '%s' (see attnd bench --help)\n", a);
                return -1;
            }
        }
    }

    static const uint32_t seqs_full[] = {64, 256}, ctx_full[] = {1024, 8192, 32768};
    static const uint32_t chunks_full[] = {512, 1024, 2048, 4096};
    static const uint32_t seqs_quick[] = {8}, ctx_quick[] = {1024}, chunks_quick[] = {512};
    if (o->quick) {
        list_default(&o->seqs, seqs_quick, 1);
        list_default(&o->ctxs, ctx_quick, 1);
        list_default(&o->chunks, chunks_quick, 1);
    } else {
        list_default(&o->seqs, seqs_full, 2);
        list_default(&o->ctxs, ctx_full, 3);
        list_default(&o->chunks, chunks_full, 4);
    }
    if (o->iters == 0)
        o->iters = o->quick ? 2 : 5;
    if (o->bw_mib == 0)
        o->bw_mib = o->quick ? 256 : 1024;
    o->bw_runs = o->quick ? 2 : 5;
    return 0;
}

/* ---- main --------------------------------------------------------------------------------- */

int bench_cpu_main(int argc, char **argv) {
    opts_t o;
    int p = parse_opts(argc, argv, &o);
    if (p != 0)
        return p > 0 ? 0 : 2;

    machine_t mc;
    machine_probe(&mc);
    if (o.threads == 0)
        o.threads = mc.online_cpus;
    uint64_t budget = o.max_mem_gib > 0 ? (uint64_t)(o.max_mem_gib * GIB_F) : mc.phys_mem_bytes / 2;
    if (budget == 0) {
        fprintf(stderr, "attnd bench: cannot read the physical memory size; give --max-mem-gib\n");
        return 2;
    }

    att_model_cfg_t cfg = {
        .num_layers = 1,
        .num_query_heads = o.q_heads,
        .num_kv_heads = o.kv_heads,
        .head_dim = o.head_dim,
        .dtype = o.dtype,
        .block_size = o.block_size,
    };
    /* Check the shape before spending time on the bandwidth probe. */
    at_diag_t diag = {{0}};
    att_model_t *model = NULL;
    at_err_t e = att_model_create(&cfg, &diag, &model);
    if (e != AT_OK) {
        fail("model shape check", e, &diag);
        return 2;
    }
    att_model_destroy(&model);

    att_backend_t *be = NULL;
    att_cpu_cfg_t cpu_cfg = {.num_threads = o.threads, .isa = o.isa};
    e = att_cpu_create(&cpu_cfg, &be);
    if (e != AT_OK) {
        at_diag_t d = {"this CPU cannot run the kernels --isa asks for"};
        fail("att_cpu_create", e, e == AT_ERR_UNSUPPORTED ? &d : NULL);
        return 1;
    }
    const char *isa = att_cpu_isa(be);

    int rc = 1;
    result_t *res = calloc(MAX_CASES, sizeof *res);
    if (res == NULL) {
        fail_nomem("results", MAX_CASES * sizeof *res);
        goto out_backend;
    }
    if (!o.json) {
        printf("attnd %s CPU attention bench\n", ATTND_VERSION);
        printf("machine: %s, %u online CPUs, %.1f GiB memory\n", mc.cpu_model, mc.online_cpus,
               (double)mc.phys_mem_bytes / GIB_F);
        printf("backend: cpu, kernels %s, %u threads\n", isa, o.threads);
        printf("model:   %s, %u query heads, %u KV heads, head_dim %u, block %u, 1 layer\n",
               att_dtype_name(o.dtype), o.q_heads, o.kv_heads, o.head_dim, o.block_size);
        printf("timing:  median of %u calls after %u warm-up; memory budget %.2f GiB\n", o.iters,
               o.warmup, (double)budget / GIB_F);
        fflush(stdout);
    }

    uint64_t bw_bytes = (uint64_t)o.bw_mib * MIB;
    double bw_bps = 0;
    if (measure_bandwidth(o.threads, bw_bytes, o.bw_runs, &bw_bps) != 0)
        goto out_free;
    if (!o.json) {
        printf("memory read bandwidth: %.2f GB/s (best of %u reads of %u MiB, %u threads)\n",
               bw_bps / 1e9, o.bw_runs, o.bw_mib, o.threads);
        table_header();
        fflush(stdout); /* before the fill's progress lines on stderr */
    }

    uint32_t n_res = 0;
    if (o.do_decode) {
        for (uint32_t i = 0; i < o.seqs.n; i++) {
            for (uint32_t j = 0; j < o.ctxs.n; j++) {
                result_t *r = &res[n_res++];
                if (run_decode(be, &cfg, &o, budget, o.seqs.v[i], o.ctxs.v[j], r) != 0)
                    goto out_free;
                if (!o.json)
                    table_row(r, bw_bps, budget);
            }
        }
    }
    if (o.do_prefill) {
        for (uint32_t i = 0; i < o.chunks.n; i++) {
            result_t *r = &res[n_res++];
            if (run_prefill(be, &cfg, &o, budget, o.chunks.v[i], r) != 0)
                goto out_free;
            if (!o.json)
                table_row(r, bw_bps, budget);
        }
    }
    if (o.json)
        json_print(&mc, &o, isa, budget, bw_bytes, bw_bps, res, n_res);
    else
        printf("\nKV GB/s: K and V bytes a call must read / median time; of bw: that / memory read "
               "bandwidth.\nGFLOP/s: 4 x head_dim x q_heads x (query, key) pairs / median time.\n");
    rc = fflush(stdout) == 0 ? 0 : 1;
out_free:
    free(res);
out_backend:
    att_backend_destroy(&be);
    return rc;
}

/* `attnd tune`: tunes a model preset ahead of time for a range of batch shapes and writes the
 * tuning store that `attnd serve --tuning-dir` restores; `attnd tune --show` prints a store.
 *
 * Each shape is timed on copies exactly as a server's idle-time tuning job does (att_bench_t and
 * tun_search_t), so a record written here and one written by a server are interchangeable.
 * On a GPU (cuda:N, hip:N) the search is staged (the space's stages) and each stage's kernels are
 * compiled on every CPU by the backend's compile threads while earlier configs are timed; times
 * are the device's (kernels only).
 * Thread: main thread only (the backends start and join their own threads). */
#include <dirent.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "attention/att_cpu.h"
#include "attention/att_gpu_open.h"
#include "attention/att_model.h"
#include "attention/att_tune.h"
#include "bench/ab_preset.h"
#include "bench/bench.h"
#include "tuning/tun_search.h"
#include "tuning/tun_store.h"

#define MAX_CHUNKS 4096u
#define DEFAULT_SHAPES "1x1@4096,64x1@2048,1x1024@0,4x512@0,15x1@1024+1x256@768"
/* the GPU bench's cases: decode 256 x 1K and 8K, prefill 8 x 2048, mixed */
#define DEFAULT_GPU_SHAPES "256x1@1024,256x1@8192,8x2048@0,63x1@2048+1x512@1536"

static void usage(FILE *f) {
    fprintf(f,
            "usage: attnd tune --model PRESET|FILE --tuning-dir DIR [options]\n"
            "       attnd tune --show --tuning-dir DIR\n"
            "\nTimes every valid config of the device's kernel on each batch shape (on copies of\n"
            "the model's KV cache filled with random rows) and writes the best per shape bucket\n"
            "to the store that `attnd serve --tuning-dir DIR` restores. Progress on stderr.\n"
            "\noptions:\n"
            "  --model SPEC       preset name (bench/presets/*.json) or a preset file\n"
            "  --device DEV       cpu (default), cuda:N or hip:N (an AMD GPU; under the HIP test\n"
            "                     double, ATTND_HIP_LIB, an NVIDIA GPU: its times are NVIDIA's)\n"
            "  --threads N        CPU backend threads (default: one per online CPU; a server's\n"
            "                     worker uses cpu_threads / workers-per-device, which is part of\n"
            "                     the key, so tune with the server's number)\n"
            "  --shapes LIST      batch shapes, comma-separated; each SEQSxQUERY@CONTEXT, joined\n"
            "                     by '+' for a mixed batch (default %s;\n"
            "                     on a GPU %s)\n"
            "  --max-gib N        a shape's copies at most (default 4; the KV cache of 256 x 8K\n"
            "                     Llama-8B rows is 8 GiB)\n"
            "  --tuning-dir DIR   the store (created if missing)\n"
            "  --reps N           timed runs per config after one warm-up (default 3)\n"
            "  --presets DIR      where preset names are looked up\n"
            "  --show             print what the store in --tuning-dir holds\n",
            DEFAULT_SHAPES, DEFAULT_GPU_SHAPES);
}

/* Parses one batch shape ("64x1@2048" or "15x1@1024+1x256@768") into chunks. */
static int parse_shape(const char *text, att_bench_chunk_t *chunks, uint32_t *n) {
    *n = 0;
    const char *p = text;
    while (*p != '\0') {
        unsigned long seqs, q, ctx;
        int used = 0;
        if (sscanf(p, "%lux%lu@%lu%n", &seqs, &q, &ctx, &used) != 3 || seqs == 0 || q == 0 ||
            seqs > MAX_CHUNKS - *n || q > (1ul << 20) || ctx > (1ul << 24))
            return -1;
        for (unsigned long s = 0; s < seqs; s++)
            chunks[(*n)++] = (att_bench_chunk_t){(uint32_t)ctx, (uint32_t)q};
        p += used;
        if (*p == '+')
            p++;
        else if (*p != '\0')
            return -1;
    }
    return *n > 0 ? 0 : -1;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void progress(const char *shape, uint32_t done, uint32_t total, const char *what) {
    const int width = 30;
    int fill = total ? (int)((uint64_t)done * width / total) : width;
    fprintf(stderr, "\r  %-22s [%.*s%*s] %4u/%-4u %-12s", shape, fill,
            "##############################", width - fill, "", done, total, what);
    fflush(stderr);
}

/* Tunes one shape; fills *r. Returns 0, or -1 after a message. */
static int tune_shape(att_backend_t *be, const att_model_t *m, const tun_shape_t *ts,
                      const tun_device_t *dev, const char *text, uint32_t reps,
                      uint64_t max_bytes, tun_record_t *r) {
    static att_bench_chunk_t chunks[MAX_CHUNKS];
    uint32_t n = 0;
    if (parse_shape(text, chunks, &n) != 0) {
        fprintf(stderr, "attnd tune: bad shape '%s' (expected SEQSxQUERY@CONTEXT[+...])\n", text);
        return -1;
    }
    uint64_t tokens = 0, max_q = 0, max_ctx = 0;
    for (uint32_t i = 0; i < n; i++) {
        tokens += chunks[i].num_tokens;
        max_q = chunks[i].num_tokens > max_q ? chunks[i].num_tokens : max_q;
        uint64_t ctx = (uint64_t)chunks[i].start_pos + chunks[i].num_tokens;
        max_ctx = ctx > max_ctx ? ctx : max_ctx;
    }
    const tun_bucket_t bucket = tun_bucket_of(tokens, n, max_q, max_ctx);
    const int64_t t0 = now_ns();
    att_bench_t *b = NULL;
    tun_search_t *s = NULL;
    at_diag_t d = {{0}};
    at_err_t e = att_bench_create(be, m, m->window[0], chunks, n, max_bytes, &d, &b);
    if (e == AT_OK)
        e = tun_search_create(be->ops->tuning_space, ts, dev, &bucket, reps, &s);
    bool more = true;
    while (e == AT_OK && more) {
        progress(text, 0, 1, "filling");
        e = att_bench_fill_step(b, &more);
    }
    tun_cfg_t cfg;
    bool warm;
    uint32_t stage_seen = 0;
    while (e == AT_OK && tun_search_next(s, &cfg, &warm)) {
        at_err_t te = att_bench_search_step(b, s, &stage_seen);
        uint32_t done, total;
        tun_search_progress(s, &done, &total);
        if (te == AT_ERR_NOT_READY) { /* the compile threads are at it */
            progress(text, done, total, "compiling");
            nanosleep(&(struct timespec){0, 5000000}, NULL);
            continue;
        }
        e = te;
        progress(text, done, total, "timing");
    }
    if (e == AT_OK)
        e = tun_search_result(s, r);
    tun_search_destroy(&s);
    att_bench_destroy(&b);
    fprintf(stderr, "\n");
    if (e != AT_OK) {
        fprintf(stderr, "attnd tune: %s: %s%s%s\n", text, at_err_str(e), d.msg[0] ? ": " : "",
                d.msg);
        return -1;
    }
    r->tuning_ns = (uint64_t)(now_ns() - t0);
    r->updated_s = (int64_t)time(NULL);
    return 0;
}

static int show(const char *dir) {
    DIR *d = opendir(dir);
    if (d == NULL) {
        fprintf(stderr, "attnd tune: cannot open %s\n", dir);
        return 1;
    }
    struct dirent *e;
    int status = 0, files = 0;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".json") != 0)
            continue;
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        status |= tun_store_print(path, stdout) != AT_OK;
        files++;
    }
    closedir(d);
    if (files == 0)
        printf("%s: no tuning records\n", dir);
    return status;
}

/* The build tree keeps presets in bench/presets beside service/ (where attnd is). */
static void preset_dir(const char *given, char *out, size_t n) {
    char self[900];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    struct stat sb;
    if (given[0] == '\0' && len > 0) {
        self[len] = '\0';
        char *slash = strrchr(self, '/');
        if (slash != NULL) {
            *slash = '\0';
            snprintf(out, n, "%s/../bench/presets", self);
            if (stat(out, &sb) == 0 && S_ISDIR(sb.st_mode))
                return;
        }
    }
    if (ab_preset_dir(given, out, n) != 0)
        out[0] = '\0';
}

static int model_from(const ab_model_t *p, att_model_t **m) {
    const Attnd__V1__ModelConfig *c = &p->cfg;
    att_model_cfg_t mc = {
        .num_layers = c->num_layers,
        .num_query_heads = c->num_query_heads,
        .num_kv_heads = c->num_kv_heads,
        .head_dim = c->head_dim,
        .dtype = (att_dtype_t)c->dtype,
        .block_size = c->block_size,
        .scale = c->scale,
        .sliding_window = c->sliding_window,
        .layer_sliding_window = c->layer_sliding_window,
        .n_layer_sliding_window = (uint32_t)c->n_layer_sliding_window,
        .logits_soft_cap = c->logits_soft_cap,
        .alibi_slopes = c->alibi_slopes,
        .n_alibi_slopes = (uint32_t)c->n_alibi_slopes,
        .sinks = c->sinks,
        .n_sinks = (uint32_t)c->n_sinks,
    };
    at_diag_t d = {{0}};
    at_err_t e = att_model_create(&mc, &d, m);
    if (e != AT_OK)
        fprintf(stderr, "attnd tune: %s: %s: %s\n", p->path, at_err_str(e), d.msg);
    return e == AT_OK ? 0 : -1;
}

int bench_tune_main(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},   {"device", required_argument, NULL, 'd'},
        {"threads", required_argument, NULL, 't'}, {"shapes", required_argument, NULL, 's'},
        {"tuning-dir", required_argument, NULL, 'D'}, {"reps", required_argument, NULL, 'r'},
        {"presets", required_argument, NULL, 'p'}, {"show", no_argument, NULL, 'S'},
        {"max-gib", required_argument, NULL, 'g'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *device = "cpu", *dir = NULL, *presets = "";
    char shapes[4096] = "";
    unsigned long threads = 0, reps = 3, max_gib = 4;
    bool do_show = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'd': device = optarg; break;
        case 't': threads = strtoul(optarg, NULL, 10); break;
        case 's': snprintf(shapes, sizeof shapes, "%s", optarg); break;
        case 'D': dir = optarg; break;
        case 'r': reps = strtoul(optarg, NULL, 10); break;
        case 'p': presets = optarg; break;
        case 'S': do_show = true; break;
        case 'g': max_gib = strtoul(optarg, NULL, 10); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (dir == NULL || (!do_show && model == NULL) || optind != argc || reps < 1 || reps > 100 ||
        threads > 1024 || max_gib < 1 || max_gib > 1024) {
        usage(stderr);
        return 2;
    }
    if (do_show)
        return show(dir);
    const bool hip = strncmp(device, "hip:", 4) == 0;
    const bool gpu = hip || strncmp(device, "cuda:", 5) == 0;
    if (!gpu && strcmp(device, "cpu") != 0) {
        fprintf(stderr, "attnd tune: device %s: expected cpu, cuda:N or hip:N\n", device);
        return 2;
    }
    if (shapes[0] == '\0')
        snprintf(shapes, sizeof shapes, "%s", gpu ? DEFAULT_GPU_SHAPES : DEFAULT_SHAPES);
    char pdir[1024];
    preset_dir(presets, pdir, sizeof pdir);
    ab_model_t preset;
    if (ab_model_load(model, pdir, &preset) != 0)
        return 2;
    att_model_t *m = NULL;
    att_backend_t *be = NULL;
    tun_store_t *st = NULL;
    int status = 1;
    att_cpu_cfg_t bc = {.num_threads = (uint32_t)threads};
    tun_device_t dev;
    tun_shape_t ts;
    const char *hash = NULL;
    at_diag_t d = {{0}};
    if (model_from(&preset, &m) != 0)
        goto out;
    if (gpu) {
        const long cpus = sysconf(_SC_NPROCESSORS_ONLN); /* candidates compile on every CPU */
        if (att_gpu_open(device, cpus > 0 ? (uint32_t)cpus : 1, &d, &be) != AT_OK) {
            fprintf(stderr, "attnd tune: %s: %s\n", device, d.msg);
            goto out;
        }
    } else if (att_cpu_create(&bc, &be) != AT_OK) {
        fprintf(stderr, "attnd tune: cannot start the CPU backend\n");
        goto out;
    }
    if (att_tune_device(be, &dev, &hash) != AT_OK) {
        fprintf(stderr, "attnd tune: %s has no tuning knobs\n", device);
        goto out;
    }
    att_tune_shape(m, &ts);
    if (tun_store_open(dir, be->ops->tuning_space, &dev, hash, &ts, &d, &st) != AT_OK) {
        fprintf(stderr, "attnd tune: %s\n", d.msg);
        goto out;
    }
    if (tun_store_load(st, NULL) != AT_OK)
        goto out;
    fprintf(stderr, "attnd tune: %s on %s (%s, %u %s) -> %s\n", preset.name, dev.name,
            dev.arch, dev.threads, hip ? "CUs" : gpu ? "SMs" : "threads", tun_store_path(st));
    status = 0;
    for (char *save = NULL, *shape = strtok_r(shapes, ",", &save); shape != NULL;
         shape = strtok_r(NULL, ",", &save)) {
        tun_record_t r;
        if (tune_shape(be, m, &ts, &dev, shape, (uint32_t)reps, (uint64_t)max_gib << 30, &r) !=
            0) {
            status = 1;
            continue;
        }
        char best[TUN_CFG_TEXT_MAX], worst[TUN_CFG_TEXT_MAX];
        tun_cfg_format(be->ops->tuning_space, &r.best, best, sizeof best);
        tun_cfg_format(be->ops->tuning_space, &r.worst, worst, sizeof worst);
        printf("%-22s best %9.3f ms (%s)  heuristic %9.3f ms  worst %9.3f ms (%s)  "
               "%u configs in %.1f s\n",
               shape, (double)r.best_ns / 1e6, best, (double)r.heuristic_ns / 1e6,
               (double)r.worst_ns / 1e6, worst, r.tried, (double)r.tuning_ns / 1e9);
        fflush(stdout);
        if (tun_store_put(st, &r) != AT_OK || tun_store_save(st) != AT_OK)
            status = 1;
    }
out:
    tun_store_destroy(&st);
    att_backend_destroy(&be);
    att_model_destroy(&m);
    ab_model_fini(&preset);
    return status;
}

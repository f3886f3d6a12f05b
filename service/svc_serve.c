/* `attnd serve`: options, an optional JSON config file, the tenants file, devices, the server, a
 * reload of the tenants file on SIGHUP and a clean drain on SIGTERM or SIGINT. `attnd token`.
 *
 * Thread model: the main thread parses, starts everything, then waits in sigwait; SIGTERM,
 * SIGINT and SIGHUP are blocked in every thread (the mask is set before any thread starts), so
 * they are delivered only there. A reload runs on the main thread while calls go on. */
#include "service/svc_serve.h"

#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#ifdef AT_HAVE_CUDA
#include "attention/att_cuda.h"
#endif
#ifdef AT_HAVE_HIP
#include "attention/att_hip.h"
#endif
#include "common/at_log.h"
#include "service/svc_pool.h"
#include "service/svc_server.h"
#include "tenancy/ten_tenant.h"
#include "tuning/tun.h"

typedef struct serve_opts {
    char listen[256];
    uint32_t cpu_threads;  /* 0 = one per online CPU */
    uint32_t workers_per_device;
    uint32_t cq_threads;
    uint64_t max_message_mib;
    uint64_t arena_mib;
    uint32_t max_queue;
    uint32_t batch_tokens;
    uint32_t batch_delay_us;
    uint32_t grace_ms;
    char log_level[16];
    char ready_file[512];
    char tenants[512];
    bool allow_remote;
    bool null_device;
    char devices[256];          /* "cpu,cuda:0,..." or "all" */
    char kernel_cache_dir[480]; /* "" = the default */
    char worker_mode[16];       /* auto, thread, process */
    uint32_t worker_restart_ms;
    uint32_t worker_start_timeout_ms;
    char tuning_dir[480];       /* "" = no tuning store */
    char tuning[16];            /* "on", "frozen", "off"; "" = on with a tuning_dir, else off */
} serve_opts_t;

/* One row per option: the long option is "--" + name with '_' -> '-'; the JSON key is name. */
typedef enum kind { K_STR, K_U32, K_U64, K_BOOL } kind_t;
typedef struct opt {
    const char *name;
    kind_t kind;
    size_t off;
    size_t size;      /* K_STR: buffer size */
    uint64_t lo, hi;  /* numeric range */
    const char *help;
} opt_t;

#define O_(f) offsetof(serve_opts_t, f)
static const opt_t opts[] = {
    {"listen", K_STR, O_(listen), 256, 0, 0, "HOST:PORT to listen on (127.0.0.1:50051)"},
    {"allow_remote", K_BOOL, O_(allow_remote), 0, 0, 1,
     "without --tenants, allow a non-loopback --listen address anyway (no authentication)"},
    {"tenants", K_STR, O_(tenants), 512, 0, 0,
     "tenants file (JSON: tokens, quotas, weights; reloaded on SIGHUP); none: one open tenant"},
    {"cpu_threads", K_U32, O_(cpu_threads), 0, 0, 1024, "CPU backend threads (0 = all CPUs)"},
    {"workers_per_device", K_U32, O_(workers_per_device), 0, 1, 64,
     "workers per device, each with cpu_threads / N threads; a session stays on one (1)"},
    {"cq_threads", K_U32, O_(cq_threads), 0, 1, 64, "gRPC completion-queue threads (2)"},
    {"max_message_mib", K_U64, O_(max_message_mib), 0, 1, 2047,
     "largest request or response, MiB (256)"},
    {"arena_mib", K_U64, O_(arena_mib), 0, 16, 1u << 20,
     "shared memory for tensors in flight per device, MiB (2048)"},
    {"max_queue", K_U32, O_(max_queue), 0, 1, 1u << 20,
     "queued calls per device before UNAVAILABLE (1024)"},
    {"batch_tokens", K_U32, O_(batch_tokens), 0, 0, 1u << 24,
     "dynamic batching: most tokens in one merged run of a session's queued calls; 0 = off "
     "(4096)"},
    {"batch_delay_us", K_U32, O_(batch_delay_us), 0, 0, 1000000,
     "dynamic batching: most time a call may wait for others to join it, us (0: only calls "
     "already queued behind a busy device are merged)"},
    {"grace_ms", K_U32, O_(grace_ms), 0, 0, 3600000,
     "on SIGTERM/SIGINT, time for in-flight calls before they are cancelled (10000)"},
    {"log_level", K_STR, O_(log_level), 16, 0, 0, "debug, info, warn or error (info)"},
    {"null_device", K_BOOL, O_(null_device), 0, 0, 1,
     "also serve device \"null\": every step of a call but the attention work (benchmarks)"},
    {"ready_file", K_STR, O_(ready_file), 512, 0, 0,
     "write HOST:PORT here once serving (for scripts and tests)"},
    {"devices", K_STR, O_(devices), 256, 0, 0,
     "devices to serve: \"all\" (cpu and every CUDA or AMD GPU found), or a list such as "
     "\"cpu,cuda:0\" or \"cpu,hip:0\" (all)"},
    {"kernel_cache_dir", K_STR, O_(kernel_cache_dir), 480, 0, 0,
     "compiled GPU kernels are kept here across restarts ($XDG_CACHE_HOME/attnd/kernels)"},
    {"worker_mode", K_STR, O_(worker_mode), 16, 0, 0,
     "auto: each GPU's workers are processes (restarted when they die), the CPU's threads; "
     "thread or process: every device's (auto)"},
    {"worker_restart_ms", K_U32, O_(worker_restart_ms), 0, 1, 600000,
     "worker processes: delay before a dead worker is started again, doubled for each death "
     "in a row up to 30 s (100)"},
    {"worker_start_timeout_ms", K_U32, O_(worker_start_timeout_ms), 0, 100, 3600000,
     "worker processes: time for a worker to say it is ready (60000)"},
    {"tuning_dir", K_STR, O_(tuning_dir), 480, 0, 0,
     "tuning store: kernel configs measured per device and model shape, restored when a "
     "session is created (`attnd tune` writes it ahead of time; none)"},
    {"tuning", K_STR, O_(tuning), 16, 0, 0,
     "on: a batch shape without a record runs the heuristic and is tuned on copies when its "
     "worker is idle; frozen: records and the heuristic only; off: the heuristic only (on with "
     "--tuning-dir, else off)"},
};
#undef O_

static void usage(FILE *f) {
    fprintf(f, "usage: attnd serve [--config FILE] [options]\n\n"
               "Serves attnd.v1.Attention and grpc.health.v1.Health over gRPC on the CPU "
               "backend.\nOptions (also JSON keys of --config, which the command line "
               "overrides):\n");
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "--%s", opts[i].name);
        for (char *p = name; *p; p++)
            *p = *p == '_' ? '-' : *p;
        fprintf(f, "  %-20s %s\n", name, opts[i].help);
    }
    fprintf(f, "  %-20s %s\n", "--config FILE", "JSON object with any of the keys above");
}

static int set_value(serve_opts_t *o, const opt_t *op, const char *text, const char *origin) {
    char *field = (char *)o + op->off;
    if (op->kind == K_STR) {
        if (strlen(text) >= op->size) {
            fprintf(stderr, "attnd serve: %s %s: longer than %zu bytes\n", origin, op->name,
                    op->size - 1);
            return -1;
        }
        strcpy(field, text);
        return 0;
    }
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || v < op->lo || v > op->hi) {
        fprintf(stderr, "attnd serve: %s %s: expected a whole number from %llu to %llu, got '%s'\n",
                origin, op->name, (unsigned long long)op->lo, (unsigned long long)op->hi, text);
        return -1;
    }
    if (op->kind == K_U32)
        *(uint32_t *)(void *)field = (uint32_t)v;
    else if (op->kind == K_U64)
        *(uint64_t *)(void *)field = v;
    else
        *(bool *)(void *)field = v != 0;
    return 0;
}

static const opt_t *find_opt(const char *name) {
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++)
        if (strcmp(opts[i].name, name) == 0)
            return &opts[i];
    return NULL;
}

static int load_config(serve_opts_t *o, const char *path) {
    json_error_t err;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &err);
    if (root == NULL) {
        fprintf(stderr, "attnd serve: --config %s: line %d: %s\n", path, err.line, err.text);
        return -1;
    }
    int rc = 0;
    if (!json_is_object(root)) {
        fprintf(stderr, "attnd serve: --config %s: expected a JSON object\n", path);
        rc = -1;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (rc != 0)
            break;
        const opt_t *op = find_opt(key);
        char text[64];
        if (op == NULL) {
            fprintf(stderr, "attnd serve: --config %s: unknown key '%s'\n", path, key);
            rc = -1;
        } else if (op->kind == K_STR && json_is_string(val)) {
            rc = set_value(o, op, json_string_value(val), "config");
        } else if (op->kind == K_BOOL && json_is_boolean(val)) {
            rc = set_value(o, op, json_is_true(val) ? "1" : "0", "config");
        } else if ((op->kind == K_U32 || op->kind == K_U64) && json_is_integer(val)) {
            snprintf(text, sizeof text, "%lld", (long long)json_integer_value(val));
            rc = set_value(o, op, text, "config");
        } else {
            fprintf(stderr, "attnd serve: --config %s: key '%s' has the wrong type\n", path, key);
            rc = -1;
        }
    }
    json_decref(root);
    return rc;
}

/* Returns 0, or 2 for bad usage (message printed), or 1 for --help. */
static int parse_args(serve_opts_t *o, int argc, char **argv) {
    /* the config file first, so that the command line overrides it */
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--config") == 0 || strncmp(argv[i], "--config=", 9) == 0) {
            const char *path = argv[i][8] == '=' ? argv[i] + 9 : (i + 1 < argc ? argv[++i] : NULL);
            if (path == NULL) {
                fprintf(stderr, "attnd serve: --config needs a file\n");
                return 2;
            }
            if (load_config(o, path) != 0)
                return 2;
        }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 1;
        }
        if (strcmp(a, "--config") == 0) {
            i++;
            continue;
        }
        if (strncmp(a, "--config=", 9) == 0)
            continue;
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "attnd serve: unexpected argument '%s' (see --help)\n", a);
            return 2;
        }
        char name[64];
        const char *eq = strchr(a, '=');
        size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        if (n >= sizeof name) {
            fprintf(stderr, "attnd serve: unknown option '%s'\n", a);
            return 2;
        }
        memcpy(name, a + 2, n);
        name[n] = '\0';
        for (char *p = name; *p; p++)
            *p = *p == '-' ? '_' : *p;
        const opt_t *op = find_opt(name);
        if (op == NULL) {
            fprintf(stderr, "attnd serve: unknown option '%s' (see --help)\n", a);
            return 2;
        }
        const char *val = eq ? eq + 1 : NULL;
        if (val == NULL && op->kind == K_BOOL)
            val = "1";
        else if (val == NULL && i + 1 < argc)
            val = argv[++i];
        if (val == NULL) {
            fprintf(stderr, "attnd serve: %s needs a value\n", a);
            return 2;
        }
        if (set_value(o, op, val, "option") != 0)
            return 2;
    }
    return 0;
}

static bool is_loopback(const char *listen) {
    return strncmp(listen, "127.", 4) == 0 || strncmp(listen, "localhost:", 10) == 0 ||
           strncmp(listen, "[::1]:", 6) == 0 || strncmp(listen, "unix:", 5) == 0;
}

static int write_ready_file(const char *path, int port) {
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "127.0.0.1:%d\n", port);
    if (fclose(f) != 0)
        return -1;
    return rename(tmp, path); /* readers see the whole line or nothing */
}

#define MAX_POOLS 16

/* The pools to create, from --devices: "all" is cpu plus every CUDA device the driver sees and
 * every AMD GPU the HIP runtime sees; otherwise a comma-separated list of "cpu", "cuda:N" and
 * "hip:N". */
static at_err_t device_list(const char *spec, char names[][32], uint32_t *n) {
    *n = 0;
    if (strcmp(spec, "all") == 0) {
        snprintf(names[(*n)++], 32, "cpu");
#ifdef AT_HAVE_CUDA
        at_diag_t d = {{0}};
        int gpus = att_cuda_device_count(&d);
        if (gpus == 0)
            at_log(AT_LOG_INFO, "serve", "no CUDA devices: %s",
                   d.msg[0] != '\0' ? d.msg : "the driver sees none");
        for (int i = 0; i < gpus && *n < MAX_POOLS - 1; i++)
            snprintf(names[(*n)++], 32, "cuda:%d", i);
#endif
#ifdef AT_HAVE_HIP
        at_diag_t hd = {{0}};
        int amd = att_hip_device_count(&hd);
        if (amd == 0)
            at_log(AT_LOG_INFO, "serve", "no AMD GPUs: %s",
                   hd.msg[0] != '\0' ? hd.msg : "the HIP runtime sees none");
        for (int i = 0; i < amd && *n < MAX_POOLS - 1; i++)
            snprintf(names[(*n)++], 32, "hip:%d", i);
#endif
        return AT_OK;
    }
    const char *p = spec;
    while (*p != '\0') {
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= 32 || *n == MAX_POOLS - 1) {
            at_log(AT_LOG_ERROR, "serve", "--devices: bad list '%s'", spec);
            return AT_ERR_CONFIG;
        }
        memcpy(names[*n], p, len);
        names[*n][len] = '\0';
        for (uint32_t i = 0; i < *n; i++)
            if (strcmp(names[i], names[*n]) == 0) {
                at_log(AT_LOG_ERROR, "serve", "--devices: %s twice", names[i]);
                return AT_ERR_CONFIG;
            }
        (*n)++;
        p += len;
        if (*p == ',')
            p++;
    }
    if (*n == 0) {
        at_log(AT_LOG_ERROR, "serve", "--devices: empty list");
        return AT_ERR_CONFIG;
    }
    return AT_OK;
}

/* SIGHUP: the tenants file again. A bad file changes nothing (the old table stays). */
static void reload_tenants(ten_tenants_t *tenants, const char *path) {
    if (path[0] == '\0') {
        at_log(AT_LOG_WARN, "serve", "SIGHUP: no --tenants file to reload");
        return;
    }
    at_diag_t d = {{0}};
    at_err_t e = ten_tenants_reload(tenants, path, &d);
    if (e != AT_OK)
        at_log(AT_LOG_ERROR, "serve", "SIGHUP: tenants file not reloaded, the old one stays: "
               "%s: %s", at_err_str(e), d.msg);
    else
        at_log(AT_LOG_INFO, "serve", "SIGHUP: tenants file %s reloaded", path);
}

int svc_token_main(int argc, char **argv) {
    if (argc > 1) {
        FILE *f = strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ? stdout : stderr;
        fprintf(f, "usage: attnd token\n\nPrints a new bearer token (line 1: give it to the "
                   "client, keep it secret)\nand its SHA-256 digest (line 2: paste it into the "
                   "tenant's tokens_sha256\nin the tenants file, then send attnd SIGHUP).\n");
        return f == stdout ? 0 : 2;
    }
    ten_token_t tok;
    at_diag_t d = {{0}};
    at_err_t e = ten_token_generate(&tok, &d);
    if (e != AT_OK) {
        fprintf(stderr, "attnd token: %s: %s\n", at_err_str(e), d.msg);
        return 1;
    }
    printf("%s\n\"%s\"\n", tok.token, tok.sha256_hex);
    memset(&tok, 0, sizeof tok);
    return 0;
}

int svc_serve_main(int argc, char **argv) {
    serve_opts_t o = {
        .listen = "127.0.0.1:50051",
        .cq_threads = 2,
        .workers_per_device = 1,
        .max_message_mib = 256,
        .arena_mib = 2048,
        .max_queue = 1024,
        .batch_tokens = 4096,
        .grace_ms = 10000,
        .log_level = "info",
        .devices = "all",
        .worker_mode = "auto",
        .worker_restart_ms = 100,
        .worker_start_timeout_ms = 60000,
    };
    int rc = parse_args(&o, argc, argv);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    int level = at_log_parse_level(o.log_level);
    if (level < 0) {
        fprintf(stderr, "attnd serve: log_level: expected debug, info, warn or error, got '%s'\n",
                o.log_level);
        return 2;
    }
    at_log_set_level((at_log_level_t)level);
    svc_worker_mode_t mode = SVC_WORKER_AUTO;
    if (strcmp(o.worker_mode, "thread") == 0)
        mode = SVC_WORKER_THREAD;
    else if (strcmp(o.worker_mode, "process") == 0)
        mode = SVC_WORKER_PROCESS;
    else if (strcmp(o.worker_mode, "auto") != 0) {
        fprintf(stderr, "attnd serve: worker_mode: expected auto, thread or process, got '%s'\n",
                o.worker_mode);
        return 2;
    }
    if (o.tuning[0] != '\0' && tun_mode_parse(o.tuning) < 0) {
        fprintf(stderr, "attnd serve: tuning: expected on, frozen or off, got '%s'\n", o.tuning);
        return 2;
    }
    if (o.arena_mib < 2 * o.max_message_mib) {
        /* a call's out is as large as its q: one largest request needs about twice its size */
        fprintf(stderr, "attnd serve: arena_mib %llu is less than twice max_message_mib %llu: the "
                        "largest call would never fit\n",
                (unsigned long long)o.arena_mib, (unsigned long long)o.max_message_mib);
        return 2;
    }
    if (!is_loopback(o.listen) && !o.allow_remote && o.tenants[0] == '\0') {
        fprintf(stderr, "attnd serve: refusing to listen on %s: without --tenants nobody is "
                        "authenticated; give a tenants file, use a loopback address, or "
                        "--allow-remote\n", o.listen);
        return 2;
    }
    ten_tenants_t *tenants = NULL;
    at_diag_t td = {{0}};
    at_err_t te = o.tenants[0] != '\0' ? ten_tenants_load(o.tenants, &tenants, &td)
                                       : ten_tenants_create_open(&tenants);
    if (te != AT_OK) {
        fprintf(stderr, "attnd serve: --tenants: %s: %s\n", at_err_str(te), td.msg);
        return 2;
    }
    if (!is_loopback(o.listen) && o.tenants[0] != '\0')
        at_log(AT_LOG_WARN, "serve", "%s is not loopback and attnd speaks plain HTTP/2: bearer "
               "tokens cross the network in clear; put a TLS proxy in front", o.listen);

    /* Block the stop signals before any thread exists, so every thread inherits the mask. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    rc = 1;
    void *zctx = zmq_ctx_new();
    svc_pool_t *pools[MAX_POOLS] = {NULL};
    uint32_t num_pools = 0;
    svc_server_t *srv = NULL;
    at_err_t e = AT_OK;
    at_diag_t d = {{0}};
    if (zctx == NULL) {
        at_log(AT_LOG_ERROR, "serve", "zmq_ctx_new failed");
        ten_tenants_destroy(&tenants);
        return 1;
    }
    /* The workers find the kernel cache through the environment, which a worker process
     * inherits. */
    if (o.kernel_cache_dir[0] != '\0')
        setenv("ATTND_KERNEL_CACHE_DIR", o.kernel_cache_dir, 1);
    /* the tuning policy travels the same way (svc_worker.c reads it) */
    setenv("ATTND_TUNING_DIR", o.tuning_dir, 1);
    setenv("ATTND_TUNING", o.tuning[0] != '\0' ? o.tuning : o.tuning_dir[0] != '\0' ? "on" : "off",
           1);
    char names[MAX_POOLS][32];
    uint32_t num_names = 0;
    if ((e = device_list(o.devices, names, &num_names)) != AT_OK)
        goto out_ctx;
    if (o.null_device && num_names < MAX_POOLS)
        snprintf(names[num_names++], sizeof names[0], "null");
    for (uint32_t i = 0; i < num_names; i++) {
        svc_pool_cfg_t pc = {
            .device = names[i],
            .index = i,
            .cpu_threads = o.cpu_threads,
            .workers = o.workers_per_device,
            .arena_bytes = o.arena_mib << 20,
            .max_queue = o.max_queue,
            .batch_tokens = o.batch_tokens,
            .batch_delay_us = o.batch_delay_us,
            .worker_mode = mode,
            .restart_ms = o.worker_restart_ms,
            .start_timeout_ms = o.worker_start_timeout_ms,
        };
        if ((e = svc_pool_create(&pc, zctx, &d, &pools[num_pools])) != AT_OK) {
            at_log(AT_LOG_ERROR, "serve", "device %s: %s: %s", names[i], at_err_str(e), d.msg);
            goto out_pool;
        }
        num_pools++;
    }
    svc_server_cfg_t sc = {
        .listen = o.listen,
        .cq_threads = o.cq_threads,
        .max_message_bytes = o.max_message_mib << 20,
        .pools = pools,
        .num_pools = num_pools,
        .tenants = tenants,
    };
    e = svc_server_create(&sc, &d, &srv);
    if (e != AT_OK) {
        at_log(AT_LOG_ERROR, "serve", "%s: %s", at_err_str(e), d.msg);
        goto out_pool;
    }
    char listing[MAX_POOLS * 34] = "";
    for (uint32_t i = 0; i < num_pools; i++)
        snprintf(listing + strlen(listing), sizeof listing - strlen(listing), "%s%s",
                 i ? ", " : "", svc_pool_device(pools[i]));
    at_log(AT_LOG_INFO, "serve", "listening on %s (port %d); devices: %s", o.listen,
           svc_server_port(srv), listing);
    if (o.ready_file[0] != '\0' && write_ready_file(o.ready_file, svc_server_port(srv)) != 0)
        at_log(AT_LOG_WARN, "serve", "cannot write --ready-file %s", o.ready_file);

    int sig = 0;
    for (;;) {
        if (sigwait(&stop, &sig) != 0)
            continue;
        if (sig != SIGHUP)
            break;
        reload_tenants(tenants, o.tenants);
    }
    at_log(AT_LOG_INFO, "serve", "%s: shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    svc_server_drain(srv, o.grace_ms);
    rc = 0;
out_pool:
    /* Queued jobs run or are cancelled, answering their calls; the calls end; only then may the
     * arenas their responses point into go. */
    for (uint32_t i = num_pools; i-- > 0;)
        svc_pool_stop(pools[i]);
    svc_server_destroy(&srv);
    for (uint32_t i = num_pools; i-- > 0;)
        svc_pool_destroy(&pools[i]);
out_ctx:
    zmq_ctx_term(zctx);
    ten_tenants_destroy(&tenants);
    if (rc == 0)
        at_log(AT_LOG_INFO, "serve", "stopped");
    return rc;
}

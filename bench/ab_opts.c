/* attnd-bench's options: one table gives each option's name, type, range and help line; parsing,
 * --help and the error messages all come from it.
 *
 * Thread model: main thread only, before any other thread starts. */
#include "bench/ab_opts.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum kind {
    K_SECTION, /* a heading in --help, not an option */
    K_STR,     /* copied into a char array of size bytes */
    K_U32,
    K_U64,
    K_DBL,
    K_FLAG,    /* a bool set by the bare option */
    K_LIST,    /* comma-separated; handled by name after parsing */
    K_TENANT,  /* --tenant, repeatable */
    K_ARG,     /* --server-arg, repeatable */
    K_HELP,
} kind_t;

typedef struct opt {
    const char *name;  /* without the leading "--" */
    kind_t kind;
    size_t off;        /* into ab_opts_t */
    size_t size;       /* K_STR, K_LIST: buffer size */
    double lo, hi;     /* numeric range */
    const char *arg;   /* the value's name in --help */
    const char *help;
} opt_t;

/* --model and --workload are parsed from these after the loop */
typedef struct raw_lists {
    char models[1024];
    char workloads[256];
} raw_lists_t;

#define O_(f) offsetof(ab_opts_t, f)
static const opt_t opts[] = {
    {"", K_SECTION, 0, 0, 0, 0, NULL, "Server"},
    {"target", K_STR, O_(target), 256, 0, 0, "HOST:PORT",
     "drive this attnd server (default: spawn `attnd serve --null-device` on 127.0.0.1)"},
    {"attnd", K_STR, O_(attnd), 1024, 0, 0, "PATH",
     "the attnd binary to spawn (default: beside attnd-bench, else the build tree's)"},
    {"server-threads", K_U32, O_(server_threads), 0, 0, 1024, "N",
     "the spawned server's --cpu-threads (0 = every CPU; default 0)"},
    {"server-arg", K_ARG, 0, 0, 0, 0, "ARG",
     "repeatable: one more argument for the spawned `attnd serve`, e.g. --server-arg=--tenants=FILE"},
    {"", K_SECTION, 0, 0, 0, 0, NULL, "Sessions"},
    {"model", K_LIST, 0, 0, 0, 0, "LIST",
     "model presets, comma-separated: names in --presets-dir or .json paths; each tenant's "
     "sessions take them in turn (llama-3.1-8b)"},
    {"presets-dir", K_STR, O_(presets_dir), 1024, 0, 0, "DIR",
     "where preset names are found (default: presets/ beside attnd-bench, else "
     "../share/attnd/presets from it)"},
    {"sessions", K_U32, O_(sessions), 0, 1, 4096, "N", "sessions per device and tenant (1)"},
    {"device", K_STR, O_(device), 64, 0, 0, "NAME", "the device of the sessions (cpu)"},
    {"compare-null", K_FLAG, O_(compare_null), 0, 0, 0, NULL,
     "run each phase on --device and then on device \"null\" (the service without the "
     "attention work) and report null/device latency: p50, p99 and mean"},
    {"", K_SECTION, 0, 0, 0, 0, NULL, "Workload"},
    {"workload", K_LIST, 0, 0, 0, 0, "LIST",
     "phases, in order, comma-separated: decode (--batch sequences x 1 token), prefill (one "
     "--chunk), mixed (both in one call) (decode)"},
    {"ctx", K_U32, O_(ctx), 0, 0, 1u << 24, "N",
     "tokens cached per sequence before each call, filled with Append first (1024)"},
    {"batch", K_U32, O_(batch), 0, 1, 65536, "N", "decode sequences per call (16)"},
    {"chunk", K_U32, O_(chunk), 0, 1, 1u << 20, "N", "prefill tokens per call (256)"},
    {"layers", K_U32, O_(layers), 0, 1, 4096, "N",
     "sessions have the first N layers of their preset (the server keeps KV for every layer "
     "of a session), and calls cycle through them (1)"},
    {"", K_SECTION, 0, 0, 0, 0, NULL, "Load"},
    {"callers", K_U32, O_(callers), 0, 1, 4096, "N",
     "concurrent callers per tenant (threads, one call in flight each, each with sequences of its "
     "own in a session) (1)"},
    {"streams", K_FLAG, O_(streams), 0, 0, 0, NULL,
     "each caller sends its calls on one AttendStream instead of unary Attend calls"},
    {"rate", K_DBL, O_(rate), 0, 0, 1e7, "R",
     "open loop: R calls/s per tenant, each caller on a fixed schedule; latency counts from the "
     "scheduled time, so time spent queued behind a slow call is not hidden (0 = closed loop, "
     "the default)"},
    {"duration", K_DBL, O_(duration_s), 0, 0.1, 86400, "S", "seconds per phase and device (10)"},
    {"calls", K_U64, O_(calls), 0, 1, 1e12, "N",
     "calls per phase, device and tenant instead of --duration, split among its callers"},
    {"warmup", K_U32, O_(warmup), 0, 0, 1000000, "N",
     "unmeasured calls per caller before each phase (2)"},
    {"timeout-ms", K_U32, O_(timeout_ms), 0, 1, 86400000, "N", "deadline of each call (60000)"},
    {"", K_SECTION, 0, 0, 0, 0, NULL, "Tenants"},
    {"tenant", K_TENANT, 0, 0, 0, 0, "NAME[:TOKEN[:WEIGHT[:CALLERS]]]",
     "repeatable: act as tenant NAME ([A-Za-z0-9_-], starts its session names; default one "
     "tenant, bench) with its own callers and sessions; TOKEN is sent as \"authorization: Bearer "
     "TOKEN\" (empty: --token); WEIGHT (1-1000, default 1) is the weight the server is expected "
     "to give it, reported beside the share of work it completed; CALLERS replaces --callers"},
    {"token", K_STR, 0, 512, 0, 0, "TOKEN",
     "the bearer token of every tenant whose --tenant gives none"},
    {"", K_SECTION, 0, 0, 0, 0, NULL, "Output"},
    {"json", K_STR, O_(json_path), 1024, 0, 0, "FILE", "also write the report as JSON to FILE"},
    {"plot", K_STR, O_(plot_prefix), 1024, 0, 0, "PREFIX",
     "PREFIX-latency.png (latency over time) and PREFIX-histogram.png, drawn by gnuplot "
     "(Debian: gnuplot-nox); skipped with a message when gnuplot is not on PATH"},
    {"help", K_HELP, 0, 0, 0, 0, NULL, "this help"},
};
#undef O_
#define N_OPTS (sizeof opts / sizeof opts[0])

static const char usage_line[] = "usage: attnd-bench [options]  (attnd-bench --help lists them)";

static void print_help(void) {
    printf("usage: attnd-bench [options]\n\n"
           "attnd's load generator: sessions of model presets on an attnd server, concurrent\n"
           "callers (unary Attend or AttendStream), workload phases run back to back, closed loop\n"
           "or open loop at a target rate. Caches are filled to --ctx with Append first. Progress\n"
           "goes to stderr, the report to stdout: latency p50/p90/p99/p99.9/max of successful\n"
           "calls, calls/s, tokens/s, MB/s (request + response payload, 1 MB = 10^6 bytes),\n"
           "errors by status name; in total and per tenant, with each tenant's share of the\n"
           "completed work (query tokens x keys attended).\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt_t *op = &opts[i];
        if (op->kind == K_SECTION) {
            printf("\n%s:\n", op->help);
            continue;
        }
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", op->name, op->arg ? " " : "",
                 op->arg ? op->arg : "");
        /* wrap the help text at about 100 columns, under its own column */
        const char *h = op->help;
        int indent = 26;
        printf("  %-*s", indent - 2, left);
        if ((int)strlen(left) > indent - 3)
            printf("\n%*s", indent, "");
        while (*h != '\0') {
            size_t len = strlen(h), cut = len;
            if (len > 74) {
                cut = 74;
                while (cut > 0 && h[cut] != ' ')
                    cut--;
                if (cut == 0)
                    cut = 74;
            }
            printf("%.*s\n", (int)cut, h);
            h += cut;
            while (*h == ' ')
                h++;
            if (*h != '\0')
                printf("%*s", indent, "");
        }
    }
    printf("\nPresets: JSON files of ModelConfig fields (attention.proto), bench/presets/ in the\n"
           "source tree.\n"
           "Exit status: 0 done; 1 setup failed (server unreachable, a session or the fill\n"
           "failed); 2 bad usage; 3 done, but some measured calls failed; 130 interrupted.\n");
}

/* Prints "attnd-bench: <message>" and the usage line; returns 2 (bad usage). */
__attribute__((format(printf, 1, 2))) static int bad(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "attnd-bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n%s\n", usage_line);
    va_end(ap);
    return 2;
}

static const opt_t *find_opt(const char *name, size_t len) {
    for (size_t i = 0; i < N_OPTS; i++)
        if (opts[i].kind != K_SECTION && strlen(opts[i].name) == len &&
            strncmp(opts[i].name, name, len) == 0)
            return &opts[i];
    return NULL;
}

static bool tenant_name_ok(const char *s, size_t n) {
    if (n == 0 || n > AB_TENANT_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return false;
    }
    return true;
}

/* A whole number from lo to hi, all of s; false otherwise. */
static bool parse_whole(const char *s, size_t n, unsigned long lo, unsigned long hi,
                        uint32_t *out) {
    char buf[16];
    if (n == 0 || n >= sizeof buf)
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *end = NULL;
    errno = 0;
    unsigned long x = strtoul(buf, &end, 10);
    if (errno != 0 || *end != '\0' || buf[0] < '0' || buf[0] > '9' || x < lo || x > hi)
        return false;
    *out = (uint32_t)x;
    return true;
}

/* NAME[:TOKEN[:WEIGHT[:CALLERS]]]; tokens cannot hold ':'. callers stays 0 when not given. */
static int parse_tenant(ab_opts_t *o, const char *v) {
    if (o->n_tenants == AB_MAX_TENANTS)
        return bad("--tenant: at most %d tenants", AB_MAX_TENANTS);
    ab_tenant_t *t = &o->tenants[o->n_tenants];
    memset(t, 0, sizeof *t);
    t->weight = 1;
    const char *field[4] = {v, NULL, NULL, NULL};
    size_t len[4] = {0};
    size_t n_fields = 1;
    for (const char *p = v; *p != '\0'; p++)
        if (*p == ':') {
            if (n_fields == 4)
                return bad("--tenant '%s': expected NAME[:TOKEN[:WEIGHT[:CALLERS]]]", v);
            field[n_fields++] = p + 1;
        }
    for (size_t i = 0; i < n_fields; i++)
        len[i] = i + 1 < n_fields ? (size_t)(field[i + 1] - field[i] - 1) : strlen(field[i]);
    if (!tenant_name_ok(field[0], len[0]))
        return bad("--tenant '%s': NAME must be 1-%d characters of [A-Za-z0-9_-]", v,
                   AB_TENANT_NAME_MAX);
    memcpy(t->name, field[0], len[0]);
    if (n_fields > 1) {
        if (len[1] >= sizeof t->token)
            return bad("--tenant '%s': TOKEN is longer than %zu bytes", v, sizeof t->token - 1);
        memcpy(t->token, field[1], len[1]);
    }
    if (n_fields > 2 && !parse_whole(field[2], len[2], 1, 1000, &t->weight))
        return bad("--tenant '%s': WEIGHT must be a whole number from 1 to 1000", v);
    if (n_fields > 3 && !parse_whole(field[3], len[3], 1, 4096, &t->callers))
        return bad("--tenant '%s': CALLERS must be a whole number from 1 to 4096", v);
    for (uint32_t i = 0; i < o->n_tenants; i++)
        if (strcmp(o->tenants[i].name, t->name) == 0)
            return bad("--tenant: tenant '%s' given twice", t->name);
    o->n_tenants++;
    return 0;
}

static int set_value(ab_opts_t *o, const opt_t *op, const char *v, char *token) {
    char *field = (char *)o + op->off;
    if (op->kind == K_STR) {
        char *dst = strcmp(op->name, "token") == 0 ? token : field;
        if (strlen(v) >= op->size)
            return bad("--%s: longer than %zu bytes", op->name, op->size - 1);
        strcpy(dst, v);
        return 0;
    }
    char *end = NULL;
    errno = 0;
    double x = strtod(v, &end);
    bool whole = op->kind != K_DBL;
    if (errno != 0 || end == v || *end != '\0' || !isfinite(x) || x < op->lo || x > op->hi ||
        (whole && (x != floor(x) || strpbrk(v, ".eE") != NULL))) {
        return bad("--%s: expected %s from %.10g to %.10g, got '%s'", op->name,
                   whole ? "a whole number" : "a number", op->lo, op->hi, v);
    }
    if (op->kind == K_U32)
        *(uint32_t *)(void *)field = (uint32_t)x;
    else if (op->kind == K_U64)
        *(uint64_t *)(void *)field = (uint64_t)x;
    else
        *(double *)(void *)field = x;
    return 0;
}

static int parse_models(ab_opts_t *o, const char *list) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", list);
    o->n_models = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t != NULL;
         t = strtok_r(NULL, ",", &save)) {
        if (o->n_models == AB_MAX_MODELS)
            return bad("--model: at most %d models", AB_MAX_MODELS);
        if (strlen(t) >= sizeof o->models[0])
            return bad("--model: '%s' is too long", t);
        strcpy(o->models[o->n_models++], t);
    }
    if (o->n_models == 0)
        return bad("--model: expected preset names or paths, got '%s'", list);
    return 0;
}

static int parse_workloads(ab_opts_t *o, const char *list) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", list);
    o->n_workloads = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t != NULL;
         t = strtok_r(NULL, ",", &save)) {
        ab_workload_t w;
        if (strcmp(t, "decode") == 0)
            w = AB_DECODE;
        else if (strcmp(t, "prefill") == 0)
            w = AB_PREFILL;
        else if (strcmp(t, "mixed") == 0)
            w = AB_MIXED;
        else
            return bad("--workload: expected decode, prefill or mixed, got '%s'", t);
        if (o->n_workloads == AB_MAX_PHASES)
            return bad("--workload: at most %d phases", AB_MAX_PHASES);
        o->workloads[o->n_workloads++] = w;
    }
    if (o->n_workloads == 0)
        return bad("--workload: expected decode, prefill or mixed, got '%s'", list);
    return 0;
}

/* Fills in each tenant's load from the options. */
static int resolve_tenants(ab_opts_t *o, const char *token) {
    for (uint32_t i = 0; i < o->n_tenants; i++) {
        ab_tenant_t *t = &o->tenants[i];
        if (t->token[0] == '\0')
            snprintf(t->token, sizeof t->token, "%s", token);
        if (t->callers == 0)
            t->callers = o->callers;
        t->sessions = o->sessions;
        t->rate = o->rate;
        t->calls = o->calls;
        if (o->calls != 0 && o->calls < t->callers)
            return bad("--calls %llu is less than tenant %s's %u callers: every caller makes a "
                       "call", (unsigned long long)o->calls, t->name, t->callers);
    }
    return 0;
}

int ab_opts_parse(int argc, char **argv, ab_opts_t *o) {
    memset(o, 0, sizeof *o);
    snprintf(o->device, sizeof o->device, "cpu");
    o->sessions = 1;
    o->ctx = 1024;
    o->batch = 16;
    o->chunk = 256;
    o->layers = 1;
    o->callers = 1;
    o->duration_s = 10;
    o->warmup = 2;
    o->timeout_ms = 60000;
    raw_lists_t lists = {.models = "llama-3.1-8b", .workloads = "decode"};
    char token[512] = "";
    bool seen_duration = false;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0)
            a = "--help";
        if (strncmp(a, "--", 2) != 0)
            return bad("unexpected argument '%s'", a);
        const char *eq = strchr(a, '=');
        size_t n = eq != NULL ? (size_t)(eq - a - 2) : strlen(a + 2);
        const opt_t *op = find_opt(a + 2, n);
        if (op == NULL)
            return bad("unknown option '%s'", a);
        if (op->kind == K_HELP) {
            print_help();
            return 1;
        }
        if (op->kind == K_FLAG) {
            if (eq != NULL)
                return bad("--%s takes no value", op->name);
            *(bool *)(void *)((char *)o + op->off) = true;
            continue;
        }
        const char *v = eq != NULL ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (v == NULL)
            return bad("--%s needs a value (%s)", op->name, op->arg);
        int rc = 0;
        if (op->kind == K_TENANT) {
            rc = parse_tenant(o, v);
        } else if (op->kind == K_ARG) {
            if (o->n_server_args == AB_MAX_SERVER_ARGS)
                return bad("--server-arg: at most %d", AB_MAX_SERVER_ARGS);
            o->server_args[o->n_server_args++] = v;
        } else if (op->kind == K_LIST) {
            char *dst = strcmp(op->name, "model") == 0 ? lists.models : lists.workloads;
            size_t cap = strcmp(op->name, "model") == 0 ? sizeof lists.models
                                                        : sizeof lists.workloads;
            if (strlen(v) >= cap)
                return bad("--%s: the list is too long", op->name);
            strcpy(dst, v);
        } else {
            rc = set_value(o, op, v, token);
            seen_duration |= strcmp(op->name, "duration") == 0;
        }
        if (rc != 0)
            return rc;
    }
    int rc = parse_models(o, lists.models);
    if (rc == 0)
        rc = parse_workloads(o, lists.workloads);
    if (rc != 0)
        return rc;
    if (seen_duration && o->calls != 0)
        return bad("--duration and --calls both bound a phase: give one");
    if (o->compare_null && strcmp(o->device, "null") == 0)
        return bad("--compare-null compares --device with null: --device must not be null");
    if (o->target[0] != '\0' && (o->attnd[0] != '\0' || o->n_server_args != 0))
        return bad("--attnd and --server-arg are for a spawned server: not with --target");
    if (o->n_tenants == 0 && parse_tenant(o, "bench") != 0)
        return 2;
    return resolve_tenants(o, token);
}

const char *ab_workload_name(ab_workload_t w) {
    switch (w) {
    case AB_DECODE: return "decode";
    case AB_PREFILL: return "prefill";
    case AB_MIXED: return "mixed";
    }
    return "?";
}

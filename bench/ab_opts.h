/* attnd-bench's command line: the options and their checks. Every tenant runs the same load
 * (--callers, --sessions, --rate, --calls each, unless its --tenant spec gives its own callers),
 * so that differences in the work each one completes come from the server, not from the bench. */
#ifndef AT_BENCH_AB_OPTS_H
#define AT_BENCH_AB_OPTS_H

#include <stdbool.h>
#include <stdint.h>

#define AB_MAX_TENANTS 16
#define AB_MAX_MODELS 8
#define AB_MAX_PHASES 8
#define AB_TENANT_NAME_MAX 32
#define AB_MAX_SERVER_ARGS 16

typedef enum ab_workload {
    AB_DECODE,  /* batch sequences x 1 token at ctx cached tokens */
    AB_PREFILL, /* one sequence, a chunk of tokens after ctx cached tokens */
    AB_MIXED,   /* both in one call: chunked prefill */
} ab_workload_t;

/* One tenant: its own callers and sessions. */
typedef struct ab_tenant {
    char name[AB_TENANT_NAME_MAX + 1]; /* [A-Za-z0-9_-], part of its session names */
    char token[512];                   /* "" = no authorization metadata */
    uint32_t weight;                   /* the weight the server is expected to give it; only
                                        * reported, next to the share of work it got */
    uint32_t callers;                  /* from its spec, else --callers; >= 1 */
    uint32_t sessions;                 /* --sessions */
    double rate;                       /* calls/s, --rate; 0 = closed loop */
    uint64_t calls;                    /* per phase and device, --calls; 0 = duration */
} ab_tenant_t;

typedef struct ab_opts {
    char target[256];          /* "" = spawn a server */
    char attnd[1024];          /* the binary to spawn; "" = find it */
    uint32_t server_threads;   /* the spawned server's --cpu-threads; 0 = all CPUs */
    const char *server_args[AB_MAX_SERVER_ARGS]; /* borrowed from argv: more `attnd serve`
                                                  * options */
    uint32_t n_server_args;
    char models[AB_MAX_MODELS][256]; /* preset names or .json paths */
    uint32_t n_models;
    char presets_dir[1024];    /* "" = beside the binary (see ab_preset_dir) */
    uint32_t sessions;         /* per device and tenant */
    char device[64];           /* the real device */
    bool compare_null;         /* each phase on device and then on "null" */
    ab_workload_t workloads[AB_MAX_PHASES]; /* the phases, in order */
    uint32_t n_workloads;
    uint32_t ctx;              /* tokens cached per sequence before each call */
    uint32_t batch;            /* decode sequences per call */
    uint32_t chunk;            /* prefill tokens per call */
    uint32_t layers;           /* calls cycle through layers 0 .. layers-1 */
    uint32_t callers;          /* per tenant */
    bool streams;              /* AttendStream instead of unary Attend */
    double rate;               /* calls/s per tenant; 0 = closed loop */
    double duration_s;         /* per phase and device, when calls is 0 */
    uint64_t calls;            /* per phase, device and tenant; 0 = duration */
    uint32_t warmup;           /* unmeasured calls per caller before each phase */
    uint32_t timeout_ms;       /* deadline of each call */
    ab_tenant_t tenants[AB_MAX_TENANTS];
    uint32_t n_tenants;
    char json_path[1024];      /* "" = none */
    char plot_prefix[1024];    /* "" = none */
} ab_opts_t;

/* Parses argv into *o (defaults first) and checks it; argv must outlive *o (server_args).
 * Returns 0; 1 when --help was printed (on stdout); 2 on bad usage, after a message naming the
 * option and the usage line on stderr. Thread: main. */
int ab_opts_parse(int argc, char **argv, ab_opts_t *o);

/* "decode", "prefill" or "mixed". Static storage. */
const char *ab_workload_name(ab_workload_t w);

#endif

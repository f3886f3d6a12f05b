/* attnd-bench: attnd's load generator (see `attnd-bench --help` and README.md).
 *
 * One run: parse the options, load the model presets, spawn `attnd serve --null-device` on a
 * free loopback port unless --target names a server, create each tenant's sessions on the device
 * (and on device "null" with --compare-null), fill their caches to --ctx with Append, then run
 * each workload phase on the device and then on null, and report.
 *
 * Exit status: 0 done; 1 setup failed; 2 bad usage; 3 done, but some measured calls failed;
 * 130 interrupted (the report covers what ran).
 *
 * Thread model: the main thread does everything but the calls of a phase, which ab_load runs on
 * caller threads it starts and joins. The server is spawned before grpc_init, while this is the
 * only thread. */
#include <grpc/grpc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/ab_load.h"
#include "bench/ab_opts.h"
#include "bench/ab_plot.h"
#include "bench/ab_preset.h"
#include "bench/ab_report.h"
#include "bench/ab_server.h"
#include "bench/ab_setup.h"
#include "bench/ab_term.h"
#include "bench/ab_work.h"
#include "bench/bench_client.h"

/* Everything a run owns. */
typedef struct bench {
    ab_opts_t opts;
    ab_model_t models[AB_MAX_MODELS];
    uint32_t n_models;
    ab_shape_t shape;
    const char *devices[2]; /* the device, and "null" with --compare-null */
    uint32_t n_devices;
    ab_session_t *sessions[2]; /* owned: per device, [n_sessions], tenant by tenant */
    uint32_t n_sessions;
    ab_phase_t phases[AB_MAX_PHASES];
    uint32_t n_phases;     /* phases with results */
    char target[256];
    double load_before;    /* ab_report_t's */
    pid_t server;          /* spawned; 0 = none */
    grpc_channel *ch;      /* owned */
} bench_t;

static int load_models(bench_t *b) {
    const ab_opts_t *o = &b->opts;
    char dir[1024] = "";
    for (uint32_t i = 0; i < o->n_models; i++) {
        size_t n = strlen(o->models[i]);
        bool is_path = strchr(o->models[i], '/') != NULL ||
                       (n > 5 && strcmp(o->models[i] + n - 5, ".json") == 0);
        if (!is_path && dir[0] == '\0' &&
            ab_preset_dir(o->presets_dir, dir, sizeof dir) != 0)
            return -1;
        if (ab_model_load(o->models[i], dir, &b->models[i]) != 0)
            return -1;
        b->n_models++;
        if (o->layers > b->models[i].cfg.num_layers) {
            fprintf(stderr, "attnd-bench: --layers %u: preset %s has %u layers\n", o->layers,
                    b->models[i].name, b->models[i].cfg.num_layers);
            return -1;
        }
    }
    return 0;
}

static bool uses(const ab_opts_t *o, ab_workload_t w) {
    for (uint32_t i = 0; i < o->n_workloads; i++)
        if (o->workloads[i] == w)
            return true;
    return false;
}

/* The session of tenant t that its caller j uses, and that caller's slot in it. */
static uint32_t caller_session(const ab_tenant_t *t, uint32_t j) {
    return j % t->sessions;
}

static uint32_t caller_slot(const ab_tenant_t *t, uint32_t j) {
    return j / t->sessions;
}

/* Index of tenant t's first session in a device's session array. */
static uint32_t first_session(const ab_opts_t *o, uint32_t t) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < t; i++)
        n += o->tenants[i].sessions;
    return n;
}

/* Creates and fills every session on device d. */
static int setup_device(bench_t *b, uint32_t d) {
    const ab_opts_t *o = &b->opts;
    ab_session_t *ss = calloc(b->n_sessions, sizeof *ss);
    if (ss == NULL) {
        fprintf(stderr, "attnd-bench: out of memory for %u sessions\n", b->n_sessions);
        return -1;
    }
    b->sessions[d] = ss;
    bool decode = uses(o, AB_DECODE) || uses(o, AB_MIXED);
    bool prefill = uses(o, AB_PREFILL) || uses(o, AB_MIXED);
    for (uint32_t t = 0; t < o->n_tenants; t++) {
        const ab_tenant_t *tn = &o->tenants[t];
        for (uint32_t i = 0; i < tn->sessions; i++) {
            ab_session_t *s = &ss[first_session(o, t) + i];
            snprintf(s->name, sizeof s->name, "ab-%s-%s-%d-%u", tn->name, b->devices[d],
                     (int)getpid(), i);
            s->model = &b->models[i % b->n_models];
            s->tenant = (uint16_t)t;
            s->token = tn->token;
            s->device = b->devices[d];
            /* callers j = i, i + sessions, ... use this session; at least one slot anyway */
            s->slots = tn->callers > i ? (tn->callers - i + tn->sessions - 1) / tn->sessions : 1;
            uint64_t cap = ab_work_capacity_tokens(s->model, &b->shape, s->slots, decode, prefill);
            if (ab_setup_create(b->ch, s, o->layers, cap) != 0)
                return -1;
        }
    }
    return ab_setup_fill(b->ch, ss, b->n_sessions, &b->shape, o->layers, decode, prefill);
}

/* Caller specs and their requests for workload w on device d. */
typedef struct phase_plan {
    ab_caller_spec_t *specs; /* [n] */
    ab_buf_t *reqs;          /* [n * layers] */
    uint32_t n;
    uint32_t layers;
} phase_plan_t;

static void plan_fini(phase_plan_t *p) {
    for (size_t i = 0; p->reqs != NULL && i < (size_t)p->n * p->layers; i++)
        ab_buf_fini(&p->reqs[i]);
    free(p->reqs);
    free(p->specs);
    memset(p, 0, sizeof *p);
}

static int plan_phase(const bench_t *b, ab_workload_t w, uint32_t d, phase_plan_t *p) {
    const ab_opts_t *o = &b->opts;
    memset(p, 0, sizeof *p);
    for (uint32_t t = 0; t < o->n_tenants; t++)
        p->n += o->tenants[t].callers;
    p->layers = o->layers;
    p->specs = calloc(p->n, sizeof *p->specs);
    p->reqs = calloc((size_t)p->n * p->layers, sizeof *p->reqs);
    if (p->specs == NULL || p->reqs == NULL)
        goto oom;
    uint32_t k = 0;
    for (uint32_t t = 0; t < o->n_tenants; t++) {
        const ab_tenant_t *tn = &o->tenants[t];
        for (uint32_t j = 0; j < tn->callers; j++, k++) {
            const ab_session_t *s = &b->sessions[d][first_session(o, t) + caller_session(tn, j)];
            ab_buf_t *reqs = &p->reqs[(size_t)k * p->layers];
            for (uint32_t layer = 0; layer < p->layers; layer++)
                if (ab_work_request(s->model, w, &b->shape, s->name, caller_slot(tn, j), layer,
                                    &reqs[layer]) != 0)
                    goto oom;
            ab_caller_spec_t *c = &p->specs[k];
            c->tenant = (uint16_t)t;
            c->token = tn->token;
            c->reqs = reqs;
            c->n_reqs = p->layers;
            if (tn->rate > 0) { /* the tenant's callers take turns on its schedule */
                c->interval_s = tn->callers / tn->rate;
                c->offset_s = j / tn->rate;
            }
            if (tn->calls != 0)
                c->calls = tn->calls / tn->callers + (j < tn->calls % tn->callers ? 1 : 0);
        }
    }
    return 0;
oom:
    fprintf(stderr, "attnd-bench: out of memory for the %s requests\n", ab_workload_name(w));
    plan_fini(p);
    return -1;
}

static int run_phases(bench_t *b) {
    const ab_opts_t *o = &b->opts;
    for (uint32_t i = 0; i < o->n_workloads && !ab_term_interrupted(); i++) {
        ab_phase_t *ph = &b->phases[i];
        ph->workload = o->workloads[i];
        ph->tokens_per_call = ab_work_tokens(ph->workload, &b->shape);
        ph->cost_per_call = ab_work_cost(ph->workload, &b->shape);
        b->n_phases = i + 1;
        for (uint32_t d = 0; d < b->n_devices && !ab_term_interrupted(); d++) {
            phase_plan_t plan;
            if (plan_phase(b, ph->workload, d, &plan) != 0)
                return -1;
            char label[64];
            snprintf(label, sizeof label, "%s %s", ab_workload_name(ph->workload),
                     b->devices[d]);
            ab_load_cfg_t cfg = {.ch = b->ch, .streams = o->streams, .timeout_ms = o->timeout_ms,
                                 .duration_s = o->duration_s, .warmup = o->warmup,
                                 .label = label};
            int rc = ab_load_run(&cfg, plan.specs, plan.n, &ph->runs[d]);
            plan_fini(&plan);
            if (rc != 0)
                return -1;
            ph->devices[d] = b->devices[d];
            ph->n_runs = d + 1;
        }
    }
    return 0;
}

/* Report to stdout, --json and --plot. Returns 0, or -1 when one of them failed. */
static int report(const bench_t *b) {
    ab_report_t r = {.opts = &b->opts, .models = b->models, .n_models = b->n_models,
                     .target = b->target, .spawned = b->server > 0, .phases = b->phases,
                     .n_phases = b->n_phases, .load_before = b->load_before,
                     .cpus = sysconf(_SC_NPROCESSORS_ONLN)};
    int rc = ab_report_print(&r, stdout);
    if (b->opts.json_path[0] != '\0' && ab_report_write_json(&r, b->opts.json_path) != 0)
        rc = -1;
    if (b->opts.plot_prefix[0] != '\0' && ab_plot_write(&r, b->opts.plot_prefix) != 0)
        rc = -1;
    return rc;
}

static bool any_call_failed(const bench_t *b) {
    for (uint32_t i = 0; i < b->n_phases; i++)
        for (uint32_t d = 0; d < b->phases[i].n_runs; d++) {
            const ab_run_t *run = &b->phases[i].runs[d];
            for (size_t k = 0; k < run->n_recs; k++)
                if (run->recs[k].status != GRPC_STATUS_OK)
                    return true;
        }
    return false;
}

/* The host's 1-minute load average, or -1. */
static double load_average(void) {
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f != NULL) {
        if (fscanf(f, "%lf", &l) != 1)
            l = -1;
        fclose(f);
    }
    return l;
}

/* Everything after the options and models: server, sessions, phases, report. */
static int run(bench_t *b) {
    const ab_opts_t *o = &b->opts;
    b->load_before = load_average();
    if (o->target[0] != '\0') {
        snprintf(b->target, sizeof b->target, "%s", o->target);
    } else {
        char attnd[1024];
        if (ab_server_find(o->attnd, attnd, sizeof attnd) != 0 ||
            ab_server_start(attnd, o->server_threads, o->server_args, o->n_server_args,
                            b->target, sizeof b->target, &b->server) != 0)
            return 1;
    }
    grpc_init();
    b->ch = bench_channel_create(b->target);
    int rc = 1;
    if (ab_setup_check_server(b->ch, b->target, o->tenants[0].token) != 0)
        goto out;
    for (uint32_t d = 0; d < b->n_devices; d++)
        if (setup_device(b, d) != 0)
            goto out;
    if (run_phases(b) != 0)
        goto out;
    rc = report(b) != 0          ? 1
         : ab_term_interrupted() ? 130
         : any_call_failed(b)    ? 3
                                 : 0;
out:
    if (rc == 1 && ab_term_interrupted())
        rc = 130;
    for (uint32_t d = 0; d < b->n_devices; d++)
        if (b->sessions[d] != NULL)
            ab_setup_close(b->ch, b->sessions[d], b->n_sessions);
    grpc_channel_destroy(b->ch);
    grpc_shutdown();
    if (b->server > 0 && ab_server_stop(b->server) != 0 && rc == 0)
        rc = 1;
    return rc;
}

int main(int argc, char **argv) {
    ab_term_init();
    bench_t *b = calloc(1, sizeof *b);
    if (b == NULL) {
        fprintf(stderr, "attnd-bench: out of memory\n");
        return 1;
    }
    int rc = ab_opts_parse(argc, argv, &b->opts);
    if (rc == 0) {
        const ab_opts_t *o = &b->opts;
        b->shape = (ab_shape_t){.ctx = o->ctx, .batch = o->batch, .chunk = o->chunk};
        b->devices[b->n_devices++] = o->device;
        if (o->compare_null)
            b->devices[b->n_devices++] = "null";
        for (uint32_t t = 0; t < o->n_tenants; t++)
            b->n_sessions += o->tenants[t].sessions;
        rc = load_models(b) != 0 ? 2 : run(b);
    } else if (rc == 1) {
        rc = 0; /* --help */
    }
    for (uint32_t i = 0; i < b->n_phases; i++)
        for (uint32_t d = 0; d < 2; d++)
            ab_run_fini(&b->phases[i].runs[d]);
    for (uint32_t d = 0; d < 2; d++)
        free(b->sessions[d]);
    for (uint32_t i = 0; i < b->n_models; i++)
        ab_model_fini(&b->models[i]);
    free(b);
    return rc;
}

/* attnd-bench's report (see ab_report.h). Latency percentiles are exact (nearest rank over the
 * sorted latencies of successful calls); rates divide by the phase's wall time, from its start
 * to its last call's end.
 *
 * Thread model: main thread only, after every caller has been joined. */
#include "bench/ab_report.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_client.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest value with at least p of the values at or below it. */
static double quantile(const double *sorted, size_t n, double p) {
    size_t rank = (size_t)ceil(p * (double)n);
    return sorted[rank > 0 ? rank - 1 : 0];
}

static int status_slot(int status) {
    if (status < AB_STATUS_CLIENT || status >= AB_STATUS_SLOTS - 1)
        status = GRPC_STATUS_UNKNOWN;
    return status + 1;
}

const char *ab_status_name(int status) {
    return status == AB_STATUS_CLIENT ? "CLIENT_ERROR" : bench_status_name(status);
}

int ab_stats_compute(const ab_run_t *run, int tenant, uint32_t tokens_per_call,
                     double cost_per_call, ab_stats_t *out) {
    memset(out, 0, sizeof *out);
    double *lat = malloc((run->n_recs + 1) * sizeof *lat);
    if (lat == NULL) {
        fprintf(stderr, "attnd-bench: out of memory for %zu latencies\n", run->n_recs);
        return -1;
    }
    double bytes = 0, sum = 0;
    size_t n = 0;
    for (size_t i = 0; i < run->n_recs; i++) {
        const ab_rec_t *rec = &run->recs[i];
        if (tenant >= 0 && rec->tenant != tenant)
            continue;
        out->calls++;
        out->by_status[status_slot(rec->status)]++;
        bytes += (double)rec->req_bytes + (double)rec->resp_bytes;
        if (rec->status == GRPC_STATUS_OK) {
            lat[n++] = rec->lat_s;
            sum += rec->lat_s;
        }
    }
    out->ok = n;
    out->work = (double)n * cost_per_call;
    if (n > 0) {
        qsort(lat, n, sizeof *lat, cmp_double);
        out->p50_s = quantile(lat, n, 0.50);
        out->p90_s = quantile(lat, n, 0.90);
        out->p99_s = quantile(lat, n, 0.99);
        out->p999_s = quantile(lat, n, 0.999);
        out->max_s = lat[n - 1];
        out->mean_s = sum / (double)n;
    }
    if (run->wall_s > 0) {
        out->calls_per_s = (double)n / run->wall_s;
        out->tokens_per_s = (double)n * tokens_per_call / run->wall_s;
        out->mb_per_s = bytes / 1e6 / run->wall_s;
    }
    free(lat);
    return 0;
}

static void model_summary(const ab_model_t *m, char *buf, size_t len) {
    const Attnd__V1__ModelConfig *c = &m->cfg;
    int w = snprintf(buf, len, "%s: %u layers, %u query / %u KV heads, head_dim %u, %s", m->name,
                     c->num_layers, c->num_query_heads, c->num_kv_heads, c->head_dim,
                     ab_model_dtype_name(m));
    size_t used = w > 0 && (size_t)w < len ? (size_t)w : len - 1;
    if (c->sliding_window != 0)
        used += (size_t)snprintf(buf + used, len - used, ", window %u", c->sliding_window);
    if (c->n_layer_sliding_window != 0 && used < len) {
        uint32_t windowed = 0, width = 0;
        for (size_t i = 0; i < c->n_layer_sliding_window; i++)
            if (c->layer_sliding_window[i] != 0) {
                windowed++;
                width = c->layer_sliding_window[i];
            }
        used += (size_t)snprintf(buf + used, len - used, ", %u of %zu layers windowed (%u)",
                                 windowed, c->n_layer_sliding_window, width);
    }
    if (c->logits_soft_cap != 0 && used < len)
        used += (size_t)snprintf(buf + used, len - used, ", soft cap %g", c->logits_soft_cap);
    if (c->n_sinks != 0 && used < len)
        used += (size_t)snprintf(buf + used, len - used, ", sinks");
    if (c->n_alibi_slopes != 0 && used < len)
        snprintf(buf + used, len - used, ", ALiBi");
}

static void print_header(const ab_report_t *r, FILE *f) {
    const ab_opts_t *o = r->opts;
    uint32_t callers = 0;
    for (uint32_t i = 0; i < o->n_tenants; i++)
        callers += o->tenants[i].callers;
    fprintf(f, "attnd-bench: %s%s, %s, %u caller%s, ", r->target,
            r->spawned ? " (spawned attnd serve)" : "",
            o->streams ? "AttendStream" : "unary Attend", callers, callers == 1 ? "" : "s");
    if (o->rate > 0)
        fprintf(f, "open loop at %.6g calls/s, ", o->rate);
    else
        fprintf(f, "closed loop, ");
    if (o->calls != 0)
        fprintf(f, "%llu calls per tenant,", (unsigned long long)o->calls);
    else
        fprintf(f, "%.6g s", o->duration_s);
    fprintf(f, " per phase and device, %u warmup call%s per caller\n", o->warmup,
            o->warmup == 1 ? "" : "s");
    if (r->load_before >= 0)
        fprintf(f, "host    %ld CPUs, load average %.2f before the run%s\n", r->cpus,
                r->load_before,
                r->load_before > 0.5 * (double)r->cpus ? " (busy: figures are skewed)" : "");
    for (uint32_t i = 0; i < r->n_models; i++) {
        char line[512];
        model_summary(&r->models[i], line, sizeof line);
        fprintf(f, "model   %s\n", line);
    }
    for (uint32_t i = 0; i < o->n_tenants; i++) {
        const ab_tenant_t *t = &o->tenants[i];
        fprintf(f, "tenant  %s: weight %u, %u caller%s, %u session%s", t->name, t->weight,
                t->callers, t->callers == 1 ? "" : "s", t->sessions, t->sessions == 1 ? "" : "s");
        if (t->rate > 0)
            fprintf(f, ", %.6g calls/s", t->rate);
        fprintf(f, "%s\n", t->token[0] != '\0' ? ", bearer token" : "");
    }
}

static void print_phase_title(const ab_report_t *r, const ab_phase_t *ph, FILE *f) {
    const ab_opts_t *o = r->opts;
    fprintf(f, "\nphase %s: ", ab_workload_name(ph->workload));
    if (ph->workload != AB_PREFILL)
        fprintf(f, "%u sequences x 1 token", o->batch);
    if (ph->workload == AB_MIXED)
        fprintf(f, " + ");
    if (ph->workload != AB_DECODE)
        fprintf(f, "a %u-token prefill chunk", o->chunk);
    fprintf(f, " after %u cached tokens, %u layer%s a session\n", o->ctx, o->layers,
            o->layers == 1 ? "" : "s");
}

/* share: the tenant's share of the run's completed work; shown when not negative. */
static void print_row(FILE *f, const char *device, const char *tenant, const ab_stats_t *s,
                      double share) {
    char sh[16] = "";
    if (share >= 0)
        snprintf(sh, sizeof sh, "%.3f", share);
    fprintf(f, "%-8s %-12s %9llu %7llu %10.2f %10.1f %9.2f %9.3f %9.3f %9.3f %9.3f %9.3f %6s\n",
            device, tenant, (unsigned long long)s->calls,
            (unsigned long long)(s->calls - s->ok), s->calls_per_s, s->tokens_per_s, s->mb_per_s,
            s->p50_s * 1e3, s->p90_s * 1e3, s->p99_s * 1e3, s->p999_s * 1e3, s->max_s * 1e3, sh);
}

/* A tenant's share of the weights (what a fair server gives it when every tenant is busy). */
static double weight_share(const ab_opts_t *o, uint32_t t) {
    double sum = 0;
    for (uint32_t i = 0; i < o->n_tenants; i++)
        sum += o->tenants[i].weight;
    return o->tenants[t].weight / sum;
}

static double share_of(double part, double whole) {
    return whole > 0 ? part / whole : 0;
}

static void print_errors(FILE *f, const char *device, const char *tenant, const ab_stats_t *s) {
    if (s->calls == s->ok)
        return;
    fprintf(f, "  errors on %s, %s:", device, tenant);
    const char *sep = " ";
    for (int slot = 0; slot < AB_STATUS_SLOTS; slot++)
        if (slot != GRPC_STATUS_OK + 1 && s->by_status[slot] != 0) {
            fprintf(f, "%s%s %llu", sep, ab_status_name(slot - 1),
                    (unsigned long long)s->by_status[slot]);
            sep = ", ";
        }
    fprintf(f, "\n");
}

static int print_phase(const ab_report_t *r, const ab_phase_t *ph, FILE *f) {
    const ab_opts_t *o = r->opts;
    print_phase_title(r, ph, f);
    fprintf(f, "%-8s %-12s %9s %7s %10s %10s %9s %9s %9s %9s %9s %9s %6s\n", "device", "tenant",
            "calls", "errors", "calls/s", "tokens/s", "MB/s", "p50 ms", "p90 ms", "p99 ms",
            "p99.9 ms", "max ms", "share");
    ab_stats_t total[2];
    for (uint32_t d = 0; d < ph->n_runs; d++) {
        if (ab_stats_compute(&ph->runs[d], -1, ph->tokens_per_call, ph->cost_per_call,
                             &total[d]) != 0)
            return -1;
        print_row(f, ph->devices[d], "all", &total[d], -1);
        print_errors(f, ph->devices[d], "all", &total[d]);
        for (uint32_t t = 0; o->n_tenants > 1 && t < o->n_tenants; t++) {
            ab_stats_t s;
            if (ab_stats_compute(&ph->runs[d], (int)t, ph->tokens_per_call, ph->cost_per_call,
                                 &s) != 0)
                return -1;
            print_row(f, ph->devices[d], o->tenants[t].name, &s, share_of(s.work, total[d].work));
            print_errors(f, ph->devices[d], o->tenants[t].name, &s);
        }
        if (ph->runs[d].unsent != 0)
            fprintf(f, "  %s: %llu calls due were never sent: the callers fell behind the "
                       "schedule (more --callers, or a lower --rate)\n", ph->devices[d],
                    (unsigned long long)ph->runs[d].unsent);
        if (ph->runs[d].interrupted)
            fprintf(f, "  %s: interrupted; these figures cover the calls made until then\n",
                    ph->devices[d]);
    }
    if (o->n_tenants > 1) {
        fprintf(f, "share: each tenant's part of the completed work (query tokens x keys "
                   "attended); weights give");
        for (uint32_t t = 0; t < o->n_tenants; t++)
            fprintf(f, "%s %s %.3f", t == 0 ? "" : ",", o->tenants[t].name, weight_share(o, t));
        fprintf(f, "\n");
    }
    if (ph->n_runs == 2) {
        if (total[0].ok > 0 && total[1].ok > 0)
            fprintf(f, "service overhead, null / %s latency: p50 %.4f, p99 %.4f, mean %.4f\n",
                    ph->devices[0], total[1].p50_s / total[0].p50_s,
                    total[1].p99_s / total[0].p99_s, total[1].mean_s / total[0].mean_s);
        else
            fprintf(f, "service overhead: not measured (no successful calls on one device)\n");
    }
    return 0;
}

int ab_report_print(const ab_report_t *r, FILE *f) {
    print_header(r, f);
    for (uint32_t i = 0; i < r->n_phases; i++)
        if (print_phase(r, &r->phases[i], f) != 0)
            return -1;
    fflush(f);
    return 0;
}

/* JSON. Each builder returns a new reference, or NULL when jansson runs out of memory; json_pack
 * takes the "o" arguments' references even when it fails. */

static json_t *stats_json(const ab_stats_t *s) {
    json_t *errors = json_object();
    for (int slot = 0; errors != NULL && slot < AB_STATUS_SLOTS; slot++)
        if (slot != GRPC_STATUS_OK + 1 && s->by_status[slot] != 0 &&
            json_object_set_new(errors, ab_status_name(slot - 1),
                                json_integer((json_int_t)s->by_status[slot])) != 0) {
            json_decref(errors);
            errors = NULL;
        }
    return json_pack("{s:I, s:I, s:I, s:o, s:f, s:f, s:f, s:f, s:{s:f, s:f, s:f, s:f, s:f, "
                     "s:f}}",
                     "calls", (json_int_t)s->calls, "ok", (json_int_t)s->ok, "errors_total",
                     (json_int_t)(s->calls - s->ok), "errors", errors, "work", s->work,
                     "calls_per_s",
                     s->calls_per_s, "tokens_per_s", s->tokens_per_s, "mb_per_s", s->mb_per_s,
                     "latency_ms", "p50", s->p50_s * 1e3, "p90", s->p90_s * 1e3, "p99",
                     s->p99_s * 1e3, "p99.9", s->p999_s * 1e3, "max", s->max_s * 1e3, "mean",
                     s->mean_s * 1e3);
}

/* A run: its total and, by name, each tenant's statistics; *total gets the total. */
static json_t *run_json(const ab_report_t *r, const ab_phase_t *ph, uint32_t d, ab_stats_t *total) {
    const ab_run_t *run = &ph->runs[d];
    json_t *tenants = json_object();
    if (tenants == NULL ||
        ab_stats_compute(run, -1, ph->tokens_per_call, ph->cost_per_call, total) != 0) {
        json_decref(tenants);
        return NULL;
    }
    for (uint32_t t = 0; t < r->opts->n_tenants; t++) {
        ab_stats_t s;
        json_t *js = NULL;
        if (ab_stats_compute(run, (int)t, ph->tokens_per_call, ph->cost_per_call, &s) != 0 ||
            (js = stats_json(&s)) == NULL ||
            json_object_set_new(tenants, r->opts->tenants[t].name, js) != 0 ||
            json_object_set_new(js, "work_share", json_real(share_of(s.work, total->work))) ||
            json_object_set_new(js, "weight_share", json_real(weight_share(r->opts, t)))) {
            json_decref(tenants); /* and js with it, once it is in */
            return NULL;
        }
    }
    return json_pack("{s:s, s:f, s:b, s:I, s:o, s:o}", "device", ph->devices[d], "wall_s",
                     run->wall_s, "interrupted", run->interrupted, "unsent",
                     (json_int_t)run->unsent, "total", stats_json(total), "tenants", tenants);
}

static json_t *ratio_json(double num, double den) {
    return den > 0 && isfinite(num / den) ? json_real(num / den) : json_null();
}

static json_t *phase_json(const ab_report_t *r, const ab_phase_t *ph) {
    json_t *runs = json_array();
    ab_stats_t total[2];
    for (uint32_t d = 0; runs != NULL && d < ph->n_runs; d++)
        if (json_array_append_new(runs, run_json(r, ph, d, &total[d])) != 0) {
            json_decref(runs);
            runs = NULL;
        }
    json_t *overhead = ph->n_runs == 2 && runs != NULL
                           ? json_pack("{s:s, s:o, s:o, s:o}", "device", ph->devices[0], "p50",
                                       ratio_json(total[1].p50_s, total[0].p50_s), "p99",
                                       ratio_json(total[1].p99_s, total[0].p99_s), "mean",
                                       ratio_json(total[1].mean_s, total[0].mean_s))
                           : json_null();
    return json_pack("{s:s, s:I, s:f, s:o, s:o}", "workload", ab_workload_name(ph->workload),
                     "tokens_per_call", (json_int_t)ph->tokens_per_call, "work_per_call",
                     ph->cost_per_call, "runs", runs,
                     "overhead_null_over_device", overhead);
}

static json_t *model_json(const ab_model_t *m) {
    const Attnd__V1__ModelConfig *c = &m->cfg;
    json_t *windows = json_array(), *sinks = json_array();
    for (size_t i = 0; windows != NULL && i < c->n_layer_sliding_window; i++)
        json_array_append_new(windows, json_integer(c->layer_sliding_window[i]));
    for (size_t i = 0; sinks != NULL && i < c->n_sinks; i++)
        json_array_append_new(sinks, json_real(c->sinks[i]));
    return json_pack("{s:s, s:s, s:I, s:I, s:I, s:I, s:s, s:I, s:f, s:I, s:o, s:f, s:o, s:I}",
                     "name", m->name, "path", m->path, "num_layers", (json_int_t)c->num_layers,
                     "num_query_heads", (json_int_t)c->num_query_heads, "num_kv_heads",
                     (json_int_t)c->num_kv_heads, "head_dim", (json_int_t)c->head_dim, "dtype",
                     ab_model_dtype_name(m), "block_size", (json_int_t)c->block_size, "scale",
                     (double)c->scale, "sliding_window", (json_int_t)c->sliding_window,
                     "layer_sliding_window", windows, "logits_soft_cap",
                     (double)c->logits_soft_cap, "sinks", sinks, "alibi_slopes",
                     (json_int_t)c->n_alibi_slopes);
}

static json_t *config_json(const ab_opts_t *o) {
    json_t *workloads = json_array();
    for (uint32_t i = 0; workloads != NULL && i < o->n_workloads; i++)
        json_array_append_new(workloads, json_string(ab_workload_name(o->workloads[i])));
    return json_pack("{s:s, s:f, s:f, s:I, s:I, s:I, s:I, s:I, s:s, s:b, s:o, s:I, s:I, s:I, "
                     "s:I}",
                     "api", o->streams ? "AttendStream" : "Attend", "rate", o->rate,
                     "duration_s", o->calls != 0 ? 0.0 : o->duration_s, "calls",
                     (json_int_t)o->calls, "warmup", (json_int_t)o->warmup, "timeout_ms",
                     (json_int_t)o->timeout_ms, "callers", (json_int_t)o->callers, "sessions",
                     (json_int_t)o->sessions, "device", o->device, "compare_null",
                     o->compare_null, "workloads", workloads, "ctx", (json_int_t)o->ctx,
                     "batch", (json_int_t)o->batch, "chunk", (json_int_t)o->chunk, "layers",
                     (json_int_t)o->layers);
}

static json_t *report_json(const ab_report_t *r) {
    const ab_opts_t *o = r->opts;
    json_t *models = json_array(), *tenants = json_array(), *phases = json_array();
    for (uint32_t i = 0; models != NULL && i < r->n_models; i++)
        json_array_append_new(models, model_json(&r->models[i]));
    for (uint32_t i = 0; tenants != NULL && i < o->n_tenants; i++) {
        const ab_tenant_t *t = &o->tenants[i];
        json_array_append_new(tenants,
                              json_pack("{s:s, s:I, s:I, s:I, s:f, s:I, s:b}", "name", t->name,
                                        "weight", (json_int_t)t->weight, "callers",
                                        (json_int_t)t->callers, "sessions",
                                        (json_int_t)t->sessions, "rate", t->rate, "calls",
                                        (json_int_t)t->calls, "token", t->token[0] != '\0'));
    }
    for (uint32_t i = 0; phases != NULL && i < r->n_phases; i++)
        if (json_array_append_new(phases, phase_json(r, &r->phases[i])) != 0) {
            json_decref(phases);
            phases = NULL;
        }
    char date[32];
    time_t now = time(NULL);
    struct tm tm;
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
    return json_pack("{s:s, s:s, s:s, s:b, s:{s:I, s:o}, s:o, s:o, s:o, s:o}", "tool",
                     "attnd-bench", "date", date, "target", r->target, "spawned_server",
                     r->spawned, "host", "cpus", (json_int_t)r->cpus, "load_before",
                     r->load_before >= 0 ? json_real(r->load_before) : json_null(), "config",
                     config_json(o), "models", models, "tenants", tenants, "phases", phases);
}

int ab_report_write_json(const ab_report_t *r, const char *path) {
    json_t *root = report_json(r);
    if (root == NULL) {
        fprintf(stderr, "attnd-bench: --json: out of memory building the report\n");
        return -1;
    }
    int rc = json_dump_file(root, path, JSON_INDENT(2) | JSON_REAL_PRECISION(8));
    json_decref(root);
    if (rc != 0)
        fprintf(stderr, "attnd-bench: --json: cannot write %s\n", path);
    return rc == 0 ? 0 : -1;
}

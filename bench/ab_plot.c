/* Plots of attnd-bench (see ab_plot.h). The histogram's bins are computed here (log-spaced, 10
 * a decade, so one chart fits microsecond and second latencies); gnuplot only draws.
 *
 * Thread model: main thread only; gnuplot runs as a child process that is waited for. */
#include "bench/ab_plot.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define BINS_PER_DECADE 10

/* True when an executable gnuplot is in a directory of PATH. */
static bool gnuplot_on_path(void) {
    const char *path = getenv("PATH");
    if (path == NULL)
        return false;
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *save = NULL, *d = strtok_r(buf, ":", &save); d != NULL;
         d = strtok_r(NULL, ":", &save)) {
        char exe[4200];
        snprintf(exe, sizeof exe, "%s/gnuplot", d);
        if (access(exe, X_OK) == 0)
            return true;
    }
    return false;
}

/* "decode cpu" etc.: the title of a run's series. */
static void series_title(const ab_phase_t *ph, uint32_t d, char *buf, size_t len) {
    snprintf(buf, len, "%s %s", ab_workload_name(ph->workload), ph->devices[d]);
}

static int write_data(const ab_report_t *r, FILE *f) {
    for (uint32_t i = 0; i < r->n_phases; i++)
        for (uint32_t d = 0; d < r->phases[i].n_runs; d++) {
            const ab_run_t *run = &r->phases[i].runs[d];
            char title[64];
            series_title(&r->phases[i], d, title, sizeof title);
            fprintf(f, "# %s: seconds since the start, latency ms, status\n", title);
            for (size_t k = 0; k < run->n_recs; k++)
                fprintf(f, "%.6f %.6f %d\n", run->recs[k].t_s, run->recs[k].lat_s * 1e3,
                        run->recs[k].status);
            fprintf(f, "\n\n"); /* gnuplot: the next index */
        }
    return ferror(f) ? -1 : 0;
}

enum { N_BINS = 8 * BINS_PER_DECADE }; /* 1 us .. 100 s */

/* The bin of a successful record's latency, or -1 for a failed call. */
static int bin_of(const ab_rec_t *rec) {
    if (rec->status != 0)
        return -1;
    double us = rec->lat_s * 1e6;
    int b = us <= 1 ? 0 : (int)(log10(us) * BINS_PER_DECADE);
    return b >= N_BINS ? N_BINS - 1 : b;
}

/* Counts of successful calls in log-spaced bins from 1 us; lines "ms count", over the bins
 * that any series uses, and one empty bin either side so that the steps close. */
static int write_hist(const ab_report_t *r, FILE *f) {
    int lo = N_BINS, hi = -1;
    for (uint32_t i = 0; i < r->n_phases; i++)
        for (uint32_t d = 0; d < r->phases[i].n_runs; d++)
            for (size_t k = 0; k < r->phases[i].runs[d].n_recs; k++) {
                int b = bin_of(&r->phases[i].runs[d].recs[k]);
                if (b >= 0) {
                    lo = b < lo ? b : lo;
                    hi = b > hi ? b : hi;
                }
            }
    lo = lo > 0 ? lo - 1 : 0;
    hi = hi + 1 < N_BINS ? hi + 1 : N_BINS - 1;
    for (uint32_t i = 0; i < r->n_phases; i++)
        for (uint32_t d = 0; d < r->phases[i].n_runs; d++) {
            const ab_run_t *run = &r->phases[i].runs[d];
            uint64_t counts[N_BINS] = {0};
            for (size_t k = 0; k < run->n_recs; k++) {
                int b = bin_of(&run->recs[k]);
                if (b >= 0)
                    counts[b]++;
            }
            char title[64];
            series_title(&r->phases[i], d, title, sizeof title);
            fprintf(f, "# %s: bin start ms, successful calls\n", title);
            for (int b = lo; b <= hi; b++)
                fprintf(f, "%.6g %llu\n", pow(10, (double)b / BINS_PER_DECADE) * 1e-3,
                        (unsigned long long)counts[b]);
            fprintf(f, "\n\n");
        }
    return ferror(f) ? -1 : 0;
}

/* Writes the string s as a gnuplot single-quoted string ('' for a quote). */
static void put_quoted(FILE *f, const char *s) {
    fputc('\'', f);
    for (; *s != '\0'; s++) {
        if (*s == '\'')
            fputc('\'', f);
        fputc(*s, f);
    }
    fputc('\'', f);
}

static int write_script(const ab_report_t *r, const char *prefix, FILE *f) {
    char path[1200];
    /* pngcairo draws better; png (libgd) is the fallback of a gnuplot built without cairo */
    fprintf(f, "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
               "  set terminal pngcairo size 1200,700 noenhanced\n"
               "} else {\n  set terminal png size 1200,700 noenhanced\n}\n"
               "set grid\nset key outside\n");
    for (int chart = 0; chart < 2; chart++) {
        snprintf(path, sizeof path, "%s-%s.png", prefix, chart == 0 ? "latency" : "histogram");
        fprintf(f, "set output ");
        put_quoted(f, path);
        if (chart == 0)
            fprintf(f, "\nset title 'attnd-bench: latency of each call over time'\n"
                       "set xlabel 'seconds since the phase started'\nset ylabel 'latency, ms'\n"
                       "set logscale y\nplot ");
        else
            fprintf(f, "\nset title 'attnd-bench: latency of successful calls'\n"
                       "set xlabel 'latency, ms (log bins, 10 a decade)'\n"
                       "set ylabel 'calls'\nset logscale x\nunset logscale y\nplot ");
        snprintf(path, sizeof path, "%s%s", prefix, chart == 0 ? ".dat" : "-hist.dat");
        uint32_t index = 0;
        for (uint32_t i = 0; i < r->n_phases; i++)
            for (uint32_t d = 0; d < r->phases[i].n_runs; d++, index++) {
                char title[64];
                series_title(&r->phases[i], d, title, sizeof title);
                fprintf(f, "%s", index == 0 ? "" : ", ");
                put_quoted(f, path);
                fprintf(f, chart == 0 ? " index %u using 1:2 with points pt 7 ps 0.4 title "
                                      : " index %u using 1:2 with steps title ",
                        index);
                put_quoted(f, title);
            }
        fprintf(f, "\n");
    }
    return ferror(f) ? -1 : 0;
}

typedef int (*writer_t)(const ab_report_t *r, const char *prefix, FILE *f);

static int data_writer(const ab_report_t *r, const char *prefix, FILE *f) {
    (void)prefix;
    return write_data(r, f);
}

static int hist_writer(const ab_report_t *r, const char *prefix, FILE *f) {
    (void)prefix;
    return write_hist(r, f);
}

static int write_file(const ab_report_t *r, const char *prefix, const char *suffix, writer_t w) {
    char path[1200];
    snprintf(path, sizeof path, "%s%s", prefix, suffix);
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "attnd-bench: --plot: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    int rc = w(r, prefix, f);
    if (fclose(f) != 0 || rc != 0) {
        fprintf(stderr, "attnd-bench: --plot: cannot write %s\n", path);
        return -1;
    }
    return 0;
}

static int run_gnuplot(const char *script) {
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "attnd-bench: --plot: fork: %s\n", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        execlp("gnuplot", "gnuplot", script, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "attnd-bench: --plot: gnuplot %s failed\n", script);
        return -1;
    }
    return 0;
}

int ab_plot_write(const ab_report_t *r, const char *prefix) {
    if (write_file(r, prefix, ".dat", data_writer) != 0 ||
        write_file(r, prefix, "-hist.dat", hist_writer) != 0 ||
        write_file(r, prefix, ".gp", write_script) != 0)
        return -1;
    if (!gnuplot_on_path()) {
        fprintf(stderr, "attnd-bench: --plot: gnuplot is not on PATH (Debian: apt-get install "
                        "gnuplot-nox); no PNG drawn, data in %s.dat and %s-hist.dat\n",
                prefix, prefix);
        return 0;
    }
    char script[1200];
    snprintf(script, sizeof script, "%s.gp", prefix);
    if (run_gnuplot(script) != 0)
        return -1;
    fprintf(stderr, "attnd-bench: --plot: %s-latency.png, %s-histogram.png\n", prefix, prefix);
    return 0;
}

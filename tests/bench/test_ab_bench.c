/* attnd-bench end to end: the real program, run as a child process, against the `attnd serve
 * --null-device` it spawns on a free loopback port, with tiny shapes so that every run takes a
 * fraction of a second. Checks exit statuses, the --json report (parsed with jansson) against
 * the calls asked for, and the messages of bad options and bad presets.
 *
 * Thread: the test thread only. */
#include <errno.h>
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#ifndef AB_BENCH_BIN
#error "AB_BENCH_BIN must name the attnd-bench binary"
#endif

static char tmpdir[] = "/tmp/test-ab-XXXXXX";

typedef struct result {
    int status;        /* exit status; -1 when it did not exit */
    char err[16384];   /* stderr, truncated */
    json_t *json;      /* the --json report, or NULL */
} result_t;

static void read_all(const char *path, char *buf, size_t len) {
    buf[0] = '\0';
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    size_t n = fread(buf, 1, len - 1, f);
    buf[n] = '\0';
    fclose(f);
}

/* Runs attnd-bench with the NULL-terminated arguments after argv[0] (plus --json FILE when
 * want_json), with PATH set to path when that is not NULL. */
static void run_bench(result_t *r, const char *path, bool want_json, ...) {
    const char *argv[64] = {AB_BENCH_BIN};
    size_t n = 1;
    va_list ap;
    va_start(ap, want_json);
    for (const char *a = va_arg(ap, const char *); a != NULL; a = va_arg(ap, const char *)) {
        assert_true(n < 60);
        argv[n++] = a;
    }
    va_end(ap);
    char json_path[256], out_path[256], err_path[256];
    snprintf(json_path, sizeof json_path, "%s/report.json", tmpdir);
    snprintf(out_path, sizeof out_path, "%s/stdout", tmpdir);
    snprintf(err_path, sizeof err_path, "%s/stderr", tmpdir);
    unlink(json_path);
    if (want_json) {
        argv[n++] = "--json";
        argv[n++] = json_path;
    }
    argv[n] = NULL;
    fflush(stdout);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (freopen(out_path, "w", stdout) == NULL || freopen(err_path, "w", stderr) == NULL)
            _exit(126);
        if (path != NULL)
            setenv("PATH", path, 1);
        execv(AB_BENCH_BIN, (char *const *)argv);
        _exit(127);
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0)
        assert_int_equal(errno, EINTR);
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    read_all(err_path, r->err, sizeof r->err);
    r->json = NULL;
    if (want_json && r->status != 2) {
        json_error_t e;
        r->json = json_load_file(json_path, 0, &e);
        if (r->json == NULL)
            print_error("report.json: line %d: %s\n", e.line, e.text);
    }
    if (r->status != 0)
        print_message("attnd-bench exited %d; stderr:\n%s\n", r->status, r->err);
}

static void result_fini(result_t *r) {
    json_decref(r->json);
    r->json = NULL;
}

/* The value at a path of object keys and array indexes ("phases", 0, "runs", ...): each step a
 * key (const char *) or, after the marker IDX, an index. */
#define IDX ((const char *)1)
static json_t *at(json_t *j, ...) {
    va_list ap;
    va_start(ap, j);
    for (const char *k = va_arg(ap, const char *); k != NULL && j != NULL;
         k = va_arg(ap, const char *)) {
        if (k == IDX)
            j = json_array_get(j, (size_t)va_arg(ap, int));
        else
            j = json_object_get(j, k);
    }
    va_end(ap);
    assert_non_null(j);
    return j;
}

static long long integer(json_t *j) {
    assert_true(json_is_integer(j));
    return (long long)json_integer_value(j);
}

static double number(json_t *j) {
    assert_true(json_is_number(j));
    return json_number_value(j);
}

/* A run's totals: calls made, none failed, and every figure of the report there. */
static void check_totals(json_t *run, const char *device, long long calls) {
    assert_string_equal(json_string_value(at(run, "device", NULL)), device);
    json_t *t = at(run, "total", NULL);
    if (calls >= 0)
        assert_int_equal(integer(at(t, "calls", NULL)), calls);
    long long made = integer(at(t, "calls", NULL));
    assert_true(made > 0);
    assert_int_equal(integer(at(t, "ok", NULL)), made);
    assert_int_equal(integer(at(t, "errors_total", NULL)), 0);
    assert_int_equal(json_object_size(at(t, "errors", NULL)), 0);
    assert_true(number(at(t, "calls_per_s", NULL)) > 0);
    assert_true(number(at(t, "tokens_per_s", NULL)) > 0);
    assert_true(number(at(t, "mb_per_s", NULL)) > 0);
    json_t *lat = at(t, "latency_ms", NULL);
    double p50 = number(at(lat, "p50", NULL)), p90 = number(at(lat, "p90", NULL));
    double p99 = number(at(lat, "p99", NULL)), p999 = number(at(lat, "p99.9", NULL));
    double max = number(at(lat, "max", NULL));
    assert_true(p50 > 0 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max);
}

/* The options every server run shares: tiny shapes, one backend thread. */
#define TINY "--server-threads", "1", "--ctx", "40", "--batch", "3", "--chunk", "8", "--warmup", "1"

static void test_decode_calls_made_exactly(void **state) {
    (void)state;
    result_t r;
    run_bench(&r, NULL, true, TINY, "--calls", "13", "--callers", "2", NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(r.json);
    assert_string_equal(json_string_value(at(r.json, "tool", NULL)), "attnd-bench");
    assert_true(integer(at(r.json, "host", "cpus", NULL)) > 0);
    assert_true(number(at(r.json, "host", "load_before", NULL)) >= 0);
    assert_int_equal(json_array_size(at(r.json, "phases", NULL)), 1);
    json_t *ph = at(r.json, "phases", IDX, 0, NULL);
    assert_string_equal(json_string_value(at(ph, "workload", NULL)), "decode");
    assert_int_equal(integer(at(ph, "tokens_per_call", NULL)), 3);
    assert_int_equal(json_array_size(at(ph, "runs", NULL)), 1);
    check_totals(at(ph, "runs", IDX, 0, NULL), "cpu", 13);
    assert_true(json_is_null(at(ph, "overhead_null_over_device", NULL)));
    /* the one default tenant did all of it */
    json_t *bt = at(ph, "runs", IDX, 0, "tenants", "bench", NULL);
    assert_int_equal(integer(at(bt, "calls", NULL)), 13);
    assert_true(number(at(bt, "work_share", NULL)) == 1.0);
    result_fini(&r);
}

static void test_prefill_and_mixed_phases(void **state) {
    (void)state;
    result_t r;
    run_bench(&r, NULL, true, TINY, "--calls", "6", "--workload", "prefill,mixed", "--layers",
              "2", NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(r.json);
    assert_int_equal(json_array_size(at(r.json, "phases", NULL)), 2);
    json_t *p0 = at(r.json, "phases", IDX, 0, NULL), *p1 = at(r.json, "phases", IDX, 1, NULL);
    assert_string_equal(json_string_value(at(p0, "workload", NULL)), "prefill");
    assert_int_equal(integer(at(p0, "tokens_per_call", NULL)), 8);
    assert_string_equal(json_string_value(at(p1, "workload", NULL)), "mixed");
    assert_int_equal(integer(at(p1, "tokens_per_call", NULL)), 3 + 8);
    check_totals(at(p0, "runs", IDX, 0, NULL), "cpu", 6);
    check_totals(at(p1, "runs", IDX, 0, NULL), "cpu", 6);
    result_fini(&r);
}

static void test_null_compare_reports_a_ratio(void **state) {
    (void)state;
    result_t r;
    run_bench(&r, NULL, true, TINY, "--calls", "8", "--compare-null", NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(r.json);
    json_t *ph = at(r.json, "phases", IDX, 0, NULL);
    assert_int_equal(json_array_size(at(ph, "runs", NULL)), 2);
    check_totals(at(ph, "runs", IDX, 0, NULL), "cpu", 8);
    check_totals(at(ph, "runs", IDX, 1, NULL), "null", 8);
    json_t *ov = at(ph, "overhead_null_over_device", NULL);
    assert_string_equal(json_string_value(at(ov, "device", NULL)), "cpu");
    assert_true(number(at(ov, "p50", NULL)) > 0);
    assert_true(number(at(ov, "p99", NULL)) > 0);
    assert_true(number(at(ov, "mean", NULL)) > 0);
    result_fini(&r);
}

static void test_streams_and_open_loop(void **state) {
    (void)state;
    result_t r;
    run_bench(&r, NULL, true, TINY, "--calls", "9", "--callers", "3", "--streams", "--rate",
              "300", NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(r.json);
    assert_string_equal(json_string_value(at(r.json, "config", "api", NULL)), "AttendStream");
    check_totals(at(r.json, "phases", IDX, 0, "runs", IDX, 0, NULL), "cpu", 9);
    result_fini(&r);
}

static void test_duration_mode_runs(void **state) {
    (void)state;
    result_t r;
    run_bench(&r, NULL, true, TINY, "--duration", "0.3", NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(r.json);
    check_totals(at(r.json, "phases", IDX, 0, "runs", IDX, 0, NULL), "cpu", -1);
    result_fini(&r);
}

/* Today's open server ignores the tokens; each tenant still makes its own calls and gets its
 * own figures. */
static void test_tenants_each_get_figures_and_shares(void **state) {
    (void)state;
    result_t r;
    run_bench(&r, NULL, true, TINY, "--calls", "6", "--tenant", "light:tok-a:1",
              "--tenant", "heavy:tok-b:3:2", NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(r.json);
    assert_int_equal(json_array_size(at(r.json, "tenants", NULL)), 2);
    assert_int_equal(integer(at(r.json, "tenants", IDX, 1, "callers", NULL)), 2);
    assert_true(json_is_true(at(r.json, "tenants", IDX, 1, "token", NULL)));
    json_t *run = at(r.json, "phases", IDX, 0, "runs", IDX, 0, NULL);
    check_totals(run, "cpu", 12);
    json_t *a = at(run, "tenants", "light", NULL), *b = at(run, "tenants", "heavy", NULL);
    assert_int_equal(integer(at(a, "calls", NULL)), 6);
    assert_int_equal(integer(at(b, "calls", NULL)), 6);
    assert_true(number(at(a, "weight_share", NULL)) == 0.25);
    assert_true(number(at(b, "weight_share", NULL)) == 0.75);
    double sa = number(at(a, "work_share", NULL)), sb = number(at(b, "work_share", NULL));
    assert_true(sa > 0.49 && sa < 0.51 && sa + sb > 0.999 && sa + sb < 1.001);
    result_fini(&r);
}

/* Every preset in the tree loads and makes a session that takes calls. */
static void test_every_preset_creates_a_session(void **state) {
    (void)state;
    result_t r;
    run_bench(&r, NULL, true, "--server-threads", "1", "--ctx", "16", "--batch", "2", "--chunk",
              "8", "--warmup", "0", "--workload", "mixed", "--model",
              "llama-3.1-8b,qwen2.5-7b,mistral-7b,gemma-2-9b,gpt-oss-20b", "--sessions", "5",
              "--callers", "5", "--calls", "5", "--layers", "2", NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(r.json);
    json_t *models = at(r.json, "models", NULL);
    assert_int_equal(json_array_size(models), 5);
    assert_int_equal(json_array_size(at(models, IDX, 3, "layer_sliding_window", NULL)), 42);
    assert_int_equal(json_array_size(at(models, IDX, 4, "sinks", NULL)), 64);
    check_totals(at(r.json, "phases", IDX, 0, "runs", IDX, 0, NULL), "cpu", 5);
    result_fini(&r);
}

static void expect_bad_usage(const char *needle, ...) {
    const char *argv[16] = {AB_BENCH_BIN};
    size_t n = 1;
    va_list ap;
    va_start(ap, needle);
    for (const char *a = va_arg(ap, const char *); a != NULL; a = va_arg(ap, const char *))
        argv[n++] = a;
    va_end(ap);
    result_t r;
    run_bench(&r, NULL, false, n > 1 ? argv[1] : NULL, n > 2 ? argv[2] : NULL,
              n > 3 ? argv[3] : NULL, n > 4 ? argv[4] : NULL, NULL);
    assert_int_equal(r.status, 2);
    if (strstr(r.err, needle) == NULL)
        fail_msg("stderr does not name '%s':\n%s", needle, r.err);
}

static void test_bad_options_exit_2_naming_the_option(void **state) {
    (void)state;
    expect_bad_usage("--bogus", "--bogus", NULL);
    expect_bad_usage("--calls", "--calls", "0", NULL);
    expect_bad_usage("--calls", "--calls", "1.5", NULL);
    expect_bad_usage("--ctx", "--ctx", "lots", NULL);
    expect_bad_usage("--callers", "--callers", NULL);
    expect_bad_usage("--rate", "--rate", "-3", NULL);
    expect_bad_usage("--workload", "--workload", "decode,train", NULL);
    expect_bad_usage("--tenant", "--tenant", "a b:tok", NULL);
    expect_bad_usage("--tenant", "--tenant", "a:tok:0", NULL);
    expect_bad_usage("--tenant", "--tenant", "a:x:1", "--tenant", "a:y:2", NULL);
    expect_bad_usage("--duration", "--duration", "1", "--calls", "3", NULL);
    expect_bad_usage("--calls", "--calls", "2", "--callers", "3", NULL);
    expect_bad_usage("--compare-null", "--compare-null", "--device", "null", NULL);
    expect_bad_usage("--layers", "--layers", "33", NULL); /* llama-3.1-8b has 32 */
    expect_bad_usage("--target", "--target", "127.0.0.1:1", "--attnd", "/bin/true", NULL);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_invalid_presets_are_refused_clearly(void **state) {
    (void)state;
    static const struct {
        const char *json, *says;
    } cases[] = {
        {"{\"name\": \"x\", \"num_layers\": 1, \"num_query_heads\": 4, \"num_kv_heads\": 2, "
         "\"head_dim\": 64, \"dtype\": \"bf16\", \"heads\": 3}", "unknown key: heads"},
        {"{\"name\": \"x\", \"num_layers\": \"1\", \"num_query_heads\": 4, \"num_kv_heads\": 2, "
         "\"head_dim\": 64, \"dtype\": \"bf16\"}", "num_layers"},
        {"{\"name\": \"x\", \"num_layers\": 1, \"num_query_heads\": 4, \"num_kv_heads\": 2, "
         "\"head_dim\": 64, \"dtype\": \"fp8\"}", "dtype"},
        {"{\"name\": \"x\", \"num_layers\": 1, \"num_query_heads\": 4, \"num_kv_heads\": 2, "
         "\"dtype\": \"bf16\"}", "head_dim"},
        {"{\"name\": \"x\", \"num_layers\": 1,", "line 1"},
        {"[1, 2]", "expected a JSON object"},
    };
    char path[256];
    snprintf(path, sizeof path, "%s/bad-preset.json", tmpdir);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_file(path, cases[i].json);
        result_t r;
        run_bench(&r, NULL, false, "--model", path, NULL);
        assert_int_equal(r.status, 2);
        if (strstr(r.err, "preset") == NULL || strstr(r.err, cases[i].says) == NULL)
            fail_msg("case %zu: stderr does not say 'preset' and '%s':\n%s", i, cases[i].says,
                     r.err);
    }
    result_t r;
    run_bench(&r, NULL, false, "--model", "no-such-model", NULL);
    assert_int_equal(r.status, 2);
    assert_non_null(strstr(r.err, "no-such-model.json"));
}

/* --plot without gnuplot: the run succeeds, says why there is no PNG, and keeps the data. */
static void test_plot_without_gnuplot_is_skipped(void **state) {
    (void)state;
    char prefix[256], dat[300];
    snprintf(prefix, sizeof prefix, "%s/plot", tmpdir);
    snprintf(dat, sizeof dat, "%s.dat", prefix);
    result_t r;
    run_bench(&r, "/nonexistent", false, TINY, "--calls", "4", "--plot", prefix, NULL);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.err, "gnuplot is not on PATH"));
    char data[16384];
    read_all(dat, data, sizeof data);
    size_t records = 0; /* lines that start with a number: one per call */
    for (const char *line = data; *line != '\0'; line = strchr(line, '\n') + 1) {
        records += *line >= '0' && *line <= '9';
        if (strchr(line, '\n') == NULL)
            break;
    }
    assert_non_null(strstr(data, "# decode cpu"));
    assert_int_equal(records, 4);
}

static int group_setup(void **state) {
    (void)state;
    return mkdtemp(tmpdir) != NULL ? 0 : -1;
}

static int group_teardown(void **state) {
    (void)state;
    static const char *const files[] = {"report.json", "stdout", "stderr", "bad-preset.json",
                                        "plot.dat", "plot-hist.dat", "plot.gp"};
    char path[300];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", tmpdir, files[i]);
        unlink(path);
    }
    rmdir(tmpdir);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_calls_made_exactly),
        cmocka_unit_test(test_prefill_and_mixed_phases),
        cmocka_unit_test(test_null_compare_reports_a_ratio),
        cmocka_unit_test(test_streams_and_open_loop),
        cmocka_unit_test(test_duration_mode_runs),
        cmocka_unit_test(test_tenants_each_get_figures_and_shares),
        cmocka_unit_test(test_every_preset_creates_a_session),
        cmocka_unit_test(test_bad_options_exit_2_naming_the_option),
        cmocka_unit_test(test_invalid_presets_are_refused_clearly),
        cmocka_unit_test(test_plot_without_gnuplot_is_skipped),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

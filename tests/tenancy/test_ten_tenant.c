/* Tests of tenancy/ten_tenant: loading and validating tenants files, bearer-token
 * authentication, quotas exact at their limits (also under concurrency), reloads (kept counters,
 * removed and added tenants, broken files, reloads while other threads authenticate and reserve),
 * the token generator, and out-of-memory paths.
 *
 * Files are real: every test writes them under one mkdtemp directory, removed at the end.
 * Allocation failures are injected by linking with -Wl,--wrap=malloc,--wrap=calloc,
 * --wrap=realloc (tests/CMakeLists.txt): only allocations of code linked into this program are
 * counted (ten_tenant.c's own, not jansson's or libcrypto's).
 *
 * Thread: worker threads of the concurrency tests only call the module and record outcomes;
 * every cmocka check runs on the main thread after they are joined. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/at_base.h"
#include "tenancy/ten_tenant.h"

#define D_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define D_B "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

static uint64_t g_seed;
static char g_dir[512]; /* short enough that every path built from it fits PATH_MAX */
static unsigned g_files; /* files written, to name them uniquely and remove them */

/* ---- allocation failures ---- */

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_realloc(void *p, size_t n);

/* Allocations left before the one that fails; LONG_MAX: none fails. */
static atomic_long g_alloc_countdown = LONG_MAX;
static atomic_long g_alloc_failed;

static bool alloc_should_fail(void) {
    if (atomic_fetch_sub_explicit(&g_alloc_countdown, 1, memory_order_relaxed) != 1)
        return false;
    atomic_fetch_add_explicit(&g_alloc_failed, 1, memory_order_relaxed);
    return true;
}

void *__wrap_malloc(size_t n) { return alloc_should_fail() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t size) {
    return alloc_should_fail() ? NULL : __real_calloc(n, size);
}
void *__wrap_realloc(void *p, size_t n) {
    return alloc_should_fail() ? NULL : __real_realloc(p, n);
}

/* The nth allocation from now (0: the next) fails, and only that one. */
static void fail_alloc(long nth) {
    atomic_store(&g_alloc_failed, 0);
    atomic_store(&g_alloc_countdown, nth + 1);
}

static void fail_no_alloc(void) { atomic_store(&g_alloc_countdown, LONG_MAX); }

/* ---- files and tokens ---- */

/* Writes text to a new file of the test directory; its path goes to path. */
static void write_file(const char *text, char *path, size_t size) {
    snprintf(path, size, "%s/t%03u.json", g_dir, g_files++);
    FILE *f = fopen(path, "w");
    TU_CHECK(f != NULL, "cannot create %s", path);
    TU_CHECK(fputs(text, f) >= 0 && fclose(f) == 0, "cannot write %s", path);
}

static void digest_of(const char *token, char hex[TEN_DIGEST_HEX_LEN + 1]) {
    at_diag_t d = {{0}};
    at_err_t e = ten_token_digest_hex(token, strlen(token), hex, &d);
    TU_CHECK(e == AT_OK, "digest: %s %s", at_err_name(e), d.msg);
}

/* "Bearer <token>" */
static const char *bearer(const char *token, char *buf, size_t size) {
    snprintf(buf, size, "Bearer %s", token);
    return buf;
}

static at_err_t auth(ten_tenants_t *reg, const char *token, ten_tenant_t **out) {
    char buf[TEN_TOKEN_MAX_BYTES + 64];
    bearer(token, buf, sizeof buf);
    return ten_tenants_authenticate(reg, buf, strlen(buf), out, NULL);
}

/* A file with tenants acme (weight 3, tokens TOK_ACME1 and TOK_ACME2, every quota) and beta
 * (default weight, token TOK_BETA, no quotas). */
#define TOK_ACME1 "atk_acme-one"
#define TOK_ACME2 "atk_acme-two"
#define TOK_BETA "atk_beta"
#define TOK_GAMMA "atk_gamma"

static ten_tenants_t *load_text(const char *text, char *path, size_t size) {
    write_file(text, path, size);
    ten_tenants_t *reg = NULL;
    at_diag_t d = {{0}};
    at_err_t e = ten_tenants_load(path, &reg, &d);
    TU_CHECK(e == AT_OK && reg != NULL, "load %s: %s %s", path, at_err_name(e), d.msg);
    return reg;
}

static void acme_beta_text(char *buf, size_t size) {
    char a1[65], a2[65], b[65];
    digest_of(TOK_ACME1, a1);
    digest_of(TOK_ACME2, a2);
    digest_of(TOK_BETA, b);
    snprintf(buf, size,
             "{\"version\": 1, \"tenants\": ["
             "{\"name\": \"acme\", \"weight\": 3, \"tokens_sha256\": [\"%s\", \"%s\"],"
             " \"quotas\": {\"sessions\": 4, \"kv_bytes\": 1000, \"inflight_calls\": 2}},"
             "{\"name\": \"beta\", \"tokens_sha256\": [\"%s\"]}]}",
             a1, a2, b);
}

static ten_tenants_t *load_acme_beta(void) {
    char text[1024], path[PATH_MAX];
    acme_beta_text(text, sizeof text);
    return load_text(text, path, sizeof path);
}

/* ---- loading ---- */

static void test_ten_tenant_name_valid_follows_the_pattern(void **state) {
    (void)state;
    assert_true(ten_tenant_name_valid("acme", 4));
    assert_true(ten_tenant_name_valid("A-z_0.9", 7));
    assert_true(ten_tenant_name_valid("acme!", 4)); /* only len bytes are read */
    assert_false(ten_tenant_name_valid("", 0));
    assert_false(ten_tenant_name_valid("ac me", 5));
    assert_false(ten_tenant_name_valid("acme/x", 6));
    assert_false(ten_tenant_name_valid("a\0b", 3));
    char name[66];
    memset(name, 'x', sizeof name);
    assert_true(ten_tenant_name_valid(name, 64));
    assert_false(ten_tenant_name_valid(name, 65));
}

static void test_ten_tenants_load_reads_names_weights_and_quotas(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    assert_false(ten_tenants_is_open(reg));
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    ten_tenant_t *beta = ten_tenants_find(reg, "beta");
    assert_non_null(acme);
    assert_non_null(beta);
    assert_null(ten_tenants_find(reg, "gamma"));
    assert_null(ten_tenants_find(reg, "acm"));
    assert_string_equal(ten_tenant_name(acme), "acme");
    assert_int_equal(ten_tenant_weight(acme), 3);
    assert_int_equal(ten_tenant_weight(beta), 1);
    assert_true(ten_tenant_id(acme) != ten_tenant_id(beta));
    ten_quotas_t q;
    ten_tenant_get_quotas(acme, &q);
    assert_int_equal(q.sessions, 4);
    assert_int_equal(q.kv_bytes, 1000);
    assert_int_equal(q.inflight_calls, 2);
    ten_tenant_get_quotas(beta, &q);
    assert_true(q.sessions == TEN_UNLIMITED && q.kv_bytes == TEN_UNLIMITED &&
                q.inflight_calls == TEN_UNLIMITED);
    ten_tenant_stats_t st;
    memset(&st, 0xab, sizeof st);
    ten_tenant_get_stats(acme, &st);
    ten_tenant_stats_t zero;
    memset(&zero, 0, sizeof zero);
    assert_memory_equal(&st, &zero, sizeof st);

    ten_tenant_t **list = NULL;
    size_t n = 0;
    assert_int_equal(ten_tenants_list(reg, &list, &n), AT_OK);
    assert_int_equal(n, 2);
    assert_ptr_equal(list[0], acme);
    assert_ptr_equal(list[1], beta);
    for (size_t i = 0; i < n; i++)
        ten_tenant_unref(&list[i]);
    free(list);

    ten_tenant_unref(&acme);
    ten_tenant_unref(&beta);
    assert_null(acme);
    ten_tenants_destroy(&reg);
    assert_null(reg);
    ten_tenants_destroy(&reg); /* NULL is fine */
}

static void test_ten_tenants_load_accepts_the_example_file(void **state) {
    (void)state;
    const char *path = AT_SOURCE_DIR "/deploy/tenants.example.json";
    ten_tenants_t *reg = NULL;
    at_diag_t d = {{0}};
    at_err_t e = ten_tenants_load(path, &reg, &d);
    TU_CHECK(e == AT_OK, "%s: %s %s", path, at_err_name(e), d.msg);
    ten_tenant_t **list = NULL;
    size_t n = 0;
    assert_int_equal(ten_tenants_list(reg, &list, &n), AT_OK);
    assert_int_equal(n, 2);
    ten_quotas_t q;
    ten_tenant_get_quotas(list[1], &q);
    assert_true(q.kv_bytes == TEN_UNLIMITED); /* the example leaves one quota out */
    for (size_t i = 0; i < n; i++)
        ten_tenant_unref(&list[i]);
    free(list);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenants_load_accepts_upper_case_hex_and_no_tokens(void **state) {
    (void)state;
    char hex[65], path[PATH_MAX], text[512];
    digest_of(TOK_GAMMA, hex);
    for (char *p = hex; *p; p++)
        if (*p >= 'a' && *p <= 'f')
            *p = (char)(*p - 'a' + 'A');
    snprintf(text, sizeof text,
             "{\"tenants\": [{\"name\": \"g\", \"tokens_sha256\": [\"%s\"]},"
             " {\"name\": \"locked\", \"tokens_sha256\": [], \"quotas\": {}}], \"version\": 1}",
             hex);
    ten_tenants_t *reg = load_text(text, path, sizeof path);
    ten_tenant_t *t = NULL;
    assert_int_equal(auth(reg, TOK_GAMMA, &t), AT_OK);
    assert_string_equal(ten_tenant_name(t), "g");
    ten_tenant_unref(&t);
    ten_tenants_destroy(&reg);
}

typedef struct bad_case {
    const char *json;
    const char *want[2]; /* substrings the diag must hold besides the path */
} bad_case_t;

#define T1(body) "{\"version\": 1, \"tenants\": [" body "]}"
#define X32 "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
#define ACME "{\"name\": \"acme\", \"tokens_sha256\": [\"" D_A "\"]}"

static const bad_case_t bad_cases[] = {
    {"{\"version\": 1, ", {"line 1", NULL}},
    {"[1]", {"top level: expected an object, got an array", NULL}},
    {"{\"tenants\": [" ACME "]}", {"version: expected 1, got none", NULL}},
    {"{\"version\": 2, \"tenants\": [" ACME "]}", {"version: expected 1, got 2", NULL}},
    {"{\"version\": \"1\", \"tenants\": [" ACME "]}", {"version: expected 1, got \"1\"", NULL}},
    {"{\"version\": 1, \"tenants\": [" ACME "], \"extra\": 0}",
     {"top level: unknown key \"extra\"", NULL}},
    {"{\"version\": 1}", {"tenants: expected an array of tenants, got none", NULL}},
    {"{\"version\": 1, \"tenants\": {}}", {"tenants: expected an array of tenants, got an object",
                                           NULL}},
    {T1(""), {"tenants: expected 1 to 4096 tenants, got 0", NULL}},
    {T1("1"), {"tenants[0]: tenant: expected an object, got 1", NULL}},
    {T1("{\"tokens_sha256\": []}"), {"tenants[0]: name: expected a name, got none", NULL}},
    {T1("{\"name\": \"ac me\", \"tokens_sha256\": []}"),
     {"tenants[0]: name: expected 1-64 of [A-Za-z0-9._-], got \"ac me\"", NULL}},
    {T1("{\"name\": \"\", \"tokens_sha256\": []}"), {"tenants[0]: name:", "got \"\""}},
    {T1("{\"name\": \"" X32 X32 "x\", \"tokens_sha256\": []}"),
     {"tenants[0]: name:", "got \"" X32 "\"..."}},
    {T1("{\"name\": 5, \"tokens_sha256\": []}"), {"tenants[0]: name:", "got 5"}},
    {T1("{\"name\": null, \"tokens_sha256\": []}"), {"tenants[0]: name:", "got null"}},
    {T1("{\"name\": \"a\\u0000b\", \"tokens_sha256\": []}"), {"line 1", NULL}}, /* jansson */
    {T1(ACME ", {\"name\": \"acme\", \"tokens_sha256\": []}"),
     {"tenants[1] (acme): name: expected a unique name, got the name of tenants[0]", NULL}},
    {T1("{\"name\": \"acme\", \"wieght\": 2, \"tokens_sha256\": []}"),
     {"tenants[0] (acme): tenant: unknown key \"wieght\"", NULL}},
    {T1("{\"name\": \"acme\", \"weight\": 0, \"tokens_sha256\": []}"),
     {"tenants[0] (acme): weight: expected an integer from 1 to 1000, got 0", NULL}},
    {T1("{\"name\": \"acme\", \"weight\": 1001, \"tokens_sha256\": []}"),
     {"(acme): weight:", "got 1001"}},
    {T1("{\"name\": \"acme\", \"weight\": \"3\", \"tokens_sha256\": []}"),
     {"(acme): weight:", "got \"3\""}},
    {T1("{\"name\": \"acme\", \"weight\": 2.5, \"tokens_sha256\": []}"),
     {"(acme): weight:", "got a real number (2.5)"}},
    {T1("{\"name\": \"acme\", \"weight\": true, \"tokens_sha256\": []}"),
     {"(acme): weight:", "got true"}},
    {T1("{\"name\": \"acme\"}"),
     {"(acme): tokens_sha256: expected an array of digests, got none", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": \"" D_A "\"}"),
     {"(acme): tokens_sha256: expected an array of digests, got \"aaaa", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [5]}"),
     {"(acme): tokens_sha256[0]: expected a string of 64 hex digits, got 5", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [\"" D_A "\", \"abc\"]}"),
     {"(acme): tokens_sha256[1]: expected 64 hex digits, got 3 characters", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [\"" D_A "a\"]}"),
     {"(acme): tokens_sha256[0]: expected 64 hex digits, got 65 characters", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": "
        "[\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaag\"]}"),
     {"(acme): tokens_sha256[0]: expected 64 hex digits,", "(not hex at 63)"}},
    {T1(ACME ", {\"name\": \"beta\", \"tokens_sha256\": [\"" D_B "\", \"" D_A "\"]}"),
     {"tenants[1] (beta): tokens_sha256[1]: expected a digest listed once, got the digest of "
      "tenants[0] (acme)", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [\"" D_A "\", \"" D_B "\", \"" D_A "\"]}"),
     {"tenants[0] (acme): tokens_sha256[2]: expected a digest listed once, got the digest of "
      "tokens_sha256[0] again", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [], \"quotas\": []}"),
     {"(acme): quotas: expected an object, got an array", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [], \"quotas\": {\"session\": 1}}"),
     {"(acme): quotas: unknown key \"session\"", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [], \"quotas\": {\"sessions\": -1}}"),
     {"(acme): quotas.sessions: expected an integer >= 0, got -1", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [], \"quotas\": {\"kv_bytes\": \"1G\"}}"),
     {"(acme): quotas.kv_bytes: expected an integer >= 0, got \"1G\"", NULL}},
    {T1("{\"name\": \"acme\", \"tokens_sha256\": [], \"quotas\": {\"inflight_calls\": 1.0}}"),
     {"(acme): quotas.inflight_calls: expected an integer >= 0, got a real number", NULL}},
    {T1("{\"name\": \"acme\", \"name\": \"acme2\", \"tokens_sha256\": []}"),
     {"duplicate", NULL}},
};

static void test_ten_tenants_load_rejects_each_invalid_file_naming_the_field(void **state) {
    (void)state;
    for (size_t i = 0; i < AT_ARRAY_LEN(bad_cases); i++) {
        const bad_case_t *c = &bad_cases[i];
        tu_where_set("bad case %zu: %s", i, c->json);
        char path[PATH_MAX];
        write_file(c->json, path, sizeof path);
        ten_tenants_t *reg = (ten_tenants_t *)(uintptr_t)0x5a5a;
        at_diag_t d = {{0}};
        at_err_t e = ten_tenants_load(path, &reg, &d);
        TU_CHECK(e == AT_ERR_TENANTS_FILE, "got %s (%s)", at_err_name(e), d.msg);
        TU_CHECK(reg == (ten_tenants_t *)(uintptr_t)0x5a5a, "*out was written");
        TU_CHECK(strstr(d.msg, path) != NULL, "diag does not name the file: %s", d.msg);
        for (size_t k = 0; k < 2; k++)
            TU_CHECK(c->want[k] == NULL || strstr(d.msg, c->want[k]) != NULL,
                     "diag \"%s\" lacks \"%s\"", d.msg, c->want[k]);
    }
    tu_where_set("seed %" PRIu64, g_seed);
}

static void test_ten_tenants_load_of_a_missing_file_names_it(void **state) {
    (void)state;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/no-such-file.json", g_dir);
    ten_tenants_t *reg = NULL;
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenants_load(path, &reg, &d), AT_ERR_TENANTS_FILE);
    assert_null(reg);
    TU_CHECK(strstr(d.msg, path) != NULL, "diag: %s", d.msg);
}

/* ---- authentication ---- */

static void test_ten_tenants_authenticate_without_a_value_is_missing(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *t = NULL;
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenants_authenticate(reg, NULL, 0, &t, &d), AT_ERR_AUTH_MISSING);
    assert_int_equal(ten_tenants_authenticate(reg, "", 0, &t, NULL), AT_ERR_AUTH_MISSING);
    assert_int_equal(ten_tenants_authenticate(reg, "Bearer x", 0, &t, NULL), AT_ERR_AUTH_MISSING);
    assert_null(t);
    assert_string_equal(at_err_status_name(AT_ERR_AUTH_MISSING), "UNAUTHENTICATED");
    ten_tenants_destroy(&reg);
}

static void test_ten_tenants_authenticate_rejects_malformed_values(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    char long_value[TEN_TOKEN_MAX_BYTES + 16];
    snprintf(long_value, sizeof long_value, "Bearer ");
    memset(long_value + 7, 'x', TEN_TOKEN_MAX_BYTES + 1);
    long_value[7 + TEN_TOKEN_MAX_BYTES + 1] = '\0';
    const char *bad[] = {
        "Basic " TOK_ACME1, "Bearer", "Bearer ", "Bearer    ", "Bearer" TOK_ACME1,
        "Bearer\t" TOK_ACME1, " Bearer " TOK_ACME1, "Bearer " TOK_ACME1 " ",
        "Bearer " TOK_ACME1 " x", "Bearer " TOK_ACME1 "\n", "Bearer atk_\x01", "Bearer atk_\xc3\xa9",
        "Token " TOK_ACME1, "Bearez " TOK_ACME1, "   ", long_value,
    };
    for (size_t i = 0; i < AT_ARRAY_LEN(bad); i++) {
        ten_tenant_t *t = NULL;
        at_diag_t d = {{0}};
        at_err_t e = ten_tenants_authenticate(reg, bad[i], strlen(bad[i]), &t, &d);
        TU_CHECK(e == AT_ERR_AUTH_BAD && t == NULL, "value %zu \"%.40s\": %s", i, bad[i],
                 at_err_name(e));
        TU_CHECK(strstr(d.msg, TOK_ACME1) == NULL, "the diag shows the token: %s", d.msg);
    }
    /* A token one byte under the limit is well-formed: it is checked, and matches nobody. */
    long_value[7 + TEN_TOKEN_MAX_BYTES] = '\0';
    ten_tenant_t *t = NULL;
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenants_authenticate(reg, long_value, strlen(long_value), &t, &d),
                     AT_ERR_AUTH_BAD);
    TU_CHECK(strstr(d.msg, "matches no tenant") != NULL, "diag: %s", d.msg);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenants_authenticate_accepts_every_bearer_form(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    const char *good[] = {"Bearer " TOK_BETA, "bearer " TOK_BETA, "BEARER " TOK_BETA,
                          "bEaReR    " TOK_BETA};
    for (size_t i = 0; i < AT_ARRAY_LEN(good); i++) {
        ten_tenant_t *t = NULL;
        at_err_t e = ten_tenants_authenticate(reg, good[i], strlen(good[i]), &t, NULL);
        TU_CHECK(e == AT_OK && t != NULL, "value \"%s\": %s", good[i], at_err_name(e));
        assert_string_equal(ten_tenant_name(t), "beta");
        ten_tenant_unref(&t);
    }
    /* A gRPC slice is not NUL-terminated: only len bytes count. */
    char slice[64];
    memset(slice, 'Z', sizeof slice);
    memcpy(slice, "Bearer " TOK_BETA, strlen("Bearer " TOK_BETA));
    ten_tenant_t *t = NULL;
    assert_int_equal(ten_tenants_authenticate(reg, slice, strlen("Bearer " TOK_BETA), &t, NULL),
                     AT_OK);
    assert_string_equal(ten_tenant_name(t), "beta");
    ten_tenant_unref(&t);
    /* ...and a prefix of a right token is a wrong token. */
    assert_int_equal(ten_tenants_authenticate(reg, slice, strlen("Bearer " TOK_BETA) - 1, &t, NULL),
                     AT_ERR_AUTH_BAD);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenants_authenticate_finds_each_tenant_by_each_token(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    ten_tenant_t *beta = ten_tenants_find(reg, "beta");
    const struct {
        const char *token;
        ten_tenant_t *want;
    } cases[] = {{TOK_ACME1, acme}, {TOK_ACME2, acme}, {TOK_BETA, beta}};
    for (size_t i = 0; i < AT_ARRAY_LEN(cases); i++) {
        ten_tenant_t *t = NULL;
        at_err_t e = auth(reg, cases[i].token, &t);
        TU_CHECK(e == AT_OK && t == cases[i].want, "token %s: %s", cases[i].token,
                 at_err_name(e));
        ten_tenant_unref(&t);
    }
    const char *wrong[] = {TOK_GAMMA, "atk_acme-one0", "atk_acme-on", "ATK_ACME-ONE", "x"};
    for (size_t i = 0; i < AT_ARRAY_LEN(wrong); i++) {
        ten_tenant_t *t = NULL;
        at_diag_t d = {{0}};
        char buf[64];
        bearer(wrong[i], buf, sizeof buf);
        at_err_t e = ten_tenants_authenticate(reg, buf, strlen(buf), &t, &d);
        TU_CHECK(e == AT_ERR_AUTH_BAD && t == NULL, "token %s: %s", wrong[i], at_err_name(e));
        TU_CHECK(strstr(d.msg, "matches no tenant") != NULL, "diag: %s", d.msg);
    }
    assert_string_equal(at_err_status_name(AT_ERR_AUTH_BAD), "UNAUTHENTICATED");
    ten_tenant_unref(&acme);
    ten_tenant_unref(&beta);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenants_open_table_admits_every_call_as_default(void **state) {
    (void)state;
    ten_tenants_t *reg = NULL;
    assert_int_equal(ten_tenants_create_open(&reg), AT_OK);
    assert_true(ten_tenants_is_open(reg));
    const char *values[] = {NULL, "", "Basic x", "Bearer nobody"};
    ten_tenant_t *first = NULL;
    for (size_t i = 0; i < AT_ARRAY_LEN(values); i++) {
        ten_tenant_t *t = NULL;
        const char *v = values[i];
        assert_int_equal(ten_tenants_authenticate(reg, v, v ? strlen(v) : 0, &t, NULL), AT_OK);
        assert_string_equal(ten_tenant_name(t), "default");
        if (first == NULL)
            first = t;
        else {
            assert_ptr_equal(t, first);
            ten_tenant_unref(&t);
        }
    }
    assert_int_equal(ten_tenant_weight(first), 1);
    ten_quotas_t q;
    ten_tenant_get_quotas(first, &q);
    assert_true(q.sessions == TEN_UNLIMITED && q.kv_bytes == TEN_UNLIMITED &&
                q.inflight_calls == TEN_UNLIMITED);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(ten_tenant_reserve_call(first, NULL), AT_OK);
    assert_int_equal(ten_tenant_reserve_session(first, UINT64_MAX / 2, NULL), AT_OK);
    assert_int_equal(ten_tenant_reserve_session(first, UINT64_MAX / 2, NULL), AT_OK);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(first, &st);
    assert_int_equal(st.inflight_calls, 1000);
    assert_int_equal(st.sessions, 2);
    /* There is no file to switch to: reload is refused and changes nothing. */
    char text[1024], path[PATH_MAX];
    acme_beta_text(text, sizeof text);
    write_file(text, path, sizeof path);
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenants_reload(reg, path, &d), AT_ERR_CONFIG);
    ten_tenant_t *t = NULL;
    assert_int_equal(ten_tenants_authenticate(reg, NULL, 0, &t, NULL), AT_OK);
    assert_ptr_equal(t, first);
    ten_tenant_unref(&t);
    /* The tenant outlives the table. */
    ten_tenants_destroy(&reg);
    assert_string_equal(ten_tenant_name(first), "default");
    ten_tenant_unref(&first);
}

/* ---- quotas ---- */

static void test_ten_tenant_sessions_quota_is_exact_and_release_makes_room(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta(); /* acme: sessions 4, kv_bytes 1000, inflight 2 */
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    for (int i = 0; i < 4; i++)
        assert_int_equal(ten_tenant_reserve_session(acme, 10, NULL), AT_OK);
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenant_reserve_session(acme, 10, &d), AT_ERR_QUOTA_SESSIONS);
    assert_string_equal(d.msg, "tenant acme: quota sessions=4 reached (4 open)");
    assert_string_equal(at_err_status_name(AT_ERR_QUOTA_SESSIONS), "RESOURCE_EXHAUSTED");
    ten_tenant_stats_t st;
    ten_tenant_get_stats(acme, &st);
    assert_int_equal(st.sessions, 4);
    assert_int_equal(st.kv_bytes, 40); /* the failed reserve took nothing */
    ten_tenant_release_session(acme, 10);
    assert_int_equal(ten_tenant_reserve_session(acme, 10, NULL), AT_OK);
    assert_int_equal(ten_tenant_reserve_session(acme, 10, NULL), AT_ERR_QUOTA_SESSIONS);
    for (int i = 0; i < 4; i++)
        ten_tenant_release_session(acme, 10);
    ten_tenant_get_stats(acme, &st);
    assert_int_equal(st.sessions, 0);
    assert_int_equal(st.kv_bytes, 0);
    ten_tenant_unref(&acme);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenant_kv_bytes_quota_is_exact(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    assert_int_equal(ten_tenant_reserve_session(acme, 600, NULL), AT_OK);
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenant_reserve_session(acme, 401, &d), AT_ERR_QUOTA_KV_BYTES);
    assert_string_equal(d.msg, "tenant acme: quota kv_bytes=1000 reached (600 in use, 401 more "
                               "asked)");
    assert_int_equal(ten_tenant_reserve_session(acme, UINT64_MAX, NULL), AT_ERR_QUOTA_KV_BYTES);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(acme, &st);
    assert_int_equal(st.sessions, 1); /* a kv failure takes no session either */
    assert_int_equal(st.kv_bytes, 600);
    assert_int_equal(ten_tenant_reserve_session(acme, 400, NULL), AT_OK); /* exactly the limit */
    assert_int_equal(ten_tenant_reserve_session(acme, 1, NULL), AT_ERR_QUOTA_KV_BYTES);
    assert_int_equal(ten_tenant_reserve_session(acme, 0, NULL), AT_OK);
    ten_tenant_release_session(acme, 400);
    assert_int_equal(ten_tenant_reserve_session(acme, 400, NULL), AT_OK);
    ten_tenant_release_session(acme, 400);
    ten_tenant_release_session(acme, 600);
    ten_tenant_release_session(acme, 0);
    ten_tenant_get_stats(acme, &st);
    assert_int_equal(st.sessions, 0);
    assert_int_equal(st.kv_bytes, 0);
    ten_tenant_unref(&acme);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenant_inflight_quota_is_exact_and_release_makes_room(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    assert_int_equal(ten_tenant_reserve_call(acme, NULL), AT_OK);
    assert_int_equal(ten_tenant_reserve_call(acme, NULL), AT_OK);
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenant_reserve_call(acme, &d), AT_ERR_QUOTA_INFLIGHT);
    assert_string_equal(d.msg, "tenant acme: quota inflight_calls=2 reached (2 in flight)");
    ten_tenant_release_call(acme);
    assert_int_equal(ten_tenant_reserve_call(acme, NULL), AT_OK);
    assert_int_equal(ten_tenant_reserve_call(acme, NULL), AT_ERR_QUOTA_INFLIGHT);
    ten_tenant_release_call(acme);
    ten_tenant_release_call(acme);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(acme, &st);
    assert_int_equal(st.inflight_calls, 0);
    ten_tenant_unref(&acme);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenant_zero_quotas_admit_nothing(void **state) {
    (void)state;
    char path[PATH_MAX];
    ten_tenants_t *reg = load_text(
        T1("{\"name\": \"z\", \"tokens_sha256\": [], \"quotas\": {\"sessions\": 0, "
           "\"kv_bytes\": 0, \"inflight_calls\": 0}}"),
        path, sizeof path);
    ten_tenant_t *z = ten_tenants_find(reg, "z");
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenant_reserve_call(z, &d), AT_ERR_QUOTA_INFLIGHT);
    assert_string_equal(d.msg, "tenant z: quota inflight_calls=0 reached (0 in flight)");
    assert_int_equal(ten_tenant_reserve_session(z, 0, NULL), AT_ERR_QUOTA_SESSIONS);
    ten_tenant_unref(&z);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenant_record_call_counts_by_status(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *beta = ten_tenants_find(reg, "beta");
    ten_tenant_record_call(beta, 0, 100, 1000, 5, 50);
    ten_tenant_record_call(beta, 0, 200, 3000, 6, 60);
    ten_tenant_record_call(beta, 8, 0, 0, 7, 0);   /* RESOURCE_EXHAUSTED */
    ten_tenant_record_call(beta, 16, 0, 0, 0, 0);  /* UNAUTHENTICATED */
    ten_tenant_record_call(beta, 99, 1, 7, 0, 0);  /* out of range: UNKNOWN */
    ten_tenant_stats_t st;
    ten_tenant_get_stats(beta, &st);
    assert_int_equal(st.calls, 5);
    assert_int_equal(st.tokens, 301);
    assert_int_equal(st.work, 4007);
    assert_int_equal(st.queue_ns, 18);
    assert_int_equal(st.device_ns, 110);
    uint64_t want[TEN_STATUS_COUNT] = {0};
    want[0] = 2;
    want[8] = 1;
    want[16] = 1;
    want[2] = 1;
    assert_memory_equal(st.by_status, want, sizeof want);
    ten_tenant_unref(&beta);
    ten_tenants_destroy(&reg);
}

/* ---- quotas under concurrency ---- */

#define N_THREADS 8

typedef struct race {
    ten_tenant_t *t;
    pthread_barrier_t *start;
    atomic_long *held;      /* reservations held right now, counted by the threads */
    atomic_long *max_held;  /* the most ever seen */
    int iters;
    bool keep;              /* keep what is reserved (no release) */
    long ok;                /* outcomes of this thread */
    long refused;
    long other;
} race_t;

static void note_max(atomic_long *max, long v) {
    long m = atomic_load(max);
    while (v > m && !atomic_compare_exchange_weak(max, &m, v))
        ;
}

static void *race_calls(void *arg) {
    race_t *r = arg;
    pthread_barrier_wait(r->start);
    for (int i = 0; i < r->iters; i++) {
        at_err_t e = ten_tenant_reserve_call(r->t, NULL);
        if (e == AT_ERR_QUOTA_INFLIGHT) {
            r->refused++;
            continue;
        }
        if (e != AT_OK) {
            r->other++;
            continue;
        }
        r->ok++;
        note_max(r->max_held, atomic_fetch_add(r->held, 1) + 1);
        if (!r->keep) {
            atomic_fetch_sub(r->held, 1);
            ten_tenant_release_call(r->t);
        }
    }
    return NULL;
}

static void *race_sessions(void *arg) {
    race_t *r = arg;
    pthread_barrier_wait(r->start);
    for (int i = 0; i < r->iters; i++) {
        at_err_t e = ten_tenant_reserve_session(r->t, 1000, NULL);
        if (e == AT_OK)
            r->ok++;
        else if (e == AT_ERR_QUOTA_KV_BYTES || e == AT_ERR_QUOTA_SESSIONS)
            r->refused++;
        else
            r->other++;
    }
    return NULL;
}

/* Runs fn in N_THREADS threads started together; sums their outcomes into *sum. */
static void run_race(void *(*fn)(void *), ten_tenant_t *t, int iters, bool keep, race_t *sum,
                     long *max_held) {
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, N_THREADS);
    atomic_long held = 0, max = 0;
    race_t r[N_THREADS];
    pthread_t th[N_THREADS];
    for (int i = 0; i < N_THREADS; i++) {
        r[i] = (race_t){.t = t, .start = &start, .held = &held, .max_held = &max, .iters = iters,
                        .keep = keep};
        assert_int_equal(pthread_create(&th[i], NULL, fn, &r[i]), 0);
    }
    memset(sum, 0, sizeof *sum);
    for (int i = 0; i < N_THREADS; i++) {
        pthread_join(th[i], NULL);
        sum->ok += r[i].ok;
        sum->refused += r[i].refused;
        sum->other += r[i].other;
    }
    pthread_barrier_destroy(&start);
    if (max_held != NULL)
        *max_held = atomic_load(&max);
}

static void test_ten_tenant_concurrent_calls_never_exceed_the_inflight_quota(void **state) {
    (void)state;
    char path[PATH_MAX];
    ten_tenants_t *reg = load_text(
        T1("{\"name\": \"c\", \"tokens_sha256\": [], \"quotas\": {\"inflight_calls\": 5}}"), path,
        sizeof path);
    ten_tenant_t *c = ten_tenants_find(reg, "c");
    race_t sum;
    long max_held = 0;
    /* Reserve and release in a loop: at no moment are more than 5 held. */
    run_race(race_calls, c, 20000, false, &sum, &max_held);
    print_message("inflight race: %ld admitted, %ld refused, at most %ld held\n", sum.ok,
                  sum.refused, max_held);
    assert_int_equal(sum.other, 0);
    assert_int_equal(sum.ok + sum.refused, N_THREADS * 20000);
    TU_CHECK(max_held <= 5, "%ld calls in flight at once, quota 5", max_held);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(c, &st);
    assert_int_equal(st.inflight_calls, 0);
    /* Reserve and keep: exactly 5 succeed among all threads. */
    run_race(race_calls, c, 100, true, &sum, NULL);
    assert_int_equal(sum.ok, 5);
    assert_int_equal(sum.refused, N_THREADS * 100 - 5);
    ten_tenant_get_stats(c, &st);
    assert_int_equal(st.inflight_calls, 5);
    for (int i = 0; i < 5; i++)
        ten_tenant_release_call(c);
    ten_tenant_unref(&c);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenant_concurrent_sessions_stop_exactly_at_the_kv_quota(void **state) {
    (void)state;
    char path[PATH_MAX];
    ten_tenants_t *reg = load_text(
        T1("{\"name\": \"s\", \"tokens_sha256\": [], \"quotas\": {\"sessions\": 100, "
           "\"kv_bytes\": 7999}}"),
        path, sizeof path);
    ten_tenant_t *s = ten_tenants_find(reg, "s");
    race_t sum;
    run_race(race_sessions, s, 50, true, &sum, NULL);
    assert_int_equal(sum.other, 0);
    assert_int_equal(sum.ok, 7);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(s, &st);
    assert_int_equal(st.sessions, 7);
    assert_int_equal(st.kv_bytes, 7000);
    ten_tenant_unref(&s);
    ten_tenants_destroy(&reg);
}

/* ---- reload ---- */

static void test_ten_tenants_reload_removes_adds_and_keeps_tenants(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    ten_tenant_t *beta = NULL;
    assert_int_equal(auth(reg, TOK_BETA, &beta), AT_OK); /* a call in flight for beta */
    assert_int_equal(ten_tenant_reserve_call(beta, NULL), AT_OK);

    char a1[65], g[65], text[1024], path[PATH_MAX];
    digest_of(TOK_ACME1, a1);
    digest_of(TOK_GAMMA, g);
    snprintf(text, sizeof text,
             "{\"version\": 1, \"tenants\": ["
             "{\"name\": \"gamma\", \"weight\": 7, \"tokens_sha256\": [\"%s\"]},"
             "{\"name\": \"acme\", \"weight\": 3, \"tokens_sha256\": [\"%s\"]}]}",
             g, a1);
    write_file(text, path, sizeof path);
    at_diag_t d = {{0}};
    at_err_t e = ten_tenants_reload(reg, path, &d);
    TU_CHECK(e == AT_OK, "reload: %s %s", at_err_name(e), d.msg);

    ten_tenant_t *t = NULL;
    /* beta is gone: its token fails, its name is unknown... */
    assert_int_equal(auth(reg, TOK_BETA, &t), AT_ERR_AUTH_BAD);
    assert_null(ten_tenants_find(reg, "beta"));
    /* ...but the call in flight still holds a valid tenant. */
    assert_string_equal(ten_tenant_name(beta), "beta");
    ten_tenant_record_call(beta, 0, 1, 1, 1, 1);
    ten_tenant_release_call(beta);
    const uint64_t beta_id = ten_tenant_id(beta);
    ten_tenant_unref(&beta);
    /* acme stays (same object), with only the tokens listed now. */
    assert_int_equal(auth(reg, TOK_ACME1, &t), AT_OK);
    assert_ptr_equal(t, acme);
    ten_tenant_unref(&t);
    assert_int_equal(auth(reg, TOK_ACME2, &t), AT_ERR_AUTH_BAD);
    /* gamma is new. */
    assert_int_equal(auth(reg, TOK_GAMMA, &t), AT_OK);
    assert_string_equal(ten_tenant_name(t), "gamma");
    assert_int_equal(ten_tenant_weight(t), 7);
    ten_tenant_unref(&t);
    ten_tenant_t **list = NULL;
    size_t n = 0;
    assert_int_equal(ten_tenants_list(reg, &list, &n), AT_OK);
    assert_int_equal(n, 2);
    assert_string_equal(ten_tenant_name(list[0]), "gamma");
    assert_ptr_equal(list[1], acme);
    for (size_t i = 0; i < n; i++)
        ten_tenant_unref(&list[i]);
    free(list);
    /* A reload that lists beta again brings back the same tenant, counters and all (the server
     * keys sessions by the tenant object, so its sessions come back too). */
    acme_beta_text(text, sizeof text);
    write_file(text, path, sizeof path);
    e = ten_tenants_reload(reg, path, &d);
    TU_CHECK(e == AT_OK, "reload: %s %s", at_err_name(e), d.msg);
    assert_int_equal(auth(reg, TOK_BETA, &t), AT_OK);
    assert_true(ten_tenant_id(t) == beta_id);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(t, &st);
    assert_int_equal(st.calls, 1);
    ten_tenant_unref(&t);
    ten_tenant_unref(&acme);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenants_reload_keeps_counters_and_applies_new_limits(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta(); /* acme: weight 3, sessions 4, kv 1000, inflight 2 */
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    uint64_t id = ten_tenant_id(acme);
    assert_int_equal(ten_tenant_reserve_session(acme, 300, NULL), AT_OK);
    assert_int_equal(ten_tenant_reserve_session(acme, 300, NULL), AT_OK);
    assert_int_equal(ten_tenant_reserve_call(acme, NULL), AT_OK);
    ten_tenant_record_call(acme, 0, 42, 42, 10, 20);
    ten_tenant_record_call(acme, 14, 0, 0, 1, 0);
    ten_tenant_stats_t before;
    ten_tenant_get_stats(acme, &before);

    /* New weight and tokens; quotas lowered below the current use (2 sessions, 600 bytes). */
    char a2[65], b[65], text[1024], path[PATH_MAX];
    digest_of(TOK_ACME2, a2);
    digest_of(TOK_BETA, b);
    snprintf(text, sizeof text,
             "{\"version\": 1, \"tenants\": ["
             "{\"name\": \"beta\", \"tokens_sha256\": [\"%s\"]},"
             "{\"name\": \"acme\", \"weight\": 9, \"tokens_sha256\": [\"%s\"],"
             " \"quotas\": {\"sessions\": 1, \"kv_bytes\": 500}}]}",
             b, a2);
    write_file(text, path, sizeof path);
    assert_int_equal(ten_tenants_reload(reg, path, NULL), AT_OK);

    ten_tenant_t *t = ten_tenants_find(reg, "acme");
    assert_ptr_equal(t, acme);
    ten_tenant_unref(&t);
    assert_int_equal(ten_tenant_id(acme), id);
    assert_int_equal(ten_tenant_weight(acme), 9);
    ten_quotas_t q;
    ten_tenant_get_quotas(acme, &q);
    assert_int_equal(q.sessions, 1);
    assert_int_equal(q.kv_bytes, 500);
    assert_true(q.inflight_calls == TEN_UNLIMITED); /* left out now */
    ten_tenant_stats_t after;
    ten_tenant_get_stats(acme, &after);
    assert_memory_equal(&before, &after, sizeof before);
    /* Nothing is revoked; new sessions wait until use is under the new limits. */
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenant_reserve_session(acme, 0, &d), AT_ERR_QUOTA_SESSIONS);
    assert_string_equal(d.msg, "tenant acme: quota sessions=1 reached (2 open)");
    ten_tenant_release_session(acme, 300);
    assert_int_equal(ten_tenant_reserve_session(acme, 0, &d), AT_ERR_QUOTA_SESSIONS);
    ten_tenant_release_session(acme, 300);
    assert_int_equal(ten_tenant_reserve_session(acme, 501, &d), AT_ERR_QUOTA_KV_BYTES);
    assert_int_equal(ten_tenant_reserve_session(acme, 500, &d), AT_OK);
    assert_int_equal(ten_tenant_reserve_call(acme, NULL), AT_OK); /* unlimited now */
    assert_int_equal(ten_tenant_reserve_call(acme, NULL), AT_OK);
    /* Tokens: only the new list. */
    assert_int_equal(auth(reg, TOK_ACME1, &t), AT_ERR_AUTH_BAD);
    assert_int_equal(auth(reg, TOK_ACME2, &t), AT_OK);
    assert_ptr_equal(t, acme);
    ten_tenant_unref(&t);
    for (int i = 0; i < 3; i++)
        ten_tenant_release_call(acme);
    ten_tenant_release_session(acme, 500);
    ten_tenant_unref(&acme);
    ten_tenants_destroy(&reg);
}

static void test_ten_tenants_reload_with_a_broken_file_changes_nothing(void **state) {
    (void)state;
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    char b[65], text[1024], path[PATH_MAX];
    digest_of(TOK_BETA, b);
    /* Valid up to the last tenant's weight. */
    snprintf(text, sizeof text,
             "{\"version\": 1, \"tenants\": ["
             "{\"name\": \"acme\", \"weight\": 5, \"tokens_sha256\": []},"
             "{\"name\": \"beta\", \"weight\": 0, \"tokens_sha256\": [\"%s\"]}]}",
             b);
    write_file(text, path, sizeof path);
    at_diag_t d = {{0}};
    assert_int_equal(ten_tenants_reload(reg, path, &d), AT_ERR_TENANTS_FILE);
    TU_CHECK(strstr(d.msg, "tenants[1] (beta): weight") != NULL, "diag: %s", d.msg);
    char missing[PATH_MAX];
    snprintf(missing, sizeof missing, "%s/absent.json", g_dir);
    assert_int_equal(ten_tenants_reload(reg, missing, NULL), AT_ERR_TENANTS_FILE);
    write_file("{\"version\": 1, \"tenants\": [", path, sizeof path);
    assert_int_equal(ten_tenants_reload(reg, path, NULL), AT_ERR_TENANTS_FILE);

    ten_tenant_t *t = NULL;
    assert_int_equal(auth(reg, TOK_ACME1, &t), AT_OK);
    assert_ptr_equal(t, acme);
    ten_tenant_unref(&t);
    assert_int_equal(auth(reg, TOK_BETA, &t), AT_OK);
    ten_tenant_unref(&t);
    assert_int_equal(ten_tenant_weight(acme), 3);
    ten_quotas_t q;
    ten_tenant_get_quotas(acme, &q);
    assert_int_equal(q.sessions, 4);
    ten_tenant_unref(&acme);
    ten_tenants_destroy(&reg);
}

/* Threads authenticate with the token of a tenant every file keeps (it must always work, always
 * as the same object), of one only the first file has and of one only the second has (each may
 * work or not), and reserve, record and release calls, while the main thread reloads. */
typedef struct reload_worker {
    ten_tenants_t *reg;
    ten_tenant_t *keep;           /* the object "keep" must always be */
    atomic_bool *stop;
    atomic_long *held;            /* keep's calls held now */
    atomic_long *max_held;
    long keep_ok, keep_refused;   /* outcomes */
    long gone_ok, gone_bad, fresh_ok, fresh_bad;
    long unexpected;
} reload_worker_t;

static void *reload_worker(void *arg) {
    reload_worker_t *w = arg;
    char k[64], g[64], f[64];
    bearer("atk_keep", k, sizeof k);
    bearer("atk_gone", g, sizeof g);
    bearer("atk_fresh", f, sizeof f);
    long iter = 0;
    while (!atomic_load(w->stop) || iter < 200) {
        iter++;
        ten_tenant_t *t = NULL;
        at_err_t e = ten_tenants_authenticate(w->reg, k, strlen(k), &t, NULL);
        if (e != AT_OK || t != w->keep) {
            w->unexpected++;
            ten_tenant_unref(&t);
            continue;
        }
        e = ten_tenant_reserve_call(t, NULL);
        if (e == AT_OK) {
            w->keep_ok++;
            note_max(w->max_held, atomic_fetch_add(w->held, 1) + 1);
            ten_tenant_record_call(t, 0, 3, 9, 1, 2);
            atomic_fetch_sub(w->held, 1);
            ten_tenant_release_call(t);
        } else if (e == AT_ERR_QUOTA_INFLIGHT)
            w->keep_refused++;
        else
            w->unexpected++;
        ten_tenant_unref(&t);

        const char *v[2] = {g, f};
        const char *name[2] = {"gone", "fresh"};
        long *ok[2] = {&w->gone_ok, &w->fresh_ok}, *bad[2] = {&w->gone_bad, &w->fresh_bad};
        for (int j = 0; j < 2; j++) {
            e = ten_tenants_authenticate(w->reg, v[j], strlen(v[j]), &t, NULL);
            if (e == AT_ERR_AUTH_BAD) {
                (*bad[j])++;
                continue;
            }
            if (e != AT_OK || strcmp(ten_tenant_name(t), name[j]) != 0) {
                w->unexpected++;
                ten_tenant_unref(&t);
                continue;
            }
            (*ok[j])++;
            if (ten_tenant_reserve_call(t, NULL) == AT_OK)
                ten_tenant_release_call(t);
            ten_tenant_unref(&t);
        }
    }
    return NULL;
}

static void test_ten_tenants_reload_while_threads_authenticate_and_reserve(void **state) {
    (void)state;
    char dk[65], dg[65], df[65], text[1024], path_a[PATH_MAX], path_b[PATH_MAX];
    digest_of("atk_keep", dk);
    digest_of("atk_gone", dg);
    digest_of("atk_fresh", df);
    snprintf(text, sizeof text,
             "{\"version\": 1, \"tenants\": ["
             "{\"name\": \"keep\", \"weight\": 2, \"tokens_sha256\": [\"%s\"],"
             " \"quotas\": {\"inflight_calls\": 3}},"
             "{\"name\": \"gone\", \"tokens_sha256\": [\"%s\"]}]}",
             dk, dg);
    write_file(text, path_a, sizeof path_a);
    snprintf(text, sizeof text,
             "{\"version\": 1, \"tenants\": ["
             "{\"name\": \"fresh\", \"tokens_sha256\": [\"%s\"]},"
             "{\"name\": \"keep\", \"weight\": 5, \"tokens_sha256\": [\"%s\", \"%s\"],"
             " \"quotas\": {\"inflight_calls\": 4}}]}",
             df, D_A, dk);
    write_file(text, path_b, sizeof path_b);
    ten_tenants_t *reg = NULL;
    assert_int_equal(ten_tenants_load(path_a, &reg, NULL), AT_OK);
    ten_tenant_t *keep = ten_tenants_find(reg, "keep");

    enum { WORKERS = 4, RELOADS = 300 };
    atomic_bool stop = false;
    atomic_long held = 0, max_held = 0;
    reload_worker_t w[WORKERS];
    pthread_t th[WORKERS];
    for (int i = 0; i < WORKERS; i++) {
        w[i] = (reload_worker_t){.reg = reg, .keep = keep, .stop = &stop, .held = &held,
                                 .max_held = &max_held};
        assert_int_equal(pthread_create(&th[i], NULL, reload_worker, &w[i]), 0);
    }
    long reload_failures = 0;
    for (int r = 0; r < RELOADS; r++) {
        at_diag_t d = {{0}};
        if (ten_tenants_reload(reg, (r & 1) ? path_a : path_b, &d) != AT_OK) {
            reload_failures++;
            print_error("reload %d: %s\n", r, d.msg);
        }
        if (r % 50 == 0)
            sched_yield();
    }
    atomic_store(&stop, true);
    reload_worker_t sum = {0};
    for (int i = 0; i < WORKERS; i++) {
        pthread_join(th[i], NULL);
        sum.keep_ok += w[i].keep_ok;
        sum.keep_refused += w[i].keep_refused;
        sum.gone_ok += w[i].gone_ok;
        sum.gone_bad += w[i].gone_bad;
        sum.fresh_ok += w[i].fresh_ok;
        sum.fresh_bad += w[i].fresh_bad;
        sum.unexpected += w[i].unexpected;
    }
    print_message("reload race: keep %ld admitted %ld refused; gone %ld/%ld, fresh %ld/%ld "
                  "(ok/bad); %ld in flight at most\n",
                  sum.keep_ok, sum.keep_refused, sum.gone_ok, sum.gone_bad, sum.fresh_ok,
                  sum.fresh_bad, atomic_load(&max_held));
    assert_int_equal(reload_failures, 0);
    assert_int_equal(sum.unexpected, 0);
    TU_CHECK(atomic_load(&max_held) <= 4, "%ld in flight, the larger quota is 4",
             atomic_load(&max_held));
    /* The last reload (r = RELOADS - 1, odd) loaded file A. */
    assert_int_equal(ten_tenant_weight(keep), 2);
    ten_tenant_t *t = NULL;
    assert_int_equal(auth(reg, "atk_gone", &t), AT_OK);
    ten_tenant_unref(&t);
    assert_int_equal(auth(reg, "atk_fresh", &t), AT_ERR_AUTH_BAD);
    ten_tenant_stats_t st;
    ten_tenant_get_stats(keep, &st);
    assert_int_equal(st.inflight_calls, 0);
    assert_int_equal(st.calls, (uint64_t)sum.keep_ok);
    assert_int_equal(st.tokens, 3 * (uint64_t)sum.keep_ok);
    ten_tenant_unref(&keep);
    ten_tenants_destroy(&reg);
}

/* ---- out of memory ---- */

static void test_ten_tenants_load_and_reload_fail_cleanly_without_memory(void **state) {
    (void)state;
    char text[1024], path[PATH_MAX];
    acme_beta_text(text, sizeof text);
    write_file(text, path, sizeof path);
    /* Load: every allocation fails in turn, until none is left to fail. */
    long n = 0;
    for (;; n++) {
        ten_tenants_t *reg = NULL;
        fail_alloc(n);
        at_err_t e = ten_tenants_load(path, &reg, NULL);
        long failed = atomic_load(&g_alloc_failed);
        fail_no_alloc();
        if (failed == 0) {
            assert_int_equal(e, AT_OK);
            ten_tenants_destroy(&reg);
            break;
        }
        TU_CHECK(e == AT_ERR_NOMEM && reg == NULL, "load, allocation %ld failed: %s", n,
                 at_err_name(e));
    }
    print_message("load: %ld allocations, each failed once\n", n);
    TU_CHECK(n >= 3, "only %ld allocations: the hook misses some", n);

    /* Reload: the old table keeps working after each failure. */
    ten_tenants_t *reg = load_acme_beta();
    ten_tenant_t *acme = ten_tenants_find(reg, "acme");
    char g[65];
    digest_of(TOK_GAMMA, g);
    snprintf(text, sizeof text,
             "{\"version\": 1, \"tenants\": [{\"name\": \"acme\", \"tokens_sha256\": []},"
             "{\"name\": \"gamma\", \"tokens_sha256\": [\"%s\"]}]}",
             g);
    write_file(text, path, sizeof path);
    for (n = 0;; n++) {
        fail_alloc(n);
        at_err_t e = ten_tenants_reload(reg, path, NULL);
        long failed = atomic_load(&g_alloc_failed);
        fail_no_alloc();
        ten_tenant_t *t = NULL;
        if (failed == 0) {
            assert_int_equal(e, AT_OK);
            assert_int_equal(auth(reg, TOK_GAMMA, &t), AT_OK);
            ten_tenant_unref(&t);
            break;
        }
        TU_CHECK(e == AT_ERR_NOMEM, "reload, allocation %ld failed: %s", n, at_err_name(e));
        assert_int_equal(auth(reg, TOK_ACME1, &t), AT_OK);
        assert_ptr_equal(t, acme);
        ten_tenant_unref(&t);
        assert_int_equal(auth(reg, TOK_GAMMA, &t), AT_ERR_AUTH_BAD);
        assert_int_equal(ten_tenant_weight(acme), 3);
    }
    assert_int_equal(ten_tenant_weight(acme), 1);
    ten_tenant_unref(&acme);

    /* List and create_open. */
    ten_tenant_t **list = NULL;
    size_t count = 0;
    fail_alloc(0);
    assert_int_equal(ten_tenants_list(reg, &list, &count), AT_ERR_NOMEM);
    fail_no_alloc();
    assert_null(list);
    ten_tenants_destroy(&reg);
    for (n = 0;; n++) {
        ten_tenants_t *open = NULL;
        fail_alloc(n);
        at_err_t e = ten_tenants_create_open(&open);
        long failed = atomic_load(&g_alloc_failed);
        fail_no_alloc();
        if (failed == 0) {
            assert_int_equal(e, AT_OK);
            ten_tenants_destroy(&open);
            break;
        }
        TU_CHECK(e == AT_ERR_NOMEM && open == NULL, "create_open, allocation %ld: %s", n,
                 at_err_name(e));
    }
}

/* ---- tokens ---- */

static void test_ten_token_digest_hex_matches_a_known_vector(void **state) {
    (void)state;
    char hex[TEN_DIGEST_HEX_LEN + 1];
    assert_int_equal(ten_token_digest_hex("abcdef", 3, hex, NULL), AT_OK); /* "abc" */
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

static bool is_b64url(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '_';
}

static void test_ten_token_generate_makes_tokens_that_authenticate(void **state) {
    (void)state;
    enum { N = 3 };
    ten_token_t tok[N];
    for (int i = 0; i < N; i++) {
        at_diag_t d = {{0}};
        at_err_t e = ten_token_generate(&tok[i], &d);
        TU_CHECK(e == AT_OK, "generate: %s %s", at_err_name(e), d.msg);
        assert_int_equal(strlen(tok[i].token), TEN_TOKEN_LEN);
        assert_memory_equal(tok[i].token, TEN_TOKEN_PREFIX, 4);
        for (size_t k = 4; k < TEN_TOKEN_LEN; k++)
            TU_CHECK(is_b64url(tok[i].token[k]), "character %zu of %s", k, tok[i].token);
        assert_int_equal(strlen(tok[i].sha256_hex), TEN_DIGEST_HEX_LEN);
        char hex[TEN_DIGEST_HEX_LEN + 1];
        digest_of(tok[i].token, hex);
        assert_string_equal(hex, tok[i].sha256_hex);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(tok[i].token, tok[j].token);
    }
    char text[1024], path[PATH_MAX];
    snprintf(text, sizeof text,
             "{\"version\": 1, \"tenants\": [{\"name\": \"one\", \"tokens_sha256\": [\"%s\"]},"
             "{\"name\": \"two\", \"tokens_sha256\": [\"%s\", \"%s\"]}]}",
             tok[0].sha256_hex, tok[1].sha256_hex, tok[2].sha256_hex);
    ten_tenants_t *reg = load_text(text, path, sizeof path);
    const char *want[N] = {"one", "two", "two"};
    for (int i = 0; i < N; i++) {
        ten_tenant_t *t = NULL;
        assert_int_equal(auth(reg, tok[i].token, &t), AT_OK);
        assert_string_equal(ten_tenant_name(t), want[i]);
        ten_tenant_unref(&t);
    }
    ten_tenants_destroy(&reg);
}

/* ---- setup ---- */

static int setup_dir(void **state) {
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/test_ten_tenant.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(g_dir) == NULL) {
        print_error("mkdtemp %s failed\n", g_dir);
        return -1;
    }
    return 0;
}

static int teardown_dir(void **state) {
    (void)state;
    char path[PATH_MAX];
    for (unsigned i = 0; i < g_files; i++) {
        snprintf(path, sizeof path, "%s/t%03u.json", g_dir, i);
        unlink(path);
    }
    return rmdir(g_dir) == 0 ? 0 : -1;
}

int main(void) {
    g_seed = tu_base_seed("test_ten_tenant");
    tu_where_set("seed %" PRIu64, g_seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ten_tenant_name_valid_follows_the_pattern),
        cmocka_unit_test(test_ten_tenants_load_reads_names_weights_and_quotas),
        cmocka_unit_test(test_ten_tenants_load_accepts_the_example_file),
        cmocka_unit_test(test_ten_tenants_load_accepts_upper_case_hex_and_no_tokens),
        cmocka_unit_test(test_ten_tenants_load_rejects_each_invalid_file_naming_the_field),
        cmocka_unit_test(test_ten_tenants_load_of_a_missing_file_names_it),
        cmocka_unit_test(test_ten_tenants_authenticate_without_a_value_is_missing),
        cmocka_unit_test(test_ten_tenants_authenticate_rejects_malformed_values),
        cmocka_unit_test(test_ten_tenants_authenticate_accepts_every_bearer_form),
        cmocka_unit_test(test_ten_tenants_authenticate_finds_each_tenant_by_each_token),
        cmocka_unit_test(test_ten_tenants_open_table_admits_every_call_as_default),
        cmocka_unit_test(test_ten_tenant_sessions_quota_is_exact_and_release_makes_room),
        cmocka_unit_test(test_ten_tenant_kv_bytes_quota_is_exact),
        cmocka_unit_test(test_ten_tenant_inflight_quota_is_exact_and_release_makes_room),
        cmocka_unit_test(test_ten_tenant_zero_quotas_admit_nothing),
        cmocka_unit_test(test_ten_tenant_record_call_counts_by_status),
        cmocka_unit_test(test_ten_tenant_concurrent_calls_never_exceed_the_inflight_quota),
        cmocka_unit_test(test_ten_tenant_concurrent_sessions_stop_exactly_at_the_kv_quota),
        cmocka_unit_test(test_ten_tenants_reload_removes_adds_and_keeps_tenants),
        cmocka_unit_test(test_ten_tenants_reload_keeps_counters_and_applies_new_limits),
        cmocka_unit_test(test_ten_tenants_reload_with_a_broken_file_changes_nothing),
        cmocka_unit_test(test_ten_tenants_reload_while_threads_authenticate_and_reserve),
        cmocka_unit_test(test_ten_tenants_load_and_reload_fail_cleanly_without_memory),
        cmocka_unit_test(test_ten_token_digest_hex_matches_a_known_vector),
        cmocka_unit_test(test_ten_token_generate_makes_tokens_that_authenticate),
    };
    return cmocka_run_group_tests_name("ten_tenant", tests, setup_dir, teardown_dir);
}

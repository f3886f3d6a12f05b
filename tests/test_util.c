/* Shared helpers of the cmocka suite; see test_util.h. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* splitmix64: tiny, full-period, good enough to drive test inputs. */
uint64_t tu_rng_next(tu_rng_t *r) {
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void tu_rng_seed(tu_rng_t *r, uint64_t seed) { r->state = seed; }

uint32_t tu_rng_below(tu_rng_t *r, uint32_t n) {
    return (uint32_t)(((tu_rng_next(r) >> 32) * (uint64_t)n) >> 32);
}

uint32_t tu_rng_range(tu_rng_t *r, uint32_t lo, uint32_t hi) {
    return lo + (uint32_t)((tu_rng_next(r) >> 11) % ((uint64_t)hi - lo + 1u));
}

double tu_rng_unit(tu_rng_t *r) { return (double)(tu_rng_next(r) >> 11) * 0x1p-53; }

float tu_rng_float(tu_rng_t *r, float lo, float hi) {
    return (float)((double)lo + ((double)hi - (double)lo) * tu_rng_unit(r));
}

int tu_rng_chance(tu_rng_t *r, uint32_t num, uint32_t den) { return tu_rng_below(r, den) < num; }

uint64_t tu_sub_seed(uint64_t base, uint64_t index) {
    tu_rng_t r = {base ^ (index * 0xd1342543de82ef95ull)};
    tu_rng_next(&r);
    return tu_rng_next(&r);
}

static uint64_t fresh_seed(void) {
    uint64_t s = 0;
    FILE *f = fopen("/dev/urandom", "rb");
    if (f != NULL) {
        if (fread(&s, sizeof s, 1, f) != 1)
            s = 0;
        fclose(f);
    }
    if (s == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        s = (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 40);
    }
    return s;
}

uint64_t tu_base_seed(const char *program) {
    static int have;
    static uint64_t seed;
    if (!have) {
        const char *env = getenv("ATTND_TEST_SEED");
        const char *src = "fresh";
        if (env != NULL && env[0] != '\0') {
            char *end = NULL;
            seed = strtoull(env, &end, 0);
            src = "from ATTND_TEST_SEED";
            if (end == env || *end != '\0') {
                fprintf(stderr, "%s: cannot parse ATTND_TEST_SEED='%s'\n", program, env);
                exit(2);
            }
        } else {
            seed = fresh_seed();
        }
        have = 1;
        printf("%s: seed %" PRIu64 " (%s; rerun with ATTND_TEST_SEED=%" PRIu64 ")\n", program,
               seed, src, seed);
        fflush(stdout);
    }
    return seed;
}

static char where_buf[256];

void tu_where_set(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(where_buf, sizeof where_buf, fmt, ap);
    va_end(ap);
}

const char *tu_where(void) { return where_buf[0] != '\0' ? where_buf : "(no context)"; }

void tu_fail(const char *file, int line, const char *cond, const char *fmt, ...) {
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    print_error("%s:%d: check failed: %s\n  at: %s\n  %s\n", file, line, cond, tu_where(), detail);
    _fail(file, line);
}

void *tu_xmalloc(size_t n) {
    void *p = malloc(n == 0 ? 1 : n);
    if (p == NULL)
        fail_msg("out of memory (%zu bytes)", n);
    return p;
}

void *tu_xcalloc(size_t n, size_t size) {
    void *p = calloc(n == 0 ? 1 : n, size == 0 ? 1 : size);
    if (p == NULL)
        fail_msg("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

unsigned tu_opt_value(const char *const *opts, uint32_t n, const char *name) {
    const size_t len = strlen(name);
    for (uint32_t i = 0; i < n; i++)
        if (strncmp(opts[i], name, len) == 0)
            return (unsigned)strtoul(opts[i] + len, NULL, 10);
    return 0;
}

/* Shared helpers of the cmocka suite: a seeded random generator, the run's seed and a failure
 * context that every check prints, so a failing random test can be replayed.
 *
 * Seeds: every test program takes one base seed, from ATTND_TEST_SEED when it is set (decimal or
 * 0x-hex), otherwise fresh from /dev/urandom, and prints it on its first line so that ctest's
 * output (ctest --output-on-failure, or -V) shows it. Each case derives its own seed from the
 * base seed and its index, so one base seed replays the whole program.
 *
 * Thread: test threads only (single-threaded programs). */
#ifndef AT_TESTS_TEST_UTIL_H
#define AT_TESTS_TEST_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

typedef struct tu_rng {
    uint64_t state;
} tu_rng_t;

void tu_rng_seed(tu_rng_t *r, uint64_t seed);
uint64_t tu_rng_next(tu_rng_t *r);
/* Uniform in [0, n); n > 0. */
uint32_t tu_rng_below(tu_rng_t *r, uint32_t n);
/* Uniform in [lo, hi], inclusive. */
uint32_t tu_rng_range(tu_rng_t *r, uint32_t lo, uint32_t hi);
/* Uniform in [0, 1). */
double tu_rng_unit(tu_rng_t *r);
/* Uniform in [lo, hi). */
float tu_rng_float(tu_rng_t *r, float lo, float hi);
/* 1 with probability num/den. */
int tu_rng_chance(tu_rng_t *r, uint32_t num, uint32_t den);

/* The program's base seed (see the top comment); computed once, printed once. */
uint64_t tu_base_seed(const char *program);
/* A well-mixed seed for case `index` of a run with base seed `base`. */
uint64_t tu_sub_seed(uint64_t base, uint64_t index);

/* Sets the context that TU_CHECK prints on failure, e.g. "seed 0x.. case f16/g4 step 3". */
void tu_where_set(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *tu_where(void);

/* Prints file:line, the failed condition, the context and a printf-style detail, then fails the
 * current cmocka test. */
void tu_fail(const char *file, int line, const char *cond, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define TU_CHECK(cond, ...)                                                                      \
    do {                                                                                         \
        if (!(cond))                                                                             \
            tu_fail(__FILE__, __LINE__, #cond, __VA_ARGS__);                                     \
    } while (0)

/* malloc that fails the test instead of returning NULL. */
void *tu_xmalloc(size_t n);
void *tu_xcalloc(size_t n, size_t size);

/* The number after name in the first of opts[0, n) that starts with name ("-DTK=" in "-DTK=64"),
 * or 0 when none does: a stand-in compiler's reading of its options. */
unsigned tu_opt_value(const char *const *opts, uint32_t n, const char *name);

#endif

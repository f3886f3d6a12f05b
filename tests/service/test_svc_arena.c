/* Tests of service/svc_arena: the shared-memory object's life (name in /dev/shm while alive),
 * argument checks, alignment, full arenas, coalescing, zero-size regions, a random alloc/free
 * sequence checked against a simple model, a forked child that attaches by name, and four
 * threads allocating and freeing at once. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "service/svc_arena.h"

static uint64_t g_seed;

static uint64_t page_bytes(void) { return (uint64_t)sysconf(_SC_PAGESIZE); }

/* 1 when the object backing the arena's name exists in /dev/shm; *size_bytes its size. */
static int shm_exists(const char *name, uint64_t *size_bytes) {
    char path[512];
    snprintf(path, sizeof path, "/dev/shm%s", name);
    struct stat st;
    if (stat(path, &st) != 0)
        return 0;
    if (size_bytes != NULL)
        *size_bytes = (uint64_t)st.st_size;
    return 1;
}

static svc_arena_t *make_arena(const char *tag, uint64_t bytes) {
    at_diag_t diag = {{0}};
    svc_arena_t *a = NULL;
    at_err_t e = svc_arena_create(tag, bytes, &diag, &a);
    if (e != AT_OK)
        fail_msg("svc_arena_create(%s, %" PRIu64 "): %s: %s", tag, bytes, at_err_name(e), diag.msg);
    return a;
}

static svc_arena_stats_t stats_of(svc_arena_t *a) {
    svc_arena_stats_t s;
    svc_arena_get_stats(a, &s);
    return s;
}

/* Field by field: the struct has padding that nobody writes. */
static void assert_stats_equal(svc_arena_stats_t x, svc_arena_stats_t y) {
    assert_int_equal(x.size_bytes, y.size_bytes);
    assert_int_equal(x.used_bytes, y.used_bytes);
    assert_int_equal(x.regions, y.regions);
    assert_int_equal(x.largest_free_bytes, y.largest_free_bytes);
}

static void assert_empty(svc_arena_t *a) {
    svc_arena_stats_t s = stats_of(a);
    assert_int_equal(s.regions, 0);
    assert_int_equal(s.used_bytes, 0);
    assert_int_equal(s.largest_free_bytes, s.size_bytes);
    assert_int_equal(s.size_bytes, svc_arena_size(a));
}

static void test_svc_arena_create_names_an_object_until_destroy(void **state) {
    (void)state;
    svc_arena_t *a = make_arena("cpu0", 1u << 20);
    svc_arena_t *b = make_arena("cpu0", 1u << 20);
    const char *name = svc_arena_name(a);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "/attnd-%ld-cpu0-", (long)getpid());
    assert_true(strncmp(name, prefix, strlen(prefix)) == 0);
    assert_string_not_equal(name, svc_arena_name(b));

    uint64_t size = 0;
    assert_true(shm_exists(name, &size));
    assert_int_equal(size, 1u << 20);
    assert_int_equal(svc_arena_size(a), 1u << 20);
    assert_non_null(svc_arena_base(a));
    assert_int_equal((uintptr_t)svc_arena_base(a) % page_bytes(), 0);
    assert_empty(a);

    char saved[256];
    snprintf(saved, sizeof saved, "%s", name);
    svc_arena_destroy(&a);
    assert_null(a);
    assert_false(shm_exists(saved, NULL));
    assert_true(shm_exists(svc_arena_name(b), NULL));
    svc_arena_destroy(&b);

    svc_arena_destroy(&a); /* *a == NULL */
    svc_arena_destroy(NULL);
}

static void test_svc_arena_create_rounds_up_to_the_page_size(void **state) {
    (void)state;
    svc_arena_t *a = make_arena("r", 1);
    assert_int_equal(svc_arena_size(a), page_bytes());
    uint64_t size = 0;
    assert_true(shm_exists(svc_arena_name(a), &size));
    assert_int_equal(size, page_bytes());
    svc_arena_destroy(&a);

    a = make_arena("r", page_bytes() + 1);
    assert_int_equal(svc_arena_size(a), 2 * page_bytes());
    svc_arena_destroy(&a);
}

static void test_svc_arena_create_rejects_a_bad_tag_or_size(void **state) {
    (void)state;
    static const char *const bad_tags[] = {
        "", "CPU0", "cpu_0", "cpu/0", "cpu 0", "cpu.0", "Ω", "abcdefghijklmnopqrstuvwxyz0123456",
    };
    svc_arena_t *sentinel = (svc_arena_t *)&g_seed; /* never dereferenced */
    for (size_t i = 0; i < sizeof bad_tags / sizeof bad_tags[0]; i++) {
        at_diag_t diag = {{0}};
        svc_arena_t *a = sentinel;
        assert_int_equal(svc_arena_create(bad_tags[i], 4096, &diag, &a), AT_ERR_CONFIG);
        assert_ptr_equal(a, sentinel);
        assert_true(strlen(diag.msg) > 0);
    }
    svc_arena_t *a = sentinel;
    assert_int_equal(svc_arena_create(NULL, 4096, NULL, &a), AT_ERR_CONFIG);
    assert_int_equal(svc_arena_create("cpu0", 0, NULL, &a), AT_ERR_CONFIG);
    assert_int_equal(svc_arena_create("cpu0", UINT64_MAX, NULL, &a), AT_ERR_CONFIG);
    assert_ptr_equal(a, sentinel);

    /* The longest allowed tag and every allowed character. */
    a = make_arena("abcdefghijklmnopqrstuvwxyz-01234", 4096);
    svc_arena_destroy(&a);
    a = make_arena("56789", 4096);
    svc_arena_destroy(&a);
    a = make_arena("cuda:01", 4096); /* a device name and pool index */
    svc_arena_destroy(&a);
}

static void test_svc_arena_attach_rejects_a_missing_or_bad_name(void **state) {
    (void)state;
    svc_arena_t *sentinel = (svc_arena_t *)&g_seed;
    svc_arena_t *a = sentinel;
    at_diag_t diag = {{0}};
    char missing[128];
    snprintf(missing, sizeof missing, "/attnd-%ld-missing-999999", (long)getpid());
    assert_int_equal(svc_arena_attach(missing, 4096, &diag, &a), AT_ERR_IO);
    assert_non_null(strstr(diag.msg, "No such file"));
    assert_int_equal(svc_arena_attach(missing, 4096, NULL, &a), AT_ERR_IO);

    static const char *const bad_names[] = {"", "/", "noslash", "/a/b"};
    for (size_t i = 0; i < sizeof bad_names / sizeof bad_names[0]; i++)
        assert_int_equal(svc_arena_attach(bad_names[i], 4096, NULL, &a), AT_ERR_CONFIG);
    assert_int_equal(svc_arena_attach(NULL, 4096, NULL, &a), AT_ERR_CONFIG);

    svc_arena_t *c = make_arena("att", 8192);
    assert_int_equal(svc_arena_attach(svc_arena_name(c), 0, NULL, &a), AT_ERR_CONFIG);
    memset(&diag, 0, sizeof diag);
    assert_int_equal(svc_arena_attach(svc_arena_name(c), 8193, &diag, &a), AT_ERR_CONFIG);
    assert_true(strlen(diag.msg) > 0);
    assert_ptr_equal(a, sentinel);

    /* Attaching in the same process works too, and shares the bytes. */
    assert_int_equal(svc_arena_attach(svc_arena_name(c), 100, NULL, &a), AT_OK);
    assert_int_equal(svc_arena_size(a), page_bytes());
    svc_arena_base(c)[7] = 0x5a;
    assert_int_equal(svc_arena_base(a)[7], 0x5a);
    assert_string_equal(svc_arena_name(a), svc_arena_name(c));
    svc_arena_destroy(&a);
    assert_true(shm_exists(svc_arena_name(c), NULL)); /* only the creator unlinks */
    svc_arena_destroy(&c);
}

static void test_svc_arena_alloc_offsets_are_64_byte_aligned(void **state) {
    (void)state;
    svc_arena_t *a = make_arena("align", 1u << 16);
    static const uint64_t sizes[] = {1, 63, 64, 65, 100, 127, 128, 129, 4095, 4097, 3};
    uint64_t offs[sizeof sizes / sizeof sizes[0]];
    uint64_t used = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        assert_int_equal(svc_arena_alloc(a, sizes[i], &offs[i]), AT_OK);
        assert_int_equal(offs[i] % 64, 0);
        assert_int_equal((uintptr_t)(svc_arena_base(a) + offs[i]) % 64, 0);
        assert_true(offs[i] + sizes[i] <= svc_arena_size(a));
        memset(svc_arena_base(a) + offs[i], (int)i + 1, sizes[i]);
        used += (sizes[i] + 63) / 64 * 64;
    }
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        for (uint64_t k = 0; k < sizes[i]; k++)
            if (svc_arena_base(a)[offs[i] + k] != (uint8_t)(i + 1))
                fail_msg("region %zu byte %" PRIu64 " was overwritten", i, k);
    svc_arena_stats_t s = stats_of(a);
    assert_int_equal(s.regions, sizeof sizes / sizeof sizes[0]);
    assert_int_equal(s.used_bytes, used);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        svc_arena_free(a, offs[i]);
    assert_empty(a);
    svc_arena_destroy(&a);
}

static void test_svc_arena_alloc_fails_when_full_and_changes_nothing(void **state) {
    (void)state;
    svc_arena_t *a = make_arena("full", 4096);
    uint64_t size = svc_arena_size(a);
    uint64_t n = size / 64, offs[4096]; /* pages up to 256 KiB */
    assert_true(n <= sizeof offs / sizeof offs[0]);
    for (uint64_t i = 0; i < n; i++)
        assert_int_equal(svc_arena_alloc(a, 64, &offs[i]), AT_OK);
    svc_arena_stats_t before = stats_of(a);
    assert_int_equal(before.used_bytes, size);
    assert_int_equal(before.largest_free_bytes, 0);

    static const uint64_t asks[] = {0, 1, 64, 65, 4096, 1u << 20, UINT64_MAX};
    for (size_t i = 0; i < sizeof asks / sizeof asks[0]; i++) {
        uint64_t off = 12345;
        assert_int_equal(svc_arena_alloc(a, asks[i], &off), AT_ERR_SHM_FULL);
        assert_int_equal(off, 12345);
        assert_stats_equal(before, stats_of(a));
    }

    /* One 64-byte hole: a 65-byte request still does not fit; a 64-byte one does, in it. */
    svc_arena_free(a, offs[5]);
    uint64_t off = 12345;
    assert_int_equal(svc_arena_alloc(a, 65, &off), AT_ERR_SHM_FULL);
    assert_int_equal(svc_arena_alloc(a, 64, &off), AT_OK);
    assert_int_equal(off, offs[5]);

    for (uint64_t i = 0; i < n; i++)
        svc_arena_free(a, offs[i]);
    assert_empty(a);

    /* A request larger than the arena is SHM_FULL even on an empty arena; the whole arena fits. */
    assert_int_equal(svc_arena_alloc(a, size + 1, &off), AT_ERR_SHM_FULL);
    assert_int_equal(svc_arena_alloc(a, size, &off), AT_OK);
    assert_int_equal(off, 0);
    svc_arena_free(a, off);
    svc_arena_destroy(&a);
}

static void test_svc_arena_free_coalesces_so_a_large_alloc_fits_again(void **state) {
    (void)state;
    enum { N = 16, CHUNK = 4096 };
    svc_arena_t *a = make_arena("coal", N * CHUNK);
    uint64_t offs[N], off;
    for (int i = 0; i < N; i++)
        assert_int_equal(svc_arena_alloc(a, CHUNK, &offs[i]), AT_OK);
    assert_int_equal(svc_arena_alloc(a, 0, &off), AT_ERR_SHM_FULL);

    /* Every other chunk free: plenty of bytes, but no two adjacent. */
    for (int i = 1; i < N; i += 2)
        svc_arena_free(a, offs[i]);
    svc_arena_stats_t s = stats_of(a);
    assert_int_equal(s.used_bytes, (uint64_t)N / 2 * CHUNK);
    assert_int_equal(s.largest_free_bytes, CHUNK);
    assert_int_equal(svc_arena_alloc(a, 2 * CHUNK, &off), AT_ERR_SHM_FULL);

    /* Freeing chunk 2 joins 1, 2, 3 (both neighbours); chunk 4 joins on its left. */
    svc_arena_free(a, offs[2]);
    assert_int_equal(stats_of(a).largest_free_bytes, 3 * CHUNK);
    svc_arena_free(a, offs[4]);
    assert_int_equal(stats_of(a).largest_free_bytes, 5 * CHUNK);
    /* Chunk 0 joins on its right (the range starting at chunk 1). */
    svc_arena_free(a, offs[0]);
    assert_int_equal(stats_of(a).largest_free_bytes, 6 * CHUNK);

    assert_int_equal(svc_arena_alloc(a, 6 * CHUNK, &off), AT_OK);
    assert_int_equal(off, 0);
    svc_arena_free(a, off);
    for (int i = 6; i < N; i += 2)
        svc_arena_free(a, offs[i]);
    assert_empty(a);
    assert_int_equal(svc_arena_alloc(a, N * CHUNK, &off), AT_OK);
    assert_int_equal(off, 0);
    svc_arena_free(a, off);
    assert_empty(a);
    svc_arena_destroy(&a);
}

static void test_svc_arena_zero_size_regions_are_distinct(void **state) {
    (void)state;
    enum { N = 40 }; /* more than the first bookkeeping capacity, so the arrays grow */
    svc_arena_t *a = make_arena("zero", 1u << 16);
    uint64_t offs[N];
    for (int i = 0; i < N; i++) {
        assert_int_equal(svc_arena_alloc(a, 0, &offs[i]), AT_OK);
        assert_int_equal(offs[i] % 64, 0);
        assert_true(offs[i] < svc_arena_size(a));
        for (int j = 0; j < i; j++)
            assert_int_not_equal(offs[i], offs[j]);
    }
    svc_arena_stats_t s = stats_of(a);
    assert_int_equal(s.regions, N);
    assert_int_equal(s.used_bytes, (uint64_t)N * 64);
    /* Freeing in an interleaved order exercises every merge case. */
    for (int i = 0; i < N; i += 3)
        svc_arena_free(a, offs[i]);
    for (int i = 2; i < N; i += 3)
        svc_arena_free(a, offs[i]);
    for (int i = 1; i < N; i += 3)
        svc_arena_free(a, offs[i]);
    assert_empty(a);
    svc_arena_destroy(&a);
}

/* ---- random alloc/free against a model ---- */

#define M_MAX 512u

typedef struct mregion {
    uint64_t off;
    uint64_t bytes;    /* asked for */
    uint64_t reserved; /* rounded up to 64, at least 64 */
    uint8_t fill;
} mregion_t;

typedef struct model {
    uint64_t size;
    mregion_t live[M_MAX]; /* sorted by offset */
    uint32_t n;
} model_t;

static uint64_t reserved_of(uint64_t bytes) { return bytes == 0 ? 64 : (bytes + 63) / 64 * 64; }

static uint64_t m_used(const model_t *m) {
    uint64_t u = 0;
    for (uint32_t i = 0; i < m->n; i++)
        u += m->live[i].reserved;
    return u;
}

static uint64_t m_largest_gap(const model_t *m) {
    uint64_t at = 0, best = 0;
    for (uint32_t i = 0; i <= m->n; i++) {
        uint64_t end = i < m->n ? m->live[i].off : m->size;
        if (end - at > best)
            best = end - at;
        if (i < m->n)
            at = m->live[i].off + m->live[i].reserved;
    }
    return best;
}

/* Inserts r, checking it lies inside the arena and overlaps no live region. */
static void m_insert(model_t *m, mregion_t r) {
    TU_CHECK(r.off % 64 == 0, "offset %" PRIu64 " not aligned", r.off);
    TU_CHECK(r.off + r.reserved <= m->size, "region %" PRIu64 "+%" PRIu64 " past the end", r.off,
             r.reserved);
    uint32_t i = 0;
    while (i < m->n && m->live[i].off < r.off)
        i++;
    TU_CHECK(i == 0 || m->live[i - 1].off + m->live[i - 1].reserved <= r.off,
             "region at %" PRIu64 " overlaps the one at %" PRIu64, r.off, m->live[i - 1].off);
    TU_CHECK(i == m->n || r.off + r.reserved <= m->live[i].off,
             "region at %" PRIu64 " overlaps the one at %" PRIu64, r.off, m->live[i].off);
    TU_CHECK(m->n < M_MAX, "model full");
    memmove(&m->live[i + 1], &m->live[i], (m->n - i) * sizeof m->live[0]);
    m->live[i] = r;
    m->n++;
}

static void check_fill(const uint8_t *base, const mregion_t *r) {
    for (uint64_t k = 0; k < r->bytes; k++)
        TU_CHECK(base[r->off + k] == r->fill,
                 "region at %" PRIu64 " byte %" PRIu64 " is %u, wrote %u", r->off, k,
                 base[r->off + k], r->fill);
}

static void check_stats(svc_arena_t *a, const model_t *m) {
    svc_arena_stats_t s = stats_of(a);
    TU_CHECK(s.size_bytes == m->size, "size %" PRIu64, s.size_bytes);
    TU_CHECK(s.regions == m->n, "regions %u, model %u", s.regions, m->n);
    TU_CHECK(s.used_bytes == m_used(m), "used %" PRIu64 ", model %" PRIu64, s.used_bytes,
             m_used(m));
    TU_CHECK(s.largest_free_bytes == m_largest_gap(m), "largest free %" PRIu64 ", model %" PRIu64,
             s.largest_free_bytes, m_largest_gap(m));
}

typedef struct outcomes {
    uint32_t allocs, fulls, frees;
} outcomes_t;

static void random_run(uint64_t seed, uint32_t run, outcomes_t *seen) {
    tu_rng_t rng;
    tu_rng_seed(&rng, seed);
    uint64_t size = (uint64_t)tu_rng_range(&rng, 1, 64) * page_bytes();
    svc_arena_t *a = make_arena("rand", size);
    model_t *m = tu_xcalloc(1, sizeof *m);
    m->size = size;
    uint8_t *base = svc_arena_base(a);
    /* Requests up to a quarter, sometimes all, of the arena; biased to small and to 0. */
    uint32_t max_ask = (uint32_t)(size / 4);
    for (uint32_t step = 0; step < 3000; step++) {
        tu_where_set("seed %" PRIu64 " run %u step %u", g_seed, run, step);
        int do_alloc = m->n == 0 || (m->n < M_MAX - 1 && tu_rng_chance(&rng, 11, 20));
        if (do_alloc) {
            uint64_t bytes;
            uint32_t kind = tu_rng_below(&rng, 10);
            if (kind == 0)
                bytes = 0;
            else if (kind < 7)
                bytes = tu_rng_range(&rng, 1, 256);
            else if (kind < 9)
                bytes = tu_rng_range(&rng, 1, max_ask);
            else
                bytes = tu_rng_range(&rng, 1, (uint32_t)size + 64);
            uint64_t off = UINT64_MAX;
            at_err_t e = svc_arena_alloc(a, bytes, &off);
            int fits = bytes <= size && reserved_of(bytes) <= m_largest_gap(m);
            if (fits) {
                TU_CHECK(e == AT_OK, "alloc %" PRIu64 " failed with %s, largest gap %" PRIu64,
                         bytes, at_err_name(e), m_largest_gap(m));
                mregion_t r = {off, bytes, reserved_of(bytes), (uint8_t)tu_rng_next(&rng)};
                m_insert(m, r);
                memset(base + off, r.fill, bytes);
                seen->allocs++;
            } else {
                TU_CHECK(e == AT_ERR_SHM_FULL, "alloc %" PRIu64 " gave %s, largest gap %" PRIu64,
                         bytes, at_err_name(e), m_largest_gap(m));
                TU_CHECK(off == UINT64_MAX, "offset written on failure");
                seen->fulls++;
            }
        } else {
            uint32_t i = tu_rng_below(&rng, m->n);
            check_fill(base, &m->live[i]);
            svc_arena_free(a, m->live[i].off);
            memmove(&m->live[i], &m->live[i + 1], (m->n - i - 1) * sizeof m->live[0]);
            m->n--;
            seen->frees++;
        }
        check_stats(a, m);
    }
    while (m->n > 0) {
        check_fill(base, &m->live[m->n - 1]);
        svc_arena_free(a, m->live[--m->n].off);
    }
    check_stats(a, m);
    assert_empty(a);
    free(m);
    svc_arena_destroy(&a);
}

static void test_svc_arena_random_ops_match_the_model(void **state) {
    (void)state;
    outcomes_t seen = {0};
    for (uint32_t run = 0; run < 20; run++)
        random_run(tu_sub_seed(g_seed, run), run, &seen);
    print_message("random ops: %u allocs, %u SHM_FULL, %u frees\n", seen.allocs, seen.fulls,
                  seen.frees);
    TU_CHECK(seen.allocs > 0 && seen.fulls > 0 && seen.frees > 0,
             "the random sequence missed an outcome");
}

/* ---- another process ---- */

static void test_svc_arena_forked_child_attaches_and_writes(void **state) {
    (void)state;
    enum { BYTES = 3 * 4096 + 100 };
    svc_arena_t *a = make_arena("fork", 1u << 16);
    uint64_t to_child, from_child;
    assert_int_equal(svc_arena_alloc(a, BYTES, &to_child), AT_OK);
    assert_int_equal(svc_arena_alloc(a, BYTES, &from_child), AT_OK);
    uint8_t *base = svc_arena_base(a);
    for (uint32_t k = 0; k < BYTES; k++)
        base[to_child + k] = (uint8_t)(k * 7 + 1);
    memset(base + from_child, 0, BYTES);
    fflush(NULL); /* the child exits with _exit, but keep buffers from being written twice */

    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* The child: no cmocka here; the exit code says which check failed. */
        svc_arena_t *w = NULL;
        if (svc_arena_attach(svc_arena_name(a), svc_arena_size(a), NULL, &w) != AT_OK)
            _exit(10);
        uint8_t *wb = svc_arena_base(w);
        if (wb == base) /* a mapping of its own, beside the one fork copied */
            _exit(13);
        for (uint32_t k = 0; k < BYTES; k++)
            if (wb[to_child + k] != (uint8_t)(k * 7 + 1))
                _exit(11);
        for (uint32_t k = 0; k < BYTES; k++)
            wb[from_child + k] = (uint8_t)(k * 13 + 5);
        svc_arena_stats_t s;
        svc_arena_get_stats(w, &s);
        if (s.regions != 0 || s.size_bytes != svc_arena_size(a))
            _exit(12);
        svc_arena_destroy(&w);
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    for (uint32_t k = 0; k < BYTES; k++)
        if (base[from_child + k] != (uint8_t)(k * 13 + 5))
            fail_msg("byte %u from the child is %u", k, base[from_child + k]);
    assert_true(shm_exists(svc_arena_name(a), NULL)); /* the child's destroy did not unlink */

    svc_arena_free(a, to_child);
    svc_arena_free(a, from_child);
    assert_empty(a);
    svc_arena_destroy(&a);
}

/* ---- threads ---- */

enum { T_THREADS = 4, T_ITERS = 10000, T_SLOTS = 8 };

typedef struct worker {
    svc_arena_t *a;
    uint64_t seed;
    uint32_t id;
    uint32_t allocs, fulls, errors; /* errors: wrong code, misaligned, or bytes overwritten */
} worker_t;

static void *worker_main(void *p) {
    worker_t *w = p;
    tu_rng_t rng;
    tu_rng_seed(&rng, w->seed);
    uint8_t *base = svc_arena_base(w->a);
    uint64_t size = svc_arena_size(w->a);
    uint64_t off[T_SLOTS], bytes[T_SLOTS];
    uint8_t fill[T_SLOTS];
    uint32_t n = 0;
    for (uint32_t it = 0; it < T_ITERS; it++) {
        if (n == 0 || (n < T_SLOTS && tu_rng_chance(&rng, 1, 2))) {
            uint64_t b = tu_rng_chance(&rng, 1, 10) ? 0 : tu_rng_range(&rng, 1, 8192);
            uint64_t o = 0;
            at_err_t e = svc_arena_alloc(w->a, b, &o);
            if (e == AT_ERR_SHM_FULL) {
                w->fulls++;
                continue;
            }
            if (e != AT_OK || o % 64 != 0 || o + b > size) {
                w->errors++;
                continue;
            }
            off[n] = o;
            bytes[n] = b;
            fill[n] = (uint8_t)(w->id * 64 + (it & 63));
            memset(base + o, fill[n], b);
            n++;
            w->allocs++;
        } else {
            uint32_t i = tu_rng_below(&rng, n);
            for (uint64_t k = 0; k < bytes[i]; k++)
                if (base[off[i] + k] != fill[i]) {
                    w->errors++;
                    break;
                }
            svc_arena_free(w->a, off[i]);
            off[i] = off[n - 1];
            bytes[i] = bytes[n - 1];
            fill[i] = fill[n - 1];
            n--;
        }
    }
    while (n > 0)
        svc_arena_free(w->a, off[--n]);
    return NULL;
}

static void test_svc_arena_threads_alloc_and_free_then_all_is_returned(void **state) {
    (void)state;
    /* Smaller than the threads' peak demand, so SHM_FULL happens too. */
    svc_arena_t *a = make_arena("mt", 1u << 16);
    worker_t w[T_THREADS];
    pthread_t tid[T_THREADS];
    for (uint32_t t = 0; t < T_THREADS; t++) {
        w[t] = (worker_t){.a = a, .seed = tu_sub_seed(g_seed, 1000 + t), .id = t};
        assert_int_equal(pthread_create(&tid[t], NULL, worker_main, &w[t]), 0);
    }
    uint32_t allocs = 0, fulls = 0;
    for (uint32_t t = 0; t < T_THREADS; t++) {
        assert_int_equal(pthread_join(tid[t], NULL), 0);
        if (w[t].errors != 0)
            fail_msg("seed %" PRIu64 ": thread %u saw %u errors", g_seed, t, w[t].errors);
        allocs += w[t].allocs;
        fulls += w[t].fulls;
    }
    print_message("threads: %u allocs, %u SHM_FULL\n", allocs, fulls);
    assert_true(allocs > 0);
    assert_empty(a);
    svc_arena_destroy(&a);
}

int main(void) {
    g_seed = tu_base_seed("test_svc_arena");
    tu_where_set("seed %" PRIu64, g_seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svc_arena_create_names_an_object_until_destroy),
        cmocka_unit_test(test_svc_arena_create_rounds_up_to_the_page_size),
        cmocka_unit_test(test_svc_arena_create_rejects_a_bad_tag_or_size),
        cmocka_unit_test(test_svc_arena_attach_rejects_a_missing_or_bad_name),
        cmocka_unit_test(test_svc_arena_alloc_offsets_are_64_byte_aligned),
        cmocka_unit_test(test_svc_arena_alloc_fails_when_full_and_changes_nothing),
        cmocka_unit_test(test_svc_arena_free_coalesces_so_a_large_alloc_fits_again),
        cmocka_unit_test(test_svc_arena_zero_size_regions_are_distinct),
        cmocka_unit_test(test_svc_arena_random_ops_match_the_model),
        cmocka_unit_test(test_svc_arena_forked_child_attaches_and_writes),
        cmocka_unit_test(test_svc_arena_threads_alloc_and_free_then_all_is_returned),
    };
    return cmocka_run_group_tests_name("svc_arena", tests, NULL, NULL);
}

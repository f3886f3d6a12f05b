/* The compiled-image cache (att_jit) with a stand-in compiler, without a GPU: images come back as
 * the caller's own copies; past its memory limit the cache drops the least recently used images
 * that its directory also holds (and only those), reading them from disk again when they are
 * asked for, lookups included; without a directory it keeps them all; the directory keeps its
 * image files under its own limit, the least recently used removed first; a key that failed to
 * compile stays failed; threads asking for keys while others are dropped get whole, right
 * images. Label: unit. */
#include "tests/test_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "attention/att_jit.h"

/* The stand-in compiler: options "-DID=<id>" and "-DBYTES=<n>" make an image of n bytes whose
 * byte i is (id * 7 + i) & 255; "-DFAIL=1" makes the compile fail. */
static atomic_uint g_compiles;

static at_err_t fake_compile(void *user, const char *arch, const char *const *opts, uint32_t n_opts,
                             void **image, size_t *bytes, at_diag_t *diag) {
    (void)user;
    atomic_fetch_add(&g_compiles, 1u);
    if (tu_opt_value(opts, n_opts, "-DFAIL=") != 0)
        return att_jit_compile_failed("fake", arch, NULL, "asked to fail", diag);
    const unsigned id = tu_opt_value(opts, n_opts, "-DID="),
                   n = tu_opt_value(opts, n_opts, "-DBYTES=");
    uint8_t *img = malloc(n);
    if (img == NULL)
        return AT_ERR_NOMEM;
    for (unsigned i = 0; i < n; i++)
        img[i] = (uint8_t)(id * 7 + i);
    *image = img;
    *bytes = n;
    return AT_OK;
}

static att_jit_t *make_jit(const char *dir) {
    const att_jit_compiler_t cc = {"fake 1.0", "bin", fake_compile, NULL};
    att_jit_t *j = NULL;
    at_diag_t d = {{0}};
    TU_CHECK(att_jit_create_with(&cc, dir, &d, &j) == AT_OK, "create: %s", d.msg);
    return j;
}

/* Asks j for image id of n bytes (fail: a key that does not compile). Returns the result; *good
 * says whether the answer was whole: on success the stand-in's bytes, on failure no image. */
static at_err_t ask_quiet(att_jit_t *j, unsigned id, unsigned n, bool fail, int *compiled,
                          bool *good) {
    char o[3][40];
    snprintf(o[0], sizeof o[0], "-DID=%u", id);
    snprintf(o[1], sizeof o[1], "-DBYTES=%u", n);
    snprintf(o[2], sizeof o[2], "-DFAIL=%u", fail ? 1u : 0u);
    const char *opts[3] = {o[0], o[1], o[2]};
    void *img = NULL;
    size_t bytes = 0;
    at_diag_t d = {{0}};
    const at_err_t e = att_jit_image(j, "sm_90", opts, 3, &img, &bytes, compiled, &d);
    *good = e == AT_OK ? img != NULL && bytes == n : img == NULL;
    for (unsigned i = 0; e == AT_OK && *good && i < n; i++)
        *good = ((uint8_t *)img)[i] == (uint8_t)(id * 7 + i);
    if (img != NULL) /* the caller's own: scribbling on it changes no later answer */
        memset(img, 0xee, bytes);
    free(img);
    return e;
}

/* ask_quiet, failing the test on an answer that is not whole. */
static at_err_t ask(att_jit_t *j, unsigned id, unsigned n, bool fail, int *compiled) {
    bool good = false;
    const at_err_t e = ask_quiet(j, id, n, fail, compiled, &good);
    TU_CHECK(good, "image %u (%u bytes): %s, not the stand-in's image", id, n, at_err_name(e));
    return e;
}

static att_jit_stats_t stats(att_jit_t *j) {
    att_jit_stats_t s;
    att_jit_get_stats(j, &s);
    return s;
}

static void test_att_jit_copies_and_hits(void **state) {
    (void)state;
    att_jit_t *j = make_jit(NULL);
    int compiled = -1;
    TU_CHECK(ask(j, 1, 5000, false, &compiled) == AT_OK && compiled == 1, "first ask compiles");
    TU_CHECK(ask(j, 1, 5000, false, &compiled) == AT_OK && compiled == 0, "second ask hits");
    att_jit_stats_t s = stats(j);
    TU_CHECK(s.compiles == 1 && s.memory_hits == 1 && s.memory_bytes == 5000 && s.evictions == 0,
             "compiles %llu hits %llu bytes %llu", (unsigned long long)s.compiles,
             (unsigned long long)s.memory_hits, (unsigned long long)s.memory_bytes);
    /* image NULL: cached, nothing copied; a later ask hits */
    char o[3][40] = {"-DID=2", "-DBYTES=300", "-DFAIL=0"};
    const char *opts[3] = {o[0], o[1], o[2]};
    size_t bytes = 0;
    TU_CHECK(att_jit_image(j, "sm_90", opts, 3, NULL, &bytes, NULL, NULL) == AT_OK && bytes == 300,
             "fill without a copy: %zu", bytes);
    void *img = NULL;
    TU_CHECK(att_jit_lookup(j, "sm_90", opts, 3, &img, &bytes) == AT_OK && img != NULL &&
                 bytes == 300 && ((uint8_t *)img)[5] == (uint8_t)(2 * 7 + 5),
             "lookup after a fill");
    free(img);
    att_jit_destroy(&j);
}

/* A fresh cache directory in dir (at least 32 bytes); rm_dir removes it. */
static void make_dir(char *dir) {
    strcpy(dir, "/tmp/att_jit_test.XXXXXX");
    TU_CHECK(mkdtemp(dir) != NULL, "mkdtemp");
}

static void rm_dir(const char *dir) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    TU_CHECK(system(cmd) == 0, "%s", cmd);
}

/* att_jit_lookup of image id (n bytes), which never compiles: its result, the copy checked. */
static at_err_t lookup(att_jit_t *j, unsigned id, unsigned n) {
    char o[3][40];
    snprintf(o[0], sizeof o[0], "-DID=%u", id);
    snprintf(o[1], sizeof o[1], "-DBYTES=%u", n);
    snprintf(o[2], sizeof o[2], "-DFAIL=0");
    const char *opts[3] = {o[0], o[1], o[2]};
    void *img = NULL;
    size_t bytes = 0;
    const at_err_t e = att_jit_lookup(j, "sm_90", opts, 3, &img, &bytes);
    TU_CHECK(e != AT_OK || (bytes == n && ((uint8_t *)img)[n - 1] == (uint8_t)(id * 7 + n - 1)),
             "lookup of %u: %zu bytes", id, bytes);
    free(img);
    return e;
}

static void test_att_jit_drops_least_recently_used(void **state) {
    (void)state;
    char dir[32];
    make_dir(dir);
    att_jit_t *j = make_jit(dir);
    att_jit_set_memory_limit(j, 25000);
    TU_CHECK(ask(j, 1, 10000, false, NULL) == AT_OK && ask(j, 2, 10000, false, NULL) == AT_OK,
             "two images");
    TU_CHECK(ask(j, 1, 10000, false, NULL) == AT_OK, "1 used again: 2 is the least recent");
    TU_CHECK(ask(j, 3, 10000, false, NULL) == AT_OK, "a third image");
    att_jit_stats_t s = stats(j);
    TU_CHECK(s.evictions == 1 && s.memory_bytes == 20000, "evictions %llu bytes %llu",
             (unsigned long long)s.evictions, (unsigned long long)s.memory_bytes);
    int compiled = -1;
    TU_CHECK(ask(j, 1, 10000, false, &compiled) == AT_OK && compiled == 0, "1 kept");
    TU_CHECK(ask(j, 3, 10000, false, &compiled) == AT_OK && compiled == 0, "3 kept");
    s = stats(j);
    TU_CHECK(s.memory_hits == 3 && s.disk_hits == 0, "hits %llu from disk %llu",
             (unsigned long long)s.memory_hits, (unsigned long long)s.disk_hits);
    /* the dropped one comes back from disk, not from the compiler */
    TU_CHECK(ask(j, 2, 10000, false, &compiled) == AT_OK && compiled == 0, "2 from disk");
    s = stats(j);
    TU_CHECK(s.compiles == 3 && s.disk_hits == 1 && s.evictions == 2,
             "compiles %llu, from disk %llu, evictions %llu", (unsigned long long)s.compiles,
             (unsigned long long)s.disk_hits, (unsigned long long)s.evictions);
    /* one image over the limit stays (it is the one asked for); every other goes */
    TU_CHECK(ask(j, 4, 40000, false, &compiled) == AT_OK && compiled == 1, "a large image");
    s = stats(j);
    TU_CHECK(s.memory_bytes == 40000 && s.evictions == 4, "bytes %llu evictions %llu",
             (unsigned long long)s.memory_bytes, (unsigned long long)s.evictions);
    TU_CHECK(ask(j, 4, 40000, false, &compiled) == AT_OK && compiled == 0, "the large one hits");
    /* a lower limit drops at once; a lookup (which never compiles) reads the disk */
    att_jit_set_memory_limit(j, 0);
    s = stats(j);
    TU_CHECK(s.memory_bytes == 0 && s.evictions == 5, "bytes %llu evictions %llu",
             (unsigned long long)s.memory_bytes, (unsigned long long)s.evictions);
    TU_CHECK(lookup(j, 4, 40000) == AT_OK && lookup(j, 1, 10000) == AT_OK, "lookups from disk");
    TU_CHECK(stats(j).compiles == 4, "compiles %llu", (unsigned long long)stats(j).compiles);
    att_jit_destroy(&j);
    rm_dir(dir);
}

/* Without a directory, or where its writes fail, nothing could bring a dropped image back but the
 * compiler, which a lookup never runs: the memory cache keeps every image, over its limit. */
static void test_att_jit_keeps_what_the_disk_lacks(void **state) {
    (void)state;
    att_jit_t *j = make_jit(NULL);
    att_jit_set_memory_limit(j, 15000);
    TU_CHECK(ask(j, 1, 10000, false, NULL) == AT_OK && ask(j, 2, 10000, false, NULL) == AT_OK,
             "two images");
    const att_jit_stats_t s = stats(j);
    TU_CHECK(s.evictions == 0 && s.memory_bytes == 20000, "evictions %llu bytes %llu",
             (unsigned long long)s.evictions, (unsigned long long)s.memory_bytes);
    TU_CHECK(lookup(j, 1, 10000) == AT_OK && lookup(j, 2, 10000) == AT_OK, "both looked up");
    att_jit_destroy(&j);
    /* the same where the directory's writes fail (it is gone): nothing reached the disk */
    char dir[32];
    make_dir(dir);
    j = make_jit(dir);
    rm_dir(dir);
    att_jit_set_memory_limit(j, 15000);
    TU_CHECK(ask(j, 3, 10000, false, NULL) == AT_OK && ask(j, 4, 10000, false, NULL) == AT_OK,
             "two images, their writes failing");
    const att_jit_stats_t w = stats(j);
    TU_CHECK(w.evictions == 0 && w.memory_bytes == 20000, "evictions %llu bytes %llu",
             (unsigned long long)w.evictions, (unsigned long long)w.memory_bytes);
    TU_CHECK(lookup(j, 3, 10000) == AT_OK && lookup(j, 4, 10000) == AT_OK, "both looked up");
    att_jit_destroy(&j);
}

static void test_att_jit_failed_keys_stay_failed(void **state) {
    (void)state;
    char dir[32];
    make_dir(dir);
    att_jit_t *j = make_jit(dir);
    att_jit_set_memory_limit(j, 1000);
    const unsigned before = atomic_load(&g_compiles);
    TU_CHECK(ask(j, 9, 100, true, NULL) == AT_ERR_UNSUPPORTED, "a failing key");
    for (unsigned id = 10; id < 20; id++) /* ten images through a limit that holds one */
        TU_CHECK(ask(j, id, 800, false, NULL) == AT_OK, "image %u", id);
    TU_CHECK(stats(j).evictions == 9, "evictions %llu", (unsigned long long)stats(j).evictions);
    TU_CHECK(ask(j, 9, 100, true, NULL) == AT_ERR_UNSUPPORTED, "still failing");
    TU_CHECK(atomic_load(&g_compiles) - before == 11, "the failed key compiled once: %u",
             atomic_load(&g_compiles) - before);
    att_jit_destroy(&j);
    rm_dir(dir);
}

/* The image files in dir (names ending in ".bin"), up to max of them into names; how many. */
static size_t image_files(const char *dir, char names[][96], size_t max) {
    DIR *d = opendir(dir);
    TU_CHECK(d != NULL, "opendir %s", dir);
    size_t n = 0;
    const struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const size_t len = strlen(de->d_name);
        if (len > 4 && len < 96 && strcmp(de->d_name + len - 4, ".bin") == 0 && n < max)
            memcpy(names[n++], de->d_name, len + 1);
    }
    closedir(d);
    return n;
}

/* The name of the one image file in dir that is not among known[0, n): the one just written. */
static void newest_file(const char *dir, char known[][96], size_t n, char out[96]) {
    char now[8][96];
    const size_t m = image_files(dir, now, 8);
    size_t found = 0;
    for (size_t i = 0; i < m; i++) {
        bool old = false;
        for (size_t k = 0; k < n && !old; k++)
            old = strcmp(now[i], known[k]) == 0;
        if (!old) {
            memcpy(out, now[i], 96);
            found++;
        }
    }
    TU_CHECK(found == 1, "%zu new files", found);
}

/* Sets file name in dir as last used at second sec (long ago). */
static void set_used(const char *dir, const char *name, time_t sec) {
    char path[160];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    const struct timespec t[2] = {{sec, 0}, {sec, 0}};
    TU_CHECK(utimensat(AT_FDCWD, path, t, 0) == 0, "utimensat %s", path);
}

static bool file_exists(const char *dir, const char *name) {
    char path[160];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

/* Past its limit the directory loses its least recently used image files (a read counts as a
 * use); memory then keeps what the disk lost, and a new file is never the one removed. */
static void test_att_jit_directory_drops_least_recently_used(void **state) {
    (void)state;
    char dir[32];
    make_dir(dir);
    /* files that are not this compiler's images stay: another file, another extension, a
     * temporary file */
    char others[3][160];
    snprintf(others[0], sizeof others[0], "%s/notes.txt", dir);
    snprintf(others[1], sizeof others[1], "%s/%064d.hsaco", dir, 0);
    snprintf(others[2], sizeof others[2], "%s/%064d.bin.tmp.AbCdEf", dir, 0);
    for (int i = 0; i < 3; i++) {
        FILE *f = fopen(others[i], "w");
        TU_CHECK(f != NULL && fwrite(dir, 1, 32, f) == 32 && fclose(f) == 0, "%s", others[i]);
    }
    att_jit_t *j = make_jit(dir);
    att_jit_set_disk_limit(j, 25000); /* two 10000-byte images and their headers */
    char names[4][96];
    TU_CHECK(ask(j, 1, 10000, false, NULL) == AT_OK, "image 1");
    newest_file(dir, names, 0, names[0]);
    TU_CHECK(ask(j, 2, 10000, false, NULL) == AT_OK, "image 2");
    newest_file(dir, names, 1, names[1]);
    set_used(dir, names[0], 1000);
    set_used(dir, names[1], 2000);
    TU_CHECK(ask(j, 3, 10000, false, NULL) == AT_OK, "image 3");
    newest_file(dir, names, 2, names[2]);
    TU_CHECK(!file_exists(dir, names[0]) && file_exists(dir, names[1]) &&
                 file_exists(dir, names[2]),
             "the least recently used file (image 1's) is not the one removed");
    TU_CHECK(stats(j).disk_removed == 1, "removed %llu", (unsigned long long)stats(j).disk_removed);
    /* memory keeps image 1 now that the disk lacks it, however low its limit */
    att_jit_set_memory_limit(j, 0);
    TU_CHECK(lookup(j, 1, 10000) == AT_OK && stats(j).compiles == 3, "image 1 from memory");
    /* a read of image 2 makes image 3's file the least recently used */
    set_used(dir, names[2], 3000);
    TU_CHECK(lookup(j, 2, 10000) == AT_OK, "image 2 from disk");
    TU_CHECK(ask(j, 4, 10000, false, NULL) == AT_OK, "image 4");
    newest_file(dir, names, 3, names[3]);
    TU_CHECK(file_exists(dir, names[1]) && !file_exists(dir, names[2]) &&
                 file_exists(dir, names[3]),
             "image 3's file is not the one removed");
    /* a memory hit marks its file used too (image 4, in memory since its compile) */
    set_used(dir, names[3], 4000);
    att_jit_set_memory_limit(j, ATT_JIT_MEMORY_BYTES);
    TU_CHECK(ask(j, 4, 10000, false, NULL) == AT_OK, "image 4 again");
    char path[160];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, names[3]);
    TU_CHECK(stat(path, &st) == 0 && st.st_mtim.tv_sec > 4000, "image 4's file not marked used");
    /* a lower limit removes at once, down to nothing but the other files */
    att_jit_set_disk_limit(j, 0);
    char left[8][96];
    TU_CHECK(image_files(dir, left, 8) == 0, "image files left");
    for (int i = 0; i < 3; i++)
        TU_CHECK(access(others[i], F_OK) == 0, "%s removed", others[i]);
    TU_CHECK(stats(j).disk_removed == 4, "removed %llu", (unsigned long long)stats(j).disk_removed);
    /* and a new file past it stays: never the one just written */
    TU_CHECK(ask(j, 5, 10000, false, NULL) == AT_OK, "image 5");
    TU_CHECK(image_files(dir, left, 8) == 1, "image 5's file removed");
    att_jit_destroy(&j);
    rm_dir(dir);
}

/* Threads asking for 16 keys of different sizes through a limit that holds about four; the
 * answers that were not whole are counted (cmocka's failures belong to the main thread). */
enum { THREADS = 4, ROUNDS = 300 };
static atomic_uint g_bad;

typedef struct hammer_arg {
    att_jit_t *j;
    uint64_t seed;
} hammer_arg_t;

static void *hammer(void *arg) {
    const hammer_arg_t *a = arg;
    tu_rng_t r;
    tu_rng_seed(&r, a->seed);
    for (int i = 0; i < ROUNDS; i++) {
        const unsigned id = tu_rng_below(&r, 16);
        bool good = false;
        if (ask_quiet(a->j, id, 1000 + id * 100, false, NULL, &good) != AT_OK || !good)
            atomic_fetch_add(&g_bad, 1u);
    }
    return NULL;
}

static void test_att_jit_threads_while_dropping(void **state) {
    (void)state;
    char dir[32];
    make_dir(dir);
    att_jit_t *j = make_jit(dir);
    att_jit_set_memory_limit(j, 7000);
    const uint64_t base = tu_base_seed("test_att_jit");
    pthread_t t[THREADS];
    hammer_arg_t a[THREADS];
    for (int i = 0; i < THREADS; i++) {
        a[i] = (hammer_arg_t){j, tu_sub_seed(base, (uint64_t)i)};
        TU_CHECK(pthread_create(&t[i], NULL, hammer, &a[i]) == 0, "thread %d", i);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    TU_CHECK(atomic_load(&g_bad) == 0, "%u answers not whole", atomic_load(&g_bad));
    const att_jit_stats_t s = stats(j);
    TU_CHECK(s.memory_bytes <= 7000 && s.evictions > 0, "bytes %llu evictions %llu",
             (unsigned long long)s.memory_bytes, (unsigned long long)s.evictions);
    att_jit_destroy(&j);
    rm_dir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_jit_copies_and_hits),
        cmocka_unit_test(test_att_jit_drops_least_recently_used),
        cmocka_unit_test(test_att_jit_keeps_what_the_disk_lacks),
        cmocka_unit_test(test_att_jit_failed_keys_stay_failed),
        cmocka_unit_test(test_att_jit_directory_drops_least_recently_used),
        cmocka_unit_test(test_att_jit_threads_while_dropping),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

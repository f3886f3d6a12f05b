/* The tuning store (tuning/tun_store.c), the keys and the spaces: round trip, every kind of
 * damaged file, two processes writing one store, a restart restoring exactly what was stored, and
 * the spaces' conditions. Label: unit. */
#include "tests/test_util.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tuning/tun.h"
#include "tuning/tun_search.h"
#include "tuning/tun_store.h"

static const tun_shape_t llama = {.head_dim = 128, .num_query_heads = 32, .num_kv_heads = 8,
                                  .group = 4, .dtype = 3, .block_size = 16};
static const tun_shape_t small = {.head_dim = 64, .num_query_heads = 8, .num_kv_heads = 8,
                                  .group = 1, .dtype = 2, .block_size = 32};

static tun_device_t cpu_dev(void) {
    tun_device_t d;
    tun_device_cpu("x86-64-v3", 2, &d);
    return d;
}

/* A fresh empty directory under /tmp; the caller removes it (rm_dir). */
static void make_dir(char *buf, size_t n) {
    snprintf(buf, n, "/tmp/attnd-tun-XXXXXX");
    assert_non_null(mkdtemp(buf));
}

static void rm_dir(const char *dir) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    char p[1400];
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static tun_store_t *open_store(const char *dir, const tun_shape_t *s) {
    tun_device_t d = cpu_dev();
    tun_store_t *st = NULL;
    at_diag_t diag = {{0}};
    assert_int_equal(tun_store_open(dir, &tun_space_cpu, &d, "k1", s, &diag, &st), AT_OK);
    return st;
}

/* A valid record of bucket (t, q) with times derived from seed. */
static tun_record_t record(uint8_t t, uint8_t q, uint64_t seed) {
    tun_record_t r = {.bucket = {t, t, q, (uint8_t)(t + 4)}, .tried = 40, .updated_s = 1000};
    r.best = (tun_cfg_t){.n = 3, .v = {32, 16, 2}};
    r.worst = (tun_cfg_t){.n = 3, .v = {256, 8, 16}};
    r.best_ns = 1000 + seed;
    r.heuristic_ns = 2000 + seed;
    r.worst_ns = 9000 + seed;
    r.tuning_ns = 5000000 + seed;
    return r;
}

static void assert_record_equal(const tun_record_t *a, const tun_record_t *b) {
    assert_true(tun_bucket_equal(&a->bucket, &b->bucket));
    assert_true(tun_cfg_equal(&a->best, &b->best));
    assert_true(tun_cfg_equal(&a->worst, &b->worst));
    assert_int_equal(a->best_ns, b->best_ns);
    assert_int_equal(a->heuristic_ns, b->heuristic_ns);
    assert_int_equal(a->worst_ns, b->worst_ns);
    assert_int_equal(a->tried, b->tried);
    assert_int_equal(a->tuning_ns, b->tuning_ns);
    assert_int_equal(a->updated_s, b->updated_s);
}

static void test_tun_store_round_trip_restores_exactly(void **state) {
    (void)state;
    char dir[64];
    make_dir(dir, sizeof dir);
    tun_store_t *st = open_store(dir, &llama);
    tun_file_state_t fs;
    assert_int_equal(tun_store_load(st, &fs), AT_OK);
    assert_int_equal(fs, TUN_FILE_MISSING);
    for (uint8_t i = 0; i < 5; i++) {
        tun_record_t r = record(i, i % 3, i);
        assert_int_equal(tun_store_put(st, &r), AT_OK);
    }
    assert_int_equal(tun_store_save(st), AT_OK);
    /* "a restart": a new store object reads the file back */
    tun_store_t *again = open_store(dir, &llama);
    assert_string_equal(tun_store_path(st), tun_store_path(again));
    assert_int_equal(tun_store_load(again, &fs), AT_OK);
    assert_int_equal(fs, TUN_FILE_OK);
    assert_int_equal(tun_store_count(again), 5);
    for (uint8_t i = 0; i < 5; i++) {
        tun_record_t want = record(i, i % 3, i);
        const tun_record_t *got = tun_store_find(again, &want.bucket);
        assert_non_null(got);
        assert_record_equal(got, &want);
    }
    tun_bucket_t none = {9, 9, 9, 9};
    assert_null(tun_store_find(again, &none));
    assert_int_equal(tun_store_set_aside(again, NULL), 0);
    /* --show reads it */
    FILE *devnull = fopen("/dev/null", "w");
    assert_int_equal(tun_store_print(tun_store_path(again), devnull), AT_OK);
    fclose(devnull);
    tun_store_destroy(&st);
    tun_store_destroy(&again);
    rm_dir(dir);
}

static void test_tun_store_models_never_share_a_file(void **state) {
    (void)state;
    char dir[64];
    make_dir(dir, sizeof dir);
    tun_store_t *a = open_store(dir, &llama), *b = open_store(dir, &small);
    assert_string_not_equal(tun_store_path(a), tun_store_path(b));
    tun_shape_t window = llama;
    window.features = TUN_FEAT_WINDOW;
    tun_store_t *c = open_store(dir, &window);
    assert_string_not_equal(tun_store_path(a), tun_store_path(c));
    /* same shape, same device: the same file (two sessions of one model share records) */
    tun_store_t *a2 = open_store(dir, &llama);
    assert_string_equal(tun_store_path(a), tun_store_path(a2));
    tun_store_destroy(&a);
    tun_store_destroy(&a2);
    tun_store_destroy(&b);
    tun_store_destroy(&c);
    rm_dir(dir);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char *buf = calloc(1, 1 << 16);
    assert_non_null(buf);
    size_t n = fread(buf, 1, (1 << 16) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* Replaces the first occurrence of from with to in s (same buffer, to no longer than 64). */
static void replace(char *s, const char *from, const char *to) {
    char *p = strstr(s, from);
    assert_non_null(p);
    char rest[1 << 16];
    snprintf(rest, sizeof rest, "%s", p + strlen(from));
    sprintf(p, "%s%s", to, rest);
}

enum { DMG_TRUNCATED, DMG_CHECKSUM, DMG_VERSION, DMG_WRONG_KEY, DMG_NOT_JSON, DMG_BAD_RECORD };

/* A store file damaged one way is reported, set aside (renamed, not deleted), read as empty,
 * and a save afterwards writes a good file again. */
static void damage_case(int kind) {
    char dir[64];
    make_dir(dir, sizeof dir);
    tun_store_t *st = open_store(dir, &llama);
    tun_record_t r = record(3, 1, 7);
    assert_int_equal(tun_store_put(st, &r), AT_OK);
    assert_int_equal(tun_store_save(st), AT_OK);
    char *text = read_file(tun_store_path(st));
    switch (kind) {
    case DMG_TRUNCATED: text[strlen(text) / 2] = '\0'; break;
    case DMG_CHECKSUM: replace(text, "\"best_ns\": 1007", "\"best_ns\": 1008"); break;
    case DMG_VERSION: replace(text, "\"schema\": 1", "\"schema\": 99"); break;
    case DMG_NOT_JSON: snprintf(text, 64, "this is not json"); break;
    case DMG_BAD_RECORD: break;
    default: break;
    }
    if (kind == DMG_WRONG_KEY) {
        /* a good file of another model, copied to this model's name */
        tun_store_t *other = open_store(dir, &small);
        assert_int_equal(tun_store_put(other, &r), AT_OK);
        assert_int_equal(tun_store_save(other), AT_OK);
        free(text);
        text = read_file(tun_store_path(other));
        unlink(tun_store_path(other));
        tun_store_destroy(&other);
    }
    if (kind == DMG_BAD_RECORD) /* a config the space refuses, with a matching checksum */
        replace(text, "\"tile_rows\": 32", "\"tile_rows\": 33");
    write_file(tun_store_path(st), text);
    char *damaged = read_file(tun_store_path(st));

    tun_store_t *fresh = open_store(dir, &llama);
    tun_file_state_t fs;
    assert_int_equal(tun_store_load(fresh, &fs), AT_OK);
    /* a bad record with a stale checksum is caught by the checksum first: either way damaged */
    assert_int_equal(fs, TUN_FILE_DAMAGED);
    assert_int_equal(tun_store_count(fresh), 0);
    const char *bad = NULL;
    assert_int_equal(tun_store_set_aside(fresh, &bad), 1);
    assert_int_equal(access(tun_store_path(fresh), F_OK), -1);
    char *kept = read_file(bad);
    assert_string_equal(kept, damaged);
    /* work goes on: a save writes a good file beside the one set aside */
    assert_int_equal(tun_store_put(fresh, &r), AT_OK);
    assert_int_equal(tun_store_save(fresh), AT_OK);
    tun_store_t *check = open_store(dir, &llama);
    assert_int_equal(tun_store_load(check, &fs), AT_OK);
    assert_int_equal(fs, TUN_FILE_OK);
    assert_int_equal(tun_store_count(check), 1);
    /* a second damaged file never overwrites the first one set aside */
    write_file(tun_store_path(check), "{");
    assert_int_equal(tun_store_load(check, &fs), AT_OK);
    assert_int_equal(fs, TUN_FILE_DAMAGED);
    const char *bad2 = NULL;
    tun_store_set_aside(check, &bad2);
    assert_string_not_equal(bad, bad2);
    char *kept_again = read_file(bad);
    assert_string_equal(kept_again, damaged);
    free(kept_again);
    free(kept);
    free(damaged);
    free(text);
    tun_store_destroy(&st);
    tun_store_destroy(&fresh);
    tun_store_destroy(&check);
    rm_dir(dir);
}

static void test_tun_store_truncated_file_is_set_aside(void **s) { (void)s; damage_case(DMG_TRUNCATED); }
static void test_tun_store_bad_checksum_is_set_aside(void **s) { (void)s; damage_case(DMG_CHECKSUM); }
static void test_tun_store_foreign_version_is_set_aside(void **s) { (void)s; damage_case(DMG_VERSION); }
static void test_tun_store_wrong_key_is_set_aside(void **s) { (void)s; damage_case(DMG_WRONG_KEY); }
static void test_tun_store_not_json_is_set_aside(void **s) { (void)s; damage_case(DMG_NOT_JSON); }
static void test_tun_store_bad_record_is_set_aside(void **s) { (void)s; damage_case(DMG_BAD_RECORD); }

static void test_tun_store_unwritable_dir_fails_cleanly(void **state) {
    (void)state;
    tun_device_t d = cpu_dev();
    tun_store_t *st = NULL;
    at_diag_t diag = {{0}};
    assert_int_equal(tun_store_open("/proc/attnd-no/such", &tun_space_cpu, &d, "k", &llama, &diag,
                                    &st),
                     AT_ERR_IO);
    assert_null(st);
    assert_true(diag.msg[0] != '\0');
}

#define WRITERS 4
#define ROUNDS 12

/* Several processes save disjoint records into one store at once, each save re-reading what the
 * others wrote: the file is never torn and no record is lost. */
static void test_tun_store_concurrent_processes_lose_nothing(void **state) {
    (void)state;
    char dir[64];
    make_dir(dir, sizeof dir);
    pid_t kids[WRITERS];
    for (int w = 0; w < WRITERS; w++) {
        kids[w] = fork();
        assert_true(kids[w] >= 0);
        if (kids[w] == 0) {
            int bad = 0;
            for (int i = 0; i < ROUNDS; i++) {
                tun_store_t *st = open_store(dir, &llama);
                tun_file_state_t fs;
                tun_record_t r = record((uint8_t)(w * ROUNDS + i), (uint8_t)w, (uint64_t)i);
                bad |= tun_store_load(st, &fs) != AT_OK || fs == TUN_FILE_DAMAGED;
                bad |= tun_store_put(st, &r) != AT_OK || tun_store_save(st) != AT_OK;
                bad |= tun_store_set_aside(st, NULL) != 0;
                tun_store_destroy(&st);
            }
            _exit(bad);
        }
    }
    for (int w = 0; w < WRITERS; w++) {
        int status = 0;
        assert_int_equal(waitpid(kids[w], &status, 0), kids[w]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    tun_store_t *st = open_store(dir, &llama);
    tun_file_state_t fs;
    assert_int_equal(tun_store_load(st, &fs), AT_OK);
    assert_int_equal(fs, TUN_FILE_OK);
    assert_int_equal(tun_store_count(st), WRITERS * ROUNDS);
    for (int w = 0; w < WRITERS; w++)
        for (int i = 0; i < ROUNDS; i++) {
            tun_record_t want = record((uint8_t)(w * ROUNDS + i), (uint8_t)w, (uint64_t)i);
            const tun_record_t *got = tun_store_find(st, &want.bucket);
            assert_non_null(got);
            assert_record_equal(got, &want);
        }
    tun_store_destroy(&st);
    rm_dir(dir);
}

static void test_tun_store_newer_record_wins_a_merge(void **state) {
    (void)state;
    char dir[64];
    make_dir(dir, sizeof dir);
    tun_store_t *a = open_store(dir, &llama), *b = open_store(dir, &llama);
    tun_record_t old = record(2, 0, 1), fresh = record(2, 0, 5);
    fresh.updated_s = 2000;
    assert_int_equal(tun_store_put(b, &fresh), AT_OK);
    assert_int_equal(tun_store_save(b), AT_OK);
    assert_int_equal(tun_store_put(a, &old), AT_OK);
    assert_int_equal(tun_store_save(a), AT_OK); /* merges the newer record from disk */
    assert_record_equal(tun_store_find(a, &old.bucket), &fresh);
    tun_store_destroy(&a);
    tun_store_destroy(&b);
    rm_dir(dir);
}

static void test_tun_bucket_rounds_up_to_powers_of_two(void **state) {
    (void)state;
    tun_bucket_t b = tun_bucket_of(64, 64, 1, 2049);
    assert_int_equal(b.tokens, 6);
    assert_int_equal(b.seqs, 6);
    assert_int_equal(b.max_q, 0);
    assert_int_equal(b.max_ctx, 12);
    tun_bucket_t c = tun_bucket_of(65, 64, 1, 2048);
    assert_int_equal(c.tokens, 7);
    assert_int_equal(c.max_ctx, 11);
    assert_false(tun_bucket_equal(&b, &c));
}

static void test_tun_space_cpu_conditions(void **state) {
    (void)state;
    tun_device_t d = cpu_dev();
    tun_bucket_t b = tun_bucket_of(1, 1, 1, 1);
    tun_cfg_t *list = NULL;
    size_t n = 0;
    assert_int_equal(tun_space_enumerate(&tun_space_cpu, &llama, &d, &b, &list, &n), AT_OK);
    /* block 16: key tiles 8 and 16 only; group 4: every row count */
    assert_int_equal(n, 5 * 2 * 5);
    tun_cfg_t h;
    tun_space_cpu.heuristic(&llama, &d, &b, &h);
    assert_true(tun_cfg_equal(&list[0], &h));
    assert_int_equal(h.v[TUN_CPU_TILE_ROWS], 64);
    assert_int_equal(h.v[TUN_CPU_KEY_TILE], 16);
    for (size_t i = 0; i < n; i++) {
        assert_true(tun_cfg_valid(&tun_space_cpu, &list[i], &llama, &d));
        assert_true(list[i].v[TUN_CPU_KEY_TILE] <= 16);
        for (size_t j = 0; j < i; j++)
            assert_false(tun_cfg_equal(&list[i], &list[j]));
    }
    free(list);
    tun_cfg_t odd = {.n = 3, .v = {64, 24, 4}};
    assert_false(tun_cfg_valid(&tun_space_cpu, &odd, &llama, &d));
    char text[128];
    tun_cfg_format(&tun_space_cpu, &h, text, sizeof text);
    assert_string_equal(text, "tile_rows=64,key_tile=16,items_per_thread=4");
}

/* base with a wide tile of the wgmma body: two warpgroups, tile_k keys a stage, stages. */
static tun_cfg_t wgmma_tile(const tun_cfg_t *base, uint32_t tile_k, uint32_t stages) {
    tun_cfg_t c = *base;
    c.v[TUN_CUDA_WIDE_MMA] = 1;
    c.v[TUN_CUDA_WIDE_WARPS_M] = 8;
    c.v[TUN_CUDA_WIDE_WARP_MT] = 1;
    c.v[TUN_CUDA_WIDE_TILE_K] = tile_k;
    c.v[TUN_CUDA_WIDE_STAGES] = stages;
    return c;
}

static void test_tun_space_cuda_respects_shared_memory(void **state) {
    (void)state;
    tun_device_t h200 = {.backend = "cuda", .name = "NVIDIA H200", .arch = "sm_90",
                         .threads = 132, .smem_bytes = 227 * 1024};
    tun_device_t small_smem = h200;
    small_smem.smem_bytes = 100 * 1024;
    tun_bucket_t b = tun_bucket_of(256, 256, 1, 8192);
    tun_shape_t d256 = llama;
    d256.head_dim = 256;
    const tun_shape_t *shapes[] = {&llama, &d256};
    for (size_t s = 0; s < 2; s++) {
        tun_cfg_t h;
        tun_space_cuda_unified.heuristic(shapes[s], &h200, &b, &h);
        /* the backend's default plan must be in the space and valid on the H200 */
        assert_true(tun_cfg_valid(&tun_space_cuda_unified, &h, shapes[s], &h200));
        /* the tiles: every combination of the wide and the narrow knobs around it */
        tun_cfg_t *big = NULL, *tight = NULL;
        size_t nb = 0, nt = 0;
        assert_int_equal(tun_space_enumerate_from(&tun_space_cuda_unified, shapes[s], &h200, &h,
                                                  0x7f, &big, &nb), AT_OK);
        tun_cfg_t hs;
        tun_space_cuda_unified.heuristic(shapes[s], &small_smem, &b, &hs);
        assert_true(tun_cfg_valid(&tun_space_cuda_unified, &hs, shapes[s], &small_smem));
        assert_int_equal(tun_space_enumerate_from(&tun_space_cuda_unified, shapes[s], &small_smem,
                                                  &hs, 0x7f, &tight, &nt), AT_OK);
        assert_true(nt < nb);
        for (size_t i = 0; i < nt; i++) {
            const uint32_t *v = tight[i].v;
            const uint32_t wide_smem =
                v[TUN_CUDA_WIDE_MMA] == 1
                    ? tun_cuda_wgmma_smem_bytes(shapes[s]->head_dim, v[0], v[2], v[3])
                    : tun_cuda_smem_bytes(shapes[s]->head_dim, 3, v[0], v[1], 1, v[2], v[3]);
            assert_true(wide_smem <= 100 * 1024);
            assert_true(tun_cuda_smem_bytes(shapes[s]->head_dim, 3, 1, 1, v[4], v[5], v[6]) <=
                        100 * 1024);
            assert_int_equal((v[5] / v[4]) % 16, 0);
            assert_true(v[4] <= 16 && v[0] <= 16);
        }
        free(big);
        free(tight);
        /* the default takes the wgmma wide tile at head_dim 128 on sm_90 (128 keys, 3 stages
         * in 227 KiB; 64 keys, 2 stages in 100 KiB), never at 256 */
        assert_int_equal(h.v[TUN_CUDA_WIDE_MMA], s == 0 ? 1 : 0);
        assert_int_equal(hs.v[TUN_CUDA_WIDE_MMA], s == 0 ? 1 : 0);
        if (s == 0) {
            assert_int_equal(h.v[TUN_CUDA_WIDE_TILE_K], 128);
            assert_int_equal(h.v[TUN_CUDA_WIDE_STAGES], 3);
            assert_int_equal(hs.v[TUN_CUDA_WIDE_TILE_K], 64);
            assert_int_equal(hs.v[TUN_CUDA_WIDE_STAGES], 2);
        }
        tun_cfg_t wg = wgmma_tile(&hs, 64, 2);
        assert_int_equal(tun_cfg_valid(&tun_space_cuda_unified, &wg, shapes[s], &small_smem),
                         s == 0);
        wg.v[TUN_CUDA_WIDE_STAGES] = 3;
        assert_false(tun_cfg_valid(&tun_space_cuda_unified, &wg, shapes[s], &small_smem));
    }
    /* not on another architecture (wgmma is sm_90a's), nor in f32 */
    tun_device_t a100 = h200;
    snprintf(a100.arch, sizeof a100.arch, "sm_80");
    tun_cfg_t h;
    tun_space_cuda_unified.heuristic(&llama, &a100, &b, &h);
    assert_int_equal(h.v[TUN_CUDA_WIDE_MMA], 0);
    tun_cfg_t wg = wgmma_tile(&h, 64, h.v[TUN_CUDA_WIDE_STAGES]);
    assert_false(tun_cfg_valid(&tun_space_cuda_unified, &wg, &llama, &a100));
    assert_true(tun_cfg_valid(&tun_space_cuda_unified, &wg, &llama, &h200));
    /* two warpgroups at 128 dims and 128 keys (registers shifted from the producer): 3 stages
     * fit the H200 (1024 + (128 + 768) x 256 bytes), 4 do not */
    wg.v[TUN_CUDA_WIDE_TILE_K] = 128;
    wg.v[TUN_CUDA_WIDE_STAGES] = 3;
    assert_true(tun_cfg_valid(&tun_space_cuda_unified, &wg, &llama, &h200));
    wg.v[TUN_CUDA_WIDE_STAGES] = 4;
    assert_false(tun_cfg_valid(&tun_space_cuda_unified, &wg, &llama, &h200));
    tun_shape_t f32 = llama;
    f32.dtype = 1;
    tun_space_cuda_unified.heuristic(&f32, &h200, &b, &h);
    assert_int_equal(h.v[TUN_CUDA_WIDE_MMA], 0);
    /* the wgmma body's: 1024 to align, Q 128 x 128 x 2, ring 3 x 2 x 64 x 128 x 2 */
    assert_int_equal(tun_cuda_wgmma_smem_bytes(128, 8, 64, 3),
                     1024 + 128 * 256 + 3 * 2 * 64 * 256);
    /* the kernel's formula for a wide tile, D 128 bf16, 4 warps x 1 m16, 64 keys, 2 stages: Q
     * 64 x 136 x 2, ring 2 x 2 x 64 x 136 x 2 */
    assert_int_equal(tun_cuda_smem_bytes(128, 3, 4, 1, 1, 64, 2), 64 * 136 * 2 + 4 * 64 * 136 * 2);
}

/* A bucket's search covers what its batches use: decode the narrow tile and the split knobs,
 * prefill the wide tile and the split knobs, a mixed batch all of them. */
static void test_tun_space_cuda_stages_follow_the_bucket(void **state) {
    (void)state;
    uint32_t m[TUN_MAX_PARAMS];
    const tun_bucket_t decode = tun_bucket_of(256, 256, 1, 8193);
    const tun_bucket_t prefill = tun_bucket_of(8 * 2048, 8, 2048, 2048);
    const tun_bucket_t mixed = tun_bucket_of(63 + 512, 64, 512, 2049);
    assert_int_equal(tun_space_cuda_unified.stages(&llama, &decode, m), 2);
    assert_int_equal(m[0], 0x070);
    assert_int_equal(m[1], 0x180);
    assert_int_equal(tun_space_cuda_unified.stages(&llama, &prefill, m), 2);
    assert_int_equal(m[0], 0x80f);
    assert_int_equal(m[1], 0x180);
    assert_int_equal(tun_space_cuda_unified.stages(&llama, &mixed, m), 4);
    assert_int_equal(m[0] | m[1] | m[2] | m[3], 0xfff);
    /* a group above 16 never uses the narrow tile, even for decode */
    tun_shape_t wide_group = llama;
    wide_group.group = 32;
    assert_int_equal(tun_space_cuda_unified.stages(&wide_group, &decode, m), 2);
    assert_int_equal(m[0], 0x80f);
}

/* A staged search over the CUDA space times a few dozen configs, not the space's hundreds of
 * thousands, and finds the optimum of a cost that is separable by stage. */
static void test_tun_search_staged_finds_a_separable_optimum(void **state) {
    (void)state;
    tun_device_t h200 = {.backend = "cuda", .name = "NVIDIA H200", .arch = "sm_90",
                         .threads = 132, .smem_bytes = 227 * 1024};
    const tun_bucket_t mixed = tun_bucket_of(63 + 512, 64, 512, 2049);
    tun_search_t *s = NULL;
    assert_int_equal(tun_search_create(&tun_space_cuda_unified, &llama, &h200, &mixed, 1, &s),
                     AT_OK);
    tun_cfg_t c;
    bool warm;
    uint32_t runs = 0;
    while (tun_search_next(s, &c, &warm)) {
        /* fastest at wide 8 warps x 1 m16 x 64 keys, narrow 2 warps x 64 keys x 3 stages,
         * splits of 512 keys, mixed wide first; each wide knob worth more than the 3% a
         * config must gain over the heuristic */
        uint64_t ns = 10000;
        ns += c.v[0] == 8 ? 0 : 3000;
        ns += c.v[1] == 1 ? 0 : 3000;
        ns += c.v[2] == 64 ? 0 : 3000;
        ns += c.v[4] == 2 ? 0 : 5000;
        ns += c.v[6] == 3 ? 0 : 5000;
        ns += c.v[7] == 512 ? 0 : 20000;
        ns += c.v[9] == 1024 ? 0 : 20000;
        tun_search_report(s, ns);
        runs++;
    }
    uint32_t done, total;
    tun_search_progress(s, &done, &total);
    assert_int_equal(done, total);
    assert_int_equal(done, runs);
    assert_true(runs < 400);
    tun_record_t r;
    assert_int_equal(tun_search_result(s, &r), AT_OK);
    assert_int_equal(r.best.v[0], 8);
    assert_int_equal(r.best.v[1], 1);
    assert_int_equal(r.best.v[2], 64);
    assert_int_equal(r.best.v[4], 2);
    assert_int_equal(r.best.v[6], 3);
    assert_int_equal(r.best.v[7], 512);
    assert_int_equal(r.best.v[9], 1024);
    assert_true(r.best_ns < r.heuristic_ns);
    assert_true(r.worst_ns >= r.heuristic_ns);
    assert_true(r.tried > 10 && r.tried < 200);
    tun_search_destroy(&s);
}

/* The search times the heuristic first, skips configs that fail, and reports best, heuristic
 * and worst. */
static void test_tun_search_picks_the_fastest(void **state) {
    (void)state;
    tun_device_t d = cpu_dev();
    tun_bucket_t b = tun_bucket_of(8, 8, 1, 512);
    tun_search_t *s = NULL;
    assert_int_equal(tun_search_create(&tun_space_cpu, &llama, &d, &b, 2, &s), AT_OK);
    tun_cfg_t c, first;
    bool warm;
    uint32_t runs = 0;
    tun_space_cpu.heuristic(&llama, &d, &b, &first);
    while (tun_search_next(s, &c, &warm)) {
        if (runs == 0) {
            assert_true(tun_cfg_equal(&c, &first));
            assert_true(warm);
        }
        /* a made-up cost: fastest at tile_rows 32, key tile 8; items_per_thread 16 fails */
        uint64_t ns = 1000 + (c.v[0] == 32 ? 0 : 500) + (c.v[1] == 8 ? 0 : 100) + c.v[2] +
                      (warm ? 100000 : 0);
        tun_search_report(s, c.v[2] == 16 ? UINT64_MAX : ns);
        runs++;
    }
    tun_record_t r;
    assert_int_equal(tun_search_result(s, &r), AT_OK);
    assert_int_equal(r.best.v[0], 32);
    assert_int_equal(r.best.v[1], 8);
    assert_int_equal(r.best.v[2], 1);
    assert_int_equal(r.best_ns, 1001);
    assert_int_equal(r.heuristic_ns, 1000 + 500 + 100 + 4);
    assert_int_equal(r.worst_ns, 1000 + 500 + 100 + 8);
    assert_int_equal(r.tried, 5 * 2 * 4);
    tun_search_destroy(&s);
    /* a config only 1% faster than the heuristic does not replace it; the heuristic's second
     * timing, at the end, counts */
    assert_int_equal(tun_search_create(&tun_space_cpu, &llama, &d, &b, 1, &s), AT_OK);
    runs = 0;
    uint32_t done, total;
    tun_search_progress(s, &done, &total);
    while (tun_search_next(s, &c, &warm)) {
        bool heur = tun_cfg_equal(&c, &first);
        uint64_t ns = heur ? (runs < 2 ? 5000 : 1000) : (c.v[0] == 16 ? 990 : 1200);
        tun_search_report(s, ns);
        runs++;
    }
    assert_int_equal(runs, total);
    assert_int_equal(tun_search_result(s, &r), AT_OK);
    assert_true(tun_cfg_equal(&r.best, &first));
    assert_int_equal(r.heuristic_ns, 1000);
    assert_int_equal(r.best_ns, 1000);
    assert_int_equal(r.tried, 5 * 2 * 5);
    tun_search_destroy(&s);
}

int main(void) {
    tu_base_seed("test_tun_store");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tun_store_round_trip_restores_exactly),
        cmocka_unit_test(test_tun_store_models_never_share_a_file),
        cmocka_unit_test(test_tun_store_truncated_file_is_set_aside),
        cmocka_unit_test(test_tun_store_bad_checksum_is_set_aside),
        cmocka_unit_test(test_tun_store_foreign_version_is_set_aside),
        cmocka_unit_test(test_tun_store_wrong_key_is_set_aside),
        cmocka_unit_test(test_tun_store_not_json_is_set_aside),
        cmocka_unit_test(test_tun_store_bad_record_is_set_aside),
        cmocka_unit_test(test_tun_store_unwritable_dir_fails_cleanly),
        cmocka_unit_test(test_tun_store_concurrent_processes_lose_nothing),
        cmocka_unit_test(test_tun_store_newer_record_wins_a_merge),
        cmocka_unit_test(test_tun_bucket_rounds_up_to_powers_of_two),
        cmocka_unit_test(test_tun_space_cpu_conditions),
        cmocka_unit_test(test_tun_space_cuda_respects_shared_memory),
        cmocka_unit_test(test_tun_space_cuda_stages_follow_the_bucket),
        cmocka_unit_test(test_tun_search_staged_finds_a_separable_optimum),
        cmocka_unit_test(test_tun_search_picks_the_fastest),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* A GPU session's module table (att_gpu_tune.c) over the compile cache, without a GPU: a stand-in
 * compiler behind att_jit and a stand-in loader that records what it is given and fails where
 * told. Checks that the loader gets each image whole, that a switch whose load fails keeps the
 * current modules and frees its images (ASan's leak check runs this in CI), that a switch to a
 * tile not yet compiled answers NOT_READY and queues the compile, that every module loaded is
 * unloaded once, and that a table on a device that is gone is forgotten instead. Label: unit. */
#include "tests/test_util.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attention/att_gpu_tune.h"
#include "attention/att_jit.h"

/* The stand-in compiler: an image of 3000 + tile_k bytes whose byte i is (tile_k + i) & 255. */
static at_err_t fake_compile(void *user, const char *arch, const char *const *opts, uint32_t n_opts,
                             void **image, size_t *bytes, at_diag_t *diag) {
    (void)user;
    (void)arch;
    (void)diag;
    const unsigned k = tu_opt_value(opts, n_opts, "-DTK="), n = 3000 + k;
    uint8_t *img = malloc(n);
    if (img == NULL)
        return AT_ERR_NOMEM;
    for (unsigned i = 0; i < n; i++)
        img[i] = (uint8_t)(k + i);
    *image = img;
    *bytes = n;
    return AT_OK;
}

/* The backend's options of a tile (att_gpu_opts_fn): the kind's tile is told by tile_k alone. */
static void fake_opts(const void *user, const att_model_t *m, const att_tile_t *t,
                      att_jit_opts_t *o) {
    (void)user;
    (void)m;
    att_jit_opt_add(o, "-DTK=%u", t->tile_k);
}

/* The stand-in loader: counts loads and unloads, checks each image, fails load number fail_at. */
typedef struct fake_mod {
    unsigned tile_k;
} fake_mod_t;

static unsigned g_loads, g_unloads, g_fail_at, g_bad_images;

static at_err_t fake_load(att_kv_t *kv, const void *img, size_t bytes, att_gpu_mod_t *out,
                          at_diag_t *diag) {
    (void)kv;
    if (++g_loads == g_fail_at)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED, "load %u fails (asked)", g_loads);
    const unsigned k = out->tile.tile_k;
    bool whole = bytes == 3000u + k;
    for (size_t i = 0; whole && i < bytes; i++)
        whole = ((const uint8_t *)img)[i] == (uint8_t)(k + i);
    g_bad_images += !whole;
    fake_mod_t *fm = malloc(sizeof *fm);
    if (fm == NULL)
        return AT_ERR_NOMEM;
    fm->tile_k = k;
    out->mod = fm;
    return AT_OK;
}

static unsigned g_forgets;

static void fake_unload(att_kv_t *kv, void *mod) {
    (void)kv;
    g_unloads++;
    free(mod);
}

static void fake_forget(att_kv_t *kv, void *mod) {
    (void)kv;
    g_forgets++;
    free(mod);
}

static const att_gpu_loader_t g_loader = {
    .load = fake_load, .unload = fake_unload, .forget = fake_forget};

static att_tile_t tile(unsigned tile_k) {
    return (att_tile_t){.warps_m = 1, .warp_mt = 1, .warps_n = 4, .tile_k = tile_k, .stages = 2};
}

/* Whether the cache holds tile t's image (the compile queue's work), within about 5 s. */
static bool compiled_soon(att_jit_t *j, const att_gpu_cq_t *q, const att_model_t *m,
                          const att_tile_t *t) {
    att_jit_opts_t o;
    att_gpu_cq_opts(q, m, t, &o);
    for (int i = 0; i < 500; i++) {
        size_t bytes;
        if (att_jit_lookup(j, "sm_90", o.ptr, o.n, NULL, &bytes) == AT_OK)
            return true;
        const struct timespec ms10 = {0, 10 * 1000 * 1000};
        nanosleep(&ms10, NULL);
    }
    return false;
}

/* A new session's two modules of tiles first (one per kind), fetched (compiled) and loaded;
 * the fetched images released and cleared. what labels a failure. */
static void load_first(att_gpu_mods_t *s, att_jit_t *j, att_gpu_cq_t *q, const att_model_t *m,
                       const att_tile_t *first, const char *what) {
    att_gpu_fetch_t f[ATT_TILE_KINDS];
    memset(f, 0, sizeof f);
    at_diag_t d = {{0}};
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        att_gpu_cq_opts(q, m, &first[k], &f[k].opts);
    att_gpu_fetch_images(j, "sm_90", f);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        TU_CHECK(att_gpu_mods_load_first(s, k, &first[k], &f[k], &d) == AT_OK, "%s %u: %s", what, k,
                 d.msg);
    att_gpu_fetch_release(f);
    TU_CHECK(f[0].img == NULL && f[1].img == NULL, "%s: released images are cleared", what);
}

static void test_att_gpu_mods_switches_and_frees(void **state) {
    (void)state;
    const att_jit_compiler_t cc = {"fake 1.0", "bin", fake_compile, NULL};
    att_jit_t *j = NULL;
    at_diag_t d = {{0}};
    TU_CHECK(att_jit_create_with(&cc, NULL, &d, &j) == AT_OK, "jit: %s", d.msg);
    att_gpu_cq_t q;
    memset(&q, 0, sizeof q);
    att_gpu_cq_init(&q, j, "sm_90", fake_opts, NULL, 1);
    lc_t *lc = NULL;
    TU_CHECK(lc_create(NULL, NULL, &lc) == AT_OK, "lc_create");
    att_model_t m;
    memset(&m, 0, sizeof m);
    static char session; /* never dereferenced: the loader's opaque att_kv_t */
    att_kv_t *kv = (att_kv_t *)(void *)&session;
    g_loads = g_unloads = g_fail_at = g_bad_images = g_forgets = 0;

    /* a new session's two modules, fetched (compiled) and loaded */
    att_gpu_mods_t s;
    att_gpu_mods_init(&s, &g_loader, kv, lc);
    const att_tile_t first[ATT_TILE_KINDS] = {tile(32), tile(64)};
    load_first(&s, j, &q, &m, first, "first");

    /* a switch to tiles not compiled yet: NOT_READY, nothing loaded, both queued */
    const att_tile_t next[ATT_TILE_KINDS] = {tile(16), tile(128)};
    TU_CHECK(att_gpu_mods_switch(&s, &q, &m, next) == AT_ERR_NOT_READY, "not compiled yet");
    TU_CHECK(g_loads == 2, "loads %u", g_loads);
    TU_CHECK(compiled_soon(j, &q, &m, &next[0]) && compiled_soon(j, &q, &m, &next[1]),
             "the queue compiled both");

    /* the second kind's load fails: the current modules stay, and both images are freed */
    g_fail_at = g_loads + 2;
    TU_CHECK(att_gpu_mods_switch(&s, &q, &m, next) == AT_ERR_CONFIG, "a failing load");
    TU_CHECK(att_gpu_mods_cur(&s, ATT_TILE_WIDE)->tile.tile_k == 32 &&
                 att_gpu_mods_cur(&s, ATT_TILE_NARROW)->tile.tile_k == 64,
             "the current modules changed");
    /* again, with no failure: both switch (the wide one found loaded) */
    g_fail_at = 0;
    TU_CHECK(att_gpu_mods_switch(&s, &q, &m, next) == AT_OK, "the switch");
    TU_CHECK(att_gpu_mods_cur(&s, ATT_TILE_WIDE)->tile.tile_k == 16 &&
                 att_gpu_mods_cur(&s, ATT_TILE_NARROW)->tile.tile_k == 128,
             "the switch did not take");
    TU_CHECK(g_bad_images == 0, "%u images reached the loader damaged", g_bad_images);

    att_gpu_mods_fini(&s);
    TU_CHECK(g_unloads == g_loads - 1, "%u loads (one failed), %u unloads", g_loads, g_unloads);

    /* a table on a device that is gone: forgotten, not unloaded, each record once */
    att_gpu_mods_init(&s, &g_loader, kv, lc);
    load_first(&s, j, &q, &m, first, "again");
    const unsigned unloads = g_unloads;
    att_gpu_mods_forget(&s);
    att_gpu_mods_fini(&s); /* nothing left to unload */
    TU_CHECK(g_forgets == 2 && g_unloads == unloads, "%u forgotten, %u unloaded", g_forgets,
             g_unloads - unloads);
    att_gpu_cq_fini(&q);
    lc_destroy(&lc);
    att_jit_destroy(&j);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_gpu_mods_switches_and_frees),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The per-session launch cache (see lc.h).
 * Thread model: none inside; the session's one calling thread owns it. Entries live in a fixed
 * array, so pointers handed out stay valid until lc_destroy. */
#include "cache/lc.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

struct lc {
    lc_launch_fn fn;
    void *user;
    uint32_t num;
    lc_launch_t entries[LC_MAX_ENTRIES];
    lc_stats_t stats;
};

at_err_t lc_create(lc_launch_fn fn, void *user, lc_t **out) {
    lc_t *lc = calloc(1, sizeof *lc);
    if (lc == NULL)
        return AT_ERR_NOMEM;
    lc->fn = fn;
    lc->user = user;
    *out = lc;
    return AT_OK;
}

void lc_destroy(lc_t **lc) {
    if (lc == NULL || *lc == NULL)
        return;
    free(*lc);
    *lc = NULL;
}

static lc_launch_t *find(lc_t *lc, uint32_t key) {
    for (uint32_t i = 0; i < lc->num; i++)
        if (lc->entries[i].key == key)
            return &lc->entries[i];
    return NULL;
}

const lc_launch_t *lc_lookup(lc_t *lc, uint32_t key) {
    const lc_launch_t *l = find(lc, key);
    if (l != NULL)
        lc->stats.hits++;
    else
        lc->stats.misses++;
    return l;
}

at_err_t lc_insert(lc_t *lc, const lc_launch_t *l, const lc_launch_t **out) {
    if (l->param_bytes > LC_MAX_PARAM_BYTES)
        return AT_ERR_INTERNAL;
    lc_launch_t *slot = find(lc, l->key);
    if (slot == NULL)
        slot = find(lc, LC_KEY_FREE); /* an entry lc_forget emptied */
    if (slot == NULL) {
        if (lc->num == LC_MAX_ENTRIES)
            return AT_ERR_INTERNAL;
        slot = &lc->entries[lc->num++];
    }
    *slot = *l;
    if (out != NULL)
        *out = slot;
    return AT_OK;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

at_err_t lc_launch(lc_t *lc, const lc_launch_t *l, uint32_t units, void *params) {
    uint64_t t0 = now_ns();
    at_err_t e = lc->fn(lc->user, l, units * l->grid_per_unit, params);
    lc->stats.launch_host_ns += now_ns() - t0;
    lc->stats.launches++;
    return e;
}

void lc_forget_tile(lc_t *lc, uint32_t tile) {
    for (uint32_t i = 0; i < lc->num; i++)
        if ((lc->entries[i].key >> 8 & 0xffu) == tile && lc->entries[i].key != LC_KEY_FREE)
            lc->entries[i].key = LC_KEY_FREE;
}

void lc_note_compile(lc_t *lc) { lc->stats.compiles++; }

void lc_get_stats(const lc_t *lc, lc_stats_t *out) { *out = lc->stats; }

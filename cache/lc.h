/* A model session's launch cache: prepared kernel launches, keyed only by what varies between
 * calls of that one model.
 *
 * Why per session: a prepared launch has the model's compiled function and a parameter block
 * with the model's constants (scale, soft cap, ALiBi and sink arrays, the KV pool) already in
 * place, so a call skips every check of those constants and only patches the few per-call values
 * (tensor pointers, counts, the layer) before launching. That is safe only while the constants
 * cannot change, which is true within one session and false across the models of one process:
 * a cache shared by two models and keyed like this one (kernel, tile module, split) hands the
 * second model the first model's kernel (tests/cache/test_lc.c shows it). So every session owns
 * its own lc_t, created and destroyed with its KV storage.
 *
 * The cache knows no driver: a function handle is an opaque pointer and launching goes through
 * the callback given at creation, so it is tested without a GPU.
 * Thread: not thread-safe; used by the one thread that runs the session's calls. */
#ifndef AT_CACHE_LC_H
#define AT_CACHE_LC_H

#include <stdalign.h>
#include <stdint.h>

#include "common/at_err.h"

#define LC_MAX_PARAM_BYTES 256u
#define LC_MAX_ENTRIES 40u

/* A key: which kernel, which tile configuration, and whether the call is split. */
#define LC_KEY(kernel, tile, split) (((uint32_t)(kernel) << 16) | ((uint32_t)(tile) << 8) | (split))
#define LC_KEY_FREE 0xffffffffu /* no key: an entry lc_forget_tile emptied */

typedef struct lc_launch {
    uint32_t key;
    void *fn;               /* borrowed: the backend's function handle (CUfunction) */
    uint32_t block_x;       /* threads per block */
    uint32_t grid_per_unit; /* grid.x = units x grid_per_unit (units: work items, merges, chunks) */
    uint32_t smem_bytes;    /* dynamic shared memory */
    uint32_t param_bytes;   /* bytes of params the kernel takes */
    alignas(16) uint8_t params[LC_MAX_PARAM_BYTES]; /* template: the session's constants */
} lc_launch_t;

/* Launches l with grid_x blocks and params (a patched copy of l->params). Returns AT_OK or the
 * backend's error. */
typedef at_err_t (*lc_launch_fn)(void *user, const lc_launch_t *l, uint32_t grid_x, void *params);

typedef struct lc_stats {
    uint64_t hits;           /* lookups that found a prepared launch */
    uint64_t misses;         /* lookups that had to prepare one */
    uint64_t compiles;       /* NVRTC runs for this session (lc_note_compile) */
    uint64_t launches;
    uint64_t launch_host_ns; /* host time inside the launch callback, summed */
} lc_stats_t;

typedef struct lc lc_t;

/* AT_ERR_NOMEM, else *out is the caller's (lc_destroy). user is passed to fn. */
at_err_t lc_create(lc_launch_fn fn, void *user, lc_t **out);
void lc_destroy(lc_t **lc);

/* The prepared launch of key, or NULL (a miss; the caller prepares one and inserts it). Counts
 * a hit or a miss. The result is borrowed until lc_destroy. */
const lc_launch_t *lc_lookup(lc_t *lc, uint32_t key);

/* Copies l into the cache (replacing an entry of the same key). AT_ERR_INTERNAL when the cache
 * is full (LC_MAX_ENTRIES keys: a model has a few per loaded tile config) or param_bytes is too
 * large. *out (may be
 * NULL) is the cached copy. */
at_err_t lc_insert(lc_t *lc, const lc_launch_t *l, const lc_launch_t **out);

/* Launches a prepared launch over units units with params (patched by the caller from
 * l->params); times the callback. */
at_err_t lc_launch(lc_t *lc, const lc_launch_t *l, uint32_t units, void *params);

/* Drops every entry whose key has this tile byte: the backend unloaded that tile's module
 * (a session switching tile configs). Pointers to the dropped entries are invalid afterwards;
 * the entries are reused by later inserts. */
void lc_forget_tile(lc_t *lc, uint32_t tile);

void lc_note_compile(lc_t *lc);
void lc_get_stats(const lc_t *lc, lc_stats_t *out);

#endif

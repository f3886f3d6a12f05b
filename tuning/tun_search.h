/* A search over a config space, one timing at a time: exhaustive, or in stages when the space
 * says so (tun_space_t.stages).
 *
 * The caller asks for the next config to time, times one run of it, and reports the time; every
 * config gets one warm-up run and `reps` timed runs, the best of which counts. Between two calls
 * the caller is free to do other work (the worker serves calls), which is why the search never
 * runs anything itself. The heuristic's config is timed first, so its time is always known.
 * Thread: one thread at a time. */
#ifndef AT_TUNING_TUN_SEARCH_H
#define AT_TUNING_TUN_SEARCH_H

#include <stdbool.h>
#include <stdint.h>

#include "tuning/tun.h"
#include "tuning/tun_store.h"

typedef struct tun_search tun_search_t;

/* A search over the valid configs of space for (s, d), bucket b. reps >= 1 (0 = 3). On success
 * *out is the caller's (tun_search_destroy). AT_ERR_NOMEM. */
at_err_t tun_search_create(const tun_space_t *space, const tun_shape_t *s, const tun_device_t *d,
                           const tun_bucket_t *b, uint32_t reps, tun_search_t **out);
void tun_search_destroy(tun_search_t **s);

/* The config of the next run to time; false when the search is complete. *warmup says whether
 * this run is a warm-up (its time is ignored, but it must still be reported). */
bool tun_search_next(tun_search_t *s, tun_cfg_t *cfg, bool *warmup);

/* The time of the run tun_search_next asked for; UINT64_MAX when the config failed to run (it
 * is never chosen). */
void tun_search_report(tun_search_t *s, uint64_t ns);

/* Runs done and runs in all (an estimate until the last stage begins). */
void tun_search_progress(const tun_search_t *s, uint32_t *done, uint32_t *total);

/* The stage in progress: its index and its configs (borrowed until the next report), so a
 * caller can prepare them all (compile a GPU's kernels) before timing; false when done. */
bool tun_search_stage(const tun_search_t *s, uint32_t *stage, const tun_cfg_t **cfgs,
                      uint32_t *n);

/* The record of a complete search: best, heuristic and worst times, configs tried; tuning_ns and
 * updated_s are the caller's to fill. AT_ERR_INTERNAL when the search is not complete or no
 * config ran. */
at_err_t tun_search_result(const tun_search_t *s, tun_record_t *r);

#endif

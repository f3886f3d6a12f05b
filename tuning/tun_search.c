/* Exhaustive search (see tun_search.h). Thread: one thread at a time.
 *
 * The heuristic is timed first and again last (its best of both counts): measured on a shared
 * 2-core VM, the first runs after a bench's fill were up to 1.8x slower than the same config
 * later, which made the heuristic look slow. A config replaces the heuristic only when it is at
 * least MIN_GAIN faster, so noise alone does not move a session off its heuristic. */
#include "tuning/tun_search.h"

#include <stdlib.h>

#define MIN_GAIN 0.03

struct tun_search {
    tun_bucket_t bucket;
    tun_cfg_t *cfgs;    /* owned; [n]; cfgs[0] is the heuristic's, and so is cfgs[n - 1] */
    uint64_t *best_ns;  /* owned; [n]; UINT64_MAX until a timed run succeeds; the last slot's
                         * times count for slot 0 */
    uint32_t n;
    uint32_t reps;
    uint32_t next;      /* runs handed out: config next / (reps + 1), run next % (reps + 1) */
};

at_err_t tun_search_create(const tun_space_t *space, const tun_shape_t *s, const tun_device_t *d,
                           const tun_bucket_t *b, uint32_t reps, tun_search_t **out) {
    tun_search_t *se = calloc(1, sizeof *se);
    if (se == NULL)
        return AT_ERR_NOMEM;
    size_t n = 0;
    at_err_t e = tun_space_enumerate(space, s, d, b, &se->cfgs, &n);
    tun_cfg_t *grown = e == AT_OK ? realloc(se->cfgs, (n + 1) * sizeof *grown) : NULL;
    if (grown != NULL) {
        se->cfgs = grown;
        se->cfgs[n] = se->cfgs[0]; /* the heuristic once more, at the end */
        n++;
    }
    if (e == AT_OK && (grown == NULL || (se->best_ns = malloc(n * sizeof *se->best_ns)) == NULL))
        e = AT_ERR_NOMEM;
    if (e != AT_OK) {
        tun_search_destroy(&se);
        return e;
    }
    for (size_t i = 0; i < n; i++)
        se->best_ns[i] = UINT64_MAX;
    se->n = (uint32_t)n;
    se->reps = reps != 0 ? reps : 3;
    se->bucket = *b;
    *out = se;
    return AT_OK;
}

void tun_search_destroy(tun_search_t **s) {
    if (s == NULL || *s == NULL)
        return;
    free((*s)->cfgs);
    free((*s)->best_ns);
    free(*s);
    *s = NULL;
}

bool tun_search_next(tun_search_t *s, tun_cfg_t *cfg, bool *warmup) {
    if (s->next >= s->n * (s->reps + 1))
        return false;
    *cfg = s->cfgs[s->next / (s->reps + 1)];
    *warmup = s->next % (s->reps + 1) == 0;
    return true;
}

void tun_search_report(tun_search_t *s, uint64_t ns) {
    uint32_t i = s->next / (s->reps + 1);
    if (i >= s->n)
        return;
    bool warmup = s->next % (s->reps + 1) == 0;
    if (ns == UINT64_MAX) { /* a config that fails is skipped whole */
        s->best_ns[i] = i == s->n - 1 ? s->best_ns[i] : UINT64_MAX;
        s->next = (i + 1) * (s->reps + 1);
        return;
    }
    uint32_t slot = i == s->n - 1 ? 0 : i;
    if (!warmup && ns < s->best_ns[slot])
        s->best_ns[slot] = ns;
    s->next++;
}

void tun_search_progress(const tun_search_t *s, uint32_t *done, uint32_t *total) {
    *done = s->next;
    *total = s->n * (s->reps + 1);
}

at_err_t tun_search_result(const tun_search_t *s, tun_record_t *r) {
    if (s->next < s->n * (s->reps + 1))
        return AT_ERR_INTERNAL;
    uint32_t best = s->n, worst = s->n, tried = 0;
    for (uint32_t i = 0; i + 1 < s->n; i++) {
        if (s->best_ns[i] == UINT64_MAX)
            continue;
        tried++;
        if (best == s->n || s->best_ns[i] < s->best_ns[best])
            best = i;
        if (worst == s->n || s->best_ns[i] > s->best_ns[worst])
            worst = i;
    }
    if (best == s->n || s->best_ns[0] == UINT64_MAX)
        return AT_ERR_INTERNAL; /* the heuristic itself did not run: nothing to compare with */
    if ((double)s->best_ns[best] > (1.0 - MIN_GAIN) * (double)s->best_ns[0])
        best = 0;
    *r = (tun_record_t){
        .bucket = s->bucket,
        .best = s->cfgs[best],
        .best_ns = s->best_ns[best],
        .heuristic_ns = s->best_ns[0],
        .worst = s->cfgs[worst],
        .worst_ns = s->best_ns[worst],
        .tried = tried,
    };
    return AT_OK;
}

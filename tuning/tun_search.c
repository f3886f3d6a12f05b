/* A search over a config space (see tun_search.h). Thread: one thread at a time.
 *
 * In stages (tun_space_t.stages; one stage of every parameter when a space has none): a stage
 * times every valid combination of its parameters with the others fixed at the best so far, its
 * base first; the best of a stage is the next stage's base. A stage's configs are listed when it
 * begins, so the progress total is an estimate until the last stage (each later stage counted
 * around the heuristic).
 *
 * The heuristic is timed first and again last (its best of both counts): measured on a shared
 * 2-core VM, the first runs after a bench's fill were up to 1.8x slower than the same config
 * later, which made the heuristic look slow. A config replaces a stage's base only when it is at
 * least MIN_GAIN faster, so noise alone does not move a session off its heuristic. */
#include "tuning/tun_search.h"

#include <stdlib.h>

#define MIN_GAIN 0.03

struct tun_search {
    const tun_space_t *space;  /* borrowed: spaces are constant */
    tun_shape_t shape;
    tun_device_t dev;
    tun_bucket_t bucket;
    uint32_t masks[TUN_MAX_PARAMS];
    uint32_t est[TUN_MAX_PARAMS]; /* configs per stage: an estimate until the stage begins */
    uint32_t n_stages;
    uint32_t stage;            /* the stage in progress; n_stages when done */
    tun_cfg_t heuristic;
    uint64_t heuristic_ns;     /* its best timed run, first or last */
    /* the stage in progress */
    tun_cfg_t *cfgs;           /* owned; [n]; cfgs[0] is the base; in the last stage
                                * cfgs[n - 1] is the heuristic again */
    uint64_t *best_ns;         /* owned; [n]; UINT64_MAX until a timed run succeeds */
    uint32_t n;
    uint32_t next;             /* runs handed out: config next / (reps + 1), run next % (reps + 1) */
    uint32_t reps;
    uint32_t runs_before;      /* runs of the finished stages */
    /* over all stages */
    tun_cfg_t worst;
    uint64_t worst_ns;
    uint32_t tried;
    bool failed;               /* a stage's base did not run: nothing to compare with */
};

/* Lists stage `stage` around base; the last stage gets the heuristic once more at its end. */
static at_err_t stage_begin(tun_search_t *se, const tun_cfg_t *base) {
    free(se->cfgs);
    free(se->best_ns);
    se->cfgs = NULL;
    se->best_ns = NULL;
    size_t n = 0;
    at_err_t e = tun_space_enumerate_from(se->space, &se->shape, &se->dev, base,
                                          se->masks[se->stage], &se->cfgs, &n);
    if (e != AT_OK)
        return e;
    if (se->stage + 1 == se->n_stages) {
        tun_cfg_t *grown = realloc(se->cfgs, (n + 1) * sizeof *grown);
        if (grown == NULL)
            return AT_ERR_NOMEM;
        se->cfgs = grown;
        se->cfgs[n++] = se->heuristic;
    }
    if ((se->best_ns = malloc(n * sizeof *se->best_ns)) == NULL)
        return AT_ERR_NOMEM;
    for (size_t i = 0; i < n; i++)
        se->best_ns[i] = UINT64_MAX;
    se->n = (uint32_t)n;
    se->est[se->stage] = (uint32_t)n;
    se->next = 0;
    return AT_OK;
}

at_err_t tun_search_create(const tun_space_t *space, const tun_shape_t *s, const tun_device_t *d,
                           const tun_bucket_t *b, uint32_t reps, tun_search_t **out) {
    tun_search_t *se = calloc(1, sizeof *se);
    if (se == NULL)
        return AT_ERR_NOMEM;
    se->space = space;
    se->shape = *s;
    se->dev = *d;
    se->bucket = *b;
    se->reps = reps != 0 ? reps : 3;
    space->heuristic(s, d, b, &se->heuristic);
    se->heuristic_ns = UINT64_MAX;
    if (space->stages != NULL) {
        se->n_stages = space->stages(s, b, se->masks);
    } else {
        se->n_stages = 1;
        se->masks[0] = space->n_params >= 32 ? ~0u : (1u << space->n_params) - 1u;
    }
    at_err_t e = AT_OK;
    for (uint32_t i = 1; i < se->n_stages && e == AT_OK; i++) {
        tun_cfg_t *list = NULL;
        size_t n = 0;
        e = tun_space_enumerate_from(space, s, d, &se->heuristic, se->masks[i], &list, &n);
        se->est[i] = (uint32_t)n + (i + 1 == se->n_stages);
        free(list);
    }
    if (e == AT_OK)
        e = stage_begin(se, &se->heuristic);
    if (e != AT_OK) {
        tun_search_destroy(&se);
        return e;
    }
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
    if (s->stage >= s->n_stages || s->next >= s->n * (s->reps + 1))
        return false;
    *cfg = s->cfgs[s->next / (s->reps + 1)];
    *warmup = s->next % (s->reps + 1) == 0;
    return true;
}

/* Closes the stage in progress: its times join the record's, its best is the next base. */
static void stage_end(tun_search_t *s) {
    const bool last = s->stage + 1 == s->n_stages;
    const uint32_t ranked = last ? s->n - 1 : s->n; /* the heuristic's rerun counts below */
    if (s->stage == 0)
        s->heuristic_ns = s->best_ns[0];
    if (last && s->best_ns[s->n - 1] < s->heuristic_ns)
        s->heuristic_ns = s->best_ns[s->n - 1];
    uint32_t best = 0;
    for (uint32_t i = 0; i < ranked; i++) {
        if (s->best_ns[i] == UINT64_MAX)
            continue;
        /* a base retimed in a later stage is not a new config */
        s->tried += i != 0 || s->stage == 0;
        if (s->worst_ns == 0 || s->best_ns[i] > s->worst_ns) {
            s->worst_ns = s->best_ns[i];
            s->worst = s->cfgs[i];
        }
        if (s->best_ns[i] < s->best_ns[best])
            best = i;
    }
    if (s->best_ns[0] == UINT64_MAX)
        s->failed = true;
    else if ((double)s->best_ns[best] > (1.0 - MIN_GAIN) * (double)s->best_ns[0])
        best = 0;
    s->runs_before += s->n * (s->reps + 1);
    const tun_cfg_t base = s->cfgs[best];
    const uint64_t base_ns = s->best_ns[best];
    s->stage++;
    if (s->stage < s->n_stages && !s->failed && stage_begin(s, &base) != AT_OK)
        s->failed = true;
    if (s->stage >= s->n_stages || s->failed) {
        s->stage = s->n_stages;
        /* the winner stays in cfgs[0] for tun_search_result */
        s->cfgs[0] = base;
        s->best_ns[0] = base_ns;
    }
}

void tun_search_report(tun_search_t *s, uint64_t ns) {
    if (s->stage >= s->n_stages)
        return;
    uint32_t i = s->next / (s->reps + 1);
    bool warmup = s->next % (s->reps + 1) == 0;
    if (ns == UINT64_MAX) /* a config that fails is skipped whole */
        s->next = (i + 1) * (s->reps + 1);
    else {
        if (!warmup && ns < s->best_ns[i])
            s->best_ns[i] = ns;
        s->next++;
    }
    if (s->next >= s->n * (s->reps + 1))
        stage_end(s);
}

void tun_search_progress(const tun_search_t *s, uint32_t *done, uint32_t *total) {
    uint32_t configs = 0;
    for (uint32_t i = 0; i < s->n_stages; i++)
        configs += s->est[i];
    *total = configs * (s->reps + 1);
    *done = s->stage >= s->n_stages ? *total : s->runs_before + s->next;
}

bool tun_search_stage(const tun_search_t *s, uint32_t *stage, const tun_cfg_t **cfgs,
                      uint32_t *n) {
    if (s->stage >= s->n_stages)
        return false;
    *stage = s->stage;
    *cfgs = s->cfgs;
    *n = s->n;
    return true;
}

at_err_t tun_search_result(const tun_search_t *s, tun_record_t *r) {
    if (s->stage < s->n_stages || s->failed || s->heuristic_ns == UINT64_MAX)
        return AT_ERR_INTERNAL; /* not done, or the heuristic did not run: nothing to compare */
    tun_cfg_t best = s->cfgs[0];
    uint64_t best_ns = s->best_ns[0];
    if ((double)best_ns > (1.0 - MIN_GAIN) * (double)s->heuristic_ns) {
        best = s->heuristic;
        best_ns = s->heuristic_ns;
    }
    *r = (tun_record_t){
        .bucket = s->bucket,
        .best = best,
        .best_ns = best_ns,
        .heuristic_ns = s->heuristic_ns,
        .worst = s->worst,
        .worst_ns = s->worst_ns,
        .tried = s->tried,
    };
    return AT_OK;
}

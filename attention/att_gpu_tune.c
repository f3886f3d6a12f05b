/* Tuning support shared by the GPU backends (see att_gpu_tune.h).
 *
 * Thread model: the compile queue's ring, thread list and stop flag are guarded by its mutex;
 * its threads take one entry at a time and compile it unlocked (att_jit_image is thread-safe);
 * att_gpu_cq_fini joins them. A module table is its session's, on one thread at a time. */
#include "attention/att_gpu_tune.h"

#include <stdlib.h>
#include <string.h>

#include "attention/att_tune.h"

/* ---- the compile queue ---- */

static void *compiler_run(void *arg) {
    att_gpu_cq_t *q = arg;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        while (!q->stop && q->len == 0)
            pthread_cond_wait(&q->cv, &q->mu);
        if (q->stop)
            break;
        att_jit_opts_t o = q->queue[q->head];
        q->head = (q->head + 1) % ATT_GPU_COMPILE_QUEUE;
        q->len--;
        pthread_mutex_unlock(&q->mu);
        for (uint32_t i = 0; i < o.n; i++)
            o.ptr[i] = o.text[i];
        size_t bytes;
        /* a failure is logged by att_jit and remembered there: set_tuning then refuses it */
        (void)att_jit_image(q->jit, att_jit_opts_arch(&o, q->arch), o.ptr, o.n, NULL, &bytes, NULL,
                            NULL);
        pthread_mutex_lock(&q->mu);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

void att_gpu_cq_init(att_gpu_cq_t *q, att_jit_t *jit, const char *arch, att_gpu_opts_fn opts,
                     const void *user, uint32_t n_threads) {
    memset(q, 0, sizeof *q);
    q->jit = jit;
    q->arch = arch;
    q->opts = opts;
    q->user = user;
    q->n_threads = n_threads == 0                      ? 1
                   : n_threads > ATT_GPU_MAX_COMPILERS ? ATT_GPU_MAX_COMPILERS
                                                       : n_threads;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
}

void att_gpu_cq_fini(att_gpu_cq_t *q) {
    if (q->jit == NULL)
        return;
    pthread_mutex_lock(&q->mu);
    q->stop = true;
    pthread_cond_broadcast(&q->cv);
    const uint32_t n = q->n_started;
    pthread_mutex_unlock(&q->mu);
    for (uint32_t i = 0; i < n; i++)
        pthread_join(q->threads[i], NULL);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    q->jit = NULL;
}

void att_gpu_cq_opts(const att_gpu_cq_t *q, const att_model_t *m, const att_tile_t *t,
                     att_jit_opts_t *o) {
    memset(o, 0, sizeof *o);
    q->opts(q->user, m, t, o);
}

/* Queues a compile of o (unless it is queued already) and starts the compile threads on first
 * use. */
static void compile_later(att_gpu_cq_t *q, const att_jit_opts_t *o) {
    pthread_mutex_lock(&q->mu);
    bool queued = false;
    for (uint32_t i = 0; i < q->len && !queued; i++)
        queued = memcmp(q->queue[(q->head + i) % ATT_GPU_COMPILE_QUEUE].text, o->text,
                        sizeof o->text) == 0;
    if (!queued && q->len < ATT_GPU_COMPILE_QUEUE) {
        q->queue[(q->head + q->len) % ATT_GPU_COMPILE_QUEUE] = *o;
        q->len++;
        pthread_cond_signal(&q->cv);
    }
    while (q->n_started < q->n_threads &&
           pthread_create(&q->threads[q->n_started], NULL, compiler_run, q) == 0)
        q->n_started++;
    pthread_mutex_unlock(&q->mu);
}

/* The image of tile t for m from the compile cache (*img malloc'd, the caller's; img NULL: none
 * wanted); AT_ERR_NOT_READY after queueing its compile, AT_ERR_UNSUPPORTED when an earlier
 * compile of it failed. */
static at_err_t cq_lookup(att_gpu_cq_t *q, const att_model_t *m, const att_tile_t *t, void **img,
                          size_t *bytes) {
    att_jit_opts_t o;
    att_gpu_cq_opts(q, m, t, &o);
    at_err_t e = att_jit_lookup(q->jit, att_jit_opts_arch(&o, q->arch), o.ptr, o.n, img, bytes);
    if (e == AT_ERR_NOT_READY)
        compile_later(q, &o);
    return e;
}

at_err_t att_gpu_cq_prepare(att_gpu_cq_t *q, const att_model_t *m,
                            void (*from_cfg)(const tun_cfg_t *c, att_cuda_plan_t *out),
                            const tun_cfg_t *cfgs, uint32_t n, bool wait) {
    at_err_t first = AT_OK;
    for (uint32_t i = 0; i < n; i++) {
        att_cuda_plan_t plan;
        from_cfg(&cfgs[i], &plan);
        for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
            if (!wait) {
                size_t bytes;
                (void)cq_lookup(q, m, &plan.tile[k], NULL, &bytes);
                continue;
            }
            att_jit_opts_t o;
            size_t bytes;
            at_diag_t d = {{0}};
            att_gpu_cq_opts(q, m, &plan.tile[k], &o);
            at_err_t e = att_jit_image(q->jit, att_jit_opts_arch(&o, q->arch), o.ptr, o.n, NULL,
                                       &bytes, NULL, &d);
            first = first == AT_OK ? e : first;
        }
    }
    return first;
}

/* ---- a session's loaded modules ---- */

void att_gpu_mods_init(att_gpu_mods_t *s, const att_gpu_loader_t *ld, att_kv_t *kv, lc_t *lc) {
    memset(s, 0, sizeof *s);
    s->ld = ld;
    s->kv = kv;
    s->lc = lc;
}

void att_gpu_mods_fini(att_gpu_mods_t *s) {
    for (uint32_t i = 0; i < ATT_GPU_MOD_SLOTS; i++)
        if (s->slot[i].mod != NULL)
            s->ld->unload(s->kv, s->slot[i].mod);
    memset(s->slot, 0, sizeof s->slot);
}

void att_gpu_mods_forget(att_gpu_mods_t *s) {
    for (uint32_t i = 0; i < ATT_GPU_MOD_SLOTS; i++)
        if (s->slot[i].mod != NULL && s->ld->forget != NULL)
            s->ld->forget(s->kv, s->slot[i].mod);
    memset(s->slot, 0, sizeof s->slot);
}

/* Loads img into slot i (free) as kind with tile t. */
static at_err_t load_slot(att_gpu_mods_t *s, uint32_t i, uint32_t kind, const att_tile_t *t,
                          const void *img, size_t bytes, at_diag_t *diag) {
    att_gpu_mod_t ms = {.kind = kind, .tile = *t, .used = s->switches};
    at_err_t e = s->ld->load(s->kv, img, bytes, &ms, diag);
    if (e == AT_OK)
        s->slot[i] = ms;
    return e;
}

at_err_t att_gpu_mods_load_first(att_gpu_mods_t *s, uint32_t kind, const att_tile_t *t,
                                 const att_gpu_fetch_t *f, at_diag_t *diag) {
    if (f->err != AT_OK) {
        if (diag != NULL)
            *diag = f->diag;
        return f->err;
    }
    if (f->compiled)
        lc_note_compile(s->lc);
    s->cur[kind] = kind;
    return load_slot(s, kind, kind, t, f->img, f->bytes, diag);
}

const att_gpu_mod_t *att_gpu_mods_cur(const att_gpu_mods_t *s, uint32_t kind) {
    return &s->slot[s->cur[kind]];
}

/* The slot of (kind, tile), or ATT_GPU_MOD_SLOTS. */
static uint32_t find_slot(const att_gpu_mods_t *s, uint32_t kind, const att_tile_t *t) {
    for (uint32_t i = 0; i < ATT_GPU_MOD_SLOTS; i++)
        if (s->slot[i].mod != NULL && s->slot[i].kind == kind &&
            memcmp(&s->slot[i].tile, t, sizeof *t) == 0)
            return i;
    return ATT_GPU_MOD_SLOTS;
}

/* A slot to load into: a free one, else the least recently chosen that is not current nor
 * `keep` (unloaded, and its prepared launches forgotten). */
static uint32_t free_slot(att_gpu_mods_t *s, uint32_t keep) {
    uint32_t victim = ATT_GPU_MOD_SLOTS;
    for (uint32_t i = 0; i < ATT_GPU_MOD_SLOTS; i++) {
        if (s->slot[i].mod == NULL)
            return i;
        if (i == s->cur[ATT_TILE_WIDE] || i == s->cur[ATT_TILE_NARROW] || i == keep)
            continue;
        if (victim == ATT_GPU_MOD_SLOTS || s->slot[i].used < s->slot[victim].used)
            victim = i;
    }
    s->ld->unload(s->kv, s->slot[victim].mod); /* no run is in flight (set_tuning) */
    memset(&s->slot[victim], 0, sizeof s->slot[victim]);
    lc_forget_tile(s->lc, victim);
    return victim;
}

at_err_t att_gpu_mods_switch(att_gpu_mods_t *s, att_gpu_cq_t *q, const att_model_t *m,
                             const att_tile_t tiles[ATT_TILE_KINDS]) {
    /* Both kinds' images first, so a missing one leaves the session as it was; every missing
     * one is queued before answering NOT_READY, so both compile meanwhile. */
    uint32_t slot[ATT_TILE_KINDS];
    void *img[ATT_TILE_KINDS] = {NULL, NULL}; /* the images to load, ours */
    size_t bytes[ATT_TILE_KINDS] = {0, 0};
    at_err_t missing = AT_OK;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        if ((slot[k] = find_slot(s, k, &tiles[k])) != ATT_GPU_MOD_SLOTS)
            continue;
        at_err_t e = cq_lookup(q, m, &tiles[k], &img[k], &bytes[k]);
        if (e != AT_OK && missing != AT_ERR_CONFIG)
            missing = e == AT_ERR_UNSUPPORTED ? AT_ERR_CONFIG : e;
    }
    for (uint32_t k = 0; k < ATT_TILE_KINDS && missing == AT_OK; k++) {
        if (img[k] == NULL)
            continue;
        /* keep the other kind's slot: loaded just now, or found loaded but not current (an
         * eviction of it would leave that kind's current slot holding this kind's module) */
        slot[k] = free_slot(s, slot[1u - k]);
        at_err_t e = load_slot(s, slot[k], k, &tiles[k], img[k], bytes[k], NULL);
        if (e != AT_OK)
            missing = e == AT_ERR_UNSUPPORTED ? AT_ERR_CONFIG : e;
    }
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        free(img[k]);
    if (missing != AT_OK)
        return missing;
    s->switches++;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        s->cur[k] = slot[k];
        s->slot[slot[k]].used = s->switches;
    }
    return AT_OK;
}

at_err_t att_gpu_set_tuning(att_gpu_mods_t *s, att_gpu_cq_t *q, const tun_space_t *space,
                            const tun_device_t *d, const att_model_t *m, const tun_cfg_t *cfg,
                            void (*from_cfg)(const tun_cfg_t *c, att_cuda_plan_t *out),
                            att_cuda_plan_t *plan, att_cuda_plan_t *cur) {
    if (cfg != NULL) {
        tun_shape_t sh;
        att_tune_shape(m, &sh);
        if (!tun_cfg_valid(space, cfg, &sh, d))
            return AT_ERR_CONFIG;
        from_cfg(cfg, plan);
    }
    at_err_t e = att_gpu_mods_switch(s, q, m, plan->tile);
    if (e == AT_OK)
        *cur = *plan;
    return e;
}

at_err_t att_gpu_mods_prepared(const att_gpu_mods_t *s, const att_model_t *m, uint64_t consts_d,
                               uint32_t num_blocks, uint32_t kernel, uint32_t kind, uint32_t split,
                               const lc_launch_t **out) {
    const att_gpu_mod_t *ms = att_gpu_mods_cur(s, kind);
    const uint32_t key = LC_KEY(kernel, s->cur[kind], split);
    const lc_launch_t *l = lc_lookup(s->lc, key);
    if (l != NULL) {
        *out = l;
        return AT_OK;
    }
    void *fn = kernel == ATT_GPU_K_ATTEND ? ms->f_attend : ms->f_kv_write;
    lc_launch_t n;
    att_gpu_launch_init(&n, key, m, kernel, ms->info, fn, consts_d, num_blocks);
    return lc_insert(s->lc, &n, out);
}

/* What the GPU backends do alike without a driver call (see att_gpu_run.h).
 * Thread model: regions are guarded by their mutex; the rest works on the caller's data. */
#include "attention/att_gpu_run.h"

#include <stdlib.h>
#include <string.h>

#include "attention/att_dtype.h"

/* ---- launches ---- */

void att_gpu_launch_init(lc_launch_t *n, uint32_t key, const att_model_t *m, uint32_t kernel,
                         const uint32_t info[ATT_KINFO_COUNT], void *fn, uint64_t consts_d,
                         uint32_t num_blocks) {
    memset(n, 0, sizeof *n);
    n->key = key;
    n->fn = fn;
    n->grid_per_unit = m->num_kv_heads;
    n->param_bytes = sizeof(att_kparams_t);
    switch (kernel) {
    case ATT_GPU_K_ATTEND:
        n->block_x = info[ATT_KINFO_THREADS];
        n->smem_bytes = info[ATT_KINFO_SMEM_BYTES];
        break;
    default: n->block_x = info[ATT_KINFO_KVW_THREADS]; break;
    }
    att_kparams_t t;
    memset(&t, 0, sizeof t);
    t.scale = m->scale;
    t.soft_cap = m->soft_cap;
    t.alibi_d = m->alibi != NULL ? consts_d : 0;
    t.sinks_d = m->sinks != NULL ? consts_d + (uint64_t)m->num_query_heads * 4 : 0;
    t.num_blocks = num_blocks;
    memcpy(n->params, &t, sizeof t);
}

/* Patches the call's values that every kernel of it takes from base into p. */
static void patch_call(att_kparams_t *p, const att_kparams_t *base) {
    p->k_d = base->k_d;
    p->v_d = base->v_d;
    p->k_cache_d = base->k_cache_d;
    p->v_cache_d = base->v_cache_d;
    p->chunks_d = base->chunks_d;
    p->block_table_d = base->block_table_d;
    p->new_table_d = base->new_table_d;
    p->num_chunks = base->num_chunks;
}

uint32_t att_gpu_launch_order(const att_cuda_plan_t *plan, uint32_t i) {
    const uint32_t first =
        plan->mixed_order == ATT_CUDA_WIDE_FIRST ? ATT_TILE_WIDE : ATT_TILE_NARROW;
    return i == 0 ? first : 1u - first;
}

at_err_t att_gpu_launch_kind(lc_t *lc, att_gpu_prepared_fn prepared, att_kv_t *kv,
                             const att_kparams_t *base, const att_gpu_counts_t *pl,
                             const att_gpu_layout_t *lo, uint64_t io_d, uint32_t kind,
                             uint32_t sm_split, uint32_t blocks) {
    if (pl->num_items[kind] == 0)
        return AT_OK;
    const uint32_t split = pl->num_merges[kind] != 0;
    const lc_launch_t *l;
    at_err_t e = prepared(kv, ATT_GPU_K_ATTEND, kind, split, &l);
    if (e != AT_OK)
        return e;
    /* Items and merges are laid out wide first (att_gpu_plan_batch's kind order). */
    const size_t before_items = kind == ATT_TILE_WIDE ? 0 : pl->num_items[ATT_TILE_WIDE];
    const size_t before_merges = kind == ATT_TILE_WIDE ? 0 : pl->num_merges[ATT_TILE_WIDE];
    att_kparams_t p;
    memcpy(&p, l->params, sizeof p);
    patch_call(&p, base);
    p.q_d = base->q_d;
    p.out_d = base->out_d;
    p.window = base->window;
    p.items_d = io_d + lo->o_items + before_items * sizeof(att_kitem_t);
    p.num_items = pl->num_items[kind];
    p.merges_d = io_d + lo->o_merges + before_merges * sizeof(att_kmerge_t);
    p.num_merges = pl->num_merges[kind];
    p.part_o_d = io_d + lo->o_po[kind];
    p.part_ml_d = io_d + lo->o_pml[kind];
    p.counters_d = base->counters_d + before_merges * l->grid_per_unit * sizeof(uint32_t);
    p.sm_split = sm_split;
    const uint32_t units =
        sm_split == 0 ? p.num_items : (blocks + l->grid_per_unit - 1) / l->grid_per_unit;
    return lc_launch(lc, l, units, &p);
}

at_err_t att_gpu_launch_kv_write(lc_t *lc, att_gpu_prepared_fn prepared, att_kv_t *kv,
                                 const att_kparams_t *base, uint32_t num_chunks) {
    const lc_launch_t *l;
    at_err_t e = prepared(kv, ATT_GPU_K_KV_WRITE, ATT_TILE_WIDE, 0, &l);
    if (e != AT_OK)
        return e;
    att_kparams_t q;
    memcpy(&q, l->params, sizeof q);
    patch_call(&q, base);
    return lc_launch(lc, l, num_chunks, &q);
}

/* ---- a session's device-resident block tables ---- */

uint32_t att_gpu_tables_initial(uint32_t num_blocks) {
    const uint64_t n = (uint64_t)num_blocks * 4 + 1024;
    return n < UINT32_MAX / 2 ? (uint32_t)n : UINT32_MAX / 2;
}

void att_gpu_tables_fini(att_gpu_tables_t *t) {
    free(t->seq);
    free(t->call);
    memset(t, 0, sizeof *t);
}

void att_gpu_tables_reset(att_gpu_tables_t *t) {
    if (t->seq != NULL)
        memset(t->seq, 0, t->cap_seq * sizeof *t->seq);
    t->top = 0;
}

/* Room for a table of nb entries and the blocks it will append: twice nb, whole 64-byte lines. */
static uint64_t region_entries(uint32_t nb) { return ((uint64_t)nb * 2 + 15) / 16 * 16; }

/* Grows t->seq to hold slot (new entries: no copy). */
static at_err_t tables_reserve(att_gpu_tables_t *t, uint32_t slot) {
    if (slot < t->cap_seq)
        return AT_OK;
    uint32_t cap = t->cap_seq != 0 ? t->cap_seq : 64;
    while (cap <= slot)
        cap = cap > UINT32_MAX / 2 ? UINT32_MAX : cap * 2;
    att_gpu_seqtab_t *p = realloc(t->seq, (size_t)cap * sizeof *p);
    if (p == NULL)
        return AT_ERR_NOMEM;
    memset(p + t->cap_seq, 0, (size_t)(cap - t->cap_seq) * sizeof *p);
    t->seq = p;
    t->cap_seq = cap;
    return AT_OK;
}

uint32_t att_gpu_tables_keep_tokens(const att_model_t *m, const att_batch_t *b,
                                    uint32_t narrow_rows) {
    return b->attend ? narrow_rows / m->group : UINT32_MAX;
}

/* Places b's tables in an arena of arena_cap entries (see att_gpu_tables_place). *need is 0 when
 * placed; else the entries they take in an empty arena, and the copies are forgotten. */
static at_err_t place_in(att_gpu_tables_t *t, const att_batch_t *b, uint32_t block_size,
                         uint32_t keep_tokens, uint32_t arena_cap, uint32_t *need) {
    *need = 0;
    bool was_reset = false;
place:
    t->new_entries = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        att_gpu_chunktab_t *ct = &t->call[c];
        const uint32_t nb = ch->num_blocks;
        *ct = (att_gpu_chunktab_t){0, 0, 0, 0};
        t->new_entries += nb;
        if (ch->table_stamp == 0 || nb == 0)
            continue;
        /* sent with the kept ones: from the first new position's block on (the KV write's) */
        const uint32_t first_new = ch->start_pos / block_size;
        const uint32_t keep = ch->num_tokens <= keep_tokens ? ATT_KCHUNK_KEEP_TABLE : 0u;
        at_err_t e = tables_reserve(t, ch->table_slot);
        if (e != AT_OK)
            return e;
        att_gpu_seqtab_t *s = &t->seq[ch->table_slot];
        /* The kernels read cached keys' entries from the copy whenever it holds any. */
        const uint32_t cached = (uint32_t)(((uint64_t)ch->start_pos + block_size - 1) / block_size);
        if (s->stamp == ch->table_stamp && nb <= s->cap && s->n <= nb &&
            (s->n == 0 || s->n >= cached)) {
            const uint32_t from = s->n < first_new ? s->n : first_new;
            *ct = (att_gpu_chunktab_t){s->off, s->n, from, s->n < nb ? keep : 0u};
            t->new_entries -= from;
            continue;
        }
        const uint64_t cap = region_entries(nb);
        if (cap > (uint64_t)arena_cap - t->top) {
            if (!was_reset) {
                att_gpu_tables_reset(t);
                was_reset = true;
                goto place;
            }
            uint64_t total = 0;
            for (uint32_t d = 0; d < b->num_chunks; d++)
                total += b->chunks[d].table_stamp != 0 ? region_entries(b->chunks[d].num_blocks)
                                                       : 0;
            att_gpu_tables_reset(t);
            /* past 32-bit offsets no arena can take them; else an arena of *need holds them
             * all, so the second placement cannot leave call[] half filled */
            if (total > UINT32_MAX)
                return AT_ERR_INTERNAL;
            *need = (uint32_t)total;
            return AT_OK;
        }
        *s = (att_gpu_seqtab_t){.stamp = ch->table_stamp, .off = t->top, .cap = (uint32_t)cap};
        t->top += (uint32_t)cap;
        *ct = (att_gpu_chunktab_t){s->off, 0, 0, keep};
    }
    return AT_OK;
}

at_err_t att_gpu_tables_place(att_gpu_tables_t *t, const att_batch_t *b, uint32_t block_size,
                              uint32_t keep_tokens, uint32_t *arena_cap, att_gpu_arena_fn replace,
                              void *user) {
    if (b->num_chunks > t->cap_call) {
        att_gpu_chunktab_t *p = realloc(t->call, (size_t)b->num_chunks * sizeof *p);
        if (p == NULL)
            return AT_ERR_NOMEM;
        t->call = p;
        t->cap_call = b->num_chunks;
    }
    uint32_t need;
    at_err_t e = place_in(t, b, block_size, keep_tokens, *arena_cap, &need);
    if (e != AT_OK || need == 0)
        return e;
    const uint32_t cap = need < UINT32_MAX / 2 ? 2 * need : UINT32_MAX;
    *arena_cap = 0;
    if ((e = replace(user, cap)) != AT_OK)
        return e;
    *arena_cap = cap;
    /* an empty arena that holds them all: every chunk is placed */
    return place_in(t, b, block_size, keep_tokens, cap, &need);
}

void att_gpu_tables_commit(att_gpu_tables_t *t, const att_batch_t *b) {
    for (uint32_t c = 0; c < b->num_chunks; c++)
        if (t->call[c].flags & ATT_KCHUNK_KEEP_TABLE)
            t->seq[b->chunks[c].table_slot].n = b->chunks[c].num_blocks;
}

/* ---- a run's buffers ---- */

void att_gpu_layout(const att_model_t *m, const att_batch_t *b, const att_gpu_counts_t *pl,
                    const uint32_t tile_rows[ATT_TILE_KINDS], size_t new_entries,
                    att_gpu_layout_t *out) {
    const size_t es = att_dtype_bytes(m->dtype);
    const size_t q_row = (size_t)m->num_query_heads * m->head_dim * es;
    const size_t kv_row = (size_t)m->num_kv_heads * m->head_dim * es;
    const size_t T = b->total_tokens;
    att_gpu_layout_t *o = out;
    o->o_chunks = 0;
    o->o_table = att_gpu_align_up(o->o_chunks + b->num_chunks * sizeof(att_kchunk_t), 16);
    o->o_items = att_gpu_align_up(o->o_table + new_entries * sizeof(uint32_t), 16);
    o->o_merges = att_gpu_align_up(o->o_items + pl->total_items * sizeof(att_kitem_t), 16);
    o->meta_end = o->o_merges + pl->total_merges * sizeof(att_kmerge_t);
    o->o_q = att_gpu_align_up(o->meta_end, 256);
    o->o_k = att_gpu_align_up(o->o_q + (b->attend ? T * q_row : 0), 256);
    o->o_v = att_gpu_align_up(o->o_k + T * kv_row, 256);
    o->o_out = att_gpu_align_up(o->o_v + T * kv_row, 256);
    o->stage_end = o->o_out + (b->attend ? T * q_row : 0);
    o->end = att_gpu_align_up(o->stage_end, 256);
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        const size_t rows = (size_t)pl->num_parts[k] * m->num_kv_heads * tile_rows[k];
        o->o_po[k] = o->end;
        o->o_pml[k] = att_gpu_align_up(o->o_po[k] + rows * m->head_dim * 4, 256);
        o->end = att_gpu_align_up(o->o_pml[k] + rows * 8, 256);
    }
}

void att_gpu_fill_meta(uint8_t *stage, const att_gpu_layout_t *lo, const att_batch_t *b,
                       const att_gpu_tables_t *t, const att_gpu_work_t *w,
                       const att_gpu_counts_t *pl) {
    att_kchunk_t *kc = (att_kchunk_t *)(stage + lo->o_chunks);
    uint32_t *table = (uint32_t *)(stage + lo->o_table);
    uint32_t t_off = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        const att_gpu_chunktab_t *ct = &t->call[c];
        kc[c] = (att_kchunk_t){ch->token_offset, ch->start_pos, ch->num_tokens, ct->off,
                               ct->mirrored, t_off, ch->num_blocks, ct->flags};
        memcpy(table + t_off, ch->blocks + ct->from,
               (ch->num_blocks - ct->from) * sizeof(uint32_t));
        t_off += ch->num_blocks - ct->from;
    }
    /* an append-only batch plans nothing: a session that has not attended yet has no arrays */
    if (pl->total_items != 0)
        memcpy(stage + lo->o_items, w->items, pl->total_items * sizeof(att_kitem_t));
    if (pl->total_merges != 0)
        memcpy(stage + lo->o_merges, w->merges, pl->total_merges * sizeof(att_kmerge_t));
}

void att_gpu_run_params(const att_model_t *m, const att_batch_t *b, const att_gpu_layout_t *lo,
                        uint64_t io_d, uint64_t tables_d, uint64_t pool_d,
                        size_t layer_half_bytes, att_kparams_t *out) {
    const uint64_t layer_k = pool_d + 2 * (uint64_t)b->layer * layer_half_bytes;
    att_kparams_t *p = out;
    memset(p, 0, sizeof *p);
    p->q_d = b->attend ? io_d + lo->o_q : 0;
    p->k_d = io_d + lo->o_k;
    p->v_d = io_d + lo->o_v;
    p->out_d = b->attend ? io_d + lo->o_out : 0;
    p->k_cache_d = layer_k;
    p->v_cache_d = layer_k + layer_half_bytes;
    p->chunks_d = io_d + lo->o_chunks;
    p->block_table_d = tables_d;
    p->new_table_d = io_d + lo->o_table;
    p->window = m->window[b->layer];
    p->num_chunks = b->num_chunks;
}

/* ---- tensors ---- */

const void *att_gpu_chunk_ptr(const att_batch_chunk_t *c, int which) {
    switch (which) {
    case 0: return c->q;
    case 1: return c->k;
    case 2: return c->v;
    default: return c->out;
    }
}

uint32_t att_gpu_tensor_run(const att_batch_t *b, int which, size_t row_bytes, uint32_t c,
                            const uint8_t **p, size_t *bytes, size_t *off) {
    const uint8_t *first = att_gpu_chunk_ptr(&b->chunks[c], which);
    size_t n = (size_t)b->chunks[c].num_tokens * row_bytes;
    const size_t o = (size_t)b->chunks[c].token_offset * row_bytes;
    uint32_t d = c + 1;
    while (d < b->num_chunks &&
           (const uint8_t *)att_gpu_chunk_ptr(&b->chunks[d], which) == first + n &&
           (size_t)b->chunks[d].token_offset * row_bytes == o + n) {
        n += (size_t)b->chunks[d].num_tokens * row_bytes;
        d++;
    }
    *p = first;
    *bytes = n;
    *off = o;
    return d;
}

void att_gpu_regions_init(att_gpu_regions_t *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
}

void att_gpu_regions_fini(att_gpu_regions_t *r) { pthread_mutex_destroy(&r->mu); }

at_err_t att_gpu_regions_add(att_gpu_regions_t *r, void *p, size_t bytes,
                             at_err_t (*pin)(void *user, void *p, size_t bytes), void *user) {
    at_err_t e;
    pthread_mutex_lock(&r->mu);
    if (r->n == ATT_GPU_MAX_REGIONS)
        e = AT_ERR_INTERNAL;
    else if ((e = pin(user, p, bytes)) == AT_OK) {
        r->begin[r->n] = (uintptr_t)p;
        r->end[r->n] = (uintptr_t)p + bytes;
        r->n++;
    }
    pthread_mutex_unlock(&r->mu);
    return e;
}

bool att_gpu_regions_contain(att_gpu_regions_t *r, const void *p, size_t n) {
    const uintptr_t a = (uintptr_t)p;
    bool found = false;
    pthread_mutex_lock(&r->mu);
    for (uint32_t i = 0; i < r->n && !found; i++)
        found = a >= r->begin[i] && a + n <= r->end[i];
    pthread_mutex_unlock(&r->mu);
    return found;
}

const uint8_t *att_gpu_qkv_span(const att_batch_t *b, bool from_k, size_t q_row, size_t kv_row,
                                att_gpu_regions_t *r, att_gpu_layout_t *lo, size_t *bytes) {
    const int first = from_k ? 1 : 0;
    if (b->num_chunks == 0 || (!from_k && !b->attend))
        return NULL;
    const uint8_t *p[3] = {NULL, NULL, NULL};
    size_t n[3] = {0, 0, 0}, off;
    const size_t rows[3] = {q_row, kv_row, kv_row};
    for (int w = first; w < 3; w++)
        if (att_gpu_tensor_run(b, w, rows[w], 0, &p[w], &n[w], &off) != b->num_chunks || off != 0)
            return NULL;
    for (int w = first + 1; w < 3; w++)
        if ((uintptr_t)p[w] < (uintptr_t)p[w - 1] + n[w - 1] ||
            ((uintptr_t)p[w] - (uintptr_t)p[first]) % 16 != 0)
            return NULL;
    const size_t base = from_k ? lo->o_k : lo->o_q;
    const size_t dk = (uintptr_t)p[1] - (uintptr_t)p[first];
    const size_t dv = (uintptr_t)p[2] - (uintptr_t)p[first], span = dv + n[2];
    if (span > lo->o_out - base || !att_gpu_regions_contain(r, p[first], span))
        return NULL;
    lo->o_k = base + dk;
    lo->o_v = base + dv;
    *bytes = span;
    return p[first];
}

att_gpu_io_t att_gpu_io_way(const att_batch_t *b, int which, size_t row_bytes, att_gpu_regions_t *r,
                            uint64_t stage_d, uint64_t *addr_d) {
    uint32_t runs = 0, registered = 0;
    const uint8_t *first = NULL;
    size_t first_off = 0;
    for (uint32_t c = 0; c < b->num_chunks;) {
        const uint8_t *p;
        size_t n, off;
        const uint32_t d = att_gpu_tensor_run(b, which, row_bytes, c, &p, &n, &off);
        if (runs++ == 0) {
            first = p;
            first_off = off;
        }
        registered += att_gpu_regions_contain(r, p, n) ? 1 : 0;
        c = d;
    }
    if (registered == 0) {
        *addr_d = stage_d;
        return ATT_GPU_IO_STAGE;
    }
    /* the kernels index the tensor by token_offset, from 0 */
    if (runs == 1 && first_off == 0 && ((uintptr_t)first & 15u) == 0) {
        *addr_d = (uint64_t)(uintptr_t)first;
        return ATT_GPU_IO_HOST;
    }
    return ATT_GPU_IO_COPY;
}

void att_gpu_finish_out(const att_batch_t *b, size_t row_bytes, const uint8_t *stage_out,
                        att_gpu_regions_t *regs) {
    for (uint32_t c = 0; c < b->num_chunks;) {
        const uint8_t *p;
        size_t n, off;
        const uint32_t d = att_gpu_tensor_run(b, 3, row_bytes, c, &p, &n, &off);
        if (!att_gpu_regions_contain(regs, p, n))
            memcpy((uint8_t *)p, stage_out + off, n);
        c = d;
    }
}

size_t att_gpu_kv_blocks(const att_model_t *m, uint32_t pos, uint32_t n, uint32_t *b0,
                         size_t *block_bytes) {
    const uint32_t bs = m->block_size, first = pos / bs, last = (pos + n - 1) / bs;
    *b0 = first;
    *block_bytes = (size_t)m->head_dim * att_dtype_bytes(m->dtype) * bs * m->num_kv_heads;
    return (size_t)(last - first) + 1;
}

void att_gpu_scatter_kv(const att_model_t *m, const uint8_t *stage, size_t block_bytes,
                        uint32_t pos, uint32_t n, void *k_out, void *v_out) {
    const uint32_t bs = m->block_size, b0 = pos / bs;
    const size_t row = (size_t)m->head_dim * att_dtype_bytes(m->dtype);
    for (uint32_t t = 0; t < n; t++) {
        const uint32_t p = pos + t, bi = p / bs - b0;
        for (uint32_t h = 0; h < m->num_kv_heads; h++) {
            const size_t src = ((size_t)h * bs + p % bs) * row;
            const size_t dst = ((size_t)t * m->num_kv_heads + h) * row;
            memcpy((uint8_t *)k_out + dst, stage + 2 * bi * block_bytes + src, row);
            memcpy((uint8_t *)v_out + dst, stage + (2 * bi + 1) * block_bytes + src, row);
        }
    }
}

/* ---- a session ---- */

at_err_t att_gpu_consts(const att_model_t *m, float **out, size_t *bytes) {
    *out = NULL;
    *bytes = 0;
    if (m->alibi == NULL && m->sinks == NULL)
        return AT_OK;
    const size_t n = (size_t)m->num_query_heads * 4;
    float *h = calloc(2, n);
    if (h == NULL)
        return AT_ERR_NOMEM;
    if (m->alibi != NULL)
        memcpy(h, m->alibi, n);
    if (m->sinks != NULL)
        memcpy((uint8_t *)h + n, m->sinks, n);
    *out = h;
    *bytes = 2 * n;
    return AT_OK;
}

void att_gpu_kv_stats(const lc_t *lc, uint64_t uploads, uint64_t last_host_ns,
                      uint64_t last_device_ns, att_kv_stats_t *out) {
    lc_stats_t s;
    lc_get_stats(lc, &s);
    out->lc_hits = s.hits;
    out->lc_misses = s.misses;
    out->compiles = s.compiles;
    out->launches = s.launches;
    out->launch_host_ns = s.launch_host_ns;
    out->uploads = uploads;
    out->last_host_ns = last_host_ns;
    out->last_device_ns = last_device_ns;
}

/* ---- a new session's images ---- */

typedef struct fetch_arg {
    att_jit_t *jit;
    const char *arch;
    att_gpu_fetch_t *f;
} fetch_arg_t;

static void *fetch_run(void *arg) {
    fetch_arg_t *a = arg;
    att_gpu_fetch_t *f = a->f;
    f->err = att_jit_image(a->jit, att_jit_opts_arch(&f->opts, a->arch), f->opts.ptr, f->opts.n,
                           &f->img, &f->bytes, &f->compiled, &f->diag);
    return NULL;
}

void att_gpu_fetch_images(att_jit_t *jit, const char *arch, att_gpu_fetch_t f[ATT_TILE_KINDS]) {
    fetch_arg_t a[ATT_TILE_KINDS];
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        a[k] = (fetch_arg_t){jit, arch, &f[k]};
    pthread_t tid;
    const bool threaded = pthread_create(&tid, NULL, fetch_run, &a[ATT_TILE_NARROW]) == 0;
    fetch_run(&a[ATT_TILE_WIDE]);
    if (threaded)
        pthread_join(tid, NULL);
    else
        fetch_run(&a[ATT_TILE_NARROW]);
}

void att_gpu_fetch_release(att_gpu_fetch_t f[ATT_TILE_KINDS]) {
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        free(f[k].img);
        f[k].img = NULL;
    }
}

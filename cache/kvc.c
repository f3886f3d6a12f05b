/* Paged KV cache bookkeeping (see kvc.h).
 *
 * Sequences live in a dense array (removal swaps the last one in); an open-addressing map from
 * seq_id to array index finds them. Free blocks are a stack. An append transaction records, per
 * span, the sequence's index, its block count before begin and whether begin created it, which is
 * all abort needs: begin only appends sequences and blocks, it never removes any.
 * Thread: none of its own; the owner serializes every call. */
#include "cache/kvc.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/at_base.h"

#define EMPTY_SLOT UINT32_MAX

typedef struct seq {
    uint64_t id;
    uint64_t stamp;      /* renewed whenever an entry of blocks changes other than by appending */
    uint32_t *blocks;    /* [cap_blocks]; the first num_blocks are in use */
    uint32_t num_blocks;
    uint32_t cap_blocks;
    uint32_t *len;       /* [num_layers]; tokens cached at each layer */
} seq_t;

typedef struct undo {
    uint32_t index;      /* into seqs */
    uint32_t old_blocks; /* num_blocks before begin */
    bool created;
} undo_t;

struct kvc {
    kvc_cfg_t cfg;
    uint32_t *free_blocks; /* [cfg.num_blocks] stack of free block numbers */
    uint32_t num_free;
    seq_t *seqs;           /* [cap_seqs] */
    uint32_t num_seqs;
    uint32_t cap_seqs;
    uint64_t *map_keys;    /* [map_cap] */
    uint32_t *map_vals;    /* [map_cap]; EMPTY_SLOT or an index into seqs */
    uint32_t map_cap;      /* power of two, at least twice num_seqs */
    uint64_t next_stamp;   /* the stamp the next new or changed table gets; never 0 */
    /* the open append, if any */
    bool txn_open;
    uint32_t txn_layer;
    const kvc_span_t *txn_spans; /* borrowed from the caller until commit/abort */
    uint32_t txn_n;
    undo_t *txn_undo;      /* [txn_cap] */
    uint32_t txn_cap;
};

static uint32_t hash_id(uint64_t x, uint32_t mask) {
    x ^= x >> 33; /* a 64-bit finalizer mixes every input bit into the low bits we keep */
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (uint32_t)x & mask;
}

static uint32_t map_find(const kvc_t *c, uint64_t id) {
    uint32_t mask = c->map_cap - 1;
    for (uint32_t i = hash_id(id, mask);; i = (i + 1) & mask) {
        if (c->map_vals[i] == EMPTY_SLOT)
            return EMPTY_SLOT;
        if (c->map_keys[i] == id)
            return i;
    }
}

static void map_put(kvc_t *c, uint64_t id, uint32_t val) {
    uint32_t mask = c->map_cap - 1;
    uint32_t i = hash_id(id, mask);
    while (c->map_vals[i] != EMPTY_SLOT && c->map_keys[i] != id)
        i = (i + 1) & mask;
    c->map_keys[i] = id;
    c->map_vals[i] = val;
}

/* Removal by backward shift keeps every probe chain unbroken without tombstones. */
static void map_del(kvc_t *c, uint32_t i) {
    uint32_t mask = c->map_cap - 1;
    c->map_vals[i] = EMPTY_SLOT;
    for (uint32_t j = (i + 1) & mask; c->map_vals[j] != EMPTY_SLOT; j = (j + 1) & mask) {
        uint32_t home = hash_id(c->map_keys[j], mask);
        /* move j into the hole at i when its home is not in the cyclic range (i, j] */
        bool stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            c->map_keys[i] = c->map_keys[j];
            c->map_vals[i] = c->map_vals[j];
            c->map_vals[j] = EMPTY_SLOT;
            i = j;
        }
    }
}

static at_err_t map_reserve(kvc_t *c, uint32_t entries) {
    if ((uint64_t)entries * 2 <= c->map_cap)
        return AT_OK;
    uint32_t cap = c->map_cap;
    while ((uint64_t)entries * 2 > cap)
        cap *= 2;
    uint64_t *keys = malloc((size_t)cap * sizeof *keys);
    uint32_t *vals = malloc((size_t)cap * sizeof *vals);
    if (keys == NULL || vals == NULL) {
        free(keys);
        free(vals);
        return AT_ERR_NOMEM;
    }
    uint64_t *old_keys = c->map_keys;
    uint32_t *old_vals = c->map_vals;
    uint32_t old_cap = c->map_cap;
    for (uint32_t i = 0; i < cap; i++)
        vals[i] = EMPTY_SLOT;
    c->map_keys = keys;
    c->map_vals = vals;
    c->map_cap = cap;
    for (uint32_t i = 0; i < old_cap; i++)
        if (old_vals[i] != EMPTY_SLOT)
            map_put(c, old_keys[i], old_vals[i]);
    free(old_keys);
    free(old_vals);
    return AT_OK;
}

static seq_t *find_seq(const kvc_t *c, uint64_t id) {
    uint32_t m = map_find(c, id);
    return m == EMPTY_SLOT ? NULL : &c->seqs[c->map_vals[m]];
}

static uint32_t blocks_for(const kvc_t *c, uint64_t tokens) {
    return (uint32_t)((tokens + c->cfg.block_size - 1) / c->cfg.block_size);
}

at_err_t kvc_create(const kvc_cfg_t *cfg, kvc_t **out) {
    if (cfg->num_layers == 0 || cfg->block_size == 0 || cfg->num_blocks == 0)
        return AT_ERR_INTERNAL;
    kvc_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return AT_ERR_NOMEM;
    c->cfg = *cfg;
    c->free_blocks = malloc((size_t)cfg->num_blocks * sizeof *c->free_blocks);
    c->map_cap = 16;
    c->map_keys = malloc(c->map_cap * sizeof *c->map_keys);
    c->map_vals = malloc(c->map_cap * sizeof *c->map_vals);
    if (c->free_blocks == NULL || c->map_keys == NULL || c->map_vals == NULL) {
        kvc_destroy(&c);
        return AT_ERR_NOMEM;
    }
    /* low block numbers on top of the stack, so a fresh cache fills from block 0 upward */
    for (uint32_t i = 0; i < cfg->num_blocks; i++)
        c->free_blocks[i] = cfg->num_blocks - 1 - i;
    c->num_free = cfg->num_blocks;
    c->next_stamp = 1;
    for (uint32_t i = 0; i < c->map_cap; i++)
        c->map_vals[i] = EMPTY_SLOT;
    *out = c;
    return AT_OK;
}

static void seq_fini(seq_t *s) {
    free(s->blocks);
    free(s->len);
    memset(s, 0, sizeof *s);
}

void kvc_destroy(kvc_t **cp) {
    if (cp == NULL || *cp == NULL)
        return;
    kvc_t *c = *cp;
    for (uint32_t i = 0; i < c->num_seqs; i++)
        seq_fini(&c->seqs[i]);
    free(c->seqs);
    free(c->free_blocks);
    free(c->map_keys);
    free(c->map_vals);
    free(c->txn_undo);
    free(c);
    *cp = NULL;
}

/* Shortens s's table to keep blocks; a shorter table gets a new stamp, since a later append
 * puts other block numbers where the returned ones were. */
static void return_blocks(kvc_t *c, seq_t *s, uint32_t keep) {
    if (s->num_blocks > keep)
        s->stamp = c->next_stamp++;
    while (s->num_blocks > keep)
        c->free_blocks[c->num_free++] = s->blocks[--s->num_blocks];
}

/* Removes seqs[index], moving the last sequence into its place. */
static void remove_seq(kvc_t *c, uint32_t index) {
    seq_t *s = &c->seqs[index];
    return_blocks(c, s, 0);
    map_del(c, map_find(c, s->id));
    seq_fini(s);
    uint32_t last = --c->num_seqs;
    if (index != last) {
        c->seqs[index] = c->seqs[last];
        c->map_vals[map_find(c, c->seqs[index].id)] = index;
        memset(&c->seqs[last], 0, sizeof c->seqs[last]);
    }
}

static at_err_t grow_array(void **p, uint32_t *cap, uint32_t want, size_t elem, uint32_t limit) {
    if (want <= *cap)
        return AT_OK;
    uint64_t n = *cap ? *cap : 4;
    while (n < want)
        n *= 2;
    if (n > limit)
        n = limit > want ? limit : want;
    void *q = realloc(*p, (size_t)n * elem);
    if (q == NULL)
        return AT_ERR_NOMEM;
    *p = q;
    *cap = (uint32_t)n;
    return AT_OK;
}

/* Checks positions and capacity, changing nothing. */
static at_err_t check_spans(const kvc_t *c, uint32_t layer, const kvc_span_t *spans, uint32_t n,
                            at_diag_t *d, uint32_t *new_seqs) {
    uint64_t new_blocks = 0;
    *new_seqs = 0;
    for (uint32_t i = 0; i < n; i++) {
        const seq_t *s = find_seq(c, spans[i].seq_id);
        uint32_t len = s ? s->len[layer] : 0;
        if (spans[i].start_pos > len)
            return at_diag_set(d, AT_ERR_KV_PAST_END,
                               "chunks[%u].start_pos: expected <= %u (cached length of seq %llu "
                               "at layer %u), got %u",
                               i, len, (unsigned long long)spans[i].seq_id, layer,
                               spans[i].start_pos);
        uint32_t need = blocks_for(c, (uint64_t)spans[i].start_pos + spans[i].num_tokens);
        uint32_t have = s ? s->num_blocks : 0;
        new_blocks += need > have ? need - have : 0;
        *new_seqs += s == NULL;
    }
    if (new_blocks > c->num_free)
        return at_diag_set(d, AT_ERR_KV_FULL,
                           "kv capacity: the call needs %llu more blocks of %u tokens, %u are free",
                           (unsigned long long)new_blocks, c->cfg.block_size, c->num_free);
    return AT_OK;
}

at_err_t kvc_append_begin(kvc_t *c, uint32_t layer, const kvc_span_t *spans, uint32_t n,
                          at_diag_t *diag) {
    AT_ASSERT(!c->txn_open && layer < c->cfg.num_layers);
    uint32_t new_seqs;
    at_err_t e = check_spans(c, layer, spans, n, diag, &new_seqs);
    if (e != AT_OK)
        return e;
    /* Reserve all memory first; growing these arrays changes no observable state. */
    if ((e = grow_array((void **)&c->txn_undo, &c->txn_cap, n, sizeof *c->txn_undo, n)) != AT_OK ||
        (e = grow_array((void **)&c->seqs, &c->cap_seqs, c->num_seqs + new_seqs, sizeof *c->seqs,
                        UINT32_MAX)) != AT_OK ||
        (e = map_reserve(c, c->num_seqs + new_seqs)) != AT_OK)
        return e;
    c->txn_open = true;
    c->txn_layer = layer;
    c->txn_spans = spans;
    c->txn_n = 0;
    for (uint32_t i = 0; i < n; i++) {
        undo_t *u = &c->txn_undo[i];
        uint32_t m = map_find(c, spans[i].seq_id);
        u->created = m == EMPTY_SLOT;
        if (u->created) {
            seq_t *s = &c->seqs[c->num_seqs];
            memset(s, 0, sizeof *s);
            s->id = spans[i].seq_id;
            s->stamp = c->next_stamp++;
            s->len = calloc(c->cfg.num_layers, sizeof *s->len);
            if (s->len == NULL)
                goto out_abort;
            u->index = c->num_seqs++;
            map_put(c, s->id, u->index);
        } else {
            u->index = c->map_vals[m];
        }
        seq_t *s = &c->seqs[u->index];
        u->old_blocks = s->num_blocks;
        c->txn_n = i + 1;
        uint32_t need = blocks_for(c, (uint64_t)spans[i].start_pos + spans[i].num_tokens);
        if (grow_array((void **)&s->blocks, &s->cap_blocks, need, sizeof *s->blocks,
                       c->cfg.num_blocks) != AT_OK)
            goto out_abort;
        while (s->num_blocks < need)
            s->blocks[s->num_blocks++] = c->free_blocks[--c->num_free];
    }
    c->txn_n = n;
    return AT_OK;
out_abort:
    kvc_append_abort(c);
    return AT_ERR_NOMEM;
}

const uint32_t *kvc_append_table(const kvc_t *c, uint32_t i, uint32_t *num_blocks) {
    AT_ASSERT(c->txn_open && i < c->txn_n);
    const seq_t *s = &c->seqs[c->txn_undo[i].index];
    *num_blocks = s->num_blocks;
    return s->blocks;
}

void kvc_append_ident(const kvc_t *c, uint32_t i, uint32_t *slot, uint64_t *stamp) {
    AT_ASSERT(c->txn_open && i < c->txn_n);
    *slot = c->txn_undo[i].index;
    *stamp = c->seqs[c->txn_undo[i].index].stamp;
}

void kvc_append_commit(kvc_t *c) {
    AT_ASSERT(c->txn_open);
    for (uint32_t i = 0; i < c->txn_n; i++) {
        seq_t *s = &c->seqs[c->txn_undo[i].index];
        s->len[c->txn_layer] = c->txn_spans[i].start_pos + c->txn_spans[i].num_tokens;
        uint32_t longest = 0;
        for (uint32_t l = 0; l < c->cfg.num_layers; l++)
            longest = s->len[l] > longest ? s->len[l] : longest;
        return_blocks(c, s, blocks_for(c, longest)); /* a rollback may have shortened it */
    }
    c->txn_open = false;
    c->txn_spans = NULL;
}

void kvc_append_abort(kvc_t *c) {
    AT_ASSERT(c->txn_open);
    /* reverse order: sequences created by begin sit at the end of seqs, newest last */
    for (uint32_t i = c->txn_n; i-- > 0;) {
        undo_t *u = &c->txn_undo[i];
        seq_t *s = &c->seqs[u->index];
        if (u->created)
            remove_seq(c, u->index);
        else
            return_blocks(c, s, u->old_blocks);
    }
    c->txn_open = false;
    c->txn_spans = NULL;
}

void kvc_release(kvc_t *c, const uint64_t *ids, uint32_t n, uint32_t *released) {
    AT_ASSERT(!c->txn_open);
    uint32_t count = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t m = map_find(c, ids[i]);
        if (m == EMPTY_SLOT)
            continue;
        remove_seq(c, c->map_vals[m]);
        count++;
    }
    if (released != NULL)
        *released = count;
}

at_err_t kvc_seq_len(const kvc_t *c, uint64_t id, uint32_t layer, uint32_t *len) {
    const seq_t *s = find_seq(c, id);
    if (s == NULL)
        return AT_ERR_KV_NO_SEQ;
    AT_ASSERT(layer < c->cfg.num_layers);
    *len = s->len[layer];
    return AT_OK;
}

const uint32_t *kvc_seq_table(const kvc_t *c, uint64_t id, uint32_t *num_blocks) {
    const seq_t *s = find_seq(c, id);
    if (s == NULL)
        return NULL;
    *num_blocks = s->num_blocks;
    return s->blocks;
}

void kvc_get_stats(const kvc_t *c, kvc_stats_t *out) {
    out->num_blocks = c->cfg.num_blocks;
    out->used_blocks = c->cfg.num_blocks - c->num_free;
    out->num_sequences = c->num_seqs;
}

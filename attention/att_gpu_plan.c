/* GPU work planning (see att_gpu_plan.h). Thread model: none of its own; pure functions over
 * the caller's arrays. */
#include "attention/att_gpu_plan.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention/att_dtype.h"

/* Grows a host array to hold n elements of size sz. */
static at_err_t grow(void **p, size_t *cap, size_t n, size_t sz) {
    if (n <= *cap)
        return AT_OK;
    size_t c = *cap ? *cap : 64;
    while (c < n)
        c *= 2;
    void *q = realloc(*p, c * sz);
    if (q == NULL)
        return AT_ERR_NOMEM;
    *p = q;
    *cap = c;
    return AT_OK;
}

/* ---- the session's configuration ---- */

void att_gpu_plan_override(att_cuda_plan_t *out, const att_cuda_plan_t *over) {
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        if (over->tile[k].warps_m != 0)
            out->tile[k] = over->tile[k];
    if (over->min_split_keys != 0)
        out->min_split_keys = over->min_split_keys;
    if (over->max_splits != 0)
        out->max_splits = over->max_splits;
    if (over->blocks_per_sm != 0)
        out->blocks_per_sm = over->blocks_per_sm;
    if (over->mixed_split_keys != 0)
        out->mixed_split_keys = over->mixed_split_keys;
    if (over->mixed_order != 0)
        out->mixed_order = over->mixed_order;
    if (over->mixed_wide_sms != 0)
        out->mixed_wide_sms = over->mixed_wide_sms;
    if (over->mixed_part_always)
        out->mixed_part_always = true;
    if (over->tail_unsplit)
        out->tail_unsplit = true;
}

void att_gpu_plan_knobs(att_cuda_plan_t *out, uint32_t min_split_keys, uint32_t blocks_per_sm,
                        uint32_t mixed_split_keys, uint32_t mixed_order) {
    out->min_split_keys = min_split_keys != 0 ? min_split_keys : ATT_CUDA_NEVER;
    out->max_splits = TUN_CUDA_MAX_SPLITS;
    out->blocks_per_sm = blocks_per_sm != 0 ? blocks_per_sm : ATT_CUDA_OCCUPANCY;
    out->mixed_split_keys = mixed_split_keys != 0 ? mixed_split_keys : ATT_CUDA_NEVER;
    out->mixed_order = mixed_order;
}

/* ---- each call's chunks -> tiles -> items ---- */

static uint32_t window_lo(uint32_t pos, uint32_t window) {
    return (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

/* Parts of a tile's key range: up to `want` of at least min_split_keys each; a wide tile of a
 * mixed batch on shared SMs (`mixed`) also into parts of about mixed_split_keys. */
static uint32_t tile_parts(const att_cuda_plan_t *p, const att_gpu_tile_t *t, uint32_t want,
                           bool mixed) {
    const uint32_t keys = t->ke - t->kb;
    uint32_t parts = keys / p->min_split_keys;
    parts = parts < want ? parts : want;
    if (mixed && t->kind == ATT_TILE_WIDE && p->mixed_split_keys != ATT_CUDA_NEVER &&
        keys / p->mixed_split_keys > parts)
        parts = keys / p->mixed_split_keys;
    return parts < p->max_splits ? parts : p->max_splits;
}

/* A block's fixed cost (start, copy pipeline fill, partial rows stored and merged) in keys of
 * streaming: what a part must be worth to pay for itself. */
#define PART_COST_KEYS 128u
/* Every long tile is split below this many waves of unsplit blocks. With more, splitting them
 * all costs more than it saves (H200, 2026-11-30: 256 x 1K decode, 5.2 waves, lost 5% when split
 * in two); only a last wave at most half full has its tiles split (split_tail). */
#define SPLIT_WAVES 2u

/* Parts per tile for a kind of `blocks` unsplit blocks of up to `keys` keys each, when `slots`
 * blocks run at once, at most `most`: the count whose waves finish first. p parts make
 * W = blocks * p / slots waves, which take ceil(W) times as long as one block of keys / p keys
 * plus its fixed cost. */
static uint32_t wave_parts(uint64_t blocks, uint64_t keys, uint64_t slots, uint32_t most) {
    if (blocks == 0 || most < 2 || blocks >= SPLIT_WAVES * slots)
        return 1;
    uint32_t best = 1;
    uint64_t best_t = UINT64_MAX;
    for (uint32_t p = 1; p <= most; p++) {
        const uint64_t waves = (blocks * p + slots - 1) / slots;
        const uint64_t t = waves * ((keys + p - 1) / p + PART_COST_KEYS);
        if (t < best_t) {
            best_t = t;
            best = p;
        }
    }
    return best;
}

/* A last wave at most this share full (1 / TAIL_SHARE) is filled with parts of its tiles. Its
 * few blocks would each stream only what its own pipeline keeps in flight, while the other
 * SM slots idle; the parts stream at the rate of a full wave. A fuller last wave already
 * keeps enough bytes in flight. */
#define TAIL_SHARE 2u

/* Sorts n entries (count << 32 | index) by count, fewest first or (most_first) most first,
 * equal ones kept in order: a stable LSD radix sort over the counts' bytes (as many as the
 * largest count has), through tmp. Planning runs on every call, and a comparison sort of a few
 * hundred entries cost more than the rest of it (qsort of the items: 9 of 12.6 us for 256
 * decode sequences on the CI machine). */
static void sort_by_count(uint64_t *e, uint64_t *tmp, size_t n, bool most_first) {
    uint32_t most = 0;
    for (size_t i = 0; i < n; i++)
        most = (uint32_t)(e[i] >> 32) > most ? (uint32_t)(e[i] >> 32) : most;
    uint64_t *src = e, *dst = tmp;
    for (uint32_t shift = 32; shift < 64 && most >> (shift - 32) != 0; shift += 8) {
        size_t at[257] = {0};
        for (size_t i = 0; i < n; i++) {
            const uint32_t d = (uint32_t)(src[i] >> shift & 0xffu);
            at[(most_first ? 255 - d : d) + 1]++;
        }
        for (size_t d = 1; d <= 256; d++)
            at[d] += at[d - 1];
        for (size_t i = 0; i < n; i++) {
            const uint32_t d = (uint32_t)(src[i] >> shift & 0xffu);
            dst[at[most_first ? 255 - d : d]++] = src[i];
        }
        uint64_t *x = src;
        src = dst;
        dst = x;
    }
    if (src != e)
        memcpy(e, src, n * sizeof *e);
}

/* The most last-wave tiles split_tail selects without sorting them all. */
#define SELECT_MOST 32u

/* The tiles of one kind that the last wave would hold, split into parts that fill that wave:
 * `blocks` blocks of heads blocks per tile, `slots` of them at once. The last wave holds the
 * kind's shortest tiles (items run longest first), and of equally long ones the later (the
 * item sort is stable); each is split into up to its keys / min_split_keys parts. Uses
 * w->order and w->order_tmp (at least the kind's tiles each). Returns how many were split. */
static uint32_t split_tail(att_gpu_work_t *w, size_t nt, uint32_t kind, const att_cuda_plan_t *plan,
                           uint64_t blocks, uint32_t heads, uint64_t slots) {
    if (slots == 0 || blocks <= slots || blocks % slots == 0 ||
        blocks % slots * TAIL_SHARE > slots)
        return 0;
    const uint64_t r = blocks % slots;
    const uint64_t tail = (r + heads - 1) / heads;
    uint64_t parts = slots / (tail * heads);
    parts = parts < plan->max_splits ? parts : plan->max_splits;
    if (parts < 2)
        return 0;
    /* the kind's tiles from the last back, then by key count, fewest first: the first `tail`.
     * A last wave of a few tiles (Llama's at 256 x 1K: 9) is selected: w->order keeps the
     * fewest seen so far in that order (a later tile of as many keys does not displace an
     * earlier-seen one), which costs a pass over the tiles instead of the sort's (1.7 of 5 us
     * on the development VM). More are sorted, which bounds the cost. */
    size_t n = 0;
    if (tail <= SELECT_MOST) {
        for (size_t i = nt; i-- > 0;) {
            if (w->tiles[i].kind != kind)
                continue;
            const uint64_t e = (uint64_t)(w->tiles[i].ke - w->tiles[i].kb) << 32 | i;
            if (n == tail && e >> 32 >= w->order[n - 1] >> 32)
                continue;
            size_t at = n < tail ? n++ : n - 1;
            for (; at > 0 && e >> 32 < w->order[at - 1] >> 32; at--)
                w->order[at] = w->order[at - 1];
            w->order[at] = e;
        }
    } else {
        for (size_t i = nt; i-- > 0;)
            if (w->tiles[i].kind == kind)
                w->order[n++] = (uint64_t)(w->tiles[i].ke - w->tiles[i].kb) << 32 | i;
        sort_by_count(w->order, w->order_tmp, n, false);
        n = n < tail ? n : tail;
    }
    uint32_t split = 0;
    for (size_t i = 0; i < n; i++) {
        att_gpu_tile_t *t = &w->tiles[(uint32_t)w->order[i]];
        const uint64_t most = (t->ke - t->kb) / plan->min_split_keys;
        t->parts = (uint32_t)(parts < most ? parts : most);
        split += t->parts >= 2;
    }
    return split;
}

/* When an SM partition suits a mixed batch: rates of the H200 (2026-11-30, BENCHMARKS.md), the
 * one GPU whose plan asks for a partition by default. The wgmma wide tile does about 2 TFLOP/s
 * per SM (260 on 132); decode tiles read about 3.4 TB/s on most of the GPU's SMs. */
#define PART_WIDE_FLOP_PER_SM_US 2.0e6
#define PART_NARROW_BYTES_PER_US 3.4e6

/* True when the wide tiles' arithmetic (wide_row_keys row x key products per KV head) on
 * wide_sms SMs takes from half to 1.25 times as long as the narrow tiles' KV reads (narrow_keys
 * keys per KV head): then both parts finish together and neither idles SMs for long. A batch
 * whose chunk is small next to its decodes keeps every SM for the decodes; one whose chunk is
 * large keeps them for the chunk. */
static bool partition_suits(const att_model_t *m, uint64_t wide_row_keys, uint64_t narrow_keys,
                            uint32_t wide_sms) {
    const double flop = 4.0 * m->head_dim * m->num_kv_heads * (double)wide_row_keys;
    const double bytes =
        2.0 * m->head_dim * att_dtype_bytes(m->dtype) * m->num_kv_heads * (double)narrow_keys;
    const double t_wide = flop / (PART_WIDE_FLOP_PER_SM_US * wide_sms);
    const double t_narrow = bytes / PART_NARROW_BYTES_PER_US;
    return t_wide >= 0.5 * t_narrow && t_wide <= 1.25 * t_narrow;
}

/* Items of kind k are written as a run (wide first: kind order), longest first within a kind. */
at_err_t att_gpu_plan_batch(att_gpu_work_t *w, const att_model_t *m, const att_cuda_plan_t *plan,
                            const uint32_t rows[ATT_TILE_KINDS],
                            const uint32_t tile_k[ATT_TILE_KINDS], uint32_t num_sms,
                            const uint32_t mixed_sms[ATT_TILE_KINDS],
                            const uint32_t occupancy[ATT_TILE_KINDS], const att_batch_t *b,
                            att_gpu_counts_t *pl) {
    const uint32_t g = m->group, window = m->window[b->layer];
    memset(pl, 0, sizeof *pl);
    /* Planning runs on every call, and a decode batch's hundreds of chunks each make one narrow
     * tile: that case is taken without a division (the H200's host spent 10-17 us planning 256
     * decodes, docs/BENCHMARKS.md). */
    size_t nt = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const uint32_t r = b->chunks[c].num_tokens * g;
        nt += r <= rows[ATT_TILE_NARROW]
                  ? (r != 0)
                  : (r + rows[ATT_TILE_WIDE] - 1) / rows[ATT_TILE_WIDE];
    }
    at_err_t e = grow((void **)&w->tiles, &w->cap_tiles, nt, sizeof *w->tiles);
    if (e == AT_OK)
        e = grow((void **)&w->order, &w->cap_order, nt, sizeof *w->order);
    if (e == AT_OK)
        e = grow((void **)&w->order_tmp, &w->cap_order_tmp, nt, sizeof *w->order_tmp);
    if (e != AT_OK)
        return e;
    nt = 0;
    /* per kind: blocks (tiles x KV heads) and the longest tile's keys, for the split choice; the
     * wide tiles' row x key products and the narrow tiles' keys, for the partition choice */
    uint64_t blocks[ATT_TILE_KINDS] = {0, 0}, longest[ATT_TILE_KINDS] = {0, 0};
    uint64_t wide_row_keys = 0, narrow_keys = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        const uint32_t r = ch->num_tokens * g;
        if (r != 0 && r <= rows[ATT_TILE_NARROW]) { /* one narrow tile, to the last token */
            att_gpu_tile_t *t = &w->tiles[nt++];
            t->chunk = c;
            t->row_begin = 0;
            t->kind = ATT_TILE_NARROW;
            t->kb = window_lo(ch->start_pos, window);
            t->ke = ch->start_pos + ch->num_tokens;
            blocks[ATT_TILE_NARROW] += m->num_kv_heads;
            longest[ATT_TILE_NARROW] = t->ke - t->kb > longest[ATT_TILE_NARROW]
                                           ? t->ke - t->kb
                                           : longest[ATT_TILE_NARROW];
            narrow_keys += t->ke - t->kb;
            continue;
        }
        /* the rest are cut into wide tiles (a chunk of no rows makes none) */
        const uint32_t wr = rows[ATT_TILE_WIDE];
        for (uint32_t rb = 0; rb < r; rb += wr) {
            const uint32_t re = rb + wr < r ? rb + wr : r;
            att_gpu_tile_t *t = &w->tiles[nt++];
            t->chunk = c;
            t->row_begin = rb;
            t->kind = ATT_TILE_WIDE;
            t->kb = window_lo(ch->start_pos + rb / g, window);
            t->ke = ch->start_pos + (re - 1) / g + 1;
            blocks[ATT_TILE_WIDE] += m->num_kv_heads;
            longest[ATT_TILE_WIDE] =
                t->ke - t->kb > longest[ATT_TILE_WIDE] ? t->ke - t->kb : longest[ATT_TILE_WIDE];
            wide_row_keys += (uint64_t)(re - rb) * (t->ke - t->kb);
        }
    }
    bool mixed = blocks[ATT_TILE_WIDE] != 0 && blocks[ATT_TILE_NARROW] != 0;
    pl->partitioned =
        mixed && mixed_sms != NULL &&
        (plan->mixed_part_always ||
         partition_suits(m, wide_row_keys, narrow_keys, mixed_sms[ATT_TILE_WIDE]));
    mixed = mixed && !pl->partitioned; /* the kinds share SMs */
    /* Split (flash-decoding) when a kind's blocks would take few waves of the SMs it runs on. */
    uint32_t want[ATT_TILE_KINDS];
    uint64_t slots[ATT_TILE_KINDS];
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        const uint64_t per_sm =
            plan->blocks_per_sm == ATT_CUDA_OCCUPANCY ? occupancy[k] : plan->blocks_per_sm;
        const uint64_t sms = pl->partitioned ? mixed_sms[k] : num_sms;
        const uint64_t most = longest[k] / plan->min_split_keys;
        slots[k] = sms * (per_sm ? per_sm : 1);
        want[k] = wave_parts(blocks[k], longest[k], slots[k],
                             most < plan->max_splits ? (uint32_t)most : plan->max_splits);
    }
    /* a kind that splits nothing (want 1, and no mixed-batch split of the wide tiles) needs no
     * per-tile choice */
    bool whole[ATT_TILE_KINDS];
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++)
        whole[k] = want[k] <= 1 && !(mixed && k == ATT_TILE_WIDE);
    for (size_t i = 0; i < nt; i++)
        w->tiles[i].parts = whole[w->tiles[i].kind]
                                ? 1
                                : tile_parts(plan, &w->tiles[i], want[w->tiles[i].kind], mixed);
    /* the last wave's tiles; not where the kinds share SMs (neither kind's waves are its own) */
    for (uint32_t k = 0; k < ATT_TILE_KINDS && !mixed && !plan->tail_unsplit; k++)
        if (want[k] == 1 && plan->min_split_keys != ATT_CUDA_NEVER)
            pl->tail_tiles[k] = split_tail(w, nt, k, plan, blocks[k], m->num_kv_heads, slots[k]);
    size_t ni = 0, nm = 0;
    for (size_t i = 0; i < nt; i++) {
        const uint32_t parts = w->tiles[i].parts;
        ni += parts >= 2 ? parts : 1;
        nm += parts >= 2;
    }
    if ((e = grow((void **)&w->items, &w->cap_items, ni, sizeof *w->items)) != AT_OK ||
        (e = grow((void **)&w->scratch, &w->cap_scratch, ni, sizeof *w->scratch)) != AT_OK ||
        (e = grow((void **)&w->order, &w->cap_order, ni, sizeof *w->order)) != AT_OK ||
        (e = grow((void **)&w->order_tmp, &w->cap_order_tmp, ni, sizeof *w->order_tmp)) != AT_OK ||
        (e = grow((void **)&w->merges, &w->cap_merges, nm, sizeof *w->merges)) != AT_OK)
        return e;
    ni = nm = 0;
    for (uint32_t kind = 0; kind < ATT_TILE_KINDS; kind++) {
        const size_t first_item = ni, first_merge = nm;
        for (size_t i = 0; i < nt; i++) {
            const att_gpu_tile_t *t = &w->tiles[i];
            if (t->kind != kind)
                continue;
            const uint32_t keys = t->ke - t->kb, parts = t->parts;
            if (parts < 2) {
                w->order[ni - first_item] = (uint64_t)keys << 32 | (ni - first_item);
                w->items[ni++] = (att_kitem_t){.chunk = t->chunk,
                                               .row_begin = t->row_begin,
                                               .key_begin = 0,
                                               .key_end = 0xffffffffu,
                                               .part = ATT_KPART_NONE,
                                               .flags = ATT_KITEM_WRITE_KV};
                continue;
            }
            const uint32_t tk = tile_k[kind];
            const uint32_t start = t->kb - t->kb % tk;
            uint32_t span = (t->ke - start + parts - 1) / parts;
            span = (span + tk - 1) / tk * tk;
            const uint32_t part_begin = pl->num_parts[kind];
            uint32_t n_parts = 0;
            for (uint32_t kb = start; kb < t->ke; kb += span, n_parts++) {
                const uint32_t ke = t->ke - kb > span ? kb + span : t->ke;
                w->order[ni - first_item] = (uint64_t)(ke - kb) << 32 | (ni - first_item);
                w->items[ni++] = (att_kitem_t){.chunk = t->chunk,
                                               .row_begin = t->row_begin,
                                               .key_begin = kb,
                                               .key_end = ke,
                                               .part = part_begin + n_parts,
                                               .flags = n_parts == 0 ? ATT_KITEM_WRITE_KV : 0u,
                                               .merge = (uint32_t)(nm - first_merge)};
            }
            pl->num_parts[kind] += n_parts;
            w->merges[nm++] = (att_kmerge_t){t->chunk, t->row_begin, part_begin, n_parts};
        }
        pl->num_items[kind] = (uint32_t)(ni - first_item);
        pl->num_merges[kind] = (uint32_t)(nm - first_merge);
        /* longest first, equal ones in the order written; a run already so (a decode batch of
         * equal contexts and no split) is left as it is */
        const size_t run = ni - first_item;
        bool sorted = true;
        for (size_t i = 1; i < run && sorted; i++)
            sorted = w->order[i] >> 32 <= w->order[i - 1] >> 32;
        if (!sorted) {
            sort_by_count(w->order, w->order_tmp, run, true);
            for (size_t i = 0; i < run; i++)
                w->scratch[i] = w->items[first_item + (uint32_t)w->order[i]];
            memcpy(w->items + first_item, w->scratch, run * sizeof *w->items);
        }
    }
    pl->total_items = (uint32_t)ni;
    pl->total_merges = (uint32_t)nm;
    return AT_OK;
}

void att_gpu_work_fini(att_gpu_work_t *w) {
    free(w->tiles);
    free(w->order);
    free(w->order_tmp);
    free(w->items);
    free(w->scratch);
    free(w->merges);
    memset(w, 0, sizeof *w);
}

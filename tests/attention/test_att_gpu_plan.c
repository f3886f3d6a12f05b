/* The GPU backends' work planner (att_gpu_plan.c) without a GPU: how a batch is cut into tiles,
 * split parts and merges, for the Llama-3.1-8B shape (32 query heads, 8 KV heads, D 128) on an
 * H200's 132 SMs, with the mma.sync tiles (wide 128 rows, 32 keys per stage; narrow 16 rows, 64
 * keys) and their occupancy there (2 wide, 3 narrow blocks per SM). Checks the split choice of
 * each batch family (many waves: only the tiles of a last wave at most half full, into parts
 * that fill it; few: the part count whose waves finish first; a lone long sequence: the most
 * parts) and the invariants the kernels rely on: every row tile covered once, parts tiling its
 * key range, exactly one part writing the new K/V, merge indices relative to their kind's run,
 * items longest first (equal ones in order); and in a mixed batch with SM partitions, each
 * kind's split counted on its own partition. Label: unit. */
#include "tests/test_util.h"

#include <stdlib.h>
#include <string.h>

#include "attention/att_gpu_plan.h"
#include "attention/att_model.h"

enum { SMS = 132 };
static const uint32_t k_rows[ATT_TILE_KINDS] = {128, 16};   /* wide, narrow */
static const uint32_t k_keys[ATT_TILE_KINDS] = {32, 64};
static const uint32_t k_occ[ATT_TILE_KINDS] = {2, 3};

typedef struct plan_rig {
    att_model_t *m;
    att_cuda_plan_t plan;
    att_gpu_work_t w;
    att_gpu_counts_t pl;
    att_batch_chunk_t ch[300];
    uint32_t blocks[64]; /* a block table every chunk shares: planning never reads it */
} plan_rig_t;

/* The rig for a model whose layers attend to the last `window` keys (0: all). */
static void rig_init_window(plan_rig_t *r, uint32_t window) {
    memset(r, 0, sizeof *r);
    const att_model_cfg_t cfg = {.num_layers = 1, .num_query_heads = 32, .num_kv_heads = 8,
                                 .head_dim = 128, .dtype = ATT_DTYPE_BF16, .block_size = 16,
                                 .sliding_window = window};
    at_diag_t d = {{0}};
    TU_CHECK(att_model_create(&cfg, &d, &r->m) == AT_OK, "model: %s", d.msg);
    r->plan.tile[ATT_TILE_WIDE] = (att_tile_t){4, 2, 1, 32, 3, 0};
    r->plan.tile[ATT_TILE_NARROW] = (att_tile_t){1, 1, 4, 64, 2, 0};
    att_gpu_plan_knobs(&r->plan, 256, 0, 512, ATT_CUDA_WIDE_FIRST);
}

static void rig_init(plan_rig_t *r) { rig_init_window(r, 0); }

static void rig_fini(plan_rig_t *r) {
    att_gpu_work_fini(&r->w);
    att_model_destroy(&r->m);
}

/* Appends n chunks of `tokens` new tokens after `ctx` cached ones. */
static void add_chunks(plan_rig_t *r, att_batch_t *b, uint32_t n, uint32_t ctx, uint32_t tokens) {
    for (uint32_t i = 0; i < n; i++) {
        att_batch_chunk_t *c = &r->ch[b->num_chunks++];
        *c = (att_batch_chunk_t){.token_offset = b->total_tokens, .start_pos = ctx,
                                 .num_tokens = tokens, .num_blocks = 64, .blocks = r->blocks};
        b->total_tokens += tokens;
    }
}

/* Plans b on SMS SMs, or with mixed_sms (not NULL) each kind's SM partition in a mixed batch. */
static void plan_on(plan_rig_t *r, const att_batch_t *b, const uint32_t *mixed_sms) {
    TU_CHECK(att_gpu_plan_batch(&r->w, r->m, &r->plan, k_rows, k_keys, SMS, mixed_sms, k_occ, b,
                                &r->pl) == AT_OK,
             "att_gpu_plan_batch");
}

static void plan(plan_rig_t *r, const att_batch_t *b) { plan_on(r, b, NULL); }

/* The fewest parts of a split tile of kind k (0 when none is split). */
static uint32_t parts_of(const plan_rig_t *r, uint32_t k) {
    const uint32_t first = k == ATT_TILE_WIDE ? 0 : r->pl.num_merges[ATT_TILE_WIDE];
    uint32_t parts = 0;
    for (uint32_t i = 0; i < r->pl.num_merges[k]; i++) {
        const uint32_t n = r->w.merges[first + i].num_parts;
        parts = parts == 0 || n < parts ? n : parts;
    }
    return parts;
}

/* Every (chunk, row tile) is covered: once by an unsplit item, or by parts that tile its keys in
 * order with exactly one writing the new K/V, and whose merge record (indexed within the kind's
 * run, as the kernel reads merges_d) names them. */
static void check_cover(const plan_rig_t *r, const att_batch_t *b) {
    uint32_t seen_rows = 0, want_rows = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++)
        want_rows += b->chunks[c].num_tokens * r->m->group;
    uint32_t item = 0;
    for (uint32_t k = 0; k < ATT_TILE_KINDS; k++) {
        const uint32_t merge_base = k == ATT_TILE_WIDE ? 0 : r->pl.num_merges[ATT_TILE_WIDE];
        const uint32_t kind_first = item; /* part slots are numbered per kind */
        for (uint32_t i = 0; i < r->pl.num_items[k]; i++, item++) {
            const att_kitem_t *it = &r->w.items[item];
            const att_batch_chunk_t *ch = &b->chunks[it->chunk];
            const uint32_t rows = ch->num_tokens * r->m->group - it->row_begin;
            if (it->part == ATT_KPART_NONE) {
                TU_CHECK(it->flags & ATT_KITEM_WRITE_KV, "item %u: unsplit without the KV write",
                         item);
                seen_rows += rows < k_rows[k] ? rows : k_rows[k];
                continue;
            }
            TU_CHECK(it->merge < r->pl.num_merges[k], "item %u: merge %u of %u", item, it->merge,
                     r->pl.num_merges[k]);
            const att_kmerge_t *mg = &r->w.merges[merge_base + it->merge];
            TU_CHECK(mg->chunk == it->chunk && mg->row_begin == it->row_begin &&
                         it->part >= mg->part_begin && it->part < mg->part_begin + mg->num_parts,
                     "item %u: its merge record is another tile's", item);
            if (it->part != mg->part_begin)
                continue;
            /* the first part: walk the tile's parts in order */
            uint32_t key = it->key_begin, writers = 0;
            for (uint32_t p = 0; p < mg->num_parts; p++) {
                const att_kitem_t *q = NULL;
                for (uint32_t j = kind_first; j < kind_first + r->pl.num_items[k] && q == NULL; j++)
                    if (r->w.items[j].part == mg->part_begin + p)
                        q = &r->w.items[j];
                TU_CHECK(q != NULL && q->key_begin == key && q->key_end > key,
                         "tile of item %u: part %u does not follow", item, p);
                key = q->key_end;
                writers += (q->flags & ATT_KITEM_WRITE_KV) != 0;
            }
            TU_CHECK(key == ch->start_pos + (it->row_begin + (rows < k_rows[k] ? rows : k_rows[k]) -
                                             1) / r->m->group + 1,
                     "tile of item %u: its parts end at key %u", item, key);
            TU_CHECK(writers == 1, "tile of item %u: %u parts write the new K/V", item, writers);
            seen_rows += rows < k_rows[k] ? rows : k_rows[k];
        }
    }
    TU_CHECK(item == r->pl.total_items, "%u items of %u", item, r->pl.total_items);
    TU_CHECK(seen_rows == want_rows, "%u rows covered of %u", seen_rows, want_rows);
}

static void test_att_gpu_plan_many_waves_fill_the_last(void **state) {
    (void)state;
    plan_rig_t r;
    rig_init(&r);
    /* 256 x 1K decode: 2048 narrow blocks, 5 waves of 396 and a last one of 68 blocks, 9 tiles.
     * Those are split into 4 parts (of at least 256 keys; 5 would fill the wave), 288 blocks,
     * run last; the others stay whole. */
    att_batch_t b = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 256, 1024, 1);
    plan(&r, &b);
    TU_CHECK(r.pl.tail_tiles[ATT_TILE_NARROW] == 9 && r.pl.total_merges == 9 &&
                 parts_of(&r, ATT_TILE_NARROW) == 4 && r.pl.total_items == 247 + 9 * 4,
             "256 x 1K decode: %u tail tiles, %u merges, %u items",
             r.pl.tail_tiles[ATT_TILE_NARROW], r.pl.total_merges, r.pl.total_items);
    for (uint32_t i = 0; i < r.pl.total_items; i++)
        TU_CHECK((r.w.items[i].part == ATT_KPART_NONE) == (i < 247),
                 "item %u: the whole tiles must run before the parts", i);
    check_cover(&r, &b);

    /* the shortest tiles are the last wave's: 250 at 1K and 6 at 512 keys split those 6 and 3
     * more of the longest (9 in all) */
    b = (att_batch_t){.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 250, 1024, 1);
    add_chunks(&r, &b, 6, 512, 1);
    plan(&r, &b);
    uint32_t short_split = 0;
    for (uint32_t i = 0; i < r.pl.num_merges[ATT_TILE_NARROW]; i++)
        short_split += r.w.merges[i].chunk >= 250;
    TU_CHECK(r.pl.tail_tiles[ATT_TILE_NARROW] == 9 && short_split == 6,
             "250 x 1K + 6 x 512: %u tail tiles, %u of them the short ones",
             r.pl.tail_tiles[ATT_TILE_NARROW], short_split);
    check_cover(&r, &b);

    /* of equally long tiles the later ones: 101 sequences, the second shorter, make 2 waves and
     * 16 blocks; the last wave holds the short one and the last of the others */
    b = (att_batch_t){.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 1, 1024, 1);
    add_chunks(&r, &b, 1, 600, 1);
    add_chunks(&r, &b, 99, 1024, 1);
    plan(&r, &b);
    TU_CHECK(r.pl.total_merges == 2 &&
                 ((r.w.merges[0].chunk == 1 && r.w.merges[1].chunk == 100) ||
                  (r.w.merges[0].chunk == 100 && r.w.merges[1].chunk == 1)),
             "101 sequences: %u tiles split, chunks %u and %u", r.pl.total_merges,
             r.w.merges[0].chunk, r.pl.total_merges > 1 ? r.w.merges[1].chunk : 0);
    check_cover(&r, &b);

    /* a last wave more than half full stays whole: 280 x 1K, 2240 blocks, 260 in the last */
    b = (att_batch_t){.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 280, 1024, 1);
    plan(&r, &b);
    TU_CHECK(r.pl.total_merges == 0 && r.pl.total_items == 280, "280 x 1K decode: %u merges",
             r.pl.total_merges);

    /* tail_unsplit keeps them whole; so does splitting off */
    b = (att_batch_t){.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 256, 1024, 1);
    r.plan.tail_unsplit = true;
    plan(&r, &b);
    TU_CHECK(r.pl.total_merges == 0 && r.pl.total_items == 256, "tail_unsplit: %u merges",
             r.pl.total_merges);
    r.plan.tail_unsplit = false;
    r.plan.min_split_keys = ATT_CUDA_NEVER;
    plan(&r, &b);
    TU_CHECK(r.pl.total_merges == 0 && r.pl.total_items == 256, "splitting off: %u merges",
             r.pl.total_merges);
    check_cover(&r, &b);
    rig_fini(&r);
}

/* Decode items run longest first, equal ones in chunk order: random contexts (up to 3 bytes of
 * key count, so every pass of the radix sort runs), with the last wave's tiles split. */
static void test_att_gpu_plan_items_run_longest_first(void **state) {
    (void)state;
    plan_rig_t r;
    rig_init(&r);
    tu_rng_t rng;
    tu_rng_seed(&rng, 7);
    for (uint32_t round = 0; round < 20; round++) {
        att_batch_t b = {.attend = 1, .chunks = r.ch};
        const uint32_t n = 200 + tu_rng_below(&rng, 100);
        for (uint32_t i = 0; i < n; i++) {
            const uint32_t ctx = round % 2 == 0 ? 1 + tu_rng_below(&rng, 4000)
                                                : 1 + tu_rng_below(&rng, 3) * 70000;
            add_chunks(&r, &b, 1, ctx, 1);
        }
        plan(&r, &b);
        check_cover(&r, &b);
        uint32_t prev_keys = UINT32_MAX, prev_chunk = 0;
        for (uint32_t i = 0; i < r.pl.total_items; i++) {
            const att_kitem_t *it = &r.w.items[i];
            const uint32_t keys = it->part == ATT_KPART_NONE ? b.chunks[it->chunk].start_pos + 1
                                                             : it->key_end - it->key_begin;
            TU_CHECK(keys < prev_keys || (keys == prev_keys && (it->part != ATT_KPART_NONE ||
                                                                it->chunk > prev_chunk)),
                     "round %u, item %u: %u keys (chunk %u) after %u (chunk %u)", round, i, keys,
                     it->chunk, prev_keys, prev_chunk);
            prev_keys = keys;
            prev_chunk = it->chunk;
        }
    }
    rig_fini(&r);
}

static void test_att_gpu_plan_few_waves_split_to_fill_them(void **state) {
    (void)state;
    plan_rig_t r;
    rig_init(&r);
    /* 63 x 2K decode: 504 narrow blocks, 1.3 waves; 3 parts of 683 keys make 3.8 */
    att_batch_t b = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 63, 2048, 1);
    plan(&r, &b);
    TU_CHECK(parts_of(&r, ATT_TILE_NARROW) == 3 && r.pl.num_merges[ATT_TILE_NARROW] == 63,
             "63 x 2K decode: %u merges of %u parts", r.pl.num_merges[ATT_TILE_NARROW],
             parts_of(&r, ATT_TILE_NARROW));
    check_cover(&r, &b);
    /* a 512-token chunk over 1536: 16 wide tiles x 8 heads = 128 blocks of 264 slots; 2 parts
     * make one full wave, 3 would make two */
    att_batch_t c = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &c, 1, 1536, 512);
    plan(&r, &c);
    TU_CHECK(parts_of(&r, ATT_TILE_WIDE) == 2 && r.pl.num_merges[ATT_TILE_WIDE] == 16,
             "chunk: %u merges of %u parts", r.pl.num_merges[ATT_TILE_WIDE],
             parts_of(&r, ATT_TILE_WIDE));
    check_cover(&r, &c);
    rig_fini(&r);
}

static void test_att_gpu_plan_lone_sequence_takes_the_most_parts(void **state) {
    (void)state;
    plan_rig_t r;
    rig_init(&r);
    att_batch_t b = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 1, 32768, 1); /* 8 blocks on 396 slots */
    plan(&r, &b);
    /* TUN_CUDA_MAX_SPLITS (32) parts asked; spans are whole 64-key stages, 1088 keys: 31 */
    TU_CHECK(parts_of(&r, ATT_TILE_NARROW) == 31, "one 32K sequence: %u parts, want 31",
             parts_of(&r, ATT_TILE_NARROW));
    check_cover(&r, &b);
    /* a fixed target of 1 block per SM instead of the occupancy: 8 of 132 slots, 16 parts */
    r.plan.blocks_per_sm = 1;
    plan(&r, &b);
    TU_CHECK(parts_of(&r, ATT_TILE_NARROW) == 16, "blocks_per_sm 1: %u parts, want 16",
             parts_of(&r, ATT_TILE_NARROW));
    check_cover(&r, &b);
    /* splitting off */
    r.plan.min_split_keys = ATT_CUDA_NEVER;
    plan(&r, &b);
    TU_CHECK(r.pl.total_merges == 0, "never: %u merges", r.pl.total_merges);
    rig_fini(&r);
}

/* Chunks of one to four tokens (16 rows at most: one narrow tile each, as speculative decoding
 * sends) under a sliding window, few enough to be split: each tile's parts start at the stage
 * holding its first row's oldest visible key and end after its last token (check_cover); a
 * five-token chunk (20 rows) goes to the wide tiles. Every first row's window starts on a
 * stage's last key, so a later row's would start a stage further. */
static void test_att_gpu_plan_short_chunks_keep_their_window(void **state) {
    (void)state;
    plan_rig_t r;
    rig_init_window(&r, 700);
    att_batch_t b = {.attend = 1, .chunks = r.ch};
    for (uint32_t i = 0; i < 10; i++)
        add_chunks(&r, &b, 1, 2042 + 64 * i, 1 + i % 4);
    add_chunks(&r, &b, 1, 3000, 5);
    plan(&r, &b);
    check_cover(&r, &b);
    TU_CHECK(r.pl.num_merges[ATT_TILE_NARROW] == 10 && parts_of(&r, ATT_TILE_NARROW) == 2,
             "10 short chunks, 80 blocks of 396 slots: %u split, into %u parts",
             r.pl.num_merges[ATT_TILE_NARROW], parts_of(&r, ATT_TILE_NARROW));
    uint32_t wide_items = 0;
    for (uint32_t i = 0; i < r.pl.total_items; i++) {
        const att_kitem_t *it = &r.w.items[i];
        const att_batch_chunk_t *ch = &b.chunks[it->chunk];
        TU_CHECK((i < r.pl.num_items[ATT_TILE_WIDE]) == (it->chunk == 10),
                 "item %u: chunk %u of %u tokens in the wrong kind", i, it->chunk,
                 ch->num_tokens);
        wide_items += it->chunk == 10;
        if (it->part == ATT_KPART_NONE || it->flags == 0)
            continue; /* the first part of a narrow tile writes the KV */
        const uint32_t lo = ch->start_pos + 1 - 700;
        TU_CHECK(it->chunk == 10 || it->key_begin == lo - lo % k_keys[ATT_TILE_NARROW],
                 "chunk %u at %u: first part from key %u, window from %u", it->chunk,
                 ch->start_pos, it->key_begin, lo);
    }
    TU_CHECK(wide_items == r.pl.num_items[ATT_TILE_WIDE] && wide_items != 0,
             "%u wide items of %u", wide_items, r.pl.num_items[ATT_TILE_WIDE]);
    rig_fini(&r);
}

static void test_att_gpu_plan_mixed_batch_merges_index_their_kind(void **state) {
    (void)state;
    plan_rig_t r;
    rig_init(&r);
    att_batch_t b = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 63, 2048, 1);
    add_chunks(&r, &b, 1, 1536, 512);
    plan(&r, &b);
    TU_CHECK(r.pl.num_merges[ATT_TILE_WIDE] == 16 && r.pl.num_merges[ATT_TILE_NARROW] == 63,
             "mixed: %u wide and %u narrow merges", r.pl.num_merges[ATT_TILE_WIDE],
             r.pl.num_merges[ATT_TILE_NARROW]);
    /* the chunk's tiles hold up to 2048 keys: ~512-key parts for balance with the decode */
    TU_CHECK(parts_of(&r, ATT_TILE_WIDE) >= 3, "mixed: wide tiles in %u parts",
             parts_of(&r, ATT_TILE_WIDE));
    check_cover(&r, &b);
    rig_fini(&r);
}

static void test_att_gpu_plan_partitions_split_by_their_own_sms(void **state) {
    (void)state;
    plan_rig_t r;
    rig_init(&r);
    r.plan.mixed_split_keys = ATT_CUDA_NEVER; /* only the wave count decides */
    att_batch_t b = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &b, 63, 2048, 1);
    add_chunks(&r, &b, 1, 1536, 512);
    /* every SM for both kinds: 504 narrow blocks on 396 slots take 3 parts; 128 wide blocks on
     * 264 slots, 2 */
    plan(&r, &b);
    TU_CHECK(!r.pl.partitioned && parts_of(&r, ATT_TILE_NARROW) == 3 &&
                 parts_of(&r, ATT_TILE_WIDE) == 2,
             "whole GPU: narrow in %u parts, wide in %u", parts_of(&r, ATT_TILE_NARROW),
             parts_of(&r, ATT_TILE_WIDE));
    check_cover(&r, &b);
    /* the bench's mixed batch suits 48 + 84 (its chunk's 15 GFLOP on 48 SMs take about as long
     * as its decodes' 528 MB): wide on 96 slots (3 parts: 4 waves of a third), narrow on 252
     * (2 waves whole); mixed_split_keys does not apply there */
    const uint32_t part[ATT_TILE_KINDS] = {48, 84};
    r.plan.mixed_split_keys = 128;
    plan_on(&r, &b, part);
    TU_CHECK(r.pl.partitioned && parts_of(&r, ATT_TILE_WIDE) == 3 &&
                 r.pl.num_merges[ATT_TILE_NARROW] == 0 && r.pl.num_items[ATT_TILE_NARROW] == 63,
             "partitions 48 + 84: partitioned %d, wide in %u parts, %u narrow merges and %u "
             "items",
             r.pl.partitioned, parts_of(&r, ATT_TILE_WIDE), r.pl.num_merges[ATT_TILE_NARROW],
             r.pl.num_items[ATT_TILE_NARROW]);
    check_cover(&r, &b);
    /* on 32 SMs the chunk would take half as long again as the decodes: every SM for both */
    const uint32_t small[ATT_TILE_KINDS] = {32, 100};
    plan_on(&r, &b, small);
    TU_CHECK(!r.pl.partitioned, "partitions 32 + 100 taken");
    r.plan.mixed_part_always = true; /* unless the plan says always */
    plan_on(&r, &b, small);
    TU_CHECK(r.pl.partitioned, "partitions 32 + 100 not taken with mixed_part_always");
    check_cover(&r, &b);
    r.plan.mixed_part_always = false;
    /* a chunk small next to its decodes (255 x 2K and 64 tokens over 1K) keeps every SM for the
     * decodes, and so does a large one (4 x 2K prefills and 8 decodes) for the chunk */
    att_batch_t c = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &c, 255, 2048, 1);
    add_chunks(&r, &c, 1, 1024, 64);
    plan_on(&r, &c, part);
    TU_CHECK(!r.pl.partitioned, "a small chunk took the partition");
    att_batch_t e = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &e, 8, 2048, 1);
    add_chunks(&r, &e, 4, 0, 2048);
    plan_on(&r, &e, part);
    TU_CHECK(!r.pl.partitioned, "large chunks took the partition");
    /* a batch of one kind runs on every SM whatever the partitions: the decode alone splits */
    att_batch_t d = {.attend = 1, .chunks = r.ch};
    add_chunks(&r, &d, 63, 2048, 1);
    plan_on(&r, &d, part);
    TU_CHECK(!r.pl.partitioned && parts_of(&r, ATT_TILE_NARROW) == 3, "decode alone: %u parts",
             parts_of(&r, ATT_TILE_NARROW));
    check_cover(&r, &d);
    rig_fini(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_gpu_plan_many_waves_fill_the_last),
        cmocka_unit_test(test_att_gpu_plan_items_run_longest_first),
        cmocka_unit_test(test_att_gpu_plan_few_waves_split_to_fill_them),
        cmocka_unit_test(test_att_gpu_plan_lone_sequence_takes_the_most_parts),
        cmocka_unit_test(test_att_gpu_plan_short_chunks_keep_their_window),
        cmocka_unit_test(test_att_gpu_plan_mixed_batch_merges_index_their_kind),
        cmocka_unit_test(test_att_gpu_plan_partitions_split_by_their_own_sms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

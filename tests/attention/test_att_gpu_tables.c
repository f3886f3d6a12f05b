/* A GPU session's device-resident block tables (att_gpu_run.c's att_gpu_tables_*) without a GPU:
 * a host array stands in for the table arena, and the kernels' reads and writes of it
 * (att_unified.cu's table_entry, cached_table and keep_table) are done here as the kernels do
 * them. A real kvc drives random appends, rollbacks, aborts and releases; after each placement
 * every chunk's table as the kernels would see it must equal kvc's, the cached keys' entries must
 * be one array, and the regions the call uses must not overlap. A steady decode must send only
 * the blocks it appends, and tables past an arena's 32-bit offsets are refused. Label: unit. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "attention/att_gpu_run.h"
#include "attention/att_model.h"
#include "cache/kvc.h"

enum { MAX_SPANS = 6, MAX_IDS = 16 };

typedef struct rig {
    att_model_t *m;
    kvc_t *kvc;
    att_gpu_tables_t t;
    uint32_t *arena; /* the device's table arena */
    uint32_t arena_cap;
    uint8_t *stage;
    size_t stage_cap;
    uint32_t grown; /* arenas replaced because a call's tables did not fit an empty one */
} rig_t;

static void rig_init(rig_t *r, uint32_t block_size, uint32_t num_blocks, uint32_t arena_cap) {
    memset(r, 0, sizeof *r);
    const att_model_cfg_t cfg = {.num_layers = 2, .num_query_heads = 4, .num_kv_heads = 2,
                                 .head_dim = 64, .dtype = ATT_DTYPE_F16,
                                 .block_size = block_size};
    at_diag_t d = {{0}};
    TU_CHECK(att_model_create(&cfg, &d, &r->m) == AT_OK, "model: %s", d.msg);
    const kvc_cfg_t kc = {2, block_size, num_blocks};
    TU_CHECK(kvc_create(&kc, &r->kvc) == AT_OK, "kvc");
    r->arena_cap = arena_cap;
    r->arena = malloc((size_t)arena_cap * 4);
    TU_CHECK(r->arena != NULL, "arena");
    memset(r->arena, 0xee, (size_t)arena_cap * 4); /* what a fresh device array may hold */
}

static void rig_fini(rig_t *r) {
    att_gpu_tables_fini(&r->t);
    kvc_destroy(&r->kvc);
    att_model_destroy(&r->m);
    free(r->arena);
    free(r->stage);
}

/* The rig's att_gpu_arena_fn, as a backend's: a new arena of `entries`, holding garbage. */
static at_err_t replace_arena(void *user, uint32_t entries) {
    rig_t *r = user;
    free(r->arena);
    r->arena = malloc((size_t)entries * 4);
    if (r->arena == NULL)
        return AT_ERR_NOMEM;
    memset(r->arena, 0xee, (size_t)entries * 4);
    r->grown++;
    return AT_OK;
}

static void place(rig_t *r, const att_batch_t *b, uint32_t keep_tokens) {
    const uint32_t before = r->arena_cap;
    TU_CHECK(att_gpu_tables_place(&r->t, b, r->m->block_size, keep_tokens, &r->arena_cap,
                                  replace_arena, r) == AT_OK,
             "place");
    TU_CHECK(r->arena_cap >= before, "the arena shrank from %u to %u", before, r->arena_cap);
}

/* Fills the call's metadata as a backend does and checks each chunk as the kernels read it; then
 * writes the sent entries into the arena as the kernels do. */
static void run_call(rig_t *r, const att_batch_t *b, uint32_t keep_tokens) {
    place(r, b, keep_tokens);
    att_gpu_work_t w;
    att_gpu_counts_t pl;
    memset(&w, 0, sizeof w);
    memset(&pl, 0, sizeof pl);
    const uint32_t rows[ATT_TILE_KINDS] = {64, 16};
    att_gpu_layout_t lo;
    att_gpu_layout(r->m, b, &pl, rows, r->t.new_entries, &lo);
    if (lo.meta_end > r->stage_cap) {
        free(r->stage);
        r->stage_cap = lo.meta_end;
        r->stage = malloc(r->stage_cap);
        TU_CHECK(r->stage != NULL, "stage");
    }
    att_gpu_fill_meta(r->stage, &lo, b, &r->t, &w, &pl);
    const att_kchunk_t *kc = (const att_kchunk_t *)(r->stage + lo.o_chunks);
    const uint32_t *sent = (const uint32_t *)(r->stage + lo.o_table);
    size_t sent_total = 0;
    for (uint32_t c = 0; c < b->num_chunks; c++) {
        const att_batch_chunk_t *ch = &b->chunks[c];
        const att_kchunk_t *k = &kc[c];
        TU_CHECK(k->num_blocks == ch->num_blocks && k->mirrored <= k->num_blocks &&
                     k->start_pos == ch->start_pos && k->num_tokens == ch->num_tokens,
                 "chunk %u: %u of %u blocks mirrored", c, k->mirrored, k->num_blocks);
        const bool in_arena = k->mirrored != 0 || (k->flags & ATT_KCHUNK_KEEP_TABLE);
        if (in_arena)
            TU_CHECK((uint64_t)k->table_offset + k->num_blocks <= r->arena_cap,
                     "chunk %u: region at %u of %u blocks past the arena's %u", c,
                     k->table_offset, k->num_blocks, r->arena_cap);
        /* the KV write's entries (from the first new position's block on) from the call's */
        const uint32_t bs = r->m->block_size, first_new = ch->start_pos / bs;
        const uint32_t from = k->mirrored < first_new ? k->mirrored : first_new;
        for (uint32_t i = first_new; i < k->num_blocks; i++)
            TU_CHECK(sent[k->new_offset + i - from] == ch->blocks[i],
                     "chunk %u entry %u: the KV write reads %u, kvc has %u", c, i,
                     sent[k->new_offset + i - from], ch->blocks[i]);
        /* the cached keys' entries from the session's copy, or the call's when it has none */
        const uint32_t *cached = k->mirrored != 0 ? r->arena + k->table_offset
                                                  : sent + k->new_offset;
        for (uint32_t i = 0; i < (ch->start_pos + bs - 1) / bs; i++)
            TU_CHECK(cached[i] == ch->blocks[i], "chunk %u cached entry %u: %u, kvc has %u", c, i,
                     cached[i], ch->blocks[i]);
        sent_total += k->num_blocks - from;
        for (uint32_t d = 0; d < c && in_arena; d++) {
            const att_kchunk_t *o = &kc[d];
            if (o->mirrored == 0 && !(o->flags & ATT_KCHUNK_KEEP_TABLE))
                continue;
            const bool apart = k->table_offset + k->num_blocks <= o->table_offset ||
                               o->table_offset + o->num_blocks <= k->table_offset;
            TU_CHECK(apart, "chunks %u and %u share arena entries", d, c);
        }
    }
    TU_CHECK(sent_total == r->t.new_entries, "sent %zu entries, placed %zu", sent_total,
             r->t.new_entries);
    for (uint32_t c = 0; c < b->num_chunks; c++) { /* keep_table */
        const att_kchunk_t *k = &kc[c];
        const uint32_t first_new = k->start_pos / r->m->block_size;
        const uint32_t from = k->mirrored < first_new ? k->mirrored : first_new;
        if (k->flags & ATT_KCHUNK_KEEP_TABLE)
            for (uint32_t i = 0; i < k->num_blocks - k->mirrored; i++)
                r->arena[k->table_offset + k->mirrored + i] =
                    sent[k->new_offset + k->mirrored - from + i];
    }
}

/* Begins an append of spans and makes the batch att_ctx would; false when kvc refuses it. */
static bool begin(rig_t *r, uint32_t layer, const kvc_span_t *spans, uint32_t n,
                  att_batch_chunk_t *ch, att_batch_t *b) {
    if (kvc_append_begin(r->kvc, layer, spans, n, NULL) != AT_OK)
        return false;
    memset(b, 0, sizeof *b);
    b->layer = layer;
    b->chunks = ch;
    b->num_chunks = n;
    for (uint32_t i = 0; i < n; i++) {
        ch[i] = (att_batch_chunk_t){.token_offset = b->total_tokens,
                                    .start_pos = spans[i].start_pos,
                                    .num_tokens = spans[i].num_tokens};
        ch[i].blocks = kvc_append_table(r->kvc, i, &ch[i].num_blocks);
        kvc_append_ident(r->kvc, i, &ch[i].table_slot, &ch[i].table_stamp);
        b->total_tokens += spans[i].num_tokens;
    }
    return true;
}

static uint64_t g_seed;

static void test_tables_match_kvc_over_random_calls(void **state) {
    (void)state;
    uint32_t kept = 0, sent_whole = 0, grown = 0, failed = 0, aborted = 0, released = 0;
    for (uint32_t run = 0; run < 30; run++) {
        tu_rng_t g;
        tu_rng_seed(&g, tu_sub_seed(g_seed, run));
        const uint32_t bs = 1u << tu_rng_range(&g, 3, 5);
        const uint32_t pool = tu_rng_range(&g, 16, 96);
        rig_t r;
        /* small arenas fill up and are forgotten, or replaced, often */
        rig_init(&r, bs, pool, run % 3 == 0 ? 8 : att_gpu_tables_initial(pool) / (1 + run % 4));
        for (uint32_t step = 0; step < 300; step++) {
            tu_where_set("seed %" PRIu64 " run %u step %u (block %u, pool %u, arena %u)", g_seed,
                         run, step, bs, pool, r.arena_cap);
            if (tu_rng_chance(&g, 1, 8)) {
                uint64_t id = tu_rng_range(&g, 1, MAX_IDS);
                uint32_t n = 0;
                kvc_release(r.kvc, &id, 1, &n);
                released += n;
                continue;
            }
            const uint32_t layer = tu_rng_below(&g, 2);
            const uint32_t n = tu_rng_range(&g, 1, MAX_SPANS);
            kvc_span_t spans[MAX_SPANS];
            for (uint32_t i = 0; i < n; i++) {
                uint64_t id;
                bool dup;
                do {
                    id = tu_rng_range(&g, 1, MAX_IDS);
                    dup = false;
                    for (uint32_t j = 0; j < i; j++)
                        dup |= spans[j].seq_id == id;
                } while (dup);
                uint32_t len = 0;
                (void)kvc_seq_len(r.kvc, id, layer, &len);
                const uint32_t start = tu_rng_chance(&g, 3, 4) ? len : tu_rng_range(&g, 0, len);
                const uint32_t tokens =
                    tu_rng_chance(&g, 3, 4) ? tu_rng_range(&g, 1, 2) : tu_rng_range(&g, 1, 3 * bs);
                spans[i] = (kvc_span_t){id, start, tokens};
            }
            att_batch_chunk_t ch[MAX_SPANS];
            att_batch_t b;
            if (!begin(&r, layer, spans, n, ch, &b))
                continue;
            /* short chunks keep what they send (those on narrow tiles), or all (append-only) */
            run_call(&r, &b, tu_rng_chance(&g, 1, 4) ? UINT32_MAX : 2);
            for (uint32_t c = 0; c < n; c++) {
                kept += r.t.call[c].mirrored != 0;
                sent_whole += r.t.call[c].mirrored == 0;
            }
            if (tu_rng_chance(&g, 1, 10)) { /* the launch failed: no commit of the tables */
                failed++;
                kvc_append_abort(r.kvc);
                continue;
            }
            att_gpu_tables_commit(&r.t, &b);
            if (tu_rng_chance(&g, 1, 10)) { /* the call failed after its launches */
                aborted++;
                kvc_append_abort(r.kvc);
            } else {
                kvc_append_commit(r.kvc);
            }
        }
        grown += r.grown;
        rig_fini(&r);
    }
    tu_where_set("seed %" PRIu64, g_seed);
    print_message("chunks: %u took a kept copy, %u sent whole; %u arenas replaced; %u failed "
                  "launches, %u aborts after a launch, %u releases\n",
                  kept, sent_whole, grown, failed, aborted, released);
    TU_CHECK(kept > 0 && sent_whole > 0 && grown > 0 && failed > 0 && aborted > 0 &&
                 released > 0,
             "the random calls missed an outcome");
}

/* 8 sequences decoding one token a step after prompts of 100..107 tokens, blocks of 16, decode
 * chunks keeping what they send: the prompts' calls keep nothing (they run on wide tiles), so
 * the first decode call sends whole tables; after that a call sends one entry per sequence, the
 * block its new token goes to, and nothing else (100 steps stay within the regions, which hold
 * twice the first table). */
static void test_a_steady_decode_sends_only_appended_blocks(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 16, 512, att_gpu_tables_initial(512));
    enum { SEQS = 8 };
    uint32_t len[SEQS];
    kvc_span_t spans[SEQS];
    att_batch_chunk_t ch[SEQS];
    att_batch_t b;
    for (uint32_t i = 0; i < SEQS; i++) {
        spans[i] = (kvc_span_t){i + 1, 0, 100 + i};
        len[i] = 100 + i;
    }
    TU_CHECK(begin(&r, 0, spans, SEQS, ch, &b), "prefill");
    run_call(&r, &b, 1);
    att_gpu_tables_commit(&r.t, &b);
    kvc_append_commit(r.kvc);
    for (uint32_t step = 0; step < 100; step++) {
        tu_where_set("step %u", step);
        size_t want = 0;
        for (uint32_t i = 0; i < SEQS; i++) {
            spans[i] = (kvc_span_t){i + 1, len[i], 1};
            want += step == 0 ? (len[i] + 1 + 15) / 16 : 1;
            len[i]++;
        }
        TU_CHECK(begin(&r, 0, spans, SEQS, ch, &b), "decode");
        run_call(&r, &b, 1);
        TU_CHECK(r.t.new_entries == want, "sent %zu table entries, want %zu", r.t.new_entries,
                 want);
        att_gpu_tables_commit(&r.t, &b);
        kvc_append_commit(r.kvc);
    }
    rig_fini(&r);
}

/* An att_gpu_arena_fn that only records the size asked for (user: a uint32_t). */
static at_err_t record_arena(void *user, uint32_t entries) {
    *(uint32_t *)user = entries;
    return AT_OK;
}

/* Tables past an arena's 32-bit offsets are refused, not half placed; just below, the arena the
 * call asks for places every chunk. Placement reads only the chunks' identities and lengths, so
 * no table of that size exists here. */
static void test_tables_past_32_bits_are_refused(void **state) {
    (void)state;
    att_gpu_tables_t t;
    memset(&t, 0, sizeof t);
    att_batch_chunk_t ch[2] = {
        {.start_pos = 0, .num_tokens = 1, .table_slot = 0, .table_stamp = 1},
        {.start_pos = 0, .num_tokens = 1, .table_slot = 1, .table_stamp = 2}};
    att_batch_t b = {.chunks = ch, .num_chunks = 2, .total_tokens = 2};
    ch[0].num_blocks = 0x40000000u; /* two regions of 2^31 entries: one more than fits */
    ch[1].num_blocks = 0x40000000u;
    uint32_t cap = 1024, asked = 0;
    TU_CHECK(att_gpu_tables_place(&t, &b, 16, UINT32_MAX, &cap, record_arena, &asked) ==
                     AT_ERR_INTERNAL &&
                 asked == 0,
             "2^32 entries placed (an arena of %u asked for)", asked);
    ch[1].num_blocks = 0x3ffffff8u;
    cap = 1024;
    TU_CHECK(att_gpu_tables_place(&t, &b, 16, UINT32_MAX, &cap, record_arena, &asked) == AT_OK &&
                 asked == UINT32_MAX && cap == UINT32_MAX &&
                 t.call[0].flags == ATT_KCHUNK_KEEP_TABLE && t.call[1].off == 0x80000000u,
             "2^32 - 16 entries: an arena of %u asked for, chunk 1 at %u", asked, t.call[1].off);
    att_gpu_tables_fini(&t);
}

int main(void) {
    g_seed = tu_base_seed("test_att_gpu_tables");
    tu_where_set("seed %" PRIu64, g_seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tables_match_kvc_over_random_calls),
        cmocka_unit_test(test_a_steady_decode_sends_only_appended_blocks),
        cmocka_unit_test(test_tables_past_32_bits_are_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

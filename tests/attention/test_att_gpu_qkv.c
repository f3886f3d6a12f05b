/* How a call's tensors travel, without a GPU (att_gpu_run.c). One upload for q, k and v, or k
 * and v alone (att_gpu_qkv_span): tensors laid out as the server's arena lays them (one after
 * another, 64-byte aligned) in a registered region go as one span, and the layout's k and v move
 * to the host's distances; every other arrangement (gaps the layout has no room for, outside a
 * region or across its end, out of order, split runs, misaligned distances, q of an append-only
 * batch) is refused and leaves the layout as it was. Where the kernels find q or out themselves
 * (att_gpu_io_way), and which out runs go back from the stage (att_gpu_finish_out), judged
 * alike. Label: unit. */
#include "tests/test_util.h"

#include <stdlib.h>
#include <string.h>

#include "attention/att_gpu_run.h"
#include "attention/att_model.h"

enum { REGION = 64 << 10, CHUNKS = 3 };

static const uint32_t k_tokens[CHUNKS] = {2, 1, 3}; /* 6 tokens */

typedef struct rig {
    att_model_t *m;
    att_gpu_regions_t regs;
    uint8_t *region; /* REGION bytes, registered */
    size_t q_row, kv_row, qb, kb;
    att_batch_chunk_t ch[CHUNKS];
    att_batch_t b;
    att_gpu_layout_t lo;
} rig_t;

static at_err_t pin_nothing(void *user, void *p, size_t bytes) {
    (void)user;
    (void)p;
    (void)bytes;
    return AT_OK;
}

static void rig_init(rig_t *r, uint32_t hq, uint32_t hkv, uint32_t d) {
    memset(r, 0, sizeof *r);
    const att_model_cfg_t cfg = {.num_layers = 1,
                                 .num_query_heads = hq,
                                 .num_kv_heads = hkv,
                                 .head_dim = d,
                                 .dtype = ATT_DTYPE_F16,
                                 .block_size = 16};
    at_diag_t diag = {{0}};
    TU_CHECK(att_model_create(&cfg, &diag, &r->m) == AT_OK, "model: %s", diag.msg);
    att_gpu_regions_init(&r->regs);
    TU_CHECK(posix_memalign((void **)&r->region, 4096, REGION) == 0, "posix_memalign");
    TU_CHECK(att_gpu_regions_add(&r->regs, r->region, REGION, pin_nothing, NULL) == AT_OK,
             "register");
    r->q_row = (size_t)hq * d * 2;
    r->kv_row = (size_t)hkv * d * 2;
    r->qb = 6 * r->q_row;
    r->kb = 6 * r->kv_row;
    r->b = (att_batch_t){
        .layer = 0, .num_chunks = CHUNKS, .total_tokens = 6, .attend = 1, .chunks = r->ch};
    att_gpu_counts_t pl;
    memset(&pl, 0, sizeof pl);
    const uint32_t tile_rows[ATT_TILE_KINDS] = {16, 16};
    att_gpu_layout(r->m, &r->b, &pl, tile_rows, 0, &r->lo);
}

static void rig_fini(rig_t *r) {
    att_gpu_regions_fini(&r->regs);
    free(r->region);
    att_model_destroy(&r->m);
}

/* Points the chunks' q, k and v at q, k and v, each tensor's chunks one after another. */
static void place(rig_t *r, uint8_t *q, uint8_t *k, uint8_t *v) {
    uint32_t t = 0;
    for (uint32_t c = 0; c < CHUNKS; c++) {
        r->ch[c] = (att_batch_chunk_t){.token_offset = t,
                                       .start_pos = 0,
                                       .num_tokens = k_tokens[c],
                                       .q = q + t * r->q_row,
                                       .k = k + t * r->kv_row,
                                       .v = v + t * r->kv_row,
                                       .out = NULL};
        t += k_tokens[c];
    }
}

/* att_gpu_qkv_span (from k or from q) must refuse r's placement and leave the layout alone. */
static void expect_refused(rig_t *r, const char *why, bool from_k) {
    const att_gpu_layout_t before = r->lo;
    size_t bytes = 0;
    TU_CHECK(att_gpu_qkv_span(&r->b, from_k, r->q_row, r->kv_row, &r->regs, &r->lo, &bytes) == NULL,
             "%s: taken as one span", why);
    TU_CHECK(memcmp(&before, &r->lo, sizeof before) == 0, "%s: the layout changed", why);
}

static size_t round64(size_t n) { return (n + 63) / 64 * 64; }

static void test_arena_neighbours_are_one_span(void **state) {
    (void)state;
    /* tensors of 64-byte multiples back to back (4 query heads, 2 KV heads, D 64), and tensors
     * of 96 bytes with the arena's rounding to 64 bytes between them (1 head, D 8) */
    static const uint32_t shapes[2][3] = {{4, 2, 64}, {1, 1, 8}};
    for (int sh = 0; sh < 2; sh++) {
        rig_t r;
        rig_init(&r, shapes[sh][0], shapes[sh][1], shapes[sh][2]);
        uint8_t *q = r.region + 4096, *k = q + round64(r.qb), *v = k + round64(r.kb);
        const size_t gap = round64(r.qb) - r.qb;
        place(&r, q, k, v);
        att_gpu_layout_t lo = r.lo;
        size_t bytes = 0;
        const uint8_t *p = att_gpu_qkv_span(&r.b, false, r.q_row, r.kv_row, &r.regs, &lo, &bytes);
        TU_CHECK(p == q, "gap %zu: not one span", gap);
        TU_CHECK(bytes == (size_t)(v + r.kb - q), "gap %zu: %zu bytes", gap, bytes);
        TU_CHECK(lo.o_q == r.lo.o_q && lo.o_out == r.lo.o_out, "gap %zu: q or out moved", gap);
        TU_CHECK(lo.o_k == lo.o_q + (size_t)(k - q) && lo.o_v == lo.o_q + (size_t)(v - q),
                 "gap %zu: k at %zu, v at %zu", gap, lo.o_k - lo.o_q, lo.o_v - lo.o_q);
        TU_CHECK(lo.o_v + r.kb <= lo.o_out, "gap %zu: v runs into out", gap);
        rig_fini(&r);
    }
}

static void test_other_arrangements_are_refused(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 4, 2, 64);
    uint8_t *q = r.region + 4096;
    place(&r, q, q + r.qb + 4096, q + r.qb + 4096 + r.kb);
    expect_refused(&r, "a gap the layout has no room for", false);
    place(&r, q + r.kb, q, q + r.kb + r.qb);
    expect_refused(&r, "k before q", false);
    place(&r, q, q + r.qb + r.kb, q + r.qb);
    expect_refused(&r, "v before k", false);
    place(&r, q, q + r.qb, q + r.qb + r.kb);
    r.ch[1].q = q + r.qb + r.kb + r.kb + 4096; /* chunk 1's q rows elsewhere */
    expect_refused(&r, "q in two runs", false);
    uint8_t *end = r.region + REGION - r.qb - r.kb - r.kb / 2;
    place(&r, end, end + r.qb, end + r.qb + r.kb);
    expect_refused(&r, "v past the region's end", false);
    uint8_t *heap = malloc(r.qb + 2 * r.kb);
    TU_CHECK(heap != NULL, "malloc");
    place(&r, heap, heap + r.qb, heap + r.qb + r.kb);
    expect_refused(&r, "unregistered memory", false);
    free(heap);
    place(&r, q, q + r.qb, q + r.qb + r.kb);
    for (uint32_t c = 0; c < CHUNKS; c++)
        r.ch[c].token_offset += 1; /* the tensors' first row belongs to no chunk */
    expect_refused(&r, "rows from token 1 on", false);
    place(&r, q, q + r.qb, q + r.qb + r.kb);
    r.b.num_chunks = 0;
    expect_refused(&r, "no chunks", false);
    r.b.num_chunks = CHUNKS;
    r.b.attend = 0;
    expect_refused(&r, "an append-only batch", false);
    rig_fini(&r);
    /* 96-byte tensors leave the layout room for a gap, so only alignment refuses these */
    rig_init(&r, 1, 1, 8);
    q = r.region + 4096;
    place(&r, q, q + r.qb + 8, q + r.qb + 8 + r.kb + 8);
    expect_refused(&r, "k 8 bytes after q", false);
    place(&r, q, q + r.qb, q + r.qb + r.kb + 8);
    expect_refused(&r, "v 8 bytes after k", false);
    place(&r, q, q + r.qb + 16, q + r.qb + 16 + r.kb + 16);
    size_t bytes = 0;
    TU_CHECK(att_gpu_qkv_span(&r.b, false, r.q_row, r.kv_row, &r.regs, &r.lo, &bytes) == q,
             "16-byte gaps with room for them: refused");
    rig_fini(&r);
}

/* From k (first 1: the kernels read q in host memory, or an append-only batch): k and v go as
 * one span to o_k wherever q lies, and v moves to k's distance; the same rules refuse other
 * arrangements of k and v. */
static void test_k_and_v_alone_are_one_span(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 1, 1, 8); /* 96-byte k: the arena's v is 128 bytes on, the layout's 256 */
    uint8_t *heap = malloc(r.qb);
    TU_CHECK(heap != NULL, "malloc");
    uint8_t *k = r.region + 4096, *v = k + round64(r.kb);
    const uint32_t tile_rows[ATT_TILE_KINDS] = {16, 16};
    att_gpu_counts_t pl;
    memset(&pl, 0, sizeof pl);
    for (int attend = 0; attend < 2; attend++) {
        place(&r, heap, k, v); /* q unregistered */
        r.b.attend = attend;
        att_gpu_layout(r.m, &r.b, &pl, tile_rows, 0, &r.lo);
        att_gpu_layout_t lo = r.lo;
        size_t bytes = 0;
        TU_CHECK(att_gpu_qkv_span(&r.b, true, r.q_row, r.kv_row, &r.regs, &lo, &bytes) == k,
                 "attend %d: k and v not one span", attend);
        TU_CHECK(bytes == (size_t)(v + r.kb - k), "attend %d: %zu bytes", attend, bytes);
        TU_CHECK(lo.o_q == r.lo.o_q && lo.o_k == r.lo.o_k && lo.o_out == r.lo.o_out,
                 "attend %d: q, k or out moved", attend);
        TU_CHECK(lo.o_v == lo.o_k + (size_t)(v - k), "attend %d: v at %zu from k", attend,
                 lo.o_v - lo.o_k);
    }
    place(&r, heap, v, k);
    expect_refused(&r, "from k: v before k", true);
    place(&r, heap, k, k + r.kb + 8);
    expect_refused(&r, "from k: v 8 bytes after k", true);
    place(&r, heap, k, k + r.kb + 512);
    expect_refused(&r, "from k: a gap the layout has no room for", true);
    uint8_t *end = r.region + REGION - r.kb - r.kb / 2;
    place(&r, heap, end, end + round64(r.kb));
    expect_refused(&r, "from k: v past the region's end", true);
    place(&r, heap, k, v);
    for (uint32_t c = 0; c < CHUNKS; c++)
        r.ch[c].q = NULL; /* an append-only batch has no q */
    r.b.attend = 0;
    att_gpu_layout(r.m, &r.b, &pl, tile_rows, 0, &r.lo);
    size_t bytes = 0;
    TU_CHECK(att_gpu_qkv_span(&r.b, true, r.q_row, r.kv_row, &r.regs, &r.lo, &bytes) == k,
             "an append-only batch without q: not one span");
    free(heap);
    rig_fini(&r);
}

/* Where the kernels find a tensor (att_gpu_io_way): one aligned registered run at its host
 * address; the stage when none of it is registered; copied when it is registered off 16-byte
 * alignment, in several runs, only in part, or from a row past token 0. */
static void test_io_ways(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 4, 2, 64);
    uint8_t *heap = malloc(r.qb + 16);
    TU_CHECK(heap != NULL, "malloc");
    uint8_t *q = r.region + 4096, *k = q + r.qb, *v = k + r.kb;
    const uint64_t stage = 0x7000;
    uint64_t addr = 0;
    place(&r, q, k, v);
    TU_CHECK(att_gpu_io_way(&r.b, 0, r.q_row, &r.regs, stage, &addr) == ATT_GPU_IO_HOST &&
                 addr == (uint64_t)(uintptr_t)q,
             "one aligned registered run: not used where it lies");
    place(&r, q + 8, k, v);
    TU_CHECK(att_gpu_io_way(&r.b, 0, r.q_row, &r.regs, stage, &addr) == ATT_GPU_IO_COPY,
             "8 bytes off alignment: not copied");
    place(&r, heap, k, v);
    addr = 0;
    TU_CHECK(att_gpu_io_way(&r.b, 0, r.q_row, &r.regs, stage, &addr) == ATT_GPU_IO_STAGE &&
                 addr == stage,
             "on the heap: not in the stage");
    place(&r, q, k, v);
    r.ch[1].q = q + r.qb + 4096; /* chunk 1's rows elsewhere in the region: three runs */
    TU_CHECK(att_gpu_io_way(&r.b, 0, r.q_row, &r.regs, stage, &addr) == ATT_GPU_IO_COPY,
             "three registered runs: not copied");
    r.ch[1].q = heap; /* two runs registered, one not */
    TU_CHECK(att_gpu_io_way(&r.b, 0, r.q_row, &r.regs, stage, &addr) == ATT_GPU_IO_COPY,
             "partly registered: not copied");
    place(&r, q, k, v);
    for (uint32_t c = 0; c < CHUNKS; c++)
        r.ch[c].token_offset += 1; /* the tensor's first row belongs to no chunk */
    TU_CHECK(att_gpu_io_way(&r.b, 0, r.q_row, &r.regs, stage, &addr) == ATT_GPU_IO_COPY,
             "rows from token 1 on: not copied");
    free(heap);
    rig_fini(&r);
}

/* Staged out goes back by run, judged as att_gpu_io_way judges it: a run across two adjacent
 * registered regions (in neither) is copied from the stage, chunk by chunk inside a region
 * though each is; a run inside one region is left to the DMA. */
static void test_staged_out_goes_back_by_run(void **state) {
    (void)state;
    rig_t r;
    rig_init(&r, 4, 2, 64);
    uint8_t *two = NULL;
    TU_CHECK(posix_memalign((void **)&two, 4096, 2 * REGION) == 0, "posix_memalign");
    TU_CHECK(att_gpu_regions_add(&r.regs, two, REGION, pin_nothing, NULL) == AT_OK &&
                 att_gpu_regions_add(&r.regs, two + REGION, REGION, pin_nothing, NULL) == AT_OK,
             "register two adjacent regions");
    uint8_t *stage = malloc(r.qb);
    TU_CHECK(stage != NULL, "malloc");
    for (size_t i = 0; i < r.qb; i++)
        stage[i] = (uint8_t)(i * 7 + 1);
    uint8_t *q = r.region + 4096;
    for (int across = 1; across >= 0; across--) {
        /* chunk 0 (2 tokens) ends at the boundary when across: chunks 1 and 2 lie in the next */
        uint8_t *out = across ? two + REGION - 2 * r.q_row : two + 4096;
        place(&r, q, q + r.qb, q + r.qb + r.kb);
        for (uint32_t c = 0; c < CHUNKS; c++)
            r.ch[c].out = out + (size_t)r.ch[c].token_offset * r.q_row;
        memset(out, 0, r.qb);
        uint64_t addr = 0;
        TU_CHECK(att_gpu_io_way(&r.b, 3, r.q_row, &r.regs, 0x7000, &addr) ==
                     (across ? ATT_GPU_IO_STAGE : ATT_GPU_IO_HOST),
                 "across %d: the wrong way", across);
        att_gpu_finish_out(&r.b, r.q_row, stage, &r.regs);
        const bool copied = memcmp(out, stage, r.qb) == 0;
        TU_CHECK(copied == (across == 1), "across %d: out %s from the stage", across,
                 copied ? "copied" : "not copied");
    }
    free(stage);
    rig_fini(&r);
    free(two);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_arena_neighbours_are_one_span),
        cmocka_unit_test(test_other_arrangements_are_refused),
        cmocka_unit_test(test_k_and_v_alone_are_one_span),
        cmocka_unit_test(test_io_ways),
        cmocka_unit_test(test_staged_out_goes_back_by_run),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

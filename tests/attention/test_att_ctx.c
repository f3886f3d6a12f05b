/* Tests of attention/att_ctx on the CPU backend against the double-precision oracle: every
 * feature in every dtype, mixed batches, several layers, rollback and exact retry, release,
 * append-only calls, and every malformed call rejected with its own code and the cache left
 * exactly as it was.
 *
 * Every call runs on four contexts fed the same inputs: the default ISA path with 2 threads,
 * the portable path with 1 thread, and both again with small query tiles (8 and 5 rows) so that
 * GQA groups and chunks are split across work items. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "tests/attention/att_rig.h"

static uint64_t g_seed;

/* Every kernel build is covered; the rig skips, with a line, builds this CPU cannot run. */
static const att_cpu_cfg_t BACKENDS[] = {
    {.num_threads = 2},
    {.num_threads = 1, .isa = ATT_CPU_ISA_PORTABLE},
    {.num_threads = 2, .tile_rows = 8, .isa = ATT_CPU_ISA_X86V3},
    {.num_threads = 2, .tile_rows = 5, .isa = ATT_CPU_ISA_PORTABLE},
    {.num_threads = 2, .tile_rows = 8, .isa = ATT_CPU_ISA_X86V4},
};
#define NUM_BACKENDS ((uint32_t)(sizeof BACKENDS / sizeof BACKENDS[0]))

static const att_dtype_t DTYPES[] = {ATT_DTYPE_F32, ATT_DTYPE_F16, ATT_DTYPE_BF16};

/* Sets up a rig for case `index` of this program; features from feats with random values. */
static void rig_for(att_rig_t *r, const char *name, uint32_t index, att_dtype_t dt,
                    uint32_t layers, uint32_t hq, uint32_t hkv, uint32_t d, unsigned feats,
                    uint64_t capacity) {
    const uint64_t seed = tu_sub_seed(g_seed, index);
    tu_rng_t rng;
    tu_rng_seed(&rng, seed);
    att_rig_spec_t spec;
    att_rig_spec_init(&spec, dt, layers, hq, hkv, d, 16);
    att_rig_spec_features(&spec, feats, &rng);
    char desc[256];
    tu_where_set("%s: ATTND_TEST_SEED=%" PRIu64 " case %u (seed %" PRIu64 "), %s", name, g_seed,
                 index, seed, att_rig_spec_str(&spec, desc, sizeof desc));
    att_rig_init(r, &spec.cfg, capacity, BACKENDS, NUM_BACKENDS, tu_rng_next(&rng));
}

/* ---- every feature, every dtype ---- */

/* Prefill chunks, decode tokens and chunks over earlier context, in one call, at every layer;
 * ids include 0 and UINT64_MAX; chunks cross block boundaries. */
static void mixed_scenario(att_rig_t *r) {
    const uint64_t A = 0x100000001ull, B = 2, C = UINT64_MAX, D = 0;
    const att_chunk_t s1[] = {{A, 0, 37}, {B, 0, 5}};
    att_rig_attend_layers(r, s1, 2);
    const att_chunk_t s2[] = {{B, 5, 1}, {C, 0, 70}, {A, 37, 19}};
    att_rig_attend_layers(r, s2, 3);
    for (uint32_t i = 0; i < 4; i++) {
        const att_chunk_t d[] = {{C, 70 + i, 1}, {A, 56 + i, 1}, {B, 6 + i, 1}};
        att_rig_attend_layers(r, d, 3);
    }
    const att_chunk_t s4[] = {{D, 0, 9}, {A, 60, 1}, {C, 74, 23}};
    att_rig_attend_layers(r, s4, 3);
}

static void run_feature(const char *name, unsigned feats, att_dtype_t dt, uint32_t index) {
    att_rig_t r;
    uint32_t layers = (feats & ATT_RIG_F_LAYER_WINDOW) ? 3 : 2;
    rig_for(&r, name, index, dt, layers, 8, 2, 64, feats, 4096);
    if (feats == ATT_RIG_F_WINDOW) { /* small windows only, where the mask shows */
        tu_rng_t w;
        tu_rng_seed(&w, tu_sub_seed(g_seed, index + 1000));
        att_rig_fini(&r);
        att_rig_spec_t spec;
        att_rig_spec_init(&spec, dt, layers, 8, 2, 64, 16);
        spec.cfg.sliding_window = tu_rng_range(&w, 1, 24);
        char desc[256];
        tu_where_set("%s: ATTND_TEST_SEED=%" PRIu64 " case %u, %s", name, g_seed, index,
                     att_rig_spec_str(&spec, desc, sizeof desc));
        att_rig_init(&r, &spec.cfg, 4096, BACKENDS, NUM_BACKENDS, tu_rng_next(&w));
    }
    mixed_scenario(&r);
    att_rig_fini(&r);
}

#define FEATURE_TESTS(fname, feats, index)                                                       \
    static void test_att_ctx_##fname##_matches_oracle_f32(void **state) {                        \
        (void)state;                                                                             \
        run_feature(#fname "/f32", feats, ATT_DTYPE_F32, 3 * (index));                           \
    }                                                                                            \
    static void test_att_ctx_##fname##_matches_oracle_f16(void **state) {                        \
        (void)state;                                                                             \
        run_feature(#fname "/f16", feats, ATT_DTYPE_F16, 3 * (index) + 1);                       \
    }                                                                                            \
    static void test_att_ctx_##fname##_matches_oracle_bf16(void **state) {                       \
        (void)state;                                                                             \
        run_feature(#fname "/bf16", feats, ATT_DTYPE_BF16, 3 * (index) + 2);                     \
    }

FEATURE_TESTS(plain_causal, 0u, 0)
FEATURE_TESTS(sliding_window, ATT_RIG_F_WINDOW, 1)
FEATURE_TESTS(layer_sliding_window, ATT_RIG_F_LAYER_WINDOW, 2)
FEATURE_TESTS(soft_cap, ATT_RIG_F_SOFT_CAP, 3)
FEATURE_TESTS(alibi, ATT_RIG_F_ALIBI, 4)
FEATURE_TESTS(sinks, ATT_RIG_F_SINKS, 5)
FEATURE_TESTS(all_features, ATT_RIG_F_ALL, 6)

/* Many sequences decoding together: the usual shape of a decode step. */
static void test_att_ctx_decode_batch_of_many_sequences(void **state) {
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        att_rig_t r;
        rig_for(&r, "decode_batch", 100 + (uint32_t)di, DTYPES[di], 1, 8, 2, 64,
                ATT_RIG_F_SINKS | ATT_RIG_F_SOFT_CAP, 8192);
        att_chunk_t ch[10];
        for (uint32_t s = 0; s < 10; s++)
            ch[s] = (att_chunk_t){1000 + s, 0, 1 + 7 * s};
        att_rig_attend(&r, 0, ch, 10);
        for (uint32_t step = 0; step < 5; step++) {
            for (uint32_t s = 0; s < 10; s++)
                ch[s] = (att_chunk_t){1000 + (s * 3 + step) % 10, 0, 1};
            for (uint32_t s = 0; s < 10; s++)
                ch[s].start_pos = (uint32_t)att_oracle_seq_len(r.oracle, ch[s].seq_id, 0);
            att_rig_attend(&r, 0, ch, 10);
        }
        att_rig_fini(&r);
    }
}

/* ---- rollback and retry ---- */

static void attend_twice_same_bytes(att_rig_t *r, uint32_t layer, const att_chunk_t *ch,
                                    uint32_t n) {
    const uint32_t t = att_rig_tokens(ch, n);
    void *q = att_rig_random_q(r, t);
    void *k = att_rig_random_kv(r, t, ATT_RIG_QK_RANGE);
    void *v = att_rig_random_kv(r, t, ATT_RIG_V_RANGE);
    void *first[ATT_RIG_MAX_CTX] = {0}, *second[ATT_RIG_MAX_CTX] = {0};
    att_rig_attend_with(r, layer, ch, n, q, k, v, first);
    att_rig_attend_with(r, layer, ch, n, q, k, v, second);
    const size_t ob = (size_t)t * r->cfg.num_query_heads * r->cfg.head_dim *
                      att_dtype_bytes(r->cfg.dtype);
    for (uint32_t i = 0; i < r->num_ctx; i++) {
        TU_CHECK(memcmp(first[i], second[i], ob) == 0,
                 "ctx %u: the same call sent twice gave different bytes (layer %u, %u chunks)", i,
                 layer, n);
        free(first[i]);
        free(second[i]);
    }
    free(q);
    free(k);
    free(v);
}

static void test_att_ctx_rollback_and_exact_retry(void **state) {
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        att_rig_t r;
        tu_rng_t fr;
        tu_rng_seed(&fr, tu_sub_seed(g_seed, 200 + di));
        unsigned feats = (unsigned)tu_rng_below(&fr, ATT_RIG_F_ALL + 1);
        rig_for(&r, "rollback", 200 + (uint32_t)di, DTYPES[di], 2, 8, 2, 32, feats, 4096);
        const uint64_t A = 5, B = 6, C = 7;
        const att_chunk_t pre[] = {{A, 0, 40}, {B, 0, 20}};
        att_rig_attend_layers(&r, pre, 2);
        /* Layer 0 only: A back to 10 tokens, then 5 new. Layer 1 keeps 40, so do the blocks. */
        const att_chunk_t back0[] = {{A, 10, 5}};
        att_rig_attend(&r, 0, back0, 1);
        /* Layer 1 too: now every layer is short and A shrinks to one block. */
        att_rig_attend(&r, 1, back0, 1);
        /* Decode on from 15: keys 15..39 of the old history must be gone. */
        const att_chunk_t dec[] = {{B, 20, 1}, {A, 15, 1}};
        att_rig_attend_layers(&r, dec, 2);
        /* Retries: a decode step, a chunk over context with a rollback, a prefill. */
        const att_chunk_t retry1[] = {{A, 16, 3}, {B, 20, 1}};
        attend_twice_same_bytes(&r, 0, retry1, 2);
        attend_twice_same_bytes(&r, 1, retry1, 2);
        const att_chunk_t retry2[] = {{C, 0, 30}, {B, 2, 17}};
        attend_twice_same_bytes(&r, 0, retry2, 2);
        /* Roll back to nothing but one token. */
        const att_chunk_t zero[] = {{A, 0, 1}, {C, 0, 2}};
        att_rig_attend_layers(&r, zero, 2);
        const att_chunk_t after[] = {{A, 1, 33}, {C, 2, 1}, {B, 19, 2}};
        att_rig_attend(&r, 0, after, 3);
        att_rig_fini(&r);
    }
}

/* ---- release and append ---- */

static void test_att_ctx_release_frees_sequences_in_every_layer(void **state) {
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        att_rig_t r;
        rig_for(&r, "release", 300 + (uint32_t)di, DTYPES[di], 3, 4, 4, 16, ATT_RIG_F_ALIBI,
                1024);
        const uint64_t A = 1, B = 2, C = 3;
        const att_chunk_t pre[] = {{A, 0, 17}, {B, 0, 33}, {C, 0, 5}};
        att_rig_attend_layers(&r, pre, 3);
        const uint64_t rel[] = {A, 999, A}; /* unknown ids and repeats are skipped */
        att_rig_release(&r, rel, 3, 1);
        att_rig_release(&r, rel, 0, 0);
        const att_chunk_t more[] = {{B, 33, 1}, {C, 5, 2}};
        att_rig_attend_layers(&r, more, 2);
        /* A starts afresh, from position 0, and sees none of its old keys. */
        const att_chunk_t again[] = {{A, 0, 7}};
        att_rig_attend_layers(&r, again, 1);
        const uint64_t all[] = {C, B, A};
        att_rig_release(&r, all, 3, 3);
        att_ctx_info_t info;
        for (uint32_t i = 0; i < r.num_ctx; i++) {
            att_ctx_get_info(r.ctx[i], &info);
            TU_CHECK(info.kv_used_tokens == 0 && info.num_sequences == 0,
                     "ctx %u: %" PRIu64 " tokens in %u sequences left after releasing all", i,
                     info.kv_used_tokens, info.num_sequences);
            att_ctx_release(r.ctx[i], all, 3, NULL); /* released may be NULL */
        }
        att_rig_fini(&r);
    }
}

static void test_att_ctx_append_then_attend(void **state) {
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        att_rig_t r;
        rig_for(&r, "append", 400 + (uint32_t)di, DTYPES[di], 2, 8, 1, 40, ATT_RIG_F_SOFT_CAP,
                2048);
        const uint64_t A = 10, B = 20;
        const att_chunk_t imp0[] = {{A, 0, 50}, {B, 0, 3}};
        att_rig_append(&r, 0, imp0, 2);
        const att_chunk_t imp1[] = {{A, 0, 50}};
        att_rig_append(&r, 1, imp1, 1);
        const att_chunk_t go0[] = {{A, 50, 4}, {B, 3, 2}};
        att_rig_attend(&r, 0, go0, 2);
        const att_chunk_t go1[] = {{B, 0, 5}, {A, 50, 4}};
        att_rig_attend(&r, 1, go1, 2);
        /* More context after some attention, then attend over it. */
        const att_chunk_t ctx0[] = {{A, 54, 10}};
        att_rig_append(&r, 0, ctx0, 1);
        const att_chunk_t dec0[] = {{A, 64, 1}, {B, 5, 1}};
        att_rig_attend(&r, 0, dec0, 2);
        /* An append is a rollback too. */
        const att_chunk_t cut1[] = {{A, 20, 2}};
        att_rig_append(&r, 1, cut1, 1);
        const att_chunk_t dec1[] = {{A, 22, 1}};
        att_rig_attend(&r, 1, dec1, 1);

        /* att_ctx_append ignores q and out entirely, byte lengths included. */
        const att_chunk_t ign[] = {{B, 6, 3}};
        void *k = att_rig_random_kv(&r, 3, ATT_RIG_QK_RANGE);
        void *v = att_rig_random_kv(&r, 3, ATT_RIG_V_RANGE);
        TU_CHECK(att_oracle_run(r.oracle, 0, ign, 1, NULL, k, v, NULL) == AT_OK, "oracle");
        for (uint32_t i = 0; i < r.num_ctx; i++) {
            att_call_t c = att_rig_call(&r, 0, ign, 1, NULL, k, v, NULL);
            c.q_bytes = 3;
            c.out_bytes = 12345;
            at_err_t e = att_ctx_append(r.ctx[i], &c, NULL);
            TU_CHECK(e == AT_OK, "ctx %u: append with q/out byte lengths set: %s", i,
                     at_err_name(e));
        }
        free(k);
        free(v);
        att_rig_check_cache(&r);
        const att_chunk_t dec2[] = {{B, 9, 1}};
        att_rig_attend(&r, 0, dec2, 1);
        att_rig_fini(&r);
    }
}

/* ---- malformed calls ---- */

typedef enum tweak { TW_NONE, TW_Q, TW_K, TW_V, TW_OUT } tweak_t;

/* The call is rejected with `want` by att_ctx_attend (and att_ctx_append when also_append) on
 * every context, and each context's cache is byte-for-byte as before. */
static void expect_rejected_(att_rig_t *r, uint32_t layer, const att_chunk_t *ch, uint32_t n,
                             tweak_t tw, long delta, at_err_t want, int also_append,
                             const char *what, int line) {
    uint64_t t = 0;
    for (uint32_t c = 0; c < n; c++)
        t += ch[c].num_tokens;
    if (t > 4096)
        t = 1; /* positions tests: tensors for a few tokens are plenty */
    const size_t eb = att_dtype_bytes(r->cfg.dtype);
    const size_t qb = (size_t)t * r->cfg.num_query_heads * r->cfg.head_dim * eb;
    const size_t kb = (size_t)t * r->cfg.num_kv_heads * r->cfg.head_dim * eb;
    const size_t slack = 4096;
    uint8_t *q = tu_xcalloc(qb + slack, 1), *k = tu_xcalloc(kb + slack, 1);
    uint8_t *v = tu_xcalloc(kb + slack, 1), *out = tu_xcalloc(qb + slack, 1);
    att_call_t call = {
        .layer = layer, .chunks = ch, .num_chunks = n,
        .q = q, .q_bytes = qb, .k = k, .k_bytes = kb,
        .v = v, .v_bytes = kb, .out = out, .out_bytes = qb,
    };
    switch (tw) {
    case TW_Q: call.q_bytes = (size_t)((long)qb + delta); break;
    case TW_K: call.k_bytes = (size_t)((long)kb + delta); break;
    case TW_V: call.v_bytes = (size_t)((long)kb + delta); break;
    case TW_OUT: call.out_bytes = (size_t)((long)qb + delta); break;
    default: break;
    }
    for (uint32_t c = 0; c < n; c++)
        att_rig_note_id(r, ch[c].seq_id);
    char label[160];
    snprintf(label, sizeof label, "line %d: %s", line, what);
    for (uint32_t i = 0; i < r->num_ctx; i++) {
        att_rig_snap_t *before = att_rig_snapshot(r, i);
        at_diag_t diag;
        memset(&diag, 0, sizeof diag);
        at_err_t e = att_ctx_attend(r->ctx[i], &call, &diag);
        TU_CHECK(e == want, "%s: ctx %u: att_ctx_attend gave %s, want %s (%s)", label, i,
                 at_err_name(e), at_err_name(want), diag.msg);
        TU_CHECK(diag.msg[0] != '\0', "%s: ctx %u: no diag detail", label, i);
        att_rig_snapshot_check(r, i, before, label);
        if (also_append) {
            e = att_ctx_append(r->ctx[i], &call, NULL);
            TU_CHECK(e == want, "%s: ctx %u: att_ctx_append gave %s, want %s", label, i,
                     at_err_name(e), at_err_name(want));
            att_rig_snapshot_check(r, i, before, label);
        }
        att_rig_snapshot_free(&before);
    }
    free(q);
    free(k);
    free(v);
    free(out);
}
#define expect_rejected(r, layer, ch, tw, delta, want, also_append, what)                       \
    expect_rejected_(r, layer, ch, (uint32_t)(sizeof ch / sizeof ch[0]), tw, delta, want,        \
                     also_append, what, __LINE__)

static void test_att_ctx_rejects_malformed_calls_and_changes_nothing(void **state) {
    (void)state;
    for (size_t di = 0; di < 3; di++) {
        att_rig_t r;
        tu_rng_t fr;
        tu_rng_seed(&fr, tu_sub_seed(g_seed, 500 + di));
        unsigned feats = (unsigned)tu_rng_below(&fr, ATT_RIG_F_ALL + 1);
        /* 8 blocks of 16 tokens. */
        rig_for(&r, "malformed", 500 + (uint32_t)di, DTYPES[di], 2, 8, 2, 32, feats, 128);
        const uint64_t A = 11, B = 22, C = 33, N = 44;
        const att_chunk_t pa[] = {{A, 0, 40}};
        att_rig_attend_layers(&r, pa, 1); /* 3 blocks */
        const att_chunk_t pb[] = {{B, 0, 20}};
        att_rig_attend(&r, 0, pb, 1); /* 2 blocks; B is empty at layer 1 */

        const long QROW = (long)(8 * 32 * att_dtype_bytes(DTYPES[di]));
        const long KVROW = (long)(2 * 32 * att_dtype_bytes(DTYPES[di]));
        const att_chunk_t two[] = {{A, 40, 1}, {B, 20, 1}};

        const att_chunk_t one[] = {{A, 40, 1}};
        expect_rejected(&r, 2, one, TW_NONE, 0, AT_ERR_CALL_LAYER, 1, "layer == num_layers");
        expect_rejected(&r, UINT32_MAX, one, TW_NONE, 0, AT_ERR_CALL_LAYER, 1, "layer max");
        expect_rejected_(&r, 0, one, 0, TW_NONE, 0, AT_ERR_CALL_NO_CHUNKS, 1, "no chunks",
                         __LINE__);
        const att_chunk_t empty[] = {{A, 40, 1}, {B, 20, 0}};
        expect_rejected(&r, 0, empty, TW_NONE, 0, AT_ERR_CALL_EMPTY_CHUNK, 1, "empty chunk");
        const att_chunk_t dup[] = {{A, 40, 1}, {B, 20, 1}, {A, 41, 1}};
        expect_rejected(&r, 0, dup, TW_NONE, 0, AT_ERR_CALL_DUP_SEQ, 1, "seq twice");
        const att_chunk_t dup2[] = {{A, 10, 2}, {A, 10, 2}};
        expect_rejected(&r, 0, dup2, TW_NONE, 0, AT_ERR_CALL_DUP_SEQ, 1, "same chunk twice");
        const att_chunk_t pos1[] = {{A, 0x7fffffffu, 2}};
        expect_rejected(&r, 0, pos1, TW_NONE, 0, AT_ERR_CALL_POSITION, 1, "position 2^31");
        const att_chunk_t pos2[] = {{A, 40, 1}, {C, 0xffffffffu, 1}};
        expect_rejected(&r, 0, pos2, TW_NONE, 0, AT_ERR_CALL_POSITION, 1, "position wraps");
        const att_chunk_t pos3[] = {{B, 0x80000000u, 1}};
        expect_rejected(&r, 0, pos3, TW_NONE, 0, AT_ERR_CALL_POSITION, 1, "position 2^31 + 1");

        const long qd[] = {-1, 1, -QROW, QROW};
        const long kd[] = {-1, 1, -KVROW, KVROW};
        for (size_t i = 0; i < 4; i++) {
            expect_rejected(&r, 0, two, TW_Q, qd[i], AT_ERR_CALL_Q_BYTES, 0, "q bytes");
            expect_rejected(&r, 1, two, TW_OUT, qd[i], AT_ERR_CALL_OUT_BYTES, 0, "out bytes");
            expect_rejected(&r, 0, two, TW_K, kd[i], AT_ERR_CALL_K_BYTES, 1, "k bytes");
            expect_rejected(&r, 0, two, TW_V, kd[i], AT_ERR_CALL_V_BYTES, 1, "v bytes");
        }

        const att_chunk_t pe1[] = {{A, 41, 1}};
        expect_rejected(&r, 0, pe1, TW_NONE, 0, AT_ERR_KV_PAST_END, 1, "past the end");
        /* A valid rollback first: it must not happen either. */
        const att_chunk_t pe2[] = {{A, 10, 3}, {B, 21, 1}};
        expect_rejected(&r, 0, pe2, TW_NONE, 0, AT_ERR_KV_PAST_END, 1, "rollback + past end");
        const att_chunk_t pe3[] = {{A, 40, 1}, {B, 1, 1}}; /* B is empty at layer 1 */
        expect_rejected(&r, 1, pe3, TW_NONE, 0, AT_ERR_KV_PAST_END, 1, "past end at layer 1");
        const att_chunk_t pe4[] = {{N, 3, 1}};
        expect_rejected(&r, 0, pe4, TW_NONE, 0, AT_ERR_KV_PAST_END, 1, "unknown seq at 3");
        const att_chunk_t pe5[] = {{C, 0, 4}, {N, 1, 2}};
        expect_rejected(&r, 0, pe5, TW_NONE, 0, AT_ERR_KV_PAST_END, 1, "new seq + past end");

        /* 5 of 8 blocks in use. */
        const att_chunk_t f1[] = {{C, 0, 49}};
        expect_rejected(&r, 0, f1, TW_NONE, 0, AT_ERR_KV_FULL, 1, "4 blocks, 3 free");
        const att_chunk_t f2[] = {{A, 40, 10}, {B, 20, 13}, {C, 0, 17}};
        expect_rejected(&r, 0, f2, TW_NONE, 0, AT_ERR_KV_FULL, 1, "1 + 1 + 2 blocks, 3 free");
        const att_chunk_t f3[] = {{A, 0, 5}, {C, 0, 64}};
        expect_rejected(&r, 0, f3, TW_NONE, 0, AT_ERR_KV_FULL, 1, "rollback + 4 blocks");
        const att_chunk_t f4[] = {{A, 0, 5}, {B, 0, 81}};
        expect_rejected(&r, 1, f4, TW_NONE, 0, AT_ERR_KV_FULL, 1, "full at layer 1");

        /* The sequences carry on as if nothing happened. */
        const att_chunk_t on0[] = {{A, 40, 1}, {B, 20, 1}};
        att_rig_attend(&r, 0, on0, 2);
        const att_chunk_t on1[] = {{B, 0, 3}, {A, 40, 1}};
        att_rig_attend(&r, 1, on1, 2);
        /* Fill to exactly the capacity: 3 + 2 + 3 blocks. */
        const att_chunk_t fill[] = {{C, 0, 48}};
        att_rig_attend(&r, 0, fill, 1);
        const att_chunk_t f5[] = {{A, 41, 8}};
        expect_rejected(&r, 0, f5, TW_NONE, 0, AT_ERR_KV_FULL, 1, "one block over, pool full");
        const att_chunk_t f6[] = {{N, 0, 1}};
        expect_rejected(&r, 1, f6, TW_NONE, 0, AT_ERR_KV_FULL, 1, "new seq, pool full");
        /* Room inside held blocks needs no new block. */
        const att_chunk_t in[] = {{A, 41, 7}, {C, 0, 48}};
        att_rig_attend(&r, 1, in, 2);
        const uint64_t rc[] = {C};
        att_rig_release(&r, rc, 1, 1);
        const att_chunk_t grow[] = {{A, 41, 15}, {N, 0, 20}};
        att_rig_attend(&r, 0, grow, 2);
        att_rig_fini(&r);
    }
}

/* ---- the inspection calls ---- */

static void test_att_ctx_seq_len_and_read_kv_report_errors(void **state) {
    (void)state;
    att_rig_t r;
    rig_for(&r, "inspect", 700, ATT_DTYPE_F16, 2, 2, 2, 8, 0, 256);
    const att_chunk_t a[] = {{5, 0, 20}};
    att_rig_attend(&r, 0, a, 1);
    uint16_t k[32 * 2 * 8], v[32 * 2 * 8];
    for (uint32_t i = 0; i < r.num_ctx; i++) {
        const att_ctx_t *ctx = r.ctx[i];
        uint32_t len = 0;
        assert_int_equal(att_ctx_seq_len(ctx, 6, 0, &len), AT_ERR_KV_NO_SEQ);
        assert_int_equal(att_ctx_seq_len(ctx, 5, 2, &len), AT_ERR_CALL_LAYER);
        assert_int_equal(att_ctx_seq_len(ctx, 5, UINT32_MAX, &len), AT_ERR_CALL_LAYER);
        assert_int_equal(att_ctx_seq_len(ctx, 5, 1, &len), AT_OK);
        assert_int_equal(len, 0); /* known sequence, layer never written */
        assert_int_equal(att_ctx_read_kv(ctx, 6, 0, 0, 1, k, v), AT_ERR_KV_NO_SEQ);
        assert_int_equal(att_ctx_read_kv(ctx, 5, 2, 0, 1, k, v), AT_ERR_CALL_LAYER);
        assert_int_equal(att_ctx_read_kv(ctx, 5, 0, 0, 21, k, v), AT_ERR_KV_PAST_END);
        assert_int_equal(att_ctx_read_kv(ctx, 5, 0, 20, 1, k, v), AT_ERR_KV_PAST_END);
        assert_int_equal(att_ctx_read_kv(ctx, 5, 0, UINT32_MAX, 2, k, v), AT_ERR_KV_PAST_END);
        assert_int_equal(att_ctx_read_kv(ctx, 5, 1, 0, 1, k, v), AT_ERR_KV_PAST_END);
        /* A middle slice reads the same bytes as the whole. */
        uint16_t all_k[20 * 2 * 8], all_v[20 * 2 * 8];
        assert_int_equal(att_ctx_read_kv(ctx, 5, 0, 0, 20, all_k, all_v), AT_OK);
        assert_int_equal(att_ctx_read_kv(ctx, 5, 0, 7, 9, k, v), AT_OK);
        assert_memory_equal(k, all_k + 7 * 16, 9 * 16 * sizeof k[0]);
        assert_memory_equal(v, all_v + 7 * 16, 9 * 16 * sizeof v[0]);
    }
    att_rig_fini(&r);
}

/* ---- backends ---- */

static void test_att_cpu_reports_its_isa_path(void **state) {
    (void)state;
    att_backend_t *portable = NULL, *native = NULL, *all = NULL;
    att_cpu_cfg_t c = {.num_threads = 1, .isa = ATT_CPU_ISA_PORTABLE};
    assert_int_equal(att_cpu_create(&c, &portable), AT_OK);
    assert_string_equal(att_cpu_isa(portable), "portable");
    assert_string_equal(portable->ops->name, "cpu");
    c = (att_cpu_cfg_t){.num_threads = 2};
    assert_int_equal(att_cpu_create(&c, &native), AT_OK);
    const char *isa = att_cpu_isa(native);
    assert_true(strcmp(isa, "portable") == 0 || strcmp(isa, "x86-64-v3") == 0 ||
                strcmp(isa, "x86-64-v4") == 0);
    print_message("default CPU kernel set: %s\n", isa);
    /* every build the CPU supports can be pinned; one it lacks is refused, not faked */
    for (att_cpu_isa_t i = ATT_CPU_ISA_PORTABLE; i <= ATT_CPU_ISA_X86V4; i++) {
        att_backend_t *pinned = NULL;
        att_cpu_cfg_t pc = {.num_threads = 1, .isa = i};
        at_err_t e = att_cpu_create(&pc, &pinned);
        if (att_cpu_isa_supported(i)) {
            assert_int_equal(e, AT_OK);
            assert_string_equal(att_cpu_isa(pinned), att_cpu_isa_name(i));
        } else {
            assert_int_equal(e, AT_ERR_UNSUPPORTED);
            assert_null(pinned);
        }
        att_backend_destroy(&pinned);
    }
    att_cpu_cfg_t bad = {.num_threads = 1, .isa = (att_cpu_isa_t)99};
    att_backend_t *none = NULL;
    assert_int_equal(att_cpu_create(&bad, &none), AT_ERR_UNSUPPORTED);
    assert_null(none);
    c = (att_cpu_cfg_t){0}; /* one thread per CPU */
    assert_int_equal(att_cpu_create(&c, &all), AT_OK);
    att_backend_destroy(&portable);
    att_backend_destroy(&native);
    att_backend_destroy(&all);
    assert_null(portable);
    att_backend_destroy(NULL);
}

/* Two sessions on one backend, interleaved: runs of different sessions do not mix. */
static void test_att_ctx_two_sessions_share_one_backend(void **state) {
    (void)state;
    tu_where_set("shared backend: ATTND_TEST_SEED=%" PRIu64, g_seed);
    att_backend_t *be = NULL;
    att_cpu_cfg_t bc = {.num_threads = 2, .tile_rows = 8};
    assert_int_equal(att_cpu_create(&bc, &be), AT_OK);
    att_rig_spec_t s1, s2;
    att_rig_spec_init(&s1, ATT_DTYPE_F32, 1, 4, 2, 16, 8);
    att_rig_spec_init(&s2, ATT_DTYPE_F32, 2, 2, 1, 24, 32);
    s2.cfg.sliding_window = 4;
    att_ctx_t *c1 = NULL, *c2 = NULL;
    assert_int_equal(att_ctx_create(be, &s1.cfg, 256, NULL, &c1), AT_OK);
    assert_int_equal(att_ctx_create(be, &s2.cfg, 256, NULL, &c2), AT_OK);
    att_oracle_t *o1 = att_oracle_create(&s1.cfg), *o2 = att_oracle_create(&s2.cfg);
    assert_non_null(o1);
    assert_non_null(o2);
    tu_rng_t rng;
    tu_rng_seed(&rng, tu_sub_seed(g_seed, 600));
    for (uint32_t step = 0; step < 6; step++) {
        for (int which = 0; which < 2; which++) {
            const att_model_cfg_t *m = which ? &s2.cfg : &s1.cfg;
            att_ctx_t *ctx = which ? c2 : c1;
            att_oracle_t *o = which ? o2 : o1;
            const uint32_t n = step == 0 ? 13 : 1;
            const att_chunk_t ch[] = {{7, step == 0 ? 0 : 12 + step, n}};
            const size_t qn = (size_t)n * m->num_query_heads * m->head_dim;
            const size_t kn = (size_t)n * m->num_kv_heads * m->head_dim;
            float *q = tu_xmalloc(qn * 4), *k = tu_xmalloc(kn * 4), *v = tu_xmalloc(kn * 4);
            float *out = tu_xmalloc(qn * 4);
            double *ref = tu_xmalloc(qn * sizeof *ref);
            for (size_t i = 0; i < qn; i++)
                q[i] = tu_rng_float(&rng, -2, 2);
            for (size_t i = 0; i < kn; i++) {
                k[i] = tu_rng_float(&rng, -2, 2);
                v[i] = tu_rng_float(&rng, -1, 1);
            }
            for (uint32_t layer = 0; layer < m->num_layers; layer++) {
                att_call_t c = {layer, ch, 1, q, qn * 4, k, kn * 4, v, kn * 4, out, qn * 4};
                assert_int_equal(att_ctx_attend(ctx, &c, NULL), AT_OK);
                assert_int_equal(att_oracle_run(o, layer, ch, 1, q, k, v, ref), AT_OK);
                for (size_t i = 0; i < qn; i++)
                    TU_CHECK(fabs((double)out[i] - ref[i]) <=
                                 ATT_RIG_TOL_F32_ABS + ATT_RIG_TOL_F32_REL * fabs(ref[i]),
                             "session %d step %u layer %u element %zu: %.9g vs %.9g", which + 1,
                             step, layer, i, (double)out[i], ref[i]);
            }
            free(q);
            free(k);
            free(v);
            free(out);
            free(ref);
        }
    }
    att_oracle_destroy(&o1);
    att_oracle_destroy(&o2);
    att_ctx_destroy(&c1);
    att_ctx_destroy(&c2);
    att_backend_destroy(&be);
}


/* ---- several calls in one run (dynamic batching) ---- */

#define MANY_MAX 6u

/* Two contexts of one model: `merged` runs calls through att_ctx_run_many, `alone` runs the same
 * calls one at a time; everything the two answer must be identical, byte for byte. */
typedef struct many_rig {
    att_backend_t *be;
    att_rig_spec_t spec;
    att_ctx_t *merged;
    att_ctx_t *alone;
    tu_rng_t rng;
} many_rig_t;

static void many_init(many_rig_t *r, att_dtype_t dt, uint64_t capacity, uint64_t seed) {
    memset(r, 0, sizeof *r);
    att_cpu_cfg_t bc = {.num_threads = 2, .tile_rows = 8};
    assert_int_equal(att_cpu_create(&bc, &r->be), AT_OK);
    att_rig_spec_init(&r->spec, dt, 2, 8, 2, 32, 8);
    tu_rng_seed(&r->rng, seed);
    att_rig_spec_features(&r->spec, ATT_RIG_F_LAYER_WINDOW | ATT_RIG_F_SINKS, &r->rng);
    assert_int_equal(att_ctx_create(r->be, &r->spec.cfg, capacity, NULL, &r->merged), AT_OK);
    assert_int_equal(att_ctx_create(r->be, &r->spec.cfg, capacity, NULL, &r->alone), AT_OK);
}

static void many_fini(many_rig_t *r) {
    att_ctx_destroy(&r->merged);
    att_ctx_destroy(&r->alone);
    att_backend_destroy(&r->be);
}

typedef struct many_call {
    att_chunk_t chunks[3];
    att_call_t call;
    uint8_t *q, *k, *v, *out_merged, *out_alone;
} many_call_t;

/* Random tensors for chunks ch[0..n) at layer, exact byte lengths. */
static void many_call_make(many_rig_t *r, many_call_t *mc, uint32_t layer, const att_chunk_t *ch,
                           uint32_t n) {
    const att_model_cfg_t *m = &r->spec.cfg;
    memcpy(mc->chunks, ch, n * sizeof *ch);
    uint32_t t = att_rig_tokens(ch, n);
    size_t es = att_dtype_bytes(m->dtype);
    size_t qb = (size_t)t * m->num_query_heads * m->head_dim * es;
    size_t kb = (size_t)t * m->num_kv_heads * m->head_dim * es;
    mc->q = tu_xmalloc(qb);
    mc->k = tu_xmalloc(kb);
    mc->v = tu_xmalloc(kb);
    mc->out_merged = tu_xcalloc(qb, 1);
    mc->out_alone = tu_xcalloc(qb, 1);
    for (size_t i = 0; i < qb / es; i++)
        att_store(m->dtype, mc->q, i, tu_rng_float(&r->rng, -2, 2));
    for (size_t i = 0; i < kb / es; i++) {
        att_store(m->dtype, mc->k, i, tu_rng_float(&r->rng, -2, 2));
        att_store(m->dtype, mc->v, i, tu_rng_float(&r->rng, -1, 1));
    }
    mc->call = (att_call_t){layer, mc->chunks, n, mc->q, qb, mc->k, kb, mc->v, kb, NULL, qb};
}

static void many_call_free(many_call_t *mc) {
    free(mc->q);
    free(mc->k);
    free(mc->v);
    free(mc->out_merged);
    free(mc->out_alone);
}

static uint64_t runs_of(const att_ctx_t *ctx) {
    att_ctx_info_t info;
    att_ctx_get_info(ctx, &info);
    return info.backend_runs;
}

/* Runs mc[0..n) merged on one context and alone on the other; checks each call's error equals
 * want[i] on both, outputs and caches are identical, and the merged side took want_runs runs. */
static void many_run_check(many_rig_t *r, many_call_t *mc, uint32_t n, int attend,
                           const at_err_t *want, uint64_t want_runs, const char *what) {
    att_call_t calls[MANY_MAX];
    at_err_t errs[MANY_MAX];
    at_diag_t diags[MANY_MAX];
    memset(diags, 0, sizeof diags);
    for (uint32_t i = 0; i < n; i++) {
        calls[i] = mc[i].call;
        calls[i].out = attend ? mc[i].out_merged : NULL;
    }
    uint64_t before = runs_of(r->merged);
    att_ctx_run_many(r->merged, calls, n, attend, errs, diags);
    TU_CHECK(runs_of(r->merged) - before == want_runs, "%s: %" PRIu64 " backend runs, want %" PRIu64,
             what, runs_of(r->merged) - before, want_runs);
    for (uint32_t i = 0; i < n; i++) {
        att_call_t c = mc[i].call;
        c.out = attend ? mc[i].out_alone : NULL;
        at_err_t e = attend ? att_ctx_attend(r->alone, &c, NULL) : att_ctx_append(r->alone, &c, NULL);
        TU_CHECK(errs[i] == want[i] && e == want[i], "%s: call %u: merged %s, alone %s, want %s (%s)",
                 what, i, at_err_name(errs[i]), at_err_name(e), at_err_name(want[i]), diags[i].msg);
        TU_CHECK(errs[i] == AT_OK || diags[i].msg[0] != '\0', "%s: call %u: no diag", what, i);
        if (errs[i] == AT_OK && attend)
            TU_CHECK(memcmp(mc[i].out_merged, mc[i].out_alone, c.out_bytes) == 0,
                     "%s: call %u: merged output differs from the call run alone", what, i);
    }
    /* Both caches hold the same: every sequence of the calls at both layers, byte for byte. */
    const att_model_cfg_t *m = &r->spec.cfg;
    size_t row = (size_t)m->num_kv_heads * m->head_dim * att_dtype_bytes(m->dtype);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t c = 0; c < mc[i].call.num_chunks; c++)
            for (uint32_t layer = 0; layer < m->num_layers; layer++) {
                uint64_t id = mc[i].chunks[c].seq_id;
                uint32_t la = 0, lb = 0;
                at_err_t ea = att_ctx_seq_len(r->merged, id, layer, &la);
                at_err_t eb = att_ctx_seq_len(r->alone, id, layer, &lb);
                TU_CHECK(ea == eb && la == lb, "%s: seq %" PRIu64 " layer %u: length %u vs %u", what,
                         id, layer, la, lb);
                if (ea != AT_OK || la == 0)
                    continue;
                uint8_t *ka = tu_xmalloc(la * row), *va = tu_xmalloc(la * row);
                uint8_t *kb = tu_xmalloc(la * row), *vb = tu_xmalloc(la * row);
                assert_int_equal(att_ctx_read_kv(r->merged, id, layer, 0, la, ka, va), AT_OK);
                assert_int_equal(att_ctx_read_kv(r->alone, id, layer, 0, la, kb, vb), AT_OK);
                TU_CHECK(memcmp(ka, kb, la * row) == 0 && memcmp(va, vb, la * row) == 0,
                         "%s: seq %" PRIu64 " layer %u: cached k/v differ", what, id, layer);
                free(ka);
                free(va);
                free(kb);
                free(vb);
            }
    att_ctx_info_t ia, ib;
    att_ctx_get_info(r->merged, &ia);
    att_ctx_get_info(r->alone, &ib);
    TU_CHECK(ia.kv_used_tokens == ib.kv_used_tokens && ia.num_sequences == ib.num_sequences,
             "%s: used %" PRIu64 "/%" PRIu64 " tokens, %u/%u sequences", what, ia.kv_used_tokens,
             ib.kv_used_tokens, ia.num_sequences, ib.num_sequences);
}

static void many_free_all(many_call_t *mc, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        many_call_free(&mc[i]);
}

/* Calls over distinct sequences share one run and answer exactly as if run alone; a call that
 * fails validation is answered alone and does not keep the others from sharing. */
static void test_att_ctx_run_many_merges_distinct_sequences(void **state) {
    (void)state;
    for (uint32_t d = 0; d < sizeof DTYPES / sizeof DTYPES[0]; d++) {
        tu_where_set("run_many merge dtype %u: ATTND_TEST_SEED=%" PRIu64, d, g_seed);
        many_rig_t r;
        many_init(&r, DTYPES[d], 4096, tu_sub_seed(g_seed, 700 + d));
        /* prefill: 4 calls, 2 sequences each, different lengths, appended in one shared run */
        many_call_t pre[4];
        at_err_t ok[MANY_MAX] = {AT_OK, AT_OK, AT_OK, AT_OK, AT_OK, AT_OK};
        for (uint32_t i = 0; i < 4; i++) {
            att_chunk_t ch[2] = {{10 * i, 0, 9 + 5 * i}, {10 * i + 1, 0, 3 + i}};
            many_call_make(&r, &pre[i], 0, ch, 2);
        }
        many_run_check(&r, pre, 4, 0, ok, 1, "append, 4 calls");
        /* attend at layer 0: decode tokens and a chunk over earlier context, mixed */
        many_call_t step[4];
        for (uint32_t i = 0; i < 4; i++) {
            att_chunk_t ch[2] = {{10 * i, 9 + 5 * i, 1}, {10 * i + 1, 3 + i, 4}};
            many_call_make(&r, &step[i], 0, ch, 2);
        }
        many_run_check(&r, step, 4, 1, ok, 1, "attend, 4 calls");
        /* a malformed call among good ones: its own code, the rest still share a run */
        many_call_t bad[3];
        for (uint32_t i = 0; i < 3; i++) {
            att_chunk_t ch[1] = {{10 * i, 10 + 5 * i, 1}};
            many_call_make(&r, &bad[i], 0, ch, 1);
        }
        bad[1].call.q_bytes -= 2;
        at_err_t want_bad[3] = {AT_OK, AT_ERR_CALL_Q_BYTES, AT_OK};
        many_run_check(&r, bad, 3, 1, want_bad, 1, "one malformed call");
        many_free_all(pre, 4);
        many_free_all(step, 4);
        many_free_all(bad, 3);
        many_fini(&r);
    }
}

/* What cannot share a run runs call by call, in order, each with its own answer: a position past
 * the cached length, a sequence in two calls (the second continues the first), two layers, and
 * capacity for only the first call. */
static void test_att_ctx_run_many_falls_back_to_one_at_a_time(void **state) {
    (void)state;
    tu_where_set("run_many fallback: ATTND_TEST_SEED=%" PRIu64, g_seed);
    many_rig_t r;
    many_init(&r, ATT_DTYPE_BF16, 64, tu_sub_seed(g_seed, 710)); /* 8 blocks of 8 tokens */
    at_err_t ok[MANY_MAX] = {AT_OK, AT_OK, AT_OK, AT_OK, AT_OK, AT_OK};
    many_call_t a[3];
    many_call_make(&r, &a[0], 0, (att_chunk_t[]){{1, 0, 5}}, 1);
    many_call_make(&r, &a[1], 0, (att_chunk_t[]){{2, 3, 2}}, 1); /* seq 2 is empty: past end */
    many_call_make(&r, &a[2], 0, (att_chunk_t[]){{3, 0, 4}}, 1);
    at_err_t want_a[3] = {AT_OK, AT_ERR_KV_PAST_END, AT_OK};
    many_run_check(&r, a, 3, 1, want_a, 2, "position past the end");
    many_call_t b[2];
    many_call_make(&r, &b[0], 0, (att_chunk_t[]){{1, 5, 3}}, 1);
    many_call_make(&r, &b[1], 0, (att_chunk_t[]){{1, 8, 2}, {3, 4, 1}}, 2);
    many_run_check(&r, b, 2, 1, ok, 2, "a sequence in two calls");
    many_call_t c[2];
    many_call_make(&r, &c[0], 0, (att_chunk_t[]){{3, 5, 1}}, 1);
    many_call_make(&r, &c[1], 1, (att_chunk_t[]){{1, 0, 6}}, 1);
    many_run_check(&r, c, 2, 1, ok, 2, "two layers");
    /* used: seq 1 (10 tokens, 2 blocks), seq 3 (6, 1 block); 5 blocks free */
    many_call_t d[2];
    many_call_make(&r, &d[0], 0, (att_chunk_t[]){{4, 0, 24}}, 1);  /* 3 blocks */
    many_call_make(&r, &d[1], 0, (att_chunk_t[]){{5, 0, 24}}, 1);  /* 3 more: too many */
    at_err_t want_d[2] = {AT_OK, AT_ERR_KV_FULL};
    many_run_check(&r, d, 2, 1, want_d, 1, "room for the first call only");
    many_free_all(a, 3);
    many_free_all(b, 2);
    many_free_all(c, 2);
    many_free_all(d, 2);
    many_fini(&r);
}

#define FEATURE_ENTRIES(fname)                                                                   \
    cmocka_unit_test(test_att_ctx_##fname##_matches_oracle_f32),                                 \
        cmocka_unit_test(test_att_ctx_##fname##_matches_oracle_f16),                             \
        cmocka_unit_test(test_att_ctx_##fname##_matches_oracle_bf16)

int main(void) {
    g_seed = tu_base_seed("test_att_ctx");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_cpu_reports_its_isa_path),
        FEATURE_ENTRIES(plain_causal),
        FEATURE_ENTRIES(sliding_window),
        FEATURE_ENTRIES(layer_sliding_window),
        FEATURE_ENTRIES(soft_cap),
        FEATURE_ENTRIES(alibi),
        FEATURE_ENTRIES(sinks),
        FEATURE_ENTRIES(all_features),
        cmocka_unit_test(test_att_ctx_decode_batch_of_many_sequences),
        cmocka_unit_test(test_att_ctx_rollback_and_exact_retry),
        cmocka_unit_test(test_att_ctx_release_frees_sequences_in_every_layer),
        cmocka_unit_test(test_att_ctx_append_then_attend),
        cmocka_unit_test(test_att_ctx_rejects_malformed_calls_and_changes_nothing),
        cmocka_unit_test(test_att_ctx_two_sessions_share_one_backend),
        cmocka_unit_test(test_att_ctx_seq_len_and_read_kv_report_errors),
        cmocka_unit_test(test_att_ctx_run_many_merges_distinct_sequences),
        cmocka_unit_test(test_att_ctx_run_many_falls_back_to_one_at_a_time),
    };
    return cmocka_run_group_tests_name("att_ctx", tests, NULL, NULL);
}

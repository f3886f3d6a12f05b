/* Tests of cache/kvc: block allocation on growth, per-layer lengths, rollback, release, the
 * transaction's all-or-nothing behaviour, and random operation sequences checked against a
 * simple model of the expected state. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cache/kvc.h"

static uint64_t g_seed;

/* ---- a model of the expected state ---- */

#define M_MAX_LAYERS 4u
#define M_MAX_SEQS 32u
#define M_MAX_BLOCKS 64u

typedef struct mseq {
    uint64_t id;
    uint32_t len[M_MAX_LAYERS];  /* tokens per layer */
    uint32_t num_blocks;         /* ceil(max len / block_size) */
    uint32_t blocks[M_MAX_BLOCKS]; /* the table kvc gave it */
} mseq_t;

typedef struct model {
    uint32_t num_layers;
    uint32_t block_size;
    uint32_t num_blocks;
    mseq_t seqs[M_MAX_SEQS];
    uint32_t num_seqs;
} model_t;

static uint32_t blocks_for(const model_t *m, uint32_t tokens) {
    return (tokens + m->block_size - 1) / m->block_size;
}

static mseq_t *m_find(model_t *m, uint64_t id) {
    for (uint32_t i = 0; i < m->num_seqs; i++)
        if (m->seqs[i].id == id)
            return &m->seqs[i];
    return NULL;
}

static uint32_t m_used(const model_t *m) {
    uint32_t u = 0;
    for (uint32_t i = 0; i < m->num_seqs; i++)
        u += m->seqs[i].num_blocks;
    return u;
}

static uint32_t m_max_len(const model_t *m, const mseq_t *s) {
    uint32_t x = 0;
    for (uint32_t l = 0; l < m->num_layers; l++)
        if (s->len[l] > x)
            x = s->len[l];
    return x;
}

/* Everything kvc reports agrees with the model: stats, every length, every table, tables
 * disjoint and in range, unknown ids not found. */
static void check_against_model(const kvc_t *c, const model_t *m) {
    kvc_stats_t st;
    memset(&st, 0xab, sizeof st);
    kvc_get_stats(c, &st);
    TU_CHECK(st.num_blocks == m->num_blocks, "num_blocks %u, want %u", st.num_blocks,
             m->num_blocks);
    TU_CHECK(st.used_blocks == m_used(m), "used_blocks %u, want %u", st.used_blocks, m_used(m));
    TU_CHECK(st.num_sequences == m->num_seqs, "num_sequences %u, want %u", st.num_sequences,
             m->num_seqs);
    uint8_t owner[M_MAX_BLOCKS * 4];
    memset(owner, 0, sizeof owner);
    for (uint32_t i = 0; i < m->num_seqs; i++) {
        const mseq_t *s = &m->seqs[i];
        for (uint32_t l = 0; l < m->num_layers; l++) {
            uint32_t len = 0xdeadbeefu;
            at_err_t e = kvc_seq_len(c, s->id, l, &len);
            TU_CHECK(e == AT_OK && len == s->len[l], "seq %" PRIu64 " layer %u: %s len %u, want %u",
                     s->id, l, at_err_name(e), len, s->len[l]);
        }
        uint32_t nb = 0xdeadbeefu;
        const uint32_t *t = kvc_seq_table(c, s->id, &nb);
        TU_CHECK(t != NULL, "seq %" PRIu64 ": no table", s->id);
        TU_CHECK(nb == s->num_blocks, "seq %" PRIu64 ": table of %u blocks, want %u (max len %u)",
                 s->id, nb, s->num_blocks, m_max_len(m, s));
        for (uint32_t b = 0; b < nb; b++) {
            TU_CHECK(t[b] == s->blocks[b], "seq %" PRIu64 " block %u is %u, was %u", s->id, b,
                     t[b], s->blocks[b]);
            TU_CHECK(t[b] < m->num_blocks, "seq %" PRIu64 " block %u out of range", s->id, t[b]);
            TU_CHECK(!owner[t[b]], "block %u held twice", t[b]);
            owner[t[b]] = 1;
        }
    }
    const uint64_t strangers[] = {0xfeedfacecafebeefull, 777777u};
    for (size_t i = 0; i < sizeof strangers / sizeof strangers[0]; i++) {
        if (m_find((model_t *)m, strangers[i]) != NULL)
            continue;
        uint32_t len = 0, nb = 0;
        TU_CHECK(kvc_seq_len(c, strangers[i], 0, &len) == AT_ERR_KV_NO_SEQ, "unknown seq found");
        TU_CHECK(kvc_seq_table(c, strangers[i], &nb) == NULL, "unknown seq has a table");
    }
}

static kvc_t *make(uint32_t layers, uint32_t block_size, uint32_t num_blocks, model_t *m) {
    kvc_cfg_t cfg = {.num_layers = layers, .block_size = block_size, .num_blocks = num_blocks};
    kvc_t *c = NULL;
    at_err_t e = kvc_create(&cfg, &c);
    TU_CHECK(e == AT_OK && c != NULL, "kvc_create: %s", at_err_name(e));
    memset(m, 0, sizeof *m);
    m->num_layers = layers;
    m->block_size = block_size;
    m->num_blocks = num_blocks;
    check_against_model(c, m);
    return c;
}

/* The outcome the model expects of begin; *maybe_full is set when KV_FULL is also acceptable
 * because the call fits only if blocks freed by its own rollbacks are reused at once (kvc may
 * return those only at commit). */
static at_err_t m_predict(const model_t *m, uint32_t layer, const kvc_span_t *spans, uint32_t n,
                          int *maybe_full) {
    uint32_t need = 0, shrink = 0;
    int past_end = 0;
    for (uint32_t i = 0; i < n; i++) {
        const mseq_t *s = m_find((model_t *)m, spans[i].seq_id);
        uint32_t len = s != NULL ? s->len[layer] : 0;
        if (spans[i].start_pos > len)
            past_end = 1;
        uint32_t newmax = spans[i].start_pos + spans[i].num_tokens;
        uint32_t held = 0;
        if (s != NULL) {
            held = s->num_blocks;
            for (uint32_t l = 0; l < m->num_layers; l++)
                if (l != layer && s->len[l] > newmax)
                    newmax = s->len[l];
        }
        uint32_t want = blocks_for(m, newmax);
        if (want > held)
            need += want - held;
        else
            shrink += held - want;
    }
    uint32_t free_blocks = m->num_blocks - m_used(m);
    *maybe_full = 0;
    if (past_end) {
        *maybe_full = need > free_blocks; /* which check runs first is not specified */
        return AT_ERR_KV_PAST_END;
    }
    if (need <= free_blocks)
        return AT_OK;
    if (need > free_blocks + shrink)
        return AT_ERR_KV_FULL;
    *maybe_full = 1;
    return AT_OK;
}

/* Applies a committed append to the model, taking the tables kvc gave during begin (tables[i],
 * nbs[i] entries; blocks past those, if the sequence needs more, are the ones it held). */
static void m_commit(model_t *m, uint32_t layer, const kvc_span_t *spans, uint32_t n,
                     uint32_t tables[][M_MAX_BLOCKS], const uint32_t *nbs) {
    for (uint32_t i = 0; i < n; i++) {
        mseq_t *s = m_find(m, spans[i].seq_id);
        if (s == NULL) {
            TU_CHECK(m->num_seqs < M_MAX_SEQS, "model full");
            s = &m->seqs[m->num_seqs++];
            memset(s, 0, sizeof *s);
            s->id = spans[i].seq_id;
        }
        s->len[layer] = spans[i].start_pos + spans[i].num_tokens;
        s->num_blocks = blocks_for(m, m_max_len(m, s));
        for (uint32_t b = 0; b < s->num_blocks && b < nbs[i]; b++)
            s->blocks[b] = tables[i][b];
    }
}

static void m_release(model_t *m, uint64_t id) {
    mseq_t *s = m_find(m, id);
    if (s != NULL) {
        *s = m->seqs[m->num_seqs - 1];
        m->num_seqs--;
    }
}

/* Blocks span i's sequence needs after the append: its longest layer with this layer's new
 * length. */
static uint32_t span_needs(const model_t *m, uint32_t layer, const kvc_span_t *sp) {
    const mseq_t *s = m_find((model_t *)m, sp->seq_id);
    uint32_t newmax = sp->start_pos + sp->num_tokens;
    for (uint32_t l = 0; s != NULL && l < m->num_layers; l++)
        if (l != layer && s->len[l] > newmax)
            newmax = s->len[l];
    return blocks_for(m, newmax);
}

/* Checks the tables of a begun append: each covers its span, keeps the blocks the sequence
 * still needs at the front, and the blocks that will hold live data (the first span_needs
 * entries) are shared with no other span and no other sequence. Copies them. */
static void check_begun_tables(const kvc_t *c, const model_t *m, uint32_t layer,
                               const kvc_span_t *spans, uint32_t n,
                               uint32_t tables[][M_MAX_BLOCKS], uint32_t *nbs) {
    uint8_t owner[M_MAX_BLOCKS * 4];
    memset(owner, 0, sizeof owner);
    for (uint32_t i = 0; i < m->num_seqs; i++) {
        int in_call = 0;
        for (uint32_t j = 0; j < n; j++)
            in_call |= spans[j].seq_id == m->seqs[i].id;
        for (uint32_t b = 0; !in_call && b < m->seqs[i].num_blocks; b++)
            owner[m->seqs[i].blocks[b]] = 1;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t nb = 0;
        const uint32_t *t = kvc_append_table(c, i, &nb);
        const uint32_t needs = span_needs(m, layer, &spans[i]);
        TU_CHECK(t != NULL, "span %u: no table", i);
        TU_CHECK((uint64_t)nb * m->block_size >= (uint64_t)spans[i].start_pos + spans[i].num_tokens,
                 "span %u: table of %u blocks cannot hold %u tokens", i, nb,
                 spans[i].start_pos + spans[i].num_tokens);
        TU_CHECK(nb <= M_MAX_BLOCKS && nb <= m->num_blocks, "span %u: table of %u blocks", i, nb);
        const mseq_t *s = m_find((model_t *)m, spans[i].seq_id);
        uint32_t keep = s != NULL ? s->num_blocks : 0;
        keep = keep < needs ? keep : needs;
        keep = keep < nb ? keep : nb;
        for (uint32_t b = 0; b < keep; b++)
            TU_CHECK(t[b] == s->blocks[b], "span %u block %u moved: %u, was %u", i, b, t[b],
                     s->blocks[b]);
        for (uint32_t b = 0; b < nb && b < needs; b++) {
            TU_CHECK(t[b] < m->num_blocks, "span %u block %u out of range", i, t[b]);
            TU_CHECK(!owner[t[b]], "span %u: block %u already held", i, t[b]);
            owner[t[b]] = 1;
        }
        memcpy(tables[i], t, nb * sizeof t[0]);
        nbs[i] = nb;
    }
}

/* begin + commit, asserting success; returns nothing, updates the model. */
static void append_ok(kvc_t *c, model_t *m, uint32_t layer, const kvc_span_t *spans, uint32_t n) {
    uint32_t tables[4][M_MAX_BLOCKS], nbs[4];
    TU_CHECK(n <= 4, "append_ok: too many spans");
    at_diag_t diag = {{0}};
    at_err_t e = kvc_append_begin(c, layer, spans, n, &diag);
    TU_CHECK(e == AT_OK, "kvc_append_begin: %s (%s)", at_err_name(e), diag.msg);
    check_begun_tables(c, m, layer, spans, n, tables, nbs);
    kvc_append_commit(c);
    m_commit(m, layer, spans, n, tables, nbs);
    check_against_model(c, m);
}

static void append_fails(kvc_t *c, const model_t *m, uint32_t layer, const kvc_span_t *spans,
                         uint32_t n, at_err_t want) {
    at_diag_t diag = {{0}};
    at_err_t e = kvc_append_begin(c, layer, spans, n, &diag);
    TU_CHECK(e == want, "kvc_append_begin gave %s, want %s", at_err_name(e), at_err_name(want));
    /* diag is optional; the same failure without it. */
    e = kvc_append_begin(c, layer, spans, n, NULL);
    TU_CHECK(e == want, "kvc_append_begin (no diag) gave %s, want %s", at_err_name(e),
             at_err_name(want));
    check_against_model(c, m);
}

/* ---- directed tests ---- */

static void test_kvc_create_rejects_a_zero_field(void **state) {
    (void)state;
    const kvc_cfg_t bad[] = {{0, 16, 8}, {2, 0, 8}, {2, 16, 0}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kvc_t *c = (kvc_t *)(uintptr_t)0x1234;
        assert_int_equal(kvc_create(&bad[i], &c), AT_ERR_INTERNAL);
        assert_ptr_equal(c, (kvc_t *)(uintptr_t)0x1234); /* untouched on failure */
    }
    kvc_t *none = NULL;
    kvc_destroy(&none);
    kvc_destroy(NULL);
    model_t m;
    kvc_t *c = make(1, 8, 1, &m);
    kvc_destroy(&c);
    assert_null(c);
}

static void test_kvc_allocates_blocks_as_a_sequence_grows(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(2, 16, 8, &m);
    kvc_span_t s = {.seq_id = 7, .start_pos = 0, .num_tokens = 10};
    append_ok(c, &m, 0, &s, 1); /* 10 tokens: 1 block */
    kvc_stats_t st;
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 1);
    assert_int_equal(st.num_sequences, 1);
    s = (kvc_span_t){7, 10, 6};
    append_ok(c, &m, 0, &s, 1); /* exactly 16: still 1 block */
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 1);
    s = (kvc_span_t){7, 16, 1};
    append_ok(c, &m, 0, &s, 1); /* 17: 2 blocks */
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 2);
    /* A layer the sequence never touched has length 0. */
    uint32_t len = 99;
    assert_int_equal(kvc_seq_len(c, 7, 1, &len), AT_OK);
    assert_int_equal(len, 0);
    kvc_destroy(&c);
}

static void test_kvc_lengths_are_per_layer_and_blocks_follow_the_longest(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(3, 16, 16, &m);
    kvc_span_t s = {5, 0, 17};
    append_ok(c, &m, 0, &s, 1);
    s = (kvc_span_t){5, 0, 40};
    append_ok(c, &m, 1, &s, 1);
    s = (kvc_span_t){5, 0, 3};
    append_ok(c, &m, 2, &s, 1);
    uint32_t len = 0, nb = 0;
    assert_int_equal(kvc_seq_len(c, 5, 0, &len), AT_OK);
    assert_int_equal(len, 17);
    assert_int_equal(kvc_seq_len(c, 5, 1, &len), AT_OK);
    assert_int_equal(len, 40);
    assert_int_equal(kvc_seq_len(c, 5, 2, &len), AT_OK);
    assert_int_equal(len, 3);
    assert_non_null(kvc_seq_table(c, 5, &nb));
    assert_int_equal(nb, 3); /* ceil(40 / 16) */
    kvc_destroy(&c);
}

static void test_kvc_rollback_shrinks_once_every_layer_is_short(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(2, 16, 8, &m);
    kvc_span_t s = {1, 0, 40};
    append_ok(c, &m, 0, &s, 1);
    append_ok(c, &m, 1, &s, 1);
    kvc_stats_t st;
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 3);
    /* Layer 0 back to 5 tokens: layer 1 still holds 40, so still 3 blocks. */
    s = (kvc_span_t){1, 0, 5};
    append_ok(c, &m, 0, &s, 1);
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 3);
    /* Layer 1 rolled back to 10 + 2 = 12 tokens: every layer fits one block now. */
    s = (kvc_span_t){1, 10, 2};
    append_ok(c, &m, 1, &s, 1);
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 1);
    uint32_t len = 0;
    assert_int_equal(kvc_seq_len(c, 1, 1, &len), AT_OK);
    assert_int_equal(len, 12);
    /* The freed blocks can be used by another sequence. */
    s = (kvc_span_t){2, 0, 7 * 16};
    append_ok(c, &m, 0, &s, 1);
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 8);
    kvc_destroy(&c);
}

static void test_kvc_same_append_twice_gives_the_same_state(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(2, 8, 16, &m);
    kvc_span_t s[2] = {{1, 0, 20}, {2, 0, 9}};
    append_ok(c, &m, 0, s, 2);
    kvc_span_t retry[2] = {{2, 9, 3}, {1, 12, 30}};
    append_ok(c, &m, 0, retry, 2);
    append_ok(c, &m, 0, retry, 2); /* append_ok checks the state equals the model again */
    kvc_destroy(&c);
}

static void test_kvc_release_frees_blocks_in_every_layer(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(3, 16, 8, &m);
    kvc_span_t s[2] = {{10, 0, 20}, {11, 0, 33}};
    for (uint32_t l = 0; l < 3; l++)
        append_ok(c, &m, l, s, 2);
    uint32_t released = 99;
    const uint64_t ids[] = {10, 10, 12345}; /* a repeat and an unknown id are skipped */
    kvc_release(c, ids, 3, &released);
    assert_int_equal(released, 1);
    m_release(&m, 10);
    check_against_model(c, &m);
    for (uint32_t l = 0; l < 3; l++) {
        uint32_t len = 0;
        assert_int_equal(kvc_seq_len(c, 10, l, &len), AT_ERR_KV_NO_SEQ);
    }
    uint32_t nb = 0;
    assert_null(kvc_seq_table(c, 10, &nb));
    kvc_release(c, ids, 3, NULL); /* released may be NULL; nothing left to free */
    const uint64_t last[] = {11};
    kvc_release(c, last, 1, &released);
    assert_int_equal(released, 1);
    kvc_stats_t st;
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 0);
    assert_int_equal(st.num_sequences, 0);
    /* A released id starts again from position 0 only. */
    kvc_span_t again = {10, 5, 1};
    m_release(&m, 11);
    append_fails(c, &m, 0, &again, 1, AT_ERR_KV_PAST_END);
    again.start_pos = 0;
    append_ok(c, &m, 0, &again, 1);
    kvc_destroy(&c);
}

static void test_kvc_full_leaves_stats_and_tables_unchanged(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(2, 16, 4, &m);
    kvc_span_t a = {1, 0, 40}; /* 3 blocks */
    append_ok(c, &m, 0, &a, 1);
    kvc_span_t b = {2, 0, 20}; /* 2 blocks, 1 free */
    append_fails(c, &m, 0, &b, 1, AT_ERR_KV_FULL);
    /* Together: A grows into its third block (free) and B needs 2: still full; A unchanged. */
    kvc_span_t both[2] = {{1, 40, 5}, {2, 0, 20}};
    append_fails(c, &m, 0, both, 2, AT_ERR_KV_FULL);
    /* A new block for A and one for B: 2 needed, 1 free. */
    kvc_span_t two[2] = {{1, 40, 9}, {2, 0, 1}};
    append_fails(c, &m, 0, two, 2, AT_ERR_KV_FULL);
    /* At another layer too. */
    kvc_span_t a1 = {1, 0, 65};
    append_fails(c, &m, 1, &a1, 1, AT_ERR_KV_FULL);
    /* Exactly full is fine. */
    kvc_span_t fill = {1, 40, 24};
    append_ok(c, &m, 0, &fill, 1);
    kvc_stats_t st;
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 4);
    kvc_span_t one = {1, 64, 1};
    append_fails(c, &m, 0, &one, 1, AT_ERR_KV_FULL);
    kvc_span_t newcomer = {3, 0, 1};
    append_fails(c, &m, 1, &newcomer, 1, AT_ERR_KV_FULL);
    /* Space within held blocks needs no new block: layer 1 up to 64 tokens. */
    kvc_span_t l1 = {1, 0, 64};
    append_ok(c, &m, 1, &l1, 1);
    kvc_destroy(&c);
}

static void test_kvc_past_end_changes_nothing(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(2, 8, 16, &m);
    kvc_span_t a = {1, 0, 10};
    append_ok(c, &m, 0, &a, 1);
    kvc_span_t s = {1, 11, 1}; /* length is 10 */
    append_fails(c, &m, 0, &s, 1, AT_ERR_KV_PAST_END);
    s = (kvc_span_t){2, 1, 1}; /* unknown sequence: length 0 */
    append_fails(c, &m, 0, &s, 1, AT_ERR_KV_PAST_END);
    s = (kvc_span_t){1, 1, 1}; /* layer 1 of seq 1 is empty */
    append_fails(c, &m, 1, &s, 1, AT_ERR_KV_PAST_END);
    /* A valid rollback and a new sequence before the bad span: neither happens. */
    kvc_span_t mix[3] = {{1, 3, 30}, {3, 0, 8}, {1 + 100, 2, 1}};
    append_fails(c, &m, 0, mix, 3, AT_ERR_KV_PAST_END);
    /* start_pos == length is an append, not past the end. */
    s = (kvc_span_t){1, 10, 1};
    append_ok(c, &m, 0, &s, 1);
    kvc_destroy(&c);
}

static void test_kvc_abort_restores_everything(void **state) {
    (void)state;
    model_t m;
    kvc_t *c = make(2, 16, 16, &m);
    kvc_span_t a[2] = {{1, 0, 20}, {2, 0, 50}};
    append_ok(c, &m, 0, a, 2);
    append_ok(c, &m, 1, a, 2);
    /* Growth, rollback, a new sequence: all undone. */
    kvc_span_t t[3] = {{1, 5, 60}, {2, 3, 1}, {3, 0, 33}};
    uint32_t tables[3][M_MAX_BLOCKS], nbs[3];
    assert_int_equal(kvc_append_begin(c, 0, t, 3, NULL), AT_OK);
    check_begun_tables(c, &m, 0, t, 3, tables, nbs);
    kvc_append_abort(c);
    check_against_model(c, &m);
    /* Abort at a layer where the rollback would shrink every layer. */
    kvc_span_t shrink[2] = {{1, 0, 1}, {2, 0, 1}};
    assert_int_equal(kvc_append_begin(c, 1, shrink, 2, NULL), AT_OK);
    kvc_append_abort(c);
    check_against_model(c, &m);
    append_ok(c, &m, 0, shrink, 2);
    append_ok(c, &m, 1, shrink, 2);
    kvc_stats_t st;
    kvc_get_stats(c, &st);
    assert_int_equal(st.used_blocks, 2);
    kvc_destroy(&c);
}

/* ---- random operation sequences against the model ---- */

/* A consumer's copies of the tables (a GPU backend's device-resident ones), kept by the identity
 * kvc_append_ident reports: a copy whose (slot, stamp) a later append reports again must be a
 * prefix of the table then, and of the same sequence. */
typedef struct mirror {
    uint64_t stamp; /* 0: none */
    uint64_t id;
    uint32_t n;
    uint32_t blocks[M_MAX_BLOCKS];
} mirror_t;

/* Checks the begun append's spans against the copies in mir ([M_MAX_SEQS]); counts copies kept
 * (*kept) and found stale by their stamp (*renewed). */
static void check_mirrors(const kvc_t *c, const mirror_t *mir, const kvc_span_t *spans,
                          uint32_t n, uint32_t *kept, uint32_t *renewed) {
    kvc_stats_t st;
    kvc_get_stats(c, &st);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot = UINT32_MAX, nb = 0;
        uint64_t stamp = 0;
        kvc_append_ident(c, i, &slot, &stamp);
        const uint32_t *table = kvc_append_table(c, i, &nb);
        TU_CHECK(slot < st.num_sequences && stamp != 0, "span %u: slot %u of %u, stamp %" PRIu64,
                 i, slot, st.num_sequences, stamp);
        const mirror_t *mr = &mir[slot];
        if (mr->stamp != stamp) {
            *renewed += mr->stamp != 0;
            continue;
        }
        TU_CHECK(mr->id == spans[i].seq_id && mr->n <= nb &&
                     memcmp(mr->blocks, table, mr->n * sizeof *table) == 0,
                 "span %u (seq %" PRIu64 "): the copy of seq %" PRIu64 " under slot %u stamp %"
                 PRIu64 " (%u blocks) is not a prefix of its %u blocks",
                 i, spans[i].seq_id, mr->id, slot, stamp, mr->n, nb);
        (*kept)++;
    }
}

/* After a commit: the copies of the spans' tables as they are now. */
static void take_mirrors(const kvc_t *c, mirror_t *mir, const kvc_span_t *spans, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        uint32_t slot, nb;
        uint64_t stamp;
        kvc_append_ident(c, i, &slot, &stamp);
        const uint32_t *table = kvc_append_table(c, i, &nb);
        mir[slot] = (mirror_t){.stamp = stamp, .id = spans[i].seq_id, .n = nb};
        memcpy(mir[slot].blocks, table, nb * sizeof *table);
    }
}

/* How often each outcome happened over all runs, so the test can show it exercised them all. */
typedef struct outcomes {
    uint32_t ok_commit;
    uint32_t ok_abort;
    uint32_t full;
    uint32_t past_end;
    uint32_t release;
    uint32_t rollback;
    uint32_t kept;    /* a consumer's table copy still valid by its stamp */
    uint32_t renewed; /* one made stale (new stamp or another sequence in its slot) */
} outcomes_t;

static void random_run(uint64_t seed, uint32_t run, outcomes_t *seen) {
    tu_rng_t r;
    tu_rng_seed(&r, seed);
    model_t m;
    const uint32_t layers = tu_rng_range(&r, 1, M_MAX_LAYERS);
    const uint32_t bs = 1u << tu_rng_range(&r, 3, 5); /* 8..32 */
    const uint32_t nb = tu_rng_range(&r, 3, 24);
    kvc_t *c = make(layers, bs, nb, &m);
    static mirror_t mir[M_MAX_SEQS];
    memset(mir, 0, sizeof mir);
    const uint32_t ops = 400;
    for (uint32_t op = 0; op < ops; op++) {
        tu_where_set("seed %" PRIu64 " (ATTND_TEST_SEED=%" PRIu64 "), run %u, op %u (layers %u,"
                     " block %u, blocks %u)",
                     seed, g_seed, run, op, layers, bs, nb);
        if (tu_rng_chance(&r, 1, 4)) { /* release a few ids, known or not, maybe twice */
            uint64_t ids[4];
            uint32_t n = tu_rng_range(&r, 1, 4), expect = 0;
            for (uint32_t i = 0; i < n; i++)
                ids[i] = (i > 0 && tu_rng_chance(&r, 1, 4)) ? ids[i - 1] : tu_rng_range(&r, 1, 12);
            for (uint32_t i = 0; i < n; i++) {
                int dup = 0;
                for (uint32_t j = 0; j < i; j++)
                    dup |= ids[j] == ids[i];
                if (!dup && m_find(&m, ids[i]) != NULL)
                    expect++;
            }
            uint32_t released = 0xdeadu;
            kvc_release(c, ids, n, &released);
            TU_CHECK(released == expect, "released %u, want %u", released, expect);
            for (uint32_t i = 0; i < n; i++)
                m_release(&m, ids[i]);
            check_against_model(c, &m);
            seen->release += expect != 0;
            continue;
        }
        const uint32_t layer = tu_rng_below(&r, layers);
        kvc_span_t spans[4];
        uint32_t n = tu_rng_range(&r, 1, 4);
        for (uint32_t i = 0; i < n; i++) {
            uint64_t id;
            int dup;
            do {
                id = tu_rng_range(&r, 1, 12);
                dup = 0;
                for (uint32_t j = 0; j < i; j++)
                    dup |= spans[j].seq_id == id;
            } while (dup);
            const mseq_t *s = m_find(&m, id);
            uint32_t len = s != NULL ? s->len[layer] : 0;
            uint32_t start;
            if (tu_rng_chance(&r, 1, 25))
                start = len + tu_rng_range(&r, 1, 3); /* past the end */
            else if (tu_rng_chance(&r, 1, 2))
                start = len; /* plain growth */
            else
                start = tu_rng_range(&r, 0, len); /* rollback or retry */
            uint32_t tokens = tu_rng_chance(&r, 1, 2) ? tu_rng_range(&r, 1, 3)
                                                      : tu_rng_range(&r, 1, 3 * bs);
            spans[i] = (kvc_span_t){id, start, tokens};
        }
        int maybe_full = 0;
        at_err_t want = m_predict(&m, layer, spans, n, &maybe_full);
        at_diag_t diag = {{0}};
        at_err_t e = kvc_append_begin(c, layer, spans, n, tu_rng_chance(&r, 1, 2) ? &diag : NULL);
        TU_CHECK(e == want || (maybe_full && e == AT_ERR_KV_FULL),
                 "begin at layer %u with %u spans (first: seq %" PRIu64 " start %u n %u) gave %s,"
                 " want %s%s",
                 layer, n, spans[0].seq_id, spans[0].start_pos, spans[0].num_tokens,
                 at_err_name(e), at_err_name(want), maybe_full ? " (or KV_FULL)" : "");
        if (e != AT_OK) {
            seen->full += e == AT_ERR_KV_FULL;
            seen->past_end += e == AT_ERR_KV_PAST_END;
            check_against_model(c, &m);
            continue;
        }
        for (uint32_t i = 0; i < n; i++) {
            const mseq_t *s = m_find(&m, spans[i].seq_id);
            seen->rollback += s != NULL && spans[i].start_pos < s->len[layer];
        }
        uint32_t tables[4][M_MAX_BLOCKS], nbs[4];
        check_begun_tables(c, &m, layer, spans, n, tables, nbs);
        check_mirrors(c, mir, spans, n, &seen->kept, &seen->renewed);
        if (tu_rng_chance(&r, 1, 5)) {
            kvc_append_abort(c);
            seen->ok_abort++;
        } else {
            seen->ok_commit++;
            /* copied as begun, as a backend does; a commit that returns blocks renews the stamp */
            take_mirrors(c, mir, spans, n);
            kvc_append_commit(c);
            m_commit(&m, layer, spans, n, tables, nbs);
        }
        check_against_model(c, &m);
    }
    kvc_destroy(&c);
    tu_where_set("seed %" PRIu64, g_seed);
}

static void test_kvc_random_ops_match_the_model(void **state) {
    (void)state;
    outcomes_t seen = {0};
    for (uint32_t run = 0; run < 40; run++)
        random_run(tu_sub_seed(g_seed, run), run, &seen);
    print_message("random ops: %u commits, %u aborts, %u KV_FULL, %u KV_PAST_END, %u releases,"
                  " %u rollbacks, %u table copies kept, %u renewed\n",
                  seen.ok_commit, seen.ok_abort, seen.full, seen.past_end, seen.release,
                  seen.rollback, seen.kept, seen.renewed);
    TU_CHECK(seen.ok_commit > 0 && seen.ok_abort > 0 && seen.full > 0 && seen.past_end > 0 &&
                 seen.release > 0 && seen.rollback > 0 && seen.kept > 0 && seen.renewed > 0,
             "the random sequence missed an outcome");
}

int main(void) {
    g_seed = tu_base_seed("test_kvc");
    tu_where_set("seed %" PRIu64, g_seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kvc_create_rejects_a_zero_field),
        cmocka_unit_test(test_kvc_allocates_blocks_as_a_sequence_grows),
        cmocka_unit_test(test_kvc_lengths_are_per_layer_and_blocks_follow_the_longest),
        cmocka_unit_test(test_kvc_rollback_shrinks_once_every_layer_is_short),
        cmocka_unit_test(test_kvc_same_append_twice_gives_the_same_state),
        cmocka_unit_test(test_kvc_release_frees_blocks_in_every_layer),
        cmocka_unit_test(test_kvc_full_leaves_stats_and_tables_unchanged),
        cmocka_unit_test(test_kvc_past_end_changes_nothing),
        cmocka_unit_test(test_kvc_abort_restores_everything),
        cmocka_unit_test(test_kvc_random_ops_match_the_model),
    };
    return cmocka_run_group_tests_name("kvc", tests, NULL, NULL);
}

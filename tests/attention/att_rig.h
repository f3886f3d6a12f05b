/* A test rig for the attention op: one model, several att_ctx (each on its own CPU backend:
 * different thread counts, ISA paths and tile sizes) fed the same calls, and the oracle
 * (att_oracle.h) fed them too. Each step draws random q, k, v from the rig's seed, runs every
 * context, and compares every output element with the oracle under the dtype's tolerance, and
 * each context's cache (lengths, bytes, block use) with the oracle's history.
 *
 * Failures go through TU_CHECK, so they print tu_where() (set it to name the seed and case).
 * Thread: test thread only. */
#ifndef AT_TESTS_ATTENTION_ATT_RIG_H
#define AT_TESTS_ATTENTION_ATT_RIG_H

#include <stddef.h>
#include <stdint.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "tests/attention/att_oracle.h"
#include "tests/test_util.h"

#define ATT_RIG_MAX_CTX 5u
#define ATT_RIG_MAX_LAYERS 8u
#define ATT_RIG_MAX_HEADS 64u
#define ATT_RIG_MAX_SEQS 64u

/* Per-dtype error bounds: |got - ref| <= abs + rel * |ref|, ref the oracle's double.
 * Inputs are |q|,|k| <= 2 and |v| <= 1 (so |out| <= 1), logits of order 1 to 10.
 * - f32: the kernels accumulate in f32 over at most a few hundred terms; their error is around
 *   1e-6. 1e-4 leaves room for a polynomial exp and fused multiply-adds, and still catches one
 *   key too many or too few in a window of a few hundred (an error near 1e-3).
 * - f16: out itself is rounded to f16 (half an ulp is 2^-11 = 4.9e-4 relative at |out| ~ 1) and
 *   a kernel may round probabilities to f16 before P.V (another few 1e-4); 3e-3 covers both.
 * - bf16: rounding out to bf16 costs up to 2^-8 = 3.9e-3 relative, probabilities in bf16 as
 *   much again: 2e-2 abs + 2e-2 rel. */
#define ATT_RIG_TOL_F32_ABS 1e-4
#define ATT_RIG_TOL_F32_REL 1e-4
#define ATT_RIG_TOL_F16_ABS 3e-3
#define ATT_RIG_TOL_F16_REL 3e-3
#define ATT_RIG_TOL_BF16_ABS 2e-2
#define ATT_RIG_TOL_BF16_REL 2e-2

/* Value ranges of the random inputs (see the tolerance comment). */
#define ATT_RIG_QK_RANGE 2.0f
#define ATT_RIG_V_RANGE 1.0f

typedef struct att_rig {
    att_model_cfg_t cfg; /* arrays point into the fields below */
    uint32_t windows[ATT_RIG_MAX_LAYERS];
    float alibi[ATT_RIG_MAX_HEADS];
    float sinks[ATT_RIG_MAX_HEADS];
    uint64_t kv_capacity_tokens; /* as asked */
    uint32_t block_size;         /* resolved */
    uint32_t num_ctx;
    att_cpu_cfg_t be_cfg[ATT_RIG_MAX_CTX];
    att_backend_t *be[ATT_RIG_MAX_CTX];
    int be_borrowed[ATT_RIG_MAX_CTX]; /* 1: given to att_rig_init_with, not destroyed by the rig */
    att_ctx_t *ctx[ATT_RIG_MAX_CTX];
    att_oracle_t *oracle;
    tu_rng_t rng;
    double tol_abs;
    double tol_rel;
    uint64_t ids[ATT_RIG_MAX_SEQS]; /* every seq_id ever used, for cache checks */
    uint32_t num_ids;
} att_rig_t;

/* Optional features of a model, as bits, for random model specs. */
enum {
    ATT_RIG_F_WINDOW = 1u << 0,       /* one sliding_window for every layer */
    ATT_RIG_F_LAYER_WINDOW = 1u << 1, /* layer_sliding_window (some layers 0) */
    ATT_RIG_F_SOFT_CAP = 1u << 2,
    ATT_RIG_F_ALIBI = 1u << 3,
    ATT_RIG_F_SINKS = 1u << 4,
    ATT_RIG_F_SCALE = 1u << 5, /* an explicit scale instead of 1/sqrt(D) */
    ATT_RIG_F_ALL = (1u << 6) - 1u,
};

/* A model cfg with its arrays. */
typedef struct att_rig_spec {
    att_model_cfg_t cfg;
    uint32_t windows[ATT_RIG_MAX_LAYERS];
    float alibi[ATT_RIG_MAX_HEADS];
    float sinks[ATT_RIG_MAX_HEADS];
} att_rig_spec_t;

/* Fills s with shapes and dtype, no features (cfg.*_window etc. zero). */
void att_rig_spec_init(att_rig_spec_t *s, att_dtype_t dtype, uint32_t layers, uint32_t hq,
                       uint32_t hkv, uint32_t d, uint32_t block_size);
/* Turns on the features in feats with random values from r (windows from 1 token up, soft caps
 * that bite, standard or random ALiBi slopes, sinks in [-3, 3]). */
void att_rig_spec_features(att_rig_spec_t *s, unsigned feats, tu_rng_t *r);
/* A matrix case's model: 1 or 2 layers and each feature on with probability 1/2, drawn from r
 * in that order, over the given shapes. */
void att_rig_spec_draw(att_rig_spec_t *s, att_dtype_t dtype, uint32_t hq, uint32_t hkv,
                       uint32_t d, uint32_t block_size, tu_rng_t *r);
/* A short description of s ("f16 L2 Hq8/Hkv2 D64 B16 window=17 cap=3.2 ..."). */
const char *att_rig_spec_str(const att_rig_spec_t *s, char *buf, size_t n);

/* The tolerance of dtype t (the constants above). */
void att_rig_tolerance(att_dtype_t t, double *abs_tol, double *rel_tol);

/* Makes the rig: copies cfg (and its arrays), creates one backend and context per bes[i] and the
 * oracle, seeds the input generator. Asserts that every creation succeeds. */
void att_rig_init(att_rig_t *r, const att_model_cfg_t *cfg, uint64_t kv_capacity_tokens,
                  const att_cpu_cfg_t *bes, uint32_t num_bes, uint64_t seed);
/* The same, plus one context on each of extra[0..num_extra) (borrowed: another backend, a GPU;
 * they must outlive the rig), after the CPU ones. */
void att_rig_init_with(att_rig_t *r, const att_model_cfg_t *cfg, uint64_t kv_capacity_tokens,
                       const att_cpu_cfg_t *bes, uint32_t num_bes, att_backend_t *const *extra,
                       uint32_t num_extra, uint64_t seed);
/* Destroys everything; asserts nothing leaked in the contexts' bookkeeping is left dangling. */
void att_rig_fini(att_rig_t *r);

/* Adds id to the ids that cache checks and snapshots look at (attend/append add theirs). */
void att_rig_note_id(att_rig_t *r, uint64_t id);

/* Tokens of a chunk list. */
uint32_t att_rig_tokens(const att_chunk_t *chunks, uint32_t n);

/* Random tensors for T tokens in the model's dtype; caller frees each. */
void *att_rig_random_q(att_rig_t *r, uint32_t t);
void *att_rig_random_kv(att_rig_t *r, uint32_t t, float range);

/* Builds an att_call_t over the given tensors with exact byte lengths. */
att_call_t att_rig_call(const att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                        const void *q, const void *k, const void *v, void *out);

/* One attention step with random inputs on every context: asserts AT_OK, compares out with the
 * oracle, then checks the caches (att_rig_check_cache). */
void att_rig_attend(att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n);
/* att_rig_attend at every layer, 0 to L-1. */
void att_rig_attend_layers(att_rig_t *r, const att_chunk_t *chunks, uint32_t n);
/* The same with given inputs; out_each (may be NULL) receives a copy of each context's out bytes
 * ([num_ctx] buffers the caller frees). */
void att_rig_attend_with(att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                         const void *q, const void *k, const void *v, void **out_each);
/* Append-only (att_ctx_append) with random k, v; q and out NULL. */
void att_rig_append(att_rig_t *r, uint32_t layer, const att_chunk_t *chunks, uint32_t n);

/* Releases ids on every context and the oracle; asserts the released count on each. */
void att_rig_release(att_rig_t *r, const uint64_t *ids, uint32_t n, uint32_t expect_released);

/* Every context's cache against the oracle: seq lengths at every layer for every id ever used
 * (KV_NO_SEQ for released ones), read_kv bytes decoded equal the oracle's history exactly,
 * num_sequences, kv_used_tokens = sum of ceil(max length / block) * block, capacity. */
void att_rig_check_cache(att_rig_t *r);

/* A byte-exact picture of one context's cache, taken through its public API. */
typedef struct att_rig_snap att_rig_snap_t;
att_rig_snap_t *att_rig_snapshot(const att_rig_t *r, uint32_t ctx_index);
/* Asserts the context's cache equals the snapshot (info, every seq_len result, read_kv bytes). */
void att_rig_snapshot_check(const att_rig_t *r, uint32_t ctx_index, const att_rig_snap_t *s,
                            const char *what);
void att_rig_snapshot_free(att_rig_snap_t **s);

/* Compares out bytes (dtype, [T, Hq, D]) of context ctx_index with the oracle's ref. */
void att_rig_compare(const att_rig_t *r, uint32_t ctx_index, uint32_t layer,
                     const att_chunk_t *chunks, uint32_t n, const void *out, const double *ref);

#endif

/* The CPU attention kernel: one work item (a chunk's query tile x a range of KV heads) with online
 * softmax over key tiles. Included once per instruction set with ATT_CPU_KERN_NAME set.
 *
 * Plain loops, written so that GCC vectorizes them (checked with -fopt-info-vec and objdump):
 * branch-free exp, masks and conversions, size_t indices. The two register-blocked
 * micro-kernels (scores and P x V for four rows) use GCC/Clang vector types instead, because
 * GCC 12 spilled their accumulators when they were written as loops (see vf). Keys and values
 * are converted to f32 in registers as they are loaded; the kernel body is specialized per dtype.
 * Thread: called from pool threads, each with its own scratch; reads the job, writes only its own
 * rows of out. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "attention/att_cpu_int.h"
#include "attention/att_dtype.h"

#ifndef ATT_CPU_KERN_NAME
#error "define ATT_CPU_KERN_NAME before including att_cpu_kern_impl.h"
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Below this exponent expf is under the smallest normal float; masked logits (-inf) land here
 * and must give exactly 0. */
#define EXP_LO (-87.0f)
#define EXP_HI 88.0f

/* expf to about 1 ulp: 2^n * e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial (error
 * below 1.2e-7 relative). n is rounded with the 1.5 * 2^23 trick so the loop stays branch-free. */
static inline float exp_f32(float x) {
    float xc = x < EXP_LO ? EXP_LO : (x > EXP_HI ? EXP_HI : x);
    float t = xc * 1.44269504088896341f + 12582912.0f;
    int32_t n = (int32_t)(att_f32_bits(t) - att_f32_bits(12582912.0f));
    float nf = t - 12582912.0f;
    float r = xc - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float y = p * att_bits_f32((uint32_t)(n + 127) << 23);
    return x < EXP_LO ? 0.0f : y;
}

/* VL floats as one value of GCC/Clang's vector extension: plain C arithmetic that the compiler
 * maps onto the target's registers. Written as loops over [4][8] float arrays, the micro-kernels
 * below ran at a third of this speed: GCC 12's SLP vectorizer spilled some of the eight
 * accumulators to the stack on every iteration, or fell back to scalar code, depending on the
 * loop's shape. VL is one register of the build's target (8 with AVX, 4 with SSE2 or NEON): a
 * wider vector than the target's registers is kept in memory by GCC, ten times slower. head_dim
 * is a multiple of 8, so of VL. Unaligned loads and stores go through memcpy. */
#if defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));

static ALWAYS_INLINE vf vf_load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static ALWAYS_INLINE void vf_store(float *p, vf v) { memcpy(p, &v, sizeof v); }

static ALWAYS_INLINE float vf_sum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++)
        s += v[l];
    return s;
}

/* out[k] = the sum of the lanes of x[k], for eight vectors. With eight lanes: three levels of
 * pairwise shuffles and adds, 21 operations instead of eight horizontal sums (about 56). */
static ALWAYS_INLINE void vf_sum8(const vf x[8], float out[8]) {
#if VL == 8
#define PAIR_(a, b)                                                                                \
    (__builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13) +                                     \
     __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15))
#define QUAD_(a, b)                                                                                \
    (__builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +                                     \
     __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15))
    vf q0 = QUAD_(PAIR_(x[0], x[1]), PAIR_(x[2], x[3]));
    vf q1 = QUAD_(PAIR_(x[4], x[5]), PAIR_(x[6], x[7]));
#undef PAIR_
#undef QUAD_
    vf_store(out, __builtin_shufflevector(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11) +
                      __builtin_shufflevector(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15));
#else
    for (int k = 0; k < 8; k++)
        out[k] = vf_sum(x[k]);
#endif
}

static ALWAYS_INLINE vf vf_from_bits(vu u) {
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static ALWAYS_INLINE vu vf_bits(vf f) {
    vu u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Elements i..i+VL-1 of a K or V row of dtype t, as f32; the same rules as att_dtype.h (exact).
 * t is a constant in every caller, so each specialization keeps one branch-free path. */
static ALWAYS_INLINE vf kv_load(att_dtype_t t, const void *base, size_t i) {
    if (t == ATT_DTYPE_F32)
        return vf_load((const float *)base + i);
    /* Built element by element, the widening compiles to one vpmovzxwd on AVX2; through
     * __builtin_convertvector GCC 12 split it into 128-bit halves (five instructions). */
    const uint16_t *h = (const uint16_t *)base + i;
#if VL == 8
    vu w = {h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]};
#else
    vu w = {h[0], h[1], h[2], h[3]};
#endif
    if (t == ATT_DTYPE_BF16)
        return vf_from_bits(w << 16);
    /* f16: as att_f16_to_f32, all lanes at once */
    vu mag = (w & 0x7fffu) << 13;
    vu r = vf_bits(vf_from_bits(mag) * 0x1p112f);
    vu special = (vu)(mag >= 0x0f800000u); /* all ones where the exponent is 31 */
    r = (r & ~special) | ((mag | 0x7f800000u) & special);
    return vf_from_bits(r | ((w & 0x8000u) << 16));
}

/* Scores of four rows (q, stride d floats) against keys k[0..nk) (stride d elements of t), into
 * s[row * ATT_CPU_KEY_TILE + key]. Two keys at a time: eight independent accumulators, each key
 * vector loaded and converted once for four rows. */
static ALWAYS_INLINE void scores4(att_dtype_t t, const float *restrict q, const void *k, size_t nk,
                                  size_t d, float *restrict s) {
    size_t j = 0;
    for (; j + 2 <= nk; j += 2) {
        vf a[8] = {{0}}; /* a[2r + c]: row r, key j + c */
        for (size_t i = 0; i < d; i += VL) {
            vf x0 = kv_load(t, k, j * d + i), x1 = kv_load(t, k, (j + 1) * d + i);
            for (size_t r = 0; r < 4; r++) {
                vf qv = vf_load(q + r * d + i);
                a[2 * r] += qv * x0;
                a[2 * r + 1] += qv * x1;
            }
        }
        float sums[8];
        vf_sum8(a, sums);
        for (size_t r = 0; r < 4; r++) {
            s[r * ATT_CPU_KEY_TILE + j] = sums[2 * r];
            s[r * ATT_CPU_KEY_TILE + j + 1] = sums[2 * r + 1];
        }
    }
    if (j < nk) {
        vf a[4] = {{0}};
        for (size_t i = 0; i < d; i += VL) {
            vf x0 = kv_load(t, k, j * d + i);
            for (size_t r = 0; r < 4; r++)
                a[r] += vf_load(q + r * d + i) * x0;
        }
        for (size_t r = 0; r < 4; r++)
            s[r * ATT_CPU_KEY_TILE + j] = vf_sum(a[r]);
    }
}

/* One row's scores against keys k[0..nk), for groups of fewer than four rows. */
static ALWAYS_INLINE void scores1(att_dtype_t t, const float *restrict q, const void *k, size_t nk,
                                  size_t d, float *restrict s) {
    for (size_t j = 0; j < nk; j++) {
        vf a[2] = {{0}};
        size_t i = 0;
        for (; i + 2 * VL <= d; i += 2 * VL) {
            a[0] += vf_load(q + i) * kv_load(t, k, j * d + i);
            a[1] += vf_load(q + i + VL) * kv_load(t, k, j * d + i + VL);
        }
        if (i < d)
            a[0] += vf_load(q + i) * kv_load(t, k, j * d + i);
        s[j] = vf_sum(a[0] + a[1]);
    }
}

/* Four rows: o[r] = alpha[r] * o[r] + sum over keys j of p[r][j] * v[j]. Two vectors x 4 rows:
 * eight independent accumulators, each value vector loaded and converted once for four rows. */
static ALWAYS_INLINE void pv4(att_dtype_t t, const float *restrict p, const void *v,
                              float *restrict o, const float alpha[4], size_t nk, size_t d) {
    size_t i = 0;
    for (; i + 2 * VL <= d; i += 2 * VL) {
        vf a[8] = {{0}}; /* a[2r + c]: row r, lanes i + c * VL */
        for (size_t j = 0; j < nk; j++) {
            vf x0 = kv_load(t, v, j * d + i), x1 = kv_load(t, v, j * d + i + VL);
            for (size_t r = 0; r < 4; r++) {
                float pr = p[r * ATT_CPU_KEY_TILE + j];
                a[2 * r] += pr * x0;
                a[2 * r + 1] += pr * x1;
            }
        }
        for (size_t r = 0; r < 4; r++) {
            float *orow = o + r * d + i;
            vf_store(orow, vf_load(orow) * alpha[r] + a[2 * r]);
            vf_store(orow + VL, vf_load(orow + VL) * alpha[r] + a[2 * r + 1]);
        }
    }
    if (i < d) {
        vf a[4] = {{0}};
        for (size_t j = 0; j < nk; j++) {
            vf x0 = kv_load(t, v, j * d + i);
            for (size_t r = 0; r < 4; r++)
                a[r] += p[r * ATT_CPU_KEY_TILE + j] * x0;
        }
        for (size_t r = 0; r < 4; r++)
            vf_store(o + r * d + i, vf_load(o + r * d + i) * alpha[r] + a[r]);
    }
}

/* One row: o = alpha * o + sum over keys j of p[j] * v[j]. */
static ALWAYS_INLINE void pv1(att_dtype_t t, const float *restrict p, const void *v,
                              float *restrict o, float alpha, size_t nk, size_t d) {
    for (size_t i = 0; i < d; i += VL) {
        vf a = {0};
        for (size_t j = 0; j < nk; j++)
            a += p[j] * kv_load(t, v, j * d + i);
        vf_store(o + i, vf_load(o + i) * alpha + a);
    }
}

/* Soft cap, ALiBi and the mask on one row's raw scores of the key tile [j0, j0 + nk). */
static inline void row_adjust(const att_cpu_job_t *job, float *restrict s, size_t nk, uint32_t j0,
                              uint32_t pos, uint32_t head) {
    const att_model_t *m = job->m;
    if (m->soft_cap > 0.0f) {
        float c = m->soft_cap, inv2 = 2.0f / m->soft_cap;
        for (size_t j = 0; j < nk; j++)
            s[j] = c * (1.0f - 2.0f / (exp_f32(s[j] * inv2) + 1.0f)); /* c * tanh(s / c) */
    }
    if (m->alibi != NULL) {
        float slope = m->alibi[head];
        float base = (float)((int32_t)j0 - (int32_t)pos);
        for (size_t j = 0; j < nk; j++)
            s[j] += slope * (base + (float)j);
    }
    /* keys allowed: lo <= key <= pos; only tiles that straddle a bound pay for the mask */
    uint32_t lo = (job->window != 0 && pos + 1 > job->window) ? pos + 1 - job->window : 0;
    if (j0 < lo || j0 + nk - 1 > pos) {
        for (size_t j = 0; j < nk; j++) {
            size_t key = j0 + j;
            s[j] = (key < lo || key > pos) ? -INFINITY : s[j];
        }
    }
}

/* Turns one row's adjusted scores into probabilities against its new running max, updates the
 * max and denominator, and returns the factor that rescales the row's output so far. */
static inline float row_softmax(float *restrict s, float *m_run, float *l_run, size_t nk) {
    float mx = -INFINITY;
    for (size_t j = 0; j < nk; j++)
        mx = s[j] > mx ? s[j] : mx;
    float m_new = mx > *m_run ? mx : *m_run;
    if (m_new == -INFINITY) { /* every key so far is masked for this row: contribute nothing */
        for (size_t j = 0; j < nk; j++)
            s[j] = 0.0f;
        return 1.0f;
    }
    float alpha = exp_f32(*m_run - m_new);
    for (size_t j = 0; j < nk; j++) /* alone in its loop so that it vectorizes */
        s[j] = exp_f32(s[j] - m_new);
    float sum = 0.0f;
    for (size_t j = 0; j < nk; j++)
        sum += s[j];
    *l_run = *l_run * alpha + sum;
    *m_run = m_new;
    return alpha;
}

/* Byte offset of key j's row within a layer's K (or V) storage, for the item's first KV head. */
static inline size_t tile_offset(const att_batch_chunk_t *ch, uint32_t j, uint32_t bs,
                                 size_t block_stride, size_t head_off, size_t row_bytes) {
    return (size_t)ch->blocks[j / bs] * block_stride + head_off + (size_t)(j % bs) * row_bytes;
}

/* Token (row of the chunk's q and out) and query head of an item's row r; rows are laid out as
 * in attend_tiles. */
static inline void row_origin(const att_cpu_item_t *it, uint32_t g, uint32_t r, uint32_t *tok,
                              uint32_t *head) {
    uint32_t per_head = it->q_count * g;
    *tok = it->q_begin + (r % per_head) / g;
    *head = (it->kv_head + r / per_head) * g + r % g;
}

/* Queries of the item as f32, pre-scaled, with fresh softmax state. */
static void load_queries(const att_cpu_job_t *job, const att_cpu_item_t *it,
                         att_cpu_scratch_t *sc) {
    const att_model_t *m = job->m;
    const att_batch_chunk_t *ch = &job->b->chunks[it->chunk];
    const uint32_t d = m->head_dim, g = m->group, per_head = it->q_count * g;
    const size_t es = att_dtype_bytes(m->dtype);
    for (uint32_t r = 0; r < per_head * it->num_heads; r++) {
        uint32_t tok, head;
        row_origin(it, g, r, &tok, &head);
        const uint8_t *src =
            (const uint8_t *)ch->q + ((size_t)tok * m->num_query_heads + head) * d * es;
        float *q = sc->q + (size_t)r * d;
        for (size_t i = 0; i < d; i++)
            q[i] = att_load(m->dtype, src, i) * m->scale;
        for (size_t i = 0; i < d; i++)
            sc->o[(size_t)r * d + i] = 0.0f;
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
    }
}

/* Normalizes each row (sinks join the denominator) and writes it to out in the model's dtype. */
static void store_outputs(const att_cpu_job_t *job, const att_cpu_item_t *it,
                          const att_cpu_scratch_t *sc) {
    const att_model_t *m = job->m;
    const att_batch_chunk_t *ch = &job->b->chunks[it->chunk];
    const uint32_t d = m->head_dim, g = m->group, per_head = it->q_count * g;
    const size_t es = att_dtype_bytes(m->dtype);
    for (uint32_t r = 0; r < per_head * it->num_heads; r++) {
        uint32_t tok, head;
        row_origin(it, g, r, &tok, &head);
        float mr = sc->m[r], lr = sc->l[r], scale_o;
        if (m->sinks != NULL) {
            /* rebase on the larger of the sink and the running max before adding exp(sink) */
            float sink = m->sinks[head], top = sink > mr ? sink : mr;
            float keep = exp_f32(mr - top);
            scale_o = keep / (lr * keep + exp_f32(sink - top));
        } else {
            scale_o = 1.0f / lr;
        }
        const float *o = sc->o + (size_t)r * d;
        uint8_t *dst = (uint8_t *)ch->out + ((size_t)tok * m->num_query_heads + head) * d * es;
        for (size_t i = 0; i < d; i++)
            att_store(m->dtype, dst, i, o[i] * scale_o);
    }
}

/* The key-tile loop of one item, for KV dtype t (a constant in each caller).
 * Rows are head-major, then token, then query head within the group: row hl * per_head +
 * tq * group + gi is query head (kv_head + hl) * group + gi of token q_begin + tq, at position
 * first + tq. */
static ALWAYS_INLINE void attend_tiles(att_dtype_t t, const att_cpu_job_t *job,
                                       const att_cpu_item_t *it, att_cpu_scratch_t *sc) {
    const att_model_t *m = job->m;
    const att_batch_chunk_t *ch = &job->b->chunks[it->chunk];
    const uint32_t d = m->head_dim, g = m->group, bs = m->block_size;
    const uint32_t per_head = it->q_count * g;
    const size_t row_bytes = (size_t)d * att_dtype_bytes(t);
    const size_t head_stride = (size_t)bs * row_bytes; /* one head of one block */
    const size_t block_stride = head_stride * m->num_kv_heads;
    const uint32_t first = ch->start_pos + it->q_begin, last = first + it->q_count - 1;
    const uint32_t j_lo =
        (job->window != 0 && first + 1 > job->window) ? first + 1 - job->window : 0;
    const uint32_t tile = bs < job->key_tile ? bs : job->key_tile;

    for (uint32_t j0 = j_lo - j_lo % tile; j0 <= last; j0 += tile) {
        const size_t nk = last + 1 - j0 < tile ? last + 1 - j0 : tile;
        const size_t off0 =
            tile_offset(ch, j0, bs, block_stride, it->kv_head * head_stride, row_bytes);
        for (uint32_t hl = 0; hl < it->num_heads; hl++) {
            const uint8_t *k = job->k_layer + off0 + hl * head_stride;
            const uint8_t *v = job->v_layer + off0 + hl * head_stride;
            for (uint32_t rr0 = 0; rr0 < per_head; rr0 += 4) {
                uint32_t n = per_head - rr0 < 4 ? per_head - rr0 : 4;
                if (j0 > first + (rr0 + n - 1) / g)
                    continue; /* every key of this tile is after every row of the group */
                uint32_t r0 = hl * per_head + rr0;
                const float *q = sc->q + (size_t)r0 * d;
                if (n == 4)
                    scores4(t, q, k, nk, d, sc->s);
                else
                    for (uint32_t i = 0; i < n; i++)
                        scores1(t, q + (size_t)i * d, k, nk, d, sc->s + i * ATT_CPU_KEY_TILE);
                float alpha[4];
                for (uint32_t i = 0; i < n; i++) {
                    uint32_t rr = rr0 + i;
                    float *srow = sc->s + (size_t)i * ATT_CPU_KEY_TILE;
                    row_adjust(job, srow, nk, j0, first + rr / g, (it->kv_head + hl) * g + rr % g);
                    alpha[i] = row_softmax(srow, &sc->m[r0 + i], &sc->l[r0 + i], nk);
                }
                float *o = sc->o + (size_t)r0 * d;
                if (n == 4)
                    pv4(t, sc->s, v, o, alpha, nk, d);
                else
                    for (uint32_t i = 0; i < n; i++)
                        pv1(t, sc->s + i * ATT_CPU_KEY_TILE, v, o + (size_t)i * d, alpha[i], nk,
                            d);
            }
        }
    }
}

void ATT_CPU_KERN_NAME(const att_cpu_job_t *job, const att_cpu_item_t *it, att_cpu_scratch_t *sc) {
    load_queries(job, it, sc);
    switch (job->m->dtype) {
    case ATT_DTYPE_F16: attend_tiles(ATT_DTYPE_F16, job, it, sc); break;
    case ATT_DTYPE_BF16: attend_tiles(ATT_DTYPE_BF16, job, it, sc); break;
    default: attend_tiles(ATT_DTYPE_F32, job, it, sc); break;
    }
    store_outputs(job, it, sc);
}

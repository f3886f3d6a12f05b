/* The CPU attention kernel: one work item (a chunk's query tile x one KV head) with online softmax
 * over key tiles. Included once per instruction set with ATT_CPU_KERN_NAME set.
 *
 * Plain loops written so that GCC vectorizes them (checked with -fopt-info-vec and objdump):
 * dot products keep 32 independent lanes (four vector chains, no reassociation needed), tile
 * conversions and exp are branch-free. Thread: called from pool threads, each with its own
 * scratch; reads the job, writes only its own rows of out. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "attention/att_cpu_int.h"
#include "attention/att_dtype.h"

#ifndef ATT_CPU_KERN_NAME
#error "define ATT_CPU_KERN_NAME before including att_cpu_kern_impl.h"
#endif

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

static inline float hsum8(const float x[8]) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* Four rows (stride qs floats) against one key: each key vector is loaded once for four FMAs.
 * d is a multiple of 8. Out of line, like dot1: inlined into the loop over keys, GCC vectorized
 * across keys instead (strided gathers). Loop indices in this file are size_t: with uint32_t,
 * wrap-around is defined, GCC cannot prove accesses contiguous and emits gathers too. */
static __attribute__((noinline)) void dot4(const float *restrict q, size_t qs,
                                           const float *restrict k, size_t d, float out[4]) {
    float a[4][8];
    for (size_t r = 0; r < 4; r++)
        for (size_t l = 0; l < 8; l++)
            a[r][l] = 0.0f;
    for (size_t i = 0; i < d; i += 8)
        for (size_t r = 0; r < 4; r++)
            for (size_t l = 0; l < 8; l++)
                a[r][l] += q[r * qs + i + l] * k[i + l];
    for (size_t r = 0; r < 4; r++)
        out[r] = hsum8(a[r]);
}

/* One row against one key, 16 lanes in two chains. d is a multiple of 8. */
static __attribute__((noinline)) float dot1(const float *restrict q, const float *restrict k,
                                            size_t d) {
    float a[16];
    for (size_t l = 0; l < 16; l++)
        a[l] = 0.0f;
    size_t i = 0;
    for (; i + 16 <= d; i += 16)
        for (size_t l = 0; l < 16; l++)
            a[l] += q[i + l] * k[i + l];
    for (; i < d; i += 8)
        for (size_t l = 0; l < 8; l++)
            a[l] += q[i + l] * k[i + l];
    for (size_t l = 0; l < 8; l++)
        a[l] += a[l + 8];
    return hsum8(a);
}

/* Raw scores of n <= 4 consecutive rows (q, stride d) against the nk keys of kf, into
 * s[row * ATT_CPU_KEY_TILE + key]. */
static void group_scores(const float *restrict q, uint32_t n, const float *restrict kf,
                         size_t nk, size_t d, float *restrict s) {
    for (size_t j = 0; j < nk; j++) {
        if (n == 4) {
            float o[4];
            dot4(q, d, kf + j * d, d, o);
            for (size_t r = 0; r < 4; r++)
                s[r * ATT_CPU_KEY_TILE + j] = o[r];
        } else {
            for (size_t r = 0; r < n; r++)
                s[r * ATT_CPU_KEY_TILE + j] = dot1(q + r * d, kf + j * d, d);
        }
    }
}

/* A tile's rows are contiguous, but consecutive tiles of one head are a block apart (other heads
 * lie between), so the hardware prefetcher, which stops at page edges, starts cold on each tile.
 * Asking for the next tile while this one is computed keeps memory busy. */
static inline void prefetch_bytes(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i += 64)
        __builtin_prefetch(p + i, 0, 2); /* into L2: a tile of all the item's heads exceeds L1 */
}

static inline void to_f32(att_dtype_t t, const void *restrict src, float *restrict dst, size_t n) {
    if (t == ATT_DTYPE_BF16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = att_bf16_to_f32(s[i]);
    } else if (t == ATT_DTYPE_F16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = att_f16_to_f32(s[i]);
    } else {
        const float *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = s[i];
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

/* One row: o = alpha * o + sum over keys j of p[j] * v[j], for n output lanes of value rows
 * that are vs floats apart; 32 lanes at a time so the sums stay in registers across keys. The
 * sums start at zero and o is read once at the end: loading o into the accumulators made GCC copy
 * it through the stack in halves, and the wide reload stalled on store forwarding. n is a
 * multiple of 8. */
static inline void accumulate_pv(const float *restrict p, const float *restrict vf,
                                 float *restrict o, float alpha, size_t nk, size_t n, size_t vs) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        float acc[32];
        for (size_t l = 0; l < 32; l++)
            acc[l] = 0.0f;
        for (size_t j = 0; j < nk; j++)
            for (size_t l = 0; l < 32; l++)
                acc[l] += p[j] * vf[j * vs + i + l];
        for (size_t l = 0; l < 32; l++)
            o[i + l] = o[i + l] * alpha + acc[l];
    }
    for (; i < n; i += 8) {
        float acc[8];
        for (size_t l = 0; l < 8; l++)
            acc[l] = 0.0f;
        for (size_t j = 0; j < nk; j++)
            for (size_t l = 0; l < 8; l++)
                acc[l] += p[j] * vf[j * vs + i + l];
        for (size_t l = 0; l < 8; l++)
            o[i + l] = o[i + l] * alpha + acc[l];
    }
}

/* Four rows at once: o[r] = alpha[r] * o[r] + sum over keys j of p[r][j] * v[j]. 16 lanes x 4
 * rows keep eight independent FMA chains in registers and load each value vector once for four
 * rows. d is a multiple of 8 (the last step covers 8 lanes). */
static inline void accumulate_pv4(const float *restrict p, const float *restrict vf,
                                  float *restrict o, const float alpha[4], size_t nk, size_t d) {
    size_t i = 0;
    for (; i + 16 <= d; i += 16) {
        float a[4][16];
        for (size_t r = 0; r < 4; r++)
            for (size_t l = 0; l < 16; l++)
                a[r][l] = 0.0f;
        for (size_t j = 0; j < nk; j++)
            for (size_t r = 0; r < 4; r++)
                for (size_t l = 0; l < 16; l++)
                    a[r][l] += p[r * ATT_CPU_KEY_TILE + j] * vf[j * d + i + l];
        for (size_t r = 0; r < 4; r++)
            for (size_t l = 0; l < 16; l++)
                o[r * d + i + l] = o[r * d + i + l] * alpha[r] + a[r][l];
    }
    if (i < d)
        for (size_t r = 0; r < 4; r++)
            accumulate_pv(p + r * ATT_CPU_KEY_TILE, vf + i, o + r * d + i, alpha[r], nk, d - i, d);
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
    float sum = 0.0f;
    for (size_t j = 0; j < nk; j++) {
        s[j] = exp_f32(s[j] - m_new);
        sum += s[j];
    }
    *l_run = *l_run * alpha + sum;
    *m_run = m_new;
    return alpha;
}

/* Byte offset of key j's row within a layer's K (or V) storage, for the item's KV head. */
static inline size_t tile_offset(const att_batch_chunk_t *ch, uint32_t j, uint32_t bs,
                                 size_t block_stride, size_t head_off, size_t row_bytes) {
    return (size_t)ch->blocks[j / bs] * block_stride + head_off + (size_t)(j % bs) * row_bytes;
}

/* Rows of an item are head-major, then token, then query head within the group: row
 * hl * per_head + t * group + gi is query head (kv_head + hl) * group + gi of token q_begin + t. */
void ATT_CPU_KERN_NAME(const att_cpu_job_t *job, const att_cpu_item_t *it, att_cpu_scratch_t *sc) {
    const att_model_t *m = job->m;
    const att_batch_t *b = job->b;
    const att_batch_chunk_t *ch = &b->chunks[it->chunk];
    const uint32_t d = m->head_dim, g = m->group, bs = m->block_size;
    const uint32_t per_head = it->q_count * g;
    const uint32_t rows = per_head * it->num_heads;
    const size_t es = att_dtype_bytes(m->dtype);
    const size_t head_stride = (size_t)bs * d * es; /* one head of one block */
    const size_t block_stride = head_stride * m->num_kv_heads;

    for (uint32_t r = 0; r < rows; r++) {
        uint32_t tok = ch->token_offset + it->q_begin + (r % per_head) / g;
        uint32_t head = (it->kv_head + r / per_head) * g + r % g;
        const uint8_t *src =
            (const uint8_t *)b->q + ((size_t)tok * m->num_query_heads + head) * d * es;
        float *q = sc->q + (size_t)r * d;
        to_f32(m->dtype, src, q, d);
        for (size_t i = 0; i < d; i++)
            q[i] *= m->scale;
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
        for (size_t i = 0; i < d; i++)
            sc->o[(size_t)r * d + i] = 0.0f;
    }

    uint32_t first = ch->start_pos + it->q_begin, last = first + it->q_count - 1;
    uint32_t j_lo = (job->window != 0 && first + 1 > job->window) ? first + 1 - job->window : 0;
    uint32_t tile = bs < ATT_CPU_KEY_TILE ? bs : ATT_CPU_KEY_TILE;
    size_t head_tile_bytes = (size_t)tile * d * es;
    for (uint32_t j0 = j_lo - j_lo % tile; j0 <= last; j0 += tile) {
        uint32_t nk = last + 1 - j0 < tile ? last + 1 - j0 : tile;
        size_t off0 = tile_offset(ch, j0, bs, block_stride, it->kv_head * head_stride, d * es);
        size_t next0 = j0 + tile <= last ? tile_offset(ch, j0 + tile, bs, block_stride,
                                                       it->kv_head * head_stride, d * es)
                                         : SIZE_MAX;
        for (uint32_t hl = 0; hl < it->num_heads; hl++) {
            size_t off = off0 + hl * head_stride;
            if (next0 != SIZE_MAX) { /* a few KiB per head keeps the miss queue from overflowing */
                prefetch_bytes(job->k_layer + next0 + hl * head_stride, head_tile_bytes);
                prefetch_bytes(job->v_layer + next0 + hl * head_stride, head_tile_bytes);
            }
            const float *kf, *vf;
            if (m->dtype == ATT_DTYPE_F32) {
                kf = (const float *)(job->k_layer + off);
                vf = (const float *)(job->v_layer + off);
            } else {
                to_f32(m->dtype, job->k_layer + off, sc->kf, (size_t)nk * d);
                to_f32(m->dtype, job->v_layer + off, sc->vf, (size_t)nk * d);
                kf = sc->kf;
                vf = sc->vf;
            }
            for (uint32_t rr0 = 0; rr0 < per_head; rr0 += 4) {
                uint32_t n = per_head - rr0 < 4 ? per_head - rr0 : 4;
                if (j0 > first + (rr0 + n - 1) / g)
                    continue; /* every key of this tile is after every row of the group */
                uint32_t r0 = hl * per_head + rr0;
                group_scores(sc->q + (size_t)r0 * d, n, kf, nk, d, sc->s);
                float alpha[4];
                for (uint32_t i = 0; i < n; i++) {
                    uint32_t rr = rr0 + i;
                    float *srow = sc->s + (size_t)i * ATT_CPU_KEY_TILE;
                    row_adjust(job, srow, nk, j0, first + rr / g, (it->kv_head + hl) * g + rr % g);
                    alpha[i] = row_softmax(srow, &sc->m[r0 + i], &sc->l[r0 + i], nk);
                }
                float *o = sc->o + (size_t)r0 * d;
                if (n == 4)
                    accumulate_pv4(sc->s, vf, o, alpha, nk, d);
                else
                    for (uint32_t i = 0; i < n; i++)
                        accumulate_pv(sc->s + (size_t)i * ATT_CPU_KEY_TILE, vf, o + (size_t)i * d,
                                      alpha[i], nk, d, d);
            }
        }
    }

    for (uint32_t r = 0; r < rows; r++) {
        uint32_t tok = ch->token_offset + it->q_begin + (r % per_head) / g;
        uint32_t head = (it->kv_head + r / per_head) * g + r % g;
        float mr = sc->m[r], lr = sc->l[r], scale_o;
        if (m->sinks != NULL) {
            /* the sink joins the denominator only; rebase on the larger of it and the max */
            float sink = m->sinks[head], top = sink > mr ? sink : mr;
            float keep = exp_f32(mr - top);
            scale_o = keep / (lr * keep + exp_f32(sink - top));
        } else {
            scale_o = 1.0f / lr;
        }
        float *o = sc->o + (size_t)r * d;
        uint8_t *dst = (uint8_t *)b->out + ((size_t)tok * m->num_query_heads + head) * d * es;
        for (size_t i = 0; i < d; i++)
            att_store(m->dtype, dst, i, o[i] * scale_o);
    }
}

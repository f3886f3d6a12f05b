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

/* d is a multiple of 8. Kept out of line: inlined into a loop over keys, GCC vectorizes across
 * keys instead (strided gathers), several times slower. Loop indices in this file are size_t:
 * with uint32_t, wrap-around is defined, GCC cannot prove accesses contiguous and gathers too. */
static __attribute__((noinline)) float dot_f32(const float *restrict a, const float *restrict b,
                                               size_t d) {
    float acc[32];
    size_t i = 0;
    if (d >= 32) { /* start from the first products: zeroing the array costs a rep stos */
        for (size_t l = 0; l < 32; l++)
            acc[l] = a[l] * b[l];
        i = 32;
    } else {
        for (size_t l = 0; l < 32; l++)
            acc[l] = 0.0f;
    }
    for (; i + 32 <= d; i += 32)
        for (size_t l = 0; l < 32; l++)
            acc[l] += a[i + l] * b[i + l];
    for (; i < d; i += 8)
        for (size_t l = 0; l < 8; l++)
            acc[l] += a[i + l] * b[i + l];
    for (size_t l = 0; l < 16; l++)
        acc[l] += acc[l + 16];
    for (size_t l = 0; l < 8; l++)
        acc[l] += acc[l + 8];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* A tile's rows are contiguous, but consecutive tiles of one head are a block apart (other heads
 * lie between), so the hardware prefetcher, which stops at page edges, starts cold on each tile.
 * Asking for the next tile while this one is computed keeps memory busy. */
static inline void prefetch_bytes(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i += 64)
        __builtin_prefetch(p + i, 0, 0);
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

/* Position of row r's query: rows are token-major, group-minor. */
static inline uint32_t row_pos(const att_batch_chunk_t *ch, const att_cpu_item_t *it, uint32_t r,
                               uint32_t group) {
    return ch->start_pos + it->q_begin + r / group;
}

/* Scores of one row against the key tile [j0, j0 + nk), with soft cap, ALiBi and the mask. */
static inline void row_scores(const att_cpu_job_t *job, const float *restrict q,
                              const float *restrict kf, float *restrict s, uint32_t nk, uint32_t j0,
                              uint32_t pos, uint32_t head) {
    const att_model_t *m = job->m;
    size_t d = m->head_dim;
    for (size_t j = 0; j < nk; j++)
        s[j] = dot_f32(q, kf + j * d, d);
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
        for (uint32_t j = 0; j < nk; j++) {
            uint32_t key = j0 + j;
            s[j] = (key < lo || key > pos) ? -INFINITY : s[j];
        }
    }
}

/* Folds one row's tile of scores into its running max, denominator and output. */
static inline void row_update(float *restrict s, const float *restrict vf, float *restrict o,
                              float *m_run, float *l_run, size_t nk, size_t d) {
    float mx = -INFINITY;
    for (size_t j = 0; j < nk; j++)
        mx = s[j] > mx ? s[j] : mx;
    float m_new = mx > *m_run ? mx : *m_run;
    if (m_new == -INFINITY)
        return; /* every key of this tile is masked for this row */
    float alpha = exp_f32(*m_run - m_new);
    float sum = 0.0f;
    for (size_t j = 0; j < nk; j++) {
        s[j] = exp_f32(s[j] - m_new);
        sum += s[j];
    }
    *l_run = *l_run * alpha + sum;
    *m_run = m_new;
    if (alpha != 1.0f)
        for (size_t i = 0; i < d; i++)
            o[i] *= alpha;
    for (size_t j = 0; j < nk; j++) {
        float p = s[j];
        const float *restrict v = vf + j * d;
        for (size_t i = 0; i < d; i++)
            o[i] += p * v[i];
    }
}

/* Byte offset of key j's row within a layer's K (or V) storage, for the item's KV head. */
static inline size_t tile_offset(const att_batch_chunk_t *ch, uint32_t j, uint32_t bs,
                                 size_t block_stride, size_t head_off, size_t row_bytes) {
    return (size_t)ch->blocks[j / bs] * block_stride + head_off + (size_t)(j % bs) * row_bytes;
}

void ATT_CPU_KERN_NAME(const att_cpu_job_t *job, const att_cpu_item_t *it, att_cpu_scratch_t *sc) {
    const att_model_t *m = job->m;
    const att_batch_t *b = job->b;
    const att_batch_chunk_t *ch = &b->chunks[it->chunk];
    const uint32_t d = m->head_dim, g = m->group, bs = m->block_size;
    const uint32_t rows = it->q_count * g;
    const size_t es = att_dtype_bytes(m->dtype);
    const size_t head_stride = (size_t)bs * d * es; /* one head of one block */
    const size_t block_stride = head_stride * m->num_kv_heads;

    for (uint32_t r = 0; r < rows; r++) {
        uint32_t tok = ch->token_offset + it->q_begin + r / g;
        uint32_t head = it->kv_head * g + r % g;
        const uint8_t *src = (const uint8_t *)b->q + ((size_t)tok * m->num_query_heads + head) * d * es;
        float *q = sc->q + (size_t)r * d;
        to_f32(m->dtype, src, q, d);
        for (size_t i = 0; i < d; i++)
            q[i] *= m->scale;
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
        for (size_t i = 0; i < d; i++)
            sc->o[(size_t)r * d + i] = 0.0f;
    }

    uint32_t first = row_pos(ch, it, 0, g), last = row_pos(ch, it, rows - 1, g);
    uint32_t j_lo = (job->window != 0 && first + 1 > job->window) ? first + 1 - job->window : 0;
    uint32_t tile = bs < ATT_CPU_KEY_TILE ? bs : ATT_CPU_KEY_TILE;
    size_t tile_bytes = (size_t)tile * d * es;
    for (uint32_t j0 = j_lo - j_lo % tile; j0 <= last; j0 += tile) {
        uint32_t nk = last + 1 - j0 < tile ? last + 1 - j0 : tile;
        size_t off = tile_offset(ch, j0, bs, block_stride, it->kv_head * head_stride, d * es);
        if (j0 + tile <= last) {
            size_t next = tile_offset(ch, j0 + tile, bs, block_stride, it->kv_head * head_stride,
                                      d * es);
            prefetch_bytes(job->k_layer + next, tile_bytes);
            prefetch_bytes(job->v_layer + next, tile_bytes);
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
        for (uint32_t r = 0; r < rows; r++) {
            uint32_t pos = row_pos(ch, it, r, g);
            if (j0 > pos)
                break; /* rows are in position order: no later row sees fewer keys */
            uint32_t head = it->kv_head * g + r % g;
            row_scores(job, sc->q + (size_t)r * d, kf, sc->s, nk, j0, pos, head);
            row_update(sc->s, vf, sc->o + (size_t)r * d, &sc->m[r], &sc->l[r], nk, d);
        }
    }

    for (uint32_t r = 0; r < rows; r++) {
        uint32_t tok = ch->token_offset + it->q_begin + r / g;
        uint32_t head = it->kv_head * g + r % g;
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

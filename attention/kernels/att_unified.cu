/* The unified attention kernels: one launch computes a whole batch (decode tokens, prefill chunks,
 * chunks over earlier context) over the paged KV cache, and writes the batch's new K/V rows into
 * the cache on the way. Device code only; compiled at run time by NVRTC (or hiprtc, through
 * att_port.h) with the model's constants and the tile configuration as defines (below), for the
 * device's exact architecture. The
 * parameter block and the per-call arrays are in attention/att_kparams.h.
 *
 * Entry points (all take one att_kparams_t by value):
 *   att_k_attend    grid num_items * Hkv (or a persistent grid: p.sm_split, take_unit), block
 *                   ATT_KINFO_THREADS, dynamic smem ATT_KINFO_SMEM_BYTES. Per unit: one work
 *                   item (a tile of query rows of one chunk, maybe limited to a key range)
 *                   against one KV head. Writes out, or a partial result when the item is a
 *                   split; the last split of a row tile to finish merges the tile's partials
 *                   into out (flash-decoding's second pass, without a second launch). Items
 *                   flagged ATT_KITEM_WRITE_KV also copy their tokens' new k/v rows into the
 *                   cache (fused: no extra launch in a step).
 *   att_k_kv_write  grid num_chunks * Hkv, block ATT_KINFO_KVW_THREADS. Only writes k/v into the
 *                   cache: for append-only batches, which have no queries.
 *
 * Semantics are att_cpu_kern_impl.h's: query i attends to keys j with lo(i) <= j <= i, where
 * lo(i) = i + 1 - window when a window is set and i + 1 > window, else 0; s = scale * q.k, then
 * cap * tanh(s / cap), then + slope * (j - i); the softmax denominator gains exp(sink).
 * Arithmetic in f32; scores are carried in log2 units (multiplied by log2 e) so the exponentials
 * are single ex2 instructions.
 *
 * On sm_90 a wide tile may instead use the wgmma body of att_sm90.cuh (ATT_WGMMA=1, compiled
 * for sm_90a), included below with the same entry points and contract.
 * f16/bf16: tensor cores (mma.sync m16n8k16, f32 accumulators) fed by ldmatrix from shared
 * memory, K/V tiles brought in by cp.async through an ATT_STAGES-deep ring, online softmax in
 * registers, probabilities rounded to the dtype for P.V (as the CPU tests allow), outputs rounded
 * to nearest even. f32, and every dtype on AMD GPUs (ATT_PORTABLE_MATH, see att_port.h): a plain
 * FMA path in f32, one warp (wave) per query row (correct, not fast). The two bodies are the only
 * difference between NVIDIA and AMD; everything else here is shared.
 *
 * Tile shape (the knobs; att_jit.h's att_tile_t, chosen by att_cuda.c's plan): ATT_WARPS_M warps
 * split the tile's rows, ATT_WARP_MT m16 tiles (16 rows, the MMA's M) each, so a tile has
 * 16 * ATT_WARP_MT * ATT_WARPS_M rows; ATT_WARPS_N warps split each stage's ATT_TILE_K keys,
 * each with its own online softmax state, combined at the end; ATT_STAGES is the cp.async ring's
 * depth. Prefill uses WARPS_N = 1 and many rows (each K/V tile read once from L2 for all of
 * them; with WARP_MT 2 each K/V fragment read from shared memory feeds two m16 tiles); decode
 * uses WARPS_M = 1, WARPS_N = 4: a decode tile has group rows (4 for Llama-3
 * 8B), padded to the MMA's 16, and the four warps share the key stream instead of idling. The
 * padding wastes tensor-core work only: decode reads ~512 bytes of K/V per key and head, far more
 * than the 16x8x16 MMAs per key cost, so it stays bound by memory. */
#include "attention/att_kparams.h"
#include "attention/kernels/att_port.h"

#ifndef ATT_HEAD_DIM
#error "ATT_HEAD_DIM (elements per head) must be defined"
#endif
#ifndef ATT_DTYPE
#error "ATT_DTYPE (1 f32, 2 f16, 3 bf16: att_dtype_t) must be defined"
#endif
#ifndef ATT_BLOCK_SIZE
#error "ATT_BLOCK_SIZE (tokens per KV block) must be defined"
#endif
#ifndef ATT_GROUP
#error "ATT_GROUP (query heads per KV head) must be defined"
#endif
#ifndef ATT_NUM_KV_HEADS
#error "ATT_NUM_KV_HEADS must be defined"
#endif
#ifndef ATT_HAS_WINDOW
#define ATT_HAS_WINDOW 0
#endif
#ifndef ATT_SOFT_CAP
#define ATT_SOFT_CAP 0
#endif
#ifndef ATT_HAS_ALIBI
#define ATT_HAS_ALIBI 0
#endif
#ifndef ATT_HAS_SINKS
#define ATT_HAS_SINKS 0
#endif
#ifndef ATT_WARPS_M
#define ATT_WARPS_M 4
#endif
#ifndef ATT_WARPS_N
#define ATT_WARPS_N 1
#endif
#ifndef ATT_TILE_K
#define ATT_TILE_K 64
#endif
#ifndef ATT_STAGES
#define ATT_STAGES 2
#endif
#ifndef ATT_WARP_MT
#define ATT_WARP_MT 1
#endif

#define ATT_DT_F32 1
#define ATT_DT_F16 2
#define ATT_DT_BF16 3

#if ATT_DTYPE == ATT_DT_F32
typedef float elem_t;
#elif ATT_DTYPE == ATT_DT_F16 || ATT_DTYPE == ATT_DT_BF16
typedef unsigned short elem_t;
#else
#error "ATT_DTYPE must be 1 (f32), 2 (f16) or 3 (bf16)"
#endif

constexpr uint32_t kD = ATT_HEAD_DIM;
constexpr uint32_t kG = ATT_GROUP;
constexpr uint32_t kHkv = ATT_NUM_KV_HEADS;
constexpr uint32_t kHq = kG * kHkv;
constexpr uint32_t kBS = ATT_BLOCK_SIZE;
constexpr uint32_t kWarpsM = ATT_WARPS_M;
constexpr uint32_t kWarpsN = ATT_WARPS_N;
constexpr uint32_t kMT = ATT_WARP_MT; /* m16 row tiles per warp */
constexpr uint32_t kWarps = kWarpsM * kWarpsN;
constexpr uint32_t kThreads = ATT_WAVE * kWarps; /* ATT_WAVE: threads per warp (wave) */
constexpr uint32_t kWRows = 16 * kMT;        /* query rows per warp */
constexpr uint32_t kRows = kWRows * kWarpsM; /* query rows per item */
constexpr uint32_t kTileK = ATT_TILE_K;  /* keys per pipeline stage */
constexpr uint32_t kES = sizeof(elem_t);
constexpr uint32_t kVec = 16 / kES;   /* elements per 16-byte access */
constexpr uint32_t kCPR = kD / kVec;  /* 16-byte chunks per head row */
constexpr uint32_t kKvwThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
/* -inf (NVRTC has no constexpr way to spell it) */
#define kNegInf __int_as_float(0xff800000u)

static_assert(kD % 8 == 0 && kD <= 256, "head_dim must be a multiple of 8, at most 256");
static_assert(kBS >= 1, "block size");
static_assert(kWarps >= 1 && kWarps <= 16, "1 to 16 warps");
static_assert(kMT == 1 || kMT == 2, "ATT_WARP_MT is 1 or 2 m16 tiles per warp");
static_assert(kTileK % kWarpsN == 0, "ATT_TILE_K must split evenly over ATT_WARPS_N");

/* The tensor-core body (f16/bf16 on NVIDIA), or the portable FMA body (f32; every dtype with
 * ATT_PORTABLE_MATH, which HIP sets): see att_port.h. */
#define ATT_TC (ATT_DTYPE != ATT_DT_F32 && !ATT_PORTABLE_MATH)

#ifndef ATT_WGMMA
#define ATT_WGMMA 0
#endif
#if ATT_WGMMA && !ATT_TC
#error "ATT_WGMMA (the sm_90a body) needs f16 or bf16 on NVIDIA"
#endif

#if ATT_TC && !ATT_WGMMA
static_assert(ATT_WAVE == 32, "the tensor-core body is written for 32-lane warps");
constexpr uint32_t kStages = ATT_STAGES;
constexpr uint32_t kKW = kTileK / kWarpsN; /* keys per warp per stage */
/* The MMA steps take 16 elements of head_dim at a time. A head_dim that is a multiple of 8 but not
 * of 16 (24, 40, 72, ...) is padded to kDP in shared memory: the 8 pad columns of every Q, K and V
 * row are zeroed once and never written by a copy, so they add 0 to every dot product, and the
 * output columns they produce are never stored. */
constexpr uint32_t kDP = (kD + 15) / 16 * 16;
static_assert(kKW % 16 == 0, "each warp's key slice must be whole k16 steps");
static_assert(kStages >= 2 && kStages <= 4, "2 to 4 pipeline stages");
/* Shared-memory rows are padded by 16 bytes: 8 consecutive rows then start in 8 different
 * 16-byte bank groups for every head_dim that is a multiple of 16 elements, so ldmatrix (8 rows
 * at one column) and cp.async (consecutive chunks) are free of bank conflicts without a swizzle
 * (which would not fit head_dim 80). */
constexpr uint32_t kSRow = kDP + 8;
constexpr uint32_t kQBytes = kRows * kSRow * 2;
constexpr uint32_t kStageHalf = kTileK * kSRow * 2; /* one stage's K (or V) */
constexpr uint32_t kMainBytes = kQBytes + kStages * 2 * kStageHalf;
/* After the key loop: each key-split warp's unnormalized rows (f32, padded) and (max, sum). */
constexpr uint32_t kORow = kDP + 4;
constexpr uint32_t kEpiBytes = kWarpsN * kRows * (kORow + 2) * 4;
constexpr uint32_t kSmemBytes = kMainBytes > kEpiBytes ? kMainBytes : kEpiBytes;
/* Q stays in registers while a warp's rows take at most 32 registers (head_dim 128 at one m16
 * tile); above, ldmatrix reads it each tile. */
constexpr bool kQRegs = kDP * kMT <= 128;
constexpr uint32_t kNT = kKW / 8;          /* n8 score tiles per warp */
constexpr uint32_t kDT = kDP / 8;          /* n8 output tiles */
constexpr uint32_t kKVChunks = kTileK * kCPR;
constexpr uint32_t kCPT = (kKVChunks + kThreads - 1) / kThreads; /* chunks per thread per tile */
constexpr uint32_t kAttendThreads = kThreads;
#elif !ATT_TC
constexpr uint32_t kSmemBytes = 0;
constexpr uint32_t kAttendThreads = kThreads;
#endif

/* ---- small device helpers (what differs between CUDA and HIP is in att_port.h) ---- */

__device__ __forceinline__ uint32_t umin(uint32_t a, uint32_t b) { return a < b ? a : b; }
__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

/* First key of position pos's window (the CPU's rule; window 0 = none). */
__device__ __forceinline__ uint32_t window_lo(uint32_t pos, uint32_t window) {
#if ATT_HAS_WINDOW
    return (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
#else
    (void)pos;
    (void)window;
    return 0;
#endif
}

/* A raw dot product q.k as a logit in log2 units, with soft cap and ALiBi. slope2 is the head's
 * ALiBi slope times log2 e. */
__device__ __forceinline__ float logit2(float dot, const att_kparams_t &p, float scale2, int j,
                                        int pos, float slope2) {
#if ATT_SOFT_CAP
    /* cap * tanh(s / cap) = cap - 2 cap / (exp(2 s / cap) + 1): exact at both ends (exp
     * overflowing to inf gives cap, underflowing to 0 gives -cap). */
    float s = dot * p.scale;
    float e = att_ex2(s * (2.0f * kLog2e / p.soft_cap));
    float x = (p.soft_cap - 2.0f * p.soft_cap * att_rcp(e + 1.0f)) * kLog2e;
    (void)scale2;
#else
    float x = dot * scale2;
#endif
#if ATT_HAS_ALIBI
    x += slope2 * (float)(j - pos);
#else
    (void)j;
    (void)pos;
    (void)slope2;
#endif
    return x;
}

__device__ __forceinline__ float head_slope2(const att_kparams_t &p, uint32_t qh) {
#if ATT_HAS_ALIBI
    return ((const float *)p.alibi_d)[qh] * kLog2e;
#else
    (void)p;
    (void)qh;
    return 0.0f;
#endif
}

/* Factor that turns a row's unnormalized output into the result: 1 / sum, or with a sink
 * rebased on the larger of the sink and the running max (store_outputs in the CPU kernel). m2 is
 * the row max in log2 units. */
__device__ __forceinline__ float out_scale(const att_kparams_t &p, uint32_t qh, float m2, float l) {
#if ATT_HAS_SINKS
    float s2 = ((const float *)p.sinks_d)[qh] * kLog2e;
    float top = fmaxf(m2, s2);
    float keep = att_ex2(m2 - top);
    return keep / (l * keep + att_ex2(s2 - top));
#else
    (void)p;
    (void)qh;
    (void)m2;
    return 1.0f / l;
#endif
}

/* kVec f32 values to one 16-byte vector of the dtype, rounded to nearest even. */
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if ATT_DTYPE == ATT_DT_BF16
    return att_f32x2_to_bf16x2(lo, hi);
#elif ATT_DTYPE == ATT_DT_F16
    return att_f32x2_to_f16x2(lo, hi);
#else
    (void)lo;
    (void)hi;
    return 0;
#endif
}

__device__ __forceinline__ void store_vec(elem_t *dst, const float *v) {
#if ATT_DTYPE == ATT_DT_F32
    *(float4 *)dst = make_float4(v[0], v[1], v[2], v[3]);
#else
    uint4 u;
    u.x = pack2(v[0], v[1]);
    u.y = pack2(v[2], v[3]);
    u.z = pack2(v[4], v[5]);
    u.w = pack2(v[6], v[7]);
    *(uint4 *)dst = u;
#endif
}

/* The table entries of ch's cached keys (positions below start_pos) in one array: the session's
 * copy covers them whenever it holds any entry (the host sees to it). */
__device__ __forceinline__ const uint32_t *cached_table(const att_kparams_t &p,
                                                        const att_kchunk_t &ch) {
    return ch.mirrored != 0 ? (const uint32_t *)p.block_table_d + ch.table_offset
                            : (const uint32_t *)p.new_table_d + ch.new_offset;
}

/* Writes the table entries the call sent into the session's tables (ATT_KCHUNK_KEEP_TABLE), past
 * the entries that the launch's readers take from there. */
__device__ __forceinline__ void keep_table(const att_kparams_t &p, const att_kchunk_t &ch,
                                           uint32_t tid, uint32_t nthreads) {
    if (!(ch.flags & ATT_KCHUNK_KEEP_TABLE))
        return;
    uint32_t *dst = (uint32_t *)p.block_table_d + ch.table_offset + ch.mirrored;
    const uint32_t *src = (const uint32_t *)p.new_table_d + ch.new_offset + ch.mirrored -
                          umin(ch.mirrored, ch.start_pos / kBS);
    for (uint32_t i = tid; i < ch.num_blocks - ch.mirrored; i += nthreads)
        dst[i] = src[i];
}

/* Copies the new k and v rows of tokens [t_begin, t_end) of a chunk, KV head h, into the cache.
 * 16-byte accesses spread over the block's threads. */
__device__ __forceinline__ void copy_new_kv(const att_kparams_t &p, const att_kchunk_t &ch,
                                            uint32_t h, uint32_t t_begin, uint32_t t_end,
                                            uint32_t tid, uint32_t nthreads) {
    const elem_t *kn = (const elem_t *)p.k_d, *vn = (const elem_t *)p.v_d;
    elem_t *kc = (elem_t *)p.k_cache_d, *vc = (elem_t *)p.v_cache_d;
    /* the call sends the table from the block of the first new position (or from `mirrored`,
     * if lower) on: entry j is table[j + base] (base may wrap; the sum does not) */
    const uint32_t *table = (const uint32_t *)p.new_table_d;
    const uint32_t base = ch.new_offset - umin(ch.mirrored, ch.start_pos / kBS);
    const uint32_t n = (t_end > t_begin ? t_end - t_begin : 0) * kCPR;
    for (uint32_t i = tid; i < n; i += nthreads) {
        const uint32_t t = t_begin + i / kCPR, c = i % kCPR;
        const uint32_t pos = ch.start_pos + t;
        const uint64_t blk = table[base + pos / kBS];
        const uint64_t src = ((uint64_t)(ch.token_offset + t) * kHkv + h) * kD + c * kVec;
        const uint64_t dst = ((blk * kHkv + h) * kBS + pos % kBS) * kD + c * kVec;
        *(uint4 *)(kc + dst) = *(const uint4 *)(kn + src);
        *(uint4 *)(vc + dst) = *(const uint4 *)(vn + src);
    }
}

/* What every attend variant derives from its unit (item * Hkv + KV head): the chunk, the tile's
 * rows and keys. */
struct tile_t {
    att_kitem_t it;
    att_kchunk_t ch;
    uint32_t h;         /* KV head */
    uint32_t row_end;   /* one past the tile's last valid row (chunk row units) */
    uint32_t kb, ke;    /* keys [kb, ke) any row of the tile may need, within the item's range */
};

__device__ __forceinline__ tile_t tile_of(const att_kparams_t &p, uint32_t unit) {
    tile_t t;
    const uint32_t item = unit / kHkv;
    t.h = unit % kHkv;
    t.it = ((const att_kitem_t *)p.items_d)[item];
    t.ch = ((const att_kchunk_t *)p.chunks_d)[t.it.chunk];
    t.row_end = umin(t.it.row_begin + kRows, t.ch.num_tokens * kG);
    const uint32_t pos_first = t.ch.start_pos + t.it.row_begin / kG;
    const uint32_t pos_last = t.ch.start_pos + (t.row_end - 1) / kG;
    t.kb = umax(window_lo(pos_first, p.window), t.it.key_begin);
    t.ke = umin(pos_last + 1, t.it.key_end);
    return t;
}

/* The tokens whose first row (head 0 of the group) lies in the tile: each new row is written
 * by exactly one tile per KV head. The one of the chunk's first rows at KV head 0 also keeps the
 * table entries the call sent, where the host asks (ATT_KCHUNK_KEEP_TABLE: decode chunks, which
 * run on narrow tiles). The wgmma body never keeps any: the host never asks it to, and the
 * copy's mere presence in that kernel cost 1.3% of its prefill rate on the H200 (303.9-305.6
 * TFLOP/s without it, 299.6-301.3 with it, the same call). Spread over threads tid, tid +
 * nthreads, ... (the block's; the wgmma body's producer warpgroup alone). */
__device__ __forceinline__ void write_own_kv(const att_kparams_t &p, const tile_t &t, uint32_t tid,
                                             uint32_t nthreads) {
    if (!(t.it.flags & ATT_KITEM_WRITE_KV))
        return;
    const uint32_t t0 = (t.it.row_begin + kG - 1) / kG, t1 = (t.row_end - 1) / kG + 1;
    copy_new_kv(p, t.ch, t.h, t0, t1, tid, nthreads);
#if !ATT_WGMMA
    if (t.h == 0 && t.it.row_begin == 0)
        keep_table(p, t.ch, tid, nthreads);
#endif
}

/* ---- split-KV merge (flash-decoding's second pass) ---- */

/* Combines the partial results of the launch's merge record mi for KV head h into out, adding
 * sinks: threads tid, tid + nthreads, ... take the tile's (row, 16-byte column) pairs. */
__device__ void merge_parts(const att_kparams_t &p, uint32_t mi, uint32_t h, uint32_t tid,
                            uint32_t nthreads) {
    const att_kmerge_t mg = ((const att_kmerge_t *)p.merges_d)[mi];
    const att_kchunk_t ch = ((const att_kchunk_t *)p.chunks_d)[mg.chunk];
    const uint32_t row_end = umin(mg.row_begin + kRows, ch.num_tokens * kG);
    const float *po = (const float *)p.part_o_d, *pml = (const float *)p.part_ml_d;
    for (uint32_t c = tid; c < kRows * kCPR; c += nthreads) {
        const uint32_t r = c / kCPR, cc = c % kCPR, R = mg.row_begin + r;
        if (R >= row_end)
            continue;
        float M = kNegInf;
        for (uint32_t i = 0; i < mg.num_parts; i++) {
            const uint64_t prow = ((uint64_t)(mg.part_begin + i) * kHkv + h) * kRows + r;
            M = fmaxf(M, att_ld_l2((const float2 *)(pml + prow * 2)).x);
        }
        float L = 0.0f, v[kVec];
#pragma unroll
        for (uint32_t e = 0; e < kVec; e++)
            v[e] = 0.0f;
        for (uint32_t i = 0; i < mg.num_parts; i++) {
            const uint64_t prow = ((uint64_t)(mg.part_begin + i) * kHkv + h) * kRows + r;
            const float2 ml = att_ld_l2((const float2 *)(pml + prow * 2));
            if (ml.x == kNegInf)
                continue; /* a split with no key for this row (window) */
            const float f = att_ex2(ml.x - M);
            L += f * ml.y;
            const float4 *src = (const float4 *)(po + prow * kD + cc * kVec);
#pragma unroll
            for (uint32_t e = 0; e < kVec; e += 4) {
                const float4 x = att_ld_l2(src + e / 4);
                v[e] += f * x.x;
                v[e + 1] += f * x.y;
                v[e + 2] += f * x.z;
                v[e + 3] += f * x.w;
            }
        }
        const uint32_t qh = h * kG + R % kG;
        const float sc = out_scale(p, qh, M, L);
#pragma unroll
        for (uint32_t e = 0; e < kVec; e++)
            v[e] *= sc;
        store_vec((elem_t *)p.out_d + ((uint64_t)(ch.token_offset + R / kG) * kHq + qh) * kD +
                      cc * kVec,
                  v);
    }
}

/* The whole block's barrier: what finish_split waits on when every thread of the block is still
 * running (a body may instead pass a barrier of the threads it keeps). */
struct block_sync {
    __device__ static void sync() { __syncthreads(); }
};

/* The end of a split item, once each of the nthreads threads that Sync::sync() gathers (tid
 * 0..nthreads-1) has stored its share of the partial rows: the last of the row tile's parts to
 * arrive merges them all. The arrival counter of (merge record, KV head) is zero between
 * launches: atomicInc wraps the last arrival's count back to 0. The fence before the count
 * publishes this block's partials; the counting thread's fence after it (acquire), then every
 * thread's past the barrier, order the merger's reads after every other part's stores. */
template <class Sync>
__device__ __forceinline__ void finish_split(const att_kparams_t &p, const tile_t &t, uint32_t tid,
                                             uint32_t nthreads) {
    __shared__ uint32_t s_last;
    __threadfence();
    Sync::sync();
    if (tid == 0) {
        const uint32_t n = ((const att_kmerge_t *)p.merges_d)[t.it.merge].num_parts;
        uint32_t *count = (uint32_t *)p.counters_d + (uint64_t)t.it.merge * kHkv + t.h;
        s_last = atomicInc(count, n - 1) == n - 1;
        __threadfence();
    }
    Sync::sync();
    if (s_last) {
        __threadfence();
        merge_parts(p, t.it.merge, t.h, tid, nthreads);
    }
}

/* ---- a persistent grid (p.sm_split != 0) ----
 * A mixed batch launched from the device (attention/att_cudl.h) runs its narrow kind's grid first
 * on every SM, then its wide kind's, which must find the SMs with ids below sm_split free (green
 * contexts, which would keep the kinds apart, cannot be launched from the device). So the narrow
 * grid fills each SM once; its blocks on those SMs leave at once, and the others take units
 * (item * Hkv + KV head, longest items first) in turn until none is left. Should no block land
 * on the other SMs, the last block to start stays wherever it is, so the units always run.
 * Counters (ATT_KUNIT_COUNTERS words after the kind's merge counters): blocks staying, blocks
 * started, units taken, blocks finished; the last block to finish sets them back to 0, so, like
 * the merge counters, they are zero between launches. */
__device__ __forceinline__ uint32_t *unit_counters(const att_kparams_t &p) {
    return (uint32_t *)p.counters_d + (uint64_t)p.num_merges * kHkv;
}

/* The block's next unit, the same in every thread; num_items * Hkv or more: none. first: its
 * first, where it may leave. A block that stays counts itself before it takes its start ticket
 * (a fence between), so the last to start sees every other block's choice. */
__device__ __forceinline__ uint32_t take_unit(const att_kparams_t &p, bool first) {
    __shared__ uint32_t s_unit;
    uint32_t *c = unit_counters(p);
#if ATT_TC
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
    __syncthreads(); /* every thread is done with the last unit's shared memory, and s_unit */
    if (threadIdx.x == 0) {
        bool stay = true;
        if (first) {
            stay = att_smid() >= p.sm_split;
            if (stay)
                atomicAdd(&c[0], 1u);
            __threadfence();
            if (atomicAdd(&c[1], 1u) == gridDim.x - 1 && !stay) {
                __threadfence();
                stay = atomicAdd(&c[0], 0u) == 0; /* no block stayed: this one runs them all */
            }
        }
        s_unit = stay ? atomicAdd(&c[2], 1u) : 0xffffffffu;
    }
    __syncthreads();
    return s_unit;
}

/* A block of a persistent grid is done. Every block has taken its last unit before it counts
 * itself here (the fence orders the two), so the last to finish may set the counters back. */
__device__ __forceinline__ void units_done(const att_kparams_t &p) {
    uint32_t *c = unit_counters(p);
    if (threadIdx.x != 0)
        return;
    __threadfence();
    if (atomicAdd(&c[3], 1u) == gridDim.x - 1) {
        __threadfence();
        c[0] = 0;
        c[1] = 0;
        c[2] = 0;
        c[3] = 0;
    }
}

#if ATT_TC
/* ---- shared by both tensor-core bodies ---- */

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared, bypassing L1 (K/V are streamed once per block). src_bytes 0 writes
 * zeros and reads nothing: out-of-range rows become finite zeros, so 0 * V never makes a NaN. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, uint32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

/* The same with an L2 cache policy (createpolicy). */
__device__ __forceinline__ void cp_async16_pol(uint32_t dst, const void *src, uint32_t src_bytes,
                                               uint64_t pol) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
                 "l"(src), "r"(src_bytes), "l"(pol)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif

#if ATT_TC && ATT_WGMMA
#include "attention/kernels/att_sm90.cuh"
#elif ATT_TC
/* ---- tensor-core path (f16, bf16 on NVIDIA): mma.sync ---- */

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* c += a (16x16, row) * b (16x8, col), f32 accumulators. */
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if ATT_DTYPE == ATT_DT_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ int warp_min(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_max(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* A tile of one m16 row block (the narrow, decode tile) reads its K/V rows once: no other
 * block of the launch reads them again, so they are loaded evict-first and the L2 keeps what
 * every block starts from instead (items, chunks, block tables, q). H200, 2026-11-30, 256 x 1K
 * decode: D 64 88.0-88.3% -> 89.1-89.8% of the read-only bandwidth, Llama 91.9 -> 92.6-92.9
 * (docs/BENCHMARKS.md). Wide tiles (at least 32 rows: the tuning space's warps_m is 2 to 8)
 * share K/V tiles between their row tiles through the L2. */
constexpr bool kStreamKV = kRows == 16;

/* Where a tile's K/V rows come from: the cache through the block table for positions before
 * the chunk, the batch's own k/v for its new tokens (so the fused KV write never races a read). */
struct kv_src_t {
    const elem_t *kc, *vc, *kn, *vn;
    const uint32_t *table; /* the chunk's block numbers */
    uint32_t start_pos, tok_off, ke, h;
    uint64_t pol; /* kStreamKV: the evict-first policy */
};

/* Block numbers for this thread's rows of the tile at key j0, fetched one iteration before the
 * cp.async that needs them so the table read's latency hides behind a tile of math. */
__device__ __forceinline__ void kv_ids(const kv_src_t &s, uint32_t j0, uint32_t tid,
                                       uint32_t (&ids)[kCPT]) {
#pragma unroll
    for (uint32_t i = 0; i < kCPT; i++) {
        const uint32_t c = tid + i * kThreads, j = j0 + c / kCPR;
        ids[i] = (c < kKVChunks && j < s.ke && j < s.start_pos) ? s.table[j / kBS] : 0u;
    }
}

__device__ __forceinline__ void kv_issue(const kv_src_t &s, uint32_t j0, uint32_t tid,
                                         const uint32_t (&ids)[kCPT], uint32_t ks, uint32_t vs) {
#pragma unroll
    for (uint32_t i = 0; i < kCPT; i++) {
        const uint32_t c = tid + i * kThreads;
        if (kCPT * kThreads != kKVChunks && c >= kKVChunks)
            break;
        const uint32_t r = c / kCPR, cc = c % kCPR, j = j0 + r;
        const elem_t *kp = s.kn, *vp = s.vn;
        uint64_t off = 0;
        uint32_t bytes = 0;
        if (j < s.ke) {
            bytes = 16;
            if (j >= s.start_pos) {
                off = ((uint64_t)(s.tok_off + j - s.start_pos) * kHkv + s.h) * kD;
            } else {
                kp = s.kc;
                vp = s.vc;
                off = (((uint64_t)ids[i] * kHkv + s.h) * kBS + j % kBS) * kD;
            }
        }
        off += cc * kVec;
        const uint32_t so = (r * kSRow + cc * kVec) * 2;
        if (kStreamKV) {
            cp_async16_pol(ks + so, kp + off, bytes, s.pol);
            cp_async16_pol(vs + so, vp + off, bytes, s.pol);
        } else {
            cp_async16(ks + so, kp + off, bytes);
            cp_async16(vs + so, vp + off, bytes);
        }
    }
}

/* One unit of att_k_attend. */
__device__ __forceinline__ void attend_unit(const att_kparams_t &p, uint32_t unit) {
    extern __shared__ __align__(128) unsigned char smem[];
    const tile_t t = tile_of(p, unit);
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t wm = warp % kWarpsM, wn = warp / kWarpsM;
    const uint32_t g = lane >> 2, t4 = lane & 3;

    const uint32_t q_s = smem_addr(smem);
    const uint32_t kv_s = q_s + kQBytes;

    if (kDP != kD) { /* zero the pad columns of every Q, K and V row (Q and K/V rows share kSRow) */
        for (uint32_t r = tid; r < kRows + kStages * 2 * kTileK; r += kThreads)
            *(uint4 *)(smem + (r * kSRow + kD) * 2) = make_uint4(0, 0, 0, 0);
    }

    /* Q tile: row r is token (row_begin + r) / G, query head h * G + (row_begin + r) % G; rows
     * past the chunk are zero. One cp.async group of its own, ahead of the K/V stages. */
    {
        const elem_t *q = (const elem_t *)p.q_d;
        for (uint32_t c = tid; c < kRows * kCPR; c += kThreads) {
            const uint32_t r = c / kCPR, cc = c % kCPR, R = t.it.row_begin + r;
            uint64_t off = 0;
            uint32_t bytes = 0;
            if (R < t.row_end) {
                off = ((uint64_t)(t.ch.token_offset + R / kG) * kHq + t.h * kG + R % kG) * kD +
                      cc * kVec;
                bytes = 16;
            }
            cp_async16(q_s + (r * kSRow + cc * kVec) * 2, q + off, bytes);
        }
        cp_async_commit();
    }

    kv_src_t src = {(const elem_t *)p.k_cache_d,
                    (const elem_t *)p.v_cache_d,
                    (const elem_t *)p.k_d,
                    (const elem_t *)p.v_d,
                    cached_table(p, t.ch),
                    t.ch.start_pos,
                    t.ch.token_offset,
                    t.ke,
                    t.h,
                    0};
    if (kStreamKV)
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(src.pol));
    const uint32_t kt_begin = t.kb / kTileK;
    const uint32_t kt_end = t.kb < t.ke ? (t.ke + kTileK - 1) / kTileK : kt_begin;

    uint32_t ids[kCPT];
#pragma unroll
    for (uint32_t s = 0; s + 1 < kStages; s++) {
        if (kt_begin + s < kt_end) {
            kv_ids(src, (kt_begin + s) * kTileK, tid, ids);
            kv_issue(src, (kt_begin + s) * kTileK, tid, ids, kv_s + s * 2 * kStageHalf,
                     kv_s + s * 2 * kStageHalf + kStageHalf);
        }
        cp_async_commit();
    }
    if (kt_begin + kStages - 1 < kt_end)
        kv_ids(src, (kt_begin + kStages - 1) * kTileK, tid, ids);

    /* The fused KV write overlaps the copies in flight; nothing in this launch reads the cache
     * rows it writes (new positions come from p.k_d / p.v_d). */
    write_own_kv(p, t, threadIdx.x, blockDim.x);

    /* This thread's rows: g and g + 8 of each of its warp's kMT m16 tiles. Key bounds [jlo, jhi]
     * and the ALiBi slope; rows past the chunk get an empty range. */
    int jlo[kMT][2], jhi[kMT][2], pos[kMT][2];
    float slope2[kMT][2];
    int lo_min = 0x7fffffff, lo_max = -1, hi_min = 0x7fffffff, hi_max = -1;
#pragma unroll
    for (uint32_t mi = 0; mi < kMT; mi++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const uint32_t R = t.it.row_begin + wm * kWRows + mi * 16 + g + 8 * i;
            if (R < t.row_end) {
                const uint32_t ps = t.ch.start_pos + R / kG;
                pos[mi][i] = (int)ps;
                jlo[mi][i] = (int)umax(window_lo(ps, p.window), t.kb);
                jhi[mi][i] = min((int)ps, (int)t.ke - 1);
                slope2[mi][i] = head_slope2(p, t.h * kG + R % kG);
            } else {
                pos[mi][i] = 0;
                jlo[mi][i] = 0x7fffffff;
                jhi[mi][i] = -1;
                slope2[mi][i] = 0.0f;
            }
            lo_min = min(lo_min, jlo[mi][i]);
            lo_max = max(lo_max, jlo[mi][i]);
            hi_min = min(hi_min, jhi[mi][i]);
            hi_max = max(hi_max, jhi[mi][i]);
        }
    /* Warp-uniform bounds: a key slice outside every row's range is skipped; one inside every
     * row's range needs no mask. */
    const int w_lo_min = warp_min(lo_min), w_lo_max = warp_max(lo_max);
    const int w_hi_min = warp_min(hi_min), w_hi_max = warp_max(hi_max);

    const float scale2 = p.scale * kLog2e;
    float o[kMT][kDT][4];
#pragma unroll
    for (uint32_t mi = 0; mi < kMT; mi++)
#pragma unroll
        for (uint32_t d = 0; d < kDT; d++)
            o[mi][d][0] = o[mi][d][1] = o[mi][d][2] = o[mi][d][3] = 0.0f;
    float m_run[kMT][2], l_run[kMT][2];
#pragma unroll
    for (uint32_t mi = 0; mi < kMT; mi++) {
        m_run[mi][0] = m_run[mi][1] = kNegInf;
        l_run[mi][0] = l_run[mi][1] = 0.0f;
    }

    /* ldmatrix lane addresses (bytes within a tile), see the PTX fragment layouts:
     * A (Q, x4): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15).
     * B for S (K rows = keys, x4): (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
     *   (keys 8-15, d 8-15): b0/b1 of two n8 tiles.
     * B for O (V rows = keys, x4.trans): (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7,
     *   d 8-15), (keys 8-15, d 8-15): b0/b1 of two n8 tiles of d.
     * A warp's m16 tile mi starts 16 rows after tile mi - 1. Each B fragment read from shared
     * memory feeds 2 * kMT MMAs: two m16 tiles per warp halve the ldmatrix traffic per FLOP. */
    const uint32_t a_off = ((wm * kWRows + (lane & 7) + ((lane >> 3) & 1) * 8) * kSRow +
                            (lane >> 4) * 8) * 2;
    constexpr uint32_t kMStep = 16 * kSRow * 2;
    const uint32_t k_off = ((wn * kKW + (lane & 7) + (lane >> 4) * 8) * kSRow +
                            ((lane >> 3) & 1) * 8) * 2;
    const uint32_t v_off = ((wn * kKW + (lane & 7) + ((lane >> 3) & 1) * 8) * kSRow +
                            (lane >> 4) * 8) * 2;

    cp_async_wait<kStages - 1>(); /* the Q group */
    __syncthreads();
    constexpr uint32_t kQK = kQRegs ? kDP / 16 : 1;
    uint32_t qf[kQRegs ? kMT : 1][kQK][4];
    if (kQRegs) {
#pragma unroll
        for (uint32_t mi = 0; mi < (kQRegs ? kMT : 1); mi++)
#pragma unroll
            for (uint32_t kk = 0; kk < kQK; kk++)
                ldsm_x4(qf[mi][kk], q_s + a_off + mi * kMStep + kk * 32);
    }

    for (uint32_t kt = kt_begin; kt < kt_end; kt++) {
        cp_async_wait<kStages - 2>();
        __syncthreads(); /* tile kt landed for all; every warp is done with tile kt - 1's slot */
        const uint32_t nt = kt + kStages - 1;
        if (nt < kt_end) {
            const uint32_t slot = (nt - kt_begin) % kStages;
            kv_issue(src, nt * kTileK, tid, ids, kv_s + slot * 2 * kStageHalf,
                     kv_s + slot * 2 * kStageHalf + kStageHalf);
        }
        cp_async_commit();
        if (nt + 1 < kt_end)
            kv_ids(src, (nt + 1) * kTileK, tid, ids);

        const uint32_t slot = (kt - kt_begin) % kStages;
        const uint32_t ks = kv_s + slot * 2 * kStageHalf, vs = ks + kStageHalf;
        const int js = (int)(kt * kTileK + wn * kKW), je = js + (int)kKW - 1;
        if (js > w_hi_max || je < w_lo_min)
            continue; /* warp-uniform: no row of this warp needs these keys */
        const bool need_mask = !(js >= w_lo_max && je <= w_hi_min);

        /* S = Q K^T for the warp's kWRows rows x kKW keys */
        float s[kMT][kNT][4];
#pragma unroll
        for (uint32_t mi = 0; mi < kMT; mi++)
#pragma unroll
            for (uint32_t n = 0; n < kNT; n++)
                s[mi][n][0] = s[mi][n][1] = s[mi][n][2] = s[mi][n][3] = 0.0f;
#pragma unroll
        for (uint32_t kk = 0; kk < kDP / 16; kk++) {
            uint32_t a[kMT][4];
#pragma unroll
            for (uint32_t mi = 0; mi < kMT; mi++) {
                if (kQRegs) {
#pragma unroll
                    for (int x = 0; x < 4; x++)
                        a[mi][x] = qf[kQRegs ? mi : 0][kQRegs ? kk : 0][x];
                } else {
                    ldsm_x4(a[mi], q_s + a_off + mi * kMStep + kk * 32);
                }
            }
#pragma unroll
            for (uint32_t np = 0; np < kNT / 2; np++) {
                uint32_t b[4];
                ldsm_x4(b, ks + k_off + np * 16 * kSRow * 2 + kk * 32);
#pragma unroll
                for (uint32_t mi = 0; mi < kMT; mi++) {
                    mma16816(s[mi][2 * np], a[mi], b[0], b[1]);
                    mma16816(s[mi][2 * np + 1], a[mi], b[2], b[3]);
                }
            }
        }

        /* logits in log2 units, masked; then the online softmax of rows g and g + 8 */
#pragma unroll
        for (uint32_t mi = 0; mi < kMT; mi++)
#pragma unroll
            for (uint32_t n = 0; n < kNT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = js + (int)(n * 8 + 2 * t4) + (e & 1), ri = e >> 1;
                    float x = logit2(s[mi][n][e], p, scale2, j, pos[mi][ri], slope2[mi][ri]);
                    if (need_mask && (j < jlo[mi][ri] || j > jhi[mi][ri]))
                        x = kNegInf;
                    s[mi][n][e] = x;
                }
#pragma unroll
        for (uint32_t mi = 0; mi < kMT; mi++)
#pragma unroll
            for (int ri = 0; ri < 2; ri++) {
                float mx = kNegInf;
#pragma unroll
                for (uint32_t n = 0; n < kNT; n++)
                    mx = fmaxf(mx, fmaxf(s[mi][n][2 * ri], s[mi][n][2 * ri + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m_run[mi][ri], mx);
                /* a row with nothing unmasked yet keeps base 0: exp2(-inf - 0) = 0, never NaN */
                const float base = m_new == kNegInf ? 0.0f : m_new;
                const float alpha = att_ex2(m_run[mi][ri] - base);
                m_run[mi][ri] = m_new;
                float sum = 0.0f;
#pragma unroll
                for (uint32_t n = 0; n < kNT; n++) {
                    s[mi][n][2 * ri] = att_ex2(s[mi][n][2 * ri] - base);
                    s[mi][n][2 * ri + 1] = att_ex2(s[mi][n][2 * ri + 1] - base);
                    sum += s[mi][n][2 * ri] + s[mi][n][2 * ri + 1];
                }
                /* this thread's columns; quad-summed at the end */
                l_run[mi][ri] = l_run[mi][ri] * alpha + sum;
#pragma unroll
                for (uint32_t d = 0; d < kDT; d++) {
                    o[mi][d][2 * ri] *= alpha;
                    o[mi][d][2 * ri + 1] *= alpha;
                }
            }

        /* O += P V: the S accumulators of two n8 tiles are exactly an A fragment of 16 keys */
#pragma unroll
        for (uint32_t kk = 0; kk < kKW / 16; kk++) {
            uint32_t a[kMT][4];
#pragma unroll
            for (uint32_t mi = 0; mi < kMT; mi++) {
                a[mi][0] = pack2(s[mi][2 * kk][0], s[mi][2 * kk][1]);
                a[mi][1] = pack2(s[mi][2 * kk][2], s[mi][2 * kk][3]);
                a[mi][2] = pack2(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                a[mi][3] = pack2(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
            }
#pragma unroll
            for (uint32_t dp = 0; dp < kDP / 16; dp++) {
                uint32_t b[4];
                ldsm_x4_t(b, vs + v_off + kk * 16 * kSRow * 2 + dp * 32);
#pragma unroll
                for (uint32_t mi = 0; mi < kMT; mi++) {
                    mma16816(o[mi][2 * dp], a[mi], b[0], b[1]);
                    mma16816(o[mi][2 * dp + 1], a[mi], b[2], b[3]);
                }
            }
        }
    }

    /* Epilogue: every warp parks its rows (unnormalized, f32) and (max, sum) in shared memory,
     * then all threads combine the key-split warps and store 16 bytes at a time. */
    cp_async_wait<0>();
    __syncthreads();
    float *slab = (float *)smem;                         /* [kWarpsN][kRows][kORow] */
    float *mls = slab + kWarpsN * kRows * kORow;          /* [kWarpsN][kRows][2] */
#pragma unroll
    for (uint32_t mi = 0; mi < kMT; mi++)
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            float l = l_run[mi][ri];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const uint32_t r = wm * kWRows + mi * 16 + g + 8 * ri;
            float *row = slab + (wn * kRows + r) * kORow + 2 * t4;
#pragma unroll
            for (uint32_t d = 0; d < kDT; d++)
                *(float2 *)(row + d * 8) = make_float2(o[mi][d][2 * ri], o[mi][d][2 * ri + 1]);
            if (t4 == 0) {
                mls[(wn * kRows + r) * 2] = m_run[mi][ri];
                mls[(wn * kRows + r) * 2 + 1] = l;
            }
        }
    __syncthreads();

    for (uint32_t c = tid; c < kRows * kCPR; c += kThreads) {
        const uint32_t r = c / kCPR, cc = c % kCPR, R = t.it.row_begin + r;
        if (R >= t.row_end)
            continue;
        float M = kNegInf;
#pragma unroll
        for (uint32_t w = 0; w < kWarpsN; w++)
            M = fmaxf(M, mls[(w * kRows + r) * 2]);
        float L = 0.0f, v[kVec];
#pragma unroll
        for (uint32_t e = 0; e < kVec; e++)
            v[e] = 0.0f;
#pragma unroll
        for (uint32_t w = 0; w < kWarpsN; w++) {
            const float mw = mls[(w * kRows + r) * 2];
            const float f = mw == kNegInf ? 0.0f : att_ex2(mw - M);
            L += f * mls[(w * kRows + r) * 2 + 1];
            const float *src_row = slab + (w * kRows + r) * kORow + cc * kVec;
#pragma unroll
            for (uint32_t e = 0; e < kVec; e += 4) {
                const float4 x = *(const float4 *)(src_row + e);
                v[e] += f * x.x;
                v[e + 1] += f * x.y;
                v[e + 2] += f * x.z;
                v[e + 3] += f * x.w;
            }
        }
        if (t.it.part != ATT_KPART_NONE) {
            const uint64_t prow = ((uint64_t)t.it.part * kHkv + t.h) * kRows + r;
            float *po = (float *)p.part_o_d + prow * kD + cc * kVec;
#pragma unroll
            for (uint32_t e = 0; e < kVec; e += 4)
                *(float4 *)(po + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
            if (cc == 0)
                *(float2 *)((float *)p.part_ml_d + prow * 2) = make_float2(M, L);
        } else {
            const uint32_t qh = t.h * kG + R % kG;
            const float sc = out_scale(p, qh, M, L);
#pragma unroll
            for (uint32_t e = 0; e < kVec; e++)
                v[e] *= sc;
            elem_t *dst = (elem_t *)p.out_d +
                          ((uint64_t)(t.ch.token_offset + R / kG) * kHq + qh) * kD + cc * kVec;
            store_vec(dst, v);
        }
    }
    if (t.it.part != ATT_KPART_NONE)
        finish_split<block_sync>(p, t, threadIdx.x, blockDim.x);
}

#else /* !ATT_TC */
/* ---- the portable body: plain FMAs in f32, one warp (wave) per query row, lane l holding dims
 * l, l + kWave, ... (f32 everywhere; f16 and bf16 with ATT_PORTABLE_MATH) ---- */

constexpr uint32_t kWave = ATT_WAVE;
constexpr uint32_t kDL = (kD + kWave - 1) / kWave;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWave / 2; o > 0; o >>= 1)
        v += att_shfl_xor(v, o);
    return v;
}

/* One element of the model's dtype as f32, and back (round to nearest even). */
__device__ __forceinline__ float load_f32(const elem_t *p) {
#if ATT_DTYPE == ATT_DT_BF16
    return att_bf16_to_f32(*p);
#elif ATT_DTYPE == ATT_DT_F16
    return att_f16_to_f32(*p);
#else
    return *p;
#endif
}

__device__ __forceinline__ elem_t to_elem(float v) {
#if ATT_DTYPE == ATT_DT_F32
    return v;
#else
    return (elem_t)(pack2(v, 0.0f) & 0xffffu);
#endif
}

/* Key j's K (or V) row for KV head h: the cache before the chunk, the batch's own rows after. */
__device__ __forceinline__ uint64_t kv_row_off(const att_kchunk_t &ch, const uint32_t *table,
                                               uint32_t h, uint32_t j, bool *is_new) {
    *is_new = j >= ch.start_pos;
    if (*is_new)
        return ((uint64_t)(ch.token_offset + j - ch.start_pos) * kHkv + h) * kD;
    return (((uint64_t)table[j / kBS] * kHkv + h) * kBS + j % kBS) * kD;
}

/* One unit of att_k_attend. */
__device__ __forceinline__ void attend_unit(const att_kparams_t &p, uint32_t unit) {
    const tile_t t = tile_of(p, unit);
    write_own_kv(p, t, threadIdx.x, blockDim.x);
    const uint32_t lane = threadIdx.x % kWave, warp = threadIdx.x / kWave;
    const elem_t *qg = (const elem_t *)p.q_d;
    const elem_t *kc = (const elem_t *)p.k_cache_d, *vc = (const elem_t *)p.v_cache_d;
    const elem_t *kn = (const elem_t *)p.k_d, *vn = (const elem_t *)p.v_d;
    const uint32_t *table = cached_table(p, t.ch);
    const float scale2 = p.scale * kLog2e;

    for (uint32_t r = warp; r < kRows; r += kWarps) {
        const uint32_t R = t.it.row_begin + r;
        if (R >= t.row_end)
            break;
        const uint32_t ps = t.ch.start_pos + R / kG, qh = t.h * kG + R % kG;
        const uint32_t j_lo = umax(window_lo(ps, p.window), t.kb), j_end = umin(ps + 1, t.ke);
        const float slope2 = head_slope2(p, qh);
        const elem_t *qrow = qg + ((uint64_t)(t.ch.token_offset + R / kG) * kHq + qh) * kD;
        float q[kDL], o[kDL];
#pragma unroll
        for (uint32_t i = 0; i < kDL; i++) {
            const uint32_t d = lane + kWave * i;
            q[i] = d < kD ? load_f32(qrow + d) : 0.0f;
            o[i] = 0.0f;
        }
        float m = kNegInf, l = 0.0f;
        /* four keys at a time: their loads and dot products are independent */
        for (uint32_t j0 = j_lo; j0 < j_end; j0 += 4) {
            float x[4], vv[4][kDL];
#pragma unroll
            for (uint32_t u = 0; u < 4; u++) {
                const uint32_t j = j0 + u;
                x[u] = kNegInf;
                if (j < j_end) {
                    bool is_new;
                    const uint64_t off = kv_row_off(t.ch, table, t.h, j, &is_new);
                    const elem_t *kr = (is_new ? kn : kc) + off, *vr = (is_new ? vn : vc) + off;
                    float dot = 0.0f;
#pragma unroll
                    for (uint32_t i = 0; i < kDL; i++) {
                        const uint32_t d = lane + kWave * i;
                        dot += d < kD ? q[i] * load_f32(kr + d) : 0.0f;
                        vv[u][i] = d < kD ? load_f32(vr + d) : 0.0f;
                    }
                    x[u] = logit2(warp_sum(dot), p, scale2, (int)j, (int)ps, slope2);
                } else {
#pragma unroll
                    for (uint32_t i = 0; i < kDL; i++)
                        vv[u][i] = 0.0f;
                }
            }
#pragma unroll
            for (uint32_t u = 0; u < 4; u++) {
                if (x[u] == kNegInf)
                    continue;
                const float m_new = fmaxf(m, x[u]);
                const float alpha = att_ex2(m - m_new), pe = att_ex2(x[u] - m_new);
                l = l * alpha + pe;
#pragma unroll
                for (uint32_t i = 0; i < kDL; i++)
                    o[i] = o[i] * alpha + pe * vv[u][i];
                m = m_new;
            }
        }
        if (t.it.part != ATT_KPART_NONE) {
            const uint64_t prow = ((uint64_t)t.it.part * kHkv + t.h) * kRows + r;
            float *po = (float *)p.part_o_d + prow * kD;
#pragma unroll
            for (uint32_t i = 0; i < kDL; i++)
                if (lane + kWave * i < kD)
                    po[lane + kWave * i] = o[i];
            if (lane == 0)
                *(float2 *)((float *)p.part_ml_d + prow * 2) = make_float2(m, l);
        } else {
            const float sc = out_scale(p, qh, m, l);
            elem_t *dst =
                (elem_t *)p.out_d + ((uint64_t)(t.ch.token_offset + R / kG) * kHq + qh) * kD;
#pragma unroll
            for (uint32_t i = 0; i < kDL; i++)
                if (lane + kWave * i < kD)
                    dst[lane + kWave * i] = to_elem(o[i] * sc);
        }
    }
    if (t.it.part != ATT_KPART_NONE)
        finish_split<block_sync>(p, t, threadIdx.x, blockDim.x);
}
#endif

#if !(ATT_TC && ATT_WGMMA)
/* A unit a block, or a persistent grid (see take_unit). */
extern "C" __global__ void __launch_bounds__(kThreads) att_k_attend(const att_kparams_t p) {
    const uint32_t units = p.num_items * kHkv;
    uint32_t unit = p.sm_split == 0 ? blockIdx.x : take_unit(p, true);
    while (unit < units) {
        attend_unit(p, unit);
        if (p.sm_split == 0)
            return;
        unit = take_unit(p, false);
    }
    if (p.sm_split != 0)
        units_done(p);
}
#endif

/* The tile configuration, read by the host (att_kparams.h, ATT_KINFO_*). (A linkage block: nvcc,
 * which builds tools/wgmma_check.cu from this file, takes `extern "C" __constant__ x = ...` for a
 * declaration and leaves its host shadow undefined.) */
extern "C" {
__constant__ uint32_t att_k_info[ATT_KINFO_COUNT] = {
    kRows, kTileK, kAttendThreads, kSmemBytes, 0, kKvwThreads, 0, 0};
}

/* ---- append-only KV write ---- */

extern "C" __global__ void __launch_bounds__(kKvwThreads) att_k_kv_write(const att_kparams_t p) {
    const att_kchunk_t ch = ((const att_kchunk_t *)p.chunks_d)[blockIdx.x / kHkv];
    copy_new_kv(p, ch, blockIdx.x % kHkv, 0, ch.num_tokens, threadIdx.x, kKvwThreads);
    if (blockIdx.x % kHkv == 0)
        keep_table(p, ch, threadIdx.x, kKvwThreads);
}

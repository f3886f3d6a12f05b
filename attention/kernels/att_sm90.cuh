/* The sm_90a tensor-core body of att_k_attend (f16/bf16, head_dim 64 or 128): warpgroup MMA
 * (wgmma) with its operands in shared memory, chosen by ATT_WGMMA=1 for the wide (prefill) tile.
 * Included by att_unified.cu after its helpers (tile_of, write_own_kv, logit2, head_slope2,
 * out_scale, pack2, window_lo, cp_async16, smem_addr); compiled only for sm_90a (NVRTC
 * --gpu-architecture=sm_90a), since wgmma exists on no other target.
 *
 * Why another body: the mma.sync body (att_unified.cu) reads every operand through ldmatrix into
 * registers, so a 128-row tile needs 249 registers and its warps run Q.K^T, softmax and P.V in
 * turn with the tensor cores idle through the softmax (docs/BENCHMARKS.md, prefill). Here:
 *   - ATT_WARPS_M / 4 consumer warpgroups of 64 query rows each (tile rows = 16 * ATT_WARPS_M:
 *     8 warps, 128 rows by default), plus one producer warpgroup (the last 4 warps):
 *     ATT_KINFO_THREADS is 32 * ATT_WARPS_M + 128. One producer warp was too few: it issued
 *     every copy of a stage (64 cp.async a lane at 128 dims and 64 keys, each after its own
 *     block-table read) and could not keep two consumer warpgroups fed (150 TFLOP/s on the
 *     H200 against the mma.sync body's 229, docs/BENCHMARKS.md).
 *   - The producer brings each stage's ATT_TILE_K keys of K and V into shared memory with
 *     cp.async (the paged cache through the block table before the chunk, the batch's own k/v
 *     rows from the chunk on, zeros past the item's keys: kv_issue's rules), in an ATT_STAGES-deep
 *     ring guarded by mbarriers (full: every producer thread's copies landed; empty: every
 *     consumer warp is done with the slot). The consumers never wait for each other, so one
 *     warpgroup's softmax overlaps the other's MMAs without explicit scheduling.
 *   - S = Q K^T: wgmma m64nTILE_Kk16, A = Q and B = K both from shared memory by descriptor; the
 *     online softmax runs on the accumulators (each thread holds rows g and g + 8 of its warp's 16,
 *     as with mma.sync, so the masking and softmax are the other body's, with one m16 tile); P is
 *     rounded to the dtype into registers, and O += P V is wgmma m64nDk16 with A = P from
 *     registers and B = V from shared memory. Within a warpgroup, stage k's Q.K^T is issued
 *     together with stage k - 1's P.V, and stage k's softmax runs while that P.V does.
 *
 * Shared-memory layout (what the descriptors describe): a tile of rows x head_dim 16-bit
 * elements is stored as head_dim / 64 column blocks, each rows x 128 bytes, with 128-byte swizzle
 * (the 16-byte chunk c of row r sits at chunk c ^ (r % 8) of its 128-byte line; the pattern
 * repeats every 8 rows = 1024 bytes, so every block starts 1024-aligned). Q and K are K-major
 * operands in this layout: one k16 step is 32 bytes along the line, the next 8 rows are 1024 bytes
 * on (the stride byte offset), and the next 64 dims are the next column block. V is stored the
 * same way (keys are rows) and read as a "transposed" (MN-major) B, which wgmma allows for 16-bit
 * types: along N (head_dim) 64 elements per 128-byte line, the next 64 at the leading byte offset
 * (one column block on); along K (keys) one line per key, 8 keys per 1024-byte swizzle atom, the
 * next 8 at the stride byte offset (1024); a k16 step of keys is 2048 bytes on. So K and V tiles
 * are filled by the same copy code, and no tile is ever transposed in memory.
 *
 * Shared memory: 1024 (to align the base) + rows * D * 2 (Q) + ATT_STAGES * 2 * ATT_TILE_K * D * 2
 * (K and V ring); the barriers are static shared memory (1024 bytes with their alignment). For
 * the default (128 rows, 128 keys, 3 stages, D 128): 230400 bytes, one block per SM, 168
 * registers a thread, no spills; 64 keys: 132096 bytes, 155 registers (nvcc 13.0 -arch=sm_90a
 * --resource-usage; with 384 threads ptxas allows 168, as it did with 288: it allocates for
 * whole groups of 4 warps). Two warpgroups at D 128 and 128 keys take
 * registers from the producer (setmaxnreg, kRegShift). ptxas reports no spills and no
 * serialized wgmma (C75xx) for the tiles tun_cuda_wgmma_ok takes. */

#if ATT_HEAD_DIM != 64 && ATT_HEAD_DIM != 128
#error "ATT_WGMMA supports head_dim 64 and 128"
#endif
/* (NVRTC only: nvcc also preprocesses device code once without the feature macro) */
#if defined(__CUDACC_RTC__) && defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "ATT_WGMMA needs the sm_90a target (--gpu-architecture=sm_90a)"
#endif

static_assert(ATT_WAVE == 32, "the tensor-core body is written for 32-lane warps");
static_assert(kMT == 1 && kWarpsN == 1, "wgmma tiles: ATT_WARP_MT 1, ATT_WARPS_N 1");
static_assert(kWarpsM % 4 == 0 && kWarpsM >= 4 && kWarpsM <= 12,
              "wgmma tiles: 1 to 3 warpgroups of 4 warps (ATT_WARPS_M 4, 8 or 12)");
static_assert(kTileK == 64 || kTileK == 128, "wgmma tiles: ATT_TILE_K 64 or 128 (the MMA's N)");
static_assert(ATT_STAGES >= 2 && ATT_STAGES <= 4, "2 to 4 pipeline stages");

constexpr uint32_t kStages = ATT_STAGES;
constexpr uint32_t kWG = kWarpsM / 4;                 /* consumer warpgroups */
constexpr uint32_t kAttendThreads = kThreads + 128;   /* consumers, then the producer warpgroup */
constexpr uint32_t kQBytes = kRows * kD * 2;
constexpr uint32_t kKVBytes = kTileK * kD * 2;        /* one stage's K (or V) */
constexpr uint32_t kSmemBytes = 1024 + kQBytes + kStages * 2 * kKVBytes;
constexpr uint32_t kNT = kTileK / 8;                  /* n8 score tiles per row pair */
constexpr uint32_t kDT = kD / 8;                      /* n8 output tiles */

#if ATT_DTYPE == ATT_DT_BF16
#define ATT_WG_AB "bf16.bf16"
#else
#define ATT_WG_AB "f16.f16"
#endif

/* Byte offset of 16-byte chunk cc (of head_dim / 8) of row r in a tile of `rows` rows stored as
 * described above. */
__device__ __forceinline__ uint32_t sw128(uint32_t rows, uint32_t r, uint32_t cc) {
    return (cc / 8) * rows * 128 + r * 128 + (((cc % 8) ^ (r % 8)) * 16);
}

/* A wgmma matrix descriptor: shared address, leading and stride byte offsets, 128-byte swizzle
 * (layout type 1 in bits 62-63); base offset 0, since every swizzle atom is 1024-aligned. */
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3ffffu) >> 4) | (uint64_t)((lbo >> 4) & 0x3fffu) << 16 |
           (uint64_t)((sbo >> 4) & 0x3fffu) << 32 | 1ull << 62;
}

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
/* Waits until at most N of this warp's committed wgmma groups are pending (they complete in
 * order). */
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Orders this thread's generic-proxy writes of shared memory (cp.async's) before later
 * async-proxy reads (wgmma's operands). */
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* Waits until the barrier's phase of the given parity has completed. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\n"
                 "WAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
/* Pins the accumulators to this point: after a wgmma.wait_group, the compiler must not move their
 * reads above it (it does not know the MMA writes them after its own statement); before a
 * wgmma.fence, their writes (zeroing, rescaling) must not sink below it, or ptxas serializes the
 * MMAs (C7515, "non wgmma instructions defining accumulator registers"). */
template <int N> __device__ __forceinline__ void wgmma_pin(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+f"(d[i])::"memory");
}

/* bar.sync on a named barrier of n threads (id 0 is __syncthreads'). */
__device__ __forceinline__ void named_sync(uint32_t id, uint32_t n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

/* The wgmma instructions, for N = 32 or 64 accumulators a thread (m64n64k16, m64n128k16): the
 * operand lists of their inline assembly. */
#define WG_D32                                                                                     \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "   \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_D64                                                                                     \
    WG_D32 ", "                                                                                    \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "   \
    "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_F8(k, d, i)                                                                             \
    k(d[i]), k(d[i + 1]), k(d[i + 2]), k(d[i + 3]), k(d[i + 4]), k(d[i + 5]), k(d[i + 6]),         \
        k(d[i + 7])
#define WG_F32(k, d) WG_F8(k, d, 0), WG_F8(k, d, 8), WG_F8(k, d, 16), WG_F8(k, d, 24)
#define WG_F64(k, d)                                                                               \
    WG_F32(k, d), WG_F8(k, d, 32), WG_F8(k, d, 40), WG_F8(k, d, 48), WG_F8(k, d, 56)
#define WG_OP "wgmma.mma_async.sync.aligned.m64n"

/* d (64 x N, f32; this thread's 32 or 64 of it) = A B, A and B by descriptor: the first k16
 * step, which only writes d (no other instruction defines it inside the MMA's stage). */
__device__ __forceinline__ void wgmma_ss_zero(float (&d)[32], uint64_t a, uint64_t b) {
    asm volatile(WG_OP "64k16.f32." ATT_WG_AB " {" WG_D32 "}, %32, %33, 0, 1, 1, 0, 0;\n"
                 : WG_F32("=f", d)
                 : "l"(a), "l"(b));
}
__device__ __forceinline__ void wgmma_ss_zero(float (&d)[64], uint64_t a, uint64_t b) {
    asm volatile(WG_OP "128k16.f32." ATT_WG_AB " {" WG_D64 "}, %64, %65, 0, 1, 1, 0, 0;\n"
                 : WG_F64("=f", d)
                 : "l"(a), "l"(b));
}

/* d += A B, A and B by descriptor (both K-major). */
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t a, uint64_t b) {
    asm volatile(WG_OP "64k16.f32." ATT_WG_AB " {" WG_D32 "}, %32, %33, 1, 1, 1, 0, 0;\n"
                 : WG_F32("+f", d)
                 : "l"(a), "l"(b));
}
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t a, uint64_t b) {
    asm volatile(WG_OP "128k16.f32." ATT_WG_AB " {" WG_D64 "}, %64, %65, 1, 1, 1, 0, 0;\n"
                 : WG_F64("+f", d)
                 : "l"(a), "l"(b));
}

/* d += A B, A from registers (a thread's 4 of the 16 x 16 A fragment of its warp, mma.sync's
 * layout), B by descriptor, MN-major (transposed: the last immediate). */
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(WG_OP "64k16.f32." ATT_WG_AB " {" WG_D32 "}, {%32, %33, %34, %35}, %36, "
                       "1, 1, 1, 1;\n"
                 : WG_F32("+f", d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(WG_OP "128k16.f32." ATT_WG_AB " {" WG_D64 "}, {%64, %65, %66, %67}, %68, "
                       "1, 1, 1, 1;\n"
                 : WG_F64("+f", d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

/* A warpgroup's S = Q K^T (issued, not committed) for its 64 rows and a stage's kTileK keys: q is
 * the shared address of its first Q row in a tile of q_rows rows, k of the stage's K. */
__device__ __forceinline__ void wg_qk(float (&s)[kNT * 4], uint32_t q, uint32_t q_rows,
                                      uint32_t k) {
    wgmma_ss_zero(s, wg_desc(q, 16, 1024), wg_desc(k, 16, 1024));
#pragma unroll
    for (uint32_t kk = 1; kk < kD / 16; kk++) {
        const uint32_t col = (kk % 4) * 32; /* k16 step within a 64-dim block */
        wgmma_ss(s, wg_desc(q + (kk / 4) * q_rows * 128 + col, 16, 1024),
                 wg_desc(k + (kk / 4) * kTileK * 128 + col, 16, 1024));
    }
}

/* P, the probabilities of s rounded to the dtype, as wgmma's A fragments: two n8 score tiles of a
 * row pair are one k16 fragment, as with mma.sync. */
__device__ __forceinline__ void wg_pack_p(const float (&s)[kNT * 4],
                                          uint32_t (&pa)[kTileK / 16][4]) {
#pragma unroll
    for (uint32_t kk = 0; kk < kTileK / 16; kk++) {
        pa[kk][0] = pack2(s[8 * kk], s[8 * kk + 1]);
        pa[kk][1] = pack2(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack2(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack2(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

/* O += P V (issued, not committed), v the shared address of a stage's V. */
__device__ __forceinline__ void wg_pv(float (&o)[kDT * 4],
                                      const uint32_t (&pa)[kTileK / 16][4], uint32_t v) {
#pragma unroll
    for (uint32_t kk = 0; kk < kTileK / 16; kk++)
        wgmma_rs(o, pa[kk], wg_desc(v + kk * 16 * 128, kTileK * 128, 1024));
}

/* The producer warpgroup: stage after stage of K and V into the ring. Thread pt copies chunk
 * pt % kCPR of rows pt / kCPR, + kPRows, ...: a warp's 32 copies cover whole 128-byte lines of
 * consecutive keys (coalesced reads, conflict-free swizzled writes), and a stage is kPIters
 * copies of K and as many of V a thread. Before its copies a thread reads the block-table
 * entries of its rows, all at once (one latency, not one per copy), and each entry once: its
 * rows i and i - 1 are one cache block unless row i starts a block (block sizes are powers of
 * two, so a block of at least kPRows keys never splits a pass's rows). Each thread keeps two
 * stages' copies in flight: after issuing stage n it waits for its stage n - 1 copies, fences
 * them for wgmma (async proxy) and arrives on full[n - 1], which completes with all 128
 * threads' arrivals. Before it blocks on a slot still in use it releases the stage it holds:
 * the consumers free a slot only after they started on the next stage (their P.V wait is
 * deferred), so holding it back would leave both sides waiting. */
constexpr uint32_t kProducers = 128;
constexpr uint32_t kPRows = kProducers / kCPR; /* rows a pass of the warpgroup copies */
constexpr uint32_t kPIters = kTileK / kPRows;  /* passes a stage */
static_assert(kProducers % kCPR == 0 && kTileK % kPRows == 0, "whole rows a producer pass");
/* Two consumer warpgroups at 128 dims and 128 keys need more than the 168 registers a thread
 * ptxas allows 384 threads (they spilled): the producer warpgroup hands them its surplus with
 * setmaxnreg (88 + 2 x 208 = 3 x 168 per lane, the launch's whole allocation, so the consumers'
 * increase never waits for registers that do not come). ptxas honours the figures in each
 * branch because __launch_bounds__ fixes the entry count; fewer than 88 spill the producer at
 * block size 8 (a table entry each pass). Only this tile shifts: the others fit in 168. */
constexpr bool kRegShift = kWG == 2 && kD == 128 && kTileK == 128;
constexpr uint32_t kProducerRegs = 88, kConsumerRegs = 208;
static_assert(!kRegShift || kProducerRegs + 2 * kConsumerRegs == 3 * 168,
              "setmaxnreg moves registers between warpgroups, it does not add any");

__device__ __forceinline__ void wg_produce(const att_kparams_t &p, const tile_t &t, uint32_t kv_s,
                                           uint32_t full, uint32_t empty, uint32_t kt_begin,
                                           uint32_t kt_end, uint32_t pt) {
    const elem_t *kc = (const elem_t *)p.k_cache_d, *vc = (const elem_t *)p.v_cache_d;
    const elem_t *kn = (const elem_t *)p.k_d, *vn = (const elem_t *)p.v_d;
    const uint32_t *table = cached_table(p, t.ch);
    const uint32_t cc = pt % kCPR, q = pt / kCPR;
    bool held = false;    /* stage n - 1 is issued and not yet released */
    /* The fused KV write (write_own_kv), by this warpgroup alone while the consumers compute:
     * nothing in the launch reads the cache rows it writes (new positions come from p.k_d /
     * p.v_d), so it only has to end with the block. Done by every thread before the consumers
     * started, it held back their Q load and first stages by its table reads and copies. It runs
     * once the ring is full, before the first wait for a free slot (or after the last stage). */
    bool written = false;
    for (uint32_t kt = kt_begin; kt < kt_end; kt++) {
        const uint32_t n = kt - kt_begin, slot = n % kStages;
        uint32_t bid[kPIters];
#pragma unroll
        for (uint32_t i = 0; i < kPIters; i++) {
            const uint32_t j0 = kt * kTileK + i * kPRows, j = j0 + q;
            if (kBS >= kPRows && i > 0 && j0 % kBS != 0)
                bid[i] = bid[i > 0 ? i - 1 : 0];
            else
                bid[i] = j < t.ke && j < t.ch.start_pos ? __ldg(table + j / kBS) : 0;
        }
        if (n >= kStages) {
            if (held) {
                cp_async_wait<0>();
                fence_proxy_async();
                mbar_arrive(full + ((n - 1) % kStages) * 8);
                held = false;
            }
            if (!written) {
                write_own_kv(p, t, pt, kProducers);
                written = true;
            }
            mbar_wait(empty + slot * 8, (n / kStages - 1) & 1);
        }
        const uint32_t ks = kv_s + slot * 2 * kKVBytes, vs = ks + kKVBytes;
#pragma unroll
        for (uint32_t i = 0; i < kPIters; i++) {
            const uint32_t r = i * kPRows + q, j = kt * kTileK + r;
            const elem_t *kp = kn, *vp = vn;
            uint64_t off = 0;
            uint32_t bytes = 0;
            if (j < t.ke) {
                bytes = 16;
                if (j >= t.ch.start_pos) {
                    off = ((uint64_t)(t.ch.token_offset + j - t.ch.start_pos) * kHkv + t.h) * kD;
                } else {
                    kp = kc;
                    vp = vc;
                    off = (((uint64_t)bid[i] * kHkv + t.h) * kBS + j % kBS) * kD;
                }
            }
            off += cc * kVec;
            const uint32_t so = sw128(kTileK, r, cc);
            cp_async16(ks + so, kp + off, bytes);
            cp_async16(vs + so, vp + off, bytes);
        }
        cp_async_commit();
        if (held) {
            cp_async_wait<1>();
            fence_proxy_async();
            mbar_arrive(full + ((n - 1) % kStages) * 8);
        }
        held = true;
    }
    if (held) {
        cp_async_wait<0>();
        fence_proxy_async();
        mbar_arrive(full + ((kt_end - 1 - kt_begin) % kStages) * 8);
    }
    if (!written)
        write_own_kv(p, t, pt, kProducers);
}

/* Every consumer warp's barrier (named barrier 15; the warpgroups' own are 1 to 3): the
 * producer warpgroup has returned by the time they finish a split item. */
struct consumer_sync {
    __device__ static void sync() { named_sync(15, kThreads); }
};

extern "C" __global__ void __launch_bounds__(kAttendThreads, 1)
att_k_attend(const att_kparams_t p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ __align__(8) uint64_t bars[2 * kStages]; /* full[kStages], then empty[kStages] */
    const tile_t t = tile_of(p, blockIdx.x);
    /* The warp index broadcast from lane 0: ptxas then knows the producer / consumer branch is
     * warp-uniform; with tid >> 5 it serializes every wgmma (C7518, "divergent path"). */
    const uint32_t tid = threadIdx.x, lane = tid & 31;
    const uint32_t warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
    const uint32_t q_s = (smem_addr(smem) + 1023u) & ~1023u;
    const uint32_t kv_s = q_s + kQBytes;
    const uint32_t full = smem_addr(bars), empty = full + kStages * 8;
    const uint32_t kt_begin = t.kb / kTileK;
    const uint32_t kt_end = t.kb < t.ke ? (t.ke + kTileK - 1) / kTileK : kt_begin;

    if (tid == 0) {
        for (uint32_t s = 0; s < kStages; s++) {
            mbar_init(full + s * 8, kProducers); /* every producer thread */
            mbar_init(empty + s * 8, kWarpsM);   /* one arrival per consumer warp */
        }
    }
    __syncthreads(); /* the barriers are initialized */

    if (warp >= kWarpsM) {
        if (kRegShift) /* every warpgroup branch is warpgroup-uniform, as setmaxnreg needs */
            asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
        wg_produce(p, t, kv_s, full, empty, kt_begin, kt_end, tid - kThreads);
        return;
    }
    if (kRegShift)
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));

    const uint32_t wg = warp / 4, wi = warp % 4, wt = tid % 128;
    const uint32_t g = lane >> 2, t4 = lane & 3;

    /* This warpgroup's 64 Q rows (row r: token (row_begin + r) / G, query head
     * h * G + (row_begin + r) % G; rows past the chunk are zero). */
    {
        const elem_t *q = (const elem_t *)p.q_d;
        for (uint32_t c = wt; c < 64 * kCPR; c += 128) {
            const uint32_t r = wg * 64 + c / kCPR, cc = c % kCPR, R = t.it.row_begin + r;
            uint64_t off = 0;
            uint32_t bytes = 0;
            if (R < t.row_end) {
                off = ((uint64_t)(t.ch.token_offset + R / kG) * kHq + t.h * kG + R % kG) * kD +
                      cc * kVec;
                bytes = 16;
            }
            cp_async16(q_s + sw128(kRows, r, cc), q + off, bytes);
        }
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();
        named_sync(1 + wg, 128);
    }

    /* This thread's rows g and g + 8 of its warp's 16: key bounds [jlo, jhi] and the ALiBi
     * slope; rows past the chunk get an empty range. */
    int jlo[2], jhi[2], pos[2];
    float slope2[2];
    int lo_max = -1, hi_min = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const uint32_t R = t.it.row_begin + wg * 64 + wi * 16 + g + 8 * i;
        if (R < t.row_end) {
            const uint32_t ps = t.ch.start_pos + R / kG;
            pos[i] = (int)ps;
            jlo[i] = (int)umax(window_lo(ps, p.window), t.kb);
            jhi[i] = min((int)ps, (int)t.ke - 1);
            slope2[i] = head_slope2(p, t.h * kG + R % kG);
        } else {
            pos[i] = 0;
            jlo[i] = 0x7fffffff;
            jhi[i] = -1;
            slope2[i] = 0.0f;
        }
        lo_max = max(lo_max, jlo[i]);
        hi_min = min(hi_min, jhi[i]);
    }
    /* A stage inside every row's range of this warp needs no mask. */
    const int w_lo_max = __reduce_max_sync(0xffffffffu, lo_max);
    const int w_hi_min = __reduce_min_sync(0xffffffffu, hi_min);
    /* Warpgroup-uniform key range (wgmma runs on the whole warpgroup): the first row has the
     * lowest bound, the last the highest, since both grow with the row. */
    int g_lo = 0x7fffffff, g_hi = -1;
    {
        const uint32_t Rf = t.it.row_begin + wg * 64;
        if (Rf < t.row_end) {
            const uint32_t Rl = umin(Rf + 63, t.row_end - 1);
            g_lo = (int)umax(window_lo(t.ch.start_pos + Rf / kG, p.window), t.kb);
            g_hi = min((int)(t.ch.start_pos + Rl / kG), (int)t.ke - 1);
        }
    }

    const float scale2 = p.scale * kLog2e;
    float o[kDT * 4];
#pragma unroll
    for (uint32_t i = 0; i < kDT * 4; i++)
        o[i] = 0.0f;
    float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.0f, 0.0f};

    /* Descriptor bases: this warpgroup's Q rows, a stage's K and V (see the top comment). */
    const uint32_t q_wg = q_s + wg * 64 * 128;

    /* The stages this warpgroup computes are one contiguous run [kt_lo, kt_hi) (its rows' keys
     * are one range); it only waits for and releases the others. In the run, stage kt's Q.K^T
     * and stage kt - 1's P.V are in flight together, and the softmax of stage kt runs while
     * P.V still does (its output is only rescaled before the next P.V is issued): the order of
     * FlashAttention-3's intra-warpgroup overlap. Every wgmma sits on straight-line code
     * between its fence and its wait, so ptxas never serializes them. */
    const uint32_t kt_lo = g_lo <= g_hi ? umax(kt_begin, (uint32_t)g_lo / kTileK) : kt_end;
    const uint32_t kt_hi = g_lo <= g_hi ? umin(kt_end, (uint32_t)g_hi / kTileK + 1) : kt_end;
    auto slot_of = [&](uint32_t kt) { return (kt - kt_begin) % kStages; };
    auto wait_full = [&](uint32_t kt) {
        mbar_wait(full + slot_of(kt) * 8, ((kt - kt_begin) / kStages) & 1);
    };
    auto release = [&](uint32_t kt) {
        __syncwarp();
        if (lane == 0)
            mbar_arrive(empty + slot_of(kt) * 8);
    };
    /* S = Q K^T of stage kt for the warpgroup's 64 rows x kTileK keys (issued, committed) */
    float s[kNT * 4];
    auto issue_s = [&](uint32_t kt) {
        wgmma_fence();
        wg_qk(s, q_wg, kRows, kv_s + slot_of(kt) * 2 * kKVBytes);
        wgmma_commit();
    };
    /* O += P V of stage kt (issued, committed) */
    uint32_t pa[kTileK / 16][4];
    auto issue_pv = [&](uint32_t kt) {
        wgmma_pin(o);
        wgmma_fence();
        wg_pv(o, pa, kv_s + slot_of(kt) * 2 * kKVBytes + kKVBytes);
        wgmma_commit();
    };
    /* Stage kt's logits in log2 units, masked, then the online softmax of rows g and g + 8:
     * s becomes the unnormalized probabilities, alpha the factor that rebases O. */
    float alpha[2];
    auto softmax = [&](uint32_t kt) {
        const int js = (int)(kt * kTileK), je = js + (int)kTileK - 1;
        const bool need_mask = !(js >= w_lo_max && je <= w_hi_min);
#pragma unroll
        for (uint32_t nn = 0; nn < kNT; nn++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = js + (int)(nn * 8 + 2 * t4) + (e & 1), ri = e >> 1;
                float x = logit2(s[nn * 4 + e], p, scale2, j, pos[ri], slope2[ri]);
                if (need_mask && (j < jlo[ri] || j > jhi[ri]))
                    x = kNegInf;
                s[nn * 4 + e] = x;
            }
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            float mx = kNegInf;
#pragma unroll
            for (uint32_t nn = 0; nn < kNT; nn++)
                mx = fmaxf(mx, fmaxf(s[nn * 4 + 2 * ri], s[nn * 4 + 2 * ri + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[ri], mx);
            /* a row with nothing unmasked yet keeps base 0: exp2(-inf - 0) = 0, never NaN */
            const float base = m_new == kNegInf ? 0.0f : m_new;
            alpha[ri] = att_ex2(m_run[ri] - base);
            m_run[ri] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (uint32_t nn = 0; nn < kNT; nn++) {
                s[nn * 4 + 2 * ri] = att_ex2(s[nn * 4 + 2 * ri] - base);
                s[nn * 4 + 2 * ri + 1] = att_ex2(s[nn * 4 + 2 * ri + 1] - base);
                sum += s[nn * 4 + 2 * ri] + s[nn * 4 + 2 * ri + 1];
            }
            /* this thread's columns; quad-summed at the end */
            l_run[ri] = l_run[ri] * alpha[ri] + sum;
        }
    };
    auto rescale_o = [&]() {
#pragma unroll
        for (uint32_t d = 0; d < kDT; d++) {
            o[d * 4] *= alpha[0];
            o[d * 4 + 1] *= alpha[0];
            o[d * 4 + 2] *= alpha[1];
            o[d * 4 + 3] *= alpha[1];
        }
    };

    for (uint32_t kt = kt_begin; kt < kt_lo; kt++) {
        wait_full(kt);
        release(kt);
    }
    if (kt_lo < kt_hi) {
        wait_full(kt_lo);
        issue_s(kt_lo);
        wgmma_wait<0>();
        wgmma_pin(s);
        softmax(kt_lo); /* O is 0: nothing to rebase */
        wg_pack_p(s, pa);
        for (uint32_t kt = kt_lo + 1; kt < kt_hi; kt++) {
            wait_full(kt);
            issue_s(kt);
            rescale_o(); /* by the previous stage's alpha, before its P.V */
            issue_pv(kt - 1);
            wgmma_wait<1>(); /* this stage's Q.K^T (groups complete in order) */
            wgmma_pin(s);
            softmax(kt);
            wgmma_wait<0>(); /* the previous stage's P.V */
            wgmma_pin(o);
            release(kt - 1);
            wg_pack_p(s, pa);
        }
        rescale_o();
        issue_pv(kt_hi - 1);
        wgmma_wait<0>();
        wgmma_pin(o);
        release(kt_hi - 1);
    }
    for (uint32_t kt = kt_hi; kt < kt_end; kt++) {
        wait_full(kt);
        release(kt);
    }

    /* Epilogue. A split item writes its unnormalized f32 rows and (max, sum) straight from the
     * accumulators (two columns per n8 tile of rows g and g + 8); the last part merges. A whole
     * item rounds its rows into the warpgroup's own Q rows of shared memory (no longer read:
     * its last wgmma was waited for) and stores them whole, 16 bytes a thread along each row:
     * out may be host memory (att_cuda.c, direct I/O), where the accumulators' scattered 4-byte
     * stores run at a quarter of the link's speed (docs/BENCHMARKS.md). */
    float l_all[2];
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        l_all[ri] = l_run[ri] + __shfl_xor_sync(0xffffffffu, l_run[ri], 1);
        l_all[ri] += __shfl_xor_sync(0xffffffffu, l_all[ri], 2);
    }
    if (t.it.part != ATT_KPART_NONE) {
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            const uint32_t r = wg * 64 + wi * 16 + g + 8 * ri, R = t.it.row_begin + r;
            if (R >= t.row_end)
                continue;
            const uint64_t prow = ((uint64_t)t.it.part * kHkv + t.h) * kRows + r;
            float *po = (float *)p.part_o_d + prow * kD + 2 * t4;
#pragma unroll
            for (uint32_t d = 0; d < kDT; d++)
                *(float2 *)(po + d * 8) = make_float2(o[d * 4 + 2 * ri], o[d * 4 + 2 * ri + 1]);
            if (t4 == 0)
                *(float2 *)((float *)p.part_ml_d + prow * 2) = make_float2(m_run[ri], l_all[ri]);
        }
        finish_split<consumer_sync>(p, t, tid, kThreads);
        return;
    }
    unsigned char *const q_gen = smem + (q_s - smem_addr(smem)); /* q_s as a generic pointer */
    named_sync(1 + wg, 128); /* every warp of the warpgroup is past its last wgmma */
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        const uint32_t r = wg * 64 + wi * 16 + g + 8 * ri, R = t.it.row_begin + r;
        if (R >= t.row_end)
            continue;
        const float sc = out_scale(p, t.h * kG + R % kG, m_run[ri], l_all[ri]);
#pragma unroll
        for (uint32_t d = 0; d < kDT; d++)
            *(uint32_t *)(q_gen + sw128(kRows, r, d) + 4 * t4) =
                pack2(o[d * 4 + 2 * ri] * sc, o[d * 4 + 2 * ri + 1] * sc);
    }
    named_sync(1 + wg, 128);
    for (uint32_t c = wt; c < 64 * kCPR; c += 128) {
        const uint32_t r = wg * 64 + c / kCPR, cc = c % kCPR, R = t.it.row_begin + r;
        if (R < t.row_end)
            *(uint4 *)((elem_t *)p.out_d +
                       ((uint64_t)(t.ch.token_offset + R / kG) * kHq + t.h * kG + R % kG) * kD +
                       cc * kVec) = *(const uint4 *)(q_gen + sw128(kRows, r, cc));
    }
}

/* A GPU self-check of the sm_90a wgmma body's building blocks (attention/kernels/att_sm90.cuh),
 * apart from the attention logic, for when the GPU suite finds the wgmma tile wrong: it tells
 * which layout is at fault. One warpgroup puts a 64 x 128 Q and 64 x 128 K and V tiles (bf16) in
 * shared memory with the body's own swizzled layout (sw128), then
 *   1. S = Q K^T by the body's wg_qk (descriptors of K-major Q and K), read out through the
 *      accumulator layout the body assumes (thread: rows g, g + 8 of its warp's 16, columns
 *      8 n + 2 t4 + {0, 1});
 *   2. O = P V by the body's wg_pv, P = S rounded to bf16 by its wg_pack_p (A fragments), V
 *      through the transposed (MN-major) descriptor.
 * Each against a double-precision product on the host (2 from the GPU's own S, so a fault in 1
 * does not hide 2). Prints the worst error and, when wrong, the first mismatches and which
 * element of the reference each GPU value matches, if any (a transposed or swizzled layout shows
 * as a pattern). Exit status 0 when both agree.
 *
 * Build (tools/gpu_bundle.sh does): nvcc -std=c++17 -gencode arch=compute_90a,code=sm_90a -I.
 * -o wgmma_check tools/wgmma_check.cu. Runs on sm_90 only; needs only the driver.
 * Thread: main's. */
#define ATT_HEAD_DIM 128
#define ATT_DTYPE 3
#define ATT_BLOCK_SIZE 16
#define ATT_GROUP 4
#define ATT_NUM_KV_HEADS 8
#define ATT_WARPS_M 4
#define ATT_WARP_MT 1
#define ATT_WARPS_N 1
#define ATT_TILE_K 64
#define ATT_STAGES 2
#define ATT_WGMMA 1
/* The kernel source's umin/umax, renamed: nvcc's runtime headers (which NVRTC lacks) have their
 * own. */
#define umin att_umin
#define umax att_umax
#include "attention/kernels/att_unified.cu"
#undef umin
#undef umax

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int kM = 64;  /* query rows: one warpgroup */
constexpr int kN = 64;  /* keys: kTileK */
constexpr int kDim = 128;
static_assert(kN == (int)kTileK && kDim == (int)kD && kM == (int)kRows, "the body's tile");

/* Q, K, V (bf16, row-major [rows][kDim]) in; S [kM][kN] and O [kM][kDim] (f32) out. */
__global__ void __launch_bounds__(128) check_kernel(const elem_t *q, const elem_t *k,
                                                    const elem_t *v, float *s_out, float *o_out) {
    extern __shared__ __align__(1024) unsigned char sm[];
    const uint32_t base = (smem_addr(sm) + 1023u) & ~1023u;
    const uint32_t q_s = base, k_s = q_s + kM * kDim * 2, v_s = k_s + kN * kDim * 2;
    unsigned char *gen = sm + (base - smem_addr(sm));
    const uint32_t tid = threadIdx.x, lane = tid & 31, wi = tid >> 5;
    const uint32_t g = lane >> 2, t4 = lane & 3;
    for (uint32_t c = tid; c < kM * kCPR; c += 128) {
        const uint32_t r = c / kCPR, cc = c % kCPR;
        *(uint4 *)(gen + sw128(kM, r, cc)) = *(const uint4 *)(q + r * kDim + cc * kVec);
    }
    for (uint32_t c = tid; c < kN * kCPR; c += 128) {
        const uint32_t r = c / kCPR, cc = c % kCPR;
        *(uint4 *)(gen + (k_s - q_s) + sw128(kN, r, cc)) =
            *(const uint4 *)(k + r * kDim + cc * kVec);
        *(uint4 *)(gen + (v_s - q_s) + sw128(kN, r, cc)) =
            *(const uint4 *)(v + r * kDim + cc * kVec);
    }
    fence_proxy_async();
    __syncthreads();

    float s[kNT * 4];
    wgmma_fence();
    wg_qk(s, q_s, kRows, k_s);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(s);
    for (uint32_t nn = 0; nn < kNT; nn++)
        for (uint32_t e = 0; e < 4; e++)
            s_out[(wi * 16 + g + 8 * (e >> 1)) * kN + nn * 8 + 2 * t4 + (e & 1)] = s[nn * 4 + e];

    uint32_t a[kTileK / 16][4];
    wg_pack_p(s, a);
    float o[kDT * 4];
    for (uint32_t i = 0; i < kDT * 4; i++)
        o[i] = 0.0f;
    wgmma_pin(o);
    wgmma_fence();
    wg_pv(o, a, v_s);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(o);
    for (uint32_t d = 0; d < kDT; d++)
        for (uint32_t e = 0; e < 4; e++)
            o_out[(wi * 16 + g + 8 * (e >> 1)) * kDim + d * 8 + 2 * t4 + (e & 1)] = o[d * 4 + e];
}

uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even (finite inputs) */
    return (uint16_t)(u >> 16);
}

float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Compares got [rows][cols] with want; on a mismatch prints up to 6 of them, each with the
 * position of a reference element it equals (if one does). Returns the number wrong. */
int compare(const char *what, const float *got, const double *want, int rows, int cols) {
    double worst = 0.0;
    int bad = 0;
    for (int i = 0; i < rows * cols; i++) {
        const double err = fabs(got[i] - want[i]) / (1.0 + fabs(want[i]));
        worst = err > worst ? err : worst;
        if (err <= 1e-3)
            continue;
        if (bad++ < 6) {
            int found = -1;
            for (int j = 0; j < rows * cols && found < 0; j++)
                if (fabs(got[i] - want[j]) <= 1e-3 * (1.0 + fabs(want[j])))
                    found = j;
            printf("  %s[%d][%d] = %.5f, want %.5f", what, i / cols, i % cols, got[i], want[i]);
            if (found >= 0)
                printf(" (= want[%d][%d])", found / cols, found % cols);
            printf("\n");
        }
    }
    printf("%s: %s, %d of %d wrong, worst relative error %.2e\n", what, bad ? "FAILED" : "ok",
           bad, rows * cols, worst);
    return bad;
}

#define CK(call)                                                                                 \
    do {                                                                                         \
        cudaError_t e_ = (call);                                                                 \
        if (e_ != cudaSuccess) {                                                                 \
            printf("%s: %s\n", #call, cudaGetErrorString(e_));                                   \
            return 2;                                                                            \
        }                                                                                        \
    } while (0)

} // namespace

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
    if (prop.major != 9 || prop.minor != 0) {
        printf("SKIP: wgmma needs sm_90\n");
        return 0;
    }
    static uint16_t hq[kM * kDim], hk[kN * kDim], hv[kN * kDim];
    srand(7);
    for (int i = 0; i < kM * kDim; i++)
        hq[i] = to_bf16((float)(rand() % 2001 - 1000) / 1000.0f);
    for (int i = 0; i < kN * kDim; i++) {
        hk[i] = to_bf16((float)(rand() % 2001 - 1000) / 1000.0f);
        hv[i] = to_bf16((float)(rand() % 2001 - 1000) / 1000.0f);
    }
    elem_t *dq, *dk, *dv;
    float *ds, *dout;
    CK(cudaMalloc(&dq, sizeof hq));
    CK(cudaMalloc(&dk, sizeof hk));
    CK(cudaMalloc(&dv, sizeof hv));
    CK(cudaMalloc(&ds, kM * kN * sizeof(float)));
    CK(cudaMalloc(&dout, kM * kDim * sizeof(float)));
    CK(cudaMemcpy(dq, hq, sizeof hq, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk, hk, sizeof hk, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, hv, sizeof hv, cudaMemcpyHostToDevice));
    const int smem = 1024 + (kM + 2 * kN) * kDim * 2;
    CK(cudaFuncSetAttribute(check_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    check_kernel<<<1, 128, smem>>>(dq, dk, dv, ds, dout);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    static float s[kM * kN], o[kM * kDim];
    static double ws[kM * kN], wo[kM * kDim];
    CK(cudaMemcpy(s, ds, sizeof s, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(o, dout, sizeof o, cudaMemcpyDeviceToHost));
    for (int i = 0; i < kM; i++)
        for (int j = 0; j < kN; j++) {
            double acc = 0.0;
            for (int d = 0; d < kDim; d++)
                acc += (double)from_bf16(hq[i * kDim + d]) * from_bf16(hk[j * kDim + d]);
            ws[i * kN + j] = acc;
        }
    for (int i = 0; i < kM; i++)
        for (int d = 0; d < kDim; d++) {
            double acc = 0.0;
            for (int j = 0; j < kN; j++)
                acc += (double)from_bf16(to_bf16(s[i * kN + j])) * from_bf16(hv[j * kDim + d]);
            wo[i * kDim + d] = acc;
        }
    printf("S = Q K^T: wgmma_ss, Q and K K-major; O = P V: wgmma_rs, V MN-major\n");
    const int bad = compare("S", s, ws, kM, kN) + compare("O", o, wo, kM, kDim);
    return bad == 0 ? 0 : 1;
}

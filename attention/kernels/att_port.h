/* The portability layer of the attention kernels (att_unified.cu): the few things the kernel uses
 * that CUDA (NVRTC) and HIP (hiprtc, hipcc) spell differently, so the one source compiles for
 * NVIDIA and AMD GPUs. Device code only; embedded and compiled with the kernel.
 *
 * Which compiler: ATT_HIP is 1 under hiprtc or hipcc (AMD), 0 under NVRTC.
 * Which tile math (the kernel's two attend bodies):
 *   ATT_PORTABLE_MATH 0  NVIDIA tensor cores (mma.sync, ldmatrix, cp.async) for f16/bf16;
 *   ATT_PORTABLE_MATH 1  plain FMAs in f32 for every dtype, one wave per query row.
 * The HIP backend always sets ATT_PORTABLE_MATH=1 (and HIP cannot build the tensor-core body);
 * it may also be set under NVRTC, which is how the HIP backend's test double runs the FMA body on
 * an NVIDIA GPU: with this header's NVRTC branches and wave 32. The ATT_HIP branches (exp2f,
 * _Float16 conversions, __shfl_xor with a width, the bf16 rounding) and wave 64 are compiled in
 * CI (test_att_hip_kernels), never executed.
 * ATT_WAVE: threads per wave (warp), a compile-time constant: 32 on NVIDIA, 64 on CDNA (the host
 * passes the device's figure). */
#ifndef AT_ATTENTION_KERNELS_ATT_PORT_H
#define AT_ATTENTION_KERNELS_ATT_PORT_H

#if defined(__HIPCC_RTC__) || defined(__HIP__)
#define ATT_HIP 1
#else
#define ATT_HIP 0
#endif

#ifndef ATT_PORTABLE_MATH
#define ATT_PORTABLE_MATH ATT_HIP
#endif
#ifndef ATT_WAVE
#define ATT_WAVE 32
#endif

#if ATT_HIP && !defined(__HIPCC_RTC__)
/* hipcc (the CI's offline check) needs the runtime header; hiprtc has it built in. */
#include <hip/hip_runtime.h>
#endif

#if ATT_HIP && !ATT_PORTABLE_MATH
#error "HIP builds need ATT_PORTABLE_MATH=1: the tensor-core body is NVIDIA's PTX"
#endif
#if ATT_HIP && defined(__AMDGCN_WAVEFRONT_SIZE)
static_assert(ATT_WAVE == __AMDGCN_WAVEFRONT_SIZE, "ATT_WAVE must be the target's wave size");
#endif
static_assert(ATT_WAVE == 32 || ATT_WAVE == 64, "ATT_WAVE is 32 or 64");

/* Exchange with the lane whose index differs in the bits of mask (all lanes of the wave take
 * part). */
template <typename T> __device__ __forceinline__ T att_shfl_xor(T v, int mask) {
#if ATT_HIP
    return __shfl_xor(v, mask, ATT_WAVE);
#else
    return __shfl_xor_sync(0xffffffffu, v, mask);
#endif
}

/* The id of the SM (CU) the calling block runs on. */
__device__ __forceinline__ unsigned att_smid() {
#if ATT_HIP
    return __smid();
#else
    unsigned v;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(v));
    return v;
#endif
}

/* 2^x and 1/x at the hardware's speed: exp2(-inf) is 0, rcp(inf) is 0. */
__device__ __forceinline__ float att_ex2(float x) {
#if ATT_HIP
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

__device__ __forceinline__ float att_rcp(float x) {
#if ATT_HIP
    return 1.0f / x;
#else
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

/* A load of data that other blocks of this launch stored before a __threadfence(): from L2
 * (CUDA's L1 is not coherent between SMs). On AMD the device-scope fence that precedes it
 * invalidates the vector L1, so a plain load reads fresh data. */
__device__ __forceinline__ float4 att_ld_l2(const float4 *p) {
#if ATT_HIP
    return *p;
#else
    return __ldcg(p);
#endif
}

__device__ __forceinline__ float2 att_ld_l2(const float2 *p) {
#if ATT_HIP
    return *p;
#else
    return __ldcg(p);
#endif
}

/* 16-bit floats as their bits (unsigned short) <-> f32. To f16/bf16: round to nearest even, two
 * values packed lo | hi << 16. */
__device__ __forceinline__ float att_bf16_to_f32(unsigned short h) {
    return __uint_as_float((unsigned)h << 16);
}

__device__ __forceinline__ float att_f16_to_f32(unsigned short h) {
#if ATT_HIP
    return (float)__builtin_bit_cast(_Float16, h);
#else
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ unsigned att_f32x2_to_bf16x2(float lo, float hi) {
#if ATT_HIP
    unsigned r[2];
    const float v[2] = {lo, hi};
    for (int i = 0; i < 2; i++) {
        const unsigned u = __float_as_uint(v[i]);
        r[i] = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u /* NaN stays NaN */
                                               : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    }
    return r[0] | r[1] << 16;
#else
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

__device__ __forceinline__ unsigned att_f32x2_to_f16x2(float lo, float hi) {
#if ATT_HIP
    const unsigned short a = __builtin_bit_cast(unsigned short, (_Float16)lo);
    const unsigned short b = __builtin_bit_cast(unsigned short, (_Float16)hi);
    return (unsigned)a | (unsigned)b << 16;
#else
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

#endif

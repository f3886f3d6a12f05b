/* TEST DOUBLE, never shipped: libattnd_hip_on_cuda_testdouble.so provides exactly the HIP runtime
 * and hiprtc entry points attnd's HIP backend resolves (attention/att_hiprt.h), implemented on the
 * CUDA Driver API and NVRTC (loaded through attention/att_cudrv.c). With ATTND_HIP_LIB naming this
 * library, the HIP backend's host code runs on an NVIDIA GPU: the GPU test suite (test_att_hip)
 * runs through it on the H200, since no AMD GPU is available to us.
 *
 * What it pretends: every NVIDIA device is an AMD device named "gfx90a:sramecc+:xnack-" whose wave
 * is the warp (32), so the backend compiles with ATT_PORTABLE_MATH and ATT_WAVE=32. hiprtc's
 * --gpu-architecture/--offload-arch=gfx... becomes NVRTC's --gpu-architecture=sm_XY of the current
 * device; hiprtcGetCode returns a cubin, which hipModuleLoadData hands to cuModuleLoadData.
 * CUresult codes become the hipError_t codes of the same meaning (sticky faults stay sticky).
 * Only what attnd calls is here, with Debian's HIP 5.2 signatures; anything else is absent.
 *
 * Thread model: the per-device primary contexts are retained once under a mutex; everything else
 * is a thin call into the driver, as thread-safe as the driver itself. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention/att_cudrv.h"
#include "attention/att_hiprt.h"

#define MAX_DEVICES 16
#define ARCH_NAME "gfx90a:sramecc+:xnack-"

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static CUcontext g_ctx[MAX_DEVICES];
/* The device hipSetDevice last chose, in any thread: hiprtc compiles for it (the backend compiles
 * on threads that never set a device; the double serves one device per process). */
static atomic_int g_last_device;

static const att_cudrv_t *drv(void) {
    const att_cudrv_t *d = NULL;
    return att_cudrv_cuda(&d, NULL) == AT_OK ? d : NULL;
}

static hipError_t tr(CUresult r) {
    switch (r) {
    case CUDA_SUCCESS: return hipSuccess;
    case CUDA_ERROR_INVALID_VALUE: return hipErrorInvalidValue;
    case CUDA_ERROR_OUT_OF_MEMORY: return hipErrorOutOfMemory;
    case CUDA_ERROR_NOT_INITIALIZED: return hipErrorNotInitialized;
    case CUDA_ERROR_NO_DEVICE: return hipErrorNoDevice;
    case CUDA_ERROR_INVALID_DEVICE: return hipErrorInvalidDevice;
    case CUDA_ERROR_INVALID_IMAGE: return hipErrorInvalidImage;
    case CUDA_ERROR_INVALID_HANDLE: return hipErrorInvalidHandle;
    case CUDA_ERROR_NOT_FOUND: return hipErrorNotFound;
    case CUDA_ERROR_NOT_SUPPORTED: return hipErrorNotSupported;
    case CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED: return hipErrorHostMemoryAlreadyRegistered;
    case CUDA_ERROR_ILLEGAL_ADDRESS: return hipErrorIllegalAddress;
    case CUDA_ERROR_LAUNCH_TIMEOUT: return hipErrorLaunchTimeOut;
    case CUDA_ERROR_ASSERT: return hipErrorAssert;
    case CUDA_ERROR_ECC_UNCORRECTABLE: return hipErrorECCNotCorrectable;
    case CUDA_ERROR_CONTEXT_IS_DESTROYED: return hipErrorContextIsDestroyed;
    /* the other kernel faults: HIP reports them all as a launch failure (sticky) */
    case CUDA_ERROR_LAUNCH_FAILED:
    case CUDA_ERROR_MISALIGNED_ADDRESS:
    case CUDA_ERROR_ILLEGAL_INSTRUCTION:
    case CUDA_ERROR_INVALID_ADDRESS_SPACE:
    case CUDA_ERROR_INVALID_PC:
    case CUDA_ERROR_HARDWARE_STACK_ERROR: return hipErrorLaunchFailure;
    default: return hipErrorUnknown;
    }
}

#define CALL(f, ...) (drv() == NULL ? hipErrorNotInitialized : tr(drv()->f(__VA_ARGS__)))

static CUdeviceptr cu_ptr(const void *p) { return (CUdeviceptr)(uintptr_t)p; }

hipError_t hipInit(unsigned int flags) {
    (void)flags;
    const att_cudrv_t *d = NULL;
    return att_cudrv_cuda(&d, NULL) == AT_OK ? hipSuccess : hipErrorNoDevice;
}

/* 5.2.0: the HIP API level this double implements (Debian's headers). */
hipError_t hipRuntimeGetVersion(int *v) {
    *v = 50200000;
    return hipSuccess;
}

const char *hipGetErrorName(hipError_t e) {
    switch (e) {
    case hipSuccess: return "hipSuccess";
    case hipErrorInvalidValue: return "hipErrorInvalidValue";
    case hipErrorOutOfMemory: return "hipErrorOutOfMemory";
    case hipErrorNotInitialized: return "hipErrorNotInitialized";
    case hipErrorNoDevice: return "hipErrorNoDevice";
    case hipErrorInvalidDevice: return "hipErrorInvalidDevice";
    case hipErrorInvalidImage: return "hipErrorInvalidImage";
    case hipErrorInvalidHandle: return "hipErrorInvalidHandle";
    case hipErrorNotFound: return "hipErrorNotFound";
    case hipErrorNotSupported: return "hipErrorNotSupported";
    case hipErrorHostMemoryAlreadyRegistered: return "hipErrorHostMemoryAlreadyRegistered";
    case hipErrorIllegalAddress: return "hipErrorIllegalAddress";
    case hipErrorLaunchTimeOut: return "hipErrorLaunchTimeOut";
    case hipErrorAssert: return "hipErrorAssert";
    case hipErrorECCNotCorrectable: return "hipErrorECCNotCorrectable";
    case hipErrorContextIsDestroyed: return "hipErrorContextIsDestroyed";
    case hipErrorLaunchFailure: return "hipErrorLaunchFailure";
    default: return "hipErrorUnknown";
    }
}

hipError_t hipGetDeviceCount(int *n) {
    *n = 0;
    hipError_t e = CALL(cuDeviceGetCount, n);
    return e == hipSuccess && *n == 0 ? hipErrorNoDevice : e;
}

/* HIP's current device is CUDA's device's primary context, made current on this thread. */
hipError_t hipSetDevice(int id) {
    if (drv() == NULL)
        return hipErrorNotInitialized;
    if (id < 0 || id >= MAX_DEVICES)
        return hipErrorInvalidDevice;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (g_ctx[id] == NULL) {
        CUdevice dev;
        r = drv()->cuDeviceGet(&dev, id);
        if (r == CUDA_SUCCESS)
            r = drv()->cuDevicePrimaryCtxRetain(&g_ctx[id], dev);
    }
    CUcontext ctx = g_ctx[id];
    pthread_mutex_unlock(&g_mu);
    /* relaxed: a plain value, read only to pick the compile target */
    atomic_store_explicit(&g_last_device, id, memory_order_relaxed);
    return r != CUDA_SUCCESS ? tr(r) : CALL(cuCtxSetCurrent, ctx);
}

hipError_t hipDeviceGetName(char *name, int len, hipDevice_t device) {
    return CALL(cuDeviceGetName, name, len, device);
}

hipError_t hipDeviceGetAttribute(int *v, hipDeviceAttribute_t attr, int device) {
    CUdevice_attribute a;
    switch (attr) {
    case hipDeviceAttributeMultiprocessorCount: a = CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT; break;
    case hipDeviceAttributeMaxSharedMemoryPerBlock:
        a = CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK;
        break;
    case hipDeviceAttributeWarpSize: a = CU_DEVICE_ATTRIBUTE_WARP_SIZE; break;
    default: return hipErrorInvalidValue;
    }
    return CALL(cuDeviceGetAttribute, v, a, device);
}

hipError_t hipGetDeviceProperties(hipDeviceProp_t *p, int device) {
    memset(p, 0, sizeof *p);
    hipError_t e;
    size_t mem = 0;
    if ((e = hipDeviceGetName(p->name, (int)sizeof p->name, device)) != hipSuccess ||
        (e = hipDeviceGetAttribute(&p->warpSize, hipDeviceAttributeWarpSize, device)) !=
            hipSuccess ||
        (e = hipDeviceGetAttribute(&p->multiProcessorCount, hipDeviceAttributeMultiprocessorCount,
                                   device)) != hipSuccess ||
        (e = CALL(cuDeviceTotalMem, &mem, device)) != hipSuccess)
        return e;
    p->totalGlobalMem = mem;
    snprintf(p->gcnArchName, sizeof p->gcnArchName, "%s", ARCH_NAME);
    return hipSuccess;
}

hipError_t hipMalloc(void **ptr, size_t size) {
    CUdeviceptr d = 0;
    hipError_t e = CALL(cuMemAlloc, &d, size);
    *ptr = e == hipSuccess ? (void *)(uintptr_t)d : NULL;
    return e;
}

hipError_t hipFree(void *ptr) { return CALL(cuMemFree, cu_ptr(ptr)); }

hipError_t hipMemsetD8(hipDeviceptr_t dest, unsigned char value, size_t count) {
    return CALL(cuMemsetD8, cu_ptr(dest), value, count);
}

hipError_t hipHostMalloc(void **ptr, size_t size, unsigned int flags) {
    (void)flags;
    return CALL(cuMemHostAlloc, ptr, size, 0);
}

hipError_t hipHostFree(void *ptr) { return CALL(cuMemFreeHost, ptr); }

hipError_t hipHostRegister(void *p, size_t bytes, unsigned int flags) {
    (void)flags;
    return CALL(cuMemHostRegister, p, bytes, CU_MEMHOSTREGISTER_PORTABLE);
}

hipError_t hipHostUnregister(void *p) { return CALL(cuMemHostUnregister, p); }

hipError_t hipMemcpyHtoD(hipDeviceptr_t dst, void *src, size_t n) {
    return CALL(cuMemcpyHtoD, cu_ptr(dst), src, n);
}

hipError_t hipMemcpyDtoH(void *dst, hipDeviceptr_t src, size_t n) {
    return CALL(cuMemcpyDtoH, dst, cu_ptr(src), n);
}

hipError_t hipMemcpyHtoDAsync(hipDeviceptr_t dst, void *src, size_t n, hipStream_t s) {
    return CALL(cuMemcpyHtoDAsync, cu_ptr(dst), src, n, (CUstream)s);
}

hipError_t hipMemcpyDtoHAsync(void *dst, hipDeviceptr_t src, size_t n, hipStream_t s) {
    return CALL(cuMemcpyDtoHAsync, dst, cu_ptr(src), n, (CUstream)s);
}

hipError_t hipStreamCreateWithFlags(hipStream_t *s, unsigned int flags) {
    return CALL(cuStreamCreate, (CUstream *)s,
                (flags & hipStreamNonBlocking) ? CU_STREAM_NON_BLOCKING : CU_STREAM_DEFAULT);
}

hipError_t hipStreamDestroy(hipStream_t s) { return CALL(cuStreamDestroy, (CUstream)s); }

hipError_t hipStreamSynchronize(hipStream_t s) { return CALL(cuStreamSynchronize, (CUstream)s); }

hipError_t hipStreamWaitEvent(hipStream_t s, hipEvent_t ev, unsigned int flags) {
    return CALL(cuStreamWaitEvent, (CUstream)s, (CUevent)ev, flags);
}

hipError_t hipModuleLoadData(hipModule_t *m, const void *image) {
    return CALL(cuModuleLoadData, (CUmodule *)m, image);
}

hipError_t hipModuleUnload(hipModule_t m) { return CALL(cuModuleUnload, (CUmodule)m); }

hipError_t hipModuleGetFunction(hipFunction_t *f, hipModule_t m, const char *name) {
    return CALL(cuModuleGetFunction, (CUfunction *)f, (CUmodule)m, name);
}

hipError_t hipModuleGetGlobal(hipDeviceptr_t *dptr, size_t *bytes, hipModule_t m,
                              const char *name) {
    CUdeviceptr d = 0;
    hipError_t e = CALL(cuModuleGetGlobal, &d, bytes, (CUmodule)m, name);
    *dptr = (hipDeviceptr_t)(uintptr_t)d;
    return e;
}

hipError_t hipModuleLaunchKernel(hipFunction_t f, unsigned int gx, unsigned int gy, unsigned int gz,
                                 unsigned int bx, unsigned int by, unsigned int bz,
                                 unsigned int smem, hipStream_t s, void **params, void **extra) {
    return CALL(cuLaunchKernel, (CUfunction)f, gx, gy, gz, bx, by, bz, smem, (CUstream)s, params,
                extra);
}

hipError_t hipModuleOccupancyMaxActiveBlocksPerMultiprocessor(int *blocks, hipFunction_t f,
                                                              int threads, size_t smem) {
    return CALL(cuOccupancyMaxActiveBlocksPerMultiprocessor, blocks, (CUfunction)f, threads, smem);
}

hipError_t hipEventCreateWithFlags(hipEvent_t *ev, unsigned flags) {
    return CALL(cuEventCreate, (CUevent *)ev,
                (flags & hipEventDisableTiming) ? CU_EVENT_DISABLE_TIMING : CU_EVENT_DEFAULT);
}

hipError_t hipEventRecord(hipEvent_t ev, hipStream_t s) {
    return CALL(cuEventRecord, (CUevent)ev, (CUstream)s);
}

hipError_t hipEventElapsedTime(float *ms, hipEvent_t a, hipEvent_t b) {
    return CALL(cuEventElapsedTime, ms, (CUevent)a, (CUevent)b);
}

hipError_t hipEventDestroy(hipEvent_t ev) { return CALL(cuEventDestroy, (CUevent)ev); }

/* ---- hiprtc on NVRTC ---- */

static const att_nvrtc_t *nvrtc(void) {
    const att_nvrtc_t *n = NULL;
    return att_cudrv_nvrtc(&n, NULL) == AT_OK ? n : NULL;
}

static hiprtcResult rtr(nvrtcResult r) {
    switch (r) {
    case NVRTC_SUCCESS: return HIPRTC_SUCCESS;
    case NVRTC_ERROR_OUT_OF_MEMORY: return HIPRTC_ERROR_OUT_OF_MEMORY;
    case NVRTC_ERROR_PROGRAM_CREATION_FAILURE: return HIPRTC_ERROR_PROGRAM_CREATION_FAILURE;
    case NVRTC_ERROR_INVALID_INPUT: return HIPRTC_ERROR_INVALID_INPUT;
    case NVRTC_ERROR_INVALID_PROGRAM: return HIPRTC_ERROR_INVALID_PROGRAM;
    case NVRTC_ERROR_INVALID_OPTION: return HIPRTC_ERROR_INVALID_OPTION;
    case NVRTC_ERROR_COMPILATION: return HIPRTC_ERROR_COMPILATION;
    default: return HIPRTC_ERROR_INTERNAL_ERROR;
    }
}

#define RTC(f, ...) (nvrtc() == NULL ? HIPRTC_ERROR_INTERNAL_ERROR : rtr(nvrtc()->f(__VA_ARGS__)))

hiprtcResult hiprtcVersion(int *major, int *minor) { return RTC(nvrtcVersion, major, minor); }

const char *hiprtcGetErrorString(hiprtcResult r) {
    switch (r) {
    case HIPRTC_SUCCESS: return "HIPRTC_SUCCESS";
    case HIPRTC_ERROR_OUT_OF_MEMORY: return "HIPRTC_ERROR_OUT_OF_MEMORY";
    case HIPRTC_ERROR_PROGRAM_CREATION_FAILURE: return "HIPRTC_ERROR_PROGRAM_CREATION_FAILURE";
    case HIPRTC_ERROR_INVALID_INPUT: return "HIPRTC_ERROR_INVALID_INPUT";
    case HIPRTC_ERROR_INVALID_PROGRAM: return "HIPRTC_ERROR_INVALID_PROGRAM";
    case HIPRTC_ERROR_INVALID_OPTION: return "HIPRTC_ERROR_INVALID_OPTION";
    case HIPRTC_ERROR_COMPILATION: return "HIPRTC_ERROR_COMPILATION";
    default: return "HIPRTC_ERROR_INTERNAL_ERROR";
    }
}

hiprtcResult hiprtcCreateProgram(hiprtcProgram *prog, const char *src, const char *name,
                                 int num_headers, const char **headers,
                                 const char **include_names) {
    return RTC(nvrtcCreateProgram, (nvrtcProgram *)prog, src, name, num_headers, headers,
               include_names);
}

/* The AMD target becomes the sm_XY of the device last set; other options pass through. */
hiprtcResult hiprtcCompileProgram(hiprtcProgram prog, int n, const char **opts) {
    const att_cudrv_t *d = drv();
    CUdevice dev;
    int major = 0, minor = 0;
    if (d == NULL || n < 0 || n > 64 ||
        d->cuDeviceGet(&dev, atomic_load_explicit(&g_last_device, memory_order_relaxed)) !=
            CUDA_SUCCESS ||
        d->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev) !=
            CUDA_SUCCESS ||
        d->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev) !=
            CUDA_SUCCESS)
        return HIPRTC_ERROR_INVALID_INPUT;
    char arch[40];
    snprintf(arch, sizeof arch, "--gpu-architecture=sm_%d%d", major, minor);
    const char *out[64];
    for (int i = 0; i < n; i++) {
        const int is_arch = strncmp(opts[i], "--gpu-architecture=gfx", 22) == 0 ||
                            strncmp(opts[i], "--offload-arch=gfx", 18) == 0;
        out[i] = is_arch ? arch : opts[i];
    }
    return RTC(nvrtcCompileProgram, (nvrtcProgram)prog, n, out);
}

hiprtcResult hiprtcGetProgramLogSize(hiprtcProgram prog, size_t *n) {
    return RTC(nvrtcGetProgramLogSize, (nvrtcProgram)prog, n);
}

hiprtcResult hiprtcGetProgramLog(hiprtcProgram prog, char *log) {
    return RTC(nvrtcGetProgramLog, (nvrtcProgram)prog, log);
}

hiprtcResult hiprtcGetCodeSize(hiprtcProgram prog, size_t *n) {
    return RTC(nvrtcGetCUBINSize, (nvrtcProgram)prog, n);
}

hiprtcResult hiprtcGetCode(hiprtcProgram prog, char *code) {
    return RTC(nvrtcGetCUBIN, (nvrtcProgram)prog, code);
}

hiprtcResult hiprtcDestroyProgram(hiprtcProgram *prog) {
    return RTC(nvrtcDestroyProgram, (nvrtcProgram *)prog);
}

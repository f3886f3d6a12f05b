/* The HIP runtime and hiprtc, loaded at run time (dlopen), so one attnd binary runs on machines
 * with and without them (the twin of att_cudrv.h). Only the functions attnd uses are resolved;
 * each pointer has the exact type of Debian's HIP header declaration, so calls through the table
 * are checked by the compiler.
 *
 * Where the library is looked for: ATTND_HIP_LIB (a path) when set, then the loader's search for
 * libamdhip64.so.5, libamdhip64.so.6, libamdhip64.so. hiprtc is inside libamdhip64 up to ROCm 5;
 * when the library lacks it (ROCm 6), libhiprtc.so.6 / libhiprtc.so is loaded for it.
 * ATTND_HIP_LIB is for tests: it names the test double (tests/hipshim/) that runs the HIP backend
 * on an NVIDIA GPU; a release never ships that library.
 *
 * Thread: att_hiprt_hip() loads once (pthread_once) and may be called from any thread; the table
 * is immutable afterwards. */
#ifndef AT_ATTENTION_ATT_HIPRT_H
#define AT_ATTENTION_ATT_HIPRT_H

#ifndef __HIP_PLATFORM_AMD__
#define __HIP_PLATFORM_AMD__ 1
#endif
#include <hip/hip_runtime_api.h>
#include <hip/hiprtc.h>

#include "common/at_err.h"

#define ATT_HIPRT_FUNCS(X)                                                                         \
    X(hipInit)                                                                                     \
    X(hipRuntimeGetVersion)                                                                        \
    X(hipGetErrorName)                                                                             \
    X(hipGetDeviceCount)                                                                           \
    X(hipSetDevice)                                                                                \
    X(hipDeviceGetName)                                                                            \
    X(hipDeviceGetAttribute)                                                                       \
    X(hipGetDeviceProperties)                                                                      \
    X(hipMalloc)                                                                                   \
    X(hipFree)                                                                                     \
    X(hipMemsetD8)                                                                                 \
    X(hipHostMalloc)                                                                               \
    X(hipHostFree)                                                                                 \
    X(hipHostRegister)                                                                             \
    X(hipHostUnregister)                                                                           \
    X(hipMemcpyHtoD)                                                                               \
    X(hipMemcpyDtoH)                                                                               \
    X(hipMemcpyHtoDAsync)                                                                          \
    X(hipMemcpyDtoHAsync)                                                                          \
    X(hipStreamCreateWithFlags)                                                                    \
    X(hipStreamDestroy)                                                                            \
    X(hipStreamSynchronize)                                                                        \
    X(hipStreamWaitEvent)                                                                          \
    X(hipModuleLoadData)                                                                           \
    X(hipModuleUnload)                                                                             \
    X(hipModuleGetFunction)                                                                        \
    X(hipModuleGetGlobal)                                                                          \
    X(hipModuleLaunchKernel)                                                                       \
    X(hipModuleOccupancyMaxActiveBlocksPerMultiprocessor)                                          \
    X(hipEventCreateWithFlags)                                                                     \
    X(hipEventRecord)                                                                              \
    X(hipEventElapsedTime)                                                                         \
    X(hipEventDestroy)

#define ATT_HIPRTC_FUNCS(X)                                                                        \
    X(hiprtcVersion)                                                                               \
    X(hiprtcGetErrorString)                                                                        \
    X(hiprtcCreateProgram)                                                                         \
    X(hiprtcCompileProgram)                                                                        \
    X(hiprtcGetProgramLogSize)                                                                     \
    X(hiprtcGetProgramLog)                                                                         \
    X(hiprtcGetCodeSize)                                                                           \
    X(hiprtcGetCode)                                                                               \
    X(hiprtcDestroyProgram)

#define ATT_HIPRT_FIELD_(f) __typeof__(f) *f;

typedef struct att_hiprt {
    ATT_HIPRT_FUNCS(ATT_HIPRT_FIELD_)
    ATT_HIPRTC_FUNCS(ATT_HIPRT_FIELD_)
    int runtime_version; /* hipRuntimeGetVersion: major * 10000000 + minor * 100000 + patch */
    int rtc_major, rtc_minor;
    char lib[320]; /* the library that was loaded, for messages */
} att_hiprt_t;

/* The table after hipInit(0); AT_ERR_UNSUPPORTED with diag naming what is missing (no
 * libamdhip64, a symbol, hipInit failed: no AMD GPU or driver). The result is remembered. */
at_err_t att_hiprt_hip(const att_hiprt_t **out, at_diag_t *diag);

/* The same table for compiling only: no hipInit, so it works without a GPU (the kernel compile
 * test). AT_ERR_UNSUPPORTED with diag when the library or hiprtc cannot be loaded. */
at_err_t att_hiprt_rtc(const att_hiprt_t **out, at_diag_t *diag);

/* The runtime's name for r ("hipErrorIllegalAddress"), or "hipErrorUnknownCode". Any thread. */
const char *att_hiprt_err_name(const att_hiprt_t *rt, hipError_t r);

/* True for the errors after which the device is unusable (a kernel fault): every later call
 * fails the same way, so the device must be marked lost. */
int att_hiprt_err_sticky(hipError_t r);

#endif

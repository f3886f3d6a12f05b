/* The CUDA driver and NVRTC, loaded at run time (dlopen), so one attnd binary runs on machines
 * with and without them. Only the functions attnd uses are resolved; each pointer has the exact
 * type of the toolkit header's declaration, and the versioned symbol the header maps the name to
 * (cuMemAlloc -> cuMemAlloc_v2), so calls through the table are checked by the compiler.
 *
 * Where the libraries are looked for: ATTND_LIBCUDA / ATTND_LIBNVRTC (a path) when set, then the
 * loader's search (LD_LIBRARY_PATH, the executable's RUNPATH, ld.so.cache) for libcuda.so.1 and
 * libnvrtc.so.13, then the toolkit's lib64 directory seen at build time (NVRTC only).
 *
 * Green contexts (SM partitions, CUDA 12.5+ drivers) are optional: a driver without them loads
 * with has_green false and whatever would use them stays off (a session whose plan asks for a
 * partition logs why it has none). So are the functions of device-launched calls (has_dl).
 *
 * Thread: att_cudrv_cuda() and att_cudrv_nvrtc() load once (pthread_once) and may be called
 * from any thread; the tables are immutable afterwards. */
#ifndef AT_ATTENTION_ATT_CUDRV_H
#define AT_ATTENTION_ATT_CUDRV_H

#include <cuda.h>
#include <nvrtc.h>
#include <stdbool.h>

#include "common/at_err.h"

#define ATT_CUDRV_FUNCS(X)                                                                         \
    X(cuInit)                                                                                      \
    X(cuDriverGetVersion)                                                                          \
    X(cuGetErrorName)                                                                              \
    X(cuDeviceGetCount)                                                                            \
    X(cuDeviceGet)                                                                                 \
    X(cuDeviceGetName)                                                                             \
    X(cuDeviceGetAttribute)                                                                        \
    X(cuDeviceTotalMem)                                                                            \
    X(cuDevicePrimaryCtxRetain)                                                                    \
    X(cuDevicePrimaryCtxRelease)                                                                   \
    X(cuCtxSetCurrent)                                                                             \
    X(cuCtxSynchronize)                                                                            \
    X(cuMemAlloc)                                                                                  \
    X(cuMemFree)                                                                                   \
    X(cuMemsetD8)                                                                                  \
    X(cuMemHostAlloc)                                                                              \
    X(cuMemFreeHost)                                                                               \
    X(cuMemHostRegister)                                                                           \
    X(cuMemHostUnregister)                                                                         \
    X(cuMemHostGetDevicePointer)                                                                   \
    X(cuMemcpyHtoD)                                                                                \
    X(cuMemcpyDtoH)                                                                                \
    X(cuMemcpyHtoDAsync)                                                                           \
    X(cuMemcpyDtoHAsync)                                                                           \
    X(cuStreamCreate)                                                                              \
    X(cuStreamDestroy)                                                                             \
    X(cuStreamSynchronize)                                                                         \
    X(cuStreamQuery)                                                                               \
    X(cuStreamWaitEvent)                                                                           \
    X(cuModuleLoadData)                                                                            \
    X(cuModuleUnload)                                                                              \
    X(cuModuleGetFunction)                                                                         \
    X(cuModuleGetGlobal)                                                                           \
    X(cuFuncSetAttribute)                                                                          \
    X(cuOccupancyMaxActiveBlocksPerMultiprocessor)                                                 \
    X(cuLaunchKernel)                                                                              \
    X(cuEventCreate)                                                                               \
    X(cuEventRecord)                                                                               \
    X(cuEventSynchronize)                                                                          \
    X(cuEventElapsedTime)                                                                          \
    X(cuEventDestroy)

/* Optional: green contexts (cuGreenCtxStreamCreate came last, with 12.5). The header maps none of
 * these names to a versioned symbol. */
#define ATT_CUDRV_GREEN_FUNCS(X)                                                                 \
    X(cuDeviceGetDevResource)                                                                    \
    X(cuDevSmResourceSplitByCount)                                                               \
    X(cuDevResourceGenerateDesc)                                                                 \
    X(cuGreenCtxCreate)                                                                          \
    X(cuGreenCtxDestroy)                                                                         \
    X(cuGreenCtxStreamCreate)

/* Optional: device-launched calls (attention/att_cudl.h): the linker, device-launchable graphs
 * with device-updatable kernel nodes (CUDA 12.4+) and programmatic edges, mapped host memory,
 * the engine copies (by unified address) and the stream write behind them. */
#define ATT_CUDRV_DL_FUNCS(X)                                                                      \
    X(cuLinkCreate)                                                                                \
    X(cuLinkAddData)                                                                               \
    X(cuLinkAddFile)                                                                               \
    X(cuLinkComplete)                                                                              \
    X(cuLinkDestroy)                                                                               \
    X(cuGraphCreate)                                                                               \
    X(cuGraphAddKernelNode)                                                                        \
    X(cuGraphAddDependencies)                                                                      \
    X(cuGraphKernelNodeSetAttribute)                                                               \
    X(cuGraphKernelNodeGetAttribute)                                                               \
    X(cuGraphInstantiateWithFlags)                                                                 \
    X(cuGraphUpload)                                                                               \
    X(cuGraphLaunch)                                                                               \
    X(cuGraphExecDestroy)                                                                          \
    X(cuGraphDestroy)                                                                              \
    X(cuMemcpyAsync)                                                                               \
    X(cuStreamWriteValue32)

#define ATT_NVRTC_FUNCS(X)                                                                         \
    X(nvrtcVersion)                                                                                \
    X(nvrtcGetErrorString)                                                                         \
    X(nvrtcCreateProgram)                                                                          \
    X(nvrtcCompileProgram)                                                                         \
    X(nvrtcGetProgramLogSize)                                                                      \
    X(nvrtcGetProgramLog)                                                                          \
    X(nvrtcGetCUBINSize)                                                                           \
    X(nvrtcGetCUBIN)                                                                               \
    X(nvrtcGetPTXSize)                                                                             \
    X(nvrtcGetPTX)                                                                                 \
    X(nvrtcDestroyProgram)

/* The pointer for f is named f, e.g. drv->cuMemAlloc(...): the header's macro turns the field
 * name into cuMemAlloc_v2 in both the declaration and every use, consistently. */
#define ATT_CUDRV_FIELD_(f) __typeof__(f) *f;

typedef struct att_cudrv {
    ATT_CUDRV_FUNCS(ATT_CUDRV_FIELD_)
    ATT_CUDRV_GREEN_FUNCS(ATT_CUDRV_FIELD_) /* NULL unless has_green */
    ATT_CUDRV_DL_FUNCS(ATT_CUDRV_FIELD_)    /* NULL unless has_dl */
    bool has_green;     /* every function of ATT_CUDRV_GREEN_FUNCS resolved */
    bool has_dl;        /* every function of ATT_CUDRV_DL_FUNCS resolved, driver 12.4+ */
    int driver_version; /* cuDriverGetVersion: 1000 * major + 10 * minor */
} att_cudrv_t;

typedef struct att_nvrtc {
    ATT_NVRTC_FUNCS(ATT_CUDRV_FIELD_)
    int major;
    int minor;
} att_nvrtc_t;

/* The driver table after cuInit(0); AT_ERR_UNSUPPORTED with diag naming what is missing (no
 * libcuda.so.1, a symbol, cuInit failed: no device or driver). The result is remembered. */
at_err_t att_cudrv_cuda(const att_cudrv_t **out, at_diag_t *diag);

/* The NVRTC table; AT_ERR_UNSUPPORTED with diag when libnvrtc cannot be loaded. Needs no GPU. */
at_err_t att_cudrv_nvrtc(const att_nvrtc_t **out, at_diag_t *diag);

/* The driver's name for r ("CUDA_ERROR_ILLEGAL_ADDRESS"), or "CUDA_ERROR_<n>". Any thread. */
const char *att_cudrv_err_name(const att_cudrv_t *drv, CUresult r);

/* True for the errors after which the CUDA context is unusable (a kernel fault): every later
 * call of the context fails the same way, so the device must be marked lost. */
int att_cudrv_err_sticky(CUresult r);

#endif

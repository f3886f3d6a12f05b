/* Loading the CUDA driver and NVRTC at run time (see att_cudrv.h).
 * Thread model: each library is loaded once under pthread_once; the tables and the remembered
 * error are written only inside the once routine and read-only afterwards. */
#include "attention/att_cudrv.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STR_(x) #x
#define STR(x) STR_(x)

static att_cudrv_t g_cuda;
static at_err_t g_cuda_err;
static at_diag_t g_cuda_diag;
static pthread_once_t g_cuda_once = PTHREAD_ONCE_INIT;

static att_nvrtc_t g_nvrtc;
static at_err_t g_nvrtc_err;
static at_diag_t g_nvrtc_diag;
static pthread_once_t g_nvrtc_once = PTHREAD_ONCE_INIT;

/* dlopen of the first name that loads; the handle is kept for the process's lifetime. */
static void *open_first(const char *env, const char *const *names, size_t n, char *tried,
                        size_t tried_len) {
    const char *forced = getenv(env);
    if (forced != NULL && forced[0] != '\0') {
        snprintf(tried, tried_len, "%s (from %s)", forced, env);
        return dlopen(forced, RTLD_NOW | RTLD_LOCAL);
    }
    size_t k = 0;
    tried[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h != NULL)
            return h;
        int w = snprintf(tried + k, tried_len - k, "%s%s", i ? ", " : "", names[i]);
        if (w > 0 && (size_t)w < tried_len - k)
            k += (size_t)w;
    }
    return NULL;
}

static void load_cuda(void) {
    static const char *const names[] = {"libcuda.so.1", "libcuda.so"};
    char tried[256];
    void *h = open_first("ATTND_LIBCUDA", names, 2, tried, sizeof tried);
    if (h == NULL) {
        g_cuda_err = at_diag_set(&g_cuda_diag, AT_ERR_UNSUPPORTED,
                                 "no CUDA driver: cannot load %s", tried);
        return;
    }
#define LOAD_(f)                                                                                 \
    if ((g_cuda.f = (__typeof__(g_cuda.f))dlsym(h, STR(f))) == NULL) {                           \
        g_cuda_err = at_diag_set(&g_cuda_diag, AT_ERR_UNSUPPORTED,                               \
                                 "the CUDA driver lacks %s: too old", STR(f));                   \
        return;                                                                                  \
    }
    ATT_CUDRV_FUNCS(LOAD_)
#undef LOAD_
    CUresult r = g_cuda.cuInit(0);
    if (r != CUDA_SUCCESS) {
        const char *name = NULL;
        if (g_cuda.cuGetErrorName(r, &name) != CUDA_SUCCESS || name == NULL)
            name = "unknown";
        g_cuda_err = at_diag_set(&g_cuda_diag, AT_ERR_UNSUPPORTED,
                                 "cuInit failed: %s (no usable NVIDIA GPU)", name);
        return;
    }
    if (g_cuda.cuDriverGetVersion(&g_cuda.driver_version) != CUDA_SUCCESS)
        g_cuda.driver_version = 0;
    /* all of the green functions or none: a partial set is treated as none */
    const char *missing = NULL;
#define LOAD_OPT_(f)                                                                             \
    if ((g_cuda.f = (__typeof__(g_cuda.f))dlsym(h, STR(f))) == NULL && missing == NULL)          \
        missing = STR(f);
    ATT_CUDRV_GREEN_FUNCS(LOAD_OPT_)
    g_cuda.has_green = missing == NULL; /* a session asking for a partition logs its absence */
    missing = NULL;
    ATT_CUDRV_DL_FUNCS(LOAD_OPT_)
#undef LOAD_OPT_
    g_cuda.has_dl = missing == NULL && g_cuda.driver_version >= 12040;
    g_cuda_err = AT_OK;
}

static void load_nvrtc(void) {
    static const char *const names[] = {"libnvrtc.so.13", "libnvrtc.so",
#ifdef ATT_CUDA_LIBDIR
                                        ATT_CUDA_LIBDIR "/libnvrtc.so.13"
#endif
    };
    char tried[512];
    void *h = open_first("ATTND_LIBNVRTC", names, sizeof names / sizeof names[0], tried,
                         sizeof tried);
    if (h == NULL) {
        g_nvrtc_err = at_diag_set(&g_nvrtc_diag, AT_ERR_UNSUPPORTED,
                                  "no NVRTC: cannot load %s", tried);
        return;
    }
#define LOAD_(f)                                                                                 \
    if ((g_nvrtc.f = (__typeof__(g_nvrtc.f))dlsym(h, STR(f))) == NULL) {                         \
        g_nvrtc_err = at_diag_set(&g_nvrtc_diag, AT_ERR_UNSUPPORTED, "NVRTC lacks %s", STR(f));  \
        return;                                                                                  \
    }
    ATT_NVRTC_FUNCS(LOAD_)
#undef LOAD_
    if (g_nvrtc.nvrtcVersion(&g_nvrtc.major, &g_nvrtc.minor) != NVRTC_SUCCESS) {
        g_nvrtc_err = at_diag_set(&g_nvrtc_diag, AT_ERR_UNSUPPORTED, "nvrtcVersion failed");
        return;
    }
    g_nvrtc_err = AT_OK;
}

at_err_t att_cudrv_cuda(const att_cudrv_t **out, at_diag_t *diag) {
    pthread_once(&g_cuda_once, load_cuda);
    if (g_cuda_err != AT_OK) {
        if (diag != NULL)
            *diag = g_cuda_diag;
        return g_cuda_err;
    }
    *out = &g_cuda;
    return AT_OK;
}

at_err_t att_cudrv_nvrtc(const att_nvrtc_t **out, at_diag_t *diag) {
    pthread_once(&g_nvrtc_once, load_nvrtc);
    if (g_nvrtc_err != AT_OK) {
        if (diag != NULL)
            *diag = g_nvrtc_diag;
        return g_nvrtc_err;
    }
    *out = &g_nvrtc;
    return AT_OK;
}

const char *att_cudrv_err_name(const att_cudrv_t *drv, CUresult r) {
    const char *name = NULL;
    if (drv != NULL && drv->cuGetErrorName(r, &name) == CUDA_SUCCESS && name != NULL)
        return name;
    return "CUDA_ERROR_UNKNOWN_CODE";
}

int att_cudrv_err_sticky(CUresult r) {
    switch (r) {
    case CUDA_ERROR_ILLEGAL_ADDRESS:
    case CUDA_ERROR_LAUNCH_FAILED:
    case CUDA_ERROR_MISALIGNED_ADDRESS:
    case CUDA_ERROR_ILLEGAL_INSTRUCTION:
    case CUDA_ERROR_INVALID_ADDRESS_SPACE:
    case CUDA_ERROR_INVALID_PC:
    case CUDA_ERROR_HARDWARE_STACK_ERROR:
    case CUDA_ERROR_ASSERT:
    case CUDA_ERROR_LAUNCH_TIMEOUT:
    case CUDA_ERROR_ECC_UNCORRECTABLE:
    case CUDA_ERROR_CONTEXT_IS_DESTROYED:
        return 1;
    default:
        return 0;
    }
}

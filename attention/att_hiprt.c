/* Loading the HIP runtime and hiprtc at run time (see att_hiprt.h).
 * Thread model: the library is loaded once under pthread_once (symbols), hipInit once under a
 * second pthread_once; the table and the remembered errors are written only inside the once
 * routines and read-only afterwards. */
#include "attention/att_hiprt.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/at_log.h"

#define STR_(x) #x
#define STR(x) STR_(x)

static att_hiprt_t g_rt;
static at_err_t g_load_err, g_init_err;
static at_diag_t g_load_diag, g_init_diag;
static pthread_once_t g_load_once = PTHREAD_ONCE_INIT;
static pthread_once_t g_init_once = PTHREAD_ONCE_INIT;

static void *open_hip(char *tried, size_t tried_len) {
    const char *forced = getenv("ATTND_HIP_LIB");
    if (forced != NULL && forced[0] != '\0') {
        /* a test setting (the HIP test double): said in the log, so it is never mistaken for
         * the runtime in production */
        at_log(AT_LOG_WARN, "hip", "ATTND_HIP_LIB: loading %s instead of libamdhip64 (tests only)",
               forced);
        snprintf(tried, tried_len, "%s (from ATTND_HIP_LIB)", forced);
        return dlopen(forced, RTLD_NOW | RTLD_LOCAL);
    }
    static const char *const names[] = {"libamdhip64.so.5", "libamdhip64.so.6", "libamdhip64.so"};
    snprintf(tried, tried_len, "%s, %s, %s", names[0], names[1], names[2]);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h != NULL) {
            snprintf(tried, tried_len, "%s", names[i]);
            return h;
        }
    }
    return NULL;
}

/* hiprtc from the HIP library itself (ROCm 5, the test double), else from libhiprtc (ROCm 6). */
static void *open_rtc(void *hip) {
    if (dlsym(hip, "hiprtcCreateProgram") != NULL)
        return hip;
    void *h = dlopen("libhiprtc.so.6", RTLD_NOW | RTLD_LOCAL);
    return h != NULL ? h : dlopen("libhiprtc.so", RTLD_NOW | RTLD_LOCAL);
}

static void load(void) {
    char tried[300];
    void *h = open_hip(tried, sizeof tried);
    if (h == NULL) {
        g_load_err =
            at_diag_set(&g_load_diag, AT_ERR_UNSUPPORTED, "no HIP runtime: cannot load %s", tried);
        return;
    }
    snprintf(g_rt.lib, sizeof g_rt.lib, "%s", tried);
#define LOAD_(f)                                                                                   \
    if ((g_rt.f = (__typeof__(g_rt.f))dlsym(h, STR(f))) == NULL) {                                 \
        g_load_err = at_diag_set(&g_load_diag, AT_ERR_UNSUPPORTED, "%s lacks %s: too old",         \
                                 g_rt.lib, STR(f));                                                \
        return;                                                                                    \
    }
    ATT_HIPRT_FUNCS(LOAD_)
#undef LOAD_
    void *rtc = open_rtc(h);
    if (rtc == NULL) {
        g_load_err = at_diag_set(&g_load_diag, AT_ERR_UNSUPPORTED,
                                 "no hiprtc: neither %s nor libhiprtc.so.6 has it", g_rt.lib);
        return;
    }
#define LOAD_(f)                                                                                   \
    if ((g_rt.f = (__typeof__(g_rt.f))dlsym(rtc, STR(f))) == NULL) {                               \
        g_load_err = at_diag_set(&g_load_diag, AT_ERR_UNSUPPORTED, "hiprtc lacks %s", STR(f));     \
        return;                                                                                    \
    }
    ATT_HIPRTC_FUNCS(LOAD_)
#undef LOAD_
    if (g_rt.hiprtcVersion(&g_rt.rtc_major, &g_rt.rtc_minor) != HIPRTC_SUCCESS ||
        g_rt.hipRuntimeGetVersion(&g_rt.runtime_version) != hipSuccess) {
        g_load_err =
            at_diag_set(&g_load_diag, AT_ERR_UNSUPPORTED, "%s: cannot read its version", g_rt.lib);
        return;
    }
    g_load_err = AT_OK;
}

static void init(void) {
    hipError_t r = g_rt.hipInit(0);
    if (r != hipSuccess)
        g_init_err =
            at_diag_set(&g_init_diag, AT_ERR_UNSUPPORTED, "hipInit failed: %s (no usable AMD GPU)",
                        att_hiprt_err_name(&g_rt, r));
    else
        g_init_err = AT_OK;
}

at_err_t att_hiprt_rtc(const att_hiprt_t **out, at_diag_t *diag) {
    pthread_once(&g_load_once, load);
    if (g_load_err != AT_OK) {
        if (diag != NULL)
            *diag = g_load_diag;
        return g_load_err;
    }
    *out = &g_rt;
    return AT_OK;
}

at_err_t att_hiprt_hip(const att_hiprt_t **out, at_diag_t *diag) {
    const att_hiprt_t *rt;
    at_err_t e = att_hiprt_rtc(&rt, diag);
    if (e != AT_OK)
        return e;
    pthread_once(&g_init_once, init);
    if (g_init_err != AT_OK) {
        if (diag != NULL)
            *diag = g_init_diag;
        return g_init_err;
    }
    *out = rt;
    return AT_OK;
}

const char *att_hiprt_err_name(const att_hiprt_t *rt, hipError_t r) {
    const char *name = rt != NULL ? rt->hipGetErrorName(r) : NULL;
    return name != NULL ? name : "hipErrorUnknownCode";
}

int att_hiprt_err_sticky(hipError_t r) {
    switch (r) {
    case hipErrorIllegalAddress:
    case hipErrorLaunchFailure:
    case hipErrorAssert:
    case hipErrorLaunchTimeOut:
    case hipErrorECCNotCorrectable:
    case hipErrorContextIsDestroyed: return 1;
    default: return 0;
    }
}

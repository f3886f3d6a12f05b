/* What the GPU probes (tools/launch_probe.c, tools/cdp_probe.c) share: a monotonic clock, a
 * comparison for qsort, and a check of driver results that names the failed call. Each probe
 * defines PROBE_NAME (its name in messages) before including this. Header-only: the probes are
 * standalone programs. */
#ifndef AT_TOOLS_PROBE_UTIL_H
#define AT_TOOLS_PROBE_UTIL_H

#include <cuda.h>
#include <stdio.h>
#include <time.h>

static inline unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static inline int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* 0 for CUDA_SUCCESS; else prints the call (what) and the driver's name for r, and returns -1. */
static inline int check(CUresult r, const char *what) {
    if (r == CUDA_SUCCESS)
        return 0;
    const char *name = NULL;
    if (cuGetErrorName(r, &name) != CUDA_SUCCESS || name == NULL)
        name = "unknown";
    fprintf(stderr, "%s: %s: %s\n", PROBE_NAME, what, name);
    return -1;
}

#define CK(call) check((call), #call)

#endif

/* The host time of a bare cuLaunchKernel (an empty kernel, no parameters) on this machine, by
 * how long the host waited before it and how it waited: what bounds the attention calls' host
 * time (docs/BENCHMARKS.md, "Targets": host time per call). One line per run:
 *   b2b     the mean of 5000 launches back to back (the driver's best case);
 *   synced  each launch after the stream was waited for (one empty kernel before it);
 *   W ms    each launch after a kernel that kept the GPU busy for W ms (0.3, 2, 8), waited for
 *           by cuStreamSynchronize ("sync"), by polling cuStreamQuery ("poll"), polling with an
 *           event recorded on an idle stream every 200 us ("warm"), or polling while the kernel
 *           writes host memory every 100 us ("touch"), or by cuStreamSynchronize with the
 *           launch going to another, idle stream ("other"),
 * medians and 90th percentiles of 60 launches each (300 for synced);
 *   copies  the host time of a Llama decode call's four uploads from pinned memory (16 KiB,
 *           2 MiB, 512 KiB, 512 KiB) as four cuMemcpyHtoDAsync calls, and of the same bytes as
 *           two (16 KiB, then the rest in one), medians of 300 on a synchronized stream;
 *   mbox    a launch-free submission: a resident kernel polls mapped host memory for a job,
 *           after none or 0.3, 2, 8 ms of busy jobs: the host's time to submit an empty job
 *           (two stores), its round trip until the host sees it done, and beside it (while the
 *           resident kernel holds its one thread's SM slot) an empty kernel's launch plus
 *           cuStreamSynchronize after a busy kernel as long, medians of 60 (what a resident
 *           attention kernel would cost the host and add in latency).
 * With --cpu N the thread is pinned to CPU N first. Host times move between processes, so run it
 * several times.
 *
 * Built by tools/CMakeLists.txt with the CUDA backend (linked with the driver's stub library);
 * tools/gpu_bundle.sh ships it. Needs only the driver; the kernels are PTX the driver compiles.
 * Thread: main's. */
#ifndef _GNU_SOURCE /* the project's build defines it */
#define _GNU_SOURCE
#endif
#include <cuda.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PROBE_NAME "launch_probe"
#include "tools/probe_util.h"

static const char k_ptx[] = ".version 8.0\n.target sm_80\n.address_size 64\n"
                            ".visible .entry empty() { ret; }\n"
                            ".visible .entry spin(.param .u64 ns) {\n"
                            "  .reg .u64 %t0, %t, %n, %d;\n  .reg .pred %p;\n"
                            "  ld.param.u64 %n, [ns];\n  mov.u64 %t0, %globaltimer;\n"
                            "LOOP:\n  mov.u64 %t, %globaltimer;\n  sub.u64 %d, %t, %t0;\n"
                            "  setp.lt.u64 %p, %d, %n;\n  @%p bra LOOP;\n  ret;\n}\n"
                            ".visible .entry spin_touch(.param .u64 ns, .param .u64 dst) {\n"
                            "  .reg .u64 %t0, %t, %n, %d, %last, %e, %dst;\n"
                            "  .reg .u32 %one;\n  .reg .pred %p, %q;\n"
                            "  ld.param.u64 %n, [ns];\n  ld.param.u64 %dst, [dst];\n"
                            "  mov.u32 %one, 1;\n  mov.u64 %t0, %globaltimer;\n"
                            "  mov.u64 %last, %t0;\n"
                            "LOOP:\n  mov.u64 %t, %globaltimer;\n  sub.u64 %e, %t, %last;\n"
                            "  setp.lt.u64 %q, %e, 100000;\n  @%q bra SKIP;\n"
                            "  st.volatile.global.u32 [%dst], %one;\n  mov.u64 %last, %t;\n"
                            "SKIP:\n  sub.u64 %d, %t, %t0;\n  setp.lt.u64 %p, %d, %n;\n"
                            "  @%p bra LOOP;\n  ret;\n}\n"
                            /* mailbox(in, out): resident, one thread; waits for in's u32
                             * sequence number to change (an acquire load: the job's u64 ns at
                             * byte 8 was stored before it), keeps the GPU busy for ns, then
                             * writes the number to out; ~0u ends it */
                            ".visible .entry mailbox(.param .u64 in, .param .u64 out) {\n"
                            "  .reg .u64 %in, %out, %ns, %t0, %t, %d;\n"
                            "  .reg .u32 %seq, %last;\n  .reg .pred %p;\n"
                            "  ld.param.u64 %in, [in];\n  ld.param.u64 %out, [out];\n"
                            "  mov.u32 %last, 0;\n"
                            "WAIT:\n  ld.acquire.sys.global.u32 %seq, [%in];\n"
                            "  setp.eq.u32 %p, %seq, %last;\n  @%p bra WAIT;\n"
                            "  setp.eq.u32 %p, %seq, 0xffffffff;\n  @%p bra END;\n"
                            "  ld.relaxed.sys.global.u64 %ns, [%in+8];\n"
                            "  mov.u64 %t0, %globaltimer;\n"
                            "SPIN:\n  mov.u64 %t, %globaltimer;\n  sub.u64 %d, %t, %t0;\n"
                            "  setp.lt.u64 %p, %d, %ns;\n  @%p bra SPIN;\n"
                            "  st.release.sys.global.u32 [%out], %seq;\n"
                            "  mov.u32 %last, %seq;\n  bra WAIT;\n"
                            "END:\n  ret;\n}\n";

typedef struct probe {
    CUfunction empty, spin, spin_touch, mailbox;
    CUstream st, side; /* side: the warm submissions' stream, also where "other" launches */
    CUstream res;      /* the resident mailbox kernel's */
    CUevent ev;
    CUdeviceptr touch_d; /* a word of mapped host memory spin_touch writes */
    /* mapped host memory of the mailbox: in [u32 seq, pad, u64 ns], out [u32 seq] 64 bytes on */
    _Atomic unsigned *in_seq, *out_seq;
    _Atomic unsigned long long *in_ns;
    CUdeviceptr in_d, out_d;
} probe_t;

/* How the host waits for the busy kernel: cuStreamSynchronize; polling cuStreamQuery; polling
 * and recording an event on an idle stream every 200 us (a submission that keeps the driver's
 * submission path in use); polling while the kernel writes a word of host memory every 100 us
 * (traffic from the GPU to the host on the link, no submission); or cuStreamSynchronize, the
 * measured launch then going to another stream, one that was idle ("other"). */
enum { WAIT_SYNC, WAIT_POLL, WAIT_WARM, WAIT_TOUCH, WAIT_OTHER, WAIT_MODES };
static const char *const k_wait_names[WAIT_MODES] = {"sync", "poll", "warm", "touch", "other"};

static int wait_for(const probe_t *p, int mode) {
    if (mode == WAIT_SYNC || mode == WAIT_OTHER)
        return CK(cuStreamSynchronize(p->st));
    unsigned long long last = now_ns();
    CUresult r;
    while ((r = cuStreamQuery(p->st)) == CUDA_ERROR_NOT_READY)
        if (mode == WAIT_WARM && now_ns() - last > 200000) {
            if (CK(cuEventRecord(p->ev, p->side)))
                return -1;
            last = now_ns();
        }
    return check(r, "cuStreamQuery");
}

/* Median and 90th percentile (us) of n launches of the empty kernel, each after a kernel of
 * busy_ns (none when 0) waited for as `mode` says. */
static int after_wait(const probe_t *p, long long busy_ns, int mode, int n, double *p50,
                      double *p90) {
    double *t = calloc((size_t)n, sizeof *t);
    if (t == NULL)
        return -1;
    CUdeviceptr dst = p->touch_d;
    void *args[] = {&busy_ns, &dst};
    const CUfunction busy = mode == WAIT_TOUCH ? p->spin_touch : p->spin;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        rc = busy_ns != 0 ? CK(cuLaunchKernel(busy, 1, 1, 1, 32, 1, 1, 0, p->st, args, NULL))
                          : CK(cuLaunchKernel(p->empty, 1, 1, 1, 32, 1, 1, 0, p->st, NULL, NULL));
        rc = rc || wait_for(p, mode);
        const CUstream to = mode == WAIT_OTHER ? p->side : p->st;
        const unsigned long long t0 = now_ns();
        rc = rc || CK(cuLaunchKernel(p->empty, 1, 1, 1, 32, 1, 1, 0, to, NULL, NULL));
        t[i] = (double)(now_ns() - t0) / 1e3;
        rc = rc || (mode == WAIT_OTHER ? CK(cuStreamSynchronize(p->side))
                                      : wait_for(p, mode == WAIT_SYNC ? WAIT_SYNC : WAIT_POLL));
    }
    if (rc == 0) {
        qsort(t, (size_t)n, sizeof *t, cmp_double);
        *p50 = t[n / 2];
        *p90 = t[n * 9 / 10];
    }
    free(t);
    return rc;
}

/* Median host time (us) of a decode call's uploads as four copy calls and as two. */
static int upload_calls(const probe_t *p, double *four, double *two) {
    enum { N = 300 };
    static const size_t sizes[4] = {16 << 10, 2 << 20, 512 << 10, 512 << 10};
    const size_t total = sizes[0] + sizes[1] + sizes[2] + sizes[3];
    void *h = NULL;
    CUdeviceptr d = 0;
    double *t = calloc(2 * N, sizeof *t);
    int rc = t == NULL || CK(cuMemHostAlloc(&h, total, 0)) || CK(cuMemAlloc(&d, total));
    for (int i = 0; i < 2 * N && rc == 0; i++) {
        const int merged = i % 2; /* alternate, so both see the same conditions */
        const unsigned long long t0 = now_ns();
        if (merged) {
            rc = CK(cuMemcpyHtoDAsync(d, h, sizes[0], p->st)) ||
                 CK(cuMemcpyHtoDAsync(d + sizes[0], (char *)h + sizes[0], total - sizes[0], p->st));
        } else {
            size_t off = 0;
            for (int u = 0; u < 4 && rc == 0; off += sizes[u], u++)
                rc = CK(cuMemcpyHtoDAsync(d + off, (char *)h + off, sizes[u], p->st));
        }
        t[merged * N + i / 2] = (double)(now_ns() - t0) / 1e3;
        rc = rc || CK(cuStreamSynchronize(p->st));
    }
    if (rc == 0) {
        qsort(t, N, sizeof *t, cmp_double);
        qsort(t + N, N, sizeof *t, cmp_double);
        *four = t[N / 2];
        *two = t[N + N / 2];
    }
    if (d != 0)
        CK(cuMemFree(d));
    if (h != NULL)
        CK(cuMemFreeHost(h));
    free(t);
    return rc;
}

/* Hands the resident mailbox kernel a job of ns busy nanoseconds: the host's whole part of a
 * submission, two stores to mapped memory. The sequence number's store is a release, so the
 * kernel, which loads it with acquire, reads this job's ns after it. */
static void mbox_submit(const probe_t *p, unsigned seq, unsigned long long ns) {
    atomic_store_explicit(p->in_ns, ns, memory_order_relaxed);
    atomic_store_explicit(p->in_seq, seq, memory_order_release);
}

/* Spins until the kernel reports job seq done (an acquire load, pairing with its release store).
 * After 2 s past the job's busy time (ns) it gives up, saying what the kernel's stream reports:
 * a resident kernel that faulted or ended never answers. */
static int mbox_wait(const probe_t *p, unsigned seq, unsigned long long ns) {
    const unsigned long long deadline = now_ns() + ns + 2000000000ull;
    for (unsigned i = 1; atomic_load_explicit(p->out_seq, memory_order_acquire) != seq; i++)
        if (i % 4096 == 0 && now_ns() > deadline) {
            const CUresult r = cuStreamQuery(p->res);
            fprintf(stderr, "launch_probe: the resident kernel did not answer job %u (%s)\n", seq,
                    r == CUDA_ERROR_NOT_READY ? "still running" : "its stream reports an error");
            if (r != CUDA_ERROR_NOT_READY)
                check(r, "cuStreamQuery");
            return -1;
        }
    return 0;
}

/* Round trips after a busy time w (ns; 0: none) that the host waited for: through the resident
 * mailbox kernel (the host spins on out) and through a launch (cuStreamSynchronize). Medians of
 * n: the submission's host time (*sub), its round trip until the host sees the empty job done
 * (*rt), and an empty kernel's launch plus synchronize after a busy kernel of w (*lrt). */
static int round_trips(const probe_t *p, long long w, int n, unsigned *seq, double *sub,
                       double *rt, double *lrt) {
    double *t = calloc((size_t)n * 3, sizeof *t);
    int rc = t == NULL ? -1 : 0;
    void *args[] = {&w};
    for (int i = 0; i < n && rc == 0; i++) {
        if (w != 0) {
            mbox_submit(p, ++*seq, (unsigned long long)w);
            if ((rc = mbox_wait(p, *seq, (unsigned long long)w)) != 0)
                break;
        }
        unsigned long long t0 = now_ns();
        mbox_submit(p, ++*seq, 0);
        const unsigned long long t1 = now_ns();
        if ((rc = mbox_wait(p, *seq, 0)) != 0)
            break;
        t[i] = (double)(t1 - t0) / 1e3;
        t[n + i] = (double)(now_ns() - t0) / 1e3;
        if (w != 0)
            rc = CK(cuLaunchKernel(p->spin, 1, 1, 1, 32, 1, 1, 0, p->st, args, NULL)) ||
                 CK(cuStreamSynchronize(p->st));
        t0 = now_ns();
        rc = rc || CK(cuLaunchKernel(p->empty, 1, 1, 1, 32, 1, 1, 0, p->st, NULL, NULL)) ||
             CK(cuStreamSynchronize(p->st));
        t[2 * n + i] = (double)(now_ns() - t0) / 1e3;
    }
    if (rc == 0) {
        double *out[3] = {sub, rt, lrt};
        for (int k = 0; k < 3; k++) {
            qsort(t + (size_t)k * n, (size_t)n, sizeof *t, cmp_double);
            *out[k] = t[(size_t)k * n + (size_t)n / 2];
        }
    }
    free(t);
    return rc;
}

/* The mailbox figures after each busy time (see the top), with the resident kernel running on
 * its own stream for the duration (the launches beside it share the GPU with its one thread). */
static int mailbox(const probe_t *p) {
    unsigned seq = 0;
    atomic_store_explicit(p->in_seq, 0, memory_order_relaxed); /* before the kernel starts */
    atomic_store_explicit(p->out_seq, 0, memory_order_relaxed);
    CUdeviceptr in_d = p->in_d, out_d = p->out_d;
    void *args[] = {&in_d, &out_d};
    if (CK(cuLaunchKernel(p->mailbox, 1, 1, 1, 1, 1, 1, 0, p->res, args, NULL)))
        return -1;
    static const long long waits[] = {0, 300000, 2000000, 8000000};
    int rc = 0;
    for (int w = 0; w < 4 && rc == 0; w++) {
        double sub, rt, lrt;
        rc = round_trips(p, waits[w], 60, &seq, &sub, &rt, &lrt);
        if (rc == 0)
            printf("  mbox %.1f ms: submit %.2f rt %.2f / launch+sync %.2f", waits[w] / 1e6, sub,
                   rt, lrt);
    }
    mbox_submit(p, ~0u, 0);
    return CK(cuStreamSynchronize(p->res)) || rc;
}

/* Measures and prints one line of figures (see the top). */
static int measure(const probe_t *p, int pinned) {
    const int cpu_first = sched_getcpu();
    for (int i = 0; i < 200; i++)
        if (CK(cuLaunchKernel(p->empty, 1, 1, 1, 32, 1, 1, 0, p->st, NULL, NULL)))
            return -1;
    if (CK(cuStreamSynchronize(p->st)))
        return -1;
    enum { B2B = 5000 };
    const unsigned long long t0 = now_ns();
    for (int i = 0; i < B2B; i++)
        if (CK(cuLaunchKernel(p->empty, 1, 1, 1, 32, 1, 1, 0, p->st, NULL, NULL)))
            return -1;
    const double b2b = (double)(now_ns() - t0) / B2B / 1e3;
    double s50, s90;
    if (CK(cuStreamSynchronize(p->st)) || after_wait(p, 0, 0, 300, &s50, &s90) != 0)
        return -1;
    printf("cpu %2d->%2d  b2b %.2f  synced %.2f/%.2f", cpu_first, sched_getcpu(), b2b, s50, s90);
    static const long long waits[] = {300000, 2000000, 8000000};
    for (int w = 0; w < 3; w++)
        for (int mode = 0; mode < WAIT_MODES; mode++) {
            double a, b;
            if (after_wait(p, waits[w], mode, 60, &a, &b) != 0) {
                printf("\n");
                return -1;
            }
            printf("  %.1f ms %s %.2f/%.2f", waits[w] / 1e6, k_wait_names[mode], a, b);
        }
    double four = 0.0, two = 0.0;
    if (upload_calls(p, &four, &two) != 0 || mailbox(p) != 0) {
        printf("\n");
        return -1;
    }
    printf("  copies 4: %.2f, 2: %.2f  (us; waits median/p90, mbox and copies median%s)\n", four,
           two, pinned ? "; pinned" : "");
    return 0;
}

int main(int argc, char **argv) {
    int cpu = -1;
    if (argc == 3 && strcmp(argv[1], "--cpu") == 0) {
        char *end = NULL;
        const long v = strtol(argv[2], &end, 10);
        if (argv[2][0] == '\0' || *end != '\0' || v < 0 || v >= CPU_SETSIZE) {
            fprintf(stderr, "launch_probe: --cpu takes a CPU number, not %s\n", argv[2]);
            return 2;
        }
        cpu = (int)v;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) {
            perror("launch_probe: sched_setaffinity");
            return 1;
        }
    } else if (argc != 1) {
        fprintf(stderr, "usage: launch_probe [--cpu N]\n");
        return 2;
    }
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    probe_t p;
    void *touch_h = NULL, *mbox_h = NULL;
    /* a failed set-up exits: the process's end releases what the driver holds for it */
    if (CK(cuInit(0)) || CK(cuDeviceGet(&dev, 0)) || CK(cuDevicePrimaryCtxRetain(&ctx, dev)) ||
        CK(cuCtxSetCurrent(ctx)) || CK(cuModuleLoadData(&mod, k_ptx)) ||
        CK(cuModuleGetFunction(&p.empty, mod, "empty")) ||
        CK(cuModuleGetFunction(&p.spin, mod, "spin")) ||
        CK(cuModuleGetFunction(&p.spin_touch, mod, "spin_touch")) ||
        CK(cuModuleGetFunction(&p.mailbox, mod, "mailbox")) ||
        CK(cuStreamCreate(&p.res, CU_STREAM_NON_BLOCKING)) ||
        CK(cuStreamCreate(&p.st, CU_STREAM_NON_BLOCKING)) ||
        CK(cuStreamCreate(&p.side, CU_STREAM_NON_BLOCKING)) ||
        CK(cuEventCreate(&p.ev, CU_EVENT_DISABLE_TIMING)) ||
        CK(cuMemHostAlloc(&touch_h, 64, CU_MEMHOSTALLOC_DEVICEMAP)) ||
        CK(cuMemHostGetDevicePointer(&p.touch_d, touch_h, 0)) ||
        CK(cuMemHostAlloc(&mbox_h, 128, CU_MEMHOSTALLOC_DEVICEMAP)) ||
        CK(cuMemHostGetDevicePointer(&p.in_d, mbox_h, 0)))
        return 1;
    p.in_seq = (_Atomic unsigned *)mbox_h;
    p.in_ns = (_Atomic unsigned long long *)((char *)mbox_h + 8);
    p.out_seq = (_Atomic unsigned *)((char *)mbox_h + 64);
    p.out_d = p.in_d + 64;
    const int rc = measure(&p, cpu >= 0);
    const int down = CK(cuCtxSynchronize()) | CK(cuStreamDestroy(p.st)) |
                     CK(cuStreamDestroy(p.side)) | CK(cuStreamDestroy(p.res)) |
                     CK(cuEventDestroy(p.ev)) | CK(cuMemFreeHost(touch_h)) |
                     CK(cuMemFreeHost(mbox_h)) | CK(cuModuleUnload(mod)) |
                     CK(cuDevicePrimaryCtxRelease(dev));
    return rc != 0 || down != 0 ? 1 : 0;
}

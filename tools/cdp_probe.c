/* What a launch-free attention call would cost, through device-side launches: a resident kernel
 * polls a job record in mapped host memory and launches the job's work itself, so the host's part
 * of a submission is a few stores (docs/BENCHMARKS.md, "Targets": host time per call). The module
 * is compiled the way attnd compiles its kernels (NVRTC, here with -rdc=true) and linked with the
 * device runtime (libcudadevrt.a) by the driver's linker. Two ways, each timed against the same
 * work launched from the host (cuLaunchKernel or cuMemcpy*Async, then cuStreamSynchronize):
 *
 * Kernel launches from the device (CDP2): a resident one-thread kernel launches, fire-and-forget,
 *   signal  a one-thread grid that reports the job done (one hop);
 *   empty   a one-thread stage grid that tail-launches a one-thread work grid, then the signal
 *           (three hops: the chain a call would take);
 *   full    the same with a work grid of 16 blocks of 128 threads per SM, each spinning 100 us;
 *   copy    the same with a copy grid that brings 3 MiB from mapped host memory into device
 *           memory (a decode call's q, k and v), or takes 2 MiB back (its output).
 * Graph launches from the device: the launcher is a graph's one kernel, which takes one job,
 * launches that job's graph fire-and-forget and tail-launches its own graph:
 *   g-signal, g-empty, g-full  as above, as graphs (a node's end starts the next);
 *   g-call  a whole call's stand-in: copy 3 MiB in, read 1 GiB of device memory (a 1K decode's
 *           KV cache) in a device-updatable node whose parameter and grid the launcher sets
 *           first, copy 2 MiB out, signal; against the host's two copies and launch;
 *   g-green the mixed batch's two kinds in two green contexts (64 SMs and the rest), a graph
 *           captured from their streams: can it be launched from the device, and which SMs
 *           do the kinds' blocks run on (and from the host).
 *   split   the same two kinds without green contexts, split by SM id inside the kernels: the
 *           narrow kind's blocks on the wide kind's SMs leave at once, and the wide kind's grid
 *           follows the narrow one through a programmatic edge from its launch-order port (all
 *           its blocks have begun), or with no edge: can such a graph be launched from the
 *           device, and which SMs does each kind get.
 * Then large copies launched from the host: the copy engine against copy kernels (big copy), an
 * attention epilogue's 4-byte stores straight into mapped host memory (fragment stores), both
 * ways at once, copies in with hints for the link's requests (hinted copy), the same host bytes
 * read once and eight times (reread: does the L2 keep host memory's lines), and the bulk copy
 * engine (TMA) driven from a kernel (bulk copy).
 * For each job: the host's time to submit (median), the round trip until the host sees it done
 * (median, after 0 and 2 ms of busy jobs), and from the device's clock the hops: the resident
 * kernel's pick-up to the work's first block, and that block to the signal.
 *
 * Usage: cdp_probe [DEVRT]  (DEVRT: the path of libcudadevrt.a; default lib/ beside bin/)
 * Built by tools/CMakeLists.txt with the CUDA backend (the driver's stub library and libnvrtc);
 * tools/gpu_bundle.sh ships it. Thread: main's. */
#ifndef _GNU_SOURCE /* the project's build defines it */
#define _GNU_SOURCE
#endif
#include <cuda.h>
#include <libgen.h>
#include <limits.h>
#include <nvrtc.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PROBE_NAME "cdp_probe"
#include "tools/probe_util.h"

/* The job record in mapped host memory; the kernel side declares the same layout. */
typedef struct {
    _Atomic unsigned seq; /* stored last, with release; ~0u ends the resident kernel */
    unsigned kind;        /* 0 signal, 1 work, 2 copy */
    unsigned grid, threads;
    unsigned long long ns, src, dst, bytes;
} job_t;

static const char k_src[] =
    "struct job { unsigned seq, kind, grid, threads;\n"
    "             unsigned long long ns, src, dst, bytes; };\n"
    "__device__ unsigned long long now() {\n"
    "  unsigned long long t; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t)); return t; "
    "}\n"
    "extern \"C\" __global__ void signal(unsigned *out, unsigned long long *ts, unsigned seq) {\n"
    "  ts[2] = now();\n  __threadfence_system();\n"
    "  asm volatile(\"st.release.sys.global.u32 [%0], %1;\" :: \"l\"(out), \"r\"(seq) : "
    "\"memory\");\n"
    "}\n"
    "extern \"C\" __global__ void work(unsigned long long ns, unsigned long long *ts) {\n"
    "  const unsigned long long t0 = now();\n"
    "  if (blockIdx.x == 0 && threadIdx.x == 0) ts[1] = t0;\n"
    "  while (now() - t0 < ns) {}\n}\n"
    "extern \"C\" __global__ void copy(const uint4 *src, uint4 *dst, unsigned long long n,\n"
    "                                 unsigned long long *ts) {\n"
    "  if (blockIdx.x == 0 && threadIdx.x == 0) ts[1] = now();\n"
    "  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n;\n"
    "       i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = src[i];\n}\n"
    "extern \"C\" __global__ void stage(job j, unsigned *out, unsigned long long *ts) {\n"
    "  if (j.kind == 1) work<<<j.grid, j.threads, 0, cudaStreamTailLaunch>>>(j.ns, ts);\n"
    "  else copy<<<j.grid, j.threads, 0, cudaStreamTailLaunch>>>((const uint4 *)j.src,\n"
    "      (uint4 *)j.dst, j.bytes / 16, ts);\n"
    "  signal<<<1, 1, 0, cudaStreamTailLaunch>>>(out, ts, j.seq);\n}\n"
    "extern \"C\" __global__ void resident(const job *in, unsigned *out,\n"
    "                                     unsigned long long *ts) {\n"
    "  unsigned last = 0;\n"
    "  for (;;) {\n"
    "    unsigned seq;\n"
    "    do asm volatile(\"ld.acquire.sys.global.u32 %0, [%1];\" : \"=r\"(seq) : \"l\"(&in->seq)\n"
    "                    : \"memory\");\n"
    "    while (seq == last);\n"
    "    if (seq == 0xffffffffu) return;\n"
    "    const volatile job *v = in;\n"
    "    job j = {seq, v->kind, v->grid, v->threads, v->ns, v->src, v->dst, v->bytes};\n"
    "    ts[0] = now();\n"
    "    if (j.kind == 0) signal<<<1, 1, 0, cudaStreamFireAndForget>>>(out, ts, seq);\n"
    "    else stage<<<1, 1, 0, cudaStreamFireAndForget>>>(j, out, ts);\n"
    "    last = seq;\n  }\n}\n"
    /* device graph launch: the launcher is a graph's one kernel; it takes one job, launches
     * that job's graph and tail-launches its own graph to take the next */
    "__device__ unsigned g_last;\n"
    "extern \"C\" __global__ void gsignal(const job *in, unsigned *out, unsigned long long *ts) {\n"
    "  const unsigned seq = ((const volatile job *)in)->seq;\n"
    "  ts[2] = now();\n  __threadfence_system();\n"
    "  asm volatile(\"st.release.sys.global.u32 [%0], %1;\" :: \"l\"(out), \"r\"(seq) : "
    "\"memory\");\n"
    "}\n"
    "extern \"C\" __global__ void gwork(const job *in, unsigned long long *ts) {\n"
    "  __shared__ unsigned long long ns;\n"
    "  if (threadIdx.x == 0) ns = ((const volatile job *)in)->ns;\n"
    "  __syncthreads();\n"
    "  const unsigned long long t0 = now();\n"
    "  if (blockIdx.x == 0 && threadIdx.x == 0) ts[1] = t0;\n"
    "  while (now() - t0 < ns) {}\n}\n"
    "extern \"C\" __global__ void gsm(unsigned *smids, unsigned base) {\n"
    "  if (threadIdx.x == 0) {\n"
    "    unsigned sm; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(sm));\n"
    "    smids[base + blockIdx.x] = sm; }\n"
    "  const unsigned long long t0 = now();\n  while (now() - t0 < 20000) {}\n}\n"
    "extern \"C\" __global__ void gread(const uint4 *kv, unsigned long long n, unsigned salt,\n"
    "                                  unsigned long long *ts) {\n"
    "  if (blockIdx.x == 0 && threadIdx.x == 0) ts[3] = now();\n"
    "  unsigned acc = 0;\n"
    "  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n;\n"
    "       i += (unsigned long long)gridDim.x * blockDim.x) {\n"
    "    const uint4 v = __ldcs(kv + i); acc ^= v.x + v.y + v.z + v.w; }\n"
    "  if (acc == salt + 0x9e3779b9u) ts[4] = acc;\n}\n"
    "extern \"C\" __global__ void gcopy(const uint4 *src, uint4 *dst, unsigned long long n) {\n"
    "  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n;\n"
    "       i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = src[i];\n}\n"
    /* the same with four loads in flight per thread before their stores */
    "extern \"C\" __global__ void gcopy4(const uint4 *src, uint4 *dst, unsigned long long n) {\n"
    "  const unsigned long long s = (unsigned long long)gridDim.x * blockDim.x;\n"
    "  unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  for (; i + 3 * s < n; i += 4 * s) {\n"
    "    uint4 v[4];\n"
    "    for (int k = 0; k < 4; k++) v[k] = src[i + k * s];\n"
    "    for (int k = 0; k < 4; k++) dst[i + k * s] = v[k]; }\n"
    "  for (; i < n; i += s) dst[i] = src[i];\n}\n"
    /* copies in from mapped host memory with hints for the requests the link sees (way): 0 a
     * non-coherent load asking the L2 for 256-byte fetches; 1 the same, four in flight; 2 each
     * block's 64 KiB slice prefetched into the L2 by the bulk copy engine one slice ahead, then
     * plain loads; 3 64 contiguous bytes per thread (a warp's 2 KiB at once) */
    "__device__ __forceinline__ uint4 ld256(const uint4 *p) {\n"
    "  uint4 v;\n"
    "  asm volatile(\"ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\"\n"
    "               : \"=r\"(v.x), \"=r\"(v.y), \"=r\"(v.z), \"=r\"(v.w) : \"l\"(p));\n"
    "  return v;\n}\n"
    "extern \"C\" __global__ void ghint(const uint4 *src, uint4 *dst, unsigned long long n,\n"
    "                                  unsigned way) {\n"
    "  const unsigned long long s = (unsigned long long)gridDim.x * blockDim.x;\n"
    "  unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  if (way == 0) { for (; i < n; i += s) dst[i] = ld256(src + i); return; }\n"
    "  if (way == 1) {\n"
    "    for (; i + 3 * s < n; i += 4 * s) {\n"
    "      uint4 v[4];\n"
    "      for (int k = 0; k < 4; k++) v[k] = ld256(src + i + k * s);\n"
    "      for (int k = 0; k < 4; k++) dst[i + k * s] = v[k]; }\n"
    "    for (; i < n; i += s) dst[i] = ld256(src + i);\n"
    "    return; }\n"
    "  if (way == 2) {\n"
    "#if __CUDA_ARCH__ >= 900\n"
    "    const unsigned long long sl = 4096;\n"
    "    for (unsigned long long b = blockIdx.x; b * sl < n; b += gridDim.x) {\n"
    "      if (threadIdx.x == 0) {\n"
    "        const unsigned long long nb = b == blockIdx.x ? b : b + gridDim.x;\n"
    "        for (unsigned long long q = nb; q <= b + gridDim.x && q * sl < n; q += gridDim.x) {\n"
    "          const unsigned long long m = n - q * sl < sl ? n - q * sl : sl;\n"
    "          asm volatile(\"cp.async.bulk.prefetch.L2.global [%0], %1;\"\n"
    "                       :: \"l\"(src + q * sl), \"r\"((unsigned)(m * 16)) : \"memory\"); } }\n"
    "      for (unsigned long long k = b * sl + threadIdx.x; k < (b + 1) * sl && k < n;\n"
    "           k += blockDim.x) dst[k] = src[k];\n"
    "    }\n"
    "#endif\n"
    "    return; }\n"
    "  for (i *= 4; i + 3 < n; i += 4 * s) {\n"
    "    uint4 v[4];\n"
    "    for (int k = 0; k < 4; k++) v[k] = src[i + k];\n"
    "    for (int k = 0; k < 4; k++) dst[i + k] = v[k]; }\n"
    "  for (; i < n; i++) dst[i] = src[i];\n"
    "}\n"
    /* reads the first n 16-byte words of mapped host memory reps times over (L2-cached loads):
     * whether the L2 keeps host memory's lines, so a second read stays off the link */
    "extern \"C\" __global__ void greread(const uint4 *src, uint4 *dst, unsigned long long n,\n"
    "                                    unsigned reps) {\n"
    "  const unsigned long long s = (unsigned long long)gridDim.x * blockDim.x;\n"
    "  uint4 acc = make_uint4(0, 0, 0, 0);\n"
    "  for (unsigned r = 0; r < reps; r++)\n"
    "    for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += s) {\n"
    "      const uint4 v = __ldcg(src + i);\n"
    "      acc.x ^= v.x; acc.y += v.y; acc.z ^= v.z + r; acc.w += v.w; }\n"
    "  dst[blockIdx.x * blockDim.x + threadIdx.x] = acc;\n}\n"
    /* the bulk copy engine (TMA, sm_90) between global and shared memory: one thread a block
     * moves chunks of ch bytes through two shared buffers, each loaded by cp.async.bulk (an
     * mbarrier counts its bytes) and stored by cp.async.bulk while the next one loads */
    "extern \"C\" __global__ void gbulk(const char *src, char *dst, unsigned long long n,\n"
    "                                 unsigned ch) {\n"
    "#if __CUDA_ARCH__ >= 900\n"
    "  extern __shared__ __align__(128) unsigned char buf[];\n"
    "  __shared__ __align__(8) unsigned long long bar[2];\n"
    "  if (threadIdx.x != 0) return;\n"
    "  const unsigned b0 = (unsigned)__cvta_generic_to_shared(buf);\n"
    "  const unsigned m0 = (unsigned)__cvta_generic_to_shared(bar);\n"
    "  for (int i = 0; i < 2; i++)\n"
    "    asm volatile(\"mbarrier.init.shared::cta.b64 [%0], 1;\" :: \"r\"(m0 + 8 * i));\n"
    "  asm volatile(\"fence.mbarrier_init.release.cluster;\" ::: \"memory\");\n"
    "  unsigned phase[2] = {0, 0}, k = 0;\n"
    "  for (unsigned long long off = (unsigned long long)blockIdx.x * ch; off < n;\n"
    "       off += (unsigned long long)gridDim.x * ch, k ^= 1) {\n"
    "    const unsigned bytes = n - off < ch ? (unsigned)(n - off) : ch;\n"
    "    const unsigned sb = b0 + k * ch, mb = m0 + 8 * k;\n"
    "    asm volatile(\"cp.async.bulk.wait_group.read 1;\" ::: \"memory\");\n"
    "    asm volatile(\"mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\"\n"
    "                 :: \"r\"(mb), \"r\"(bytes) : \"memory\");\n"
    "    asm volatile(\"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes\"\n"
    "                 \" [%0], [%1], %2, [%3];\" :: \"r\"(sb), \"l\"(src + off), \"r\"(bytes),\n"
    "                 \"r\"(mb) : \"memory\");\n"
    "    unsigned done = 0;\n"
    "    while (!done)\n"
    "      asm volatile(\"{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\"\n"
    "                   \" selp.u32 %0, 1, 0, p; }\" : \"=r\"(done) : \"r\"(mb), \"r\"(phase[k])\n"
    "                   : \"memory\");\n"
    "    phase[k] ^= 1;\n"
    "    asm volatile(\"cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\"\n"
    "                 :: \"l\"(dst + off), \"r\"(sb), \"r\"(bytes) : \"memory\");\n"
    "    asm volatile(\"cp.async.bulk.commit_group;\" ::: \"memory\");\n"
    "  }\n"
    "  asm volatile(\"cp.async.bulk.wait_group 0;\" ::: \"memory\");\n"
    "#endif\n"
    "}\n"
    /* stores as an mma.sync or wgmma tile's epilogue makes them: a warp holds 16 rows of 256
     * bytes; lane (g, t4) stores 4 bytes of rows g and g + 8 at column 16 d + 4 t4, d < 16 */
    "extern \"C\" __global__ void gfrag(unsigned *dst, unsigned long long rows) {\n"
    "  const unsigned lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;\n"
    "  const unsigned long long warps = (unsigned long long)gridDim.x * blockDim.x / 32;\n"
    "  for (unsigned long long w = (blockIdx.x * blockDim.x + threadIdx.x) / 32; w * 16 < rows;\n"
    "       w += warps)\n"
    "    for (int ri = 0; ri < 2; ri++) {\n"
    "      unsigned *row = dst + (w * 16 + g + 8 * ri) * 64;\n"
    "      for (int d = 0; d < 16; d++) row[d * 4 + t4] = (unsigned)w ^ d; }\n}\n"
    /* the SM split inside the kernels: a grid of the narrow kind on every SM, whose blocks on
     * the wide kind's SMs (ids below split) leave at once but the last to start; the wide
     * kind's grid after it */
    "extern \"C\" __global__ void gpart(unsigned *smids, unsigned long long *t, unsigned split,\n"
    "                                  unsigned long long ns, unsigned *ticket) {\n"
    "  __shared__ bool stay;\n"
    "  if (threadIdx.x == 0) {\n"
    "    unsigned sm; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(sm));\n"
    "    const unsigned k = atomicAdd(ticket, 1u);\n"
    "    if (k == gridDim.x - 1) *ticket = 0;\n"
    "    stay = sm >= split || k == gridDim.x - 1;\n"
    "    smids[blockIdx.x] = stay ? sm : 0xffffffffu; t[blockIdx.x] = now(); }\n"
    "  __syncthreads();\n"
    "  if (!stay) return;\n"
    "  const unsigned long long t0 = now();\n  while (now() - t0 < ns) {}\n}\n"
    "extern \"C\" __global__ void gwide(unsigned *smids, unsigned long long *t,\n"
    "                                  unsigned long long ns) {\n"
    "  extern __shared__ unsigned char big[];\n"
    "  if (threadIdx.x == 0) {\n"
    "    unsigned sm; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(sm));\n"
    "    smids[blockIdx.x] = sm; t[blockIdx.x] = now(); big[0] = 1; }\n"
    "  const unsigned long long t0 = now();\n  while (now() - t0 < ns) {}\n}\n"
    "extern \"C\" __global__ void glauncher(const job *in, unsigned long long *ts,\n"
    "    cudaGraphExec_t one, cudaGraphExec_t two, cudaGraphExec_t three, cudaGraphExec_t four,\n"
    "    cudaGraphExec_t five, cudaGraphExec_t six, cudaGraphExec_t seven,\n"
    "    cudaGraphDeviceNode_t read) {\n"
    "  unsigned seq;\n"
    "  do asm volatile(\"ld.acquire.sys.global.u32 %0, [%1];\" : \"=r\"(seq) : \"l\"(&in->seq)\n"
    "                  : \"memory\");\n"
    "  while (seq == g_last);\n"
    "  if (seq == 0xffffffffu) return;\n"
    "  g_last = seq;\n  ts[0] = now();\n"
    "  const unsigned kind = ((const volatile job *)in)->kind;\n"
    "  ts[5] = now();\n"
    "  if (kind == 13) {\n"
    "    cudaGraphKernelNodeSetParam(read, 16, &seq, sizeof seq);\n"
    "    cudaGraphKernelNodeSetGridDim(read, dim3(((const volatile job *)in)->grid));\n"
    "  }\n"
    "  ts[6] = now();\n"
    "  ts[7] = cudaGraphLaunch(kind == 10 ? one : kind == 11 ? two : kind == 12 ? three :\n"
    "                          kind == 13 ? four : kind == 14 ? five : kind == 15 ? six : seven,\n"
    "                          cudaStreamGraphFireAndForget);\n"
    "  cudaGraphLaunch(cudaGetCurrentGraphExec(), cudaStreamGraphTailLaunch);\n}\n";

/* The largest chunk gbulk moves at once (two of them in shared memory). */
#define BULK_MAX_CHUNK (48u << 10)

/* The whole-call job's bytes: q, k and v in, out back, the KV cache read (Llama 1K decode) */
enum { COPY_IN = 3 << 20, COPY_OUT = 2 << 20 };
#define KV_BYTES (1ull << 30)

typedef struct {
    CUfunction resident, work, copy, gsignal, gwork, glauncher, gread, gcopy, gsm, gpart, gwide;
    CUfunction gcopy4, gfrag, gbulk, ghint, greread;
    CUstream res, st;
    job_t *job;                      /* mapped host memory */
    _Atomic unsigned *out_seq;       /* mapped, written by the signal grid */
    volatile unsigned long long *ts; /* mapped: pick-up, work's first block, signal */
    CUdeviceptr job_d, out_d, ts_d, host_d, dev_d, kv_d, out_dev_d, smids_d;
    unsigned *smids; /* mapped: the SM of each block of the green job's two kernels */
    unsigned long long *starts; /* mapped: each block's start (the split jobs) */
    CUdeviceptr starts_d, ticket_d;
    void *host_h;
    unsigned seq;
    unsigned busy_kind; /* the job kind that keeps the GPU busy before a measured job */
    int sms;
} probe_t;

/* NVRTC with -rdc=true, then the driver's linker with the device runtime: *img is the linked
 * cubin, owned by *link (destroy it after loading). */
static int build(const char *arch, const char *devrt, CUlinkState *link, void **img) {
    nvrtcProgram prog;
    if (nvrtcCreateProgram(&prog, k_src, "cdp_probe.cu", 0, NULL, NULL) != NVRTC_SUCCESS)
        return -1;
    char arch_opt[32];
    snprintf(arch_opt, sizeof arch_opt, "-arch=%s", arch);
    const char *opts[] = {arch_opt, "-rdc=true", "-std=c++17"};
    const nvrtcResult r = nvrtcCompileProgram(prog, 3, opts);
    size_t n = 0;
    char *ptx = NULL;
    if (r != NVRTC_SUCCESS) {
        char *log = NULL;
        if (nvrtcGetProgramLogSize(prog, &n) == NVRTC_SUCCESS && (log = malloc(n)) != NULL &&
            nvrtcGetProgramLog(prog, log) == NVRTC_SUCCESS)
            fprintf(stderr, "cdp_probe: NVRTC: %s\n%s\n", nvrtcGetErrorString(r), log);
        free(log);
        nvrtcDestroyProgram(&prog);
        return -1;
    }
    if (nvrtcGetPTXSize(prog, &n) != NVRTC_SUCCESS || (ptx = malloc(n)) == NULL ||
        nvrtcGetPTX(prog, ptx) != NVRTC_SUCCESS) {
        free(ptx);
        nvrtcDestroyProgram(&prog);
        return -1;
    }
    nvrtcDestroyProgram(&prog);
    static char err[4096];
    CUjit_option o[] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void *ov[] = {err, (void *)(size_t)sizeof err};
    size_t img_n = 0;
    int rc = CK(cuLinkCreate(2, o, ov, link));
    rc = rc || CK(cuLinkAddData(*link, CU_JIT_INPUT_PTX, ptx, n, "cdp_probe.ptx", 0, NULL, NULL)) ||
         CK(cuLinkAddFile(*link, CU_JIT_INPUT_LIBRARY, devrt, 0, NULL, NULL)) ||
         CK(cuLinkComplete(*link, img, &img_n));
    if (rc != 0 && err[0] != '\0')
        fprintf(stderr, "cdp_probe: linker: %s\n", err);
    free(ptx);
    return rc;
}

/* Submits one job (the host's whole part: the record, then its number with release). */
static void submit(probe_t *p, unsigned kind, unsigned grid, unsigned threads,
                   unsigned long long ns, CUdeviceptr src, CUdeviceptr dst,
                   unsigned long long bytes) {
    p->job->kind = kind;
    p->job->grid = grid;
    p->job->threads = threads;
    p->job->ns = ns;
    p->job->src = src;
    p->job->dst = dst;
    p->job->bytes = bytes;
    atomic_store_explicit(&p->job->seq, ++p->seq, memory_order_release);
}

/* Spins until the current job is reported done; gives up after 2 s, saying what the resident
 * kernel's stream reports (a faulted or ended resident kernel never answers). */
static int wait_done(const probe_t *p) {
    const unsigned long long deadline = now_ns() + 2000000000ull;
    for (unsigned i = 1; atomic_load_explicit(p->out_seq, memory_order_acquire) != p->seq; i++)
        if (i % 4096 == 0 && now_ns() > deadline) {
            const CUresult r = cuStreamQuery(p->res);
            fprintf(stderr, "cdp_probe: job %u not done (%s)\n", p->seq,
                    r == CUDA_ERROR_NOT_READY ? "resident kernel still running" : "stream error");
            if (r != CUDA_ERROR_NOT_READY)
                check(r, "cuStreamQuery");
            return -1;
        }
    return 0;
}

typedef struct {
    const char *name;
    unsigned kind, grid, threads;
    unsigned long long ns, bytes;
    int to_host; /* copy: device to mapped host memory */
} job_kind_t;

/* The same work from the host: its submission's host time (*sub, us) and with
 * cuStreamSynchronize (*us). The whole-call job: the q, k, v upload, the read, out's download. */
static int host_path(probe_t *p, const job_kind_t *k, double *sub, double *us) {
    unsigned long long ns = k->ns, n16 = k->bytes / 16, kv16 = KV_BYTES / 16;
    unsigned salt = p->seq;
    CUdeviceptr ts = p->ts_d, src = k->to_host ? p->dev_d : p->host_d,
                dst = k->to_host ? p->host_d : p->dev_d;
    void *wargs[] = {&ns, &ts};
    void *cargs[] = {&src, &dst, &n16, &ts};
    void *rargs[] = {&p->kv_d, &kv16, &salt, &ts};
    const unsigned long long t0 = now_ns();
    int rc;
    if (k->kind == 13)
        rc = CK(cuMemcpyHtoDAsync(p->dev_d, p->host_h, COPY_IN, p->st)) ||
             CK(cuLaunchKernel(p->gread, k->grid, 1, 1, 256, 1, 1, 0, p->st, rargs, NULL)) ||
             CK(cuMemcpyDtoHAsync(p->host_h, p->out_dev_d, COPY_OUT, p->st));
    else if (k->kind == 2)
        rc = CK(cuLaunchKernel(p->copy, k->grid, 1, 1, k->threads, 1, 1, 0, p->st, cargs, NULL));
    else
        rc = CK(cuLaunchKernel(p->work, k->grid, 1, 1, k->threads, 1, 1, 0, p->st, wargs, NULL));
    *sub = (double)(now_ns() - t0) / 1e3;
    rc = rc || CK(cuStreamSynchronize(p->st));
    *us = (double)(now_ns() - t0) / 1e3;
    return rc;
}

/* One line: medians of n jobs of kind k after busy jobs of w ns (0: none). */
static int run_kind(probe_t *p, const job_kind_t *k, long long w, int n) {
    double *t = calloc((size_t)n * 6, sizeof *t);
    if (t == NULL)
        return -1;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        if (w != 0) {
            submit(p, p->busy_kind, 1, 32, (unsigned long long)w, 0, 0, 0);
            if ((rc = wait_done(p)) != 0)
                break;
        }
        const CUdeviceptr src = k->to_host ? p->dev_d : p->host_d;
        const CUdeviceptr dst = k->to_host ? p->host_d : p->dev_d;
        const unsigned long long t0 = now_ns();
        submit(p, k->kind, k->grid, k->threads, k->ns, src, dst, k->bytes);
        const unsigned long long t1 = now_ns();
        if ((rc = wait_done(p)) != 0)
            break;
        const unsigned long long t2 = now_ns();
        t[i] = (double)(t1 - t0) / 1e3;
        t[n + i] = (double)(t2 - t0) / 1e3;
        if (k->kind == 0 || k->kind == 10) {
            t[2 * n + i] = (double)(p->ts[2] - p->ts[0]) / 1e3;
            t[3 * n + i] = 0.0;
        } else if (k->kind == 13) {
            t[2 * n + i] = (double)(p->ts[3] - p->ts[0]) / 1e3;
            t[3 * n + i] = (double)(p->ts[2] - p->ts[3]) / 1e3;
        } else {
            t[2 * n + i] = (double)(p->ts[1] - p->ts[0]) / 1e3;
            t[3 * n + i] = (double)(p->ts[2] - p->ts[1]) / 1e3;
        }
        if (w != 0) {
            unsigned long long ns = (unsigned long long)w;
            CUdeviceptr ts = p->ts_d;
            void *args[] = {&ns, &ts};
            rc = CK(cuLaunchKernel(p->work, 1, 1, 1, 32, 1, 1, 0, p->st, args, NULL)) ||
                 CK(cuStreamSynchronize(p->st));
        }
        rc = rc || host_path(p, k, &t[4 * n + i], &t[5 * n + i]);
    }
    if (rc == 0) {
        double med[6];
        for (int c = 0; c < 6; c++) {
            qsort(t + (size_t)c * n, (size_t)n, sizeof *t, cmp_double);
            med[c] = t[(size_t)c * n + (size_t)n / 2];
        }
        printf("cdp %-7s after %.0f ms: submit %.2f  rt %.2f  pick->work %.2f  work->signal %.2f"
               "  | host: submit %.2f, +sync %.2f  (us, medians of %d)\n",
               k->name, (double)w / 1e6, med[0], med[1], med[2], med[3], med[4], med[5], n);
    }
    free(t);
    return rc;
}

/* Adds a kernel node of f (grid x threads, args) after dep (NULL: none) to g. */
static int add_kernel(CUgraph g, CUgraphNode *node, const CUgraphNode *dep, CUfunction f,
                      unsigned grid, unsigned threads, void **args) {
    CUDA_KERNEL_NODE_PARAMS kp;
    memset(&kp, 0, sizeof kp);
    kp.func = f;
    kp.gridDimX = grid;
    kp.gridDimY = kp.gridDimZ = 1;
    kp.blockDimX = threads;
    kp.blockDimY = kp.blockDimZ = 1;
    kp.kernelParams = args;
    return CK(cuGraphAddKernelNode(node, g, dep, dep != NULL ? 1 : 0, &kp));
}

/* Instantiates g for launches from the device and uploads it. */
static int device_graph(CUgraph g, CUgraphExec *e, CUstream s) {
    return CK(cuGraphInstantiate(e, g, CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH)) ||
           CK(cuGraphUpload(*e, s));
}

/* Distinct SMs among n ids, and how many of them also appear among m ids of other. */
static void sm_sets(const unsigned *a, unsigned n, const unsigned *b, unsigned m, unsigned *na,
                    unsigned *nb, unsigned *shared) {
    unsigned char in_a[1024] = {0}, in_b[1024] = {0};
    *na = *nb = *shared = 0;
    for (unsigned i = 0; i < n; i++)
        if (a[i] < 1024 && !in_a[a[i]]++)
            ++*na;
    for (unsigned i = 0; i < m; i++)
        if (b[i] < 1024 && !in_b[b[i]]++) {
            ++*nb;
            *shared += in_a[b[i]] != 0;
        }
}

/* The mixed batch's two kinds in two green contexts (SMs split 64 / the rest) inside a graph
 * captured from their streams: is the split kept when the graph is launched from the device?
 * Builds *g (the capture) or reports why not; returns 0 also when green contexts are missing. */
static int green_graph(probe_t *p, CUdevice dev, CUgraph *g, unsigned *grids) {
    CUdevResource all, split[2];
    memset(&all, 0, sizeof all);
    memset(split, 0, sizeof split);
    unsigned groups = 1;
    CUgreenCtx green[2] = {NULL, NULL};
    CUstream s[2] = {NULL, NULL};
    CUevent fork = NULL, join = NULL;
    CUdevResourceDesc desc;
    int rc = CK(cuDeviceGetDevResource(dev, &all, CU_DEV_RESOURCE_TYPE_SM)) ||
             CK(cuDevSmResourceSplitByCount(&split[0], &groups, &all, &split[1], 0, 64));
    for (int k = 0; k < 2 && rc == 0; k++)
        rc = CK(cuDevResourceGenerateDesc(&desc, &split[k], 1)) ||
             CK(cuGreenCtxCreate(&green[k], desc, dev, CU_GREEN_CTX_DEFAULT_STREAM)) ||
             CK(cuGreenCtxStreamCreate(&s[k], green[k], CU_STREAM_NON_BLOCKING, 0));
    if (rc != 0) {
        printf("cdp g-green: no green contexts here\n");
        return 0;
    }
    grids[0] = split[0].sm.smCount * 4;
    grids[1] = split[1].sm.smCount * 4;
    unsigned base0 = 0, base1 = 4096;
    void *a0[] = {&p->smids_d, &base0};
    void *a1[] = {&p->smids_d, &base1};
    void *sig_args[] = {&p->job_d, &p->out_d, &p->ts_d};
    rc = CK(cuEventCreate(&fork, CU_EVENT_DISABLE_TIMING)) ||
         CK(cuEventCreate(&join, CU_EVENT_DISABLE_TIMING)) ||
         CK(cuStreamBeginCapture(s[0], CU_STREAM_CAPTURE_MODE_RELAXED)) ||
         CK(cuEventRecord(fork, s[0])) || CK(cuStreamWaitEvent(s[1], fork, 0)) ||
         CK(cuLaunchKernel(p->gsm, grids[0], 1, 1, 128, 1, 1, 0, s[0], a0, NULL)) ||
         CK(cuLaunchKernel(p->gsm, grids[1], 1, 1, 128, 1, 1, 0, s[1], a1, NULL)) ||
         CK(cuEventRecord(join, s[1])) || CK(cuStreamWaitEvent(s[0], join, 0)) ||
         CK(cuLaunchKernel(p->gsignal, 1, 1, 1, 1, 1, 1, 0, s[0], sig_args, NULL)) ||
         CK(cuStreamEndCapture(s[0], g));
    printf("cdp g-green: SMs split %u / %u, capture %s\n", split[0].sm.smCount, split[1].sm.smCount,
           rc == 0 ? "made" : "failed");
    /* the graph keeps what it needs; the streams and contexts stay for the process */
    return rc;
}

/* Runs the captured green graph n times from the device (kind 14), then once from the host,
 * printing the SMs each kind used. */
static int green_runs(probe_t *p, CUgraphExec e, const unsigned *grids, int from_device) {
    int rc = 0;
    for (int i = from_device ? 0 : 3; i < 4 && rc == 0; i++) {
        memset(p->smids, 0xff, 8192 * sizeof *p->smids);
        const unsigned long long t0 = now_ns();
        if (i < 3) {
            submit(p, 14, 0, 0, 0, 0, 0, 0);
            rc = wait_done(p);
        } else {
            rc = CK(cuGraphLaunch(e, p->st)) || CK(cuStreamSynchronize(p->st));
        }
        const double us = (double)(now_ns() - t0) / 1e3;
        unsigned na, nb, shared;
        sm_sets(p->smids, grids[0], p->smids + 4096, grids[1], &na, &nb, &shared);
        printf("cdp g-green %s: rt %.2f us, wide kind on %u SMs, narrow on %u, %u shared"
               " (launch result %llu)\n",
               i < 3 ? "device launch" : "host launch", us, na, nb, shared,
               i < 3 ? p->ts[7] : 0ull);
    }
    return rc;
}

/* The SM split inside the kernels (jobs 15 and 16), the mixed batch's two kinds without green
 * contexts: the narrow kind's stand-in (gpart: 4 blocks of 128 threads and 16 KiB of shared
 * memory per SM, 100 us; its blocks on SMs below SPLIT leave at once, the last to start
 * excepted) and the wide kind's (gwide: 2 x SPLIT blocks of 384 threads and 200 KiB, 20 us
 * each, so none fits beside the narrow blocks), the wide one after the narrow one through a
 * programmatic edge from its launch-order port (all its blocks have begun; job 15) or with no
 * edge (job 16). Then a signal after both. */
enum { SPLIT = 48, NARROW_SMEM = 16 << 10, WIDE_SMEM = 200 << 10 };

static int split_graph(probe_t *p, CUgraph g, int edge) {
    CUgraphNode n[2], sig;
    unsigned split = SPLIT;
    unsigned long long narrow_ns = 100000, wide_ns = 20000;
    CUdeviceptr smids_b = p->smids_d + 4096 * sizeof *p->smids;
    CUdeviceptr starts_b = p->starts_d + 4096 * sizeof *p->starts;
    void *na[] = {&p->smids_d, &p->starts_d, &split, &narrow_ns, &p->ticket_d};
    void *wa[] = {&smids_b, &starts_b, &wide_ns};
    void *sa[] = {&p->job_d, &p->out_d, &p->ts_d};
    CUDA_KERNEL_NODE_PARAMS kp;
    memset(&kp, 0, sizeof kp);
    kp.gridDimY = kp.gridDimZ = kp.blockDimY = kp.blockDimZ = 1;
    kp.func = p->gpart;
    kp.gridDimX = (unsigned)p->sms * 4;
    kp.blockDimX = 128;
    kp.sharedMemBytes = NARROW_SMEM;
    kp.kernelParams = na;
    int rc = CK(cuGraphAddKernelNode(&n[0], g, NULL, 0, &kp));
    kp.func = p->gwide;
    kp.gridDimX = 2 * SPLIT;
    kp.blockDimX = 384;
    kp.sharedMemBytes = WIDE_SMEM;
    kp.kernelParams = wa;
    rc = rc || CK(cuGraphAddKernelNode(&n[1], g, NULL, 0, &kp));
    if (rc == 0 && edge) {
        CUgraphEdgeData ed;
        memset(&ed, 0, sizeof ed);
        ed.from_port = CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER;
        ed.type = CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC;
        rc = CK(cuGraphAddDependencies(g, &n[0], &n[1], &ed, 1));
    }
    kp.func = p->gsignal;
    kp.gridDimX = kp.blockDimX = 1;
    kp.sharedMemBytes = 0;
    kp.kernelParams = sa;
    return rc || CK(cuGraphAddKernelNode(&sig, g, n, 2, &kp));
}

/* Runs split job `kind` (graph e) three times from the device (where it could be instantiated
 * for that) and once from the host, printing where each kind's blocks ran and when. */
static int split_runs(probe_t *p, CUgraphExec e, unsigned kind, int from_device) {
    const unsigned na = (unsigned)p->sms * 4, nw = 2 * SPLIT;
    int rc = 0;
    for (int i = from_device ? 0 : 3; i < 4 && rc == 0; i++) {
        memset(p->smids, 0xff, 8192 * sizeof *p->smids);
        memset(p->starts, 0, 8192 * sizeof *p->starts);
        const unsigned long long t0 = now_ns();
        if (i < 3) {
            submit(p, kind, 0, 0, 0, 0, 0, 0);
            rc = wait_done(p);
        } else {
            rc = CK(cuGraphLaunch(e, p->st)) || CK(cuStreamSynchronize(p->st));
        }
        const double us = (double)(now_ns() - t0) / 1e3;
        unsigned stayed = 0, stayed_low = 0, wide_high = 0, top = 0;
        unsigned long long a0 = ~0ull, a1 = 0, w0 = ~0ull, w1 = 0;
        for (unsigned j = 0; j < na; j++) {
            stayed += p->smids[j] != ~0u;
            stayed_low += p->smids[j] < SPLIT;
            top = p->smids[j] != ~0u && p->smids[j] > top ? p->smids[j] : top;
            a0 = p->starts[j] < a0 ? p->starts[j] : a0;
            a1 = p->starts[j] > a1 ? p->starts[j] : a1;
        }
        for (unsigned j = 0; j < nw; j++) {
            wide_high += p->smids[4096 + j] >= SPLIT;
            w0 = p->starts[4096 + j] < w0 ? p->starts[4096 + j] : w0;
            w1 = p->starts[4096 + j] > w1 ? p->starts[4096 + j] : w1;
        }
        unsigned sa, sw, shared;
        sm_sets(p->smids, na, p->smids + 4096, nw, &sa, &sw, &shared);
        printf("cdp split %s, %s launch: rt %.2f us; narrow: %u of %u blocks stayed (%u below "
               "SM %u) on %u SMs (ids up to %u), starts over %.2f us; wide: on %u SMs (%u blocks "
               "at or above "
               "SM %u, %u SMs shared), first start %.2f us after the narrow's, last %.2f\n",
               kind == 15 ? "edge" : "no edge", i < 3 ? "device" : "host", us, stayed, na,
               stayed_low, SPLIT, sa, top, (double)(a1 - a0) / 1e3, sw, wide_high, SPLIT, shared,
               ((double)w0 - (double)a0) / 1e3, ((double)w1 - (double)a0) / 1e3);
    }
    return rc;
}

/* The same jobs through device graph launches: the launcher graph (its one kernel takes a job,
 * launches the job's graph fire-and-forget and tail-launches its own graph) and three job graphs:
 * the signal alone, one work block then the signal, the full work grid then the signal. */
static int graph_jobs(probe_t *p, CUdevice dev, const job_kind_t *kinds, size_t n_kinds) {
    enum { N = 8 }; /* jobs 10-16 (graphs 0-6), the launcher's graph */
    CUgraph g[N] = {NULL};
    CUgraphExec e[N] = {NULL};
    CUgraphNode a, b, c, d;
    void *sig_args[] = {&p->job_d, &p->out_d, &p->ts_d};
    void *work_args[] = {&p->job_d, &p->ts_d};
    unsigned long long full_ns = 100000; /* the full job's blocks: no reads of mapped memory */
    void *full_args[] = {&full_ns, &p->ts_d};
    unsigned long long in16 = COPY_IN / 16, out16 = COPY_OUT / 16, kv16 = KV_BYTES / 16;
    unsigned salt = 0;
    void *in_args[] = {&p->host_d, &p->dev_d, &in16};
    void *read_args[] = {&p->kv_d, &kv16, &salt, &p->ts_d};
    void *out_args[] = {&p->out_dev_d, &p->host_d, &out16};
    CUlaunchAttributeValue upd;
    memset(&upd, 0, sizeof upd);
    upd.deviceUpdatableKernelNode.deviceUpdatable = 1;
    int rc = 0;
    for (int i = 0; i < N && rc == 0; i++)
        if (i != 4) /* the green job's graph is a capture */
            rc = CK(cuGraphCreate(&g[i], 0));
    rc = rc || split_graph(p, g[5], 1) || split_graph(p, g[6], 0);
    rc = rc || add_kernel(g[0], &a, NULL, p->gsignal, 1, 1, sig_args) ||
         add_kernel(g[1], &a, NULL, p->gwork, 1, 32, work_args) ||
         add_kernel(g[1], &b, &a, p->gsignal, 1, 1, sig_args) ||
         add_kernel(g[2], &a, NULL, p->work, (unsigned)p->sms * 16, 128, full_args) ||
         add_kernel(g[2], &b, &a, p->gsignal, 1, 1, sig_args) ||
         add_kernel(g[3], &a, NULL, p->gcopy, (unsigned)p->sms * 4, 256, in_args) ||
         add_kernel(g[3], &b, &a, p->gread, (unsigned)p->sms * 8, 256, read_args) ||
         add_kernel(g[3], &c, &b, p->gcopy, (unsigned)p->sms * 4, 256, out_args) ||
         add_kernel(g[3], &d, &c, p->gsignal, 1, 1, sig_args) ||
         CK(cuGraphKernelNodeSetAttribute(b, CU_LAUNCH_ATTRIBUTE_DEVICE_UPDATABLE_KERNEL_NODE,
                                          &upd)) ||
         CK(cuGraphKernelNodeGetAttribute(b, CU_LAUNCH_ATTRIBUTE_DEVICE_UPDATABLE_KERNEL_NODE,
                                          &upd));
    unsigned grids[2] = {0, 0};
    const int green_ok = rc == 0 && green_graph(p, dev, &g[4], grids) == 0 && g[4] != NULL;
    int green_dev = 0; /* the green graph instantiated for launches from the device */
    for (int i = 0; i < 4 && rc == 0; i++)
        rc = device_graph(g[i], &e[i], p->res);
    int split_dev[2] = {0, 0};
    for (int i = 0; i < 2 && rc == 0; i++) {
        const CUresult r =
            cuGraphInstantiate(&e[5 + i], g[5 + i], CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH);
        const char *why = NULL;
        cuGetErrorString(r, &why);
        printf("cdp split %s: instantiated for device launch: %s\n", i == 0 ? "edge" : "no edge",
               r == CUDA_SUCCESS ? "yes"
               : why != NULL     ? why
                                 : "no");
        split_dev[i] = r == CUDA_SUCCESS;
        rc = r == CUDA_SUCCESS ? CK(cuGraphUpload(e[5 + i], p->res))
                               : CK(cuGraphInstantiate(&e[5 + i], g[5 + i], 0));
    }
    if (rc == 0 && green_ok) {
        const CUresult r =
            cuGraphInstantiate(&e[4], g[4], CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH);
        const char *why = NULL;
        cuGetErrorString(r, &why);
        printf("cdp g-green: instantiated for device launch: %s\n", r == CUDA_SUCCESS ? "yes"
                                                                    : why != NULL     ? why
                                                                                      : "no");
        green_dev = r == CUDA_SUCCESS && CK(cuGraphUpload(e[4], p->res)) == 0;
        if (r != CUDA_SUCCESS)
            rc = CK(cuGraphInstantiate(&e[4], g[4], 0));
    }
    CUgraphDeviceNode read_node = upd.deviceUpdatableKernelNode.devNode;
    void *l_args[] = {&p->job_d, &p->ts_d, &e[0], &e[1], &e[2],
                      &e[3],     &e[4],    &e[5], &e[6], &read_node};
    rc = rc || add_kernel(g[N - 1], &a, NULL, p->glauncher, 1, 1, l_args) ||
         device_graph(g[N - 1], &e[N - 1], p->res) || CK(cuStreamSynchronize(p->res));
    if (rc == 0) {
        p->seq = 0;
        atomic_store_explicit(&p->job->seq, 0, memory_order_relaxed);
        atomic_store_explicit(p->out_seq, 0, memory_order_relaxed);
        p->busy_kind = 11;
        if ((rc = CK(cuGraphLaunch(e[N - 1], p->res))) == 0) {
            for (size_t k = 0; k < n_kinds && rc == 0; k++)
                rc = run_kind(p, &kinds[k], 0, 60) || run_kind(p, &kinds[k], 2000000, 30);
            printf("cdp g-call: device-side node updates %.2f us (last job)\n",
                   (double)(p->ts[6] - p->ts[5]) / 1e3);
            if (rc == 0 && green_ok)
                rc = green_runs(p, e[4], grids, green_dev);
            for (int i = 0; i < 2 && rc == 0; i++)
                rc = split_runs(p, e[5 + i], 15 + (unsigned)i, split_dev[i]);
            atomic_store_explicit(&p->job->seq, ~0u, memory_order_release);
            rc = CK(cuStreamSynchronize(p->res)) || rc;
        }
    }
    for (int i = 0; i < N; i++) {
        if (e[i] != NULL)
            rc = CK(cuGraphExecDestroy(e[i])) || rc;
        if (g[i] != NULL)
            rc = CK(cuGraphDestroy(g[i])) || rc;
    }
    return rc;
}

/* Large copies between mapped host memory and the device, launched from the host: the copy
 * engine (cuMemcpy*Async) against the SMs (gcopy: one load in flight per thread; gcopy4: four;
 * grids of 4 and 8 blocks of 256 threads per SM), GB/s, best of 5 (sync included); then gfrag's
 * stores out, both ways at once, ghint's ways in, greread's rereads, and the bulk copy engine
 * (gbulk) by chunk size and blocks per SM. */
static int big_copies(probe_t *p) {
    static const size_t sizes[] = {32u << 20, 256u << 20};
    void *h = NULL;
    CUdeviceptr h_d = 0, d = 0;
    int rc = CK(cuMemHostAlloc(&h, sizes[1], CU_MEMHOSTALLOC_DEVICEMAP)) ||
             CK(cuMemHostGetDevicePointer(&h_d, h, 0)) || CK(cuMemAlloc(&d, sizes[1]));
    if (rc == 0)
        memset(h, 3, sizes[1]);
    for (size_t si = 0; si < 2 && rc == 0; si++) {
        const size_t n = sizes[si];
        for (int dir = 0; dir < 2 && rc == 0; dir++) { /* 0: in, 1: out */
            double best[5] = {1e30, 1e30, 1e30, 1e30, 1e30};
            for (int way = 0; way < 5 && rc == 0; way++)
                for (int rep = 0; rep < 5 && rc == 0; rep++) {
                    CUdeviceptr src = dir == 0 ? h_d : d, dst = dir == 0 ? d : h_d;
                    unsigned long long n16 = n / 16;
                    void *args[] = {&src, &dst, &n16};
                    const unsigned grid = (unsigned)p->sms * (way == 1 || way == 3 ? 4 : 8);
                    const unsigned long long t0 = now_ns();
                    if (way == 0)
                        rc = dir == 0 ? CK(cuMemcpyHtoDAsync(d, h, n, p->st))
                                      : CK(cuMemcpyDtoHAsync(h, d, n, p->st));
                    else
                        rc = CK(cuLaunchKernel(way <= 2 ? p->gcopy : p->gcopy4, grid, 1, 1, 256, 1,
                                               1, 0, p->st, args, NULL));
                    rc = rc || CK(cuStreamSynchronize(p->st));
                    const double us = (double)(now_ns() - t0) / 1e3;
                    best[way] = us < best[way] ? us : best[way];
                }
            if (rc == 0)
                printf("big copy %s %zu MiB (GB/s): copy engine %.1f; SMs x4 %.1f, x8 %.1f; four "
                       "in flight x4 %.1f, x8 %.1f\n",
                       dir == 0 ? "in" : "out", n >> 20, (double)n / best[0] / 1e3,
                       (double)n / best[1] / 1e3, (double)n / best[2] / 1e3,
                       (double)n / best[3] / 1e3, (double)n / best[4] / 1e3);
        }
    }
    /* an attention tile's epilogue writing out straight into mapped host memory (gfrag) */
    double frag = 1e30;
    for (int rep = 0; rep < 5 && rc == 0; rep++) {
        unsigned long long rows = sizes[1] / 256;
        void *args[] = {&h_d, &rows};
        const unsigned long long t0 = now_ns();
        rc = CK(cuLaunchKernel(p->gfrag, (unsigned)p->sms * 4, 1, 1, 256, 1, 1, 0, p->st, args,
                               NULL)) ||
             CK(cuStreamSynchronize(p->st));
        const double us = (double)(now_ns() - t0) / 1e3;
        frag = us < frag ? us : frag;
    }
    if (rc == 0)
        printf("fragment stores out %zu MiB (GB/s): SMs x4 %.1f\n", sizes[1] >> 20,
               (double)sizes[1] / frag / 1e3);
    /* both ways at once, as a kernel reading q and writing out in host memory does: the SMs
     * copying one half of mapped host memory to the other (gcopy, then ghint's way 0), and the
     * copy engines moving one half in while the other goes out (two streams) */
    double duplex[3] = {1e30, 1e30, 1e30};
    CUstream other = NULL;
    rc = rc || CK(cuStreamCreate(&other, CU_STREAM_NON_BLOCKING));
    for (int way = 0; way < 3 && rc == 0; way++)
        for (int rep = 0; rep < 5 && rc == 0; rep++) {
            const size_t half = sizes[1] / 2;
            CUdeviceptr src = h_d, dst = h_d + half;
            unsigned long long n16 = half / 16;
            unsigned hint = 0;
            void *args[] = {&src, &dst, &n16, &hint};
            const unsigned long long t0 = now_ns();
            if (way != 1)
                rc = CK(cuLaunchKernel(way == 0 ? p->gcopy : p->ghint, (unsigned)p->sms * 8, 1, 1,
                                       256, 1, 1, 0, p->st, args, NULL));
            else
                rc = CK(cuMemcpyHtoDAsync(d, h, half, p->st)) ||
                     CK(cuMemcpyDtoHAsync((char *)h + half, d + half, half, other));
            rc = rc || CK(cuStreamSynchronize(p->st)) || CK(cuStreamSynchronize(other));
            const double us = (double)(now_ns() - t0) / 1e3;
            duplex[way] = us < duplex[way] ? us : duplex[way];
        }
    if (other != NULL)
        rc = CK(cuStreamDestroy(other)) || rc;
    if (rc == 0)
        printf("both ways at once, %zu MiB each (GB/s each way): SMs x8 %.1f; copy engines %.1f; "
               "SMs x8 with 256-byte fetches %.1f\n",
               sizes[1] >> 21, (double)sizes[1] / 2 / duplex[0] / 1e3,
               (double)sizes[1] / 2 / duplex[1] / 1e3, (double)sizes[1] / 2 / duplex[2] / 1e3);
    /* copies in with request hints (ghint's ways), 256 MiB, grids of 4 and 8 blocks per SM */
    for (unsigned way = 0; way < 4 && rc == 0; way++) {
        double best[2] = {1e30, 1e30};
        for (int gi = 0; gi < 2 && rc == 0; gi++)
            for (int rep = 0; rep < 5 && rc == 0; rep++) {
                unsigned long long n16 = sizes[1] / 16;
                void *args[] = {&h_d, &d, &n16, &way};
                const unsigned long long t0 = now_ns();
                rc = CK(cuLaunchKernel(p->ghint, (unsigned)p->sms * (gi == 0 ? 4 : 8), 1, 1, 256, 1,
                                       1, 0, p->st, args, NULL)) ||
                     CK(cuStreamSynchronize(p->st));
                const double us = (double)(now_ns() - t0) / 1e3;
                best[gi] = us < best[gi] ? us : best[gi];
            }
        if (rc == 0)
            printf("hinted copy in %zu MiB, way %u (GB/s): x4 %.1f, x8 %.1f\n", sizes[1] >> 20, way,
                   (double)sizes[1] / best[0] / 1e3, (double)sizes[1] / best[1] / 1e3);
    }
    /* the same mapped host bytes read 1 and 8 times by one grid: 8, 32 and 128 MiB */
    static const size_t reread[] = {8u << 20, 32u << 20, 128u << 20};
    for (size_t ri = 0; ri < 3 && rc == 0; ri++) {
        double best[2] = {1e30, 1e30};
        for (int k = 0; k < 2 && rc == 0; k++)
            for (int rep = 0; rep < 5 && rc == 0; rep++) {
                unsigned long long n16 = reread[ri] / 16;
                unsigned reps = k == 0 ? 1 : 8;
                void *args[] = {&h_d, &d, &n16, &reps};
                const unsigned long long t0 = now_ns();
                rc = CK(cuLaunchKernel(p->greread, (unsigned)p->sms * 8, 1, 1, 256, 1, 1, 0, p->st,
                                       args, NULL)) ||
                     CK(cuStreamSynchronize(p->st));
                const double us = (double)(now_ns() - t0) / 1e3;
                best[k] = us < best[k] ? us : best[k];
            }
        if (rc == 0)
            printf("reread host %zu MiB: once %.0f us (%.1f GB/s), 8 times %.0f us (%.1f GB/s "
                   "counted 8 times)\n",
                   reread[ri] >> 20, best[0], (double)reread[ri] / best[0] / 1e3, best[1],
                   8.0 * (double)reread[ri] / best[1] / 1e3);
    }
    /* the bulk copy engine (gbulk): chunk sizes by blocks per SM, each way, 256 MiB */
    static const unsigned chunks[] = {4096, 16384, BULK_MAX_CHUNK};
    static const unsigned per_sm[] = {1, 2}; /* two 48 KiB chunks' buffers: two fit an SM */
    for (int dir = 0; dir < 2 && rc == 0 && p->sms > 0; dir++)
        for (size_t ci = 0; ci < 3 && rc == 0; ci++)
            for (size_t bi = 0; bi < 2 && rc == 0; bi++) {
                CUdeviceptr src = dir == 0 ? h_d : d, dst = dir == 0 ? d : h_d;
                unsigned long long n = sizes[1];
                unsigned ch = chunks[ci];
                void *args[] = {&src, &dst, &n, &ch};
                double best = 1e30;
                for (int rep = 0; rep < 5 && rc == 0; rep++) {
                    const unsigned long long t0 = now_ns();
                    rc = CK(cuLaunchKernel(p->gbulk, (unsigned)p->sms * per_sm[bi], 1, 1, 32, 1, 1,
                                           2 * ch, p->st, args, NULL)) ||
                         CK(cuStreamSynchronize(p->st));
                    const double us = (double)(now_ns() - t0) / 1e3;
                    best = us < best ? us : best;
                }
                if (rc == 0)
                    printf("bulk copy %s %zu MiB, %u-byte chunks, %u blocks/SM (GB/s): %.1f\n",
                           dir == 0 ? "in" : "out", sizes[1] >> 20, ch, per_sm[bi],
                           (double)sizes[1] / best / 1e3);
            }
    if (d != 0)
        rc = CK(cuMemFree(d)) || rc;
    if (h != NULL)
        rc = CK(cuMemFreeHost(h)) || rc;
    return rc;
}

/* The path of libcudadevrt.a in lib/ beside this program's bin/. */
static int default_devrt(char *buf, size_t n) {
    char exe[PATH_MAX];
    const ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0)
        return -1;
    exe[len] = '\0';
    const int w = snprintf(buf, n, "%s/../lib/libcudadevrt.a", dirname(exe));
    return w > 0 && (size_t)w < n ? 0 : -1;
}

int main(int argc, char **argv) {
    char devrt[PATH_MAX];
    if (argc == 2) {
        snprintf(devrt, sizeof devrt, "%s", argv[1]);
    } else if (argc != 1 || default_devrt(devrt, sizeof devrt) != 0) {
        fprintf(stderr, "usage: cdp_probe [path of libcudadevrt.a]\n");
        return 2;
    }
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUlinkState link;
    void *img = NULL, *mbox_h = NULL;
    int major = 0, minor = 0;
    probe_t p;
    memset(&p, 0, sizeof p);
    /* a failed set-up exits: the process's end releases what the driver holds for it */
    if (CK(cuInit(0)) || CK(cuDeviceGet(&dev, 0)) || CK(cuDevicePrimaryCtxRetain(&ctx, dev)) ||
        CK(cuCtxSetCurrent(ctx)) ||
        CK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) ||
        CK(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) ||
        CK(cuDeviceGetAttribute(&p.sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)))
        return 1;
    char arch[16];
    snprintf(arch, sizeof arch, "sm_%d%d", major, minor);
    const unsigned long long b0 = now_ns();
    if (build(arch, devrt, &link, &img) != 0)
        return 1;
    printf("cdp build (NVRTC -rdc, link with %s): %.0f ms\n", devrt, (double)(now_ns() - b0) / 1e6);
    if (CK(cuModuleLoadData(&mod, img)) || CK(cuLinkDestroy(link)) ||
        CK(cuModuleGetFunction(&p.resident, mod, "resident")) ||
        CK(cuModuleGetFunction(&p.work, mod, "work")) ||
        CK(cuModuleGetFunction(&p.copy, mod, "copy")) ||
        CK(cuModuleGetFunction(&p.gsignal, mod, "gsignal")) ||
        CK(cuModuleGetFunction(&p.gwork, mod, "gwork")) ||
        CK(cuModuleGetFunction(&p.glauncher, mod, "glauncher")) ||
        CK(cuModuleGetFunction(&p.gread, mod, "gread")) ||
        CK(cuModuleGetFunction(&p.gcopy, mod, "gcopy")) ||
        CK(cuModuleGetFunction(&p.gsm, mod, "gsm")) ||
        CK(cuModuleGetFunction(&p.gpart, mod, "gpart")) ||
        CK(cuModuleGetFunction(&p.gcopy4, mod, "gcopy4")) ||
        CK(cuModuleGetFunction(&p.gfrag, mod, "gfrag")) ||
        CK(cuModuleGetFunction(&p.gbulk, mod, "gbulk")) ||
        CK(cuModuleGetFunction(&p.ghint, mod, "ghint")) ||
        CK(cuModuleGetFunction(&p.greread, mod, "greread")) ||
        CK(cuFuncSetAttribute(p.gbulk, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                              2 * BULK_MAX_CHUNK)) ||
        CK(cuModuleGetFunction(&p.gwide, mod, "gwide")) ||
        CK(cuFuncSetAttribute(p.gwide, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                              WIDE_SMEM)) ||
        CK(cuStreamCreate(&p.res, CU_STREAM_NON_BLOCKING)) ||
        CK(cuStreamCreate(&p.st, CU_STREAM_NON_BLOCKING)) ||
        CK(cuMemHostAlloc(&mbox_h, 256, CU_MEMHOSTALLOC_DEVICEMAP)) ||
        CK(cuMemHostGetDevicePointer(&p.job_d, mbox_h, 0)) ||
        CK(cuMemHostAlloc(&p.host_h, COPY_IN, CU_MEMHOSTALLOC_DEVICEMAP)) ||
        CK(cuMemHostGetDevicePointer(&p.host_d, p.host_h, 0)) ||
        CK(cuMemHostAlloc((void **)&p.smids, 8192 * sizeof *p.smids, CU_MEMHOSTALLOC_DEVICEMAP)) ||
        CK(cuMemHostGetDevicePointer(&p.smids_d, p.smids, 0)) ||
        CK(cuMemHostAlloc((void **)&p.starts, 8192 * sizeof *p.starts,
                          CU_MEMHOSTALLOC_DEVICEMAP)) ||
        CK(cuMemHostGetDevicePointer(&p.starts_d, p.starts, 0)) || CK(cuMemAlloc(&p.ticket_d, 4)) ||
        CK(cuMemsetD8(p.ticket_d, 0, 4)) || CK(cuMemAlloc(&p.dev_d, COPY_IN)) ||
        CK(cuMemAlloc(&p.out_dev_d, COPY_OUT)) || CK(cuMemAlloc(&p.kv_d, KV_BYTES)) ||
        CK(cuMemsetD8(p.kv_d, 0, KV_BYTES)) || CK(cuMemsetD8(p.out_dev_d, 2, COPY_OUT)))
        return 1;
    memset(mbox_h, 0, 256);
    memset(p.host_h, 1, COPY_IN);
    p.job = (job_t *)mbox_h;
    p.out_seq = (_Atomic unsigned *)((char *)mbox_h + 128);
    p.ts = (volatile unsigned long long *)((char *)mbox_h + 192);
    p.out_d = p.job_d + 128;
    p.ts_d = p.job_d + 192;
    void *args[] = {&p.job_d, &p.out_d, &p.ts_d};
    if (CK(cuLaunchKernel(p.resident, 1, 1, 1, 1, 1, 1, 0, p.res, args, NULL)))
        return 1;
    const unsigned full = (unsigned)p.sms * 16;
    const job_kind_t kinds[] = {
        {"signal", 0, 1, 1, 0, 0, 0},
        {"empty", 1, 1, 32, 0, 0, 0},
        {"full", 1, full, 128, 100000, 0, 0},
        {"copy-in", 2, (unsigned)p.sms * 4, 256, 0, COPY_IN, 0},
        {"copy-out", 2, (unsigned)p.sms * 4, 256, 0, COPY_OUT, 1},
    };
    int rc = 0;
    p.busy_kind = 1;
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0] && rc == 0; k++)
        rc = run_kind(&p, &kinds[k], 0, 60) || run_kind(&p, &kinds[k], 2000000, 30);
    atomic_store_explicit(&p.job->seq, ~0u, memory_order_release);
    rc = CK(cuStreamSynchronize(p.res)) || rc;
    /* the copy engine's time for the same bytes, from the host */
    double c[2][31];
    for (int i = 0; i < 31 && rc == 0; i++) {
        unsigned long long t0 = now_ns();
        rc = CK(cuMemcpyHtoDAsync(p.dev_d, p.host_h, COPY_IN, p.st)) ||
             CK(cuStreamSynchronize(p.st));
        c[0][i] = (double)(now_ns() - t0) / 1e3;
        t0 = now_ns();
        rc = rc || CK(cuMemcpyDtoHAsync(p.host_h, p.dev_d, 2 << 20, p.st)) ||
             CK(cuStreamSynchronize(p.st));
        c[1][i] = (double)(now_ns() - t0) / 1e3;
    }
    if (rc == 0) {
        qsort(c[0], 31, sizeof c[0][0], cmp_double);
        qsort(c[1], 31, sizeof c[1][0], cmp_double);
        printf("copy engine: 3 MiB in %.2f us, 2 MiB out %.2f us (cuMemcpy*Async + sync, "
               "medians of 31)\n",
               c[0][15], c[1][15]);
    }
    const job_kind_t gkinds[] = {
        {"g-signal", 10, 1, 1, 0, 0, 0},
        {"g-empty", 11, 1, 32, 0, 0, 0},
        {"g-full", 12, full, 128, 100000, 0, 0},
        {"g-call", 13, (unsigned)p.sms * 8, 256, 0, 0, 0},
    };
    rc = rc || graph_jobs(&p, dev, gkinds, sizeof gkinds / sizeof gkinds[0]);
    rc = rc || big_copies(&p);
    const int down =
        CK(cuCtxSynchronize()) | CK(cuStreamDestroy(p.st)) | CK(cuStreamDestroy(p.res)) |
        CK(cuMemFree(p.dev_d)) | CK(cuMemFree(p.out_dev_d)) | CK(cuMemFree(p.kv_d)) |
        CK(cuMemFreeHost(p.host_h)) | CK(cuMemFreeHost(p.smids)) | CK(cuMemFreeHost(p.starts)) |
        CK(cuMemFree(p.ticket_d)) | CK(cuMemFreeHost(mbox_h)) | CK(cuModuleUnload(mod)) |
        CK(cuDevicePrimaryCtxRelease(dev));
    return rc != 0 || down != 0 ? 1 : 0;
}

/* The kernels of a device-launched call (attention/att_cudl.h; the records: attention/att_dl.h).
 * Compiled once per device by NVRTC with -rdc=true and linked with the CUDA device runtime
 * (libcudadevrt.a), which provides the device-side graph calls: the one kernel file that calls a
 * runtime API (the device's), and whose image is not cached (it takes 30-250 ms per device, once;
 * the attention kernels' caching is att_jit.h's).
 *
 *   att_k_launcher   one warp, the one node of the session's launcher graph: takes one job,
 *                    applies its node updates, launches the job's graph fire-and-forget and
 *                    tail-launches its own graph, which runs again once the job's graph has
 *                    finished (so the launcher holds no SM while a call runs).
 *   att_k_copy       the call's byte ranges between mapped host memory and device memory, 16
 *                    bytes per thread and step where all three of a range's numbers allow; as
 *                    the job graph's last node (the copy out) its last block reports the job
 *                    done.
 *
 * The host-side protocol is in att_dl.h. Only the launcher reads the job record (mapped host
 * memory, each read a trip over the link), its warp's reads in flight together; the copy kernels
 * get their ranges as parameters. */
#include "att_dl.h"

static __device__ __forceinline__ unsigned long long att_dl_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

static __device__ __forceinline__ unsigned att_dl_load_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* 16 bytes the host wrote before its release store of the job's number, which this thread's
 * warp saw through an acquire load: a strong load (not from a stale L1 line). */
static __device__ __forceinline__ uint4 att_dl_load16(const uint4 *p) {
    uint4 v;
    asm volatile("ld.relaxed.sys.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

static __device__ __forceinline__ void att_dl_store_release(unsigned *p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

#define ATT_DL_JOB_VECS ((sizeof(att_dl_job_t) + 15) / 16)

/* Whether update u equals the one its node last had (the same node, grid and bytes). */
static __device__ bool att_dl_same(const att_dl_update_t *u, const att_dl_update_t *prev) {
    if (u->node != prev->node || u->grid_x != prev->grid_x || u->bytes != prev->bytes)
        return false;
    for (unsigned i = 0; i < (u->bytes + 7) / 8; i++)
        if (u->params[i] != prev->params[i])
            return false;
    return true;
}

/* One warp, the one node of the session's launcher graph. Lane 0 polls; then the warp reads the
 * job record from mapped host memory together (all its lanes' reads in flight at once: one trip
 * over the link, not one per field or per pass) into shared memory, and lane 0 applies the
 * updates from there. */
extern "C" __global__ void att_k_launcher(const att_dl_job_t *job, att_dl_state_t *st,
                                          att_dl_dev_t *dev, unsigned long long idle_ns) {
    __shared__ uint4 sh[ATT_DL_JOB_VECS];
    __shared__ unsigned seq;
    __shared__ bool take; /* lane 0's decision, so no lane reads dev->last while it changes */
    if (threadIdx.x == 0) {
        const unsigned last = dev->last;
        const unsigned long long t0 = att_dl_now();
        unsigned s;
        /* each poll is a read over the link: a short sleep between them keeps a launcher's
         * reads to a few million a second (its answer comes that much later) */
        while ((s = att_dl_load_acquire(&job->seq)) == last) {
            const unsigned long long waited = att_dl_now() - t0;
            if (waited > idle_ns &&
                (waited > ATT_DL_PENDING_NS || att_dl_load_acquire(&job->pending) == last))
                break;
            __nanosleep(100);
        }
        seq = s;
        take = s != last && s != ATT_DL_QUIT;
        if (!take) {
            dev->last = s;
            att_dl_store_release(&st->running, 0); /* idle, or told to quit: end */
        }
    }
    __syncthreads();
    if (!take)
        return;
    /* every lane's loads issued before any is used: one trip over the link, not one a pass */
    constexpr unsigned kPerLane = (ATT_DL_JOB_VECS + 31) / 32;
    uint4 v[kPerLane];
#pragma unroll
    for (unsigned k = 0; k < kPerLane; k++) {
        const unsigned i = threadIdx.x + 32 * k;
        if (i < ATT_DL_JOB_VECS)
            v[k] = att_dl_load16((const uint4 *)job + i);
    }
#pragma unroll
    for (unsigned k = 0; k < kPerLane; k++) {
        const unsigned i = threadIdx.x + 32 * k;
        if (i < ATT_DL_JOB_VECS)
            sh[i] = v[k];
    }
    __syncthreads();
    if (threadIdx.x != 0)
        return;
    const att_dl_job_t *j = (const att_dl_job_t *)sh;
    dev->last = seq;
    dev->cur = seq;
    const unsigned n = j->n_upd < ATT_DL_MAX_UPDATES ? j->n_upd : ATT_DL_MAX_UPDATES;
    cudaError_t err = cudaSuccess;
    for (unsigned i = 0; i < n && err == cudaSuccess; i++) {
        const att_dl_update_t *u = &j->upd[i];
        if (!j->fresh && att_dl_same(u, &dev->prev[i]))
            continue;
        const cudaGraphDeviceNode_t node = (cudaGraphDeviceNode_t)u->node;
        err = cudaGraphKernelNodeSetParam(node, 0, u->params, u->bytes);
        if (err == cudaSuccess)
            err = cudaGraphKernelNodeSetGridDim(node, dim3(u->grid_x));
        if (err == cudaSuccess)
            dev->prev[i] = *u;
        else
            dev->prev[i].node = 0;
    }
    if (err == cudaSuccess)
        err = cudaGraphLaunch((cudaGraphExec_t)j->graph, cudaStreamGraphFireAndForget);
    if (err != cudaSuccess) {
        /* the host sees the job done with the error beside it */
        st->launch_err = (unsigned)err;
        st->failed = seq;
        __threadfence_system();
        att_dl_store_release(&st->done, seq);
    }
    /* the next job's run; without it there is no launcher: say so, and the host launches one */
    if (cudaGraphLaunch(cudaGetCurrentGraphExec(), cudaStreamGraphTailLaunch) != cudaSuccess)
        att_dl_store_release(&st->running, 0);
}

extern "C" __global__ void att_k_copy(att_dl_copy_t c) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long first = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (unsigned s = 0; s < c.n && s < ATT_DL_MAX_SEGS; s++) {
        if (((c.src_d[s] | c.dst_d[s] | c.bytes[s]) & 15) == 0) {
            const uint4 *src = (const uint4 *)c.src_d[s];
            uint4 *dst = (uint4 *)c.dst_d[s];
            for (unsigned long long i = first; i < c.bytes[s] / 16; i += stride)
                dst[i] = src[i];
        } else {
            const unsigned char *src = (const unsigned char *)c.src_d[s];
            unsigned char *dst = (unsigned char *)c.dst_d[s];
            for (unsigned long long i = first; i < c.bytes[s]; i += stride)
                dst[i] = src[i];
        }
    }
    if (c.state_d == 0)
        return;
    /* the last block to finish reports the job done, after every block's writes (and the
     * attention kernels' before this grid's, by the job graph's full edges) */
    __syncthreads();
    if (threadIdx.x != 0)
        return;
    att_dl_dev_t *dev = (att_dl_dev_t *)c.dev_d;
    __threadfence_system();
    if (atomicAdd(&dev->arrived, 1u) != gridDim.x - 1)
        return;
    dev->arrived = 0;
    __threadfence_system();
    att_dl_store_release(&((att_dl_state_t *)c.state_d)->done, dev->cur);
}

/* The records of a device-launched call (attention/att_cudl.h): what the host writes into mapped
 * host memory for a session's resident launcher kernel (attention/kernels/att_launch.cu), and
 * what the device writes back.
 *
 * Plain C that the host's C11 compiler and NVRTC both accept (as att_kparams.h): fixed-width
 * fields, device addresses as uint64_t, explicit padding, sizes checked below.
 *
 * Protocol: the host fills job.upd[0, n_upd), job.graph, job.fresh and job.pending (the new
 * number), then stores job.seq (that number) with release, or has a stream store it behind the
 * job's engine copies (attention/att_cudl.h). The launcher, which polls job.seq with acquire loads,
 * applies each update to its device-updatable graph node (the kernel's whole parameter block and
 * its grid; an update equal to the one the node last had is skipped unless job.fresh), launches
 * job.graph and, once that graph has finished (the last block of its last node stores seq into
 * state.done with release), takes the next job. After idle_ns without a job (up to
 * ATT_DL_PENDING_NS while job.pending names a job not yet taken: its number is on its way behind
 * the copies), or when it cannot launch itself again, it stores 0 into state.running and ends; the
 * host, seeing running 0 (or the launcher's stream empty) before the job is done, launches it
 * again. ATT_DL_QUIT ends it for good.
 *
 * The fields both sides race on (seq, pending, done, running) are C11 atomics on the host, where
 * the C compiler reads this; the same 32 bits on the device. */
#ifndef AT_ATTENTION_ATT_DL_H
#define AT_ATTENTION_ATT_DL_H

#include "att_kparams.h"

#if defined(__CUDACC_RTC__) || defined(__cplusplus)
#define ATT_DL_ATOMIC_U32 uint32_t
#else
#include <stdatomic.h>
#define ATT_DL_ATOMIC_U32 _Atomic uint32_t
#endif

#define ATT_DL_QUIT 0xffffffffu
#define ATT_DL_MAX_SEGS 9u      /* copy segments per copy node */
#define ATT_DL_MAX_UPDATES 4u   /* the copy-in node, one or two launches, the copy-out node */
#define ATT_DL_PARAM_BYTES 256u /* at least LC_MAX_PARAM_BYTES */
/* How long a launcher waits for a pending job's number (ns): far past the copy engine's time for
 * the calls a server takes (a 256 MiB message: 5 ms on the H200's link); past it the waiting
 * host launches the launcher again. A failed submission's number never comes, and then the
 * session's teardown ends the launcher at once. */
#define ATT_DL_PENDING_NS 200000000ull

/* The parameter block of att_k_copy: n byte ranges from src_d to dst_d (device addresses;
 * mapped host memory counts). With dev_d and state_d set (the copy out, the job graph's last
 * node), the last of its blocks to finish reports the job done. */
typedef struct att_dl_copy {
    uint64_t src_d[ATT_DL_MAX_SEGS]; /* [bytes[i]] bytes each */
    uint64_t dst_d[ATT_DL_MAX_SEGS]; /* [bytes[i]] bytes each */
    uint64_t bytes[ATT_DL_MAX_SEGS];
    uint64_t dev_d;   /* the session's att_dl_dev_t, or 0 */
    uint64_t state_d; /* the session's att_dl_state_t (mapped host memory), or 0 */
    uint32_t n;
    uint32_t reserved;
} att_dl_copy_t;

/* One node update: the node's new parameter block (its first `bytes` bytes) and grid. */
typedef struct att_dl_update {
    uint64_t node; /* cudaGraphDeviceNode_t */
    uint32_t grid_x;
    uint32_t bytes;
    uint64_t params[ATT_DL_PARAM_BYTES / 8];
} att_dl_update_t;

/* Written by the host. */
typedef struct att_dl_job {
    ATT_DL_ATOMIC_U32 seq; /* stored last, with release */
    uint32_t n_upd;
    uint64_t graph; /* cudaGraphExec_t: the call's graph */
    uint32_t fresh; /* 1: the graph is new, apply every update (its nodes may reuse old handles) */
    ATT_DL_ATOMIC_U32 pending; /* the job's number, stored before it (read once idle_ns passed) */
    att_dl_update_t upd[ATT_DL_MAX_UPDATES];
} att_dl_job_t;

/* The session's device memory, kept across the launcher's runs. */
typedef struct att_dl_dev {
    uint32_t last;    /* the last job taken */
    uint32_t cur;     /* the job running, reported done by the copy out */
    uint32_t arrived; /* the copy out's finished blocks; back to 0 by the last */
    uint32_t reserved;
    att_dl_update_t prev[ATT_DL_MAX_UPDATES]; /* the updates last applied, to skip repeats */
} att_dl_dev_t;

/* Written by the device. */
typedef struct att_dl_state {
    ATT_DL_ATOMIC_U32 done;    /* seq of the last finished job */
    ATT_DL_ATOMIC_U32 running; /* 0 once the launcher has ended; the host sets it to 1 */
    uint32_t launch_err; /* a cudaError_t from launching job `failed`; 0 when none */
    uint32_t failed;
} att_dl_state_t;

ATT_KSTATIC_ASSERT(sizeof(att_dl_copy_t) == 240, "att_dl_copy_t layout");
ATT_KSTATIC_ASSERT(sizeof(att_dl_update_t) == 272, "att_dl_update_t layout");
ATT_KSTATIC_ASSERT(sizeof(att_dl_job_t) == 24 + ATT_DL_MAX_UPDATES * 272, "att_dl_job_t layout");
ATT_KSTATIC_ASSERT(sizeof(att_dl_copy_t) <= ATT_DL_PARAM_BYTES, "copy params fit an update");

#endif

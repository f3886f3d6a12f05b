/* Device-launched calls of the CUDA backend: a call whose host part ends in a few stores to mapped
 * memory instead of copy calls and a cuLaunchKernel.
 *
 * Why: on the machines measured, one cuLaunchKernel costs the host 3-5 us back to back and up to
 * 28 us after the host waited for the GPU, and a call's two upload calls as much again, whatever
 * attnd does around them (docs/BENCHMARKS.md, "Targets"). A store to mapped memory costs 0.03 us.
 *
 * How: each session has a launcher graph whose one kernel (one warp, attention/kernels/
 * att_launch.cu) polls the session's job record in mapped host memory, and one job graph per
 * prepared launch of its launch cache (cache/lc.h), or pair of them: copy in -> the attention
 * launch(es) -> copy out, whose last block reports the job done. The copies run on SMs from mapped
 * host memory (the stage, the registered arena), a little slower than the copy engine (on the
 * H200 50 GB/s in and 52 out against its 54-55, whatever the grid or loads in flight:
 * docs/BENCHMARKS.md). Where the kernels read q and write out in host memory themselves
 * (att_cuda.c, direct I/O), the copies carry only the metadata, k and v, and the copy out none:
 * its one block only reports. A call writes the kernels' parameter blocks (three or four) and grids
 * into the job record and its number last; the launcher applies them to the job graph's
 * device-updatable nodes, launches that graph and comes back when it has finished; the host spins
 * on the done word. After an idle spell (ATT_CUDL_IDLE_NS) the launcher ends, holding no SM slot;
 * the next call launches it again from the host first.
 *
 * A call whose copies are too large for the SMs to do well (over ATT_CUDL_MAX_COPY_BYTES with
 * its inputs: a large prefill's k and v) has its inputs carried by the copy engine instead
 * ("engine copies"): the host queues them on the session's engine stream, followed by a stream
 * write of the job's number, so the launcher sees the job only once its inputs are on the
 * device (and waits for it past its idle spell: att_dl.h, pending). The host then makes copy
 * calls but no launch (unless the launcher had ended), and the call takes as long as one
 * launched from the host.
 *
 * Which calls: those of one launch (decode or prefill alone, or an append), and mixed batches
 * that the plan splits between the SMs, without timing events, whose SMs copy at most
 * ATT_CUDL_MAX_COPY_BYTES (the metadata, the outputs and any inputs not left to the engine), in at
 * most ATT_DL_MAX_SEGS ranges each way (the caller, att_cuda.c, decides). From the host such a
 * batch runs its two kinds in two green contexts, whose streams' graphs cannot be made launchable
 * from the device (CUDA_ERROR_INVALID_VALUE on the H200, docs/BENCHMARKS.md). From the device, its
 * narrow kind runs first as a persistent grid whose blocks leave the wide kind's SMs
 * (att_kparams_t.sm_split), and its wide kind's grid starts once every narrow block has begun (a
 * programmatic edge), so it finds those SMs free. Mixed batches on shared SMs launch from the host.
 * Where a graph of two launches cannot be made (an older driver), the session's mixed batches
 * launch from the host (att_cudl_pairs).
 *
 * Needs: a driver of CUDA 12.4+ (has_dl), the device runtime library libcudadevrt.a (the
 * toolkit's; $ATTND_CUDADEVRT names it, else the toolkit seen at build time), and registered
 * memory usable at its host address (CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM).
 * Without them att_cudl_create says why and every call launches from the host.
 *
 * Thread: an att_cudl_t is shared by the backend's sessions (read-only after creation); a
 * session's att_cudl_sess_t is used by the thread running that session's call. */
#ifndef AT_ATTENTION_ATT_CUDL_H
#define AT_ATTENTION_ATT_CUDL_H

#include <stdbool.h>
#include <stdint.h>

#include "attention/att_cudrv.h"
#include "attention/att_dl.h"
#include "cache/lc.h"
#include "common/at_err.h"

/* How long an idle launcher polls before it ends (ns): longer than the gap between a model's
 * layers, shorter than a human notices a spinning thread. */
#define ATT_CUDL_IDLE_NS 2000000ull

/* The most bytes (in and out) a device-launched call's SMs copy; larger inputs go by the copy
 * engine (engine copies), larger outputs make the call launch from the host. The SMs copy between
 * mapped host memory and the device 5-8% slower than the copy engine (docs/BENCHMARKS.md): a few
 * us on a decode call's few MiB, less than the engine's copy calls cost the host; a hundred on a
 * large prefill's k and v, 2-3% of its call. */
#define ATT_CUDL_MAX_COPY_BYTES (32ull << 20)

/* The backend's check of a driver result (its one CUresult -> at_err_t mapping, which also
 * marks the device lost after a sticky fault). */
typedef at_err_t (*att_cudl_check_fn)(void *user, CUresult r, const char *call, const char *file,
                                      int line);

typedef struct att_cudl att_cudl_t;
typedef struct att_cudl_sess att_cudl_sess_t;

/* Compiles the launcher module for arch with NVRTC (-rdc=true), links it with the device runtime
 * and loads it into the current context (the device's primary one, which the caller keeps
 * current). AT_ERR_UNSUPPORTED with diag saying what is missing (driver, library, attribute,
 * compile or link); AT_ERR_DEVICE from check. drv is borrowed (process-wide); user is passed to
 * check. On success *out is the caller's (att_cudl_destroy, after every session's). */
at_err_t att_cudl_create(const att_cudrv_t *drv, CUdevice dev, const char *arch, uint32_t num_sms,
                         att_cudl_check_fn check, void *user, at_diag_t *diag, att_cudl_t **out);
/* The idle spell of the launchers of sessions created from now on (ns; 0: ATT_CUDL_IDLE_NS).
 * Tests shorten it. Not while sessions are being created. */
void att_cudl_set_idle_ns(att_cudl_t *dl, uint64_t idle_ns);
/* lost: the device faulted; its context took the module, so only the host memory goes. */
void att_cudl_destroy(att_cudl_t **dl, bool lost);

/* A session's launcher, job record and streams; *out is the caller's (att_cudl_sess_destroy). */
at_err_t att_cudl_sess_create(att_cudl_t *dl, att_cudl_sess_t **out);
/* Ends the launcher, waits for its streams and frees the session's graphs and memory; with lost
 * (a faulted device, whose context takes its objects along) only the struct, asking nothing of
 * the driver. */
void att_cudl_sess_destroy(att_cudl_sess_t **s, bool lost);
/* Ends the launcher (if running) and waits for its streams: nothing of the session runs on the
 * device afterwards, and a cuMemFree need not wait for its polling (the driver's frees wait for
 * the device's work, a polling launcher included, up to its idle spell). The next call launches
 * it again. */
void att_cudl_sess_quiesce(att_cudl_sess_t *s);
/* Drops the job graphs (ending the launcher first, since a graph's last blocks may still run
 * after its job is reported done): the session's modules, so its launch cache's functions,
 * changed. */
void att_cudl_sess_forget(att_cudl_sess_t *s);

/* A call: begin, then the copies (att_cudl_range_add to att_cudl_copies: dst, src device
 * addresses, mapped host memory included), then one or two launches (att_cudl_launch: the
 * attention launch l with grid_x blocks and params, l->param_bytes of them; of two, the first is
 * a persistent grid the second starts beside), then submit (the job), then wait. */
void att_cudl_begin(att_cudl_sess_t *s);
/* Which of a call's copies: the SMs' in (the job graph's first node) and out (its last), or the
 * copy engine's, host to device before the job starts (ATT_CUDL_WAY_ENGINE: the host's sources must
 * be pinned or registered memory, which the device addresses at their host address or the
 * mapped one). */
typedef enum att_cudl_way { ATT_CUDL_WAY_IN, ATT_CUDL_WAY_OUT, ATT_CUDL_WAY_ENGINE } att_cudl_way_t;
/* This call's ranges of one way; borrowed until the session goes. */
att_dl_copy_t *att_cudl_copies(att_cudl_sess_t *s, att_cudl_way_t way);
/* Records a launch (l is borrowed from the session's launch cache until the call's wait);
 * AT_ERR_INTERNAL for a third. */
at_err_t att_cudl_launch(att_cudl_sess_t *s, const lc_launch_t *l, uint32_t grid_x,
                         const void *params);
/* Submits the recorded launches as a job, making their job graph on their first call: with
 * engine copies, queues them and the stream write of the job's number (one copy call a range);
 * without, stores the number itself. AT_ERR_UNSUPPORTED, nothing submitted, when the driver
 * refuses a graph of two launches (its programmatic edge or its instantiation for the device: an
 * invalid value or not supported; logged): the caller runs the call from the host, and
 * att_cudl_pairs is false from then on. Other failures through check (AT_ERR_DEVICE); the job
 * does not run, and any engine copy queued has finished. After such a failure, or one of
 * att_cudl_wait, the caller may only destroy the session: a job's number may still sit in the
 * record, where a new launcher would take it with the next job's fields. */
at_err_t att_cudl_submit(att_cudl_sess_t *s);
/* Whether a call of two launches may come from the device. */
bool att_cudl_pairs(const att_cudl_sess_t *s);
/* How many times the host has launched the session's launcher, failed attempts included. */
uint64_t att_cudl_starts(const att_cudl_sess_t *s);
/* Spins until the job is done. AT_ERR_DEVICE (through check) when the context faults (the
 * device is then lost), or when the job's graph or the launcher could not be launched (then the
 * job did not run, or ran unseen: a call writes only what running it again from the host
 * writes, so the caller may do that; any engine copy queued has finished). */
at_err_t att_cudl_wait(att_cudl_sess_t *s);

/* Threads per block of the copy kernels. */
#define ATT_CUDL_COPY_THREADS 256u

/* Adds the range [src, src + bytes) -> [dst, ...) to c: into its last range when adjacent to it
 * on both sides, else as a new one. False, c unchanged, when that needs a range past
 * ATT_DL_MAX_SEGS. Nothing for 0 bytes. Pure (tests use it without a GPU). */
bool att_cudl_range_add(att_dl_copy_t *c, uint64_t dst, uint64_t src, uint64_t bytes);

/* Blocks of ATT_CUDL_COPY_THREADS for c's ranges: one per 16 bytes per thread, at least 1, at
 * most 4 per SM. Pure. */
uint32_t att_cudl_copy_grid(const att_dl_copy_t *c, uint32_t num_sms);

/* NVRTC's PTX of the launcher module (attention/kernels/att_launch.cu, embedded) for arch, with
 * -rdc=true: *ptx malloc'd, the caller's. Needs no GPU (tests compile it in CI). */
at_err_t att_cudl_compile_ptx(const char *arch, char **ptx, size_t *n, at_diag_t *diag);

/* Where the device runtime library is looked for: $ATTND_CUDADEVRT, else the toolkit's lib64
 * seen at build time. */
const char *att_cudl_devrt_path(void);

#endif

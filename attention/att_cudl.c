/* Device-launched calls of the CUDA backend (see att_cudl.h). */
#include "attention/att_cudl.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attention/att_jit.h"
#include "common/at_log.h"

/* Generated at build time from attention/kernels/ (see attention/CMakeLists.txt). */
extern const unsigned char att_kernel_launch_cu[];
extern const unsigned char att_kernel_dl_h[];
extern const unsigned char att_kernel_kparams_h[];

#define MAX_GRAPHS LC_MAX_ENTRIES

struct att_cudl {
    const att_cudrv_t *drv; /* borrowed: process-wide */
    att_cudl_check_fn check;
    void *user;
    int ordinal; /* the device's, for the log */
    uint32_t num_sms;
    uint64_t idle_ns; /* the launchers' idle spell */
    CUmodule mod;
    CUfunction launcher; /* att_k_launcher */
    CUfunction copy;     /* att_k_copy */
};

/* The job graph of one prepared launch, or of two (a mixed batch's kinds): copy in -> the
 * launch(es) -> copy out (which reports the job done). Of two, the second starts once every
 * block of the first has begun (a programmatic edge from its launch-order port), so the first,
 * a persistent grid, holds its SMs before the second's blocks look for some (att_unified.cu,
 * take_unit). */
typedef struct job_graph {
    const lc_launch_t *l[2]; /* borrowed from the session's launch cache; with fn, the key */
    void *fn[2];
    uint32_t n_launch; /* 1 or 2 */
    CUgraph g;
    CUgraphExec exec;
    CUgraphDeviceNode node[ATT_DL_MAX_UPDATES]; /* copy in, the launch(es), copy out */
} job_graph_t;

struct att_cudl_sess {
    att_cudl_t *dl;  /* borrowed: outlives its sessions */
    CUstream stream; /* the launcher's */
    /* where graphs are uploaded: not behind the launcher, which may be polling on `stream` */
    CUstream upload;
    CUstream engine; /* the engine copies, then the stream write of their job's number */
    void *host; /* mapped: the job record, then the state */
    att_dl_job_t *job;
    att_dl_state_t *st;
    CUdeviceptr job_d; /* job's device address */
    CUdeviceptr st_d;  /* st's device address */
    CUdeviceptr dev_d; /* the session's att_dl_dev_t (device memory) */
    CUgraph lgraph;
    CUgraphExec lexec;
    job_graph_t graphs[MAX_GRAPHS];
    uint32_t num_graphs;
    bool no_pairs;           /* a graph of two launches could not be made: calls of one only */
    att_dl_copy_t copies[3]; /* this call's, by att_cudl_way_t */
    const lc_launch_t *pending[2]; /* this call's launches (att_cudl_launch), in order */
    uint32_t num_pending;
    uint32_t seq;
    uint64_t starts; /* host launches of the launcher */
};

#define CK(dl, call) (dl)->check((dl)->user, (dl)->drv->call, #call, __FILE__, __LINE__)

_Static_assert(ATT_DL_PARAM_BYTES >= LC_MAX_PARAM_BYTES, "a launch's params fit an update");

const char *att_cudl_devrt_path(void) {
    const char *p = getenv("ATTND_CUDADEVRT");
    if (p != NULL && p[0] != '\0')
        return p;
#ifdef ATT_CUDA_LIBDIR
    return ATT_CUDA_LIBDIR "/libcudadevrt.a";
#else
    return "libcudadevrt.a";
#endif
}

at_err_t att_cudl_compile_ptx(const char *arch, char **ptx, size_t *n, at_diag_t *diag) {
    const att_nvrtc_t *nv;
    at_err_t e = att_cudrv_nvrtc(&nv, diag);
    if (e != AT_OK)
        return e;
    const char *headers[] = {(const char *)att_kernel_dl_h, (const char *)att_kernel_kparams_h};
    const char *names[] = {"att_dl.h", "att_kparams.h"};
    nvrtcProgram prog;
    nvrtcResult r = nv->nvrtcCreateProgram(&prog, (const char *)att_kernel_launch_cu,
                                           "att_launch.cu", 2, headers, names);
    if (r != NVRTC_SUCCESS)
        return at_diag_set(diag, AT_ERR_INTERNAL, "nvrtcCreateProgram: %s",
                           nv->nvrtcGetErrorString(r));
    char arch_opt[48];
    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=%s", arch);
    const char *opts[] = {arch_opt, "--relocatable-device-code=true", "--std=c++17"};
    r = nv->nvrtcCompileProgram(prog, 3, opts);
    if (r != NVRTC_SUCCESS)
        e = att_jit_nvrtc_failed(nv, prog, r, arch, diag);
    else if (nv->nvrtcGetPTXSize(prog, n) != NVRTC_SUCCESS || *n == 0 ||
             (*ptx = malloc(*n)) == NULL) {
        e = at_diag_set(diag, AT_ERR_NOMEM, "no PTX from NVRTC for the launcher");
    } else if (nv->nvrtcGetPTX(prog, *ptx) != NVRTC_SUCCESS) {
        free(*ptx);
        *ptx = NULL;
        e = at_diag_set(diag, AT_ERR_INTERNAL, "nvrtcGetPTX failed");
    }
    nv->nvrtcDestroyProgram(&prog);
    return e;
}

/* Links ptx with the device runtime and loads the result into the current context. */
static at_err_t link_load(att_cudl_t *dl, const char *ptx, size_t n, at_diag_t *diag) {
    const att_cudrv_t *drv = dl->drv;
    const char *devrt = att_cudl_devrt_path();
    if (access(devrt, R_OK) != 0)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED,
                           "no device runtime library at %s (set ATTND_CUDADEVRT)", devrt);
    char log[2048] = "";
    CUjit_option o[] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void *ov[] = {log, (void *)(uintptr_t)sizeof log};
    CUlinkState link;
    if (drv->cuLinkCreate(2, o, ov, &link) != CUDA_SUCCESS)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED, "cuLinkCreate failed");
    void *img = NULL;
    size_t img_n = 0;
    const CUresult r1 =
        drv->cuLinkAddData(link, CU_JIT_INPUT_PTX, (void *)ptx, n, "att_launch.ptx", 0, NULL, NULL);
    const CUresult r2 = r1 != CUDA_SUCCESS
                            ? r1
                            : drv->cuLinkAddFile(link, CU_JIT_INPUT_LIBRARY, devrt, 0, NULL, NULL);
    const CUresult r3 = r2 != CUDA_SUCCESS ? r2 : drv->cuLinkComplete(link, &img, &img_n);
    at_err_t e = AT_OK;
    if (r3 != CUDA_SUCCESS)
        e = at_diag_set(diag, AT_ERR_UNSUPPORTED, "linking the launcher with %s failed: %s (%s)",
                        devrt, att_cudrv_err_name(drv, r3), log[0] != '\0' ? log : "no log");
    else
        e = CK(dl, cuModuleLoadData(&dl->mod, img));
    (void)drv->cuLinkDestroy(link);
    return e;
}

at_err_t att_cudl_create(const att_cudrv_t *drv, CUdevice dev, const char *arch, uint32_t num_sms,
                         att_cudl_check_fn check, void *user, at_diag_t *diag, att_cudl_t **out) {
    if (!drv->has_dl)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED,
                           "the driver lacks device-updatable graphs (CUDA 12.4 or newer)");
    int host_ptr = 0;
    if (drv->cuDeviceGetAttribute(&host_ptr,
                                  CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
                                  dev) != CUDA_SUCCESS ||
        !host_ptr)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED,
                           "the device cannot use registered memory at its host address");
    att_cudl_t *dl = calloc(1, sizeof *dl);
    if (dl == NULL)
        return AT_ERR_NOMEM;
    *dl = (att_cudl_t){.drv = drv,
                       .check = check,
                       .user = user,
                       .ordinal = (int)dev,
                       .num_sms = num_sms,
                       .idle_ns = ATT_CUDL_IDLE_NS};
    char *ptx = NULL;
    size_t n = 0;
    at_err_t e = att_cudl_compile_ptx(arch, &ptx, &n, diag);
    if (e == AT_OK)
        e = link_load(dl, ptx, n, diag);
    free(ptx);
    if (e == AT_OK &&
        ((e = CK(dl, cuModuleGetFunction(&dl->launcher, dl->mod, "att_k_launcher"))) != AT_OK ||
         (e = CK(dl, cuModuleGetFunction(&dl->copy, dl->mod, "att_k_copy"))) != AT_OK))
        at_diag_set(diag, e, "the launcher module lacks its kernels");
    if (e != AT_OK) {
        if (diag != NULL && diag->msg[0] == '\0') /* a driver call failed: CK logged it */
            at_diag_set(diag, e, "a driver call failed loading the launcher (see the log)");
        att_cudl_destroy(&dl, false);
        return e;
    }
    *out = dl;
    return AT_OK;
}

void att_cudl_set_idle_ns(att_cudl_t *dl, uint64_t idle_ns) {
    dl->idle_ns = idle_ns != 0 ? idle_ns : ATT_CUDL_IDLE_NS;
}

void att_cudl_destroy(att_cudl_t **dlp, bool lost) {
    att_cudl_t *dl = *dlp;
    if (dl == NULL)
        return;
    if (dl->mod != NULL && !lost)
        (void)CK(dl, cuModuleUnload(dl->mod));
    free(dl);
    *dlp = NULL;
}

/* ---- graphs ---- */

/* Adds a kernel node of f (grid x threads, smem bytes, args) after the n_dep nodes of dep to
 * g. */
static at_err_t add_node(att_cudl_t *dl, CUgraph g, CUgraphNode *node, const CUgraphNode *dep,
                         size_t n_dep, CUfunction f, uint32_t threads, uint32_t smem, void **args) {
    CUDA_KERNEL_NODE_PARAMS kp;
    memset(&kp, 0, sizeof kp);
    kp.func = f;
    kp.gridDimX = kp.gridDimY = kp.gridDimZ = 1;
    kp.blockDimX = threads;
    kp.blockDimY = kp.blockDimZ = 1;
    kp.sharedMemBytes = smem;
    kp.kernelParams = args;
    return CK(dl, cuGraphAddKernelNode(node, g, dep, n_dep, &kp));
}

/* Makes node device-updatable and returns its device handle. */
static at_err_t updatable(att_cudl_t *dl, CUgraphNode node, CUgraphDeviceNode *out) {
    CUlaunchAttributeValue v;
    memset(&v, 0, sizeof v);
    v.deviceUpdatableKernelNode.deviceUpdatable = 1;
    at_err_t e = CK(dl, cuGraphKernelNodeSetAttribute(
                            node, CU_LAUNCH_ATTRIBUTE_DEVICE_UPDATABLE_KERNEL_NODE, &v));
    if (e == AT_OK)
        e = CK(dl, cuGraphKernelNodeGetAttribute(
                       node, CU_LAUNCH_ATTRIBUTE_DEVICE_UPDATABLE_KERNEL_NODE, &v));
    *out = v.deviceUpdatableKernelNode.devNode;
    return e;
}

static void graph_free(att_cudl_t *dl, CUgraph *g, CUgraphExec *exec) {
    if (*exec != NULL)
        (void)CK(dl, cuGraphExecDestroy(*exec));
    if (*g != NULL)
        (void)CK(dl, cuGraphDestroy(*g));
    *exec = NULL;
    *g = NULL;
}

/* The result r of a step that only a graph of two launches takes (its programmatic edge, its
 * instantiation), made by call at file:line: a driver that refuses it (an invalid value, not
 * supported) gives AT_ERR_UNSUPPORTED, logged here; any other goes through check. */
static at_err_t pair_step(att_cudl_t *dl, CUresult r, const char *call, const char *file,
                          int line) {
    if (r != CUDA_ERROR_INVALID_VALUE && r != CUDA_ERROR_NOT_SUPPORTED)
        return dl->check(dl->user, r, call, file, line);
    at_log(AT_LOG_WARN, "cuda",
           "cuda:%d: %s: %s: a graph of a mixed batch's two launches cannot be launched from "
           "the device; the session's mixed batches launch from the host",
           dl->ordinal, call, att_cudrv_err_name(dl->drv, r));
    return AT_ERR_UNSUPPORTED;
}

/* Instantiates g (pair: a graph of two launches) for launches from the device and uploads it:
 * done before the host returns, so the launcher never launches a graph whose upload is still
 * queued. */
static at_err_t instantiate(att_cudl_sess_t *s, CUgraph g, bool pair, CUgraphExec *exec) {
    const CUresult r =
        s->dl->drv->cuGraphInstantiateWithFlags(exec, g, CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH);
    at_err_t e =
        pair ? pair_step(s->dl, r, "cuGraphInstantiateWithFlags", __FILE__, __LINE__)
             : s->dl->check(s->dl->user, r, "cuGraphInstantiateWithFlags", __FILE__, __LINE__);
    if (e == AT_OK)
        e = CK(s->dl, cuGraphUpload(*exec, s->upload));
    if (e == AT_OK)
        e = CK(s->dl, cuStreamSynchronize(s->upload));
    return e;
}

/* Whether j is the graph of the n launches l. */
static bool graph_is(const job_graph_t *j, const lc_launch_t *const *l, uint32_t n) {
    if (j->n_launch != n)
        return false;
    for (uint32_t i = 0; i < n; i++)
        if (j->l[i] != l[i] || j->fn[i] != l[i]->fn)
            return false;
    return true;
}

/* The job graph of the n launches l (1 or 2), built on their first call. */
static at_err_t job_graph(att_cudl_sess_t *s, const lc_launch_t *const *l, uint32_t n,
                          job_graph_t **out) {
    att_cudl_t *dl = s->dl;
    for (uint32_t i = 0; i < s->num_graphs; i++)
        if (graph_is(&s->graphs[i], l, n)) {
            *out = &s->graphs[i];
            return AT_OK;
        }
    if (s->num_graphs == MAX_GRAPHS)
        att_cudl_sess_forget(s);
    job_graph_t *j = &s->graphs[s->num_graphs];
    memset(j, 0, sizeof *j);
    att_dl_copy_t none;
    memset(&none, 0, sizeof none);
    alignas(16) uint8_t params[2][LC_MAX_PARAM_BYTES];
    void *copy_args[] = {&none};
    void *launch_args[2][1] = {{params[0]}, {params[1]}};
    CUgraphNode in, k[2], outn;
    at_err_t e = CK(dl, cuGraphCreate(&j->g, 0));
    if (e == AT_OK)
        e = add_node(dl, j->g, &in, NULL, 0, dl->copy, ATT_CUDL_COPY_THREADS, 0, copy_args);
    for (uint32_t i = 0; i < n && e == AT_OK; i++) {
        memcpy(params[i], l[i]->params, l[i]->param_bytes);
        e = add_node(dl, j->g, &k[i], &in, 1, (CUfunction)l[i]->fn, l[i]->block_x, l[i]->smem_bytes,
                     launch_args[i]);
    }
    if (e == AT_OK && n == 2) {
        CUgraphEdgeData edge;
        memset(&edge, 0, sizeof edge);
        edge.from_port = CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER;
        edge.type = CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC;
        e = pair_step(dl, dl->drv->cuGraphAddDependencies(j->g, &k[0], &k[1], &edge, 1),
                      "cuGraphAddDependencies", __FILE__, __LINE__);
    }
    /* full edges from every launch: the kernels' own writes of out into host memory (direct I/O,
     * att_cuda.c) come before the copy out reports the job done; never a programmatic one */
    if (e == AT_OK)
        e = add_node(dl, j->g, &outn, k, n, dl->copy, ATT_CUDL_COPY_THREADS, 0, copy_args);
    if (e == AT_OK)
        e = updatable(dl, in, &j->node[0]);
    for (uint32_t i = 0; i < n && e == AT_OK; i++)
        e = updatable(dl, k[i], &j->node[1 + i]);
    if (e == AT_OK)
        e = updatable(dl, outn, &j->node[1 + n]);
    if (e == AT_OK)
        e = instantiate(s, j->g, n == 2, &j->exec);
    if (e != AT_OK) {
        graph_free(dl, &j->g, &j->exec);
        return e;
    }
    for (uint32_t i = 0; i < n; i++) {
        j->l[i] = l[i];
        j->fn[i] = l[i]->fn;
    }
    j->n_launch = n;
    s->num_graphs++;
    *out = j;
    return AT_OK;
}

/* Memory orders: the host's stores of a job's fields happen before its release store of
 * job.seq, which the launcher's acquire load of it pairs with; the device's writes of a job's
 * output (the copy out's, or the attention kernels' own in host memory, which the job graph's
 * full edges order before the copy out) happen before its release store of state.done, which
 * the host's acquire load of it pairs with. state.running: a release store by the device when it
 * ends, acquire loads here; the host's own store of 1 needs no order (it only keeps the host from
 * relaunching twice). job.pending: relaxed, a hint only (a launcher that sees it late ends after
 * its idle spell and the waiting host launches it again); the record is published by job.seq. */
static uint32_t running(const att_cudl_sess_t *s) {
    return atomic_load_explicit(&s->st->running, memory_order_acquire);
}

/* Waits for the engine copies queued and the stream write behind them: after a failed
 * submission or wait, so none lands while the host runs the call, and before a quit. */
static void engine_settle(att_cudl_sess_t *s) { (void)CK(s->dl, cuStreamSynchronize(s->engine)); }

void att_cudl_sess_quiesce(att_cudl_sess_t *s) {
    engine_settle(s); /* first: a queued write of a job's number would overwrite the quit */
    if (running(s))
        atomic_store_explicit(&s->job->seq, ATT_DL_QUIT, memory_order_release);
    (void)CK(s->dl, cuStreamSynchronize(s->stream));
}

void att_cudl_sess_forget(att_cudl_sess_t *s) {
    if (s->num_graphs == 0)
        return;
    /* a graph's last blocks may still run after its job is reported done */
    att_cudl_sess_quiesce(s);
    for (uint32_t i = 0; i < s->num_graphs; i++)
        graph_free(s->dl, &s->graphs[i].g, &s->graphs[i].exec);
    s->num_graphs = 0;
}

/* ---- sessions ---- */

/* Launches the launcher graph from the host (it ended, or never ran). */
static at_err_t relaunch(att_cudl_sess_t *s) {
    s->starts++;
    atomic_store_explicit(&s->st->running, 1, memory_order_relaxed);
    const at_err_t e = CK(s->dl, cuGraphLaunch(s->lexec, s->stream));
    if (e != AT_OK) /* none runs (the caller gives up on the session: att_cudl_submit) */
        atomic_store_explicit(&s->st->running, 0, memory_order_relaxed);
    return e;
}

at_err_t att_cudl_sess_create(att_cudl_t *dl, att_cudl_sess_t **out) {
    att_cudl_sess_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return AT_ERR_NOMEM;
    s->dl = dl;
    const size_t job_bytes = (sizeof(att_dl_job_t) + 63) / 64 * 64;
    unsigned long long idle = dl->idle_ns;
    at_err_t e = CK(dl, cuStreamCreate(&s->stream, CU_STREAM_NON_BLOCKING));
    if (e == AT_OK)
        e = CK(dl, cuStreamCreate(&s->upload, CU_STREAM_NON_BLOCKING));
    if (e == AT_OK)
        e = CK(dl, cuStreamCreate(&s->engine, CU_STREAM_NON_BLOCKING));
    if (e == AT_OK)
        e = CK(dl, cuMemHostAlloc(&s->host, job_bytes + sizeof(att_dl_state_t),
                                  CU_MEMHOSTALLOC_DEVICEMAP));
    if (e == AT_OK) {
        memset(s->host, 0, job_bytes + sizeof(att_dl_state_t));
        s->job = s->host;
        s->st = (att_dl_state_t *)((uint8_t *)s->host + job_bytes);
        e = CK(dl, cuMemHostGetDevicePointer(&s->job_d, s->host, 0));
    }
    if (e == AT_OK) {
        s->st_d = s->job_d + job_bytes;
        e = CK(dl, cuMemAlloc(&s->dev_d, sizeof(att_dl_dev_t)));
    }
    if (e == AT_OK)
        e = CK(dl, cuMemsetD8(s->dev_d, 0, sizeof(att_dl_dev_t)));
    if (e == AT_OK) /* the memset is on the legacy stream: done before the launcher reads */
        e = CK(dl, cuStreamSynchronize(NULL));
    void *args[] = {&s->job_d, &s->st_d, &s->dev_d, &idle};
    CUgraphNode n;
    if (e == AT_OK)
        e = CK(dl, cuGraphCreate(&s->lgraph, 0));
    if (e == AT_OK)
        e = add_node(dl, s->lgraph, &n, NULL, 0, dl->launcher, 32, 0, args);
    if (e == AT_OK)
        e = instantiate(s, s->lgraph, false, &s->lexec);
    if (e != AT_OK) {
        att_cudl_sess_destroy(&s, false);
        return e;
    }
    *out = s;
    return AT_OK;
}

void att_cudl_sess_destroy(att_cudl_sess_t **sp, bool lost) {
    att_cudl_sess_t *s = *sp;
    if (s == NULL)
        return;
    att_cudl_t *dl = s->dl;
    if (lost) {
        /* the driver frees the faulted context's objects with it: ask nothing of it */
        free(s);
        *sp = NULL;
        return;
    }
    if (s->st != NULL && s->stream != NULL && s->engine != NULL)
        att_cudl_sess_quiesce(s);
    att_cudl_sess_forget(s);
    graph_free(dl, &s->lgraph, &s->lexec);
    if (s->dev_d != 0)
        (void)CK(dl, cuMemFree(s->dev_d));
    if (s->host != NULL)
        (void)CK(dl, cuMemFreeHost(s->host));
    if (s->stream != NULL)
        (void)CK(dl, cuStreamDestroy(s->stream));
    if (s->upload != NULL)
        (void)CK(dl, cuStreamDestroy(s->upload));
    if (s->engine != NULL)
        (void)CK(dl, cuStreamDestroy(s->engine));
    free(s);
    *sp = NULL;
}

/* ---- calls ---- */

void att_cudl_begin(att_cudl_sess_t *s) {
    s->num_pending = 0;
    memset(s->copies, 0, sizeof s->copies);
    s->copies[ATT_CUDL_WAY_OUT].dev_d = s->dev_d; /* the copy out reports the job done */
    s->copies[ATT_CUDL_WAY_OUT].state_d = s->st_d;
}

att_dl_copy_t *att_cudl_copies(att_cudl_sess_t *s, att_cudl_way_t way) { return &s->copies[way]; }

bool att_cudl_range_add(att_dl_copy_t *c, uint64_t dst, uint64_t src, uint64_t bytes) {
    if (bytes == 0)
        return true;
    const uint32_t k = c->n - 1;
    if (c->n != 0 && c->src_d[k] + c->bytes[k] == src && c->dst_d[k] + c->bytes[k] == dst) {
        c->bytes[k] += bytes; /* adjacent on both sides: one range */
        return true;
    }
    if (c->n == ATT_DL_MAX_SEGS)
        return false;
    c->src_d[c->n] = src;
    c->dst_d[c->n] = dst;
    c->bytes[c->n] = bytes;
    c->n++;
    return true;
}

uint32_t att_cudl_copy_grid(const att_dl_copy_t *c, uint32_t num_sms) {
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < c->n; i++)
        bytes += c->bytes[i];
    const uint64_t want = (bytes / 16 + ATT_CUDL_COPY_THREADS - 1) / ATT_CUDL_COPY_THREADS;
    const uint64_t cap = (uint64_t)num_sms * 4;
    return (uint32_t)(want == 0 ? 1 : want < cap ? want : cap);
}

/* A copy node's update: its ranges and grid. */
static void copy_update(const att_cudl_t *dl, const att_dl_copy_t *c, CUgraphDeviceNode node,
                        att_dl_update_t *u) {
    u->node = (uint64_t)(uintptr_t)node;
    u->grid_x = att_cudl_copy_grid(c, dl->num_sms);
    u->bytes = (uint32_t)sizeof *c;
    memcpy(u->params, c, sizeof *c);
}

at_err_t att_cudl_launch(att_cudl_sess_t *s, const lc_launch_t *l, uint32_t grid_x,
                         const void *params) {
    if (s->num_pending == 2)
        return AT_ERR_INTERNAL;
    att_dl_update_t *u = &s->job->upd[1 + s->num_pending];
    u->grid_x = grid_x;
    u->bytes = l->param_bytes;
    memcpy(u->params, params, l->param_bytes);
    s->pending[s->num_pending++] = l;
    return AT_OK;
}

bool att_cudl_pairs(const att_cudl_sess_t *s) { return !s->no_pairs; }

uint64_t att_cudl_starts(const att_cudl_sess_t *s) { return s->starts; }

/* The engine copies, then the number of the job (whose record is written) by a stream write
 * behind them, which orders the copies' writes before it (the default: a fence first). The
 * host's stores of the record precede the driver call that queues the write, and work a call
 * queues sees the host memory written before the call. */
static at_err_t engine_submit(att_cudl_sess_t *s) {
    att_cudl_t *dl = s->dl;
    const att_dl_copy_t *c = &s->copies[ATT_CUDL_WAY_ENGINE];
    at_err_t e = AT_OK;
    for (uint32_t i = 0; i < c->n && e == AT_OK; i++)
        e = CK(dl, cuMemcpyAsync(c->dst_d[i], c->src_d[i], c->bytes[i], s->engine));
    if (e == AT_OK)
        e = CK(dl,
               cuStreamWriteValue32(s->engine, s->job_d + offsetof(att_dl_job_t, seq), s->seq, 0));
    return e;
}

at_err_t att_cudl_submit(att_cudl_sess_t *s) {
    const uint32_t n = s->num_pending;
    if (n == 0)
        return AT_ERR_INTERNAL;
    if (n == 2 && s->no_pairs)
        return AT_ERR_UNSUPPORTED;
    job_graph_t *j;
    const uint32_t graphs = s->num_graphs;
    at_err_t e = job_graph(s, s->pending, n, &j);
    s->no_pairs = s->no_pairs || e == AT_ERR_UNSUPPORTED; /* pair_step logged why */
    if (e != AT_OK)
        return e;
    att_dl_job_t *job = s->job;
    job->fresh = s->num_graphs != graphs ? 1u : 0u; /* a graph was made (maybe after a forget) */
    copy_update(s->dl, &s->copies[ATT_CUDL_WAY_IN], j->node[0], &job->upd[0]);
    for (uint32_t i = 0; i < n; i++)
        job->upd[1 + i].node = (uint64_t)(uintptr_t)j->node[1 + i];
    copy_update(s->dl, &s->copies[ATT_CUDL_WAY_OUT], j->node[1 + n], &job->upd[1 + n]);
    job->n_upd = n + 2;
    job->graph = (uint64_t)(uintptr_t)j->exec;
    if (++s->seq == ATT_DL_QUIT || s->seq == 0)
        s->seq = 1;
    /* pending first: a launcher past its idle spell keeps polling for this job (att_dl.h). Then
     * the number (or, behind the engine copies, the stream's write of it), then a launcher if
     * none runs. No stale number is left for it to take: after any failure the session goes
     * (att_cuda.c, dl_off). */
    atomic_store_explicit(&job->pending, s->seq, memory_order_relaxed);
    const bool engine = s->copies[ATT_CUDL_WAY_ENGINE].n != 0;
    if (engine)
        e = engine_submit(s);
    else
        atomic_store_explicit(&job->seq, s->seq, memory_order_release);
    if (e == AT_OK && !running(s))
        e = relaunch(s);
    if (e != AT_OK && engine)
        engine_settle(s);
    return e;
}

at_err_t att_cudl_wait(att_cudl_sess_t *s) {
    att_cudl_t *dl = s->dl;
    for (uint32_t i = 1; atomic_load_explicit(&s->st->done, memory_order_acquire) != s->seq; i++) {
        if (i % 4096 != 0)
            continue;
        at_err_t e = AT_OK;
        const CUresult r = running(s) ? dl->drv->cuStreamQuery(s->stream) : CUDA_SUCCESS;
        if (r == CUDA_SUCCESS && atomic_load_explicit(&s->st->done, memory_order_acquire) != s->seq)
            /* the launcher ended (idle, or it could not launch itself again) before it took the
             * job, or running says 1 with nothing on its stream (no launcher exists): launch it
             * again (it takes the job unless it took it already) */
            e = relaunch(s);
        else if (r != CUDA_SUCCESS && r != CUDA_ERROR_NOT_READY)
            e = dl->check(dl->user, r, "cuStreamQuery", __FILE__, __LINE__);
        if (e != AT_OK) {
            engine_settle(s);
            return e;
        }
    }
    if (s->st->failed == s->seq && s->st->launch_err != 0) {
        at_log(AT_LOG_ERROR, "cuda", "the launcher could not launch job %u: cudaError %u", s->seq,
               s->st->launch_err);
        return AT_ERR_DEVICE;
    }
    return AT_OK;
}

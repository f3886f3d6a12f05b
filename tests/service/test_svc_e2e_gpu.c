/* End to end on a GPU: a server with devices cpu and cuda:0, sessions of two models (bf16 GQA
 * and f32 MQA, different head dims) on cuda:0 and one on cpu, their calls interleaved over
 * gRPC, every output compared with a local CPU att_ctx under the dtype's tolerance.
 * The server is started in this process, or, with ATTND_E2E_TARGET=HOST:PORT, is a running
 * `attnd serve --devices cpu,cuda:0`. Without a GPU it skips with one line. Label: gpu.
 * ATTND_E2E_GPU names another GPU device for all of it (hip:0, through the HIP test double).
 *
 * The fault test (in-process server only) gives cuda:0's worker process the test fault switch:
 * its third Attend launches a kernel that faults the GPU, the worker process dies, the call
 * fails UNAVAILABLE, the cuda:0 session answers FAILED_PRECONDITION, the cpu session keeps
 * serving with its KV, cuda:0 comes back and a new session on it computes right. cuda:0's
 * workers are processes, so this program runs them too (`test_svc_e2e_gpu worker ...`). */
#include <grpc/grpc.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include <cmocka.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "attention/att_dtype.h"
#include "attnd/v1/attention.pb-c.h"
#include "bench/bench_client.h"
#include "service/svc_pool.h"
#include "service/svc_server.h"
#include "service/svc_worker.h"
#include "tests/attention/att_rig.h"
#include "tests/service/svc_testsrv.h"
#include "tests/test_util.h"

/* The GPU device under test: "cuda:0", or ATTND_E2E_GPU (e.g. "hip:0" through the HIP test
 * double, ATTND_HIP_LIB). */
static const char *gpu_dev(void) {
    const char *d = getenv("ATTND_E2E_GPU");
    return d != NULL && d[0] != '\0' ? d : "cuda:0";
}

static struct {
    test_srv_t s;              /* the in-process server; zeroed with ATTND_E2E_TARGET */
    bool local;
    grpc_channel *ch;          /* s.ch, or owned (ATTND_E2E_TARGET) */
    grpc_completion_queue *cq; /* s.cq, or owned */
    at_diag_t why;
    int ready;
} g;

typedef struct model {
    const char *session;
    const char *device;
    att_model_cfg_t cfg;
    Attnd__V1__DType wire_dtype;
    att_backend_t *be;
    att_ctx_t *ctx; /* the local reference */
} model_t;

static int setup(void **state) {
    (void)state;
    const char *target = getenv("ATTND_E2E_TARGET");
    if (target == NULL || target[0] == '\0') {
        const svc_pool_cfg_t pc[2] = {
            {.device = "cpu", .cpu_threads = 2, .arena_bytes = 64u << 20, .max_queue = 64},
            {.device = gpu_dev(), .index = 1, .cpu_threads = 2, .arena_bytes = 64u << 20,
             .max_queue = 64}};
        const svc_server_cfg_t sc = {.max_message_bytes = 16u << 20};
        if (test_srv_start(&g.s, pc, 2, &sc, &g.why) != AT_OK) {
            printf("SKIP: no %s (%s)\n", gpu_dev(), g.why.msg);
            return 0;
        }
        g.local = true;
        g.ch = g.s.ch;
        g.cq = g.s.cq;
        printf("server: 127.0.0.1:%d\n", svc_server_port(g.s.srv));
    } else {
        printf("server: %s\n", target);
        grpc_init(); /* the client's own reference: the server is another process */
        g.ch = bench_channel_create(target);
        g.cq = bench_cq_create();
    }
    g.ready = 1;
    return 0;
}

static int teardown(void **state) {
    (void)state;
    if (g.local) {
        test_srv_stop(&g.s);
    } else if (g.ready) {
        grpc_channel_destroy(g.ch);
        bench_cq_destroy(&g.cq);
        grpc_shutdown();
    }
    return 0;
}

static void call_msg(const char *method, const ProtobufCMessage *msg, bench_reply_t *r) {
    test_srv_call(g.ch, g.cq, NULL, method, msg, 60000, r);
}

static void create(model_t *m) {
    Attnd__V1__ModelConfig mc = ATTND__V1__MODEL_CONFIG__INIT;
    mc.name = (char *)m->session;
    mc.num_layers = m->cfg.num_layers;
    mc.num_query_heads = m->cfg.num_query_heads;
    mc.num_kv_heads = m->cfg.num_kv_heads;
    mc.head_dim = m->cfg.head_dim;
    mc.dtype = m->wire_dtype;
    Attnd__V1__CreateSessionRequest rq = ATTND__V1__CREATE_SESSION_REQUEST__INIT;
    rq.session = (char *)m->session;
    rq.model = &mc;
    rq.kv_capacity_tokens = 2048;
    rq.device = (char *)m->device;
    bench_reply_t r;
    call_msg("/attnd.v1.Attention/CreateSession", &rq.base, &r);
    if (r.status != GRPC_STATUS_OK)
        fail_msg("CreateSession %s on %s: %d %s", m->session, m->device, r.status, r.details);
    Attnd__V1__SessionInfo *info = attnd__v1__session_info__unpack(NULL, r.body_bytes, r.body);
    assert_non_null(info);
    assert_string_equal(info->device, m->device);
    attnd__v1__session_info__free_unpacked(info, NULL);
    bench_reply_fini(&r);
    att_cpu_cfg_t cc = {.num_threads = 2};
    assert_int_equal(att_cpu_create(&cc, &m->be), AT_OK);
    assert_int_equal(att_ctx_create(m->be, &m->cfg, 2048, NULL, &m->ctx), AT_OK);
}

static void *random_tensor(att_dtype_t dt, size_t n, tu_rng_t *rng, float range) {
    void *p = malloc(n * att_dtype_bytes(dt));
    for (size_t i = 0; i < n; i++)
        att_store(dt, p, i, tu_rng_float(rng, -range, range));
    return p;
}

/* One Attend over gRPC answered with status `expect`; when OK, the same call on the local
 * reference and the outputs within tolerance. */
static void step_expect(model_t *m, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                        tu_rng_t *rng, grpc_status_code expect) {
    const att_model_cfg_t *c = &m->cfg;
    uint32_t t = 0;
    for (uint32_t i = 0; i < n; i++)
        t += chunks[i].num_tokens;
    const size_t nq = (size_t)t * c->num_query_heads * c->head_dim;
    const size_t nk = (size_t)t * c->num_kv_heads * c->head_dim, es = att_dtype_bytes(c->dtype);
    void *q = random_tensor(c->dtype, nq, rng, 2.0f), *k = random_tensor(c->dtype, nk, rng, 2.0f);
    void *v = random_tensor(c->dtype, nk, rng, 1.0f), *out = malloc(nq * es);
    Attnd__V1__SequenceChunk sc[8], *scp[8];
    assert_true(n <= 8);
    for (uint32_t i = 0; i < n; i++) {
        attnd__v1__sequence_chunk__init(&sc[i]);
        sc[i].seq_id = chunks[i].seq_id;
        sc[i].start_pos = chunks[i].start_pos;
        sc[i].num_tokens = chunks[i].num_tokens;
        scp[i] = &sc[i];
    }
    Attnd__V1__AttendRequest rq = ATTND__V1__ATTEND_REQUEST__INIT;
    rq.session = (char *)m->session;
    rq.layer = layer;
    rq.n_chunks = n;
    rq.chunks = scp;
    rq.q = (ProtobufCBinaryData){nq * es, q};
    rq.k = (ProtobufCBinaryData){nk * es, k};
    rq.v = (ProtobufCBinaryData){nk * es, v};
    bench_reply_t r;
    call_msg("/attnd.v1.Attention/Attend", &rq.base, &r);
    if (r.status != expect)
        fail_msg("%s layer %u: %d %s (expected %d)", m->session, layer, r.status, r.details,
                 expect);
    if (expect != GRPC_STATUS_OK) {
        printf("%s: %s (as expected)\n", m->session, r.details);
        bench_reply_fini(&r);
        free(q);
        free(k);
        free(v);
        free(out);
        return;
    }
    Attnd__V1__AttendResponse *resp = attnd__v1__attend_response__unpack(NULL, r.body_bytes,
                                                                         r.body);
    assert_non_null(resp);
    assert_int_equal(resp->out.len, nq * es);
    att_call_t call = {.layer = layer, .chunks = chunks, .num_chunks = n, .q = q,
                       .q_bytes = nq * es, .k = k, .k_bytes = nk * es, .v = v,
                       .v_bytes = nk * es, .out = out, .out_bytes = nq * es};
    assert_int_equal(att_ctx_attend(m->ctx, &call, NULL), AT_OK);
    double tol_abs, tol_rel;
    att_rig_tolerance(c->dtype, &tol_abs, &tol_rel);
    tol_abs *= 2; /* two kernels' errors, each within the oracle's bound */
    tol_rel *= 2;
    size_t bad = 0;
    for (size_t i = 0; i < nq; i++) {
        double a = att_load(c->dtype, resp->out.data, i), b = att_load(c->dtype, out, i);
        if (!(fabs(a - b) <= tol_abs + tol_rel * fabs(b)))
            bad++;
    }
    if (bad != 0)
        fail_msg("%s (%s) layer %u: %zu of %zu elements differ from the CPU backend",
                 m->session, m->device, layer, bad, nq);
    attnd__v1__attend_response__free_unpacked(resp, NULL);
    bench_reply_fini(&r);
    free(q);
    free(k);
    free(v);
    free(out);
}

static void step(model_t *m, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                 tu_rng_t *rng) {
    step_expect(m, layer, chunks, n, rng, GRPC_STATUS_OK);
}

static void test_svc_e2e_gpu_models_interleaved(void **state) {
    (void)state;
    if (!g.ready) {
        printf("SKIP: no GPU server (%s)\n", g.why.msg);
        skip();
    }
    tu_rng_t rng;
    tu_rng_seed(&rng, tu_base_seed("test_svc_e2e_gpu"));
    model_t ms[3] = {
        {"gpu.llama", gpu_dev(),
         {.num_layers = 2, .num_query_heads = 32, .num_kv_heads = 8, .head_dim = 128,
          .dtype = ATT_DTYPE_BF16},
         ATTND__V1__DTYPE__BF16, NULL, NULL},
        {"gpu.mqa", gpu_dev(),
         {.num_layers = 1, .num_query_heads = 6, .num_kv_heads = 1, .head_dim = 80,
          .dtype = ATT_DTYPE_F32},
         ATTND__V1__DTYPE__F32, NULL, NULL},
        {"cpu.small", "cpu",
         {.num_layers = 1, .num_query_heads = 8, .num_kv_heads = 2, .head_dim = 64,
          .dtype = ATT_DTYPE_F16},
         ATTND__V1__DTYPE__F16, NULL, NULL},
    };
    for (int i = 0; i < 3; i++)
        create(&ms[i]);
    const att_chunk_t pre[] = {{1, 0, 60}, {2, 0, 7}};
    const att_chunk_t mix[] = {{1, 60, 1}, {2, 7, 30}, {3, 0, 12}};
    for (int i = 0; i < 3; i++)
        for (uint32_t l = 0; l < ms[i].cfg.num_layers; l++)
            step(&ms[i], l, pre, 2, &rng);
    for (int s = 0; s < 2; s++)
        for (int i = 2; i >= 0; i--)
            for (uint32_t l = 0; l < ms[i].cfg.num_layers; l++) {
                if (s == 0)
                    step(&ms[i], l, mix, 3, &rng);
                else {
                    const att_chunk_t dec[] = {{1, 61, 1}, {2, 37, 1}, {3, 12, 1}};
                    step(&ms[i], l, dec, 3, &rng);
                }
            }
    for (int i = 0; i < 3; i++) {
        att_ctx_destroy(&ms[i].ctx);
        att_backend_destroy(&ms[i].be);
    }
    printf("3 sessions (2 on %s, 1 on cpu) matched the CPU backend\n", gpu_dev());
}

static void close_session(const char *name) {
    Attnd__V1__CloseSessionRequest rq = ATTND__V1__CLOSE_SESSION_REQUEST__INIT;
    rq.session = (char *)name;
    bench_reply_t r;
    call_msg("/attnd.v1.Attention/CloseSession", &rq.base, &r);
    if (r.status != GRPC_STATUS_OK)
        fail_msg("CloseSession %s: %d %s", name, r.status, r.details);
    bench_reply_fini(&r);
}

static void model_fini(model_t *m) {
    att_ctx_destroy(&m->ctx);
    att_backend_destroy(&m->be);
}

static void test_svc_e2e_gpu_fault(void **state) {
    (void)state;
    if (!g.ready || !g.local) {
        printf("SKIP: no in-process GPU server (%s)\n", g.why.msg);
        skip();
    }
    /* a server of its own, whose GPU worker starts with the switch set (it names the device,
     * so the cpu pool's worker ignores it) */
    test_srv_t f;
    at_diag_t d = {{0}};
    const svc_pool_cfg_t pc[2] = {
        {.device = "cpu", .index = 2, .cpu_threads = 2, .arena_bytes = 64u << 20,
         .max_queue = 64, .restart_ms = 200},
        {.device = gpu_dev(), .index = 3, .cpu_threads = 2, .arena_bytes = 64u << 20,
         .max_queue = 64, .restart_ms = 200}};
    const svc_server_cfg_t sc = {.max_message_bytes = 16u << 20};
    char fault[64];
    snprintf(fault, sizeof fault, "%s:3", gpu_dev());
    setenv(SVC_WORKER_FAULT_ENV, fault, 1);
    at_err_t e = test_srv_start(&f, pc, 2, &sc, &d);
    unsetenv(SVC_WORKER_FAULT_ENV);
    if (e != AT_OK)
        fail_msg("fault server: %s", d.msg);
    svc_pool_t *gpu_pool = f.pools[1];
    assert_true(svc_pool_worker_pid(gpu_pool, 0) > 0); /* a process by default */
    grpc_channel *fixture_ch = g.ch;
    grpc_completion_queue *fixture_cq = g.cq;
    g.ch = f.ch;
    g.cq = f.cq;
    tu_rng_t rng;
    tu_rng_seed(&rng, tu_base_seed("test_svc_e2e_gpu_fault"));
    model_t gpu = {"fault.gpu", gpu_dev(),
                   {.num_layers = 1, .num_query_heads = 32, .num_kv_heads = 8, .head_dim = 128,
                    .dtype = ATT_DTYPE_BF16},
                   ATTND__V1__DTYPE__BF16, NULL, NULL};
    model_t cpu = {"fault.cpu", "cpu",
                   {.num_layers = 1, .num_query_heads = 8, .num_kv_heads = 2, .head_dim = 64,
                    .dtype = ATT_DTYPE_F16},
                   ATTND__V1__DTYPE__F16, NULL, NULL};
    create(&gpu);
    create(&cpu);
    const att_chunk_t pre[] = {{1, 0, 40}};
    step(&gpu, 0, pre, 1, &rng); /* request 1 */
    step(&cpu, 0, pre, 1, &rng);
    const att_chunk_t dec[] = {{1, 40, 1}}, dec2[] = {{1, 41, 1}};
    step(&gpu, 0, dec, 1, &rng); /* request 2 */
    step_expect(&gpu, 0, dec2, 1, &rng, GRPC_STATUS_UNAVAILABLE); /* 3: the faulting kernel */
    step_expect(&gpu, 0, dec2, 1, &rng, GRPC_STATUS_FAILED_PRECONDITION); /* lost */
    step(&cpu, 0, dec, 1, &rng); /* the cpu session kept its KV */
    for (int i = 0; i < 600 && !svc_pool_serving(gpu_pool); i++) {
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    assert_true(svc_pool_serving(gpu_pool));
    close_session(gpu.session);
    model_fini(&gpu);
    model_t again = gpu;
    again.session = "fault.gpu2";
    create(&again);
    step(&again, 0, pre, 1, &rng);
    step(&again, 0, dec, 1, &rng);
    step(&cpu, 0, dec2, 1, &rng);
    printf("%s worker died on the faulting kernel and came back; cpu kept serving\n",
           gpu_dev());
    model_fini(&again);
    model_fini(&cpu);
    g.ch = fixture_ch;
    g.cq = fixture_cq;
    test_srv_stop(&f);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "worker") == 0)
        return svc_worker_main(argc - 1, argv + 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svc_e2e_gpu_models_interleaved),
        cmocka_unit_test(test_svc_e2e_gpu_fault),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

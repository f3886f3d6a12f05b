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
#include "tests/test_util.h"

/* The GPU device under test: "cuda:0", or ATTND_E2E_GPU (e.g. "hip:0" through the HIP test
 * double, ATTND_HIP_LIB). */
static const char *gpu_dev(void) {
    const char *d = getenv("ATTND_E2E_GPU");
    return d != NULL && d[0] != '\0' ? d : "cuda:0";
}

static struct {
    void *zctx;
    svc_pool_t *pools[2];
    svc_server_t *srv;
    grpc_channel *ch;
    grpc_completion_queue *cq;
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
    char local[64];
    if (target == NULL || target[0] == '\0') {
        g.zctx = zmq_ctx_new();
        svc_pool_cfg_t pc = {.device = "cpu", .cpu_threads = 2, .arena_bytes = 64u << 20,
                             .max_queue = 64};
        if (svc_pool_create(&pc, g.zctx, &g.why, &g.pools[0]) != AT_OK)
            return -1;
        pc.device = gpu_dev();
        pc.index = 1;
        if (svc_pool_create(&pc, g.zctx, &g.why, &g.pools[1]) != AT_OK) {
            printf("SKIP: no %s (%s)\n", gpu_dev(), g.why.msg);
            return 0;
        }
        svc_server_cfg_t sc = {.listen = "127.0.0.1:0", .pools = g.pools, .num_pools = 2,
                               .max_message_bytes = 16u << 20};
        if (svc_server_create(&sc, &g.why, &g.srv) != AT_OK)
            return -1;
        snprintf(local, sizeof local, "127.0.0.1:%d", svc_server_port(g.srv));
        target = local;
    }
    printf("server: %s\n", target);
    grpc_init(); /* the client's own reference: the server may be another process */
    g.ch = bench_channel_create(target);
    g.cq = bench_cq_create();
    g.ready = 1;
    return 0;
}

static int teardown(void **state) {
    (void)state;
    if (g.ch != NULL)
        grpc_channel_destroy(g.ch);
    bench_cq_destroy(&g.cq);
    if (g.ready)
        grpc_shutdown();
    if (g.srv != NULL)
        svc_server_drain(g.srv, 1000);
    for (int i = 1; i >= 0; i--)
        svc_pool_stop(g.pools[i]);
    svc_server_destroy(&g.srv);
    for (int i = 1; i >= 0; i--)
        svc_pool_destroy(&g.pools[i]);
    if (g.zctx != NULL)
        zmq_ctx_term(g.zctx);
    return 0;
}

static void call_msg(const char *method, const ProtobufCMessage *msg, bench_reply_t *r) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n + 1);
    protobuf_c_message_pack(msg, buf);
    bench_call_cfg_t cfg = {.method = method, .timeout_ms = 60000, .keep_body = true};
    if (bench_call_unary(g.ch, g.cq, &cfg, buf, n, r) != 0)
        fail_msg("%s: %s", method, r->details);
    free(buf);
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
    if (!g.ready || (g.pools[0] != NULL && g.pools[1] == NULL)) {
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
    if (!g.ready || g.srv == NULL || g.pools[1] == NULL) {
        printf("SKIP: no in-process GPU server (%s)\n", g.why.msg);
        skip();
    }
    /* a server of its own, whose GPU worker starts with the switch set */
    svc_pool_t *pools[2] = {NULL, NULL};
    svc_server_t *srv = NULL;
    at_diag_t d = {{0}};
    svc_pool_cfg_t pc = {.device = "cpu", .index = 2, .cpu_threads = 2,
                         .arena_bytes = 64u << 20, .max_queue = 64, .restart_ms = 200};
    assert_int_equal(svc_pool_create(&pc, g.zctx, &d, &pools[0]), AT_OK);
    char fault[64];
    snprintf(fault, sizeof fault, "%s:3", gpu_dev());
    setenv(SVC_WORKER_FAULT_ENV, fault, 1);
    pc.device = gpu_dev();
    pc.index = 3;
    at_err_t e = svc_pool_create(&pc, g.zctx, &d, &pools[1]);
    unsetenv(SVC_WORKER_FAULT_ENV);
    assert_int_equal(e, AT_OK);
    assert_true(svc_pool_worker_pid(pools[1], 0) > 0); /* a process by default */
    svc_server_cfg_t sc = {.listen = "127.0.0.1:0", .pools = pools, .num_pools = 2,
                           .max_message_bytes = 16u << 20};
    assert_int_equal(svc_server_create(&sc, &d, &srv), AT_OK);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", svc_server_port(srv));
    grpc_channel *fixture_ch = g.ch;
    g.ch = bench_channel_create(target);
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
    for (int i = 0; i < 600 && !svc_pool_serving(pools[1]); i++) {
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    assert_true(svc_pool_serving(pools[1]));
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
    grpc_channel_destroy(g.ch);
    g.ch = fixture_ch;
    svc_server_drain(srv, 1000);
    svc_pool_stop(pools[1]);
    svc_pool_stop(pools[0]);
    svc_server_destroy(&srv);
    svc_pool_destroy(&pools[1]);
    svc_pool_destroy(&pools[0]);
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

/* End to end over loopback with a gRPC client written in C: the real server (pool, worker,
 * shared-memory arena, gRPC C core) on 127.0.0.1 with a free port, called through a real channel.
 * Outputs are compared byte for byte with an att_ctx on a CPU backend in this process (the same
 * kernels and work split give the same bits). */
#include <grpc/grpc.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include <cmocka.h>

#include "attention/att_cpu.h"
#include "attention/att_ctx.h"
#include "attnd/v1/attention.pb-c.h"
#include "bench/bench_client.h"
#include "grpc/health/v1/health.pb-c.h"
#include "service/svc_pool.h"
#include "service/svc_server.h"
#include "tests/service/svc_testsrv.h"
#include "tests/test_util.h"

static test_srv_t g;

static int setup(void **state) {
    (void)state;
    at_diag_t d = {{0}};
    svc_pool_cfg_t pc = {.device = "cpu", .cpu_threads = 2, .arena_bytes = 64u << 20,
                         .max_queue = 64};
    svc_server_cfg_t sc = {.max_message_bytes = 8u << 20};
    if (test_srv_start(&g, &pc, 1, &sc, &d) != AT_OK) {
        print_error("test server: %s\n", d.msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    test_srv_stop(&g);
    return 0;
}

/* One unary call: request bytes in, status and response bytes out (r: bench_reply_fini).
 * deadline_ms 0 = 30 s. */
static void call_unary(const char *method, const void *req, size_t req_len, int deadline_ms,
                       bench_reply_t *r) {
    bench_call_cfg_t cfg = {.method = method, .timeout_ms = deadline_ms ? deadline_ms : 30000,
                            .keep_body = true};
    if (bench_call_unary(g.ch, g.cq, &cfg, req, req_len, r) != 0)
        fail_msg("%s: %s", method, r->details);
}

static void call_msg(const char *method, const ProtobufCMessage *msg, int deadline_ms,
                     bench_reply_t *r) {
    test_srv_call(g.ch, g.cq, NULL, method, msg, deadline_ms ? deadline_ms : 30000, r);
}

/* A small GQA model: 4 query heads, 2 KV heads, head_dim 16, f32, 2 layers. */
static Attnd__V1__ModelConfig small_model(void) {
    Attnd__V1__ModelConfig mc = ATTND__V1__MODEL_CONFIG__INIT;
    mc.name = "small";
    mc.num_layers = 2;
    mc.num_query_heads = 4;
    mc.num_kv_heads = 2;
    mc.head_dim = 16;
    mc.dtype = ATTND__V1__DTYPE__F32;
    return mc;
}

static void create_session(const char *name, uint64_t capacity, grpc_status_code want) {
    Attnd__V1__ModelConfig mc = small_model();
    Attnd__V1__CreateSessionRequest rq = ATTND__V1__CREATE_SESSION_REQUEST__INIT;
    rq.session = (char *)name;
    rq.model = &mc;
    rq.kv_capacity_tokens = capacity;
    bench_reply_t r;
    call_msg("/attnd.v1.Attention/CreateSession", &rq.base, 0, &r);
    if (r.status != want)
        fail_msg("CreateSession %s: status %d (%s), want %d", name, r.status, r.details, want);
    if (want == GRPC_STATUS_OK) {
        Attnd__V1__SessionInfo *info = attnd__v1__session_info__unpack(NULL, r.body_bytes, r.body);
        assert_non_null(info);
        assert_string_equal(info->session, name);
        assert_string_equal(info->device, "cpu");
        assert_int_equal(info->model->block_size, 16);    /* default resolved */
        assert_int_equal(info->kv_capacity_tokens % 16, 0); /* whole blocks */
        attnd__v1__session_info__free_unpacked(info, NULL);
    }
    bench_reply_fini(&r);
}

static void attend(const char *session, uint32_t layer, const att_chunk_t *chunks, uint32_t n,
                   const float *q, const float *k, const float *v, uint32_t tokens,
                   bench_reply_t *r) {
    Attnd__V1__SequenceChunk sc[16], *scp[16];
    assert_true(n <= 16);
    for (uint32_t i = 0; i < n; i++) {
        attnd__v1__sequence_chunk__init(&sc[i]);
        sc[i].seq_id = chunks[i].seq_id;
        sc[i].start_pos = chunks[i].start_pos;
        sc[i].num_tokens = chunks[i].num_tokens;
        scp[i] = &sc[i];
    }
    Attnd__V1__AttendRequest rq = ATTND__V1__ATTEND_REQUEST__INIT;
    rq.session = (char *)session;
    rq.layer = layer;
    rq.n_chunks = n;
    rq.chunks = scp;
    rq.q = (ProtobufCBinaryData){(size_t)tokens * 4 * 16 * 4, (uint8_t *)q};
    rq.k = (ProtobufCBinaryData){(size_t)tokens * 2 * 16 * 4, (uint8_t *)k};
    rq.v = (ProtobufCBinaryData){(size_t)tokens * 2 * 16 * 4, (uint8_t *)v};
    call_msg("/attnd.v1.Attention/Attend", &rq.base, 0, r);
}

static void fill(float *p, size_t n, tu_rng_t *rng) {
    for (size_t i = 0; i < n; i++)
        p[i] = (float)tu_rng_range(rng, 0, 2000) / 1000.0f - 1.0f;
}

/* Prefill two sequences, decode both, then a chunk over earlier context; every output equals a
 * local att_ctx's, byte for byte. */
static void test_svc_e2e_attend_matches_local_backend(void **state) {
    (void)state;
    tu_rng_t rng;
    tu_rng_seed(&rng, tu_base_seed("test_svc_e2e"));
    create_session("e2e.match", 1024, GRPC_STATUS_OK);
    att_backend_t *be = NULL;
    att_cpu_cfg_t cc = {.num_threads = 1};
    assert_int_equal(att_cpu_create(&cc, &be), AT_OK);
    att_model_cfg_t mcfg = {.num_layers = 2, .num_query_heads = 4, .num_kv_heads = 2,
                            .head_dim = 16, .dtype = ATT_DTYPE_F32};
    att_ctx_t *ctx = NULL;
    assert_int_equal(att_ctx_create(be, &mcfg, 1024, NULL, &ctx), AT_OK);

    const att_chunk_t steps[][2] = {
        {{1, 0, 37}, {2, 0, 5}},  /* prefill */
        {{1, 37, 1}, {2, 5, 1}},  /* decode */
        {{2, 6, 20}, {1, 38, 1}}, /* a chunk over earlier context, and a decode token */
    };
    for (size_t s = 0; s < 3; s++) {
        for (uint32_t layer = 0; layer < 2; layer++) {
            uint32_t tokens = steps[s][0].num_tokens + steps[s][1].num_tokens;
            float *q = malloc((size_t)tokens * 64 * 4), *k = malloc((size_t)tokens * 32 * 4);
            float *v = malloc((size_t)tokens * 32 * 4), *out = malloc((size_t)tokens * 64 * 4);
            fill(q, (size_t)tokens * 64, &rng);
            fill(k, (size_t)tokens * 32, &rng);
            fill(v, (size_t)tokens * 32, &rng);
            bench_reply_t r;
            attend("e2e.match", layer, steps[s], 2, q, k, v, tokens, &r);
            if (r.status != GRPC_STATUS_OK)
                fail_msg("step %zu layer %u: %d %s", s, layer, r.status, r.details);
            Attnd__V1__AttendResponse *resp = attnd__v1__attend_response__unpack(NULL, r.body_bytes,
                                                                                 r.body);
            assert_non_null(resp);
            assert_int_equal(resp->out.len, (size_t)tokens * 64 * 4);
            att_call_t call = {.layer = layer, .chunks = steps[s], .num_chunks = 2,
                               .q = q, .q_bytes = (size_t)tokens * 256,
                               .k = k, .k_bytes = (size_t)tokens * 128,
                               .v = v, .v_bytes = (size_t)tokens * 128,
                               .out = out, .out_bytes = (size_t)tokens * 256};
            assert_int_equal(att_ctx_attend(ctx, &call, NULL), AT_OK);
            assert_memory_equal(resp->out.data, out, resp->out.len);
            attnd__v1__attend_response__free_unpacked(resp, NULL);
            bench_reply_fini(&r);
            free(q);
            free(k);
            free(v);
            free(out);
        }
    }
    att_ctx_destroy(&ctx);
    att_backend_destroy(&be);
}

static void expect(const bench_reply_t *r, grpc_status_code want, const char *needle) {
    if (r->status != want || (needle != NULL && strstr(r->details, needle) == NULL))
        fail_msg("status %d (%s), want %d with '%s'", r->status, r->details, want,
                 needle ? needle : "");
}

static uint64_t used_tokens(const char *session) {
    Attnd__V1__GetSessionRequest rq = ATTND__V1__GET_SESSION_REQUEST__INIT;
    rq.session = (char *)session;
    bench_reply_t r;
    call_msg("/attnd.v1.Attention/GetSession", &rq.base, 0, &r);
    expect(&r, GRPC_STATUS_OK, NULL);
    Attnd__V1__SessionInfo *info = attnd__v1__session_info__unpack(NULL, r.body_bytes, r.body);
    uint64_t used = info->kv_used_tokens;
    attnd__v1__session_info__free_unpacked(info, NULL);
    bench_reply_fini(&r);
    return used;
}

/* Each error status the service promises, and the session unchanged after each. */
static void test_svc_e2e_errors_map_to_statuses(void **state) {
    (void)state;
    create_session("e2e.err", 64, GRPC_STATUS_OK);
    create_session("e2e.err", 64, GRPC_STATUS_OK); /* a retry returns the session */
    Attnd__V1__ModelConfig other = small_model();
    other.head_dim = 32;
    Attnd__V1__CreateSessionRequest cr = ATTND__V1__CREATE_SESSION_REQUEST__INIT;
    cr.session = "e2e.err";
    cr.model = &other;
    cr.kv_capacity_tokens = 64;
    bench_reply_t r;
    call_msg("/attnd.v1.Attention/CreateSession", &cr.base, 0, &r);
    expect(&r, GRPC_STATUS_ALREADY_EXISTS, NULL);
    bench_reply_fini(&r);
    cr.session = "bad name!";
    call_msg("/attnd.v1.Attention/CreateSession", &cr.base, 0, &r);
    expect(&r, GRPC_STATUS_INVALID_ARGUMENT, "session");
    bench_reply_fini(&r);
    other.head_dim = 12;
    cr.session = "e2e.bad-model";
    call_msg("/attnd.v1.Attention/CreateSession", &cr.base, 0, &r);
    expect(&r, GRPC_STATUS_INVALID_ARGUMENT, "head_dim");
    bench_reply_fini(&r);

    float q[4 * 64] = {0}, k[4 * 32] = {0}, v[4 * 32] = {0};
    att_chunk_t ok[1] = {{7, 0, 4}};
    attend("e2e.err", 0, ok, 1, q, k, v, 4, &r);
    expect(&r, GRPC_STATUS_OK, NULL);
    bench_reply_fini(&r);
    uint64_t used = used_tokens("e2e.err");
    assert_int_equal(used, 16);

    attend("e2e.nope", 0, ok, 1, q, k, v, 4, &r);
    expect(&r, GRPC_STATUS_NOT_FOUND, NULL);
    bench_reply_fini(&r);
    attend("e2e.err", 0, ok, 1, q, k, v, 3, &r); /* q, k, v sized for 3 tokens, chunk says 4 */
    expect(&r, GRPC_STATUS_INVALID_ARGUMENT, "q:");
    bench_reply_fini(&r);
    attend("e2e.err", 5, ok, 1, q, k, v, 4, &r);
    expect(&r, GRPC_STATUS_INVALID_ARGUMENT, "layer");
    bench_reply_fini(&r);
    att_chunk_t past[1] = {{7, 9, 4}};
    attend("e2e.err", 0, past, 1, q, k, v, 4, &r);
    expect(&r, GRPC_STATUS_OUT_OF_RANGE, "start_pos");
    bench_reply_fini(&r);
    att_chunk_t big[1] = {{8, 0, 4}}, bigger[1] = {{9, 0, 4}};
    for (int i = 0; i < 3; i++) { /* 64 tokens = 4 blocks; three sequences take 3 */
        att_chunk_t c1[1] = {{(uint64_t)(100 + i), 0, 4}};
        attend("e2e.err", 0, c1, 1, q, k, v, 4, &r);
        expect(&r, GRPC_STATUS_OK, NULL);
        bench_reply_fini(&r);
    }
    attend("e2e.err", 0, big, 1, q, k, v, 4, &r);
    expect(&r, GRPC_STATUS_RESOURCE_EXHAUSTED, "kv capacity");
    bench_reply_fini(&r);
    assert_int_equal(used_tokens("e2e.err"), 64);
    (void)bigger;

    /* a deadline that has passed when the call arrives */
    Attnd__V1__GetSessionRequest gr = ATTND__V1__GET_SESSION_REQUEST__INIT;
    gr.session = "e2e.err";
    call_msg("/attnd.v1.Attention/GetSession", &gr.base, 1, &r);
    assert_true(r.status == GRPC_STATUS_DEADLINE_EXCEEDED || r.status == GRPC_STATUS_OK);
    bench_reply_fini(&r);

    /* an unknown method is answered, not left hanging */
    call_unary("/attnd.v1.Attention/Nope", "", 0, 5000, &r);
    expect(&r, GRPC_STATUS_UNIMPLEMENTED, NULL);
    bench_reply_fini(&r);

    /* release frees blocks; close forgets the name */
    Attnd__V1__ReleaseRequest rr = ATTND__V1__RELEASE_REQUEST__INIT;
    uint64_t ids[3] = {7, 100, 12345};
    rr.session = "e2e.err";
    rr.n_seq_ids = 3;
    rr.seq_ids = ids;
    call_msg("/attnd.v1.Attention/Release", &rr.base, 0, &r);
    expect(&r, GRPC_STATUS_OK, NULL);
    Attnd__V1__ReleaseResponse *rel = attnd__v1__release_response__unpack(NULL, r.body_bytes, r.body);
    assert_int_equal(rel->released, 2);
    attnd__v1__release_response__free_unpacked(rel, NULL);
    bench_reply_fini(&r);
    assert_int_equal(used_tokens("e2e.err"), 32);
    Attnd__V1__CloseSessionRequest cl = ATTND__V1__CLOSE_SESSION_REQUEST__INIT;
    cl.session = "e2e.err";
    call_msg("/attnd.v1.Attention/CloseSession", &cl.base, 0, &r);
    expect(&r, GRPC_STATUS_OK, NULL);
    bench_reply_fini(&r);
    call_msg("/attnd.v1.Attention/CloseSession", &cl.base, 0, &r);
    expect(&r, GRPC_STATUS_NOT_FOUND, NULL);
    bench_reply_fini(&r);
}

static void test_svc_e2e_health_and_list(void **state) {
    (void)state;
    Grpc__Health__V1__HealthCheckRequest hr = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    bench_reply_t r;
    call_msg("/grpc.health.v1.Health/Check", &hr.base, 0, &r);
    expect(&r, GRPC_STATUS_OK, NULL);
    Grpc__Health__V1__HealthCheckResponse *h =
        grpc__health__v1__health_check_response__unpack(NULL, r.body_bytes, r.body);
    assert_int_equal(h->status, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    grpc__health__v1__health_check_response__free_unpacked(h, NULL);
    bench_reply_fini(&r);
    hr.service = "no.such.Service";
    call_msg("/grpc.health.v1.Health/Check", &hr.base, 0, &r);
    expect(&r, GRPC_STATUS_NOT_FOUND, NULL);
    bench_reply_fini(&r);

    create_session("e2e.list-b", 32, GRPC_STATUS_OK);
    create_session("e2e.list-a", 32, GRPC_STATUS_OK);
    Attnd__V1__ListSessionsRequest lr = ATTND__V1__LIST_SESSIONS_REQUEST__INIT;
    call_msg("/attnd.v1.Attention/ListSessions", &lr.base, 0, &r);
    expect(&r, GRPC_STATUS_OK, NULL);
    Attnd__V1__ListSessionsResponse *l =
        attnd__v1__list_sessions_response__unpack(NULL, r.body_bytes, r.body);
    int a = -1, b = -1;
    for (size_t i = 0; i < l->n_sessions; i++) {
        if (strcmp(l->sessions[i]->session, "e2e.list-a") == 0)
            a = (int)i;
        if (strcmp(l->sessions[i]->session, "e2e.list-b") == 0)
            b = (int)i;
    }
    assert_true(a >= 0 && b > a); /* both there, sorted by name */
    attnd__v1__list_sessions_response__free_unpacked(l, NULL);
    bench_reply_fini(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svc_e2e_attend_matches_local_backend),
        cmocka_unit_test(test_svc_e2e_errors_map_to_statuses),
        cmocka_unit_test(test_svc_e2e_health_and_list),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

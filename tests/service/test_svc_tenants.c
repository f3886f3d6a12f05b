/* Tenants end to end over loopback, with gRPC clients written in C (bench/bench_client): the
 * real server (pool, worker, arena, gRPC C core, auth metadata processor) on 127.0.0.1 with a
 * free port and a real tenants file.
 *
 * - every RPC with no token, a wrong token, another tenant's valid token and its own;
 * - another tenant's session, a nonexistent one and a malformed name answer byte-identically
 *   (status and message: NOT_FOUND); the owner's session is unchanged afterwards;
 * - quotas (sessions, kv_bytes, inflight_calls) hit exactly at their limits, the refused call
 *   leaving nothing behind;
 * - GetStats counts calls, tokens, work and statuses of the caller's tenant only.
 *
 * Tenants of the file: "alpha" (token TOK_A), "beta" (TOK_B, weight 3), "quota" (TOK_Q: 2
 * sessions, 3 x KV_BYTES_64 of KV, 1 call in flight) and "closed" (TOK_Z: inflight_calls 0). */
#include <grpc/grpc.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include <cmocka.h>

#include "attnd/v1/attention.pb-c.h"
#include "bench/bench_client.h"
#include "grpc/health/v1/health.pb-c.h"
#include "service/svc_pool.h"
#include "service/svc_server.h"
#include "tenancy/ten_tenant.h"
#include "tests/service/svc_testsrv.h"
#include "tests/test_util.h"

#define TOK_A "atk_alpha-token"
#define TOK_B "atk_beta-token"
#define TOK_Q "atk_quota-token"
#define TOK_Z "atk_closed-token"
#define TOK_WRONG "atk_nobody"
/* KV bytes of a session of small_model() with 64 tokens: 2 layers x (k, v) x 64 tokens x 2 heads
 * x 16 x 4 bytes */
#define KV_BYTES_64 32768u

#define M_CREATE "/attnd.v1.Attention/CreateSession"
#define M_GET "/attnd.v1.Attention/GetSession"
#define M_LIST "/attnd.v1.Attention/ListSessions"
#define M_CLOSE "/attnd.v1.Attention/CloseSession"
#define M_ATTEND "/attnd.v1.Attention/Attend"
#define M_APPEND "/attnd.v1.Attention/Append"
#define M_RELEASE "/attnd.v1.Attention/Release"
#define M_STATS "/attnd.v1.Attention/GetStats"
#define M_STREAM "/attnd.v1.Attention/AttendStream"
#define M_HEALTH "/grpc.health.v1.Health/Check"

typedef struct env {
    test_srv_t s;
    ten_tenants_t *tenants;
    grpc_channel *ch;          /* borrowed: s.ch */
    grpc_completion_queue *cq; /* borrowed: s.cq */
    char dir[256];
    char path[PATH_MAX];
} env_t;

static env_t g;

/* ---- set-up ---- */

static void digest(const char *token, char hex[TEN_DIGEST_HEX_LEN + 1]) {
    assert_int_equal(ten_token_digest_hex(token, strlen(token), hex, NULL), AT_OK);
}

static void write_tenants_file(void) {
    char a[65], b[65], q[65], z[65];
    digest(TOK_A, a);
    digest(TOK_B, b);
    digest(TOK_Q, q);
    digest(TOK_Z, z);
    FILE *f = fopen(g.path, "w");
    assert_non_null(f);
    fprintf(f,
            "{\"version\": 1, \"tenants\": [\n"
            " {\"name\": \"alpha\", \"tokens_sha256\": [\"%s\"]},\n"
            " {\"name\": \"beta\", \"weight\": 3, \"tokens_sha256\": [\"%s\"]},\n"
            " {\"name\": \"quota\", \"tokens_sha256\": [\"%s\"],\n"
            "  \"quotas\": {\"sessions\": 2, \"kv_bytes\": %u, \"inflight_calls\": 1}},\n"
            " {\"name\": \"closed\", \"tokens_sha256\": [\"%s\"],\n"
            "  \"quotas\": {\"inflight_calls\": 0}}]}\n",
            a, b, q, 3 * KV_BYTES_64, z);
    assert_int_equal(fclose(f), 0);
}

static int setup(void **state) {
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(g.dir, sizeof g.dir, "%s/test_svc_tenants.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(g.dir) == NULL)
        return -1;
    snprintf(g.path, sizeof g.path, "%s/tenants.json", g.dir);
    write_tenants_file();
    at_diag_t d = {{0}};
    if (ten_tenants_load(g.path, &g.tenants, &d) != AT_OK) {
        print_error("load: %s\n", d.msg);
        return -1;
    }
    svc_pool_cfg_t pc = {.device = "cpu", .cpu_threads = 2, .workers = 2,
                         .arena_bytes = 64u << 20, .max_queue = 64, .batch_tokens = 4096};
    svc_server_cfg_t sc = {.max_message_bytes = 8u << 20, .tenants = g.tenants};
    if (test_srv_start(&g.s, &pc, 1, &sc, &d) != AT_OK) {
        print_error("test server: %s\n", d.msg);
        return -1;
    }
    g.ch = g.s.ch;
    g.cq = g.s.cq;
    return 0;
}

static int teardown(void **state) {
    (void)state;
    test_srv_stop(&g.s);
    ten_tenants_destroy(&g.tenants);
    unlink(g.path);
    rmdir(g.dir);
    return 0;
}

/* ---- calls ---- */

/* One unary call as token (NULL: none) with msg as its request; r: bench_reply_fini. */
static void call_as(const char *token, const char *method, const ProtobufCMessage *msg,
                    bench_reply_t *r) {
    test_srv_call(g.ch, g.cq, token, method, msg, 30000, r);
}

static void expect(const bench_reply_t *r, grpc_status_code want, const char *needle,
                   const char *what) {
    if (r->status != want)
        fail_msg("%s: status %s (%s), want %s", what, bench_status_name(r->status), r->details,
                 bench_status_name(want));
    if (needle != NULL && strstr(r->details, needle) == NULL)
        fail_msg("%s: message '%s' does not say '%s'", what, r->details, needle);
}

/* 4 query heads, 2 KV heads, head_dim 16, f32, 2 layers. */
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

static void create_as(const char *token, const char *name, uint64_t capacity,
                      bench_reply_t *r) {
    Attnd__V1__ModelConfig mc = small_model();
    Attnd__V1__CreateSessionRequest rq = ATTND__V1__CREATE_SESSION_REQUEST__INIT;
    rq.session = (char *)name;
    rq.model = &mc;
    rq.kv_capacity_tokens = capacity;
    call_as(token, M_CREATE, &rq.base, r);
}

static void create_ok(const char *token, const char *name, uint64_t capacity) {
    bench_reply_t r;
    create_as(token, name, capacity, &r);
    expect(&r, GRPC_STATUS_OK, NULL, name);
    bench_reply_fini(&r);
}

static void close_as(const char *token, const char *name, bench_reply_t *r) {
    Attnd__V1__CloseSessionRequest rq = ATTND__V1__CLOSE_SESSION_REQUEST__INIT;
    rq.session = (char *)name;
    call_as(token, M_CLOSE, &rq.base, r);
}

static void close_ok(const char *token, const char *name) {
    bench_reply_t r;
    close_as(token, name, &r);
    expect(&r, GRPC_STATUS_OK, NULL, name);
    bench_reply_fini(&r);
}

static void get_as(const char *token, const char *name, bench_reply_t *r) {
    Attnd__V1__GetSessionRequest rq = ATTND__V1__GET_SESSION_REQUEST__INIT;
    rq.session = (char *)name;
    call_as(token, M_GET, &rq.base, r);
}

/* The session's kv_used_tokens as its owner sees it. */
static uint64_t kv_used(const char *token, const char *name) {
    bench_reply_t r;
    get_as(token, name, &r);
    expect(&r, GRPC_STATUS_OK, NULL, name);
    Attnd__V1__SessionInfo *info = attnd__v1__session_info__unpack(NULL, r.body_bytes, r.body);
    assert_non_null(info);
    uint64_t used = info->kv_used_tokens;
    attnd__v1__session_info__free_unpacked(info, NULL);
    bench_reply_fini(&r);
    return used;
}

/* An Attend (or Append) request of one chunk of n tokens at start on seq, with fixed values,
 * packed into buf (tu_xmalloc'd; the caller frees it). */
static size_t attend_request(const char *session, uint64_t seq, uint32_t start, uint32_t n,
                             uint8_t **buf) {
    size_t qb = (size_t)n * 4 * 16 * 4, kb = (size_t)n * 2 * 16 * 4;
    float *t = tu_xmalloc(qb);
    for (size_t i = 0; i < qb / 4; i++)
        t[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
    Attnd__V1__SequenceChunk sc = ATTND__V1__SEQUENCE_CHUNK__INIT, *scp = &sc;
    sc.seq_id = seq;
    sc.start_pos = start;
    sc.num_tokens = n;
    Attnd__V1__AttendRequest rq = ATTND__V1__ATTEND_REQUEST__INIT;
    rq.session = (char *)session;
    rq.n_chunks = 1;
    rq.chunks = &scp;
    rq.q = (ProtobufCBinaryData){qb, (uint8_t *)t};
    rq.k = (ProtobufCBinaryData){kb, (uint8_t *)t};
    rq.v = (ProtobufCBinaryData){kb, (uint8_t *)t};
    size_t len = protobuf_c_message_get_packed_size(&rq.base);
    *buf = tu_xmalloc(len + 1);
    protobuf_c_message_pack(&rq.base, *buf);
    free(t);
    return len;
}

static void attend_as(const char *token, const char *method, const char *session, uint64_t seq,
                      uint32_t start, uint32_t n, bench_reply_t *r) {
    uint8_t *buf = NULL;
    size_t len = attend_request(session, seq, start, n, &buf);
    bench_call_cfg_t cfg = {.method = method, .token = token, .timeout_ms = 30000,
                            .keep_body = true};
    if (bench_call_unary(g.ch, g.cq, &cfg, buf, len, r) != 0)
        fail_msg("%s: %s", method, r->details);
    free(buf);
}

static void release_as(const char *token, const char *session, uint64_t seq, bench_reply_t *r) {
    Attnd__V1__ReleaseRequest rq = ATTND__V1__RELEASE_REQUEST__INIT;
    rq.session = (char *)session;
    rq.n_seq_ids = 1;
    rq.seq_ids = &seq;
    call_as(token, M_RELEASE, &rq.base, r);
}

/* One request on a new AttendStream as token; the stream's outcome: OK when the response came
 * and the stream then ended OK, else the stream's final status. */
static void stream_as(const char *token, const char *session, uint64_t seq, uint32_t start,
                      bench_reply_t *r) {
    bench_call_cfg_t cfg = {.method = M_STREAM, .token = token, .timeout_ms = 30000};
    bench_stream_t *st = NULL;
    assert_int_equal(bench_stream_open(g.ch, g.cq, &cfg, &st), 0);
    uint8_t *buf = NULL;
    size_t len = attend_request(session, seq, start, 1, &buf);
    assert_int_equal(bench_stream_exchange(st, buf, len, r), 0);
    free(buf);
    if (!bench_stream_ended(st)) {
        bench_reply_fini(r);
        bench_stream_close(&st, r);
    } else {
        bench_stream_close(&st, NULL);
    }
}

/* The caller's tenant's stats (caller frees with attnd__v1__get_stats_response__free_unpacked). */
static Attnd__V1__GetStatsResponse *stats_as(const char *token) {
    Attnd__V1__GetStatsRequest rq = ATTND__V1__GET_STATS_REQUEST__INIT;
    bench_reply_t r;
    call_as(token, M_STATS, &rq.base, &r);
    expect(&r, GRPC_STATUS_OK, NULL, "GetStats");
    Attnd__V1__GetStatsResponse *s = attnd__v1__get_stats_response__unpack(NULL, r.body_bytes,
                                                                             r.body);
    assert_non_null(s);
    assert_int_equal(s->n_tenants, 1);
    bench_reply_fini(&r);
    return s;
}

static uint64_t status_calls(const Attnd__V1__TenantStats *t, const char *status) {
    for (size_t i = 0; i < t->n_by_status; i++)
        if (strcmp(t->by_status[i]->status, status) == 0)
            return t->by_status[i]->calls;
    return 0;
}

/* ---- authentication ---- */

/* Each RPC of the service but CreateSession once as `token`, on alpha's session "auth-s"
 * (sequence 1 holds 4 tokens at layer 0; the owner's calls leave it at 5). Returns the statuses
 * in order. */
enum { N_RPCS = 8 };
static const char *const rpc_names[N_RPCS] = {"GetSession", "ListSessions", "Attend",
                                              "Append",     "Release",      "AttendStream",
                                              "GetStats",   "CloseSession"};

static void every_rpc(const char *token, grpc_status_code got[N_RPCS], size_t *listed) {
    bench_reply_t r;
    int i = 0;
    get_as(token, "auth-s", &r);
    got[i++] = r.status;
    bench_reply_fini(&r);
    Attnd__V1__ListSessionsRequest lq = ATTND__V1__LIST_SESSIONS_REQUEST__INIT;
    call_as(token, M_LIST, &lq.base, &r);
    got[i++] = r.status;
    *listed = 0;
    if (r.status == GRPC_STATUS_OK) {
        Attnd__V1__ListSessionsResponse *l =
            attnd__v1__list_sessions_response__unpack(NULL, r.body_bytes, r.body);
        assert_non_null(l);
        *listed = l->n_sessions;
        attnd__v1__list_sessions_response__free_unpacked(l, NULL);
    }
    bench_reply_fini(&r);
    attend_as(token, M_ATTEND, "auth-s", 1, 4, 1, &r);
    got[i++] = r.status;
    bench_reply_fini(&r);
    attend_as(token, M_APPEND, "auth-s", 2, 0, 2, &r);
    got[i++] = r.status;
    bench_reply_fini(&r);
    release_as(token, "auth-s", 2, &r);
    got[i++] = r.status;
    bench_reply_fini(&r);
    stream_as(token, "auth-s", 1, 4, &r);
    got[i++] = r.status;
    bench_reply_fini(&r);
    Attnd__V1__GetStatsRequest sq = ATTND__V1__GET_STATS_REQUEST__INIT;
    call_as(token, M_STATS, &sq.base, &r);
    got[i++] = r.status;
    bench_reply_fini(&r);
    close_as(token, "auth-s", &r);
    got[i++] = r.status;
    bench_reply_fini(&r);
}

static void expect_all(const char *who, const grpc_status_code got[N_RPCS],
                       const grpc_status_code want[N_RPCS]) {
    for (int i = 0; i < N_RPCS; i++)
        if (got[i] != want[i])
            fail_msg("%s: %s answered %s, want %s", who, rpc_names[i],
                     bench_status_name(got[i]), bench_status_name(want[i]));
}

static void test_svc_tenants_every_rpc_checks_the_token(void **state) {
    (void)state;
    const grpc_status_code OK = GRPC_STATUS_OK, UN = GRPC_STATUS_UNAUTHENTICATED,
                           NF = GRPC_STATUS_NOT_FOUND;
    bench_reply_t r;
    /* CreateSession: refused without a valid token; beta's "auth-s" is its own */
    create_as(NULL, "auth-s", 64, &r);
    expect(&r, UN, "no bearer token", "CreateSession, no token");
    bench_reply_fini(&r);
    create_as(TOK_WRONG, "auth-s", 64, &r);
    expect(&r, UN, "not valid", "CreateSession, wrong token");
    bench_reply_fini(&r);
    create_ok(TOK_A, "auth-s", 64);
    create_ok(TOK_A, "auth-s", 64); /* a retry */
    create_ok(TOK_B, "auth-s", 128);
    close_ok(TOK_B, "auth-s");
    attend_as(TOK_A, M_ATTEND, "auth-s", 1, 0, 4, &r);
    expect(&r, OK, NULL, "prefill");
    bench_reply_fini(&r);

    grpc_status_code got[N_RPCS];
    size_t listed = 0;
    /* the owner, first without closing: CloseSession comes last and would end the session */
    every_rpc(TOK_A, got, &listed);
    expect_all("its own token", got, (grpc_status_code[N_RPCS]){OK, OK, OK, OK, OK, OK, OK, OK});
    assert_int_equal(listed, 1);
    create_ok(TOK_A, "auth-s", 64);
    attend_as(TOK_A, M_ATTEND, "auth-s", 1, 0, 5, &r);
    expect(&r, OK, NULL, "prefill again");
    bench_reply_fini(&r);
    uint64_t used = kv_used(TOK_A, "auth-s");

    every_rpc(NULL, got, &listed);
    expect_all("no token", got, (grpc_status_code[N_RPCS]){UN, UN, UN, UN, UN, UN, UN, UN});
    every_rpc(TOK_WRONG, got, &listed);
    expect_all("wrong token", got, (grpc_status_code[N_RPCS]){UN, UN, UN, UN, UN, UN, UN, UN});
    every_rpc(TOK_B, got, &listed);
    expect_all("another tenant's token", got,
               (grpc_status_code[N_RPCS]){NF, OK, NF, NF, NF, NF, OK, NF});
    assert_int_equal(listed, 0); /* beta lists none of alpha's sessions */
    assert_int_equal(kv_used(TOK_A, "auth-s"), used); /* nothing the others did touched it */

    /* the messages of a refused token do not depend on which token, and health stays open */
    bench_reply_t r1, r2;
    get_as(TOK_WRONG, "auth-s", &r1);
    get_as("atk_another-wrong-one", "auth-s", &r2);
    assert_string_equal(r1.details, r2.details);
    bench_reply_fini(&r1);
    bench_reply_fini(&r2);
    Grpc__Health__V1__HealthCheckRequest hr = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    call_as(NULL, M_HEALTH, &hr.base, &r);
    expect(&r, OK, NULL, "health without a token");
    bench_reply_fini(&r);
    call_as(TOK_WRONG, M_HEALTH, &hr.base, &r); /* probes are never refused */
    expect(&r, OK, NULL, "health with a wrong token");
    bench_reply_fini(&r);
    close_ok(TOK_A, "auth-s");
}

/* ---- sessions of other tenants ---- */

/* What beta hears from one RPC on `name`: status and message. */
static void probe(const char *token, int rpc, const char *name, bench_reply_t *r) {
    switch (rpc) {
    case 0: get_as(token, name, r); break;
    case 1: close_as(token, name, r); break;
    case 2: attend_as(token, M_ATTEND, name, 1, 0, 1, r); break;
    case 3: attend_as(token, M_APPEND, name, 1, 0, 1, r); break;
    case 4: release_as(token, name, 1, r); break;
    default: stream_as(token, name, 1, 0, r); break;
    }
}

static void test_svc_tenants_foreign_and_missing_sessions_read_the_same(void **state) {
    (void)state;
    static const char *const what[] = {"GetSession", "CloseSession", "Attend", "Append",
                                       "Release", "AttendStream"};
    create_ok(TOK_A, "private", 64);
    bench_reply_t r;
    attend_as(TOK_A, M_ATTEND, "private", 1, 0, 3, &r);
    expect(&r, GRPC_STATUS_OK, NULL, "prefill");
    bench_reply_fini(&r);
    uint64_t used = kv_used(TOK_A, "private");
    for (int rpc = 0; rpc < 6; rpc++) {
        bench_reply_t foreign, missing, malformed;
        probe(TOK_B, rpc, "private", &foreign);
        probe(TOK_B, rpc, "no-such-session", &missing);
        probe(TOK_B, rpc, "bad name!", &malformed);
        expect(&foreign, GRPC_STATUS_NOT_FOUND, "no such session", what[rpc]);
        if (foreign.status != missing.status || strcmp(foreign.details, missing.details) != 0)
            fail_msg("%s: another tenant's session reads '%s' (%s), a missing one '%s' (%s)",
                     what[rpc], foreign.details, bench_status_name(foreign.status),
                     missing.details, bench_status_name(missing.status));
        if (malformed.status != missing.status || strcmp(malformed.details, missing.details) != 0)
            fail_msg("%s: a malformed name reads '%s' (%s), a missing one '%s' (%s)", what[rpc],
                     malformed.details, bench_status_name(malformed.status), missing.details,
                     bench_status_name(missing.status));
        bench_reply_fini(&foreign);
        bench_reply_fini(&missing);
        bench_reply_fini(&malformed);
    }
    assert_int_equal(kv_used(TOK_A, "private"), used);
    close_ok(TOK_A, "private");
}

/* ---- quotas ---- */

static void test_svc_tenants_session_and_kv_quotas_are_exact(void **state) {
    (void)state;
    bench_reply_t r;
    /* sessions: 2 */
    create_ok(TOK_Q, "q1", 64);
    create_ok(TOK_Q, "q2", 64);
    create_as(TOK_Q, "q3", 16, &r);
    expect(&r, GRPC_STATUS_RESOURCE_EXHAUSTED, "quota exceeded: sessions", "third session");
    bench_reply_fini(&r);
    get_as(TOK_Q, "q3", &r); /* nothing of it was made */
    expect(&r, GRPC_STATUS_NOT_FOUND, NULL, "refused session");
    bench_reply_fini(&r);
    create_ok(TOK_Q, "q2", 64); /* an existing session is no new one: a retry still works */
    Attnd__V1__GetStatsResponse *st = stats_as(TOK_Q);
    assert_int_equal(st->tenants[0]->sessions, 2);
    assert_int_equal(st->tenants[0]->kv_bytes, 2 * KV_BYTES_64);
    attnd__v1__get_stats_response__free_unpacked(st, NULL);
    close_ok(TOK_Q, "q2");
    /* kv_bytes: 3 x KV_BYTES_64; one session holds one share, so two shares more do not fit one
     * session, exactly two do and then one token more does not */
    create_as(TOK_Q, "big", 64 * 3, &r);
    expect(&r, GRPC_STATUS_RESOURCE_EXHAUSTED, "quota exceeded: kv_bytes", "over kv_bytes");
    bench_reply_fini(&r);
    create_ok(TOK_Q, "big", 64 * 2);
    st = stats_as(TOK_Q);
    assert_int_equal(st->tenants[0]->sessions, 2);
    assert_int_equal(st->tenants[0]->kv_bytes, 3 * KV_BYTES_64);
    attnd__v1__get_stats_response__free_unpacked(st, NULL);
    close_ok(TOK_Q, "big");
    create_as(TOK_Q, "big", 64 * 2 + 1, &r); /* one block more than fits */
    expect(&r, GRPC_STATUS_RESOURCE_EXHAUSTED, "kv_bytes", "one block over");
    bench_reply_fini(&r);
    close_ok(TOK_Q, "q1");
    st = stats_as(TOK_Q);
    assert_int_equal(st->tenants[0]->sessions, 0);
    assert_int_equal(st->tenants[0]->kv_bytes, 0);
    attnd__v1__get_stats_response__free_unpacked(st, NULL);
    /* another tenant's quota is its own */
    create_ok(TOK_A, "q1", 64 * 8);
    close_ok(TOK_A, "q1");
}

static void test_svc_tenants_inflight_quota_is_exact(void **state) {
    (void)state;
    bench_reply_t r;
    Attnd__V1__GetStatsRequest sq = ATTND__V1__GET_STATS_REQUEST__INIT;
    call_as(TOK_Z, M_STATS, &sq.base, &r); /* inflight_calls 0: nothing at all */
    expect(&r, GRPC_STATUS_RESOURCE_EXHAUSTED, "quota exceeded: inflight_calls", "quota 0");
    bench_reply_fini(&r);
    /* quota 1: an open stream holds the one slot, so a unary call is refused until it ends */
    create_ok(TOK_Q, "inflight", 64);
    bench_call_cfg_t cfg = {.method = M_STREAM, .token = TOK_Q, .timeout_ms = 30000};
    bench_stream_t *stream = NULL;
    assert_int_equal(bench_stream_open(g.ch, g.cq, &cfg, &stream), 0);
    uint8_t *buf = NULL;
    size_t len = attend_request("inflight", 1, 0, 2, &buf);
    assert_int_equal(bench_stream_exchange(stream, buf, len, &r), 0);
    expect(&r, GRPC_STATUS_OK, NULL, "stream request");
    bench_reply_fini(&r);
    free(buf);
    grpc_completion_queue *cq2 = bench_cq_create(); /* the stream keeps g.cq */
    size_t n = protobuf_c_message_get_packed_size(&sq.base);
    uint8_t one[8];
    protobuf_c_message_pack(&sq.base, one);
    bench_call_cfg_t ucfg = {.method = M_STATS, .token = TOK_Q, .timeout_ms = 30000};
    assert_int_equal(bench_call_unary(g.ch, cq2, &ucfg, one, n, &r), 0);
    expect(&r, GRPC_STATUS_RESOURCE_EXHAUSTED, "inflight_calls=1", "second call in flight");
    bench_reply_fini(&r);
    bench_stream_close(&stream, &r);
    expect(&r, GRPC_STATUS_OK, NULL, "stream end");
    bench_reply_fini(&r);
    bench_cq_destroy(&cq2);
    /* the slot is free as soon as the stream's status was sent */
    Attnd__V1__GetStatsResponse *st = stats_as(TOK_Q);
    assert_int_equal(st->tenants[0]->inflight_calls, 1); /* this call */
    assert_true(status_calls(st->tenants[0], "RESOURCE_EXHAUSTED") >= 1);
    attnd__v1__get_stats_response__free_unpacked(st, NULL);
    close_ok(TOK_Q, "inflight");
}

/* ---- counters ---- */

static void test_svc_tenants_stats_count_the_callers_own_calls(void **state) {
    (void)state;
    Attnd__V1__GetStatsResponse *b0 = stats_as(TOK_B);
    Attnd__V1__TenantStats before = *b0->tenants[0];
    uint64_t nf_before = status_calls(b0->tenants[0], "NOT_FOUND");
    assert_string_equal(b0->tenants[0]->tenant, "beta");
    assert_int_equal(b0->tenants[0]->weight, 3);
    create_ok(TOK_B, "counted", 256);
    bench_reply_t r;
    attend_as(TOK_B, M_ATTEND, "counted", 1, 0, 10, &r); /* work 10 x 10 */
    expect(&r, GRPC_STATUS_OK, NULL, "prefill");
    bench_reply_fini(&r);
    attend_as(TOK_B, M_ATTEND, "counted", 1, 10, 1, &r); /* work 1 x 11 */
    expect(&r, GRPC_STATUS_OK, NULL, "decode");
    bench_reply_fini(&r);
    attend_as(TOK_B, M_APPEND, "counted", 2, 0, 5, &r); /* work 5 x 5 */
    expect(&r, GRPC_STATUS_OK, NULL, "append");
    bench_reply_fini(&r);
    attend_as(TOK_B, M_ATTEND, "counted", 1, 99, 1, &r); /* past the end: no tokens */
    expect(&r, GRPC_STATUS_OUT_OF_RANGE, NULL, "past the end");
    bench_reply_fini(&r);
    get_as(TOK_B, "nothing-here", &r);
    bench_reply_fini(&r);
    close_ok(TOK_B, "counted");
    /* alpha's calls meanwhile count for alpha only */
    create_ok(TOK_A, "elsewhere", 64);
    close_ok(TOK_A, "elsewhere");
    Attnd__V1__GetStatsResponse *b1 = stats_as(TOK_B);
    const Attnd__V1__TenantStats *after = b1->tenants[0];
    assert_int_equal(after->calls - before.calls, 8); /* 7 above and the first GetStats */
    assert_int_equal(after->tokens - before.tokens, 16);
    assert_int_equal(after->work - before.work, 100 + 11 + 25);
    assert_int_equal(status_calls(after, "OUT_OF_RANGE"), 1);
    assert_int_equal(status_calls(after, "NOT_FOUND") - nf_before, 1);
    assert_true(after->device_ns > before.device_ns);
    assert_int_equal(after->sessions, 0);
    attnd__v1__get_stats_response__free_unpacked(b0, NULL);
    attnd__v1__get_stats_response__free_unpacked(b1, NULL);
}

int main(void) {
    tu_base_seed("test_svc_tenants");
    grpc_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svc_tenants_every_rpc_checks_the_token),
        cmocka_unit_test(test_svc_tenants_foreign_and_missing_sessions_read_the_same),
        cmocka_unit_test(test_svc_tenants_session_and_kv_quotas_are_exact),
        cmocka_unit_test(test_svc_tenants_inflight_quota_is_exact),
        cmocka_unit_test(test_svc_tenants_stats_count_the_callers_own_calls),
    };
    int rc = cmocka_run_group_tests_name("svc_tenants", tests, setup, teardown);
    grpc_shutdown();
    return rc;
}

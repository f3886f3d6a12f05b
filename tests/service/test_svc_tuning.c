/* Tuning in a device worker (service/svc_worker.c + attention/att_tune.c): the test plays the
 * pool's dispatcher on the worker's PAIR socket, so it decides exactly which requests wait on the
 * socket. Shows, in completed work and with no timing assertion, that calls are never delayed by
 * tuning (no tuning step runs while a request waits), that a job started by one call is finished
 * when the worker is idle and adopted by later calls, and that frozen mode never tunes.
 * Label: e2e. */
#include "tests/test_util.h"

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "attention/att_dtype.h"
#include "cache/kvc.h"
#include "service/svc_arena.h"
#include "service/svc_msg.h"
#include "service/svc_worker.h"
#include "tuning/tun.h"

#define HQ 32u
#define HKV 8u
#define D 128u
#define ARENA_BYTES (64u << 20)

typedef struct rig {
    void *zctx, *sock;
    svc_arena_t *arena;
    pthread_t thread;
    svc_worker_cfg_t wcfg;
    char endpoint[64];
    char dir[64];
    uint64_t next_job;
    uint64_t q_off, k_off, v_off, out_off; /* room for 512 tokens each */
} rig_t;

static void *worker_main(void *p) {
    rig_t *r = p;
    svc_worker_run(&r->wcfg, r->zctx);
    return NULL;
}

static svc_rep_t recv_rep(rig_t *r) {
    svc_rep_t rep;
    assert_int_equal(zmq_recv(r->sock, &rep, sizeof rep, 0), (int)sizeof rep);
    assert_int_equal(rep.magic, SVC_MSG_MAGIC);
    return rep;
}

static void rig_start(rig_t *r, const char *mode) {
    memset(r, 0, sizeof *r);
    snprintf(r->dir, sizeof r->dir, "/tmp/attnd-wtune-XXXXXX");
    assert_non_null(mkdtemp(r->dir));
    /* the worker reads the policy svc_serve.c puts in the environment */
    setenv("ATTND_TUNING_DIR", r->dir, 1);
    setenv("ATTND_TUNING", mode, 1);
    r->zctx = zmq_ctx_new();
    assert_non_null(r->zctx);
    snprintf(r->endpoint, sizeof r->endpoint, "inproc://tune-%ld", (long)getpid());
    r->sock = zmq_socket(r->zctx, ZMQ_PAIR);
    assert_int_equal(zmq_bind(r->sock, r->endpoint), 0);
    assert_int_equal(svc_arena_create("tune", ARENA_BYTES, NULL, &r->arena), AT_OK);
    const uint64_t row_q = (uint64_t)HQ * D * 2, row_kv = (uint64_t)HKV * D * 2;
    assert_int_equal(svc_arena_alloc(r->arena, 512 * row_q, &r->q_off), AT_OK);
    assert_int_equal(svc_arena_alloc(r->arena, 512 * row_q, &r->out_off), AT_OK);
    assert_int_equal(svc_arena_alloc(r->arena, 512 * row_kv, &r->k_off), AT_OK);
    assert_int_equal(svc_arena_alloc(r->arena, 512 * row_kv, &r->v_off), AT_OK);
    uint8_t *base = svc_arena_base(r->arena);
    for (uint64_t i = 0; i < 512 * (uint64_t)HQ * D; i++)
        att_store(ATT_DTYPE_BF16, base + r->q_off, i, (float)((i * 7919) % 200) / 100.0f - 1.0f);
    for (uint64_t i = 0; i < 512 * (uint64_t)HKV * D; i++) {
        att_store(ATT_DTYPE_BF16, base + r->k_off, i, (float)((i * 104729) % 200) / 100.0f - 1.f);
        att_store(ATT_DTYPE_BF16, base + r->v_off, i, (float)((i * 1299709) % 200) / 100.0f - 1.f);
    }
    r->wcfg = (svc_worker_cfg_t){.endpoint = r->endpoint, .device = "cpu", .cpu_threads = 1,
                                 .arena_name = svc_arena_name(r->arena),
                                 .arena_bytes = svc_arena_size(r->arena)};
    assert_int_equal(pthread_create(&r->thread, NULL, worker_main, r), 0);
    svc_rep_t ready = recv_rep(r);
    assert_int_equal(ready.err, AT_OK);
}

static void rig_stop(rig_t *r) {
    svc_req_t stop = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_STOP, .job_id = ++r->next_job};
    assert_int_equal(zmq_send(r->sock, &stop, sizeof stop, 0), (int)sizeof stop);
    svc_rep_t rep = recv_rep(r);
    assert_int_equal(rep.err, AT_OK);
    pthread_join(r->thread, NULL);
    zmq_close(r->sock);
    zmq_ctx_term(r->zctx);
    svc_arena_destroy(&r->arena);
    DIR *d = opendir(r->dir);
    struct dirent *e;
    char p[1400];
    while (d != NULL && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", r->dir, e->d_name);
        unlink(p);
    }
    if (d != NULL)
        closedir(d);
    rmdir(r->dir);
}

static void create_session(rig_t *r, uint64_t id) {
    svc_req_t rq = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_CREATE, .job_id = ++r->next_job,
                    .session_id = id, .kv_capacity_tokens = 8192, .num_layers = 1,
                    .num_query_heads = HQ, .num_kv_heads = HKV, .head_dim = D,
                    .dtype = ATT_DTYPE_BF16, .block_size = 16};
    assert_int_equal(zmq_send(r->sock, &rq, sizeof rq, ZMQ_SNDMORE), (int)sizeof rq);
    assert_int_equal(zmq_send(r->sock, "", 0, 0), 0);
    svc_rep_t rep = recv_rep(r);
    assert_int_equal(rep.err, AT_OK);
}

/* Sends (does not wait for) an ATTEND of n tokens of seq from pos. */
static void send_attend(rig_t *r, uint64_t session, uint64_t seq, uint32_t pos, uint32_t n) {
    const uint64_t row_q = (uint64_t)HQ * D * 2, row_kv = (uint64_t)HKV * D * 2;
    svc_req_t rq = {.magic = SVC_MSG_MAGIC, .op = SVC_OP_ATTEND, .job_id = ++r->next_job,
                    .session_id = session, .layer = 0, .num_items = 1,
                    .q_off = r->q_off, .q_len = n * row_q, .k_off = r->k_off, .k_len = n * row_kv,
                    .v_off = r->v_off, .v_len = n * row_kv, .out_off = r->out_off,
                    .out_len = n * row_q};
    kvc_span_t span = {.seq_id = seq, .start_pos = pos, .num_tokens = n};
    assert_int_equal(zmq_send(r->sock, &rq, sizeof rq, ZMQ_SNDMORE), (int)sizeof rq);
    assert_int_equal(zmq_send(r->sock, &span, sizeof span, 0), (int)sizeof span);
}

/* A call that arrives while a tuning job runs waits for at most the step in progress, and calls
 * queued behind it run before any further step: the tuning steps counted in their replies do not
 * move. When the worker is idle again, the job finishes and later calls run the winner. */
static void test_svc_tuning_calls_run_before_the_next_tuning_step(void **state) {
    (void)state;
    rig_t r;
    rig_start(&r, "on");
    create_session(&r, 1);
    /* a prefill of a new bucket: heuristic now, a tuning job queued (50 configs x 4 runs) */
    send_attend(&r, 1, 1, 0, 64);
    svc_rep_t a = recv_rep(&r);
    assert_int_equal(a.err, AT_OK);
    assert_int_equal(a.tuning_source, TUN_SOURCE_HEURISTIC);
    assert_int_equal(a.tuning_jobs_pending, 1);
    assert_int_equal(a.tuning_runs, 0); /* nothing runs before the reply is sent */
    /* the worker now tunes; three calls arrive together and all wait on the socket */
    enum { N = 3 };
    for (uint32_t i = 0; i < N; i++)
        send_attend(&r, 1, 10 + i, 0, 16);
    svc_rep_t b[N];
    for (uint32_t i = 0; i < N; i++) {
        b[i] = recv_rep(&r);
        assert_int_equal(b[i].err, AT_OK);
    }
    /* tuning was under way when they arrived (the first job is far from done) ... */
    assert_true(b[0].tuning_jobs_pending >= 1);
    /* ... and no tuning step ran between them: each ran as soon as the one before it ended */
    for (uint32_t i = 1; i < N; i++)
        assert_int_equal(b[i].tuning_runs, b[0].tuning_runs);
    /* idle: the jobs finish; a call of the first bucket then runs the tuned config */
    svc_rep_t c;
    do {
        usleep(20000);
        send_attend(&r, 1, 1, 63, 1); /* a one-token call over seq 1: its reply has the figures */
        c = recv_rep(&r);
        assert_int_equal(c.err, AT_OK);
    } while (c.tuning_jobs_pending > 0);
    send_attend(&r, 1, 2, 0, 64);
    svc_rep_t d = recv_rep(&r);
    assert_int_equal(d.err, AT_OK);
    assert_int_equal(d.tuning_source, TUN_SOURCE_TUNED);
    assert_true(d.tuning_runs > b[0].tuning_runs);
    assert_true(d.tuning_config[0] != '\0');
    rig_stop(&r);
}

/* --tuning=frozen: new buckets run the heuristic and no tuning run ever happens. */
static void test_svc_tuning_frozen_never_tunes(void **state) {
    (void)state;
    rig_t r;
    rig_start(&r, "frozen");
    create_session(&r, 1);
    for (uint32_t i = 0; i < 6; i++) {
        send_attend(&r, 1, 1 + i, 0, 1u << i);
        svc_rep_t rep = recv_rep(&r);
        assert_int_equal(rep.err, AT_OK);
        assert_int_equal(rep.tuning_source, TUN_SOURCE_HEURISTIC);
        assert_int_equal(rep.tuning_jobs_pending, 0);
        assert_int_equal(rep.tuning_runs, 0);
        usleep(10000); /* idle time that a tuning job would use */
    }
    send_attend(&r, 1, 1, 0, 1);
    svc_rep_t rep = recv_rep(&r);
    assert_int_equal(rep.tuning_runs, 0);
    rig_stop(&r);
}

int main(void) {
    tu_base_seed("test_svc_tuning");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svc_tuning_calls_run_before_the_next_tuning_step),
        cmocka_unit_test(test_svc_tuning_frozen_never_tunes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* See svc_testsrv.h. Thread: the test's thread. */
#include "tests/service/svc_testsrv.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include <cmocka.h>

at_err_t test_srv_start(test_srv_t *t, const svc_pool_cfg_t *cfgs, uint32_t n,
                        const svc_server_cfg_t *base, at_diag_t *diag) {
    memset(t, 0, sizeof *t);
    if (n == 0 || n > TEST_SRV_MAX_POOLS)
        return at_diag_set(diag, AT_ERR_INTERNAL, "test server: %u pools", n);
    t->zctx = zmq_ctx_new();
    if (t->zctx == NULL)
        return at_diag_set(diag, AT_ERR_IO, "zmq_ctx_new failed");
    at_err_t e = AT_OK;
    for (uint32_t i = 0; i < n && e == AT_OK; i++)
        if ((e = svc_pool_create(&cfgs[i], t->zctx, diag, &t->pools[i])) == AT_OK)
            t->num_pools++;
    svc_server_cfg_t sc = *base;
    sc.listen = "127.0.0.1:0";
    sc.pools = t->pools;
    sc.num_pools = n;
    if (e == AT_OK)
        e = svc_server_create(&sc, diag, &t->srv);
    if (e != AT_OK) {
        test_srv_stop(t);
        return e;
    }
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", svc_server_port(t->srv));
    t->ch = bench_channel_create(target);
    t->cq = bench_cq_create();
    return AT_OK;
}

void test_srv_stop(test_srv_t *t) {
    if (t->ch != NULL)
        grpc_channel_destroy(t->ch);
    bench_cq_destroy(&t->cq);
    if (t->srv != NULL)
        svc_server_drain(t->srv, 1000);
    for (uint32_t i = t->num_pools; i-- > 0;)
        svc_pool_stop(t->pools[i]);
    svc_server_destroy(&t->srv);
    for (uint32_t i = t->num_pools; i-- > 0;)
        svc_pool_destroy(&t->pools[i]);
    if (t->zctx != NULL)
        zmq_ctx_term(t->zctx);
    memset(t, 0, sizeof *t);
}

void test_srv_call(grpc_channel *ch, grpc_completion_queue *cq, const char *token,
                   const char *method, const ProtobufCMessage *msg, int timeout_ms,
                   bench_reply_t *r) {
    const size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n + 1);
    if (buf == NULL)
        fail_msg("%s: out of memory", method);
    protobuf_c_message_pack(msg, buf);
    bench_call_cfg_t cfg = {.method = method, .token = token, .timeout_ms = timeout_ms,
                            .keep_body = true};
    const int rc = bench_call_unary(ch, cq, &cfg, buf, n, r);
    free(buf);
    if (rc != 0)
        fail_msg("%s: %s", method, r->details);
}

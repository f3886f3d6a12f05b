/* A real attnd server inside a test program, for the end-to-end tests: device pools, the gRPC
 * server on 127.0.0.1 at a free port, and a client channel to it (the C client of bench/).
 * Thread: the test's thread. */
#ifndef AT_TESTS_SERVICE_SVC_TESTSRV_H
#define AT_TESTS_SERVICE_SVC_TESTSRV_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "bench/bench_client.h"
#include "common/at_err.h"
#include "service/svc_pool.h"
#include "service/svc_server.h"

#define TEST_SRV_MAX_POOLS 4

typedef struct test_srv {
    void *zctx;                              /* owned */
    svc_pool_t *pools[TEST_SRV_MAX_POOLS];   /* owned; [num_pools] */
    uint32_t num_pools;
    svc_server_t *srv;                       /* owned */
    grpc_channel *ch;                        /* owned; the client's channel to srv */
    grpc_completion_queue *cq;               /* owned; the client's */
} test_srv_t;

/* Starts one pool per cfgs[i] and a server over them configured as *base (its listen address and
 * pools are set here; tenants, limits are the caller's), then a channel to it. On failure
 * everything started is stopped again, *t is zeroed and diag says why. */
at_err_t test_srv_start(test_srv_t *t, const svc_pool_cfg_t *cfgs, uint32_t n,
                        const svc_server_cfg_t *base, at_diag_t *diag);

/* Drains and stops the server and the pools; t may be zeroed (nothing started). */
void test_srv_stop(test_srv_t *t);

/* One unary call on ch/cq with msg as the request, as token (NULL: none), deadline timeout_ms;
 * fails the test when the call cannot be made. r: the caller's (bench_reply_fini). */
void test_srv_call(grpc_channel *ch, grpc_completion_queue *cq, const char *token,
                   const char *method, const ProtobufCMessage *msg, int timeout_ms,
                   bench_reply_t *r);

#endif

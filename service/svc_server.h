/* attnd's gRPC server on gRPC's C core: the attnd.v1.Attention service and grpc.health.v1.Health
 * (Check), over the devices' pools.
 *
 * Lifecycle: svc_server_create (binds and serves), svc_server_drain (stops taking calls and lets
 * in-flight ones finish within a grace period, then cancels the rest), svc_pool_stop on every
 * pool (their queued jobs finish or are cancelled, answering their calls), svc_server_destroy
 * (waits for every call to end), then svc_pool_destroy (responses point into the pools' arenas
 * until their calls end). Thread: create/drain/destroy from one thread; the server runs its own
 * completion-queue threads. */
#ifndef AT_SERVICE_SVC_SERVER_H
#define AT_SERVICE_SVC_SERVER_H

#include <stdint.h>

#include "common/at_err.h"
#include "service/svc_pool.h"
#include "tenancy/ten_tenant.h"

typedef struct svc_server svc_server_t;

typedef struct svc_server_cfg {
    const char *listen;          /* borrowed; "HOST:PORT"; port 0 = any free port */
    uint32_t cq_threads;         /* completion-queue threads; 0 = 2 */
    uint64_t max_message_bytes;  /* receive and send limit; 0 = 256 MiB */
    uint32_t max_streams;        /* concurrent streams per connection; 0 = 1024 */
    svc_pool_t *const *pools;    /* [num_pools], one per device, pools[0] the default; the array is
                                  * copied, the pools are borrowed and must outlive the server */
    uint32_t num_pools;
    ten_tenants_t *tenants;      /* borrowed, must outlive the server: who may call; NULL or an
                                  * open table (ten_tenants_create_open) admits everyone as one
                                  * tenant */
} svc_server_cfg_t;

/* Starts serving. AT_ERR_CONFIG (bad address, port taken: diag says), AT_ERR_NOMEM. */
at_err_t svc_server_create(const svc_server_cfg_t *cfg, at_diag_t *diag, svc_server_t **out);

/* The port the server is bound to. */
int svc_server_port(const svc_server_t *s);

/* Stops taking calls; waits up to grace_ms for in-flight calls, then cancels what is left (their
 * queued work is dropped, not run). Health Check answers NOT_SERVING from here on. */
void svc_server_drain(svc_server_t *s, uint32_t grace_ms);

/* Waits for every call to end, stops the threads and frees the server. NULL allowed. */
void svc_server_destroy(svc_server_t **s);

#endif

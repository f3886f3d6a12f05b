/* Before and after measuring: is the server there, the sessions (CreateSession, CloseSession),
 * and their caches filled to the requested context with Append. */
#ifndef AT_BENCH_AB_SETUP_H
#define AT_BENCH_AB_SETUP_H

#include <grpc/grpc.h>
#include <stdbool.h>
#include <stdint.h>

#include "bench/ab_preset.h"
#include "bench/ab_work.h"

/* A session of the run. */
typedef struct ab_session {
    char name[128];
    const ab_model_t *model; /* borrowed from the run's model table */
    uint16_t tenant;         /* index into the run's tenants */
    const char *token;       /* borrowed: the tenant's; "" = none */
    const char *device;      /* borrowed */
    uint32_t slots;          /* callers using it, each with sequences of its own (ab_work.h) */
    bool created;            /* CreateSession succeeded: close it at the end */
} ab_session_t;

/* Asks the server's health service whether it serves. Returns 0, or -1 after saying on stderr
 * that target cannot be reached or does not serve. Thread: main. */
int ab_setup_check_server(grpc_channel *ch, const char *target, const char *token);

/* Creates s on the server with room for capacity_tokens, with the first layers layers of its
 * model (at most the preset's): the server keeps KV for every layer of a session, and the bench
 * calls only layers 0..layers-1. Returns 0, or -1 after a message. */
int ab_setup_create(grpc_channel *ch, ab_session_t *s, uint32_t layers, uint64_t capacity_tokens);

/* Fills the caches of ss[0..n) to shape->ctx tokens on layers 0..layers-1 with Append: each
 * slot's decode sequences when decode, its prefill sequence when prefill. Progress on stderr once
 * a second. Returns 0, or -1 after a message (also when interrupted). */
int ab_setup_fill(grpc_channel *ch, const ab_session_t *ss, uint32_t n, const ab_shape_t *shape,
                  uint32_t layers, bool decode, bool prefill);

/* Closes every created session of ss[0..n) (a failure is a warning on stderr). */
void ab_setup_close(grpc_channel *ch, ab_session_t *ss, uint32_t n);

#endif

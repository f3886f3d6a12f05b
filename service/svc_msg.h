/* The message protocol between the server and a device's worker, over one ZMQ_PAIR socket
 * (inproc:// for a worker thread, ipc:// for a worker process).
 *
 * A request is one or two frames: an svc_req_t, then for some operations a frame of items
 * (ATTEND: kvc_span_t chunks; RELEASE: uint64_t seq_ids; CREATE: the model's arrays, see below).
 * A reply is one frame, an svc_rep_t. The worker answers requests one at a time, in the order it
 * received them.
 *
 * Dynamic batching: ATTEND (or APPEND) requests of one session and layer over distinct sequences
 * may travel as a batch: batch_size consecutive requests, batch_index 0..batch_size-1. The worker
 * receives the whole batch, runs it as one backend call where it can (att_ctx_run_many), and
 * answers each request with its own reply, in order. Tensors are never in messages: they are regions of the pool's shared-memory
 * arena, named by offset and length. Both ends run on one host with one byte order; the magic
 * field catches a mismatched build. */
#ifndef AT_SERVICE_SVC_MSG_H
#define AT_SERVICE_SVC_MSG_H

#include <stdint.h>

#include "attention/att_model.h"
#include "tuning/tun.h"

#define SVC_MSG_MAGIC 0x61747431u /* "att1" */
#define SVC_BATCH_MAX 64u         /* requests in one batch, at most */

typedef enum svc_op {
    SVC_OP_READY = 1,   /* worker -> server, once, after it connected (reply frame only) */
    SVC_OP_CREATE = 2,  /* a session's KV storage on this device */
    SVC_OP_CLOSE = 3,
    SVC_OP_ATTEND = 4,
    SVC_OP_RELEASE = 5,
    SVC_OP_STOP = 6,    /* the worker answers, then exits */
    SVC_OP_APPEND = 7,  /* as ATTEND, k and v only */
} svc_op_t;

typedef struct svc_req {
    uint32_t magic;
    uint32_t op;
    uint64_t job_id;
    uint64_t session_id;     /* the server's number for the session, unique per process */
    int64_t deadline_ns;     /* CLOCK_MONOTONIC; 0 = none. Work past it is answered, not run */
    uint32_t layer;          /* ATTEND */
    uint32_t num_items;      /* items in frame 2 */
    uint32_t batch_size;     /* requests in this one's batch; 0 or 1 = alone */
    uint32_t batch_index;    /* its place in the batch */
    uint64_t q_off, k_off, v_off, out_off; /* ATTEND: arena regions */
    uint64_t q_len, k_len, v_len, out_len;
    /* CREATE: the model's scalars; frame 2 holds layer_sliding_window (uint32 x n_windows), then
     * alibi_slopes and sinks (float x n_alibi, x n_sinks). */
    uint64_t kv_capacity_tokens;
    uint32_t num_layers, num_query_heads, num_kv_heads, head_dim, dtype, block_size;
    uint32_t sliding_window, n_windows, n_alibi, n_sinks;
    float scale, soft_cap;
} svc_req_t;

typedef struct svc_rep {
    uint32_t magic;
    int32_t err;             /* at_err_t */
    uint64_t job_id;
    /* the session's state after the job (CREATE, ATTEND, RELEASE) */
    uint64_t kv_capacity_tokens;
    uint64_t kv_used_tokens;
    uint32_t num_sequences;
    uint32_t released;       /* RELEASE */
    uint64_t calls;          /* ATTEND and APPEND requests of the session that succeeded */
    uint64_t backend_runs;   /* backend runs they took: fewer when batches were merged */
    /* the session's tuning (att_tuner_info_t): the last batch's config and its source */
    uint32_t tuning_source;  /* tun_source_t */
    uint32_t tuning_jobs_pending;
    uint64_t tuning_runs;
    char tuning_config[TUN_CFG_TEXT_MAX];
    char diag[224];          /* detail for err, NUL-terminated */
} svc_rep_t;

#endif

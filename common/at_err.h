/* One error table for all of attnd.
 *
 * Every failure in the tree is an at_err_t. The table below is the only place a code is defined:
 * name, the gRPC status it maps to (as the bare status name; only service/ turns it into a
 * grpc_status_code), and a short message. Adding a code is a one-line change. */
#ifndef AT_COMMON_AT_ERR_H
#define AT_COMMON_AT_ERR_H

#define AT_ERR_TABLE(X)                                                                          \
    X(OK, OK, "ok")                                                                              \
    X(NOMEM, RESOURCE_EXHAUSTED, "out of host memory")                                          \
    X(INTERNAL, INTERNAL, "internal error")                                                      \
    X(DEVICE, INTERNAL, "device error")                                                          \
    X(UNSUPPORTED, UNIMPLEMENTED, "not supported by this backend")                               \
    X(MODEL_LAYERS, INVALID_ARGUMENT, "num_layers must be at least 1")                           \
    X(MODEL_HEADS, INVALID_ARGUMENT, "head counts must be at least 1")                           \
    X(MODEL_GQA, INVALID_ARGUMENT, "num_query_heads must be a multiple of num_kv_heads")        \
    X(MODEL_HEAD_DIM, INVALID_ARGUMENT, "head_dim must be a multiple of 8, at most 256")         \
    X(MODEL_DTYPE, INVALID_ARGUMENT, "dtype must be f32, f16 or bf16")                           \
    X(MODEL_BLOCK_SIZE, INVALID_ARGUMENT, "block_size must be a power of two from 8 to 256")     \
    X(MODEL_SCALE, INVALID_ARGUMENT, "scale must be finite and non-negative")                    \
    X(MODEL_WINDOW, INVALID_ARGUMENT, "layer_sliding_window needs one entry per layer")          \
    X(MODEL_SOFT_CAP, INVALID_ARGUMENT, "logits_soft_cap must be finite and non-negative")       \
    X(MODEL_ALIBI, INVALID_ARGUMENT, "alibi_slopes needs one finite entry per query head")       \
    X(MODEL_SINKS, INVALID_ARGUMENT, "sinks needs one finite entry per query head")              \
    X(KV_CAPACITY, INVALID_ARGUMENT, "kv_capacity_tokens must be at least one block")            \
    X(CALL_LAYER, INVALID_ARGUMENT, "layer out of range")                                        \
    X(CALL_NO_CHUNKS, INVALID_ARGUMENT, "call has no chunks")                                    \
    X(CALL_EMPTY_CHUNK, INVALID_ARGUMENT, "chunk has no tokens")                                 \
    X(CALL_DUP_SEQ, INVALID_ARGUMENT, "seq_id appears twice in one call")                        \
    X(CALL_POSITION, INVALID_ARGUMENT, "start_pos + num_tokens exceeds the position limit")      \
    X(CALL_Q_BYTES, INVALID_ARGUMENT, "q has the wrong byte length")                             \
    X(CALL_K_BYTES, INVALID_ARGUMENT, "k has the wrong byte length")                             \
    X(CALL_V_BYTES, INVALID_ARGUMENT, "v has the wrong byte length")                             \
    X(CALL_OUT_BYTES, INVALID_ARGUMENT, "out has the wrong byte length")                         \
    X(KV_PAST_END, OUT_OF_RANGE, "start_pos is past the cached length")                          \
    X(KV_FULL, RESOURCE_EXHAUSTED, "no free kv blocks")                                          \
    X(KV_NO_SEQ, NOT_FOUND, "sequence not in the kv cache")                                     \
    X(WIRE_MALFORMED, INVALID_ARGUMENT, "request is not a valid protobuf message")              \
    X(MSG_TOO_LARGE, RESOURCE_EXHAUSTED, "message is over the size limit")                     \
    X(SESSION_NAME, INVALID_ARGUMENT, "session name must be 1-128 of [A-Za-z0-9._:/-]")          \
    X(SESSION_NOT_FOUND, NOT_FOUND, "no such session")                                          \
    X(SESSION_EXISTS, ALREADY_EXISTS, "session exists with a different config")                 \
    X(DEVICE_UNKNOWN, INVALID_ARGUMENT, "no such device")                                       \
    X(SHM_FULL, UNAVAILABLE, "shared tensor memory is full, retry")                             \
    X(OVERLOADED, UNAVAILABLE, "device queue is full, retry")                                   \
    X(SHUTTING_DOWN, UNAVAILABLE, "server is shutting down")                                    \
    X(WORKER_LOST, UNAVAILABLE, "the device worker stopped, retry")                             \
    X(DEADLINE, DEADLINE_EXCEEDED, "deadline passed before the work ran")                       \
    X(CANCELLED, CANCELLED, "the call was cancelled")                                           \
    X(HEALTH_SERVICE, NOT_FOUND, "unknown service name")                                        \
    X(CONFIG, INVALID_ARGUMENT, "bad server configuration")                                     \
    X(NOT_READY, UNAVAILABLE, "the kernel is still being compiled")                             \
    X(IO, INTERNAL, "system call failed")                                                       \
    X(AUTH_MISSING, UNAUTHENTICATED, "no bearer token in the authorization metadata")          \
    X(AUTH_BAD, UNAUTHENTICATED, "the bearer token is not valid")                              \
    X(TENANTS_FILE, INVALID_ARGUMENT, "the tenants file is not valid")                         \
    X(QUOTA_SESSIONS, RESOURCE_EXHAUSTED, "tenant quota exceeded: sessions")                   \
    X(QUOTA_KV_BYTES, RESOURCE_EXHAUSTED, "tenant quota exceeded: kv_bytes")                   \
    X(QUOTA_INFLIGHT, RESOURCE_EXHAUSTED, "tenant quota exceeded: inflight_calls")             \
    X(SESSION_LOST, FAILED_PRECONDITION, "session lost, create it again")

typedef enum at_err {
#define AT_ERR_ENUM_(name, status, msg) AT_ERR_##name,
    AT_ERR_TABLE(AT_ERR_ENUM_)
#undef AT_ERR_ENUM_
    AT_ERR_COUNT_
} at_err_t;

#define AT_OK AT_ERR_OK

/* "AT_ERR_KV_FULL"-style name without the prefix ("KV_FULL"); "UNKNOWN" for a value outside the
 * table. Static storage; any thread. */
const char *at_err_name(at_err_t e);
/* The table's short message; "unknown error" outside the table. Static storage; any thread. */
const char *at_err_str(at_err_t e);
/* The gRPC status name ("INVALID_ARGUMENT"); "INTERNAL" outside the table. Any thread. */
const char *at_err_status_name(at_err_t e);

/* Room for a human-readable detail (field, expected, got) that a validator fills on failure.
 * Callers may pass NULL when they do not want it. */
typedef struct at_diag {
    char msg[224];
} at_diag_t;

/* printf-style; does nothing when d is NULL. Returns e so callers can write
 * `return at_diag_set(d, AT_ERR_X, "...", ...)`. Any thread. */
at_err_t at_diag_set(at_diag_t *d, at_err_t e, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif

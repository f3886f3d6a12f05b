/* Expands the error table's gRPC column (see common/at_err.h). Pure; any thread. */
#include "service/svc_status.h"

static const grpc_status_code codes[] = {
#define X_(name, status, msg) GRPC_STATUS_##status,
    AT_ERR_TABLE(X_)
#undef X_
};

grpc_status_code svc_status_of(at_err_t e) {
    if ((unsigned)e >= (unsigned)AT_ERR_COUNT_)
        return GRPC_STATUS_INTERNAL;
    return codes[e];
}

const char *svc_status_name(grpc_status_code code) {
    static const char *const names[] = {
        "OK",           "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED", "NOT_FOUND",    "ALREADY_EXISTS",    "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",   "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL",         "UNAVAILABLE",       "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    if ((unsigned)code >= sizeof names / sizeof names[0])
        return "UNKNOWN";
    return names[code];
}

/* The one place where attnd's error table meets gRPC status codes. */
#ifndef AT_SERVICE_SVC_STATUS_H
#define AT_SERVICE_SVC_STATUS_H

#include <grpc/status.h>

#include "common/at_err.h"

/* The gRPC status of e, from the table's status column; GRPC_STATUS_INTERNAL for a value outside
 * the table. Pure; any thread. */
grpc_status_code svc_status_of(at_err_t e);

/* The status's name as gRPC spells it ("OK", "NOT_FOUND", ...); "UNKNOWN" outside 0..16. Static
 * storage; any thread. */
const char *svc_status_name(grpc_status_code code);

#endif

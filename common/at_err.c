/* The error table's generated lookups. Pure functions; any thread. */
#include "common/at_err.h"

#include <stdarg.h>
#include <stdio.h>

static const char *const names[] = {
#define X_(name, status, msg) #name,
    AT_ERR_TABLE(X_)
#undef X_
};

static const char *const msgs[] = {
#define X_(name, status, msg) msg,
    AT_ERR_TABLE(X_)
#undef X_
};

static const char *const statuses[] = {
#define X_(name, status, msg) #status,
    AT_ERR_TABLE(X_)
#undef X_
};

static int in_table(at_err_t e) { return (unsigned)e < (unsigned)AT_ERR_COUNT_; }

const char *at_err_name(at_err_t e) { return in_table(e) ? names[e] : "UNKNOWN"; }

const char *at_err_str(at_err_t e) { return in_table(e) ? msgs[e] : "unknown error"; }

const char *at_err_status_name(at_err_t e) { return in_table(e) ? statuses[e] : "INTERNAL"; }

at_err_t at_diag_set(at_diag_t *d, at_err_t e, const char *fmt, ...) {
    if (d != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(d->msg, sizeof d->msg, fmt, ap);
        va_end(ap);
    }
    return e;
}

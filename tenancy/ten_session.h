/* Model sessions of the server: names, resolved models, where each lives, and its latest KV
 * figures. Every session belongs to one tenant, and names are per tenant: two tenants may both
 * have "s1", and a lookup never sees another tenant's sessions (it answers exactly as for a name
 * that does not exist). A session holds its share of its tenant's quotas (one session, its KV
 * bytes) from creation until it is closed. A session's KV cache and kernels live with its
 * device's worker; this is the server's record of it.
 *
 * Sessions are refcounted: the registry holds one reference while the name is registered, and
 * every call holds one while it uses the session. Thread: any; one mutex guards the registry's
 * map, another each session's figures. */
#ifndef AT_TENANCY_TEN_SESSION_H
#define AT_TENANCY_TEN_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "attention/att_model.h"
#include "common/at_err.h"
#include "tenancy/ten_tenant.h"
#include "tuning/tun.h"

#define TEN_SESSION_NAME_MAX 128u

typedef struct ten_registry ten_registry_t;
typedef struct ten_session ten_session_t;

typedef struct ten_session_figures {
    uint64_t kv_capacity_tokens;
    uint64_t kv_used_tokens;
    uint32_t num_sequences;
    uint64_t calls;        /* Attend and Append calls that succeeded */
    uint64_t backend_runs; /* device runs they took (dynamic batching merges calls) */
    uint32_t tuning_source;       /* tun_source_t of the last batch's kernel config */
    uint32_t tuning_jobs_pending;
    uint64_t tuning_runs;         /* tuning steps run for the session */
    char tuning_config[TUN_CFG_TEXT_MAX]; /* the last batch's kernel config, "" before one */
} ten_session_figures_t;

/* What a session was created with, besides its resolved model. */
typedef struct ten_session_spec {
    const char *name;          /* borrowed for the call */
    const char *model_name;    /* borrowed for the call; ModelConfig.name */
    bool layer_windows_given;  /* the client sent layer_sliding_window */
    uint32_t sliding_window;   /* as the client sent it */
    uint64_t kv_capacity_tokens; /* as requested (before rounding) */
    const char *device;        /* borrowed for the call; resolved device name */
    void *device_handle;       /* the service's handle for that device (not owned) */
    uint32_t worker;           /* the device's worker the session is pinned to */
    ten_tenant_t *tenant;      /* borrowed; the session takes its own reference */
    uint64_t kv_bytes;         /* KV-cache bytes it reserves from the tenant's quota */
} ten_session_spec_t;

/* True when name is 1..128 bytes of [A-Za-z0-9._:/-]. */
bool ten_session_name_valid(const char *name, size_t len);

at_err_t ten_registry_create(ten_registry_t **out);
/* Drops the registry's references; sessions still held by calls live until their last unref. */
void ten_registry_destroy(ten_registry_t **r);

/* Registers a new session in state "creating", taking ownership of *model (set to NULL).
 * - name not registered: *out = the new session (a reference), *existing = false;
 * - registered, ready, same model, model name, capacity and device: *out = it, *existing = true
 *   (a create retried is answered with the session);
 * - registered with anything different: AT_ERR_SESSION_EXISTS;
 * - registered and still being created: AT_ERR_OVERLOADED (retry).
 * (All of this within spec->tenant's names.) A new session first reserves one session and
 * spec->kv_bytes of its tenant's quotas: AT_ERR_QUOTA_SESSIONS or AT_ERR_QUOTA_KV_BYTES (diag
 * names the quota) and nothing is registered when they are used up.
 * AT_ERR_SESSION_NAME for an invalid name, AT_ERR_NOMEM. *model is freed on every error. */
at_err_t ten_registry_begin_create(ten_registry_t *r, const ten_session_spec_t *spec,
                                   att_model_t **model, ten_session_t **out, bool *existing,
                                   at_diag_t *diag);

/* Ends a creation begun above: ok = the device created it (ready, with fig), or not (the name and
 * the quota are freed). Consumes nothing; the caller still holds its reference. */
void ten_registry_end_create(ten_registry_t *r, ten_session_t *s, bool ok,
                             const ten_session_figures_t *fig);

/* A ready session of tenant by name (a reference): AT_ERR_SESSION_NOT_FOUND otherwise, the same
 * whether another tenant has a session of that name, nobody has, or the name is malformed. */
at_err_t ten_registry_get(ten_registry_t *r, const ten_tenant_t *tenant, const char *name,
                          ten_session_t **out);

/* Unregisters a ready session of tenant (the name is free again) and hands over the registry's
 * reference; errors as ten_registry_get. Its quota stays reserved until
 * ten_session_release_quota or its last unref. */
at_err_t ten_registry_remove(ten_registry_t *r, const ten_tenant_t *tenant, const char *name,
                             ten_session_t **out);

/* References to every ready session of tenant, sorted by name; *out is malloc'd (free it after
 * unref-ing each). AT_ERR_NOMEM. */
at_err_t ten_registry_list(ten_registry_t *r, const ten_tenant_t *tenant, ten_session_t ***out,
                           size_t *n);

/* Gives the session's quota (one session, its KV bytes) back to its tenant, once: a closed
 * session stops counting at once, while calls may still hold the object. */
void ten_session_release_quota(ten_session_t *s);

void ten_session_ref(ten_session_t *s);
/* Drops a reference; the last one frees the session. NULL allowed; sets *s to NULL. */
void ten_session_unref(ten_session_t **s);

const char *ten_session_name(const ten_session_t *s);
const char *ten_session_model_name(const ten_session_t *s);
const att_model_t *ten_session_model(const ten_session_t *s);
bool ten_session_layer_windows_given(const ten_session_t *s);
uint32_t ten_session_sliding_window(const ten_session_t *s);
const char *ten_session_device(const ten_session_t *s);
void *ten_session_device_handle(const ten_session_t *s);
uint32_t ten_session_worker(const ten_session_t *s);
/* Borrowed; valid while the caller holds the session. */
ten_tenant_t *ten_session_tenant(const ten_session_t *s);
/* The number the device's worker knows the session by; unique for the process's lifetime. */
uint64_t ten_session_id(const ten_session_t *s);
/* The incarnation of the session's worker that holds its KV cache (the service's number, set
 * once the device created it, before ten_registry_end_create). When that worker dies, the
 * service's number moves on and the session is lost: it answers "session lost, create it again"
 * until it is closed, which frees its name and quota. Any thread. */
uint64_t ten_session_worker_epoch(const ten_session_t *s);
void ten_session_set_worker_epoch(ten_session_t *s, uint64_t epoch);
void ten_session_get_figures(ten_session_t *s, ten_session_figures_t *out);
void ten_session_set_figures(ten_session_t *s, const ten_session_figures_t *fig);

#endif

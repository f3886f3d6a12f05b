/* Tenants of the server: who may call (bearer tokens, kept only as SHA-256 digests), how much each
 * may hold at once (quotas), its share of device time (weight) and what it has used (counters).
 *
 * The tenant table (ten_tenants_t) comes from a tenants file (`attnd serve --tenants PATH`) or is
 * "open": one tenant named "default", no authentication, no quotas, weight 1. A file-backed table
 * can be reloaded (SIGHUP) without dropping calls; an open one stays open until restart.
 *
 * Tenants file (JSON, UTF-8):
 *
 *   {"version": 1,
 *    "tenants": [
 *      {"name": "acme", "weight": 3,
 *       "tokens_sha256": ["<64 hex digits: SHA-256 of the whole token, as `attnd token` prints>"],
 *       "quotas": {"sessions": 8, "kv_bytes": 34359738368, "inflight_calls": 64}}]}
 *
 * - version: required, 1.
 * - tenants: required, 1 to TEN_TENANTS_MAX objects, in any order.
 * - name: required, [A-Za-z0-9._-]{1,64}, unique in the file.
 * - weight: optional (default 1), an integer from 1 to TEN_WEIGHT_MAX: the tenant's share of a
 *   saturated device relative to the other tenants queued on it.
 * - tokens_sha256: required, an array (possibly empty: nobody can authenticate as the tenant) of
 *   64 hex digits (either case); a digest may appear once in the whole file.
 * - quotas: optional; each of sessions (open sessions), kv_bytes (KV-cache bytes reserved across
 *   its sessions) and inflight_calls (calls admitted and not yet finished) is optional, an integer
 *   from 0 to 2^63-1; a missing one is unlimited.
 * Unknown keys, wrong types, out-of-range values, duplicate keys, names or digests make the file
 * invalid: AT_ERR_TENANTS_FILE, with a diag naming the file, the tenant (index and name) and the
 * field, what was expected and what was found.
 *
 * Tenants are refcounted: the table holds one reference to each of its tenants, every call holds
 * one while it runs. A reload keeps the object (counters, current use, references) of every tenant
 * whose name stays, and gives it the new tokens, weight and quotas; tenants no longer listed can no
 * longer authenticate, find or list, but the table keeps their objects: a later reload that lists
 * the name again brings back the same tenant (its sessions, counters and current use). The table
 * frees a tenant object only when it is destroyed.
 *
 * Thread: any, for every function below (see ten_tenant.c for the locks). */
#ifndef AT_TENANCY_TEN_TENANT_H
#define AT_TENANCY_TEN_TENANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/at_err.h"

#define TEN_TENANT_NAME_MAX 64u   /* bytes, without the NUL */
#define TEN_TENANTS_MAX 4096u     /* tenants in one file */
#define TEN_WEIGHT_MAX 1000u
#define TEN_UNLIMITED UINT64_MAX  /* a quota that is not set */
#define TEN_STATUS_COUNT 17u      /* gRPC status codes 0 (OK) to 16 (UNAUTHENTICATED) */
#define TEN_TOKEN_MAX_BYTES 1024u /* longer presented tokens are AT_ERR_AUTH_BAD */
#define TEN_DIGEST_HEX_LEN 64u    /* SHA-256 as hex digits */
#define TEN_TOKEN_PREFIX "atk_"
#define TEN_TOKEN_LEN 47u         /* "atk_" + 43 base64url characters (32 random bytes) */

typedef struct ten_tenants ten_tenants_t;
typedef struct ten_tenant ten_tenant_t;

/* A tenant's limits; TEN_UNLIMITED where the file sets none. */
typedef struct ten_quotas {
    uint64_t sessions;       /* open sessions */
    uint64_t kv_bytes;       /* KV-cache bytes reserved across its open sessions */
    uint64_t inflight_calls; /* calls between reserve_call and release_call */
} ten_quotas_t;

/* A tenant's counters since it was first loaded (kept across reloads). Each field is exact; the
 * fields are read one after the other, so a snapshot taken while calls run may mix instants. */
typedef struct ten_tenant_stats {
    uint64_t calls;                       /* calls recorded, whatever their status */
    uint64_t tokens;                      /* attention tokens processed */
    uint64_t work;                        /* their cost: sum of num_tokens x (start_pos +
                                           * num_tokens) over the calls' chunks */
    uint64_t by_status[TEN_STATUS_COUNT]; /* calls that ended with each gRPC status; [0] is OK,
                                           * so errors = calls - by_status[0] */
    uint64_t queue_ns;                    /* total time calls waited in device queues */
    uint64_t device_ns;                   /* total time calls ran on devices */
    uint64_t sessions;                    /* open now (reserved, not released) */
    uint64_t kv_bytes;                    /* reserved now */
    uint64_t inflight_calls;              /* in flight now */
} ten_tenant_stats_t;

/* A fresh bearer token and the line to paste into tokens_sha256. */
typedef struct ten_token {
    char token[TEN_TOKEN_LEN + 1];           /* NUL-terminated; a secret: give it to the client */
    char sha256_hex[TEN_DIGEST_HEX_LEN + 1]; /* lowercase, NUL-terminated */
} ten_token_t;

/* True when name[0..len) matches [A-Za-z0-9._-]{1,64}. */
bool ten_tenant_name_valid(const char *name, size_t len);

/* ---- the tenant table ---- */

/* An open table: one tenant "default", no authentication, unlimited quotas, weight 1.
 * AT_ERR_NOMEM. On success *out is the caller's, to free with ten_tenants_destroy. */
at_err_t ten_tenants_create_open(ten_tenants_t **out);

/* A table loaded from the tenants file at path (format above). AT_ERR_TENANTS_FILE (unreadable
 * or invalid file; diag says where and why), AT_ERR_INTERNAL (libcrypto has no SHA-256),
 * AT_ERR_NOMEM. *out is set only on success; the caller owns it. */
at_err_t ten_tenants_load(const char *path, ten_tenants_t **out, at_diag_t *diag);

/* Drops the table's references to its tenants; tenants still referenced by calls live until their
 * last unref. NULL and *reg == NULL allowed; sets *reg to NULL. No other thread may use the table
 * once this starts. */
void ten_tenants_destroy(ten_tenants_t **reg);

/* True for a table made by ten_tenants_create_open (fixed for the table's life). */
bool ten_tenants_is_open(const ten_tenants_t *reg);

/* Reads path and, if it is valid, switches to it at once for every later authenticate, find and
 * list (see the top of this file for what stays). Lowering a quota below a tenant's current use
 * revokes nothing; it only stops new reservations. On any error nothing changes:
 * AT_ERR_TENANTS_FILE, AT_ERR_NOMEM, AT_ERR_CONFIG for an open table (start the server with
 * --tenants instead). Reloads are serialised; calls in other threads go on meanwhile. */
at_err_t ten_tenants_reload(ten_tenants_t *reg, const char *path, at_diag_t *diag);

/* The tenant a call's `authorization` metadata value names. value[0..len) need not be
 * NUL-terminated (a gRPC slice) and is only read during the call. Accepted: "Bearer" in any case,
 * one or more spaces, then a token of 1..TEN_TOKEN_MAX_BYTES printable non-space ASCII characters.
 * The token is compared with every stored digest in time that does not depend on which digest, or
 * how much of one, matches.
 * - open table: always the "default" tenant; value is not read;
 * - value NULL or len 0: AT_ERR_AUTH_MISSING;
 * - any other form, or a token that matches no tenant: AT_ERR_AUTH_BAD;
 * - AT_ERR_INTERNAL if hashing fails.
 * On success *out is a new reference (the caller unrefs it). diag never contains the token. */
at_err_t ten_tenants_authenticate(ten_tenants_t *reg, const char *value, size_t len,
                                  ten_tenant_t **out, at_diag_t *diag);

/* A new reference to the tenant named name (NUL-terminated), or NULL if the table has none. */
ten_tenant_t *ten_tenants_find(ten_tenants_t *reg, const char *name);

/* References to every tenant of the table, in file order; *out is malloc'd by the callee and the
 * caller's: unref each tenant, then free(*out). AT_ERR_NOMEM (nothing returned). */
at_err_t ten_tenants_list(ten_tenants_t *reg, ten_tenant_t ***out, size_t *n);

/* ---- one tenant ---- */

void ten_tenant_ref(ten_tenant_t *t);
/* Drops a reference; the last one frees the tenant. NULL and *t == NULL allowed; sets *t to
 * NULL. */
void ten_tenant_unref(ten_tenant_t **t);

/* Borrowed; valid while the caller holds a reference. Never changes. */
const char *ten_tenant_name(const ten_tenant_t *t);
/* A number unique to this tenant object for the life of the process (kept across reloads): a
 * stable flow id for ten_sched. */
uint64_t ten_tenant_id(const ten_tenant_t *t);
/* 1..TEN_WEIGHT_MAX; may change on reload, so read it each time it is needed. */
uint32_t ten_tenant_weight(ten_tenant_t *t);
/* The current limits (they may change on reload). */
void ten_tenant_get_quotas(ten_tenant_t *t, ten_quotas_t *out);

/* Reserves one session holding kv_bytes of KV cache, before any work for it starts. Exact at the
 * limits under any concurrency. AT_ERR_QUOTA_SESSIONS when the tenant already has `sessions`
 * open, AT_ERR_QUOTA_KV_BYTES when kv_bytes more would exceed `kv_bytes`; nothing is reserved
 * then, and diag names the quota, its limit and the current use. */
at_err_t ten_tenant_reserve_session(ten_tenant_t *t, uint64_t kv_bytes, at_diag_t *diag);
/* Undoes one successful reserve_session with the same kv_bytes. */
void ten_tenant_release_session(ten_tenant_t *t, uint64_t kv_bytes);

/* Admits one call, before any work for it starts. AT_ERR_QUOTA_INFLIGHT when `inflight_calls`
 * calls are in flight already (nothing reserved; diag as above). Exact under concurrency. */
at_err_t ten_tenant_reserve_call(ten_tenant_t *t, at_diag_t *diag);
/* Undoes one successful reserve_call. */
void ten_tenant_release_call(ten_tenant_t *t);

/* Adds one finished call to the counters: status is its gRPC status number (0..16; anything
 * else is counted as 2, UNKNOWN), tokens the attention tokens it processed and work their cost
 * (tokens x context), queue_ns and device_ns its time waiting for and running on a device. */
void ten_tenant_record_call(ten_tenant_t *t, uint32_t status, uint64_t tokens, uint64_t work,
                            uint64_t queue_ns, uint64_t device_ns);
/* The counters and current use (see ten_tenant_stats_t for what "snapshot" means here). */
void ten_tenant_get_stats(ten_tenant_t *t, ten_tenant_stats_t *out);

/* ---- tokens ---- */

/* A new token: "atk_" + 32 bytes from RAND_bytes in unpadded base64url, and its SHA-256 digest.
 * AT_ERR_INTERNAL if the random generator or the digest fails (*out unchanged). */
at_err_t ten_token_generate(ten_token_t *out, at_diag_t *diag);

/* The lowercase hex SHA-256 of token[0..len) (not NUL-terminated necessarily), NUL-terminated in
 * out: what tokens_sha256 lists for a token made elsewhere. AT_ERR_INTERNAL. */
at_err_t ten_token_digest_hex(const char *token, size_t len, char out[TEN_DIGEST_HEX_LEN + 1],
                              at_diag_t *diag);

#endif

/* Tenants, bearer-token authentication, quotas and counters (see ten_tenant.h).
 *
 * Thread model: any thread calls any function. The tenant table is an immutable snapshot (a
 * table_t: tenants plus a flat list of token digests); a reload parses and builds a new snapshot
 * with no lock that readers wait on, then swaps the pointer, then frees the old snapshot.
 *
 * Locks, in the only order they are ever nested:
 *   1. reg->reload_mu  serialises reloads, so a reload may read reg->tab without reg->mu;
 *   2. reg->mu         a rwlock guarding the pointer reg->tab: readers (authenticate, find, list)
 *                      hold it only to search the snapshot and take a reference; the writer only
 *                      to publish a new snapshot and the new limits;
 *   3. t->mu           guards one tenant's open sessions and reserved kv bytes.
 * No lock is held while hashing, parsing, doing file I/O or calling another module, and
 * authenticate hashes the presented token before it takes reg->mu.
 *
 * Atomics: a tenant's weight and limits are written by a reload and read relaxed: a reservation
 * racing a reload checks against either the old or the new limit, both right answers. In-flight
 * calls are counted with a relaxed compare-and-swap loop (the count guards nothing but itself, so
 * only its atomicity matters, which makes the limit exact). Counters are relaxed fetch-adds. The
 * reference count uses acq_rel on drop so that the last owner sees every write before freeing. */
#include "tenancy/ten_tenant.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "common/at_base.h"

#define DIGEST_BYTES 32u
#define TENANT_MAGIC 0x74656e61u /* "tena" */
#define TENANT_DEAD 0xdead7e4au
#define STATUS_UNKNOWN 2u
#define OPEN_TENANT_NAME "default"

struct ten_tenant {
    uint32_t magic;                  /* TENANT_MAGIC while alive */
    atomic_uint refs;
    uint64_t id;                     /* process-unique, immutable */
    char name[TEN_TENANT_NAME_MAX + 1]; /* immutable */
    atomic_uint weight;              /* 1..TEN_WEIGHT_MAX; written by reload */
    _Atomic uint64_t max_sessions;   /* limits, TEN_UNLIMITED when unset; written by reload */
    _Atomic uint64_t max_kv_bytes;
    _Atomic uint64_t max_inflight;
    pthread_mutex_t mu;
    uint64_t sessions AT_GUARDED_BY(mu); /* open sessions */
    uint64_t kv_bytes AT_GUARDED_BY(mu); /* bytes reserved by them */
    _Atomic uint64_t inflight;       /* calls admitted, not yet released */
    _Atomic uint64_t calls;          /* counters, relaxed */
    _Atomic uint64_t tokens;
    _Atomic uint64_t work;
    _Atomic uint64_t by_status[TEN_STATUS_COUNT];
    _Atomic uint64_t queue_ns;
    _Atomic uint64_t device_ns;
};

/* One token of the file: its SHA-256 and the tenant (index into table_t.tenants) it opens. */
typedef struct tdigest {
    uint8_t sha[DIGEST_BYTES];
    uint32_t tenant;
    uint32_t token; /* index in the tenant's tokens_sha256, for diagnostics */
} tdigest_t;

/* What a tenants file says, before any object is made. */
typedef struct spec_tenant {
    char name[TEN_TENANT_NAME_MAX + 1];
    uint32_t weight;
    ten_quotas_t quotas;
} spec_tenant_t;

typedef struct spec {
    spec_tenant_t *tenants; /* owned */
    size_t n_tenants;
    tdigest_t *digests;     /* owned */
    size_t n_digests;
} spec_t;

/* A published snapshot; immutable once reg->tab points at it. */
typedef struct table {
    ten_tenant_t **tenants; /* owned; one reference each */
    size_t n_tenants;
    tdigest_t *digests;     /* owned */
    size_t n_digests;
} table_t;

struct ten_tenants {
    bool open;                 /* immutable */
    EVP_MD *sha256;            /* owned; fetched once, EVP_Digest with it is thread-safe */
    pthread_mutex_t reload_mu;
    pthread_rwlock_t mu;
    table_t *tab AT_GUARDED_BY(mu); /* never NULL; also stable while reload_mu is held */
    /* Every tenant a snapshot has held, one reference each, so that a tenant a reload removes
     * and a later reload lists again is the same object: its sessions (keyed by the object) and
     * counters come back with it. Only reloads read or change it (reload_mu). */
    ten_tenant_t **known;
    size_t n_known;
};

static atomic_uint_fast64_t next_tenant_id = 1;

/* ---- tenants ---- */

bool ten_tenant_name_valid(const char *name, size_t len) {
    if (len == 0 || len > TEN_TENANT_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

static ten_tenant_t *tenant_create(const char *name) {
    ten_tenant_t *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    t->magic = TENANT_MAGIC;
    atomic_init(&t->refs, 1);
    t->id = atomic_fetch_add_explicit(&next_tenant_id, 1, memory_order_relaxed);
    snprintf(t->name, sizeof t->name, "%s", name);
    atomic_init(&t->weight, 1);
    atomic_init(&t->max_sessions, TEN_UNLIMITED);
    atomic_init(&t->max_kv_bytes, TEN_UNLIMITED);
    atomic_init(&t->max_inflight, TEN_UNLIMITED);
    pthread_mutex_init(&t->mu, NULL);
    return t;
}

static void tenant_set_limits(ten_tenant_t *t, uint32_t weight, const ten_quotas_t *q) {
    atomic_store_explicit(&t->weight, weight, memory_order_relaxed);
    atomic_store_explicit(&t->max_sessions, q->sessions, memory_order_relaxed);
    atomic_store_explicit(&t->max_kv_bytes, q->kv_bytes, memory_order_relaxed);
    atomic_store_explicit(&t->max_inflight, q->inflight_calls, memory_order_relaxed);
}

void ten_tenant_ref(ten_tenant_t *t) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    /* relaxed: a new reference is made from an existing one, which keeps the object alive */
    atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
}

void ten_tenant_unref(ten_tenant_t **tp) {
    if (tp == NULL || *tp == NULL)
        return;
    ten_tenant_t *t = *tp;
    *tp = NULL;
    AT_ASSERT(t->magic == TENANT_MAGIC);
    if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    t->magic = TENANT_DEAD;
    pthread_mutex_destroy(&t->mu);
    free(t);
}

const char *ten_tenant_name(const ten_tenant_t *t) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    return t->name;
}

uint64_t ten_tenant_id(const ten_tenant_t *t) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    return t->id;
}

uint32_t ten_tenant_weight(ten_tenant_t *t) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    return atomic_load_explicit(&t->weight, memory_order_relaxed);
}

void ten_tenant_get_quotas(ten_tenant_t *t, ten_quotas_t *out) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    out->sessions = atomic_load_explicit(&t->max_sessions, memory_order_relaxed);
    out->kv_bytes = atomic_load_explicit(&t->max_kv_bytes, memory_order_relaxed);
    out->inflight_calls = atomic_load_explicit(&t->max_inflight, memory_order_relaxed);
}

at_err_t ten_tenant_reserve_session(ten_tenant_t *t, uint64_t kv_bytes, at_diag_t *diag) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    uint64_t max_sessions = atomic_load_explicit(&t->max_sessions, memory_order_relaxed);
    uint64_t max_kv = atomic_load_explicit(&t->max_kv_bytes, memory_order_relaxed);
    at_err_t e = AT_OK;
    pthread_mutex_lock(&t->mu);
    uint64_t sessions = t->sessions;
    uint64_t used = t->kv_bytes;
    if (sessions >= max_sessions)
        e = AT_ERR_QUOTA_SESSIONS;
    else if (used > max_kv || kv_bytes > max_kv - used)
        e = AT_ERR_QUOTA_KV_BYTES;
    else {
        t->sessions = sessions + 1;
        t->kv_bytes = used + kv_bytes;
    }
    pthread_mutex_unlock(&t->mu);
    if (e == AT_ERR_QUOTA_SESSIONS)
        return at_diag_set(diag, e, "tenant %s: quota sessions=%" PRIu64 " reached (%" PRIu64
                                    " open)", t->name, max_sessions, sessions);
    if (e == AT_ERR_QUOTA_KV_BYTES)
        return at_diag_set(diag, e, "tenant %s: quota kv_bytes=%" PRIu64 " reached (%" PRIu64
                                    " in use, %" PRIu64 " more asked)", t->name, max_kv, used,
                           kv_bytes);
    return AT_OK;
}

void ten_tenant_release_session(ten_tenant_t *t, uint64_t kv_bytes) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    pthread_mutex_lock(&t->mu);
    AT_ASSERT(t->sessions > 0 && t->kv_bytes >= kv_bytes);
    /* Clamped so that a release without a reserve (a bug) cannot wrap the use to ~2^64 and lock
     * the tenant out for good in builds without asserts. */
    t->sessions -= t->sessions > 0;
    t->kv_bytes -= kv_bytes <= t->kv_bytes ? kv_bytes : t->kv_bytes;
    pthread_mutex_unlock(&t->mu);
}

at_err_t ten_tenant_reserve_call(ten_tenant_t *t, at_diag_t *diag) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    uint64_t limit = atomic_load_explicit(&t->max_inflight, memory_order_relaxed);
    uint64_t cur = atomic_load_explicit(&t->inflight, memory_order_relaxed);
    do {
        if (cur >= limit)
            return at_diag_set(diag, AT_ERR_QUOTA_INFLIGHT,
                               "tenant %s: quota inflight_calls=%" PRIu64 " reached (%" PRIu64
                               " in flight)", t->name, limit, cur);
    } while (!atomic_compare_exchange_weak_explicit(&t->inflight, &cur, cur + 1,
                                                    memory_order_relaxed, memory_order_relaxed));
    return AT_OK;
}

void ten_tenant_release_call(ten_tenant_t *t) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    uint64_t cur = atomic_load_explicit(&t->inflight, memory_order_relaxed);
    do {
        AT_ASSERT(cur > 0);
        if (cur == 0)
            return; /* clamped, as in release_session */
    } while (!atomic_compare_exchange_weak_explicit(&t->inflight, &cur, cur - 1,
                                                    memory_order_relaxed, memory_order_relaxed));
}

void ten_tenant_record_call(ten_tenant_t *t, uint32_t status, uint64_t tokens, uint64_t work,
                            uint64_t queue_ns, uint64_t device_ns) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    if (status >= TEN_STATUS_COUNT)
        status = STATUS_UNKNOWN;
    atomic_fetch_add_explicit(&t->calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->tokens, tokens, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->work, work, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->by_status[status], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->queue_ns, queue_ns, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->device_ns, device_ns, memory_order_relaxed);
}

void ten_tenant_get_stats(ten_tenant_t *t, ten_tenant_stats_t *out) {
    AT_ASSERT(t->magic == TENANT_MAGIC);
    memset(out, 0, sizeof *out);
    out->calls = atomic_load_explicit(&t->calls, memory_order_relaxed);
    out->tokens = atomic_load_explicit(&t->tokens, memory_order_relaxed);
    out->work = atomic_load_explicit(&t->work, memory_order_relaxed);
    for (size_t i = 0; i < TEN_STATUS_COUNT; i++)
        out->by_status[i] = atomic_load_explicit(&t->by_status[i], memory_order_relaxed);
    out->queue_ns = atomic_load_explicit(&t->queue_ns, memory_order_relaxed);
    out->device_ns = atomic_load_explicit(&t->device_ns, memory_order_relaxed);
    out->inflight_calls = atomic_load_explicit(&t->inflight, memory_order_relaxed);
    pthread_mutex_lock(&t->mu);
    out->sessions = t->sessions;
    out->kv_bytes = t->kv_bytes;
    pthread_mutex_unlock(&t->mu);
}

/* ---- snapshots ---- */

static void spec_fini(spec_t *s) {
    free(s->tenants);
    free(s->digests);
    memset(s, 0, sizeof *s);
}

static void table_free(table_t **tp) {
    table_t *tab = *tp;
    if (tab == NULL)
        return;
    for (size_t i = 0; i < tab->n_tenants; i++)
        ten_tenant_unref(&tab->tenants[i]);
    free(tab->tenants);
    free(tab->digests);
    free(tab);
    *tp = NULL;
}

static ten_tenant_t *find_name(ten_tenant_t *const *tenants, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(tenants[i]->name, name) == 0)
            return tenants[i];
    return NULL;
}

/* A snapshot for spec: the known tenant objects whose names it lists (a new reference each),
 * new objects for the others; the digests move from spec. Limits are not applied here (see
 * table_apply). AT_ERR_NOMEM (spec untouched). */
static at_err_t table_build(spec_t *spec, ten_tenant_t *const *known, size_t n_known,
                            table_t **out) {
    table_t *tab = calloc(1, sizeof *tab);
    if (tab == NULL)
        return AT_ERR_NOMEM;
    tab->tenants = calloc(spec->n_tenants, sizeof *tab->tenants);
    if (tab->tenants == NULL) {
        free(tab);
        return AT_ERR_NOMEM;
    }
    for (size_t i = 0; i < spec->n_tenants; i++) {
        ten_tenant_t *t = find_name(known, n_known, spec->tenants[i].name);
        if (t != NULL)
            ten_tenant_ref(t);
        else if ((t = tenant_create(spec->tenants[i].name)) == NULL) {
            table_free(&tab);
            return AT_ERR_NOMEM;
        }
        tab->tenants[tab->n_tenants++] = t;
    }
    tab->digests = spec->digests;
    tab->n_digests = spec->n_digests;
    spec->digests = NULL;
    spec->n_digests = 0;
    *out = tab;
    return AT_OK;
}

/* Adds the tenants of tab that reg does not know yet to reg->known (a reference each).
 * AT_ERR_NOMEM (nothing added). */
static at_err_t remember(ten_tenants_t *reg, const table_t *tab) {
    ten_tenant_t **k = realloc(reg->known, (reg->n_known + tab->n_tenants) * sizeof *k);
    if (k == NULL)
        return AT_ERR_NOMEM;
    reg->known = k;
    for (size_t i = 0; i < tab->n_tenants; i++)
        if (find_name(reg->known, reg->n_known, tab->tenants[i]->name) == NULL) {
            ten_tenant_ref(tab->tenants[i]);
            reg->known[reg->n_known++] = tab->tenants[i];
        }
    return AT_OK;
}

static void table_apply(const table_t *tab, const spec_t *spec) {
    for (size_t i = 0; i < tab->n_tenants; i++)
        tenant_set_limits(tab->tenants[i], spec->tenants[i].weight, &spec->tenants[i].quotas);
}

/* ---- parsing the tenants file ---- */

/* Where in the file a problem is: the file, and the tenant (index < 0: the top level). */
typedef struct loc {
    const char *path;
    long index;
    const char *name; /* NULL while unknown */
} loc_t;

static at_err_t file_error(at_diag_t *diag, const loc_t *loc, const char *field, const char *fmt,
                           ...) __attribute__((format(printf, 4, 5)));

static at_err_t file_error(at_diag_t *diag, const loc_t *loc, const char *field, const char *fmt,
                           ...) {
    char what[192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (loc->index < 0)
        return at_diag_set(diag, AT_ERR_TENANTS_FILE, "%s: %s: %s", loc->path, field, what);
    if (loc->name == NULL)
        return at_diag_set(diag, AT_ERR_TENANTS_FILE, "%s: tenants[%ld]: %s: %s", loc->path,
                           loc->index, field, what);
    return at_diag_set(diag, AT_ERR_TENANTS_FILE, "%s: tenants[%ld] (%s): %s: %s", loc->path,
                       loc->index, loc->name, field, what);
}

/* s[0..len) quoted for a diagnostic: cut at 32 bytes, anything outside printable ASCII shown as
 * '?' (the file may hold any bytes; the diag goes to a terminal or a log). */
static void quote(const char *s, size_t len, char *buf, size_t size) {
    char text[40];
    size_t n = 0;
    for (size_t i = 0; i < len && n < 32; i++)
        text[n++] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
    text[n] = '\0';
    snprintf(buf, size, "\"%s\"%s", text, len > 32 ? "..." : "");
}

/* A short, printable description of a JSON value, for "got ...". */
static void describe(const json_t *v, char *buf, size_t size) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        snprintf(buf, size, "an object");
        break;
    case JSON_ARRAY:
        snprintf(buf, size, "an array");
        break;
    case JSON_INTEGER:
        snprintf(buf, size, "%lld", (long long)json_integer_value(v));
        break;
    case JSON_REAL:
        snprintf(buf, size, "a real number (%g)", json_real_value(v));
        break;
    case JSON_TRUE:
        snprintf(buf, size, "true");
        break;
    case JSON_FALSE:
        snprintf(buf, size, "false");
        break;
    case JSON_NULL:
        snprintf(buf, size, "null");
        break;
    case JSON_STRING:
        quote(json_string_value(v), json_string_length(v), buf, size);
        break;
    }
}

static at_err_t check_keys(const json_t *obj, const char *const *known, size_t n_known,
                           const loc_t *loc, const char *where, at_diag_t *diag) {
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)obj, key, val) {
        bool ok = false;
        for (size_t i = 0; i < n_known && !ok; i++)
            ok = strcmp(key, known[i]) == 0;
        if (!ok) {
            char got[48];
            quote(key, strlen(key), got, sizeof got);
            return file_error(diag, loc, where, "unknown key %s", got);
        }
        (void)val;
    }
    return AT_OK;
}

/* An integer in [lo, hi] (hi at most INT64_MAX). */
static at_err_t get_int(const json_t *v, int64_t lo, int64_t hi, const loc_t *loc,
                        const char *field, uint64_t *out, at_diag_t *diag) {
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char got[64];
        describe(v, got, sizeof got);
        if (lo == hi)
            return file_error(diag, loc, field, "expected %" PRId64 ", got %s", lo, got);
        if (hi == INT64_MAX)
            return file_error(diag, loc, field, "expected an integer >= %" PRId64 ", got %s", lo,
                              got);
        return file_error(diag, loc, field,
                          "expected an integer from %" PRId64 " to %" PRId64 ", got %s", lo, hi,
                          got);
    }
    *out = (uint64_t)json_integer_value(v);
    return AT_OK;
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static at_err_t get_digest(const json_t *v, const loc_t *loc, const char *field,
                           uint8_t sha[DIGEST_BYTES], at_diag_t *diag) {
    char got[64];
    describe(v, got, sizeof got);
    if (!json_is_string(v))
        return file_error(diag, loc, field, "expected a string of %u hex digits, got %s",
                          TEN_DIGEST_HEX_LEN, got);
    const char *s = json_string_value(v);
    size_t len = json_string_length(v);
    if (len != TEN_DIGEST_HEX_LEN)
        return file_error(diag, loc, field, "expected %u hex digits, got %zu characters",
                          TEN_DIGEST_HEX_LEN, len);
    for (size_t i = 0; i < DIGEST_BYTES; i++) {
        int hi = hex_value(s[2 * i]), lo = hex_value(s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return file_error(diag, loc, field, "expected %u hex digits, got %s (not hex at %zu)",
                              TEN_DIGEST_HEX_LEN, got, hi < 0 ? 2 * i : 2 * i + 1);
        sha[i] = (uint8_t)(hi << 4 | lo);
    }
    return AT_OK;
}

static const char *const top_keys[] = {"version", "tenants"};
static const char *const tenant_keys[] = {"name", "weight", "tokens_sha256", "quotas"};
static const char *const quota_keys[] = {"sessions", "kv_bytes", "inflight_calls"};

static at_err_t parse_quotas(const json_t *q, const loc_t *loc, ten_quotas_t *out,
                             at_diag_t *diag) {
    out->sessions = out->kv_bytes = out->inflight_calls = TEN_UNLIMITED;
    if (q == NULL)
        return AT_OK;
    if (!json_is_object(q)) {
        char got[64];
        describe(q, got, sizeof got);
        return file_error(diag, loc, "quotas", "expected an object, got %s", got);
    }
    at_err_t e = check_keys(q, quota_keys, AT_ARRAY_LEN(quota_keys), loc, "quotas", diag);
    uint64_t *fields[] = {&out->sessions, &out->kv_bytes, &out->inflight_calls};
    static const char *const names[] = {"quotas.sessions", "quotas.kv_bytes",
                                        "quotas.inflight_calls"};
    for (size_t i = 0; i < AT_ARRAY_LEN(quota_keys) && e == AT_OK; i++) {
        const json_t *v = json_object_get(q, quota_keys[i]);
        if (v != NULL)
            e = get_int(v, 0, INT64_MAX, loc, names[i], fields[i], diag);
    }
    return e;
}

/* Parses tenants[index] into out->tenants[index], appending its digests to out->digests (which
 * has room for every string of the file). */
static at_err_t parse_tenant(const json_t *obj, const char *path, size_t index, spec_t *out,
                             at_diag_t *diag) {
    loc_t loc = {.path = path, .index = (long)index, .name = NULL};
    char got[64];
    if (!json_is_object(obj)) {
        describe(obj, got, sizeof got);
        return file_error(diag, &loc, "tenant", "expected an object, got %s", got);
    }
    const json_t *name = json_object_get(obj, "name");
    if (name == NULL)
        return file_error(diag, &loc, "name", "expected a name, got none");
    if (!json_is_string(name) ||
        !ten_tenant_name_valid(json_string_value(name), json_string_length(name))) {
        describe(name, got, sizeof got);
        return file_error(diag, &loc, "name", "expected 1-64 of [A-Za-z0-9._-], got %s", got);
    }
    spec_tenant_t *st = &out->tenants[index];
    snprintf(st->name, sizeof st->name, "%s", json_string_value(name));
    loc.name = st->name;
    for (size_t j = 0; j < index; j++)
        if (strcmp(out->tenants[j].name, st->name) == 0)
            return file_error(diag, &loc, "name", "expected a unique name, got the name of "
                              "tenants[%zu]", j);
    at_err_t e = check_keys(obj, tenant_keys, AT_ARRAY_LEN(tenant_keys), &loc, "tenant", diag);
    if (e != AT_OK)
        return e;

    uint64_t weight = 1;
    const json_t *w = json_object_get(obj, "weight");
    if (w != NULL && (e = get_int(w, 1, TEN_WEIGHT_MAX, &loc, "weight", &weight, diag)) != AT_OK)
        return e;
    st->weight = (uint32_t)weight;

    const json_t *toks = json_object_get(obj, "tokens_sha256");
    if (toks == NULL)
        return file_error(diag, &loc, "tokens_sha256", "expected an array of digests, got none");
    if (!json_is_array(toks)) {
        describe(toks, got, sizeof got);
        return file_error(diag, &loc, "tokens_sha256", "expected an array of digests, got %s",
                          got);
    }
    for (size_t k = 0; k < json_array_size(toks); k++) {
        char field[40];
        snprintf(field, sizeof field, "tokens_sha256[%zu]", k);
        tdigest_t *d = &out->digests[out->n_digests];
        e = get_digest(json_array_get(toks, k), &loc, field, d->sha, diag);
        if (e != AT_OK)
            return e;
        d->tenant = (uint32_t)index;
        d->token = (uint32_t)k;
        out->n_digests++;
    }
    return parse_quotas(json_object_get(obj, "quotas"), &loc, &st->quotas, diag);
}

static int cmp_digest(const void *a, const void *b) {
    const tdigest_t *x = a, *y = b;
    int c = memcmp(x->sha, y->sha, DIGEST_BYTES);
    if (c != 0)
        return c;
    if (x->tenant != y->tenant)
        return x->tenant < y->tenant ? -1 : 1;
    return x->token < y->token ? -1 : x->token > y->token;
}

/* A digest may appear once in the file. Sorted, duplicates are neighbours; the one reported is
 * the earliest in the file among those that repeat an earlier entry. */
static at_err_t check_digests_unique(spec_t *s, const char *path, at_diag_t *diag) {
    if (s->n_digests < 2)
        return AT_OK;
    qsort(s->digests, s->n_digests, sizeof *s->digests, cmp_digest);
    const tdigest_t *dup = NULL, *first = NULL;
    for (size_t i = 1; i < s->n_digests; i++) {
        const tdigest_t *a = &s->digests[i - 1], *b = &s->digests[i];
        if (memcmp(a->sha, b->sha, DIGEST_BYTES) != 0)
            continue;
        if (dup == NULL || b->tenant < dup->tenant ||
            (b->tenant == dup->tenant && b->token < dup->token)) {
            dup = b;
            first = a;
        }
    }
    if (dup == NULL)
        return AT_OK;
    /* first is the entry just before dup, which may itself repeat an earlier one: walk back to
     * the earliest entry with this digest, as the one to name. */
    while (first > s->digests && memcmp(first[-1].sha, dup->sha, DIGEST_BYTES) == 0)
        first--;
    loc_t loc = {.path = path, .index = dup->tenant, .name = s->tenants[dup->tenant].name};
    char field[40];
    snprintf(field, sizeof field, "tokens_sha256[%" PRIu32 "]", dup->token);
    if (first->tenant == dup->tenant)
        return file_error(diag, &loc, field, "expected a digest listed once, got the digest of "
                          "tokens_sha256[%" PRIu32 "] again", first->token);
    return file_error(diag, &loc, field, "expected a digest listed once, got the digest of "
                      "tenants[%" PRIu32 "] (%s)", first->tenant, s->tenants[first->tenant].name);
}

static at_err_t parse_root(const json_t *root, const char *path, spec_t *out, at_diag_t *diag) {
    loc_t loc = {.path = path, .index = -1, .name = NULL};
    char got[64];
    if (!json_is_object(root)) {
        describe(root, got, sizeof got);
        return file_error(diag, &loc, "top level", "expected an object, got %s", got);
    }
    at_err_t e = check_keys(root, top_keys, AT_ARRAY_LEN(top_keys), &loc, "top level", diag);
    if (e != AT_OK)
        return e;
    const json_t *version = json_object_get(root, "version");
    if (version == NULL)
        return file_error(diag, &loc, "version", "expected 1, got none");
    uint64_t v = 0;
    if ((e = get_int(version, 1, 1, &loc, "version", &v, diag)) != AT_OK)
        return e;
    const json_t *tenants = json_object_get(root, "tenants");
    if (tenants == NULL)
        return file_error(diag, &loc, "tenants", "expected an array of tenants, got none");
    if (!json_is_array(tenants)) {
        describe(tenants, got, sizeof got);
        return file_error(diag, &loc, "tenants", "expected an array of tenants, got %s", got);
    }
    size_t n = json_array_size(tenants);
    if (n == 0 || n > TEN_TENANTS_MAX)
        return file_error(diag, &loc, "tenants", "expected 1 to %u tenants, got %zu",
                          TEN_TENANTS_MAX, n);
    size_t max_digests = 0;
    for (size_t i = 0; i < n; i++)
        max_digests += json_array_size(json_object_get(json_array_get(tenants, i),
                                                       "tokens_sha256"));
    out->tenants = calloc(n, sizeof *out->tenants);
    out->digests = calloc(max_digests ? max_digests : 1, sizeof *out->digests);
    if (out->tenants == NULL || out->digests == NULL)
        return at_diag_set(diag, AT_ERR_NOMEM, "%s: no memory for %zu tenants", path, n);
    for (size_t i = 0; i < n && e == AT_OK; i++) {
        e = parse_tenant(json_array_get(tenants, i), path, i, out, diag);
        out->n_tenants = i + 1;
    }
    if (e == AT_OK)
        e = check_digests_unique(out, path, diag);
    return e;
}

/* Reads and validates the whole file. On error *out holds nothing. */
static at_err_t parse_file(const char *path, spec_t *out, at_diag_t *diag) {
    memset(out, 0, sizeof *out);
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        if (jerr.line < 0) /* cannot open or read it; jansson's text names the file already */
            return at_diag_set(diag, AT_ERR_TENANTS_FILE, "%s", jerr.text);
        return at_diag_set(diag, AT_ERR_TENANTS_FILE, "%s: line %d column %d: %s", path,
                           jerr.line, jerr.column, jerr.text);
    }
    at_err_t e = parse_root(root, path, out, diag);
    json_decref(root);
    if (e != AT_OK)
        spec_fini(out);
    return e;
}

/* ---- the tenant table ---- */

static at_err_t tenants_new(bool open, table_t **tab, ten_tenants_t **out, at_diag_t *diag) {
    ten_tenants_t *reg = calloc(1, sizeof *reg);
    if (reg == NULL)
        return AT_ERR_NOMEM;
    reg->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (reg->sha256 == NULL) {
        free(reg);
        return at_diag_set(diag, AT_ERR_INTERNAL, "libcrypto offers no SHA256");
    }
    if (remember(reg, *tab) != AT_OK) {
        EVP_MD_free(reg->sha256);
        free(reg);
        return AT_ERR_NOMEM;
    }
    reg->open = open;
    pthread_mutex_init(&reg->reload_mu, NULL);
    pthread_rwlock_init(&reg->mu, NULL);
    reg->tab = *tab;
    *tab = NULL;
    *out = reg;
    return AT_OK;
}

at_err_t ten_tenants_create_open(ten_tenants_t **out) {
    spec_tenant_t st = {.name = OPEN_TENANT_NAME, .weight = 1,
                        .quotas = {TEN_UNLIMITED, TEN_UNLIMITED, TEN_UNLIMITED}};
    spec_t spec = {.tenants = &st, .n_tenants = 1};
    table_t *tab = NULL;
    at_err_t e = table_build(&spec, NULL, 0, &tab);
    if (e != AT_OK)
        return e;
    table_apply(tab, &spec);
    e = tenants_new(true, &tab, out, NULL);
    table_free(&tab);
    return e;
}

at_err_t ten_tenants_load(const char *path, ten_tenants_t **out, at_diag_t *diag) {
    spec_t spec;
    at_err_t e = parse_file(path, &spec, diag);
    if (e != AT_OK)
        return e;
    table_t *tab = NULL;
    e = table_build(&spec, NULL, 0, &tab);
    if (e == AT_OK) {
        table_apply(tab, &spec);
        e = tenants_new(false, &tab, out, diag);
        table_free(&tab);
    }
    spec_fini(&spec);
    return e;
}

void ten_tenants_destroy(ten_tenants_t **regp) {
    if (regp == NULL || *regp == NULL)
        return;
    ten_tenants_t *reg = *regp;
    table_free(&reg->tab);
    for (size_t i = 0; i < reg->n_known; i++)
        ten_tenant_unref(&reg->known[i]);
    free(reg->known);
    EVP_MD_free(reg->sha256);
    pthread_rwlock_destroy(&reg->mu);
    pthread_mutex_destroy(&reg->reload_mu);
    free(reg);
    *regp = NULL;
}

bool ten_tenants_is_open(const ten_tenants_t *reg) { return reg->open; }

at_err_t ten_tenants_reload(ten_tenants_t *reg, const char *path, at_diag_t *diag) {
    if (reg->open)
        return at_diag_set(diag, AT_ERR_CONFIG, "%s: the server runs without a tenants file; "
                           "restart it with --tenants to use one", path);
    spec_t spec;
    at_err_t e = parse_file(path, &spec, diag);
    if (e != AT_OK)
        return e;
    pthread_mutex_lock(&reg->reload_mu);
    /* Only a reload replaces reg->tab, and reloads are serialised by reload_mu, so the old
     * snapshot stays put while the new one is built; readers go on meanwhile. */
    pthread_rwlock_rdlock(&reg->mu);
    table_t *old = reg->tab;
    pthread_rwlock_unlock(&reg->mu);
    table_t *tab = NULL;
    e = table_build(&spec, reg->known, reg->n_known, &tab);
    if (e == AT_OK && (e = remember(reg, tab)) != AT_OK)
        table_free(&tab);
    if (e == AT_OK) {
        pthread_rwlock_wrlock(&reg->mu);
        table_apply(tab, &spec);
        reg->tab = tab;
        pthread_rwlock_unlock(&reg->mu);
    }
    pthread_mutex_unlock(&reg->reload_mu);
    if (e == AT_OK)
        table_free(&old); /* drops the old snapshot's references; removed tenants may live on */
    spec_fini(&spec);
    return e;
}

/* The token of a "Bearer <token>" value, or an error. */
static at_err_t parse_bearer(const char *v, size_t len, const char **tok, size_t *tok_len,
                             at_diag_t *diag) {
    static const char scheme[] = "bearer";
    const size_t n = sizeof scheme - 1;
    if (v == NULL || len == 0)
        return at_diag_set(diag, AT_ERR_AUTH_MISSING, "authorization: no value");
    bool ok = len > n && v[n] == ' ';
    for (size_t i = 0; i < n && ok; i++)
        ok = (v[i] | 0x20) == scheme[i]; /* ASCII lowercase; no letter maps onto another */
    if (!ok)
        return at_diag_set(diag, AT_ERR_AUTH_BAD, "authorization: expected \"Bearer <token>\"");
    size_t i = n;
    while (i < len && v[i] == ' ')
        i++;
    if (i == len)
        return at_diag_set(diag, AT_ERR_AUTH_BAD, "authorization: the token is empty");
    if (len - i > TEN_TOKEN_MAX_BYTES)
        return at_diag_set(diag, AT_ERR_AUTH_BAD, "authorization: the token is over %u bytes",
                           TEN_TOKEN_MAX_BYTES);
    for (size_t j = i; j < len; j++)
        if (v[j] <= 0x20 || v[j] >= 0x7f)
            return at_diag_set(diag, AT_ERR_AUTH_BAD,
                               "authorization: the token has a character that is not printable "
                               "ASCII, or a space");
    *tok = v + i;
    *tok_len = len - i;
    return AT_OK;
}

/* The tenant whose digest equals sha, or NULL. Every digest is compared in full, whatever
 * matched before, and the match is folded in without a branch, so the time depends only on the
 * number of digests. Digests are unique, so at most one matches. */
static ten_tenant_t *match_digest(const table_t *tab, const uint8_t sha[DIGEST_BYTES]) {
    size_t found = 0; /* index + 1 of the matching digest; 0 for none */
    for (size_t i = 0; i < tab->n_digests; i++) {
        uint64_t diff = (uint32_t)CRYPTO_memcmp(sha, tab->digests[i].sha, DIGEST_BYTES);
        uint64_t equal_mask = ((diff | (0 - diff)) >> 63) - 1; /* all ones iff diff == 0 */
        found |= (size_t)(equal_mask & (uint64_t)(i + 1));
    }
    return found == 0 ? NULL : tab->tenants[tab->digests[found - 1].tenant];
}

at_err_t ten_tenants_authenticate(ten_tenants_t *reg, const char *value, size_t len,
                                  ten_tenant_t **out, at_diag_t *diag) {
    ten_tenant_t *t = NULL;
    if (reg->open) {
        pthread_rwlock_rdlock(&reg->mu);
        t = reg->tab->tenants[0];
        ten_tenant_ref(t);
        pthread_rwlock_unlock(&reg->mu);
        *out = t;
        return AT_OK;
    }
    const char *tok = NULL;
    size_t tok_len = 0;
    at_err_t e = parse_bearer(value, len, &tok, &tok_len, diag);
    if (e != AT_OK)
        return e;
    uint8_t sha[DIGEST_BYTES];
    unsigned sha_len = 0;
    if (EVP_Digest(tok, tok_len, sha, &sha_len, reg->sha256, NULL) != 1 ||
        sha_len != DIGEST_BYTES)
        return at_diag_set(diag, AT_ERR_INTERNAL, "authorization: SHA-256 failed");
    pthread_rwlock_rdlock(&reg->mu);
    t = match_digest(reg->tab, sha);
    if (t != NULL)
        ten_tenant_ref(t);
    pthread_rwlock_unlock(&reg->mu);
    if (t == NULL)
        return at_diag_set(diag, AT_ERR_AUTH_BAD, "authorization: the token matches no tenant");
    *out = t;
    return AT_OK;
}

ten_tenant_t *ten_tenants_find(ten_tenants_t *reg, const char *name) {
    pthread_rwlock_rdlock(&reg->mu);
    ten_tenant_t *t = find_name(reg->tab->tenants, reg->tab->n_tenants, name);
    if (t != NULL)
        ten_tenant_ref(t);
    pthread_rwlock_unlock(&reg->mu);
    return t;
}

at_err_t ten_tenants_list(ten_tenants_t *reg, ten_tenant_t ***out, size_t *n) {
    pthread_rwlock_rdlock(&reg->mu);
    const table_t *tab = reg->tab;
    ten_tenant_t **arr = malloc(tab->n_tenants * sizeof *arr);
    if (arr != NULL)
        for (size_t i = 0; i < tab->n_tenants; i++) {
            arr[i] = tab->tenants[i];
            ten_tenant_ref(arr[i]);
        }
    size_t count = tab->n_tenants;
    pthread_rwlock_unlock(&reg->mu);
    if (arr == NULL)
        return AT_ERR_NOMEM;
    *out = arr;
    *n = count;
    return AT_OK;
}

/* ---- tokens ---- */

static const char b64url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* Unpadded base64url of src[0..n) into dst (room for 4 * ceil(n / 3) + 1); returns the length. */
static size_t base64url(const uint8_t *src, size_t n, char *dst) {
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t w = (uint32_t)src[i] << 16;
        if (i + 1 < n)
            w |= (uint32_t)src[i + 1] << 8;
        if (i + 2 < n)
            w |= src[i + 2];
        size_t chars = n - i >= 3 ? 4 : n - i + 1;
        for (size_t k = 0; k < chars; k++)
            dst[o++] = b64url[(w >> (18 - 6 * k)) & 63];
    }
    dst[o] = '\0';
    return o;
}

at_err_t ten_token_digest_hex(const char *token, size_t len, char out[TEN_DIGEST_HEX_LEN + 1],
                              at_diag_t *diag) {
    static const char hex[] = "0123456789abcdef";
    uint8_t sha[DIGEST_BYTES];
    unsigned sha_len = 0;
    if (EVP_Digest(token, len, sha, &sha_len, EVP_sha256(), NULL) != 1 || sha_len != DIGEST_BYTES)
        return at_diag_set(diag, AT_ERR_INTERNAL, "SHA-256 failed");
    for (size_t i = 0; i < DIGEST_BYTES; i++) {
        out[2 * i] = hex[sha[i] >> 4];
        out[2 * i + 1] = hex[sha[i] & 15];
    }
    out[TEN_DIGEST_HEX_LEN] = '\0';
    return AT_OK;
}

at_err_t ten_token_generate(ten_token_t *out, at_diag_t *diag) {
    enum { RAW_BYTES = 32 };
    _Static_assert(sizeof TEN_TOKEN_PREFIX - 1 + (4 * RAW_BYTES + 2) / 3 == TEN_TOKEN_LEN,
                   "TEN_TOKEN_LEN is the prefix plus unpadded base64 of RAW_BYTES");
    uint8_t raw[RAW_BYTES];
    ten_token_t tok;
    at_err_t e = AT_OK;
    if (RAND_bytes(raw, RAW_BYTES) != 1) {
        e = at_diag_set(diag, AT_ERR_INTERNAL, "RAND_bytes failed: no random bytes");
        goto out_cleanse;
    }
    memcpy(tok.token, TEN_TOKEN_PREFIX, sizeof TEN_TOKEN_PREFIX - 1);
    base64url(raw, RAW_BYTES, tok.token + sizeof TEN_TOKEN_PREFIX - 1);
    e = ten_token_digest_hex(tok.token, TEN_TOKEN_LEN, tok.sha256_hex, diag);
    if (e == AT_OK)
        *out = tok;
out_cleanse:
    OPENSSL_cleanse(raw, sizeof raw);
    OPENSSL_cleanse(&tok, sizeof tok);
    return e;
}

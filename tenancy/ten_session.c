/* Model sessions of the server (see ten_session.h).
 *
 * The registry is an array of references searched linearly by name: a server holds tens to a few
 * hundred sessions, and a lookup is small next to any call. Lock order: registry mu, then a
 * session's mu; neither is held across a call into another module. */
#include "tenancy/ten_session.h"

#include "tenancy/ten_tenant.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef enum state { ST_CREATING, ST_READY } state_t;

struct ten_session {
    atomic_uint refs;          /* acq_rel on drop so the last owner sees every write */
    char name[TEN_SESSION_NAME_MAX + 1];
    char *model_name;          /* owned */
    att_model_t *model;        /* owned, immutable */
    bool layer_windows_given;
    uint32_t sliding_window;
    uint64_t requested_capacity;
    char device[32];
    void *device_handle;       /* not owned */
    uint32_t worker;
    _Atomic uint64_t worker_epoch; /* the worker's incarnation it was created on */
    ten_tenant_t *tenant;      /* a reference: the owner */
    uint64_t kv_bytes;         /* reserved from the tenant's kv_bytes quota */
    atomic_bool quota_held;    /* the tenant's session quota is still reserved */
    uint64_t id;
    state_t state;             /* guarded by the registry's mu */
    pthread_mutex_t mu;
    ten_session_figures_t fig; /* guarded by mu */
};

struct ten_registry {
    pthread_mutex_t mu;
    ten_session_t **items;     /* guarded by mu; registered sessions, one reference each */
    size_t n;
    size_t cap;
    uint64_t next_id;          /* guarded by mu */
};

bool ten_session_name_valid(const char *name, size_t len) {
    if (len == 0 || len > TEN_SESSION_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == ':' || c == '/' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

at_err_t ten_registry_create(ten_registry_t **out) {
    ten_registry_t *r = calloc(1, sizeof *r);
    if (r == NULL)
        return AT_ERR_NOMEM;
    pthread_mutex_init(&r->mu, NULL);
    *out = r;
    return AT_OK;
}

void ten_registry_destroy(ten_registry_t **rp) {
    if (rp == NULL || *rp == NULL)
        return;
    ten_registry_t *r = *rp;
    for (size_t i = 0; i < r->n; i++)
        ten_session_unref(&r->items[i]);
    free(r->items);
    pthread_mutex_destroy(&r->mu);
    free(r);
    *rp = NULL;
}

static ten_session_t *find(ten_registry_t *r, const ten_tenant_t *tenant, const char *name,
                           size_t *index) {
    for (size_t i = 0; i < r->n; i++)
        if (r->items[i]->tenant == tenant && strcmp(r->items[i]->name, name) == 0) {
            if (index != NULL)
                *index = i;
            return r->items[i];
        }
    return NULL;
}

void ten_session_release_quota(ten_session_t *s) {
    /* acq_rel: exactly one caller gives the reservation back */
    if (atomic_exchange_explicit(&s->quota_held, false, memory_order_acq_rel))
        ten_tenant_release_session(s->tenant, s->kv_bytes);
}

static void session_free(ten_session_t *s) {
    ten_session_release_quota(s);
    ten_tenant_unref(&s->tenant);
    att_model_destroy(&s->model);
    free(s->model_name);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static bool same_spec(const ten_session_t *s, const ten_session_spec_t *spec,
                      const att_model_t *m) {
    return att_model_equal(s->model, m) && strcmp(s->model_name, spec->model_name) == 0 &&
           s->layer_windows_given == spec->layer_windows_given &&
           s->sliding_window == spec->sliding_window &&
           s->requested_capacity == spec->kv_capacity_tokens &&
           strcmp(s->device, spec->device) == 0;
}

at_err_t ten_registry_begin_create(ten_registry_t *r, const ten_session_spec_t *spec,
                                   att_model_t **model, ten_session_t **out, bool *existing,
                                   at_diag_t *diag) {
    at_err_t e = AT_OK;
    if (!ten_session_name_valid(spec->name, strlen(spec->name))) {
        att_model_destroy(model);
        return AT_ERR_SESSION_NAME;
    }
    ten_session_t *s = calloc(1, sizeof *s);
    char *model_name = strdup(spec->model_name);
    if (s == NULL || model_name == NULL) {
        free(s);
        free(model_name);
        att_model_destroy(model);
        return AT_ERR_NOMEM;
    }
    pthread_mutex_lock(&r->mu);
    ten_session_t *old = find(r, spec->tenant, spec->name, NULL);
    if (old != NULL) {
        if (!same_spec(old, spec, *model))
            e = AT_ERR_SESSION_EXISTS;
        else if (old->state != ST_READY)
            e = AT_ERR_OVERLOADED;
        else {
            ten_session_ref(old);
            *out = old;
            *existing = true;
        }
        pthread_mutex_unlock(&r->mu);
        free(s);
        free(model_name);
        att_model_destroy(model);
        return e;
    }
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 16;
        ten_session_t **items = realloc(r->items, cap * sizeof *items);
        if (items == NULL)
            e = AT_ERR_NOMEM;
        else {
            r->items = items;
            r->cap = cap;
        }
    }
    /* The quota is taken under the registry's lock, after the name proved new: two creates of
     * one name reserve once, and a refused create leaves nothing behind. */
    if (e == AT_OK)
        e = ten_tenant_reserve_session(spec->tenant, spec->kv_bytes, diag);
    if (e != AT_OK) {
        pthread_mutex_unlock(&r->mu);
        free(s);
        free(model_name);
        att_model_destroy(model);
        return e;
    }
    atomic_init(&s->refs, 2); /* the registry's and the caller's */
    strcpy(s->name, spec->name);
    s->model_name = model_name;
    s->model = *model;
    *model = NULL;
    s->layer_windows_given = spec->layer_windows_given;
    s->sliding_window = spec->sliding_window;
    s->requested_capacity = spec->kv_capacity_tokens;
    strncpy(s->device, spec->device, sizeof s->device - 1);
    s->device_handle = spec->device_handle;
    s->worker = spec->worker;
    s->tenant = spec->tenant;
    ten_tenant_ref(s->tenant);
    s->kv_bytes = spec->kv_bytes;
    atomic_init(&s->quota_held, true);
    s->id = ++r->next_id;
    s->state = ST_CREATING;
    pthread_mutex_init(&s->mu, NULL);
    r->items[r->n++] = s;
    pthread_mutex_unlock(&r->mu);
    *out = s;
    *existing = false;
    return AT_OK;
}

void ten_registry_end_create(ten_registry_t *r, ten_session_t *s, bool ok,
                             const ten_session_figures_t *fig) {
    if (ok)
        ten_session_set_figures(s, fig);
    pthread_mutex_lock(&r->mu);
    size_t i = 0;
    ten_session_t *found = find(r, s->tenant, s->name, &i);
    ten_session_t *drop = NULL;
    if (found == s) {
        if (ok)
            s->state = ST_READY;
        else {
            drop = s;
            r->items[i] = r->items[--r->n];
        }
    }
    pthread_mutex_unlock(&r->mu);
    if (!ok)
        ten_session_release_quota(s);
    ten_session_unref(&drop);
}

at_err_t ten_registry_get(ten_registry_t *r, const ten_tenant_t *tenant, const char *name,
                          ten_session_t **out) {
    pthread_mutex_lock(&r->mu);
    ten_session_t *s = find(r, tenant, name, NULL);
    if (s != NULL && s->state == ST_READY)
        ten_session_ref(s);
    else
        s = NULL;
    pthread_mutex_unlock(&r->mu);
    if (s == NULL)
        return AT_ERR_SESSION_NOT_FOUND;
    *out = s;
    return AT_OK;
}

at_err_t ten_registry_remove(ten_registry_t *r, const ten_tenant_t *tenant, const char *name,
                             ten_session_t **out) {
    pthread_mutex_lock(&r->mu);
    size_t i = 0;
    ten_session_t *s = find(r, tenant, name, &i);
    if (s != NULL && s->state == ST_READY)
        r->items[i] = r->items[--r->n];
    else
        s = NULL;
    pthread_mutex_unlock(&r->mu);
    if (s == NULL)
        return AT_ERR_SESSION_NOT_FOUND;
    *out = s;
    return AT_OK;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(ten_session_t *const *)a)->name, (*(ten_session_t *const *)b)->name);
}

at_err_t ten_registry_list(ten_registry_t *r, const ten_tenant_t *tenant, ten_session_t ***out,
                           size_t *n) {
    pthread_mutex_lock(&r->mu);
    ten_session_t **arr = malloc((r->n ? r->n : 1) * sizeof *arr);
    size_t k = 0;
    if (arr != NULL)
        for (size_t i = 0; i < r->n; i++)
            if (r->items[i]->state == ST_READY && r->items[i]->tenant == tenant) {
                ten_session_ref(r->items[i]);
                arr[k++] = r->items[i];
            }
    pthread_mutex_unlock(&r->mu);
    if (arr == NULL)
        return AT_ERR_NOMEM;
    qsort(arr, k, sizeof *arr, cmp_name);
    *out = arr;
    *n = k;
    return AT_OK;
}

void ten_session_ref(ten_session_t *s) {
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
}

void ten_session_unref(ten_session_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    if (atomic_fetch_sub_explicit(&(*sp)->refs, 1, memory_order_acq_rel) == 1)
        session_free(*sp);
    *sp = NULL;
}

const char *ten_session_name(const ten_session_t *s) { return s->name; }
const char *ten_session_model_name(const ten_session_t *s) { return s->model_name; }
const att_model_t *ten_session_model(const ten_session_t *s) { return s->model; }
bool ten_session_layer_windows_given(const ten_session_t *s) { return s->layer_windows_given; }
uint32_t ten_session_sliding_window(const ten_session_t *s) { return s->sliding_window; }
const char *ten_session_device(const ten_session_t *s) { return s->device; }
void *ten_session_device_handle(const ten_session_t *s) { return s->device_handle; }
uint32_t ten_session_worker(const ten_session_t *s) { return s->worker; }
ten_tenant_t *ten_session_tenant(const ten_session_t *s) { return s->tenant; }
uint64_t ten_session_id(const ten_session_t *s) { return s->id; }

uint64_t ten_session_worker_epoch(const ten_session_t *s) {
    return atomic_load_explicit(&s->worker_epoch, memory_order_relaxed);
}

void ten_session_set_worker_epoch(ten_session_t *s, uint64_t epoch) {
    atomic_store_explicit(&s->worker_epoch, epoch, memory_order_relaxed);
}

void ten_session_get_figures(ten_session_t *s, ten_session_figures_t *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->fig;
    pthread_mutex_unlock(&s->mu);
}

void ten_session_set_figures(ten_session_t *s, const ten_session_figures_t *fig) {
    pthread_mutex_lock(&s->mu);
    s->fig = *fig;
    pthread_mutex_unlock(&s->mu);
}

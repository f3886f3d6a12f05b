/* The tuning store (see tun_store.h).
 *
 * Thread model: a store object belongs to one thread at a time; files are shared between threads
 * and processes through flock on "<file>.lock" (each store opens its own descriptor, so threads of
 * one process exclude each other too). Every read that may set a file aside and every
 * read-merge-write happens under that lock. */
#include "tuning/tun_store.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/at_log.h"

#define PATH_MAX_LEN 1024

struct tun_store {
    const tun_space_t *space;
    tun_device_t dev;
    tun_shape_t shape;
    char kernel[80];
    char dir[PATH_MAX_LEN];
    char path[PATH_MAX_LEN + 128];
    char last_bad[PATH_MAX_LEN + 160];
    uint32_t set_aside;
    tun_record_t *recs; /* [n], bucket order */
    size_t n, cap;
};

static void sha256_hex(const void *p, size_t len, char out[65]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    EVP_Digest(p, len, md, &md_len, EVP_sha256(), NULL);
    for (unsigned int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static at_err_t mkdirs(const char *dir, at_diag_t *diag) {
    char buf[PATH_MAX_LEN];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return at_diag_set(diag, AT_ERR_IO, "tuning dir: path too long");
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return at_diag_set(diag, AT_ERR_IO, "tuning dir %s: %s", buf, strerror(errno));
        *p = c;
        if (c == '\0')
            break;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return at_diag_set(diag, AT_ERR_IO, "tuning dir %s: not a directory", dir);
    return AT_OK;
}

at_err_t tun_store_open(const char *dir, const tun_space_t *space, const tun_device_t *dev,
                        const char *kernel_hash, const tun_shape_t *shape, at_diag_t *diag,
                        tun_store_t **out) {
    if (strlen(dir) >= PATH_MAX_LEN)
        return at_diag_set(diag, AT_ERR_IO, "tuning dir: path too long");
    at_err_t e = mkdirs(dir, diag);
    if (e != AT_OK)
        return e;
    tun_store_t *st = calloc(1, sizeof *st);
    if (st == NULL)
        return AT_ERR_NOMEM;
    st->space = space;
    st->dev = *dev;
    st->shape = *shape;
    snprintf(st->kernel, sizeof st->kernel, "%s", kernel_hash);
    snprintf(st->dir, sizeof st->dir, "%s", dir);
    char key[1024], dk[512], sk[128], hex[65];
    tun_device_key(dev, dk, sizeof dk);
    tun_shape_key(shape, sk, sizeof sk);
    int len = snprintf(key, sizeof key, "%s\n%s\n%s\n%s", space->name, kernel_hash, dk, sk);
    sha256_hex(key, (size_t)len < sizeof key ? (size_t)len : sizeof key - 1, hex);
    snprintf(st->path, sizeof st->path, "%s/%s-d%u-hq%u-hkv%u-%s-b%u-f%u-%.16s.json", dir,
             dev->backend, shape->head_dim, shape->num_query_heads, shape->num_kv_heads,
             tun_dtype_name(shape->dtype), shape->block_size, shape->features, hex);
    *out = st;
    return AT_OK;
}

void tun_store_destroy(tun_store_t **st) {
    if (st == NULL || *st == NULL)
        return;
    free((*st)->recs);
    free(*st);
    *st = NULL;
}

const char *tun_store_path(const tun_store_t *st) { return st->path; }
size_t tun_store_count(const tun_store_t *st) { return st->n; }
const tun_record_t *tun_store_at(const tun_store_t *st, size_t i) { return &st->recs[i]; }

uint32_t tun_store_set_aside(const tun_store_t *st, const char **last_bad) {
    if (last_bad != NULL)
        *last_bad = st->last_bad;
    return st->set_aside;
}

static int bucket_cmp(const tun_bucket_t *a, const tun_bucket_t *b) {
    uint32_t x = (uint32_t)a->tokens << 24 | (uint32_t)a->seqs << 16 | (uint32_t)a->max_q << 8 |
                 a->max_ctx;
    uint32_t y = (uint32_t)b->tokens << 24 | (uint32_t)b->seqs << 16 | (uint32_t)b->max_q << 8 |
                 b->max_ctx;
    return (x > y) - (x < y);
}

const tun_record_t *tun_store_find(const tun_store_t *st, const tun_bucket_t *b) {
    for (size_t i = 0; i < st->n; i++)
        if (tun_bucket_equal(&st->recs[i].bucket, b))
            return &st->recs[i];
    return NULL;
}

/* The newer measurement wins; at the same second, the faster one. */
static bool newer(const tun_record_t *a, const tun_record_t *b) {
    return a->updated_s > b->updated_s || (a->updated_s == b->updated_s && a->best_ns < b->best_ns);
}

/* Puts r in bucket order; with replace false, a record already there stays unless r is newer. */
static at_err_t insert(tun_store_t *st, const tun_record_t *r, bool replace) {
    size_t i = 0;
    while (i < st->n && bucket_cmp(&st->recs[i].bucket, &r->bucket) < 0)
        i++;
    if (i < st->n && bucket_cmp(&st->recs[i].bucket, &r->bucket) == 0) {
        if (replace || newer(r, &st->recs[i]))
            st->recs[i] = *r;
        return AT_OK;
    }
    if (st->n == st->cap) {
        size_t cap = st->cap ? 2 * st->cap : 8;
        tun_record_t *p = realloc(st->recs, cap * sizeof *p);
        if (p == NULL)
            return AT_ERR_NOMEM;
        st->recs = p;
        st->cap = cap;
    }
    memmove(&st->recs[i + 1], &st->recs[i], (st->n - i) * sizeof *st->recs);
    st->recs[i] = *r;
    st->n++;
    return AT_OK;
}

at_err_t tun_store_put(tun_store_t *st, const tun_record_t *r) { return insert(st, r, true); }

/* ---- JSON ---- */

static json_t *cfg_json(const tun_space_t *space, const tun_cfg_t *c) {
    json_t *o = json_object();
    for (uint32_t p = 0; o != NULL && p < c->n; p++)
        if (json_object_set_new(o, space->params[p], json_integer(c->v[p])) != 0) {
            json_decref(o);
            return NULL;
        }
    return o;
}

static json_t *key_json(const tun_store_t *st) {
    const tun_device_t *d = &st->dev;
    const tun_shape_t *s = &st->shape;
    return json_pack("{s:s, s:s, s:{s:s, s:s, s:s, s:s, s:s, s:I, s:I}, "
                     "s:{s:I, s:I, s:I, s:I, s:s, s:I, s:I}}",
                     "space", st->space->name, "kernel", st->kernel, "device", "backend",
                     d->backend, "name", d->name, "arch", d->arch, "driver", d->driver, "compiler",
                     d->compiler, "threads", (json_int_t)d->threads, "smem_bytes",
                     (json_int_t)d->smem_bytes, "shape", "head_dim", (json_int_t)s->head_dim,
                     "num_query_heads", (json_int_t)s->num_query_heads, "num_kv_heads",
                     (json_int_t)s->num_kv_heads, "group", (json_int_t)s->group, "dtype",
                     tun_dtype_name(s->dtype), "block_size", (json_int_t)s->block_size,
                     "features", (json_int_t)s->features);
}

static json_t *record_json(const tun_space_t *space, const tun_record_t *r) {
    json_t *best = cfg_json(space, &r->best), *worst = cfg_json(space, &r->worst);
    if (best == NULL || worst == NULL) {
        json_decref(best);
        json_decref(worst);
        return NULL;
    }
    return json_pack("{s:{s:i, s:i, s:i, s:i}, s:o, s:I, s:I, s:o, s:I, s:I, s:I, s:I}",
                     "bucket", "tokens", r->bucket.tokens, "seqs", r->bucket.seqs, "max_q",
                     r->bucket.max_q, "max_ctx", r->bucket.max_ctx, "best", best, "best_ns",
                     (json_int_t)r->best_ns, "heuristic_ns", (json_int_t)r->heuristic_ns,
                     "worst", worst, "worst_ns", (json_int_t)r->worst_ns, "tried",
                     (json_int_t)r->tried, "tuning_ns", (json_int_t)r->tuning_ns, "updated",
                     (json_int_t)r->updated_s);
}

/* The canonical text of a payload: what the checksum covers. Caller frees. */
static char *canonical(const json_t *payload) {
    return json_dumps(payload, JSON_COMPACT | JSON_SORT_KEYS);
}

static bool cfg_from(const tun_store_t *st, const json_t *o, tun_cfg_t *c) {
    if (!json_is_object(o) || json_object_size(o) != st->space->n_params)
        return false;
    *c = (tun_cfg_t){.n = st->space->n_params};
    for (uint32_t p = 0; p < c->n; p++) {
        json_t *v = json_object_get(o, st->space->params[p]);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX)
            return false;
        c->v[p] = (uint32_t)json_integer_value(v);
    }
    return tun_cfg_valid(st->space, c, &st->shape, &st->dev);
}

static bool u64_from(const json_t *o, const char *k, uint64_t *out) {
    json_t *v = json_object_get(o, k);
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (uint64_t)json_integer_value(v);
    return true;
}

static bool record_from(const tun_store_t *st, const json_t *o, tun_record_t *r) {
    json_t *b = json_object_get(o, "bucket");
    uint64_t bt, bs, bq, bc, tried, updated;
    if (!json_is_object(b) || !u64_from(b, "tokens", &bt) || !u64_from(b, "seqs", &bs) ||
        !u64_from(b, "max_q", &bq) || !u64_from(b, "max_ctx", &bc) || bt > 63 || bs > 63 ||
        bq > 63 || bc > 63)
        return false;
    memset(r, 0, sizeof *r);
    r->bucket = (tun_bucket_t){(uint8_t)bt, (uint8_t)bs, (uint8_t)bq, (uint8_t)bc};
    if (!cfg_from(st, json_object_get(o, "best"), &r->best) ||
        !cfg_from(st, json_object_get(o, "worst"), &r->worst) ||
        !u64_from(o, "best_ns", &r->best_ns) || !u64_from(o, "heuristic_ns", &r->heuristic_ns) ||
        !u64_from(o, "worst_ns", &r->worst_ns) || !u64_from(o, "tried", &tried) ||
        !u64_from(o, "tuning_ns", &r->tuning_ns) || !u64_from(o, "updated", &updated) ||
        tried > UINT32_MAX)
        return false;
    r->tried = (uint32_t)tried;
    r->updated_s = (int64_t)updated;
    return true;
}

/* Parses and checks a whole file. On success *payload is a new reference. why gets the reason of
 * a failure. */
static bool check_file(const char *path, json_t **payload, char *why, size_t why_len) {
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        snprintf(why, why_len, "not JSON or truncated: %s (line %d)", jerr.text, jerr.line);
        return false;
    }
    json_t *schema = json_object_get(root, "schema"), *sum = json_object_get(root, "sha256");
    json_t *pl = json_object_get(root, "payload");
    bool ok = false;
    if (!json_is_integer(schema)) {
        snprintf(why, why_len, "no schema version");
    } else if (json_integer_value(schema) != TUN_SCHEMA_VERSION) {
        snprintf(why, why_len, "schema version %lld, this build reads %d",
                 (long long)json_integer_value(schema), TUN_SCHEMA_VERSION);
    } else if (!json_is_string(sum) || !json_is_object(pl)) {
        snprintf(why, why_len, "no checksum or payload");
    } else {
        char *text = canonical(pl), hex[65] = "";
        if (text != NULL)
            sha256_hex(text, strlen(text), hex);
        free(text);
        ok = strcmp(hex, json_string_value(sum)) == 0;
        if (!ok)
            snprintf(why, why_len, "checksum mismatch");
    }
    if (ok) {
        *payload = json_incref(pl);
    }
    json_decref(root);
    return ok;
}

/* Checks that payload is for this store's key and merges its records. */
static bool merge_payload(tun_store_t *st, const json_t *payload, char *why, size_t why_len,
                          at_err_t *err) {
    json_t *key = key_json(st);
    if (key == NULL) {
        *err = AT_ERR_NOMEM;
        return true;
    }
    static const char *const fields[] = {"space", "kernel", "device", "shape"};
    for (size_t i = 0; i < 4; i++)
        if (!json_equal(json_object_get(key, fields[i]), json_object_get(payload, fields[i]))) {
            snprintf(why, why_len, "written for another %s", fields[i]);
            json_decref(key);
            return false;
        }
    json_decref(key);
    json_t *recs = json_object_get(payload, "records");
    if (!json_is_array(recs)) {
        snprintf(why, why_len, "no records array");
        return false;
    }
    /* check every record before merging any, so a bad file adds nothing */
    size_t n = json_array_size(recs);
    tun_record_t *tmp = malloc((n ? n : 1) * sizeof *tmp);
    if (tmp == NULL) {
        *err = AT_ERR_NOMEM;
        return true;
    }
    for (size_t i = 0; i < n; i++)
        if (!record_from(st, json_array_get(recs, i), &tmp[i])) {
            snprintf(why, why_len, "record %zu is not valid for this space and shape", i);
            free(tmp);
            return false;
        }
    for (size_t i = 0; i < n && *err == AT_OK; i++)
        *err = insert(st, &tmp[i], false);
    free(tmp);
    return true;
}

/* Renames a damaged file to the first free "<path>.bad[.N]". Requires the lock. */
static void set_aside(tun_store_t *st, const char *why) {
    char bad[sizeof st->last_bad];
    for (unsigned k = 0; k < 1000; k++) {
        if (k == 0)
            snprintf(bad, sizeof bad, "%s.bad", st->path);
        else
            snprintf(bad, sizeof bad, "%s.bad.%u", st->path, k);
        if (access(bad, F_OK) != 0 && errno == ENOENT)
            break;
    }
    if (rename(st->path, bad) != 0) {
        at_log(AT_LOG_WARN, "tuning", "%s: %s; cannot set it aside: %s", st->path, why,
               strerror(errno));
        return;
    }
    st->set_aside++;
    snprintf(st->last_bad, sizeof st->last_bad, "%s", bad);
    at_log(AT_LOG_WARN, "tuning", "%s: %s; set aside as %s (the heuristic serves meanwhile)",
           st->path, why, bad);
}

/* Reads the file into the store. Requires the lock. */
static at_err_t read_locked(tun_store_t *st, tun_file_state_t *state) {
    char why[256];
    json_t *payload = NULL;
    if (access(st->path, F_OK) != 0 && errno == ENOENT) {
        *state = TUN_FILE_MISSING;
        return AT_OK;
    }
    at_err_t e = AT_OK;
    if (check_file(st->path, &payload, why, sizeof why) &&
        merge_payload(st, payload, why, sizeof why, &e)) {
        json_decref(payload);
        *state = TUN_FILE_OK;
        return e;
    }
    json_decref(payload);
    set_aside(st, why);
    *state = TUN_FILE_DAMAGED;
    return AT_OK;
}

/* The lock file's descriptor, locked exclusively; -1 (logged) when it cannot be. */
static int lock(const tun_store_t *st) {
    char lp[sizeof st->path + 8];
    snprintf(lp, sizeof lp, "%s.lock", st->path);
    int fd = open(lp, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        at_log(AT_LOG_WARN, "tuning", "%s: %s", lp, strerror(errno));
        return -1;
    }
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            at_log(AT_LOG_WARN, "tuning", "flock %s: %s", lp, strerror(errno));
            close(fd);
            return -1;
        }
    }
    return fd;
}

static void unlock(int fd) {
    flock(fd, LOCK_UN);
    close(fd);
}

at_err_t tun_store_load(tun_store_t *st, tun_file_state_t *state) {
    tun_file_state_t s = TUN_FILE_MISSING;
    /* Without the lock (a read-only directory) the read is still whole: writers replace the file
     * by rename. The lock only keeps a reader from setting aside a file a writer is fixing. */
    int fd = lock(st);
    at_err_t e = read_locked(st, &s);
    if (fd >= 0)
        unlock(fd);
    if (s == TUN_FILE_MISSING)
        at_log(AT_LOG_INFO, "tuning", "%s: no records yet", st->path);
    if (state != NULL)
        *state = s;
    return e;
}

static json_t *payload_json(const tun_store_t *st) {
    json_t *pl = key_json(st), *arr = json_array();
    if (pl == NULL || arr == NULL || json_object_set_new(pl, "records", arr) != 0) {
        json_decref(pl);
        return NULL;
    }
    for (size_t i = 0; i < st->n; i++)
        if (json_array_append_new(arr, record_json(st->space, &st->recs[i])) != 0) {
            json_decref(pl);
            return NULL;
        }
    return pl;
}

static bool write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

/* temp file in the same directory, fsync, rename over the file, fsync the directory */
static at_err_t write_atomic(const tun_store_t *st, const char *text) {
    static atomic_uint seq;
    char tmp[sizeof st->path + 48];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%u", st->path, (long)getpid(),
             atomic_fetch_add_explicit(&seq, 1, memory_order_relaxed));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        at_log(AT_LOG_WARN, "tuning", "%s: %s", tmp, strerror(errno));
        return AT_ERR_IO;
    }
    bool ok = write_all(fd, text, strlen(text)) && write_all(fd, "\n", 1) && fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, st->path) != 0) {
        at_log(AT_LOG_WARN, "tuning", "%s: cannot write: %s", st->path, strerror(errno));
        unlink(tmp);
        return AT_ERR_IO;
    }
    int dfd = open(st->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return AT_OK;
}

at_err_t tun_store_save(tun_store_t *st) {
    int fd = lock(st);
    if (fd < 0)
        return AT_ERR_IO;
    /* merge into a copy, so a failed write leaves the store as it was */
    tun_store_t merged = *st;
    merged.recs = malloc((st->cap ? st->cap : 1) * sizeof *merged.recs);
    at_err_t e = merged.recs == NULL ? AT_ERR_NOMEM : AT_OK;
    tun_file_state_t state;
    if (e == AT_OK) {
        memcpy(merged.recs, st->recs, st->n * sizeof *st->recs);
        e = read_locked(&merged, &state);
    }
    json_t *pl = e == AT_OK ? payload_json(&merged) : NULL;
    char *body = pl != NULL ? canonical(pl) : NULL;
    char hex[65];
    json_t *root = NULL;
    char *text = NULL;
    if (body != NULL) {
        sha256_hex(body, strlen(body), hex);
        root = json_pack("{s:i, s:s, s:O}", "schema", TUN_SCHEMA_VERSION, "sha256", hex,
                         "payload", pl);
        text = root != NULL ? json_dumps(root, JSON_INDENT(1) | JSON_SORT_KEYS) : NULL;
    }
    if (e == AT_OK && text == NULL)
        e = AT_ERR_NOMEM;
    if (e == AT_OK)
        e = write_atomic(st, text);
    unlock(fd);
    free(text);
    free(body);
    json_decref(root);
    json_decref(pl);
    if (e != AT_OK) {
        free(merged.recs);
        return e;
    }
    free(st->recs);
    *st = merged; /* the union, and what set_aside counted */
    return AT_OK;
}

/* ---- printing ---- */

static void print_cfg(FILE *out, const json_t *c) {
    const char *k;
    json_t *v;
    int first = 1;
    json_object_foreach((json_t *)c, k, v) {
        fprintf(out, "%s%s=%lld", first ? "" : ",", k, (long long)json_integer_value(v));
        first = 0;
    }
}

/* 2^v of a bucket field read back from a file (valid files hold 0..63). */
static unsigned long long pow2(const json_t *v) {
    json_int_t e = json_integer_value(v);
    return e >= 0 && e < 64 ? 1ull << e : 0;
}

at_err_t tun_store_print(const char *path, FILE *out) {
    char why[256];
    json_t *pl = NULL;
    if (!check_file(path, &pl, why, sizeof why)) {
        fprintf(out, "%s: %s\n", path, why);
        return AT_ERR_IO;
    }
    json_t *d = json_object_get(pl, "device"), *s = json_object_get(pl, "shape");
    fprintf(out, "%s\n  space %s, kernel %.16s\n", path,
            json_string_value(json_object_get(pl, "space")),
            json_string_value(json_object_get(pl, "kernel")));
    fprintf(out, "  device %s: %s, %s, %s%s%s, %lld threads/SMs\n",
            json_string_value(json_object_get(d, "backend")),
            json_string_value(json_object_get(d, "name")),
            json_string_value(json_object_get(d, "arch")),
            json_string_value(json_object_get(d, "compiler")),
            *json_string_value(json_object_get(d, "driver")) ? ", driver " : "",
            json_string_value(json_object_get(d, "driver")),
            (long long)json_integer_value(json_object_get(d, "threads")));
    fprintf(out, "  model shape: head_dim %lld, heads %lld/%lld (group %lld), %s, block %lld, "
                 "features %lld\n",
            (long long)json_integer_value(json_object_get(s, "head_dim")),
            (long long)json_integer_value(json_object_get(s, "num_query_heads")),
            (long long)json_integer_value(json_object_get(s, "num_kv_heads")),
            (long long)json_integer_value(json_object_get(s, "group")),
            json_string_value(json_object_get(s, "dtype")),
            (long long)json_integer_value(json_object_get(s, "block_size")),
            (long long)json_integer_value(json_object_get(s, "features")));
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(pl, "records"), i, r) {
        json_t *b = json_object_get(r, "bucket");
        double best = (double)json_integer_value(json_object_get(r, "best_ns")) / 1e6;
        double heur = (double)json_integer_value(json_object_get(r, "heuristic_ns")) / 1e6;
        double worst = (double)json_integer_value(json_object_get(r, "worst_ns")) / 1e6;
        fprintf(out, "  bucket tokens<=%llu seqs<=%llu q<=%llu ctx<=%llu:\n",
                pow2(json_object_get(b, "tokens")), pow2(json_object_get(b, "seqs")),
                pow2(json_object_get(b, "max_q")), pow2(json_object_get(b, "max_ctx")));
        fprintf(out, "    best      %9.3f ms  ", best);
        print_cfg(out, json_object_get(r, "best"));
        fprintf(out, "\n    heuristic %9.3f ms  (%.2fx the best)\n", heur,
                best > 0 ? heur / best : 0.0);
        fprintf(out, "    worst     %9.3f ms  ", worst);
        print_cfg(out, json_object_get(r, "worst"));
        fprintf(out, "\n    %lld configs tried in %.2f s\n",
                (long long)json_integer_value(json_object_get(r, "tried")),
                (double)json_integer_value(json_object_get(r, "tuning_ns")) / 1e9);
    }
    json_decref(pl);
    return AT_OK;
}

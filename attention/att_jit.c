/* Run-time compilation (NVRTC here; hiprtc through att_hip.c's compiler) and the content-keyed
 * image cache (see att_jit.h).
 * Thread model: mu guards the in-memory entries and the stats; NVRTC and disk I/O run outside it.
 * disk_mu (taken before mu, never after) guards the directory's limit and size estimate and
 * makes this cache's prunes one at a time; flock on the directory makes them one at a time
 * across caches and processes. A prune runs on the thread that wrote the new file.
 * Entries are read only under mu, and callers get copies of their images: an insert may move the
 * array and evict (free) the least recently used images that the disk also holds once the cache
 * holds more than its limit.
 * Two threads asking for the same new key may both compile; the first image inserted wins and
 * both return it. Users: a session's creation (two threads, one per tile kind), the CUDA
 * backend's compile threads (tuning candidates) and set_tuning (att_jit_lookup, which never
 * compiles). */
#include "attention/att_jit.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef AT_HAVE_CUDA
#include "attention/att_cudrv.h"
#endif
#include "common/at_base.h"
#include "common/at_log.h"
#include "tuning/tun.h"

/* Generated at build time from attention/kernels/ (see attention/CMakeLists.txt). */
extern const unsigned char att_kernel_unified_cu[];
extern const unsigned char att_kernel_kparams_h[];
extern const unsigned char att_kernel_port_h[];
extern const unsigned char att_kernel_sm90_cuh[];
#define KERNEL_SRC ((const char *)att_kernel_unified_cu)
#define KERNEL_HDR ((const char *)att_kernel_kparams_h)
#define KERNEL_PORT ((const char *)att_kernel_port_h)
#define KERNEL_SM90 ((const char *)att_kernel_sm90_cuh)

#define KEY_BYTES 32
#define FILE_MAGIC "ATTNDK01"
#define HEADER_BYTES (8 + 8 + KEY_BYTES)

typedef struct entry {
    uint8_t key[KEY_BYTES];
    void *image; /* owned; NULL: the key failed to compile (asking again fails at once) */
    size_t bytes;
    uint64_t used; /* the cache's tick at its last use: the least recent goes first */
    bool on_disk;  /* read from, or written whole to, the cache's directory: it may be dropped */
    uint64_t touched_ns; /* when its file was last marked used (disk_touch); 0: not yet */
} entry_t;

struct att_jit {
    att_jit_compiler_t cc;         /* copied; cc.user borrowed */
    char name[48];                 /* the compiler and its version, as cc.name said */
    char dir[512];                 /* "" = memory only */
    pthread_mutex_t mu;
    entry_t *entries AT_GUARDED_BY(mu);
    size_t num_entries AT_GUARDED_BY(mu);
    size_t cap_entries AT_GUARDED_BY(mu);
    size_t limit_bytes AT_GUARDED_BY(mu); /* image bytes kept in memory before evicting */
    uint64_t tick AT_GUARDED_BY(mu);      /* one more per use of an entry */
    bool warned AT_GUARDED_BY(mu);        /* over the limit with nothing to drop, said once */
    att_jit_stats_t stats AT_GUARDED_BY(mu);
    /* Taken before mu, never after: one prune of the directory at a time. */
    pthread_mutex_t disk_mu;
    uint64_t disk_limit_bytes AT_GUARDED_BY(disk_mu); /* image files kept before removing */
    uint64_t disk_est_bytes AT_GUARDED_BY(disk_mu);   /* the files' bytes, as far as known */
};

uint32_t att_jit_tile_smem(const att_model_t *m, const att_tile_t *t) {
    if (t->mma == 1)
        return tun_cuda_wgmma_smem_bytes(m->head_dim, t->warps_m, t->tile_k, t->stages);
    return tun_cuda_smem_bytes(m->head_dim, (uint32_t)m->dtype, t->warps_m, t->warp_mt,
                               t->warps_n, t->tile_k, t->stages);
}

static pthread_once_t hash_once = PTHREAD_ONCE_INIT;
static char kernel_hash[2 * KEY_BYTES + 1];

static void key_hex(const uint8_t key[KEY_BYTES], char hex[2 * KEY_BYTES + 1]);
static int sha256_strings(const char *const *s, size_t n, uint8_t out[KEY_BYTES]);

/* The source and the headers of att_jit_kernel_source, in its order, into parts: how many. */
static uint32_t source_parts(const char *parts[1 + ATT_JIT_MAX_HEADERS]) {
    att_jit_source_t src;
    att_jit_kernel_source(&src);
    AT_ASSERT(src.num_headers <= ATT_JIT_MAX_HEADERS);
    uint32_t n = 0;
    parts[n++] = src.text;
    for (uint32_t i = 0; i < src.num_headers; i++)
        parts[n++] = src.headers[i];
    return n;
}

static void hash_init(void) {
    const char *parts[1 + ATT_JIT_MAX_HEADERS];
    uint8_t key[KEY_BYTES];
    if (sha256_strings(parts, source_parts(parts), key) == 0)
        key_hex(key, kernel_hash);
}

const char *att_jit_kernel_hash(void) {
    pthread_once(&hash_once, hash_init);
    return kernel_hash;
}

static void opt_add(att_jit_opts_t *o, const char *fmt, unsigned v) {
    AT_ASSERT(o->n < ATT_JIT_MAX_OPTS);
    snprintf(o->text[o->n], sizeof o->text[0], fmt, v);
    o->ptr[o->n] = o->text[o->n];
    o->n++;
}

void att_jit_opt_add(att_jit_opts_t *o, const char *fmt, unsigned v) { opt_add(o, fmt, v); }

void att_jit_model_opts(const att_model_t *m, const att_tile_t *t, att_jit_opts_t *o) {
    o->n = 0;
    /* wgmma is in sm_90a alone: a variant of the device's sm_90 target could not use it */
    snprintf(o->arch, sizeof o->arch, "%s", t->mma == 1 ? "sm_90a" : "");
    opt_add(o, "-std=c++17", 0);
    opt_add(o, "-lineinfo", 0);
    att_jit_model_defines(m, t, o);
}

const char *att_jit_opts_arch(const att_jit_opts_t *o, const char *dev_arch) {
    return o->arch[0] != '\0' ? o->arch : dev_arch;
}

void att_jit_model_defines(const att_model_t *m, const att_tile_t *t, att_jit_opts_t *o) {
    int window = 0;
    for (uint32_t l = 0; l < m->num_layers; l++)
        window |= m->window[l] != 0;
    opt_add(o, "-DATT_HEAD_DIM=%u", m->head_dim);
    opt_add(o, "-DATT_DTYPE=%u", (unsigned)m->dtype);
    opt_add(o, "-DATT_BLOCK_SIZE=%u", m->block_size);
    opt_add(o, "-DATT_GROUP=%u", m->group);
    opt_add(o, "-DATT_NUM_KV_HEADS=%u", m->num_kv_heads);
    opt_add(o, "-DATT_HAS_WINDOW=%u", (unsigned)window);
    opt_add(o, "-DATT_SOFT_CAP=%u", m->soft_cap > 0.0f);
    opt_add(o, "-DATT_HAS_ALIBI=%u", m->alibi != NULL);
    opt_add(o, "-DATT_HAS_SINKS=%u", m->sinks != NULL);
    opt_add(o, "-DATT_WARPS_M=%u", t->warps_m);
    opt_add(o, "-DATT_WARP_MT=%u", t->warp_mt);
    opt_add(o, "-DATT_WARPS_N=%u", t->warps_n);
    opt_add(o, "-DATT_TILE_K=%u", t->tile_k);
    opt_add(o, "-DATT_STAGES=%u", t->stages);
    if (t->mma == 1)
        opt_add(o, "-DATT_WGMMA=%u", 1);
}

void att_jit_default_dir(char *buf, size_t n) {
    const char *env = getenv("ATTND_KERNEL_CACHE_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (env != NULL && env[0] != '\0')
        snprintf(buf, n, "%s", env);
    else if (xdg != NULL && xdg[0] == '/')
        snprintf(buf, n, "%s/attnd/kernels", xdg);
    else if (home != NULL && home[0] != '\0')
        snprintf(buf, n, "%s/.cache/attnd/kernels", home);
    else if (n > 0)
        buf[0] = '\0';
}

at_err_t att_jit_compile_failed(const char *compiler, const char *arch, const char *log,
                                const char *why, at_diag_t *diag) {
    if (log == NULL)
        return at_diag_set(diag, AT_ERR_UNSUPPORTED, "kernel does not compile for %s: %s", arch,
                           why);
    at_log(AT_LOG_ERROR, "jit", "%s (%s) failed:\n%s", compiler, arch, log);
    const char *err = strstr(log, "error");
    return at_diag_set(diag, AT_ERR_UNSUPPORTED, "kernel does not compile for %s: %.150s", arch,
                       err != NULL ? err : log);
}

_Static_assert(ATT_JIT_MAX_HEADERS >= 3, "att_jit_kernel_source's headers fit");

void att_jit_kernel_source(att_jit_source_t *out) {
    out->text = KERNEL_SRC;
    out->name = "att_unified.cu";
    out->num_headers = 3;
    out->headers[0] = KERNEL_HDR;
    out->header_names[0] = "attention/att_kparams.h";
    out->headers[1] = KERNEL_PORT;
    out->header_names[1] = "attention/kernels/att_port.h";
    out->headers[2] = KERNEL_SM90;
    out->header_names[2] = "attention/kernels/att_sm90.cuh";
}

/* mkdir -p */
static int make_dirs(const char *path) {
    char tmp[512];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof tmp)
        return -1;
    memcpy(tmp, path, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (tmp[i] == '/' || tmp[i] == '\0') {
            char c = tmp[i];
            tmp[i] = '\0';
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
                return -1;
            tmp[i] = c;
        }
    }
    return 0;
}

at_err_t att_jit_create_with(const att_jit_compiler_t *cc, const char *cache_dir,
                             at_diag_t *diag, att_jit_t **out) {
    if (strlen(cc->name) >= sizeof ((att_jit_t *)0)->name)
        return at_diag_set(diag, AT_ERR_INTERNAL, "compiler name too long");
    if (cache_dir != NULL && strlen(cache_dir) >= 480)
        return at_diag_set(diag, AT_ERR_CONFIG, "kernel cache dir: path too long");
    if (cache_dir != NULL && cache_dir[0] != '\0' && make_dirs(cache_dir) != 0)
        return at_diag_set(diag, AT_ERR_IO, "kernel cache dir %s: %s", cache_dir,
                           strerror(errno));
    att_jit_t *j = calloc(1, sizeof *j);
    if (j == NULL)
        return AT_ERR_NOMEM;
    j->cc = *cc;
    snprintf(j->name, sizeof j->name, "%s", cc->name);
    j->cc.name = j->name;
    if (cache_dir != NULL)
        snprintf(j->dir, sizeof j->dir, "%s", cache_dir);
    j->limit_bytes = ATT_JIT_MEMORY_BYTES;
    j->disk_limit_bytes = ATT_JIT_DISK_BYTES;
    j->disk_est_bytes = UINT64_MAX / 2; /* unknown: the first new file looks */
    pthread_mutex_init(&j->mu, NULL);
    pthread_mutex_init(&j->disk_mu, NULL);
    *out = j;
    return AT_OK;
}

void att_jit_destroy(att_jit_t **jp) {
    if (jp == NULL || *jp == NULL)
        return;
    att_jit_t *j = *jp;
    for (size_t i = 0; i < j->num_entries; i++)
        free(j->entries[i].image);
    free(j->entries);
    pthread_mutex_destroy(&j->mu);
    pthread_mutex_destroy(&j->disk_mu);
    free(j);
    *jp = NULL;
}

static void evict(att_jit_t *j, const uint8_t *keep) AT_REQUIRES(j->mu);

void att_jit_set_memory_limit(att_jit_t *j, size_t bytes) {
    pthread_mutex_lock(&j->mu);
    j->limit_bytes = bytes;
    evict(j, NULL);
    pthread_mutex_unlock(&j->mu);
}

void att_jit_get_stats(att_jit_t *j, att_jit_stats_t *out) {
    pthread_mutex_lock(&j->mu);
    *out = j->stats;
    pthread_mutex_unlock(&j->mu);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* SHA-256 over a list of NUL-terminated strings, each with its terminator, so that option
 * boundaries are part of the key ("-DA=1" "0" differs from "-DA=10"). */
static int sha256_strings(const char *const *s, size_t n, uint8_t out[KEY_BYTES]) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned len = 0;
    int ok = ctx != NULL && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1;
    for (size_t i = 0; ok && i < n; i++)
        ok = EVP_DigestUpdate(ctx, s[i], strlen(s[i]) + 1) == 1;
    ok = ok && EVP_DigestFinal_ex(ctx, out, &len) == 1 && len == KEY_BYTES;
    EVP_MD_CTX_free(ctx);
    return ok ? 0 : -1;
}

static int sha256_bytes(const void *p, size_t n, uint8_t out[KEY_BYTES]) {
    unsigned len = 0;
    return EVP_Digest(p, n, out, &len, EVP_sha256(), NULL) == 1 && len == KEY_BYTES ? 0 : -1;
}

static entry_t *find(att_jit_t *j, const uint8_t key[KEY_BYTES]) AT_REQUIRES(j->mu) {
    for (size_t i = 0; i < j->num_entries; i++)
        if (memcmp(j->entries[i].key, key, KEY_BYTES) == 0)
            return &j->entries[i];
    return NULL;
}

/* Frees the least recently used images that the disk also holds, but the key keep's (NULL: none),
 * until the images fit the limit. An image the disk lacks (no directory, or its write failed)
 * stays, since att_jit_lookup could not get it back without compiling: such a cache says once
 * that it is over its limit. Failed keys' entries hold no image and stay. */
static void evict(att_jit_t *j, const uint8_t *keep) AT_REQUIRES(j->mu) {
    while (j->stats.memory_bytes > j->limit_bytes) {
        size_t victim = j->num_entries;
        for (size_t i = 0; i < j->num_entries; i++) {
            const entry_t *e = &j->entries[i];
            if (e->image == NULL || !e->on_disk ||
                (keep != NULL && memcmp(e->key, keep, KEY_BYTES) == 0))
                continue;
            if (victim == j->num_entries || e->used < j->entries[victim].used)
                victim = i;
        }
        if (victim == j->num_entries) {
            /* what stays past the one asked for, unless the disk lacks that one too */
            const entry_t *k = keep != NULL ? find(j, keep) : NULL;
            const uint64_t others =
                j->stats.memory_bytes - (k != NULL && k->on_disk ? k->bytes : 0);
            if (!j->warned && others > j->limit_bytes) {
                at_log(AT_LOG_WARN, "jit",
                       "compiled kernels hold %.1f MiB of memory, over the %.1f MiB limit, and "
                       "none can be dropped: %s",
                       (double)j->stats.memory_bytes / (1 << 20),
                       (double)j->limit_bytes / (1 << 20),
                       j->dir[0] == '\0' ? "no kernel cache directory keeps them"
                                         : "the kernel cache directory lacks them");
                j->warned = true;
            }
            return;
        }
        j->stats.memory_bytes -= j->entries[victim].bytes;
        j->stats.evictions++;
        free(j->entries[victim].image);
        j->entries[victim] = j->entries[--j->num_entries];
    }
}

/* Inserts (taking image; on_disk: the directory holds it) unless the key is there already (then
 * image is freed), then evicts others past the limit. Returns the entry, or NULL on allocation
 * failure (image freed). */
static entry_t *insert(att_jit_t *j, const uint8_t key[KEY_BYTES], void *image, size_t bytes,
                       bool on_disk) AT_REQUIRES(j->mu) {
    entry_t *have = find(j, key);
    if (have != NULL) {
        free(image);
        have->used = ++j->tick;
        if (on_disk && !have->on_disk) { /* now it may go: the limit may be met again */
            have->on_disk = true;
            evict(j, key);
            return find(j, key);
        }
        return have;
    }
    if (j->num_entries == j->cap_entries) {
        size_t cap = j->cap_entries ? 2 * j->cap_entries : 16;
        entry_t *p = realloc(j->entries, cap * sizeof *p);
        if (p == NULL) {
            free(image);
            return NULL;
        }
        j->entries = p;
        j->cap_entries = cap;
    }
    entry_t *e = &j->entries[j->num_entries++];
    memcpy(e->key, key, KEY_BYTES);
    e->image = image;
    e->bytes = image != NULL ? bytes : 0;
    e->used = ++j->tick;
    e->on_disk = on_disk;
    e->touched_ns = 0;
    j->stats.memory_bytes += e->bytes;
    evict(j, key);
    return find(j, key); /* the eviction may have moved it */
}

/* The caller's copy of e's image into *image (NULL: none wanted) and its size: AT_OK, or
 * AT_ERR_NOMEM. */
static at_err_t copy_out(const entry_t *e, void **image, size_t *bytes) {
    *bytes = e->bytes;
    if (image == NULL)
        return AT_OK;
    if ((*image = malloc(e->bytes)) == NULL)
        return AT_ERR_NOMEM;
    memcpy(*image, e->image, e->bytes);
    return AT_OK;
}

static void key_hex(const uint8_t key[KEY_BYTES], char hex[2 * KEY_BYTES + 1]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < KEY_BYTES; i++) {
        hex[2 * i] = digits[key[i] >> 4];
        hex[2 * i + 1] = digits[key[i] & 15];
    }
    hex[2 * KEY_BYTES] = '\0';
}

/* The image in the key's file, or NULL when it is missing (*damaged = 0) or fails any check
 * (*damaged = 1): magic, length, checksum of the payload. */
static void *disk_read(const char *path, size_t *bytes, int *damaged) {
    *damaged = 0;
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    *damaged = 1;
    uint8_t hdr[HEADER_BYTES], sum[KEY_BYTES];
    void *img = NULL;
    uint64_t n = 0;
    if (fread(hdr, 1, sizeof hdr, f) != sizeof hdr || memcmp(hdr, FILE_MAGIC, 8) != 0)
        goto out_close;
    memcpy(&n, hdr + 8, 8);
    if (n == 0 || n > (256u << 20))
        goto out_close;
    img = malloc(n);
    if (img == NULL || fread(img, 1, n, f) != n || fgetc(f) != EOF ||
        sha256_bytes(img, n, sum) != 0 || memcmp(sum, hdr + 16, KEY_BYTES) != 0) {
        free(img);
        img = NULL;
        goto out_close;
    }
    *damaged = 0;
    *bytes = n;
out_close:
    fclose(f);
    return img;
}

static int write_all(int fd, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Temporary file in the same directory, fsync, rename over the key's name, fsync of the
 * directory: a reader sees either no file or a whole one. A failure is logged (the image is still
 * good in memory) and makes it false: the memory cache then keeps the image. */
static bool disk_write(const char *dir, const char *path, const void *img, size_t n) {
    char tmp[640];
    snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        at_log(AT_LOG_WARN, "jit", "cannot write %s: %s", tmp, strerror(errno));
        return false;
    }
    uint8_t hdr[HEADER_BYTES];
    uint64_t n64 = n;
    memcpy(hdr, FILE_MAGIC, 8);
    memcpy(hdr + 8, &n64, 8);
    int ok = sha256_bytes(img, n, hdr + 16) == 0 && write_all(fd, hdr, sizeof hdr) == 0 &&
             write_all(fd, img, n) == 0 && fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        at_log(AT_LOG_WARN, "jit", "cannot write %s: %s", path, strerror(errno));
        unlink(tmp);
        return false;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    return true;
}

/* The key of (arch, options): SHA-256 of the source and every header the compiler is given
 * (att_jit_kernel_source, the same list: a header left out of the key, as att_sm90.cuh once was,
 * let a changed wgmma body load its stale image from disk), arch, the compiler's name and
 * version, and every option. */
static at_err_t make_key(att_jit_t *j, const char *arch, const char *const *opts,
                         uint32_t n_opts, uint8_t key[KEY_BYTES], at_diag_t *diag) {
    const char *parts[1 + ATT_JIT_MAX_HEADERS + 2 + ATT_JIT_MAX_OPTS];
    if (n_opts > ATT_JIT_MAX_OPTS)
        return at_diag_set(diag, AT_ERR_INTERNAL, "too many compile options");
    uint32_t n = source_parts(parts);
    parts[n++] = arch;
    parts[n++] = j->cc.name;
    memcpy(parts + n, opts, n_opts * sizeof *opts);
    if (sha256_strings(parts, n + n_opts, key) != 0)
        return at_diag_set(diag, AT_ERR_INTERNAL, "SHA-256 failed");
    return AT_OK;
}

/* The key's file in the cache's directory (which the caller knows it has). */
static void key_path(const att_jit_t *j, const uint8_t key[KEY_BYTES], char path[600]) {
    char hex[2 * KEY_BYTES + 1];
    key_hex(key, hex);
    snprintf(path, 600, "%s/%s.%s", j->dir, hex, j->cc.image_ext);
}

static void disk_touch(const att_jit_t *j, const uint8_t key[KEY_BYTES]);

/* How often a memory hit marks its file used (disk_touch): the directory's order by use needs
 * minutes, not each call. */
#define TOUCH_EVERY_NS (60ull * 1000000000ull)

/* From memory: AT_OK (a copy of the image in *image, as copy_out), AT_ERR_UNSUPPORTED (the key
 * failed to compile before), AT_ERR_NOT_READY (absent) or AT_ERR_NOMEM. A hit marks its file
 * used, at most every TOUCH_EVERY_NS. */
static at_err_t memory_get(att_jit_t *j, const uint8_t key[KEY_BYTES], void **image,
                           size_t *bytes) {
    at_err_t e = AT_ERR_NOT_READY;
    bool touch = false;
    const uint64_t now = now_ns();
    pthread_mutex_lock(&j->mu);
    entry_t *hit = find(j, key);
    if (hit != NULL) {
        e = hit->image != NULL ? copy_out(hit, image, bytes) : AT_ERR_UNSUPPORTED;
        hit->used = ++j->tick;
        j->stats.memory_hits += e == AT_OK;
        touch = e == AT_OK && hit->on_disk &&
                (hit->touched_ns == 0 || now - hit->touched_ns >= TOUCH_EVERY_NS);
        if (touch)
            hit->touched_ns = now;
    }
    pthread_mutex_unlock(&j->mu);
    if (touch)
        disk_touch(j, key);
    return e;
}

/* Inserts img (taken; NULL records a failed compile; on_disk: the directory holds it) and returns
 * a copy of the entry's image. */
static at_err_t memory_put(att_jit_t *j, const uint8_t key[KEY_BYTES], void *img, size_t n,
                           bool on_disk, int from_disk, int damaged, uint64_t compile_ns,
                           void **image, size_t *bytes) {
    pthread_mutex_lock(&j->mu);
    const entry_t *ent = insert(j, key, img, n, on_disk);
    if (from_disk)
        j->stats.disk_hits++;
    else if (compile_ns != 0) {
        j->stats.compiles++;
        j->stats.compile_ns += compile_ns;
    }
    j->stats.disk_rejects += (uint64_t)damaged;
    const at_err_t e = ent == NULL          ? AT_ERR_NOMEM
                       : ent->image == NULL ? AT_ERR_UNSUPPORTED
                                            : copy_out(ent, image, bytes);
    pthread_mutex_unlock(&j->mu);
    return e;
}

/* The key's file, when the cache has a directory: path set, image or NULL. */
static void *disk_get(att_jit_t *j, const uint8_t key[KEY_BYTES], char path[600], size_t *n,
                      int *damaged) {
    *damaged = 0;
    path[0] = '\0';
    if (j->dir[0] == '\0')
        return NULL;
    key_path(j, key, path);
    void *img = disk_read(path, n, damaged);
    if (*damaged)
        at_log(AT_LOG_WARN, "jit", "%s is damaged; compiling it again", path);
    if (img != NULL) /* its modification time says when it was last used (disk_prune) */
        (void)utimensat(AT_FDCWD, path, NULL, 0);
    return img;
}

/* An image file of the directory: its name (the key in hex, then the extension), when it was
 * last used and its size. */
typedef struct disk_file {
    char name[2 * KEY_BYTES + 24];
    struct timespec used;
    uint64_t bytes;
} disk_file_t;

static int older_first(const void *a, const void *b) {
    const struct timespec *x = &((const disk_file_t *)a)->used;
    const struct timespec *y = &((const disk_file_t *)b)->used;
    if (x->tv_sec != y->tv_sec)
        return x->tv_sec < y->tv_sec ? -1 : 1;
    if (x->tv_nsec != y->tv_nsec)
        return x->tv_nsec < y->tv_nsec ? -1 : 1;
    return strcmp(((const disk_file_t *)a)->name, ((const disk_file_t *)b)->name);
}

/* Whether name is an image file's: 64 hex digits, '.', the compiler's extension; *key the digits
 * as bytes. */
static bool image_name(const att_jit_t *j, const char *name, uint8_t key[KEY_BYTES]) {
    const size_t ext = strlen(j->cc.image_ext);
    if (strlen(name) != 2 * KEY_BYTES + 1 + ext || name[2 * KEY_BYTES] != '.' ||
        strcmp(name + 2 * KEY_BYTES + 1, j->cc.image_ext) != 0)
        return false;
    for (int i = 0; i < 2 * KEY_BYTES; i++) {
        const char c = name[i];
        const int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0)
            return false;
        key[i / 2] = (uint8_t)(i % 2 == 0 ? v << 4 : key[i / 2] | v);
    }
    return true;
}

/* Removes the directory's least recently used image files of this compiler (by modification
 * time, which every use refreshes: disk_get, disk_touch) but keep (a file name, or NULL) until
 * they fit 90% of the disk limit: a server that outlives its kernel source's versions would
 * otherwise keep every version's images. Runs when this cache's estimate of the files' bytes
 * (the last scan's total plus what it wrote since) passes the limit, on the caller's thread,
 * and only in one cache of any process at a time (flock on the directory: the others skip).
 * The memory entries of files removed stop counting as on disk, so this cache keeps them in
 * memory; another cache that loses a file finds it missing and compiles it again. Other files,
 * other compilers' images and temporary files stay. Errors are logged; the cache works on. */
static void disk_prune(att_jit_t *j, const char *keep, uint64_t written) {
    if (j->dir[0] == '\0')
        return;
    pthread_mutex_lock(&j->disk_mu);
    j->disk_est_bytes += written;
    const uint64_t limit = j->disk_limit_bytes;
    if (j->disk_est_bytes <= limit) {
        pthread_mutex_unlock(&j->disk_mu);
        return;
    }
    DIR *d = opendir(j->dir);
    if (d == NULL)
        at_log(AT_LOG_WARN, "jit", "cannot read kernel cache dir %s: %s", j->dir, strerror(errno));
    if (d == NULL || flock(dirfd(d), LOCK_EX | LOCK_NB) != 0) {
        if (d != NULL)
            closedir(d); /* another cache prunes: this one looks again after its next file */
        pthread_mutex_unlock(&j->disk_mu);
        return;
    }
    disk_file_t *files = NULL;
    size_t n = 0, cap = 0;
    uint64_t total = 0;
    const struct dirent *de;
    uint8_t key[KEY_BYTES];
    bool short_scan = false;
    while ((de = readdir(d)) != NULL) {
        struct stat st;
        const size_t len = strlen(de->d_name);
        if (!image_name(j, de->d_name, key) || len >= sizeof files[0].name ||
            fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (n == cap) {
            const size_t c = cap != 0 ? 2 * cap : 64;
            disk_file_t *p = realloc(files, c * sizeof *p);
            if (p == NULL) {
                short_scan = true;
                break;
            }
            files = p;
            cap = c;
        }
        memcpy(files[n].name, de->d_name, len + 1);
        files[n].used = st.st_mtim;
        files[n].bytes = (uint64_t)st.st_size;
        total += files[n++].bytes;
    }
    if (short_scan)
        at_log(AT_LOG_WARN, "jit", "kernel cache dir %s: out of memory listing it", j->dir);
    uint32_t removed = 0;
    uint64_t removed_bytes = 0;
    int unlink_errno = 0;
    const uint64_t target = limit / 10 * 9;
    if (total > limit)
        qsort(files, n, sizeof *files, older_first);
    for (size_t i = 0; i < n && total > limit && total > target; i++) {
        if (keep != NULL && strcmp(files[i].name, keep) == 0)
            continue;
        if (unlinkat(dirfd(d), files[i].name, 0) != 0) {
            if (errno == ENOENT) /* another process removed it */
                total -= files[i].bytes;
            else
                unlink_errno = errno;
            continue;
        }
        total -= files[i].bytes;
        removed++;
        removed_bytes += files[i].bytes;
        (void)image_name(j, files[i].name, key);
        pthread_mutex_lock(&j->mu);
        entry_t *e = find(j, key);
        if (e != NULL)
            e->on_disk = false;
        j->stats.disk_removed++;
        pthread_mutex_unlock(&j->mu);
    }
    j->disk_est_bytes = total;
    closedir(d); /* and its lock */
    if (unlink_errno != 0)
        at_log(AT_LOG_WARN, "jit", "kernel cache dir %s: cannot remove an image: %s", j->dir,
               strerror(unlink_errno));
    if (removed != 0)
        at_log(AT_LOG_INFO, "jit",
               "kernel cache dir %s: removed the %u least recently used images (%.1f MiB) to "
               "keep it under %.1f MiB",
               j->dir, removed, (double)removed_bytes / (1 << 20), (double)limit / (1 << 20));
    free(files);
    pthread_mutex_unlock(&j->disk_mu);
}

/* Marks the key's file used now (its modification time), so that a prune, in any cache or
 * process sharing the directory, keeps what is served from memory too. */
static void disk_touch(const att_jit_t *j, const uint8_t key[KEY_BYTES]) {
    char path[600];
    key_path(j, key, path);
    (void)utimensat(AT_FDCWD, path, NULL, 0);
}

void att_jit_set_disk_limit(att_jit_t *j, uint64_t bytes) {
    pthread_mutex_lock(&j->disk_mu);
    j->disk_limit_bytes = bytes;
    j->disk_est_bytes = UINT64_MAX / 2; /* unknown: look now */
    pthread_mutex_unlock(&j->disk_mu);
    disk_prune(j, NULL, 0);
}

at_err_t att_jit_lookup(att_jit_t *j, const char *arch, const char *const *opts, uint32_t n_opts,
                        void **image, size_t *bytes) {
    uint8_t key[KEY_BYTES];
    at_err_t e = make_key(j, arch, opts, n_opts, key, NULL);
    if (e != AT_OK || (e = memory_get(j, key, image, bytes)) != AT_ERR_NOT_READY)
        return e;
    char path[600];
    size_t n = 0;
    int damaged = 0;
    void *img = disk_get(j, key, path, &n, &damaged);
    if (img == NULL)
        return AT_ERR_NOT_READY;
    return memory_put(j, key, img, n, true, 1, damaged, 0, image, bytes);
}

at_err_t att_jit_image(att_jit_t *j, const char *arch, const char *const *opts, uint32_t n_opts,
                       void **image, size_t *bytes, int *compiled, at_diag_t *diag) {
    uint8_t key[KEY_BYTES];
    at_err_t e = make_key(j, arch, opts, n_opts, key, diag);
    if (e != AT_OK)
        return e;
    if (compiled != NULL)
        *compiled = 0;
    if ((e = memory_get(j, key, image, bytes)) != AT_ERR_NOT_READY)
        return e == AT_ERR_UNSUPPORTED
                   ? at_diag_set(diag, e, "kernel does not compile for %s (an earlier try)", arch)
                   : e;
    char path[600];
    size_t n = 0;
    int damaged = 0;
    void *img = disk_get(j, key, path, &n, &damaged);
    const int from_disk = img != NULL;
    bool on_disk = from_disk;
    uint64_t dt = 0;
    if (img == NULL) {
        const uint64_t t0 = now_ns();
        e = j->cc.compile(j->cc.user, arch, opts, n_opts, &img, &n, diag);
        dt = now_ns() - t0 + 1;
        if (e == AT_ERR_UNSUPPORTED) { /* remembered: the options never compile */
            size_t zero;
            (void)memory_put(j, key, NULL, 0, false, 0, damaged, dt, NULL, &zero);
        }
        if (e != AT_OK)
            return e;
        if (path[0] != '\0')
            on_disk = disk_write(j->dir, path, img, n);
        if (compiled != NULL)
            *compiled = 1;
    }
    e = memory_put(j, key, img, n, on_disk, from_disk, damaged, dt, image, bytes);
    if (!from_disk && on_disk) /* a new file: the directory may be over its limit now */
        disk_prune(j, strrchr(path, '/') + 1, HEADER_BYTES + n);
    return e;
}

#ifdef AT_HAVE_CUDA
/* ---- NVRTC ---- */

at_err_t att_jit_nvrtc_failed(const att_nvrtc_t *nv, nvrtcProgram prog, nvrtcResult r,
                              const char *arch, at_diag_t *diag) {
    size_t log_n = 0;
    char *log = NULL;
    if (nv->nvrtcGetProgramLogSize(prog, &log_n) != NVRTC_SUCCESS || log_n == 0 ||
        (log = malloc(log_n)) == NULL || nv->nvrtcGetProgramLog(prog, log) != NVRTC_SUCCESS) {
        free(log);
        log = NULL;
    }
    const at_err_t e = att_jit_compile_failed("NVRTC", arch, log, nv->nvrtcGetErrorString(r), diag);
    free(log);
    return e;
}

/* The embedded source with its headers, for arch ("sm_90"). */
static at_err_t nvrtc_compile(void *user, const char *arch, const char *const *opts,
                              uint32_t n_opts, void **image, size_t *bytes, at_diag_t *diag) {
    const att_nvrtc_t *nv = user;
    const char *all[ATT_JIT_MAX_OPTS + 1];
    char arch_opt[48];
    if (n_opts > ATT_JIT_MAX_OPTS)
        return at_diag_set(diag, AT_ERR_INTERNAL, "too many compile options");
    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=%s", arch);
    all[0] = arch_opt;
    memcpy(all + 1, opts, n_opts * sizeof *opts);
    att_jit_source_t src;
    att_jit_kernel_source(&src);
    nvrtcProgram prog;
    nvrtcResult r = nv->nvrtcCreateProgram(&prog, src.text, src.name, (int)src.num_headers,
                                           src.headers, src.header_names);
    if (r != NVRTC_SUCCESS)
        return at_diag_set(diag, AT_ERR_INTERNAL, "nvrtcCreateProgram: %s",
                           nv->nvrtcGetErrorString(r));
    at_err_t e = AT_OK;
    r = nv->nvrtcCompileProgram(prog, (int)n_opts + 1, all);
    if (r != NVRTC_SUCCESS) {
        e = att_jit_nvrtc_failed(nv, prog, r, arch, diag);
        goto out_destroy;
    }
    size_t n = 0;
    if (nv->nvrtcGetCUBINSize(prog, &n) != NVRTC_SUCCESS || n == 0) {
        e = at_diag_set(diag, AT_ERR_INTERNAL, "NVRTC made no cubin for %s", arch);
        goto out_destroy;
    }
    void *img = malloc(n);
    if (img == NULL) {
        e = AT_ERR_NOMEM;
        goto out_destroy;
    }
    if (nv->nvrtcGetCUBIN(prog, img) != NVRTC_SUCCESS) {
        free(img);
        e = at_diag_set(diag, AT_ERR_INTERNAL, "nvrtcGetCUBIN failed");
        goto out_destroy;
    }
    *image = img;
    *bytes = n;
out_destroy:
    nv->nvrtcDestroyProgram(&prog);
    return e;
}

at_err_t att_jit_create(const char *cache_dir, at_diag_t *diag, att_jit_t **out) {
    const att_nvrtc_t *nv;
    at_err_t e = att_cudrv_nvrtc(&nv, diag);
    if (e != AT_OK)
        return e;
    char name[32];
    snprintf(name, sizeof name, "nvrtc %d.%d", nv->major, nv->minor);
    const att_jit_compiler_t cc = {
        .name = name, .image_ext = "cubin", .compile = nvrtc_compile, .user = (void *)nv};
    return att_jit_create_with(&cc, cache_dir, diag, out);
}

void att_jit_nvrtc_version(char *buf, size_t n) {
    const att_nvrtc_t *nv;
    if (att_cudrv_nvrtc(&nv, NULL) == AT_OK)
        snprintf(buf, n, "%d.%d", nv->major, nv->minor);
    else if (n > 0)
        buf[0] = '\0';
}

#endif

/* Shared tensor memory (see svc_arena.h).
 *
 * The bookkeeping is two arrays in the creator's heap, both sorted by offset: the free ranges
 * (never empty, never touching: a free puts a region back and merges it with its neighbours) and
 * the live regions (offset -> reserved length, so a free needs only the offset). Together they
 * tile [0, size) exactly. Allocation is first fit; every length is a multiple of 64, so every
 * offset stays 64-byte aligned. Free ranges are the gaps between regions, so there are at most
 * regions + 1 of them: growing both arrays together in alloc means free never allocates and never
 * fails. O(regions) per call, meant for tens to hundreds of live regions.
 *
 * The object is mapped MAP_SHARED from tmpfs and never cleared: pages are committed by the OS
 * when first touched. A touch that needs a page when /dev/shm is full raises SIGBUS, so
 * /dev/shm must be sized for the arenas (containers default to 64 MiB).
 *
 * Thread: any. mu guards the bookkeeping; name, base and size are fixed from create to destroy
 * and read without it. The region bytes are not guarded: the owner of a region reads and writes
 * it, in this process or another. destroy must not race any other call. */
#include "service/svc_arena.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/at_base.h"

#define ARENA_MAGIC 0x61726e61u /* "arna" */
#define ARENA_DEAD 0xdeadbeefu
#define ALIGN_BYTES 64u
#define TAG_MAX_CHARS 32u
#define FIRST_CAP 16u
#define NAME_TRIES 64 /* fresh counters to try when a stale object holds our name */

typedef struct range {
    uint64_t off_bytes;
    uint64_t len_bytes; /* a multiple of ALIGN_BYTES, never 0 */
} range_t;

/* Fields below mu are guarded by it. (AT_GUARDED_BY cannot name a sibling field in C: clang
 * parses it early and rejects the name, and a bare pthread_mutex_t is no capability anyway.) */
struct svc_arena {
    uint32_t magic;          /* ARENA_MAGIC while alive */
    bool creator;            /* allocates, and unlinks the name on destroy */
    char name[NAME_MAX + 1]; /* "/attnd-<pid>-<tag>-<counter>", or the name attached to */
    uint8_t *base;           /* [size_bytes] the mapping */
    uint64_t size_bytes;     /* a multiple of the page size */
    pthread_mutex_t mu;
    range_t *free_ranges; /* [cap + 1] sorted by offset, see top comment; mu */
    uint32_t n_free;      /* mu */
    range_t *regions;     /* [cap] live regions, sorted by offset; mu */
    uint32_t n_regions;   /* mu */
    uint32_t cap;         /* regions both arrays hold without growing; mu */
    uint64_t used_bytes;  /* sum of region lengths; mu */
};

/* Uniqueness only: names need distinct values, nothing is published through the counter, so
 * relaxed order is enough. */
static atomic_uint_fast64_t name_counter;

static void check_live(const svc_arena_t *a) {
    AT_ASSERT(a != NULL);
    AT_ASSERT(a->magic == ARENA_MAGIC);
    (void)a;
}

/* GNU strerror_r (the build defines _GNU_SOURCE): thread-safe, may return a static string. */
static const char *errno_text(int err, char *buf, size_t n) { return strerror_r(err, buf, n); }

static at_err_t io_error(at_diag_t *diag, const char *what, const char *name, int err) {
    char buf[96];
    return at_diag_set(diag, AT_ERR_IO, "%s %s: %s", what, name, errno_text(err, buf, sizeof buf));
}

static bool tag_valid(const char *tag) {
    if (tag == NULL)
        return false;
    size_t n = strlen(tag);
    if (n == 0 || n > TAG_MAX_CHARS)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = tag[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == ':'))
            return false;
    }
    return true;
}

static bool name_valid(const char *name) {
    if (name == NULL || name[0] != '/')
        return false;
    size_t n = strlen(name);
    return n >= 2 && n <= NAME_MAX && strchr(name + 1, '/') == NULL;
}

/* bytes rounded up to the page size, or 0 when bytes is 0 or too large for an off_t. */
static uint64_t page_round(uint64_t bytes) {
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    if (bytes == 0 || bytes > (uint64_t)INT64_MAX - page || bytes > (uint64_t)SIZE_MAX - page)
        return 0;
    return (bytes + page - 1) / page * page;
}

static at_err_t arena_new(uint64_t size_bytes, bool creator, svc_arena_t **out) {
    svc_arena_t *a = calloc(1, sizeof *a);
    if (a == NULL)
        return AT_ERR_NOMEM;
    if (creator) {
        a->regions = malloc(FIRST_CAP * sizeof *a->regions);
        a->free_ranges = malloc((FIRST_CAP + 1) * sizeof *a->free_ranges);
        if (a->regions == NULL || a->free_ranges == NULL) {
            free(a->regions);
            free(a->free_ranges);
            free(a);
            return AT_ERR_NOMEM;
        }
        a->cap = FIRST_CAP;
        a->free_ranges[0] = (range_t){0, size_bytes};
        a->n_free = 1;
    }
    if (pthread_mutex_init(&a->mu, NULL) != 0) {
        free(a->regions);
        free(a->free_ranges);
        free(a);
        return AT_ERR_NOMEM;
    }
    a->creator = creator;
    a->size_bytes = size_bytes;
    a->magic = ARENA_MAGIC;
    *out = a;
    return AT_OK;
}

/* Frees the heap side only (no munmap, no unlink). */
static void arena_free(svc_arena_t *a) {
    pthread_mutex_destroy(&a->mu);
    free(a->regions);
    free(a->free_ranges);
    a->magic = ARENA_DEAD; /* a stale handle fails check_live in debug builds */
    free(a);
}

at_err_t svc_arena_create(const char *tag, uint64_t bytes, at_diag_t *diag, svc_arena_t **out) {
    AT_ASSERT(out != NULL);
    if (!tag_valid(tag))
        return at_diag_set(diag, AT_ERR_CONFIG, "arena tag '%s' is not 1-%u of [a-z0-9:-]",
                           tag != NULL ? tag : "(null)", TAG_MAX_CHARS);
    uint64_t size = page_round(bytes);
    if (size == 0)
        return at_diag_set(diag, AT_ERR_CONFIG, "arena size %llu bytes is 0 or too large",
                           (unsigned long long)bytes);

    svc_arena_t *a = NULL;
    at_err_t e = arena_new(size, true, &a);
    if (e != AT_OK)
        return at_diag_set(diag, e, "arena bookkeeping");

    int fd = -1;
    for (int i = 0; i < NAME_TRIES && fd < 0; i++) {
        uint64_t n = atomic_fetch_add_explicit(&name_counter, 1, memory_order_relaxed);
        snprintf(a->name, sizeof a->name, "/attnd-%ld-%s-%llu", (long)getpid(), tag,
                 (unsigned long long)n);
        fd = shm_open(a->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 && errno != EEXIST)
            break;
    }
    if (fd < 0) {
        e = io_error(diag, "shm_open", a->name, errno);
        goto out_free;
    }
    if (ftruncate(fd, (off_t)size) != 0) {
        e = io_error(diag, "ftruncate", a->name, errno);
        goto out_unlink;
    }
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        e = io_error(diag, "mmap", a->name, errno);
        goto out_unlink;
    }
    close(fd); /* the mapping keeps the object open */
    a->base = p;
    *out = a;
    return AT_OK;

out_unlink:
    close(fd);
    shm_unlink(a->name);
out_free:
    arena_free(a);
    return e;
}

at_err_t svc_arena_attach(const char *name, uint64_t bytes, at_diag_t *diag, svc_arena_t **out) {
    AT_ASSERT(out != NULL);
    if (!name_valid(name))
        return at_diag_set(diag, AT_ERR_CONFIG, "arena name '%s' is not '/' and 1-%d non-'/'",
                           name != NULL ? name : "(null)", NAME_MAX - 1);
    uint64_t size = page_round(bytes);
    if (size == 0)
        return at_diag_set(diag, AT_ERR_CONFIG, "arena size %llu bytes is 0 or too large",
                           (unsigned long long)bytes);

    svc_arena_t *a = NULL;
    at_err_t e = arena_new(size, false, &a);
    if (e != AT_OK)
        return at_diag_set(diag, e, "arena bookkeeping");
    snprintf(a->name, sizeof a->name, "%s", name); /* fits: name_valid checked its length */

    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        e = io_error(diag, "shm_open", name, errno);
        goto out_free;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        e = io_error(diag, "fstat", name, errno);
        goto out_close;
    }
    if (st.st_size < 0 || (uint64_t)st.st_size < size) {
        /* Touching pages past the object's end would raise SIGBUS. */
        e = at_diag_set(diag, AT_ERR_CONFIG, "arena %s is %lld bytes, smaller than %llu", name,
                        (long long)st.st_size, (unsigned long long)size);
        goto out_close;
    }
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        e = io_error(diag, "mmap", name, errno);
        goto out_close;
    }
    close(fd);
    a->base = p;
    *out = a;
    return AT_OK;

out_close:
    close(fd);
out_free:
    arena_free(a);
    return e;
}

void svc_arena_destroy(svc_arena_t **ap) {
    if (ap == NULL || *ap == NULL)
        return;
    svc_arena_t *a = *ap;
    check_live(a);
    munmap(a->base, (size_t)a->size_bytes);
    if (a->creator)
        shm_unlink(a->name); /* nothing to do on failure: the name is ours and nobody else's */
    arena_free(a);
    *ap = NULL;
}

const char *svc_arena_name(const svc_arena_t *a) {
    check_live(a);
    return a->name;
}

uint8_t *svc_arena_base(const svc_arena_t *a) {
    check_live(a);
    return a->base;
}

uint64_t svc_arena_size(const svc_arena_t *a) {
    check_live(a);
    return a->size_bytes;
}

#ifndef NDEBUG
/* Regions and free ranges tile [0, size) exactly, free ranges never touch, lengths and offsets
 * are aligned, and the counters agree. O(regions), like every call. Requires a->mu. */
static void check_tiling(const svc_arena_t *a) {
    uint64_t at = 0, used = 0;
    uint32_t i = 0, j = 0;
    bool last_free = false;
    while (i < a->n_free || j < a->n_regions) {
        const range_t *r;
        bool is_free = i < a->n_free && a->free_ranges[i].off_bytes == at;
        if (is_free) {
            r = &a->free_ranges[i++];
            AT_ASSERT(!last_free); /* neighbours were not merged */
        } else {
            AT_ASSERT(j < a->n_regions && a->regions[j].off_bytes == at);
            r = &a->regions[j++];
            used += r->len_bytes;
        }
        AT_ASSERT(r->len_bytes > 0 && r->len_bytes % ALIGN_BYTES == 0);
        at += r->len_bytes;
        last_free = is_free;
    }
    AT_ASSERT(at == a->size_bytes);
    AT_ASSERT(used == a->used_bytes);
    AT_ASSERT(a->n_free <= a->n_regions + 1 && a->n_regions <= a->cap);
}
#else
#define check_tiling(a) ((void)0)
#endif

/* Room for one more region (and so one more free range). Changes nothing visible on failure.
 * Requires a->mu. */
static at_err_t reserve_one(svc_arena_t *a) {
    if (a->n_regions < a->cap)
        return AT_OK;
    if (a->cap > UINT32_MAX / 2 - 1)
        return AT_ERR_NOMEM;
    uint32_t cap = a->cap * 2;
    range_t *regions = realloc(a->regions, cap * sizeof *regions);
    if (regions == NULL)
        return AT_ERR_NOMEM;
    a->regions = regions;
    range_t *free_ranges = realloc(a->free_ranges, (cap + 1) * sizeof *free_ranges);
    if (free_ranges == NULL)
        return AT_ERR_NOMEM; /* regions grew, cap did not: still consistent */
    a->free_ranges = free_ranges;
    a->cap = cap;
    return AT_OK;
}

/* Index of the first region whose offset is >= off. Requires a->mu. */
static uint32_t region_lower_bound(const svc_arena_t *a, uint64_t off) {
    uint32_t lo = 0, hi = a->n_regions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (a->regions[mid].off_bytes < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void ranges_insert(range_t *v, uint32_t *n, uint32_t at, range_t r) {
    memmove(&v[at + 1], &v[at], (*n - at) * sizeof *v);
    v[at] = r;
    (*n)++;
}

static void ranges_remove(range_t *v, uint32_t *n, uint32_t at) {
    memmove(&v[at], &v[at + 1], (*n - at - 1) * sizeof *v);
    (*n)--;
}

at_err_t svc_arena_alloc(svc_arena_t *a, uint64_t bytes, uint64_t *offset) {
    check_live(a);
    AT_ASSERT(a->creator); /* an attached arena only maps; its creator allocates */
    AT_ASSERT(offset != NULL);
    if (bytes > a->size_bytes)
        return AT_ERR_SHM_FULL; /* also keeps the rounding below from overflowing */
    /* size_bytes is a multiple of 64, so need <= size_bytes. A zero-size region takes 64 bytes
     * so that its offset is its own. */
    uint64_t need =
        bytes == 0 ? ALIGN_BYTES : (bytes + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;

    pthread_mutex_lock(&a->mu);
    at_err_t e = reserve_one(a);
    if (e != AT_OK)
        goto out_unlock;
    uint32_t i = 0;
    while (i < a->n_free && a->free_ranges[i].len_bytes < need)
        i++;
    if (i == a->n_free) {
        e = AT_ERR_SHM_FULL;
        goto out_unlock;
    }
    range_t *f = &a->free_ranges[i];
    uint64_t off = f->off_bytes;
    f->off_bytes += need;
    f->len_bytes -= need;
    if (f->len_bytes == 0)
        ranges_remove(a->free_ranges, &a->n_free, i);
    ranges_insert(a->regions, &a->n_regions, region_lower_bound(a, off), (range_t){off, need});
    a->used_bytes += need;
    check_tiling(a);
    *offset = off;
out_unlock:
    pthread_mutex_unlock(&a->mu);
    return e;
}

void svc_arena_free(svc_arena_t *a, uint64_t offset) {
    check_live(a);
    AT_ASSERT(a->creator);
    pthread_mutex_lock(&a->mu);
    uint32_t j = region_lower_bound(a, offset);
    if (j == a->n_regions || a->regions[j].off_bytes != offset) {
        AT_ASSERT(!"svc_arena_free: offset not allocated (double free?)");
        pthread_mutex_unlock(&a->mu);
        return;
    }
    range_t r = a->regions[j];
    ranges_remove(a->regions, &a->n_regions, j);
    a->used_bytes -= r.len_bytes;

    /* i: the first free range after r. Merge with the one before and/or the one at i. */
    uint32_t i = 0;
    while (i < a->n_free && a->free_ranges[i].off_bytes < r.off_bytes)
        i++;
    range_t *prev = i > 0 ? &a->free_ranges[i - 1] : NULL;
    range_t *next = i < a->n_free ? &a->free_ranges[i] : NULL;
    bool join_prev = prev != NULL && prev->off_bytes + prev->len_bytes == r.off_bytes;
    bool join_next = next != NULL && r.off_bytes + r.len_bytes == next->off_bytes;
    if (join_prev && join_next) {
        prev->len_bytes += r.len_bytes + next->len_bytes;
        ranges_remove(a->free_ranges, &a->n_free, i);
    } else if (join_prev) {
        prev->len_bytes += r.len_bytes;
    } else if (join_next) {
        next->off_bytes = r.off_bytes;
        next->len_bytes += r.len_bytes;
    } else {
        /* Capacity: n_free <= n_regions + 1 <= cap + 1 after this insert (see top comment). */
        ranges_insert(a->free_ranges, &a->n_free, i, r);
    }
    check_tiling(a);
    pthread_mutex_unlock(&a->mu);
}

void svc_arena_get_stats(svc_arena_t *a, svc_arena_stats_t *out) {
    check_live(a);
    AT_ASSERT(out != NULL);
    pthread_mutex_lock(&a->mu);
    uint64_t largest = 0;
    for (uint32_t i = 0; i < a->n_free; i++)
        if (a->free_ranges[i].len_bytes > largest)
            largest = a->free_ranges[i].len_bytes;
    *out = (svc_arena_stats_t){
        .size_bytes = a->size_bytes,
        .used_bytes = a->used_bytes,
        .regions = a->n_regions,
        .largest_free_bytes = largest,
    };
    pthread_mutex_unlock(&a->mu);
}

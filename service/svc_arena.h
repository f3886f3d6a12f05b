/* Shared tensor memory: one POSIX shared-memory object that the gRPC server and a device worker
 * both map, plus an allocator of regions in it. Tensors (q, k, v, out of attention calls) travel
 * as offsets into an arena, never inside messages; the worker may be a thread in the server or a
 * separate process.
 *
 * The creating process owns the allocator; its bookkeeping lives in that process's heap, not in
 * the shared memory. Another process attaches by name and only reads and writes regions at the
 * offsets it is given. Regions start at 64-byte-aligned offsets (the mapping is page-aligned, so
 * their addresses are 64-byte aligned too); each region reserves its size rounded up to 64 bytes,
 * at least 64, so a zero-size region still has an offset of its own. */
#ifndef AT_SERVICE_SVC_ARENA_H
#define AT_SERVICE_SVC_ARENA_H

#include <stdint.h>

#include "common/at_err.h"

typedef struct svc_arena svc_arena_t;

/* Creates a new shared-memory object named "/attnd-<pid>-<tag>-<counter>" (tag: [a-z0-9:-],
 * 1 to 32 characters, e.g. "cpu0" or "cuda:01") of `bytes` (rounded up to the page size), maps it, and makes
 * it allocatable. The object is unlinked by svc_arena_destroy of the creator. Errors:
 * AT_ERR_CONFIG (bytes 0 or tag invalid), AT_ERR_IO (shm_open/ftruncate/mmap failed; errno text
 * into diag), AT_ERR_NOMEM. diag may be NULL. On success *out is the caller's
 * (svc_arena_destroy); on failure nothing is left behind (no name, no mapping). Thread: any. */
at_err_t svc_arena_create(const char *tag, uint64_t bytes, at_diag_t *diag, svc_arena_t **out);

/* Maps an existing object by name (another process's arena, as svc_arena_name gives it) for
 * reading and writing regions; no allocation on an attached arena. bytes is the creator's size
 * (svc_arena_size, or the size it was created with); it is rounded up to the page size. Errors
 * as above: AT_ERR_CONFIG (bytes 0, name not "/<no slash>", or the object is smaller than
 * bytes), AT_ERR_IO (shm_open, for instance of a missing name, fstat or mmap failed; errno text
 * into diag), AT_ERR_NOMEM. diag may be NULL. On success *out is the caller's
 * (svc_arena_destroy, which unmaps but never unlinks). Thread: any. */
at_err_t svc_arena_attach(const char *name, uint64_t bytes, at_diag_t *diag, svc_arena_t **out);

/* Unmaps; the creator also unlinks the name. Regions still allocated are dropped with the
 * arena; the caller ensures no thread still uses the arena or its mapping. NULL allowed (as is
 * *a == NULL); sets *a to NULL. Thread: any, once. */
void svc_arena_destroy(svc_arena_t **a);

/* The object's name ("/attnd-..."), for svc_arena_attach in another process. Borrowed: valid
 * until svc_arena_destroy. Thread: any. */
const char *svc_arena_name(const svc_arena_t *a);

/* Start of the mapping; region `offset` lives at base + offset. Valid until svc_arena_destroy.
 * Thread: any. */
uint8_t *svc_arena_base(const svc_arena_t *a);

/* Mapped size in bytes (a multiple of the page size). Thread: any. */
uint64_t svc_arena_size(const svc_arena_t *a);

/* Allocates `bytes` (0 allowed: returns a valid, unique, zero-size region) at a 64-byte-aligned
 * offset; *offset is written only on success. AT_ERR_SHM_FULL when no free range is large
 * enough, including requests larger than the arena (callers answer UNAVAILABLE: retry later);
 * AT_ERR_NOMEM when the bookkeeping cannot grow. Nothing changes on failure. The region's bytes
 * are not cleared. Thread: any (internal mutex). Not on an attached arena (assert). */
at_err_t svc_arena_alloc(svc_arena_t *a, uint64_t bytes, uint64_t *offset);

/* Returns a region. offset must come from svc_arena_alloc and not be freed twice (assert in
 * debug builds; in release builds an unknown offset is ignored). Never fails, never allocates.
 * Thread: any (internal mutex). Not on an attached arena (assert). */
void svc_arena_free(svc_arena_t *a, uint64_t offset);

typedef struct svc_arena_stats {
    uint64_t size_bytes;         /* svc_arena_size */
    uint64_t used_bytes;         /* reserved by live regions (each rounded up to 64, at least 64) */
    uint32_t regions;            /* live regions */
    uint64_t largest_free_bytes; /* the largest request that would succeed now, rounded to 64 */
} svc_arena_stats_t;

/* A consistent snapshot (taken under the mutex). On an attached arena: size only, the rest 0.
 * Thread: any. */
void svc_arena_get_stats(svc_arena_t *a, svc_arena_stats_t *out);

#endif

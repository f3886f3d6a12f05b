/* The tuning store: the records of one device, kernel and model shape, in one JSON file of a
 * tuning directory.
 *
 * File: {"schema": 1, "sha256": hex, "payload": {"space", "kernel", "device", "shape",
 * "records": [...]}}; the checksum is SHA-256 of the payload dumped compactly with sorted keys
 * (jansson), so any change to a byte that matters is caught. The name is readable and unique:
 * "<backend>-<shape>-<16 hex of SHA-256 over every key field>.json".
 *
 * Writes are atomic and merged: under an exclusive flock on "<file>.lock" (kept; never deleted),
 * the file is read again, its records are merged with the store's (per bucket the newer
 * measurement wins; equal times: the faster), written to a temporary file in the same directory,
 * fsync'ed, renamed over the file, and the directory is fsync'ed. A reader never sees a torn file
 * (rename is atomic), and two processes or threads saving concurrently lose no record (the lock
 * orders their read-merge-rename steps).
 *
 * A missing file is reported (INFO) and means no records. A truncated, non-JSON, wrongly
 * checksummed, foreign-version or foreign-key file (or one with a record the space refuses) is
 * reported (WARN), renamed to "<file>.bad" (or ".bad.N", never overwriting or deleting one) under
 * the lock, and read as empty: it never stops a caller.
 *
 * Thread: a store object is used by one thread at a time; any number of store objects (threads,
 * processes) may share a file. */
#ifndef AT_TUNING_TUN_STORE_H
#define AT_TUNING_TUN_STORE_H

#include <stdint.h>
#include <stdio.h>

#include "tuning/tun.h"

typedef struct tun_record {
    tun_bucket_t bucket;
    tun_cfg_t best;
    uint64_t best_ns;      /* the best config's time for one batch of the bucket's shape */
    uint64_t heuristic_ns; /* the heuristic config's time, same batch */
    tun_cfg_t worst;
    uint64_t worst_ns;     /* the slowest config tried */
    uint32_t tried;        /* configs timed */
    uint64_t tuning_ns;    /* wall time the tuning run took, set-up included */
    int64_t updated_s;     /* Unix time of the measurement */
} tun_record_t;

typedef struct tun_store tun_store_t;

/* How a load or save found the file. */
typedef enum tun_file_state {
    TUN_FILE_OK = 0,
    TUN_FILE_MISSING = 1,
    TUN_FILE_DAMAGED = 2, /* set aside */
} tun_file_state_t;

/* A store for (space, device, kernel_hash, shape) in dir (created with parents if missing).
 * Reads nothing yet. All arguments are copied. AT_ERR_IO (diag says why), AT_ERR_NOMEM. On
 * success *out is the caller's (tun_store_destroy). */
at_err_t tun_store_open(const char *dir, const tun_space_t *space, const tun_device_t *dev,
                        const char *kernel_hash, const tun_shape_t *shape, at_diag_t *diag,
                        tun_store_t **out);
void tun_store_destroy(tun_store_t **st);

/* Merges the file's records into the store (see the top). *state (may be NULL) says what was
 * found. Fails only with AT_ERR_NOMEM; a damaged file is not a failure. */
at_err_t tun_store_load(tun_store_t *st, tun_file_state_t *state);

/* Writes the store merged with the file (see the top); afterwards the store holds the union.
 * AT_ERR_IO (logged) when the directory cannot be written; the store is unchanged then. */
at_err_t tun_store_save(tun_store_t *st);

/* The record of bucket b, or NULL; borrowed until the store changes. */
const tun_record_t *tun_store_find(const tun_store_t *st, const tun_bucket_t *b);
/* Adds r, replacing a record of the same bucket. AT_ERR_NOMEM. */
at_err_t tun_store_put(tun_store_t *st, const tun_record_t *r);
size_t tun_store_count(const tun_store_t *st);
/* Records in bucket order; i < tun_store_count. */
const tun_record_t *tun_store_at(const tun_store_t *st, size_t i);
const char *tun_store_path(const tun_store_t *st);
/* Damaged files this store set aside, and the name of the last one ("" if none). */
uint32_t tun_store_set_aside(const tun_store_t *st, const char **last_bad);

/* Prints a store file for people (`attnd tune --show`): its key, then per record the bucket, the
 * best config and its time, the heuristic's time, the worst config tried and its time. Checks
 * the file as a load does but changes nothing. AT_ERR_IO when it is missing or damaged (why is
 * printed). */
at_err_t tun_store_print(const char *path, FILE *out);

#endif
